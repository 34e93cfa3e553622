"""The image cache ($AUDIT_IMAGE_CACHE): folders and manifests decoded once into a
memory-mapped array, the same data as decoding into memory, rebuilt when a file changes
or the cache is damaged, and never left half-built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit import data as D
from audit import imagecache
from audit.errors import AuditError


class Lines:
    def __init__(self):
        self.lines, self.started = [], []

    def start(self, description, total):
        self.started.append(description)

    def advance(self, *a, **k):
        pass

    def close(self, summary=None):
        if summary:
            self.lines.append(summary)


def folder(tmp_path: Path, n: int = 4) -> Path:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    (root / "pool").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (14, 14), dtype=np.uint8)).save(root / "pool" / f"p{i}.png")
    return root


def same(a: D.Dataset, b: D.Dataset) -> None:
    for s in ("train", "valid", "pool"):
        np.testing.assert_array_equal(np.asarray(getattr(a, s).x), np.asarray(getattr(b, s).x))
        np.testing.assert_array_equal(getattr(a, s).y, getattr(b, s).y)
        assert getattr(a, s).paths == getattr(b, s).paths
    assert a.fingerprint == b.fingerprint and a.class_names == b.class_names


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "imagecache"
    monkeypatch.setenv("AUDIT_IMAGE_CACHE", str(root))
    return root


def test_cached_folder_is_the_folder_and_is_read_once(tmp_path, cache, monkeypatch):
    root = folder(tmp_path)
    monkeypatch.delenv("AUDIT_IMAGE_CACHE")
    plain = D.load_dataset(root)
    monkeypatch.setenv("AUDIT_IMAGE_CACHE", str(cache))
    first = Lines()
    built = D.load_dataset(root, progress=first)
    same(built, plain)
    assert any(d.startswith("read ") for d in first.started)
    assert "resized 3 of 19 images to 12x12" in first.lines[0]  # the pool's 14x14 images
    again = Lines()
    hit = D.load_dataset(root, progress=again)
    same(hit, plain)
    assert again.started == [] and "resized 3 of 19" in again.lines[0]  # nothing opened or decoded: mapped
    assert isinstance(hit.train.x, np.memmap) and not hit.train.x.flags.writeable
    monkeypatch.chdir(tmp_path)  # the folder named relatively (as `audit train --data imgs` would): the same cache
    same(D.load_dataset("imgs"), plain)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no build or damaged folders left


def test_cached_manifest_is_the_manifest(tmp_path, cache, monkeypatch):
    root = folder(tmp_path)
    rows = ["path,label,split"] + [f"{p.relative_to(root).as_posix()},{p.parent.name},{p.parts[-3]}"
                                   for p in sorted(root.glob("*/*/*.png"))][::-1]  # splits interleaved
    rows += ["pool/p1.png,,pool", "valid/cat/0.png,cat,valid"][:1]
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.delenv("AUDIT_IMAGE_CACHE")
    plain = D.load_dataset(root / "m.csv")
    monkeypatch.setenv("AUDIT_IMAGE_CACHE", str(cache))
    same(D.load_dataset(root / "m.csv"), plain)
    same(D.load_dataset(root / "m.csv"), plain)
    assert plain.pool.paths == ("pool/p1.png",)


def test_a_changed_image_is_read_again(tmp_path, cache):
    root = folder(tmp_path)
    before = D.load_dataset(root)
    f = root / "train/dog/2.png"
    new = (255 - np.asarray(Image.open(f))).astype(np.uint8)
    Image.fromarray(new).save(f)  # same size and name, other content
    after = D.load_dataset(root)
    i = after.train.paths.index("train/dog/2.png")
    np.testing.assert_array_equal(after.train.x[i, 0], new)
    assert after.fingerprint != before.fingerprint
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


@pytest.mark.parametrize("damage", ["truncate", "record", "shape"])
def test_a_damaged_cache_is_built_again(tmp_path, cache, damage, monkeypatch):
    root = folder(tmp_path)
    D.load_dataset(root)
    monkeypatch.delenv("AUDIT_IMAGE_CACHE")
    good = D.load_dataset(root)  # in memory: the damage below does not reach it
    monkeypatch.setenv("AUDIT_IMAGE_CACHE", str(cache))
    (entry,) = [p for p in cache.iterdir()]
    if damage == "truncate":
        with open(entry / imagecache.IMAGES, "r+b") as f:
            f.truncate(os.path.getsize(entry / imagecache.IMAGES) - 100)
    elif damage == "record":
        (entry / imagecache.RECORD).write_text("{not json")
    else:
        np.save(entry / imagecache.IMAGES, np.zeros((3, 1, 12, 12), np.uint8))
    lines = Lines()
    again = D.load_dataset(root, progress=lines)
    same(again, good)
    assert any("an image cache that does not match its record" in ln and "building it again" in ln for ln in lines.lines)
    assert [p.name for p in cache.iterdir()] == [entry.name]


def test_a_failed_build_leaves_no_cache(tmp_path, cache):
    root = folder(tmp_path)
    bad = root / "valid/cat/1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a header, then nothing: found only when decoded
    with pytest.raises(AuditError, match="valid/cat/1.png: not a readable image"):
        D.load_dataset(root)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    root = folder(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("AUDIT_IMAGE_CACHE", str(blocker / "sub"))
    with pytest.raises(AuditError, match=r"^\$AUDIT_IMAGE_CACHE: cannot write the image cache in .*file/sub"):
        D.load_dataset(root)


def test_two_loads_at_once_build_one_cache(tmp_path, cache):
    root = folder(tmp_path, n=40)
    code = (f"from audit.data import load_dataset; d = load_dataset({str(root)!r}); "
            "print(d.fingerprint, int(d.train.x.sum()))")
    env = {**os.environ, "AUDIT_IMAGE_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]
    assert D.load_dataset(root).fingerprint == outs[0].split()[0]


def test_release_keeps_a_mapped_array_readable(tmp_path):
    x = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8, shape=(1000, 4096))
    x[:] = 7
    x.flush()
    del x
    m = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert int(m[10:20].sum()) == 7 * 10 * 4096
    imagecache.release(m[10:20])
    assert int(m.sum()) == 7 * 1000 * 4096
    imagecache.release(np.zeros(3))  # an array in memory: nothing to do


def test_a_killed_build_leaves_nothing_that_looks_whole(tmp_path, cache, monkeypatch):
    """A load killed (SIGKILL) in the middle of building: no cache is found afterwards, the
    next load builds it whole and deletes the killed build's folder."""
    import signal
    import time

    root = folder(tmp_path, n=30)
    code = ("import time, audit.data as D\n"
            "orig = D._open_image\n"
            "def slow(p):\n"
            "    time.sleep(0.05)\n"
            "    return orig(p)\n"
            "D._open_image = slow\n"
            f"D.load_dataset({str(root)!r})\n")
    env = {**os.environ, "AUDIT_IMAGE_CACHE": str(cache), "AUDIT_TEST_IMAGE_CACHE": ""}
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 60
    while not (cache.is_dir() and list(cache.glob(".build-*"))) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(cache.glob(".build-*")) and not [d for d in cache.iterdir() if not d.name.startswith(".")]
    ds = D.load_dataset(root)
    assert list(cache.iterdir()) == [next(d for d in cache.iterdir())] and not list(cache.glob(".build-*"))
    monkeypatch.delenv("AUDIT_IMAGE_CACHE")
    same(ds, D.load_dataset(root))


