"""The CuPy path; every test here skips without a usable GPU."""

from __future__ import annotations

import chainer
import numpy as np
import pytest

import audit
from audit import mc
from audit.score import score_dataset

pytestmark = pytest.mark.gpu


def test_head_passes_on_gpu_equal_cpu():
    import cupy

    m = audit.build_model(4, (1, 12, 12), seed=0)
    x = np.random.default_rng(0).random((9, 1, 12, 12), dtype=np.float32)
    sampler = mc.MaskSampler.for_model(m, samples=5, seed=0)
    m1, m2 = sampler(0, 9)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        cpu = mc.softmax(mc.head_passes(m, m.trunk(x).array, m1, m2))
        m.to_device("@cupy:0")
        a = m.trunk(cupy.asarray(x)).array
        gpu = mc.softmax(mc.head_passes(m, a, cupy.asarray(m1), cupy.asarray(m2)))
    np.testing.assert_allclose(cupy.asnumpy(gpu), cpu, rtol=1e-4, atol=1e-5)


def test_dropout_in_the_convolutions_on_gpu_equals_cpu():
    """The BatchBALD CNN's per-pass engine on CuPy (chainer's convolution) and on NumPy
    (fastconv), the same masks: every pass's full convolution and the kept channels."""
    import cupy

    m = audit.build_model(3, (1, 20, 20), seed=0, arch="batchbald")
    x = np.random.default_rng(0).random((10, 1, 20, 20), dtype=np.float32)
    masks = mc.MaskSampler.for_model(m, samples=4, seed=0, mode="independent")(0, 10)
    keeps = mc.MaskSampler.for_model(m, samples=4, seed=0, mode="shared").group(0)
    a = m.trunk_array(x)
    cpu = mc.make_head(m)(a, *masks), mc.make_head(m).kept(a, *keeps)
    m.to_device("@cupy:0")
    ag = m.trunk_array(cupy.asarray(x))
    gpu = (mc.make_head(m)(ag, *map(cupy.asarray, masks)), mc.make_head(m).kept(ag, *map(cupy.asarray, keeps)))
    for c, g in zip(cpu, gpu):
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=1e-4, atol=1e-4)


def test_mc_predict_on_gpu_is_seeded_and_sane():
    m = audit.build_model(4, (1, 12, 12), seed=0)
    x = np.random.default_rng(0).integers(0, 256, (300, 1, 12, 12), dtype=np.uint8)
    a = mc.mc_predict(m, x, samples=20, device="gpu", seed=1)
    b = mc.mc_predict(m, x, samples=20, device="gpu", seed=1)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert isinstance(a.probs, np.ndarray) and a.probs.shape == (300, 4)
    np.testing.assert_allclose(a.probs.sum(1), 1, atol=1e-5)
    assert (a.mutual_info >= 0).all() and (a.mutual_info <= a.entropy + 1e-5).all()
    c = mc.mc_predict(m, x, samples=20, device="cpu", seed=1)
    # other random streams, same estimator: the means agree closely
    assert np.abs(a.probs - c.probs).mean() < 0.02


def test_samples_auto_on_gpu_is_seeded_and_stops_within_the_tolerance():
    m = audit.build_model(4, (1, 12, 12), seed=0)
    x = np.random.default_rng(0).integers(0, 256, (1500, 1, 12, 12), dtype=np.uint8)
    auto = mc.AutoSamples(tolerance=0.02, cap=40)
    a = mc.mc_predict(m, x, device="gpu", seed=1, auto=auto)
    b = mc.mc_predict(m, x, device="gpu", seed=1, auto=auto)
    np.testing.assert_array_equal(a.entropy, b.entropy)
    np.testing.assert_array_equal(a.passes, b.passes)
    assert set(a.passes.tolist()) <= {10, 20, 30, 40}
    stopped = a.passes < 40
    assert (np.maximum(a.entropy_se, a.mutual_info_se)[stopped] <= 0.02).all()


def test_train_and_score_on_gpu(shapes_npz):
    ds = audit.load_dataset(shapes_npz)
    r = audit.train(ds, audit.TrainConfig(epochs=4, batch_size=32, lr=1e-3), device="gpu")
    assert r.valid_accuracy >= 0.9
    s = score_dataset(r.model, ds, samples=10, device="gpu")
    assert s.accuracy >= 0.9 and len(s.scores) == 390


def test_score_on_gpu_workers_is_byte_identical(tmp_path):
    """--device gpu --workers N: one worker per GPU (N = all of them), fold trainings and
    scoring blocks on the workers' GPUs; the same bytes as the in-process GPU run."""
    import shutil

    from typer.testing import CliRunner

    from audit.cli import app
    from audit.device import gpu_count

    from conftest import write_shapes_npz

    runner = CliRunner()
    data = write_shapes_npz(tmp_path / "d.npz", 60, 20, seeds=(5, 6))
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--run", str(run), "--epochs", "2", "--batch-size", "32",
                            "--device", "gpu"])
    assert r.exit_code == 0, r.output
    shutil.copytree(run, tmp_path / "ref")
    score = ["--samples", "6", "--folds", "2", "--batch-size", "16", "--device", "gpu"]
    r = runner.invoke(app, ["score", "--run", str(tmp_path / "ref"), *score])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["score", "--run", str(run), *score, "--workers", str(gpu_count())])
    assert r.exit_code == 0, r.output
    assert f"{gpu_count()} worker" in r.output
    for name in ("scores.csv", "mc_summary.npz", "folds/2-0/model.npz", "folds/2-1/model.npz"):
        assert (run / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
