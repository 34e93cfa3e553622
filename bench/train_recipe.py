"""Choosing `audit train --recipe` honestly, and the strong recipe's final figures.

Choice (the default): holds out 10,000 of MNIST's 60,000 training images (seeded), draws
random training sets of a few sizes from the other 50,000, trains each recipe on each
and prints the accuracy on the held-out images, the epochs and batch it planned, and
the seconds. MNIST's test images are not read.

    python bench/train_recipe.py [--sizes 1000,5000,15000,45000] [--recipes origin,strong] [--seeds 1]

Final (``--final``): trains origin and strong on all 60,000 training images, one after
the other in this process, and prints their accuracy on MNIST's 10,000 test images
(dropout off) and the ratio of their training times (each run's own seconds, the
per-epoch validation included as `audit train` does it).

    python bench/train_recipe.py --final [--recipes origin,strong]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

import audit
from audit.config import TRAIN_RECIPES
from audit.data import holdout
from audit.train import evaluate, plan

CANDIDATES = {
    **TRAIN_RECIPES,
    # the origin's 600 steps (10 epochs of 60,000 in 1,000s) at any size: smaller batches, then more epochs
    "origin-600": replace(TRAIN_RECIPES["origin"], min_steps=600),
    # strong's settings without a floor on the steps: 15,000 images are 360 steps
    "strong-nomin": replace(TRAIN_RECIPES["strong"], min_steps=None),
    "strong-noshift": replace(TRAIN_RECIPES["strong"], shift=0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="origin,strong", help=f"comma-separated: {', '.join(CANDIDATES)}")
    p.add_argument("--sizes", default="1000,5000,15000,45000", help="training-set sizes")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--holdout", type=int, default=10000, help="training images held out for validation")
    p.add_argument("--final", action="store_true", help="train on all 60,000; accuracy on MNIST's test images")
    a = p.parse_args()
    names = a.recipes.split(",")
    bad = [r for r in names if r not in CANDIDATES]
    if bad:
        raise SystemExit(f"error: --recipes: expected some of {', '.join(CANDIDATES)}, got {','.join(bad)!r}")
    t0 = time.perf_counter()
    mnist = audit.load_dataset("mnist", download=False)
    if a.final:
        seconds = {}
        for name in names:
            r = audit.train(mnist, CANDIDATES[name], validate=False)
            seconds[name] = r.seconds
            epochs, batch = plan(CANDIDATES[name], len(mnist.train))
            print(f"{name:14s}: test accuracy {evaluate(r.model, mnist.valid)[1]:.4f} | {r.seconds:.1f} s "
                  f"({epochs} epochs of batches of {batch}) | {r.seconds / seconds[names[0]]:.2f}x {names[0]}",
                  flush=True)
    else:
        ds = holdout(mnist, a.holdout, seed=0)
        print(f"train up to {len(ds.train):,} images, validation {len(ds.valid):,} held out of MNIST's training "
              "images (the test images are not read)", flush=True)
        for n in (int(v) for v in a.sizes.split(",")):
            for name in names:
                acc, secs = [], []
                for seed in range(a.seeds):
                    subset = np.sort(np.random.default_rng([1000, n, seed]).choice(len(ds.train), n, replace=False))
                    r = audit.train(ds, replace(CANDIDATES[name], seed=seed), subset=subset, validate=False)
                    acc.append(r.valid_accuracy)
                    secs.append(r.seconds)
                epochs, batch = plan(CANDIDATES[name], n)
                print(f"n={n:6,d} {name:14s}: {np.mean(acc):.4f} {np.round(acc, 4).tolist()} | {epochs} epochs of "
                      f"{batch} | {np.mean(secs):.1f} s a training", flush=True)
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
