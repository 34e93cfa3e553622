"""The run folder under faults and hostile input (issue: the run store).

Every case asserts the same three things where they apply:

- the command exits non-zero with exactly one ``error:`` line and no traceback;
- the run's files are byte-identical to before, or (after a kill past the commit
  point, once the next command or reader has finished that commit) the whole new state;
- after a kill, running the command again (or ``--resume``) gives the uninterrupted
  result to the byte (volatile fields aside: timestamps and seconds).

Kills are real: the command runs in a forked child that ``os._exit``s at the named
publish step of the commit primitive (``runs._fault``), so nothing after that step
runs, not even ``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import audit
from audit import runs
from audit.cli import app

from conftest import assert_one_line_error, make_shapes, write_shapes_npz

runner = CliRunner()
FAST = ["--epochs", "2", "--batch-size", "32", "--lr", "1e-3"]
SCORE = ["--samples", "4"]
ACQ = ["--strategy", "bald,random", "--initial", "6", "--step", "3", "--rounds", "2", "--samples", "4",
       "--pool-subset", "30", "--epochs", "2", "--batch-size", "16", "--model", "origin"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


one_line_error = assert_one_line_error


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder that a user sees (hidden staging left aside)."""
    if not run.exists():
        return {}
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run).parts)}


VOLATILE_JSON = ("created", "timings", "seconds", "fold_training_seconds", "features_seconds", "resumed")
VOLATILE_CSV_COLUMNS = ("seconds", "images_per_s")


def _stable_json(obj):
    if isinstance(obj, dict):
        return {k: _stable_json(v) for k, v in obj.items() if k not in VOLATILE_JSON}
    return obj


def stable(run: Path) -> dict:
    """A run's files with what differs between two identical runs (time) taken out."""
    out = {}
    for name, data in snapshot(run).items():
        if name == runs.RUN_JSON:
            meta = json.loads(data)
            volatile = {n for n in meta.get("files", {}) if n.endswith(".csv") and n in ("train_log.csv", "al_curve.csv")}
            meta["files"] = {k: v for k, v in meta.get("files", {}).items() if k not in volatile}
            out[name] = _stable_json(meta)
        elif name.endswith(".csv") and name in ("train_log.csv", "al_curve.csv"):
            df = pd.read_csv(io.BytesIO(data))
            out[name] = df.drop(columns=[c for c in VOLATILE_CSV_COLUMNS if c in df.columns]).to_csv(index=False)
        else:
            out[name] = data
    return out


def killed_at(step: str, *args, nth: int = 1) -> int:
    """Run the command in a forked child that dies (os._exit(137)) at the ``nth`` time
    the commit primitive reaches ``step``; returns the child's exit status."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind after the kill
        seen = [0]

        def fault(name):
            if name == step:
                seen[0] += 1
                if seen[0] == nth:
                    os._exit(137)

        runs._fault = fault
        try:
            r = runner.invoke(app, [str(a) for a in args])
            os._exit(r.exit_code)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def leftovers(run: Path) -> list[str]:
    hidden = [p.name for p in run.parent.glob(f".{run.name}*")]
    if run.is_dir():
        hidden += [p.name for p in run.rglob(".*")]
    return hidden


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small 3-class .npz: 60 train and 30 valid 16x16 images."""
    return write_shapes_npz(tmp_path_factory.mktemp("faults") / "small.npz", 20, 10, seeds=(11, 12))


@pytest.fixture(scope="module")
def template(data, tmp_path_factory) -> Path:
    """A trained and scored run, copied by each test that changes one."""
    run = tmp_path_factory.mktemp("tpl") / "run"
    assert invoke("train", "--data", data, "--run", run, *FAST).exit_code == 0
    r = invoke("score", "--run", run, *SCORE)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def scored(template, tmp_path) -> Path:
    run = tmp_path / "runs" / "r"
    shutil.copytree(template, run)
    return run


