"""The loop with a person labelling: pool data, `audit next`, `audit label`, the ledger,
the labelling page and Label Studio; and that it is the simulation's code path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from audit.cli import app
from audit.data import load_dataset
from audit.loop import LEDGER, batch_file, loop_state, page_file, tasks_file

from conftest import assert_one_line_error, make_shapes, wait_stored

runner = CliRunner()
NAMES = ("hbar", "vbar", "diag")
FAST = ["--model", "origin", "--epochs", "3", "--samples", "8"]


def write_folder(root: Path, n_train: int = 4, n_valid: int = 10, n_pool: int = 60, seed: int = 0,
                 names=NAMES) -> tuple[Path, dict[str, str]]:
    """train/<class>/ (n_train per class), valid/<class>/, pool/ (unlabelled, in two
    subfolders); returns the folder and the true class of each pool path."""
    truth = {}
    for split, n, s in (("train", n_train, seed), ("valid", n_valid, seed + 1), ("pool", n_pool, seed + 2)):
        x, y = make_shapes(n, seed=s)
        for i, (img, c) in enumerate(zip(x, y)):
            d = root / split / names[c] if split != "pool" else root / "pool" / f"part{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0]).save(d / f"{i:04d}.png")
            if split == "pool":
                truth[f"pool/part{i % 2}/{i:04d}.png"] = names[c]
    return root, truth


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data")


def labeller(run: Path, truth: dict[str, str], out: Path, *, skip=(), unsure=()) -> Path:
    """Plays the labeller: labels the last batch as ``truth`` says (plain path,label CSV,
    with status for the skipped and unsure ranks)."""
    state = loop_state(run)
    b = state.batches[-1]
    rows = []
    for r in b.itertuples():
        status = "skipped" if r.rank in skip else "unsure" if r.rank in unsure else "labelled"
        rows.append({"path": r.path, "label": truth[r.path] if status == "labelled" else "", "status": status})
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def test_folder_pool_is_loaded(folder):
    root, truth = folder
    ds = load_dataset(root)
    assert ds.pool is not None and len(ds.pool) == len(truth) == 180
    assert set(ds.pool.paths) == set(truth) and (ds.pool.y == -1).all()
    assert ds.pool.x.shape[1:] == ds.train.x.shape[1:]
    # the pool enters the fingerprint; without pool/ the fingerprint is what it always was
    import shutil

    fp = ds.fingerprint
    shutil.rmtree(root / "pool")
    assert load_dataset(root).fingerprint != fp and load_dataset(root).pool is None


def test_three_rounds_from_the_cli(folder, tmp_path):
    root, truth = folder
    run = tmp_path / "runs" / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(root), "--k", "10", *FAST])
    assert r.exit_code == 0, r.output
    assert "round 1: chose 10 of 180 pool images by bald" in r.output
    assert f"batch written to {run}/rounds/1/" in r.output
    for name in (batch_file(1), page_file(1), tasks_file(1), "label_config.xml", "run.json"):
        assert (run / name).is_file(), name
    # a second `next` before labelling is refused, and changes nothing
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "10"])
    assert_one_line_error(r, "round 1's batch has 10 of 10 images without a decision", "--partial")
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before

    for rnd in (1, 2, 3):
        f = labeller(run, truth, tmp_path / f"labels{rnd}.csv", skip=(2,) if rnd == 1 else (),
                     unsure=(3,) if rnd == 1 else ())
        r = runner.invoke(app, ["label", "--run", str(run), str(f)])
        assert r.exit_code == 0, r.output
        if rnd == 1:
            assert "8 labelled, 1 skipped, 1 unsure" in r.output
        if rnd < 3:
            r = runner.invoke(app, ["next", "--run", str(run), "--k", "10"])
            assert r.exit_code == 0, r.output
    state = loop_state(run)
    assert state.rounds == 3
    labelled = state.labelled()
    path_of = dict(zip(state.ledger["index"], state.ledger["path"]))
    assert len(labelled) == 28 and all(truth[path_of[i]] == lab for i, lab in labelled.items())
    rounds = json.loads((run / "run.json").read_text())["results"]["rounds"]
    assert [x["n_labelled"] for x in rounds] == [12, 20, 30]  # 12 seed images, +8, +10
    # the two returned images could be picked again; no image is in two batches unless returned
    picked = [set(b["index"]) for b in state.batches]
    returned = set(state.ledger[state.ledger.status != "labelled"]["index"])
    assert (picked[0] & picked[1]) | (picked[1] & picked[2]) <= returned


# ------------------------------------------------------------------- the labelling page

EVIL = ("<img src=x onerror=alert(1)>", "=cmd|' -C calc'!A0", "plain & \"quoted\"")


@pytest.mark.browser
def test_labelling_page_by_keyboard(tmp_path, browser):
    """Ten images labelled with the keyboard only (one skipped, one unsure), exported,
    reloaded (decisions kept), brought back with `audit label`."""
    root, truth = write_folder(tmp_path / "data", names=EVIL)
    run = tmp_path / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(root), "--k", "10", *FAST])
    assert r.exit_code == 0, r.output
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda q: requests.append(q.url))
    page.on("dialog", lambda d: (errors.append("dialog " + d.message), d.dismiss()))
    page.goto((run / page_file(1)).as_uri())
    cells = page.locator("figure.lcell")
    assert cells.count() == 10
    # class names with markup are text; keys 1..3 in sorted class order
    names = sorted(EVIL)
    assert page.locator("img").count() == 10  # no image element from a class name
    assert page.locator(".keys").inner_text().count("<img src=x onerror=alert(1)>") == 1
    batch = loop_state(run).batches[0]
    want = {}
    keys = ["1", "2", "3", "Enter", "s", "?", "3", "2", "1", "Enter"]
    for i, key in enumerate(keys):
        page.keyboard.press(key)
        path = batch.path[i]
        want[path] = ("labelled", names[int(key) - 1]) if key.isdigit() else \
            ("labelled", batch.guess[i]) if key == "Enter" else ("skipped" if key == "s" else "unsure", "")
    assert page.inner_text("#done") == "10" and page.inner_text("#n-labelled") == "8"
    # the guess of an undecided image is marked as the model's; a decided one is not
    assert page.locator("figure.lcell[data-state=guess]").count() == 0
    wait_stored(page, 10)
    page.reload()
    assert page.inner_text("#done") == "10"  # kept in the browser's local storage
    with page.expect_download() as info:
        page.click("#export")
    assert info.value.suggested_filename == "labels.csv"
    target = tmp_path / "labels.csv"
    info.value.save_as(target)
    rows = pd.read_csv(target, dtype=str, keep_default_na=False)
    assert list(rows.columns) == ["run", "round", "index", "path", "label", "status"]
    from audit.tables import restore

    assert {p: (s, restore(lab)) for p, lab, s in zip(rows.path, rows.label, rows.status)} == want
    assert errors == [] and all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    context.close()

    r = runner.invoke(app, ["label", "--run", str(run), str(target)])
    assert r.exit_code == 0, r.output
    assert "8 labelled, 1 skipped, 1 unsure" in r.output
    state = loop_state(run)
    assert len(state.labelled()) == 8 and len(state.ledger) == 10
    ledger = pd.read_csv(run / LEDGER, dtype=str, keep_default_na=False)
    assert not any(v.startswith("=") for v in ledger.label)  # neutralised in the file, restored on reading
    assert set(state.labelled().values()) <= set(EVIL)
    # the two go back to the pool: the next round may pick them, and trains on 8 more
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "10"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "run.json").read_text())["results"]["rounds"][1]["n_labelled"] == 12 + 8


# ------------------------------------------------------------- one loop, two labellers


def pool_npz(path: Path, n_seed: int = 4, n_valid: int = 10, n_pool: int = 40) -> Path:
    """An npz with a small seed set, a validation set and a pool whose true labels are
    in y_pool (what `audit acquire` plays the labeller with)."""
    xt, yt = make_shapes(n_seed, seed=5)
    xv, yv = make_shapes(n_valid, seed=6)
    xp, yp = make_shapes(n_pool, seed=7)
    np.savez(path, x_train=xt, y_train=yt, x_valid=xv, y_valid=yv, x_pool=xp, y_pool=yp)
    return path


@pytest.mark.parametrize("strategy", ["bald", "powerbald", "random"])
def test_a_person_giving_the_true_labels_draws_the_simulation(tmp_path, strategy):
    """`audit acquire` on an npz whose pool has labels (the dataset's labels play the
    labeller) and `audit next` + `audit label` fed those labels each round go through
    the same code: the same batches and the same validation accuracy per round."""
    data = pool_npz(tmp_path / "pool.npz")
    y_pool = np.load(data)["y_pool"]
    n_seed = len(np.load(data)["y_train"])
    common = ["--strategy", strategy, "--model", "origin", "--epochs", "3", "--samples", "8", "--pool-subset"]
    sim = tmp_path / "sim"
    r = runner.invoke(app, ["acquire", "--data", str(data), "--run", str(sim), "--step", "6", "--rounds", "3",
                            *common, "0"])
    assert r.exit_code == 0, r.output
    curve = pd.read_csv(sim / "al_curve.csv")
    acquired = pd.read_csv(sim / "acquired.csv")
    assert json.loads((sim / "run.json").read_text())["config"]["initial"] == n_seed

    run = tmp_path / "loop"
    for rnd in range(1, 5):
        args = ["next", "--run", str(run), "--k", "6", "--strategy", strategy, "--samples", "8"]
        if rnd == 1:
            args += ["--data", str(data), "--model", "origin", "--epochs", "3"]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        b = loop_state(run).batches[-1]
        if rnd <= 3:
            got = sorted(b["index"] + n_seed)
            assert got == sorted(acquired[acquired["round"] == rnd]["index"]), f"round {rnd}"
        f = tmp_path / f"labels{rnd}.csv"
        pd.DataFrame({"index": b["index"], "label": [str(y_pool[i]) for i in b["index"]]}).to_csv(f, index=False)
        assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    rounds = json.loads((run / "run.json").read_text())["results"]["rounds"]
    assert [x["valid_accuracy"] for x in rounds] == pytest.approx(list(curve.valid_accuracy), abs=1e-6)  # al_curve.csv: 6 digits
    assert [x["n_labelled"] for x in rounds] == list(curve.n_labelled)


def test_acquire_refuses_a_pool_without_labels(tmp_path):
    data = pool_npz(tmp_path / "pool.npz")
    z = dict(np.load(data))
    z.pop("y_pool")
    np.savez(data, **z)
    r = runner.invoke(app, ["acquire", "--data", str(data), "--run", str(tmp_path / "r"), "--rounds", "1"])
    assert_one_line_error(r, "pool has no labels (y_pool)", "audit next")
    r = runner.invoke(app, ["acquire", "--data", str(pool_npz(tmp_path / "p2.npz")), "--run", str(tmp_path / "r"),
                            "--initial", "5", "--rounds", "1"])
    assert_one_line_error(r, "--initial", "the training split is the initial set (12 images)")


# ------------------------------------------------------------------------ Label Studio


def ls_export(tasks: list[dict], answers: dict[int, list]) -> list[dict]:
    """Label Studio's JSON export of ``tasks`` (its documented format: id, data,
    annotations -> result -> value.choices, was_cancelled). ``answers``: task
    position -> one entry per annotation, a class name or None for a skip."""
    out = []
    for n, t in enumerate(tasks):
        anns = []
        for a, ans in enumerate(answers.get(n, [])):
            result = [] if ans is None else [{"id": f"r{n}{a}", "from_name": "label", "to_name": "image",
                                              "type": "choices", "origin": "manual", "value": {"choices": [ans]}}]
            anns.append({"id": 100 * n + a, "completed_by": a + 1, "result": result, "was_cancelled": ans is None,
                         "ground_truth": False, "created_at": "2026-11-30T10:00:00Z",
                         "updated_at": "2026-11-30T10:00:00Z", "lead_time": 2.5, "task": n + 1})
        out.append({"id": n + 1, "data": t["data"], "annotations": anns, "predictions": t["predictions"],
                    "meta": {}, "project": 7, "created_at": "2026-11-30T09:00:00Z",
                    "updated_at": "2026-11-30T10:00:00Z"})
    return out


def test_label_studio_tasks_and_export(folder, tmp_path):
    root, truth = folder
    run = tmp_path / "loop"
    assert runner.invoke(app, ["next", "--run", str(run), "--data", str(root), "--k", "6", *FAST]).exit_code == 0
    tasks = json.loads((run / tasks_file(1)).read_text())
    config = (run / "label_config.xml").read_text()
    assert len(tasks) == 6 and all(t["data"]["image"].startswith("data:image/png;base64,") for t in tasks)
    pred = tasks[0]["predictions"][0]["result"][0]
    assert pred["from_name"] == "label" and pred["to_name"] == "image" and pred["type"] == "choices"
    assert '<Choices name="label" toName="image"' in config and all(f'"{c}"' in config for c in NAMES)
    # one skipped, one annotated twice (agreeing), one not annotated, three labelled once
    lab = [truth[t["data"]["audit_path"]] for t in tasks]
    answers = {0: [lab[0]], 1: [None], 2: [lab[2], lab[2]], 3: [lab[3]], 5: [lab[5]]}
    f = tmp_path / "export.json"
    f.write_text(json.dumps(ls_export(tasks, answers)))
    r = runner.invoke(app, ["label", "--run", str(run), str(f)])
    assert r.exit_code == 0, r.output
    assert "4 labelled, 1 skipped, 0 unsure" in r.output and "1 of the last batch without a decision" in r.output
    state = loop_state(run)
    assert {state.batches[0].path[state.batches[0]["index"].tolist().index(i)]: v
            for i, v in state.labelled().items()} == {tasks[n]["data"]["audit_path"]: lab[n] for n in (0, 2, 3, 5)}
    # the same export again adds nothing
    r = runner.invoke(app, ["label", "--run", str(run), str(f)])
    assert r.exit_code == 0 and "0 labelled" in r.output and "5 already in the ledger" in r.output
    # annotators who disagree: refused
    other = next(c for c in NAMES if c != lab[4])
    f.write_text(json.dumps(ls_export(tasks, {4: [lab[4], other]})))
    assert_one_line_error(runner.invoke(app, ["label", "--run", str(run), str(f)]), "annotations that disagree")
    # another project's export (tasks audit did not write, or another run's)
    foreign = ls_export(tasks, {0: [lab[0]]})
    for t in foreign:
        t["data"] = {"image": "https://example.com/1.jpg"}
    f.write_text(json.dumps(foreign))
    assert_one_line_error(runner.invoke(app, ["label", "--run", str(run), str(f)]), "another Label Studio project")
    foreign = ls_export(tasks, {0: [lab[0]]})
    foreign[0]["data"]["audit_run"] = "0123456789abcdef"
    f.write_text(json.dumps(foreign))
    assert_one_line_error(runner.invoke(app, ["label", "--run", str(run), str(f)]), "from another run")


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def picked(folder, tmp_path):
    """A loop run with round 1's batch of 6 picked, nothing labelled."""
    root, truth = folder
    run = tmp_path / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(root), "--k", "6", *FAST])
    assert r.exit_code == 0, r.output
    return run, truth, loop_state(run).batches[0]


def _files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, fragment", [
    ("not_in_batch", "is not in any batch"),
    ("unknown_path", "is not in any batch"),
    ("unknown_class", "unknown class 'zebra'"),
    ("twice", "appears twice"),
    ("empty", "empty; expected labels.csv"),
    ("header_only", "a header but no labels"),
    ("other_run", "labels for another run"),
    ("no_key", "expected a column 'index' or 'path'"),
    ("bad_status", "status 'maybe'"),
    ("bad_index", "index '-3'"),
    ("no_label", "no label; give one"),
    ("not_json", "not valid JSON"),
])
def test_label_refuses_bad_files(picked, tmp_path, case, fragment):
    run, truth, b = picked
    in_pool_not_batch = next(i for i in range(180) if i not in set(b["index"]))
    p0, l0 = b.path[0], truth[b.path[0]]
    text = {
        "not_in_batch": f"index,label\n{in_pool_not_batch},hbar\n",
        "unknown_path": "path,label\npool/elsewhere.png,hbar\n",
        "unknown_class": f"path,label\n{p0},zebra\n",
        "twice": f"path,label\n{p0},hbar\n{p0},vbar\n",
        "empty": "",
        "header_only": "path,label\n",
        "other_run": f"run,round,index,path,label,status\nfeedfacefeedface,1,{b['index'][0]},{p0},{l0},labelled\n",
        "no_key": f"file,label\n{p0},{l0}\n",
        "bad_status": f"path,label,status\n{p0},{l0},maybe\n",
        "bad_index": f"index,label\n-3,{l0}\n",
        "no_label": f"path,label\n{p0},\n",
        "not_json": "[{\"data\": ",
    }[case]
    f = tmp_path / ("x.json" if case == "not_json" else "labels.csv")
    f.write_text(text)
    before = _files(run)
    assert_one_line_error(runner.invoke(app, ["label", "--run", str(run), str(f)]), fragment)
    assert _files(run) == before


