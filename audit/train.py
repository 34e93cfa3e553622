"""Training the origin CNN (Adam, softmax cross-entropy), and the run folder it writes."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from . import _compat  # noqa: F401
import chainer
import chainer.functions as F

from . import runs
from .data import Dataset, Split, load_dataset, read_subset, to_float32
from .imagecache import release
from .device import describe, get_device, in_blocks, keep_freed_memory, make_rng
from .config import MIN_BATCH, SCHEDULES, TrainConfig, check_int, stored_train_config  # noqa: F401 (re-exported)
from .errors import AuditError
from .model import MCDropoutNet, build_model
from .progress import NullProgress, Progress


@numba.njit(nogil=True, cache=True)
def _adam_step(param, grad, m, v, rate1, rate2, alpha_t, eps, keep, neg_eta):  # pragma: no cover - compiled
    """Chainer's Adam update of one flat float32 parameter in one pass: the same float32
    operations in the same order as ``AdamRule.update_core_cpu`` (no fused multiply-add),
    so the same bits, without its seven temporaries."""
    for i in range(param.size):
        g = grad[i]
        mi = m[i] + rate1 * (g - m[i])
        vi = v[i] + rate2 * (g * g - v[i])
        m[i] = mi
        v[i] = vi
        update = alpha_t / (np.sqrt(vi) + eps) * mi
        if keep == 1:
            param[i] = param[i] + neg_eta * update
        else:
            param[i] = keep * param[i] + neg_eta * update


class _FusedAdamRule(chainer.optimizers.adam.AdamRule):
    def update_core_cpu(self, param):
        hp = self.hyperparam
        arrays = (param.array, param.grad, self.state["m"], self.state["v"])
        if (param.grad is None or hp.amsgrad or hp.adabound
                or any(a.dtype != np.float32 or not a.flags.c_contiguous for a in arrays)):
            return super().update_core_cpu(param)
        self._check_eps(np.float32)
        f = np.float32
        _adam_step(*(a.reshape(-1) for a in arrays), f(1.0 - hp.beta1), f(1.0 - hp.beta2), f(self.alpha_t),
                   f(hp.eps), f(1.0 - hp.eta * hp.weight_decay_rate), f(-hp.eta))


class FusedAdam(chainer.optimizers.Adam):
    """chainer's Adam, its update of a float32 parameter on the CPU one compiled pass
    (same numbers: a test compares the bits); anything else goes to chainer's own code."""

    def create_update_rule(self):
        return _FusedAdamRule(self.hyperparam)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    valid_loss: float
    valid_accuracy: float
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class TrainResult:
    model: MCDropoutNet
    log: tuple[EpochRecord, ...]
    seconds: float
    n_train: int
    device: str = field(default="cpu")
    # early stopping: the epoch whose weights the model has (restored), its accuracy on the
    # early-stopping split, and the restored model's (loss, accuracy) on the validation split
    best_epoch: int | None = None
    stop_accuracy: float | None = None
    final_valid: tuple[float, float] | None = None

    @property
    def valid_accuracy(self) -> float:
        return self.final_valid[1] if self.final_valid is not None else self.log[-1].valid_accuracy


