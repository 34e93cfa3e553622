"""The channels-last CPU convolution and pooling against chainer's own functions."""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest
from chainer import gradient_check

from audit import fastconv


def _nchw(a):
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    "n,h,w,ci,co,k",
    [(5, 28, 28, 1, 8, 4),  # whole windows as columns (k*ci < 32)
     (7, 13, 11, 16, 6, 3),  # window rows and shifted products
     (3, 9, 12, 3, 4, 2),
     (1, 5, 5, 40, 3, 5)],  # a 1x1 output
)
@pytest.mark.parametrize("task_bytes", [1_000, 2 << 20])  # many small tasks on the pool / one task
def test_conv_matches_chainer(n, h, w, ci, co, k, task_bytes, monkeypatch):
    monkeypatch.setattr(fastconv, "TASK_BYTES", task_bytes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, ci)).astype(np.float32)
    wt = rng.standard_normal((co, ci, k, k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    gy = rng.standard_normal((n, h - k + 1, w - k + 1, co)).astype(np.float32)

    xc, wc, bc = chainer.Variable(_nchw(x)), chainer.Variable(wt), chainer.Variable(b)
    yc = F.convolution_2d(xc, wc, bc)
    yc.grad = _nchw(gy)
    yc.backward()
    xv, wv, bv = chainer.Variable(x), chainer.Variable(wt), chainer.Variable(b)
    y = fastconv.conv2d(xv, wv, bv)
    y.grad = gy
    y.backward()

    np.testing.assert_allclose(_nchw(y.array), yc.array, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fastconv.conv2d_nhwc(x, wt, b), y.array, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_nchw(xv.grad), xc.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(wv.grad, wc.grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bv.grad, bc.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ci,k", [(1, 3), (12, 3)])
def test_conv_gradients_numerically(ci, k):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 7, ci))
    w = rng.standard_normal((3, ci, k, k))
    b = rng.standard_normal(3)
    gy = rng.standard_normal((2, 6 - k + 1, 7 - k + 1, 3))
    gradient_check.check_backward(fastconv.conv2d, (x, w, b), gy, dtype=np.float64, atol=1e-6, rtol=1e-6)


def test_conv_is_deterministic_across_task_sizes(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 10, 10, 8)).astype(np.float32)
    w = rng.standard_normal((5, 8, 3, 3)).astype(np.float32)
    runs = []
    for _ in range(2):
        wv = chainer.Variable(w)
        y = fastconv.conv2d(x, wv)
        F.sum(y * y).backward()
        runs.append((y.array, wv.grad))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("h,w", [(22, 22), (11, 13), (1, 1)])
def test_pool_matches_chainer(h, w):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, h, w, 5)).astype(np.float32)
    x[0, :2, :2, 0] = 1.5  # a tie: the gradient goes to the first maximum, as chainer's
    xc = chainer.Variable(_nchw(x))
    yc = F.max_pooling_2d(xc, 2)
    gy = rng.standard_normal(yc.shape).astype(np.float32)
    yc.grad = gy
    yc.backward()
    xv = chainer.Variable(x)
    y = fastconv.max_pool2(xv)
    y.grad = np.ascontiguousarray(gy.transpose(0, 2, 3, 1))
    y.backward()
    np.testing.assert_array_equal(_nchw(y.array), yc.array)
    np.testing.assert_array_equal(fastconv.max_pool2_nhwc(x), y.array)
    np.testing.assert_array_equal(_nchw(xv.grad), xc.grad)


def test_pool_gradient_numerically():
    x = np.random.default_rng(4).permutation(2 * 5 * 7 * 3).reshape(2, 5, 7, 3).astype(np.float64)  # no ties
    gy = np.random.default_rng(5).standard_normal((2, 3, 4, 3))
    gradient_check.check_backward(fastconv.max_pool2, (x,), gy, dtype=np.float64, eps=1e-3, atol=1e-6, rtol=1e-6)
