"""Datasets: MNIST from its IDX files, an ``.npz`` file, or a folder of images.

Every loader returns a :class:`Dataset` of two :class:`Split` s (``train`` and
``valid``) holding images as ``(N, C, H, W)`` uint8 or float32 arrays, ``(N,)`` int32
labels, the class names, and, for folders, the path of each image. An npz (``x_pool``)
or a folder (``pool/``) may also hold an unlabelled ``pool``: images to label next
(``audit next``), whose labels are -1 (or, for simulations, an npz's ``y_pool``).

Glossary: N images, C channels, H x W pixels, ``n_classes`` classes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AuditError
from .progress import NullProgress, Progress

SPLITS = ("train", "valid")

# design.md: sha256 of the *decompressed* IDX files.
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The original host answers 403 since 2024; these serve the same gzipped files.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# labels at most this (a class per label below it): past it, a label is a typo or an id, not a class
MAX_CLASSES = 100_000
# float pixels past this magnitude are not an image scale anyone trains on; they overflow float32 sums
FLOAT_LIMIT = 1e3
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La"}
# how folder and manifest images of another size are brought to the size: Pillow's Lanczos
# (a windowed sinc), which keeps detail when enlarging and does not alias when shrinking
RESIZE_FILTER = "Lanczos"


def parse_classes(text: str | None) -> tuple[str, ...] | None:
    """``--classes a,b,c``: the class names, in that order (what a classes.txt lists); None stays None."""
    if text is None:
        return None
    names = tuple(n.strip() for n in str(text).split(","))
    if any(not n for n in names):
        raise AuditError(f"--classes: expected names separated by commas, found an empty one in {text!r}", usage=True)
    if len(set(names)) != len(names):
        raise AuditError(f"--classes: a class is named twice in {text!r}", usage=True)
    if len(names) < 2:
        raise AuditError(f"--classes: expected at least 2 classes, got {text!r}", usage=True)
    return names


def _listed_classes(classes_txt: Path, classes: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The class list ``--classes`` or a ``classes.txt`` gives (None: neither); both must agree."""
    from_file = read_classes_txt(classes_txt) if classes_txt.is_file() else None
    if classes is not None and from_file is not None and tuple(classes) != from_file:
        raise AuditError(f"--classes: {','.join(classes)} differs from {classes_txt} ({','.join(from_file)}); "
                         "give one list (or the same)", usage=True)
    return tuple(classes) if classes is not None else from_file


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``"HxW"`` (e.g. ``28x28``) as (H, W); None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m[1]) <= 4096 or not 1 <= int(m[2]) <= 4096:
        raise AuditError(f"image_size: expected HxW in pixels, each 1..4096 (e.g. 28x28), got {text!r}", usage=True,
                         param="image_size")
    return int(m[1]), int(m[2])


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    x: (N, C, H, W) uint8 (0..255) or float32 images.
    y: (N,) int32 labels in [0, n_classes).
    paths: where each image came from (relative to the data folder), or None.
    """

    x: np.ndarray
    y: np.ndarray
    paths: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset with a training and a validation split."""

    train: Split
    valid: Split
    class_names: tuple[str, ...]
    source: str
    fingerprint: str = field(default="")
    pool: Split | None = None  # unlabelled images (labels -1), or None
    # where the images are mapped from (audit.imagecache): {"folder", "key", "start":
    # {split: its first row in the cache}}, or None for images in memory
    mapped: dict | None = field(default=None, compare=False)


    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(int(s) for s in self.train.x.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise AuditError(f"split: expected one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)


def to_float32(x: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1] for uint8 input; float input is taken as it is."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(1.0 / 255.0)
    return x.astype(np.float32, copy=False)


def fingerprint(train: Split, valid: Split, class_names: tuple[str, ...], pool: Split | None = None) -> str:
    """sha256 over both splits' images, labels and the class names (and the pool's
    images and paths where there is one; a dataset without a pool keeps the
    fingerprint it always had)."""
    h = hashlib.sha256()
    for s in (train, valid):
        for a in (s.x, s.y):
            h.update(str((a.dtype.str, a.shape)).encode())
            _hash_array(h, a)
    h.update("\0".join(class_names).encode())
    if pool is not None:
        h.update(b"\0pool")
        h.update(str((pool.x.dtype.str, pool.x.shape)).encode())
        _hash_array(h, pool.x)
        h.update(np.ascontiguousarray(pool.y).data)
        h.update("\0".join(pool.paths or ()).encode())
    return h.hexdigest()


def _hash_array(h, a: np.ndarray) -> None:
    """``h.update`` with the bytes of ``a`` (C order); a mapped array in chunks, its pages
    released after each, so hashing it does not hold it all in memory."""
    if not isinstance(a, np.memmap) or a.nbytes <= _HASH_CHUNK:
        h.update(np.ascontiguousarray(a).data)
        return
    from .imagecache import release

    rows = max(1, _HASH_CHUNK // max(a[0].nbytes, 1))
    for i in range(0, len(a), rows):
        h.update(np.ascontiguousarray(a[i:i + rows]).data)
        release(a)


_HASH_CHUNK = 64 << 20


def _finish(train: Split, valid: Split, class_names: tuple[str, ...], source: str,
            pool: Split | None = None) -> Dataset:
    return Dataset(train, valid, class_names, source, fingerprint(train, valid, class_names, pool), pool)


# ---------------------------------------------------------------------------- loading


def load_dataset(
    data: str | os.PathLike = "mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: Progress | None = None,
    image_size: tuple[int, int] | None = None,
    classes: tuple[str, ...] | None = None,
) -> Dataset:
    """Load ``data``: ``"mnist"``, an ``.npz`` file, an image folder or a CSV manifest.

    ``data_dir`` is where MNIST's IDX files are looked for first (then
    ``$AUDIT_DATA_DIR``, then the user cache, downloading there when missing).
    ``image_size`` (H, W): the size folder and manifest images are resized to (default:
    the most common size of their train and valid images); not for arrays (npz, MNIST).
    ``classes``: the class names in order, as a ``classes.txt`` would give them, for
    folders and manifests (with pool images only: the loop's start from no labels).

    >>> ds = load_dataset("mnist")                      # doctest: +SKIP
    >>> ds.train.x.shape, ds.valid.x.shape, ds.n_classes  # doctest: +SKIP
    ((60000, 1, 28, 28), (10000, 1, 28, 28), 10)
    """
    if classes is not None and (str(data) == "mnist" or Path(data).suffix.lower() == ".npz"):
        raise AuditError("--classes: MNIST and .npz data carry their classes; --classes names those of a folder or "
                         "manifest", usage=True)
    if str(data) == "mnist":
        if image_size is not None:
            raise AuditError("--image-size: MNIST's images are 28x28 as they are; --image-size resizes folder and "
                             "manifest images", usage=True)
        return load_mnist(data_dir, download=download, progress=progress)
    path = Path(data)
    if not path.exists():
        raise AuditError(
            f"--data: {path} does not exist; expected 'mnist', an .npz file, a .csv manifest or a folder "
            "with train/ and valid/"
        )
    if path.is_dir() and (path / "run.json").is_file():
        from .loop import labelled_dataset  # an `audit next` run: what it has labelled so far (others: one line)

        return labelled_dataset(path, progress=progress)
    if path.is_dir():
        return load_image_folder(path, progress=progress, image_size=image_size, classes=classes)
    if path.suffix.lower() == ".csv":
        return load_manifest(path, progress=progress, image_size=image_size, classes=classes)
    if path.suffix.lower() == ".npz":
        if image_size is not None:
            raise AuditError("--image-size: an .npz holds arrays of one size already; --image-size resizes folder "
                             "and manifest images", usage=True)
        return load_npz(path)
    raise AuditError(
        f"--data: {path} is neither 'mnist', an .npz file, a .csv manifest nor a folder (suffix {path.suffix!r})"
    )


# ------------------------------------------------------------------------------ MNIST


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "audit" / "mnist"


def mnist_search_path(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for MNIST, in order: ``data_dir``, ``$AUDIT_DATA_DIR``, cache."""
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("AUDIT_DATA_DIR"):
        dirs.append(Path(os.environ["AUDIT_DATA_DIR"]))
    dirs.append(default_cache_dir())
    return dirs


def _find_mnist(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if all((d / f"{name}.gz").is_file() or (d / name).is_file() for name in MNIST_FILES):
            return d
    return None


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: Progress | None = None,
) -> Dataset:
    """MNIST: train = the 60,000 training images, valid = the 10,000 test images.

    Each file's decompressed content is checked against design.md's sha256.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise AuditError(f"--data-dir: {data_dir} is not a folder")
    dirs = mnist_search_path(data_dir)
    found = _find_mnist(dirs)
    if found is None:
        if not download:
            raise AuditError(
                "MNIST: the four IDX files are in none of " + ", ".join(map(str, dirs))
            )
        try:
            found = download_mnist(default_cache_dir(), progress=progress)
        except AuditError as e:
            raise AuditError(
                "MNIST: the four IDX files are in none of " + ", ".join(map(str, dirs)) + f", and {e}"
            ) from None
    raw = {name: _read_checked(found, name) for name in MNIST_FILES}
    train = Split(
        _parse_idx_images(raw["train-images-idx3-ubyte"], found / "train-images-idx3-ubyte"),
        _parse_idx_labels(raw["train-labels-idx1-ubyte"], found / "train-labels-idx1-ubyte"),
    )
    valid = Split(
        _parse_idx_images(raw["t10k-images-idx3-ubyte"], found / "t10k-images-idx3-ubyte"),
        _parse_idx_labels(raw["t10k-labels-idx1-ubyte"], found / "t10k-labels-idx1-ubyte"),
    )
    for s, what in ((train, "train"), (valid, "t10k")):
        if len(s.x) != len(s.y):
            raise AuditError(
                f"MNIST {what}: {len(s.x)} images but {len(s.y)} labels in {found}"
            )
    return _finish(train, valid, tuple(str(i) for i in range(10)), "mnist")


def _read_checked(folder: Path, name: str) -> bytes:
    gz, plain = folder / f"{name}.gz", folder / name
    path = gz if gz.is_file() else plain
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                content = f.read()
        else:
            content = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise AuditError(f"{path}: not a readable gzip file ({e}); delete it to re-download") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != MNIST_FILES[name]:
        raise AuditError(
            f"{path}: sha256 of the content is {digest[:16]}..., expected "
            f"{MNIST_FILES[name][:16]}... (corrupt or not the original MNIST file)"
        )
    return content


def _parse_idx_images(content: bytes, path: Path) -> np.ndarray:
    if len(content) < 16:
        raise AuditError(f"{path}: truncated IDX header ({len(content)} bytes)")
    magic, n, rows, cols = struct.unpack(">IIII", content[:16])
    if magic != 0x00000803:
        raise AuditError(f"{path}: IDX magic {magic:#010x}, expected 0x00000803 (uint8 images)")
    if len(content) != 16 + n * rows * cols:
        raise AuditError(
            f"{path}: {len(content) - 16} bytes of pixels, expected {n}x{rows}x{cols}"
        )
    return np.frombuffer(content, np.uint8, offset=16).reshape(n, 1, rows, cols).copy()


def _parse_idx_labels(content: bytes, path: Path) -> np.ndarray:
    if len(content) < 8:
        raise AuditError(f"{path}: truncated IDX header ({len(content)} bytes)")
    magic, n = struct.unpack(">II", content[:8])
    if magic != 0x00000801:
        raise AuditError(f"{path}: IDX magic {magic:#010x}, expected 0x00000801 (uint8 labels)")
    if len(content) != 8 + n:
        raise AuditError(f"{path}: {len(content) - 8} labels, expected {n}")
    return np.frombuffer(content, np.uint8, offset=8).astype(np.int32)


def download_mnist(
    folder: Path, *, mirrors: tuple[str, ...] | None = None, progress: Progress | None = None
) -> Path:
    """Download the four gzipped IDX files into ``folder``; each is checked, then
    moved into place, so a failed download leaves nothing behind."""
    progress = progress or NullProgress()
    mirrors = MNIST_MIRRORS if mirrors is None else mirrors
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for name in MNIST_FILES:
        target = folder / f"{name}.gz"
        if target.is_file():
            continue
        for mirror in mirrors:
            try:
                _download(mirror + f"{name}.gz", target, progress)
                _read_checked(folder, name)
                break
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(f"{mirror}: {getattr(e, 'reason', e)}")
            except AuditError as e:
                target.unlink(missing_ok=True)
                errors.append(str(e))
        else:
            raise AuditError(
                f"could not download {name}.gz into {folder} (offline?); put the four IDX files "
                f"there or pass --data-dir. Tried: {'; '.join(errors)}"
            )
    return folder


def _download(url: str, target: Path, progress: Progress) -> None:
    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0)
        progress.start(f"download {target.name}", total)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    progress.advance(len(chunk))
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            progress.close()


# -------------------------------------------------------------------------------- npz


def load_npz(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` with ``x_train, y_train, x_valid, y_valid`` (and optionally
    ``class_names``). Images N x H x W or N x C x H x W, uint8 or float."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise AuditError(f"{path}: not an .npz file (not a zip archive); expected arrays x_train, y_train, x_valid, y_valid")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile, pickle and format errors all mean "not an npz"
        raise AuditError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("x_train", "y_train", "x_valid", "y_valid") if k not in arrays]
    if missing:
        raise AuditError(
            f"{path}: missing array(s) {', '.join(missing)}; expected x_train, y_train, "
            f"x_valid, y_valid (found {', '.join(sorted(arrays)) or 'none'})"
        )
    for k in ("x_train", "y_train", "x_valid", "y_valid"):
        if not isinstance(arrays[k], np.ndarray):  # NpzFile hands back raw bytes for non-.npy members
            raise AuditError(f"{path}: not a readable .npz file ({k} is not a NumPy array)")
    xs = {s: _check_images(arrays[f"x_{s}"], f"{path}: x_{s}") for s in SPLITS}
    if xs["train"].shape[1:] != xs["valid"].shape[1:]:
        raise AuditError(
            f"{path}: x_train images are {xs['train'].shape[1:]} but x_valid images are "
            f"{xs['valid'].shape[1:]} (C, H, W); they must match"
        )
    ys = {s: _check_labels(arrays[f"y_{s}"], f"{path}: y_{s}") for s in SPLITS}
    for s in SPLITS:
        if len(xs[s]) != len(ys[s]):
            raise AuditError(f"{path}: x_{s} has {len(xs[s])} images but y_{s} has {len(ys[s])} labels")
    if "class_names" in arrays:
        class_names = tuple(str(c) for c in np.asarray(arrays["class_names"]).ravel())
    else:
        top = max(int(ys[s].max(initial=-1)) for s in SPLITS)
        class_names = tuple(str(i) for i in range(top + 1))
    if len(set(class_names)) != len(class_names):
        raise AuditError(f"{path}: class_names has duplicates; each class needs its own name")
    for s in SPLITS:
        bad = (ys[s] < 0) | (ys[s] >= len(class_names))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise AuditError(
                f"{path}: y_{s}[{i}] = {int(ys[s][i])} is out of range; expected labels in "
                f"0..{len(class_names) - 1} ({int(bad.sum())} bad)"
            )
    if len(class_names) < 2:
        raise AuditError(f"{path}: found {len(class_names)} class(es); need at least 2")
    train, valid = (Split(xs[s], ys[s].astype(np.int32)) for s in SPLITS)  # narrowed after the range check
    return _finish(train, valid, class_names, str(path), _npz_pool(arrays, path, xs["train"], len(class_names)))


def _npz_pool(arrays: dict, path: Path, x_train: np.ndarray, n_classes: int) -> Split | None:
    """The npz's unlabelled pool ``x_pool`` (with ``y_pool``, the labels a simulated
    labeller gives), or None."""
    if "x_pool" not in arrays:
        if "y_pool" in arrays:
            raise AuditError(f"{path}: y_pool without x_pool; expected both, or x_pool alone")
        return None
    if not isinstance(arrays["x_pool"], np.ndarray):
        raise AuditError(f"{path}: not a readable .npz file (x_pool is not a NumPy array)")
    x = _check_images(arrays["x_pool"], f"{path}: x_pool")
    if x.shape[1:] != x_train.shape[1:] or x.dtype != x_train.dtype:
        raise AuditError(f"{path}: x_pool images are {x.dtype} {x.shape[1:]} but x_train images are "
                         f"{x_train.dtype} {x_train.shape[1:]} (C, H, W); they must match")
    y = np.full(len(x), -1, np.int32)
    if "y_pool" in arrays:
        if not isinstance(arrays["y_pool"], np.ndarray):
            raise AuditError(f"{path}: not a readable .npz file (y_pool is not a NumPy array)")
        yp = _check_labels(arrays["y_pool"], f"{path}: y_pool")
        if len(yp) != len(x):
            raise AuditError(f"{path}: x_pool has {len(x)} images but y_pool has {len(yp)} labels")
        if len(yp) and int(yp.max()) >= n_classes:
            i = int(np.argmax(yp >= n_classes))
            raise AuditError(f"{path}: y_pool[{i}] = {int(yp[i])} is out of range; expected labels in "
                             f"0..{n_classes - 1}")
        y = yp.astype(np.int32)
    return Split(x, y)


def _check_images(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise AuditError(f"{what}: expected N x H x W or N x C x H x W images, got shape {x.shape}")
    if x.shape[0] == 0:
        raise AuditError(f"{what}: no images")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise AuditError(f"{what}: contains NaN or infinite values")
        top = float(np.abs(x).max())
        if top > FLOAT_LIMIT:
            raise AuditError(f"{what}: float images are taken as they are and must lie within +-{FLOAT_LIMIT:g} "
                             f"(e.g. [0, 1], or standardised); found a value of magnitude {top:.3g}: scale them or "
                             "store uint8 pixels")
        return np.ascontiguousarray(x, dtype=np.float32)
    raise AuditError(f"{what}: expected uint8 or float images, got dtype {x.dtype}")


def _check_labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim != 1:
        raise AuditError(f"{what}: expected a 1-d array of labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise AuditError(f"{what}: expected integer labels, got dtype {y.dtype}")
    y = y.astype(np.int64)  # exact for every integer dtype but uint64 past 2^63, which the range check catches
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= MAX_CLASSES):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise AuditError(f"{what}: label {bad} is out of range; expected labels in 0..{MAX_CLASSES - 1}")
    return y


# ----------------------------------------------------------------------------- folder


def load_image_folder(root: str | os.PathLike, *, progress: Progress | None = None,
                      image_size: tuple[int, int] | None = None, classes: tuple[str, ...] | None = None) -> Dataset:
    """Images laid out as ``root/train/<class>/*.png`` and ``root/valid/<class>/*``, and
    optionally unlabelled ones anywhere under ``root/pool/`` (subfolders allowed).

    Class names are the sorted folder names of ``train``, or ``classes`` (``--classes``)
    in that order, which must include them; with ``pool/`` only, ``classes`` or a
    ``classes.txt``. Images of another size than
    ``image_size`` (H, W; default the most common size of the train and valid images)
    are resized to it with Pillow's Lanczos filter, and a progress line says how many;
    greyscale images stay one channel unless any train or valid image is colour (then
    RGB). A pool image is made the training images' mode where no information is lost
    (grey to RGB); a colour pool image beside greyscale training images is refused.
    """
    progress = progress or NullProgress()
    root = Path(root)
    # no labels at all: pool/ and a classes.txt, neither train/ nor valid/ (audit next starts at random)
    pool_only = not any((root / s).is_dir() for s in SPLITS) and (root / "pool").is_dir()
    listed = _listed_classes(root / "classes.txt", classes) if pool_only else classes
    if pool_only and listed is None:
        raise AuditError(f"--data: {root} has pool/ but no train/ or valid/; to start from no labels, list the "
                         f"classes in {root / 'classes.txt'} (one a line) or give --classes a,b,c")
    for s in SPLITS:
        if not pool_only and not (root / s).is_dir():
            raise AuditError(f"--data: {root} has no {s}/ folder; expected {root}/{s}/<class>/*.png")
    if listed is not None:
        class_names = listed
        if not pool_only:
            extra = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and p.name not in listed)
            if extra:
                raise AuditError(f"--classes: {root / 'train'} has class folder(s) {', '.join(extra[:3])} that "
                                 f"--classes does not name", usage=True)
    else:
        class_names = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if len(class_names) < 2:
        raise AuditError(
            f"{root / ('classes.txt' if pool_only else 'train')}: found {len(class_names)} class"
            f"{' name' if pool_only else ' folder'}(s); need at least 2"
        )
    files: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLITS}
    for s in SPLITS if not pool_only else ():
        files[s] = []
        for d in sorted(p for p in (root / s).iterdir() if p.is_dir()):
            if d.name not in class_names:
                raise AuditError(f"{d}: class {d.name!r} is not among the train classes")
            images = sorted(
                p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise AuditError(
                    f"{d}: class folder has no images (expected {', '.join(IMAGE_SUFFIXES)})"
                )
            files[s] += [(p, class_names.index(d.name)) for p in images]
        if not files[s]:
            raise AuditError(f"{root / s}: no class folders with images")
    pool_dir = root / "pool"
    pool_files: list[Path] = []
    if pool_dir.is_dir():
        pool_files = sorted((p for p in pool_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                            key=lambda p: p.relative_to(root).as_posix())
        if not pool_files:
            raise AuditError(f"{pool_dir}: no images (expected {', '.join(IMAGE_SUFFIXES)} files, in subfolders "
                             "or not); remove the folder if there is no pool")

    all_files = [p for s in SPLITS for p, _ in files[s]] + pool_files
    n_labelled = len(all_files) - len(pool_files)
    labelled = np.arange(len(all_files)) < (len(all_files) if pool_only else n_labelled)

    def bad(rows):
        i, why = rows[0]
        raise AuditError(f"{all_files[i]}: not a readable image ({why})")

    def colour(rows):
        names = [str(all_files[i]) for i in rows]
        raise AuditError(
            f"{pool_dir}: the training images are greyscale, so the model takes one channel, but "
            + (f"{names[0]} is colour" if len(names) == 1 else f"{len(names)} pool images are colour, e.g. "
               f"{'; '.join(names[:3])}") + "; convert them, or move them out of pool/")

    x, cache = _read_images(root, all_files, labelled, image_size, progress, on_bad=bad, on_colour=colour)
    bounds = np.cumsum([0] + [len(files[s]) for s in SPLITS] + [len(pool_files)])
    splits = {
        s: Split(
            x[bounds[j]:bounds[j + 1]],
            np.array([c for _, c in files[s]], dtype=np.int32),
            tuple(p.relative_to(root).as_posix() for p, _ in files[s]),
        )
        for j, s in enumerate(SPLITS)
    }
    pool = None
    if pool_files:
        pool = Split(x[bounds[2]:], np.full(len(pool_files), -1, np.int32),
                     tuple(p.relative_to(root).as_posix() for p in pool_files))
    return _finish_cached(splits["train"], splits["valid"], class_names, str(root), pool, cache)


MANIFEST_SPLITS = ("train", "valid", "pool")


def read_classes_txt(path: Path) -> tuple[str, ...]:
    """The class names of a ``classes.txt``: one a line, in that order, blank lines skipped."""
    names = tuple(ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip())
    if len(set(names)) != len(names):
        raise AuditError(f"{path}: a class is listed twice")
    return names


def load_manifest(path: str | os.PathLike, *, progress: Progress | None = None,
                  image_size: tuple[int, int] | None = None, classes: tuple[str, ...] | None = None) -> Dataset:
    """A CSV manifest ``path,label,split``: one image a row, its path relative to the CSV
    (or absolute), its class, and train, valid or pool. With ``classes.txt`` it may hold
    pool rows only (train and valid then empty): the loop starts from no labels. A row whose label is empty is a
    pool image (its split may be left empty too); a pool row with a label keeps it as the
    answer `audit acquire` simulates a labeller with (an npz's ``y_pool``). The classes are those of
    ``classes.txt`` beside the CSV (one a line, in that order) or ``classes``
    (``--classes``) where there is one, else the sorted labels of the train and valid rows. Images follow the folder's rules:
    resized to ``image_size`` or the most common size; greyscale unless a train or valid
    image is colour; pool images as the training images are (:func:`load_image_folder`)."""
    from .tables import parse_table, restore

    progress = progress or NullProgress()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AuditError(f"--data: {path}: {e.strerror}") from None
    df = parse_table(raw, path, ("path", "label", "split"), dtype=str, keep_default_na=False,
                     hint="; expected a manifest with the columns path,label,split")
    if df.empty:
        raise AuditError(f"{path}: a header but no images")
    df["path"] = [restore(v.strip()) for v in df["path"]]
    df["label"] = [restore(v.strip()) for v in df["label"]]
    df["split"] = [v.strip().lower() or ("pool" if not lab else "") for v, lab in zip(df["split"], df["label"])]
    lines = np.arange(len(df)) + 2

    def listed(mask, what: str) -> str:
        rows = [f"line {n} ({p!r})" for n, p in zip(lines[mask], df["path"][mask])]
        return f"{int(mask.sum())} {what}: " + ", ".join(rows[:3]) + (", ..." if len(rows) > 3 else "")

    bad = ~df["split"].isin(MANIFEST_SPLITS).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AuditError(f"{path}: line {lines[i]}: split {df['split'][i]!r}; expected train, valid or pool")
    nolabel = ((df["split"] != "pool") & (df["label"] == "")).to_numpy()
    if nolabel.any():
        raise AuditError(f"{path}: {listed(nolabel, 'train or valid rows without a label')}")
    empty = (df["path"] == "").to_numpy()
    if empty.any():
        raise AuditError(f"{path}: {listed(empty, 'rows without a path')}")
    dup = df["path"].duplicated(keep=False).to_numpy()
    if dup.any():
        raise AuditError(f"{path}: {listed(dup, 'rows name an image already listed')}")
    classes_txt = path.parent / "classes.txt"
    pool_only = not (df["split"] != "pool").any()
    named = _listed_classes(classes_txt, classes)
    if pool_only and named is None:
        raise AuditError(f"{path}: only pool rows; to start from no labels, list the classes in {classes_txt} "
                         "(one a line) or give --classes a,b,c")
    if named is not None:
        class_names = named
        unknown = (~df["label"].isin(class_names) & (df["label"] != "")).to_numpy()
        if unknown.any():
            where = "--classes" if classes is not None else str(classes_txt)
            raise AuditError(f"{path}: {listed(unknown, f'rows have a label not in {where}')}")
    else:
        class_names = tuple(sorted(set(df["label"][df["split"] != "pool"])))
        unknown = ((df["split"] == "pool") & (df["label"] != "") & ~df["label"].isin(class_names)).to_numpy()
        if unknown.any():
            raise AuditError(f"{path}: {listed(unknown, 'pool rows have a label no train or valid row has')}")
    if len(class_names) < 2:
        raise AuditError(f"{path}: found {len(class_names)} class(es); need at least 2 (or a classes.txt)")
    for s in SPLITS:
        if not pool_only and not (df["split"] == s).any():
            raise AuditError(f"{path}: no {s} rows; a manifest needs labelled train and valid images (or none of "
                             "either, with a classes.txt, to start from no labels)")
    files = [Path(p) if Path(p).is_absolute() else path.parent / p for p in df["path"]]
    missing = np.array([not f.is_file() for f in files])
    if missing.any():
        raise AuditError(f"{path}: {listed(missing, 'images do not exist')}")
    split = df["split"].to_numpy()
    order = np.concatenate([np.flatnonzero(split == name) for name in MANIFEST_SPLITS])  # rows grouped by split
    labelled = split[order] != "pool"
    if pool_only:  # no training images to take the size and mode from: the pool's
        labelled = np.ones(len(order), bool)
    ordered = [files[i] for i in order]

    def bad(rows):
        mask = np.zeros(len(files), bool)
        mask[order[[i for i, _ in rows]]] = True
        raise AuditError(f"{path}: {listed(mask, 'images are not readable')}")

    def colour(rows):
        mask = np.zeros(len(files), bool)
        mask[order[rows]] = True
        raise AuditError(f"{path}: the training images are greyscale but {listed(mask, 'pool images are colour')}"
                         "; convert them, or leave them out")

    x, cache = _read_images(path, ordered, labelled, image_size, progress, on_bad=bad, on_colour=colour)
    start = 0

    def take(name: str) -> Split | None:
        nonlocal start
        idx = np.flatnonzero(split == name)
        part = x[start:start + len(idx)]
        start += len(idx)
        if not len(idx) and name == "pool":
            return None
        y = np.array([class_names.index(df["label"][i]) if df["label"][i] else -1 for i in idx], np.int32)
        return Split(part, y, tuple(df["path"][i] for i in idx))

    train, valid, pool = take("train"), take("valid"), take("pool")
    return _finish_cached(train, valid, class_names, str(path), pool, cache)


def _read_images(where: Path, files: list[Path], labelled: np.ndarray, image_size: tuple[int, int] | None,
                 progress: Progress, *, on_bad, on_colour) -> tuple[np.ndarray, object]:
    """The images of ``files`` as one (N, C, H, W) uint8 array, in their order, and the
    image cache it is mapped from (None: decoded into memory; :mod:`audit.imagecache`).

    Two passes: the headers (size and mode of each, without decoding), then each image
    decoded, made L or RGB as it is, resized to ``image_size`` (H, W) or the most
    common size among the ``labelled`` ones with Lanczos, and made the data's mode:
    greyscale unless a labelled image is colour. ``on_bad(rows)``: raises for the
    unreadable ``[(row, reason), ...]``; ``on_colour(rows)``: for colour unlabelled rows
    beside greyscale labelled ones."""
    from collections import Counter

    from . import imagecache

    root = imagecache.cache_root()
    key = None
    if root is not None:
        mask = hashlib.sha256(np.packbits(labelled).tobytes()).hexdigest()
        key = imagecache.stat_key(where, files, ("images", image_size and list(image_size), len(files), mask))
        hit = imagecache.lookup(root, key, progress)
        if hit is not None:
            _say_resized(progress, where, hit.record.get("resized", 0), len(files), hit.x.shape[2:], image_size)
            return hit.x, hit
    sizes, grey, bad = [], [], []
    progress.start(f"check {where}", len(files))
    for i, p in enumerate(files):
        try:
            with _open_image(p) as im:
                sizes.append(im.size)
                grey.append(im.mode in _GREY_MODES)
        except _Unreadable as e:
            bad.append((i, str(e)))
            sizes.append(None)
            grey.append(True)
        progress.advance(1)
    progress.close()
    if bad:
        on_bad(bad)
    grey_data = all(g for g, lab in zip(grey, labelled) if lab)
    colour = [i for i, (g, lab) in enumerate(zip(grey, labelled)) if not g and not lab]
    if grey_data and colour:
        on_colour(colour)
    mode = "L" if grey_data else "RGB"
    if image_size is not None:
        size = (image_size[1], image_size[0])
    else:
        counts = Counter(sz for sz, lab in zip(sizes, labelled) if lab) or Counter(sizes)
        size = max(counts, key=lambda k: (counts[k], k))  # ties: the larger size, so the choice is stable
    resized = sum(sz != size for sz in sizes)
    shape = (len(files), 1 if mode == "L" else 3, size[1], size[0])
    _say_resized(progress, where, resized, len(files), shape[2:], image_size)

    def fill(x: np.ndarray) -> None:
        from PIL import Image

        failed = []
        progress.start(f"read {where}", len(files))
        for i, p in enumerate(files):
            try:
                with _open_image(p) as im:
                    im.load()
                    im = im.convert("L" if im.mode in _GREY_MODES else "RGB")
            except (_Unreadable, OSError, ValueError, SyntaxError) as e:
                failed.append((i, str(e)))
                progress.advance(1)
                continue
            if im.size != size:
                im = im.resize(size, Image.Resampling.LANCZOS)
            a = np.asarray(im.convert(mode), dtype=np.uint8)
            x[i] = a[None] if mode == "L" else a.transpose(2, 0, 1)
            progress.advance(1)
        progress.close()
        if failed:
            on_bad(failed)

    if root is None:
        x = np.empty(shape, np.uint8)
        fill(x)
        return x, None
    c = imagecache.build(root, key, shape, fill, {"what": str(where), "resized": int(resized)})
    return c.x, c


def _say_resized(progress: Progress, where, n: int, total: int, hw, image_size) -> None:
    if n:
        why = "--image-size" if image_size is not None else "the most common size; --image-size HxW sets another"
        progress.close(f"{where}: resized {n:,} of {total:,} images to {hw[0]}x{hw[1]} (HxW; {why}) "
                       f"with Pillow's {RESIZE_FILTER} filter")


class _Unreadable(Exception):
    """A file Pillow cannot open as an image; the message says why."""


def _open_image(p: Path):
    """``p`` opened by Pillow (header read, not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(p)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _Unreadable(str(e)) from None


def _finish_cached(train: Split, valid: Split, class_names: tuple[str, ...], source: str, pool: Split | None,
                   cache) -> Dataset:
    """:func:`_finish`, taking the fingerprint from the image cache where it recorded one
    for these labels (hashing a mapped dataset reads every image), else recording it."""
    if cache is None:
        return _finish(train, valid, class_names, source, pool)
    h = hashlib.sha256("\0".join(class_names).encode())
    for s in (train, valid, pool):
        if s is not None:
            h.update(str(len(s)).encode())
            h.update(np.ascontiguousarray(s.y).data)
            h.update("\0".join(s.paths or ()).encode())
    labels_key = h.hexdigest()
    fp = cache.fingerprint(labels_key)
    if fp is None:
        fp = fingerprint(train, valid, class_names, pool)
        cache.remember(labels_key, fp)
    start = {"train": 0, "valid": len(train), "pool": len(train) + len(valid)}
    mapped = {"folder": str(cache.folder), "key": cache.record["key"], "start": start}
    return Dataset(train, valid, class_names, source, fp, pool, mapped)


def holdout(dataset: Dataset, n: int, *, seed: int = 0) -> Dataset:
    """A dataset whose ``valid`` is ``n`` images carved at random from ``dataset.train``
    (seeded) and whose ``train`` is the rest; the original validation images are left
    out. For choosing settings without looking at the images results are reported on.
    """
    if not 0 < n < len(dataset.train):
        raise AuditError(f"n: expected 1..{len(dataset.train) - 1} held-out images, got {n}")
    perm = np.random.default_rng([seed, n]).permutation(len(dataset.train))
    held, rest = np.sort(perm[:n]), np.sort(perm[n:])
    t = dataset.train

    def take(idx):
        return Split(t.x[idx], t.y[idx], None if t.paths is None else tuple(t.paths[i] for i in idx))

    train, valid = take(rest), take(held)
    return _finish(train, valid, dataset.class_names, f"{dataset.source} (train, {n} held out)")


def read_subset(path: str | os.PathLike, n_train: int) -> np.ndarray:
    """Training indices from ``path``: ``.npy``, or text with one integer a line
    (a CSV whose header has an ``index`` column is read from that column)."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"--subset: {path} does not exist")
    if path.suffix == ".npy":
        try:
            idx = np.load(path, allow_pickle=False)
        except Exception as e:
            raise AuditError(f"--subset: {path} is not a readable .npy file ({e})") from None
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise AuditError(f"--subset: {path} must hold a 1-d integer array, got {idx.dtype} {idx.shape}")
        return _check_indices(idx.astype(np.int64), n_train, f"--subset: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise AuditError(f"--subset: {path} is neither .npy nor text with one index a line") from None
    return read_indices(text, n_train, f"--subset: {path}")


def read_indices(text: str, n_train: int, where: str) -> np.ndarray:
    """Training indices from text: one integer a line, or a CSV with an ``index`` column."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    col = 0
    if lines and not lines[0].lstrip("-").isdigit():
        header = [h.strip() for h in lines[0].split(",")]
        if "index" not in header:
            raise AuditError(f"{where}: first line {lines[0][:40]!r} is neither an index nor a header with 'index'")
        col, lines = header.index("index"), lines[1:]
    try:
        idx = np.array([int(ln.split(",")[col]) for ln in lines], dtype=object)
    except (ValueError, IndexError):
        bad = next(ln for ln in lines if len(ln.split(",")) <= col or not ln.split(",")[col].strip().lstrip("-").isdigit())
        raise AuditError(f"{where}: expected integer indices, found {bad[:40]!r}") from None
    return _check_indices(idx, n_train, where)


def _check_indices(idx: np.ndarray, n_train: int, where: str) -> np.ndarray:
    if idx.size == 0:
        raise AuditError(f"{where} lists no indices")
    out = np.array([not 0 <= int(i) < n_train for i in idx.tolist()], bool)  # exact, before any narrowing
    if out.any():
        raise AuditError(
            f"{where}: index {int(idx[out][0])} is out of range; the training split has "
            f"{n_train} images (0..{n_train - 1}); {int(out.sum())} out of range"
        )
    idx = idx.astype(np.int64)
    if np.unique(idx).size != idx.size:
        raise AuditError(f"{where}: {idx.size - np.unique(idx).size} duplicate indices")
    return idx
