"""Each command through typer's CliRunner: outputs, exit codes, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import audit
from audit.cli import app

runner = CliRunner()

FAST = ["--epochs", "4", "--batch-size", "32", "--lr", "1e-3"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


from conftest import assert_one_line_error  # noqa: E402


@pytest.fixture(scope="module")
def trained(shapes_npz, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "shapes"
    r = invoke("train", "--data", shapes_npz, "--run", run, *FAST)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run to change."""
    copy = tmp_path / "r"
    shutil.copytree(trained, copy)
    return copy


def test_train_prints_progress_and_where(trained, shapes_npz, tmp_path):
    run = tmp_path / "again"
    r = invoke("train", "--data", shapes_npz, "--run", run, *FAST)
    assert r.exit_code == 0
    assert "epoch 4/4: loss" in r.output and "images/s" in r.output
    assert r.output.strip().splitlines()[-1] == f"run written to {run}/ (model.npz, train_log.csv, run.json)"


def test_score_writes_scores_and_summary(trained):
    r = invoke("score", "--run", trained, "--samples", "10")
    assert r.exit_code == 0, r.output
    assert "scored 390 images (train 300, valid 90) x 10 passes" in r.output
    assert r.output.strip().splitlines()[-1] == f"scores written to {trained}/scores.csv and {trained}/mc_summary.npz"
    df = pd.read_csv(trained / "scores.csv")
    assert list(df.columns) == [
        "split", "index", "fold", "label", "pred", "p_label", "entropy", "expected_entropy",
        "mutual_info", "variation_ratio", "mean_std", "margin",
        "mislabel_score", "flag", "suggested_label", "reason", "cl_issue", "outlier_score",
        "entropy_se", "expected_entropy_se", "mutual_info_se", "variation_ratio_se", "mean_std_se",
    ]
    assert (df.fold == -1).all()
    # cleanlab's filter on the out-of-sample split only: the training rows were scored by a model that saw them
    assert df[df.split == "train"].cl_issue.isna().all() and df[df.split == "valid"].cl_issue.isin([0, 1]).all()
    assert "confident learning (cleanlab, out-of-sample probabilities): label errors valid " in r.output
    assert len(df) == 390 and df.split.tolist()[:1] == ["train"] and df.split.iloc[-1] == "valid"
    assert (df.pred == df.label).mean() > 0.9
    with np.load(trained / "mc_summary.npz") as z:
        assert z["probs"].shape == (390, 3)
        np.testing.assert_array_equal(z["probs"].argmax(1), df.pred)
    meta = json.loads((trained / "run.json").read_text())
    assert meta["score"]["samples"] == 10 and meta["score"]["n_scored"] == 390
    cl = meta["score"]["confident_learning"]
    assert list(cl) == ["valid"] and cl["valid"]["n"] == 90 and len(cl["valid"]["joint"]) == 3
    assert cl["valid"]["flagged"] == int(df[df.split == "valid"].cl_issue.sum())


def test_score_one_split_with_paths(tmp_path):
    from PIL import Image

    from conftest import make_shapes

    x, y = make_shapes(8)
    for split in ("train", "valid"):
        for i, (img, c) in enumerate(zip(x, y)):
            d = tmp_path / "imgs" / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0]).save(d / f"{i}.png")
    run = tmp_path / "run"
    assert invoke("train", "--data", tmp_path / "imgs", "--run", run, "--epochs", "1").exit_code == 0
    r = invoke("score", "--run", run, "--samples", "3", "--splits", "valid")
    assert r.exit_code == 0, r.output
    df = pd.read_csv(run / "scores.csv")
    assert set(df.split) == {"valid"} and df.path.str.startswith("valid/class_").all()


def test_score_trains_first_when_the_run_has_no_model(shapes_npz, tmp_path):
    run = tmp_path / "fresh"
    r = invoke("score", "--run", run, "--data", shapes_npz, "--samples", "2")
    assert r.exit_code == 0, r.output
    assert "epoch 10/10" in r.output and (run / "model.npz").is_file() and (run / "scores.csv").is_file()


