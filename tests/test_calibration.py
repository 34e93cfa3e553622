"""Calibration measures and temperature scaling (audit/calibration.py), and what
`audit score` reports of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from audit import calibration as cal
from audit.cli import app

from conftest import write_shapes_npz


def test_ece_and_nll_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.55, 0.45]])
    y = np.array([0, 1, 0, 0])
    # each confidence in a bin of its own (15 bins): 0.9 and 0.95 right, 0.6 wrong, 0.55 right
    want = (abs(1 - 0.9) + abs(1 - 0.95) + abs(0 - 0.6) + abs(1 - 0.55)) / 4
    assert cal.ece(p, y) == pytest.approx(want)
    assert cal.nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.95, 0.55])))
    assert np.isnan(cal.ece(np.empty((0, 2)), np.empty(0, int)))
    # perfectly calibrated by construction: confidence c, right with probability c
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200_000)
    right = rng.random(200_000) < conf
    probs = np.stack([conf, 1 - conf], axis=1)
    assert cal.ece(probs, np.where(right, 0, 1)) < 0.005


def test_temperature_recovers_the_truth_and_keeps_the_argmax():
    """Labels drawn from softmax(z); the model reports softmax(3 z) (overconfident):
    the fitted temperature is about 3, and calibration improves."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (20_000, 5))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (true.cumsum(1) > rng.random((20_000, 1))).argmax(1)
    over = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    t = cal.fit_temperature(over, y)
    assert 2.8 < t < 3.2
    fixed = cal.with_temperature(over, t)
    assert (fixed.argmax(1) == over.argmax(1)).all()
    assert cal.ece(fixed, y) < 0.3 * cal.ece(over, y) and cal.nll(fixed, y) < cal.nll(over, y)
    with pytest.raises(ValueError, match="no held-out images"):
        cal.fit_temperature(np.empty((0, 5)), np.empty(0, int))


def test_score_reports_calibration(tmp_path):
    runner = CliRunner()
    data = write_shapes_npz(tmp_path / "d.npz", 30, 10)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--data", str(data), "--run", str(run), "--epochs", "2",
                               "--batch-size", "32", "--lr", "1e-3"]).exit_code == 0
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "4"])
    assert r.exit_code == 0, r.output
    assert "calibration on valid, ECE (15 bins) / NLL: deterministic " in r.output
    assert "no temperature without --folds" in r.output
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "4", "--folds", "2"])
    assert r.exit_code == 0, r.output
    c = json.loads((run / "run.json").read_text())["score"]["calibration"]
    assert set(c) == {"split", "bins", "deterministic", "mc_mean", "calibrated"}
    assert 0 < c["calibrated"]["temperature"] < 20 and 0 <= c["calibrated"]["ece"] <= 1
    assert "MC mean at temperature" in r.output
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "4", "--splits", "train"])
    assert r.exit_code == 0 and "calibration on valid" not in r.output


def test_reliability_bins_and_the_report_diagram(tmp_path):
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.55, 0.45]])
    y = np.array([0, 1, 0, 0])
    bins = cal.reliability(p, y)
    assert [b["n"] for b in bins] == [1, 1, 1, 1]  # 0.55, 0.6, 0.9 and 0.95 fall in bins 8, 9, 13, 14
    assert sum(b["n"] / 4 * abs(b["accuracy"] - b["confidence"]) for b in bins) == pytest.approx(cal.ece(p, y))
    runner = CliRunner()
    data = write_shapes_npz(tmp_path / "d.npz", 30, 10)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--data", str(data), "--run", str(run), "--epochs", "2",
                               "--batch-size", "32", "--lr", "1e-3"]).exit_code == 0
    assert runner.invoke(app, ["score", "--run", str(run), "--samples", "4", "--folds", "2"]).exit_code == 0
    r = runner.invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "index.html").read_text()
    assert '<svg class="reliability"' in html
    assert "These validation images were scored by all 3 models that did not see them" in html
    assert [c in html for c in ('data-curve="deterministic"', 'data-curve="mc_mean"', 'data-curve="calibrated"')] \
        == [True, True, True]
    c = json.loads((run / "run.json").read_text())["score"]["calibration"]
    n_points = sum(len(c[k]["bins"]) for k in ("deterministic", "mc_mean", "calibrated"))
    svg = html[html.index('<svg class="reliability"'):html.index("</svg>", html.index('<svg class="reliability"'))]
    assert svg.count("<circle") == n_points


def test_flags_are_decided_on_the_calibrated_probabilities(tmp_path):
    """With --folds the flags use the MC mean at the fitted temperature (run.json and the
    output say so); `audit flag` applies the same temperature; a tampered temperature is
    one line."""
    import pandas as pd

    from audit.flags import FlagConfig, flag_issues
    from conftest import assert_one_line_error

    runner = CliRunner()
    data = write_shapes_npz(tmp_path / "d.npz", 30, 10)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--data", str(data), "--run", str(run), "--epochs", "2",
                               "--batch-size", "32", "--lr", "1e-3"]).exit_code == 0
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "4", "--folds", "2", "--confidence", "0.4"])
    assert r.exit_code == 0, r.output
    meta = json.loads((run / "run.json").read_text())
    t = meta["score"]["calibration"]["calibrated"]["temperature"]
    assert meta["flags"]["probabilities"] == f"MC mean at temperature {t:.4f} (calibrated)"
    assert f"decided on the MC mean at temperature {t:.4f} (calibrated)" in r.output
    scores = pd.read_csv(run / "scores.csv", keep_default_na=False)
    with np.load(run / "mc_summary.npz") as z:
        probs = z["probs"]
    config = FlagConfig(confidence=0.4)
    want = flag_issues(scores.drop(columns=["flag"]), cal.with_temperature(probs, t), config=config)
    assert scores["flag"].tolist() == want["flag"].tolist()
    np.testing.assert_allclose(scores["mislabel_score"], want["mislabel_score"], atol=1e-5)
    plain = flag_issues(scores.drop(columns=["flag"]), probs, config=config)
    assert not np.allclose(want["mislabel_score"], plain["mislabel_score"])  # the temperature changed them
    before = (run / "scores.csv").read_bytes()
    assert runner.invoke(app, ["flag", "--run", str(run), "--confidence", "0.4"]).exit_code == 0
    assert (run / "scores.csv").read_bytes() == before  # the same temperature, the same flags
    meta["score"]["calibration"]["calibrated"]["temperature"] = -1
    (run / "run.json").write_text(json.dumps(meta))
    assert_one_line_error(runner.invoke(app, ["flag", "--run", str(run)]),
                          "field 'score.calibration.calibrated.temperature': expected a positive number, found -1", code=1)
    assert (run / "scores.csv").read_bytes() == before


def test_nll_is_never_negative():
    p = np.array([[1.0000001, 0.0], [0.9999999, 1e-7]], np.float32)
    assert cal.nll(p, np.array([0, 0])) >= 0.0 and f"{cal.nll(p, np.array([0, 0])):.4f}" == "0.0000"
    assert f"{cal.nll(np.array([[1.0, 0.0]], np.float32), np.array([0])):.4f}" == "0.0000"
