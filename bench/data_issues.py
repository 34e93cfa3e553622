"""Plant data problems into MNIST and measure what `audit score` finds (#18, item 6).

From MNIST's 60,000 training images (never the test images): a training split of
50,000 and a validation split of 10,000, drawn by --seed. Into them go

- 100 near-duplicates across train and valid: a training image copied over a
  validation image (label too), a third each shifted by one pixel, noised (Gaussian,
  sigma 0.05 of the range) or with its contrast scaled by 0.5-0.8;
- 100 exact duplicates within train: a training image copied over another;
- 100 foreign images over training images, 20 of each: inverted digits, random
  strokes, blank, saturated, digits rotated by 90 degrees (labels left as they were).

Then `audit train` (defaults) and `audit score` (defaults) on the npz, and for each kind
recall and precision of what the run lists: near_duplicates.csv's pairs across train
and valid, duplicates.csv's groups within train, outliers.csv. A found pair or image
that was not planted counts against precision, even where MNIST has a real duplicate.

    python bench/data_issues.py --seed 1 --out bench-out/data_issues
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audit.data import load_mnist  # noqa: E402

FOREIGN = ("inverted", "strokes", "blank", "saturated", "rotated 90")
NEAR = ("shifted a pixel", "noised", "contrast")


def strokes(rng, h: int, w: int) -> np.ndarray:
    im = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 5)):
        r0, r1 = rng.integers(2, h - 2, 2)
        c0, c1 = rng.integers(2, w - 2, 2)
        t = np.linspace(0, 1, 4 * max(h, w))
        rr, cc = np.round(r0 + (r1 - r0) * t).astype(int), np.round(c0 + (c1 - c0) * t).astype(int)
        for d in (0, 1):
            im[np.clip(rr + d, 0, h - 1), cc] = 255
    return im


def plant(x: np.ndarray, y: np.ndarray, seed: int):
    """The planted dataset and what was planted where."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    xt, yt = x[perm[:50000]].copy(), y[perm[:50000]].copy()
    xv, yv = x[perm[50000:60000]].copy(), y[perm[50000:60000]].copy()
    src = rng.choice(50000, 100, replace=False)
    dst = rng.choice(10000, 100, replace=False)
    near = []
    for j, (s, d) in enumerate(zip(src, dst)):
        im = xt[s, 0].astype(np.float32)
        kind = NEAR[j % 3]
        if kind == "shifted a pixel":
            im = np.roll(im, [(0, 1), (0, -1), (1, 0), (-1, 0)][rng.integers(4)], axis=(0, 1))
        elif kind == "noised":
            im = im + rng.normal(0, 0.05 * 255, im.shape)
        else:
            im = im * rng.uniform(0.5, 0.8)
        xv[d, 0] = np.clip(np.round(im), 0, 255).astype(np.uint8)
        yv[d] = yt[s]
        near.append((int(s), int(d), kind))
    free = np.setdiff1d(np.arange(50000), src)
    e = rng.choice(free, 200, replace=False)
    xt[e[100:]], yt[e[100:]] = xt[e[:100]], yt[e[:100]]
    exact = [(int(a), int(b)) for a, b in zip(e[:100], e[100:])]
    free = np.setdiff1d(free, e)
    foreign = []
    for j, p in enumerate(rng.choice(free, 100, replace=False)):
        kind = FOREIGN[j % 5]
        im = xt[p, 0]
        im = {"inverted": lambda: 255 - im, "strokes": lambda: strokes(rng, 28, 28),
              "blank": lambda: np.zeros_like(im), "saturated": lambda: np.full_like(im, 255),
              "rotated 90": lambda: np.rot90(im).copy()}[kind]()
        xt[p, 0] = im
        foreign.append((int(p), kind))
    return (xt, yt, xv, yv), {"near": near, "exact": exact, "foreign": foreign}


def measure(run: Path, truth: dict) -> dict:
    near = pd.read_csv(run / "near_duplicates.csv", keep_default_na=False)
    across = near[(near["kind"] == "across train and valid") & (near["split"] == "train")]
    found = set(zip(across["index"], across["other_index"]))
    out = {"near-duplicates across train and valid": {
        "planted": len(truth["near"]), "found": len(found),
        "recall": np.mean([(s, d) in found for s, d, _ in truth["near"]]),
        "precision": sum((s, d) in found for s, d, _ in truth["near"]) / max(len(found), 1),
        "recall by kind": {k: float(np.mean([(s, d) in found for s, d, kk in truth["near"] if kk == k]))
                           for k in NEAR}}}
    dup = pd.read_csv(run / "duplicates.csv", keep_default_na=False)
    within = dup[dup["kind"] == "within train"]
    groups = within.groupby("group")["index"].apply(set)
    planted_exact = [g for g in groups if any({a, b} <= g for a, b in truth["exact"])]
    out["exact duplicates within train"] = {
        "planted": len(truth["exact"]), "found groups": int(len(groups)),
        "recall": float(np.mean([any({a, b} <= g for g in groups) for a, b in truth["exact"]])),
        # a group of identical foreign images (the blank ones, the saturated ones) is a true duplicate too
        "groups that are planted duplicates or planted identical foreign images": len(planted_exact)
        + sum(1 for g in groups if g <= {p for p, k in truth["foreign"] if k in ("blank", "saturated")})}
    out["exact duplicates within train"]["precision"] = (
        out["exact duplicates within train"]["groups that are planted duplicates or planted identical foreign images"]
        / max(len(groups), 1))
    o = pd.read_csv(run / "outliers.csv", keep_default_na=False)
    flagged = set(o.loc[o["split"] == "train", "index"])
    planted = {p for p, _ in truth["foreign"]}
    out["foreign images (outliers)"] = {
        "planted": len(planted), "flagged": int(len(o)),
        "recall": len(flagged & planted) / len(planted), "precision": len(flagged & planted) / max(len(o), 1),
        "recall by kind": {k: float(np.mean([p in flagged for p, kk in truth["foreign"] if kk == k])) for k in FOREIGN}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench-out/data_issues"))
    ap.add_argument("--score-args", default="", help="more options for `audit score`")
    args = ap.parse_args()
    mnist = load_mnist()
    (xt, yt, xv, yv), truth = plant(mnist.train.x, mnist.train.y, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / f"planted-{args.seed}.npz"
    np.savez(npz, x_train=xt, y_train=yt, x_valid=xv, y_valid=yv)
    run = args.out / f"run-{args.seed}"
    audit = [sys.executable, "-m", "audit.cli"]
    t0 = time.perf_counter()
    subprocess.run([*audit, "train", "--data", str(npz), "--run", str(run), "--overwrite"], check=True)
    t1 = time.perf_counter()
    subprocess.run([*audit, "score", "--run", str(run), *args.score_args.split()], check=True)
    t2 = time.perf_counter()
    meta = json.loads((run / "run.json").read_text())
    res = {"seed": args.seed, "train_seconds": round(t1 - t0, 1), "score_seconds": round(t2 - t1, 1),
           "data_checks_seconds": meta["score"]["data_checks"]["seconds"], **measure(run, truth)}
    print(json.dumps(res, indent=1, default=float))
    (args.out / f"result-{args.seed}.json").write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
