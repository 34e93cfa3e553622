"""``--device``: ``cpu``, ``gpu`` (the first CUDA GPU) or a chainer spec like ``@cupy:1``."""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

import numpy as np

from . import _compat  # noqa: F401
import chainer

from .errors import AuditError, bad_param

T = TypeVar("T")


def cpu_workers() -> int:
    """CPU cores this process may use; inside a Dask worker, at most the worker's threads
    (a single-threaded worker scores with one thread, as the other workers beside it do)."""
    try:
        n = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        n = max(1, os.cpu_count() or 1)
    threads = _dask_worker_threads()
    return min(n, threads) if threads else n


IN_FLIGHT = 1 << 30  # bytes :func:`in_blocks`'s threads may hold at once


def in_blocks(fn: Callable[[int, int], T], n: int, step: int, *, workers: int | None = None,
              block_bytes: int = 0, done: Callable[[int], None] | None = None) -> list[T]:
    """``fn(a, b)`` for the blocks [a, b) of ``range(n)``, ``step`` rows each, in order of
    ``a``, on ``workers`` threads (default :func:`cpu_workers`) with single-threaded BLAS
    and OpenMP: each block's sums are the same whatever the number of threads or cores,
    so what is computed from them is too (a multi-threaded BLAS product's roundings
    depend on how it splits the work). NumPy releases the GIL in products and large
    element-wise steps, so the threads run in parallel. ``block_bytes``: the memory one
    block takes while it runs; there are at most as many threads as IN_FLIGHT holds
    (memory does not grow with the cores). ``done(b - a)`` is called in this thread as
    each block's result is taken (for progress)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    bounds = [(a, min(a + step, n)) for a in range(0, n, max(1, step))]
    workers = min(workers or cpu_workers(), len(bounds), max(1, IN_FLIGHT // block_bytes) if block_bytes else n)
    out: list[T] = []
    with threadpool_limits(limits=1):
        if workers <= 1:
            results = (fn(a, b) for a, b in bounds)
            pool = None
        else:
            pool = ThreadPoolExecutor(workers)
            results = pool.map(lambda ab: fn(*ab), bounds)
        try:
            for (a, b), r in zip(bounds, results):
                out.append(r)
                if done is not None:
                    done(b - a)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return out


def _dask_worker_threads() -> int | None:
    """The threads of the Dask worker running this code, or None outside one."""
    dist = sys.modules.get("distributed")  # never imported for this: outside a worker it is not needed
    if dist is None:
        return None
    try:
        worker = dist.get_worker()
    except (ValueError, AttributeError):
        return None
    state = getattr(worker, "state", worker)
    return int(getattr(state, "nthreads", 0)) or None


_KEPT = False


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to
    the system, once per process: each training step frees and allocates the same few
    arrays of megabytes, and glibc would otherwise map each afresh (page faults on
    every touch). Peak memory is unchanged; memory freed after the peak stays with the
    process until it ends. A no-op where the C library is not glibc."""
    global _KEPT
    if _KEPT:
        return
    _KEPT = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB from the heap, reused when freed
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def gpu_count() -> int:
    """How many CUDA GPUs CuPy can use here; 0 when CuPy, CUDA or a driver is missing."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError without a driver, ...
        return 0


# --device words for the CPU, and for "the first GPU" (on a Dask worker: the GPU it is pinned to)
CPU_SPECS = ("cpu", "@numpy", "numpy")
GPU_SPECS = ("gpu", "cuda", "@cupy")


def get_device(spec: str = "cpu") -> chainer.backend.Device:
    """A chainer device for ``spec``; a clear error when it is not usable here."""
    s = str(spec).strip().lower()
    if s in CPU_SPECS:
        return chainer.get_device("@numpy")
    if s in GPU_SPECS:
        s = "@cupy:0"
    if s.isdigit():
        s = f"@cupy:{s}"
    if not s.startswith("@cupy:") or not s[6:].isdigit():
        raise bad_param("device", f"expected cpu, gpu or @cupy:N, got {spec!r}")
    n, want = gpu_count(), int(s[6:])
    if want >= n:
        have = f"{n} usable CUDA GPU(s)" if n else "no usable CUDA GPU (is cupy installed, with a driver?)"
        raise AuditError(f"--device {spec}: this machine has {have}")
    return chainer.get_device(s)


def make_rng(device: chainer.backend.Device, seed):
    """A Generator on ``device`` (NumPy's on CPU, CuPy's on GPU) seeded by ``seed``.

    ``seed`` may be an int or a sequence of ints (NumPy); CuPy takes their hash.
    """
    if device.xp is np:
        return np.random.default_rng(seed)
    import cupy

    if not isinstance(seed, int):
        seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 1)
    with device:
        return cupy.random.default_rng(seed)


def describe(device: chainer.backend.Device) -> str:
    if device.xp is np:
        return "cpu"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device.device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{device} ({name})"
