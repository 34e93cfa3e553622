"""audit report: content, escaping, packaging, and a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jinja2
import numpy as np
import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.report import METRICS, render_report, report_context, write_report
from conftest import make_shapes, wait_stored

runner = CliRunner()
EVIL = "=<script>alert(1)</script>"  # markup, and a formula to a spreadsheet
TOP = 5
TRAIN_FLIPS = [3, 50, 100, 150]
VALID_FLIPS = [0, 7, 20]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """A trained and scored 3-class run whose class names need escaping."""
    d = tmp_path_factory.mktemp("report")
    x_train, y_train = make_shapes(60, seed=1)
    x_valid, y_valid = make_shapes(12, seed=2)
    # planted label noise: these images are found and flagged as mislabeled
    y_train[TRAIN_FLIPS] = (y_train[TRAIN_FLIPS] + 1) % 3
    y_valid[VALID_FLIPS] = (y_valid[VALID_FLIPS] + 1) % 3
    data = d / "shapes.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_valid=x_valid, y_valid=y_valid,
             class_names=np.array(["horizontal", EVIL, "O'Brien & \"co\""]))
    run = d / "runs" / "shapes"
    for args in (
        ["train", "--data", str(data), "--run", str(run), "--epochs", "4", "--batch-size", "32", "--lr", "1e-3"],
        ["score", "--run", str(run), "--samples", "8", "--folds", "3"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    return run


def test_report_command_writes_one_file(scored_run, tmp_path):
    out = tmp_path / "rep"
    r = runner.invoke(app, ["report", "--run", str(scored_run), "--top", str(TOP), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == f"report written to {out / 'index.html'}"
    assert [p.name for p in out.iterdir()] == ["index.html"]


def test_report_is_self_contained_and_escaped(scored_run, tmp_path):
    res = write_report(scored_run, out=tmp_path / "rep", top=TOP)
    html = res.path.read_text()
    # every image is an inline PNG, once, in the page's style sheet; cells refer to it by class;
    # no external script, stylesheet, font or link
    urls = re.findall(r"url\(([^)]*)\)", html)
    assert urls and all(u.startswith("data:image/png;base64,") for u in urls)
    assert len(urls) == len(set(urls)) == res.n_unique
    refs = set(re.findall(r'class="im p(\d+)"', html))
    assert refs == set(re.findall(r"\.p(\d+)\{background-image", html))
    assert not re.search(r"<link\b|@import|https?://|\ssrc=", html)
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "O&#39;Brien &amp; &#34;co&#34;" in html
    # 3 classes x 4 metrics x (TOP lowest + TOP highest)
    assert res.n_images == 3 * len(METRICS) * 2 * TOP and html.count("<figure class=\"cell") == res.n_images
    assert res.n_unique <= 36 and res.bytes == len(html.encode())


def test_grids_are_the_extremes_of_each_class(scored_run):
    import pandas as pd

    ctx = report_context(scored_run, top=TOP)
    scores = pd.read_csv(scored_run / "scores.csv")
    valid = scores[scores.split == "valid"]
    for c in ctx["classes"]:
        dc = valid[valid.label == c["id"]]
        for m in METRICS:
            low = [x["index"] for x in c["grids"][m]["low"]]
            high = [x["index"] for x in c["grids"][m]["high"]]
            assert low == dc.sort_values([m, "index"], kind="stable")["index"].head(TOP).tolist()
            assert [x["v"][m] for x in c["grids"][m]["high"]] == sorted(dc[m].nlargest(TOP).tolist(), reverse=True)
            assert len(high) == TOP
        assert c["n"] == len(dc) and abs(sum(c["hists"]["entropy"]["bins"]) - 1) < 1e-3
    assert ctx["provenance"]["fingerprint"] and ctx["per_split"][0]["split"] == "train"


def test_template_is_strict(scored_run):
    ctx = report_context(scored_run, top=2)
    del ctx["provenance"]
    with pytest.raises(jinja2.UndefinedError):
        render_report(ctx)


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["--metric", "loss"], "--metric: expected one of entropy, mutual_info, variation_ratio, p_label", 2),
        (["--top", "0"], "--top: expected at least 1", 2),
        (["--split", "test"], "--split: 'test' was not scored", 1),
    ],
)
def test_report_bad_options(scored_run, tmp_path, args, fragment, code):
    r = runner.invoke(app, ["report", "--run", str(scored_run), "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == code and "Traceback" not in r.output
    assert fragment in r.output
    assert not (tmp_path / "o").exists()


def test_report_needs_scores(scored_run, tmp_path):
    run = tmp_path / "noscores"
    shutil.copytree(scored_run, run)
    (run / "scores.csv").unlink()
    r = runner.invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "has no scores.csv; run `audit score" in r.output


def test_templates_ship_in_the_wheel(tmp_path):
    """A regular (non-editable) install finds its templates inside the package."""
    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(root)],
        check=True, capture_output=True,
    )
    (wheel,) = wheels.glob("audit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for t in ("report.html.j2", "active.html.j2", "label.html.j2", "loop.html.j2", "_csv.js.j2"):
        assert f"audit/templates/{t}" in names, t
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-c", "import audit.report as r; print(r.__file__); print(r.template_dirs()[0])"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
    ).stdout.split()
    assert out[0].startswith(str(site)) and out[1] == str(site / "audit" / "templates")


# ------------------------------------------------------------------- headless Chromium


# every image cell's picture: (cells, cells whose picture is not an inline PNG, the decoded
# width of each distinct picture)
IMAGES_JS = """async () => {
  const els = Array.from(document.querySelectorAll('.im'));
  const urls = els.map(e => getComputedStyle(e).backgroundImage);
  const uniq = [...new Set(urls)];
  const widths = await Promise.all(uniq.map(u => new Promise(done => {
    const im = new Image(); im.onload = () => done(im.naturalWidth); im.onerror = () => done(0);
    im.src = u.slice(5, -2);
  })));
  return [els.length, urls.filter(u => !u.startsWith('url("data:image/png;base64,')).length, widths];
}"""


@pytest.mark.browser
def test_report_in_headless_chromium(scored_run, tmp_path, browser):
    res = write_report(scored_run, out=tmp_path / "rep", top=TOP)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, dialogs, requests = [], [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(res.path.as_uri())
    page.wait_for_load_state("load")

    n_cells, not_inline, widths = page.evaluate(IMAGES_JS)
    n_review = page.locator("figure.rcell").count()
    assert n_review >= len(VALID_FLIPS) and n_cells == res.n_images + n_review and not_inline == 0
    assert len(widths) == res.n_unique and all(w > 0 for w in widths), "an image did not decode"

    def visible_cells():
        return page.evaluate(
            """Array.from(document.querySelectorAll('section.cls')).map(s =>
                 Array.from(s.querySelectorAll('figure.cell')).filter(f => f.offsetParent !== null).length)"""
        )

    def visible_metric():
        return page.evaluate(
            """Array.from(document.querySelectorAll('.metric-view'))
                 .filter(v => v.offsetParent !== null).map(v => v.dataset.metric)"""
        )

    assert visible_cells() == [2 * TOP] * 3
    assert set(visible_metric()) == {"entropy"}
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    page.click("button[data-metric=mutual_info]")
    assert set(visible_metric()) == {"mutual_info"} and visible_cells() == [2 * TOP] * 3
    assert page.get_attribute("button[data-metric=mutual_info]", "aria-pressed") == "true"
    assert page.get_attribute("button[data-metric=entropy]", "aria-pressed") == "false"
    page.click("button[data-metric=p_label]")
    assert set(visible_metric()) == {"p_label"}
    assert page.locator("section.cls h2").nth(1).inner_text().startswith(EVIL)  # shown as text
    page.screenshot(path=str(tmp_path / "report-p_label.png"), full_page=True)

    assert errors == [] and dialogs == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.browser
def test_review_decisions_export_and_retrain(scored_run, tmp_path, browser):
    """Flagged training images: decide in the page, export decisions.csv, retrain on it."""
    import pandas as pd

    res = write_report(scored_run, out=tmp_path / "rep", top=TOP, split="train")
    page = browser.new_page(accept_downloads=True)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(res.path.as_uri())
    cells = page.locator("figure.rcell")
    flagged = [int(cells.nth(i).get_attribute("data-index")) for i in range(cells.count())]
    assert set(TRAIN_FLIPS) <= set(flagged)  # every planted flip is on the worklist
    # decide on three of them
    first, second, third = (page.locator(f"figure.rcell[data-index='{i}']") for i in TRAIN_FLIPS[:3])
    first.locator("select.action").select_option("keep")
    second.locator("select.action").select_option("drop")
    third.locator("select.action").select_option("relabel")
    assert third.locator("select.new-label").is_enabled()
    third.locator("select.new-label").select_option(EVIL)
    assert page.inner_text("#decided") == "3"
    with page.expect_download() as info:
        page.click("#export")
    download = info.value
    assert download.suggested_filename == "decisions.csv"
    target = tmp_path / "decisions.csv"
    download.save_as(target)
    rows = pd.read_csv(target, dtype=str, keep_default_na=False)
    assert list(rows.columns) == ["split", "index", "path", "action", "new_label"]
    got = {(r.split, int(r.index), r.action, r.new_label) for r in rows.itertuples()}
    assert got == {
        ("train", TRAIN_FLIPS[0], "keep", ""),
        ("train", TRAIN_FLIPS[1], "drop", ""),
        ("train", TRAIN_FLIPS[2], "relabel", "'" + EVIL),  # neutralised: a spreadsheet shows it as text
    }
    assert errors == []

    out = tmp_path / "curated"
    r = runner.invoke(app, ["retrain", "--run", str(scored_run), "--decisions", str(target), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "applied: 1 dropped, 1 relabelled, 1 kept as they are" in r.output
    assert "validation accuracy: before" in r.output
    import json

    cur = json.loads((out / "run.json").read_text())["data"]["curation"]
    assert (cur["dropped"], cur["relabelled"], cur["kept"]) == (1, 1, 1)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory) -> Path:
    """A scored 3-class run with many planted flips: dozens of flags, pairs of several."""
    d = tmp_path_factory.mktemp("noisy")
    x_train, y_train = make_shapes(80, seed=3)
    x_valid, y_valid = make_shapes(10, seed=4)
    flips = np.arange(0, 240, 6)  # 40 of 240
    y_train[flips] = (y_train[flips] + 1) % 3
    data = d / "noisy.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_valid=x_valid, y_valid=y_valid)
    run = d / "runs" / "noisy"
    for args in (
        ["train", "--data", str(data), "--run", str(run), "--epochs", "6", "--batch-size", "32", "--lr", "1e-3"],
        ["score", "--run", str(run), "--samples", "8", "--folds", "3", "--flag-top", "0"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    return run


@pytest.mark.browser
def test_review_by_keyboard_and_in_bulk(noisy_run, tmp_path, browser):
    """20 flags decided with the keyboard, one given -> suggested pair accepted in bulk,
    the page reloaded (decisions kept), exported; retrain applies exactly those."""
    import pandas as pd

    res = write_report(noisy_run, out=tmp_path / "rep", top=TOP, split="train")
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(res.path.as_uri())
    cells = page.locator("figure.rcell")
    n = cells.count()
    assert n >= 25, n
    order = [(int(cells.nth(i).get_attribute("data-index")), cells.nth(i).get_attribute("data-suggested"))
             for i in range(n)]
    keys = ["k", "d", "Enter", "0", "2"] * 4  # the classes are named 0, 1, 2: their names are their keys
    want = {}
    for (i, suggested), key in zip(order, keys):
        if key == "Enter" and not suggested:  # an ambiguous flag suggests nothing: Enter does nothing there
            key = "k"
        page.keyboard.press(key)
        want[i] = {"k": ("keep", ""), "d": ("drop", ""), "Enter": ("relabel", suggested),
                   "0": ("relabel", "0"), "2": ("relabel", "2")}[key]
    assert page.inner_text("#decided") == "20"
    assert page.locator("figure.rcell.focus").get_attribute("data-index") == str(order[20][0])
    # one pair, in bulk: the most frequent given -> suggested
    pair = page.locator("table.pairs a.pair").first
    pair.click()
    shown = page.locator("figure.rcell.match")
    n_pair = shown.count()
    assert n_pair >= 2 and page.locator("#filterbar").is_visible()
    assert page.evaluate("Array.from(document.querySelectorAll('figure.rcell')).filter(c => c.offsetParent !== null).length") == n_pair
    for j in range(n_pair):
        want[int(shown.nth(j).get_attribute("data-index"))] = ("relabel", shown.nth(j).get_attribute("data-suggested"))
    page.click("#accept-all")
    page.click("#clear-filter")
    assert page.locator("figure.rcell").first.is_visible()
    wait_stored(page, len(want))
    page.reload()
    assert page.inner_text("#decided") == str(len(want))
    assert page.locator(f"figure.rcell[data-index='{order[0][0]}']").get_attribute("data-action") == "keep"
    with page.expect_download() as info:
        page.click("#export")
    target = tmp_path / "decisions.csv"
    info.value.save_as(target)
    rows = pd.read_csv(target, dtype=str, keep_default_na=False)
    assert {int(r.index): (r.action, r.new_label) for r in rows.itertuples()} == want
    assert errors == []
    context.close()
    out = tmp_path / "curated"
    r = runner.invoke(app, ["retrain", "--run", str(noisy_run), "--decisions", str(target), "--out", str(out)])
    assert r.exit_code == 0, r.output
    counts = pd.Series([a for a, _ in want.values()]).value_counts().to_dict()
    assert (f"applied: {counts.get('drop', 0)} dropped, {counts.get('relabel', 0)} relabelled, "
            f"{counts.get('keep', 0)} kept as they are") in r.output


def many_classes_npz(path: Path, n_classes: int = 100, n_train: int = 4, n_valid: int = 50, seed: int = 0) -> Path:
    """32x32 RGB noise around a per-class colour: n_classes classes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n_classes, 3, 1, 1))

    def make(n):
        y = np.repeat(np.arange(n_classes), n)
        x = np.clip(base[y] + rng.normal(0, 60, (len(y), 3, 32, 32)), 0, 255).astype(np.uint8)
        return x, y

    (xt, yt), (xv, yv) = make(n_train), make(n_valid)
    np.savez(path, x_train=xt, y_train=yt, x_valid=xv, y_valid=yv,
             class_names=np.array([f"class <{i:03d}>" for i in range(n_classes)]))
    return path


