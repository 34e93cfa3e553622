"""`--samples auto` against a fixed T = 50: passes spent, and how well the top 100 match.

On a trained run's model and N of its *training* images (never MNIST's test images:
the default tolerance is chosen here), the reference ranking is a fixed run at
--reference passes (seed 100). For the fixed T = 50 and for `--samples auto` at each
--auto tolerance:cap, over --seeds mask seeds: the mean passes an image got, the
share of the reference's top 100 (by entropy and by mutual information) found in the
run's top 100, and the time, all in one process one after another.

    python bench/samples_auto.py --run runs/mnist --n 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audit import runs  # noqa: E402
from audit.mc import AutoSamples, mc_predict  # noqa: E402

TOP = 100


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return len(set(np.argsort(-a, kind="stable")[:TOP]) & set(np.argsort(-b, kind="stable")[:TOP])) / TOP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--reference", type=int, default=1000)
    ap.add_argument("--auto", default="0.05:100,0.02:100,0.02:200,0.01:200",
                    help="tolerance:cap pairs of --samples auto to run")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    store = runs.RunStore(args.run)
    model = store.load_model()
    x = store.dataset().train.x[:args.n]
    t0 = time.perf_counter()
    ref = mc_predict(model, x, samples=args.reference, seed=100)
    print(f"reference: {len(x):,} training images x {args.reference} passes in {time.perf_counter() - t0:.1f} s")
    rows = []
    settings = [("fixed T=50", None, 50)] + [(f"auto {t}, at most {c}", float(t), int(c))
                                             for t, c in (pair.split(":") for pair in args.auto.split(","))]
    for name, tol, cap in settings:
        stats = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            if tol is None:
                r = mc_predict(model, x, samples=50, seed=seed)
                passes = 50.0
            else:
                r = mc_predict(model, x, seed=seed, auto=AutoSamples(tolerance=tol, cap=cap))
                passes = float(r.passes.mean())
            stats.append((passes, overlap(r.entropy, ref.entropy), overlap(r.mutual_info, ref.mutual_info),
                          time.perf_counter() - t0))
        p, oe, om, sec = np.mean(stats, axis=0)
        rows.append((name, p, oe, om, sec))
    base = rows[0]
    print(f"\n| setting | mean passes | passes / fixed | top-{TOP} overlap, entropy | mutual info | seconds | time / fixed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, p, oe, om, sec in rows:
        print(f"| {name} | {p:.1f} | {p / base[1]:.2f} | {oe:.3f} | {om:.3f} | {sec:.1f} | {sec / base[4]:.2f} |")
    print(f"\n(mean of {args.seeds} mask seeds; auto: the first 10 passes, then 10 at a time)")


if __name__ == "__main__":
    main()
