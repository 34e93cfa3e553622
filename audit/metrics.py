"""Uncertainty scores from MC-dropout predictions: pure, xp-agnostic functions.

Layout (design.md): ``mc_probs`` is (N, T, C) — N images, T stochastic passes, C
classes, each row a softmax; ``probs`` is its mean over passes, (N, C); ``labels``
is (N,) int. Every score is (N,) and **higher means more uncertain or more
suspicious**. Natural logarithms. Each function works on NumPy and CuPy arrays alike
and returns an array of the same kind; none prints, reads files or draws random numbers.

>>> import numpy as np
>>> uniform = np.full((1, 5, 4), 0.25, np.float32)          # 1 image, 5 passes, 4 classes
>>> float(entropy(uniform.mean(axis=1))[0])                 # ln 4
1.3862943...
>>> float(mutual_info(uniform)[0])                          # identical passes: no disagreement
0.0
"""

from __future__ import annotations

from . import _compat  # noqa: F401
from chainer.backend import get_array_module

# Smallest positive float32: p * log(max(p, tiny)) is 0 at p = 0 without log(0).
_TINY = 1.1754944e-38


def _xlogx_sum(p):
    """sum_c p_c log p_c over the last axis, with 0 log 0 = 0."""
    xp = get_array_module(p)
    return (p * xp.log(xp.maximum(p, _TINY))).sum(axis=-1)


def entropy(probs):
    """Predictive entropy H[p̄] = -Σ_c p̄_c log p̄_c, (N, C) -> (N,). Higher: more uncertain.

    Lies in [0, log C]; the origin's measure.
    """
    return -_xlogx_sum(probs)


def expected_entropy(mc_probs):
    """mean_t H[p_t], (N, T, C) -> (N,): the aleatoric part. Higher: noisier input."""
    return -_xlogx_sum(mc_probs).mean(axis=1)  # (N, T) -> (N,)


def mutual_info(mc_probs, probs=None):
    """BALD: H[p̄] - mean_t H[p_t], (N, T, C) -> (N,). Higher: the passes disagree
    (epistemic uncertainty). In [0, entropy]; rounding below 0 is clipped to 0."""
    xp = get_array_module(mc_probs)
    if probs is None:
        probs = mc_probs.mean(axis=1)  # (N, T, C) -> (N, C)
    return xp.maximum(entropy(probs) - expected_entropy(mc_probs), 0)


def variation_ratio(mc_probs):
    """1 - (passes voting for the modal class) / T, (N, T, C) -> (N,) (Gal's definition).

    0 when every pass picks the same class; at most 1 - 1/C. Higher: more uncertain.
    """
    xp = get_array_module(mc_probs)
    n, t, c = mc_probs.shape
    votes = mc_probs.argmax(axis=2)  # (N, T)
    counts = (votes[:, :, None] == xp.arange(c)[None, None, :]).sum(axis=1)  # (N, C)
    return 1 - counts.max(axis=1).astype(mc_probs.dtype) / t


def mean_std(mc_probs):
    """Mean over classes of the std over passes of p_tc, (N, T, C) -> (N,). Higher: more uncertain."""
    return mc_probs.std(axis=1).mean(axis=1)  # (N, T, C) -> (N, C) -> (N,)


def p_label(probs, labels):
    """p̄ at the given label, (N, C), (N,) -> (N,). *Lower* is more suspicious."""
    xp = get_array_module(probs)
    return probs[xp.arange(probs.shape[0]), labels]


def margin(probs, labels):
    """p̄[label] - max over other classes of p̄, (N, C), (N,) -> (N,).

    Negative: the model prefers another class. *Lower* is more suspicious.
    """
    xp = get_array_module(probs)
    given = probs[xp.arange(probs.shape[0]), labels]
    return given - strongest_other(probs, labels)[1]


def strongest_other(probs, labels):
    """The class other than the label with the highest p̄, and that p̄: (N, C), (N,) ->
    ((N,) int, (N,)). The class a relabelling would suggest."""
    xp = get_array_module(probs)
    rows = xp.arange(probs.shape[0])
    others = probs.copy()
    others[rows, labels] = -xp.inf
    other = others.argmax(axis=1)  # (N, C) -> (N,)
    return other, others[rows, other]


