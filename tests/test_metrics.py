from __future__ import annotations

import math

import numpy as np
import pytest

from audit import metrics as M


def _random_mc(n=64, t=20, c=5, seed=0, sharp=3.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, t, c)) * sharp + rng.normal(size=(n, 1, c)) * sharp
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def test_uniform_is_log_c():
    u = np.full((3, 7, 4), 0.25, np.float32)
    np.testing.assert_allclose(M.entropy(u.mean(1)), math.log(4), rtol=1e-6)
    np.testing.assert_allclose(M.expected_entropy(u), math.log(4), rtol=1e-6)
    np.testing.assert_allclose(M.mutual_info(u), 0, atol=1e-7)
    np.testing.assert_allclose(M.mean_std(u), 0)


def test_one_hot_is_zero():
    p = np.zeros((2, 5, 3), np.float32)
    p[:, :, 1] = 1
    for f in (M.expected_entropy, M.mutual_info, M.variation_ratio, M.mean_std):
        np.testing.assert_array_equal(f(p), 0)
    np.testing.assert_array_equal(M.entropy(p.mean(1)), 0)


def test_disagreeing_confident_passes_are_epistemic():
    # half the passes say class 0, half class 1, each with certainty: H = ln 2, E[H] = 0
    p = np.zeros((1, 10, 3), np.float32)
    p[0, :5, 0] = 1
    p[0, 5:, 1] = 1
    np.testing.assert_allclose(M.mutual_info(p), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(M.variation_ratio(p), 0.5)
    np.testing.assert_allclose(M.mean_std(p), (0.5 + 0.5 + 0) / 3, rtol=1e-6)


def test_variation_ratio_counts_modal_votes():
    p = np.zeros((1, 4, 3), np.float32)
    p[0, [0, 1, 2], 2] = 1
    p[0, 3, 0] = 1
    np.testing.assert_allclose(M.variation_ratio(p), 0.25)


@pytest.mark.parametrize("seed", range(5))
def test_bounds(seed):
    mc = _random_mc(seed=seed)
    h, eh, mi = M.entropy(mc.mean(1)), M.expected_entropy(mc), M.mutual_info(mc)
    assert (mi >= 0).all() and (mi <= h + 1e-6).all() and (h <= math.log(5) + 1e-6).all()
    assert (eh >= -1e-7).all()
    vr = M.variation_ratio(mc)
    assert (vr >= 0).all() and (vr <= 1 - 1 / 5 + 1e-6).all()


def test_invariant_to_permuting_passes():
    mc = _random_mc()
    perm = np.random.default_rng(1).permutation(mc.shape[1])
    a, b = M.all_scores(mc), M.all_scores(mc[:, perm])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_identical_passes_have_no_mutual_info():
    one = _random_mc(t=1)
    mc = np.repeat(one, 9, axis=1)
    np.testing.assert_allclose(M.mutual_info(mc), 0, atol=1e-6)
    np.testing.assert_allclose(M.variation_ratio(mc), 0)


def test_all_scores_matches_the_single_functions():
    mc = _random_mc()
    s = M.all_scores(mc)
    np.testing.assert_allclose(s["mutual_info"], M.mutual_info(mc), rtol=1e-6)
    np.testing.assert_allclose(s["variation_ratio"], M.variation_ratio(mc))
    np.testing.assert_allclose(s["mean_std"], M.mean_std(mc))


def test_label_scores():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    labels = np.array([0, 1])
    np.testing.assert_allclose(M.p_label(probs, labels), [0.7, 0.3])
    np.testing.assert_allclose(M.margin(probs, labels), [0.5, -0.3], rtol=1e-6)
    assert M.pred(probs).tolist() == [0, 2]
    assert probs[1, 1] == np.float32(0.3)  # margin does not modify its input


# ------------------------------------------------------------------ standard errors


def _loo_brute(p):
    """Each score without pass t, by recomputing it: (N, T, C) -> {name: (N, T)}."""
    from audit import metrics as M

    n, t, c = p.shape
    out = {name: np.empty((n, t)) for name in M.SCORE_NAMES}
    for j in range(t):
        q = np.delete(p, j, axis=1)
        s = M.all_scores(q)
        for name in M.SCORE_NAMES:
            out[name][:, j] = s[name]
    return out


def test_jackknife_se_is_the_leave_one_out_formula():
    from audit import metrics as M

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(4, 0.7), size=(6, 9)).astype(np.float64)  # N=6, T=9, C=4
    se = M.jackknife_se(p)
    loo = _loo_brute(p)
    t = p.shape[1]
    for name in M.SCORE_NAMES:
        d = loo[name] - loo[name].mean(axis=1, keepdims=True)
        want = np.sqrt((t - 1) / t * (d * d).sum(axis=1))
        np.testing.assert_allclose(se[f"{name}_se"], want, rtol=1e-6, atol=1e-9, err_msg=name)
    one = M.jackknife_se(p[:, :1])
    assert all(np.isnan(v).all() for v in one.values())


def test_jackknife_se_measures_the_spread_over_draws_of_passes():
    """The standard error predicts how much a score moves when its T passes are drawn
    again: the mean SE is within 25% of the spread over 400 independent draws, and it
    halves when T quadruples."""
    from audit import metrics as M

    rng = np.random.default_rng(1)
    alpha = np.array([2.0, 1.0, 0.5])

    def draw(t, reps):
        return rng.dirichlet(alpha, size=(reps, t))  # each rep an image's T passes from one posterior

    for t in (25, 100):
        p = draw(t, 400)
        scores = M.all_scores(p)
        for name in ("entropy", "mutual_info", "mean_std", "expected_entropy"):
            spread = scores[name].std()
            mean_se = scores[f"{name}_se"].mean()
            assert 0.75 < mean_se / spread < 1.25, (t, name, mean_se, spread)
    se25 = M.all_scores(draw(25, 400))["entropy_se"].mean()
    se100 = M.all_scores(draw(100, 400))["entropy_se"].mean()
    assert 1.7 < se25 / se100 < 2.3
