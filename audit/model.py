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

from . import fastconv
from .errors import AuditError, bad_param


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

    def trunk(self, x):
        """(B, C, H, W) -> (B, D): everything before the first dropout.

        On NumPy arrays the convolutions and pooling run channels-last through
        ``fastconv`` (several times faster on the CPU, in training too); on CuPy
        through chainer's own functions (cuDNN). Both give the same numbers.
        """
        if chainer.backend.get_array_module(x) is np:
            h = self._trunk_nhwc(F.transpose(x, (0, 2, 3, 1)), fastconv.conv2d, fastconv.relu_max_pool2)
            return self._after_convs(F.transpose(h, (0, 3, 1, 2)))
        return self.trunk_chainer(x)

    def trunk_chainer(self, x):  # pragma: no cover - abstract
        """The trunk with chainer's functions only (the GPU path; the reference in tests)."""
        raise NotImplementedError

    def _trunk_nhwc(self, h, conv, relu_pool):  # pragma: no cover - abstract
        """The convolutions and pooling on NHWC input, with ``conv(h, W, b, relu=False)``
        and ``relu_pool(h)`` (ReLU then 2x2 max pooling)."""
        raise NotImplementedError

    def _after_convs(self, h):  # pragma: no cover - abstract
        """NCHW output of the convolutions -> the trunk's output."""
        raise NotImplementedError

    def head_layers(self) -> HeadLayers:  # pragma: no cover - abstract
        raise NotImplementedError

    def dropout_layers(self) -> tuple[tuple[int, float], ...]:
        """(width, ratio) of every dropout layer after the trunk, in order: what the MC
        engine draws masks for."""
        hl = self.head_layers()
        return ((hl.first.W.shape[1], hl.first_ratio), (hl.second.W.shape[1], hl.second_ratio))

    def decayed(self) -> L.Linear:
        """The dense layer weight decay applies to (the paper's code: the one after the
        first dropout)."""
        return self.head_layers().first

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
        h = F.relu(_linear(hl.first, h))
        h = _dropout(h, hl.second_ratio, rng)
        return _linear(hl.second, h)

    def forward(self, x, rng=None):
        return self.head(self.trunk(x), rng)

    def trunk_array(self, x):
        """The trunk for inference on a raw array, (B, C, H, W) -> (B, D).

        On NumPy straight through ``fastconv``'s array functions (no graph, no saved
        columns); on CuPy chainer's functions.
        """
        if chainer.backend.get_array_module(x) is not np:
            with chainer.using_config("train", False), chainer.no_backprop_mode():
                return self.trunk(x).array
        h = self._trunk_nhwc(x.transpose(0, 2, 3, 1), _conv_array, fastconv.relu_max_pool2_nhwc)
        h = np.ascontiguousarray(h.transpose(0, 3, 1, 2))
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            out = self._after_convs(h)
        return out.array if isinstance(out, chainer.Variable) else out


def _conv_array(h, w, b, relu: bool = False):
    y = fastconv.conv2d_nhwc(h, w.array, b.array)
    return np.maximum(y, np.float32(0), out=y) if relu else y


def _linear(link: L.Linear, h):
    """``link(h)``; on NumPy arrays through ``fastconv.linear`` (all cores, fixed sums)."""
    if chainer.backend.get_array_module(h) is np:
        if h.ndim > 2:
            h = F.reshape(h, (h.shape[0], -1))
        return fastconv.linear(h, link.W, link.b)
    return link(h)


def _dropout(h, ratio: float, rng):
    if not chainer.config.train or ratio == 0.0:
        return h
    if rng is None:
        return F.dropout(h, ratio)
    xp = chainer.backend.get_array_module(h)
    scale = np.float32(1.0 / (1.0 - ratio))
    return F.dropout(h, mask=keep_mask(rng, h.shape, ratio, xp) * scale)


def _channel_dropout(h, ratio: float, rng):
    """Dropout of whole channels of NCHW ``h`` (PyTorch's ``Dropout2d``)."""
    if not chainer.config.train or ratio == 0.0:
        return h
    xp = chainer.backend.get_array_module(h)
    shape = (h.shape[0], h.shape[1], 1, 1)
    keep = keep_mask(rng, shape, ratio, xp) if rng is not None else (xp.random.rand(*shape) >= ratio).astype(np.float32)
    mask = xp.broadcast_to(keep * np.float32(1.0 / (1.0 - ratio)), h.shape)
    return F.dropout(h, mask=xp.ascontiguousarray(mask))


