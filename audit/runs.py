"""The run store: one run folder, its typed metadata, and the only way to change it.

    runs/NAME/run.json         RunMeta: config, seed, versions, device, data, timings,
                               and the manifest (sha256 and size of every file below)
    runs/NAME/model.npz        weights (chainer's npz layout; loaded with pickle refused)
    runs/NAME/train_log.csv    per epoch: loss, accuracy, seconds
    runs/NAME/subset.txt       the training indices used, when there was a subset
    runs/NAME/decisions.csv    a curated run's review decisions
    runs/NAME/scores.csv       one row per scored image
    runs/NAME/mc_summary.npz   probs (N, C), aligned with scores.csv
    runs/NAME/folds/K-k/model.npz   fold models of ``audit score --folds K`` (K-k-rR: --fold-repeats)
    runs/NAME/al_curve.csv     an acquire run's learning curves
    runs/NAME/acquired.csv     an acquire run's acquisitions (round 0: the initial set)

Guarantees (README, "Guarantees"):

- **All or nothing.** A command changes a run only through :meth:`RunStore.transaction`:
  new files are staged in ``RUN/.txn-*/``, a journal written by one rename is the
  commit point, then the files are renamed into place, run.json last. A command killed
  before the journal leaves the run as it was (the stage is removed by the next
  command); one killed after it is rolled forward by the next command (or reader).
  A new run is staged whole beside its folder and published by one rename.
- **One writer.** A writer holds ``runs/.NAME.lock`` (``flock``) for the whole command;
  a second one is refused with one line. The kernel drops the lock with the process,
  so a killed command never leaves a stale lock.
- **Checked reads.** run.json's manifest holds each file's sha256; readers check what
  they read against it, so a torn read (during another command's commit) is retried
  and a file changed outside audit is named, not used.
- **No code from files.** Weights load with ``allow_pickle=False``; names in run.json
  must stay inside the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np

from . import _compat  # noqa: F401
import chainer

from .errors import AuditError
from .model import MCDropoutNet, ModelSpec, model_from_spec
from .tables import parse_table

# ------------------------------------------------------------------------- file names

RUN_JSON = "run.json"
MODEL = "model.npz"
TRAIN_LOG = "train_log.csv"
SUBSET = "subset.txt"
DECISIONS = "decisions.csv"
SCORES = "scores.csv"
MC_SUMMARY = "mc_summary.npz"
FOLDS = "folds"
AL_CURVE = "al_curve.csv"
DUPLICATES = "duplicates.csv"
NEAR_DUPLICATES = "near_duplicates.csv"
OUTLIERS = "outliers.csv"
ACQUIRED = "acquired.csv"
KNOWN_FILES = (MODEL, TRAIN_LOG, SUBSET, DECISIONS, SCORES, MC_SUMMARY, AL_CURVE, ACQUIRED, DUPLICATES,
               NEAR_DUPLICATES, OUTLIERS)

SCHEMA_VERSION = 2  # 1: run.json before the store (no manifest, no version field)
TXN_PREFIX = ".txn-"
JOURNAL = "COMMIT"


def fold_model(folds: int, k: int, repeat: int = 0) -> str:
    """The run-relative name of fold model k of K (of the ``repeat``-th partition)."""
    return f"{FOLDS}/{fold_key(folds, k, repeat)}/{MODEL}"


def fold_key(folds: int, k: int, repeat: int = 0) -> str:
    """run.json's ``folds`` key of a fold model: K-k, or K-k-rR for repeat R >= 1."""
    return f"{folds}-{k}" if repeat == 0 else f"{folds}-{k}-r{repeat}"


def check_name(name: str, where: str = "run.json") -> str:
    """A run-relative file name, refused unless it stays inside the run folder."""
    p = PurePosixPath(str(name))
    if not str(name) or p.is_absolute() or ".." in p.parts or "\\" in str(name) or p.parts[0].startswith("."):
        raise AuditError(f"{where}: file name {name!r} must be a plain path inside the run folder")
    return p.as_posix()


# -------------------------------------------------------------------- test-only faults

# tests set this to a callable taking the name of a publish step; it may raise (a kill)
_fault: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _fault is not None:
        _fault(name)


