from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import audit
from audit.cli import app
from audit.curate import apply_decisions
from audit.errors import AuditError

runner = CliRunner()


def _decisions(rows):
    return pd.DataFrame(rows, columns=["split", "index", "path", "action", "new_label"]).astype(str)


def test_apply_decisions_leaves_the_source_alone(shapes_npz):
    ds = audit.load_dataset(shapes_npz)
    before = ds.train.y.copy()
    d = _decisions([["train", 3, "", "drop", ""], ["train", 5, "", "relabel", "2"],
                    ["train", 7, "", "keep", ""], ["valid", 1, "", "drop", ""]])
    cur = apply_decisions(ds, d)
    np.testing.assert_array_equal(ds.train.y, before)  # untouched
    assert cur.dataset.train.y[5] == 2 and cur.dataset.train.x is ds.train.x
    assert 3 not in cur.train_indices and len(cur.train_indices) == len(before) - 1
    assert (cur.dropped, cur.relabelled, cur.kept, cur.valid_decisions) == (1, 1, 1, 1)
    assert cur.dataset.fingerprint != ds.fingerprint or before[5] == 2
    np.testing.assert_array_equal(cur.dataset.valid.y, ds.valid.y)


@pytest.mark.parametrize(
    "row, message",
    [
        (["train", 99999, "", "drop", ""], r"line 2: train index 99999 is out of range"),
        (["train", "x", "", "drop", ""], r"index 'x' is not an integer"),
        (["test", 1, "", "drop", ""], r"split 'test' is not one of train, valid"),
        (["train", 1, "", "delete", ""], r"action 'delete' is not one of keep, drop, relabel"),
        (["train", 1, "", "relabel", "cat"], r"new_label 'cat' is not a class"),
        (["train", 1, "", "drop", "2"], r"only relabel takes one"),
    ],
)
def test_bad_decisions(shapes_npz, row, message):
    with pytest.raises(AuditError, match=message):
        apply_decisions(audit.load_dataset(shapes_npz), _decisions([row]))


def test_duplicate_decisions(shapes_npz):
    d = _decisions([["train", 1, "", "drop", ""], ["train", 1, "", "keep", ""]])
    with pytest.raises(AuditError, match="train index 1 has more than one decision"):
        apply_decisions(audit.load_dataset(shapes_npz), d)


FLIPPED = np.arange(0, 300, 20)  # 15 training labels planted wrong, so the flags have something to find


