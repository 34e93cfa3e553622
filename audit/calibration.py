"""Calibration: how far predicted probabilities are from observed frequencies, and a
temperature that brings them closer. Pure functions on NumPy arrays.

- ``ece``: expected calibration error over 15 equal-width confidence bins (Guo et al.
  2017): Σ_b (n_b / N) |accuracy_b − confidence_b|, confidence = max_c p_c.
- ``nll``: mean −log p[label].
- ``fit_temperature``: the T > 0 that minimises the NLL of p^(1/T) renormalised (the
  probabilities' logarithms divided by T: temperature scaling of an averaged
  prediction), on held-out images; it never changes the predicted class.

>>> import numpy as np
>>> p = np.array([[0.9, 0.1], [0.6, 0.4]]); y = np.array([0, 1])
>>> round(ece(p, y), 3)    # bin 0.9: right (|1 - 0.9|), bin 0.6: wrong (|0 - 0.6|)
0.35
"""

from __future__ import annotations

import numpy as np

BINS = 15
T_RANGE = (0.05, 20.0)


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"expected (N, C) probabilities and (N,) labels, got {probs.shape} and {labels.shape}")
    return probs, labels


def ece(probs, labels, bins: int = BINS) -> float:
    """Expected calibration error of the top-class confidence, equal-width bins; NaN
    for no images."""
    probs, labels = _check(probs, labels)
    if not len(labels):
        return float("nan")
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)  # a confidence of 1.0 falls in the last bin
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(right[m].mean() - conf[m].mean())
    return float(total / len(labels))


def reliability(probs, labels, bins: int = BINS) -> list[dict]:
    """Per confidence bin with images: its range, count, mean confidence and accuracy
    (what a reliability diagram draws; ``ece`` is their weighted gap)."""
    probs, labels = _check(probs, labels)
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(m.sum()),
                        "confidence": float(conf[m].mean()), "accuracy": float(right[m].mean())})
    return out


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the labels (probabilities floored at 1e-12 and
    capped at 1: a float32 mean can land a hair above it, which read as a negative NLL)."""
    probs, labels = _check(probs, labels)
    if not len(labels):
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean()) + 0.0  # not -0.0


def with_temperature(probs, t: float) -> np.ndarray:
    """p^(1/T), renormalised: T > 1 softens, T < 1 sharpens; the argmax stays."""
    logp = np.log(np.maximum(np.asarray(probs, np.float64), 1e-12)) / t
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs, labels, *, tol: float = 1e-4) -> float:
    """The T in T_RANGE with the least NLL of ``with_temperature(probs, T)``, by a
    golden-section search on log T (the NLL is convex in 1/T, so unimodal in log T)."""
    probs, labels = _check(probs, labels)
    if not len(labels):
        raise ValueError("no held-out images to fit a temperature on")
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    g = (np.sqrt(5) - 1) / 2

    def f(x):
        return nll(with_temperature(probs, float(np.exp(x))), labels)

    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return float(np.exp((lo + hi) / 2))