@pytest.fixture(scope="module")
def acquired(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("acq") / "al"
    r = invoke("acquire", "--data", data, "--run", run, *ACQ)
    assert r.exit_code == 0, r.output
    return run


# ---------------------------------------------------------------- kills at each step

TRAIN_NEW_STEPS = ["staged", "published"]
OVERWRITE_STEPS = ["staged", "journaled", "delete mc_summary.npz", "delete scores.csv", "rename model.npz",
                   "rename train_log.csv", "rename run.json", "published"]
SCORE_STEPS = ["staged", "journaled", "rename mc_summary.npz", "rename scores.csv", "rename run.json", "published"]
FLAG_STEPS = ["staged", "journaled", "rename mc_summary.npz", "rename scores.csv", "rename run.json"]


@pytest.mark.parametrize("step", TRAIN_NEW_STEPS)
def test_kill_during_train(data, tmp_path, step):
    run = tmp_path / "runs" / "new"
    assert killed_at(step, "train", "--data", data, "--run", run, *FAST) == 137
    after = snapshot(run)
    if step == "staged":
        assert after == {}  # not published: no run, only a staging folder the next command removes
    r = invoke("train", "--data", data, "--run", run, *FAST, *(["--overwrite"] if after else []))
    assert r.exit_code == 0, r.output
    assert leftovers(run) == []
    ref = tmp_path / "runs" / "ref"
    assert invoke("train", "--data", data, "--run", ref, *FAST).exit_code == 0
    assert stable(run) == stable(ref)


@pytest.mark.parametrize("step", OVERWRITE_STEPS)
def test_kill_during_overwrite_never_loses_the_run(scored, data, tmp_path, step):
    before = snapshot(scored)
    args = ("train", "--data", data, "--run", scored, *FAST, "--seed", "1", "--overwrite")
    assert killed_at(step, *args) == 137
    assert scored.is_dir() and (scored / "run.json").is_file()  # the run is never missing
    runs.RunStore(scored).meta()  # a reader finishes a committed change (or leaves it as it was)
    now = snapshot(scored)
    ref = tmp_path / "ref"
    assert invoke("train", "--data", data, "--run", ref, *FAST, "--seed", "1").exit_code == 0
    if step == "staged":
        assert now == before
    else:
        assert stable(scored) == stable(ref)  # rolled forward: the whole new run
    r = invoke("score", "--run", scored, *SCORE)  # a working run; the next command cleans up
    assert r.exit_code == 0, r.output
    assert leftovers(scored) == []


@pytest.mark.parametrize("step", SCORE_STEPS)
def test_kill_during_score(scored, tmp_path, step):
    before = snapshot(scored)
    assert killed_at(step, "score", "--run", scored, "--samples", "6") == 137
    r = invoke("flag", "--run", scored)  # the next command settles, then sees one consistent state
    assert r.exit_code == 0, r.output
    assert leftovers(scored) == []
    if step == "staged":
        assert json.loads((scored / "run.json").read_bytes())["score"]["samples"] == 4
        assert snapshot(scored)["mc_summary.npz"] == before["mc_summary.npz"]
    else:
        assert json.loads((scored / "run.json").read_bytes())["score"]["samples"] == 6
    ref = tmp_path / "ref"
    shutil.copytree(scored, ref)
    assert invoke("score", "--run", scored, "--samples", "6").exit_code == 0
    shutil.rmtree(ref)
    shutil.copytree(scored.parent.parent / "runs" / "r", ref)
    # rerunning gives the uninterrupted result: the same as scoring a fresh copy once
    fresh = tmp_path / "fresh"
    shutil.copytree(scored, fresh)
    assert invoke("score", "--run", fresh, "--samples", "6").exit_code == 0
    assert stable(scored) == stable(fresh)


@pytest.mark.parametrize("step", FLAG_STEPS)
def test_kill_during_flag(scored, step):
    before = snapshot(scored)
    assert killed_at(step, "flag", "--run", scored, "--confidence", "0.9") == 137
    meta = runs.RunStore(scored).meta()
    scores = pd.read_csv(scored / "scores.csv", keep_default_na=False)
    want = 0.5 if step == "staged" else 0.9
    assert meta.flags["confidence"] == want
    if step == "staged":
        assert snapshot(scored) == before
    # the flags on disk are the ones run.json describes: recomputing them changes nothing
    flagged = (scores["flag"] != "").sum()
    assert sum(v for k, v in meta.flags["counts"].items() if not k.endswith("/none")) == flagged
    assert invoke("flag", "--run", scored, "--confidence", "0.9").exit_code == 0
    assert leftovers(scored) == []


@pytest.mark.parametrize("step", ["staged", "published"])
def test_kill_during_retrain(scored, tmp_path, step):
    out = tmp_path / "curated"
    source = snapshot(scored)
    args = ("retrain", "--run", scored, "--drop-flagged", "--out", out)
    assert killed_at(step, *args) == 137
    assert snapshot(scored) == source
    r = invoke(*args, *(["--overwrite"] if out.exists() else []))
    assert r.exit_code == 0, r.output
    assert leftovers(out) == []
    ref = tmp_path / "ref"
    assert invoke("retrain", "--run", scored, "--drop-flagged", "--out", ref).exit_code == 0
    a, b = stable(out), stable(ref)
    a["run.json"]["data"].pop("curation"), b["run.json"]["data"].pop("curation")
    assert a == b


@pytest.mark.parametrize("step, nth", [("journaled", 2), ("rename al_curve.csv", 3), ("rename run.json", 4),
                                       ("staged", 5)])
def test_kill_during_acquire_then_resume(data, acquired, tmp_path, step, nth):
    run = tmp_path / "al"
    assert killed_at(step, "acquire", "--data", data, "--run", run, *ACQ, nth=nth) == 137
    r = invoke("acquire", "--data", data, "--run", run, *ACQ, "--resume")
    assert r.exit_code == 0, r.output
    assert stable(run)["acquired.csv"] == stable(acquired)["acquired.csv"]
    assert stable(run)["al_curve.csv"] == stable(acquired)["al_curve.csv"]
    assert leftovers(run) == []


def test_kill_during_fold_training_keeps_finished_folds(scored):
    assert killed_at("staged", "score", "--run", scored, "--folds", "2", *SCORE, nth=2) == 137
    meta = runs.RunStore(scored).meta()
    assert list(meta.folds) == ["2-0"] and (scored / "folds" / "2-0" / "model.npz").is_file()
    r = invoke("score", "--run", scored, "--folds", "2", *SCORE)
    assert r.exit_code == 0, r.output
    assert "fold 1/2" not in r.output and "fold 2/2" in r.output  # fold 0 reused, fold 1 trained


# ------------------------------------------------------------ concurrency, disk, perms


def test_second_writer_is_refused(scored):
    before = snapshot(scored)
    lock = runs.RunLock(scored)
    lock.acquire()
    try:
        for args in (("score", "--run", scored, *SCORE), ("flag", "--run", scored),
                     ("train", "--run", scored, "--overwrite", *FAST)):
            one_line_error(invoke(*args), "is in use by another audit command", f"pid {os.getpid()}", code=1)
    finally:
        lock.release()
    assert snapshot(scored) == before
    assert invoke("flag", "--run", scored).exit_code == 0  # free again


def test_concurrent_scores_leave_one_consistent_state(scored):
    pid = os.fork()
    if pid == 0:
        r = runner.invoke(app, ["score", "--run", str(scored), "--samples", "7"])
        os._exit(r.exit_code)
    r = invoke("score", "--run", scored, "--samples", "5")
    _, status = os.waitpid(pid, 0)
    codes = sorted([r.exit_code, os.waitstatus_to_exitcode(status)])
    assert codes[0] == 0  # at least one ran; the other ran after it or was refused in one line
    if codes[1] != 0:
        assert codes[1] == 1
    store = runs.RunStore(scored)
    samples = store.meta().score["samples"]
    scores = store.read_table(runs.SCORES, ["entropy"])
    probs = store.read_npz(runs.MC_SUMMARY)["probs"]
    assert samples in (5, 7) and len(scores) == len(probs)  # scores and probabilities from one scoring


def _raise_on_write(monkeypatch, err: int):
    real = runs._fsync_write

    def broken(path, data):
        if "run.json" in str(path) or path.suffix in (".csv", ".npz"):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, data)

    monkeypatch.setattr(runs, "_fsync_write", broken)


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "not writable"),
                                        (errno.EACCES, "not writable")])