def step_scale(schedule: str, step: int, total: int) -> float:
    """The step size of update ``step`` (0-based) of ``total``, as a fraction of ``lr``:
    1 throughout for "constant"; for "cosine" half a cosine from 1 down to (not quite) 0."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * step / total))


def _batches(n: int, batch_size: int, order: np.ndarray | None = None, *, even: bool = False):
    """Slices of ``range(n)`` (or of ``order``) of at most ``batch_size``: full ones and the
    remainder last, or with ``even`` as many as that but of near-equal size."""
    if even:
        bounds = np.linspace(0, n, -(-n // batch_size) + 1).round().astype(int).tolist()
    else:
        bounds = [*range(0, n, batch_size), n]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        yield slice(start, stop) if order is None else order[start:stop]


def plan(config: TrainConfig, n: int) -> tuple[int, int]:
    """(epochs, batch size) of training on ``n`` images: ``config``'s, or, where those
    would take fewer than ``config.min_steps`` optimiser steps, smaller batches (down to
    MIN_BATCH, or ``batch_size`` if smaller), then more epochs, until they do not.

    >>> plan(TrainConfig(epochs=12, batch_size=500, min_steps=1200), 15_000)
    (12, 150)
    >>> plan(TrainConfig(epochs=12, batch_size=500, min_steps=1200), 1_000)
    (38, 32)
    """
    per_epoch = n if config.epoch_samples is None else config.epoch_samples
    if config.min_steps is None:
        return config.epochs, config.batch_size
    fits = -(-per_epoch * config.epochs // config.min_steps)  # the batch that gives min_steps in `epochs`
    batch = max(min(config.batch_size, MIN_BATCH), min(config.batch_size, fits))
    return max(config.epochs, -(-config.min_steps // -(-per_epoch // batch))), batch


def shifted(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` (N, C, H, W), each image moved by its own random offset of -shift..shift
    pixels in each direction; what moves in from outside is 0.

    >>> x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    >>> shifted(x, 1, np.random.default_rng(0)).shape
    (1, 1, 3, 3)
    """
    if shift == 0:
        return x
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    out = np.empty_like(x)
    offset = dy * (2 * shift + 1) + dx
    for o in np.unique(offset):  # one slice copy per offset, not a gather per pixel
        rows = np.flatnonzero(offset == o)
        y0, x0 = divmod(int(o), 2 * shift + 1)
        out[rows] = padded[rows, :, y0:y0 + h, x0:x0 + w]
    return out


def evaluate(model: MCDropoutNet, split: Split, *, batch_size: int = 250, device=None) -> tuple[float, float]:
    """(mean loss, accuracy) of the deterministic network (dropout off) on ``split``.

    Uses the model's inference trunk (``trunk_array``: ``fastconv``'s array functions
    on the CPU).
    """
    device = device or get_device("cpu")

    def block(a: int, b: int) -> tuple[float, int]:
        h = model.trunk_array(device.send(to_float32(split.x[a:b])))
        t = device.send(split.y[a:b])
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            y = model.head(h)
            loss = float(F.softmax_cross_entropy(y, t, reduce="no").array.sum())
        return loss, int((y.array.argmax(axis=1) == t).sum())

    loss_sum, correct = 0.0, 0
    for loss, right in in_blocks(block, len(split), batch_size, workers=_threads(device)):
        loss_sum += loss  # in the blocks' order: the same sum on any number of threads
        correct += right
    n = max(len(split), 1)
    return loss_sum / n, correct / n


def predict_probs(model: MCDropoutNet, x: np.ndarray, *, batch_size: int = 250, device: str = "cpu") -> np.ndarray:
    """(N, C) softmax of the deterministic network (dropout off) for images ``x``."""
    dev = get_device(device) if isinstance(device, str) else device

    def block(a: int, b: int) -> np.ndarray:
        return _head_softmax(model, model.trunk_array(dev.send(to_float32(x[a:b]))))

    out = in_blocks(block, len(x), batch_size, workers=_threads(dev))
    c = model.spec.n_classes
    return np.concatenate(out) if out else np.empty((0, c), np.float32)


def _head_softmax(model: MCDropoutNet, a) -> np.ndarray:
    with chainer.using_config("train", False), chainer.no_backprop_mode():  # chainer's config is per thread
        return chainer.backend.CpuDevice().send(F.softmax(model.head(a)).array)


def _threads(dev) -> int | None:
    """Threads for :func:`in_blocks` on ``dev``: the CPU's cores, or one for a GPU."""
    return None if isinstance(dev, chainer.backend.CpuDevice) else 1


def head_probs(model: MCDropoutNet, features: np.ndarray, *, batch_size: int = 250, device: str = "cpu") -> np.ndarray:
    """:func:`predict_probs` from the trunk's output (:func:`trunk_features`)."""
    dev = get_device(device) if isinstance(device, str) else device
    out = in_blocks(lambda a, b: _head_softmax(model, dev.send(features[a:b])), len(features), batch_size,
                    workers=_threads(dev))
    return np.concatenate(out) if out else np.empty((0, model.spec.n_classes), np.float32)


