"""Scoring a run: every image of the chosen splits, into scores.csv and mc_summary.npz."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics, runs
from .data import SPLITS, Dataset, load_dataset
from .device import describe, get_device
from .errors import AuditError
from .mc import DEFAULT_BATCH, MaskMode, mc_predict
from .model import OriginCNN
from .progress import NullProgress, Progress

SCORE_COLUMNS = (
    "split", "index", "label", "pred", "p_label",
    "entropy", "expected_entropy", "mutual_info", "variation_ratio", "mean_std", "margin",
)


@dataclass(frozen=True)
class ScoreResult:
    scores: pd.DataFrame  # one row per image, SCORE_COLUMNS (+ path)
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


def score_dataset(
    model: OriginCNN,
    dataset: Dataset,
    *,
    splits: tuple[str, ...] = SPLITS,
    samples: int = 50,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    masks: MaskMode = "independent",
    device: str = "cpu",
    progress: Progress | None = None,
) -> ScoreResult:
    """Score every image of ``splits`` with T = ``samples`` MC-dropout passes."""
    progress = progress or NullProgress()
    if model.spec.n_classes != dataset.n_classes or tuple(model.spec.image_shape) != dataset.image_shape:
        raise AuditError(
            f"the model expects {model.spec.n_classes} classes of {model.spec.image_shape} images; "
            f"the data has {dataset.n_classes} classes of {dataset.image_shape}"
        )
    dev = get_device(device)
    t0 = time.perf_counter()
    frames, probs = [], []
    for split in splits:
        s = dataset.split(split)
        # a different mask stream per split, so train and valid never share masks
        r = mc_predict(
            model, s.x, samples=samples, batch_size=batch_size, seed=seed * len(SPLITS) + SPLITS.index(split),
            masks=masks, device=dev, progress=progress,
        )
        df = pd.DataFrame(
            {
                "split": split,
                "index": np.arange(len(s), dtype=np.int64),
                "label": s.y,
                "pred": metrics.pred(r.probs).astype(np.int32),
                "p_label": metrics.p_label(r.probs, s.y),
                **r.scores(),
                "margin": metrics.margin(r.probs, s.y),
            }
        )
        if s.paths is not None:
            df["path"] = list(s.paths)
        frames.append(df)
        probs.append(r.probs)
    scores = pd.concat(frames, ignore_index=True)
    return ScoreResult(scores, np.concatenate(probs), time.perf_counter() - t0, describe(dev))


def score_run(
    run: str | os.PathLike = "runs/default",
    *,
    samples: int = 50,
    splits: str | tuple[str, ...] = SPLITS,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    device: str = "cpu",
    data: str = "mnist",
    data_dir: str | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Score the run's data with its model; write scores.csv and mc_summary.npz.

    A run with no model is trained first with the default settings on ``data``.
    Returns the scores as a DataFrame (see :class:`ScoreResult`).
    """
    from .train import TrainConfig, train_run

    run = Path(run)
    splits = parse_splits(splits)
    if samples < 1:
        raise AuditError(f"--samples: expected a positive number of passes, got {samples}", usage=True)
    get_device(device)
    if not runs.has_model(run):
        if run.exists() and any(run.iterdir()):
            raise AuditError(f"--run: {run} has files but no model.npz and run.json; not a run folder")
        train_run(run, data=data, data_dir=data_dir, config=TrainConfig(), device=device, progress=progress)
    meta = runs.read_run(run)
    model = runs.load_model(run, meta)
    dataset = load_run_data(meta, data_dir=data_dir, progress=progress)
    result = score_dataset(
        model, dataset, splits=splits, samples=samples, batch_size=batch_size, seed=seed,
        device=device, progress=progress,
    )
    with runs.atomic_path(run / runs.SCORES) as tmp:
        result.scores.to_csv(tmp, index=False, float_format="%.6g")
    runs.write_npz(run / runs.MC_SUMMARY, probs=result.probs, class_names=np.array(dataset.class_names))
    meta["score"] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "samples": samples,
        "splits": list(splits),
        "seed": seed,
        "masks": "independent",
        "batch_size": batch_size,
        "device": result.device,
        "seconds": round(result.seconds, 3),
        "n_scored": int(len(result.scores)),
        "accuracy": result.accuracy,
        "mean_entropy": float(result.scores["entropy"].mean()),
    }
    meta["versions"] = runs.versions()
    runs.write_json(run / runs.RUN_JSON, meta)
    return result


def load_run_data(meta: dict, *, data_dir: str | None = None, progress: Progress | None = None) -> Dataset:
    """The dataset a run was trained on, checked against its fingerprint."""
    d = meta["data"]
    dataset = load_dataset(d["data"], data_dir=data_dir or d.get("data_dir"), progress=progress)
    if dataset.fingerprint != d["fingerprint"]:
        raise AuditError(
            f"--data: {d['data']} is not the data this run was trained on (fingerprint "
            f"{dataset.fingerprint[:12]}, run.json says {d['fingerprint'][:12]}); retrain the run"
        )
    return dataset
