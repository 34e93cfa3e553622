from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from audit import metrics
from audit.acquire import STRATEGIES, acquire, batchbald, stochastic_batch
from audit.metrics import mutual_info
from audit.errors import AuditError


def _pool(n=40, t=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 1, c)) * 2 + rng.normal(size=(n, t, c)) * rng.uniform(0, 2, size=(n, 1, 1))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _joint_mi_brute(p, idx):
    """I(y_idx; w) by enumerating every label configuration."""
    c = p.shape[2]
    h = 0.0
    for ys in itertools.product(range(c), repeat=len(idx)):
        pt = np.prod([p[i, :, y] for i, y in zip(idx, ys)], axis=0).astype(np.float64)  # (T,)
        q = pt.mean()
        h -= q * math.log(q) if q > 0 else 0.0
    cond = sum(float(metrics.expected_entropy(p[i : i + 1].astype(np.float64))[0]) for i in idx)
    return h - cond


@pytest.mark.parametrize("strategy, metric", [
    ("bald", metrics.mutual_info), ("varratio", metrics.variation_ratio), ("meanstd", metrics.mean_std),
    ("entropy", lambda p: metrics.entropy(p.mean(1))),
])
def test_top_k_strategies_take_the_highest(strategy, metric):
    p = _pool()
    got = acquire(p, strategy, 5)
    s = np.asarray(metric(p))
    assert set(got.indices) == set(np.argsort(-s, kind="stable")[:5])
    np.testing.assert_allclose(got.scores, np.sort(s)[::-1][:5], rtol=1e-6)


def test_random_is_seeded_and_distinct():
    p = _pool()
    a, b, c = acquire(p, "random", 10, seed=1), acquire(p, "random", 10, seed=1), acquire(p, "random", 10, seed=2)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert len(set(a.indices)) == 10 and not np.array_equal(a.indices, c.indices)


def test_batchbald_of_one_is_bald():
    p = _pool()
    bb = batchbald(p, 1)
    mi = np.asarray(metrics.mutual_info(p.astype(np.float64)))
    assert bb.indices[0] == int(np.argmax(mi))
    np.testing.assert_allclose(bb.scores[0], mi.max(), rtol=1e-5)


def test_batchbald_exact_joint_mi_matches_brute_force():
    p = _pool(n=12, t=10, c=3)
    bb = batchbald(p, 3)
    for i in range(1, 4):
        np.testing.assert_allclose(bb.scores[i - 1], _joint_mi_brute(p, list(bb.indices[:i])), rtol=1e-6, atol=1e-9)
    # the joint MI of a batch never exceeds the sum of its BALD scores
    mi = np.asarray(metrics.mutual_info(p.astype(np.float64)))
    assert bb.scores[-1] <= mi[bb.indices].sum() + 1e-9


def test_batchbald_sampled_estimate_is_close_to_exact():
    p = _pool(n=20, t=12, c=4, seed=3)
    # 4^5 = 1024 configurations fit in 2000; the 7th pick needs 4^6 = 4096: sampled
    exact = batchbald(p, 7, num_samples=10**6)
    sampled = batchbald(p, 7, num_samples=2000, seed=0)
    np.testing.assert_array_equal(sampled.indices[:6], exact.indices[:6])
    truth = _joint_mi_brute(p, list(sampled.indices))
    np.testing.assert_allclose(sampled.scores[-1], truth, rtol=0.03)
    np.testing.assert_allclose(exact.scores[-1], _joint_mi_brute(p, list(exact.indices)), rtol=1e-6)


def test_batchbald_avoids_duplicates_that_bald_takes():
    p = _pool(n=30, seed=5)
    mi = np.asarray(metrics.mutual_info(p))
    star = int(np.argmax(mi))
    pool = np.concatenate([p, np.repeat(p[star : star + 1], 4, axis=0)])  # 4 copies of the most informative
    copies = {star, 30, 31, 32, 33}
    bald = acquire(pool, "bald", 4)
    assert set(bald.indices) <= copies
    bb = acquire(pool, "batchbald", 4)
    assert len(set(bb.indices) & copies) == 1


def test_bad_input():
    p = _pool(n=5)
    with pytest.raises(AuditError, match="^strategy: "):
        acquire(p, "coreset", 2)
    with pytest.raises(AuditError, match=r"k: expected 1..5"):
        acquire(p, "bald", 6)
    with pytest.raises(AuditError, match=r"mc_probs: expected \(N, T, C\)"):
        acquire(p[:, 0], "bald", 1)
    assert set(STRATEGIES) == {"bald", "batchbald", "entropy", "varratio", "meanstd", "random",
                               *(m + s for m in ("power", "softmax") for s in ("bald", "entropy", "varratio", "meanstd"))}
    with pytest.raises(AuditError, match="^beta: expected a positive number"):
        acquire(p, "powerbald", 2, beta=0)
    with pytest.raises(AuditError, match="^beta: "):
        acquire(p, "softmaxentropy", 2, beta=float("nan"))


def test_stochastic_batch_draws_the_stated_distribution():
    """Power sampling, first pick: P(i) = s_i^beta / sum s^beta; the pair (first,
    second) follows sequential sampling without replacement. 20,000 seeded draws."""
    s = np.array([0.5, 0.3, 0.15, 0.05])
    n = 20000
    firsts, pairs = np.zeros(4), {}
    for seed in range(n):
        b = stochastic_batch(s, 2, "power", beta=2.0, seed=seed)
        firsts[b.indices[0]] += 1
        pairs[tuple(b.indices)] = pairs.get(tuple(b.indices), 0) + 1
    w = s ** 2
    expect = w / w.sum()
    assert np.abs(firsts / n - expect).max() < 0.01  # 3 sigma at n=20000 is < 0.011
    p01 = expect[0] * w[1] / (w.sum() - w[0])
    assert abs(pairs[(0, 1)] / n - p01) < 0.01
    # softmax: exp(beta * s); a huge beta is top-k, and no image twice
    b = stochastic_batch(s, 4, "softmax", beta=1e4, seed=1)
    assert list(b.indices) == [0, 1, 2, 3] and np.allclose(b.scores, s)
    # zero and negative scores (BALD's rounding) can still be drawn under power, last
    b = stochastic_batch(np.array([0.0, -1e-9, 1.0]), 3, "power", seed=0)
    assert b.indices[0] == 2 and sorted(b.indices) == [0, 1, 2]


def test_powerbald_spreads_a_batch_over_near_duplicates():
    """Top-k BALD takes all copies of the most informative image; powerbald does not
    (sampled), and is seeded."""
    p = _pool(n=200, seed=3)
    star = int(np.argmax(mutual_info(p)))
    pool = np.concatenate([p, np.repeat(p[star: star + 1], 20, axis=0)])
    copies = {star, *range(200, 220)}
    top = acquire(pool, "bald", 20)
    assert set(top.indices) <= copies
    pb = acquire(pool, "powerbald", 20, seed=5)
    assert len(set(pb.indices) & copies) < 15
    assert np.array_equal(pb.indices, acquire(pool, "powerbald", 20, seed=5).indices)
    assert not np.array_equal(pb.indices, acquire(pool, "powerbald", 20, seed=6).indices)
    # from the scores alone: the same batch
    from audit.acquire import from_scores

    assert np.array_equal(from_scores({"mutual_info": mutual_info(pool)}, "powerbald", 20, seed=5).indices,
                          pb.indices)
