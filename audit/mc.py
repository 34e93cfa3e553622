"""The MC-dropout engine: T stochastic passes per image, fast.

Everything before the first dropout (both convolutions and fc3) is deterministic, so
the trunk runs once per batch; the stochastic head then runs all T passes of a batch
of B images as one matrix product of B*T rows. Dropout stays on through explicit 0/1
masks, not by switching ``chainer.config.train``.

Masks
    ``"independent"`` (default, the origin's estimator): every image and pass has
    its own masks. They are drawn per block of ``MASK_BLOCK`` consecutive images from
    a generator seeded by ``(seed, block)``, so an image's masks depend only on the
    seed and its position: the scores do not change with the batch size, and a shard
    of whole blocks reproduces its part of a full run.
    ``"consistent"``: the same T masks for every image (what BatchBALD needs, so
    that pass t is one and the same network for the whole pool).

Scores are reduced on the device (NumPy or CuPy, the same code); only the (N, C)
means and the (N,) scores travel back, and memory is bounded by the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import _compat  # noqa: F401
import chainer

from . import metrics
from .data import to_float32
from .device import get_device, make_rng
from .errors import AuditError
from .model import OriginCNN
from .progress import NullProgress, Progress

# Images per mask block. Small enough that a short final block wastes little, large
# enough that seeding a generator per block costs nothing next to the head's work.
MASK_BLOCK = 64
# Default images per batch: B*T = 6400 rows at T=50 keeps the matrix product near the
# BLAS peak while the (B, T, 1000) float32 activations stay around 26 MB.
DEFAULT_BATCH = 128

MaskMode = Literal["independent", "consistent"]


@dataclass(frozen=True)
class MCResult:
    """What :func:`mc_predict` returns; arrays are NumPy, on the host.

    probs: (N, C) mean of the T softmax outputs.
    entropy, expected_entropy, mutual_info, variation_ratio, mean_std: (N,) each,
    higher = more uncertain (see :mod:`audit.metrics`).
    mc_probs: (N, T, C) every pass's softmax, only when asked for.
    """

    probs: np.ndarray
    entropy: np.ndarray
    expected_entropy: np.ndarray
    mutual_info: np.ndarray
    variation_ratio: np.ndarray
    mean_std: np.ndarray
    mc_probs: np.ndarray | None = None

    def scores(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in metrics.SCORE_NAMES}


class MaskSampler:
    """Draws the (B, T, H) keep-masks of both dropout layers for images [start, stop).

    Masks are boolean/uint8 arrays of 0 (drop) and 1 (keep); the 1 / (1 - ratio)
    scale is applied by the engine.
    """

    def __init__(self, *, samples: int, hidden: int, ratio: float, seed: int, mode: MaskMode, device) -> None:
        if mode not in ("independent", "consistent"):
            raise AuditError(f"masks: expected 'independent' or 'consistent', got {mode!r}")
        self.samples, self.hidden, self.ratio, self.seed = samples, hidden, ratio, seed
        self.mode, self.device, self.xp = mode, device, device.xp
        self._consistent = None
        self._cache: tuple[int, object] | None = None

    def _draw(self, rng, shape):
        xp = self.xp
        if self.ratio == 0.5 and xp is np:
            # one random bit per element: exact Bernoulli(1/2), far cheaper than uniforms
            n = int(np.prod(shape))
            return np.unpackbits(rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8), count=n).reshape(shape)
        return rng.random(shape, dtype=np.float32) >= np.float32(self.ratio)

    def _block(self, b: int):
        """(2, MASK_BLOCK, T, H) masks of block b, cached for the next call."""
        if self._cache is None or self._cache[0] != b:
            rng = make_rng(self.device, [self.seed, b])
            self._cache = (b, self._draw(rng, (2, MASK_BLOCK, self.samples, self.hidden)))
        return self._cache[1]

    def __call__(self, start: int, stop: int):
        """(m1, m2): (B, T, H) masks for images [start, stop), or (1, T, H) in consistent mode."""
        xp = self.xp
        if self.mode == "consistent":
            if self._consistent is None:
                rng = make_rng(self.device, [self.seed, 2**31 - 1])  # a stream no block uses
                self._consistent = self._draw(rng, (2, 1, self.samples, self.hidden))
            return self._consistent[0], self._consistent[1]
        parts = []
        for b in range(start // MASK_BLOCK, (stop - 1) // MASK_BLOCK + 1):
            lo, hi = max(start, b * MASK_BLOCK), min(stop, (b + 1) * MASK_BLOCK)
            parts.append(self._block(b)[:, lo - b * MASK_BLOCK : hi - b * MASK_BLOCK])
        masks = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1)
        return masks[0], masks[1]


def head_passes(model: OriginCNN, a, m1, m2):
    """Logits of T head passes for each of B images: (B, H) trunk output, (B|1, T, H)
    keep-masks -> (B, T, C). Raw xp arrays, no autograd: this is the hot loop."""
    xp = chainer.backend.get_array_module(a)
    b, h = a.shape
    t = m1.shape[1]
    scale = np.float32(1.0 / (1.0 - model.dropout))
    w4, b4 = model.fc4.W.array, model.fc4.b.array  # (H, H), (H,)
    w5, b5 = model.fc5.W.array, model.fc5.b.array  # (C, H), (C,)
    # dropout 1: the 1/(1-p) scale goes on the (B, H) trunk output, not the (B, T, H) product
    x = xp.empty((b, t, h), dtype=np.float32)
    xp.multiply((a * scale)[:, None, :], m1, out=x)  # (B, H) x (B|1, T, H) -> (B, T, H)
    x = x.reshape(b * t, h)
    z = x @ w4.T  # (B*T, H): the product that bounds the speed
    z += b4
    xp.maximum(z, 0, out=z)
    # dropout 2: its scale folds into fc5's weights
    z = z.reshape(b, t, h)
    z *= m2
    y = z.reshape(b * t, h) @ (w5.T * scale)  # (B*T, C)
    y += b5
    return y.reshape(b, t, -1)


def softmax(logits):
    """Softmax over the last axis, (..., C) -> (..., C)."""
    xp = chainer.backend.get_array_module(logits)
    e = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def mc_predict(
    model: OriginCNN,
    x: np.ndarray,
    *,
    samples: int = 50,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    masks: MaskMode = "independent",
    device: str = "cpu",
    return_mc: bool = False,
    progress: Progress | None = None,
) -> MCResult:
    """MC-dropout predictions of ``model`` for images ``x`` (N, C, H, W), T = ``samples``.

    Returns the (N, C) mean probabilities and every label-free score, (N,) each
    (higher = more uncertain); with ``return_mc`` also the (N, T, C) pass-wise
    probabilities (memory grows with N*T then). Same seed, same device: same result.

    >>> import audit
    >>> m = audit.build_model(3, (1, 16, 16))
    >>> r = mc_predict(m, np.zeros((5, 1, 16, 16), np.uint8), samples=8)
    >>> r.probs.shape, r.mutual_info.shape
    ((5, 3), (5,))
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise AuditError(f"--samples: expected a positive number of passes, got {samples!r}", usage=True)
    if batch_size < 1:
        raise AuditError(f"--batch-size: expected at least 1, got {batch_size}", usage=True)
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.spec.image_shape):
        raise AuditError(
            f"x: expected images of shape (N, {', '.join(map(str, model.spec.image_shape))}) for this model, "
            f"got {x.shape}"
        )
    progress = progress or NullProgress()
    dev = get_device(device) if isinstance(device, str) else device
    model.to_device(dev)
    n, c = x.shape[0], model.spec.n_classes
    sampler = MaskSampler(
        samples=samples, hidden=model.spec.hidden, ratio=model.dropout, seed=seed, mode=masks, device=dev
    )
    out = {"probs": np.empty((n, c), np.float32)}
    out.update({k: np.empty(n, np.float32) for k in metrics.SCORE_NAMES})
    mc = np.empty((n, samples, c), np.float32) if return_mc else None

    start = 0
    progress.start(f"score {n:,} images x {samples} passes", n)
    while start < n:
        stop = min(start + batch_size, n)
        try:
            with chainer.using_config("train", False), chainer.no_backprop_mode():
                a = model.trunk(dev.send(to_float32(x[start:stop]))).array  # (B, H)
            m1, m2 = sampler(start, stop)
            probs_b = softmax(head_passes(model, a, m1, m2))  # (B, T, C)
            scores_b = metrics.all_scores(probs_b)
        except Exception as e:
            if not _is_out_of_memory(e) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)  # a GPU out-of-memory error halves the chunk
            continue
        for k, v in scores_b.items():
            out[k][start:stop] = chainer.backend.CpuDevice().send(v)
        if mc is not None:
            mc[start:stop] = chainer.backend.CpuDevice().send(probs_b)
        progress.advance(stop - start)
        start = stop
    progress.close()
    return MCResult(mc_probs=mc, **out)


def _is_out_of_memory(e: Exception) -> bool:
    try:
        import cupy
    except Exception:
        return False
    return isinstance(e, cupy.cuda.memory.OutOfMemoryError)


def reference_mc_probs(model: OriginCNN, x: np.ndarray, m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """The origin's way, for tests: the whole network, one image and one pass at a
    time, through chainer's own ``F.dropout`` with the given keep-masks.

    x (N, C, H, W); m1, m2 (N, T, H) 0/1 -> (N, T, C) probabilities.
    """
    import chainer.functions as F

    scale = np.float32(1.0 / (1.0 - model.dropout))
    n, t = m1.shape[:2]
    out = np.empty((n, t, model.spec.n_classes), np.float32)
    with chainer.using_config("train", True), chainer.no_backprop_mode():
        for i in range(n):
            xi = to_float32(x[i : i + 1])
            for j in range(t):
                h = F.relu(model.fc3(model._convs(xi)))
                h = F.dropout(h, mask=(m1[i, j] * scale)[None].astype(np.float32))
                h = F.relu(model.fc4(h))
                h = F.dropout(h, mask=(m2[i, j] * scale)[None].astype(np.float32))
                out[i, j] = F.softmax(model.fc5(h)).array[0]
    return out