@pytest.mark.parametrize(
    "args, fragments, code",
    [
        (["train", "--data", "/no/such/file.npz"], ["--data: /no/such/file.npz does not exist"], 1),
        (["train", "--device", "tpu"], ["--device: expected cpu, gpu or @cupy:N, got 'tpu'"], 2),
        (["train", "--device", "@cupy:7"], ["--device @cupy:7: this machine has"], 1),
        (["train", "--epochs", "0"], ["--epochs: expected an integer at least 1"], 2),
        (["train", "--data-dir", "/no/such/dir"], ["--data-dir: /no/such/dir is not a folder"], 1),
        (["train", "--recipe", "fast"], ["--recipe: expected one of origin, strong, got 'fast'"], 2),
        (["train", "--shift", "9"], ["--shift: expected an integer 0..8, got 9"], 2),
        (["train", "--shift", "-1"], ["--shift: expected an integer 0..8, got -1"], 2),
        (["train", "--min-steps", "-5"], ["--min-steps: expected an integer 1..10000000, got -5"], 2),
    ],
)
def test_bad_train_input(args, fragments, code, tmp_path):
    r = invoke(*args, "--run", tmp_path / "r")
    assert_one_line_error(r, *fragments, code=code)
    assert not (tmp_path / "r").exists()


def test_bad_subset(shapes_npz, tmp_path):
    sub = tmp_path / "s.txt"
    sub.write_text("0\n5000\n")
    r = invoke("train", "--data", shapes_npz, "--run", tmp_path / "r", "--subset", sub)
    assert_one_line_error(r, "--subset", "index 5000 is out of range", code=1)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, fragments, code",
    [
        (["--samples", "0"], ["--samples: expected an integer 1..100000, got 0"], 2),
        (["--samples", "-4"], ["--samples"], 2),
        (["--splits", "train,test"], ["--splits: expected a comma-separated list of train, valid"], 2),
        (["--masks", "consistent"], ["--masks: expected shared or independent, got 'consistent'"], 2),
        (["--device", "gpu"], ["--device gpu: this machine has"], 1),
    ],
)
def test_bad_score_input(trained, args, fragments, code):
    before = (trained / "scores.csv").read_bytes() if (trained / "scores.csv").exists() else None
    r = invoke("score", "--run", trained, *args)
    if "gpu" in args:
        from audit.device import gpu_count

        if gpu_count():
            pytest.skip("this machine has a GPU")
    assert_one_line_error(r, *fragments, code=code)
    after = (trained / "scores.csv").read_bytes() if (trained / "scores.csv").exists() else None
    assert before == after  # no partial scores.csv


def test_score_missing_run_folder_with_files(tmp_path):
    run = tmp_path / "notarun"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    r = invoke("score", "--run", run)
    assert_one_line_error(r, "has files but no model.npz", code=1)
    assert (run / "notes.txt").read_text() == "mine" and not (run / "scores.csv").exists()


def test_score_model_of_another_class_count(trained, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained, other)
    meta = json.loads((other / "run.json").read_text())
    meta["model"]["n_classes"] = 7
    (other / "run.json").write_text(json.dumps(meta))
    r = invoke("score", "--run", other, "--samples", "2")
    assert_one_line_error(r, "model.npz: does not fit the model in run.json", code=1)


def test_score_on_changed_data(trained, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained, other)
    meta = json.loads((other / "run.json").read_text())
    with np.load(meta["data"]["data"]) as z:
        arrays = dict(z)
    arrays["y_valid"] = (arrays["y_valid"] + 1) % 3
    changed = tmp_path / "changed.npz"
    np.savez(changed, **arrays)
    meta["data"]["data"] = str(changed)
    (other / "run.json").write_text(json.dumps(meta))
    r = invoke("score", "--run", other, "--samples", "2")
    assert_one_line_error(r, "is not the data this run was trained on", code=1)


@pytest.mark.parametrize("command, default", [("report", "reports/<run name>"), ("retrain", "RUN-curated")])
def test_help_names_the_default_folder(command, default):
    # square brackets in a help text are rich markup: the default once vanished from the help
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0 and f"(default: {default}" in r.output, r.output


def test_train_without_even_batches_is_recorded(shapes_npz, tmp_path):
    r = invoke("train", "--data", shapes_npz, "--run", tmp_path / "r", "--epochs", "1", "--batch-size", "64",
               "--no-even-batches")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["even_batches"] is False


