"""Near-duplicate candidates past 100,000 images: the indexed search against the exact one.

The descriptors are MNIST's (all 70,000 images, `audit.datachecks.Images`); larger sets
are made from them: each further row is a random MNIST descriptor mixed with another
random one (so it is no near copy of anything: cosine to its source about 0.9), unit
length, and ``--planted`` rows are near copies (cosine >= 0.99) of random rows, the
pairs the search must find. For each size it prints the seconds of the indexed search
and, up to ``--exact-up-to`` rows, of the exact one, the share of the exact search's
pairs the index found (recall) and the share of the planted pairs it found.

    python bench/near_index.py [--sizes 70000,200000,1000000] [--exact-up-to 200000] [--planted 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import audit
from audit import datachecks as dc


def grown(d: np.ndarray, n: int, planted: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit rows: ``d``, mixtures of two of its rows, and ``planted`` near copies;
    returns them and the planted pairs (P, 2)."""
    rng = np.random.default_rng(seed)
    extra = max(0, n - len(d) - planted)
    a, b = rng.integers(0, len(d), (2, extra))
    mix = d[a] + 0.5 * d[b]
    rows = np.concatenate([d, mix / np.linalg.norm(mix, axis=1, keepdims=True)])[: n - planted]
    src = rng.choice(len(rows), planted, replace=False)
    copies = rows[src] + rng.normal(scale=0.012, size=(planted, rows.shape[1])).astype(np.float32)
    out = np.concatenate([rows, copies / np.linalg.norm(copies, axis=1, keepdims=True)]).astype(np.float32)
    pairs = np.stack([src, np.arange(len(rows), len(out))], axis=1)
    return out, pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="70000,200000,1000000")
    p.add_argument("--exact-up-to", type=int, default=200000, help="run the exact search up to this many rows")
    p.add_argument("--planted", type=int, default=1000)
    a = p.parse_args()
    ds = audit.load_dataset("mnist", download=False)
    t0 = time.perf_counter()
    d = dc.Images({"train": (ds.train.x, None), "valid": (ds.valid.x, None)}).descriptors
    print(f"MNIST descriptors: {d.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    for n in (int(v) for v in a.sizes.split(",")):
        rows, planted = grown(d, n, a.planted)
        t0 = time.perf_counter()
        idx = dc.indexed_pairs(rows, at_least=dc.CANDIDATE_COSINE)
        t_idx = time.perf_counter() - t0
        found = set(map(tuple, idx.tolist()))
        hit = np.mean([(min(i, j), max(i, j)) in found for i, j in planted.tolist()])
        line = f"n={n:>9,d}: indexed {t_idx:7.1f} s, {len(found):,} pairs, planted found {hit:.4f}"
        if n <= a.exact_up_to:
            t0 = time.perf_counter()
            exact = set(map(tuple, dc.similar_pairs(rows, at_least=dc.CANDIDATE_COSINE).tolist()))
            t_ex = time.perf_counter() - t0
            line += (f" | exact {t_ex:7.1f} s, {len(exact):,} pairs; recall of the exact pairs "
                     f"{len(found & exact) / max(len(exact), 1):.4f}; exact/indexed time {t_ex / t_idx:.1f}x")
        print(line, flush=True)


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
