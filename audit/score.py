"""Scoring a run: every image of the chosen splits, into scores.csv and mc_summary.npz."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from . import metrics, runs
from .data import SPLITS, Dataset
from .device import describe, get_device
from .errors import AuditError, bad_param
from .flags import FlagConfig, flag_issues
from .mc import DEFAULT_BATCH, MaskMode, mc_predict
from .model import MCDropoutNet
from .progress import NullProgress, Progress

SCORE_COLUMNS = (
    "split", "index", "fold", "label", "pred", "p_label",
    "entropy", "expected_entropy", "mutual_info", "variation_ratio", "mean_std", "margin",
)
FLAG_COLUMNS = ("mislabel_score", "flag", "suggested_label", "reason")


@dataclass(frozen=True)
class ScoreResult:
    scores: pd.DataFrame  # one row per image, SCORE_COLUMNS (+ flags, + path)
    probs: np.ndarray  # (N, C), aligned with scores
    seconds: float
    device: str

    @property
    def accuracy(self) -> float:
        """Accuracy of the MC mean's argmax over every scored image."""
        return float((self.scores["pred"] == self.scores["label"]).mean())


def parse_splits(splits: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise bad_param("splits", f"expected a comma-separated list of {', '.join(SPLITS)}, got {','.join(names)!r}")
    return tuple(dict.fromkeys(names))


def _stream_seed(seed: int, split: str, fold: int) -> int:
    """A distinct mask stream per split and fold, so no two share masks."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split), fold + 1]).generate_state(1)[0])


def score_dataset(
    model: MCDropoutNet,
    dataset: Dataset,
    *,
    splits: tuple[str, ...] = SPLITS,
    samples: int = 50,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    masks: MaskMode = "independent",
    device: str = "cpu",
    train_folds: list[tuple[MCDropoutNet, np.ndarray]] | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Score every image of ``splits`` with T = ``samples`` MC-dropout passes.

    With ``train_folds`` — (model, training indices it did not see) pairs — each of
    those training images is scored by its fold's model (out of sample) and gets that
    fold's number in the ``fold`` column; every other image is scored by ``model``
    (``fold`` -1).
    """
    progress = progress or NullProgress()
    if model.spec.n_classes != dataset.n_classes or tuple(model.spec.image_shape) != dataset.image_shape:
        raise AuditError(
            f"the model expects {model.spec.n_classes} classes of {model.spec.image_shape} images; "
            f"the data has {dataset.n_classes} classes of {dataset.image_shape}"
        )
    dev = get_device(device)
    t0 = time.perf_counter()
    frames, all_probs = [], []
    for split in splits:
        s = dataset.split(split)
        fold = np.full(len(s), -1, np.int32)
        jobs = []  # (model, rows, fold number)
        if split == "train" and train_folds:
            for k, (m, rows) in enumerate(train_folds):
                fold[rows] = k
                jobs.append((m, np.asarray(rows), k))
        rest = np.flatnonzero(fold == -1)
        if len(rest):
            jobs.append((model, rest, -1))
        probs = np.empty((len(s), dataset.n_classes), np.float32)
        cols = {k: np.empty(len(s), np.float32) for k in metrics.SCORE_NAMES}
        for m, rows, k in jobs:
            whole = len(rows) == len(s)  # skip the gather (a copy of the images) when scoring all
            r = mc_predict(
                m, s.x if whole else s.x[rows], samples=samples, batch_size=batch_size,
                seed=_stream_seed(seed, split, k), masks=masks, device=dev, progress=progress,
            )
            probs[rows] = r.probs
            for name in cols:
                cols[name][rows] = getattr(r, name)
        df = pd.DataFrame(
            {
                "split": split,
                "index": np.arange(len(s), dtype=np.int64),
                "fold": fold,
                "label": s.y,
                "pred": metrics.pred(probs).astype(np.int32),
                "p_label": metrics.p_label(probs, s.y),
                **cols,
                "margin": metrics.margin(probs, s.y),
            }
        )
        if s.paths is not None:
            df["path"] = list(s.paths)
        frames.append(df)
        all_probs.append(probs)
    scores = pd.concat(frames, ignore_index=True)
    return ScoreResult(scores, np.concatenate(all_probs), time.perf_counter() - t0, describe(dev))


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of :func:`score_run`; recorded in run.json's ``score``.

    samples: T, MC passes per image. folds: K >= 2 scores training images out of sample
    with K fold models (0: none). The rest as in :func:`score_dataset`."""

    samples: int = 50  # the origin's T
    splits: tuple[str, ...] = SPLITS
    batch_size: int = DEFAULT_BATCH
    seed: int = 0
    folds: int = 0

    def __post_init__(self) -> None:
        from .train import check_int

        object.__setattr__(self, "splits", parse_splits(self.splits))
        check_int("samples", self.samples, 1, MAX_SAMPLES)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("seed", self.seed, 0)
        check_int("folds", self.folds, 0)
        if self.folds == 1:
            raise bad_param("folds", "expected at least 2 folds (or 0 for none), got 1")


# Past these, one batch's (B, T, 1000) activations alone exceed any machine's memory: a
# typo (an extra zero or three), not a setting.
MAX_SAMPLES = 100_000
MAX_BATCH = 1_000_000


def fold_models(
    store: runs.RunStore,
    dataset: Dataset,
    folds: int,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> list[tuple[MCDropoutNet, np.ndarray]]:
    """K models, each trained without one fold of the run's training images.

    The folds are a seeded permutation of the run's training indices cut into K
    parts; models are kept in RUN/folds/K-k/model.npz (each fold its own commit, so an
    interrupted run keeps the folds it finished) and reused while the run's data and
    settings are unchanged. The caller holds the run's lock.
    """
    from .train import stored_train_config, train

    progress = progress or NullProgress()
    meta = store.meta()
    config = stored_train_config(meta.config, str(store.path / runs.RUN_JSON))
    base = store.subset()
    base = np.arange(len(dataset.train)) if base is None else base
    if folds > len(base):
        raise bad_param("folds", f"{folds} folds but only {len(base)} training images")
    parts = np.array_split(np.random.default_rng([config.seed, folds]).permutation(base), folds)
    out = []
    for k, held_out in enumerate(parts):
        held_out = np.sort(held_out)
        name = runs.fold_model(folds, k)
        key = {"fingerprint": dataset.fingerprint, "config": meta.config, "n_held_out": int(len(held_out))}
        if store.meta().folds.get(f"{folds}-{k}") == key and store.has(name):
            model = store.load_model(name)
        else:
            fold_config = replace(config, seed=config.seed + 1 + k)  # each fold its own initialisation
            result = train(dataset, fold_config, subset=np.setdiff1d(base, held_out), device=device, progress=progress)
            model = result.model
            meta = store.meta()
            with store.transaction() as txn:
                txn.write_model(name, model)
                txn.commit(meta.evolve(folds={**meta.folds, f"{folds}-{k}": key}))
            progress.close(
                f"fold {k + 1}/{folds}: trained on {result.n_train:,} images in {result.seconds:.1f} s, "
                f"{len(held_out):,} held out; validation accuracy {result.valid_accuracy:.4f}"
            )
        out.append((model, held_out))
    return out


def score_run(
    run: str | os.PathLike = "runs/default",
    config: ScoreConfig = ScoreConfig(),
    *,
    flags: FlagConfig = FlagConfig(),
    device: str = "cpu",
    data: str = "mnist",
    data_dir: str | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Score the run's data with its model; write scores.csv and mc_summary.npz (one commit).

    A run with no model is trained first with the default settings on ``data``. With
    ``config.folds`` K >= 2, training images are scored out of sample by K fold models.
    Flags (see :mod:`audit.flags`) are added with ``flags``. Returns the scores as a
    DataFrame (see :class:`ScoreResult`).
    """
    from .train import TrainConfig, train_into

    store = runs.RunStore(run)
    get_device(device)
    with store.writing():
        if not store.exists() or not store.has(runs.MODEL):
            if store.exists() and store.meta().command == "acquire":
                raise AuditError(f"--run: {store.path} is an `audit acquire` run (learning curves, no model to "
                                 "score); expected a run made by `audit train`")
            if not store.is_free():
                have = f"{runs.RUN_JSON} but no {runs.MODEL}" if store.exists() else \
                    f"files but no {runs.MODEL} and {runs.RUN_JSON}"
                raise AuditError(f"--run: {store.path} has {have}; not a trained run folder")
            train_into(store, data=data, data_dir=data_dir, config=TrainConfig(), device=device, progress=progress)
        model = store.load_model()
        dataset = store.dataset(data_dir=data_dir, progress=progress)
        t0 = time.perf_counter()
        train_folds = (
            fold_models(store, dataset, config.folds, device=device, progress=progress)
            if config.folds and "train" in config.splits else None
        )
        fold_seconds = time.perf_counter() - t0
        result = score_dataset(
            model, dataset, splits=config.splits, samples=config.samples, batch_size=config.batch_size,
            seed=config.seed, device=device, train_folds=train_folds, progress=progress,
        )
        scores = flag_issues(result.scores, result.probs, class_names=dataset.class_names, config=flags)
        result = replace(result, scores=order_columns(scores))
        meta = store.meta()
        summary = {
            "created": runs.now(),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
            "masks": "independent",
            "device": result.device,
            "seconds": round(result.seconds, 3),
            "fold_training_seconds": round(fold_seconds, 3) if config.folds else 0,
            "n_scored": int(len(result.scores)),
            "accuracy": result.accuracy,
            "mean_entropy": float(result.scores["entropy"].mean()),
        }
        with store.transaction() as txn:
            write_scores(txn, result.scores, result.probs, dataset.class_names)
            txn.commit(meta.evolve(score=summary, flags=flag_summary(result.scores, result.probs, flags), versions=runs.versions()))
    return result


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in (*SCORE_COLUMNS, *FLAG_COLUMNS) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def write_scores(txn: runs.Transaction, scores: pd.DataFrame, probs: np.ndarray, class_names) -> None:
    txn.write_csv(runs.SCORES, scores)
    txn.write_npz(runs.MC_SUMMARY, probs=probs, class_names=np.array(class_names))


def read_scores(store: runs.RunStore, columns=("split", "index", "label", "pred"), hint: str = "; rerun `audit score`"):
    """scores.csv of a scored run, checked: the columns, numbers where numbers belong,
    labels and indices within the run's data."""
    from .tables import restore_frame

    if not store.has(runs.SCORES):
        raise AuditError(f"--run: {store.path} has no {runs.SCORES}; run `audit score --run {store.path}` first")
    numeric = [c for c in columns if c not in ("split", "path", "flag", "reason")]
    df = store.read_table(runs.SCORES, columns, hint=hint, numeric=numeric, keep_default_na=False)
    path = store.path / runs.SCORES
    meta = store.meta()
    n_classes = len(meta.class_names)
    sizes = {"train": meta.data["n_train"], "valid": meta.data["n_valid"]}
    bad_split = ~df["split"].isin(list(sizes))
    if bad_split.any():
        i = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise AuditError(f"{path}: line {i + 2}: split {df['split'].iloc[i]!r} is not one of {', '.join(sizes)}")
    for col, hi in (("label", n_classes), ("pred", n_classes)):
        v = df[col].to_numpy()
        bad = (v < 0) | (v >= hi) | (v != np.round(v))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise AuditError(f"{path}: line {i + 2}: {col} {v[i]} is not a class of this run (0..{hi - 1})")
    idx = df["index"].to_numpy()
    limit = df["split"].map(sizes).to_numpy()
    bad = (idx < 0) | (idx >= limit) | (idx != np.round(idx))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AuditError(f"{path}: line {i + 2}: index {idx[i]} is outside the {df['split'].iloc[i]} split "
                         f"(0..{limit[i] - 1})")
    df["label"], df["pred"], df["index"] = (df[c].astype(np.int64) for c in ("label", "pred", "index"))
    return restore_frame(df, [c for c in ("path", "reason") if c in df.columns])


def flag_summary(scores: pd.DataFrame, probs: np.ndarray, config: FlagConfig) -> dict:
    """run.json's ``flags``: the settings, the counts per split and kind, and how many
    flags ``flag_top`` left out (so a capped worklist never looks complete)."""
    from .flags import left_out

    counts = scores.groupby(["split", "flag"]).size()
    return {
        "confidence": config.confidence,
        "flag_top": config.flag_top,
        "counts": {f"{s}/{f or 'none'}": int(n) for (s, f), n in counts.items()},
        "left_out": left_out(scores, probs, config),
    }


def flag_run(run: str | os.PathLike = "runs/default", *, flags: FlagConfig = FlagConfig()) -> pd.DataFrame:
    """Recompute the flags of a scored run with other settings, without rescoring (one commit)."""
    store = runs.RunStore(run).require()
    with store.writing():
        scores = read_scores(store, ("split", "index", "label", "entropy", "expected_entropy", "mutual_info"))
        if not store.has(runs.MC_SUMMARY):
            raise AuditError(f"--run: {store.path} has no {runs.MC_SUMMARY}; run `audit score --run {store.path}` first")
        z = store.read_npz(runs.MC_SUMMARY)
        if "probs" not in z or "class_names" not in z:
            raise AuditError(f"{store.path / runs.MC_SUMMARY}: expected arrays probs and class_names")
        probs, names = z["probs"], [str(c) for c in z["class_names"]]
        if probs.ndim != 2 or len(probs) != len(scores) or not np.isfinite(probs).all():
            raise AuditError(f"{store.path / runs.MC_SUMMARY}: probs {probs.shape} do not match the "
                             f"{len(scores)} rows of {runs.SCORES}; rerun `audit score`")
        scores = order_columns(flag_issues(scores, probs, class_names=names, config=flags))
        meta = store.meta()
        with store.transaction() as txn:
            write_scores(txn, scores, probs, names)
            txn.commit(meta.evolve(flags=flag_summary(scores, probs, flags)))
    return scores
