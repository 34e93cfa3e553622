"""The loop with a person labelling: pool data, `audit next`, `audit label`, the ledger,
the labelling page and Label Studio; and that it is the simulation's code path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from audit.cli import app
from audit.data import load_dataset
from audit.loop import LEDGER, batch_file, loop_state, page_file, tasks_file

from conftest import assert_one_line_error, make_shapes

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
    page = browser.new_page(accept_downloads=True)
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
