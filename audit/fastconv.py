"""Convolution, ReLU + 2x2 max pooling and dense layers on the CPU, channels last (NHWC),
for training and inference.

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
  copies), as ``mc.py`` does for scoring;
* ReLU and the 2x2 max pooling after it as one pass (``relu_max_pool2``): the window's
  first maximum and its index in one compiled loop (numba), the gradient a scatter by
  that index. ReLU then pooling equals pooling then ReLU, gradients included;
* dense layers split into fixed row blocks over the same threads (``linear``): all
  cores, and the same sums whatever their number.

Every backward pass returns chainer graph nodes (``Conv2DNHWCGrad``, ``_PoolScatter``,
``LinearGrad``), which are differentiable in turn, as chainer's own functions are.

Only what the models here use: valid padding, stride 1, square kernels. The numbers
match chainer's ``convolution_2d`` / ``relu`` + ``max_pooling_2d(cover_all=True)`` /
``linear`` up to float rounding (tests compare them, and check first and second
derivatives numerically).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import _compat  # noqa: F401
import chainer.functions as F
from chainer import function_node
from threadpoolctl import ThreadpoolController

from .device import cpu_workers

# Bytes of column matrix per task: small enough to stay in a core's cache.
TASK_BYTES = 4 << 20

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_controller: ThreadpoolController | None = None


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool there."""
    global _pool, _controller, _lock
    _pool = _controller = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


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


def _conv_bounds(x_shape, w_shape, itemsize: int) -> list[tuple[int, int]]:
    """Runs of images whose column matrix and products fit a task's cache budget."""
    n, h, wid, ci = x_shape
    co, _, k, _ = w_shape
    wo = wid - k + 1
    if _full(ci, k):
        per_image = (h - k + 1) * wo * (k * k * ci + co)
    else:
        per_image = h * wo * (k * ci + k * co)
    return _bounds(n, per_image * itemsize)


def _full(ci: int, k: int) -> bool:
    """Whole k x k windows as columns when a window row is too narrow for an efficient
    product; else window rows."""
    return k * ci < 32


def _weights(w: np.ndarray) -> np.ndarray:
    """(Co, Ci, k, k) -> one matrix: for window rows (k*Ci, k*Co), rows (kx, ci), columns
    (ky, co): every kernel row's weights side by side; for ``_full`` (k*k*Ci, Co), rows
    (ky, kx, ci)."""
    co, ci, k, _ = w.shape
    wt = w.transpose(2, 3, 1, 0)  # (ky, kx, ci, co)
    if _full(ci, k):
        return np.ascontiguousarray(wt.reshape(k * k * ci, co))
    return np.ascontiguousarray(wt.transpose(1, 2, 0, 3).reshape(k * ci, k * co))


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


_jit = numba.njit(nogil=True, cache=True)


@_jit
def _shift_sum(p, b, out):  # pragma: no cover - compiled
    """out[i, y, x] = b + sum over ky of p[i, y + ky, x, ky]: the kernel rows' products,
    each read ky image rows further down. p (m, H, Wo, k, Co), out (m, Ho, Wo, Co)."""
    k, co = p.shape[3], p.shape[4]
    for i in range(out.shape[0]):
        for y in range(out.shape[1]):
            for x in range(out.shape[2]):
                o = out[i, y, x]
                for c in range(co):
                    o[c] = b[c]
                for ky in range(k):
                    src = p[i, y + ky, x, ky]
                    for c in range(co):
                        o[c] += src[c]


@_jit
def _shift_copy(gy, g):  # pragma: no cover - compiled
    """g[i, y, x, ky] = gy[i, y - ky, x] where 0 <= y - ky < Ho, else 0: the output
    gradient as each kernel row sees it. gy (m, Ho, Wo, Co), g (m, H, Wo, k, Co)."""
    ho = gy.shape[1]
    k, co = g.shape[3], g.shape[4]
    for i in range(g.shape[0]):
        for y in range(g.shape[1]):
            for x in range(g.shape[2]):
                for ky in range(k):
                    dst = g[i, y, x, ky]
                    if 0 <= y - ky < ho:
                        src = gy[i, y - ky, x]
                        for c in range(co):
                            dst[c] = src[c]
                    else:
                        for c in range(co):
                            dst[c] = 0


