"""A memory-mapped cache of decoded images, for folders and manifests of any size.

Decoding a folder or manifest (open, decode, resize, convert every file) is done once
per content and kept as one uint8 ``.npy`` array (N, C, H, W) in a folder of the cache
named by a key; every later load maps it from disk (``np.load(mmap_mode="r")``, no
pickle), so a dataset no longer has to fit in memory and a command does not decode it
again. Where: ``$AUDIT_IMAGE_CACHE`` (a folder; ``1`` or ``on`` for
``~/.cache/audit/images``); unset, images are decoded into memory as before.

The key is a sha256 over the cache's version, the data's path, the size and mode the
images are made, and for every file in order its path and ``stat`` (size, mtime and
ctime in nanoseconds, inode): what ``git`` trusts for its index. A file changed, moved
or replaced changes its ctime, so its cache is not found and a new one is built. A
file changed in the same clock tick as the stat cannot be told apart, so a load waits
until the newest file is ``RACY_S`` old before it takes the stats.

A cache is built in a private temporary folder of the cache and renamed into place
when complete, so a killed build leaves no cache that looks whole (the next build on
the machine deletes what a killed one left), and two builds at once both finish with
the same bytes (the second rename finds the first's and drops its own). A cache folder whose files do not match its record (truncated, another
shape, an unreadable record) is moved aside and built again, with a line saying so.
The image bytes are not hashed again on load (that would read them all); the data's
fingerprint is recorded at build time, from the same bytes.

``release(x)`` drops the resident pages of a mapped array, so a Dask worker that reads
its pieces from a cache keeps a memory footprint that does not grow with N.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import AuditError
from .progress import NullProgress, Progress

ENV = "AUDIT_IMAGE_CACHE"
VERSION = 1
RACY_S = 2.0  # a file's stat is trusted once it is this old: well past any filesystem's timestamp tick
IMAGES, RECORD = "images.npy", "cache.json"


def cache_root() -> Path | None:
    """The cache folder ``$AUDIT_IMAGE_CACHE`` names, or None (no cache)."""
    v = os.environ.get(ENV, "").strip()
    if not v or v.lower() in ("0", "off", "no", "false"):
        return None
    if v.lower() in ("1", "on", "yes", "true"):
        from .data import default_cache_dir

        return default_cache_dir().parent / "images"
    return Path(v).expanduser()


def stat_key(where: Path, files: list[Path], parts: tuple) -> str:
    """The cache key of ``files`` (in order) read from ``where`` and made as ``parts``
    (size, mode, ...); waits until the newest file is RACY_S old."""
    while True:
        h = hashlib.sha256(json.dumps([VERSION, str(Path(where).resolve()), list(parts)]).encode())
        newest = 0
        for f in files:
            s = os.stat(f)
            newest = max(newest, s.st_mtime_ns, s.st_ctime_ns)
            h.update(f"\0{os.path.abspath(f)}\0{s.st_size}\0{s.st_mtime_ns}\0{s.st_ctime_ns}\0{s.st_ino}".encode())
        wait = newest / 1e9 + RACY_S - time.time()
        if wait <= 0:
            return h.hexdigest()
        time.sleep(min(wait, RACY_S))


class CachedImages:
    """A built cache: ``x`` the mapped (N, C, H, W) uint8 array (read-only), and the
    fingerprints recorded for the labels it was loaded with."""

    def __init__(self, folder: Path, x: np.ndarray, record: dict) -> None:
        self.folder, self.x, self.record = folder, x, record

    def fingerprint(self, labels_key: str) -> str | None:
        return self.record.get("fingerprints", {}).get(labels_key)

    def remember(self, labels_key: str, fingerprint: str) -> None:
        """Record the data's fingerprint for these labels (an atomic replace of the record)."""
        if self.fingerprint(labels_key) == fingerprint:
            return
        self.record.setdefault("fingerprints", {})[labels_key] = fingerprint
        try:
            _write_record(self.folder, self.record)
        except OSError:  # a cache this user may read but not write: the fingerprint is computed again next time
            pass


def _write_record(folder: Path, record: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".record-")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / RECORD)


def _open(folder: Path, key: str) -> CachedImages:
    """The cache in ``folder``; ValueError saying what is wrong when it does not match."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"its record {RECORD} is unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("shape"), list):
        raise ValueError("its record names other images")
    shape = tuple(record["shape"])
    try:
        x = np.load(folder / IMAGES, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{IMAGES} is truncated or damaged ({e})") from None
    if x.shape != shape or x.dtype != np.uint8:
        raise ValueError(f"{IMAGES} holds {x.dtype} {x.shape}, not uint8 {shape}")
    return CachedImages(folder, x, record)


def lookup(root: Path, key: str, progress: Progress | None = None) -> CachedImages | None:
    """The cache of ``key`` in ``root``, or None where there is none. One that does not
    match its record is moved aside and deleted (a line says so): it is built again."""
    folder = Path(root) / key[:32]
    if not folder.is_dir():
        return None
    try:
        return _open(folder, key)
    except ValueError as e:
        aside = folder.with_name(f".damaged-{folder.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass
        (progress or NullProgress()).close(f"{folder}: an image cache that does not match its record ({e}); "
                                           "building it again")
        return None


def build(root: Path, key: str, shape: tuple, fill: Callable[[np.ndarray], None], record: dict) -> CachedImages:
    """Build the cache of ``key`` in ``root``: ``fill(x)`` writes the (N, C, H, W) uint8
    images into the mapped array ``x``; ``record``: what else to keep with them. An
    exception in ``fill`` (or a kill) leaves no cache behind."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        _sweep(Path(root))
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".build-{socket.gethostname()}-{os.getpid()}-"))
    except OSError as e:
        raise AuditError(f"${ENV}: cannot write the image cache in {root} ({e.strerror or e})") from None
    folder = Path(root) / key[:32]
    try:
        x = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8, shape=tuple(shape))
        fill(x)
        x.flush()
        del x
        with open(tmp / IMAGES, "rb+") as f:
            os.fsync(f.fileno())
        _write_record(tmp, {**record, "key": key, "shape": list(shape), "version": VERSION})
        try:
            os.rename(tmp, folder)
        except OSError:  # another process built it first: theirs holds the same bytes
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only folder
            raise AuditError(f"${ENV}: cannot write the image cache in {root} ({e.strerror or e})") from None
        raise
    try:
        return _open(folder, key)
    except ValueError as e:
        raise AuditError(f"{folder}: the image cache just built does not open ({e})") from None


_MAPPED: dict = {}  # in a process: the caches mapped by folder and key, once


def mapped(folder: str, key: str) -> np.ndarray | None:
    """The images of the cache in ``folder`` (built for ``key``), mapped; None where that
    folder cannot be read here or holds another cache (then the data is loaded from its
    source instead). How a Dask worker reads its pieces without listing the data."""
    if (folder, key) not in _MAPPED:
        try:
            _MAPPED[(folder, key)] = _open(Path(folder), key).x
        except (OSError, ValueError):
            return None
    return _MAPPED[(folder, key)]


def _sweep(root: Path) -> None:
    """Delete what builds on this host that were killed left behind (``.build-HOST-PID-*``
    whose process is gone); builds of other hosts, or still running, are left alone."""
    host = socket.gethostname()
    for d in root.glob(f".build-{host}-*"):
        pid = d.name[len(f".build-{host}-"):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


def release(x: np.ndarray) -> None:
    """Let the kernel drop the resident pages of the mapping ``x`` (a view of) lives in;
    nothing for an array in memory. The pages are read again from the file if needed."""
    m = getattr(x, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass
