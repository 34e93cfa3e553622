"""Training the origin CNN (Adam, softmax cross-entropy), and the run folder it writes."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import _compat  # noqa: F401
import chainer
import chainer.functions as F

from . import runs
from .data import Dataset, Split, load_dataset, to_float32
from .device import describe, get_device, make_rng
from .errors import AuditError
from .model import MCDropoutNet, build_model
from .progress import NullProgress, Progress


SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the origin's."""

    epochs: int = 10
    batch_size: int = 1000
    lr: float = 1e-4  # Adam's alpha
    dropout: float = 0.5
    seed: int = 0
    model: str = "origin"  # or "gal", the CNN of Gal et al. 2017
    weight_decay: float = 0.0  # L2 rate on the head's first dense layer (chainer WeightDecay)
    schedule: str = "constant"  # or "cosine": the step size falls from lr to 0 over the training
    # split each epoch into ceil(n / batch_size) batches of near-equal size, not full batches and a
    # remainder (130 images in batches of 128: 65 + 65, not 128 + 2); the same when batch_size divides n
    even_batches: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise AuditError(f"--epochs: expected at least 1, got {self.epochs}", usage=True)
        if self.batch_size < 1:
            raise AuditError(f"--batch-size: expected at least 1, got {self.batch_size}", usage=True)
        if not self.lr > 0:
            raise AuditError(f"--lr: expected a positive learning rate, got {self.lr}", usage=True)
        if not 0.0 <= self.dropout < 1.0:
            raise AuditError(f"--dropout: expected a ratio in [0, 1), got {self.dropout}", usage=True)
        if self.weight_decay < 0:
            raise AuditError(f"--weight-decay: expected >= 0, got {self.weight_decay}", usage=True)
        if self.schedule not in SCHEDULES:
            raise AuditError(f"--schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
                             usage=True)


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

    @property
    def valid_accuracy(self) -> float:
        return self.log[-1].valid_accuracy


