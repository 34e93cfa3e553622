"""Dask: the same bytes from in-process, --workers 2 and a real `dask scheduler` with two
`dask worker` processes; a worker killed mid-run; bad cluster options."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from audit import cluster
from audit.cli import app
from audit.device import cpu_workers
from audit.errors import AuditError

from conftest import assert_one_line_error, write_shapes_npz

runner = CliRunner()
FAST = ["--epochs", "2", "--batch-size", "32", "--lr", "1e-3"]
ACQ = ["--strategy", "bald,random", "--initial", "6", "--step", "3", "--rounds", "2", "--samples", "4",
       "--pool-subset", "30", "--epochs", "2", "--batch-size", "16", "--model", "origin", "--repeats", "2"]
SCORED_FILES = ("scores.csv", "mc_summary.npz", "folds/2-0/model.npz", "folds/2-1/model.npz", "folds/2-0-r1/model.npz",
                "folds/2-1-r1/model.npz")


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_shapes_npz(tmp_path_factory.mktemp("cl") / "d.npz", 60, 20, seeds=(5, 6))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cl") / "run"
    assert invoke("train", "--data", data, "--run", run, *FAST).exit_code == 0
    return run


@pytest.fixture(scope="module")
def scored_in_process(trained, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cl") / "ref"
    shutil.copytree(trained, run)
    r = invoke("score", "--run", run, "--samples", "6", "--folds", "2", "--fold-repeats", "2", "--batch-size", "16")
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture(scope="module")
def acquired_in_process(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cl") / "al"
    assert invoke("acquire", "--data", data, "--run", run, *ACQ).exit_code == 0
    return run


def same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def same_curves(a: Path, b: Path) -> None:
    assert (a / "acquired.csv").read_bytes() == (b / "acquired.csv").read_bytes()
    ca, cb = (pd.read_csv(p / "al_curve.csv").drop(columns="seconds") for p in (a, b))
    pd.testing.assert_frame_equal(ca, cb)


def test_score_on_two_local_workers_is_byte_identical(trained, scored_in_process, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    r = invoke("score", "--run", run, "--samples", "6", "--folds", "2", "--fold-repeats", "2", "--batch-size", "16", "--workers", "2")
    assert r.exit_code == 0, r.output
    assert "2 workers of a local Dask cluster" in r.output
    same_files(run, scored_in_process, SCORED_FILES)
    assert json.loads((run / "run.json").read_text())["score"]["workers"] == "2 workers of a local Dask cluster"


FROM_EMPTY = ("--samples", "4", "--folds", "2", "--batch-size", "16")


@pytest.fixture(scope="module")
def from_empty_in_process(data, tmp_path_factory) -> Path:
    """`audit score --folds 2` from an empty folder in-process: the run's model first,
    then the folds, then the scores."""
    run = tmp_path_factory.mktemp("cl") / "empty"
    r = invoke("score", "--data", data, "--run", run, *FROM_EMPTY)
    assert r.exit_code == 0, r.output
    return run


def same_run_from_empty(a: Path, b: Path) -> None:
    same_files(a, b, ("model.npz", "scores.csv", "mc_summary.npz", "folds/2-0/model.npz", "folds/2-1/model.npz"))
    logs = [pd.read_csv(run / "train_log.csv").drop(columns=["seconds", "images_per_s"]) for run in (a, b)]
    pd.testing.assert_frame_equal(*logs)
    meta = [json.loads((run / "run.json").read_text()) for run in (a, b)]
    assert meta[0]["folds"] == meta[1]["folds"] and meta[0]["data"] == meta[1]["data"]


def test_score_from_an_empty_folder_trains_the_run_beside_the_folds(data, from_empty_in_process, tmp_path):
    """With workers, the run's own model is one more piece beside the fold trainings:
    the same model, folds and scores as in-process, where it is trained first."""
    run = tmp_path / "run"
    r = invoke("score", "--data", data, "--run", run, *FROM_EMPTY, "--workers", "2")
    assert r.exit_code == 0, r.output
    assert "the run's model: trained on 180 images" in r.output and "on a worker" in r.output
    same_run_from_empty(from_empty_in_process, run)
    # the folds it trained are the run's: a second score reuses them, training nothing
    r = invoke("score", "--run", run, *FROM_EMPTY, "--workers", "2")
    assert r.exit_code == 0 and "trained on" not in r.output, r.output
    same_files(from_empty_in_process, run, ("scores.csv",))


def test_ctrl_c_before_the_run_is_trained_publishes_nothing(data, tmp_path, monkeypatch):
    """Ctrl-C as the first training comes back (run's or fold's): the folds cannot be
    committed without the run, so the folder stays empty, and the next try starts over."""
    real = cluster.run_pieces

    def interrupted(client, fn, pieces, *, on_done):
        def first(i, result):
            raise KeyboardInterrupt
        real(client, fn, pieces, on_done=first)

    monkeypatch.setattr(cluster, "run_pieces", interrupted)
    run = tmp_path / "run"
    args = ("score", "--data", data, "--run", run, "--samples", "4", "--folds", "2", "--batch-size", "16",
            "--workers", "2")
    r = invoke(*args)
    assert r.exit_code == 130 and "interrupted" in r.output, r.output
    assert not run.exists() or [p.name for p in run.iterdir() if not p.name.startswith(".")] == []
    monkeypatch.undo()
    r = invoke(*args)
    assert r.exit_code == 0 and "the run's model: trained" in r.output, r.output


def test_a_local_cluster_leaves_this_process_environment_as_it_was(trained, tmp_path, monkeypatch):
    """Dask's nanny writes its workers' settings (single-threaded BLAS) into the client's
    os.environ; what the client starts afterwards must not inherit them."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    r = invoke("score", "--run", run, "--samples", "2", "--workers", "1", "--no-data-checks")
    assert r.exit_code == 0, r.output
    assert os.environ["OMP_NUM_THREADS"] == "3" and "OPENBLAS_NUM_THREADS" not in os.environ


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to compare with 1")
def test_one_core_and_single_threaded_blas_give_the_same_bytes(data, from_empty_in_process, tmp_path):
    """The client's own work after the scoring (features, calibration, the data checks)
    runs in fixed blocks with single-threaded BLAS: on one core with OPENBLAS_NUM_THREADS=1
    `audit score` writes what it writes on two."""
    run = tmp_path / "run"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "from audit.cli import main; main()", "score", "--data", str(data),
                           "--run", str(run), *FROM_EMPTY], env=env, capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    same_run_from_empty(from_empty_in_process, run)
    same_files(from_empty_in_process, run, ("outliers.csv", "near_duplicates.csv", "duplicates.csv"))
    meta = [json.loads((r / "run.json").read_text())["score"] for r in (from_empty_in_process, run)]
    assert meta[0]["calibration"] == meta[1]["calibration"]
    assert {**meta[0]["data_checks"], "seconds": 0} == {**meta[1]["data_checks"], "seconds": 0}


