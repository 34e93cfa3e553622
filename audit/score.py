"""Scoring a run: every image of the chosen splits, into scores.csv and mc_summary.npz."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics, runs
from .data import SPLITS, Dataset, load_dataset
from .device import describe, get_device
from .errors import AuditError
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
        raise AuditError(
            f"--splits: expected a comma-separated list of {', '.join(SPLITS)}, got {','.join(names)!r}",
            usage=True,
        )
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


def fold_models(
    run: Path,
    meta: dict,
    dataset: Dataset,
    folds: int,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> list[tuple[MCDropoutNet, np.ndarray]]:
    """K models, each trained without one fold of the run's training images.

    The folds are a seeded permutation of the run's training indices cut into K
    parts; models are kept in RUN/folds/K-k/model.npz and reused while the run's data
    and settings are unchanged.
    """
    from .train import run_subset, stored_train_config, train

    progress = progress or NullProgress()
    if folds < 2:
        raise AuditError(f"--folds: expected at least 2 folds (or 0 for none), got {folds}", usage=True)
    config = stored_train_config(meta["config"])
    base = run_subset(run, meta)
    base = np.arange(len(dataset.train)) if base is None else base
    if folds > len(base):
        raise AuditError(f"--folds: {folds} folds but only {len(base)} training images")
    parts = np.array_split(np.random.default_rng([config.seed, folds]).permutation(base), folds)
    out = []
    for k, held_out in enumerate(parts):
        held_out = np.sort(held_out)
        path = run / "folds" / f"{folds}-{k}" / runs.MODEL
        key = {"fingerprint": dataset.fingerprint, "config": meta["config"], "n_held_out": int(len(held_out))}
        done = meta.get("folds", {}).get(f"{folds}-{k}")
        if done == key and path.is_file():
            model = runs.load_model_file(path, meta)
        else:
            fold_config = replace(config, seed=config.seed + 1 + k)  # each fold its own initialisation
            result = train(dataset, fold_config, subset=np.setdiff1d(base, held_out), device=device, progress=progress)
            model = result.model
            runs.write_model(path, model)
            meta.setdefault("folds", {})[f"{folds}-{k}"] = key
            progress.close(
                f"fold {k + 1}/{folds}: trained on {result.n_train:,} images in {result.seconds:.1f} s, "
                f"{len(held_out):,} held out; validation accuracy {result.valid_accuracy:.4f}"
            )
        out.append((model, held_out))
    return out


def score_run(
    run: str | os.PathLike = "runs/default",
    *,
    samples: int = 50,
    splits: str | tuple[str, ...] = SPLITS,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    device: str = "cpu",
    folds: int = 0,
    flags: FlagConfig = FlagConfig(),
    data: str = "mnist",
    data_dir: str | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Score the run's data with its model; write scores.csv and mc_summary.npz.

    A run with no model is trained first with the default settings on ``data``. With
    ``folds`` K >= 2, training images are scored out of sample by K fold models.
    Flags (see :mod:`audit.flags`) are added with ``flags``. Returns the scores as a
    DataFrame (see :class:`ScoreResult`).
    """
    from .train import TrainConfig, train_run

    run = Path(run)
    splits = parse_splits(splits)
    if samples < 1:
        raise AuditError(f"--samples: expected a positive number of passes, got {samples}", usage=True)
    if folds == 1 or folds < 0:
        raise AuditError(f"--folds: expected at least 2 folds (or 0 for none), got {folds}", usage=True)
    get_device(device)
    if not runs.has_model(run):
        if (run / runs.RUN_JSON).is_file() and runs.read_run(run).get("command") == "acquire":
            raise AuditError(f"--run: {run} is an `audit acquire` run (learning curves, no model to score); "
                             "expected a run made by `audit train`")
        if run.exists() and any(run.iterdir()):
            have = "run.json but no model.npz" if (run / runs.RUN_JSON).is_file() else "files but no model.npz and run.json"
            raise AuditError(f"--run: {run} has {have}; not a trained run folder")
        train_run(run, data=data, data_dir=data_dir, config=TrainConfig(), device=device, progress=progress)
    meta = runs.read_run(run)
    model = runs.load_model(run, meta)
    dataset = load_run_data(meta, run=run, data_dir=data_dir, progress=progress)
    t0 = time.perf_counter()
    train_folds = (
        fold_models(run, meta, dataset, folds, device=device, progress=progress)
        if folds and "train" in splits else None
    )
    fold_seconds = time.perf_counter() - t0
    result = score_dataset(
        model, dataset, splits=splits, samples=samples, batch_size=batch_size, seed=seed,
        device=device, train_folds=train_folds, progress=progress,
    )
    scores = flag_issues(result.scores, result.probs, class_names=dataset.class_names, config=flags)
    result = replace(result, scores=order_columns(scores))
    write_scores(run, result.scores, result.probs, dataset.class_names)
    meta["score"] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "samples": samples,
        "splits": list(splits),
        "seed": seed,
        "masks": "independent",
        "folds": folds,
        "batch_size": batch_size,
        "device": result.device,
        "seconds": round(result.seconds, 3),
        "fold_training_seconds": round(fold_seconds, 3) if folds else 0,
        "n_scored": int(len(result.scores)),
        "accuracy": result.accuracy,
        "mean_entropy": float(result.scores["entropy"].mean()),
    }
    meta["flags"] = flag_summary(result.scores, flags)
    meta["versions"] = runs.versions()
    runs.write_json(run / runs.RUN_JSON, meta)
    return result


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in (*SCORE_COLUMNS, *FLAG_COLUMNS) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def write_scores(run: Path, scores: pd.DataFrame, probs: np.ndarray, class_names) -> None:
    with runs.atomic_path(run / runs.SCORES) as tmp:
        scores.to_csv(tmp, index=False, float_format="%.6g")
    runs.write_npz(run / runs.MC_SUMMARY, probs=probs, class_names=np.array(class_names))