def test_disk_full_and_read_only_are_one_line(scored, monkeypatch, err, words):
    before = snapshot(scored)
    _raise_on_write(monkeypatch, err)
    one_line_error(invoke("score", "--run", scored, *SCORE), words, code=1)
    one_line_error(invoke("flag", "--run", scored), words, code=1)
    assert snapshot(scored) == before
    assert leftovers(scored) == []


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``path`` (skips where this user cannot mount)."""
    path.mkdir()
    if os.system(f"mount -t tmpfs -o size={size} tmpfs {path} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        yield path
    finally:
        os.system(f"umount {path}")


def test_disk_full_on_a_real_small_tmpfs(data, tmp_path):
    with tmpfs(tmp_path / "small", "256k") as mnt:
        run = mnt / "runs" / "r"
        one_line_error(invoke("train", "--data", data, "--run", run, *FAST), "the disk is full", code=1)
        assert not run.exists() and leftovers(run) == []


def test_new_run_into_a_read_only_parent(data, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(runs.RunLock, "acquire", refuse)
    one_line_error(invoke("train", "--data", data, "--run", tmp_path / "ro" / "r", *FAST), "not writable", code=1)


# ------------------------------------------------------------------- safe loading


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_npz(path: Path, marker: Path, base: dict) -> bytes:
    """An npz like a model's whose first member is a pickled object that would create ``marker``."""
    buf = io.BytesIO()
    arrays = dict(base)
    first = next(iter(arrays))
    arrays[first] = np.array([_Payload(str(marker))], dtype=object)
    np.savez(buf, **arrays)
    return buf.getvalue()


