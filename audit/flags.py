"""Label audit: turn scores into a relabelling worklist.

The rule, per image (``probs`` is the MC mean p̄, ``labels`` the given labels):

- ``mislabel_score`` = max over other classes of p̄ − p̄[label] (= −margin), in
  [−1, 1]; **higher = the label is more likely wrong**. It uses the given label, so a
  confidently mislabelled image (a clear 9 labelled 8, low entropy) ranks at the top.
- ``mislabeled``: the model prefers another class and gives it p̄ ≥ ``confidence``;
  the suggested label is that class.
- ``ambiguous``: not mislabeled, but the given label has p̄ < ``confidence``: the
  probability is split between classes. The suggested label is the strongest other
  class, as an alternative to check. The reason says whether the uncertainty is
  mostly aleatoric (high expected entropy: the image itself is ambiguous) or epistemic
  (high mutual information: the model has seen nothing like it).

With ``rule="cleanlab"`` (the default), rows whose probabilities are out of sample and
were judged by cleanlab's filter (the ``cl_issue`` column: 1 or 0; empty elsewhere) are
``mislabeled`` exactly when cleanlab calls them label issues (``find_label_issues``,
pruning by the estimated noise rate: per class pair as many as the confident joint
estimates); the other rows follow the confidence rule above. bench/label_noise.py
measured both on planted noise: see the README for why cleanlab's filter is the default.

``flag_top`` keeps at most that many flags of each kind per split and class (the
highest ``mislabel_score`` first), so a reviewer gets a worklist balanced over classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import metrics
from .errors import AuditError, bad_param

FLAGS = ("mislabeled", "ambiguous")
RULES = ("cleanlab", "confidence")


@dataclass(frozen=True)
class FlagConfig:
    """Settings of :func:`flag_issues`; recorded in run.json."""

    confidence: float = 0.5  # p̄ an other class needs to be called the right one
    flag_top: int | None = 50  # flags of each kind per split and class; None: all
    rule: str = "cleanlab"  # who calls an out-of-sample row mislabeled: cleanlab's filter, or the confidence rule

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise bad_param("flag_rule", f"expected one of {', '.join(RULES)}, got {self.rule!r}")
        if not 0.0 < self.confidence < 1.0:
            raise bad_param("confidence", f"expected a probability in (0, 1), got {self.confidence}")
        if self.flag_top is not None and self.flag_top < 1:
            raise bad_param("flag_top", f"expected at least 1, got {self.flag_top}")


def flag_issues(
    scores: pd.DataFrame,
    probs: np.ndarray,
    *,
    class_names: tuple[str, ...] | list[str] | None = None,
    config: FlagConfig = FlagConfig(),
) -> pd.DataFrame:
    """``scores`` with ``mislabel_score``, ``flag``, ``suggested_label`` and ``reason`` added.

    ``scores`` is scores.csv as a DataFrame (at least ``split``, ``label``,
    ``entropy``, ``expected_entropy``, ``mutual_info``), ``probs`` the (N, C) MC
    means aligned with it. ``suggested_label`` is -1 where there is no flag.

    >>> import numpy as np, pandas as pd
    >>> probs = np.array([[0.05, 0.95], [0.55, 0.45], [0.9, 0.1]], np.float32)
    >>> df = pd.DataFrame({"split": "train", "label": [0, 0, 0], "entropy": 0.1,
    ...                    "expected_entropy": 0.1, "mutual_info": 0.0})
    >>> flag_issues(df, probs)[["flag", "suggested_label"]].values.tolist()
    [['mislabeled', 1], ['', -1], ['', -1]]
    """
    need = [c for c in ("split", "label", "entropy", "expected_entropy", "mutual_info") if c not in scores.columns]
    if need:
        raise AuditError(f"scores: missing column(s) {', '.join(need)}")
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or len(probs) != len(scores):
        raise AuditError(f"probs: expected ({len(scores)}, C) rows aligned with the scores, got {probs.shape}")
    labels = scores["label"].to_numpy().astype(np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= probs.shape[1]:
        raise AuditError(f"scores: labels must lie in 0..{probs.shape[1] - 1}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(probs.shape[1])]

    out = scores.drop(columns=[c for c in ("mislabel_score", "flag", "suggested_label", "reason") if c in scores])
    given = probs[np.arange(len(labels)), labels]
    other, p_other = metrics.strongest_other(probs, labels)  # the strongest class other than the label
    ml_score = -metrics.margin(probs, labels)

    issues = cleanlab_issues(scores, config)
    flag = uncapped_flags(probs, labels, config.confidence, issues)

    if config.flag_top is not None:
        # keep the flag_top most suspicious of each kind per split and class
        order = pd.DataFrame({"split": scores["split"].to_numpy(), "label": labels, "flag": flag, "s": ml_score})
        rank = order[order.flag != ""].groupby(["split", "label", "flag"])["s"].rank(method="first", ascending=False)
        drop = rank[rank > config.flag_top].index
        flag[drop] = ""

    eh = scores["expected_entropy"].to_numpy()
    mi = scores["mutual_info"].to_numpy()
    reasons = np.full(len(labels), "", dtype=object)
    for i in np.flatnonzero(flag != ""):
        o, lab = int(other[i]), int(labels[i])
        if flag[i] == "mislabeled" and issues is not None and issues[i] == 1:
            reasons[i] = (f"a label issue by cleanlab's filter: p(label {names[lab]})={given[i]:.2f}; {names[o]} is "
                          f"the likeliest other class, p={p_other[i]:.2f}")
        elif flag[i] == "mislabeled":
            reasons[i] = f"predicted {names[o]} with p={p_other[i]:.2f}; p(label {names[lab]})={given[i]:.2f}"
        else:
            kind = "mostly aleatoric: the image itself is ambiguous" if eh[i] >= mi[i] else (
                "mostly epistemic: unlike what the model has seen")
            reasons[i] = f"split between {names[lab]} ({given[i]:.2f}) and {names[o]} ({p_other[i]:.2f}); {kind}"
    out["mislabel_score"] = ml_score.astype(np.float32)
    out["flag"] = flag
    out["suggested_label"] = np.where(flag != "", other, -1).astype(np.int64)
    out["reason"] = reasons
    return out


def cleanlab_issues(scores: pd.DataFrame, config: FlagConfig) -> np.ndarray | None:
    """With ``config.rule`` "cleanlab": (N,) of 1 (cleanlab's filter calls the row a
    label issue), 0 (it does not) and NaN (not judged: in sample) from ``scores``'
    ``cl_issue``; None with the confidence rule or no such column."""
    if config.rule != "cleanlab" or "cl_issue" not in scores.columns:
        return None
    v = pd.to_numeric(scores["cl_issue"].replace("", np.nan), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    known = ~np.isnan(v)
    if not np.isin(v[known], (0, 1)).all():
        raise AuditError("scores: column cl_issue holds something other than 1, 0 or empty")
    return v


def uncapped_flags(probs: np.ndarray, labels: np.ndarray, confidence: float,
                   issues: np.ndarray | None = None) -> np.ndarray:
    """The flag of every row before ``flag_top`` caps them: (N, C), (N,) -> (N,) of
    "mislabeled", "ambiguous" or "". ``issues`` (:func:`cleanlab_issues`): where it is 1
    or 0, cleanlab's filter decides "mislabeled" instead of ``confidence``."""
    given = probs[np.arange(len(labels)), labels]
    mislabeled = metrics.strongest_other(probs, labels)[1] >= confidence
    if issues is not None:
        mislabeled = np.where(np.isnan(issues), mislabeled, issues == 1)
    ambiguous = ~mislabeled & (given < confidence)
    return np.where(mislabeled, "mislabeled", np.where(ambiguous, "ambiguous", ""))


def left_out(scores: pd.DataFrame, probs: np.ndarray, config: FlagConfig) -> dict[str, int]:
    """How many flags ``config.flag_top`` left out, per "split/kind" (none: empty): what
    :func:`flag_issues` would have flagged without the cap, less what it kept."""
    labels = scores["label"].to_numpy().astype(np.int64)
    every = uncapped_flags(np.asarray(probs, np.float32), labels, config.confidence, cleanlab_issues(scores, config))
    kept = scores["flag"].to_numpy()
    out = {}
    for split in dict.fromkeys(scores["split"]):
        rows = scores["split"].to_numpy() == split
        for kind in FLAGS:
            n = int(((every == kind) & rows).sum() - ((kept == kind) & rows).sum())
            if n:
                out[f"{split}/{kind}"] = n
    return out


def pair_counts(flagged: pd.DataFrame, class_names: list[str], top: int = 10) -> list[dict]:
    """The most frequent given -> suggested pairs among flagged rows."""
    f = flagged[flagged["flag"] != ""]
    counts = f.groupby(["label", "suggested_label"]).size().sort_values(ascending=False).head(top)
    return [
        {"given": class_names[int(g)], "suggested": class_names[int(s)], "n": int(n)}
        for (g, s), n in counts.items()
    ]
