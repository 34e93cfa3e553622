"""Choosing `audit acquire`'s training recipe honestly: on a validation split carved
from MNIST's training images, never on its 10,000 test images.

Holds out 10,000 of the 60,000 training images (seeded), draws random class-balanced
labelled sets of a few sizes from the other 50,000, trains with each recipe and prints
the mean accuracy on the held-out images, each seed's, the epochs trained and the wall
time. The Gal et al. CNN recipes train 50 epochs with the paper's weight decay; the
``batchbald`` recipe (``audit acquire --recipe batchbald``) stops early on 1,024 more
labelled images drawn from the 50,000 (never from the held-out 10,000), as the BatchBALD
paper's code did: those images are labels the other recipes do not get.

    python bench/recipe.py [--sizes 100,300,500] [--seeds 3] [--recipes paper,b32,acquire,batchbald]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import audit
from audit.active import AL_TRAIN, BATCHBALD_TRAIN, PAPER_TRAIN, ALConfig, initial_set
from audit.data import holdout

sys.path.insert(0, str(Path(__file__).parent))
from _common import stop_split  # noqa: E402

RECIPES = {
    "paper": ALConfig(train=replace(PAPER_TRAIN, even_batches=True)),  # Gal et al.'s code
    "b32": ALConfig(train=replace(AL_TRAIN, batch_size=32, lr=1e-3, schedule="constant")),
    "b32-cos2e-3": ALConfig(train=replace(AL_TRAIN, batch_size=32, lr=2e-3, schedule="cosine")),
    "b32-cos3e-3": ALConfig(train=replace(AL_TRAIN, batch_size=32, lr=3e-3, schedule="cosine")),  # the default before
    "acquire": ALConfig(train=AL_TRAIN),  # audit acquire's default: batch 32, cosine from 5e-3
    "b32-cos5e-3": ALConfig(train=replace(AL_TRAIN, batch_size=32, lr=5e-3, schedule="cosine")),
    "b32-cos7e-3": ALConfig(train=replace(AL_TRAIN, batch_size=32, lr=7e-3, schedule="cosine")),
    "b32-cos1e-2": ALConfig(train=replace(AL_TRAIN, batch_size=32, lr=1e-2, schedule="cosine")),
    "batchbald": ALConfig(train=BATCHBALD_TRAIN, valid_size=1024),  # the BatchBALD paper's code
    # the BatchBALD CNN without early stopping: all 30 epochs of 5,056 draws
    "batchbald-30": ALConfig(train=replace(BATCHBALD_TRAIN, patience=None)),
    # Gal's CNN with the batchbald recipe's early stopping on the same 1,024 images
    "acquire-es": ALConfig(train=replace(AL_TRAIN, patience=5), valid_size=1024),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="paper,b32,b32-cos2e-3,b32-cos3e-3,b32-cos5e-3,b32-cos7e-3,b32-cos1e-2", help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--sizes", default="100,300,500", help="labelled-set sizes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--holdout", type=int, default=10000, help="training images held out for validation")
    a = p.parse_args()
    bad = [r for r in a.recipes.split(",") if r not in RECIPES]
    if bad:
        raise SystemExit(f"error: --recipes: expected some of {', '.join(RECIPES)}, got {','.join(bad)!r}")
    t0 = time.perf_counter()
    ds = holdout(audit.load_dataset("mnist", download=False), a.holdout, seed=0)
    print(f"train {len(ds.train):,} images, validation {len(ds.valid):,} held out of MNIST's training images "
          "(the test images are not read)", flush=True)
    for n in (int(v) for v in a.sizes.split(",")):
        for name in a.recipes.split(","):
            acc, epochs = [], []
            t1 = time.perf_counter()
            recipe = RECIPES[name]
            for seed in range(a.seeds):
                subset = initial_set(ds.train.y, n, ds.n_classes, np.random.default_rng(2000 + seed))
                cfg = recipe.train_config(n, seed)
                # more labelled images, outside the subset, to stop on
                stop = stop_split(ds, subset, recipe.valid_size, 3000 + seed) if recipe.valid_size else None
                r = audit.train(ds, cfg, subset=subset, validate=False, stop_split=stop)
                acc.append(r.valid_accuracy)
                epochs.append(r.best_epoch or len(r.log))
            print(f"n={n:4d} {name:12s}: {np.mean(acc):.4f} {np.round(acc, 4).tolist()} epochs (best) {epochs} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