def _dense_recorded(run):
    assert json.loads((run / "run.json").read_text())["score"]["masks"] == "independent"


def _passes_vary(run):
    passes = pd.read_csv(run / "scores.csv")["passes"]
    assert passes.min() >= 10 and passes.max() <= 30 and passes.nunique() > 1


@pytest.mark.parametrize("args, check", [
    # --masks independent (the dense reference engine): pieces on batch boundaries
    (("--samples", "4", "--batch-size", "7", "--masks", "independent"), _dense_recorded),
    # --samples auto: each piece adds passes per image as in-process does
    (("--samples", "auto", "--tolerance", "0.02", "--max-samples", "30"), _passes_vary),
], ids=["dense engine", "samples auto"])
def test_other_engines_on_two_local_workers_are_byte_identical(trained, tmp_path, args, check):
    runs = []
    for extra in ([], ["--workers", "2"]):
        run = tmp_path / f"run{len(runs)}"
        shutil.copytree(trained, run)
        r = invoke("score", "--run", run, *args, *extra)
        assert r.exit_code == 0, r.output
        runs.append(run)
    same_files(runs[0], runs[1], ("scores.csv", "mc_summary.npz"))
    check(runs[1])


def test_acquire_on_two_local_workers_draws_the_same_curves(data, acquired_in_process, tmp_path):
    run = tmp_path / "al"
    r = invoke("acquire", "--data", data, "--run", run, *ACQ, "--workers", "2")
    assert r.exit_code == 0, r.output
    same_curves(run, acquired_in_process)


