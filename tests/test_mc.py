from __future__ import annotations

import chainer
import numpy as np
import pytest

import audit
from audit import mc
from audit.errors import AuditError


@pytest.fixture(scope="module")
def model():
    return audit.build_model(4, (1, 12, 12), seed=1, dropout=0.5)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (150, 1, 12, 12), dtype=np.uint8)


def _sampler(mode="independent", samples=6, seed=0, ratio=0.5):  # the per-image masks
    return mc.MaskSampler(samples=samples, widths=(1000, 1000), ratios=(ratio, ratio), seed=seed, mode=mode,
                          device=chainer.get_device("@numpy"))


@pytest.mark.parametrize("masks", ["shared", "independent", "consistent"])
@pytest.mark.parametrize("arch, dropout", [("origin", 0.5), ("origin", 0.3), ("gal", 0.5)])
def test_engine_equals_the_per_image_reference(images, arch, dropout, masks):
    """With the same masks, the same numbers: the kept-units engine ("shared") and the
    dense one ("independent") against the whole network run image by image and pass by
    pass through chainer's own functions."""
    m = audit.build_model(4, (1, 12, 12), seed=2, dropout=dropout, arch=arch)
    x = images[:140]
    offset = 1000 if masks == "shared" else 0  # crosses a group boundary (1024) / a mask block boundary (128)
    r = mc.mc_predict(m, x, samples=6, batch_size=32, seed=3, return_mc=True, masks=masks, offset=offset)
    sampler = mc.MaskSampler.for_model(m, samples=6, seed=3, mode=masks)
    m1, m2 = (np.broadcast_to(m, (len(x), *m.shape[1:])) for m in sampler(offset, offset + len(x)))
    ref = mc.reference_mc_probs(m, x, m1, m2)
    np.testing.assert_allclose(r.mc_probs, ref, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(r.probs, ref.mean(axis=1), rtol=1e-5, atol=2e-6)


def test_scores_do_not_depend_on_batch_size(model, images):
    a = mc.mc_predict(model, images, samples=5, batch_size=7, seed=1)
    b = mc.mc_predict(model, images, samples=5, batch_size=128, seed=1)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    np.testing.assert_allclose(a.mutual_info, b.mutual_info, atol=1e-5)


def test_seeded(model, images):
    a = mc.mc_predict(model, images, samples=5, seed=1)
    b = mc.mc_predict(model, images, samples=5, seed=1)
    c = mc.mc_predict(model, images, samples=5, seed=2)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert not np.array_equal(a.probs, c.probs)


def test_passes_differ_and_masks_are_independent_per_image(model, images):
    same = np.repeat(images[:1], 3, axis=0)
    r = mc.mc_predict(model, same, samples=4, return_mc=True, masks="independent")
    assert not np.allclose(r.mc_probs[0, 0], r.mc_probs[0, 1])  # passes differ
    assert not np.allclose(r.mc_probs[0], r.mc_probs[1])  # same image, other masks


def test_shared_masks_are_shared_within_a_group_only(model, images):
    same = np.repeat(images[:1], 4, axis=0)
    r = mc.mc_predict(model, same, samples=4, return_mc=True, offset=mc.SHARE_BLOCK - 2)  # groups 0, 0, 1, 1
    assert not np.allclose(r.mc_probs[0, 0], r.mc_probs[0, 1])  # passes differ
    np.testing.assert_allclose(r.mc_probs[0], r.mc_probs[1], atol=1e-6)  # one group, one network per pass
    np.testing.assert_allclose(r.mc_probs[2], r.mc_probs[3], atol=1e-6)
    assert not np.allclose(r.mc_probs[1], r.mc_probs[2])  # the next group draws its own masks


def test_consistent_masks_are_shared_by_all_images(model, images):
    same = np.repeat(images[:1], 3, axis=0)
    r = mc.mc_predict(model, same, samples=4, masks="consistent", return_mc=True)
    np.testing.assert_allclose(r.mc_probs[0], r.mc_probs[2], atol=1e-6)
    m1, m2 = _sampler("consistent")(0, 100)
    assert m1.shape == (1, 6, 1000)


@pytest.mark.parametrize("arch", ["origin", "gal"])
def test_dropout_off_in_the_trunk_and_global_flag_untouched(images, arch):
    """The trunk is deterministic even with chainer's train flag on, and MC dropout is
    the head's alone: with the head's dropout ratios at 0 every pass is the deterministic
    network, exactly; the global flag is never switched."""
    from audit.model import GalCNN, OriginCNN

    shape = images.shape[1:]
    m = OriginCNN(3, shape, dropout=0.0) if arch == "origin" else GalCNN(3, shape, dropout=0.0, dropout_conv=0.0)
    x = audit.data.to_float32(images[:4])
    assert chainer.config.train is True
    with chainer.no_backprop_mode():
        a, b = m.trunk(x).array, m.trunk(x).array
        with chainer.using_config("train", False):
            off = m.trunk(x).array
            logits = m(x).array
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, off, rtol=1e-6)
    r = mc.mc_predict(m, images[:4], samples=5, return_mc=True)
    assert chainer.config.train is True
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    for t in range(5):
        np.testing.assert_allclose(r.mc_probs[:, t], want, rtol=1e-5, atol=1e-6)
    # with dropout on, passes differ: the test above would see a trunk that dropped units
    r = mc.mc_predict(model_with_dropout(shape), images[:4], samples=5, return_mc=True)
    assert np.abs(r.mc_probs[:, 0] - r.mc_probs[:, 1]).max() > 1e-4


