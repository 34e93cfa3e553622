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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import runs
from .acquire import STRATEGIES, acquire
from .data import Dataset, load_dataset
from .device import get_device
from .errors import AuditError
from .mc import mc_predict
from .progress import NullProgress, Progress
from .train import TrainConfig, check_run_free, train

AL_CURVE = "al_curve.csv"
ACQUIRED = "acquired.csv"
CURVE_COLUMNS = ("strategy", "repeat", "round", "n_labelled", "valid_accuracy", "seconds")
ACQUIRED_COLUMNS = ("strategy", "repeat", "round", "index", "score")


@dataclass(frozen=True)
class ALConfig:
    """Settings of an active-learning experiment; the defaults follow Gal et al. 2017
    where they said (20 balanced, 10 per round, their CNN, 50 epochs, Adam, weight
    decay 3.5/N) except three things that suit small labelled sets better, measured on
    random balanced MNIST subsets (README): batches of 32 instead of their code's 128
    (four times the updates for the same work; 92.0% instead of 90.7% at 300 images),
    Adam's step size falling from 3e-3 to 0 along a cosine instead of a constant
    1e-3 (84.1% instead of 81.9% at 100 images, 93.1% instead of 92.3% at 300), and
    each epoch in near-equal batches instead of full ones and a small remainder
    (bench/batching.py)."""

    strategies: tuple[str, ...] = ("bald", "random")
    initial: int = 20
    step: int = 10
    rounds: int = 10  # acquisitions; the curve has rounds + 1 points
    samples: int = 100  # MC passes per pool image (the paper's code: 100 dropout iterations)
    pool_subset: int | None = 2000  # score a random subset of the pool each round (None: all)
    repeats: int = 1
    first_repeat: int = 0  # number the repeats from here: repeat k has the same start and seeds in any run
    seed: int = 0
    model: str = "gal"
    epochs: int = 50
    batch_size: int = 32
    lr: float = 3e-3  # peak step size of the cosine schedule (the paper's code: 1e-3, constant)
    schedule: str = "cosine"  # "constant": the paper's code
    even_batches: bool = True  # near-equal batches per epoch (False: full ones and the remainder, as the paper's code)
    weight_decay: float | None = None  # None: the paper's 2 * 3.5 / n_labelled for gal, 0 for origin
    batchbald_samples: int = 2000  # sampled label configurations once the exact joint is too big
    stop_error: float | None = None  # end a strategy's repeat once its validation error is at most this

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise AuditError(f"--strategy: expected a comma-separated list of {', '.join(STRATEGIES)}, got "
                             f"{','.join(self.strategies)!r}", usage=True)
        for name, v, lo in (("--initial", self.initial, 1), ("--step", self.step, 1), ("--rounds", self.rounds, 0),
                            ("--samples", self.samples, 1), ("--repeats", self.repeats, 1),
                            ("--first-repeat", self.first_repeat, 0)):
            if v < lo:
                raise AuditError(f"{name}: expected at least {lo}, got {v}", usage=True)
        from .model import ARCHS

        if self.model not in ARCHS:
            raise AuditError(f"--model: expected one of {', '.join(ARCHS)}, got {self.model!r}", usage=True)
        self.train_config(self.initial, self.seed)  # --epochs, --batch-size, --lr, --schedule: TrainConfig checks them
        if self.stop_error is not None and not 0 < self.stop_error < 1:
            raise AuditError(f"--stop-at-error: expected an error rate between 0 and 1, got {self.stop_error}",
                             usage=True)
        if self.pool_subset is not None and self.pool_subset < self.step:
            raise AuditError(f"--pool-subset: expected at least --step ({self.step}), got {self.pool_subset}",
                             usage=True)

    def train_config(self, n_labelled: int, seed: int) -> TrainConfig:
        wd = self.weight_decay
        if wd is None:
            # Keras l2(c / N) with c = 3.5 adds 2c/N * w to the gradient
            wd = 2 * 3.5 / n_labelled if self.model == "gal" else 0.0
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
                           model=self.model, weight_decay=wd, schedule=self.schedule,
                           even_batches=self.even_batches)


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
    n_train = len(dataset.train)
    if config.initial + config.rounds * config.step > n_train:
        raise AuditError(
            f"--rounds: {config.initial} + {config.rounds} x {config.step} images exceed the "
            f"{n_train} training images"
        )
    curve, acquired = [], []
    last_rep = config.first_repeat + config.repeats
    if prior is not None:  # what this call does not run again is kept as it was
        for old, out in ((prior.curve, curve), (prior.acquired, acquired)):
            if not old.empty:
                mine = old.strategy.isin(config.strategies) & old.repeat.between(config.first_repeat, last_rep - 1)
                out += old[~mine].to_dict("records")
    # where each strategy's repeat goes on from; its earlier rows are in every save from the
    # first on, so an interrupted call loses none of them
    plans = {(s, rep): _go_on_from(prior, s, rep, config)
             for rep in range(config.first_repeat, last_rep) for s in config.strategies}
    for _, old_curve, old_acquired in plans.values():
        curve += old_curve
        acquired += old_acquired
    for rep in range(config.first_repeat, last_rep):
        start = initial_set(dataset.train.y, config.initial, dataset.n_classes,
                            np.random.default_rng(_seed(config.seed, rep, 0)))
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
                result = train(dataset, cfg, subset=labelled, device=device, validate=False)
                model, acc = result.model, result.valid_accuracy
                done = config.stop_error is not None and reached(acc, config.stop_error)
                if rnd < config.rounds and not done:
                    new, scores = _acquire_step(model, dataset, labelled, strategy, config, rep, rnd, dev)
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


