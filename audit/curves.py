"""Learning-curve statistics of active-learning runs (pure: DataFrames in, numbers out).

A curve is al_curve.csv as a DataFrame: one row per (strategy, repeat, round) with
``n_labelled`` and ``valid_accuracy``; higher accuracy is better, fewer acquired images
to a level is better.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CURVE_COLUMNS = ("strategy", "repeat", "round", "n_labelled", "valid_accuracy", "seconds")
ACQUIRED_COLUMNS = ("strategy", "repeat", "round", "index", "score")


def last_accuracy(curve: pd.DataFrame) -> pd.Series:
    """Per strategy (in order of appearance): the mean over repeats of each repeat's
    last validation accuracy (repeats stopped by ``stop_error`` end early)."""
    last = curve.sort_values("round", kind="stable").groupby(["strategy", "repeat"], sort=False).tail(1)
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
