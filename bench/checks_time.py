"""The command's own part after the scoring, step by step, on all of MNIST's 70,000
images: the trunk's features, the exact near-duplicate search, the outlier distances
(pixels and features), the features' PCA, the orientation probe (the trunk on a
sample's turned copies, then the probes' fits) and the class shapes (their fits and
every image's residual; then 100 images turned back), where the checkout has them. Each step runs in fixed blocks on
single-threaded BLAS, one thread per core (`audit.device.in_blocks`); ``--threads 1``
puts it on one thread. Best of ``--repeats``, seconds per step.

To compare two checkouts (before and after a change), run the script from each,
alternating, on the same machine:

    PYTHONPATH=/path/to/checkout python bench/checks_time.py [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import audit
from audit import datachecks as dc
from audit.data import load_dataset
from audit.model import build_model
from audit.train import trunk_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="threads of in_blocks (0: one per core)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if args.threads:
        from audit import device

        if hasattr(device, "in_blocks"):
            device.cpu_workers = lambda: args.threads
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads, user_api="blas")  # a checkout from before in_blocks
    ds = load_dataset("mnist", data_dir=args.data_dir)
    x = np.concatenate([ds.train.x, ds.valid.x])
    y = np.concatenate([ds.train.y, ds.valid.y])
    # the time hardly depends on the weights (the probes' fits may take more or fewer
    # iterations on a trained network's features)
    model = build_model(ds.n_classes, ds.image_shape, seed=0)
    images = dc.Images({"all": (x, None)})
    d = images.descriptors
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        f = trunk_features(model, x)
        steps = {"features": time.perf_counter() - t0}
        t0 = time.perf_counter()
        dc.similar_pairs(d, at_least=0.98)
        steps["near-duplicates (exact)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dc.knn_mean_distance(d, dc.OUTLIER_NEIGHBOURS)
        steps["outliers: pixels"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = dc.reduce_features(f)
        steps["PCA of the features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dc.knn_mean_distance(r, dc.OUTLIER_NEIGHBOURS)
        steps["outliers: features"] = time.perf_counter() - t0
        if hasattr(dc, "turned_probability"):
            t0 = time.perf_counter()
            sample = dc.turn_sample(y)
            taught = {k: trunk_features(model, dc.turned(x[sample], k)) for k in dc.quarter_turns(x.shape)}
            steps["turned: sample's features"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            dc.turned_probability(f, y, sample, taught)
            steps["turned: probes"] = time.perf_counter() - t0
        if hasattr(dc, "ClassShapes"):
            t0 = time.perf_counter()
            shapes = dc.ClassShapes(x, y)
            shapes.residual()
            steps["class shapes: residuals"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            shapes.turned_gain(np.arange(0, len(y), 700))  # 100 images, as many as the probe lists on MNIST
            steps["class shapes: 100 turned back"] = time.perf_counter() - t0
        best = {k: min(v, best.get(k, np.inf)) for k, v in steps.items()}
    print(f"audit {audit.__version__} from {audit.__file__}; {len(x):,} images, best of {args.repeats}")
    for k, v in best.items():
        print(f"  {k:<26} {v:6.2f} s")
    print(f"  {'total':<26} {sum(best.values()):6.2f} s")


if __name__ == "__main__":
    main()
