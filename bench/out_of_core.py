"""Scoring a dataset larger than memory: a manifest of PNG files, decoded once into the
image cache ($AUDIT_IMAGE_CACHE), then `audit score --workers 2` reading its pieces from
the mapped cache. Per size N: the files' and the cache's size on disk, the cache's
build time, the scoring's time per image and the peak resident memory (RSS) of each
Dask worker and of the command itself, sampled every 0.2 s over the process tree.

The images: MNIST's 60,000 training images cycled to N, each moved by a random whole-
pixel shift of up to 2 (so no two files are the same bytes), as 28x28 greyscale PNGs in
folders of 1,000; a manifest `path,label,split` with the last 10,000 as validation
images. The model: `audit train` on 5,000 of the training images (`--subset`), 2 epochs
(the model's accuracy is not what is measured).

    python bench/out_of_core.py [--sizes 100000,1000000] [--samples 20] [--workers 2]
                                [--dir bench-out/out_of_core] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audit.data import load_mnist  # noqa: E402

AUDIT = [sys.executable, "-c", "from audit.cli import main; main()"]


def du(path: Path) -> int:
    """Bytes on disk (allocated blocks) under ``path``."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def generate(root: Path, n: int, seed: int = 0) -> Path:
    mnist = load_mnist()
    x, y = mnist.train.x[:, 0], mnist.train.y
    rng = np.random.default_rng(seed)
    lines = ["path,label,split"]
    t0 = time.perf_counter()
    for k in range(n):
        i = k % len(x)
        dy, dx = rng.integers(-2, 3, 2)
        rel = f"img/{k // 1000:04d}/{k}.png"
        if k % 1000 == 0:
            (root / "img" / f"{k // 1000:04d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(x[i], (dy, dx), axis=(0, 1))).save(root / rel, compress_level=1)
        lines.append(f"{rel},{y[i]},{'valid' if k >= n - 10000 else 'train'}")
        if k % 100000 == 99999:
            print(f"  generated {k + 1:,} images ({time.perf_counter() - t0:.0f} s)", flush=True)
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


class PeakRSS:
    """The peak RSS of a process and of each of its descendants, sampled."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.root, self.every, self.peak, self.names = pid, every, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.root)
                procs = [p, *p.children(recursive=True)]
            except psutil.Error:
                return
            for q in procs:
                try:
                    rss = q.memory_info().rss
                    self.names.setdefault(q.pid, " ".join(q.cmdline())[:200])
                except psutil.Error:
                    continue
                self.peak[q.pid] = max(self.peak.get(q.pid, 0), rss)
            self._stop.wait(self.every)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(args: list[str], env: dict, log: Path) -> tuple[float, dict[int, int], dict[int, str], int]:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        rss = PeakRSS(proc.pid)
        rc = proc.wait()
        peak = rss.stop()
    if rc != 0:
        raise SystemExit(f"error: {' '.join(args[3:])} failed; see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0, peak, rss.names, proc.pid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("bench-out/out_of_core"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files and cache")
    a = ap.parse_args()
    rows = []
    for n in (int(v) for v in a.sizes.split(",")):
        root = a.dir / str(n)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        env = {**os.environ, "AUDIT_IMAGE_CACHE": str(root / "cache"), "OPENBLAS_NUM_THREADS": "1"}
        print(f"{n:,} images: generating", flush=True)
        t0 = time.perf_counter()
        manifest = generate(root, n)
        gen_s = time.perf_counter() - t0
        files_bytes = du(root / "img")
        load = "from audit.data import load_dataset; d = load_dataset({!r}); print(d.fingerprint)".format(str(manifest))
        build_s, build_peak, _, _ = timed([sys.executable, "-c", load], env, root / "build.log")
        hit_s, hit_peak, _, _ = timed([sys.executable, "-c", load], env, root / "hit.log")
        cache_bytes = du(root / "cache")
        (root / "subset.txt").write_text("\n".join(map(str, range(5000))) + "\n")
        run = root / "run"
        train_s, _, _, _ = timed([*AUDIT, "train", "--data", str(manifest), "--run", str(run), "--subset",
                               str(root / "subset.txt"), "--epochs", "3", "--lr", "1e-3"], env, root / "train.log")
        score_s, peak, names, main = timed([*AUDIT, "score", "--run", str(run), "--samples", str(a.samples), "--workers",
                                      str(a.workers), "--no-data-checks"], env, root / "score.log")
        # the command is the process started here; Dask's workers are its descendants that import audit
        # (multiprocessing's resource tracker is one too, a few MB)
        client = peak[main]
        workers = {pid: b for pid, b in peak.items() if pid != main and "resource_tracker" not in names.get(pid, "")}
        scored_line = next((ln for ln in (root / "score.log").read_text().splitlines() if ln.startswith("scored ")), "")
        row = {"n": n, "generate_s": gen_s, "files_gb": files_bytes / 1e9, "build_s": build_s,
               "build_peak_mb": max(build_peak.values()) / 1e6, "hit_s": hit_s,
               "hit_peak_mb": max(hit_peak.values()) / 1e6, "cache_gb": cache_bytes / 1e9, "train_s": train_s,
               "score_s": score_s, "us_per_image": 1e6 * score_s / n, "client_peak_mb": client / 1e6,
               "worker_peak_mb": sorted(b / 1e6 for b in workers.values()), "scored": scored_line}
        rows.append(row)
        print(row, flush=True)
        if not a.keep:
            shutil.rmtree(root / "img", ignore_errors=True)
            shutil.rmtree(root / "cache", ignore_errors=True)
    print()
    print(f"T = {a.samples}, --workers {a.workers}, --no-data-checks; OPENBLAS_NUM_THREADS=1")
    for r in rows:
        print(f"N = {r['n']:,}: PNG files {r['files_gb']:.2f} GB (written in {r['generate_s']:.0f} s); cache "
              f"{r['cache_gb']:.2f} GB, built in {r['build_s']:.0f} s (peak RSS {r['build_peak_mb']:.0f} MB), "
              f"mapped again in {r['hit_s']:.1f} s (peak RSS {r['hit_peak_mb']:.0f} MB)")
        print(f"  audit score: {r['score_s']:.0f} s = {r['us_per_image']:.1f} us per image; peak RSS of the "
              f"command {r['client_peak_mb']:.0f} MB, of each worker "
              f"{', '.join(f'{v:.0f}' for v in r['worker_peak_mb'])} MB")
        print(f"  {r['scored']}")
    if len(rows) > 1:
        a0, a1 = rows[0], rows[-1]
        print(f"time per image, N = {a1['n']:,} / N = {a0['n']:,}: {a1['us_per_image'] / a0['us_per_image']:.3f}; "
              f"largest worker peak RSS {max(a1['worker_peak_mb']):.0f} vs {max(a0['worker_peak_mb']):.0f} MB")


if __name__ == "__main__":
    main()