# ---------------------------------------------------------------------------- RunMeta


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
            list: "a list"}.get(t, getattr(t, "__name__", str(t)))


def _check_type(value, types: tuple, path: str, where: str, optional: bool) -> None:
    if value is None and optional:
        return
    ok = any(
        isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        for t in types
    )
    if not ok:
        want = " or ".join(_type_name(t) for t in types) + (" or null" if optional else "")
        raise AuditError(f"{where}: field {path!r}: expected {want}, found {json.dumps(value)[:60]}")


# field -> (types, required); nested schemas are dicts
_DATA_SCHEMA = {
    "data": ((str,), True),
    "data_dir": ((str,), False),
    "data_rel": ((str,), False),
    "source": ((str,), True),
    "fingerprint": ((str,), True),
    "class_names": ((list,), True),
    "n_train": ((int,), True),
    "n_valid": ((int,), True),
    "image_shape": ((list,), True),
    "subset": ((dict,), False),
    "subset_file": ((str,), False),
    "image_size": ((list,), False),
    "curation": ((dict,), False),
}
_META_SCHEMA = {
    "version": ((int,), False),
    "command": ((str,), True),
    "created": ((str,), True),
    "config": ((dict,), True),
    "seed": ((int,), True),
    "model": ((dict,), False),
    "data": (_DATA_SCHEMA, True),
    "device": ((str,), True),
    "versions": ((dict,), False),
    "timings": ((dict,), False),
    "results": ((dict,), False),
    "results_before": ((dict,), False),
    "score": ((dict,), False),
    "flags": ((dict,), False),
    "folds": ((dict,), False),
    "complete": ((bool,), False),
    "resumed": ((list,), False),
    "files": ((dict,), False),
}
COMMANDS = ("train", "retrain", "acquire", "loop")


def _validate(d: Any, schema: dict, where: str, prefix: str = "") -> None:
    if not isinstance(d, dict):
        raise AuditError(f"{where}: {('field ' + repr(prefix.rstrip('.'))) if prefix else 'the file'}: "
                         f"expected an object, found {json.dumps(d)[:60]}")
    for key, (types, required) in schema.items():
        path = prefix + key
        if key not in d or (d[key] is None and not required):
            if required:
                raise AuditError(f"{where}: field {path!r} is missing; not a run.json written by audit")
            continue
        if isinstance(types, dict):
            _validate(d[key], types, where, path + ".")
        else:
            _check_type(d[key], types, path, where, optional=not required)


@dataclass(frozen=True)
class RunMeta:
    """run.json as a typed, validated value. Updates make new values (``evolve``).

    ``data`` is the block that says how to load the run's data again (``data`` as
    "mnist" or an absolute path; ``data_rel`` its form relative to the run where it lies
    inside it), its fingerprint and shape; ``files`` the manifest, {name: {sha256, bytes}}.
    The other blocks are written by the command that owns them.
    """

    command: str
    created: str
    config: dict
    seed: int
    data: dict
    device: str
    model: dict | None = None
    versions: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    results_before: dict | None = None
    score: dict | None = None
    flags: dict | None = None
    folds: dict = field(default_factory=dict)
    complete: bool | None = None
    resumed: tuple = ()
    files: dict = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    @classmethod
    def from_json(cls, d: Any, where: str = RUN_JSON) -> "RunMeta":
        _validate(d, _META_SCHEMA, where)
        if d["command"] not in COMMANDS:
            raise AuditError(f"{where}: field 'command': expected one of {', '.join(COMMANDS)}, found {d['command']!r}")
        version = d.get("version", 1)
        if version > SCHEMA_VERSION:
            raise AuditError(f"{where}: written by a newer audit (run.json version {version}; this one reads "
                             f"up to {SCHEMA_VERSION}); upgrade audit")
        data = d["data"]
        for k in ("class_names", "image_shape"):
            bad = [v for v in data[k] if not isinstance(v, str if k == "class_names" else int) or isinstance(v, bool)]
            if bad or (k == "image_shape" and len(data[k]) != 3):
                raise AuditError(f"{where}: field 'data.{k}': expected a list of "
                                 f"{'strings' if k == 'class_names' else '3 integers'}, found {json.dumps(data[k])[:60]}")
        for name, entry in d.get("files", {}).items():
            check_name(name, where)
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("bytes"), int)):
                raise AuditError(f"{where}: field 'files.{name}': expected {{sha256, bytes}}, found "
                                 f"{json.dumps(entry)[:60]}")
        for sub in ("subset", "curation"):
            if data.get(sub):
                key = "file" if sub == "subset" else "decisions"
                if not isinstance(data[sub].get(key), str):
                    raise AuditError(f"{where}: field 'data.{sub}.{key}' is missing or not a string")
                check_name(data[sub][key], where)
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["version"] = version
        kw["resumed"] = tuple(d.get("resumed", ()))
        for k in ("versions", "timings", "results", "folds", "files"):
            kw[k] = d.get(k) or {}
        return cls(**kw)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["resumed"] = list(self.resumed)
        d["version"] = SCHEMA_VERSION
        order = ["version", "command", "created", "config", "seed", "model", "data", "device", "versions",
                 "timings", "results", "results_before", "score", "flags", "folds", "complete", "resumed", "files"]
        out = {k: d[k] for k in order}
        return {k: v for k, v in out.items() if v is not None and v != () and not (k == "resumed" and not v)}

    def evolve(self, **changes) -> "RunMeta":
        return dataclasses.replace(self, **changes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.data["class_names"])

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]