def _rewrite_with_manifest(run: Path, name: str, data: bytes) -> None:
    """Replace a run file and its manifest entry, as an attacker who edits both would."""
    (run / name).write_bytes(data)
    meta = json.loads((run / "run.json").read_text())
    meta["files"][name] = {"sha256": runs.sha256(data), "bytes": len(data)}
    (run / "run.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["model.npz", "folds/2-0/model.npz"])
def test_pickled_model_never_runs(scored, tmp_path, name):
    if name.startswith("folds"):
        assert invoke("score", "--run", scored, "--folds", "2", *SCORE).exit_code == 0
    marker = tmp_path / "pwned"
    with np.load(scored / name) as z:
        base = {k: z[k] for k in z.files}
    _rewrite_with_manifest(scored, name, _pickled_npz(scored / name, marker, base))
    before = snapshot(scored)
    args = ("score", "--run", scored, *SCORE, *(["--folds", "2"] if name.startswith("folds") else []))
    one_line_error(invoke(*args), "pickled object", "never loads", code=1)
    assert not marker.exists()
    assert snapshot(scored) == before


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_broken_model_is_one_line(scored, how):
    data = (scored / "model.npz").read_bytes()
    bad = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a zip at all"}[how]
    _rewrite_with_manifest(scored, "model.npz", bad)
    one_line_error(invoke("score", "--run", scored, *SCORE), "model.npz", "not a readable .npz", code=1)


def test_model_changed_outside_audit_is_named(scored):
    with open(scored / "model.npz", "ab") as f:
        f.write(b"x")
    one_line_error(invoke("score", "--run", scored, *SCORE), "model.npz", "does not match run.json", code=1)


def test_truncated_mc_summary_is_one_line(scored):
    data = (scored / "mc_summary.npz").read_bytes()
    _rewrite_with_manifest(scored, "mc_summary.npz", data[:100])
    one_line_error(invoke("flag", "--run", scored), "mc_summary.npz", "not a readable .npz", code=1)


def test_nan_weights_are_never_scored(scored):
    with np.load(scored / "model.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["fc4/W"] = np.full_like(arrays["fc4/W"], np.nan)
    _rewrite_with_manifest(scored, "model.npz", runs.npz_bytes(arrays))
    before = snapshot(scored)
    one_line_error(invoke("score", "--run", scored, *SCORE), "fc4/W", "NaN", code=1)
    assert snapshot(scored) == before


# ----------------------------------------------------------- run.json and paths


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.update(config="fast"), "field 'config': expected an object"),
    (lambda m: m["data"].update(n_train="many"), "field 'data.n_train': expected an integer"),
    (lambda m: m.update(seed="0"), "field 'seed': expected an integer"),
    (lambda m: m.pop("data"), "field 'data' is missing"),
    (lambda m: m.update(command="format-disk"), "field 'command': expected one of"),
    (lambda m: m["data"].update(class_names="abc"), "field 'data.class_names'"),
    (lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0", "bytes": 1}}), "must be a plain path inside"),
    (lambda m: m["config"].update(epochs="ten"), "field 'config': epochs: expected an integer"),
    (lambda m: m["config"].update(speed=11), "field 'config.speed' is not a training setting"),
    (lambda m: m.update(version=99), "written by a newer audit"),
])
def test_run_json_with_wrong_types(scored, edit, fragment):
    meta = json.loads((scored / "run.json").read_text())
    edit(meta)
    (scored / "run.json").write_text(json.dumps(meta))
    before = snapshot(scored)
    one_line_error(invoke("score", "--run", scored, *SCORE), "run.json", fragment, code=1)
    assert snapshot(scored) == before


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", ""])
def test_run_json_not_an_object(scored, content):
    (scored / "run.json").write_text(content)
    one_line_error(invoke("flag", "--run", scored), "run.json", code=1)


