from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import audit
from audit.errors import AuditError
from audit.flags import FlagConfig, flag_issues, pair_counts
from audit.score import score_dataset
from conftest import make_shapes


def _df(labels, split="train", eh=0.1, mi=0.0):
    n = len(labels)
    return pd.DataFrame({"split": split, "label": labels, "entropy": 0.5,
                         "expected_entropy": np.full(n, eh), "mutual_info": np.full(n, mi)})


def test_rule_known_answers():
    probs = np.array([
        [0.02, 0.97, 0.01],  # confidently another class: mislabeled -> 1
        [0.45, 0.40, 0.15],  # label 0 below confidence, no other class above it: ambiguous, alt 1
        [0.90, 0.05, 0.05],  # fine
        [0.30, 0.60, 0.10],  # another class just above confidence: mislabeled -> 1
    ], np.float32)
    out = flag_issues(_df([0, 0, 0, 0]), probs, class_names=["a", "b", "c"])
    assert out.flag.tolist() == ["mislabeled", "ambiguous", "", "mislabeled"]
    assert out.suggested_label.tolist() == [1, 1, -1, 1]
    np.testing.assert_allclose(out.mislabel_score, [0.95, -0.05, -0.85, 0.30], atol=1e-6)
    assert out.reason[0] == "predicted b with p=0.97; p(label a)=0.02"
    assert out.reason[1].startswith("split between a (0.45) and b (0.40); mostly aleatoric")
    assert out.reason[2] == ""


def test_cleanlab_rule_decides_mislabeled_where_cleanlab_judged():
    probs = np.array([
        [0.02, 0.97, 0.01],  # cleanlab: an issue -> mislabeled
        [0.30, 0.60, 0.10],  # another class above confidence, but cleanlab: no issue -> ambiguous
        [0.80, 0.15, 0.05],  # an issue although the label leads -> mislabeled, suggesting b
        [0.30, 0.60, 0.10],  # not judged (in sample): the confidence rule -> mislabeled
        [0.90, 0.05, 0.05],  # fine
    ], np.float32)
    df = _df([0] * 5).assign(cl_issue=pd.array([1, 0, 1, pd.NA, 0], dtype="Int64"))
    out = flag_issues(df, probs, class_names=["a", "b", "c"])
    assert out.flag.tolist() == ["mislabeled", "ambiguous", "mislabeled", "mislabeled", ""]
    assert out.suggested_label.tolist() == [1, 1, 1, 1, -1]
    assert out.reason[2] == "a label issue by cleanlab's filter: p(label a)=0.80; b is the likeliest other class, p=0.15"
    assert out.reason[3] == "predicted b with p=0.60; p(label a)=0.30"
    plain = flag_issues(df, probs, class_names=["a", "b", "c"], config=FlagConfig(rule="confidence"))
    assert plain.flag.tolist() == ["mislabeled", "mislabeled", "", "mislabeled", ""]
    with pytest.raises(AuditError, match="cl_issue holds something other than 1, 0 or empty"):
        flag_issues(df.assign(cl_issue=[1, 0, 2, 0, 0]), probs)


def test_epistemic_reason():
    probs = np.array([[0.45, 0.40, 0.15]], np.float32)
    out = flag_issues(_df([0], eh=0.2, mi=0.6), probs)
    assert "mostly epistemic" in out.reason[0]


def test_flag_top_balances_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    probs = np.zeros((40, 2), np.float32)
    p_wrong = rng.uniform(0.6, 1.0, 40)
    probs[np.arange(40), 1 - labels] = p_wrong  # every image confidently the other class
    probs[np.arange(40), labels] = 1 - p_wrong
    out = flag_issues(_df(labels), probs, config=FlagConfig(flag_top=3))
    kept = out[out.flag == "mislabeled"]
    assert kept.groupby("label").size().tolist() == [3, 3]
    for c in (0, 1):  # the most suspicious of each class are the ones kept
        top = np.sort(out[out.label == c].mislabel_score)[-3:]
        np.testing.assert_allclose(np.sort(kept[kept.label == c].mislabel_score), top)
    assert (flag_issues(_df(labels), probs, config=FlagConfig(flag_top=None)).flag == "mislabeled").sum() == 40
    assert pair_counts(out, ["x", "y"]) == [{"given": "x", "suggested": "y", "n": 3}, {"given": "y", "suggested": "x", "n": 3}]