def test_label_on_a_missing_run_says_how_to_start(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("path,label\na.png,x\n")
    r = runner.invoke(app, ["label", "--run", str(tmp_path / "nope"), str(f)])
    assert_one_line_error(r, "does not exist; start the loop with `audit next")
    assert not (tmp_path / "nope").exists()


def test_relabel_and_idempotence(picked, tmp_path):
    run, truth, b = picked
    p0, l0 = b.path[0], truth[b.path[0]]
    other = next(c for c in NAMES if c != l0)
    f = tmp_path / "a.csv"
    f.write_text(f"path,label\n{p0},{l0}\n")
    assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    r = runner.invoke(app, ["label", "--run", str(run), str(f)])
    assert r.exit_code == 0 and "1 already in the ledger" in r.output
    g = tmp_path / "b.csv"
    g.write_text(f"path,label\n{p0},{other}\n")
    before = _files(run)
    assert_one_line_error(runner.invoke(app, ["label", "--run", str(run), str(g)]), f"is labelled '{l0}'",
                          "--relabel")
    assert _files(run) == before
    r = runner.invoke(app, ["label", "--run", str(run), str(g), "--relabel"])
    assert r.exit_code == 0, r.output
    state = loop_state(run)
    assert list(state.labelled().values()) == [other] and len(state.ledger) == 2  # appended, never rewritten


@pytest.mark.parametrize("args, fragment", [
    (["--k", "0"], "--k: expected a positive number"),
    (["--k", "500"], "--k: expected 1..180"),
    (["--strategy", "coreset"], "--strategy: expected one of"),
    (["--pool-subset", "3"], "--pool-subset: expected at least --k"),
])
def test_next_bad_options(folder, tmp_path, args, fragment):
    root, _ = folder
    run = tmp_path / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(root), "--k", "10", *FAST, *args])
    assert_one_line_error(r, fragment)
    assert not run.exists()