@pytest.mark.parametrize("command", ["score", "flag", "report", "train"])
def test_run_pointing_at_a_file(tmp_path, command, data):
    f = tmp_path / "afile"
    f.write_text("hello")
    extra = ["--data", data, *FAST] if command == "train" else []
    one_line_error(invoke(command, "--run", f, *extra), str(f), code=1)
    assert f.read_text() == "hello"


def test_data_path_is_absolute_so_any_folder_scores_it(data, tmp_path, monkeypatch):
    shutil.copy(data, tmp_path / "d.npz")
    monkeypatch.chdir(tmp_path)
    assert invoke("train", "--data", "d.npz", "--run", "runs/r", *FAST).exit_code == 0
    meta = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert meta["data"]["data"] == str(tmp_path / "d.npz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = invoke("score", "--run", tmp_path / "runs" / "r", *SCORE)
    assert r.exit_code == 0, r.output


def test_data_inside_the_run_moves_with_it(data, tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "data").mkdir()
    shutil.copy(data, run / "data" / "d.npz")
    assert invoke("train", "--data", run / "data" / "d.npz", "--run", run, *FAST, "--overwrite").exit_code == 1
    shutil.rmtree(run)
    staging = tmp_path / "staging"
    staging.mkdir()
    shutil.copy(data, staging / "d.npz")
    assert invoke("train", "--data", staging / "d.npz", "--run", run, *FAST).exit_code == 0
    meta = json.loads((run / "run.json").read_text())
    assert "data_rel" not in meta["data"]  # outside the run: stored absolute only


def test_report_of_dotdot_writes_into_reports(scored, tmp_path, monkeypatch):
    monkeypatch.chdir(scored)
    r = invoke("report", "--run", "..", "--top", "2")
    assert r.exit_code == 1  # runs/ is not a run
    monkeypatch.chdir(scored / "..")
    r = invoke("report", "--run", "r/../r", "--top", "2")
    assert r.exit_code == 0, r.output
    assert (scored.parent / "reports" / "r" / "index.html").is_file()
    assert not (scored.parent / "index.html").exists()


@pytest.mark.parametrize("column, value, fragment", [
    ("label", 7, "label 7 is not a class of this run"),
    ("index", 5000, "index 5000 is outside the valid split"),
    ("split", "test", "split 'test' is not one of"),
])
def test_scores_rows_out_of_range_are_refused(scored, column, value, fragment):
    df = pd.read_csv(scored / "scores.csv", keep_default_na=False)
    df.loc[len(df) - 1, column] = value
    buf = df.to_csv(index=False).encode()
    _rewrite_with_manifest(scored, "scores.csv", buf)
    one_line_error(invoke("report", "--run", scored, "--out", scored.parent / "rep"), fragment, code=1)
    assert not (scored.parent / "rep").exists()


@pytest.mark.parametrize("name, text, fragment", [
    ("near_duplicates.csv", "pair,split,index,path,other_split,other_index,other_path,similarity,kind\n"
     "0,train,0,,valid,5000,,0.995,across train and valid\n0,valid,5000,,train,0,,0.995,across train and valid\n",
     "line 3: valid #5000 is not an image of this run's data"),
    ("outliers.csv", "split,index,path,label,outlier_score,pixel_z,feature_z\ntrain,-1,,0,9.0,9.0,1.0\n",
     "line 2: train #-1 is not an image of this run's data"),
    ("duplicates.csv", "group,split,index,path,kind\n0,test,1,,within test\n0,test,2,,within test\n",
     "line 2: test #1 is not an image of this run's data"),
    ("outliers.csv", "split,index,path,label,outlier_score,pixel_z,feature_z,turned\ntrain,1,,0,9.0,9.0,1.0,\n"
     "train,2,,0,1.0,1.0,1.0,=1+1\n", "column 'turned', line 3: expected a number, found '=1+1'"),
    ("outliers.csv", "split,index,path,label,outlier_score,pixel_z,feature_z,turned,turned_gain,shape_z\n"
     "train,1,,0,9.0,9.0,1.0,0.999,0.2,3.0\ntrain,2,,0,1.0,1.0,1.0,,,big\n",
     "column 'shape_z', line 3: expected a number, found 'big'"),
    ("outliers.csv", "split,index,path,label,outlier_score,pixel_z,feature_z,turned,turned_gain,shape_z\n"
     "train,1,,0,9.0,9.0,1.0,0.999,-inf-,3.0\n", "column 'turned_gain', line 2: expected a number, found '-inf-'"),
])
def test_data_check_tables_naming_no_image_are_refused(scored, name, text, fragment):
    """A table the report shows images from, edited with its manifest entry to name an
    image the data does not have: one line naming the file, no report."""
    _rewrite_with_manifest(scored, name, text.encode())
    one_line_error(invoke("report", "--run", scored, "--out", scored.parent / "rep"), name, fragment, code=1)
    assert not (scored.parent / "rep").exists()


def test_tampered_decisions_of_a_curated_run(scored, tmp_path):
    out = tmp_path / "cur"
    assert invoke("retrain", "--run", scored, "--drop-flagged", "--out", out).exit_code == 0
    text = (out / "decisions.csv").read_text().splitlines()
    (out / "decisions.csv").write_text("\n".join(text[:-1]) + "\n")  # one drop fewer
    one_line_error(invoke("score", "--run", out, *SCORE), "decisions.csv", "does not match run.json", code=1)
    _rewrite_with_manifest(out, "decisions.csv", ("\n".join(text[:-1]) + "\n").encode())
    one_line_error(invoke("score", "--run", out, *SCORE), "decisions.csv", "does not give the data", code=1)


def test_non_numeric_al_curve(acquired, tmp_path, data):
    run = tmp_path / "al"
    shutil.copytree(acquired, run)
    df = pd.read_csv(run / "al_curve.csv")
    df["valid_accuracy"] = df["valid_accuracy"].astype(object)
    df.loc[1, "valid_accuracy"] = "high"
    _rewrite_with_manifest(run, "al_curve.csv", df.to_csv(index=False).encode())
    before = snapshot(run)
    one_line_error(invoke("report", "--run", run, "--out", tmp_path / "rep"), "al_curve.csv", "expected a number",
                   code=1)
    one_line_error(invoke("acquire", "--data", data, "--run", run, *ACQ, "--resume"), "al_curve.csv",
                   "expected a number", code=1)
    assert snapshot(run) == before


def test_failed_resume_leaves_the_run_as_it_was(acquired, tmp_path, data):
    run = tmp_path / "al"
    shutil.copytree(acquired, run)
    before = snapshot(run)
    one_line_error(invoke("acquire", "--data", data, "--run", run, *ACQ, "--lr", "0.5", "--resume"), "--resume",
                   code=2)
    assert snapshot(run) == before


def test_overwrite_refuses_a_folder_that_is_no_run(data, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    one_line_error(invoke("train", "--data", data, "--run", folder, *FAST, "--overwrite"), "not a run folder", code=1)
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_leftovers_of_killed_commands_are_cleaned(scored):
    (scored.parent / f".{scored.name}.partial-123").mkdir()
    (scored / ".txn-dead").mkdir()
    (scored / ".txn-dead" / "scores.csv").write_text("half")
    (scored / ".scores.csv.abc.tmp").write_text("half")
    before = snapshot(scored)
    assert invoke("flag", "--run", scored).exit_code == 0
    assert leftovers(scored) == []
    assert snapshot(scored)["scores.csv"] == before["scores.csv"]


def test_run_before_the_store_still_works(scored):
    """A run.json without version and manifest (as runs made before the store): read,
    scored, and given a manifest by its next commit."""
    meta = json.loads((scored / "run.json").read_text())
    for k in ("version", "files"):
        meta.pop(k)
    (scored / "run.json").write_text(json.dumps(meta))
    r = invoke("flag", "--run", scored)
    assert r.exit_code == 0, r.output
    meta = json.loads((scored / "run.json").read_text())
    assert meta["version"] == runs.SCHEMA_VERSION and {"model.npz", "scores.csv"} <= set(meta["files"])


# ------------------------------------------------------------------- hostile input


def _npz(path, **over):
    return write_shapes_npz(path, 10, 4, seeds=(3, 4), **over)


def test_label_of_2_to_the_40_is_refused(tmp_path):
    y = make_shapes(10, seed=3)[1].astype(np.int64)
    y[0] = 2 ** 40
    path = _npz(tmp_path / "d.npz", y_train=y)
    one_line_error(invoke("train", "--data", path, "--run", tmp_path / "r", *FAST), "label 1099511627776", code=1)
    assert not (tmp_path / "r").exists()


def test_huge_float_pixels_are_refused(tmp_path):
    x = make_shapes(10, seed=3)[0][:, 0].astype(np.float32)
    x[0, 0, 0] = 3e30
    path = _npz(tmp_path / "d.npz", x_train=x)
    one_line_error(invoke("train", "--data", path, "--run", tmp_path / "r", *FAST), "x_train", "magnitude", code=1)


def test_divergent_training_publishes_nothing(data, tmp_path):
    run = tmp_path / "r"
    one_line_error(invoke("train", "--data", data, "--run", run, "--epochs", "3", "--lr", "1e30"),
                   "training diverged", code=1)
    assert not run.exists() and leftovers(run) == []


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "inf"], "--lr: expected a positive, finite"),
    (["--lr", "nan"], "--lr: expected a positive, finite"),
    (["--seed", "-1"], "--seed: expected an integer at least 0"),
    (["--epochs", "-5"], "--epochs"),
])
def test_train_numbers_checked_where_they_enter(data, tmp_path, args, fragment):
    one_line_error(invoke("train", "--data", data, "--run", tmp_path / "r", *args), fragment, code=2)