def test_score_refuses_a_model_without_dropout(shapes_npz, tmp_path):
    run = tmp_path / "nodrop"
    r = runner.invoke(app, ["train", "--data", str(shapes_npz), "--run", str(run), "--epochs", "1", "--dropout", "0"])
    assert r.exit_code == 0, r.output
    before = sorted(p.name for p in run.iterdir())
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "4"])
    assert r.exit_code == 1 and "model: this origin model has no dropout" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and sorted(p.name for p in run.iterdir()) == before


def test_score_with_samples_auto(run):
    r = invoke("score", "--run", run, "--samples", "auto", "--tolerance", "0.01", "--max-samples", "40")
    assert r.exit_code == 0, r.output
    df = pd.read_csv(run / "scores.csv")
    assert df["passes"].between(10, 40).all() and (df["passes"] % 10 == 0).all()
    assert f"x {df['passes'].mean():.1f} passes on average (auto: standard errors within 0.01, at most 40)" in r.output
    score = json.loads((run / "run.json").read_text())["score"]
    assert (score["samples"], score["tolerance"]) == (40, 0.01)
    assert score["mean_passes"] == pytest.approx(df["passes"].mean(), abs=1e-3)
    stopped = df["passes"] < 40
    assert (df.loc[stopped, ["entropy_se", "mutual_info_se"]].max(axis=1) <= 0.01).all()


@pytest.mark.parametrize("args, fragment", [
    (("--samples", "auto", "--tolerance", "0"), "--tolerance: expected a standard error > 0, got 0.0"),
    (("--samples", "auto", "--max-samples", "1"), "--max-samples: expected at least 2 passes"),
    (("--samples", "auto", "--max-samples", "1000000000"), "--max-samples: expected at most 100000 passes"),
    (("--samples", "20", "--tolerance", "0.01"), "--tolerance: applies with --samples auto; --samples is 20"),
    (("--samples", "lots"), "--samples: expected a number of passes or auto, got 'lots'"),
    (("--samples", "auto", "--masks", "independent"), "--samples: auto needs --masks shared"),
    (("--fold-repeats", "2"), "--fold-repeats: 2 repeats of the fold partition need --folds K"),
    (("--folds", "2", "--splits", "valid"), "--folds: 2 fold models score the training images out of sample (and "
                                            "fit the calibration temperature on them), but --splits has no train"),
    (("--folds", "2", "--fold-repeats", "0"), "--fold-repeats: expected an integer 1..20, got 0"),
    (("--folds", "2", "--fold-repeats", "2", "--samples", "auto"), "--fold-repeats: pools fixed passes"),
])
def test_bad_score_options_are_one_line_and_change_nothing(run, args, fragment):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_one_line_error(invoke("score", "--run", run, *args), fragment, code=2)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_train_recipe_strong_is_recorded_and_options_override_it(shapes_npz, tmp_path):
    # strong's settings, with a floor of 40 steps: 300 training images in batches of at most 500
    # for 2 epochs shrink to batches of 32 (10 steps an epoch), then 4 epochs reach 40 steps
    run = tmp_path / "strong"
    r = invoke("train", "--data", shapes_npz, "--run", run, "--recipe", "strong", "--epochs", "2", "--min-steps", "40")
    assert r.exit_code == 0, r.output
    config = json.loads((run / "run.json").read_text())["config"]
    assert config | {"epochs": 2, "min_steps": 40} == config
    assert (config["lr"], config["batch_size"], config["schedule"], config["shift"]) == (2e-3, 500, "cosine", 2)
    assert "epoch 4/4" in r.output and len(pd.read_csv(run / "train_log.csv")) == 4
    # --min-steps 0 takes the floor away: the 2 epochs asked for
    r = invoke("train", "--data", shapes_npz, "--run", run, "--recipe", "strong", "--epochs", "2", "--min-steps", "0",
               "--shift", "0", "--overwrite")
    assert r.exit_code == 0, r.output
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["min_steps"] is None and config["shift"] == 0 and len(pd.read_csv(run / "train_log.csv")) == 2


