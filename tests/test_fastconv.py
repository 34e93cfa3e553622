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
def test_relu_pool_matches_chainer(h, w):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, h, w, 5)).astype(np.float32)
    x[0, :2, :2, 0] = 1.5  # a tie: the gradient goes to the first maximum, as chainer's
    x[1, :2, :2, 1] = 0.0  # a window of zeros: no gradient (ReLU's is 0 at 0)
    x[2, :2, :2, 2] = -1.0  # all negative
    xc = chainer.Variable(_nchw(x))
    yc = F.max_pooling_2d(F.relu(xc), 2)
    gy = rng.standard_normal(yc.shape).astype(np.float32)
    yc.grad = gy
    yc.backward()
    xv = chainer.Variable(x)
    y = fastconv.relu_max_pool2(xv)
    y.grad = np.ascontiguousarray(gy.transpose(0, 2, 3, 1))
    y.backward()
    np.testing.assert_array_equal(_nchw(y.array), yc.array)
    np.testing.assert_array_equal(fastconv.relu_max_pool2_nhwc(x), y.array)
    np.testing.assert_array_equal(_nchw(xv.grad), xc.grad)


def test_relu_pool_ties_in_every_position():
    """Each of the 16 tie patterns of a 2x2 window sends the gradient where chainer does."""
    patterns = np.array([[(m >> b) & 1 for b in range(4)] for m in range(16)], np.float32)
    x = np.where(patterns == 1, 2.0, 1.0).reshape(16, 2, 2, 1).astype(np.float32)
    xc = chainer.Variable(_nchw(x))
    F.sum(F.max_pooling_2d(F.relu(xc), 2)).backward()
    xv = chainer.Variable(x)
    F.sum(fastconv.relu_max_pool2(xv)).backward()
    np.testing.assert_array_equal(_nchw(xv.grad), xc.grad)


def _distinct(shape, seed):
    """Values far apart (no ties, none near 0), so finite differences stay in one piece."""
    n = int(np.prod(shape))
    v = np.random.default_rng(seed).permutation(n).astype(np.float64) - n / 3 + 0.5
    return v.reshape(shape)


def test_relu_pool_gradients_numerically():
    x = _distinct((2, 5, 7, 3), 4)
    gy = np.random.default_rng(5).standard_normal((2, 3, 4, 3))
    ggx = np.random.default_rng(6).standard_normal(x.shape)
    gradient_check.check_backward(fastconv.relu_max_pool2, (x,), gy, dtype=np.float64, eps=1e-3, atol=1e-6,
                                  rtol=1e-6)
    gradient_check.check_double_backward(fastconv.relu_max_pool2, (x,), gy, ggx, dtype=np.float64, eps=1e-3,
                                         atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("ci,k", [(1, 3), (12, 3)])
def test_conv_second_derivatives_numerically(ci, k, relu):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 7, ci))
    w = rng.standard_normal((3, ci, k, k))
    b = rng.standard_normal(3)
    gy = rng.standard_normal((2, 6 - k + 1, 7 - k + 1, 3))
    gg = (rng.standard_normal(x.shape), rng.standard_normal(w.shape), rng.standard_normal(b.shape))

    def fn(x, w, b):
        return fastconv.conv2d(x, w, b, relu=relu)

    gradient_check.check_backward(fn, (x, w, b), gy, dtype=np.float64, atol=1e-5, rtol=1e-5)
    gradient_check.check_double_backward(fn, (x, w, b), gy, gg, dtype=np.float64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ci,k", [(1, 4), (32, 4)])
def test_conv_relu_matches_chainer(ci, k):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 12, 12, ci)).astype(np.float32)
    w = rng.standard_normal((8, ci, k, k)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    gy = rng.standard_normal((6, 12 - k + 1, 12 - k + 1, 8)).astype(np.float32)
    vc = [chainer.Variable(a) for a in (_nchw(x), w, b)]
    yc = F.relu(F.convolution_2d(*vc))
    yc.grad = _nchw(gy)
    yc.backward()
    vs = [chainer.Variable(a) for a in (x, w, b)]
    y = fastconv.conv2d(*vs, relu=True)
    y.grad = gy
    y.backward()
    np.testing.assert_allclose(_nchw(y.array), yc.array, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_nchw(vs[0].grad), vc[0].grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vs[1].grad, vc[1].grad, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(vs[2].grad, vc[2].grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n", [3, 600])  # one block / three blocks of rows (fastconv.ROWS = 256)
def test_linear_matches_chainer(n):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((n, 40)).astype(np.float32)
    w = rng.standard_normal((300, 40)).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    gy = rng.standard_normal((n, 300)).astype(np.float32)
    vs = [chainer.Variable(a.copy()) for a in (x, w, b)]
    y = fastconv.linear(*vs)
    y.grad = gy
    y.backward()
    vc = [chainer.Variable(a.copy()) for a in (x, w, b)]
    yc = F.linear(*vc)
    yc.grad = gy
    yc.backward()
    np.testing.assert_allclose(y.array, yc.array, rtol=1e-5, atol=1e-4)
    for a, c in zip(vs, vc):
        np.testing.assert_allclose(a.grad, c.grad, rtol=1e-4, atol=1e-3)


def test_linear_derivatives_numerically():
    rng = np.random.default_rng(9)
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    gy = rng.standard_normal((5, 3))
    gg = (rng.standard_normal(x.shape), rng.standard_normal(w.shape), rng.standard_normal(b.shape))
    gradient_check.check_backward(fastconv.linear, (x, w, b), gy, dtype=np.float64, atol=1e-6, rtol=1e-6)
    gradient_check.check_double_backward(fastconv.linear, (x, w, b), gy, gg, dtype=np.float64, atol=1e-5,
                                         rtol=1e-5)


@pytest.mark.parametrize("fn,args", [
    (fastconv.conv2d, ((1, 5, 5, 2), (3, 2, 3, 3))),
    (fastconv.relu_max_pool2, ((1, 4, 4, 2),)),
    (fastconv.linear, ((2, 3), (4, 3))),
])
def test_backward_returns_graph_nodes(fn, args):
    """The gradients are outputs of function nodes (the graph is not cut), as chainer's own."""
    rng = np.random.default_rng(10)
    vs = [chainer.Variable(rng.standard_normal(s)) for s in args]
    y = fn(*vs)
    gx = chainer.grad([F.sum(y * y)], vs, enable_double_backprop=True)
    for g in gx:
        assert g.creator is not None, "a gradient with no creator cuts the graph"
    F.sum(gx[0] * gx[0]).backward()  # and a second derivative flows back through them
    assert vs[0].grad is not None


def test_a_forked_child_gets_its_own_threads():
    """The kernels' thread pool does not survive fork: a child (a killed-half-way test, a
    multiprocessing worker) starts its own instead of waiting forever on the parent's."""
    import multiprocessing as mp

    x = np.ones((600, 300), np.float32)  # three blocks of rows: the work goes to the pool
    w = np.ones((500, 300), np.float32)
    fastconv.linear(x, w)  # the parent's pool exists now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        out = pool.apply_async(_child_linear, (x, w)).get(timeout=30)
    np.testing.assert_array_equal(out, x @ w.T)


def _child_linear(x, w):
    return fastconv.linear(x, w).array
