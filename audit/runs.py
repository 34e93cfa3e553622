"""The run directory, the contract between commands (design.md).

    runs/NAME/run.json        config, seed, versions, device, data fingerprint, timings
    runs/NAME/model.npz       weights (chainer.serializers.save_npz)
    runs/NAME/train_log.csv   per epoch: loss, accuracy, seconds
    runs/NAME/subset.txt      the training indices used, when --subset was given
    runs/NAME/scores.csv      one row per scored image
    runs/NAME/mc_summary.npz  probs (N, C), aligned with scores.csv

Every file is written to a temporary name in the same folder and renamed into
place, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from . import _compat  # noqa: F401
import chainer

from .errors import AuditError
from .model import MCDropoutNet, ModelSpec, model_from_spec

RUN_JSON = "run.json"
MODEL = "model.npz"
TRAIN_LOG = "train_log.csv"
SUBSET = "subset.txt"
SCORES = "scores.csv"
MC_SUMMARY = "mc_summary.npz"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a user's file gets the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it


def _umask() -> int:
    return _UMASK


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (Path,)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_model(path: str | os.PathLike, model: MCDropoutNet) -> None:
    buf = io.BytesIO()  # save_npz brings device arrays to the host itself
    chainer.serializers.save_npz(buf, model)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("audit", "chainer", "numpy", "pandas", "cupy", "cupy-cuda12x", "cupy-cuda13x"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def read_table(path: str | os.PathLike, columns, *, hint: str = "", **read_kw):
    """A CSV the tool wrote, as a DataFrame; one clear line if it is unreadable or lacks ``columns``."""
    import pandas as pd

    try:
        df = pd.read_csv(path, **read_kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise AuditError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AuditError(f"{path}: missing column(s) {', '.join(missing)}{hint}")
    return df


def read_run(run: str | os.PathLike) -> dict:
    """``run.json`` of an existing run, with a clear error when there is none."""
    run = Path(run)
    if not run.is_dir():
        raise AuditError(f"--run: {run} does not exist; train it first with `audit train --run {run}`")
    path = run / RUN_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise AuditError(f"--run: {run} has no {RUN_JSON}; it is not a run folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AuditError(f"{path}: not valid JSON ({e})") from None
    if "data" not in meta:
        raise AuditError(f"{path}: no 'data' entry; not written by audit")
    return meta


def has_model(run: str | os.PathLike) -> bool:
    run = Path(run)
    return (run / MODEL).is_file() and (run / RUN_JSON).is_file()


def load_model(run: str | os.PathLike, meta: dict | None = None) -> MCDropoutNet:
    """The trained model of ``run``, rebuilt from run.json and loaded from model.npz."""
    run = Path(run)
    meta = meta or read_run(run)
    path = run / MODEL
    if not path.is_file():
        raise AuditError(f"--run: {run} has no {MODEL}; train it first with `audit train --run {run}`")
    return load_model_file(path, meta)


def load_model_file(path: Path, meta: dict) -> MCDropoutNet:
    """Weights from ``path`` into a model built from run.json's spec."""
    try:
        spec = ModelSpec.from_json(meta["model"])
    except (TypeError, KeyError, ValueError) as e:
        raise AuditError(f"{path.parent / RUN_JSON}: unreadable 'model' entry ({e})") from None
    model = model_from_spec(spec)
    try:
        chainer.serializers.load_npz(str(path), model)
    except (ValueError, KeyError, OSError) as e:
        raise AuditError(
            f"{path}: does not fit the model in run.json ({spec.arch}, {spec.n_classes} classes, "
            f"images {spec.image_shape}): {e}"
        ) from None
    return model


@contextlib.contextmanager
def staged_run(run: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``run``.

    On any error the staging folder is removed and ``run`` is untouched. An existing
    ``run`` is replaced only with ``overwrite``.
    """
    run = Path(run)
    if run.exists() and not overwrite and any(run.iterdir()):
        raise AuditError(
            f"--run: {run} already exists; pass --overwrite to replace it or choose another --run"
        )
    run.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=run.parent, prefix=f".{run.name}.partial-"))
    os.chmod(stage, 0o777 & ~_umask())
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if run.exists():
        old = run.parent / f".{run.name}.old-{os.getpid()}"
        os.replace(run, old)
    os.replace(stage, run)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