@pytest.mark.parametrize("kwargs, option", [(dict(confidence=1.0), "confidence"), (dict(flag_top=0), "flag_top"),
                                            (dict(rule="vote"), "flag_rule")])
def test_bad_config(kwargs, option):
    with pytest.raises(AuditError, match=f"^{option}: "):
        FlagConfig(**kwargs)


def test_misaligned_probs():
    with pytest.raises(AuditError, match="aligned"):
        flag_issues(_df([0, 1]), np.zeros((3, 2), np.float32))


def _auroc(scores, positives):
    """Probability that a random positive outranks a random negative (ties half)."""
    ranks = pd.Series(scores).rank().to_numpy()
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_planted_label_noise_is_found_out_of_sample():
    """Flip 5% of training labels; K-fold out-of-sample scores find them."""
    x, y_true = make_shapes(100, seed=3)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y_true), size=15, replace=False)
    y = y_true.copy()
    y[flipped] = (y[flipped] + rng.integers(1, 3, size=15)) % 3
    ds = audit.Dataset(audit.Split(x, y.astype(np.int32)), audit.Split(x[:30], y_true[:30].astype(np.int32)),
                       ("h", "v", "d"), "planted")
    cfg = audit.TrainConfig(epochs=6, batch_size=32, lr=1e-3)
    main = audit.train(ds, cfg).model
    parts = np.array_split(rng.permutation(len(y)), 3)
    folds = [(audit.train(ds, cfg, subset=np.setdiff1d(np.arange(len(y)), p)).model, np.sort(p)) for p in parts]
    res = score_dataset(main, ds, splits=("train",), samples=10, train_folds=folds)
    out = flag_issues(res.scores, res.probs, config=FlagConfig(flag_top=None))
    is_flip = np.isin(np.arange(len(y)), flipped)
    assert _auroc(out.mislabel_score.to_numpy(), is_flip) > 0.97
    found = out[out.flag == "mislabeled"]
    assert set(flipped) <= set(found["index"])  # recall 1
    assert len(found) <= 20  # precision >= 0.75
    np.testing.assert_array_equal(found.set_index("index").loc[flipped, "suggested_label"], y_true[flipped])
    assert set(out.fold) == {0, 1, 2}


def test_confident_learning_finds_planted_flips_and_names_an_empty_class():
    """cleanlab's counts on probabilities that know the true class: the planted flips are
    its issues, the estimated joint puts them in the (given, true) cells they came from."""
    from audit.confident import confident_learning, top_pairs

    rng = np.random.default_rng(1)
    n, c = 3000, 4
    y = rng.integers(0, c, n)
    p = rng.dirichlet(np.full(c, 0.3), n) * 0.2
    p[np.arange(n), y] += 0.8
    flips = rng.choice(n, 90, replace=False)
    given = y.copy()
    given[flips] = (y[flips] + 1) % c  # class k's flips are labelled k + 1
    names = ["a", "b", "c", "d"]
    summary, issues = confident_learning(given, p, names)
    found = set(np.flatnonzero(issues))
    assert issues.dtype == bool and len(found & set(flips)) >= 80 and len(found - set(flips)) <= 5
    assert summary["n"] == n and summary["flagged"] == len(found) == sum(summary["flagged_per_class"])
    assert abs(summary["estimated_errors"] - 90) <= 10 and summary["images"] == np.bincount(given, minlength=c).tolist()
    assert np.allclose(np.sum(summary["joint"]), 1) and len(summary["thresholds"]) == c
    pairs = top_pairs(summary, names)
    assert {(q["given"], q["true"]) for q in pairs[:4]} == {("b", "a"), ("c", "b"), ("d", "c"), ("a", "d")}
    with pytest.raises(AuditError, match="^confident learning: class 'c' has no images in this split"):
        confident_learning(np.array([0, 1, 3, 0]), np.full((4, 4), 0.25), names)
