from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest

from audit.errors import AuditError
from audit.model import OriginCNN, build_model, keep_mask


def test_trunk_then_head_is_forward():
    m = build_model(10, (1, 28, 28), seed=3)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        h = m.trunk(x)
        assert h.shape == (4, 1000)
        np.testing.assert_array_equal(m.head(h).array, m(x).array)


def test_origin_shapes():
    m = OriginCNN(10, (1, 28, 28))
    assert m.conv1.W.shape == (16, 1, 3, 3) and m.conv2.W.shape == (32, 16, 3, 3)
    # 28 -> conv 26 -> pool 13 -> conv 11 -> pool 6 (chainer's cover_all) : 32*6*6
    assert m.fc3.W.shape == (1000, 1152) and m.fc4.W.shape == (1000, 1000) and m.fc5.W.shape == (10, 1000)
    rgb = OriginCNN(4, (3, 16, 20))
    assert rgb.conv1.W.shape == (16, 3, 3, 3) and rgb.fc5.W.shape == (4, 1000)


def test_seed_fixes_the_initial_weights():
    a, b, c = build_model(3, (1, 16, 16), seed=1), build_model(3, (1, 16, 16), seed=1), build_model(3, (1, 16, 16), seed=2)
    for (name, pa), (_, pb), (_, pc) in zip(a.namedparams(), b.namedparams(), c.namedparams()):
        np.testing.assert_array_equal(pa.array, pb.array)
        if name.endswith("/W"):
            assert not np.array_equal(pa.array, pc.array)


def test_dropout_only_in_training_mode():
    m = build_model(3, (1, 16, 16), seed=0)
    x = np.ones((2, 1, 16, 16), np.float32)
    rng = np.random.default_rng(0)
    with chainer.using_config("train", False):
        np.testing.assert_array_equal(m(x, rng=rng).array, m(x, rng=rng).array)
    with chainer.using_config("train", True):
        assert not np.array_equal(m(x, rng=rng).array, m(x, rng=rng).array)


@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.7])
def test_keep_mask_rate(ratio):
    mask = keep_mask(np.random.default_rng(0), (200, 1000), ratio)
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert abs(mask.mean() - (1 - ratio)) < 0.005


def test_bad_dropout_and_classes():
    with pytest.raises(AuditError, match="^dropout: "):
        build_model(3, dropout=1.0)
    with pytest.raises(AuditError, match="n_classes"):
        build_model(1)


@pytest.mark.parametrize("arch", ["origin", "gal"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 15, 17), (1, 12, 12)])
def test_fast_cpu_trunk_equals_chainer(shape, arch):
    m = build_model(5, shape, seed=4, arch=arch)
    x = np.random.default_rng(1).random((6, *shape), dtype=np.float32)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        ref = m.trunk_chainer(x).array
        np.testing.assert_allclose(m.trunk(x).array, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.trunk_array(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["origin", "gal"])
def test_fast_training_trunk_has_chainers_gradients(arch, monkeypatch):
    from audit import fastconv

    monkeypatch.setattr(fastconv, "TASK_BYTES", 20_000)  # many tasks, on the thread pool
    m = build_model(4, (2, 17, 15), seed=2, arch=arch)
    x = np.random.default_rng(3).random((9, 2, 17, 15), dtype=np.float32)
    grads = []
    for trunk in (m.trunk_chainer, m.trunk):
        m.cleargrads()
        h = trunk(x)
        F.sum(h * h).backward()  # a loss that weighs every output differently
        grads.append({n: p.grad.copy() for n, p in m.namedparams() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and "/conv1/W" in grads[0]
    for name, g in grads[0].items():
        np.testing.assert_allclose(grads[1][name], g, rtol=1e-4, atol=1e-4 * np.abs(g).max(), err_msg=name)


def test_gal_cnn_shapes():
    m = build_model(10, (1, 28, 28), arch="gal")
    # 28 -> conv4 25 -> conv4 22 -> pool 11: 32*11*11 = 3872 -> 128 -> 10
    assert m.conv1.W.shape == (32, 1, 4, 4) and m.fc3.W.shape == (128, 3872) and m.fc4.W.shape == (10, 128)
    hl = m.head_layers()
    assert (hl.first_ratio, hl.second_ratio) == (0.25, 0.5)
    from audit.model import model_from_spec

    assert type(model_from_spec(m.spec)) is type(m)
    with pytest.raises(AuditError, match="^model: "):
        build_model(3, arch="resnet")


def test_batchbald_cnn_shapes_and_spec():
    m = build_model(10, (1, 28, 28), arch="batchbald")
    # 28 -> conv5 24 -> pool 12 -> conv5 8 -> pool 4: 64*4*4 = 1024 -> 128 -> 10, as the paper's code
    assert m.conv1.W.shape == (32, 1, 5, 5) and m.conv2.W.shape == (64, 32, 5, 5)
    assert m.fc3.W.shape == (128, 1024) and m.fc4.W.shape == (10, 128)
    assert m.dropout_layers() == ((32, 0.5), (64, 0.5), (128, 0.5))
    from audit.model import model_from_spec

    again = model_from_spec(m.spec)
    assert type(again) is type(m) and again.fc3.W.shape == m.fc3.W.shape
    with pytest.raises(AuditError, match="too small for the batchbald CNN"):
        build_model(3, (1, 12, 12), arch="batchbald")


def _batchbald_reference(m, x, masks):
    """The paper's order through chainer's own functions: conv, channel dropout, max
    pooling, ReLU (twice); dense, dropout, ReLU, dense. ``masks``: per-image scaled masks."""
    m1, m2, m3 = masks
    h = F.relu(F.max_pooling_2d(m.conv1(x) * m1[:, :, None, None], 2))
    h = F.relu(F.max_pooling_2d(m.conv2(h) * m2[:, :, None, None], 2))
    return m.fc4(F.relu(m.fc3(h) * m3))


def test_batchbald_cnn_trains_with_the_papers_gradients(monkeypatch):
    """Channel dropout after the pooling (where it commutes) and fastconv's kernels on the
    CPU: the same logits and gradients as the paper's order in chainer's own functions,
    with the same masks."""
    from audit import model as model_mod

    m = build_model(4, (1, 20, 20), seed=5, arch="batchbald")
    x = np.random.default_rng(2).random((6, 1, 20, 20), dtype=np.float32)
    rng = np.random.default_rng(7)
    masks = [keep_mask(rng, (6, w), 0.5) * np.float32(2) for w in (32, 64, 128)]
    drawn = iter(masks)

    def fixed(rng_, shape, ratio, xp=np):  # hands out the masks above, in order
        return (next(drawn) / np.float32(2)).reshape(shape)

    monkeypatch.setattr(model_mod, "keep_mask", fixed)
    grads, logits = [], []
    for run in ("ours", "reference"):
        m.cleargrads()
        with chainer.using_config("train", True):
            y = m(x, rng=np.random.default_rng(0)) if run == "ours" else _batchbald_reference(m, x, masks)
        F.sum(y * y).backward()
        logits.append(y.array)
        grads.append({n: p.grad.copy() for n, p in m.namedparams()})
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    for name, g in grads[1].items():
        np.testing.assert_allclose(grads[0][name], g, rtol=1e-4, atol=1e-4 * np.abs(g).max(), err_msg=name)