def _start(model: "MCDropoutNet", spec: ModelSpec, initializer, seed: int | None):
    """Check ``spec``, give it to ``model``, and return the factory of its initial
    weights: one seeded generator for every layer, so the same seed gives the same
    weights."""
    _check(spec.n_classes, spec.dropout)
    if spec.arch == "gal":
        _check(spec.n_classes, spec.dropout_conv)
    model.spec = spec
    rng = np.random.RandomState(seed)
    return lambda: initializer(rng=rng)


def _check(n_classes: int, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise bad_param("dropout", f"expected a ratio in [0, 1), got {dropout}")
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
        w = _start(self, ModelSpec(int(n_classes), tuple(int(s) for s in image_shape), float(dropout), int(hidden)),
                   initializers.LeCunNormal, seed)
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

    def trunk_chainer(self, x):
        return self._after_convs(self._convs(x))

    def _trunk_nhwc(self, h, conv, relu_pool):
        for c in (self.conv1, self.conv2):
            h = relu_pool(conv(h, c.W, c.b))
        return h

    def _after_convs(self, h):
        return F.relu(_linear(self.fc3, h))

    def head_layers(self) -> HeadLayers:
        return HeadLayers(self.fc4, self.dropout, self.fc5, self.dropout)


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
        spec = ModelSpec(int(n_classes), tuple(int(s) for s in image_shape), float(dropout), int(hidden), "gal",
                         float(dropout_conv))
        w = _start(self, spec, initializers.GlorotUniform, seed)  # Keras' default, as in the paper's code

        with self.init_scope():
            self.conv1 = L.Convolution2D(image_shape[0], 32, 4, initialW=w())
            self.conv2 = L.Convolution2D(32, 32, 4, initialW=w())
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            flat = self.trunk_chainer(np.zeros((1, *image_shape), np.float32)).size
        with self.init_scope():
            self.fc3 = L.Linear(flat, hidden, initialW=w())
            self.fc4 = L.Linear(hidden, n_classes, initialW=w())

    def trunk_chainer(self, x):
        """(B, C, H, W) -> (B, 32*h*w): the convolutions and the pooling, flattened."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self._after_convs(F.max_pooling_2d(h, 2))

    def _trunk_nhwc(self, h, conv, relu_pool):
        h = conv(h, self.conv1.W, self.conv1.b, relu=True)
        return relu_pool(conv(h, self.conv2.W, self.conv2.b))

    def _after_convs(self, h):
        return F.reshape(h, (h.shape[0], -1))

    def head_layers(self) -> HeadLayers:
        return HeadLayers(self.fc3, self.spec.dropout_conv, self.fc4, self.dropout)


class BatchBALDCNN(MCDropoutNet):
    """The MNIST CNN of Kirsch, van Amersfoort & Gal 2019 (BatchBALD), with dropout in
    the convolutions:

        conv 32 5x5 -> channel dropout -> max-pool 2 -> ReLU ->                 trunk: to here
        conv 64 5x5 -> channel dropout -> max-pool 2 -> ReLU -> dense 128 ->
        dropout -> ReLU -> dense C                                              head

    Every ratio is ``dropout`` (0.5 in their code). Channel dropout multiplies a whole
    channel by 0 or 2, and max pooling and ReLU commute with a factor >= 0, so the trunk
    is the first convolution, its pooling and ReLU, run once per image; the channel
    mask of the first convolution then falls on the trunk's output. Everything after it
    runs once per MC pass: the slow path (with shared masks only the kept channels are
    convolved; on the 2-core CPU it scores at about half the speed of Gal's CNN).
    """

    def __init__(
        self,
        n_classes: int,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        *,
        dropout: float = 0.5,
        hidden: int = 128,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        spec = ModelSpec(int(n_classes), tuple(int(s) for s in image_shape), float(dropout), int(hidden), "batchbald", 0.0)
        w = _start(self, spec, initializers.LeCunNormal, seed)

        with self.init_scope():
            self.conv1 = L.Convolution2D(image_shape[0], 32, 5, initialW=w())
            self.conv2 = L.Convolution2D(32, 64, 5, initialW=w())
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            h = self.trunk_chainer(np.zeros((1, *image_shape), np.float32))
            flat = F.max_pooling_2d(self.conv2(h), 2).size
        with self.init_scope():
            self.fc3 = L.Linear(flat, hidden, initialW=w())
            self.fc4 = L.Linear(hidden, n_classes, initialW=w())

    def trunk_chainer(self, x):
        return F.relu(F.max_pooling_2d(self.conv1(x), 2))

    def _trunk_nhwc(self, h, conv, relu_pool):
        return relu_pool(conv(h, self.conv1.W, self.conv1.b))

    def _after_convs(self, h):
        return h  # (B, 32, h, w): the second convolution is in the head

    def head_layers(self) -> HeadLayers:
        return HeadLayers(self.fc3, self.dropout, self.fc4, self.dropout)

    def dropout_layers(self) -> tuple[tuple[int, float], ...]:
        r = self.dropout
        return ((self.conv1.W.shape[0], r), (self.conv2.W.shape[0], r), (self.fc3.W.shape[0], r))

    def decayed(self) -> L.Linear:
        return self.fc3

    def head(self, h, rng=None):
        """(B, 32, h, w) trunk output -> (B, n_classes) logits, with dropout when
        ``config.train`` (channel dropout in the convolutions)."""
        r = self.dropout
        h = _channel_dropout(h, r, rng)
        if chainer.backend.get_array_module(h) is np:
            h = fastconv.conv2d(F.transpose(h, (0, 2, 3, 1)), self.conv2.W, self.conv2.b)
            h = F.transpose(fastconv.relu_max_pool2(h), (0, 3, 1, 2))
        else:
            h = F.relu(F.max_pooling_2d(self.conv2(h), 2))
        h = _channel_dropout(h, r, rng)
        h = _dropout(F.relu(_linear(self.fc3, h)), r, rng)
        return _linear(self.fc4, h)


ARCHS = {"origin": OriginCNN, "gal": GalCNN, "batchbald": BatchBALDCNN}


# smallest image side each architecture takes: origin (3x3 conv, pool 2) twice needs
# (H - 2) // 2 - 2 >= 2; gal's two 4x4 convs then pool 2 need H - 6 >= 2; batchbald's
# (H - 4) // 2 - 4 >= 2
MIN_SIDE = {"origin": 10, "gal": 8, "batchbald": 16}


def check_image_shape(image_shape, arch: str) -> None:
    """One line when the images are too small for ``arch``'s convolutions."""
    c, h, w = (int(v) for v in image_shape)
    if min(h, w) < MIN_SIDE.get(arch, 1) or c < 1:
        raise AuditError(f"images of {h}x{w} are too small for the {arch} CNN (it needs at least "
                         f"{MIN_SIDE[arch]}x{MIN_SIDE[arch]}); resize them")


def build_model(
    n_classes: int,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    *,
    dropout: float = 0.5,
    hidden: int | None = None,
    seed: int | None = 0,
    arch: str = "origin",
) -> MCDropoutNet:
    """A freshly initialised model (``arch`` "origin", "gal" or "batchbald") for ``n_classes`` classes."""
    if arch not in ARCHS:
        raise bad_param("model", f"expected one of {', '.join(ARCHS)}, got {arch!r}")
    check_image_shape(image_shape, arch)
    kw = {} if hidden is None else {"hidden": hidden}
    return ARCHS[arch](n_classes, image_shape, dropout=dropout, seed=seed, **kw)


def model_from_spec(spec: ModelSpec) -> MCDropoutNet:
    if spec.arch not in ARCHS:
        raise AuditError(f"model: unknown architecture {spec.arch!r}")
    check_image_shape(spec.image_shape, spec.arch)
    kw = {"dropout_conv": spec.dropout_conv} if spec.arch == "gal" else {}
    return ARCHS[spec.arch](spec.n_classes, spec.image_shape, dropout=spec.dropout, hidden=spec.hidden, seed=None, **kw)
