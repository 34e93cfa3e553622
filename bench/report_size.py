"""The report at the size of real datasets: 100 classes of 32x32 RGB, `--top 30`.

    python bench/report_size.py [--classes 100] [--valid-per-class 50] [--top 30] [--out bench-out/report-size]
                                [--before /tmp/before]

Generates the data (per class a colour plus pixel noise; noise is what PNG compresses
worst), trains the origin CNN one epoch and scores the validation split (T = 2: the
scores' values do not matter here), renders the report, and prints its pages' bytes,
the distinct images, the time to render, and headless Chromium's first contentful
paint and load event for the index page and a class page (the median of 3 loads).
``--before DIR``: a checkout of an older audit (``git worktree add DIR <commit>``) is
run on the same run folder in a subprocess, and its page measured the same way, so the
printed ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import audit
from audit.report import write_report

# after the load event, once the paint entries are in (they are queued a little later)
PAINT_JS = """() => new Promise(done => {
  const look = () => {
    const p = performance.getEntriesByName('first-contentful-paint')[0];
    const n = performance.getEntriesByType('navigation')[0];
    if (p && n && n.loadEventEnd > 0) { done([p.startTime, n.loadEventEnd]); } else { setTimeout(look, 20); }
  };
  look();
})"""


def make_run(out: Path, n_classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (n_classes, 3, 1, 1))

    def make(n):
        y = np.repeat(np.arange(n_classes), n)
        return np.clip(base[y] + rng.normal(0, 60, (len(y), 3, 32, 32)), 0, 255).astype(np.uint8), y

    (xt, yt), (xv, yv) = make(4), make(per_class)
    data = out / "data.npz"
    np.savez(data, x_train=xt, y_train=yt, x_valid=xv, y_valid=yv,
             class_names=np.array([f"class {i:03d}" for i in range(n_classes)]))
    run = out / "run"
    audit.train_run(run, data=str(data), config=audit.TrainConfig(epochs=1, batch_size=100))
    audit.score_run(run, audit.ScoreConfig(samples=2, splits="valid"))
    return run


def chromium() -> str:
    for name in (os.environ.get("AUDIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("error: no Chromium found (apt-get install chromium, or set AUDIT_CHROMIUM)")


def paint(pages: list[Path]) -> dict[str, tuple[float, float]]:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox", "--disable-gpu"])
        for page_path in pages:
            runs = []
            for _ in range(3):
                ctx = b.new_context()
                pg = ctx.new_page()
                pg.goto(page_path.as_uri(), wait_until="load", timeout=300_000)
                runs.append(pg.evaluate(PAINT_JS))
                ctx.close()
            fcp = float(np.median([r[0] for r in runs]))
            load = float(np.median([r[1] for r in runs]))
            out[str(page_path)] = (fcp, load)
        b.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--valid-per-class", type=int, default=50)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("bench-out/report-size"))
    p.add_argument("--before", type=Path, help="a checkout of an older audit to measure beside this one")
    a = p.parse_args()
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    a.out = a.out.resolve()
    run = make_run(a.out, a.classes, a.valid_per_class)
    t0 = time.perf_counter()
    res = write_report(run, out=a.out / "report", top=a.top)
    seconds = time.perf_counter() - t0
    print(f"{a.classes} classes of 32x32 RGB, {a.classes * a.valid_per_class:,} validation images, --top {a.top}")
    print(f"now: {len(res.pages)} page(s), {res.bytes / 1e6:.1f} MB in all, {res.n_images:,} grid cells of "
          f"{res.n_unique:,} distinct images, rendered in {seconds:.1f} s")
    pages = [res.pages[0]] + ([res.pages[1]] if len(res.pages) > 1 else [])
    if a.before:
        code = ("import json, sys, time; import audit.report as r; t = time.perf_counter(); "
                f"res = r.write_report({str(run)!r}, out={str(a.out / 'before')!r}, top={a.top}); "
                "print(json.dumps([res.bytes, res.n_images, res.n_unique, time.perf_counter() - t]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=a.before, env={**os.environ, "PYTHONPATH": str(a.before)}).stdout
        b_bytes, b_cells, b_unique, b_s = json.loads(out.strip().splitlines()[-1])
        print(f"before ({a.before}): one page, {b_bytes / 1e6:.1f} MB, {b_cells:,} cells, rendered in {b_s:.1f} s; "
              f"now / before: {res.bytes / b_bytes:.3f} of the size ({b_bytes / res.bytes:.2f} times smaller)")
        pages.append(a.out / "before" / "index.html")
    measured = paint(pages)
    for x in pages:
        name, (fcp, load) = x.relative_to(a.out), measured[str(x)]
        print(f"headless Chromium, {name}: first contentful paint {fcp / 1e3:.2f} s, load event {load / 1e3:.2f} s "
              "(median of 3)")


if __name__ == "__main__":
    main()