@pytest.fixture
def real_cluster(tmp_path):
    """`dask scheduler` and two `dask worker` processes on localhost, as a user starts them.

    The scheduler picks its own port and says it in its scheduler file (a port chosen
    here and bound later could be taken in between: that once failed CI)."""
    import json
    import time

    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the dask scheduler did not start: {(tmp_path / 'cluster.log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written whole, but give a slow disk a moment
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                           str(scheduler_file), "--nthreads", "1", "--no-nanny",
                                           "--dashboard-address", ":0"],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address, procs, scheduler_file
    finally:
        for p in procs:
            with_kill(p)
        log.close()


def with_kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_real_scheduler_and_workers_give_the_same_bytes(real_cluster, trained, scored_in_process, data,
                                                        acquired_in_process, tmp_path):
    address, _, scheduler_file = real_cluster
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    r = invoke("score", "--run", run, "--samples", "6", "--folds", "2", "--fold-repeats", "2", "--batch-size", "16", "--scheduler", address)
    assert r.exit_code == 0, r.output
    assert f"2 workers of the Dask cluster at {address}" in r.output
    same_files(run, scored_in_process, SCORED_FILES)
    # $AUDIT_SCHEDULER, and a scheduler file, reach the same cluster
    al = tmp_path / "al"
    r = invoke("acquire", "--data", data, "--run", al, *ACQ, env={"AUDIT_SCHEDULER": str(scheduler_file)})
    assert r.exit_code == 0, r.output
    same_curves(al, acquired_in_process)


def test_a_worker_killed_mid_run_changes_nothing(real_cluster, data, acquired_in_process, tmp_path):
    """Kill one of the two workers once the first curve is committed: Dask runs its
    pieces again on the other, and the curves are the in-process ones."""
    address, procs, _ = real_cluster
    run = tmp_path / "al"
    cmd = [sys.executable, "-c", "from audit.cli import main; main()", "acquire", "--data", str(data), "--run",
           str(run), *ACQ, "--repeats", "3", "--scheduler", address]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "al_curve.csv").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    with_kill(procs[1])  # a worker dies while the others' pieces are still running
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    ref = tmp_path / "ref"
    assert invoke("acquire", "--data", data, "--run", ref, *ACQ, "--repeats", "3").exit_code == 0
    same_curves(run, ref)


def test_a_worker_killed_while_training_the_runs_model_changes_nothing(real_cluster, data, from_empty_in_process,
                                                                       tmp_path):
    """`audit score --folds 2` from an empty folder on two workers: kill the one that is
    training the run's own model (the first piece handed out). Dask trains it again on
    the other, and the run is the in-process one to the byte."""
    from distributed import Client

    def pieces_running(dask_scheduler) -> list:  # nested, so that it travels by value to the scheduler
        """(priority, worker address) of each piece being run, the first submitted first."""
        return sorted((ts.priority, ts.processing_on.address) for ts in dask_scheduler.tasks.values()
                      if ts.processing_on is not None)

    address, procs, _ = real_cluster
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from audit.cli import main; main()", "score", "--data", str(data), "--run",
           str(run), *FROM_EMPTY, "--scheduler", address]
    with Client(address, timeout=30) as observer:
        pids = observer.run(os.getpid)  # worker address: its process
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, busy = time.time() + 120, []
        while len(busy) < 2 and child.poll() is None and time.time() < deadline:  # both workers at work
            busy = observer.run_on_scheduler(pieces_running)
            time.sleep(0.02)
        assert busy, "no piece was seen running"
        victim = pids[busy[0][1]]
        killed = [p for p in procs[1:] if p.pid == victim]
        assert killed and not (run / "model.npz").exists()
        with_kill(killed[0])
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    assert "the run's model: trained on 180 images" in out and "1 worker of the Dask cluster" in out, out
    same_run_from_empty(from_empty_in_process, run)