@_jit
def _col2im_rows(g, gx):  # pragma: no cover - compiled
    """gx[i, y, x] = sum over kx of g[i, y, x - kx, kx] (kx ascending, as the numpy
    scatter adds them): window-row gradients back onto pixels. g (m, H, Wo, k, Ci)."""
    wo, k, ci = g.shape[2], g.shape[3], g.shape[4]
    for i in range(gx.shape[0]):
        for y in range(gx.shape[1]):
            for x in range(gx.shape[2]):
                o = gx[i, y, x]
                for c in range(ci):
                    o[c] = 0
                for kx in range(max(0, x - wo + 1), min(k, x + 1)):
                    src = g[i, y, x - kx, kx]
                    for c in range(ci):
                        o[c] += src[c]


def _forward_chunk(x: np.ndarray, w2: np.ndarray, b: np.ndarray | None, k: int, keep: bool):
    """Full windows: one product. Window rows: one product with every kernel row's
    weights side by side (k*Co columns: a wide product runs near the machine's matrix
    rate, k narrow ones of Co columns do not), then each output pixel sums its k rows."""
    n, h, wid, ci = x.shape
    ho, wo = h - k + 1, wid - k + 1
    full = _full(ci, k)
    cols = _columns(x, k, full)
    co = w2.shape[1] if full else w2.shape[1] // k
    if full:
        y = (cols @ w2).reshape(n, ho, wo, co)
        if b is not None:
            y += b
    else:
        y = np.empty((n, ho, wo, co), x.dtype)
        bias = np.zeros(co, x.dtype) if b is None else b
        _shift_sum((cols @ w2).reshape(n, h, wo, k, co), bias, y)
    return y, (cols if keep else None)


