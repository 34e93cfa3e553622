"""Shared fixtures: small generated datasets, and MNIST where it is available."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import audit._compat  # noqa: F401  (before anything imports chainer)
import numpy as np
import pytest

MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def make_shapes(n_per_class: int, *, size: int = 16, seed: int = 0, channels: int = 1):
    """(x, y): uint8 images of three easy classes (horizontal bar, vertical bar,
    diagonal), with pixel noise and random offsets. (N, C, size, size)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(3):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size)).astype(np.int32)
            o = int(rng.integers(3, size - 3))
            if c == 0:
                img[o - 1 : o + 2, 2:-2] += 180
            elif c == 1:
                img[2:-2, o - 1 : o + 2] += 180
            else:
                for i in range(2, size - 2):
                    img[i, max(0, i - 1) : i + 2] += 180
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    x = np.stack(xs)[:, None]
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    perm = rng.permutation(len(ys))
    return x[perm], np.array(ys, dtype=np.int64)[perm]


def write_shapes_npz(path: Path, n_train: int, n_valid: int, seeds=(1, 2), **override) -> Path:
    """An .npz of make_shapes' three classes: n_train and n_valid images per class."""
    x_train, y_train = make_shapes(n_train, seed=seeds[0])
    x_valid, y_valid = make_shapes(n_valid, seed=seeds[1])
    arrays = dict(x_train=x_train[:, 0], y_train=y_train, x_valid=x_valid[:, 0], y_valid=y_valid)
    np.savez(path, **{**arrays, **override})
    return path


def assert_one_line_error(result, *fragments, code=None) -> str:
    """A CliRunner result that failed with exactly one ``error:`` line holding every
    fragment, and no traceback; returns that line."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def shapes_npz(tmp_path_factory) -> Path:
    """A 3-class .npz: 300 train and 90 valid 16x16 greyscale images."""
    return write_shapes_npz(tmp_path_factory.mktemp("data") / "shapes.npz", 100, 30)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with MNIST's four IDX files ($AUDIT_DATA_DIR); skips without it."""
    d = os.environ.get("AUDIT_DATA_DIR")
    if not d or not all((Path(d) / n).is_file() for n in MNIST_NAMES):
        pytest.skip("MNIST IDX files not found: set AUDIT_DATA_DIR to the folder holding them")
    return Path(d)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never let a test download into or read from the user's real cache. The image
    cache is off (folders and manifests decoded into memory) unless
    ``AUDIT_TEST_IMAGE_CACHE=1``: then every test runs with one of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if os.environ.get("AUDIT_TEST_IMAGE_CACHE") == "1":
        monkeypatch.setenv("AUDIT_IMAGE_CACHE", str(tmp_path / "imagecache"))
    else:
        monkeypatch.delenv("AUDIT_IMAGE_CACHE", raising=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where CuPy has no usable GPU."""
    from audit.device import gpu_count

    if any("gpu" in item.keywords for item in items) and gpu_count() == 0:
        skip = pytest.mark.skip(reason="no usable CUDA GPU (cupy missing, or no driver/device)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# ------------------------------------------------------------------- headless Chromium


def chromium_path() -> str | None:
    for name in (os.environ.get("AUDIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set AUDIT_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_stored(page, n: int, timeout_ms: int = 15000) -> None:
    """Wait until a second page of `page`'s browser context sees `n` decisions in local
    storage. The browser stores a page's writes behind its back; reloading at once on a
    loaded machine can race them (seen once in CI), which a user never does."""
    other = page.context.new_page()
    try:
        other.goto(page.url)
        other.wait_for_function(
            "n => Object.values(localStorage).some(v => Object.keys(JSON.parse(v)).length === n)",
            arg=n, timeout=timeout_ms)
    finally:
        other.close()
