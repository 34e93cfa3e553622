"""Work past one process, on Dask distributed.

A command that does several independent pieces (fold trainings, scoring blocks,
active-learning curves) runs them in-process by default. ``--workers N`` starts a local
Dask cluster of N single-threaded worker processes for the command; ``--scheduler
ADDRESS`` (or ``$AUDIT_SCHEDULER``, or a scheduler file) uses a running cluster. Every
piece is fixed by its seed and inputs, so the result is the same, to the byte, however
the pieces were spread.

With ``--device gpu`` each worker computes on its own GPU: a local cluster starts one
worker per CUDA device, each pinned to it (``CUDA_VISIBLE_DEVICES``); the workers of a
running cluster must each see one GPU, as dask-cuda's ``dask cuda worker`` starts them.

Workers read the data and the run's files themselves, from the same paths (a shared
file system, or the same path on each machine); only small results (per-block scores,
(N, C) means, fold weights, curves) come back through the scheduler. Dask's own
messages between the processes of your cluster are pickled, as Dask always does: run
workers only on machines and networks you trust.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import AuditError, bad_param

ENV_SCHEDULER = "AUDIT_SCHEDULER"
ENV_TIMEOUT = "AUDIT_DASK_TIMEOUT"
# the environment of a local cluster's worker processes (also what to give `dask worker`s)
WORKER_ENV = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}
# a local cluster's Dask settings: no statistical profiler (a thread sampling every worker's stacks
# each 10 ms, for the dashboard's profile page) and calmer health and memory checks (each 0.5 and
# 1 s); an idle worker and scheduler then take 0.14 s of CPU in 10 s instead of 0.9 s, which the
# pieces (or on a busy machine, the command itself) would otherwise lose. And one piece a worker at a time: Dask's
# default (1.1) hands a single-threaded worker two at once, so the next long piece is tied to a
# worker before anyone knows which worker frees first; pieces are seconds to minutes, the round
# trip for the next one is milliseconds
LOCAL_DASK = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "500ms",
              "distributed.admin.system-monitor.interval": "2s", "distributed.scheduler.worker-saturation": 1.0,
              "distributed.worker.memory.monitor-interval": "1s"}


@dataclass(frozen=True)
class ClusterConfig:
    """Where a command's pieces run: in-process (both None), on ``workers`` local
    processes, or on the cluster whose scheduler is ``scheduler`` (an address such as
    ``tcp://10.0.0.5:8786``, or the path of a scheduler file)."""

    workers: int | None = None
    scheduler: str | None = None
    timeout: float = 10.0  # seconds to wait for a scheduler and its workers

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise bad_param("workers", f"expected at least 1 worker process, got {self.workers!r}")
        if self.workers is not None and self.scheduler:
            raise AuditError("--workers and --scheduler: expected one of them, got both (--workers starts a local "
                             "cluster; --scheduler uses a running one)", usage=True)

    @property
    def in_process(self) -> bool:
        return self.workers is None and not self.scheduler

    @classmethod
    def from_options(cls, workers: int | None, scheduler: str | None) -> "ClusterConfig":
        """The CLI's options, with ``$AUDIT_SCHEDULER`` where neither is given, and
        ``$AUDIT_DASK_TIMEOUT`` (seconds) for how long to wait for a scheduler."""
        if workers is None and not scheduler:
            scheduler = os.environ.get(ENV_SCHEDULER) or None
        timeout = os.environ.get(ENV_TIMEOUT)
        try:
            seconds = float(timeout) if timeout else cls.timeout
        except ValueError:
            raise AuditError(f"${ENV_TIMEOUT}: expected seconds, got {timeout!r}") from None
        return cls(workers=workers, scheduler=scheduler, timeout=seconds)

    def describe(self, n_workers: int) -> str:
        if self.in_process:
            return "in-process"
        where = "a local Dask cluster" if self.workers else f"the Dask cluster at {self.scheduler}"
        return f"{n_workers} worker{'s' if n_workers != 1 else ''} of {where}"


def worker_device(config: ClusterConfig, device: str) -> str:
    """What a command's pieces compute on: ``device`` itself in-process; on a cluster
    ``cpu``, or ``gpu`` (each worker its own GPU). One line for a device that names one
    GPU (``@cupy:1``): a worker's GPU is the one it was pinned to."""
    from .device import CPU_SPECS, GPU_SPECS

    if config.in_process:
        return device
    s = str(device).strip().lower()
    if s in CPU_SPECS:
        return "cpu"
    if s in GPU_SPECS:
        return "gpu"
    raise AuditError(f"--device {device}: with --workers or --scheduler expected cpu or gpu (each worker computes "
                     "on the GPU it is pinned to), got a device by number", usage=True)


def local_cluster(n: int, *, pin_gpus: bool = False):
    """A local cluster of ``n`` single-threaded worker processes; with ``pin_gpus``
    worker i sees only CUDA device i (its ``CUDA_VISIBLE_DEVICES``), as dask-cuda does."""
    import logging

    import dask
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    # the dashboard on a free port (two commands at once would both want 8787); one thread per
    # worker, single-threaded BLAS; and glibc's own malloc tuning: Dask sets
    # MALLOC_TRIM_THRESHOLD_, which also stops glibc from raising its mmap threshold, so every
    # batch's 25 MB of activations would be mapped and unmapped anew (10-35% slower scoring)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENV, **LOCAL_DASK}):
        if not pin_gpus:
            return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                silence_logs=logging.ERROR)
        workers = {f"gpu-{i}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                                                           "silence_logs": logging.ERROR}}
                   for i in range(n)}
        return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                           silence_logs=logging.ERROR, name="audit-gpus")