def conv2d_nhwc(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Valid k x k convolution, stride 1: (B, H, W, Ci), (Co, Ci, k, k) -> (B, H-k+1, W-k+1, Co)."""
    n, h, wid, ci = x.shape
    co, _, k, _ = w.shape
    w2 = _weights(w.astype(x.dtype, copy=False))
    out = np.empty((n, h - k + 1, wid - k + 1, co), x.dtype)

    def task(se):
        s, e = se
        out[s:e] = _forward_chunk(x[s:e], w2, b, k, keep=False)[0]

    _map(task, _conv_bounds(x.shape, w.shape, x.itemsize))
    return out


class _BilinearGrad(function_node.FunctionNode):
    """The gradient node of y = f(x, W) + b with f bilinear (a convolution, a dense
    layer): (x, W, gy) -> the wanted of (gx, gW, gb). gx is linear in W and gy, gW in x
    and gy, gb in gy, so its own backward is ``f`` and this node again: the adjoint of
    gW = corr(x, gy) in x is gW's formula with W := ggW, that of gx in W is gx's with
    x := ggx, and the gradient in gy is f(ggx, W) + f(x, ggW) + ggb (times ``mask``)."""

    want: tuple[bool, bool, bool]
    mask: np.ndarray | None = None

    def _again(self, want: tuple[bool, ...]) -> "_BilinearGrad":  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, a, b):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, indexes, grad_outputs):
        x, w, gy = self.get_retained_inputs()
        given = dict(zip([i for i, f in enumerate(self.want) if f], grad_outputs))
        ggx, ggw, ggb = given.get(0), given.get(1), given.get(2)
        out = []
        for i in indexes:
            if i == 0:
                out.append(None if ggw is None else self._again((True,)).apply((x, ggw, gy))[0])
            elif i == 1:
                out.append(None if ggx is None else self._again((False, True)).apply((ggx, w, gy))[0])
            else:
                terms = [self._forward(a, b) for a, b in ((ggx, w), (x, ggw)) if a is not None and b is not None]
                if ggb is not None:
                    terms.append(F.broadcast_to(ggb, gy.shape))
                total = _sum(terms)
                out.append(total * self.mask.astype(gy.dtype) if total is not None and self.mask is not None
                           else total)
        return tuple(out)


class Conv2DNHWC(function_node.FunctionNode):
    """``conv2d_nhwc`` as a chainer function (x, W[, b]) -> y, with ``relu`` y = max(0, ...)
    applied while each task's output is in cache; its backward is a :class:`Conv2DNHWCGrad`
    node (which reuses the forward's column matrices)."""

    def __init__(self, relu: bool = False):
        self.relu = relu

    def forward_cpu(self, inputs):
        x, w = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        self.retain_inputs((0, 1))
        n, h, wid, ci = x.shape
        co, _, k, _ = w.shape
        w2 = _weights(w)
        self._bounds = _conv_bounds(x.shape, w.shape, x.itemsize)
        y = np.empty((n, h - k + 1, wid - k + 1, co), x.dtype)
        self._cols = [None] * len(self._bounds)

        def task(i):
            s, e = self._bounds[i]
            y[s:e], self._cols[i] = _forward_chunk(x[s:e], w2, b, k, keep=True)
            if self.relu:
                np.maximum(y[s:e], 0, out=y[s:e])

        _map(task, range(len(self._bounds)))
        if self.relu:
            self.retain_outputs((0,))
        return (y,)

    def backward(self, indexes, grad_outputs):
        x, w = self.get_retained_inputs()
        want = tuple(i in indexes for i in range(len(self.inputs)))
        mask = self.get_retained_outputs()[0].array > 0 if self.relu else None
        grad = Conv2DNHWCGrad(want, self._cols, self._bounds, mask=mask)
        self._cols = None
        return grad.apply((x, w, grad_outputs[0]))


class Conv2DNHWCGrad(_BilinearGrad):
    """(x, W, gy) -> the gradients of ``conv2d(x, W, b)`` that ``want`` names, in the
    order (gx, gW, gb): gx the transposed convolution of gy by W, gW the correlation of
    x with gy, gb the sum of gy; with ``mask`` (ReLU's: output > 0), of gy * mask. Each
    is linear in gy and in x or W, so this node's own backward is :func:`conv2d` and
    this node again.

    Window rows (``not _full``): the kernel's k row offsets are k shifted copies of gy
    side by side, G (rows, k*Co), so that gW is one product cols.T @ G and the column
    gradient one product G @ W (k*Co, k*Ci), not k narrow ones each."""

    def __init__(self, want: tuple[bool, ...], cols: list | None = None, bounds: list | None = None,
                 mask: np.ndarray | None = None):
        self.want = tuple(want) + (False,) * (3 - len(want))
        self._cols, self._bounds = cols, bounds  # the forward's column matrices of x, when this is its backward
        self.mask = mask

    def forward_cpu(self, inputs):
        x, w, gy = inputs
        self.retain_inputs((0, 1, 2))
        want_x, want_w, want_b = self.want
        n, h, wid, ci = x.shape
        co, _, k, _ = w.shape
        full = _full(ci, k)
        ho, wo = h - k + 1, wid - k + 1
        bounds = self._bounds or _conv_bounds(x.shape, w.shape, x.itemsize)
        cols_all = self._cols
        gx = np.empty(x.shape, gy.dtype) if want_x else None
        w2t = np.ascontiguousarray(_weights(w.astype(gy.dtype, copy=False)).T) if want_x else None
        mask = self.mask

        def task(i):
            s, e = bounds[i]
            m = e - s
            g_out = gy[s:e] if mask is None else gy[s:e] * mask[s:e]
            if full:
                gf = np.ascontiguousarray(g_out, dtype=gy.dtype).reshape(m * ho * wo, co)
            else:  # (m*H*Wo, k*Co): block ky is the output gradient shifted down by ky image rows
                g = np.empty((m, h, wo, k, co), gy.dtype)
                _shift_copy(np.ascontiguousarray(g_out), g)
                gf = g.reshape(m * h * wo, k * co)
            gw = gb = None
            if want_w:
                cols = cols_all[i] if cols_all is not None else _columns(np.asarray(x[s:e], gy.dtype), k, full)
                gw = cols.T @ gf  # (k*Ci, k*Co) window rows; (k*k*Ci, Co) whole windows
            if want_b:  # column sums as a product: numpy's sum over the rows of a narrow matrix is slow
                gb = np.ones(len(gf), gy.dtype) @ gf[:, :co]
            if want_x:
                gcols = gf @ w2t
                if full:
                    _col2im(gcols, gx[s:e], k)
                else:
                    _col2im_rows(gcols.reshape(m, h, wo, k, ci), gx[s:e])
            return gw, gb

        parts = _map(task, range(len(bounds)))
        self._cols = None
        out = []
        if want_x:
            out.append(gx)
        if want_w:
            gw = _ordered_sum([p[0] for p in parts])
            if not full:  # (k*Ci, k*Co), rows (kx, ci), columns (ky, co) -> (ky, kx, ci, co)
                gw = gw.reshape(k, ci, k, co).transpose(2, 0, 1, 3)
            out.append(np.ascontiguousarray(gw.reshape(k, k, ci, co).transpose(3, 2, 0, 1)))
        if want_b:
            out.append(_ordered_sum([p[1] for p in parts]))
        return tuple(out)

    def _again(self, want: tuple[bool, ...]) -> "Conv2DNHWCGrad":
        return Conv2DNHWCGrad(want, mask=self.mask)

    def _forward(self, a, b):
        return conv2d(a, b)


def _ordered_sum(parts: list[np.ndarray]) -> np.ndarray:
    """The tasks' partial sums added in task order: the same sum on any number of cores."""
    total = parts[0]
    for p in parts[1:]:
        total += p
    return total


def _sum(terms: list):
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _col2im(gcols: np.ndarray, gx: np.ndarray, k: int) -> None:
    """Sum whole-window column gradients back onto the pixels they were copied from, into ``gx``."""
    m, h, wid, ci = gx.shape
    wo, ho = wid - k + 1, h - k + 1
    g = gcols.reshape(m, ho, wo, k, k, ci)
    gx[...] = 0
    for ky in range(k):
        for kx in range(k):
            gx[:, ky : ky + ho, kx : kx + wo] += g[:, :, :, ky, kx]


def conv2d(x, w, b=None, *, relu: bool = False):
    """Chainer-differentiable NHWC convolution (CPU arrays), with ``relu`` then ReLU."""
    args = (x, w) if b is None else (x, w, b)
    return Conv2DNHWC(relu).apply(args)[0]


# --- ReLU + 2x2 max pooling ---------------------------------------------------------
# ``which`` holds, per output, the window position of the first maximum (0..3 in the
# order (0,0), (0,1), (1,0), (1,1), as chainer's max_pooling_2d), or 4 where the maximum
# is not positive: ReLU's gradient is 0 there. Odd edges are windows of their own
# (chainer's cover_all=True).


@_jit
def _pool_forward(x, out, which):  # pragma: no cover - compiled
    n, h, w, c = x.shape
    for i in range(n):
        for oy in range(out.shape[1]):
            y0 = 2 * oy
            y1 = min(y0 + 1, h - 1)  # an odd edge repeats the row: never a first maximum
            for ox in range(out.shape[2]):
                x0 = 2 * ox
                x1 = min(x0 + 1, w - 1)
                for ch in range(c):
                    best = x[i, y0, x0, ch]
                    at = 0
                    v = x[i, y0, x1, ch]
                    if v > best:
                        best = v
                        at = 1
                    low = x[i, y1, x0, ch]
                    low_at = 2
                    v = x[i, y1, x1, ch]
                    if v > low:
                        low = v
                        low_at = 3
                    if low > best:
                        best = low
                        at = low_at
                    if best > 0:
                        out[i, oy, ox, ch] = best
                        which[i, oy, ox, ch] = at
                    else:
                        out[i, oy, ox, ch] = 0
                        which[i, oy, ox, ch] = 4


@_jit
def _pool_scatter(gy, which, gx):  # pragma: no cover - compiled
    n, h, w, c = gx.shape
    for i in range(n):
        for oy in range(gy.shape[1]):
            for ox in range(gy.shape[2]):
                for pos in range(4):
                    y = 2 * oy + (pos >> 1)
                    x = 2 * ox + (pos & 1)
                    if y < h and x < w:
                        for ch in range(c):
                            gx[i, y, x, ch] = gy[i, oy, ox, ch] if which[i, oy, ox, ch] == pos else 0


@_jit
def _pool_gather(gx, which, gy):  # pragma: no cover - compiled
    for i in range(gy.shape[0]):
        for oy in range(gy.shape[1]):
            for ox in range(gy.shape[2]):
                for ch in range(gy.shape[3]):
                    at = which[i, oy, ox, ch]
                    gy[i, oy, ox, ch] = gx[i, 2 * oy + (at >> 1), 2 * ox + (at & 1), ch] if at < 4 else 0


def _pooled_shape(shape) -> tuple[int, int, int, int]:
    n, h, w, c = shape
    return n, (h + 1) // 2, (w + 1) // 2, c


def _by_images(kernel, n: int, per_image_bytes: int, *arrays) -> None:
    """``kernel(*arrays)`` on cache-sized runs of images (axis 0), over the threads."""
    def task(se):
        s, e = se
        kernel(*(a[s:e] for a in arrays))

    _map(task, _bounds(n, per_image_bytes))


def relu_max_pool2_nhwc(x: np.ndarray, which: np.ndarray | None = None) -> np.ndarray:
    """max(0, 2x2 max pooling of ``x``), stride 2, odd edges covered; writes the first
    maximum's window position into ``which`` when given."""
    x = np.ascontiguousarray(x)
    out = np.empty(_pooled_shape(x.shape), x.dtype)
    which = np.empty(out.shape, np.uint8) if which is None else which
    _by_images(_pool_forward, len(x), x[:1].nbytes, x, out, which)
    return out


class ReluMaxPool2(function_node.FunctionNode):
    """``relu_max_pool2_nhwc`` as a chainer function. The gradient goes to each window's
    first maximum where it is positive (chainer's ``max_pooling_2d(relu(x))`` exactly)."""

    def forward_cpu(self, inputs):
        (x,) = inputs
        self._shape = x.shape
        self._which = np.empty(_pooled_shape(x.shape), np.uint8)
        return (relu_max_pool2_nhwc(x, self._which),)

    def backward(self, indexes, grad_outputs):
        return _PoolScatter(self._which, self._shape).apply(grad_outputs)


class _PoolScatter(function_node.FunctionNode):
    """Pooled gradient -> input gradient: each to its window's first maximum; a linear
    map whose adjoint is :class:`_PoolGather`."""

    def __init__(self, which: np.ndarray, shape: tuple[int, ...]):
        self._which, self._shape = which, shape

    def forward_cpu(self, inputs):
        gy = np.ascontiguousarray(inputs[0])
        gx = np.empty(self._shape, gy.dtype)
        _by_images(_pool_scatter, len(gx), gx[:1].nbytes, gy, self._which, gx)
        return (gx,)

    def backward(self, indexes, grad_outputs):
        return _PoolGather(self._which).apply(grad_outputs)


class _PoolGather(function_node.FunctionNode):
    """Input-shaped array -> its values at each window's first maximum (0 where none)."""

    def __init__(self, which: np.ndarray):
        self._which = which

    def forward_cpu(self, inputs):
        gx = np.ascontiguousarray(inputs[0])
        self._shape = gx.shape
        gy = np.empty(self._which.shape, gx.dtype)
        _by_images(_pool_gather, len(gx), gx[:1].nbytes, gx, self._which, gy)
        return (gy,)

    def backward(self, indexes, grad_outputs):
        return _PoolScatter(self._which, self._shape).apply(grad_outputs)


def relu_max_pool2(x):
    """Chainer-differentiable NHWC ReLU then 2 x 2 max pooling (CPU arrays)."""
    return ReluMaxPool2().apply((x,))[0]


# --- dense layers ---------------------------------------------------------------------

# Rows per block of a dense product. Fixed, so each block's sums are those of one
# single-threaded product whatever the number of cores.
ROWS = 256


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + ROWS, n)) for s in range(0, n, ROWS)] or [(0, 0)]