def test_folds_pool_the_validation_images_over_every_unseen_model(run):
    assert invoke("score", "--run", run, "--samples", "6").exit_code == 0
    alone = pd.read_csv(run / "scores.csv")
    r = invoke("score", "--run", run, "--samples", "6", "--folds", "2")
    assert r.exit_code == 0, r.output
    df = pd.read_csv(run / "scores.csv")
    valid, train = df[df.split == "valid"], df[df.split == "train"]
    assert (valid.models == 3).all() and (train.models == 1).all()
    assert valid.disagreement.between(0, np.log(3)).all() and train.disagreement.isna().all()
    # the pooled passes of three models are not the run's model's alone
    assert not np.allclose(valid.entropy, alone[alone.split == "valid"].entropy)
    e = json.loads((run / "run.json").read_text())["score"]["ensemble"]["valid"]
    assert (e["models"], e["passes"]) == (3, 18) and e["mean_disagreement"] == pytest.approx(valid.disagreement.mean(), abs=1e-6)
    assert "valid images: 18 passes pooled from 3 models that did not see them" in r.output
    with np.load(run / "mc_summary.npz") as z:  # the pooled mean is what the flags and calibration saw
        np.testing.assert_allclose(z["probs"][len(train):].argmax(1), valid.pred)
    # --samples auto scores each image with one model, and says so
    r = invoke("score", "--run", run, "--samples", "auto", "--max-samples", "20", "--folds", "2")
    assert r.exit_code == 0 and "validation images not pooled over the fold models" in r.output, r.output
    assert "models" not in pd.read_csv(run / "scores.csv").columns


def test_pooling_one_model_gives_its_own_scores(shapes_npz):
    from audit.device import get_device
    from audit.score import pool_unseen, score_dataset

    ds = audit.load_dataset(str(shapes_npz))
    model = audit.train(ds, audit.TrainConfig(epochs=1, batch_size=64)).model
    r = score_dataset(model, ds, samples=5)
    scores, probs = pool_unseen(r.scores, r.probs, ds, [model], samples=5, batch_size=250, seed=0, masks="shared",
                                device=get_device("cpu"))
    cols = [c for c in r.scores.columns]
    pd.testing.assert_frame_equal(scores[cols], r.scores, check_dtype=False)
    np.testing.assert_array_equal(probs, r.probs)
    assert (scores.disagreement[scores.split == "valid"] == 0).all()


def test_fold_repeats_pool_the_training_images(run):
    r = invoke("score", "--run", run, "--samples", "4", "--folds", "2", "--fold-repeats", "2")
    assert r.exit_code == 0, r.output
    assert "fold 2/2 of repeat 2/2: trained on" in r.output
    df = pd.read_csv(run / "scores.csv")
    train = df[df.split == "train"]
    assert (train.models == 2).all() and train.disagreement.between(0, np.log(2)).all()
    assert (df[df.split == "valid"].models == 3).all()  # the run's and repeat 0's two fold models
    meta = json.loads((run / "run.json").read_text())
    assert sorted(meta["folds"]) == ["2-0", "2-0-r1", "2-1", "2-1-r1"]
    assert meta["score"]["ensemble"]["train"]["passes"] == 8 and meta["score"]["fold_repeats"] == 2
    assert (run / "folds" / "2-1-r1" / "model.npz").is_file()
    assert "train images: 8 passes pooled from 2 models that did not see them (one of each fold partition)" in r.output
    # the models are kept and reused: a second scoring trains none
    r = invoke("score", "--run", run, "--samples", "4", "--folds", "2", "--fold-repeats", "2")
    assert r.exit_code == 0 and "trained on" not in r.output, r.output
    pd.testing.assert_frame_equal(pd.read_csv(run / "scores.csv"), df)