def _go_on_from(prior: ALResult | None, strategy: str, rep: int, config: ALConfig) -> tuple[int, list, list]:
    """Where a strategy's repeat goes on from ``prior``: (first round to run, the curve
    rows and the acquisitions to keep). A curve that reached ``stop_error`` or the last
    round is kept whole and not run again (first round past the end)."""
    if prior is None or prior.curve.empty:
        return 0, [], []
    c = prior.curve[(prior.curve.strategy == strategy) & (prior.curve.repeat == rep)].sort_values("round")
    a = prior.acquired[(prior.acquired.strategy == strategy) & (prior.acquired.repeat == rep)]
    if c.empty:
        return 0, [], []
    stops = [r for r, acc in zip(c["round"], c.valid_accuracy) if config.stop_error is not None
             and reached(acc, config.stop_error)]
    last = int(c["round"].max())
    if stops or last >= config.rounds:  # nothing left to run; rows past the new end are kept, never deleted
        return config.rounds + 1, c.to_dict("records"), a.to_dict("records")
    if (a["round"] == last + 1).any():
        first, keep_acquired_to = last + 1, last + 1  # the acquisitions that round trains on were made
    else:
        first, keep_acquired_to = last, last  # none made after the last round: train it again to acquire
        c = c[c["round"] < last]
    a = a[a["round"] <= keep_acquired_to]
    return first, c.to_dict("records"), a.to_dict("records")


def _acquire_step(model, dataset, labelled, strategy, config, rep, rnd, dev):
    """``step`` new training indices and their scores."""
    pool = np.setdiff1d(np.arange(len(dataset.train)), labelled)
    rng = np.random.default_rng(_seed(config.seed, rep, rnd, 2))
    if config.pool_subset is not None and config.pool_subset < len(pool):
        pool = np.sort(rng.choice(pool, size=config.pool_subset, replace=False))
    if strategy == "random":
        return rng.choice(pool, size=config.step, replace=False), np.zeros(config.step)
    r = mc_predict(model, dataset.train.x[pool], samples=config.samples, seed=_seed(config.seed, rep, rnd, 3),
                   masks="consistent" if strategy == "batchbald" else "independent", device=dev, return_mc=True)
    batch = acquire(r.mc_probs, strategy, config.step, seed=_seed(config.seed, rep, rnd, 4),
                    num_samples=config.batchbald_samples)
    return pool[batch.indices], batch.scores


