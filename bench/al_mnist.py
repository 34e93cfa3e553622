"""Gal et al. 2017's MNIST active-learning protocol, at a size this machine allows.

20 class-balanced initial images, 10 acquired per round, retrained from scratch each
round, tested on the 10,000 validation images; trained as the paper's code trained
(50 epochs in batches of 128 and the remainder, Adam at a constant 1e-3, weight decay
3.5/N), where ``audit acquire`` by default trains harder (``--batch-size 32 --lr 5e-3
--schedule cosine --even-batches``: README says what that changes). Prints, per strategy, the number of
acquired images at which validation error first reaches 10% and 5% (per repeat and
their mean), next to the paper's Table 1, and the time per round.

    python bench/al_mnist.py [--rounds 98] [--repeats 3] [--pool-subset 2000]
                             [--strategies bald,entropy,varratio,meanstd,random,batchbald]
                             [--stop-at-error 0.05] [--model gal] [--epochs 50] [--batch-size 128]
                             [--lr 1e-3] [--schedule constant] [--even-batches]
                             [--samples 100] [--seed 0] [--first-repeat 0]
                             [--run runs/al-bench] [--resume]
    python bench/al_mnist.py --time-rounds 20,500,1000     # one round's parts at those sizes
    python bench/al_mnist.py --summarize runs/a,runs/b     # one table from several runs' curves

A repeat's initial images and seeds follow from --seed and its number alone, so
``--first-repeat 3 --repeats 2`` adds repeats 4 and 5 to an earlier three-repeat run
and ``--summarize`` pools them (it refuses runs whose settings differ); ``--resume``
takes a run further in its own folder (``--stop-at-error 0.05`` after a 0.10 run goes
on from each curve's last round).

The full protocol (98 rounds, several repeats, six strategies) takes many hours on a
2-core CPU; ``--stop-at-error 0.05`` ends each curve once it reaches 5% error, which is
all Table 1 needs; a curve that never does runs to ``--rounds`` and is reported as
"not within" that many acquisitions. Say which size you ran. Each finished round is
a line on stderr (and al_curve.csv in the run folder is rewritten after each round).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import audit  # noqa: F401
from audit.config import TrainConfig
from audit.active import AL_TRAIN, ALConfig, _acquire_step, acquire_run, initial_set, pool_runs
from audit.curves import last_accuracy, reach_table, versus
from audit.data import load_dataset
from audit.device import get_device
from audit.train import train

sys.path.insert(0, str(Path(__file__).parent))
from _common import Lines  # noqa: E402

PAPER = {"bald": (145, 335), "varratio": (120, 295), "entropy": (165, 355), "random": (255, 835)}


def time_rounds(cfg: ALConfig, sizes: list[int]) -> None:
    """Train, evaluate and score-and-acquire once at each labelled-set size (BALD)."""
    ds = load_dataset("mnist", download=False)
    dev = get_device("cpu")
    print(f"one round at n labelled (model {cfg.train.model}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
          f"lr {cfg.train.lr:g} {cfg.train.schedule}, "
          f"T={cfg.samples}, pool subset {cfg.pool_subset}, evaluation on {len(ds.valid)}):")
    for n in sizes:
        labelled = initial_set(ds.train.y, n, ds.n_classes, np.random.default_rng(n))
        t0 = time.perf_counter()
        result = train(ds, cfg.train_config(n, 0), subset=labelled, validate=False)  # evaluates once, at the end
        t_fit = time.perf_counter() - t0
        t1 = time.perf_counter()
        _acquire_step(result.model, ds, labelled, "bald", cfg, 0, 0, dev)
        t_acq = time.perf_counter() - t1
        train_only = sum(r.seconds for r in result.log)
        print(f"  {n:5d}: {t_fit + t_acq:6.1f} s = train+evaluate {t_fit:6.1f} s "
              f"(last epoch with evaluation {result.log[-1].seconds:.1f} s, all epochs {train_only:.1f} s) "
              f"+ score {cfg.pool_subset} x {cfg.samples} and acquire {t_acq:.1f} s; "
              f"accuracy {result.valid_accuracy:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="bald,entropy,varratio,meanstd,random,batchbald")
    p.add_argument("--rounds", type=int, default=98)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pool-subset", type=int, default=2000)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--model", default="gal")
    p.add_argument("--epochs", type=int, default=50)
    # the paper's code trained so; audit acquire's defaults (32, 5e-3, cosine) train better on small sets
    p.add_argument("--batch-size", type=int, default=128, help=f"audit acquire's default: {AL_TRAIN.batch_size}")
    p.add_argument("--lr", type=float, default=1e-3, help=f"audit acquire's default: {AL_TRAIN.lr:g}")
    p.add_argument("--schedule", default="constant", help=f"audit acquire's default: {AL_TRAIN.schedule}")
    p.add_argument("--even-batches", action="store_true", help="near-equal batches per epoch (audit acquire's "
                   "default); without it full batches and the remainder, as Keras's fit in the paper's code")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-repeat", type=int, default=0, help="start at this repeat, counted from 0: 3 runs the 4th onwards")
    p.add_argument("--stop-at-error", type=float, default=None)
    p.add_argument("--run", default="runs/al-bench")
    p.add_argument("--resume", action="store_true", help="go on with the run in --run (more rounds, repeats, "
                   "strategies, a lower --stop-at-error); without it --run is replaced")
    p.add_argument("--time-rounds", default=None, help="comma-separated labelled-set sizes: time one round at each")
    p.add_argument("--summarize", default=None, help="comma-separated run folders: pool their curves into one table")
    a = p.parse_args()
    if a.summarize:
        summarize(a.summarize.split(","))
        return
    train = TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, schedule=a.schedule,
                        even_batches=a.even_batches)
    cfg = ALConfig(strategies=tuple(a.strategies.split(",")), rounds=a.rounds, repeats=a.repeats,
                   pool_subset=a.pool_subset, samples=a.samples, seed=a.seed, train=train,
                   first_repeat=a.first_repeat, stop_error=a.stop_at_error)
    if a.time_rounds:
        time_rounds(cfg, [int(n) for n in a.time_rounds.split(",")])
        return
    if not a.resume:
        shutil.rmtree(a.run, ignore_errors=True)
    t0 = time.perf_counter()
    res = acquire_run(Path(a.run), config=cfg, resume=a.resume, progress=Lines())
    wall = time.perf_counter() - t0
    print(f"\nup to {cfg.rounds} rounds x {len(cfg.strategies)} strategies x {cfg.repeats} repeats "
          f"(from repeat {cfg.first_repeat + 1}), {settings(cfg.to_json())}, stop at error {cfg.stop_error}; "
          f"wall {wall:.0f} s")
    print_table(res.curve, cfg.initial)


def settings(c: dict) -> str:
    return (f"model {c['model']}, {c['epochs']} epochs, batch {c['batch_size']}"
            f"{' (even)' if c.get('even_batches') else ''}, lr {c['lr']:g} {c['schedule']}, "
            f"T={c['samples']}, pool subset {c['pool_subset']}, seed {c['seed']}")


def print_table(curve: pd.DataFrame, initial: int) -> None:
    reach = reach_table(curve, initial)
    print(f"acquired images (beyond the {initial} initial) at which validation error first reaches 10% / 5%:")
    print(f"{'strategy':10s} {'10% err':>8s} {'5% err':>8s} {'paper':>10s}  {'per repeat (10%; 5%)':24s} "
          f"{'last acc':>8s} {'rounds':>6s} {'s/round':>7s}")
    final = last_accuracy(curve)
    for s in curve.strategy.unique():
        r, g, last = reach[s], curve[curve.strategy == s], final[s]
        # a repeat that never reached a level went this far (curves may stop at different points)
        went = (g.groupby("repeat").n_labelled.max() - initial).tolist()

        def fmt(key):
            if r[key] is not None:
                return f"{r[key]:g}"
            # not reached by every repeat: "> N" when each that missed it went the full N
            short = [m for v, m in zip(r[f"{key} per repeat"], went) if v is None]
            return f">{r['acquired_max']}" if min(short) == r["acquired_max"] else "-"

        def per(key):
            return "[" + ", ".join(str(v) if v is not None else f">{m}" for v, m in zip(r[key], went)) + "]"

        paper = "/".join(map(str, PAPER[s])) if s in PAPER else "-"
        print(f"{s:10s} {fmt('10%'):>8s} {fmt('5%'):>8s} {paper:>10s}  {per('10% per repeat')}; "
              f"{per('5% per repeat')} {last:8.4f} {len(g):6d} {g.seconds.mean():7.1f}")
    vs = versus(curve, initial)
    if vs:
        print("against random, repeat by repeat from the same initial images (ahead/tied/behind, open: not settled):")
        for s, row in vs.items():
            print(f"  {s:10s} " + "; ".join(
                f"{level}: " + "/".join(str(c[k]) for k in ("ahead", "tied", "behind"))
                + (f", {c['open']} open" if c["open"] else "") for level, c in row.items()))
    print("repeats: " + "; ".join(f"{s} {sorted(int(k) + 1 for k in g.repeat.unique())}"
                                   for s, g in curve.groupby("strategy", sort=False)))
    per_n = curve.groupby("n_labelled")["seconds"].mean()
    print("mean seconds per round at n labelled: " + ", ".join(
        f"{n}: {v:.1f}" for n, v in per_n.items() if n in (20, 100, 200, 300, 500, 1000) or n == per_n.index.max()))




def summarize(run_dirs: list[str]) -> None:
    """One table from the curves of several runs (e.g. repeats split with --first-repeat)."""
    pooled = pool_runs(run_dirs)
    print(f"pooled from {', '.join(run_dirs)}: {settings(pooled.config)}")
    print_table(pooled.curve, pooled.config["initial"])


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
