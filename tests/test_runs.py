"""The run store's parts on their own: RunMeta, the commit primitive, its rollback and
roll-forward, the lock, checked reads, names, deterministic npz bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from audit import runs
from audit.errors import AuditError


def meta(**over) -> runs.RunMeta:
    d = dict(command="train", created="2026-11-30T00:00:00", config={"epochs": 1}, seed=0, device="cpu",
             data={"data": "mnist", "source": "mnist", "fingerprint": "f" * 64, "class_names": ["a", "b"],
                   "n_train": 10, "n_valid": 5, "image_shape": [1, 16, 16]})
    d.update(over)
    return runs.RunMeta(**d)


def new_run(tmp_path: Path, files: dict[str, bytes] | None = None) -> runs.RunStore:
    store = runs.RunStore(tmp_path / "runs" / "r")
    with store.writing(), store.transaction() as txn:
        for name, data in (files or {"a.csv": b"x,y\n1,2\n"}).items():
            txn.write_bytes(name, data)
        txn.commit(meta())
    return store


def test_meta_round_trips_and_is_versioned():
    m = meta(resumed=("t1",), folds={"2-0": {"n_held_out": 3}})
    d = m.to_json()
    assert d["version"] == runs.SCHEMA_VERSION
    assert runs.RunMeta.from_json(json.loads(json.dumps(d))) == m.evolve(version=runs.SCHEMA_VERSION)


def test_meta_names_the_field():
    d = meta().to_json()
    d["data"]["n_valid"] = True  # a bool is no count
    with pytest.raises(AuditError, match="field 'data.n_valid': expected an integer"):
        runs.RunMeta.from_json(d, "x/run.json")


def test_new_run_appears_whole_in_one_rename(tmp_path):
    store = new_run(tmp_path, {"a.csv": b"1", "sub/b.npz": runs.npz_bytes({"p": np.ones(3)})})
    m = store.meta()
    assert set(m.files) == {"a.csv", "sub/b.npz"} and m.files["a.csv"]["sha256"] == runs.sha256(b"1")
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["r"]  # no staging, no lock left


def test_failed_transaction_rolls_back(tmp_path):
    store = new_run(tmp_path)
    before = {p.name: p.read_bytes() for p in store.path.iterdir()}
    with pytest.raises(ZeroDivisionError), store.writing(), store.transaction() as txn:
        txn.write_bytes("a.csv", b"new")
        txn.write_bytes("c.csv", b"more")
        1 / 0
    assert {p.name: p.read_bytes() for p in store.path.iterdir()} == before  # no stage, nothing changed


def test_transaction_without_commit_is_an_error(tmp_path):
    store = new_run(tmp_path)
    with pytest.raises(RuntimeError, match="without commit"), store.writing(), store.transaction() as txn:
        txn.write_bytes("a.csv", b"new")
    assert (store.path / "a.csv").read_bytes() == b"x,y\n1,2\n"


def test_transaction_needs_the_lock(tmp_path):
    store = new_run(tmp_path)
    with pytest.raises(RuntimeError, match="outside RunStore.writing"), store.transaction():
        pass


def test_committed_journal_is_rolled_forward(tmp_path, monkeypatch):
    store = new_run(tmp_path)

    class Kill(BaseException):
        pass

    def fault(step):
        if step == "rename a.csv":
            raise Kill()

    monkeypatch.setattr(runs, "_fault", fault)
    with pytest.raises(Kill), store.writing(), store.transaction() as txn:
        txn.write_bytes("a.csv", b"new")
        txn.write_bytes("z.csv", b"zz")
        txn.commit(meta(seed=7))
    monkeypatch.setattr(runs, "_fault", None)
    assert list(store.path.glob(".txn-*/COMMIT"))  # committed, not yet applied
    assert runs.RunStore(store.path).meta().seed == 7  # a reader finishes it
    assert (store.path / "a.csv").read_bytes() == b"new" and (store.path / "z.csv").read_bytes() == b"zz"
    assert not list(store.path.glob(".txn-*"))


def test_delete_and_replace_all(tmp_path):
    store = new_run(tmp_path, {"a.csv": b"1", "folds/2-0/model.npz": b"m"})
    with store.writing(), store.transaction(replace_all=True) as txn:
        txn.write_bytes("b.csv", b"2")
        txn.commit(meta())
    assert sorted(p.relative_to(store.path).as_posix() for p in store.path.rglob("*")) == ["b.csv", "run.json"]
    assert set(store.meta(fresh=True).files) == {"b.csv"}


def test_lock_is_exclusive_and_leaves_nothing(tmp_path):
    store = new_run(tmp_path)
    a, b = runs.RunLock(store.path), runs.RunLock(store.path)
    a.acquire()
    with pytest.raises(AuditError, match=f"in use by another audit command \\(pid {os.getpid()}\\)"):
        b.acquire()
    assert b.held_elsewhere()
    a.release()
    b.acquire()
    b.release()
    assert not (store.path.parent / ".r.lock").exists()


def test_checked_reads(tmp_path):
    store = new_run(tmp_path, {"a.csv": b"1,2\n"})
    assert store.read_bytes("a.csv") == b"1,2\n"
    (store.path / "a.csv").write_bytes(b"1,3\n")
    with pytest.raises(AuditError, match="does not match run.json"):
        runs.RunStore(store.path).read_bytes("a.csv")
    (store.path / "stray.csv").write_bytes(b"")
    with pytest.raises(AuditError, match="not recorded in run.json"):
        runs.RunStore(store.path).read_bytes("stray.csv")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", ".txn-1/a", "", "a\\b"])
def test_names_stay_inside_the_run(name):
    with pytest.raises(AuditError, match="inside the run folder"):
        runs.check_name(name)


def test_npz_bytes_are_deterministic_and_pickle_free(tmp_path):
    a = runs.npz_bytes({"p": np.arange(5.0), "n": np.array(["x", "y"])})
    assert a == runs.npz_bytes({"p": np.arange(5.0), "n": np.array(["x", "y"])})
    z = runs.load_npz_safe(a, "t")
    np.testing.assert_array_equal(z["p"], np.arange(5.0))
    with pytest.raises(ValueError):  # object arrays are refused on write too
        runs.npz_bytes({"o": np.array([object()], dtype=object)})


def test_new_run_into_an_empty_folder(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    store = new_run(tmp_path)
    assert store.exists()
