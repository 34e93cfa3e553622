"""Exact duplicates: images whose pixels are identical, within a split or across the
training and validation splits (leakage: the validation score then measures memory).

Pure: arrays in, a table out. Each image is hashed (BLAKE2b, 128 bits, over its dtype,
shape and bytes); images with the same hash are one group.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

DUPLICATE_COLUMNS = ("group", "split", "index", "path", "kind")
KINDS = ("across train and valid", "within train", "within valid")


def image_hashes(x: np.ndarray) -> list[bytes]:
    """A 128-bit digest of each image of ``x`` (N, ...)."""
    head = str((x.dtype.str, x.shape[1:])).encode()
    return [hashlib.blake2b(head + np.ascontiguousarray(img).tobytes(), digest_size=16).digest() for img in x]


def exact_duplicates(splits: dict[str, tuple[np.ndarray, tuple[str, ...] | None]]) -> pd.DataFrame:
    """Groups of identical images among ``splits`` ({name: (images, paths or None)}):
    one row per image in a group of two or more, DUPLICATE_COLUMNS. ``kind`` is "across
    train and valid" for a group in both, else "within <split>". Groups are numbered
    from 0 in the order of their first image (split order, then index)."""
    members: dict[bytes, list[tuple[str, int]]] = {}
    for name, (x, _) in splits.items():
        for i, h in enumerate(image_hashes(x)):
            members.setdefault(h, []).append((name, i))
    rows = []
    for group in (g for g in members.values() if len(g) > 1):
        names = {s for s, _ in group}
        kind = "across train and valid" if {"train", "valid"} <= names else f"within {group[0][0]}"
        gid = len({r["group"] for r in rows})
        for s, i in group:
            paths = splits[s][1]
            rows.append({"group": gid, "split": s, "index": i, "path": paths[i] if paths else "", "kind": kind})
    return pd.DataFrame(rows, columns=list(DUPLICATE_COLUMNS))


def duplicate_summary(df: pd.DataFrame) -> dict:
    """Counts for run.json and the CLI: groups and images, and groups of each kind."""
    groups = df.drop_duplicates("group")
    return {"groups": int(len(groups)), "images": int(len(df)),
            **{kind: int((groups["kind"] == kind).sum()) for kind in KINDS}}
