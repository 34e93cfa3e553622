"""Near-duplicates, leakage, outliers and class imbalance (audit.datachecks) and their
place in `audit score`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from audit import datachecks as dc
from audit.cli import app
from conftest import assert_one_line_error, write_shapes_npz


def blobs(n: int, *, size: int = 20, seed: int = 0) -> np.ndarray:
    """(n, 1, size, size) uint8: each image two or three soft strokes (Gaussian blobs
    along a line), every one different; smooth, like handwriting, unlike pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(rng.integers(2, 4)):
            (r0, c0), (r1, c1) = rng.uniform(4, size - 4, (2, 2))
            for t in np.linspace(0, 1, 12):
                img += np.exp(-((yy - (r0 + t * (r1 - r0))) ** 2 + (xx - (c0 + t * (c1 - c0))) ** 2) / 2.0)
        out[i, 0] = np.clip(255 * img / img.max(), 0, 255).astype(np.uint8)
    return out


def test_centring_makes_a_shifted_copy_describe_as_its_original():
    x = blobs(1)
    shifted = np.roll(x, (1, -1), axis=(2, 3))
    d = dc.descriptors(dc.centred(np.concatenate([x, shifted])))
    assert float(d[0] @ d[1]) > 0.99
    other = dc.descriptors(dc.centred(blobs(1, seed=5)))
    assert float(d[0] @ other[0]) < 0.9


def test_correlation_ignores_contrast_and_a_pixel_of_shift_and_is_zero_for_flat_images():
    a = blobs(2).astype(np.float32)
    b = np.roll(a * 0.6 + 10, 1, axis=3)
    s = dc.best_correlation(a, b)
    assert s == pytest.approx([1.0, 1.0], abs=1e-5)
    flat = np.zeros_like(a)
    assert dc.best_correlation(a, flat) == pytest.approx([0.0, 0.0])
    assert dc.best_correlation(a, a[::-1].copy()).max() < 0.9


def test_similar_pairs_is_the_brute_force_answer():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(300, 6)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    got = dc.similar_pairs(d, at_least=0.8, neighbours=3)
    s = d @ d.T
    np.fill_diagonal(s, -np.inf)
    want = set()
    for i in range(len(d)):
        top = [j for j in np.argsort(-s[i], kind="stable")[:3] if s[i, j] >= 0.8]
        want.update((min(i, j), max(i, j)) for j in top)
    assert set(map(tuple, got.tolist())) == want


def test_indexed_pairs_probing_every_list_is_exact_and_few_lists_find_nearly_all():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 8))
    d = (centres[rng.integers(0, 20, 3000)] + rng.normal(scale=0.35, size=(3000, 8))).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    exact = set(map(tuple, dc.similar_pairs(d, at_least=0.97).tolist()))
    assert len(exact) > 500
    every = dc.indexed_pairs(d, at_least=0.97, lists=12, probes=12)
    assert set(map(tuple, every.tolist())) == exact
    few = set(map(tuple, dc.indexed_pairs(d, at_least=0.97, lists=50, probes=4).tolist()))
    assert len(few & exact) >= 0.97 * len(exact) and len(few - exact) <= 0.01 * len(exact)
    assert dc.indexed_pairs(d[:1], at_least=0.97).shape == (0, 2)


