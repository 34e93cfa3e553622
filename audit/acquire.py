"""Acquisition functions: which unlabelled images to label next.

Pure functions from MC-dropout probabilities ``mc_probs`` (N, T, C) of a pool (and a
batch size k, a seed) to a :class:`CandidateBatch` of k pool positions with their
scores, higher = more worth labelling. They never read files or print.

- ``bald``: mutual information between the prediction and the weights (Houlsby et al.
  2011), top k.
- ``entropy``: max entropy of the predictive distribution, top k.
- ``varratio``: variation ratio, top k.
- ``meanstd``: mean standard deviation over classes, top k.
- ``random``: k uniformly at random (scores 0).
- ``powerbald``, ``softmaxbald``, ``powerentropy``, … (Kirsch et al. 2023, "Stochastic
  Batch Acquisition"): any of the four scores above, but the k are *sampled* without
  replacement with probability ∝ score^β (power) or ∝ exp(β·score) (softmax) instead of
  taken from the top, so a big batch is not k near-copies of one hard image. Exact
  (the Gumbel-top-k trick draws Plackett-Luce sequential sampling) and seeded; β = 1 is
  the paper's default.
- ``batchbald``: (Kirsch et al. 2019) greedily grows the batch that maximises the
  *joint* mutual information I(y_1..y_k; w). Needs the same T dropout masks for every
  pool image (``mc_predict(..., masks="consistent")``), so pass t is one network. The
  joint entropy is exact while the C^i label configurations of the batch so far fit
  in ``num_samples``; beyond, it is estimated from ``num_samples`` sampled
  configurations.

>>> import numpy as np
>>> p = np.random.default_rng(0).dirichlet(np.ones(3), size=(6, 8)).astype(np.float32)  # N=6, T=8, C=3
>>> acquire(p, "bald", 2).indices.shape
(2,)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import metrics
from .errors import AuditError, bad_param

# a top-k strategy's score, by name: mc_predict's field of that name
SCORE_OF = {"bald": "mutual_info", "entropy": "entropy", "varratio": "variation_ratio", "meanstd": "mean_std"}
SAMPLINGS = ("power", "softmax")
STRATEGIES = ("bald", "batchbald", "entropy", "varratio", "meanstd", "random",
              *(f"{m}{s}" for m in SAMPLINGS for s in SCORE_OF))
BETA = 1.0  # Kirsch et al. 2023's default for power and softmax sampling


def parse_strategy(strategy: str) -> tuple[str, str]:
    """(sampling, score): "top"/"power"/"softmax" and the score's strategy name
    ("powerbald" -> ("power", "bald")); random and batchbald are their own sampling."""
    if strategy not in STRATEGIES:
        raise bad_param("strategy", f"expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    for m in SAMPLINGS:
        if strategy.startswith(m) and strategy[len(m):] in SCORE_OF:
            return m, strategy[len(m):]
    if strategy in SCORE_OF:
        return "top", strategy
    return strategy, strategy


@dataclass(frozen=True)
class CandidateBatch:
    """indices: (k,) pool positions in acquisition order; scores: (k,) their scores
    (BatchBALD: the joint mutual information of the batch up to each one)."""

    indices: np.ndarray
    scores: np.ndarray


def _check(mc_probs: np.ndarray, k: int) -> np.ndarray:
    mc_probs = np.asarray(mc_probs)
    if mc_probs.ndim != 3:
        raise AuditError(f"mc_probs: expected (N, T, C), got shape {mc_probs.shape}")
    if not 1 <= k <= mc_probs.shape[0]:
        raise AuditError(f"k: expected 1..{mc_probs.shape[0]} (the pool size), got {k}")
    return mc_probs


def top_k(scores_N: np.ndarray, k: int) -> CandidateBatch:
    """The k highest scores, highest first (ties: lower index first)."""
    order = np.argsort(-scores_N, kind="stable")[:k]
    return CandidateBatch(order, scores_N[order])


def random_batch(rng: np.random.Generator, n: int, k: int) -> CandidateBatch:
    """k of n pool positions uniformly at random, without replacement (scores 0)."""
    return CandidateBatch(rng.choice(n, size=k, replace=False), np.zeros(k, np.float32))


def score_pool(mc_probs: np.ndarray, strategy: str) -> np.ndarray:
    """The per-image score a top-k strategy ranks by, (N, T, C) -> (N,)."""
    fn = {
        "bald": metrics.mutual_info,
        "entropy": lambda p: metrics.entropy(p.mean(axis=1)),
        "varratio": metrics.variation_ratio,
        "meanstd": metrics.mean_std,
    }
    if strategy not in fn:
        raise AuditError(f"strategy: {strategy!r} is not a top-k strategy ({', '.join(fn)})")
    return np.asarray(fn[strategy](mc_probs))


def stochastic_batch(scores_N: np.ndarray, k: int, sampling: str, *, beta: float = BETA,
                     seed: int = 0) -> CandidateBatch:
    """k positions drawn without replacement, each next one with probability ∝
    score^β ("power") or exp(β·score) ("softmax") among those left, in draw order.

    Exact: adding independent Gumbel noise to the log-weights and taking the top k is
    the same distribution as drawing one at a time (Kool et al. 2019). Scores at or
    below 0 (BALD's rounding) count as the smallest positive float under power.
    """
    if sampling not in SAMPLINGS:
        raise bad_param("sampling", f"expected one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if not (isinstance(beta, (int, float)) and np.isfinite(beta) and beta > 0):
        raise bad_param("beta", f"expected a positive number, got {beta!r}")
    s = np.asarray(scores_N, np.float64)
    if not 1 <= k <= len(s):
        raise AuditError(f"k: expected 1..{len(s)} (the pool size), got {k}")
    if sampling == "power":
        logw = beta * np.log(np.maximum(s, np.finfo(np.float64).tiny))
    else:
        logw = beta * s
    keys = logw + np.random.default_rng(seed).gumbel(size=len(s))
    order = np.argsort(-keys, kind="stable")[:k]
    return CandidateBatch(order, np.asarray(scores_N)[order].astype(np.float32))


def from_scores(scores: dict[str, np.ndarray], strategy: str, k: int, *, seed: int = 0,
                beta: float = BETA) -> CandidateBatch:
    """k positions by a top-k or sampled strategy from per-image scores (mc_predict's
    fields: mutual_info, entropy, …), so a pool is ranked without its (N, T, C) passes."""
    sampling, name = parse_strategy(strategy)
    if sampling not in ("top", *SAMPLINGS):
        raise AuditError(f"strategy: {strategy!r} needs the pass-wise probabilities, not scores")
    values = np.asarray(scores[SCORE_OF[name]])
    if sampling == "top":
        if not 1 <= k <= len(values):
            raise AuditError(f"k: expected 1..{len(values)} (the pool size), got {k}")
        return top_k(values, k)
    return stochastic_batch(values, k, sampling, beta=beta, seed=seed)


def acquire(mc_probs: np.ndarray, strategy: str, k: int, *, seed: int = 0, num_samples: int = 10000,
            beta: float = BETA) -> CandidateBatch:
    """k pool positions to label next by ``strategy`` (one of STRATEGIES)."""
    sampling, name = parse_strategy(strategy)
    mc_probs = _check(mc_probs, k)
    if strategy == "random":
        return random_batch(np.random.default_rng(seed), mc_probs.shape[0], k)
    if strategy == "batchbald":
        return batchbald(mc_probs, k, num_samples=num_samples, seed=seed)
    values = score_pool(mc_probs, name)
    if sampling == "top":
        return top_k(values, k)
    return stochastic_batch(values, k, sampling, beta=beta, seed=seed)


def _entropy_rows(q: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """-Σ q log q over the last two axes, (n, M, C) -> (n,); with ``weights`` (M,) the
    sampled estimator -mean_m Σ_c (q/w_m) log q."""
    logq = np.log(np.maximum(q, 1e-300))
    if weights is None:
        return -(q * logq).sum(axis=(1, 2))
    return -((q / weights[None, :, None]) * logq).sum(axis=2).mean(axis=1)


def batchbald(mc_probs: np.ndarray, k: int, *, num_samples: int = 10000, seed: int = 0,
              chunk: int = 64) -> CandidateBatch:
    """Greedy BatchBALD over a pool, (N, T, C) -> k positions with the joint MI so far.

    With one element it is BALD; it does not pick near-duplicates the way top-k BALD
    does, because a second copy adds no information once the first is in the batch.
    """
    mc_probs = _check(mc_probs, k)
    p = mc_probs.astype(np.float64)  # (N, T, C); float64: joint probabilities get small
    n, t, c = p.shape
    cond = np.asarray(metrics.expected_entropy(p))  # (N,) mean_t H[p_t]
    rng = np.random.default_rng(seed)

    joint = np.ones((t, 1))  # (T, M): P_t(configuration m of the labels chosen so far)
    weights = None  # None: exact (all C^i configurations); else p(config) of the samples
    chosen, scores = [], []
    cond_sum = 0.0
    available = np.ones(n, bool)
    for _ in range(k):
        m = joint.shape[1]
        best, best_h = -1, -np.inf
        cand = np.flatnonzero(available)
        for s in range(0, len(cand), chunk):
            idx = cand[s : s + chunk]
            # q[n, m, c] = mean_t joint[t, m] * p[n, t, c]: p(configuration m, y_n = c)
            q = np.einsum("tm,ntc->nmc", joint, p[idx], optimize=True) / t
            h = _entropy_rows(q, weights) - cond[idx]  # joint entropy gain minus the new term's aleatoric part
            j = int(np.argmax(h))
            if h[j] > best_h:
                best, best_h = int(idx[j]), float(h[j])
        chosen.append(best)
        available[best] = False
        cond_sum += float(cond[best])
        # extend the configurations with the chosen image's label
        pb = p[best]  # (T, C)
        if weights is None and m * c <= num_samples:
            joint = (joint[:, :, None] * pb[:, None, :]).reshape(t, m * c)  # exact: (T, M*C)
        else:
            if weights is None:
                # switch to sampling: draw configurations from the exact joint p(config) = mean_t joint
                pm = joint.mean(axis=0)
                picks = rng.choice(m, size=num_samples, p=pm / pm.sum())
                joint = joint[:, picks]
            # each sample's label for the new image, from the pass it came from: draw a
            # pass t ~ P_t(config) (its posterior given the configuration), then y ~ p_t
            post = joint / joint.sum(axis=0, keepdims=True)  # (T, S)
            ts = (post.cumsum(axis=0) > rng.random(joint.shape[1])[None, :]).argmax(axis=0)
            ys = (pb[ts].cumsum(axis=1) > rng.random(joint.shape[1])[:, None]).argmax(axis=1)
            joint = joint * pb[:, ys]  # (T, S)
            weights = joint.mean(axis=0)
        # the joint MI of the batch so far: H(y_1..y_i) - sum_i E_t H[p_t(y_i)]
        scores.append(best_h + cond[best] - cond_sum)
    return CandidateBatch(np.array(chosen), np.array(scores, np.float32))