@pytest.mark.parametrize("args, fragment", [
    (["--samples", "1000000000"], "--samples: expected an integer 1..100000"),
    (["--samples", "1e9"], "--samples"),
    (["--seed", "-3"], "--seed: expected an integer at least 0"),
    (["--batch-size", "0"], "--batch-size"),
    (["--folds", "-2"], "--folds"),
])
def test_score_numbers_checked_where_they_enter(scored, args, fragment):
    before = snapshot(scored)
    one_line_error(invoke("score", "--run", scored, *args), fragment, code=2)
    assert snapshot(scored) == before


def test_acquire_negative_seed(data, tmp_path):
    one_line_error(invoke("acquire", "--data", data, "--run", tmp_path / "al", "--seed", "-1"),
                   "--seed: expected an integer at least 0", code=2)
    assert not (tmp_path / "al").exists()


def test_memory_error_is_one_line(scored, monkeypatch):
    import audit.score

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(audit.score, "score_dataset", boom)
    before = snapshot(scored)
    one_line_error(invoke("score", "--run", scored, *SCORE), "out of memory", "--batch-size", code=1)
    assert snapshot(scored) == before


def test_unexpected_error_is_one_line_unless_debugging(scored, monkeypatch):
    import audit.score

    def boom(*a, **k):
        raise ZeroDivisionError("the impossible")

    monkeypatch.setattr(audit.score, "score_dataset", boom)
    one_line_error(invoke("score", "--run", scored, *SCORE), "internal error", "AUDIT_DEBUG=1", code=1)
    monkeypatch.setenv("AUDIT_DEBUG", "1")
    r = invoke("score", "--run", scored, *SCORE)
    assert isinstance(r.exception, ZeroDivisionError)


