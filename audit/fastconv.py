"""Convolution and 2x2 max pooling on the CPU, channels last (NHWC), for training and inference.

Chainer's CPU convolution builds the full im2col matrix (every image is copied k*k
times), transposes it for ``tensordot`` and scatters the input gradient back with
k*k strided adds; for the small networks here that memory traffic, not arithmetic,
sets the speed. This module does the same products with less traffic:

* channels last, so a window row of ``k`` pixels is ``k * Ci`` contiguous floats;
* im2col over the kernel's columns only (``k`` copies, not ``k*k``), and the kernel's
  rows as ``k`` products on row-shifted views of that matrix: output pixel (i, j)
  sums, over ky, row (i + ky, j) of the matrix times the ky-th slice of the weights;
* a few images per task, so each task's buffers stay in cache, and the tasks on one
  thread per core with single-threaded BLAS (NumPy releases the GIL in products and
  copies), as ``mc.py`` does for scoring.

Only what the models here use: valid padding, stride 1, square kernels. The numbers
match chainer's ``convolution_2d`` / ``max_pooling_2d(cover_all=True)`` up to float
rounding (tests compare them, and check the gradients numerically).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _compat  # noqa: F401
import chainer
from chainer import function_node
from threadpoolctl import ThreadpoolController

from .device import cpu_workers

# Bytes of column matrix per task: small enough to stay in a core's cache.
TASK_BYTES = 2 << 20

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_controller: ThreadpoolController | None = None


def _map(fn, items: list) -> list:
    """``[fn(item) for item in items]``, spread over the cores when called from the
    main thread (inside another pool's worker: serially)."""
    global _pool, _controller
    if len(items) == 1 or cpu_workers() == 1 or threading.current_thread() is not threading.main_thread():
        return [fn(item) for item in items]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(cpu_workers(), thread_name_prefix="audit-conv")
            _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        return list(_pool.map(fn, items))


def _bounds(n: int, per_image_bytes: int) -> list[tuple[int, int]]:
    step = max(1, TASK_BYTES // max(per_image_bytes, 1))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _full(ci: int, k: int) -> bool:
    """Whole k x k windows as columns (one product) when a window row is too narrow
    for an efficient product; else window rows (k products on shifted views)."""
    return k * ci < 32


def _weights(w: np.ndarray) -> np.ndarray:
    """(Co, Ci, k, k) -> (k, k*Ci, Co), rows (kx, ci) per kernel row ky; or, for
    ``_full``, (1, k*k*Ci, Co), rows (ky, kx, ci)."""
    co, ci, k, _ = w.shape
    wt = w.transpose(2, 3, 1, 0)
    shape = (1, k * k * ci, co) if _full(ci, k) else (k, k * ci, co)
    return np.ascontiguousarray(wt.reshape(shape))


def _columns(x: np.ndarray, k: int, full: bool) -> np.ndarray:
    """(n, H, W, Ci) -> (n*H*Wo, k*Ci) window rows; or, ``full``, (n*Ho*Wo, k*k*Ci) windows."""
    n, h, wid, ci = x.shape
    wo = wid - k + 1
    ho = h - k + 1 if full else h
    kys = range(k) if full else range(1)
    cols = np.empty((n, ho, wo, len(kys), k, ci), x.dtype)
    for ky in kys:
        for kx in range(k):
            cols[:, :, :, ky, kx, :] = x[:, ky : ky + ho, kx : kx + wo, :]
    return cols.reshape(n * ho * wo, -1)


def _forward_chunk(x: np.ndarray, wr: np.ndarray, b: np.ndarray | None, k: int, keep: bool):
    n, h, wid, _ = x.shape
    co = wr.shape[2]
    ho, wo = h - k + 1, wid - k + 1
    full = wr.shape[0] == 1
    cols = _columns(x, k, full)
    rows = cols.shape[0]
    out = np.empty((n, ho if full else h, wo, co), x.dtype)  # row-wise: rows i >= ho never read
    flat = out.reshape(rows, co)
    np.matmul(cols, wr[0], out=flat)
    for ky in range(1, wr.shape[0]):
        s = ky * wo
        flat[: rows - s] += cols[s:] @ wr[ky]
    y = out[:, :ho]
    if b is not None:
        y += b
    return y, (cols if keep else None)


def conv2d_nhwc(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Valid k x k convolution, stride 1: (B, H, W, Ci), (Co, Ci, k, k) -> (B, H-k+1, W-k+1, Co)."""
    n, h, wid, ci = x.shape
    co, _, k, _ = w.shape
    wr = _weights(w.astype(x.dtype, copy=False))
    out = np.empty((n, h - k + 1, wid - k + 1, co), x.dtype)

    def task(se):
        s, e = se
        out[s:e] = _forward_chunk(x[s:e], wr, b, k, keep=False)[0]

    _map(task, _bounds(n, h * (wid - k + 1) * k * ci * x.itemsize))
    return out


class Conv2DNHWC(function_node.FunctionNode):
    """``conv2d_nhwc`` as a chainer function (x, W[, b]) -> y, with its gradients."""

    def forward_cpu(self, inputs):
        x, w = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        n, h, wid, ci = x.shape
        co, _, k, _ = w.shape
        self._x_shape = x.shape
        self._wr = _weights(w)
        self._k = k
        self._bounds = _bounds(n, h * (wid - k + 1) * k * ci * x.itemsize)
        y = np.empty((n, h - k + 1, wid - k + 1, co), x.dtype)
        self._cols = [None] * len(self._bounds)

        def task(i):
            s, e = self._bounds[i]
            y[s:e], self._cols[i] = _forward_chunk(x[s:e], self._wr, b, k, keep=True)

        _map(task, range(len(self._bounds)))
        return (y,)

    def backward(self, indexes, grad_outputs):
        gy = grad_outputs[0].array
        n, h, wid, ci = self._x_shape
        k, wr = self._k, self._wr
        co = wr.shape[2]
        ho, wo = h - k + 1, wid - k + 1
        full = wr.shape[0] == 1
        need_gx = 0 in indexes
        gx = np.empty(self._x_shape, gy.dtype) if need_gx else None
        wr_t = np.ascontiguousarray(wr.transpose(0, 2, 1))  # (.., Co, k*Ci)

        def task(i):
            (s, e), cols = self._bounds[i], self._cols[i]
            m = e - s
            if full:
                gf = np.ascontiguousarray(gy[s:e]).reshape(m * ho * wo, co)
            else:
                g = np.empty((m, h, wo, co), gy.dtype)
                g[:, :ho] = gy[s:e]
                g[:, ho:] = 0  # rows i >= ho: no output there, no contribution
                gf = g.reshape(m * h * wo, co)
            rows = gf.shape[0]
            gw = np.empty(wr.shape, gy.dtype)
            for ky in range(wr.shape[0]):
                sh = ky * wo
                np.matmul(cols[sh:].T, gf[: rows - sh], out=gw[ky])
            if need_gx:
                gcols = gf @ wr_t[0]
                for ky in range(1, wr.shape[0]):
                    sh = ky * wo
                    gcols[sh:] += gf[: rows - sh] @ wr_t[ky]
                _col2im(gcols, gx[s:e], k, full)
            return gw

        parts = _map(task, range(len(self._bounds)))
        self._cols = None
        gw = parts[0]
        for p in parts[1:]:
            gw += p
        out = []
        for i in indexes:
            if i == 0:
                out.append(chainer.Variable(gx))
            elif i == 1:
                out.append(chainer.Variable(np.ascontiguousarray(gw.reshape(k, k, ci, co).transpose(3, 2, 0, 1))))
            else:
                out.append(chainer.Variable(gy.sum(axis=(0, 1, 2))))
        return tuple(out)


def _col2im(gcols: np.ndarray, gx: np.ndarray, k: int, full: bool) -> None:
    """Sum column gradients back onto the pixels they were copied from, into ``gx``."""
    m, h, wid, ci = gx.shape
    wo = wid - k + 1
    ho = h - k + 1 if full else h
    g = gcols.reshape(m, ho, wo, k if full else 1, k, ci)
    gx[...] = 0
    for ky in range(g.shape[3]):
        for kx in range(k):
            gx[:, ky : ky + ho, kx : kx + wo] += g[:, :, :, ky, kx]


def conv2d(x, w, b=None):
    """Chainer-differentiable NHWC convolution (CPU arrays)."""
    args = (x, w) if b is None else (x, w, b)
    return Conv2DNHWC().apply(args)[0]


def _pool_views(x: np.ndarray):
    n, h, wid, c = x.shape
    if h % 2 or wid % 2:  # cover_all: odd edges form windows of their own
        padded = np.full((n, h + h % 2, wid + wid % 2, c), -np.inf, x.dtype)
        padded[:, :h, :wid] = x
        x = padded
    return [x[:, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]


def max_pool2_nhwc(x: np.ndarray) -> np.ndarray:
    """2 x 2 max pooling, stride 2, odd edges covered (chainer's ``cover_all=True``)."""
    a, b, c, d = _pool_views(x)
    out = np.maximum(a, b)
    np.maximum(out, c, out=out)
    return np.maximum(out, d, out=out)


class MaxPool2NHWC(function_node.FunctionNode):
    """``max_pool2_nhwc`` as a chainer function; the gradient goes to the first maximum
    of each window (in the order (0,0), (0,1), (1,0), (1,1)), as chainer's does."""

    def forward_cpu(self, inputs):
        (x,) = inputs
        self._x_shape = x.shape
        views = _pool_views(x)
        out = views[0].copy()
        which = np.zeros(out.shape, np.uint8)
        for i, v in enumerate(views[1:], start=1):
            bigger = v > out
            np.copyto(out, v, where=bigger)
            which[bigger] = i
        self._which = which
        return (out,)

    def backward(self, indexes, grad_outputs):
        gy = grad_outputs[0].array
        n, h, wid, c = self._x_shape
        gx = np.zeros((n, h + h % 2, wid + wid % 2, c), gy.dtype)
        for i, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            gx[:, dy::2, dx::2] = np.where(self._which == i, gy, 0)
        self._which = None
        return (chainer.Variable(np.ascontiguousarray(gx[:, :h, :wid])),)


def max_pool2(x):
    """Chainer-differentiable NHWC 2 x 2 max pooling (CPU arrays)."""
    return MaxPool2NHWC().apply((x,))[0]