def test_two_workers_reading_the_cache_write_the_in_process_bytes(tmp_path, monkeypatch):
    """A run trained on a folder without the cache, scored in-process without it and on
    two local Dask workers that map it: the same fingerprint, the same bytes."""
    from typer.testing import CliRunner

    from audit.cli import app

    runner = CliRunner()
    root = folder(tmp_path, n=20)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(root), "--run", str(run), "--epochs", "1", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    r = runner.invoke(app, ["score", "--run", str(plain), "--samples", "4"])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("AUDIT_IMAGE_CACHE", str(tmp_path / "imagecache"))
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "4", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "2 workers of a local Dask cluster" in r.output
    for name in ("scores.csv", "mc_summary.npz"):
        assert (run / name).read_bytes() == (plain / name).read_bytes(), name
    assert len(list((tmp_path / "imagecache").iterdir())) == 1


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, cache, monkeypatch):
    """The disk fills while the cache is written: one line naming the cache folder and
    the reason; no half-built cache or build folder is left, and the data is untouched."""
    import errno

    root = folder(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(np.lib.format, "open_memmap", full)
        with pytest.raises(AuditError, match=r"^\$AUDIT_IMAGE_CACHE: cannot write the image cache in .*imagecache "
                                             r"\(No space left on device\)$"):
            D.load_dataset(root)
    assert list(cache.iterdir()) == []
    assert D.load_dataset(root).train.x.shape == (8, 1, 12, 12)
