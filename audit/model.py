"""The origin CNN, split at its first dropout.

    conv1(3x3, 16) -> relu -> maxpool 2 -> conv2(3x3, 32) -> relu -> maxpool 2
    -> fc3(1000) -> relu                      = trunk: deterministic, run once per image
    -> dropout -> fc4(1000) -> relu -> dropout -> fc5(n_classes)
                                              = head: stochastic, run T times per image
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import _compat  # noqa: F401  (patches chainer for NumPy 2 before first use)
import chainer
import chainer.functions as F
import chainer.links as L
from chainer import initializers

from .errors import AuditError


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a model from ``model.npz``."""

    n_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    dropout: float = 0.5
    hidden: int = 1000
    arch: str = "origin"
    dropout_conv: float = 0.25  # the gal model's first dropout; unused by origin

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


def keep_bits(rng, shape: tuple[int, ...], ratio: float, xp=np):
    """0/1 keep-flags (uint8 or bool) of ``shape``, each 1 with probability 1 - ratio.

    ``rng`` is a NumPy or CuPy ``Generator``. At ratio 0.5 on NumPy each flag is one
    raw random bit: exact Bernoulli(1/2), several times cheaper than uniforms.
    """
    if ratio == 0.5 and xp is np:
        n = int(np.prod(shape))
        raw = rng.bit_generator.random_raw((n + 63) // 64).view(np.uint8)  # 64 bits each
        return np.unpackbits(raw, count=n).reshape(shape)
    return rng.random(shape, dtype=np.float32) >= np.float32(ratio)


def keep_mask(rng, shape: tuple[int, ...], ratio: float, xp=np):
    """A float32 array of 1 (keep, probability 1 - ratio) and 0 (drop)."""
    return keep_bits(rng, shape, ratio, xp).astype(np.float32)


@dataclass(frozen=True)
class HeadLayers:
    """The stochastic head every model here shares, after the deterministic trunk:

        dropout(first_ratio) -> first -> ReLU -> dropout(second_ratio) -> second
    """

    first: L.Linear
    first_ratio: float
    second: L.Linear
    second_ratio: float


class MCDropoutNet(chainer.Chain):
    """A network split at its first dropout: ``trunk`` (deterministic) then ``head``.

    Subclasses build their links, set ``self.spec`` and define ``trunk`` and
    ``head_layers``; training, ``head`` and ``forward`` are shared.
    """

    spec: ModelSpec

    def trunk(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def head_layers(self) -> HeadLayers:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dropout(self) -> float:
        return self.spec.dropout

    def head(self, h, rng=None):
        """(B, D) trunk output -> (B, n_classes) logits, with dropout when ``config.train``.

        ``rng`` (a NumPy/CuPy Generator) draws the training masks; without it chainer's
        global random state does.
        """
        hl = self.head_layers()
        h = _dropout(h, hl.first_ratio, rng)
        h = F.relu(hl.first(h))
        h = _dropout(h, hl.second_ratio, rng)
        return hl.second(h)

    def forward(self, x, rng=None):
        return self.head(self.trunk(x), rng)

    def trunk_array(self, x):
        """The trunk for inference on a raw array, (B, C, H, W) -> (B, D)."""
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return self.trunk(x).array


def _dropout(h, ratio: float, rng):
    if not chainer.config.train or ratio == 0.0:
        return h
    if rng is None:
        return F.dropout(h, ratio)
    xp = chainer.backend.get_array_module(h)
    scale = np.float32(1.0 / (1.0 - ratio))
    return F.dropout(h, mask=keep_mask(rng, h.shape, ratio, xp) * scale)


def _check(n_classes: int, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise AuditError(f"--dropout: expected a ratio in [0, 1), got {dropout}")
    if n_classes < 2:
        raise AuditError(f"n_classes: expected at least 2, got {n_classes}")


class OriginCNN(MCDropoutNet):
    """The origin's CNN; ``trunk`` and ``head`` can be called apart.

    >>> m = OriginCNN(n_classes=10, image_shape=(1, 28, 28))
    >>> with chainer.using_config("train", False):
    ...     m(np.zeros((2, 1, 28, 28), np.float32)).shape
    (2, 10)
    """

    def __init__(
        self,
        n_classes: int,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        *,
        dropout: float = 0.5,
        hidden: int = 1000,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        _check(n_classes, dropout)
        self.spec = ModelSpec(int(n_classes), tuple(int(s) for s in image_shape), float(dropout), int(hidden))
        # One seeded generator for every initial weight: same seed, same weights.
        rng = np.random.RandomState(seed)

        def w():
            return initializers.LeCunNormal(rng=rng)

        c = image_shape[0]
        with self.init_scope():
            self.conv1 = L.Convolution2D(c, 16, 3, initialW=w())
            self.conv2 = L.Convolution2D(16, 32, 3, initialW=w())
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            flat = self._convs(np.zeros((1, *image_shape), np.float32)).size
        with self.init_scope():
            self.fc3 = L.Linear(flat, hidden, initialW=w())
            self.fc4 = L.Linear(hidden, hidden, initialW=w())
            self.fc5 = L.Linear(hidden, n_classes, initialW=w())

    def _convs(self, x):
        h = F.max_pooling_2d(F.relu(self.conv1(x)), 2)
        return F.max_pooling_2d(F.relu(self.conv2(h)), 2)

    def trunk(self, x):
        """(B, C, H, W) -> (B, hidden): everything before the first dropout."""
        return F.relu(self.fc3(self._convs(x)))

    def head_layers(self) -> HeadLayers:
        return HeadLayers(self.fc4, self.dropout, self.fc5, self.dropout)

    def trunk_array(self, x):
        """The trunk for inference on a raw array, (B, C, H, W) -> (B, hidden).

        On NumPy a direct im2col implementation (about twice as fast as chainer's
        CPU convolution and pooling, the same numbers); on CuPy chainer's own.
        """
        if chainer.backend.get_array_module(x) is not np:
            return super().trunk_array(x)
        h = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC: im2col rows become contiguous
        for conv in (self.conv1, self.conv2):
            h = _conv_nhwc(h, conv.W.array, conv.b.array)
            np.maximum(h, np.float32(0), out=h)
            h = _max_pool2_nhwc(h)
        h = h.transpose(0, 3, 1, 2).reshape(len(x), -1)  # chainer flattens NCHW for fc3
        z = h @ self.fc3.W.array.T
        z += self.fc3.b.array
        return np.maximum(z, np.float32(0), out=z)


class GalCNN(MCDropoutNet):
    """The CNN of Gal, Islam & Ghahramani 2017 (their Keras MNIST active-learning model):

        conv 32 4x4 -> ReLU -> conv 32 4x4 -> ReLU -> max-pool 2 ->   trunk
        dropout 0.25 -> dense 128 -> ReLU -> dropout 0.5 -> dense C   head

    Weight decay on the dense layers is set by the trainer (it depends on N).
    """

    def __init__(
        self,
        n_classes: int,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        *,
        dropout: float = 0.5,
        hidden: int = 128,
        dropout_conv: float = 0.25,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        _check(n_classes, dropout)
        _check(n_classes, dropout_conv)
        self.spec = ModelSpec(
            int(n_classes), tuple(int(s) for s in image_shape), float(dropout), int(hidden), "gal", float(dropout_conv)
        )
        rng = np.random.RandomState(seed)

        def w():
            return initializers.GlorotUniform(rng=rng)  # Keras' default, as in the paper's code

        with self.init_scope():
            self.conv1 = L.Convolution2D(image_shape[0], 32, 4, initialW=w())
            self.conv2 = L.Convolution2D(32, 32, 4, initialW=w())
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            flat = self.trunk(np.zeros((1, *image_shape), np.float32)).size
        with self.init_scope():
            self.fc3 = L.Linear(flat, hidden, initialW=w())
            self.fc4 = L.Linear(hidden, n_classes, initialW=w())

    def trunk(self, x):
        """(B, C, H, W) -> (B, 32*h*w): the convolutions and the pooling, flattened."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.max_pooling_2d(h, 2)
        return F.reshape(h, (h.shape[0], -1))

    def head_layers(self) -> HeadLayers:
        return HeadLayers(self.fc3, self.spec.dropout_conv, self.fc4, self.dropout)

    def trunk_array(self, x):
        if chainer.backend.get_array_module(x) is not np:
            return super().trunk_array(x)
        h = x.transpose(0, 2, 3, 1)
        for conv in (self.conv1, self.conv2):
            h = _conv_nhwc(h, conv.W.array, conv.b.array)
            np.maximum(h, np.float32(0), out=h)
        h = _max_pool2_nhwc(h)
        return np.ascontiguousarray(h.transpose(0, 3, 1, 2).reshape(len(x), -1))


ARCHS = {"origin": OriginCNN, "gal": GalCNN}


# Bytes of im2col buffer per step. glibc hands freed blocks up to 32 MB back to the
# heap for reuse; bigger ones are unmapped and every new one page-faults afresh.
_IM2COL_BYTES = 16 << 20


def _conv_nhwc(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Valid k x k convolution, stride 1: (B, H, W, Ci), (Co, Ci, k, k) -> (B, H-k+1, W-k+1, Co).

    im2col by k*k slice copies (each with Ci contiguous floats), then one product, a
    few images at a time so the column buffer stays small.
    """
    bsz, hgt, wid, _ = x.shape
    co, ci, k, _ = w.shape
    ho, wo = hgt - k + 1, wid - k + 1
    wm = w.transpose(2, 3, 1, 0).reshape(k * k * ci, co)  # (ky, kx, Ci) rows, as in cols
    out = np.empty((bsz, ho, wo, co), np.float32)
    step = max(1, _IM2COL_BYTES // (ho * wo * k * k * ci * 4))
    for s in range(0, bsz, step):
        xs = x[s : s + step]
        n = xs.shape[0]
        cols = np.empty((n, ho, wo, k, k, ci), np.float32)
        for ky in range(k):
            for kx in range(k):
                cols[:, :, :, ky, kx, :] = xs[:, ky : ky + ho, kx : kx + wo, :]
        np.matmul(cols.reshape(n * ho * wo, k * k * ci), wm, out=out[s : s + n].reshape(n * ho * wo, co))
    out += b
    return out


def _max_pool2_nhwc(h: np.ndarray) -> np.ndarray:
    """2 x 2 max pooling, stride 2, covering odd edges as chainer's ``cover_all=True``."""
    bsz, hgt, wid, c = h.shape
    if hgt % 2 or wid % 2:
        padded = np.full((bsz, hgt + hgt % 2, wid + wid % 2, c), -np.inf, h.dtype)
        padded[:, :hgt, :wid] = h
        h = padded
    out = np.maximum(h[:, 0::2, 0::2], h[:, 0::2, 1::2])
    np.maximum(out, h[:, 1::2, 0::2], out=out)
    return np.maximum(out, h[:, 1::2, 1::2], out=out)


def build_model(
    n_classes: int,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    *,
    dropout: float = 0.5,
    hidden: int | None = None,
    seed: int | None = 0,
    arch: str = "origin",
) -> MCDropoutNet:
    """A freshly initialised model (``arch`` "origin" or "gal") for ``n_classes`` classes."""
    if arch not in ARCHS:
        raise AuditError(f"--model: expected one of {', '.join(ARCHS)}, got {arch!r}", usage=True)
    kw = {} if hidden is None else {"hidden": hidden}
    return ARCHS[arch](n_classes, image_shape, dropout=dropout, seed=seed, **kw)


def model_from_spec(spec: ModelSpec) -> MCDropoutNet:
    if spec.arch not in ARCHS:
        raise AuditError(f"model: unknown architecture {spec.arch!r}")
    kw = {"dropout_conv": spec.dropout_conv} if spec.arch == "gal" else {}
    return ARCHS[spec.arch](spec.n_classes, spec.image_shape, dropout=spec.dropout, hidden=spec.hidden, seed=None, **kw)
