"""What the scores' standard errors cost: MC scoring with and without the jackknife.

    python bench/se_cost.py [--n 5000] [--samples 50] [--rounds 3]

Scores ``--n`` MNIST validation images (or random ones without MNIST) with the origin
CNN at T = ``--samples``, alternating a normal run and one whose jackknife is replaced
by a no-op, ``--rounds`` times each; prints the best of each and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import audit
from audit import metrics
from audit.mc import mc_predict

sys.path.insert(0, str(Path(__file__).parent))
from _common import mnist_or_synthetic, threads  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    ds, what = mnist_or_synthetic(1000, a.n)
    model = audit.build_model(10, (1, 28, 28))
    x = ds.valid.x[:a.n]
    real = metrics.jackknife_se

    def none(mc):
        nan = np.full(mc.shape[0], np.nan, mc.dtype)
        return {k: nan for k in metrics.SE_NAMES}

    best = {"with": np.inf, "without": np.inf}
    for _ in range(a.rounds):
        for arm in ("with", "without"):
            metrics.jackknife_se = real if arm == "with" else none
            t0 = time.perf_counter()
            mc_predict(model, x, samples=a.samples, seed=0)
            best[arm] = min(best[arm], time.perf_counter() - t0)
    metrics.jackknife_se = real
    print(f"{what}: {a.n:,} images x {a.samples} passes, origin CNN, {threads()}")
    print(f"  with standard errors    {best['with']:.2f} s ({a.n / best['with']:,.0f} images/s)")
    print(f"  without                 {best['without']:.2f} s ({a.n / best['without']:,.0f} images/s)")
    print(f"  with / without: {best['with'] / best['without']:.3f}")


if __name__ == "__main__":
    main()