def trunk_features(model: MCDropoutNet, x: np.ndarray, *, batch_size: int = 250, device: str = "cpu",
                   progress: Progress | None = None) -> np.ndarray:
    """The trunk's output for images ``x`` (what the MC head's passes start from;
    deterministic), float32 on the host: (N, D), or (N, C, H, W) for a trunk that ends
    in a convolution's output."""
    progress = progress or NullProgress()
    dev = get_device(device) if isinstance(device, str) else device
    progress.start(f"features of {len(x):,} images", len(x))

    def block(a: int, b: int) -> np.ndarray:
        return np.asarray(chainer.backend.CpuDevice().send(model.trunk_array(dev.send(to_float32(x[a:b])))),
                          np.float32)

    out = in_blocks(block, len(x), batch_size, workers=_threads(dev), done=progress.advance)
    progress.close()
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def train(
    dataset: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    subset: np.ndarray | None = None,
    device: str = "cpu",
    validate: bool = True,
    progress: Progress | None = None,
    stop_split: Split | None = None,
) -> TrainResult:
    """Train the model of ``config`` on ``dataset.train`` (or its ``subset`` of indices).

    Same seed, same device: identical weights. Validation loss and accuracy are
    measured each epoch with dropout off (with ``validate=False`` only after the last).
    With ``config.patience``, ``stop_split`` (labelled images kept out of training)
    decides when to stop: after ``patience`` epochs without a better accuracy on it,
    the best epoch's weights are restored, and ``valid_accuracy`` is theirs.

    >>> result = train(load_dataset("data.npz"), TrainConfig(epochs=2))  # doctest: +SKIP
    >>> result.valid_accuracy                                           # doctest: +SKIP
    """
    progress = progress or NullProgress()
    dev = get_device(device)
    keep_freed_memory()
    model = build_model(dataset.n_classes, dataset.image_shape, dropout=config.dropout, seed=config.seed,
                        arch=config.model)
    model.to_device(dev)
    optimizer = FusedAdam(alpha=config.lr)
    optimizer.setup(model)
    if config.weight_decay:
        # as the paper's code: an L2 penalty on the dense layer after the first dropout
        model.decayed().W.update_rule.add_hook(chainer.optimizer_hooks.WeightDecay(config.weight_decay))

    idx_all = np.arange(len(dataset.train)) if subset is None else np.asarray(subset)
    if len(idx_all) == 0:
        raise AuditError(f"--data: {dataset.source} has no labelled training images to train on")
    if config.patience is not None and (stop_split is None or len(stop_split) == 0):
        raise AuditError(f"--patience {config.patience}: early stopping needs an early-stopping split of labelled "
                         "images kept out of training (--valid-size), got none")
    order_rng = np.random.default_rng(config.seed)
    mask_rng = make_rng(dev, [config.seed, 1])
    shift_rng = np.random.default_rng([config.seed, 2])
    t_start = time.perf_counter()
    # single-threaded BLAS: OpenBLAS sums in another order with more threads, so this makes the
    # weights the same on any number of cores and in a Dask worker; fastconv spreads the
    # convolutions over the cores itself, and the small dense products lose nothing (bench)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), threadpool_limits(limits=1, user_api="blas"):
        return _epochs(model, optimizer, dataset, config, idx_all, (order_rng, mask_rng, shift_rng), dev,
                       progress, t_start, validate, stop_split)