def test_pooled_passes_of_one_partition_are_its_fold_models_own(shapes_npz):
    from audit.device import get_device
    from audit.score import pool_passes, score_dataset, stream_seed

    ds = audit.load_dataset(str(shapes_npz))
    cfg = audit.TrainConfig(epochs=1, batch_size=64)
    model = audit.train(ds, cfg).model
    parts = np.array_split(np.random.default_rng(0).permutation(len(ds.train)), 2)
    folds = [(audit.train(ds, cfg, subset=np.setdiff1d(np.arange(len(ds.train)), p)).model, np.sort(p))
             for p in parts]
    r = score_dataset(model, ds, samples=5, splits=("train",), train_folds=folds)
    probs, cols = pool_passes(ds.train.x, [[(m, rows, stream_seed(0, "train", k)) for k, (m, rows) in
                                            enumerate(folds)]], n_classes=3, samples=5, batch_size=250,
                              masks="shared", device=get_device("cpu"))
    np.testing.assert_array_equal(probs, r.probs)
    np.testing.assert_array_equal(cols["mutual_info"], r.scores["mutual_info"].to_numpy())


def test_flags_follow_cleanlab_out_of_sample_and_confidence_on_request(run):
    r = invoke("score", "--run", run, "--samples", "4", "--folds", "2", "--flag-top", "0")
    assert r.exit_code == 0, r.output
    assert "mislabeled by cleanlab's filter on the out-of-sample train and valid images" in r.output
    df = pd.read_csv(run / "scores.csv")
    np.testing.assert_array_equal(df.flag == "mislabeled", df.cl_issue == 1)
    flags = json.loads((run / "run.json").read_text())["flags"]
    assert flags["rule"] == "cleanlab" and flags["by_cleanlab"] == ["train", "valid"]
    r = invoke("flag", "--run", run, "--flag-rule", "confidence", "--flag-top", "0")
    assert r.exit_code == 0 and "cleanlab's filter" not in r.output, r.output
    flags = json.loads((run / "run.json").read_text())["flags"]
    assert flags["rule"] == "confidence" and flags["by_cleanlab"] == []
    again = pd.read_csv(run / "scores.csv")
    assert again.cl_issue.tolist() == df.cl_issue.tolist() and str(again.cl_issue.dtype) == "int64"
    # a tampered cl_issue is one line naming the file and line, and changes nothing
    text = (run / "scores.csv").read_text().splitlines()
    col = text[0].split(",").index("cl_issue")
    cells = text[3].split(",")
    cells[col] = "7"
    data = ("\n".join([*text[:3], ",".join(cells), *text[4:]]) + "\n").encode()
    (run / "scores.csv").write_bytes(data)
    meta = json.loads((run / "run.json").read_text())  # as one who edits the manifest too
    meta["files"]["scores.csv"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (run / "run.json").write_text(json.dumps(meta))
    before = (run / "run.json").read_bytes()
    r = invoke("flag", "--run", run)
    assert_one_line_error(r, "scores.csv: line 4: cl_issue '7' is not 1, 0 or empty; rerun `audit score`")
    assert (run / "run.json").read_bytes() == before


def test_score_without_data_checks_leaves_no_stale_lists(run, tmp_path):
    """--no-data-checks: scores as before, says the checks did not run, and removes the
    lists an earlier score wrote (they would describe another scoring); the report
    leaves their sections out."""
    r = invoke("score", "--run", run, "--samples", "5")
    assert r.exit_code == 0, r.output
    assert all((run / n).is_file() for n in ("duplicates.csv", "near_duplicates.csv", "outliers.csv"))
    before = pd.read_csv(run / "scores.csv")
    r = invoke("score", "--run", run, "--samples", "5", "--no-data-checks")
    assert r.exit_code == 0, r.output
    assert "data checks (duplicates, near-duplicates, outliers, class balance): not run (--no-data-checks)" in r.output
    assert "near-duplicates (correlation" not in r.output and "exact duplicates" not in r.output
    assert not any((run / n).exists() for n in ("duplicates.csv", "near_duplicates.csv", "outliers.csv"))
    after = pd.read_csv(run / "scores.csv")
    assert "outlier_score" not in after.columns
    pd.testing.assert_frame_equal(before.drop(columns="outlier_score"), after)
    meta = json.loads((run / "run.json").read_text())
    assert meta["score"]["data_checks"] is False and "duplicates" not in meta["score"]
    assert set(meta["files"]) & {"duplicates.csv", "near_duplicates.csv", "outliers.csv"} == set()
    r = invoke("report", "--run", run, "--top", "3", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "near_duplicates.csv" not in page and "outliers.csv" not in page