def test_next_bad_data(tmp_path):
    root, _ = write_folder(tmp_path / "d1", n_pool=3)
    run = tmp_path / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "2"])
    assert_one_line_error(r, "--data", "is a new run")
    # no pool
    import shutil

    shutil.rmtree(root / "pool")
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(run), "--data", str(root)]), "has no unlabelled pool")
    # a colour pool image beside greyscale training images, an unreadable one
    (root / "pool").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 40).save(root / "pool" / "rgb.png")
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(run), "--data", str(root)]), "rgb.png is colour")
    (root / "pool" / "rgb.png").unlink()
    (root / "pool" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(run), "--data", str(root)]),
                          "cut.png: not a readable image")
    assert not run.exists()
    # an npz x_pool of another shape
    data = pool_npz(tmp_path / "p.npz")
    z = dict(np.load(data))
    z["x_pool"] = z["x_pool"][:, :, :8]
    np.savez(data, **z)
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(run), "--data", str(data)]),
                          "x_pool images are", "they must match")


def test_next_on_other_runs_and_data(picked, tmp_path):
    run, _, _ = picked
    other = write_folder(tmp_path / "other", seed=9)[0]
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(other), "--partial"])
    assert_one_line_error(r, "--data", "leave out --data")
    acq = tmp_path / "acq"
    data = pool_npz(tmp_path / "p.npz")
    assert runner.invoke(app, ["acquire", "--data", str(data), "--run", str(acq), "--rounds", "0",
                               "--model", "origin", "--epochs", "1"]).exit_code == 0
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(acq)]), "is an `audit acquire` run")
    assert_one_line_error(runner.invoke(app, ["label", "--run", str(acq), str(data)]), "is an `audit acquire` run")