@pytest.fixture(scope="module")
def noisy_npz(shapes_npz, tmp_path_factory):
    with np.load(shapes_npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["y_train"] = arrays["y_train"].copy()
    arrays["y_train"][FLIPPED] = (arrays["y_train"][FLIPPED] + 1) % 3
    path = tmp_path_factory.mktemp("noisy") / "noisy.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def scored(noisy_npz, tmp_path_factory):
    run = tmp_path_factory.mktemp("cur") / "src"
    for args in (["train", "--data", str(noisy_npz), "--run", str(run), "--epochs", "3", "--batch-size", "32", "--lr", "1e-3"],
                 ["score", "--run", str(run), "--samples", "4", "--confidence", "0.34"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    return run


def test_retrain_with_decisions_then_score_the_curated_run(scored, tmp_path):
    dec = tmp_path / "d.csv"
    _decisions([["train", 0, "", "drop", ""], ["train", 1, "", "relabel", "0"]]).to_csv(dec, index=False)
    src_files = {p.name: p.read_bytes() for p in scored.iterdir() if p.is_file()}
    out = tmp_path / "cur"
    r = runner.invoke(app, ["retrain", "--run", str(scored), "--decisions", str(dec), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith(f"curated run written to {out}/")
    meta = json.loads((out / "run.json").read_text())
    assert meta["command"] == "retrain" and meta["data"]["subset"]["n"] == 299
    assert meta["data"]["curation"]["source_run"] == str(scored)
    assert "valid_accuracy" in meta["results_before"]
    assert (out / "decisions.csv").is_file() and "0" not in (out / "subset.txt").read_text().split()
    assert {p.name: p.read_bytes() for p in scored.iterdir() if p.is_file()} == src_files  # source untouched
    # the curated run reloads its data (decisions re-applied, fingerprint checked) and scores
    r = runner.invoke(app, ["score", "--run", str(out), "--samples", "2"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "scores.csv")
    assert df[(df.split == "train") & (df["index"] == 1)].label.item() == 0
    # and a curated run can be curated again: its decisions carry over
    dec2 = tmp_path / "d2.csv"
    _decisions([["train", 2, "", "drop", ""]]).to_csv(dec2, index=False)
    r = runner.invoke(app, ["retrain", "--run", str(out), "--decisions", str(dec2), "--out", str(tmp_path / "cur2")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cur2" / "run.json").read_text())["data"]["subset"]["n"] == 298
    r = runner.invoke(app, ["score", "--run", str(tmp_path / "cur2"), "--samples", "2", "--splits", "train"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "cur2" / "scores.csv")
    assert df[df["index"] == 1].label.item() == 0


def test_retrain_drop_flagged(scored, tmp_path):
    scores = pd.read_csv(scored / "scores.csv", keep_default_na=False)
    flagged = scores[(scores.split == "train") & (scores.flag != "")]
    n_flagged = len(flagged)
    assert n_flagged >= 10 and len(set(flagged["index"]) & set(FLIPPED)) >= 10  # the planted flips among them
    out = tmp_path / "dropped"
    r = runner.invoke(app, ["retrain", "--run", str(scored), "--drop-flagged", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"applied: {n_flagged} dropped" in r.output
    assert json.loads((out / "run.json").read_text())["data"]["subset"]["n"] == 300 - n_flagged
    kept = set(int(v) for v in (out / "subset.txt").read_text().split())
    assert not kept & set(flagged["index"])  # exactly the flagged images dropped


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("split,index,path,action,new_label\ntrain,5000,,drop,\n", "train index 5000 is out of range"),
        ("split,index,path,action,new_label\ntrain,1,,relabel,zebra\n", "new_label 'zebra' is not a class"),
        ("split,index,path,action,new_label\ntrain,1,,burn,\n", "action 'burn' is not one of"),
        ("split,action\ntrain,drop\n", "missing column(s) index"),
    ],
)
def test_retrain_refuses_bad_decisions_and_trains_nothing(scored, tmp_path, content, fragment):
    dec = tmp_path / "d.csv"
    dec.write_text(content)
    out = tmp_path / "never"
    r = runner.invoke(app, ["retrain", "--run", str(scored), "--decisions", str(dec), "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert fragment in r.output and not out.exists()


def test_retrain_needs_something_to_do(scored, tmp_path):
    r = runner.invoke(app, ["retrain", "--run", str(scored), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "give --decisions FILE, --drop-flagged, or both" in r.output


def test_flag_command_recomputes(scored):
    r = runner.invoke(app, ["flag", "--run", str(scored), "--confidence", "0.999", "--flag-top", "1"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(scored / "scores.csv", keep_default_na=False)
    sizes = df[df.flag != ""].groupby(["split", "label", "flag"]).size()
    assert len(sizes) >= 3 and sizes.max() == 1
    assert json.loads((scored / "run.json").read_text())["flags"]["confidence"] == 0.999


def test_flags_left_out_by_flag_top_are_said(scored, tmp_path):
    """--flag-top never cuts silently: the line, run.json and the report say how many."""
    from audit.flags import FlagConfig, flag_issues

    r = runner.invoke(app, ["flag", "--run", str(scored), "--confidence", "0.34", "--flag-top", "1"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(scored / "scores.csv", keep_default_na=False)
    with np.load(scored / "mc_summary.npz") as z:
        probs = z["probs"]
    every = flag_issues(df, probs, config=FlagConfig(confidence=0.34, flag_top=None))
    n_cut = int((every.flag != "").sum() - (df.flag != "").sum())
    assert n_cut > 0
    left = json.loads((scored / "run.json").read_text())["flags"]["left_out"]
    assert sum(left.values()) == n_cut
    line = next(ln for ln in r.output.splitlines() if ln.startswith("flagged: "))
    assert f"{n_cut:,} more left out by --flag-top 1" in line and "--flag-top 0 keeps all" in line
    r = runner.invoke(app, ["report", "--run", str(scored), "--split", "train", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "index.html").read_text()
    assert f"{sum(v for k, v in left.items() if k.startswith('train/'))} more flags left out by --flag-top 1" in html
    r = runner.invoke(app, ["flag", "--run", str(scored), "--confidence", "0.34", "--flag-top", "0"])
    assert "left out" not in r.output
    assert json.loads((scored / "run.json").read_text())["flags"]["left_out"] == {}
