from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from audit import TrainConfig, load_dataset, train, train_run
from audit.errors import AuditError
from audit.train import _batches, read_subset, step_scale, stored_train_config

FAST = TrainConfig(epochs=4, batch_size=32, lr=1e-3, seed=0)


def test_learns_the_shapes(shapes_npz):
    result = train(load_dataset(shapes_npz), FAST)
    assert result.valid_accuracy >= 0.9
    assert [r.epoch for r in result.log] == [1, 2, 3, 4]
    assert result.log[-1].train_loss < result.log[0].train_loss
    assert all(r.images_per_s > 0 for r in result.log)


def test_same_seed_same_weights_other_seed_not(shapes_npz):
    ds = load_dataset(shapes_npz)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-3, seed=5)
    a, b = train(ds, cfg), train(ds, cfg)
    c = train(ds, TrainConfig(epochs=1, batch_size=64, lr=1e-3, seed=6))
    pa, pb, pc = (dict(r.model.namedparams()) for r in (a, b, c))
    for k in pa:
        np.testing.assert_array_equal(pa[k].array, pb[k].array)
    assert not np.array_equal(pa["/fc4/W"].array, pc["/fc4/W"].array)


def test_step_scale():
    assert [step_scale("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    cos = [step_scale("cosine", s, 10) for s in range(10)]
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5)
    assert all(a > b > 0 for a, b in zip(cos, cos[1:]))
    assert cos[-1] < 0.03


def test_even_batches():
    sizes = lambda n, b, even: [s.stop - s.start for s in _batches(n, b, even=even)]  # noqa: E731
    assert sizes(130, 128, False) == [128, 2] and sizes(130, 128, True) == [65, 65]
    assert sizes(100, 32, False) == [32, 32, 32, 4] and sizes(100, 32, True) == [25, 25, 25, 25]
    assert sizes(256, 128, True) == sizes(256, 128, False) == [128, 128]
    assert sizes(7, 3, True) == [2, 3, 2] and sizes(5, 10, True) == [5]
    order = np.arange(130)[::-1]
    assert np.concatenate(list(_batches(130, 128, order, even=True))).tolist() == order.tolist()
    # runs made before the option trained in full batches and the remainder
    assert stored_train_config({"epochs": 2}).even_batches is False
    assert stored_train_config({"epochs": 2, "even_batches": True}).even_batches is True


def test_even_batches_change_only_a_remainder(shapes_npz):
    ds = load_dataset(shapes_npz)  # 300 training images
    fc4 = {}
    for b, even in ((100, True), (100, False), (64, True), (64, False)):
        fc4[b, even] = train(ds, TrainConfig(epochs=1, batch_size=b, lr=1e-3, even_batches=even)).model.fc4.W.array
    np.testing.assert_array_equal(fc4[100, True], fc4[100, False])  # 100 divides 300: the same batches
    assert not np.array_equal(fc4[64, True], fc4[64, False])  # 64+64+64+64+44 against 5 x 60


def test_cosine_schedule_learns_and_changes_the_training(shapes_npz):
    ds = load_dataset(shapes_npz)
    cos = train(ds, TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=0, schedule="cosine"))
    const = train(ds, TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=0))
    assert cos.valid_accuracy >= 0.9
    assert not np.array_equal(cos.model.fc4.W.array, const.model.fc4.W.array)