def read_subset(path: str | os.PathLike, n_train: int) -> np.ndarray:
    """Training indices from ``path``: ``.npy``, or text with one integer a line
    (a CSV whose header has an ``index`` column is read from that column)."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"--subset: {path} does not exist")
    if path.suffix == ".npy":
        try:
            idx = np.load(path, allow_pickle=False)
        except Exception as e:
            raise AuditError(f"--subset: {path} is not a readable .npy file ({e})") from None
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise AuditError(f"--subset: {path} must hold a 1-d integer array, got {idx.dtype} {idx.shape}")
    else:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        col = 0
        if lines and not lines[0].lstrip("-").isdigit():
            header = [h.strip() for h in lines[0].split(",")]
            if "index" not in header:
                raise AuditError(f"--subset: {path}: first line {lines[0]!r} is neither an index nor a header with 'index'")
            col, lines = header.index("index"), lines[1:]
        try:
            idx = np.array([int(ln.split(",")[col]) for ln in lines], dtype=np.int64)
        except (ValueError, IndexError):
            bad = next(ln for ln in lines if not ln.split(",")[col].strip().lstrip("-").isdigit())
            raise AuditError(f"--subset: {path}: expected integer indices, found {bad!r}") from None
    if idx.size == 0:
        raise AuditError(f"--subset: {path} lists no indices")
    out = (idx < 0) | (idx >= n_train)
    if out.any():
        raise AuditError(
            f"--subset: {path}: index {int(idx[out][0])} is out of range; the training split has "
            f"{n_train} images (0..{n_train - 1}); {int(out.sum())} out of range"
        )
    if np.unique(idx).size != idx.size:
        raise AuditError(f"--subset: {path}: {idx.size - np.unique(idx).size} duplicate indices")
    return idx.astype(np.int64)


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


def stored_train_config(config: dict) -> TrainConfig:
    """The TrainConfig of a run's run.json, with what older runs did not record: they
    trained in full batches and a remainder."""
    return TrainConfig(**{"even_batches": False, **config})


def evaluate(model: MCDropoutNet, split: Split, *, batch_size: int = 250, device=None) -> tuple[float, float]:
    """(mean loss, accuracy) of the deterministic network (dropout off) on ``split``.

    Uses the model's inference trunk (``trunk_array``: ``fastconv``'s array functions
    on the CPU).
    """
    device = device or get_device("cpu")
    loss_sum, correct = 0.0, 0
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for sl in _batches(len(split), batch_size):
            h = model.trunk_array(device.send(to_float32(split.x[sl])))
            t = device.send(split.y[sl])
            y = model.head(h)
            loss_sum += float(F.softmax_cross_entropy(y, t, reduce="no").array.sum())
            correct += int((y.array.argmax(axis=1) == t).sum())
    n = max(len(split), 1)
    return loss_sum / n, correct / n


def train(
    dataset: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    subset: np.ndarray | None = None,
    device: str = "cpu",
    validate: bool = True,
    progress: Progress | None = None,
) -> TrainResult:
    """Train the model of ``config`` on ``dataset.train`` (or its ``subset`` of indices).

    Same seed, same device: identical weights. Validation loss and accuracy are
    measured each epoch with dropout off (with ``validate=False`` only after the last).

    >>> result = train(load_dataset("data.npz"), TrainConfig(epochs=2))  # doctest: +SKIP
    >>> result.valid_accuracy                                           # doctest: +SKIP
    """
    progress = progress or NullProgress()
    dev = get_device(device)
    model = build_model(dataset.n_classes, dataset.image_shape, dropout=config.dropout, seed=config.seed,
                        arch=config.model)
    model.to_device(dev)
    optimizer = chainer.optimizers.Adam(alpha=config.lr)
    optimizer.setup(model)
    if config.weight_decay:
        # as the paper's code: an L2 penalty on the dense layer after the first dropout
        model.head_layers().first.W.update_rule.add_hook(chainer.optimizer_hooks.WeightDecay(config.weight_decay))

    x_all, y_all = dataset.train.x, dataset.train.y
    idx_all = np.arange(len(y_all)) if subset is None else np.asarray(subset)
    n = len(idx_all)
    order_rng = np.random.default_rng(config.seed)
    mask_rng = make_rng(dev, [config.seed, 1])
    log = []
    steps_per_epoch = -(-n // config.batch_size)
    total_steps, step = config.epochs * steps_per_epoch, 0
    t_start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        progress.start(f"epoch {epoch}/{config.epochs}", n)
        t0 = time.perf_counter()
        loss_sum = 0.0
        correct = seen = 0
        for bi in _batches(n, config.batch_size, order_rng.permutation(n), even=config.even_batches):
            rows = np.sort(idx_all[bi])  # sorted gathers are faster; order within a batch is irrelevant
            x = dev.send(to_float32(x_all[rows]))
            t = dev.send(y_all[rows])
            y = model(x, rng=mask_rng)
            loss = F.softmax_cross_entropy(y, t)
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
        if validate or epoch == config.epochs:
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
        progress.close(
            f"epoch {epoch}/{config.epochs}: loss {rec.train_loss:.4f} acc {rec.train_accuracy:.4f} "
            f"| valid loss {rec.valid_loss:.4f} acc {rec.valid_accuracy:.4f} | {rec.images_per_s:,.0f} images/s"
        )
    return TrainResult(model, tuple(log), time.perf_counter() - t_start, n, describe(dev))


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
) -> TrainResult:
    """Load ``data``, train, and write the run folder ``run`` (atomically)."""
    run = Path(run)
    get_device(device)  # fail on a bad --device before loading anything
    check_run_free(run, overwrite)
    dataset = load_dataset(data, data_dir=data_dir, progress=progress)
    idx = read_subset(subset, len(dataset.train)) if subset is not None else None
    source = {"data": str(data), "data_dir": None if data_dir is None else str(data_dir)}
    if subset is not None:
        source["subset_file"] = str(subset)
    return fit_and_write(run, dataset, source, config=config, subset=idx, device=device,
                         overwrite=overwrite, progress=progress)


def check_run_free(run: Path, overwrite: bool) -> None:
    if run.exists() and any(run.iterdir()) and not overwrite:
        raise AuditError(f"--run: {run} already exists; pass --overwrite to replace it or choose another --run")


def fit_and_write(
    run: Path,
    dataset: Dataset,
    source: dict,
    *,
    config: TrainConfig,
    subset: np.ndarray | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> TrainResult:
    """Train on ``dataset`` (its ``subset``) and write the run folder.

    ``source`` says how to load the data again (run.json's ``data``); ``extra`` adds
    entries to run.json, ``files`` text files to the run folder.
    """
    result = train(dataset, config, subset=subset, device=device, progress=progress)
    meta = {
        "command": "train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(config),
        "seed": config.seed,
        "model": result.model.spec.to_json(),
        "data": {
            **source,
            "source": dataset.source,
            "fingerprint": dataset.fingerprint,
            "class_names": list(dataset.class_names),
            "n_train": len(dataset.train),
            "n_valid": len(dataset.valid),
            "image_shape": list(dataset.image_shape),
            "subset": None if subset is None else {"file": runs.SUBSET, "n": int(len(subset))},
        },
        "device": result.device,
        "versions": runs.versions(),
        "timings": {"train_seconds": round(result.seconds, 3)},
        "results": {"valid_accuracy": result.valid_accuracy, "n_train_used": result.n_train},
        **(extra or {}),
    }
    with runs.staged_run(run, overwrite=overwrite) as stage:
        runs.write_model(stage / runs.MODEL, result.model)
        runs.write_text(stage / runs.TRAIN_LOG, log_csv(result.log))
        if subset is not None:
            runs.write_text(stage / runs.SUBSET, "\n".join(map(str, subset.tolist())) + "\n")
        for name, text in (files or {}).items():
            runs.write_text(stage / name, text)
        runs.write_json(stage / runs.RUN_JSON, meta)
    return result


def run_subset(run: str | os.PathLike, meta: dict) -> np.ndarray | None:
    """The training indices a run was trained on, or None for all."""
    if not meta["data"].get("subset"):
        return None
    return read_subset(Path(run) / runs.SUBSET, int(meta["data"]["n_train"]))
