"""MNIST as a user's unlabelled data, and a script that plays the labeller.

    python bench/pool_folder.py make --out data/mnist-pool [--seed-per-class 2 --valid 1000 --pool 5000]
    python bench/pool_folder.py label --run runs/loop --truth data/mnist-pool.truth.csv --out labels.csv

``make`` writes a folder as `audit next` takes it, from MNIST's *training* images only
(the test images stay for final figures): ``train/<digit>/`` a few labelled images per
class, ``valid/<digit>/`` a labelled validation set, and ``pool/`` unlabelled images in
subfolders of 1,000, with their true labels kept outside the folder in
``<out>.truth.csv`` (``path,label``). ``label`` answers the last batch of a loop run
from that file, as a person would, into a ``path,label`` CSV for `audit label`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import audit
from audit.loop import loop_state


def make(out: Path, seed_per_class: int, n_valid: int, n_pool: int, seed: int) -> None:
    ds = audit.load_dataset("mnist", download=False)
    rng = np.random.default_rng(seed)
    y = ds.train.y
    seed_idx = np.concatenate([rng.choice(np.flatnonzero(y == c), seed_per_class, replace=False) for c in range(10)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), seed_idx))
    valid_idx, pool_idx = rest[:n_valid], rest[n_valid:n_valid + n_pool]
    if out.exists():
        sys.exit(f"error: --out: {out} exists; choose another folder")
    for split, idx in (("train", seed_idx), ("valid", valid_idx)):
        for i in idx:
            d = out / split / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.train.x[i, 0]).save(d / f"{i:05d}.png")
    truth = []
    for n, i in enumerate(pool_idx):
        rel = f"pool/{n // 1000:02d}/{i:05d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.train.x[i, 0]).save(out / rel)
        truth.append((rel, str(int(y[i]))))
    truth_csv = out.with_name(out.name + ".truth.csv")
    pd.DataFrame(truth, columns=["path", "label"]).to_csv(truth_csv, index=False)
    print(f"wrote {out}/ (train {len(seed_idx)}, valid {len(valid_idx)}, pool {len(pool_idx)} images) "
          f"and the pool's true labels to {truth_csv}")


def label(run: Path, truth_csv: Path, out: Path) -> None:
    truth = dict(pd.read_csv(truth_csv, dtype=str).itertuples(index=False, name=None))
    batch = loop_state(run).batches[-1]
    pd.DataFrame({"path": batch.path, "label": [truth[p] for p in batch.path]}).to_csv(out, index=False)
    kept = sum(truth[p] == g for p, g in zip(batch.path, batch.guess))
    print(f"labelled round {int(batch['round'][0])}'s {len(batch)} images into {out} "
          f"(the model's guess was right for {kept})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--seed-per-class", type=int, default=2)
    m.add_argument("--valid", type=int, default=1000)
    m.add_argument("--pool", type=int, default=5000)
    m.add_argument("--seed", type=int, default=0)
    lab = sub.add_parser("label")
    lab.add_argument("--run", type=Path, required=True)
    lab.add_argument("--truth", type=Path, required=True)
    lab.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.out, a.seed_per_class, a.valid, a.pool, a.seed)
    else:
        label(a.run, a.truth, a.out)


if __name__ == "__main__":
    main()
