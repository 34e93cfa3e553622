"""Gal et al. 2017's MNIST active-learning protocol, at a size this machine allows.

20 class-balanced initial images, 10 acquired per round, retrained from scratch each
round, tested on the 10,000 validation images. Prints, per strategy, the number of
acquired images at which the mean validation error first reaches 10% and 5%, next to
the paper's Table 1, and the time per round at the labelled-set sizes reached.

    python bench/al_mnist.py [--rounds 98] [--repeats 3] [--pool-subset 2000]
                             [--strategies bald,entropy,varratio,meanstd,random,batchbald]
                             [--model gal] [--epochs 50] [--samples 20] [--run runs/al-bench]

The full protocol (98 rounds, several repeats, six strategies) takes many hours on a
2-core CPU; say which size you ran.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import audit  # noqa: F401
from audit.active import ALConfig, acquire_run, reach_table

PAPER = {"bald": (145, 335), "varratio": (120, 295), "entropy": (165, 355), "random": (255, 835)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="bald,entropy,varratio,meanstd,random,batchbald")
    p.add_argument("--rounds", type=int, default=98)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pool-subset", type=int, default=2000)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--model", default="gal")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default="runs/al-bench")
    a = p.parse_args()
    cfg = ALConfig(strategies=tuple(a.strategies.split(",")), rounds=a.rounds, repeats=a.repeats,
                   pool_subset=a.pool_subset, samples=a.samples, model=a.model, epochs=a.epochs, seed=a.seed)
    shutil.rmtree(a.run, ignore_errors=True)
    t0 = time.perf_counter()
    res = acquire_run(Path(a.run), config=cfg)
    wall = time.perf_counter() - t0
    reach = reach_table(res.curve, cfg.initial)
    print(f"\n{cfg.rounds} rounds x {len(cfg.strategies)} strategies x {cfg.repeats} repeats, model {cfg.model}, "
          f"T={cfg.samples}, pool subset {cfg.pool_subset}; wall {wall:.0f} s")
    print(f"{'strategy':10s} {'10% err':>8s} {'5% err':>8s} {'paper':>12s} {'final acc':>10s}")
    last = res.curve[res.curve["round"] == cfg.rounds].groupby("strategy")["valid_accuracy"].mean()
    for s in cfg.strategies:
        r = reach[s]
        paper = "/".join(map(str, PAPER[s])) if s in PAPER else "-"
        print(f"{s:10s} {str(r['10%']):>8s} {str(r['5%']):>8s} {paper:>12s} {last[s]:10.4f}")
    per = res.curve.groupby("n_labelled")["seconds"].mean()
    print("seconds per round at n labelled: " + ", ".join(f"{n}: {v:.1f}" for n, v in per.items()
                                                           if n in (20, 100, 200, 500, 1000) or n == per.index.max()))


if __name__ == "__main__":
    main()