def _matmul_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = a @ b`` by fixed blocks of a's rows, over the threads."""
    def task(se):
        s, e = se
        np.matmul(a[s:e], b, out=out[s:e])

    _map(task, _blocks(len(a)))
    return out


class Linear(function_node.FunctionNode):
    """``y = x @ W.T + b`` (chainer's ``linear``) on all cores; backward :class:`LinearGrad`."""

    def forward_cpu(self, inputs):
        x, w = inputs[:2]
        self.retain_inputs((0, 1))
        y = _matmul_rows(x, w.T, np.empty((len(x), len(w)), x.dtype))
        if len(inputs) == 3:
            y += inputs[2]
        return (y,)

    def backward(self, indexes, grad_outputs):
        x, w = self.get_retained_inputs()
        want = tuple(i in indexes for i in range(len(self.inputs)))
        return LinearGrad(want).apply((x, w, grad_outputs[0]))


class LinearGrad(_BilinearGrad):
    """(x, W, gy) -> the gradients of ``linear(x, W, b)`` that ``want`` names, in the
    order (gx = gy W, gW = gy.T x, gb = the column sums of gy); differentiable in turn."""

    def __init__(self, want: tuple[bool, ...]):
        self.want = tuple(want) + (False,) * (3 - len(want))

    def forward_cpu(self, inputs):
        x, w, gy = inputs
        self.retain_inputs((0, 1, 2))
        out = []
        if self.want[0]:
            out.append(_matmul_rows(gy, w, np.empty(x.shape, gy.dtype)))
        if self.want[1]:
            gw = np.empty(w.shape, gy.dtype)

            def task(se):  # blocks of W's rows, each a sum over the whole batch
                s, e = se
                np.matmul(gy[:, s:e].T, x, out=gw[s:e])

            _map(task, _blocks(len(w)))
            out.append(gw)
        if self.want[2]:
            out.append(gy.sum(axis=0))
        return tuple(out)

    def _again(self, want: tuple[bool, ...]) -> "LinearGrad":
        return LinearGrad(want)

    def _forward(self, a, b):
        return linear(a, b)


def linear(x, w, b=None):
    """Chainer-differentiable ``x @ W.T + b`` (CPU arrays, x of shape (B, D))."""
    args = (x, w) if b is None else (x, w, b)
    return Linear().apply(args)[0]
