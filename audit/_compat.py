"""Make Chainer 7.8.1 (frozen since 2022) import and run on NumPy 2.

Imported by ``audit/__init__.py`` before anything touches chainer, and by
``tests/conftest.py``; any interpreter that imports chainer through ``audit`` gets
it. Each fix targets one known line of chainer 7.8.1 (see
shared/docs/chainer-2026.md); all are no-ops on NumPy 1.x.
"""

from __future__ import annotations

import sys
import types

import numpy as np


def _restore_sctypes() -> None:
    # chainer/functions/array/as_strided.py reads np.sctypes['int'] at import time
    # and np.sctypes['float'] in backward; NumPy 2 removed the attribute.
    if "sctypes" in np.__dict__:
        return
    np.sctypes = {  # type: ignore[attr-defined]
        "int": [np.int8, np.int16, np.int32, np.int64],
        "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
        "float": [np.float16, np.float32, np.float64, np.longdouble],
        "complex": [np.complex64, np.complex128, np.clongdouble],
        "others": [bool, object, bytes, str, np.void],
    }


def _skip_environment_check() -> None:
    # chainer/__init__.py imports chainer._environment_check, which imports
    # numpy.distutils (gone on NumPy 2 and Python >= 3.12) and pkg_resources (gone in
    # setuptools >= 82) only to print advisory warnings. A no-op module in its place.
    name = "chainer._environment_check"
    if name in sys.modules:
        return
    stub = types.ModuleType(name)
    stub.check = lambda: None  # type: ignore[attr-defined]
    sys.modules[name] = stub


def _patch_categorical_log_prob() -> None:
    # np.meshgrid returns a tuple on NumPy 2; Categorical.log_prob does `mg + [x]`.
    from chainer.distributions import categorical

    cls = categorical.Categorical
    if getattr(cls.log_prob, "_audit_patched", False):
        return

    def log_prob(self, x):
        import chainer

        mg = list(np.meshgrid(*(range(i) for i in self.batch_shape), indexing="ij"))
        data = x.data if isinstance(x, chainer.Variable) else x
        return self.log_p[tuple(mg + [data.astype(np.int32)])]

    log_prob._audit_patched = True  # type: ignore[attr-defined]
    cls.log_prob = log_prob


_restore_sctypes()
_skip_environment_check()

import chainer  # noqa: E402  (must come after the two fixes above)

_patch_categorical_log_prob()

__all__ = ["chainer"]