@pytest.mark.parametrize("step", ["staged", "journaled", "rename labels.csv", "published"])
def test_kill_during_label_is_all_or_nothing(picked, tmp_path, step):
    """Killed at each step of the ledger's commit: the ledger has none of the file's rows
    or all of them, and the next command finds a whole run."""
    from test_faults import killed_at

    run, truth, b = picked
    f = tmp_path / "labels.csv"
    pd.DataFrame({"path": b.path, "label": [truth[p] for p in b.path]}).to_csv(f, index=False)
    assert killed_at(step, "label", "--run", run, f) == 137
    state = loop_state(run)  # a reader finishes a journaled commit
    assert len(state.ledger) in (0, 6)
    assert len(state.ledger) == (0 if step == "staged" else 6)
    r = runner.invoke(app, ["label", "--run", str(run), str(f)])
    assert r.exit_code == 0, r.output
    assert len(loop_state(run).ledger) == 6 and not [p for p in run.rglob(".*")]


@pytest.mark.parametrize("step", ["staged", "journaled", "published"])
def test_kill_during_next_is_all_or_nothing(picked, tmp_path, step):
    from test_faults import killed_at

    run, truth, b = picked
    f = tmp_path / "labels.csv"
    pd.DataFrame({"path": b.path, "label": [truth[p] for p in b.path]}).to_csv(f, index=False)
    assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    assert killed_at(step, "next", "--run", run, "--k", "5") == 137
    state = loop_state(run)
    assert state.rounds == (1 if step == "staged" else 2)
    assert (run / "rounds" / "2").is_dir() == (step != "staged")
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "5", "--partial"])
    assert r.exit_code == 0, r.output


def test_report_of_a_loop_run(picked, tmp_path):
    run, truth, b = picked
    other = {p: next(c for c in NAMES if c != g) for p, g in zip(b.path, b.guess)}
    rows = [(b.path[0], b.guess[0], "labelled"), (b.path[1], other[b.path[1]], "labelled"), (b.path[2], "", "skipped")]
    f = tmp_path / "l.csv"
    pd.DataFrame(rows, columns=["path", "label", "status"]).to_csv(f, index=False)
    assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    r = runner.invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "index.html").read_text()
    row = re.search(r"<tr><td>1</td>(.*?)</tr>", html, re.S).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", row)
    # strategy, picked, from, trained on, accuracy, labelled, skipped, unsure, no decision, guess kept
    assert cells[0] == "bald" and cells[1] == "6" and cells[5:9] == ["2", "1", "0", "3"]
    assert cells[9] == "1 (50%)"
    assert html.count("<figure") == 6 and "http" not in html.replace("http-equiv", "")


def test_beta_is_a_round_setting(picked, tmp_path):
    run, truth, b = picked
    f = tmp_path / "l.csv"
    pd.DataFrame({"path": b.path, "label": [truth[p] for p in b.path]}).to_csv(f, index=False)
    assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(run), "--strategy", "powerbald", "--beta", "-1"]),
                          "--beta: expected a positive number")
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "5", "--strategy", "softmaxentropy", "--beta", "4"])
    assert r.exit_code == 0, r.output
    rounds = json.loads((run / "run.json").read_text())["results"]["rounds"]
    assert [(x["strategy"], x["beta"]) for x in rounds] == [("bald", 1.0), ("softmaxentropy", 4.0)]


# ------------------------------------------------------------------------ CSV manifest


def write_manifest(root: Path, truth: dict[str, str], *, extra: str = "", pool_labels: bool = False) -> Path:
    """A manifest of write_folder's images: train and valid with labels, the pool without."""
    lines = ["path,label,split"]
    for split in ("train", "valid"):
        for p in sorted((root / split).rglob("*.png")):
            lines.append(f"{p.relative_to(root).as_posix()},{p.parent.name},{split}")
    for p, lab in sorted(truth.items()):
        lines.append(f"{p},{lab if pool_labels else ''},{'pool' if pool_labels else ''}")
    m = root / "manifest.csv"
    m.write_text("\n".join(lines) + "\n" + extra)
    return m


