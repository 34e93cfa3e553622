"""Confident learning (Northcutt, Jiang & Chuang, JAIR 2021) on out-of-sample
probabilities, counted by cleanlab rather than re-derived here.

This project's share is the probabilities: the MC-dropout mean of models that did not
train on the images (the final model for the validation split, the fold models for the
training split with ``--folds``). cleanlab's share is the counting:

- per-class thresholds: the mean probability of class j over the images labelled j;
- the confident joint: images whose probability of class j reaches j's threshold,
  counted by (given label, j), calibrated to the label counts;
- the estimated joint of given and true labels (fractions of the split), and from its
  off-diagonal the estimated number of label errors, per given class and in all;
- cleanlab's own filter (``find_label_issues``, pruning by noise rate): which images
  it would call label issues.

Pure: arrays in, a dict and a mask out.
"""

from __future__ import annotations

import numpy as np

from .errors import AuditError


def confident_learning(labels: np.ndarray, probs: np.ndarray, class_names) -> tuple[dict, np.ndarray]:
    """(summary, issue mask) of one split: ``labels`` (N,) given labels, ``probs`` (N, C)
    out-of-sample probabilities. The summary holds lists (run.json's), by class in
    ``class_names`` order; the mask is cleanlab's label issues, (N,) bool.

    One line (AuditError) when a class has no images: its threshold is undefined.
    """
    from cleanlab.count import compute_confident_joint, estimate_joint, get_confident_thresholds
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    counts = np.bincount(labels, minlength=c)
    if (counts == 0).any():
        missing = class_names[int(np.flatnonzero(counts == 0)[0])]
        raise AuditError(f"confident learning: class {missing!r} has no images in this split, so its threshold "
                         "(the mean probability of its own images) is undefined")
    thresholds = get_confident_thresholds(labels, probs)
    cj = compute_confident_joint(labels, probs, thresholds=thresholds)
    joint = estimate_joint(labels, probs, confident_joint=cj)
    issues = find_label_issues(labels, probs, confident_joint=cj, filter_by="prune_by_noise_rate", n_jobs=1)
    off = joint.sum(axis=1) - np.diag(joint)  # given class j, true class another: a share of the split
    summary = {
        "n": int(n),
        "thresholds": [round(float(t), 6) for t in thresholds],
        "images": counts.astype(int).tolist(),
        "confident_joint": cj.astype(int).tolist(),
        "joint": [[round(float(v), 6) for v in row] for row in joint],
        "estimated_errors_per_class": [int(round(float(v) * n)) for v in off],
        "estimated_errors": int(round(float(off.sum()) * n)),
        "flagged_per_class": np.bincount(labels[issues], minlength=c).astype(int).tolist(),
        "flagged": int(issues.sum()),
    }
    return summary, np.asarray(issues, dtype=bool)


def top_pairs(summary: dict, class_names, most: int = 10) -> list[dict]:
    """The largest off-diagonal cells of the estimated joint: (given, true, estimated
    images), largest first, those of at least half an image."""
    joint = np.asarray(summary["joint"])
    n = summary["n"]
    cells = [(joint[i, j] * n, i, j) for i in range(len(joint)) for j in range(len(joint)) if i != j]
    cells.sort(key=lambda t: -t[0])
    return [{"given": class_names[i], "true": class_names[j], "images": int(round(v))}
            for v, i, j in cells[:most] if v >= 0.5]