def model_with_dropout(shape):
    return audit.build_model(3, shape)


class _FakeOOM(Exception):
    """What a GPU's allocator raises when a batch does not fit (a stand-in for CuPy's)."""


def test_out_of_memory_halves_the_batch(monkeypatch):
    """_run_device on a stand-in device that fails any batch over 16 images: it halves
    until batches fit, then covers every image once, in order."""
    monkeypatch.setattr(mc, "_is_out_of_memory", lambda e: isinstance(e, _FakeOOM))
    tried, stored = [], []

    def worker(start, stop):
        tried.append(stop - start)
        if stop - start > 16:
            raise _FakeOOM("out of memory allocating 1 GB")
        return {"probs": np.zeros((stop - start, 3))}, None

    mc._run_device(worker, 100, 128, lambda s, e, scores, probs: stored.append((s, e)))
    assert tried[:4] == [100, 64, 32, 16]
    assert stored[0] == (0, 16) and stored[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(stored, stored[1:]))  # contiguous, no image twice

    def always(start, stop):
        raise _FakeOOM("no memory at all")

    with pytest.raises(_FakeOOM):  # a batch of one that does not fit is not retried forever
        mc._run_device(always, 10, 8, lambda *a: None)

    def other(start, stop):
        raise ValueError("not memory")

    with pytest.raises(ValueError):  # other errors are not mistaken for memory
        mc._run_device(other, 10, 8, lambda *a: None)


def test_mask_rate_and_blocks():
    s = _sampler(samples=10)
    m1, m2 = s(0, 200)
    assert m1.shape == (200, 10, 1000) and abs(float(m1.mean()) - 0.5) < 0.01
    # a slice of the range has the same masks as the whole
    p1, _ = _sampler(samples=10)(70, 130)
    np.testing.assert_array_equal(p1, m1[70:130])
    q1, _ = _sampler(samples=10, ratio=0.25)(0, 64)
    assert abs(float(q1.mean()) - 0.75) < 0.01