def pred(probs):
    """argmax of p̄, (N, C) -> (N,)."""
    return probs.argmax(axis=1)


# The label-free scores of an MC prediction, in scores.csv's column order.
SCORE_NAMES = ("entropy", "expected_entropy", "mutual_info", "variation_ratio", "mean_std")
# each one's Monte-Carlo standard error (jackknife over the T passes), scores.csv's columns after them
SE_NAMES = tuple(f"{n}_se" for n in SCORE_NAMES)
SCORE_COLUMNS = (*SCORE_NAMES, *SE_NAMES)


def jackknife_se(mc_probs) -> dict:
    """The Monte-Carlo standard error of each score from the T passes it was computed
    from, (N, T, C) -> {"entropy_se": (N,), ...}: the delete-one jackknife,

        se = sqrt((T - 1) / T * sum_t (s_(-t) - mean_t s_(-t))^2),

    where s_(-t) is the score computed without pass t. It says how much the score would
    move with another draw of T passes (its spread, not the model's uncertainty), and
    shrinks as 1/sqrt(T). Every leave-one-out score comes from running sums, so the cost
    is a few (N, T, C) operations. NaN with a single pass."""
    xp = get_array_module(mc_probs)
    n, t, c = mc_probs.shape
    if t < 2:
        nan = xp.full(n, xp.nan, dtype=mc_probs.dtype)
        return {name: nan.copy() for name in SE_NAMES}
    p = mc_probs
    s1 = p.sum(axis=1, keepdims=True)  # (N, 1, C)
    loo_mean = (s1 - p) / (t - 1)  # (N, T, C): p̄ without pass t
    h_loo = -_xlogx_sum(loo_mean)  # (N, T)
    h_t = -_xlogx_sum(p)  # (N, T): each pass's entropy
    eh_loo = (h_t.sum(axis=1, keepdims=True) - h_t) / (t - 1)
    mi_loo = xp.maximum(h_loo - eh_loo, 0)
    votes = p.argmax(axis=2)  # (N, T)
    onehot = (votes[:, :, None] == xp.arange(c)[None, None, :])
    counts = onehot.sum(axis=1, keepdims=True)  # (N, 1, C)
    vr_loo = 1 - (counts - onehot).max(axis=2).astype(p.dtype) / (t - 1)
    s2 = (p * p).sum(axis=1, keepdims=True)
    var_loo = (s2 - p * p) / (t - 1) - loo_mean * loo_mean  # population variance without pass t
    ms_loo = xp.sqrt(xp.maximum(var_loo, 0)).mean(axis=2)

    def se(loo):
        dev = loo - loo.mean(axis=1, keepdims=True)
        return xp.sqrt((t - 1) / t * (dev * dev).sum(axis=1)).astype(p.dtype)

    return dict(zip(SE_NAMES, (se(h_loo), se(eh_loo), se(mi_loo), se(vr_loo), se(ms_loo))))


def disagreement(model_probs):
    """How much M models' predictive distributions of the same images differ, (N, M, C)
    -> (N,): the generalized Jensen-Shannon divergence, the entropy of their average
    less the average of their entropies (nats, 0 when they agree, at most log M). It is
    the mutual information between the prediction and which model made it.

    >>> float(disagreement(np.array([[[1.0, 0.0], [0.0, 1.0]]]))[0]) == float(np.log(2))
    True
    """
    xp = get_array_module(model_probs)
    return xp.maximum(entropy(model_probs.mean(axis=1)) - (-_xlogx_sum(model_probs)).mean(axis=1), 0)


def all_scores(mc_probs) -> dict:
    """Every label-free score of ``mc_probs`` (N, T, C), with its standard error
    (:func:`jackknife_se`), plus ``probs`` (N, C).

    Shares the mean and the per-pass entropies between the scores.
    """
    probs = mc_probs.mean(axis=1)  # (N, T, C) -> (N, C)
    h = entropy(probs)
    eh = expected_entropy(mc_probs)
    xp = get_array_module(mc_probs)
    return {
        "probs": probs,
        "entropy": h,
        "expected_entropy": eh,
        "mutual_info": xp.maximum(h - eh, 0),
        "variation_ratio": variation_ratio(mc_probs),
        "mean_std": mean_std(mc_probs),
        **jackknife_se(mc_probs),
    }
