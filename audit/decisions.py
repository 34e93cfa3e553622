"""Review decisions (keep / drop / relabel) and the curated training set they make (pure: no run folder).

decisions.csv, as the report's export writes it:

    split,index,path,action,new_label
    train,4711,,relabel,9
    train,123,,drop,
    valid,88,,keep,

``index`` is the position in its split as loaded; ``new_label`` a class name (only
for ``relabel``); ``path`` optional, and checked when the data came from files.
The source data is never modified: a curated run keeps every image, trains on the
kept indices, with the new labels, and records the decisions it applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .data import SPLITS, Dataset, Split, fingerprint
from .errors import AuditError

ACTIONS = ("keep", "drop", "relabel")
DECISION_COLUMNS = ("split", "index", "path", "action", "new_label")


@dataclass(frozen=True)
class Curated:
    """A dataset after review decisions.

    dataset: the same images; training labels replaced where relabelled.
    train_indices: (M,) training indices to train on (dropped ones left out).
    """

    dataset: Dataset
    train_indices: np.ndarray
    dropped: int
    relabelled: int
    kept: int
    valid_decisions: int  # decisions on validation images: recorded, not applied


def read_decisions(path: str | os.PathLike, data: bytes | None = None) -> pd.DataFrame:
    """decisions.csv from ``path`` (or its already read ``data``), every cell as text,
    restored from its spreadsheet-safe form."""
    from .tables import parse_table, restore_frame

    path = Path(path)
    if data is None:
        if not path.is_file():
            raise AuditError(f"--decisions: {path} does not exist")
        data = path.read_bytes()
    df = parse_table(data, path, ("split", "index", "action"),
                     hint=f"; expected {','.join(DECISION_COLUMNS)}", dtype=str, keep_default_na=False)
    for c in ("path", "new_label"):
        if c not in df.columns:
            df[c] = ""
    return restore_frame(df[list(DECISION_COLUMNS)].copy())


def validate_decisions(decisions: pd.DataFrame, dataset: Dataset, *, source: str = "decisions") -> pd.DataFrame:
    """Check every row against ``dataset``; returns a typed copy (index int, new_label int or -1)."""
    df = decisions.copy()
    names = list(dataset.class_names)
    idx, new = [], []
    for row_no, r in enumerate(df.itertuples(index=False), start=2):  # line 1 is the header
        where = f"{source}: line {row_no}"
        if r.split not in SPLITS:
            raise AuditError(f"{where}: split {r.split!r} is not one of {', '.join(SPLITS)}")
        if r.action not in ACTIONS:
            raise AuditError(f"{where}: action {r.action!r} is not one of {', '.join(ACTIONS)}")
        s = dataset.split(r.split)
        try:
            i = int(str(r.index).strip())
        except ValueError:
            raise AuditError(f"{where}: index {r.index!r} is not an integer") from None
        if not 0 <= i < len(s):
            raise AuditError(f"{where}: {r.split} index {i} is out of range (0..{len(s) - 1})")
        if r.path and s.paths is not None and s.paths[i] != r.path:
            raise AuditError(f"{where}: {r.split} index {i} is {s.paths[i]!r}, not {r.path!r}")
        if r.action == "relabel":
            if r.new_label not in names:
                raise AuditError(
                    f"{where}: new_label {r.new_label!r} is not a class (classes: {', '.join(names[:20])})"
                )
            new.append(names.index(r.new_label))
        elif r.new_label not in ("", None):
            raise AuditError(f"{where}: new_label {r.new_label!r} given for action {r.action!r}; only relabel takes one")
        else:
            new.append(-1)
        idx.append(i)
    df["index"] = np.array(idx, dtype=np.int64)
    df["new_label"] = np.array(new, dtype=np.int64)
    dup = df.duplicated(["split", "index"], keep=False)
    if dup.any():
        r = df[dup].iloc[0]
        raise AuditError(f"{source}: {r['split']} index {r['index']} has more than one decision")
    return df


def apply_decisions(
    dataset: Dataset, decisions: pd.DataFrame, *, train_indices: np.ndarray | None = None
) -> Curated:
    """The curated training set: drops left out, relabels applied; the source untouched.

    Decisions on validation images are validated and counted but not applied, so the
    validation accuracy before and after compare on the same images.
    """
    df = validate_decisions(decisions, dataset)
    train = df[df["split"] == "train"]
    y = dataset.train.y.copy()
    rel = train[train["action"] == "relabel"]
    y[rel["index"].to_numpy()] = rel["new_label"].to_numpy().astype(np.int32)
    base = np.arange(len(y)) if train_indices is None else np.asarray(train_indices)
    dropped = train.loc[train["action"] == "drop", "index"].to_numpy()
    keep = base[~np.isin(base, dropped)]
    new_train = Split(dataset.train.x, y, dataset.train.paths)
    curated = replace(
        dataset,
        train=new_train,
        fingerprint=fingerprint(new_train, dataset.valid, dataset.class_names),
    )
    return Curated(
        curated,
        keep,
        dropped=int(np.isin(dropped, base).sum()),
        relabelled=int(len(rel)),
        kept=int((train["action"] == "keep").sum()),
        valid_decisions=int((df["split"] == "valid").sum()),
    )


def flagged_decisions(scores: pd.DataFrame) -> pd.DataFrame:
    """``drop`` for every flagged training image of scores.csv."""
    f = scores[(scores["split"] == "train") & (scores["flag"].fillna("") != "")]
    return pd.DataFrame(
        {"split": "train", "index": f["index"].astype(str), "path": f["path"] if "path" in f else "",
         "action": "drop", "new_label": ""}
    )[list(DECISION_COLUMNS)]