def test_mc_result_matches_metrics(model, images):
    r = mc.mc_predict(model, images, samples=8, return_mc=True)
    s = audit.metrics.all_scores(r.mc_probs)
    for k in audit.metrics.SCORE_NAMES:
        np.testing.assert_allclose(getattr(r, k), s[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.probs.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("samples", [0, -3])
def test_bad_samples(model, images, samples):
    with pytest.raises(AuditError, match="^samples: "):
        mc.mc_predict(model, images, samples=samples)


def test_wrong_image_shape(model):
    with pytest.raises(AuditError, match=r"expected images of shape \(N, 1, 12, 12\)"):
        mc.mc_predict(model, np.zeros((2, 1, 28, 28), np.uint8))


def test_shared_masks_keep_each_images_score_distribution(model, images):
    """Statistically: over many seeds, each image's scores from the kept-units engine
    (shared masks) have the distribution the dense engine's (independent masks) have,
    mean and spread within sampling error (a wrong scale or a dropped bias would not)."""
    x = images[:3]
    runs = {mode: np.array([[getattr(mc.mc_predict(model, x, samples=20, seed=s, masks=mode), k)
                             for k in ("mutual_info", "entropy")] for s in range(150)])
            for mode in ("shared", "independent")}
    a, b = runs["shared"], runs["independent"]  # (seeds, score, image)
    se = np.sqrt(a.var(axis=0) / len(a) + b.var(axis=0) / len(b))
    assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 5 * se)
    ratio = a.std(axis=0) / b.std(axis=0)
    assert np.all((ratio > 0.7) & (ratio < 1.4))
    probs = {mode: np.array([mc.mc_predict(model, x, samples=20, seed=s, masks=mode).probs for s in range(150)])
             for mode in ("shared", "independent")}
    se = np.sqrt(probs["shared"].var(axis=0) / 150 + probs["independent"].var(axis=0) / 150)
    assert np.all(np.abs(probs["shared"].mean(axis=0) - probs["independent"].mean(axis=0)) < 5 * se + 1e-6)


def test_pieces_on_group_boundaries_reproduce_the_whole_run_to_the_byte(model):
    """What a Dask piece does (score.score_piece, loop's pool pieces): whole groups of
    shared masks, scored apart with their offset, give the bytes of one call."""
    x = np.random.default_rng(4).integers(0, 256, (2 * mc.SHARE_BLOCK + 300, 1, 12, 12), dtype=np.uint8)
    whole = mc.mc_predict(model, x, samples=3, seed=7)
    parts = [mc.mc_predict(model, x[a:a + mc.SHARE_BLOCK], samples=3, seed=7, offset=a, workers=1)
             for a in range(0, len(x), mc.SHARE_BLOCK)]
    for name in ("probs", *audit.metrics.SCORE_COLUMNS):
        joined = np.concatenate([getattr(p, name) for p in parts])
        assert joined.tobytes() == getattr(whole, name).tobytes(), name


@pytest.mark.parametrize("masks", ["shared", "independent", "consistent"])
@pytest.mark.parametrize("dropout", [0.5, 0.97])  # 0.97: passes that keep no channel at all
def test_dropout_in_the_convolutions_runs_the_network_per_pass(masks, dropout):
    """The BatchBALD CNN's channel dropout: the per-pass engine (kept channels only, or
    every pass's full convolution) gives the numbers of the whole network, image by image
    and pass by pass, in the paper's order through chainer's functions."""
    m = audit.build_model(3, (1, 18, 18), seed=2, arch="batchbald", dropout=dropout)
    x = np.random.default_rng(4).integers(0, 256, (40, 1, 18, 18), dtype=np.uint8)
    offset = 1010 if masks == "shared" else 0  # crosses a group boundary
    r = mc.mc_predict(m, x, samples=5, batch_size=16, seed=3, return_mc=True, masks=masks, offset=offset)
    sampler = mc.MaskSampler.for_model(m, samples=5, seed=3, mode=masks)
    ms = [np.broadcast_to(k, (len(x), *k.shape[1:])) for k in sampler(offset, offset + len(x))]
    assert [k.shape[2] for k in ms] == [32, 64, 128]
    ref = mc.reference_mc_probs(m, x, *ms)
    np.testing.assert_allclose(r.mc_probs, ref, rtol=1e-5, atol=2e-6)
    assert r.mutual_info.max() > 0


def test_a_model_without_dropout_is_refused():
    m = audit.build_model(3, (1, 12, 12), dropout=0.0)
    with pytest.raises(AuditError, match=r"^model: this origin model has no dropout .* \(--dropout above 0\)$"):
        mc.require_dropout(m)
    mc.require_dropout(audit.build_model(3, (1, 12, 12), dropout=0.0, arch="gal"))  # its first dropout is 0.25


def test_samples_auto_adds_passes_until_the_standard_errors_are_within_the_tolerance():
    from audit.mc import AutoSamples, mc_predict
    from conftest import make_shapes

    x, _ = make_shapes(400, size=16)
    m = audit.build_model(3, (1, 16, 16))
    fixed = mc_predict(m, x, samples=30, seed=3)
    # a tolerance nothing reaches: every image gets the cap, and exactly the fixed run's scores
    full = mc_predict(m, x, seed=3, auto=AutoSamples(tolerance=1e-12, cap=30))
    assert set(full.passes.tolist()) == {30}
    for name, v in fixed.columns().items():
        np.testing.assert_array_equal(full.columns()[name], v)
    # one every image reaches at once: the first 10 passes each
    assert set(mc_predict(m, x, seed=3, auto=AutoSamples(tolerance=1e9, cap=30)).passes.tolist()) == {10}
    mid = mc_predict(m, x, seed=3, auto=AutoSamples(tolerance=0.02, cap=30))
    assert set(mid.passes.tolist()) <= {10, 20, 30} and len(set(mid.passes.tolist())) > 1
    stopped = mid.passes < 30
    assert (np.maximum(mid.entropy_se, mid.mutual_info_se)[stopped] <= 0.02).all()
    again = mc_predict(m, x, seed=3, auto=AutoSamples(tolerance=0.02, cap=30), workers=1)
    np.testing.assert_array_equal(again.entropy, mid.entropy)  # same seed, any number of threads


@pytest.mark.parametrize("kw, fragment", [
    (dict(tolerance=0), "tolerance: expected a standard error > 0, got 0"),
    (dict(tolerance=float("inf")), "tolerance: expected a standard error > 0, got inf"),
    (dict(cap=1), "max_samples: expected at least 2 passes"),
])
def test_bad_auto_samples(kw, fragment):
    import re

    from audit.mc import AutoSamples, mc_predict

    with pytest.raises(AuditError, match=re.escape(fragment)):
        AutoSamples(**kw)
    with pytest.raises(AuditError, match="auto needs shared masks"):
        mc_predict(audit.build_model(3, (1, 16, 16)), np.zeros((2, 1, 16, 16), np.uint8), masks="independent",
                   auto=AutoSamples())