def _epochs(model, optimizer, dataset, config, idx_all, rngs, dev, progress, t_start,
            validate, stop_split) -> TrainResult:
    """The epochs of :func:`train`."""
    order_rng, mask_rng, shift_rng = rngs
    x_all, y_all = dataset.train.x, dataset.train.y
    n = len(idx_all)
    per_epoch = n if config.epoch_samples is None else config.epoch_samples
    log = []
    epochs, batch_size = plan(config, n)
    steps_per_epoch = -(-per_epoch // batch_size)
    total_steps, step = epochs * steps_per_epoch, 0
    stopper = _EarlyStop(model, config.patience) if config.patience is not None else None
    for epoch in range(1, epochs + 1):
        progress.start(f"epoch {epoch}/{epochs}", per_epoch)
        t0 = time.perf_counter()
        loss_sum = 0.0
        correct = seen = 0
        # an epoch: a permutation of the images, or epoch_samples of them drawn with replacement
        order = (order_rng.permutation(n) if config.epoch_samples is None
                 else order_rng.integers(0, n, size=config.epoch_samples))
        for bi in _batches(per_epoch, batch_size, order, even=config.even_batches):
            rows = np.sort(idx_all[bi])  # sorted gathers are faster; order within a batch is irrelevant
            x = dev.send(shifted(to_float32(x_all[rows]), config.shift, shift_rng))
            t = dev.send(y_all[rows])
            y = model(x, rng=mask_rng)
            loss = F.softmax_cross_entropy(y, t)
            if not math.isfinite(float(loss.array)):
                raise AuditError(
                    f"training diverged: the loss is {float(loss.array)} at epoch {epoch}, step {step + 1}; "
                    f"lower --lr (it is {config.lr}) or check the images' scale; nothing was written")
            model.cleargrads()
            loss.backward()
            optimizer.eta = step_scale(config.schedule, step, total_steps)  # Adam's schedule multiplier
            optimizer.update()
            step += 1
            b = len(rows)
            loss_sum += float(loss.array) * b
            correct += int((y.array.argmax(axis=1) == t).sum())
            seen += b
            elapsed = time.perf_counter() - t0
            progress.advance(b, loss=loss_sum / seen, acc=correct / seen, ips=seen / elapsed)
        train_seconds = time.perf_counter() - t0
        release(x_all)  # images mapped from the image cache: the epoch's pages need not stay resident
        if validate or (epoch == epochs and stopper is None):
            v_loss, v_acc = evaluate(model, dataset.valid, device=dev)
        else:
            v_loss = v_acc = float("nan")
        rec = EpochRecord(
            epoch,
            loss_sum / seen,
            correct / seen,
            v_loss,
            v_acc,
            time.perf_counter() - t0,
            seen / train_seconds,
        )
        log.append(rec)
        stop_note = ""
        if stopper is not None:
            stop_note = f" | early-stopping acc {stopper.see(epoch, evaluate(model, stop_split, device=dev)[1]):.4f}"
        progress.close(
            f"epoch {epoch}/{epochs}: loss {rec.train_loss:.4f} acc {rec.train_accuracy:.4f} "
            f"| valid loss {rec.valid_loss:.4f} acc {rec.valid_accuracy:.4f}{stop_note} | {rec.images_per_s:,.0f} images/s"
        )
        if stopper is not None and stopper.done:
            break
    if stopper is None:
        return TrainResult(model, tuple(log), time.perf_counter() - t_start, n, describe(dev))
    stopper.restore()
    return TrainResult(model, tuple(log), time.perf_counter() - t_start, n, describe(dev),
                       best_epoch=stopper.best_epoch, stop_accuracy=stopper.best,
                       final_valid=evaluate(model, dataset.valid, device=dev))


class _EarlyStop:
    """Keeps the weights of the epoch with the best early-stopping accuracy (the first
    of equals); ``done`` once ``patience`` epochs in a row did not beat it."""

    def __init__(self, model: MCDropoutNet, patience: int) -> None:
        self.model, self.patience = model, patience
        self.best, self.best_epoch, self.since, self.weights = -1.0, 0, 0, None

    def see(self, epoch: int, accuracy: float) -> float:
        if accuracy > self.best:
            self.best, self.best_epoch, self.since = accuracy, epoch, 0
            self.weights = {name: p.array.copy() for name, p in self.model.namedparams()}
        else:
            self.since += 1
        return accuracy

    @property
    def done(self) -> bool:
        return self.since >= self.patience

    def restore(self) -> None:
        for name, p in self.model.namedparams():
            p.array[...] = self.weights[name]


def log_csv(log: tuple[EpochRecord, ...]) -> str:
    cols = list(EpochRecord.__dataclass_fields__)
    lines = [",".join(cols)]
    for r in log:
        d = asdict(r)
        lines.append(",".join(str(d[c]) if c == "epoch" else f"{d[c]:.6g}" for c in cols))
    return "\n".join(lines) + "\n"


def train_run(
    run: str | os.PathLike = "runs/default",
    *,
    data: str = "mnist",
    data_dir: str | None = None,
    config: TrainConfig = TrainConfig(),
    subset: str | os.PathLike | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    image_size: tuple[int, int] | None = None,
) -> TrainResult:
    """Load ``data``, train, and write the run folder ``run`` in one commit."""
    store = runs.RunStore(run)
    get_device(device)  # fail on a bad --device before loading anything
    with store.writing():
        return train_into(store, data=data, data_dir=data_dir, config=config, subset=subset, device=device,
                          overwrite=overwrite, progress=progress, image_size=image_size)


def train_into(store: runs.RunStore, *, data: str, data_dir: str | None, config: TrainConfig,
               subset: str | os.PathLike | None = None, device: str = "cpu", overwrite: bool = False,
               progress: Progress | None = None, image_size: tuple[int, int] | None = None) -> TrainResult:
    """:func:`train_run` on a store whose lock the caller holds."""
    extra = {"subset_file": str(Path(subset).resolve())} if subset is not None else {}
    dataset, source = new_run_data(store, data, data_dir, image_size, progress, overwrite=overwrite, **extra)
    idx = read_subset(subset, len(dataset.train)) if subset is not None else None
    return fit_and_write(store, dataset, source, config=config, subset=idx, device=device, progress=progress)


def new_run_data(store: runs.RunStore, data: str, data_dir: str | None, image_size: tuple[int, int] | None,
                 progress: Progress | None, *, overwrite: bool = False, **extra) -> tuple[Dataset, dict]:
    """For a new run in ``store``: check the folder is free, load ``data``; the dataset
    and run.json's ``data`` block (``extra`` added to it)."""
    check_run_free(store, overwrite)
    dataset = load_dataset(data, data_dir=data_dir, progress=progress, image_size=image_size)
    return dataset, runs.data_source(data, data_dir, dataset, run=store.path, image_size=image_size, **extra)


def check_run_free(store: runs.RunStore, overwrite: bool) -> None:
    """A new run may go into ``store`` only where nothing would be lost: no folder, an
    empty one, or (with ``overwrite``) an existing run."""
    if store.is_free():
        return
    if not overwrite:
        raise AuditError(f"--run: {store.path} already exists; pass --overwrite to replace it or choose another --run")
    if not store.exists():
        raise AuditError(f"--overwrite: {store.path} holds files but no {runs.RUN_JSON}; it is not a run folder, "
                         "and --overwrite replaces only runs (move those files, or choose another --run)")


def fit_and_write(
    store: runs.RunStore,
    dataset: Dataset,
    source: dict,
    *,
    config: TrainConfig,
    subset: np.ndarray | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    command: str = "train",
    extra: dict | None = None,
    files: dict[str, bytes] | None = None,
) -> TrainResult:
    """Train on ``dataset`` (its ``subset``) and publish the run (:func:`write_run`).

    ``source`` is run.json's ``data`` block (:func:`runs.data_source`); ``extra`` adds
    fields to run.json, ``files`` more files to the run.
    """
    result = train(dataset, config, subset=subset, device=device, progress=progress)
    write_run(store, source, config=config, result=result, subset=subset, command=command, extra=extra, files=files)
    return result


def write_run(store: runs.RunStore, source: dict, *, config: TrainConfig, result: TrainResult,
              subset: np.ndarray | None = None, command: str = "train", extra: dict | None = None,
              files: dict[str, bytes] | None = None) -> None:
    """Publish a trained run (model, train log, run.json) in one commit that replaces
    whatever the folder held (the caller holds the lock)."""
    data = {**source, "subset": None if subset is None else {"file": runs.SUBSET, "n": int(len(subset))}}
    meta = runs.RunMeta(
        command=command, created=runs.now(), config=asdict(config), seed=config.seed,
        model=result.model.spec.to_json(), data=data, device=result.device, versions=runs.versions(),
        timings={"train_seconds": round(result.seconds, 3)},
        results={"valid_accuracy": result.valid_accuracy, "n_train_used": result.n_train},
        **(extra or {}),
    )
    with store.transaction(replace_all=True) as txn:
        txn.write_model(runs.MODEL, result.model)
        txn.write_text(runs.TRAIN_LOG, log_csv(result.log))
        if subset is not None:
            txn.write_text(runs.SUBSET, "\n".join(map(str, subset.tolist())) + "\n")
        for name, content in (files or {}).items():
            txn.write_bytes(name, content)
        txn.commit(meta)
