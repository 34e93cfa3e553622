"""Scoring a run: every image of the chosen splits, into scores.csv and mc_summary.npz."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import contextlib
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
from .mc import DEFAULT_BATCH, MAX_SAMPLES, SHARE_BLOCK, AutoSamples, MaskMode, mc_predict, require_dropout
from .dupes import duplicate_summary, exact_duplicates
from .imagecache import release
from .model import MCDropoutNet, ModelSpec, model_from_spec
from .progress import NullProgress, Progress

if TYPE_CHECKING:
    from .cluster import ClusterConfig
    from .config import TrainConfig
    from .train import TrainResult

SCORE_COLUMNS = (
    "split", "index", "fold", "label", "pred", "p_label",
    "entropy", "expected_entropy", "mutual_info", "variation_ratio", "mean_std", "margin",
)
FLAG_COLUMNS = ("mislabel_score", "flag", "suggested_label", "reason", "cl_issue", "outlier_score")


@dataclass(frozen=True)
class ScoreResult:
    scores: pd.DataFrame  # one row per image, SCORE_COLUMNS (+ flags, + path)
    probs: np.ndarray  # (N, C), aligned with scores
    seconds: float
    device: str
    workers: str = "in-process"  # or "2 workers of a local Dask cluster", ...

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


def stream_seed(seed: int, split: str, fold: int) -> int:
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
    masks: MaskMode = "shared",
    device: str = "cpu",
    train_folds: list[tuple[MCDropoutNet, np.ndarray]] | None = None,
    progress: Progress | None = None,
    auto: AutoSamples | None = None,
    more_folds: list[list[tuple[MCDropoutNet, np.ndarray]]] | None = None,
) -> ScoreResult:
    """Score every image of ``splits`` with T = ``samples`` MC-dropout passes (with
    ``auto``, as many as each image needs: :class:`~audit.mc.AutoSamples`).

    With ``train_folds`` — (model, training indices it did not see) pairs — each of
    those training images is scored by its fold's model (out of sample) and gets that
    fold's number in the ``fold`` column; every other image is scored by ``model``
    (``fold`` -1). Then (but with ``auto``) the validation images are scored by every
    model that did not see them, pooled (:func:`pool_unseen`), and with ``more_folds``
    (further partitions' fold models) so are the training images.
    """
    progress = progress or NullProgress()
    check_fits(model, dataset)
    dev = get_device(device)
    t0 = time.perf_counter()
    models = {-1: model, **{k: m for k, (m, _) in enumerate(train_folds or [])}}
    jobs, folds = plan_jobs(dataset, splits, [rows for _, rows in train_folds or []])
    results = {}
    for split, k, rows in jobs:
        s = dataset.split(split)
        whole = len(rows) == len(s)  # skip the gather (a copy of the images) when scoring all
        r = mc_predict(models[k], s.x if whole else s.x[rows], samples=samples, batch_size=batch_size,
                       seed=stream_seed(seed, split, k), masks=masks, device=dev, progress=progress, auto=auto)
        results[(split, k)] = (r.probs, r.columns())
    scores, probs = assemble(dataset, jobs, folds, results)
    if train_folds and auto is None:
        scores, probs = pool_unseen(scores, probs, dataset, [model, *(m for m, _ in train_folds)], samples=samples,
                                    batch_size=batch_size, seed=seed, masks=masks, device=dev, progress=progress,
                                    repeats=[train_folds, *(more_folds or [])])
    return ScoreResult(scores, probs, time.perf_counter() - t0, describe(dev))


# the pooled passes of the models held in memory at once, (rows, models x T, C) float32
POOL_BYTES = 256 << 20


def pool_passes(x: np.ndarray, members, *, n_classes: int, samples: int, batch_size: int, masks: MaskMode, device,
                progress: Progress | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Images ``x`` scored by several models each, their passes pooled.

    ``members``: for each model an image gets, a list of (model, rows, mask seed) that
    covers every row once (the run's model over all rows, or a partition's fold models
    over their folds). Each model scores its rows as it would alone (the same mask
    stream and positions), T passes each; the M x T passes of an image are pooled into
    one predictive distribution, every score (and its jackknife standard error, over the
    pooled passes) is computed from it, and ``disagreement`` is the models' generalized
    Jensen-Shannon divergence (:func:`~audit.metrics.disagreement`). Returns the (N, C)
    pooled means and the columns."""
    n, m = len(x), len(members)
    chunk = max(SHARE_BLOCK, POOL_BYTES // (m * samples * n_classes * 4) // SHARE_BLOCK * SHARE_BLOCK)
    pooled = np.empty((n, n_classes), np.float32)
    cols = {name: np.empty(n, np.float32) for name in (*metrics.SCORE_COLUMNS, "disagreement")}
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        passes = []
        for parts in members:
            mc = np.empty((b - a, samples, n_classes), np.float32)
            for model, rows, seed in parts:
                lo, hi = np.searchsorted(rows, [a, b])
                if lo < hi:
                    mc[rows[lo:hi] - a] = mc_predict(
                        model, x[rows[lo:hi]], samples=samples, batch_size=batch_size, seed=seed, masks=masks,
                        device=device, return_mc=True, offset=int(lo), progress=progress).mc_probs
            passes.append(mc)
        every = metrics.all_scores(np.concatenate(passes, axis=1))
        pooled[a:b] = every.pop("probs")
        for name, v in every.items():
            cols[name][a:b] = v
        cols["disagreement"][a:b] = metrics.disagreement(np.stack([p.mean(axis=1) for p in passes], axis=1))
    return pooled, cols


def pool_unseen(scores: pd.DataFrame, probs: np.ndarray, dataset: Dataset, models: list[MCDropoutNet], *,
                samples: int, batch_size: int, seed: int, masks: MaskMode, device, progress: Progress | None = None,
                repeats: list[list[tuple[MCDropoutNet, np.ndarray]]] | None = None
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """Images scored by every model that did not see them, their passes pooled
    (:func:`pool_passes`): the validation images by the run's own model
    (``models[0]``) and each fold model; with ``repeats`` (the fold models of each K-fold
    partition, [repeat][k] -> (model, held-out rows)), the training images by one model of
    each partition. Each model's passes on an image are the ones it gives scoring alone
    (the same mask streams: the unpooled scores are a single model's exactly). Adds
    ``models`` (how many were pooled; 1 for images scored by one) and ``disagreement``
    (empty there) to ``scores``."""
    scores, probs = scores.copy(), probs.copy()
    scores["models"] = np.int32(1)
    scores["disagreement"] = np.nan
    todo = {}
    if models and (scores["split"] == "valid").any():
        todo["valid"] = [[(model, np.arange(len(dataset.valid)), stream_seed(seed, "valid", k - 1))]
                         for k, model in enumerate(models)]
    if repeats and len(repeats) > 1 and (scores["split"] == "train").any():
        folds = len(repeats[0])
        todo["train"] = [[(model, rows, stream_seed(seed, "train", k + folds * r)) for k, (model, rows) in
                          enumerate(partition)] for r, partition in enumerate(repeats)]
    for split, members in todo.items():
        s = dataset.split(split)
        rows = np.flatnonzero((scores["split"] == split).to_numpy())
        pooled, cols = pool_passes(s.x, members, n_classes=dataset.n_classes, samples=samples,
                                   batch_size=batch_size, masks=masks, device=device, progress=progress)
        probs[rows] = pooled
        scores.loc[rows, "models"] = len(members)
        for name, v in cols.items():
            scores.loc[rows, name] = v
        scores.loc[rows, "pred"] = metrics.pred(pooled).astype(np.int32)
        scores.loc[rows, "p_label"] = metrics.p_label(pooled, s.y)
        scores.loc[rows, "margin"] = metrics.margin(pooled, s.y)
    return scores, probs


def check_fits(model: MCDropoutNet, dataset: Dataset) -> None:
    if model.spec.n_classes != dataset.n_classes or tuple(model.spec.image_shape) != dataset.image_shape:
        raise AuditError(
            f"the model expects {model.spec.n_classes} classes of {model.spec.image_shape} images; "
            f"the data has {dataset.n_classes} classes of {dataset.image_shape}"
        )


def plan_jobs(dataset: Dataset, splits, fold_rows: list[np.ndarray]):
    """What to score with which model: [(split, fold k or -1, rows)], and each split's
    (N,) fold column. Training rows held out of fold k go to fold k's model, the rest to
    the run's own (-1)."""
    jobs, folds = [], {}
    for split in splits:
        fold = np.full(len(dataset.split(split)), -1, np.int32)
        if split == "train":
            for k, rows in enumerate(fold_rows):
                fold[rows] = k
                jobs.append((split, k, np.asarray(rows)))
        rest = np.flatnonzero(fold == -1)
        if len(rest):
            jobs.append((split, -1, rest))
        folds[split] = fold
    return jobs, folds


def assemble(dataset: Dataset, jobs, folds: dict, results: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """scores.csv's rows and the (N, C) means, from each job's (probs, scores)."""
    frames, all_probs = [], []
    # the columns every job has: the scores (and passes); the scores alone where nothing was scored
    first = next(iter(results.values()), (None, {k: np.empty(0, np.float32) for k in metrics.SCORE_COLUMNS}))[1]
    for split, fold in folds.items():
        s = dataset.split(split)
        probs = np.empty((len(s), dataset.n_classes), np.float32)
        cols = {k: np.empty(len(s), v.dtype) for k, v in first.items()}
        for js, k, rows in jobs:
            if js != split:
                continue
            p, c = results[(split, k)]
            probs[rows] = p
            for name in cols:
                cols[name][rows] = c[name]
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
    return pd.concat(frames, ignore_index=True), np.concatenate(all_probs)


# images per Dask piece, in batches, rounded up to whole groups of shared masks: pieces
# start on group boundaries, so every image is scored in the same group as in-process,
# and with the masks of its position
PIECE_BATCHES = 8


def score_on_cluster(client, store: runs.RunStore, dataset: Dataset, jobs, folds: dict, config: "ScoreConfig",
                     model_names: dict[int, str], progress: Progress,
                     device: str = "cpu") -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`score_dataset`'s work as Dask pieces: each worker loads the run's data and
    model itself and scores a slice of a job's rows (on ``device``: cpu, or its GPU); the
    same numbers as in-process on that device."""
    from .cluster import run_pieces

    step = PIECE_BATCHES * config.batch_size
    if config.masks == "shared":
        step = -(-step // SHARE_BLOCK) * SHARE_BLOCK  # whole groups of shared masks
    pieces, where = [], []
    for split, k, rows in jobs:
        for a in range(0, len(rows), step):
            pieces.append((str(store.path.resolve()), model_names[k], split, rows[a:a + step], a, config.samples,
                           config.batch_size, stream_seed(config.seed, split, k), config.masks, config.tolerance,
                           image_ref(dataset, split), device))
            where.append((split, k, a))
    names = {n: np.float32 for n in metrics.SCORE_COLUMNS} | ({"passes": np.int32} if config.tolerance else {})
    out = {(split, k): (np.empty((len(rows), dataset.n_classes), np.float32),
                        {n: np.empty(len(rows), t) for n, t in names.items()}) for split, k, rows in jobs}
    progress.start(f"score {sum(len(r) for *_, r in jobs):,} images x {'up to ' if config.tolerance else ''}"
                   f"{config.samples} passes in {len(pieces)} pieces",
                   len(pieces))

    t0, scored = time.perf_counter(), [0]

    def done(i, result):
        split, k, a = where[i]
        probs, cols = result
        p, c = out[(split, k)]
        p[a:a + len(probs)] = probs
        for name in c:
            c[name][a:a + len(probs)] = cols[name]
        scored[0] += len(probs)
        progress.advance(1, ips=scored[0] / max(time.perf_counter() - t0, 1e-9))

    run_pieces(client, score_piece, pieces, on_done=done)
    progress.close()
    return assemble(dataset, jobs, folds, out)


_CACHE: dict = {}  # on a worker: the run's dataset and models, loaded once per process


def _worker_dataset(store: runs.RunStore) -> Dataset:
    """The run's dataset on a worker, loaded (and checked) once per process."""
    key = ("data", store.meta().fingerprint)
    if key not in _CACHE:
        _CACHE[key] = store.dataset()
    return _CACHE[key]


def _source_dataset(source: dict) -> Dataset:
    """The dataset a data block names, on a worker: loaded once per process, and
    checked to be the data the client loaded (its fingerprint)."""
    key = ("data", source["fingerprint"])
    if key not in _CACHE:
        dataset = runs.load_source(source)
        if dataset.fingerprint != source["fingerprint"]:
            raise AuditError(f"{source['data']}: not the data the command loaded (fingerprint "
                             f"{dataset.fingerprint[:12]}, expected {source['fingerprint'][:12]}); has it changed?")
        _CACHE[key] = dataset
    return _CACHE[key]


def image_ref(dataset: Dataset, split: str) -> tuple[str, str, int] | None:
    """(cache folder, key, the split's first row) where ``dataset``'s images are mapped
    from an image cache, so a worker reads its rows without loading the data; or None."""
    m = dataset.mapped
    return None if m is None else (m["folder"], m["key"], int(m["start"][split]))


def score_piece(run: str, model_name: str, split: str, rows: np.ndarray, offset: int, samples: int,
                batch_size: int, seed: int, masks: str = "shared", tolerance: float | None = None,
                images_at: tuple[str, str, int] | None = None, device: str = "cpu"):
    """On a worker: MC-score ``rows`` of ``split`` (positions ``offset``.. of their job).
    ``images_at``: :func:`image_ref`, the image cache to read the rows from where this
    worker can map it (no data to load); else the worker loads the run's data."""
    from .imagecache import mapped

    store = runs.RunStore(run)
    meta = store.meta()
    key = (run, meta.fingerprint, model_name, meta.files.get(model_name, {}).get("sha256"))
    if key not in _CACHE:
        _CACHE[key] = store.load_model(model_name)
    x = None if images_at is None else mapped(images_at[0], images_at[1])
    if x is not None:
        rows = images_at[2] + np.asarray(rows)
    else:
        x = _worker_dataset(store).split(split).x
    auto = None if tolerance is None else AutoSamples(tolerance=tolerance, cap=samples)
    images = x[rows]
    release(x)  # a mapped image cache: the worker's memory stays that of one piece, whatever N
    r = mc_predict(_CACHE[key], images, samples=samples, batch_size=batch_size, seed=seed, workers=1,
                   offset=offset, masks=masks, auto=auto, device=device)
    return r.probs, r.columns()


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of :func:`score_run`; recorded in run.json's ``score``.

    samples: T, MC passes per image (with ``tolerance``, the most an image gets: passes
    are added until its scores' standard errors are within it, :class:`~audit.mc.AutoSamples`).
    folds: K >= 2 scores training images out of sample with K fold models (0: none).
    The rest as in :func:`score_dataset`."""

    samples: int = 50  # the origin's T
    splits: tuple[str, ...] = SPLITS
    batch_size: int = DEFAULT_BATCH
    seed: int = 0
    folds: int = 0
    # more K-fold partitions of the training images, each its own K models: a training
    # image is scored by one model of each, their passes pooled (1: one partition)
    fold_repeats: int = 1
    # "shared": each group of mc.SHARE_BLOCK images shares each pass's masks (the kept-units
    # engine); "independent": every image its own (the dense engine, the origin's; runs made
    # before this option were scored so)
    masks: str = "shared"
    # data checks beyond labels (audit.datachecks): near-duplicates at this correlation,
    # outliers at this robust z-score
    near_threshold: float = 0.99
    outlier_z: float = 5.0
    # False (`--no-data-checks`): no exact or near duplicates, outliers or class balance;
    # they hold every image's trunk features in memory, which past millions of images
    # the scoring itself (in pieces, from an image cache) does not need
    data_checks: bool = True
    # `--samples auto`: the standard error each image's entropy and mutual information
    # must reach (None: every image gets `samples` passes)
    tolerance: float | None = None

    def __post_init__(self) -> None:
        from .datachecks import check_threshold, check_z
        from .train import check_int

        object.__setattr__(self, "splits", parse_splits(self.splits))
        self.auto()  # with a tolerance: checks it and the cap, named as --tolerance and --max-samples
        check_int("samples", self.samples, 1, MAX_SAMPLES)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("seed", self.seed, 0)
        check_int("folds", self.folds, 0)
        if self.masks not in ("shared", "independent"):
            raise bad_param("masks", f"expected shared or independent, got {self.masks!r}")
        if self.folds == 1:
            raise bad_param("folds", "expected at least 2 folds (or 0 for none), got 1")
        if self.folds and "train" not in self.splits:
            raise bad_param("folds", f"{self.folds} fold models score the training images out of sample (and fit the "
                            "calibration temperature on them), but --splits has no train")
        check_int("fold_repeats", self.fold_repeats, 1, 20)
        if self.fold_repeats > 1 and not self.folds:
            raise bad_param("fold_repeats", f"{self.fold_repeats} repeats of the fold partition need --folds K")
        if self.fold_repeats > 1 and self.tolerance is not None:
            raise bad_param("fold_repeats", "pools fixed passes of several models; --samples auto gives each image "
                            "its own number: give --samples a number")
        check_threshold(self.near_threshold)
        check_z(self.outlier_z)
        if self.tolerance is not None and self.masks != "shared":
            raise bad_param("samples", "auto needs --masks shared (the passes are added a group at a time)")

    def auto(self) -> AutoSamples | None:
        return None if self.tolerance is None else AutoSamples(tolerance=self.tolerance, cap=self.samples)


# Past this (and mc.MAX_SAMPLES), one batch's (B, T, 1000) activations alone exceed any
# machine's memory: a typo (an extra zero or three), not a setting.
MAX_BATCH = 1_000_000


@dataclass(frozen=True)
class NewRun:
    """A run not yet trained, whose model :func:`fold_models` trains on the cluster
    beside the folds: its data block (:func:`runs.data_source`), its settings, and
    ``publish(result)``, which writes it (:func:`audit.train.write_run`)."""

    source: dict
    config: "TrainConfig"
    publish: Callable[["TrainResult"], None]


def fold_models(
    store: runs.RunStore,
    dataset: Dataset,
    folds: int,
    *,
    repeats: int = 1,
    device: str = "cpu",
    client=None,
    progress: Progress | None = None,
    new_run: NewRun | None = None,
) -> list[list[tuple[MCDropoutNet, np.ndarray]]]:
    """K models, each trained without one fold of the run's training images, for each
    of ``repeats`` partitions: [repeat][k] -> (model, the training indices it did not see).

    The folds are a seeded permutation of the run's training indices cut into K
    parts (repeat 0 the same as without repeats, each further repeat its own
    permutation); models are kept in RUN/folds/K-k/model.npz (K-k-rR/ for repeat R; each
    fold its own commit, so an interrupted run keeps the folds it finished) and reused
    while the run's data and settings are unchanged. With a Dask ``client`` the
    trainings run as pieces on its workers (each fold's weights come back and are
    committed here), and with ``new_run`` (a run not written yet, for the client only)
    the run's own model is one more piece, trained beside the folds and published
    before their commits. The caller holds the run's lock.
    """
    from .train import stored_train_config, train

    progress = progress or NullProgress()
    if new_run is not None and client is None:
        raise ValueError("new_run: the run's model is trained beside the folds only on a cluster")
    if new_run is None:
        meta = store.meta()
        config, run_config = stored_train_config(meta.config, str(store.path / runs.RUN_JSON)), meta.config
        base = store.subset()
        base = np.arange(len(dataset.train)) if base is None else base
    else:
        config, run_config, base = new_run.config, asdict(new_run.config), np.arange(len(dataset.train))
    if folds > len(base):
        raise bad_param("folds", f"{folds} folds but only {len(base)} training images")
    all_parts = [[np.sort(p) for p in np.array_split(
        np.random.default_rng([config.seed, folds] + ([r] if r else [])).permutation(base), folds)]
        for r in range(repeats)]
    keys = [[{"fingerprint": dataset.fingerprint, "config": run_config, "n_held_out": int(len(p))} for p in parts]
            for parts in all_parts]
    todo = [(r, k) for r in range(repeats) for k in range(folds)
            if new_run is not None or not (store.meta().folds.get(runs.fold_key(folds, k, r)) == keys[r][k]
                                           and store.has(runs.fold_model(folds, k, r)))]

    def commit(r: int, k: int, weights: bytes, summary: str) -> None:
        meta = store.meta()
        with store.transaction() as txn:
            txn.write_bytes(runs.fold_model(folds, k, r), weights)
            txn.commit(meta.evolve(folds=dict(sorted({**meta.folds, runs.fold_key(folds, k, r): keys[r][k]}.items()))))
        progress.close(summary)

    def fold_config(r: int, k: int):
        return replace(config, seed=config.seed + 1 + k + folds * r)  # each fold its own initialisation

    def name(r: int, k: int) -> str:
        return f"fold {k + 1}/{folds}" + (f" of repeat {r + 1}/{repeats}" if repeats > 1 else "")

    if client is not None and todo:
        from .cluster import run_pieces

        run, source = str(store.path.resolve()), None if new_run is None else new_run.source
        pieces = [(run, asdict(fold_config(r, k)), np.setdiff1d(base, all_parts[r][k]), device, source)
                  for r, k in todo]
        if new_run is not None:  # the largest piece first
            pieces.insert(0, (run, run_config, None, device, source))
            todo.insert(0, None)
        waiting: list = []  # folds done before the run's model is published: their commits need its run.json
        published = [new_run is None]

        def done(i: int, res) -> None:
            weights, spec, result = res
            if todo[i] is None:
                new_run.publish(replace(result, model=runs.load_weights(
                    model_from_spec(ModelSpec.from_json(spec)), weights, f"{store.path / runs.MODEL} (from a worker)")))
                progress.close(f"the run's model: trained on {result.n_train:,} images in {result.seconds:.1f} s on a "
                               f"worker; validation accuracy {result.valid_accuracy:.4f}")
                published[0] = True
                for j, later in waiting:
                    done(j, later)
                return
            if not published[0]:
                waiting.append((i, res))
                return
            r, k = todo[i]
            commit(r, k, weights, f"{name(r, k)}: trained on {result.n_train:,} images in {result.seconds:.1f} s on a "
                                  f"worker, {len(all_parts[r][k]):,} held out; validation accuracy "
                                  f"{result.valid_accuracy:.4f}")

        run_pieces(client, train_piece, pieces, on_done=done)
    else:
        for r, k in todo:
            result = train(dataset, fold_config(r, k), subset=np.setdiff1d(base, all_parts[r][k]), device=device,
                           progress=progress)
            commit(r, k, runs.model_bytes(result.model),
                   f"{name(r, k)}: trained on {result.n_train:,} images in {result.seconds:.1f} s, "
                   f"{len(all_parts[r][k]):,} held out; validation accuracy {result.valid_accuracy:.4f}")
    return [[(store.load_model(runs.fold_model(folds, k, r)), all_parts[r][k]) for k in range(folds)]
            for r in range(repeats)]


def train_piece(run: str, config: dict, subset: np.ndarray | None, device: str = "cpu", source: dict | None = None):
    """On a worker: train a model on the run's data (with ``source``, a run not written
    yet: on the data its block names); (npz weights, the model's spec as JSON, the
    TrainResult without its model)."""
    from .config import TrainConfig
    from .train import train

    dataset = _worker_dataset(runs.RunStore(run)) if source is None else _source_dataset(source)
    result = train(dataset, TrainConfig(**config), subset=subset, device=device)
    return runs.model_bytes(result.model), result.model.spec.to_json(), replace(result, model=None)


def score_run(
    run: str | os.PathLike = "runs/default",
    config: ScoreConfig = ScoreConfig(),
    *,
    flags: FlagConfig = FlagConfig(),
    device: str = "cpu",
    data: str = "mnist",
    data_dir: str | None = None,
    cluster: "ClusterConfig | None" = None,
    progress: Progress | None = None,
    image_size: tuple[int, int] | None = None,
) -> ScoreResult:
    """Score the run's data with its model; write scores.csv and mc_summary.npz (one commit).

    A run with no model is trained first with the default settings on ``data``. With
    ``config.folds`` K >= 2, training images are scored out of sample by K fold models.
    Flags (see :mod:`audit.flags`) are added with ``flags``. Returns the scores as a
    DataFrame (see :class:`ScoreResult`). ``cluster``: fold trainings and scoring blocks
    on Dask (:mod:`audit.cluster`), with the same bytes out as in-process.
    """
    from .cluster import ClusterConfig, connect, n_workers, worker_device
    from .train import TrainConfig, train_into, trunk_features

    cluster = cluster or ClusterConfig()
    store = runs.RunStore(run)
    get_device(device)
    wdev = worker_device(cluster, device)
    new_run = None
    with store.writing(), contextlib.ExitStack() as on_cluster:
        client = on_cluster.enter_context(connect(cluster, wdev))
        if not store.exists() or not store.has(runs.MODEL):
            if store.exists() and store.meta().command == "acquire":
                raise AuditError(f"--run: {store.path} is an `audit acquire` run (learning curves, no model to "
                                 "score); expected a run made by `audit train`")
            if not store.is_free():
                have = f"{runs.RUN_JSON} but no {runs.MODEL}" if store.exists() else \
                    f"files but no {runs.MODEL} and {runs.RUN_JSON}"
                raise AuditError(f"--run: {store.path} has {have}; not a trained run folder")
            if client is not None and config.folds and "train" in config.splits:
                new_run = start_run(store, data, data_dir, image_size, progress)
            else:
                train_into(store, data=data, data_dir=data_dir, config=TrainConfig(), device=device, progress=progress,
                           image_size=image_size)
        elif image_size is not None and list(image_size) != store.meta().data.get("image_size"):
            raise AuditError(f"--image-size: {store.path} is trained already, on its data at the size it records; "
                             "--image-size applies when `audit score` trains a new run", usage=True)
        t0 = time.perf_counter()
        if new_run is not None:  # the run's model trained on the cluster beside the folds, published first
            dataset = new_run[0]
            repeated = fold_models(store, dataset, config.folds, repeats=config.fold_repeats, device=wdev,
                                   client=client, progress=progress, new_run=new_run[1])
        model = store.load_model()
        require_dropout(model)
        if new_run is None:
            dataset = store.dataset(data_dir=data_dir, progress=progress)
            t0 = time.perf_counter()
            repeated = (
                fold_models(store, dataset, config.folds, repeats=config.fold_repeats, device=wdev, client=client,
                            progress=progress)
                if config.folds and "train" in config.splits else None
            )
        train_folds, more_folds = (repeated[0], repeated[1:]) if repeated else (None, None)
        fold_seconds = time.perf_counter() - t0
        if client is None:
            result = score_dataset(
                model, dataset, splits=config.splits, samples=config.samples, batch_size=config.batch_size,
                seed=config.seed, masks=config.masks, device=device, train_folds=train_folds, progress=progress,
                auto=config.auto(), more_folds=more_folds,
            )
        else:
            check_fits(model, dataset)
            t1 = time.perf_counter()
            jobs, folds = plan_jobs(dataset, config.splits, [rows for _, rows in train_folds or []])
            names = {-1: runs.MODEL, **{k: runs.fold_model(config.folds, k) for k in range(config.folds)}}
            scores, probs = score_on_cluster(client, store, dataset, jobs, folds, config, names,
                                             progress or NullProgress(), wdev)
            if train_folds and config.tolerance is None:
                # pooling is scored here, in-process: the same numbers as without Dask
                scores, probs = pool_unseen(scores, probs, dataset, [model, *(m for m, _ in train_folds)],
                                            samples=config.samples, batch_size=config.batch_size, seed=config.seed,
                                            masks=config.masks, device=get_device(device), progress=progress,
                                            repeats=repeated)
            result = ScoreResult(scores, probs, time.perf_counter() - t1, wdev)
        result = replace(result, workers=cluster.describe(n_workers(client)))
        on_cluster.close()  # the rest runs here, with the workers' processes and memory given back
        t1 = time.perf_counter()
        features = {name: trunk_features(model, dataset.split(name).x, device=device, progress=progress)
                    for name in config.splits  # for calibration's deterministic network and the data checks
                    if config.data_checks or name == "valid"}
        features_seconds = round(time.perf_counter() - t1, 3)
        cal = calibration_summary(model, dataset, result, train_folds is not None, device, features.get("valid"))
        # cleanlab judges the probabilities the flags are decided on, and with --flag-rule cleanlab decides them
        decided_on = flag_probs(result.probs, cal)
        confident, scores = confident_summary(result.scores, decided_on, dataset.class_names,
                                              train_folds is not None, temperature(cal))
        scores = flag_issues(scores, decided_on, class_names=dataset.class_names, config=flags)
        result = replace(result, scores=order_columns(scores))
        meta = store.meta()
        summary = {
            "created": runs.now(),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
            "device": result.device,
            "workers": result.workers,
            "seconds": round(result.seconds, 3),
            "fold_training_seconds": round(fold_seconds, 3) if config.folds else 0,
            "n_scored": int(len(result.scores)),
            "accuracy": result.accuracy,
            "mean_entropy": float(result.scores["entropy"].mean()),
        }
        if config.tolerance is not None:
            summary["mean_passes"] = round(float(result.scores["passes"].mean()), 3)
        if train_folds:
            summary["ensemble"] = ensemble_summary(result.scores, config)
        summary["features_seconds"] = features_seconds
        if cal:
            summary["calibration"] = cal
        if confident:
            summary["confident_learning"] = confident
        tables = {}
        if config.data_checks:
            dupes = exact_duplicates({name: (dataset.split(name).x, dataset.split(name).paths)
                                      for name in config.splits})
            summary["duplicates"] = duplicate_summary(dupes)
            t2 = time.perf_counter()
            turned = turned_check(model, dataset, config.splits, features, device, progress)
            checks, near, outliers, scores = data_checks(dataset, result.scores, config, features, turned)
            checks["seconds"] = round(checks["seconds"] + time.perf_counter() - t2, 3)
            result = replace(result, scores=scores)
            summary["data_checks"] = checks
            tables = {runs.DUPLICATES: dupes, runs.NEAR_DUPLICATES: near, runs.OUTLIERS: outliers}
        with store.transaction() as txn:
            write_scores(txn, result.scores, result.probs, dataset.class_names)
            for name in (runs.DUPLICATES, runs.NEAR_DUPLICATES, runs.OUTLIERS):
                if name in tables:
                    txn.write_csv(name, tables[name])
                else:  # not looked for this time: an earlier score's lists would be stale
                    txn.delete(name)
            txn.commit(meta.evolve(score=summary, flags=flag_summary(result.scores, decided_on, flags,
                                                                     temperature(cal)),
                                   versions=runs.versions()))
    return result


def start_run(store: runs.RunStore, data: str, data_dir: str | None, image_size: tuple[int, int] | None,
              progress: Progress | None) -> tuple[Dataset, NewRun]:
    """For ``audit score --folds K`` on a cluster from an empty folder: the data loaded
    here, and the run (default settings) whose model the workers train beside the folds."""
    from .config import TrainConfig
    from .train import new_run_data, write_run

    dataset, source = new_run_data(store, data, data_dir, image_size, progress)
    config = TrainConfig()
    return dataset, NewRun(source, config, lambda result: write_run(store, source, config=config, result=result))


def ensemble_summary(scores: pd.DataFrame, config: "ScoreConfig") -> dict:
    """run.json's ``score.ensemble``: per split, how many models' passes --folds pooled
    (and --fold-repeats for the training images), and their mean disagreement."""
    if config.tolerance is not None:
        return {"skipped": "--samples auto scores each image with one model: the validation images by the run's"}
    out = {}
    for split in config.splits:
        rows = scores[scores["split"] == split]
        if len(rows) and int(rows["models"].iloc[0]) > 1:
            m = int(rows["models"].iloc[0])
            out[split] = {"models": m, "passes": m * config.samples,
                          "mean_disagreement": round(float(rows["disagreement"].mean()), 6)}
    return out


def turned_check(model, dataset: Dataset, names, features: dict[str, np.ndarray], device: str,
                 progress: Progress | None) -> np.ndarray:
    """Each image of the splits ``names`` (in that order): its probability of not being
    upright (:func:`audit.datachecks.turned_probability`), from the trunk's ``features``
    and those of a sample's turned copies, computed here."""
    from . import datachecks as dc
    from .train import trunk_features

    labels = np.concatenate([np.asarray(dataset.split(n).y, np.int64) for n in names])
    sample = dc.turn_sample(labels)
    x = dc.rows_of([dataset.split(n).x for n in names], sample)
    taught = {k: trunk_features(model, dc.turned(x, k), device=device, progress=progress)
              for k in dc.quarter_turns(x.shape)}
    return dc.turned_probability([features[n] for n in names], labels, sample, taught)


def data_checks(dataset: Dataset, scores: pd.DataFrame, config: ScoreConfig, features: dict[str, np.ndarray],
                turned: np.ndarray | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Near-duplicates (leakage across the splits among them), outliers and class
    imbalance of the scored splits (:mod:`audit.datachecks`): run.json's counts, the
    near-duplicate pairs, the outliers (most unlike first: at or above
    ``config.outlier_z``, or turned, or unlike their class's shapes), and ``scores`` with
    each image's ``outlier_score``. ``features``: the trunk's output for each scored split;
    ``turned``: :func:`turned_check`'s probabilities."""
    from . import datachecks as dc

    t0 = time.perf_counter()
    splits = {name: (dataset.split(name).x, dataset.split(name).paths) for name in config.splits}
    images = dc.Images(splits)
    near = dc.near_duplicates(splits, threshold=config.near_threshold, images=images)
    o = dc.outlier_scores(splits, {n: dataset.split(n).y for n in config.splits}, features, images=images,
                          turned=turned)
    scores = scores.merge(o[["split", "index", "outlier_score"]], on=["split", "index"], how="left", validate="1:1")
    is_turned = dc.is_turned(o["turned"], o["turned_gain"])
    odd_shape = (o["shape_z"] >= dc.SHAPE_Z).to_numpy()
    flagged = o[(o["outlier_score"] >= config.outlier_z).to_numpy() | is_turned | odd_shape].sort_values(
        "outlier_score", ascending=False, kind="stable")
    flagged = flagged.assign(label=[dataset.class_names[i] for i in flagged["label"]])
    pairs = near.drop_duplicates("pair")
    checks = {
        "seconds": round(time.perf_counter() - t0, 3),
        "near_duplicates": {"threshold": config.near_threshold, "pairs": int(len(pairs)),
                            **{k: int((pairs["kind"] == k).sum()) for k in dc.KINDS}},
        "outliers": {"z": config.outlier_z, "flagged": int(len(flagged)), "turned_p": dc.TURNED_P,
                     "turn_gain": dc.TURN_GAIN, "turned": int(is_turned.sum()), "shape_z": dc.SHAPE_Z,
                     "odd_shape": int(odd_shape.sum()),
                     **{n: int((flagged["split"] == n).sum()) for n in config.splits}},
        "imbalance": dc.imbalance({n: dataset.split(n).y for n in config.splits}, dataset.class_names),
    }
    return checks, near, flagged.reset_index(drop=True), order_columns(scores)


def confident_summary(scores: pd.DataFrame, probs: np.ndarray, class_names, out_of_sample_train: bool,
                      calibrated_at: float | None = None) -> tuple[dict, pd.DataFrame]:
    """cleanlab's confident-learning estimates (:mod:`audit.confident`) for each scored
    split whose probabilities are out of sample: the validation split always (the model
    trained on the training images), the training split with fold models. ``probs``:
    the MC mean, at the fitted temperature ``calibrated_at`` where there is one. Adds the
    column ``cl_issue`` (1: cleanlab's filter calls it a label issue, 0: not; empty for
    rows scored in sample). A split where a class has no images gets the reason instead."""
    from .confident import confident_learning

    out, scores = {}, scores.copy()
    col = np.full(len(scores), np.nan)
    for split in ("train", "valid"):
        rows = (scores["split"] == split).to_numpy()
        if not rows.any() or (split == "train" and not out_of_sample_train):
            continue
        try:
            summary, issues = confident_learning(scores.loc[rows, "label"].to_numpy(), probs[rows], list(class_names))
        except AuditError as e:
            out[split] = {"skipped": str(e)}
            continue
        at = "" if calibrated_at is None else f" at temperature {calibrated_at:.4f}"
        out[split] = {"probabilities": f"MC mean{at}, out of sample" + (" (fold models)" if split == "train" else ""),
                      **summary}
        col[rows] = issues
    if out:
        scores["cl_issue"] = pd.array(np.where(np.isnan(col), pd.NA, col), dtype="Int64")
    return out, scores


def calibration_summary(model, dataset: Dataset, result: "ScoreResult", out_of_sample_train: bool,
                        device: str, features: np.ndarray | None = None) -> dict | None:
    """ECE (15 bins) and NLL on the validation split of the deterministic network, of the
    MC mean, and (when the training images were scored out of sample, by fold models) of
    the MC mean at the temperature fitted on those training scores. None when the
    validation split was not scored. ``features``: the trunk's output for the
    validation split, where it is computed already."""
    from . import calibration as cal
    from .train import head_probs, predict_probs

    scores = result.scores
    valid = (scores["split"] == "valid").to_numpy()
    if not valid.any():
        return None
    y = scores.loc[valid, "label"].to_numpy()
    mc = result.probs[valid]
    rows = scores.loc[valid, "index"].to_numpy()
    det = (predict_probs(model, dataset.valid.x[rows], device=device) if features is None
           else head_probs(model, features[rows], device=device))
    out = {"split": "valid", "bins": cal.BINS,
           "deterministic": {"ece": cal.ece(det, y), "nll": cal.nll(det, y), "bins": cal.reliability(det, y)},
           "mc_mean": {"ece": cal.ece(mc, y), "nll": cal.nll(mc, y), "bins": cal.reliability(mc, y)}}
    train = (scores["split"] == "train").to_numpy()
    if out_of_sample_train and train.any():
        t = cal.fit_temperature(result.probs[train], scores.loc[train, "label"].to_numpy())
        calibrated = cal.with_temperature(mc, t)
        out["calibrated"] = {"temperature": t, "fitted_on": "train, out of sample (fold models)",
                             "ece": cal.ece(calibrated, y), "nll": cal.nll(calibrated, y),
                             "bins": cal.reliability(calibrated, y)}
    return out


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
    numeric = [c for c in columns if c not in ("split", "path", "flag", "reason", "cl_issue")]
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


def temperature(calibration: dict | None) -> float | None:
    """The temperature `audit score` fitted out of sample (run.json's
    ``score.calibration.calibrated``), or None where it fitted none."""
    t = ((calibration or {}).get("calibrated") or {}).get("temperature")
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (np.isfinite(t) and t > 0):
        raise AuditError(f"run.json: field 'score.calibration.calibrated.temperature': expected a positive number, "
                         f"found {t!r}; rerun `audit score`")
    return float(t)


def flag_probs(probs: np.ndarray, calibration: dict | None) -> np.ndarray:
    """What the flags are decided on: the MC mean at the fitted temperature where there
    is one (calibrated, out of sample), else the MC mean."""
    from .calibration import with_temperature

    t = temperature(calibration)
    return probs if t is None else with_temperature(probs, t)


def flag_summary(scores: pd.DataFrame, probs: np.ndarray, config: FlagConfig, calibrated_at: float | None = None
                 ) -> dict:
    """run.json's ``flags``: the settings, the probabilities they were decided on, the
    counts per split and kind, and how many flags ``flag_top`` left out (so a capped
    worklist never looks complete)."""
    from .flags import left_out

    counts = scores.groupby(["split", "flag"]).size()
    return {
        "probabilities": "MC mean" if calibrated_at is None else f"MC mean at temperature {calibrated_at:.4f} (calibrated)",
        "confidence": config.confidence,
        "flag_top": config.flag_top,
        "rule": config.rule,
        "by_cleanlab": sorted(set(scores.loc[scores["cl_issue"].notna(), "split"])) if (
            config.rule == "cleanlab" and "cl_issue" in scores.columns) else [],
        "counts": {f"{s}/{f or 'none'}": int(n) for (s, f), n in counts.items()},
        "left_out": left_out(scores, probs, config),
    }


def flag_run(run: str | os.PathLike = "runs/default", *, flags: FlagConfig = FlagConfig()) -> pd.DataFrame:
    """Recompute the flags of a scored run with other settings, without rescoring (one commit)."""
    store = runs.RunStore(run).require()
    with store.writing():
        header = store.read_bytes(runs.SCORES).split(b"\n", 1)[0].decode(errors="replace").strip().split(",")
        scores = read_scores(store, ("split", "index", "label", "entropy", "expected_entropy", "mutual_info",
                                     *(["cl_issue"] if "cl_issue" in header else [])))
        if "cl_issue" in scores.columns:
            text = scores["cl_issue"].astype(str).str.strip()
            value = pd.to_numeric(text.replace("", np.nan), errors="coerce")
            bad = (text != "") & ~value.isin([0, 1])
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise AuditError(f"{store.path / runs.SCORES}: line {i + 2}: cl_issue {text.iloc[i]!r} is not 1, 0 "
                                 "or empty; rerun `audit score`")
            scores["cl_issue"] = value.astype("Int64")
        if not store.has(runs.MC_SUMMARY):
            raise AuditError(f"--run: {store.path} has no {runs.MC_SUMMARY}; run `audit score --run {store.path}` first")
        z = store.read_npz(runs.MC_SUMMARY)
        if "probs" not in z or "class_names" not in z:
            raise AuditError(f"{store.path / runs.MC_SUMMARY}: expected arrays probs and class_names")
        probs, names = z["probs"], [str(c) for c in z["class_names"]]
        if probs.ndim != 2 or len(probs) != len(scores) or not np.isfinite(probs).all():
            raise AuditError(f"{store.path / runs.MC_SUMMARY}: probs {probs.shape} do not match the "
                             f"{len(scores)} rows of {runs.SCORES}; rerun `audit score`")
        meta = store.meta()
        cal = (meta.score or {}).get("calibration")
        decided_on = flag_probs(probs, cal)
        scores = order_columns(flag_issues(scores, decided_on, class_names=names, config=flags))
        with store.transaction() as txn:
            write_scores(txn, scores, probs, names)
            txn.commit(meta.evolve(flags=flag_summary(scores, decided_on, flags, temperature(cal))))
    return scores