def test_manifest_is_the_folder(folder, tmp_path):
    root, truth = folder
    m = write_manifest(root, truth)
    a, b = load_dataset(m), load_dataset(root)
    assert a.class_names == b.class_names
    for s in ("train", "valid", "pool"):
        sa, sb = getattr(a, s), getattr(b, s)
        order = np.argsort(sa.paths)
        assert list(np.array(sa.paths)[order]) == sorted(sb.paths)
        assert np.array_equal(sa.x[order], sb.x[np.argsort(sb.paths)])
    # it drives the loop as any data does
    run = tmp_path / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(m), "--k", "5", *FAST])
    assert r.exit_code == 0, r.output
    # with the pool's labels, audit acquire simulates on it
    m2 = write_manifest(root, truth, pool_labels=True)
    r = runner.invoke(app, ["acquire", "--data", str(m2), "--run", str(tmp_path / "sim"), "--rounds", "1",
                            "--step", "5", "--model", "origin", "--epochs", "1", "--samples", "4"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("case, fragment", [
    ("missing", "1 images do not exist: line"),
    ("duplicate", "rows name an image already listed"),
    ("unreadable", "images are not readable"),
    ("bad_split", "split 'test'; expected train, valid or pool"),
    ("no_label", "train or valid rows without a label"),
    ("no_valid", "no valid rows"),
    ("columns", "missing column(s) split"),
    ("classes_txt", "have a label not in"),
])
def test_manifest_refusals(folder, case, fragment):
    root, truth = folder
    m = write_manifest(root, truth)
    text = m.read_text()
    first_train = text.splitlines()[1]
    if case == "missing":
        text += "pool/nowhere.png,,pool\n"
    elif case == "duplicate":
        text += first_train + "\n"
    elif case == "unreadable":
        (root / "pool" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
        text += "pool/cut.png,,pool\n"
    elif case == "bad_split":
        text = text.replace(",valid\n", ",test\n", 1)
    elif case == "no_label":
        text += first_train.split(",")[0].replace(".png", "") + ".png,,train\n"
        text = text.replace(first_train + "\n", "", 1)
    elif case == "no_valid":
        text = "\n".join(ln for ln in text.splitlines() if not ln.endswith(",valid")) + "\n"
    elif case == "columns":
        text = "path,label\n" + "\n".join(ln.rsplit(",", 1)[0] for ln in text.splitlines()[1:]) + "\n"
    elif case == "classes_txt":
        (root / "classes.txt").write_text("hbar\nvbar\n")
    elif case == "size":
        Image.fromarray(np.zeros((20, 16), np.uint8)).save(root / "pool" / "big.png")
        text += "pool/big.png,,\n"
    m.write_text(text)
    r = runner.invoke(app, ["next", "--run", str(root.parent / "loop"), "--data", str(m)])
    assert_one_line_error(r, fragment)
    assert not (root.parent / "loop").exists()


def test_train_on_what_the_loop_labelled(picked, tmp_path):
    """`audit train --data RUN` on a loop run trains on its training images plus the pool
    images labelled so far; the run it makes checks that data by fingerprint."""
    run, truth, b = picked
    assert len(load_dataset(run).train) == 12  # nothing labelled yet: the training images
    f = tmp_path / "l.csv"
    pd.DataFrame({"path": b.path[:4], "label": [truth[p] for p in b.path[:4]]}).to_csv(f, index=False)
    assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    ds = load_dataset(run)
    assert len(ds.train) == 12 + 4 and ds.pool is None
    assert sorted(ds.train.paths[12:]) == sorted(b.path[:4])
    assert [ds.class_names[c] for c in ds.train.y[12:]] == [truth[p] for p in ds.train.paths[12:]]
    final = tmp_path / "final"
    r = runner.invoke(app, ["train", "--data", str(run), "--run", str(final), "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((final / "run.json").read_text())["data"]["n_train"] == 16
    r = runner.invoke(app, ["score", "--run", str(final), "--samples", "2"])
    assert r.exit_code == 0, r.output
    # more labels later: the final run's data has changed, and says so
    g = tmp_path / "m.csv"
    pd.DataFrame({"path": b.path[4:], "label": [truth[p] for p in b.path[4:]]}).to_csv(g, index=False)
    assert runner.invoke(app, ["label", "--run", str(run), str(g)]).exit_code == 0
    r = runner.invoke(app, ["score", "--run", str(final), "--samples", "2"])
    assert_one_line_error(r, "is not the data this run was trained on")
    # a run folder of another kind is not data
    r = runner.invoke(app, ["train", "--data", str(final), "--run", str(tmp_path / "again")])
    assert_one_line_error(r, f"--data: {final} is an `audit train` run folder")


@pytest.mark.parametrize("strategy", ["bald", "batchbald"])
def test_pool_scored_on_dask_picks_the_same_batch(folder, tmp_path, strategy):
    """`audit next --workers 2` scores the pool in pieces on a local Dask cluster: the
    same batch.csv, to the byte, as in this process."""
    root, truth = folder
    out = {}
    for name, extra in (("here", []), ("dask", ["--workers", "2"])):
        run = tmp_path / name
        r = runner.invoke(app, ["next", "--run", str(run), "--data", str(root), "--k", "6", "--strategy", strategy,
                                *FAST, *extra])
        assert r.exit_code == 0, r.output
        out[name] = (run / batch_file(1)).read_bytes()
    assert out["here"] == out["dask"]
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(tmp_path / "x"), "--data", str(root),
                                              "--workers", "0"]), "--workers: expected at least 1")


def test_start_from_no_labels(folder, tmp_path):
    """A manifest of pool rows only and a classes.txt: the first batch is random (no model,
    no guesses); the next trains on what was labelled; no validation images, no accuracy."""
    root, truth = folder
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    m = root / "pool-only.csv"
    m.write_text("path,label,split\n" + "".join(f"{p},,pool\n" for p in sorted(truth)))
    ds = load_dataset(m)
    assert len(ds.train) == len(ds.valid) == 0 and len(ds.pool) == 180 and ds.class_names == NAMES
    assert ds.image_shape == (1, 16, 16)
    run = tmp_path / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(m), "--k", "9", *FAST])
    assert r.exit_code == 0, r.output
    assert "no labelled images yet, so no model: 9 chosen at random" in r.output
    assert "chose 9 of 180 pool images by random" in r.output
    b = loop_state(run).batches[0]
    assert (b.guess == "").all() and b.p_guess.isna().all()
    tasks = json.loads((run / tasks_file(1)).read_text())
    assert all(t["predictions"] == [] for t in tasks)
    f = labeller(run, truth, tmp_path / "l1.csv")
    assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "9"])
    assert r.exit_code == 0, r.output
    assert "trained on 9 labelled images, no validation images" in r.output and "by bald" in r.output
    rounds = json.loads((run / "run.json").read_text())["results"]["rounds"]
    assert [x["valid_accuracy"] for x in rounds] == [None, None] and rounds[0]["strategy"] == "random"
    r = runner.invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    # nothing to train on in an `audit train` of the same data
    r = runner.invoke(app, ["train", "--data", str(m), "--run", str(tmp_path / "t")])
    assert_one_line_error(r, "has no labelled training images")
    # pool rows only and no classes.txt: refused, saying what to add
    (root / "classes.txt").unlink()
    assert_one_line_error(runner.invoke(app, ["next", "--run", str(tmp_path / "l2"), "--data", str(m)]),
                          "only pool rows", "classes.txt")


