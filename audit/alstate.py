"""Where an active-learning run stands, for ``--resume`` and pooling: its stored
settings, which of them must agree, and where each (strategy, repeat) goes on from.

The state is what acquired.csv records: for each acquired index, the round it was
labelled in (round 0: the initial set). A curve goes on from its last finished round;
the labelled set there is every index acquired up to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


import pandas as pd

from . import runs
from .curves import ACQUIRED_COLUMNS, CURVE_COLUMNS, reached
from .errors import AuditError

if TYPE_CHECKING:
    from .active import ALConfig, ALResult


# settings that shape every curve: a run goes on (or pools with another) only where they agree
CURVE_SETTINGS = ("initial", "step", "samples", "pool_subset", "seed", "model", "epochs", "batch_size", "lr",
                  "schedule", "weight_decay", "batchbald_samples", "even_batches", "beta", "epoch_samples",
                  "patience", "valid_size", "consistent")


def _differing(a: dict, b: dict) -> list[str]:
    """The settings that shape a curve on which two configs disagree."""
    return [k for k in CURVE_SETTINGS if a.get(k) != b.get(k)]


def _as_option(key: str, value) -> str:
    """A switch as the option that sets it (``--no-even-batches``)."""
    return f"--{'' if value else 'no-'}{key.replace('_', '-')}"


def stored_config(meta: runs.RunMeta) -> dict:
    """The ``config`` of an acquire run's run.json, with what older runs did not record."""
    config = dict(meta.config)
    config.setdefault("schedule", "constant")  # runs made before --schedule existed trained at a constant lr
    config.setdefault("even_batches", False)  # and before --even-batches in full batches and the remainder
    config.setdefault("beta", 1.0)  # and before power/softmax sampling, with the default it has
    config.setdefault("consistent", False)  # and before --consistent-masks, without them
    return config


def go_on_from(prior: ALResult | None, strategy: str, rep: int, config: ALConfig) -> tuple[int, list, list]:
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


def read_results(store: runs.RunStore) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(al_curve, acquired) of an acquire run, checked; None before its first round."""
    if not store.has(runs.AL_CURVE) or not store.has(runs.ACQUIRED):
        return None
    curve = store.read_table(runs.AL_CURVE, CURVE_COLUMNS, numeric=CURVE_COLUMNS[1:])
    acquired = store.read_table(runs.ACQUIRED, ACQUIRED_COLUMNS, numeric=ACQUIRED_COLUMNS[1:])
    for df, name, ints in ((curve, runs.AL_CURVE, ("repeat", "round", "n_labelled")),
                           (acquired, runs.ACQUIRED, ("repeat", "round", "index"))):
        for c in ints:
            v = df[c].to_numpy()
            bad = (v < 0) | (v != v.round()) if len(v) else v.astype(bool)
            if bad.any():
                i = int(bad.nonzero()[0][0])
                raise AuditError(f"{store.path / name}: column {c!r}, line {i + 2}: expected a whole number >= 0, "
                                 f"found {v[i]}")
            df[c] = df[c].astype("int64")
    n_train = store.meta().data["n_train"]
    if len(acquired) and int(acquired["index"].max()) >= n_train:
        raise AuditError(f"{store.path / runs.ACQUIRED}: index {int(acquired['index'].max())} is outside the "
                         f"{n_train} training images")
    return curve, acquired


def resumable(store: runs.RunStore, config: ALConfig, fingerprint: str) -> ALResult | None:
    """The results in the run to go on from, if its settings and data are ``config``'s."""
    from .active import ALResult

    run, meta = store.path, store.meta()
    if meta.command != "acquire":
        raise AuditError(f"--resume: {run} is not an `audit acquire` run (its run.json says {meta.command!r})")
    old = stored_config(meta)
    new = config.to_json()
    diff = _differing(old, new)
    if diff:
        was = [_as_option(k, old.get(k)) if isinstance(old.get(k), bool) else f"{k} {old.get(k)!r}" for k in diff]
        now = [_as_option(k, new[k]) if isinstance(new[k], bool) else repr(new[k]) for k in diff]
        raise AuditError(f"--resume: {run} was made with {', '.join(was)}; this command has {', '.join(now)}: "
                         "pass the same settings to go on with it", usage=True)
    if meta.fingerprint != fingerprint:
        raise AuditError(f"--resume: {run} was made on other data (fingerprint {meta.fingerprint[:12]}, "
                         f"this data {fingerprint[:12]})")
    results = read_results(store)
    return None if results is None else ALResult(*results)  # None: stopped before its first round
