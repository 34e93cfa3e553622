"""Active-learning loops: acquire images by an MC-dropout strategy, retrain, repeat.

Gal, Islam & Ghahramani 2017's protocol: start from a class-balanced labelled set,
and each round retrain from scratch on the labelled set, score the pool (or a random
subset of it) with MC dropout, acquire ``step`` images, and evaluate on the validation
set. Labels come from the dataset itself (a simulated oracle); the acquired indices of
each round are recorded, so a real labelling tool could take the oracle's place.

Several strategies in one call share, per repeat, the initial set and every seed, so
their curves compare. Those depend only on the seed and the repeat's number, so
repeats split over several runs (``first_repeat``) give the curves one run would.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from . import runs
from .acquire import BETA, STRATEGIES, acquire, from_scores, parse_strategy, random_batch
from .data import Dataset, Split, load_dataset
from .device import get_device
from .errors import AuditError, bad_param
from .mc import MAX_SAMPLES, mc_predict, require_dropout
from .progress import NullProgress, Progress
from .train import TrainConfig, check_int, check_run_free, train

from .alstate import _differing, go_on_from, read_results, resumable, stored_config
from .curves import CURVE_COLUMNS, reach_table, reached


if TYPE_CHECKING:
    from .cluster import ClusterConfig

# How `audit acquire` trains each round: Gal et al.'s CNN and 50 epochs, with the step size,
# batch and batching chosen on a validation split carved from MNIST's training images
# (bench/recipe.py; bench/README.md): batches of 32, Adam's step size falling from its peak
# to 0 along half a cosine, near-equal batches. Their code: batch 128, a constant 1e-3.
AL_TRAIN = TrainConfig(model="gal", epochs=50, batch_size=32, lr=5e-3, schedule="cosine", even_batches=True)
# Gal et al.'s code, for reproductions (bench/al_mnist.py's default)
PAPER_TRAIN = replace(AL_TRAIN, batch_size=128, lr=1e-3, schedule="constant", even_batches=False)
# The BatchBALD paper's code (Kirsch et al. 2019): their CNN, Adam at 1e-3, batches of 64,
# "epochs" of 5,056 images drawn with replacement, at most 30, early stopping with patience
# 3 on 1,024 images carved from the training images (ALConfig.valid_size), best weights restored
BATCHBALD_TRAIN = TrainConfig(model="batchbald", epochs=30, batch_size=64, lr=1e-3, schedule="constant",
                              even_batches=False, epoch_samples=5056, patience=3)

# `audit acquire --recipe NAME`: how each round trains, and the early-stopping split it needs
RECIPES = {
    "gal": (AL_TRAIN, None),
    "batchbald": (BATCHBALD_TRAIN, 1024),
}


def recipe_config(name: str, *, valid_size: int | None = None, **overrides) -> tuple[TrainConfig, int | None]:
    """(training settings, early-stopping split size) of recipe ``name`` with the
    options a user set (None: the recipe's). ``epoch_samples`` 0: one pass over the
    images per epoch; ``valid_size`` 0: no split, so no early stopping."""
    if name not in RECIPES:
        raise bad_param("recipe", f"expected one of {', '.join(RECIPES)}, got {name!r}")
    train, held = RECIPES[name]
    set_ = {k: v for k, v in overrides.items() if v is not None}
    if set_.get("epoch_samples") == 0:
        set_["epoch_samples"] = None
    if set_.get("patience") == 0:
        raise bad_param("patience", "expected at least 1 epoch without improvement before stopping, got 0; to "
                        "train every epoch without early stopping pass --valid-size 0")
    if valid_size is not None:
        held = valid_size or None
        if held is None:
            set_["patience"] = None
    return replace(train, **set_), held


@dataclass(frozen=True)
class ALConfig:
    """Settings of an active-learning experiment; the defaults follow Gal et al. 2017
    where they said (20 balanced, 10 per round, their CNN, 50 epochs, Adam, weight
    decay 3.5/N) but for how each round trains (``train``, :data:`AL_TRAIN`): batches of
    32 and Adam's step size falling from 5e-3 to 0 along a cosine, in near-equal
    batches, chosen on a validation split carved from MNIST's training images
    (bench/recipe.py: 85.4% / 93.2% / 94.2% at 100 / 300 / 500 labelled images, against
    77.9% / 90.6% / 92.3% with their code's batch 128 at a constant 1e-3)."""

    strategies: tuple[str, ...] = ("bald", "random")
    initial: int = 20
    step: int = 10
    rounds: int = 10  # acquisitions; the curve has rounds + 1 points
    samples: int = 100  # MC passes per pool image (the paper's code: 100 dropout iterations)
    pool_subset: int | None = 2000  # score a random subset of the pool each round (None: all)
    repeats: int = 1
    first_repeat: int = 0  # number the repeats from here: repeat k has the same start and seeds in any run
    seed: int = 0
    train: TrainConfig = AL_TRAIN  # how each round trains (its seed and weight decay are set per round)
    weight_decay: float | None = None  # None: the paper's 2 * 3.5 / n_labelled for gal, 0 for origin
    batchbald_samples: int = 2000  # sampled label configurations once the exact joint is too big
    stop_error: float | None = None  # end a strategy's repeat once its validation error is at most this
    beta: float = BETA  # power/softmax sampling's exponent (powerbald, softmaxentropy, ...)
    # early stopping (train.patience): this many images carved from the training images at
    # random (seeded by seed and repeat), never in the pool, never acquired; None: none
    valid_size: int | None = None
    # score the pool with one set of T masks for every image (consistent MC dropout), for
    # every strategy; without it only batchbald does (it needs them), the others share
    # masks within groups of images (mc.SHARE_BLOCK)
    consistent: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise bad_param("strategies", f"expected a comma-separated list of {', '.join(STRATEGIES)}, got "
                            f"{','.join(self.strategies)!r}")
        for name, lo, hi in (("initial", 1, None), ("step", 1, None), ("rounds", 0, None), ("samples", 1, MAX_SAMPLES),
                             ("repeats", 1, None), ("first_repeat", 0, None), ("seed", 0, None),
                             ("batchbald_samples", 1, None)):
            check_int(name, getattr(self, name), lo, hi)
        if not isinstance(self.train, TrainConfig):
            raise bad_param("train", f"expected a TrainConfig, got {type(self.train).__name__}")
        self.train_config(self.initial, self.seed)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < float("inf"):
            raise bad_param("beta", f"expected a positive number, got {self.beta!r}")
        if self.stop_error is not None and not 0 < self.stop_error < 1:
            raise bad_param("stop_error", f"expected an error rate between 0 and 1, got {self.stop_error}")
        if self.pool_subset is not None and self.pool_subset < self.step:
            raise bad_param("pool_subset", f"expected at least --step ({self.step}), got {self.pool_subset}")
        if self.valid_size is not None:
            check_int("valid_size", self.valid_size, 1)
        if (self.valid_size is None) != (self.train.patience is None):
            raise bad_param("patience" if self.valid_size is not None else "valid_size",
                            "early stopping needs both --patience and --valid-size (the images it watches), "
                            f"got {'--valid-size only' if self.valid_size is not None else '--patience only'}")

    def train_config(self, n_labelled: int, seed: int) -> TrainConfig:
        """The training settings of a round with ``n_labelled`` images and ``seed``."""
        wd = self.weight_decay
        if wd is None:
            # Keras l2(c / N) with c = 3.5 adds 2c/N * w to the gradient
            wd = 2 * 3.5 / n_labelled if self.train.model == "gal" else 0.0
        return replace(self.train, seed=seed, weight_decay=wd)

    def to_json(self) -> dict:
        """run.json's ``config``: flat, as runs have always recorded it (``train``'s
        fields beside the loop's; its seed is the loop's, set per round)."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "train"}
        t = asdict(self.train)
        for k in ("seed", "weight_decay"):
            t.pop(k)
        return {**d, **t}

    @classmethod
    def from_json(cls, d: dict) -> "ALConfig":
        """The config of run.json's flat ``config`` (what :meth:`to_json` writes)."""
        d = dict(d)
        train_keys = set(TrainConfig.__dataclass_fields__) - {"seed", "weight_decay"}
        t = {k: d.pop(k) for k in list(d) if k in train_keys}
        d["strategies"] = tuple(d.get("strategies", ()))
        return cls(**d, train=TrainConfig(**t))


@dataclass(frozen=True)
class ALResult:
    curve: pd.DataFrame  # strategy, repeat, round, n_labelled, valid_accuracy, seconds
    acquired: pd.DataFrame  # strategy, repeat, round, index, score


def initial_set(labels: np.ndarray, n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n training indices, as evenly spread over the classes as n allows."""
    per = np.full(n_classes, n // n_classes)
    per[rng.permutation(n_classes)[: n % n_classes]] += 1
    out = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per[c]:
            raise AuditError(f"--initial: class {c} has {len(idx)} training images, {per[c]} needed")
        out.append(rng.choice(idx, size=per[c], replace=False))
    return np.sort(np.concatenate(out))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def run_active_learning(
    dataset: Dataset,
    config: ALConfig = ALConfig(),
    *,
    device: str = "cpu",
    progress: Progress | None = None,
    on_round: Callable[[ALResult], None] | None = None,
    prior: ALResult | None = None,
) -> ALResult:
    """Run every strategy for every repeat; returns the learning curves and the
    acquisitions. ``on_round`` gets the results so far after each round.

    ``prior``: the results of an interrupted (or shorter) run with the same settings;
    each strategy's repeat goes on from its last round there (every seed follows from
    the repeat and round alone, so the curves are those of one uninterrupted run)."""
    progress = progress or NullProgress()
    dev = get_device(device)
    check_plan(dataset, config)
    dataset, fixed_start = loop_dataset(dataset)
    n_train = len(dataset.train)
    curve, acquired = [], []
    last_rep = config.first_repeat + config.repeats
    if prior is not None:  # what this call does not run again is kept as it was
        for old, out in ((prior.curve, curve), (prior.acquired, acquired)):
            if not old.empty:
                mine = old.strategy.isin(config.strategies) & old.repeat.between(config.first_repeat, last_rep - 1)
                out += old[~mine].to_dict("records")
    # where each strategy's repeat goes on from; its earlier rows are in every save from the
    # first on, so an interrupted call loses none of them
    plans = {(s, rep): go_on_from(prior, s, rep, config)
             for rep in range(config.first_repeat, last_rep) for s in config.strategies}
    for _, old_curve, old_acquired in plans.values():
        curve += old_curve
        acquired += old_acquired
    for rep in range(config.first_repeat, last_rep):
        held_out, start = carve_valid(config, rep, dataset.train.y, dataset.n_classes, fixed_start)
        stop_split = None if held_out is None else Split(dataset.train.x[held_out], dataset.train.y[held_out])
        not_pool = start if held_out is None else np.union1d(start, held_out)
        for strategy in config.strategies:
            first_round, _, old_acquired = plans[(strategy, rep)]
            if old_acquired:
                labelled = np.sort(np.array([a["index"] for a in old_acquired], dtype=np.int64))
            else:
                labelled = start.copy()
                acquired += [dict(strategy=strategy, repeat=rep, round=0, index=int(i), score=np.nan) for i in start]
            for rnd in range(first_round, config.rounds + 1):
                t0 = time.perf_counter()
                cfg = config.train_config(len(labelled), _seed(config.seed, rep, rnd, 1))
                result = train(dataset, cfg, subset=labelled, device=device, validate=False, stop_split=stop_split)
                model, acc = result.model, result.valid_accuracy
                done = config.stop_error is not None and reached(acc, config.stop_error)
                if rnd < config.rounds and not done:
                    candidates = np.setdiff1d(np.arange(n_train), np.union1d(labelled, not_pool))
                    new, scores, _ = choose_batch(model, dataset.train.x, candidates, strategy, config, rep, rnd, dev)
                    labelled = np.sort(np.concatenate([labelled, new]))
                    acquired += [dict(strategy=strategy, repeat=rep, round=rnd + 1, index=int(i), score=float(s))
                                 for i, s in zip(new, scores)]
                seconds = time.perf_counter() - t0
                n_lab = config.initial + rnd * config.step
                curve.append(dict(strategy=strategy, repeat=rep, round=rnd, n_labelled=n_lab,
                                  valid_accuracy=acc, seconds=round(seconds, 3)))
                progress.close(f"{strategy} repeat {rep + 1}/{last_rep} round {rnd}/{config.rounds}: "
                               f"{n_lab} labelled, validation accuracy {acc:.4f} ({seconds:.1f} s)")
                if on_round is not None:
                    on_round(_in_order(curve, acquired, config))
                if done:
                    progress.close(f"{strategy} repeat {rep + 1}/{last_rep}: validation error "
                                   f"{1 - acc:.4f} <= {config.stop_error}, stopped after round {rnd}")
                    break
    return _in_order(curve, acquired, config)


def check_plan(dataset: Dataset, config: ALConfig) -> None:
    """One line naming the option when ``config``'s rounds and early-stopping split do
    not fit in ``dataset`` (sizes only: nothing is copied, so a command can check before
    it writes anything)."""
    fixed = dataset.pool is not None
    n_train = len(dataset.train) + (len(dataset.pool) if fixed else 0)  # loop_dataset's training split
    if fixed and config.initial != len(dataset.train):
        raise bad_param("initial", f"with a labelled pool the training split is the initial set "
                        f"({len(dataset.train)} images), got {config.initial}")
    check_valid_size(config, n_train, fixed)
    held = config.valid_size or 0
    if config.initial + config.rounds * config.step + held > n_train:
        raise AuditError(
            f"--rounds: {config.initial} + {config.rounds} x {config.step} images exceed the "
            f"{n_train - (config.initial if fixed else held)} {'pool' if fixed else 'training'} images"
            + (f" left beside the {held} of --valid-size" if held else "")
        )


def check_valid_size(config: ALConfig, n_train: int, fixed_start: bool) -> None:
    """One line when the early-stopping split cannot be carved from the labelled images."""
    if config.valid_size is None:
        return
    if fixed_start:
        raise bad_param("valid_size", "with a labelled pool the training split is the start, and every image of it "
                        "counts as labelled on the curve; leave out --valid-size (and --patience), or carve the "
                        "early-stopping images out of the data's training split yourself")
    room = n_train - config.initial
    if config.valid_size > room:
        raise bad_param("valid_size", f"the early-stopping split is carved from the {n_train} labelled training "
                        f"images beside the --initial {config.initial}: expected at most {room}, "
                        f"got {config.valid_size}")


def carve_valid(config: ALConfig, rep: int, labels: np.ndarray, n_classes: int,
                fixed_start: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
    """(early-stopping split or None, initial labelled set) of repeat ``rep``: the split is
    ``config.valid_size`` training images drawn at random (seeded by the seed and the
    repeat), and the initial set is drawn from the rest. Without a split the initial set
    is the one runs have always drawn."""
    if fixed_start is not None:
        return None, fixed_start
    draw = np.random.default_rng(_seed(config.seed, rep, 0))
    if config.valid_size is None:
        return None, initial_set(labels, config.initial, n_classes, draw)
    held = np.sort(np.random.default_rng(_seed(config.seed, rep, 5)).choice(len(labels), config.valid_size,
                                                                             replace=False))
    rest = labels.copy()
    rest[held] = -1  # no class: never drawn into the initial set
    return held, initial_set(rest, config.initial, n_classes, draw)


def _in_order(curve: list[dict], acquired: list[dict], config: ALConfig) -> ALResult:
    """The rows as one run writes them, whatever came from a resumed run: by repeat, then
    strategy (``config``'s order, others after), then round."""
    out = []
    for rows in (curve, acquired):
        df = pd.DataFrame(rows)
        if not df.empty:
            names = list(dict.fromkeys([*config.strategies, *df.strategy]))
            rank = df.strategy.map({n: i for i, n in enumerate(names)})
            df = df.assign(_s=rank).sort_values(["repeat", "_s", "round"], kind="stable").drop(columns="_s")
            df = df.reset_index(drop=True)
        out.append(df)
    return ALResult(*out)


def loop_dataset(dataset: Dataset) -> tuple[Dataset, np.ndarray | None]:
    """The dataset the loop trains and acquires in: one whose ``train`` holds every image
    that is or may become labelled, and the start (None: drawn by :func:`initial_set`).

    Without a pool that is the dataset itself: the pool is the training images not yet
    labelled. With one (an npz's ``x_pool``, a folder's ``pool/``) it is the training
    images followed by the pool's, the training images are the start, and pool image j
    is index ``n_train + j``; its labels are the pool's (-1 where nobody knows them).
    ``audit acquire`` (the dataset's labels play the labeller) and ``audit next`` (a
    person does) both go through here and :func:`choose_batch`."""
    if dataset.pool is None:
        return dataset, None
    t, p = dataset.train, dataset.pool
    paths = None if t.paths is None or p.paths is None else (*t.paths, *p.paths)
    train = Split(np.concatenate([t.x, p.x]), np.concatenate([t.y, p.y]), paths)
    merged = Dataset(train, dataset.valid, dataset.class_names, dataset.source, dataset.fingerprint)
    return merged, np.arange(len(t))


def choose_batch(model, images: np.ndarray, candidates: np.ndarray, strategy: str, config: ALConfig, rep: int,
                 rnd: int, dev, *, k: int | None = None, progress: Progress | None = None, scorer=None):
    """``k`` (default ``config.step``) of ``candidates`` (indices into ``images``) to label
    next: (indices, scores, (k, C) mean probabilities or None for random). Seeded by
    (``config.seed``, ``rep``, ``rnd``) alone. The pool is scored in bounded memory (the
    (N, T, C) passes are kept only for BatchBALD).

    ``scorer(pool, samples, seed, masks, return_mc)``: scores ``images[pool]`` as
    :func:`audit.mc.mc_predict` does (an :class:`MCResult`), e.g. on a Dask cluster;
    default in this process."""
    k = config.step if k is None else k
    pool = np.asarray(candidates)
    if not 1 <= k <= len(pool):
        raise bad_param("k", f"expected 1..{len(pool)} (the images left in the pool), got {k}")
    rng = np.random.default_rng(_seed(config.seed, rep, rnd, 2))
    if config.pool_subset is not None and config.pool_subset < len(pool):
        pool = np.sort(rng.choice(pool, size=max(config.pool_subset, k), replace=False))
    if strategy == "random":  # no scoring: the same draw Generator.choice(pool) makes
        batch = random_batch(rng, len(pool), k)
        return pool[batch.indices], batch.scores, None
    require_dropout(model)
    sampling, _ = parse_strategy(strategy)
    masks = "consistent" if strategy == "batchbald" or config.consistent else "shared"
    if scorer is None:
        r = mc_predict(model, images[pool], samples=config.samples, seed=_seed(config.seed, rep, rnd, 3),
                       masks=masks, device=dev, return_mc=strategy == "batchbald", progress=progress)
    else:
        r = scorer(pool, config.samples, _seed(config.seed, rep, rnd, 3), masks, strategy == "batchbald")
    seed = _seed(config.seed, rep, rnd, 4)
    if strategy == "batchbald":
        batch = acquire(r.mc_probs, strategy, k, seed=seed, num_samples=config.batchbald_samples)
    else:
        batch = from_scores(r.scores(), strategy, k, seed=seed, beta=config.beta)
    return pool[batch.indices], batch.scores, r.probs[batch.indices]


def _acquire_step(model, dataset, labelled, strategy, config, rep, rnd, dev):
    """``step`` new training indices and their scores (the pool: the training images
    not in ``labelled``)."""
    candidates = np.setdiff1d(np.arange(len(dataset.train)), labelled)
    new, scores, _ = choose_batch(model, dataset.train.x, candidates, strategy, config, rep, rnd, dev)
    return new, scores


def acquire_run(
    run: str | os.PathLike = "runs/al",
    *,
    data: str = "mnist",
    data_dir: str | None = None,
    config: ALConfig = ALConfig(),
    device: str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
    cluster: "ClusterConfig | None" = None,
    progress: Progress | None = None,
    initial_from_data: bool = False,
    image_size: tuple[int, int] | None = None,
) -> ALResult:
    """Run the loops and commit RUN/al_curve.csv, acquired.csv and run.json after every
    round (one commit each), so a long run shows its progress and an interrupted one
    keeps its finished rounds.

    ``resume``: go on with the run already in RUN (interrupted, or to take it further:
    more rounds, a lower ``stop_error``, more repeats or strategies); its settings
    must be those of ``config`` but for those four. Nothing is written before the
    first round of a resume ends, so a refused or failed resume leaves the run as it was.

    ``cluster``: each (strategy, repeat) curve is a Dask piece (:mod:`audit.cluster`),
    committed as it finishes; the curves are those of one in-process run.

    ``initial_from_data``: on data with a labelled pool (an npz's x_pool and y_pool),
    take the training split as the initial set (``config.initial`` is set to its size)."""
    from .cluster import ClusterConfig, connect, worker_device

    cluster = cluster or ClusterConfig()
    store = runs.RunStore(run)
    get_device(device)
    if resume and overwrite:
        raise AuditError("--resume and --overwrite: expected one of them, got both", usage=True)
    wdev = worker_device(cluster, device)
    with store.writing(), connect(cluster, wdev) as client:
        if resume:
            if not store.path.exists():
                raise AuditError(f"--resume: {store.path} does not exist, so there is nothing to go on with; "
                                 "leave out --resume to start it")
            old = store.require().meta()
        else:
            check_run_free(store, overwrite)
        dataset = load_dataset(data, data_dir=data_dir, progress=progress, image_size=image_size)
        if dataset.pool is not None:
            if (dataset.pool.y < 0).any():
                raise AuditError(f"--data: {data}'s pool has no labels (y_pool) to play the labeller with; "
                                 "label it with `audit next` and `audit label`")
            if initial_from_data:
                config = replace(config, initial=len(dataset.train))
        check_plan(dataset, config)  # a plan that does not fit is refused before anything is written
        prior = resumable(store, config, dataset.fingerprint) if resume else None
        meta = runs.RunMeta(
            command="acquire", created=runs.now(),
            config=config.to_json(),
            seed=config.seed, data=runs.data_source(data, data_dir, dataset, run=store.path, image_size=image_size),
            device=str(device),
            versions=runs.versions(), complete=False,
        )
        if resume:
            meta = meta.evolve(created=old.created, resumed=(*old.resumed, runs.now()))
        else:  # the new run (or the one --overwrite replaces) exists from here on, with no rounds yet
            with store.transaction(replace_all=True) as txn:
                meta = txn.commit(meta)
        t0 = time.perf_counter()

        def save(res: ALResult, **fields) -> None:
            nonlocal meta
            with store.transaction() as txn:
                txn.write_csv(runs.AL_CURVE, res.curve)
                txn.write_csv(runs.ACQUIRED, res.acquired)
                meta = txn.commit(meta.evolve(**fields))

        if client is None:
            result = run_active_learning(dataset, config, device=device, progress=progress, on_round=save,
                                         prior=prior)
        else:
            result = _curves_on_cluster(client, meta.data, data_dir, config, prior, save, progress or NullProgress(),
                                        wdev)
        save(result, complete=True, timings={"seconds": round(time.perf_counter() - t0, 3)},
             results=reach_table(result.curve, config.initial))
    return result


def _curves_on_cluster(client, data: dict, data_dir: str | None, config: ALConfig, prior: ALResult | None,
                       save: Callable[[ALResult], None], progress: Progress, device: str = "cpu") -> ALResult:
    """Every (strategy, repeat) curve as a Dask piece; each goes on from its rows in
    ``prior``, and the run is committed as each finishes."""
    from .cluster import run_pieces

    last_rep = config.first_repeat + config.repeats
    # the longest pieces first (random scores nothing), so the last ones to finish are short
    keys = sorted(((s, rep) for rep in range(config.first_repeat, last_rep) for s in config.strategies),
                  key=lambda k: k[0] == "random")

    def rows(df: pd.DataFrame | None, s: str, rep: int) -> list[dict]:
        if df is None or df.empty:
            return []
        return df[(df.strategy == s) & (df.repeat == rep)].to_dict("records")

    done: dict = {}
    kept_c, kept_a = [], []  # rows of strategies and repeats this command does not run
    if prior is not None:
        for df, out in ((prior.curve, kept_c), (prior.acquired, kept_a)):
            if not df.empty:
                mine = df.strategy.isin(config.strategies) & df.repeat.between(config.first_repeat, last_rep - 1)
                out += df[~mine].to_dict("records")
    for s, rep in keys:
        done[(s, rep)] = (rows(prior and prior.curve, s, rep), rows(prior and prior.acquired, s, rep))
    pieces = [({**data, "data_dir": data_dir or data.get("data_dir")},
               replace(config, strategies=(s,), first_repeat=rep, repeats=1).to_json(), *done[(s, rep)], device)
              for s, rep in keys]
    progress.start(f"{len(pieces)} curves (strategy x repeat)", len(pieces))

    def merged() -> ALResult:
        curve, acquired = list(kept_c), list(kept_a)
        for c, a in done.values():
            curve += c
            acquired += a
        return _in_order(curve, acquired, config)

    def finished(i: int, result) -> None:
        done[keys[i]] = result
        progress.advance(1)
        save(merged())

    run_pieces(client, curve_piece, pieces, on_done=finished)
    progress.close()
    return merged()


_DATA: dict = {}  # on a worker: datasets by path, loaded once per process


def curve_piece(data: dict, config: dict, curve: list[dict], acquired: list[dict], device: str = "cpu"):
    """On a worker: one (strategy, repeat) curve, going on from its earlier rows; ``data``
    is the run's data block (path, data_dir, image size)."""
    key = (data["data"], data.get("data_dir"), str(data.get("image_size")))
    if key not in _DATA:
        _DATA[key] = runs.load_source(data)
    prior = ALResult(pd.DataFrame(curve), pd.DataFrame(acquired)) if curve else None
    res = run_active_learning(_DATA[key], ALConfig.from_json(config), prior=prior, device=device)
    return res.curve.to_dict("records"), res.acquired.to_dict("records")


@dataclass(frozen=True)
class PooledRuns:
    runs: list[Path]
    meta: runs.RunMeta  # the first run's run.json
    config: dict  # its stored_config
    curve: pd.DataFrame  # every (strategy, repeat, round) of the runs once
    acquired: pd.DataFrame  # every (strategy, repeat, round, index) once; empty where no run kept acquired.csv
    incomplete: list[Path]  # the runs that stopped before their end (interrupted, or still running)


def pool_runs(run_dirs: list[str | os.PathLike]) -> PooledRuns:
    """The curves of several acquire runs as one run's, e.g. repeats split over runs
    with ``first_repeat`` or a run taken further in a copy. The runs must share the
    settings that shape a curve and the data; a (strategy, repeat, round) in several
    runs must have the same accuracy in each (runs are deterministic), and is kept once."""
    paths = list(dict.fromkeys(Path(d) for d in run_dirs))  # a run named twice counts once
    if not paths:
        raise AuditError("--run: expected at least one acquire run, got none", usage=True)
    loaded = []
    for run in paths:
        store = runs.RunStore(run)
        if not store.exists() or not store.has(runs.AL_CURVE):
            raise AuditError(f"{run}: expected an `audit acquire` run (run.json and {runs.AL_CURVE}), found none")
        meta = store.meta()
        curve, acquired = read_results(store) or (None, None)
        if curve is None:  # al_curve.csv without acquired.csv (runs made before acquired.csv)
            curve, acquired = store.read_table(runs.AL_CURVE, CURVE_COLUMNS, numeric=CURVE_COLUMNS[1:]), pd.DataFrame()
        loaded.append((run, meta, stored_config(meta), curve, acquired))
    run0, meta0, cfg0, _, _ = loaded[0]
    for run, meta, cfg, _, _ in loaded[1:]:
        diff = _differing(cfg, cfg0)
        if diff:
            raise AuditError(f"{run}: {', '.join(f'{k} {cfg.get(k)!r}' for k in diff)}; {run0} has "
                             f"{', '.join(repr(cfg0.get(k)) for k in diff)}: runs made with other settings "
                             "are not pooled")
        if meta.fingerprint != meta0.fingerprint:
            raise AuditError(f"{run}: made on other data than {run0} (fingerprint {meta.fingerprint[:12]}, not "
                             f"{meta0.fingerprint[:12]}): not pooled")
    curve = pd.concat([c for *_, c, _ in loaded], ignore_index=True)
    key = ["strategy", "repeat", "round"]
    both = curve[curve.duplicated(key, keep=False)].groupby(key).valid_accuracy.nunique()
    if (both > 1).any():
        strategy, rep, rnd = both[both > 1].index[0]
        raise AuditError(f"{', '.join(map(str, paths))}: the runs disagree on {strategy} repeat {rep + 1} round "
                         f"{rnd} (validation accuracy differs): not pooled")
    acquired = pd.concat([a for *_, a in loaded], ignore_index=True)
    if not acquired.empty:
        acquired = acquired.drop_duplicates(["strategy", "repeat", "round", "index"], ignore_index=True)
    return PooledRuns(paths, meta0, cfg0, curve.drop_duplicates(key, ignore_index=True), acquired,
                      [run for run, m, *_ in loaded if not m.complete])