@pytest.mark.browser
def test_page_without_guesses(tmp_path, browser, folder):
    root, truth = folder
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    m = root / "pool-only.csv"
    m.write_text("path,label,split\n" + "".join(f"{p},,pool\n" for p in sorted(truth)))
    run = tmp_path / "loop"
    assert runner.invoke(app, ["next", "--run", str(run), "--data", str(m), "--k", "4", *FAST]).exit_code == 0
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((run / page_file(1)).as_uri())
    assert "at random" in page.inner_text("header")
    page.keyboard.press("Enter")  # no guess to accept: nothing happens
    assert page.inner_text("#done") == "0"
    page.keyboard.press("2")
    assert page.inner_text("#done") == "1" and errors == []


@pytest.mark.browser
def test_page_past_ten_classes_has_a_picker(tmp_path, browser, folder):
    """Twelve classes: keys 1-9 and 0 set the first ten, `/` opens a type-to-filter picker
    for any of them."""
    root, truth = folder
    names = [f"kind {c}" for c in "abcdefghijkl"]
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    m = root / "pool-only.csv"
    m.write_text("path,label,split\n" + "".join(f"{p},,pool\n" for p in sorted(truth)))
    run = tmp_path / "loop"
    assert runner.invoke(app, ["next", "--run", str(run), "--data", str(m), "--k", "3", *FAST]).exit_code == 0
    page = browser.new_page(accept_downloads=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((run / page_file(1)).as_uri())
    assert page.locator("datalist#classes option").count() == 12
    page.keyboard.press("0")  # the tenth class
    page.keyboard.press("/")
    page.keyboard.type("kind l")
    page.keyboard.press("Enter")
    assert page.inner_text("#n-labelled") == "2"
    with page.expect_download() as info:
        page.click("#export")
    target = tmp_path / "labels.csv"
    info.value.save_as(target)
    rows = pd.read_csv(target, dtype=str, keep_default_na=False)
    assert list(rows.label) == ["kind j", "kind l"] and errors == []
    r = runner.invoke(app, ["label", "--run", str(run), str(target)])
    assert r.exit_code == 0 and "2 labelled" in r.output, r.output


def test_a_run_keeps_its_seed_and_training(picked, tmp_path):
    run, truth, b = picked
    before = _files(run)
    for args, fragment in ((["--seed", "3"], "--seed: "), (["--model", "gal"], "--model/--epochs: "),
                           (["--epochs", "7"], "a run keeps how it trains")):
        assert_one_line_error(runner.invoke(app, ["next", "--run", str(run), "--partial", *args]), fragment)
    assert _files(run) == before
    # the run's own values are accepted, each alone too
    r = runner.invoke(app, ["next", "--run", str(run), "--partial", "--k", "3", "--seed", "0", "--epochs", "3",
                            "--samples", "8"])
    assert r.exit_code == 0, r.output


def test_a_pool_folder_with_classes_txt_starts_from_no_labels(tmp_path):
    root, truth = write_folder(tmp_path / "data", n_pool=20)
    import shutil

    shutil.rmtree(root / "train")
    shutil.rmtree(root / "valid")
    r = runner.invoke(app, ["next", "--run", str(tmp_path / "loop"), "--data", str(root), "--k", "5", *FAST])
    assert_one_line_error(r, "has pool/ but no train/ or valid/", "classes.txt", "--classes")
    r = runner.invoke(app, ["next", "--run", str(tmp_path / "by-option"), "--data", str(root), "--k", "5",
                            "--classes", ",".join(NAMES), *FAST])
    assert r.exit_code == 0 and "no labelled images yet" in r.output, r.output
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    ds = load_dataset(root)
    assert len(ds.train) == len(ds.valid) == 0 and len(ds.pool) == 60 and ds.image_shape == (1, 16, 16)
    r = runner.invoke(app, ["next", "--run", str(tmp_path / "loop"), "--data", str(root), "--k", "5", *FAST])
    assert r.exit_code == 0 and "no labelled images yet" in r.output, r.output


def _pool_only_run(folder, tmp_path, k: int):
    """(manifest of pool rows only, loop run started on it with --classes and k picked)."""
    root, truth = folder
    m = root / "pool-only.csv"
    m.write_text("path,label,split\n" + "".join(f"{p},,pool\n" for p in sorted(truth)))
    run = tmp_path / "loop"
    r = runner.invoke(app, ["next", "--run", str(run), "--data", str(m), "--k", str(k), "--classes", ",".join(NAMES),
                            *FAST])
    assert r.exit_code == 0, r.output
    return m, run


def test_classes_option_starts_from_no_labels_and_stays_with_the_run(folder, tmp_path):
    """--classes does what a classes.txt does: a manifest of pool rows only starts the loop;
    run.json keeps the list, so the later rounds (and Dask workers) load the same data."""
    root, truth = folder
    m, run = _pool_only_run(folder, tmp_path, 6)
    meta = json.loads((run / "run.json").read_text())
    assert meta["data"]["classes"] == list(NAMES) and meta["data"]["class_names"] == list(NAMES)
    f = labeller(run, truth, tmp_path / "l1.csv")
    assert runner.invoke(app, ["label", "--run", str(run), str(f)]).exit_code == 0
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "6"])
    assert r.exit_code == 0 and "trained on 6 labelled images" in r.output, r.output
    before = _files(run)
    # another list on a later call: refused, nothing written
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "6", "--partial", "--classes", "vbar,hbar,diag"])
    assert_one_line_error(r, "--classes: ", "was made with hbar,vbar,diag")
    assert _files(run) == before
    # a classes.txt that says otherwise: one line naming both
    (root / "classes.txt").write_text("diag\nhbar\nvbar\n")
    r = runner.invoke(app, ["next", "--run", str(tmp_path / "l2"), "--data", str(m), "--classes", ",".join(NAMES)])
    assert_one_line_error(r, "--classes: hbar,vbar,diag differs from", "classes.txt")
    assert not (tmp_path / "l2").exists()


def test_a_tampered_classes_field_is_one_line(folder, tmp_path):
    """run.json's data.classes is read back on every round: a value that is not a list of
    names is one line naming the field, and nothing is written."""
    root, truth = folder
    m, run = _pool_only_run(folder, tmp_path, 4)
    meta = json.loads((run / "run.json").read_text())
    meta["data"]["classes"] = "hbar,vbar,diag"
    (run / "run.json").write_text(json.dumps(meta))
    before = _files(run)
    r = runner.invoke(app, ["next", "--run", str(run), "--k", "4", "--partial"])
    assert_one_line_error(r, "data.classes", "expected a list of names")
    assert _files(run) == before


@pytest.mark.parametrize("value, message", [
    ("hbar", "expected at least 2 classes"),
    ("hbar,hbar", "a class is named twice"),
    ("hbar,,vbar", "expected names separated by commas, found an empty one"),
])
def test_bad_classes_option(folder, tmp_path, value, message):
    root, truth = folder
    r = runner.invoke(app, ["next", "--run", str(tmp_path / "l"), "--data", str(root), "--classes", value])
    assert_one_line_error(r, f"--classes: {message}")
    assert r.exit_code == 2 and not (tmp_path / "l").exists()


def test_classes_option_is_for_folders_and_manifests(tmp_path):
    from conftest import write_shapes_npz

    npz = write_shapes_npz(tmp_path / "d.npz", 10, 5)
    r = runner.invoke(app, ["next", "--run", str(tmp_path / "l"), "--data", str(npz), "--classes", "a,b"])
    assert_one_line_error(r, "--classes: MNIST and .npz data carry their classes")