def acquire_run(
    run: str | os.PathLike = "runs/al",
    *,
    data: str = "mnist",
    data_dir: str | None = None,
    config: ALConfig = ALConfig(),
    device: str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> ALResult:
    """Run the loops and keep RUN/al_curve.csv, acquired.csv and run.json up to date
    after every round (each file replaced atomically), so a long run shows its
    progress and an interrupted one keeps its finished rounds.

    ``resume``: go on with the run already in RUN (interrupted, or to take it further:
    more rounds, a lower ``stop_error``, more repeats or strategies); its settings
    must be those of ``config`` but for those four."""
    run = Path(run)
    get_device(device)
    prior = None
    if resume:
        if overwrite:
            raise AuditError("--resume and --overwrite: expected one of them, got both", usage=True)
        if not run.is_dir():
            raise AuditError(f"--resume: {run} does not exist, so there is nothing to go on with; "
                             "leave out --resume to start it")
        old_meta = runs.read_run(run)
    else:
        check_run_free(run, overwrite)
    dataset = load_dataset(data, data_dir=data_dir, progress=progress)
    if resume:
        prior = _resumable(run, old_meta, config, dataset.fingerprint)
    meta = {
        "command": "acquire",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "seed": config.seed,
        "data": {"data": str(data), "data_dir": data_dir, "source": dataset.source,
                 "fingerprint": dataset.fingerprint, "class_names": list(dataset.class_names),
                 "n_train": len(dataset.train), "n_valid": len(dataset.valid),
                 "image_shape": list(dataset.image_shape)},
        "device": str(device),
        "versions": runs.versions(),
        "complete": False,
    }
    if run.exists() and overwrite:
        for name in (AL_CURVE, ACQUIRED):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    runs.write_json(run / runs.RUN_JSON, meta)
    t0 = time.perf_counter()

    def save(res: ALResult) -> None:
        for name, df in ((AL_CURVE, res.curve), (ACQUIRED, res.acquired)):
            with runs.atomic_path(run / name) as tmp:
                df.to_csv(tmp, index=False, float_format="%.6g")

    if prior is not None:
        meta["created"] = old_meta.get("created", meta["created"])
        meta["resumed"] = old_meta.get("resumed", []) + [time.strftime("%Y-%m-%dT%H:%M:%S%z")]
    result = run_active_learning(dataset, config, device=device, progress=progress, on_round=save, prior=prior)
    save(result)
    meta.update(complete=True, timings={"seconds": round(time.perf_counter() - t0, 3)},
                results=reach_table(result.curve, config.initial))
    runs.write_json(run / runs.RUN_JSON, meta)
    return result


# settings that shape every curve: a run goes on (or pools with another) only where they agree
CURVE_SETTINGS = ("initial", "step", "samples", "pool_subset", "seed", "model", "epochs", "batch_size", "lr",
                  "schedule", "weight_decay", "batchbald_samples", "even_batches")


def _differing(a: dict, b: dict) -> list[str]:
    """The settings that shape a curve on which two configs disagree."""
    return [k for k in CURVE_SETTINGS if a.get(k) != b.get(k)]


def _as_option(key: str, value) -> str:
    """A switch as the option that sets it (``--no-even-batches``)."""
    return f"--{'' if value else 'no-'}{key.replace('_', '-')}"


def stored_config(meta: dict) -> dict:
    """The ``config`` of an acquire run's run.json, with what older runs did not record."""
    config = dict(meta.get("config", {}))
    config.setdefault("schedule", "constant")  # runs made before --schedule existed trained at a constant lr
    config.setdefault("even_batches", False)  # and before --even-batches in full batches and the remainder
    return config


@dataclass(frozen=True)
class PooledRuns:
    runs: list[Path]
    meta: dict  # the first run's run.json
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
        if not (run / runs.RUN_JSON).is_file() or not (run / AL_CURVE).is_file():
            raise AuditError(f"{run}: expected an `audit acquire` run (run.json and {AL_CURVE}), found none")
        meta = runs.read_run(run)
        acquired = runs.read_table(run / ACQUIRED, ACQUIRED_COLUMNS) if (run / ACQUIRED).is_file() else pd.DataFrame()
        loaded.append((run, meta, stored_config(meta), runs.read_table(run / AL_CURVE, CURVE_COLUMNS), acquired))
    run0, meta0, cfg0, _, _ = loaded[0]
    for run, meta, cfg, _, _ in loaded[1:]:
        diff = _differing(cfg, cfg0)
        if diff:
            raise AuditError(f"{run}: {', '.join(f'{k} {cfg.get(k)!r}' for k in diff)}; {run0} has "
                             f"{', '.join(repr(cfg0.get(k)) for k in diff)}: runs made with other settings "
                             "are not pooled")
        theirs, ours = meta.get("data", {}).get("fingerprint"), meta0.get("data", {}).get("fingerprint")
        if theirs != ours:
            raise AuditError(f"{run}: made on other data than {run0} (fingerprint {theirs}, not {ours}): not pooled")
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
                      [run for run, m, *_ in loaded if not m.get("complete")])