def test_near_duplicates_past_index_from_use_the_index(monkeypatch):
    x = blobs(60, seed=1)
    x[40] = np.roll(x[41], -1, axis=2)
    want = dc.near_duplicates({"train": (x, None)})
    calls = []
    real = dc.indexed_pairs
    monkeypatch.setattr(dc, "INDEX_FROM", 10)
    monkeypatch.setattr(dc, "indexed_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = dc.near_duplicates({"train": (x, None)})
    assert calls and len(want) and set(zip(got["index"], got["other_index"])) == set(zip(want["index"],
                                                                                        want["other_index"]))


def test_near_duplicates_across_splits_within_and_not_exact_copies():
    x = blobs(60, seed=1)
    v = blobs(20, seed=2)
    v[3] = np.roll(x[10], 1, axis=2)  # shifted: leakage
    v[4] = (x[11] * 0.6).astype(np.uint8)  # contrast
    noisy = x[12].astype(np.float32) + np.random.default_rng(0).normal(0, 2, x[12].shape)
    v[5] = np.clip(noisy, 0, 255).astype(np.uint8)  # noised
    x[40] = np.roll(x[41], -1, axis=2)  # within train
    x[50] = x[51]  # identical: an exact duplicate, not listed here
    paths = tuple(f"t/{i}.png" for i in range(len(x)))
    near = dc.near_duplicates({"train": (x, paths), "valid": (v, None)})
    pairs = near[near["split"] == "valid"][["other_index", "index", "kind"]]
    assert set(map(tuple, pairs.to_numpy().tolist())) == {
        (10, 3, "across train and valid"), (11, 4, "across train and valid"), (12, 5, "across train and valid")}
    within = near[near["kind"] == "within train"]
    assert set(within["index"]) == {40, 41} and within["pair"].nunique() == 1
    assert near["kind"].iloc[0] == "across train and valid"  # leakage first
    assert set(near.loc[near["split"] == "train", "path"]) == {"t/10.png", "t/11.png", "t/12.png", "t/40.png",
                                                                "t/41.png"}
    assert (near["similarity"] >= 0.99).all()
    # a stricter threshold keeps fewer; one at 1 keeps only exact correlations
    assert len(dc.near_duplicates({"train": (x, None), "valid": (v, None)}, threshold=0.99999)) < len(near)


def test_no_near_duplicates_among_different_images():
    assert dc.near_duplicates({"train": (blobs(80, seed=3), None)}).empty
    assert dc.near_duplicates({"train": (blobs(1), None)}).empty


def test_knn_mean_distance_is_the_brute_force_answer_and_a_reference_never_counts_itself():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, 4)).astype(np.float32)
    d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    want = np.sort(d, axis=1)[:, :5].mean(axis=1)
    np.testing.assert_allclose(dc.knn_mean_distance(f, 5), want, rtol=1e-4)
    sub = dc.knn_mean_distance(f, 5, reference=50, seed=3)
    ref = np.sort(np.random.default_rng(3).choice(200, 50, replace=False))
    dr = d[:, ref]
    np.testing.assert_allclose(sub, np.sort(dr, axis=1)[:, :5].mean(axis=1), rtol=1e-4)


def test_outliers_stand_out_even_in_a_block_of_identical_ones():
    proto = blobs(10, seed=4)  # ten kinds of image, twenty jittered copies of each
    rng = np.random.default_rng(4)
    x = np.stack([np.clip(np.roll(proto[i % 10], rng.integers(-1, 2, 2), axis=(1, 2)).astype(np.float32)
                          + rng.normal(0, 12, proto[0].shape), 0, 255).astype(np.uint8) for i in range(200)])
    x[[5, 6, 7, 8, 9, 10]] = 0  # six blank images: identical, counted once
    x[20] = 255 - x[20]  # inverted
    y = np.zeros(200, np.int64)
    feats = x.reshape(200, -1).astype(np.float32)  # pixels as features here
    o = dc.outlier_scores({"train": (x, None)}, {"train": y}, {"train": feats}, neighbours=10)
    top = set(o.nlargest(7, "outlier_score")["index"])
    assert top == {5, 6, 7, 8, 9, 10, 20}
    assert list(o.columns) == list(dc.OUTLIER_COLUMNS) and len(o) == 200


def test_flat_images_are_always_listed():
    """A saturated or mid-grey image (one value everywhere) is listed whatever the other
    images look like: its pixel distance is the largest there is."""
    proto = blobs(10, seed=5)
    rng = np.random.default_rng(5)
    x = np.stack([np.clip(proto[i % 10].astype(np.float32) + rng.normal(0, 12, proto[0].shape), 0, 255)
                  .astype(np.uint8) for i in range(300)])
    x[260:] = blobs(40, seed=6)  # forty images each unlike any other: farther (about 1.2) than a flat one's 1
    x[7], x[8], x[9] = 255, 128, 0
    o = dc.outlier_scores({"train": (x, None)}, {"train": np.zeros(300, np.int64)},
                          {"train": x.reshape(300, -1).astype(np.float32)}, neighbours=10)
    assert set(o.nlargest(3, "pixel_z")["index"]) == {7, 8, 9}
    assert (o.loc[[7, 8, 9], "outlier_score"] >= dc.OUTLIER_Z).all()
    assert (o.drop(index=[7, 8, 9])["pixel_z"] < o.loc[[7, 8, 9], "pixel_z"].min()).all()


