from __future__ import annotations

import json

import functools
import gzip
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit import data as D
from audit.errors import AuditError
from conftest import MNIST_NAMES, make_shapes

# ----------------------------------------------------------------------------- MNIST


@pytest.mark.mnist
def test_mnist_loads_original_split(mnist_dir):
    ds = D.load_dataset("mnist", data_dir=mnist_dir)
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.train.x.dtype == np.uint8
    assert ds.valid.x.shape == (10000, 1, 28, 28)
    assert ds.train.y.dtype == np.int32 and ds.n_classes == 10
    # the original order: the first training labels are 5 0 4 1 9, the first test ones 7 2 1 0 4
    assert ds.train.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert ds.valid.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(ds.train.y).tolist()[1] == 6742
    assert ds.train.paths is None and len(ds.fingerprint) == 64


@pytest.mark.mnist
def test_mnist_search_order_env_then_cache(mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("AUDIT_DATA_DIR", str(mnist_dir))
    assert D.load_mnist().train.x.shape[0] == 60000
    monkeypatch.delenv("AUDIT_DATA_DIR")
    cache = D.default_cache_dir()
    assert str(cache).startswith(str(tmp_path))  # conftest isolates the cache
    shutil.copytree(mnist_dir, cache)
    assert D.load_mnist(download=False).valid.x.shape[0] == 10000


def _corrupt_copy(mnist_dir: Path, dst: Path, name: str, content: bytes) -> Path:
    dst.mkdir()
    for n in MNIST_NAMES:
        shutil.copy(mnist_dir / n, dst / n)
    (dst / name).write_bytes(content)
    return dst


@pytest.mark.mnist
def test_mnist_truncated_gzip_is_one_clear_error(mnist_dir, tmp_path):
    raw = (mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()
    d = _corrupt_copy(mnist_dir, tmp_path / "m", "t10k-labels-idx1-ubyte.gz", raw[: len(raw) // 2])
    with pytest.raises(AuditError, match=r"t10k-labels-idx1-ubyte.gz: not a readable gzip"):
        D.load_mnist(d)


@pytest.mark.mnist
def test_mnist_sha256_mismatch(mnist_dir, tmp_path):
    content = bytearray(gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    content[100] = (content[100] + 1) % 10  # one flipped label
    d = _corrupt_copy(mnist_dir, tmp_path / "m", "t10k-labels-idx1-ubyte.gz", gzip.compress(bytes(content)))
    with pytest.raises(AuditError, match=r"t10k-labels-idx1-ubyte.gz: sha256 of the content is"):
        D.load_mnist(d)


def test_idx_parsers_reject_bad_headers(tmp_path):
    with pytest.raises(AuditError, match="truncated IDX header"):
        D._parse_idx_images(b"\x00\x00\x08", tmp_path / "x")
    with pytest.raises(AuditError, match="magic"):
        D._parse_idx_labels(b"\x00\x00\x08\x03\x00\x00\x00\x01\x05", tmp_path / "y")
    header = b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2
    with pytest.raises(AuditError, match="bytes of pixels, expected 2x2x2"):
        D._parse_idx_images(header + b"\x00" * 7, tmp_path / "x")
    assert D._parse_idx_images(header + bytes(range(8)), tmp_path / "x").shape == (2, 1, 2, 2)


def test_missing_data_dir_and_path(tmp_path):
    with pytest.raises(AuditError, match="--data-dir: .* is not a folder"):
        D.load_dataset("mnist", data_dir=tmp_path / "nope")
    with pytest.raises(AuditError, match="--data: .*nothing.npz does not exist"):
        D.load_dataset(tmp_path / "nothing.npz")


def test_mnist_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AUDIT_DATA_DIR", raising=False)
    # port 9 (discard) on loopback: the connection is refused at once, as offline
    monkeypatch.setattr(D, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(AuditError, match="the four IDX files are in none of .*, and could not download .* \\(offline\\?\\)"):
        D.load_mnist(tmp_path)
    assert not any(D.default_cache_dir().glob("*.gz"))


@pytest.mark.mnist
def test_mnist_downloads_from_a_mirror_into_the_cache(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("AUDIT_DATA_DIR", raising=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mnist_dir))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        monkeypatch.setattr(D, "MNIST_MIRRORS", ("http://127.0.0.1:9/", f"http://127.0.0.1:{port}/"))
        ds = D.load_mnist()
    finally:
        server.shutdown()
        server.server_close()
    assert ds.train.x.shape[0] == 60000
    assert sorted(p.name for p in D.default_cache_dir().iterdir()) == sorted(MNIST_NAMES)


# ------------------------------------------------------------------------------- npz


def _npz(tmp_path, name="d.npz", **arrays):
    x, y = make_shapes(5, size=12)
    base = dict(x_train=x, y_train=y, x_valid=x[:6], y_valid=y[:6])
    base.update(arrays)
    base = {k: v for k, v in base.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **base)
    return path


def test_npz_roundtrip(shapes_npz):
    ds = D.load_dataset(shapes_npz)
    assert ds.train.x.shape == (300, 1, 16, 16) and ds.train.x.dtype == np.uint8
    assert ds.valid.x.shape == (90, 1, 16, 16)
    assert ds.class_names == ("0", "1", "2") and ds.train.y.dtype == np.int32
    assert D.load_dataset(shapes_npz).fingerprint == ds.fingerprint


def test_npz_float_and_nchw_and_class_names(tmp_path):
    x, y = make_shapes(4, size=12, channels=3)
    p = _npz(tmp_path, x_train=x.astype(np.float32) / 255, y_train=y, x_valid=x[:3].astype(np.float32) / 255,
             y_valid=y[:3], class_names=np.array(["h", "v", "d", "empty"]))
    ds = D.load_dataset(p)
    assert ds.train.x.dtype == np.float32 and ds.image_shape == (3, 12, 12)
    assert ds.class_names == ("h", "v", "d", "empty") and ds.n_classes == 4


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(y_valid=None), r"missing array\(s\) y_valid"),
        (dict(x_train=np.zeros((15, 12), np.uint8)), r"x_train: expected N x H x W or N x C x H x W"),
        (dict(x_train=np.zeros((15, 12, 12), np.int16)), r"x_train: expected uint8 or float images, got dtype int16"),
        (dict(y_train=np.zeros(15, np.float32)), r"y_train: expected integer labels, got dtype float32"),
        (dict(y_train=np.zeros((15, 2), np.int64)), r"y_train: expected a 1-d array"),
        (dict(y_train=np.arange(14)), r"x_train has 15 images but y_train has 14 labels"),
        (dict(y_valid=np.array([0, 1, 2, -1, 0, 0])), r"y_valid: label -1 is out of range"),
        (dict(y_train=np.full(15, 7), class_names=np.array(["a", "b", "c"])), r"y_train\[0\] = 7 is out of range; expected labels in 0..2"),
        (dict(x_valid=np.zeros((6, 1, 10, 10), np.uint8)), r"x_train images are \(1, 12, 12\) but x_valid images are \(1, 10, 10\)"),
    ],
)
def test_npz_bad_input(tmp_path, arrays, message):
    with pytest.raises(AuditError, match=message):
        D.load_dataset(_npz(tmp_path, **arrays))


def test_npz_not_a_zip(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(AuditError, match=r"junk.npz: not an .npz file \(not a zip archive\)"):
        D.load_dataset(p)
    import zipfile

    with zipfile.ZipFile(p, "w") as z:  # a zip with the right names but no arrays inside
        for name in ("x_train", "y_train", "x_valid", "y_valid"):
            z.writestr(f"{name}.npy", b"garbage")
    with pytest.raises(AuditError, match=r"junk.npz: not a readable .npz file"):
        D.load_dataset(p)


# ---------------------------------------------------------------------------- folder


def _folder(tmp_path, mode="L", size=(12, 12), classes=("cat", "dog"), n=3):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


def test_folder_greyscale(tmp_path):
    ds = D.load_dataset(_folder(tmp_path))
    assert ds.class_names == ("cat", "dog") and ds.train.x.shape == (6, 1, 12, 12)
    assert ds.train.paths[0] == "train/cat/0.png" and ds.valid.y.tolist() == [0, 0, 0, 1, 1, 1]
    img = np.asarray(Image.open(tmp_path / "imgs/train/dog/2.png"))
    np.testing.assert_array_equal(ds.train.x[5, 0], img)


def test_folder_rgb_and_jpg(tmp_path):
    root = _folder(tmp_path, mode="RGB", size=(10, 8))
    Image.new("RGB", (10, 8), (255, 0, 0)).save(root / "train/cat/red.jpg")
    ds = D.load_dataset(root)
    assert ds.image_shape == (3, 8, 10)
    red = ds.train.x[ds.train.paths.index("train/cat/red.jpg")]
    assert red[0].mean() > 200 and red[1].mean() < 50


def test_folder_empty_class(tmp_path):
    root = _folder(tmp_path)
    (root / "valid" / "bird").mkdir()
    with pytest.raises(AuditError, match=r"valid/bird: class 'bird' is not among the train classes"):
        D.load_dataset(root)
    (root / "valid" / "bird").rmdir()
    (root / "train" / "bird").mkdir()
    with pytest.raises(AuditError, match=r"train/bird: class folder has no images"):
        D.load_dataset(root)


def test_folder_unreadable_image_is_named(tmp_path):
    root = _folder(tmp_path)
    (root / "train/dog/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(AuditError, match=r"train/dog/broken.png: not a readable image"):
        D.load_dataset(root)


class Lines:
    """A progress that keeps its summary lines."""

    def __init__(self):
        self.lines = []

    def start(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass

    def close(self, summary=None):
        if summary:
            self.lines.append(summary)


def test_folder_of_mixed_sizes_is_resized_and_says_so(tmp_path):
    """Images of another size are resized to the most common size (or --image-size) with
    Lanczos, and a line says how many; the size is part of the data (fingerprint)."""
    root = _folder(tmp_path)
    big = np.zeros((20, 20), np.uint8)
    big[:, 10:] = 255
    Image.fromarray(big).save(root / "valid/cat/big.png")
    lines = Lines()
    ds = D.load_dataset(root, progress=lines)
    assert ds.image_shape == (1, 12, 12)
    assert lines.lines == [f"{root}: resized 1 of 13 images to 12x12 (HxW; the most common size; --image-size HxW "
                           "sets another) with Pillow's Lanczos filter"]
    i = ds.valid.paths.index("valid/cat/big.png")
    want = np.asarray(Image.fromarray(big).resize((12, 12), Image.Resampling.LANCZOS))
    assert np.array_equal(ds.valid.x[i, 0], want)
    lines = Lines()
    ds2 = D.load_dataset(root, image_size=(16, 8), progress=lines)
    assert ds2.image_shape == (1, 16, 8) and "resized 13 of 13 images to 16x8 (HxW; --image-size)" in lines.lines[0]
    assert ds2.fingerprint != ds.fingerprint
    for bad in ("12", "0x4", "12x", "ax3", "5000x5000"):
        with pytest.raises(AuditError, match="^image_size: expected HxW"):
            D.parse_image_size(bad)
    (tmp_path / "x.npz").touch()
    with pytest.raises(AuditError, match="--image-size: an .npz"):
        D.load_dataset(tmp_path / "x.npz", image_size=(8, 8))


def test_image_size_is_the_runs(tmp_path):
    """--image-size is recorded in run.json; the run's data is loaded again at that size."""
    from typer.testing import CliRunner

    from audit.cli import app

    root = _folder(tmp_path, n=6)
    Image.new("L", (20, 20)).save(root / "valid/cat/big.png")
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(root), "--run", str(run), "--epochs", "1", "--image-size", "10x10"])
    assert r.exit_code == 0, r.output
    assert "resized 25 of 25 images to 10x10 (HxW; --image-size)" in r.output
    meta = json.loads((run / "run.json").read_text())
    assert meta["data"]["image_size"] == [10, 10] and meta["data"]["image_shape"] == [1, 10, 10]
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["score", "--run", str(run), "--samples", "2", "--image-size", "12x12"])
    assert r.exit_code == 2 and "--image-size: " in r.output and "trained already" in r.output
    r = runner.invoke(app, ["train", "--data", str(root), "--run", str(tmp_path / "r2"), "--image-size", "tall"])
    assert r.exit_code == 2 and "error: --image-size: expected HxW" in r.output


def test_folder_without_splits(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(AuditError, match=r"has no train/ folder"):
        D.load_dataset(tmp_path / "flat")
