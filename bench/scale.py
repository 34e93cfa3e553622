"""Dask's cost and scaling on this machine: the same `audit` commands in-process, on
`--workers 1` and on `--workers 2`, each timed as a whole command (start to end, the
cluster's start included), ratios measured in one run.

- overhead: `audit score` of MNIST (70,000 x T) in-process against `--workers 1`, both
  pinned to one core (one thread, one worker process);
- scaling, `--workers 2` against `--workers 1` (each worker single-threaded):
  `audit score` of MNIST; `audit score --folds 4` of a run trained on `--n-folds-data`
  MNIST training images; `audit acquire` with 2 strategies x 2 repeats.

Also checks that every `--workers` run wrote the in-process bytes.

    python bench/scale.py [--samples 50] [--n-folds-data 20000] [--fold-epochs 10]
                          [--acquire-rounds 5] [--only overhead,score,folds,acquire]
                          [--overhead-repeats 3] [--acquire-repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import audit

AUDIT = [sys.executable, "-c", "from audit.cli import main; main()"]


def run(args: list[str], *, cores: set[int] | None = None) -> float:
    """Wall seconds of one `audit` command (in a fresh process, optionally pinned)."""
    t0 = time.perf_counter()
    r = subprocess.run([*AUDIT, *args], capture_output=True, text=True,
                       preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: audit {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return seconds


def same(a: Path, b: Path, names) -> str:
    bad = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    return "byte-identical" if not bad else f"DIFFERENT: {', '.join(bad)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--n-folds-data", type=int, default=20000)
    p.add_argument("--fold-epochs", type=int, default=10)
    p.add_argument("--acquire-rounds", type=int, default=5)
    p.add_argument("--only", default="overhead,score,folds,acquire")
    p.add_argument("--overhead-repeats", type=int, default=3, help="alternated in-process / --workers 1 pairs")
    p.add_argument("--acquire-repeats", type=int, default=2, help="alternated --workers 1 / --workers 2 pairs")
    a = p.parse_args()
    only = set(a.only.split(","))
    ds = audit.load_dataset("mnist", download=False)  # fails in one line without MNIST
    tmp = Path(tempfile.mkdtemp(prefix="audit-scale-"))
    print(f"{os.cpu_count()} cores; temporary runs in {tmp}", flush=True)
    t_start = time.perf_counter()
    try:
        if only & {"overhead", "score"}:
            base = tmp / "base"
            run(["train", "--run", str(base), "--epochs", "1"])
            files = ("scores.csv", "mc_summary.npz")

            def score(name, *extra, cores=None):
                r = tmp / name
                shutil.copytree(base, r)
                return run(["score", "--run", str(r), "--samples", str(a.samples), *extra], cores=cores), r

        if "overhead" in only:
            ratios = []
            for rep in range(a.overhead_repeats):  # alternated, so a slow spell of a shared machine hits both
                t_in, r_in = score(f"in1-{rep}", cores={0})
                t_w1, r_w1 = score(f"w1c-{rep}", "--workers", "1", cores={0})
                ratios.append(t_w1 / t_in)
                print(f"overhead: score 70,000 x {a.samples} on one core: in-process {t_in:.1f} s, --workers 1 "
                      f"{t_w1:.1f} s: Dask costs {t_w1 / t_in - 1:+.1%} ({same(r_in, r_w1, files)})", flush=True)
            print(f"overhead: median of {len(ratios)} pairs {np.median(ratios) - 1:+.1%}", flush=True)
        if "score" in only:
            t1, r1 = score("w1", "--workers", "1")
            t2, r2 = score("w2", "--workers", "2")
            t0, r0 = score("in")
            print(f"scaling: score 70,000 x {a.samples}: --workers 1 {t1:.1f} s, --workers 2 {t2:.1f} s: "
                  f"{t1 / t2:.2f}x (in-process on both cores {t0:.1f} s; {same(r0, r2, files)})", flush=True)
        if "folds" in only:
            n = a.n_folds_data
            npz = tmp / f"mnist{n}.npz"
            np.savez(npz, x_train=ds.train.x[:n], y_train=ds.train.y[:n].astype(np.int64), x_valid=ds.valid.x,
                     y_valid=ds.valid.y.astype(np.int64), class_names=np.array(ds.class_names))
            fbase = tmp / "fbase"
            run(["train", "--data", str(npz), "--run", str(fbase), "--epochs", str(a.fold_epochs)])
            times, runs_ = {}, {}
            for w in ("1", "2"):
                r = tmp / f"folds{w}"
                shutil.copytree(fbase, r)
                times[w] = run(["score", "--run", str(r), "--folds", "4", "--samples", str(a.samples),
                                "--workers", w])
                runs_[w] = r
            names = ("scores.csv", "mc_summary.npz", *(f"folds/4-{k}/model.npz" for k in range(4)))
            print(f"scaling: score --folds 4 on {n:,} images ({a.fold_epochs} epochs): --workers 1 {times['1']:.1f} s, "
                  f"--workers 2 {times['2']:.1f} s: {times['1'] / times['2']:.2f}x "
                  f"({same(runs_['1'], runs_['2'], names)})", flush=True)
        if "acquire" in only:
            import pandas as pd

            ratios = []
            for rep in range(a.acquire_repeats):  # alternated pairs, as for the overhead
                times, runs_, busy = {}, {}, {}
                for w in ("1", "2"):
                    r = tmp / f"al{w}-{rep}"
                    times[w] = run(["acquire", "--run", str(r), "--strategy", "bald,random", "--repeats", "2",
                                    "--rounds", str(a.acquire_rounds), "--workers", w])
                    runs_[w] = r
                    # the pieces' own seconds (each round's, summed): what the workers computed
                    busy[w] = pd.read_csv(r / "al_curve.csv").seconds.sum()
                ratios.append(times["1"] / times["2"])
                print(f"scaling: acquire 2 strategies x 2 repeats x {a.acquire_rounds} rounds: --workers 1 "
                      f"{times['1']:.1f} s, --workers 2 {times['2']:.1f} s: {ratios[-1]:.2f}x "
                      f"({same(runs_['1'], runs_['2'], ('acquired.csv',))}); the curves' own seconds summed "
                      f"{busy['1']:.1f} and {busy['2']:.1f}", flush=True)
            print(f"scaling: acquire, median of {len(ratios)} pairs {np.median(ratios):.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wall {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
