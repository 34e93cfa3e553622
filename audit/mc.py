"""The MC-dropout engine: T stochastic passes per image, fast.

Everything before the first dropout (both convolutions and fc3) is deterministic, so
the trunk runs once per batch; the stochastic head then runs all T passes of a batch
of B images as one matrix product of B*T rows. Dropout stays on through explicit 0/1
masks, not by switching ``chainer.config.train``.

Masks
    ``"shared"`` (default): the images of a group of ``SHARE_BLOCK`` consecutive
    images share each pass's masks, drawn from a generator seeded by ``(seed,
    group)``; masks stay independent from pass to pass, so every image's T passes
    have exactly the distribution of the origin's estimator. Pass t then needs only
    the units it keeps: ``a[:, kept] @ W[kept]``, about half the arithmetic of the
    dense product at dropout 0.5 (the *kept-units* engine).
    ``"independent"`` (the origin's estimator, the dense reference): every image
    and pass has its own masks. They are drawn per block of ``MASK_BLOCK`` consecutive images from
    a generator seeded by ``(seed, block)``, so an image's masks depend only on the
    seed and its position: the scores do not change with the batch size, and a shard
    of whole blocks reproduces its part of a full run.
    ``"consistent"``: the same T masks for every image (what BatchBALD needs, so
    that pass t is one and the same network for the whole pool): the sharing of
    ``"shared"`` taken to the whole pool, on the kept-units engine too.

Scores are reduced on the device (NumPy or CuPy, the same code); only the (N, C)
means and the (N,) scores travel back, and memory is bounded by the batch size.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_limits

from . import _compat  # noqa: F401
import chainer

from . import metrics
from .data import to_float32
from .device import cpu_workers, get_device, make_rng
from .errors import AuditError, bad_param
from . import fastconv
from .model import BatchBALDCNN, MCDropoutNet, keep_bits
from .progress import NullProgress, Progress

# Images per mask block: a default batch is one block (no concatenation), and a short
# final block wastes little; seeding a generator per block costs nothing next to the
# head's work.
MASK_BLOCK = 128
# Default images per batch: B*T = 6400 rows at T=50 keeps the matrix product near the
# BLAS peak while the (B, T, 1000) float32 activations stay around 26 MB.
DEFAULT_BATCH = 128

# Rows (images x passes) of the head's product per step on the CPU: 1600 rows of 1000
# float32 are 6.4 MB, so each worker's input and output stay in the 32 MB last-level
# cache, while the product still amortises packing the 4 MB weight matrix.
CPU_HEAD_ROWS = 1600

# Images per group of shared masks ("shared" mode): large enough that each pass's
# kept-units products (group x kept) @ (kept x H) run near the matrix rate and the
# gathered weight rows serve many images; a group is also the CPU engine's unit of work.
SHARE_BLOCK = 1024

# Past this many passes, one batch's (B, T, 1000) activations alone exceed any machine's
# memory: a typo (an extra zero or three), not a setting.
MAX_SAMPLES = 100_000

MaskMode = Literal["shared", "independent", "consistent"]
MASK_MODES = ("shared", "independent", "consistent")


@dataclass(frozen=True)
class AutoSamples:
    """``--samples auto``: each image gets passes, ``first`` and then ``step`` at a time,
    until the Monte-Carlo standard errors of its entropy and its mutual information
    (:func:`metrics.jackknife_se`) are both at most ``tolerance``, or it has ``cap``.
    An image's passes are the first of its group's ``cap`` shared passes (independent
    from pass to pass), so an image that reaches the cap has exactly the scores of a
    fixed run at T = ``cap``."""

    tolerance: float = 0.02  # chosen on MNIST's training images (bench/samples_auto.py)
    cap: int = 100
    first: int = 10
    step: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not (np.isfinite(self.tolerance) and self.tolerance > 0):
            raise bad_param("tolerance", f"expected a standard error > 0, got {self.tolerance}")
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, np.integer)) or self.cap < 2:
            raise bad_param("max_samples", f"expected at least 2 passes (a standard error needs two), got {self.cap}")
        if self.cap > MAX_SAMPLES:
            raise bad_param("max_samples", f"expected at most {MAX_SAMPLES} passes, got {self.cap}")
        object.__setattr__(self, "first", max(2, min(self.first, self.cap)))


@dataclass(frozen=True)
class MCResult:
    """What :func:`mc_predict` returns; arrays are NumPy, on the host.

    probs: (N, C) mean of the T softmax outputs.
    entropy, expected_entropy, mutual_info, variation_ratio, mean_std: (N,) each,
    higher = more uncertain (see :mod:`audit.metrics`); each with ``<name>_se``, its
    Monte-Carlo standard error over the T passes (jackknife).
    mc_probs: (N, T, C) every pass's softmax, only when asked for.
    """

    probs: np.ndarray
    entropy: np.ndarray
    expected_entropy: np.ndarray
    mutual_info: np.ndarray
    variation_ratio: np.ndarray
    mean_std: np.ndarray
    mc_probs: np.ndarray | None = None
    # each score's Monte-Carlo standard error (metrics.jackknife_se), (N,) each
    entropy_se: np.ndarray | None = None
    expected_entropy_se: np.ndarray | None = None
    mutual_info_se: np.ndarray | None = None
    variation_ratio_se: np.ndarray | None = None
    mean_std_se: np.ndarray | None = None
    passes: np.ndarray | None = None  # (N,) passes each image got, with AutoSamples

    def scores(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in metrics.SCORE_NAMES}

    def columns(self) -> dict[str, np.ndarray]:
        """The scores and their standard errors, as scores.csv has them (and each
        image's passes, with AutoSamples)."""
        cols = {name: getattr(self, name) for name in metrics.SCORE_COLUMNS}
        return cols if self.passes is None else {**cols, "passes": self.passes}


class MaskSampler:
    """Draws the keep-masks of every dropout layer after the trunk for images [start,
    stop): m1 (B, T, D1), m2 (B, T, D2), ... of 0 (drop) and 1 (keep).

    The 1 / (1 - ratio) scales are applied by the engine.
    """

    def __init__(self, *, samples: int, widths: tuple[int, ...], ratios: tuple[float, ...], seed: int,
                 mode: MaskMode, device) -> None:
        if mode not in MASK_MODES:
            raise AuditError(f"masks: expected one of {', '.join(MASK_MODES)}, got {mode!r}")
        self.samples, self.widths, self.ratios, self.seed = samples, widths, ratios, seed
        self.mode, self.device, self.xp = mode, device, device.xp
        self._consistent = None
        self._cache: tuple[int, object] | None = None

    @classmethod
    def for_model(cls, model: MCDropoutNet, *, samples: int, seed: int, mode: MaskMode = "shared", device=None):
        layers = model.dropout_layers()
        return cls(
            samples=samples, widths=tuple(w for w, _ in layers), ratios=tuple(r for _, r in layers), seed=seed,
            mode=mode, device=device or chainer.get_device("@numpy"),
        )

    def _draw(self, rng, n: int):
        return tuple(
            keep_bits(rng, (n, self.samples, w), r, self.xp) for w, r in zip(self.widths, self.ratios)
        )

    def _block(self, b: int):
        """(m1, m2, ...) of block b, (MASK_BLOCK, T, D) each, cached for the next call."""
        if self._cache is None or self._cache[0] != b:
            self._cache = (b, self._draw(make_rng(self.device, [self.seed, b]), MASK_BLOCK))
        return self._cache[1]

    def group(self, g: int):
        """(k1, k2, ...): (T, D) keep-flags of shared group g ("shared" mode), cached."""
        if self._cache is None or self._cache[0] != ("group", g):
            rng = make_rng(self.device, [self.seed, 2**31 - 2, g])  # streams no block or consistent mask uses
            self._cache = (("group", g), tuple(m[0] for m in self._draw(rng, 1)))
        return self._cache[1]

    def __call__(self, start: int, stop: int):
        """(m1, m2, ...): (B, T, D) masks for images [start, stop), or (1, T, D) in consistent
        mode; in shared mode each image gets its group's (the dense form of them)."""
        xp, layers = self.xp, range(len(self.widths))
        if self.mode == "shared":
            parts = [[xp.broadcast_to(m, (hi - lo, *m.shape)) for m in self.group(g)]
                     for g, lo, hi in groups(start, stop)]
            return tuple(xp.concatenate([p[i] for p in parts], axis=0) for i in layers)
        if self.mode == "consistent":
            if self._consistent is None:
                rng = make_rng(self.device, [self.seed, 2**31 - 1])  # a stream no block uses
                self._consistent = self._draw(rng, 1)
            return self._consistent
        parts = []
        for b in range(start // MASK_BLOCK, (stop - 1) // MASK_BLOCK + 1):
            lo, hi = max(start, b * MASK_BLOCK), min(stop, (b + 1) * MASK_BLOCK)
            parts.append([m[lo - b * MASK_BLOCK : hi - b * MASK_BLOCK] for m in self._block(b)])
        if len(parts) == 1:
            return tuple(parts[0])
        return tuple(xp.concatenate([p[i] for p in parts], axis=0) for i in layers)


def require_dropout(model: MCDropoutNet) -> None:
    """One line when ``model`` has no dropout after its trunk: its MC passes would all be
    the same network and every uncertainty score 0 (the commands refuse to score so;
    :func:`mc_predict` itself computes what such a model gives)."""
    if all(r == 0 for _, r in model.dropout_layers()):
        raise AuditError(f"model: this {model.spec.arch} model has no dropout (it was trained with --dropout 0), so "
                         "its MC passes are all the same network and every uncertainty score would be 0; MC "
                         "scoring needs a model trained with dropout (--dropout above 0)")


def groups(start: int, stop: int):
    """(g, lo, hi): the shared-mask groups that positions [start, stop) touch, clipped."""
    for g in range(start // SHARE_BLOCK, (stop - 1) // SHARE_BLOCK + 1):
        yield g, max(start, g * SHARE_BLOCK), min(stop, (g + 1) * SHARE_BLOCK)


class Head:
    """The stochastic head's weights laid out for the batched passes, made once per call.

    Both dropout scales 1/(1-p) are folded into the weights, and the first layer's
    bias into an extra row so that the big product adds it for free:

        w1: (D+1, H) = [s1 * W1^T ; b1]      w2: (H, C) = s2 * W2^T      b2: (C,)
    """

    def __init__(self, model: MCDropoutNet) -> None:
        hl = model.head_layers()
        xp = chainer.backend.get_array_module(hl.first.W.array)
        w1, b1 = hl.first.W.array, hl.first.b.array  # (H, D), (H,)
        d = w1.shape[1]
        self.w4 = xp.empty((d + 1, w1.shape[0]), np.float32)
        self.w4[:d] = w1.T * np.float32(1.0 / (1.0 - hl.first_ratio))
        self.w4[d] = b1
        self.w5 = xp.ascontiguousarray(hl.second.W.array.T * np.float32(1.0 / (1.0 - hl.second_ratio)))  # (H, C)
        self.b5 = hl.second.b.array
        self.hidden, self.xp = d, xp
        self._x = self._z = None

    def _buffers(self, rows: int):
        """(rows, H+1) input with its ones column set, and (rows, H) output, reused
        across calls (fresh arrays per call cost page faults)."""
        if self._x is None or self._x.shape[0] < rows:
            self._x = self.xp.empty((rows, self.hidden + 1), np.float32)
            self._x[:, self.hidden] = 1
            self._z = self.xp.empty((rows, self.w4.shape[1]), np.float32)
        return self._x[:rows], self._z[:rows]

    def __call__(self, a, m1, m2):
        """Logits of T passes for each of B images: trunk output a (B, H), keep-masks
        m1, m2 (B|1, T, H) of 0/1 -> (B, T, C). Raw xp arrays, no autograd."""
        xp = self.xp
        b, t = a.shape[0], m1.shape[1]
        y = xp.empty((b, t, self.w5.shape[1]), np.float32)
        # On the CPU, a few images at a time: their (rows, H) activations stay in the
        # last-level cache between the product, the ReLU and the mask. On a GPU, all.
        step = max(1, CPU_HEAD_ROWS // t) if xp is np else b
        for i in range(0, b, step):
            j = min(i + step, b)
            self._block(a[i:j], m1[i:j] if m1.shape[0] > 1 else m1, m2[i:j] if m2.shape[0] > 1 else m2, y[i:j])
        return y

    def kept(self, a, k1, k2):
        """Logits of T passes for B images that share each pass's masks: trunk output a
        (B, H), keep-flags k1 (T, D), k2 (T, H) -> (B, T, C). Pass t multiplies only the
        units it keeps: (B, kept) @ (kept, H), then (B, kept2) @ (kept2, C)."""
        xp = self.xp
        b, d = a.shape
        t = k1.shape[0]
        y = xp.empty((b, t, self.w5.shape[1]), np.float32)
        cpu = xp is np
        if cpu:
            a_buf, w_buf = np.empty((b, d), np.float32), np.empty(self.w4.shape, np.float32)
        for p in range(t):
            i1 = xp.flatnonzero(k1[p])
            i2 = xp.flatnonzero(k2[p])
            if cpu:  # gathers into reused buffers (fresh arrays per pass cost page faults)
                n1 = len(i1)
                z = np.take(a, i1, axis=1, out=a_buf[:, :n1]) @ np.take(self.w4, i1, axis=0, out=w_buf[:n1])
            else:
                z = xp.take(a, i1, axis=1) @ xp.take(self.w4, i1, axis=0)
            z += self.w4[d]  # fc4's bias row
            xp.maximum(z, np.float32(0), out=z)
            y[:, p] = xp.take(z, i2, axis=1) @ xp.take(self.w5, i2, axis=0)
        y += self.b5
        return y

    def _block(self, a, m1, m2, y):
        xp = self.xp
        b, d = a.shape
        t = m1.shape[1]
        x, z = self._buffers(b * t)
        xp.multiply(a[:, None, :], m1, out=x[:, :d].reshape(b, t, d))  # dropout 1: (b, T, D)
        xp.matmul(x, self.w4, out=z)  # (b*T, D+1) @ (D+1, H): the product that bounds the speed
        xp.maximum(z, np.float32(0), out=z)
        z.reshape(b, t, -1).__imul__(m2)  # dropout 2
        xp.matmul(z, self.w5, out=y.reshape(b * t, -1))  # (b*T, H) @ (H, C)
        y += self.b5


class ConvHead:
    """The per-pass part of a model with dropout in its convolutions
    (:class:`~audit.model.BatchBALDCNN`): channel mask, second convolution, pooling and
    ReLU, channel mask, dense layer, ReLU, mask, dense layer, for every pass.

    The same two entry points as :class:`Head`: ``__call__`` with a mask per image and
    pass (the dense reference: every pass's full convolution), ``kept`` with masks that
    images share (pass t convolves only the channels it keeps, in and out: about a
    quarter of the arithmetic at dropout 0.5). Dropout scales are folded into the
    weights. On the CPU the trunk's output is taken channels-last and the convolution is
    ``fastconv``'s; on a GPU chainer's (cuDNN).
    """

    def __init__(self, model: MCDropoutNet) -> None:
        (_, r1), (_, r2), (_, r3) = model.dropout_layers()
        conv, fc3, fc4 = model.conv2, model.fc3, model.fc4
        xp = chainer.backend.get_array_module(conv.W.array)
        self.xp, self.cpu = xp, xp is np
        co = conv.W.shape[0]
        self.w2 = conv.W.array * np.float32(1.0 / (1.0 - r1))  # (Co, Ci, k, k): mask 1 on its input
        self.b2 = conv.b.array
        h3 = fc3.W.shape[0]
        self.pooled = None  # (ph, pw), known at the first batch
        w3 = fc3.W.array * np.float32(1.0 / (1.0 - r2))  # (H3, Co*ph*pw), mask 2 on its input
        self._w3_flat, self._co, self._h3 = w3, co, h3
        self.b3 = fc3.b.array
        self.w4 = xp.ascontiguousarray(fc4.W.array.T * np.float32(1.0 / (1.0 - r3)))  # (H3, C)
        self.b4 = fc4.b.array

    def _w3(self, ph: int, pw: int):
        """fc3's weights as (H3, ph, pw, Co) on the CPU (channels-last features) or
        (H3, Co, ph, pw) on a GPU."""
        if self.pooled != (ph, pw):
            w = self._w3_flat.reshape(self._h3, self._co, ph, pw)
            self.w3 = self.xp.ascontiguousarray(w.transpose(0, 2, 3, 1) if self.cpu else w)
            self.pooled = (ph, pw)
        return self.w3

    def _conv_pool(self, x, w, b):
        """ReLU(2x2 max pooling(convolution)): channels-last on the CPU, NCHW on a GPU."""
        if self.cpu:
            return fastconv.relu_max_pool2_nhwc(fastconv.conv2d_nhwc(x, w, b))
        import chainer.functions as F

        with chainer.no_backprop_mode():
            return F.relu(F.max_pooling_2d(F.convolution_2d(x, w, b), 2)).array

    def _layout(self, a):
        """The trunk's (B, Ci, h, w) output in the engine's layout."""
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if self.cpu else a

    def __call__(self, a, m1, m2, m3):
        """Logits of T passes for each of B images: trunk output a (B, Ci, h, w),
        keep-masks m1 (B|1, T, Ci), m2 (B|1, T, Co), m3 (B|1, T, H3) of 0/1 -> (B, T, C)."""
        xp = self.xp
        a = self._layout(a)
        b, t = a.shape[0], m1.shape[1]
        y = xp.empty((b, t, self.w4.shape[1]), np.float32)
        step = max(1, CPU_HEAD_ROWS // 4 // t) if self.cpu else max(1, 4096 // t)
        for i in range(0, b, step):
            j = min(i + step, b)
            ms = [m[i:j] if m.shape[0] > 1 else xp.broadcast_to(m, (j - i, *m.shape[1:])) for m in (m1, m2, m3)]
            y[i:j] = self._dense(a[i:j], *ms)
        return y

    def _dense(self, a, m1, m2, m3):
        xp = self.xp
        b, t = m1.shape[:2]
        if self.cpu:  # (b, T, h, w, Ci) * channel masks
            x = (a[:, None] * m1[:, :, None, None, :].astype(np.float32)).reshape(b * t, *a.shape[1:])
        else:
            x = (a[:, None] * m1[:, :, :, None, None].astype(np.float32)).reshape(b * t, *a.shape[1:])
        p = self._conv_pool(x, self.w2, self.b2)
        ph, pw = (p.shape[1], p.shape[2]) if self.cpu else (p.shape[2], p.shape[3])
        m2f = m2.reshape(b * t, -1).astype(np.float32)
        p *= m2f[:, None, None, :] if self.cpu else m2f[:, :, None, None]
        z = p.reshape(b * t, -1) @ self._w3(ph, pw).reshape(self._h3, -1).T
        z += self.b3
        xp.maximum(z, np.float32(0), out=z)
        z *= m3.reshape(b * t, -1)
        out = z @ self.w4
        out += self.b4
        return out.reshape(b, t, -1)

    def kept(self, a, k1, k2, k3):
        """Logits of T passes for B images that share each pass's masks: trunk output a
        (B, Ci, h, w), keep-flags k1 (T, Ci), k2 (T, Co), k3 (T, H3) -> (B, T, C).
        Pass t convolves only its kept input channels into its kept output channels."""
        xp = self.xp
        a = self._layout(a)
        b, t = a.shape[0], k1.shape[0]
        y = xp.empty((b, t, self.w4.shape[1]), np.float32)
        for p in range(t):
            i1, i2, i3 = (xp.flatnonzero(k[p]) for k in (k1, k2, k3))
            w = self.w2[i2][:, i1]
            if self.cpu:
                h = self._conv_pool(np.take(a, i1, axis=3), w, self.b2[i2])  # (B, ph, pw, kept2)
                ph, pw = h.shape[1:3]
                w3 = self._w3(ph, pw)[i3][:, :, :, i2]
            else:
                h = self._conv_pool(xp.take(a, i1, axis=1), w, self.b2[i2])  # (B, kept2, ph, pw)
                ph, pw = h.shape[2:4]
                w3 = self._w3(ph, pw)[i3][:, i2]
            f = ph * pw * len(i2)  # features this pass keeps (explicit: any of the sets may be empty)
            z = h.reshape(b, f) @ w3.reshape(len(i3), f).T
            z += self.b3[i3]
            xp.maximum(z, np.float32(0), out=z)
            y[:, p] = z @ self.w4[i3]
        y += self.b4
        return y


def make_head(model: MCDropoutNet):
    """The engine of ``model``'s stochastic part: :class:`ConvHead` where dropout sits in
    the convolutions, :class:`Head` (dense layers only, the fast path) otherwise."""
    return ConvHead(model) if isinstance(model, BatchBALDCNN) else Head(model)


def head_passes(model: MCDropoutNet, a, *masks):
    """Logits of T passes of the stochastic part: trunk output a, one (B|1, T, D)
    keep-mask per dropout layer -> (B, T, C)."""
    return make_head(model)(a, *masks)


def softmax(logits):
    """Softmax over the last axis, (..., C) -> (..., C)."""
    xp = chainer.backend.get_array_module(logits)
    e = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def mc_predict(
    model: MCDropoutNet,
    x: np.ndarray,
    *,
    samples: int = 50,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    masks: MaskMode = "shared",
    device: str = "cpu",
    return_mc: bool = False,
    workers: int | None = None,
    offset: int = 0,
    progress: Progress | None = None,
    auto: AutoSamples | None = None,
) -> MCResult:
    """MC-dropout predictions of ``model`` for images ``x`` (N, C, H, W), T = ``samples``
    (with ``auto``: as many as each image needs, at most ``auto.cap``; shared masks only).

    Returns the (N, C) mean probabilities and every label-free score, (N,) each
    (higher = more uncertain); with ``return_mc`` also the (N, T, C) pass-wise
    probabilities (memory grows with N*T then). Same seed, same device: same result.
    On the CPU, ``workers`` threads (default: one per core) score batches in parallel.
    ``offset``: the position of ``x[0]`` in a larger array, so a slice gets the masks it
    would get there (a shard of a run scores its images exactly as the whole run does).

    >>> import audit
    >>> m = audit.build_model(3, (1, 16, 16))
    >>> r = mc_predict(m, np.zeros((5, 1, 16, 16), np.uint8), samples=8)
    >>> r.probs.shape, r.mutual_info.shape
    ((5, 3), (5,))
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise bad_param("samples", f"expected a positive number of passes, got {samples!r}")
    if batch_size < 1:
        raise bad_param("batch_size", f"expected at least 1, got {batch_size}")
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.spec.image_shape):
        raise AuditError(
            f"x: expected images of shape (N, {', '.join(map(str, model.spec.image_shape))}) for this model, "
            f"got {x.shape}"
        )
    if auto is not None:
        if masks != "shared" or return_mc:
            raise AuditError("samples: auto needs shared masks (--masks shared) and no per-pass output")
        samples = auto.cap
    progress = progress or NullProgress()
    dev = get_device(device) if isinstance(device, str) else device
    model.to_device(dev)
    n, c = x.shape[0], model.spec.n_classes
    out = {"probs": np.empty((n, c), np.float32)}
    out.update({k: np.empty(n, np.float32) for k in metrics.SCORE_COLUMNS})
    if auto is not None:
        out["passes"] = np.empty(n, np.int32)
    mc = np.empty((n, samples, c), np.float32) if return_mc else None

    def make_worker():
        sampler = MaskSampler.for_model(model, samples=samples, seed=seed, mode=masks, device=dev)
        return _Worker(model, sampler, x, dev, offset, auto)

    def store(start, stop, scores_b, probs_b):
        for k, v in scores_b.items():
            out[k][start:stop] = v
        if mc is not None:
            mc[start:stop] = probs_b
        progress.advance(stop - start)

    progress.start(f"score {n:,} images x {'up to ' if auto else ''}{samples} passes", n)
    if dev.xp is np:
        if masks == "shared":  # a group is the unit of work: the same products whatever the batch size
            bounds = [(lo - offset, hi - offset) for _, lo, hi in groups(offset, offset + n)] if n else []
        else:
            bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        _run_cpu(make_worker, bounds, store, workers or cpu_workers())
    else:  # shared masks: whole groups per step (the kept-units products are per pass)
        _run_device(make_worker(), n, max(batch_size, SHARE_BLOCK) if masks == "shared" else batch_size, store)
    progress.close()
    return MCResult(mc_probs=mc, **out)


class _Worker:
    """Scores batches [start, stop) of x: trunk, masks, head, reduction."""

    def __init__(self, model: MCDropoutNet, sampler: MaskSampler, x: np.ndarray, device, offset: int = 0,
                 auto: AutoSamples | None = None) -> None:
        self.model, self.sampler, self.x, self.device, self.offset = model, sampler, x, device, offset
        self.head, self.auto = make_head(model), auto

    def __call__(self, start: int, stop: int):
        a = self.model.trunk_array(self.device.send(to_float32(self.x[start:stop])))  # (B, H)
        if self.auto is not None:
            parts = [self._adaptive(a[lo - start - self.offset:hi - start - self.offset], self.sampler.group(g))
                     for g, lo, hi in groups(start + self.offset, stop + self.offset)]
            host = chainer.backend.CpuDevice()
            return {k: np.concatenate([host.send(p[k]) for p in parts]) for k in parts[0]}, None
        if self.sampler.mode == "shared":
            pieces = [self.head.kept(a[lo - start - self.offset:hi - start - self.offset], *self.sampler.group(g))
                      for g, lo, hi in groups(start + self.offset, stop + self.offset)]
            logits = pieces[0] if len(pieces) == 1 else self.device.xp.concatenate(pieces, axis=0)
        elif self.sampler.mode == "consistent":  # one set of T masks for all: the kept-units engine too
            logits = self.head.kept(a, *(m[0] for m in self.sampler(start + self.offset, stop + self.offset)))
        else:
            logits = self.head(a, *self.sampler(start + self.offset, stop + self.offset))
        probs_b = softmax(logits)  # (B, T, C)
        scores_b = metrics.all_scores(probs_b)  # reduced on the device: (B, C) and (B,) arrays
        host = chainer.backend.CpuDevice()
        return {k: host.send(v) for k, v in scores_b.items()}, host.send(probs_b)

    def _adaptive(self, a, keep):
        """Scores of images ``a`` (B, H) of one group, each from as many of the group's
        passes (``keep``: its (T, D) keep-flags) as it needs: after the first passes and
        every step, the images whose entropy and mutual information have standard
        errors within the tolerance (or that reached the cap) keep the scores of the
        passes so far and leave the batch."""
        xp, auto = self.device.xp, self.auto
        b = a.shape[0]
        p = xp.empty((b, auto.cap, self.model.spec.n_classes), np.float32)
        out: dict = {}
        active = xp.arange(b)
        done = 0
        while len(active):
            upto = min(auto.cap, done + (auto.first if done == 0 else auto.step))
            p[active, done:upto] = softmax(self.head.kept(a[active], *(k[done:upto] for k in keep)))
            done = upto
            s = metrics.all_scores(p[active, :done])
            finished = (xp.maximum(s["entropy_se"], s["mutual_info_se"]) <= auto.tolerance) | (done == auto.cap)
            if not out:
                out = {k: xp.empty((b, *v.shape[1:]), v.dtype) for k, v in s.items()}
                out["passes"] = xp.empty(b, np.int32)
            rows = active[finished]
            for k, v in s.items():
                out[k][rows] = v[finished]
            out["passes"][rows] = done
            active = active[~finished]
        return out


def _run_cpu(make_worker, bounds: list[tuple[int, int]], store, workers: int) -> None:
    """One batch (``bounds``) per task on ``workers`` threads, each with single-threaded BLAS.

    NumPy releases the GIL in matrix products and large element-wise operations, so
    the threads run in parallel; unlike one multi-threaded product followed by
    single-threaded element-wise work, every step of the pipeline uses every core.
    """
    if workers == 1 or len(bounds) == 1:
        worker = make_worker()
        with threadpool_limits(limits=1, user_api="blas"):  # as the threads below: the same sums everywhere
            for s, e in bounds:
                store(s, e, *worker(s, e))
        return
    local = threading.local()

    def task(se):
        if not hasattr(local, "worker"):
            local.worker = make_worker()
        return se, local.worker(*se)

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        # at most 2 batches per thread in flight, so memory does not grow with N
        pending = set()
        it = iter(bounds)
        for se in it:
            pending.add(pool.submit(task, se))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    (s, e), res = f.result()
                    store(s, e, *res)
        for f in pending:
            (s, e), res = f.result()
            store(s, e, *res)


def _run_device(worker: _Worker, n: int, batch_size: int, store) -> None:
    """Batches in order on a GPU; an out-of-memory error halves the batch and retries."""
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        try:
            res = worker(start, stop)
        except Exception as e:
            if not _is_out_of_memory(e) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            continue
        store(start, stop, *res)
        start = stop


def _is_out_of_memory(e: Exception) -> bool:
    try:
        import cupy
    except Exception:
        return False
    return isinstance(e, cupy.cuda.memory.OutOfMemoryError)


def reference_mc_probs(model: MCDropoutNet, x: np.ndarray, *masks: np.ndarray) -> np.ndarray:
    """The origin's way, for tests: the whole network, one image and one pass at a
    time, through chainer's own functions (``F.dropout`` with the given keep-masks).

    x (N, C, H, W); one (N, T, D) keep-mask of 0/1 per dropout layer -> (N, T, C)
    probabilities. For :class:`~audit.model.BatchBALDCNN` in its paper's order:
    conv, channel dropout, max pooling, ReLU, twice; dense, dropout, ReLU, dense.
    """
    import chainer.functions as F

    scales = [np.float32(1.0 / (1.0 - r)) for _, r in model.dropout_layers()]
    n, t = masks[0].shape[:2]
    out = np.empty((n, t, model.spec.n_classes), np.float32)

    def drop(h, m, s):  # m: (D,) keep-flags over h's axis 1 (channels or units)
        mask = (m * s).astype(np.float32).reshape(1, -1, *([1] * (h.ndim - 2)))
        return F.dropout(h, mask=np.ascontiguousarray(np.broadcast_to(mask, h.shape)))

    with chainer.using_config("train", True), chainer.no_backprop_mode():
        for i in range(n):
            xi = to_float32(x[i : i + 1])
            for j in range(t):
                m = [mk[i, j] for mk in masks]
                if isinstance(model, BatchBALDCNN):
                    h = F.relu(F.max_pooling_2d(drop(model.conv1(xi), m[0], scales[0]), 2))
                    h = F.relu(F.max_pooling_2d(drop(model.conv2(h), m[1], scales[1]), 2))
                    h = F.relu(drop(model.fc3(h), m[2], scales[2]))
                    out[i, j] = F.softmax(model.fc4(h)).array[0]
                    continue
                hl = model.head_layers()
                h = drop(model.trunk(xi), m[0], scales[0])
                h = drop(F.relu(hl.first(h)), m[1], scales[1])
                out[i, j] = F.softmax(hl.second(h)).array[0]
    return out