def data_source(data: str | os.PathLike, data_dir: str | os.PathLike | None, dataset, *,
                run: Path | None = None, image_size: tuple[int, int] | None = None,
                classes: tuple[str, ...] | None = None, **extra) -> dict:
    """The ``data`` block of run.json for ``dataset`` loaded from ``data``: paths absolute
    (so a run is scored the same from any working folder), with a relative form where the
    data lies inside the run."""
    block = {"data": "mnist" if str(data) == "mnist" else str(Path(data).resolve()),
             "data_dir": None if data_dir is None else str(Path(data_dir).resolve())}
    if run is not None and block["data"] != "mnist":
        with contextlib.suppress(ValueError):
            block["data_rel"] = Path(block["data"]).relative_to(Path(run).resolve()).as_posix()
    block.update(source=dataset.source, fingerprint=dataset.fingerprint, class_names=list(dataset.class_names),
                 n_train=len(dataset.train), n_valid=len(dataset.valid), image_shape=list(dataset.image_shape))
    if image_size is not None:  # what --image-size resized to; loaded again at that size
        block["image_size"] = [int(image_size[0]), int(image_size[1])]
    if classes is not None:  # what --classes named; loaded again with them
        block["classes"] = list(classes)
    block.update(extra)
    return block


def image_size_of(block: dict) -> tuple[int, int] | None:
    """The ``--image-size`` (H, W) a data block records, or None."""
    size = block.get("image_size")
    if size is None:
        return None
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise AuditError(f"{RUN_JSON}: field 'data.image_size': expected [H, W], found {json.dumps(size)[:40]}")
    return int(size[0]), int(size[1])


def source_options(block: dict) -> dict:
    """How a data block's data is loaded again: its ``--image-size`` and ``--classes``."""
    classes = block.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise AuditError(f"{RUN_JSON}: field 'data.classes': expected a list of names, found {json.dumps(classes)[:40]}")
    return {"image_size": image_size_of(block), "classes": None if classes is None else tuple(classes)}


