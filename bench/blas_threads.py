"""Training with single-threaded BLAS (what audit does) against OpenBLAS's default
thread count, the same code otherwise: one epoch over 12,000 MNIST images, alternating,
best of 3, for the origin CNN (batch 1,000) and Gal's (batch 128). Prints the times and
the default's speed over the single-threaded one.

    python bench/blas_threads.py
"""

from __future__ import annotations

import contextlib
import sys
import time

import audit
from audit.data import Dataset, Split
from audit.train import TrainConfig, train

T = sys.modules["audit.train"]  # the module (audit.train is the function)


def main() -> None:
    ds = audit.load_dataset("mnist", download=False)
    d = Dataset(Split(ds.train.x[:12000], ds.train.y[:12000]), Split(ds.valid.x[:500], ds.valid.y[:500]),
                ds.class_names, "mnist[:12000]")
    real = T.threadpool_limits
    try:
        for model, bs in (("origin", 1000), ("gal", 128)):
            res = {"blas1": [], "default": []}
            for _ in range(3):
                for mode in res:
                    T.threadpool_limits = real if mode == "blas1" else (lambda **k: contextlib.nullcontext())
                    t = time.perf_counter()
                    train(d, TrainConfig(epochs=1, batch_size=bs, model=model), validate=False)
                    res[mode].append(time.perf_counter() - t)
            b1, df = min(res["blas1"]), min(res["default"])
            print(f"{model} batch {bs}: single-threaded BLAS {b1:.2f} s, default {df:.2f} s: the default is "
                  f"{b1 / df:.3f}x as fast", flush=True)
    finally:
        T.threadpool_limits = real


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
