"""Full batches and the remainder, or near-equal batches: validation accuracy on MNIST.

Trains the Gal et al. CNN on random class-balanced MNIST subsets of a few sizes, with
the paper's recipe (batches of 128, Adam at a constant 1e-3) and with ``audit
acquire``'s (batches of 32, a cosine from 3e-3, its default then), each subset and seed twice: once with
each epoch in full batches and the remainder (``even_batches=False``: 130 images at 128
train as 128 + 2), once in near-equal batches (65 + 65). Same subset, seed and number
of steps in both; only the batching differs. Prints the mean validation accuracy and
each seed's, one line per recipe and size.

    python bench/batching.py [--recipes paper,acquire] [--sizes 120,130,260] [--seeds 4]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import dataclasses
import time

import numpy as np

import audit
from audit.active import AL_TRAIN, PAPER_TRAIN, ALConfig, initial_set

RECIPES = {
    "paper": ALConfig(train=replace(PAPER_TRAIN, even_batches=True)),
    "acquire": ALConfig(train=replace(AL_TRAIN, lr=3e-3)),  # audit acquire's recipe when this table was measured
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="paper,acquire", help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--sizes", default="100,120,130,260", help="labelled-set sizes")
    p.add_argument("--seeds", type=int, default=4)
    a = p.parse_args()
    bad = [r for r in a.recipes.split(",") if r not in RECIPES]
    if bad:
        raise SystemExit(f"error: --recipes: expected some of {', '.join(RECIPES)}, got {','.join(bad)!r}")
    t0 = time.perf_counter()
    ds = audit.load_dataset("mnist", download=False)
    for name in a.recipes.split(","):
        for n in (int(v) for v in a.sizes.split(",")):
            acc = {False: [], True: []}
            for seed in range(a.seeds):
                subset = initial_set(ds.train.y, n, ds.n_classes, np.random.default_rng(1000 + seed))
                for even in (False, True):
                    cfg = dataclasses.replace(RECIPES[name].train_config(n, seed), even_batches=even)
                    acc[even].append(audit.train(ds, cfg, subset=subset, validate=False).valid_accuracy)
            b = RECIPES[name].train.batch_size
            split = f"{n // b} x {b} + {n % b}" if n > b and n % b else f"{-(-n // b)} batch(es), no remainder"
            print(f"{name:8s} n={n:4d} ({split}): remainder {np.mean(acc[False]):.4f} "
                  f"{np.round(acc[False], 3).tolist()} | even {np.mean(acc[True]):.4f} "
                  f"{np.round(acc[True], 3).tolist()}", flush=True)
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