@contextlib.contextmanager
def connect(config: ClusterConfig, device: str = "cpu") -> Iterator[Any]:
    """A ``distributed.Client`` for ``config`` (None in-process); the local cluster it
    started is closed at the end. ``device``: :func:`worker_device`'s answer; with
    ``gpu`` a local cluster has one worker per GPU, and a running cluster's workers must
    each have one. One line when a scheduler does not answer, its workers run another
    audit, or there are fewer GPUs than workers.

    Dask's nanny sets its workers' environment (WORKER_ENV: single-threaded BLAS) in
    this process's ``os.environ`` before it starts each worker, and leaves it there;
    it is put back as it was at the end, so that what this process starts later (a
    notebook's next subprocess, a test's) gets the user's settings, not the workers'."""
    if config.in_process:
        yield None
        return
    kept = {k: os.environ.get(k) for k in WORKER_ENV}
    try:
        with _connect(config, device) as client:
            yield client
    finally:
        for k, v in kept.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _connect(config: ClusterConfig, device: str) -> Iterator[Any]:
    from distributed import Client

    from .device import gpu_count

    gpus = device == "gpu"
    if gpus and config.workers:
        have = gpu_count()
        if config.workers > have:
            raise AuditError(f"--workers {config.workers} with --device gpu: expected at most one worker per GPU, "
                             f"found {have} usable CUDA GPU{'s' if have != 1 else ''} here", usage=True)
    cluster = None
    try:
        if config.workers:
            cluster = local_cluster(config.workers, pin_gpus=gpus)
            client = Client(cluster, timeout=config.timeout)
        elif os.path.isfile(config.scheduler):
            client = Client(scheduler_file=config.scheduler, timeout=config.timeout)
        else:
            client = Client(config.scheduler, timeout=config.timeout)
    except (OSError, TimeoutError) as e:
        if cluster is not None:
            cluster.close()
        where = "a local cluster" if config.workers else f"--scheduler {config.scheduler}"
        raise AuditError(f"{where}: no Dask scheduler answered within {config.timeout:g} s ({type(e).__name__}); "
                         "check the address and that `dask scheduler` runs there") from None
    try:
        if not config.workers:
            try:
                client.wait_for_workers(1, timeout=config.timeout)
            except TimeoutError:
                raise AuditError(f"--scheduler {config.scheduler}: the scheduler has no workers (waited "
                                 f"{config.timeout:g} s); start some with `dask worker {config.scheduler}`") from None
        check_versions(client)
        if gpus and not config.workers:
            check_gpus(client, config.scheduler)
        yield client
        if cluster is not None:
            with contextlib.suppress(Exception):
                client.run(quiet_close)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


HEARTBEAT_RACE = "Failed to communicate with scheduler during heartbeat"


def quiet_close() -> None:
    """On a local worker about to be closed: a heartbeat that meets the scheduler
    already closed is logged as an error with its traceback (1 close in ~15 here), which
    tells the user nothing; drop that one message."""
    import logging

    logging.getLogger("distributed.worker").addFilter(lambda r: not r.getMessage().startswith(HEARTBEAT_RACE))


def _versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"audit": __version__}
    for pkg in ("chainer", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def check_versions(client) -> None:
    """Every worker must run this audit (and chainer, NumPy): the same code gives the same bytes."""
    mine = _versions()
    theirs = client.run(_versions)
    for address, v in sorted(theirs.items()):
        if v != mine:
            diff = ", ".join(f"{k} {v.get(k)} (here {mine.get(k)})" for k in mine if v.get(k) != mine.get(k))
            raise AuditError(f"worker {address}: runs {diff}; install the same versions on every worker")


def check_gpus(client, scheduler: str) -> None:
    """``--device gpu`` on a running cluster: every worker must see a GPU."""
    from .device import gpu_count

    for address, n in sorted(client.run(gpu_count).items()):
        if n < 1:
            raise AuditError(f"worker {address} of {scheduler}: --device gpu, but it has no usable CUDA GPU; start "
                             "one worker per GPU (`dask cuda worker`, or `CUDA_VISIBLE_DEVICES=i dask worker`)")


def n_workers(client) -> int:
    return 1 if client is None else len(client.scheduler_info()["workers"])


def run_pieces(client, fn: Callable, pieces: list[tuple], *, on_done: Callable[[int, Any], None]) -> None:
    """``fn(*piece)`` for every piece on the cluster; ``on_done(i, result)`` as each
    finishes (in any order). An error on a worker is raised here, naming the worker;
    Ctrl-C cancels what is left."""
    from distributed import as_completed

    futures = [client.submit(_on_worker, fn, *p, pure=False) for p in pieces]
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        for future in as_completed(futures):
            on_done(index[future.key], future.result())
    except BaseException:
        client.cancel(futures)
        raise


def _on_worker(fn: Callable, *args):
    """Run a piece; an error names the worker's host, and is one the client can show."""
    try:
        return fn(*args)
    except AuditError as e:
        raise AuditError(f"worker {_where()}: {e}", usage=e.usage) from None
    except OSError as e:
        raise AuditError(f"worker {_where()}: {e.filename or 'a file'}: {e.strerror or e}") from None


def _where() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "?"
