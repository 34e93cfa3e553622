"""Shared helpers for the benchmarks: data, a trained model, timing."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import audit
from audit.data import Dataset, Split, fingerprint
from audit.progress import NullProgress


def mnist_or_synthetic(n_train: int, n_valid: int) -> tuple[Dataset, str]:
    """MNIST when $AUDIT_DATA_DIR (or the cache) has it, else random images of its shape."""
    try:
        ds = audit.load_dataset("mnist", download=False)
        what = "MNIST"
    except audit.AuditError:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (max(n_train, 1), 1, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, max(n_train, 1)).astype(np.int32)
        ds = Dataset(Split(x, y), Split(x[:n_valid], y[:n_valid]), tuple("0123456789"), "synthetic")
        what = "synthetic (MNIST not found: set AUDIT_DATA_DIR)"
    train = Split(ds.train.x[:n_train], ds.train.y[:n_train])
    valid = Split(ds.valid.x[:n_valid], ds.valid.y[:n_valid])
    names = ds.class_names
    return Dataset(train, valid, names, ds.source, fingerprint(train, valid, names)), what


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info())
    except ImportError:
        return f"{os.cpu_count()} cpus"


class Lines(NullProgress):
    """Progress as one line per finished step on stderr (a log file shows how far a long run got)."""

    def close(self, summary: str | None = None) -> None:
        if summary:
            print(summary, file=sys.stderr, flush=True)


def stop_split(ds: Dataset, exclude: np.ndarray, size: int, seed: int) -> Split:
    """``size`` training images outside ``exclude``, drawn with ``seed``: an early-stopping
    split of labelled images the model does not train on (the batchbald recipe's)."""
    rest = np.setdiff1d(np.arange(len(ds.train)), exclude)
    held = np.random.default_rng(seed).choice(rest, size, replace=False)
    return Split(ds.train.x[held], ds.train.y[held])