def _folder(root: Path, size=(16, 16), names=("a", "b")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for c in names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    root = _folder(tmp_path / "d")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x16 = 256 pixels > 2 x 100: a "bomb"
    one_line_error(invoke("train", "--data", root, "--run", tmp_path / "r", *FAST), "not a readable image", code=1)


def test_one_pixel_images_are_one_line(tmp_path):
    root = _folder(tmp_path / "d", size=(1, 1))
    one_line_error(invoke("train", "--data", root, "--run", tmp_path / "r", *FAST), "1x1 are too small", code=1)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ formula injection


def test_user_text_in_csvs_is_neutralised(tmp_path):
    root = _folder(tmp_path / "d", names=("+plus", "=cmd"))
    evil = root / "train" / "=cmd" / "=HYPERLINK(1).png"
    shutil.copy(root / "train" / "=cmd" / "0.png", evil)
    run = tmp_path / "r"
    assert invoke("train", "--data", root, "--run", run, *FAST).exit_code == 0
    assert invoke("score", "--run", run, *SCORE, "--confidence", "0.34").exit_code == 0
    for name in ("scores.csv", "duplicates.csv", "near_duplicates.csv", "outliers.csv"):
        text = (run / name).read_text()
        cells = [c for line in text.splitlines() for c in line.split(",")]
        assert not any(c.startswith(("=", "+", "@")) for c in cells), name  # no cell a spreadsheet runs
    df = audit.score.read_scores(runs.RunStore(run), ("split", "index", "label", "pred", "path"))
    assert "train/=cmd/=HYPERLINK(1).png" in set(df["path"])  # read back as it was
    # a curated run's decisions.csv: the relabel to class "=cmd" and the path are neutralised
    dec = tmp_path / "dec.csv"
    dec.write_text("split,index,path,action,new_label\ntrain,0,,relabel,=cmd\n")
    assert invoke("retrain", "--run", run, "--decisions", dec, "--out", tmp_path / "cur").exit_code == 0
    written = (tmp_path / "cur" / "decisions.csv").read_text()
    assert ",'=cmd" in written and ",=cmd" not in written
    assert invoke("score", "--run", tmp_path / "cur", *SCORE).exit_code == 0  # read back as "=cmd"


def test_csv_neutralise_round_trips():
    from audit.tables import neutralise, restore

    for cell in ["=1+2", "+x", "-1.png", "@a", "\tt", "\rr", "'=x", "''=x", "plain", "'quoted", "", "a=b"]:
        assert restore(neutralise(cell)) == cell
        assert not neutralise(cell).startswith(("=", "+", "-", "@", "\t", "\r"))


def test_a_long_csv_with_a_half_empty_column_reads_without_a_warning(tmp_path):
    """scores.csv's cl_issue is empty for in-sample rows and 0/1 for the rest; pandas
    read such a file in chunks and warned (on MNIST's 70,000 rows, under `audit report`)."""
    from audit.tables import parse_table

    text = "split,cl_issue\n" + "train,\n" * 200_000 + "valid,1\n" * 200_000
    df = parse_table(text.encode(), tmp_path / "scores.csv", ("split", "cl_issue"), keep_default_na=False)
    assert len(df) == 400_000 and set(df["cl_issue"]) == {"", "1"}  # as a short file reads


def test_read_only_file_system_for_real(template, tmp_path):
    """A run on a file system mounted read-only (as root ignores permissions, a real
    read-only mount is the honest test): one line, nothing changed."""
    with tmpfs(tmp_path / "ro", "64m") as mnt:
        run = mnt / "runs" / "r"
        shutil.copytree(template, run)
        assert os.system(f"mount -o remount,ro {mnt}") == 0
        before = snapshot(run)
        one_line_error(invoke("flag", "--run", run), "Read-only file system", "not writable", code=1)
        one_line_error(invoke("score", "--run", run, *SCORE), "not writable", code=1)
        assert snapshot(run) == before
        r = invoke("report", "--run", run, "--out", tmp_path / "rep", "--top", "2")  # reading works
        assert r.exit_code == 0, r.output