def test_train_run_writes_the_run_folder(shapes_npz, tmp_path):
    run = tmp_path / "runs" / "r1"
    result = train_run(run, data=str(shapes_npz), config=FAST)
    assert sorted(p.name for p in run.iterdir()) == ["model.npz", "run.json", "train_log.csv"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["epochs"] == 4 and meta["seed"] == 0
    assert meta["data"]["fingerprint"] == load_dataset(shapes_npz).fingerprint
    assert meta["model"]["n_classes"] == 3 and meta["model"]["image_shape"] == [1, 16, 16]
    assert {"python", "chainer", "numpy"} <= set(meta["versions"])
    assert meta["device"] == "cpu" and meta["timings"]["train_seconds"] > 0
    log = pd.read_csv(run / "train_log.csv")
    assert list(log.columns) == [
        "epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "seconds", "images_per_s"
    ]
    assert len(log) == 4 and log.valid_accuracy.iloc[-1] == pytest.approx(result.valid_accuracy, abs=1e-5)
    assert not list(run.parent.glob(".*"))  # no staging leftovers


def test_existing_run_is_kept_unless_overwrite(shapes_npz, tmp_path):
    run = tmp_path / "r"
    cfg = TrainConfig(epochs=1, batch_size=64)
    train_run(run, data=str(shapes_npz), config=cfg)
    before = (run / "model.npz").read_bytes()
    with pytest.raises(AuditError, match="already exists; pass --overwrite"):
        train_run(run, data=str(shapes_npz), config=cfg)
    assert (run / "model.npz").read_bytes() == before
    train_run(run, data=str(shapes_npz), config=TrainConfig(epochs=1, batch_size=64, seed=1), overwrite=True)
    assert (run / "model.npz").read_bytes() != before
    assert json.loads((run / "run.json").read_text())["seed"] == 1


def test_subset(shapes_npz, tmp_path):
    sub = tmp_path / "subset.txt"
    sub.write_text("# first fifty\n" + "\n".join(map(str, range(50))) + "\n")
    run = tmp_path / "r"
    result = train_run(run, data=str(shapes_npz), config=TrainConfig(epochs=1, batch_size=16), subset=sub)
    assert result.n_train == 50
    assert (run / "subset.txt").read_text().split() == [str(i) for i in range(50)]
    assert json.loads((run / "run.json").read_text())["data"]["subset"]["n"] == 50


def test_read_subset_formats_and_errors(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("split,index\ntrain,3\ntrain,1\n")
    assert read_subset(csv, 10).tolist() == [3, 1]
    npy = tmp_path / "s.npy"
    np.save(npy, np.array([0, 9]))
    assert read_subset(npy, 10).tolist() == [0, 9]
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n12\n")
    with pytest.raises(AuditError, match=r"index 12 is out of range; the training split has 10 images"):
        read_subset(bad, 10)
    bad.write_text("1\nx\n")
    with pytest.raises(AuditError, match=r"first line|expected integer indices"):
        read_subset(bad, 10)
    bad.write_text("1\n1\n")
    with pytest.raises(AuditError, match="duplicate"):
        read_subset(bad, 10)
    with pytest.raises(AuditError, match="does not exist"):
        read_subset(tmp_path / "none.txt", 10)


def test_failed_run_leaves_nothing(shapes_npz, tmp_path):
    sub = tmp_path / "s.txt"
    sub.write_text("100000\n")
    run = tmp_path / "runs" / "r"
    with pytest.raises(AuditError, match="out of range"):
        train_run(run, data=str(shapes_npz), subset=sub)
    assert not run.exists()
    assert not list((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else True


@pytest.mark.parametrize(
    "kwargs, option",
    [(dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(lr=0.0), "lr"), (dict(dropout=1.0), "dropout"),
     (dict(schedule="linear"), "schedule"), (dict(lr=float("inf")), "lr"), (dict(lr=float("nan")), "lr"),
     (dict(seed=-1), "seed")],
)
def test_bad_config(kwargs, option):
    with pytest.raises(AuditError, match=f"^{option}: "):
        TrainConfig(**kwargs)


def test_run_files_get_the_usual_permissions(shapes_npz, tmp_path):
    import os
    import stat

    run = tmp_path / "perm"
    train_run(run, data=str(shapes_npz), config=TrainConfig(epochs=1, batch_size=64))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(run.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((run / "model.npz").stat().st_mode) == 0o666 & ~umask


def _reference_train(ds, cfg):
    """``train`` as it was before the CPU kernels: chainer's own convolution, ReLU, pooling
    and linear functions, chainer's own Adam; the same batches and dropout masks."""
    import chainer
    import chainer.functions as F

    from audit.device import get_device, make_rng
    from audit.model import build_model

    model = build_model(ds.n_classes, ds.image_shape, dropout=cfg.dropout, seed=cfg.seed, arch=cfg.model)
    opt = chainer.optimizers.Adam(alpha=cfg.lr)
    opt.setup(model)
    if cfg.weight_decay:
        model.head_layers().first.W.update_rule.add_hook(chainer.optimizer_hooks.WeightDecay(cfg.weight_decay))
    hl = model.head_layers()
    order_rng, mask_rng = np.random.default_rng(cfg.seed), make_rng(get_device("cpu"), [cfg.seed, 1])
    n = len(ds.train)
    total, step = cfg.epochs * -(-n // cfg.batch_size), 0
    for _ in range(cfg.epochs):
        for bi in _batches(n, cfg.batch_size, order_rng.permutation(n), even=cfg.even_batches):
            rows = np.sort(bi)
            h = model.trunk_chainer(ds.train.x[rows].astype(np.float32) / 255)
            h = F.dropout(h, mask=_mask(mask_rng, h.shape, hl.first_ratio))
            h = F.dropout(F.relu(hl.first(h)), mask=_mask(mask_rng, (len(rows), hl.first.W.shape[0]), hl.second_ratio))
            loss = F.softmax_cross_entropy(hl.second(h), ds.train.y[rows])
            model.cleargrads()
            loss.backward()
            opt.eta = step_scale(cfg.schedule, step, total)
            opt.update()
            step += 1
    return model


def _mask(rng, shape, ratio):
    from audit.model import keep_mask

    return keep_mask(rng, shape, ratio) * np.float32(1 / (1 - ratio))


@pytest.mark.parametrize("cfg", [
    TrainConfig(epochs=2, batch_size=100, lr=1e-3, seed=3),
    TrainConfig(epochs=2, batch_size=64, lr=1e-3, seed=4, model="gal", weight_decay=1e-3, schedule="cosine"),
], ids=["origin", "gal"])
def test_same_weights_as_chainers_own_functions(shapes_npz, cfg):
    """The CPU kernels (fastconv's convolution, ReLU + pooling, dense layers; the fused Adam)
    change the speed, not the training: the weights match chainer's own functions and
    optimizer to float32 rounding, within 1% of one Adam step. The reference trains with
    single-threaded BLAS, as audit's training does: with more threads OpenBLAS rounds
    otherwise, on some CPUs (an AMD EPYC here) by up to 2% of a step after 2 epochs."""
    from threadpoolctl import threadpool_limits

    ds = load_dataset(shapes_npz)
    fast = dict(train(ds, cfg, validate=False).model.namedparams())
    with threadpool_limits(limits=1, user_api="blas"):
        ref = dict(_reference_train(ds, cfg).namedparams())
    assert fast.keys() == ref.keys()
    atol = cfg.lr / 100
    for name in fast:
        np.testing.assert_allclose(fast[name].array, ref[name].array, rtol=0, atol=atol, err_msg=name)
    moved = max(float(np.abs(ref[k].array - v.array).max()) for k, v in
                dict(build_model_like(ds, cfg).namedparams()).items())
    assert moved > 100 * atol  # the training moved the weights far more than the tolerance


def build_model_like(ds, cfg):
    from audit.model import build_model

    return build_model(ds.n_classes, ds.image_shape, dropout=cfg.dropout, seed=cfg.seed, arch=cfg.model)


def test_early_stopping_restores_the_best_epoch(shapes_npz, monkeypatch):
    """Patience 2: training ends 2 epochs after the best early-stopping accuracy, and the
    model is that epoch's (its accuracies are the best epoch's, measured again)."""
    import importlib

    from audit.data import Split
    from audit.train import evaluate

    ds = load_dataset(shapes_npz)
    stop = Split(ds.valid.x[:45], ds.valid.y[:45])
    seen = []
    train_mod = importlib.import_module("audit.train")  # the module (audit.train is also the function)
    real = train_mod.evaluate

    def scripted(model, split, **kw):  # the early-stopping accuracies: best at epoch 2, then worse
        loss, acc = real(model, split, **kw)
        if split is stop:
            seen.append({n: p.array.copy() for n, p in model.namedparams()})
            return loss, [0.5, 0.8, 0.8, 0.7, 0.9][len(seen) - 1]
        return loss, acc

    monkeypatch.setattr(train_mod, "evaluate", scripted)
    cfg = TrainConfig(epochs=5, batch_size=32, lr=1e-3, patience=2)
    r = train(ds, cfg, validate=False, stop_split=stop)
    monkeypatch.undo()
    assert len(r.log) == 4 and r.best_epoch == 2 and r.stop_accuracy == 0.8  # a tie is no improvement
    for name, p in r.model.namedparams():
        np.testing.assert_array_equal(p.array, seen[1][name])
    assert r.valid_accuracy == evaluate(r.model, ds.valid)[1]
    assert not np.array_equal(seen[3]["/fc5/W"], seen[1]["/fc5/W"])  # training went on past it


def test_epoch_samples_draw_with_replacement(shapes_npz):
    ds = load_dataset(shapes_npz)
    cfg = TrainConfig(epochs=2, batch_size=50, lr=1e-3, epoch_samples=120, even_batches=False)
    r = train(ds, cfg, subset=np.arange(40))
    assert len(r.log) == 2 and r.n_train == 40
    assert r.log[0].images_per_s > 0  # 120 draws an epoch from 40 images: three batches (50, 50, 20)


def test_early_stopping_needs_its_split(shapes_npz):
    with pytest.raises(AuditError, match="^--patience 3: early stopping needs an early-stopping split"):
        train(load_dataset(shapes_npz), TrainConfig(epochs=2, batch_size=64, patience=3))


@pytest.mark.parametrize("kwargs, option", [(dict(patience=0), "patience"), (dict(epoch_samples=0), "epoch_samples"),
                                            (dict(model="resnet"), "model")])
def test_bad_early_stopping_config(kwargs, option):
    with pytest.raises(AuditError, match=f"^{option}: "):
        TrainConfig(**kwargs)


def test_shifted_moves_each_image_by_its_own_offset():
    from audit.train import shifted

    x = np.random.default_rng(0).random((200, 2, 9, 7)).astype(np.float32)
    out = shifted(x, 2, np.random.default_rng(5))
    dy, dx = np.random.default_rng(5).integers(0, 5, size=(2, 200))
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    want = np.stack([padded[i, :, dy[i]:dy[i] + 9, dx[i]:dx[i] + 7] for i in range(200)])
    np.testing.assert_array_equal(out, want)
    assert len({(a, b) for a, b in zip(dy, dx)}) == 25  # every offset drawn, (2, 2) the image itself
    assert shifted(x, 0, np.random.default_rng(5)) is x


def test_plan_shrinks_batches_then_adds_epochs():
    from audit.train import plan

    base = TrainConfig(epochs=12, batch_size=500, min_steps=1200)
    assert plan(base, 60_000) == (12, 500)  # 1,440 steps: enough
    assert plan(base, 15_000) == (12, 150)
    assert plan(base, 1_000) == (38, 32)  # batches of 32 at least, then epochs
    assert plan(replace(base, min_steps=None), 1_000) == (12, 500)
    assert plan(replace(base, batch_size=8), 100) == (93, 8)  # never a batch above the one asked for
    assert plan(replace(base, epoch_samples=5056), 10) == (12, 51)  # epochs of draws: their size counts


def test_shift_and_min_steps_change_the_training_and_stay_deterministic(shapes_npz):
    ds = load_dataset(str(shapes_npz))
    base = TrainConfig(epochs=1, batch_size=64)
    plain = train(ds, base)
    moved, again = train(ds, replace(base, shift=2)), train(ds, replace(base, shift=2))
    assert not np.array_equal(plain.model.fc5.W.array, moved.model.fc5.W.array)
    np.testing.assert_array_equal(moved.model.fc5.W.array, again.model.fc5.W.array)
    longer = train(ds, replace(base, min_steps=20))
    assert len(longer.log) == 2  # 300 images: 5 steps of 64 an epoch; in 32s 10 steps, so 2 epochs