def load_source(block: dict, *, progress=None):
    """The dataset a run's data block names (on a Dask worker: the same files, the same size)."""
    from .data import load_dataset

    return load_dataset(block["data"], data_dir=block.get("data_dir"), progress=progress, **source_options(block))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("audit", "chainer", "numpy", "pandas", "cupy", "cupy-cuda12x", "cupy-cuda13x"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# ---------------------------------------------------------------------- bytes helpers


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (Path, tuple)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode()


def npz_bytes(arrays: dict[str, np.ndarray], *, compress: bool = False) -> bytes:
    """An .npz that np.load reads, byte for byte the same for the same arrays: NumPy's own
    writer stamps each member with the time, so a rerun would never match a first run."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def model_bytes(model: MCDropoutNet) -> bytes:
    """The model's parameters in chainer's npz layout (what save_npz writes), deterministically."""
    from chainer.serializers import DictionarySerializer

    s = DictionarySerializer()
    s.save(model)
    host = chainer.backend.CpuDevice()
    # sorted: chainer walks a Chain's children in set order, which changes from process to process
    return npz_bytes({k: host.send(s.target[k]) for k in sorted(s.target)}, compress=True)


def csv_bytes(df, **kw) -> bytes:
    """A DataFrame as CSV bytes; text cells are neutralised against formula injection."""
    from .tables import neutralise_frame

    return neutralise_frame(df).to_csv(index=False, float_format="%.6g", **kw).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o666 & ~_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` into ``path`` by a temporary file and one rename (for files outside runs,
    such as reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _fsync_write(Path(tmp), data)
        _step(f"write {path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- safe loading


def load_npz_safe(data: bytes | str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """The arrays of an npz, with pickle refused: an object array is one line naming ``what``."""
    import zipfile

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    if not zipfile.is_zipfile(src):
        raise AuditError(f"{what}: not a readable .npz file (not a zip archive); truncated or not written by audit")
    if isinstance(src, io.BytesIO):
        src.seek(0)
    try:
        with np.load(src, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise AuditError(f"{what}: holds a pickled object array, which audit never loads (it could run "
                             "code); not a file audit wrote") from None
        raise AuditError(f"{what}: not a readable .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise AuditError(f"{what}: not a readable .npz file ({type(e).__name__}: {e}); truncated or "
                         "not written by audit") from None
    for k, v in out.items():
        if not isinstance(v, np.ndarray) or v.dtype == object:
            raise AuditError(f"{what}: member {k!r} is not a plain array; not a file audit wrote")
    return out


class _ArraysAsNpz(dict):
    """What chainer's NpzDeserializer reads: a mapping name -> array."""


def load_weights(model: MCDropoutNet, data: bytes, what: str) -> MCDropoutNet:
    """Weights from npz bytes into ``model`` (pickle refused); they must fit it and be finite."""
    from chainer.serializers.npz import NpzDeserializer

    arrays = load_npz_safe(data, what)
    spec = model.spec
    try:
        NpzDeserializer(_ArraysAsNpz(arrays), strict=True).load(model)
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{what}: does not fit the model in run.json ({spec.arch}, {spec.n_classes} classes, "
                         f"images {tuple(spec.image_shape)}): {e}") from None
    bad = [name for name, p in model.namedparams() if not np.isfinite(chainer.backend.CpuDevice().send(p.array)).all()]
    if bad:
        raise AuditError(f"{what}: parameter {bad[0]} holds NaN or infinite values; the model diverged in "
                         "training and is not scored (retrain with a lower --lr)")
    return model


# ---------------------------------------------------------------------------- locking


class RunLock:
    """An exclusive ``flock`` on ``runs/.NAME.lock`` for the life of a command."""

    def __init__(self, run: Path) -> None:
        self.path = run.parent / f".{run.name}.lock"
        self.run = run
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise AuditError(f"--run: {self.run} is in use by another audit command (pid {other}); wait for it "
                                 "to finish, or choose another --run") from None
            try:  # the holder before us may have removed the file after we opened it: lock the one at the path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: a waiter that locks the old file sees it gone and retries
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (for lock-free readers)."""
        import fcntl

        if not self.path.is_file():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ store


def _hash_file(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": sha256(data), "bytes": len(data)}


class RunStore:
    """A run folder. Read through :meth:`meta`, :meth:`read_bytes` and the loaders;
    change it only inside :meth:`writing` (the lock) through :meth:`transaction`."""

    def __init__(self, run: str | os.PathLike, option: str = "--run") -> None:
        self.path = Path(run)
        self.option = option
        self.lock = RunLock(self.path)
        self._meta: RunMeta | None = None

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # ---- state
    def exists(self) -> bool:
        if self.path.exists() and not self.path.is_dir():
            raise AuditError(f"{self.option}: {self.path} is a file, not a run folder")
        return self.path.is_dir() and (self.path / RUN_JSON).is_file()

    def is_free(self) -> bool:
        """Nothing a user would lose: no folder, or an empty one."""
        if self.path.exists() and not self.path.is_dir():
            raise AuditError(f"{self.option}: {self.path} is a file, not a run folder")
        return not self.path.exists() or not any(p for p in self.path.iterdir() if not p.name.startswith(TXN_PREFIX))

    def require(self) -> "RunStore":
        if not self.path.exists():
            raise AuditError(f"{self.option}: {self.path} does not exist; train it first with "
                             f"`audit train --run {self.path}`")
        if not self.exists():
            raise AuditError(f"{self.option}: {self.path} has no {RUN_JSON}; it is not a run folder")
        return self

    def meta(self, *, fresh: bool = False) -> RunMeta:
        if self._meta is None or fresh:
            self.require()
            self._settle()
            path = self.path / RUN_JSON
            raw = path.read_bytes()
            try:
                d = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AuditError(f"{path}: not valid JSON ({e})") from None
            meta = RunMeta.from_json(d, str(path))
            if meta.command in ("train", "retrain"):
                from .config import stored_train_config

                stored_train_config(meta.config, str(path))  # one line naming the field, before anything uses it
            self._meta = meta
        return self._meta

    def has(self, name: str) -> bool:
        return (self.path / check_name(name)).is_file()

    # ---- reading
    def read_bytes(self, name: str, *, what: str | None = None) -> bytes:
        """A file of the run, checked against run.json's manifest (retried while another
        command commits; one line if it was changed outside audit)."""
        name = check_name(name)
        path = self.path / name
        meta = self.meta()
        for _ in range(50):
            entry = meta.files.get(name)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = None
            if data is not None and (entry is None and meta.version < 2):
                return data  # a run written before the manifest: nothing to check against
            if data is not None and entry is not None and entry["bytes"] == len(data) and entry["sha256"] == sha256(data):
                return data
            # another command may be committing (its journal is there) or have committed since we read
            # run.json: read both again; only ours holding the lock rules that out
            if self.lock.fd is not None:
                break
            pending = self._pending()
            fresh = self.meta(fresh=True)
            if not pending and fresh.files.get(name) == entry:
                break
            meta = fresh
            time.sleep(0.1)
        if data is None:
            raise AuditError(f"{what or self.option}: {path} does not exist")
        if entry is None:
            raise AuditError(f"{path}: not recorded in {RUN_JSON}; it was not written by audit "
                             "(or by an audit command that did not finish)")
        raise AuditError(f"{path}: its content does not match {RUN_JSON} (sha256 {sha256(data)[:12]}, "
                         f"recorded {entry['sha256'][:12]}): changed outside audit; rerun the command that wrote it")

    def read_table(self, name: str, columns, *, hint: str = "", numeric=(), **read_kw):
        """A CSV of the run as a DataFrame; one clear line if it is unreadable, lacks
        ``columns``, or has a non-numeric value in a ``numeric`` column."""
        return parse_table(self.read_bytes(name), self.path / name, columns, hint=hint, numeric=numeric, **read_kw)

    def read_npz(self, name: str) -> dict[str, np.ndarray]:
        return load_npz_safe(self.read_bytes(name), str(self.path / name))

    def load_model(self, name: str = MODEL) -> MCDropoutNet:
        """The run's model (or a fold model), rebuilt from run.json and loaded safely."""
        meta = self.meta()
        if not self.has(name):
            raise AuditError(f"{self.option}: {self.path} has no {name}; train it first with "
                             f"`audit train --run {self.path}`")
        try:
            spec = ModelSpec.from_json(meta.model or {})
            model = model_from_spec(spec)
        except (TypeError, KeyError, ValueError) as e:
            raise AuditError(f"{self.path / RUN_JSON}: unreadable 'model' entry ({e})") from None
        return load_weights(model, self.read_bytes(name), str(self.path / name))

    def data_path(self) -> str:
        """Where the run's data is: "mnist", the form relative to the run where it lies
        inside it, else the absolute path run.json records."""
        d = self.meta().data
        if d.get("data_rel"):
            return str(self.path / check_name(d["data_rel"]))
        return d["data"]

    def subset(self) -> np.ndarray | None:
        """The training indices the run was trained on (subset.txt), or None for all."""
        from .data import read_indices

        sub = self.meta().data.get("subset")
        if not sub:
            return None
        text = self.read_bytes(sub["file"]).decode(errors="replace")
        return read_indices(text, int(self.meta().data["n_train"]), str(self.path / sub["file"]))

    def base_dataset(self, *, data_dir: str | None = None, progress=None):
        """The source data of the run, before any review decisions, checked against its
        fingerprint."""
        from .data import load_dataset

        d = self.meta().data
        dataset = load_dataset(self.data_path(), data_dir=data_dir or d.get("data_dir"), progress=progress,
                               **source_options(d))
        curation = d.get("curation")
        expected = curation["base_fingerprint"] if curation else d["fingerprint"]
        if dataset.fingerprint != expected:
            what = "the curated run started from" if curation else "this run was trained on"
            raise AuditError(
                f"--data: {self.data_path()} is not the data {what} (fingerprint {dataset.fingerprint[:12]}, "
                f"{self.path / RUN_JSON} says {str(expected)[:12]}); retrain the run")
        return dataset

    def dataset(self, *, data_dir: str | None = None, progress=None, base=None):
        """The dataset the run was trained on: for a curated run, its decisions applied to
        the source data and checked to give the run's fingerprint and training indices.
        ``base``: :meth:`base_dataset` when already loaded."""
        from .decisions import apply_decisions, read_decisions

        d = self.meta().data
        dataset = base if base is not None else self.base_dataset(data_dir=data_dir, progress=progress)
        curation = d.get("curation")
        if not curation:
            return dataset
        name = curation["decisions"]
        curated = apply_decisions(dataset, read_decisions(self.path / name, self.read_bytes(name)))
        subset = self.subset()
        if curated.dataset.fingerprint != d["fingerprint"] or (
                subset is not None and not np.array_equal(np.sort(subset), np.sort(curated.train_indices))):
            raise AuditError(f"{self.path / name}: applied to the source data it does not give the data this run "
                             f"was trained on ({RUN_JSON}'s fingerprint and {SUBSET}); retrain the run")
        return curated.dataset

    # ---- writing
    @contextlib.contextmanager
    def writing(self) -> Iterator["RunStore"]:
        """Hold the run's lock; settle what a killed command left behind first."""
        self.lock.acquire()
        try:
            self.recover()
            self._meta = None
            yield self
        finally:
            self.lock.release()

    def _txn_dirs(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name.startswith(TXN_PREFIX) and p.is_dir())

    def _pending(self) -> bool:
        return any((d / JOURNAL).is_file() for d in self._txn_dirs())

    def _settle(self) -> None:
        """A reader that finds a committed but unfinished transaction of a dead command
        finishes it (when it can take the lock and write)."""
        if not self._pending() or self.lock.held_elsewhere():
            return
        try:
            self.lock.acquire()
        except (AuditError, OSError):
            return
        try:
            self.recover()
        except OSError:
            pass
        finally:
            self.lock.release()

    def recover(self) -> list[str]:
        """Under the lock: roll committed transactions forward, remove uncommitted ones,
        staging folders of new runs and temporary files. Returns what was done."""
        done = []
        for d in self._txn_dirs():
            journal = d / JOURNAL
            if journal.is_file():
                try:
                    plan = json.loads(journal.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                    plan = None
                if plan is not None:
                    self._apply(d, plan)
                    done.append(f"finished the commit {d.name}")
                    continue
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed the unfinished {d.name}")
        parent = self.path.parent
        if parent.is_dir():
            for p in parent.glob(f".{self.path.name}.partial-*"):
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}")
        if self.path.is_dir():
            for p in self.path.rglob(".*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
        return done

    def _apply(self, stage: Path, plan: dict) -> None:
        """Carry out a committed plan: deletions, renames (run.json last), then drop the stage.
        Idempotent, so a kill in the middle is finished by running it again."""
        for name in plan["delete"]:
            target = self.path / check_name(name)
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
            _step(f"delete {name}")
        for name in plan["write"]:  # run.json is last in the list
            src, dst = stage / name, self.path / check_name(name)
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                _step(f"rename {name}")
        _fsync_dir(self.path)
        # empty folders a deletion left (folds/4-0 after its model went)
        for d in sorted((p for p in self.path.rglob("*") if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        shutil.rmtree(stage, ignore_errors=True)

    @contextlib.contextmanager
    def transaction(self, *, replace_all: bool = False) -> Iterator["Transaction"]:
        """Stage changes; they become visible together when the block ends without error
        (``txn.commit(meta)`` inside it), or not at all. Only inside :meth:`writing`.

        ``replace_all``: the files not written in this transaction are deleted (a run
        replaced by ``--overwrite`` keeps nothing of the old one)."""
        if self.lock.fd is None:
            raise RuntimeError("RunStore.transaction outside RunStore.writing()")
        new_run = self.is_free()
        if new_run:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.partial-"))
        else:
            stage = Path(tempfile.mkdtemp(dir=self.path, prefix=TXN_PREFIX))
        os.chmod(stage, 0o777 & ~_UMASK)
        txn = Transaction(self, stage, new_run=new_run, replace_all=replace_all)
        try:
            yield txn
            if not txn.committed:
                raise RuntimeError("transaction ended without commit()")
        except BaseException:
            if not txn.published:
                shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            self._meta = None


class Transaction:
    """Files staged for one commit. ``write_*`` stage a file; ``delete`` drops one;
    ``commit(meta)`` publishes them with run.json, whose manifest it fills."""

    def __init__(self, store: RunStore, stage: Path, *, new_run: bool, replace_all: bool) -> None:
        self.store, self.stage, self.new_run, self.replace_all = store, stage, new_run, replace_all
        self.written: dict[str, dict] = {}
        self.deleted: set[str] = set()
        self.committed = self.published = False

    def write_bytes(self, name: str, data: bytes) -> None:
        name = check_name(name, "transaction")
        path = self.stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _fsync_write(path, data)
        self.written[name] = {"sha256": sha256(data), "bytes": len(data)}
        self.deleted.discard(name)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_csv(self, name: str, df, **kw) -> None:
        self.write_bytes(name, csv_bytes(df, **kw))

    def write_npz(self, name: str, **arrays: np.ndarray) -> None:
        self.write_bytes(name, npz_bytes(arrays))

    def write_model(self, name: str, model: MCDropoutNet) -> None:
        self.write_bytes(name, model_bytes(model))

    def delete(self, name: str) -> None:
        name = check_name(name, "transaction")
        self.deleted.add(name)
        self.written.pop(name, None)

    def commit(self, meta: RunMeta) -> RunMeta:
        store = self.store
        old: dict[str, dict] = {}
        if not self.new_run and not self.replace_all and store.exists():
            prior = store.meta(fresh=True)
            old = dict(prior.files)
            if prior.version < 2:  # a run from before the manifest: record what it holds
                for name in [*KNOWN_FILES, *(p.relative_to(store.path).as_posix()
                                             for p in store.path.glob(f"{FOLDS}/*/{MODEL}"))]:
                    if (store.path / name).is_file():
                        old[name] = _hash_file(store.path / name)
        files = {k: v for k, v in old.items() if k not in self.deleted}
        files.update(self.written)
        delete = sorted(self.deleted | (set(old) - set(files)))
        if self.replace_all and store.path.is_dir():
            delete = sorted({p.name for p in store.path.iterdir()
                             if not p.name.startswith(".") and p.name != RUN_JSON} - set(self.written))
        meta = meta.evolve(files=dict(sorted(files.items())))
        _fsync_write(self.stage / RUN_JSON, json_bytes(meta.to_json()))
        self.committed = True
        _step("staged")
        if self.new_run:
            if store.path.exists():  # an empty folder: rename(2) replaces it
                store.path.rmdir()
            os.rename(self.stage, store.path)
            self.published = True
            _fsync_dir(store.path.parent)
            _step("published")
            return meta
        plan = {"write": [*sorted(self.written), RUN_JSON], "delete": delete}
        tmp = self.stage / f"{JOURNAL}.tmp"
        _fsync_write(tmp, json_bytes(plan))
        os.replace(tmp, self.stage / JOURNAL)  # the commit point
        _fsync_dir(self.stage)
        self.published = True
        _step("journaled")
        store._apply(self.stage, plan)
        _step("published")
        return meta


def free_space_hint(e: OSError) -> str:
    """What to do about an OSError, for the CLI's one line."""
    if e.errno == errno.ENOSPC:
        return "the disk is full; free some space and run the command again (the run is as it was)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "not writable here; check the folder's permissions or choose another --run / --out"
    return "check the path and run the command again"