@pytest.fixture(scope="module")
def hundred_classes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hundred")
    data = many_classes_npz(d / "c100.npz")
    run = d / "runs" / "c100"
    for args in (["train", "--data", str(data), "--run", str(run), "--epochs", "1", "--batch-size", "100"],
                 ["score", "--run", str(run), "--samples", "2", "--splits", "valid"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    return run


def test_report_of_100_classes_is_pages_and_inlines_each_image_once(hundred_classes, tmp_path):
    """Past 50 classes: an index page and a page per class, openable from disk; each page
    inlines each image it shows once. The report before wrote in every cell a copy of the
    image and its details as a tooltip, and each flag's relabel menu with every class
    (171 MB for this data; 5.1 times these pages: bench/report_size.py). Estimated from
    the pages themselves, that is a lower bound of the old size: at least 4.5 times."""
    out = tmp_path / "rep"
    r = runner.invoke(app, ["report", "--run", str(hundred_classes), "--top", "30", "--out", str(out)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["index.html", *(f"class-{c}.html" for c in range(100))])
    index = (out / "index.html").read_text()
    assert index.count('href="class-') >= 100 and "url(data:" not in index
    assert "class &lt;007&gt;" in index and "class <007>" not in index
    total, per_cell = 0, 0
    for c in range(100):
        html = (out / f"class-{c}.html").read_text()
        total += len(html.encode())
        uris = dict(re.findall(r"\.p(\d+)\{background-image:url\(([^)]*)\)\}", html))
        refs = re.findall(r'class="im p(\d+)"', html)
        assert html.count('<figure class="cell') == 4 * 2 * 30  # 30 lowest and highest of 4 metrics
        assert set(refs) == set(uris)  # grid and review cells
        per_cell += sum(len(uris[i]) for i in refs) - sum(len(u) for u in uris.values())
        info = json.loads(re.search(r'<script type="application/json" id="image-info">(.*?)</script>', html).group(1))
        grid = re.findall(r'<figure class="cell[^"]*"><span class="im p(\d+)"', html)
        per_cell += sum(len(info[i]) for i in grid) - sum(len(t) for t in info.values())
        menu = sum(len(f'<option value="class &lt;{k:03d}&gt;">class &lt;{k:03d}&gt;</option>\n') for k in range(100))
        per_cell += html.count('class="rcell"') * menu
    total += len(index.encode())
    before = total + per_cell  # the same pages with one inlined copy per cell
    assert total * 4.5 <= before, (total, before)


@pytest.mark.browser
def test_report_pages_in_chromium(hundred_classes, tmp_path, browser):
    res = write_report(hundred_classes, out=tmp_path / "rep", top=30)
    page = browser.new_page(accept_downloads=True)
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda q: requests.append(q.url))
    page.goto(res.path.as_uri())
    page.click("table.classes a >> nth=7")
    page.wait_for_load_state("load")  # the page's script has run: its keys work
    assert page.url.endswith("class-7.html")
    n_cells, not_inline, widths = page.evaluate(IMAGES_JS)
    assert n_cells >= 4 * 2 * 30 and not_inline == 0 and widths and all(w == 32 for w in widths)
    # a decision on this page and one on another: one export, from the index, holds both
    first = page.locator("figure.rcell").first
    kept = first.get_attribute("data-index")
    page.keyboard.press("k")
    assert page.locator("figure.rcell").first.get_attribute("data-action") == "keep"
    page.click("text=← all classes")
    page.wait_for_load_state("load")
    assert page.url.endswith("index.html") and page.inner_text("#decided") == "1"
    page.click("table.classes a >> nth=8")
    page.wait_for_load_state("load")
    dropped = page.locator("figure.rcell").first.get_attribute("data-index")
    page.keyboard.press("d")
    page.click("text=← all classes")
    page.wait_for_load_state("load")
    with page.expect_download() as info:
        page.click("#export")
    target = tmp_path / "decisions.csv"
    info.value.save_as(target)
    rows = target.read_text().splitlines()
    assert rows[0] == "split,index,path,action,new_label"
    assert sorted(rows[1:]) == sorted([f"valid,{kept},,keep,", f"valid,{dropped},,drop,"])
    assert errors == [] and all(u.startswith(("file:", "data:", "blob:")) for u in requests)


def test_top_stability():
    """Exact scores: the list is the list (1.0); scores drowned in their errors: a list
    is as good as a random one (top / n); new runs' reports say it per grid."""
    from audit.report import top_stability

    v = np.arange(100, dtype=float)
    assert top_stability(v, np.zeros(100), 10) == 1.0
    assert abs(top_stability(v, np.full(100, 1e6), 10) - 0.1) < 0.03
    mid = top_stability(v, np.full(100, 3.0), 10)
    assert 0.3 < mid < 1.0
    assert top_stability(v[:5], np.zeros(5), 10) is None  # every image is in the list
    assert top_stability(v, np.full(100, np.nan), 10) is None


def test_report_shows_standard_errors_and_stability(scored_run, tmp_path):
    import pandas as pd

    scores = pd.read_csv(scored_run / "scores.csv")
    assert {"entropy_se", "mutual_info_se", "variation_ratio_se", "mean_std_se"} <= set(scores.columns)
    assert (scores["entropy_se"] >= 0).all() and scores["entropy_se"].max() > 0
    html = write_report(scored_run, out=tmp_path / "rep", top=TOP).path.read_text()
    assert html.count("% stable</span>") == 3 * 3 * 2  # 3 classes, 3 metrics with errors, 2 ends
    assert " \\u00b1 " in html  # the tooltips' errors ("±", escaped in the page's JSON)


def test_exact_duplicates_and_leakage(tmp_path):
    """Identical images within train, and across train and valid, are found by `audit
    score`, counted in its output and run.json, listed in duplicates.csv and shown in
    the report, leakage first."""
    import json

    import pandas as pd

    x_train, y_train = make_shapes(20, seed=5)
    x_valid, y_valid = make_shapes(6, seed=6)
    x_train[7] = x_train[3]  # within train
    x_train[8] = x_train[3]
    x_valid[2] = x_train[11]  # leakage
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_valid=x_valid, y_valid=y_valid)
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--data", str(data), "--run", str(run), "--epochs", "1"]).exit_code == 0
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "2"])
    assert r.exit_code == 0, r.output
    assert (f"exact duplicates: 2 groups of 5 identical images; 1 across train and valid (leakage); listed in "
            f"{run}/duplicates.csv") in r.output
    d = pd.read_csv(run / "duplicates.csv", keep_default_na=False)
    got = {(k, tuple(sorted(zip(g.split, g["index"])))) for k, g in d.groupby("kind")}
    assert got == {("within train", (("train", 3), ("train", 7), ("train", 8))),
                   ("across train and valid", (("train", 11), ("valid", 2)))}
    assert json.loads((run / "run.json").read_text())["score"]["duplicates"]["across train and valid"] == 1
    html = write_report(run, out=tmp_path / "rep", top=3).path.read_text()
    section = html[html.index("<h2>Exact duplicates</h2>"):]
    assert section.index("across train and valid") < section.index("within train")
    assert section.count('class="cell dcell"') == 5
    # on the scored run of the other tests: none
    x, y = make_shapes(10, seed=9)
    np.savez(data, x_train=x, y_train=y, x_valid=x[:5], y_valid=y[:5])
    r = runner.invoke(app, ["train", "--data", str(data), "--run", str(tmp_path / "r2"), "--epochs", "1"])
    r = runner.invoke(app, ["score", "--run", str(tmp_path / "r2"), "--samples", "2", "--splits", "train"])
    assert r.exit_code == 0 and "exact duplicates: none" in r.output


def test_report_shows_confident_learning(scored_run, tmp_path):
    """Scored with folds, both splits are out of sample: run.json holds cleanlab's
    estimates for each, scores.csv its issues, and the page the report's split's table
    (class names escaped)."""
    import pandas as pd

    meta = json.loads((scored_run / "run.json").read_text())
    cl = meta["score"]["confident_learning"]
    assert set(cl) == {"train", "valid"} and cl["train"]["n"] == 180 and "fold models" in cl["train"]["probabilities"]
    scores = pd.read_csv(scored_run / "scores.csv")
    assert scores.cl_issue.isin([0, 1]).all()
    assert cl["train"]["flagged"] == int(scores[scores.split == "train"].cl_issue.sum())
    html = write_report(scored_run, out=tmp_path / "rep", top=TOP).path.read_text()
    assert "<h2>Confident learning (cleanlab)</h2>" in html
    assert f"estimates <strong>{cl['valid']['estimated_errors']}</strong> label errors" in html  # the page's split
    assert "<td>=&lt;script&gt;alert(1)&lt;/script&gt;</td>" in html and "<td>=<script>" not in html