@pytest.mark.parametrize("args, fragment, code", [
    (["--workers", "0"], "--workers: expected at least 1 worker process, got 0", 2),
    (["--workers", "-2"], "--workers: expected at least 1", 2),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], "--workers and --scheduler: expected one of them", 2),
    (["--scheduler", "tcp://127.0.0.1:9"], "--scheduler tcp://127.0.0.1:9: no Dask scheduler answered within 2 s", 1),
])
def test_bad_cluster_options(trained, tmp_path, args, fragment, code):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    r = invoke("score", "--run", run, "--samples", "2", *args, env={"AUDIT_DASK_TIMEOUT": "2"})
    assert_one_line_error(r, fragment, code=code)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_workers_with_another_version_are_refused():
    class Client:
        def run(self, fn):
            mine = fn()
            return {"tcp://10.0.0.7:4000": mine, "tcp://10.0.0.8:4000": {**mine, "audit": "0.0.9"}}

    with pytest.raises(AuditError, match=r"worker tcp://10.0.0.8:4000: runs audit 0.0.9 \(here 0.1.0\)"):
        cluster.check_versions(Client())


def test_a_worker_that_cannot_read_a_file_is_named(tmp_path):
    """An error on a worker comes back as one line naming the worker and the file."""
    with cluster.connect(cluster.ClusterConfig(workers=1)) as client:
        with pytest.raises(AuditError, match=r"^worker tcp://127\.0\.0\.1:\d+: .*/missing.npz: No such file"):
            cluster.run_pieces(client, _read, [(str(tmp_path / "missing.npz"),)], on_done=lambda i, r: None)


def _read(path):
    return open(path, "rb").read()


def test_the_heartbeat_race_at_close_is_not_shown(caplog):
    """A local worker's heartbeat that meets the closed scheduler logs a traceback at
    ERROR; quiet_close (run on the workers as the cluster closes) drops just that one."""
    import logging

    log = logging.getLogger("distributed.worker")
    before = list(log.filters)
    try:
        cluster.quiet_close()
        with caplog.at_level(logging.ERROR, logger="distributed.worker"):
            log.error(cluster.HEARTBEAT_RACE + " during heartbeat.")
            log.error("Unexpected exception during heartbeat. Closing worker.")
        assert [r.getMessage() for r in caplog.records] == ["Unexpected exception during heartbeat. Closing worker."]
    finally:
        log.filters[:] = before


def test_gpu_workers_are_pinned_one_per_device():
    """--device gpu --workers N: worker i sees only CUDA device i (the pinning works without a GPU)."""
    from distributed import Client

    with cluster.local_cluster(2, pin_gpus=True) as c, Client(c) as client:
        client.wait_for_workers(2)
        seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OPENBLAS_NUM_THREADS")))
        threads = {w["name"]: w["nthreads"] for w in client.scheduler_info()["workers"].values()}
        # a single-threaded worker scores with one thread, whatever cores the machine has
        assert client.submit(cpu_workers, pure=False).result() == 1
        # one piece a worker at a time, and no profiler thread sampling the pieces
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == 1.0
        assert set(client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled")).values()) \
            == {False}
    assert sorted(seen.values()) == [("0", "1"), ("1", "1")]
    assert threads == {"gpu-0": 1, "gpu-1": 1}


def test_gpu_workers_need_a_gpu_each(monkeypatch):
    monkeypatch.setattr("audit.device.gpu_count", lambda: 1)
    with pytest.raises(AuditError, match=r"^--workers 2 with --device gpu: expected at most one worker per GPU, "
                                         r"found 1 usable CUDA GPU here$"):
        with cluster.connect(cluster.ClusterConfig(workers=2), "gpu"):
            pass

    class Client:
        def run(self, fn):
            return {"tcp://10.0.0.7:4000": 1, "tcp://10.0.0.8:4000": 0}

    with pytest.raises(AuditError, match=r"^worker tcp://10.0.0.8:4000 of tcp://s:8786: --device gpu, but it has no "
                                         r"usable CUDA GPU; start one worker per GPU"):
        cluster.check_gpus(Client(), "tcp://s:8786")


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("@numpy", "cpu"), ("gpu", "gpu"), ("@cupy", "gpu")])
def test_worker_device(device, expected):
    assert cluster.worker_device(cluster.ClusterConfig(workers=2), device) == expected
    assert cluster.worker_device(cluster.ClusterConfig(), "@cupy:1") == "@cupy:1"  # in-process: as given
    with pytest.raises(AuditError, match=r"^--device @cupy:1: with --workers or --scheduler expected cpu or gpu"):
        cluster.worker_device(cluster.ClusterConfig(scheduler="tcp://s:8786"), "@cupy:1")