def flag_summary(scores: pd.DataFrame, config: FlagConfig) -> dict:
    counts = scores.groupby(["split", "flag"]).size()
    return {
        "confidence": config.confidence,
        "flag_top": config.flag_top,
        "counts": {f"{s}/{f or 'none'}": int(n) for (s, f), n in counts.items()},
    }


def flag_run(run: str | os.PathLike = "runs/default", *, flags: FlagConfig = FlagConfig()) -> pd.DataFrame:
    """Recompute the flags of a scored run with other settings, without rescoring."""
    run = Path(run)
    meta = runs.read_run(run)
    path = run / runs.SCORES
    if not path.is_file() or not (run / runs.MC_SUMMARY).is_file():
        raise AuditError(f"--run: {run} has no {runs.SCORES} and {runs.MC_SUMMARY}; run `audit score --run {run}` first")
    scores = pd.read_csv(path, keep_default_na=False)
    with np.load(run / runs.MC_SUMMARY) as z:
        probs = z["probs"]
        names = [str(c) for c in z["class_names"]]
    scores = order_columns(flag_issues(scores, probs, class_names=names, config=flags))
    write_scores(run, scores, probs, names)
    meta["flags"] = flag_summary(scores, flags)
    runs.write_json(run / runs.RUN_JSON, meta)
    return scores


def load_base_data(meta: dict, *, data_dir: str | None = None, progress: Progress | None = None) -> Dataset:
    """The source data of a run, before any review decisions, checked against its fingerprint."""
    d = meta["data"]
    dataset = load_dataset(d["data"], data_dir=data_dir or d.get("data_dir"), progress=progress)
    curation = d.get("curation")
    expected = curation["base_fingerprint"] if curation else d["fingerprint"]
    if dataset.fingerprint != expected:
        what = "the curated run started from" if curation else "this run was trained on"
        raise AuditError(
            f"--data: {d['data']} is not the data {what} (fingerprint {dataset.fingerprint[:12]}, "
            f"run.json says {expected[:12]}); retrain the run"
        )
    return dataset


def load_run_data(
    meta: dict, *, run: str | os.PathLike | None = None, data_dir: str | None = None,
    progress: Progress | None = None, base: Dataset | None = None,
) -> Dataset:
    """The dataset a run was trained on (with its review decisions applied, for a
    curated run), checked against its fingerprint. ``base``: the already loaded
    :func:`load_base_data`, to avoid loading it twice."""
    from .curate import apply_decisions, read_decisions

    d = meta["data"]
    dataset = base if base is not None else load_base_data(meta, data_dir=data_dir, progress=progress)
    curation = d.get("curation")
    if curation:
        if run is None:
            raise AuditError("load_run_data: a curated run needs run= to find its decisions")
        dataset = apply_decisions(dataset, read_decisions(Path(run) / curation["decisions"])).dataset
        if dataset.fingerprint != d["fingerprint"]:
            raise AuditError(
                f"{Path(run) / curation['decisions']}: applied to the source data it does not give the "
                f"data this run was trained on (fingerprint {dataset.fingerprint[:12]}, run.json says "
                f"{d['fingerprint'][:12]})"
            )
    return dataset