def _resumable(run: Path, meta: dict, config: ALConfig, fingerprint: str) -> ALResult | None:
    """The results in ``run`` to go on from, if its settings and data are ``config``'s."""
    if meta.get("command") != "acquire":
        raise AuditError(f"--resume: {run} is not an `audit acquire` run (its run.json says "
                         f"{meta.get('command')!r})")
    old = stored_config(meta)
    new = asdict(config)
    diff = _differing(old, new)
    if diff:
        was = [_as_option(k, old.get(k)) if isinstance(old.get(k), bool) else f"{k} {old.get(k)!r}" for k in diff]
        now = [_as_option(k, new[k]) if isinstance(new[k], bool) else repr(new[k]) for k in diff]
        raise AuditError(f"--resume: {run} was made with {', '.join(was)}; this command has {', '.join(now)}: "
                         "pass the same settings to go on with it", usage=True)
    if meta["data"].get("fingerprint") != fingerprint:
        raise AuditError(f"--resume: {run} was made on other data (fingerprint {meta['data'].get('fingerprint')}, "
                         f"this data {fingerprint})")
    if not (run / AL_CURVE).is_file() or not (run / ACQUIRED).is_file():
        return None  # stopped before its first round: start afresh
    return ALResult(runs.read_table(run / AL_CURVE, CURVE_COLUMNS), runs.read_table(run / ACQUIRED, ACQUIRED_COLUMNS))


def last_accuracy(curve: pd.DataFrame) -> pd.Series:
    """Per strategy (in order of appearance): the mean over repeats of each repeat's
    last validation accuracy (repeats stopped by ``stop_error`` end early)."""
    last = curve.sort_values("round").groupby(["strategy", "repeat"], sort=False).tail(1)
    return last.groupby("strategy", sort=False)["valid_accuracy"].mean()


def reached(accuracy: float, error: float) -> bool:
    """Whether a validation ``accuracy`` has an error of at most ``error`` (0.95 reaches 5%)."""
    return accuracy >= 1 - error - 1e-9  # 1 - 0.95 is 0.05000000000000004 in floats


def first_reached(curve: pd.DataFrame, error: float, initial: int) -> dict[int, tuple[int | None, int]]:
    """Per repeat of one strategy's ``curve`` (in repeat order): the images acquired
    (beyond the initial set) at the first round whose validation error is at most
    ``error`` (None if none is), and at the curve's last round."""
    out = {}
    for rep, r in curve.groupby("repeat"):
        hits = [n for n, a in sorted(zip(r.n_labelled, r.valid_accuracy)) if reached(a, error)]
        out[int(rep)] = (int(hits[0]) - initial if hits else None, int(r.n_labelled.max()) - initial)
    return out


def reach_table(curve: pd.DataFrame, initial: int, errors=(0.10, 0.05)) -> dict:
    """Per strategy and error level: the images acquired (beyond the initial set) at
    which each repeat's validation error first reaches the level, and their mean.

    The mean is None when a repeat never reached the level; ``acquired_max`` then says
    how far the curves went (the level was not reached within that many).
    """
    out = {}
    for strategy, g in curve.groupby("strategy", sort=False):
        row: dict = {"acquired_max": int(g.n_labelled.max()) - initial}
        for e in errors:
            per = [first for first, _ in first_reached(g, e, initial).values()]
            key = f"{e:.0%}"
            row[key] = None if None in per else round(float(np.mean(per)), 1)
            row[f"{key} per repeat"] = per
        out[strategy] = row
    return out


def versus(curve: pd.DataFrame, initial: int, baseline: str = "random", errors=(0.10, 0.05)) -> dict:
    """Each strategy against ``baseline``, repeat by repeat (the same initial images):
    per error level, in how many repeats it reached the level with fewer acquired
    images ("ahead"), as many ("tied"), more ("behind"), or "open" where neither curve
    settles it (both stopped short, or one stopped short of where the other got there).
    Empty without the baseline in ``curve``."""
    if baseline not in set(curve.strategy):
        return {}
    base = curve[curve.strategy == baseline]
    base_reached = {e: first_reached(base, e, initial) for e in errors}
    out = {}
    for strategy, g in curve.groupby("strategy", sort=False):
        if strategy == baseline:
            continue
        row = {}
        for e in errors:
            ours, theirs = first_reached(g, e, initial), base_reached[e]
            count = dict(ahead=0, tied=0, behind=0, open=0)
            for rep in sorted(set(ours) & set(theirs)):
                (x, x_end), (y, y_end) = ours[rep], theirs[rep]
                if x is not None and y is not None:
                    count["ahead" if x < y else "tied" if x == y else "behind"] += 1
                elif x is not None and x <= y_end:  # the baseline's curve had not reached it by its end
                    count["ahead"] += 1
                elif y is not None and y <= x_end:
                    count["behind"] += 1
                else:
                    count["open"] += 1
            row[f"{e:.0%}"] = count
        out[strategy] = row
    return out
