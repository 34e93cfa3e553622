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