def shapes_by_class(per_class: int, *, seed: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, each one stroke shape (with an up and a down) moved by up to two
    pixels and noised, and a fourth of round blobs that look the same every way up;
    (4 * per_class, 1, 20, 20) uint8 and labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:20, 0:20]
    disc = np.clip(255 * np.exp(-((yy - 9.5) ** 2 + (xx - 9.5) ** 2) / 18.0), 0, 255)
    protos = [*blobs(3, seed=seed)[:, 0].astype(np.float32), disc]
    x = np.stack([np.clip(np.roll(protos[i % 4], rng.integers(-2, 3, 2), axis=(0, 1))
                          + rng.normal(0, 15, (20, 20)), 0, 255).astype(np.uint8)[None]
                  for i in range(4 * per_class)])
    return x, np.arange(4 * per_class) % 4


def pixels(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32)


def handwritten(per_class: int, *, classes: int = 3, styles: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``classes`` classes of ``styles`` soft-stroke shapes each, every image one of its
    class's shapes moved by up to a pixel, its ink scaled by 0.7-1 and lightly noised;
    (classes * per_class, 1, 20, 20) uint8 and labels."""
    rng = np.random.default_rng(seed)
    protos = blobs(styles * classes, seed=seed)[:, 0].astype(np.float32)
    y = np.arange(classes * per_class) % classes
    x = np.stack([np.clip(np.roll(protos[c * styles + rng.integers(styles)], rng.integers(-1, 2, 2), axis=(0, 1))
                          * rng.uniform(0.7, 1.0) + rng.normal(0, 4, (20, 20)), 0, 255).astype(np.uint8)[None]
                  for c in y])
    return x, y


def scribble(rng, size: int = 20) -> np.ndarray:
    """(size, size) uint8: three straight hard-edged segments joined end to end."""
    im = np.zeros((size, size), np.uint8)
    points = rng.integers(1, size - 1, (4, 2))
    t = np.linspace(0, 1, 3 * size)
    for (r0, c0), (r1, c1) in zip(points[:-1], points[1:]):
        im[np.round(r0 + (r1 - r0) * t).astype(int), np.round(c0 + (c1 - c0) * t).astype(int)] = 255
    return im


@pytest.mark.parametrize("seed", [0, 1])
def test_the_shape_residual_lists_scribbles_and_only_them(seed):
    """Scribbles among a class's images are rebuilt by none of its principal shapes, even
    where they are among the images the shapes are fitted on; a flat image is not
    judged (the pixel distance lists it)."""
    x, y = handwritten(300, seed=seed)
    rng = np.random.default_rng(seed)
    planted = rng.choice(len(y), 8, replace=False)
    for i in planted:
        x[i, 0] = scribble(rng)
    x[planted[0] + 1] = 0
    o = dc.outlier_scores({"train": (x, None)}, {"train": y}, {"train": pixels(x)}, neighbours=10)
    z = o["shape_z"].to_numpy()
    assert np.isnan(z[planted[0] + 1]) and np.isfinite(np.delete(z, planted[0] + 1)).all()
    assert set(np.flatnonzero(z >= dc.SHAPE_Z)) == set(planted.tolist())


def test_the_shape_residual_skips_small_classes_pools_large_images_and_reads_only_its_rows():
    x, y = handwritten(dc.SHAPE_MIN + 200, classes=2)
    y[:300:2] = 2  # class 2: 150 images, fewer than SHAPE_MIN (taken from class 0)
    r = dc.shape_residual(x, y)
    assert np.isnan(r[y == 2]).all() and np.isfinite(r[y < 2]).all() and (r[y < 2] < 1).all()
    rows = np.arange(0, len(y), 3)
    np.testing.assert_array_equal(dc.shape_residual(x, y[rows], rows=rows), dc.shape_residual(x[rows], y[rows]))
    big = np.arange(2 * 3 * 70 * 40, dtype=np.float32).reshape(2, 3, 70, 40) % 256
    p = dc.pooled(big.astype(np.uint8))  # 70 pixels a side: blocks of 3, the last row left out
    assert p.shape == (2, 3, 23, 13)
    np.testing.assert_allclose(p[1, 2, 4, 5], big[1, 2, 12:15, 15:18].mean() / 255, rtol=1e-6)
    assert dc.pooled(x).shape == x.shape
    assert np.isnan(dc.shape_residual(x[:, :, :1, :1], y)).all()  # one pixel has no shape


def test_data_its_shapes_rebuild_exactly_has_no_shape_outliers():
    """One noiseless shape per class at one-pixel shifts and inks: every residual is
    about zero (the rounding to whole levels), and a little more (a single pixel 20 levels
    brighter) is not listed."""
    protos = handwritten(1, classes=2)[0].astype(np.float32)
    rng = np.random.default_rng(0)
    x = np.stack([np.round(np.roll(protos[i % 2], rng.integers(-1, 2, 2), axis=(1, 2)) * rng.uniform(0.5, 1))
                  for i in range(600)]).astype(np.uint8)
    x[7, 0, 10, 10] = min(255, int(x[7, 0, 10, 10]) + 20)
    o = dc.outlier_scores({"train": (x, None)}, {"train": np.arange(600) % 2}, {"train": pixels(x)})
    assert np.isfinite(o["shape_z"]).all() and (o["shape_z"] < dc.SHAPE_Z).all()


def test_turned_back_a_turned_image_fits_its_class_and_both_views_must_agree():
    x, y = handwritten(300, seed=2)
    planted = np.array([3, 10, 17, 24])
    for j, i in enumerate(planted):
        x[i] = dc.turned(x[i:i + 1], 1 + j % 3)[0]
    upright = np.array([0, 1, 2, 4, 5])
    gain = dc.ClassShapes(x, y).turned_gain(np.concatenate([planted, upright]))
    assert (gain[:4] >= dc.TURN_GAIN).all() and (gain[4:] < 0).all(), gain
    assert dc.is_turned([0.999, 0.999, 0.9, np.nan, 0.999], [0.1, 0.0, 0.1, 0.1, np.nan]).tolist() == [
        True, False, False, False, False]
    assert dc.is_turned([0.999, 0.9, np.nan]).tolist() == [True, False, False]  # a run without the gain


def test_the_orientation_probe_finds_turned_images_and_only_them():
    """Images turned by a quarter or three quarters stand out from their class's upright
    images; a class that looks the same every way up has nothing listed."""
    x, y = shapes_by_class(500)
    planted = np.array([0, 4, 9, 13, 40, 41])  # classes 0 and 1
    for j, i in enumerate(planted):
        x[i] = dc.turned(x[i:i + 1], 1 + 2 * (j % 2))[0]
    turned_also_rounds = np.flatnonzero(y == 3)[:3]  # a turned disc is a disc
    x[turned_also_rounds] = dc.turned(x[turned_also_rounds], 1)
    sample = dc.turn_sample(y, size=1600)
    assert len(sample) == 1600 and np.bincount(y[sample]).tolist() == [400] * 4
    assert np.array_equal(sample, np.unique(sample))
    taught = {k: pixels(dc.turned(x[sample], k)) for k in dc.quarter_turns(x.shape)}
    p = dc.turned_probability(pixels(x), y, sample, taught)
    assert set(np.argsort(-p)[:6]) == set(planted.tolist()) and p[planted].min() > 0.98
    assert np.isnan(p[y == 3]).all() and not np.isnan(p[y < 3]).any()  # the discs: not judged
    assert np.nanmax(p[np.setdiff1d(np.arange(len(y)), planted)]) < 0.95
    listed = set(np.flatnonzero(p >= dc.TURNED_P).tolist())
    assert listed <= set(planted.tolist()) and len(listed) >= 4
    o = dc.outlier_scores({"train": (x, None)}, {"train": y}, {"train": pixels(x)}, turned=p)
    np.testing.assert_array_equal(o["turned"].to_numpy(), p)


def test_the_orientation_probe_skips_small_classes_and_turns_only_by_a_half_where_not_square():
    assert dc.quarter_turns((5, 1, 20, 20)) == (1, 2, 3) and dc.quarter_turns((5, 3, 20, 30)) == (2,)
    assert dc.turned(np.arange(6).reshape(1, 1, 2, 3), 2).tolist() == [[[[5, 4, 3], [2, 1, 0]]]]
    x, y = shapes_by_class(dc.TURN_MIN + 100)
    y[y == 2] = 3
    y[:400:4] = 2  # class 2: a hundred images, fewer than a probe needs (taken from class 0)
    p = dc.turned_probability(pixels(x), y, np.arange(len(y)), {2: pixels(dc.turned(x, 2))})
    assert np.isnan(p[y == 2]).all() and not np.isnan(p[y < 2]).any()
    assert (p[y < 2] < dc.TURNED_P).all()


def test_images_all_alike_are_judged_by_no_probe_and_warn_nothing():
    y = np.arange(600) % 2
    f = np.ones((600, 50), np.float32)
    sample = dc.turn_sample(y)
    assert np.isnan(dc.turned_probability(f, y, sample, {k: f[sample] for k in (1, 2, 3)})).all()
    assert not dc.reduce_features(np.ones((600, 100), np.float32)).any()


def test_imbalance_counts_ratio_and_rare_classes():
    y = {"train": np.array([0] * 90 + [1] * 30 + [2] * 5), "valid": np.array([0, 1, 2])}
    i = dc.imbalance(y, ["a", "b", "c"])
    assert i["counts"] == {"train": [90, 30, 5], "valid": [1, 1, 1]}
    assert i["ratio"] == 18.0 and i["rare"] == ["c"] and i["empty"] == []
    i = dc.imbalance({"train": np.array([0, 0, 1])}, ["a", "b", "c"])
    assert i["ratio"] is None and i["empty"] == ["c"]


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_score_writes_the_data_checks(tmp_path):
    x = blobs(150, seed=6)
    y = np.arange(150) % 3
    v = blobs(30, seed=7)
    v[0] = np.roll(x[1], 1, axis=2)  # leakage
    x[2] = 255  # saturated
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x[:, 0], y_train=y, x_valid=v[:, 0], y_valid=np.arange(30) % 3)
    run = tmp_path / "r"
    assert invoke("train", "--data", npz, "--run", run, "--epochs", "1").exit_code == 0
    r = invoke("score", "--run", run, "-T", "4")
    assert r.exit_code == 0, r.output
    assert "near-duplicates (correlation >= 0.99): 1 pairs, 1 across train and valid (leakage)" in r.output
    assert "outliers (robust z >= 5, or turned, or shape z >= 7): " in r.output
    assert "class balance (train): largest/smallest class 1" in r.output
    near = pd.read_csv(run / "near_duplicates.csv", keep_default_na=False)
    assert sorted(zip(near["split"], near["index"])) == [("train", 1), ("valid", 0)]
    out = pd.read_csv(run / "outliers.csv", keep_default_na=False)
    assert ("train", 2) in set(zip(out["split"], out["index"]))
    assert out["outlier_score"].is_monotonic_decreasing and (out["outlier_score"] >= 5).all()
    scores = pd.read_csv(run / "scores.csv")
    assert scores["outlier_score"].notna().all() and len(scores) == 180
    checks = json.loads((run / "run.json").read_text())["score"]["data_checks"]
    assert checks["near_duplicates"]["across train and valid"] == 1
    assert checks["outliers"]["flagged"] == len(out)
    assert checks["imbalance"]["counts"]["train"] == [50, 50, 50]
    r = invoke("report", "--run", run, "--out", tmp_path / "rep", "--top", "3")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<h2>Near-duplicates</h2>" in page and "1 pair at a correlation of at least 0.99" in page
    assert "<h2>Outliers</h2>" in page and "#2 · 2<br>train · z " in page
    assert "Images per class (train): 0 50, 1 50, 2 50." in page
    # other thresholds: recorded, and fewer outliers at a higher z
    r = invoke("score", "--run", run, "-T", "4", "--outlier-z", "1000", "--near-threshold", "0.999999")
    assert r.exit_code == 0, r.output
    meta = json.loads((run / "run.json").read_text())["score"]
    assert meta["outlier_z"] == 1000 and meta["data_checks"]["outliers"]["flagged"] == 0


def test_score_lists_scribbles_unlike_their_class_and_the_report_shows_them(tmp_path):
    x, y = handwritten(270, seed=3)
    x, y, v, yv = x[:750], y[:750], x[750:], y[750:]
    rng = np.random.default_rng(3)
    planted = rng.choice(len(y), 6, replace=False)
    for i in planted:
        x[i, 0] = scribble(rng)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x[:, 0], y_train=y, x_valid=v[:, 0], y_valid=yv)
    run = tmp_path / "r"
    assert invoke("train", "--data", npz, "--run", run, "--epochs", "1").exit_code == 0
    r = invoke("score", "--run", run, "-T", "2")
    assert r.exit_code == 0, r.output
    out = pd.read_csv(run / "outliers.csv", keep_default_na=False)
    odd = out[pd.to_numeric(out["shape_z"], errors="coerce") >= dc.SHAPE_Z]
    assert set(zip(odd["split"], odd["index"])) == {("train", int(i)) for i in planted}
    checks = json.loads((run / "run.json").read_text())["score"]["data_checks"]["outliers"]
    assert checks["odd_shape"] == 6 and checks["shape_z"] == dc.SHAPE_Z
    assert "6 unlike their class's shapes; listed in" in r.output
    r = invoke("report", "--run", run, "--out", tmp_path / "rep", "--top", "3")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<h3>Unlike their class's shapes</h3>" in page and "6 images that the principal shapes" in page
    for i, z in zip(odd["index"], pd.to_numeric(odd["shape_z"])):
        assert f"#{i} · {y[i]}<br>train · z {z:.1f}" in page
    # an outliers.csv written before the shape residual (no shape_z) still makes a report
    from audit.runs import OUTLIERS, RunStore

    store = RunStore(run)
    meta = store.meta()
    score = json.loads(json.dumps(meta.score))
    for key in ("turn_gain", "shape_z", "odd_shape"):
        del score["data_checks"]["outliers"][key]
    with store.writing(), store.transaction() as txn:
        txn.write_csv(OUTLIERS, pd.read_csv(run / "outliers.csv").drop(columns=["turned_gain", "shape_z"]))
        txn.commit(meta.evolve(score=score))
    r = invoke("report", "--run", run, "--out", tmp_path / "rep2", "--top", "3")
    assert r.exit_code == 0, r.output
    assert "principal shapes" not in (tmp_path / "rep2" / "index.html").read_text()


@pytest.mark.parametrize("args, fragment", [
    (("--near-threshold", "0"), "--near-threshold: expected a correlation in (0, 1], got 0.0"),
    (("--near-threshold", "1.5"), "--near-threshold: expected a correlation in (0, 1], got 1.5"),
    (("--outlier-z", "0"), "--outlier-z: expected a positive robust z-score, got 0.0"),
    (("--outlier-z", "nan"), "--outlier-z: expected a positive robust z-score, got nan"),
])
def test_bad_thresholds_are_one_line_and_write_nothing(tmp_path, args, fragment):
    npz = write_shapes_npz(tmp_path / "s.npz", 10, 5)
    r = invoke("score", "--data", npz, "--run", tmp_path / "r", *args)
    assert_one_line_error(r, fragment, code=2)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("threads", [1, 3])
def test_the_checks_give_the_same_numbers_on_any_number_of_threads(monkeypatch, threads):
    """A multi-threaded BLAS product's roundings depend on how it splits the work: the
    checks run in fixed blocks on single-threaded BLAS, so 1 or 3 threads (and 1 or 2
    BLAS threads around them) give the numbers one thread gives, to the bit."""
    from threadpoolctl import threadpool_limits

    from audit import device

    rng = np.random.default_rng(3)
    f = rng.standard_normal((9000, 300)).astype(np.float32)  # several blocks of each kind
    d = dc._unit(rng.standard_normal((5000, 64)).astype(np.float32))
    d[1::2] = dc._unit(d[::2] + np.float32(0.01) * rng.standard_normal((2500, 64)).astype(np.float32))

    x, y = shapes_by_class(60)  # the orientation probe, pixels as the features
    sample = dc.turn_sample(y)
    hx, hy = handwritten(dc.SHAPE_MIN * 10, classes=2)  # several blocks of the shape residual

    def run():
        return (dc.knn_mean_distance(f, 5), dc.reduce_features(f), dc.similar_pairs(d, at_least=0.99),
                dc.indexed_pairs(d, at_least=0.99, lists=40, probes=3),
                dc.turned_probability(pixels(x), y, sample, {k: pixels(dc.turned(x[sample], k)) for k in (1, 2, 3)}),
                dc.shape_residual(hx, hy), dc.ClassShapes(hx, hy).turned_gain(np.arange(0, len(hy), 7)))

    with threadpool_limits(limits=1):
        monkeypatch.setattr(device, "cpu_workers", lambda: 1)
        one = run()
    monkeypatch.setattr(device, "cpu_workers", lambda: threads)
    with threadpool_limits(limits=2):
        other = run()
    assert len(one[2]) > 1000 and len(one[3]) > 1000
    for a, b in zip(one, other):
        np.testing.assert_array_equal(a, b)


def test_in_blocks_keeps_the_order_and_its_memory_bound():
    """Results in the blocks' order whatever finishes first; no more threads than
    IN_FLIGHT bytes hold blocks of ``block_bytes``; progress in this thread."""
    import threading
    import time

    from audit.device import IN_FLIGHT, in_blocks

    threads, done = set(), []

    def block(a, b):
        threads.add(threading.get_ident())
        time.sleep(0.02 * (10 - a) / 10)  # the first blocks finish last
        return list(range(a, b))

    out = in_blocks(block, 10, 3, workers=8, block_bytes=IN_FLIGHT // 2, done=done.append)
    assert out == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] and done == [3, 3, 3, 1]
    assert 1 <= len(threads) <= 2 and threading.get_ident() not in threads
    assert in_blocks(block, 0, 3) == []


def test_score_lists_turned_digits_and_scribbles_and_the_report_shows_them(tmp_path, mnist_dir, monkeypatch):
    """Ten of 6,000 MNIST digits turned by a quarter and ten replaced by scribbles
    (labels kept): `audit score` with its defaults lists most of the turned ones as
    turned, most scribbles as unlike their class's shapes, and hardly any other image;
    the report shows them."""
    from audit.data import load_mnist

    monkeypatch.setenv("AUDIT_DATA_DIR", str(mnist_dir))
    m = load_mnist()
    x, y = m.train.x[:6000].copy(), m.train.y[:6000]
    planted = np.arange(0, 6000, 600)
    x[planted] = dc.turned(x[planted], 1)
    scribbled = planted + 300
    rng = np.random.default_rng(0)
    for i in scribbled:
        x[i, 0] = scribble(rng, 28)
    npz = tmp_path / "m.npz"
    np.savez(npz, x_train=x[:, 0], y_train=y, x_valid=m.train.x[50000:51000, 0], y_valid=m.train.y[50000:51000])
    run = tmp_path / "r"
    r = invoke("score", "--data", npz, "--run", run, "-T", "4")
    assert r.exit_code == 0, r.output
    out = pd.read_csv(run / "outliers.csv", keep_default_na=False)
    turned = out[dc.is_turned(pd.to_numeric(out["turned"], errors="coerce"),
                              pd.to_numeric(out["turned_gain"], errors="coerce"))]
    found = set(zip(turned["split"], turned["index"]))
    hits = found & {("train", int(i)) for i in planted}
    others = found - hits - {("train", int(i)) for i in scribbled}  # the probe may call a scribble turned
    assert len(hits) >= 6 and len(others) <= 2, out  # MNIST has odd digits of its own
    odd = out[pd.to_numeric(out["shape_z"], errors="coerce") >= dc.SHAPE_Z]
    odd_found = set(zip(odd["split"], odd["index"]))
    odd_hits = odd_found & {("train", int(i)) for i in scribbled}
    assert len(odd_hits) >= 7 and len(odd_found - odd_hits) <= 2, out
    checks = json.loads((run / "run.json").read_text())["score"]["data_checks"]["outliers"]
    assert checks["turned"] == len(found) and checks["turned_p"] == dc.TURNED_P
    assert f"{len(found):,} of them turned (sideways or upside down)" in r.output
    r = invoke("report", "--run", run, "--out", tmp_path / "rep", "--top", "3")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<h3>Turned images</h3>" in page and f"{len(found)} images that look sideways or upside down" in page  # more than one
    for i, p in zip(turned["index"], pd.to_numeric(turned["turned"])):
        assert f"#{i} · {m.class_names[y[i]]}<br>train · p {p:.3f}" in page
    assert f"{len(odd_found)} images that the principal shapes of their class do not rebuild" in page
    for i, z in zip(odd["index"], pd.to_numeric(odd["shape_z"])):
        assert f"#{i} · {m.class_names[y[i]]}<br>train · z {z:.1f}" in page
