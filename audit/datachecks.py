"""Data problems beyond labels: near-duplicates (and leakage across the training and
validation splits), outliers, and class imbalance. Pure: arrays in, tables and counts
out. Exact duplicates are :mod:`audit.dupes`'s.

Near-duplicates (two images of the same content, one shifted by a pixel, noised or with
another contrast) are found in two steps:

1. **Candidates** by nearest neighbours on a small pixel descriptor: each image moved
   so that its centre of mass is at the centre (whole pixels, then the fraction by
   bilinear interpolation: a shifted copy lands where its original does), blurred,
   pooled 4x4, less its mean, unit length. Pairs whose descriptors have a cosine of at
   least CANDIDATE_COSINE, each image keeping its ``NEIGHBOURS`` nearest, are
   candidates. Up to INDEX_FROM images the search is exact (:func:`similar_pairs`):
   chunks of rows against all rows as one matrix product each, so memory is bounded by
   the chunk; its time grows with N squared (about 15 s for 60,000 images on 2 cores).
   Past it, an inverted-file index written here (:func:`indexed_pairs`: k-means lists,
   each image compared with the images of its PROBES nearest lists) takes time about
   N^1.5; on MNIST's 70,000 it found 99.98% of the exact search's pairs, on 200,000
   grown from them 99.73% (bench/near_index.py).
2. **Verified** in full resolution: the normalised cross-correlation of the two
   (whole-pixel) centred images, best over shifts of up to one pixel, at least
   ``threshold`` (default 0.99). Correlation ignores brightness and contrast; the
   best shift absorbs what centring left.

The network's features are not used for this: measured on MNIST, a noised and shifted
copy is farther from its original in the trunk's features (cosine 0.79-0.91) than
different writers' digits are from each other (0.95-0.997); the features describe the
class, not the picture. Neither is cleanlab's near-duplicate check (it works on such
features).

Outliers: an image unlike anything in the data. Each image's mean distance to its
``OUTLIER_NEIGHBOURS`` nearest among a seeded reference of at most REFERENCE images
(exact copies counted once, so a block of identical blank images does not make each
other typical) is turned into a robust z-score, (d - median) / (1.4826 MAD), in two
spaces: the near-duplicate descriptors (they see inverted, blank and saturated images:
a flat image has the zero descriptor, far from every image with a shape) and the
trunk's features, reduced to 64 dimensions by scikit-learn's PCA (what no class looks
like). A flat image (one value in every pixel: blank, saturated, one colour, a failed
decode) gets the largest pixel distance unit descriptors can have, 2, so it is
always listed. The outlier score is the larger z; images at or above ``z`` (default 5)
are listed.

Turned images (sideways or upside down: a wrong EXIF orientation, a scanner's page
turned) look like their class to both distances. They are found by a probe of
orientation (:func:`turned_probability`): a seeded sample of the images, each turned by
a quarter, a half and three quarters (a half only where images are not square), is run
through the network's trunk; per class, a logistic regression (scikit-learn) learns to
tell the four orientations apart from those features (reduced by PCA fitted on them).
An image whose probe puts at most 1 - TURNED_P (0.5%) on "upright, as its class's
images are", and that turned back fits its class's principal shapes (below) better by
at least TURN_GAIN, is listed (:func:`is_turned`): the features and the pixels must
agree, which leaves out most of the odd upright digits the probe alone lists. Each
image of the sample is judged by a probe it did not teach; a class whose probes call
more than TURN_DOUBT (5%) of its own sample turned, or do no better than chance on it,
is not judged (its images look alike every way up, as textures do, or it has too few).

Unlike their class's shapes (scribbles, stray marks, another kind of picture under a
label), which sit near enough to some image to pass both distances: per class, the
principal components of the pixels (:class:`ClassShapes`: SHAPE_DIMS of them, fitted
twice on halves of a sample so that no image is measured against components it helped
fit); an image's residual after projecting onto them, the smallest over one-pixel
shifts, over its own norm, as a robust z-score (``shape_z``), listed from SHAPE_Z (its
own scale: the residual has a longer tail than the distances). A PCA of a class's images
is the classical one-class model (SIMCA's). Measured on MNIST (bench/data_issues.py):
digits rotated by 90 degrees are found by the probe, random strokes by the shapes.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd

from threadpoolctl import threadpool_limits

from .data import to_float32
from .device import in_blocks
from .errors import bad_param

NEIGHBOURS = 5
NEAR_THRESHOLD = 0.99
CANDIDATE_COSINE = 0.98  # descriptor cosine a pair must reach to be verified
REFERENCE = 10000  # rows an outlier score compares each image with
OUTLIER_NEIGHBOURS = 30
OUTLIER_Z = 5.0
FEATURE_DIMS = 64
FLAT_DISTANCE = 2.0  # a flat image's pixel distance: that of two opposite unit descriptors
NEAR_COLUMNS = ("pair", "split", "index", "path", "other_split", "other_index", "other_path", "similarity", "kind")
TURNED_P = 0.995  # listed as turned at or above this probability of not being upright
TURN_SAMPLE = 20000  # images at most whose turned copies teach the orientation probe
TURN_MIN = 200  # a class with fewer images in the sample is not judged (each probe is taught by half)
TURN_DOUBT = 0.05  # a class's probes that call more of its sample turned are not trusted
TURN_DIMS = 128
TURN_C = 0.3  # the probe's inverse regularisation strength (chosen on MNIST, seed 0's planting)
SHAPE_DIMS = 60  # principal shapes a class is described by (chosen on MNIST, seeds 0 and 2's plantings)
SHAPE_Z = 7.0  # listed at or above this robust z of the shape residual (chosen there too)
SHAPE_SIDE = 32  # larger images are pooled to at most this many pixels a side first
SHAPE_FIT = 5000  # images of a class at most that its principal shapes are fitted on
SHAPE_MIN = 200  # a class with fewer images is not judged
SHAPE_SCALE = 0.01  # the least spread of residuals their z is taken over (1% of an image's norm): in
# data its shapes rebuild all but exactly, a rounding's worth more is not unlike the class
TURN_GAIN = 0.05  # a turned image's shape residual must fall by this much turned back (chosen with SHAPE_Z)
OUTLIER_COLUMNS = ("split", "index", "path", "label", "outlier_score", "pixel_z", "feature_z", "turned", "turned_gain",
                   "shape_z")
KINDS = ("across train and valid", "within train", "within valid")
_CHUNK = 4096
# products are computed in blocks of at most this many entries (32 MB of float32), each
# block's rows on one thread; about 4 such arrays a block are alive at once
_BLOCK = 1 << 23
_BLOCK_BYTES = 16 * _BLOCK


def check_threshold(threshold: float) -> None:
    if not (0.0 < threshold <= 1.0):
        raise bad_param("near_threshold", f"expected a correlation in (0, 1], got {threshold}")


def check_z(z: float) -> None:
    if not (np.isfinite(z) and z > 0):
        raise bad_param("outlier_z", f"expected a positive robust z-score, got {z}")


def _gray(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) images as (N, H, W) float32 in [0, 1], channels averaged."""
    return to_float32(x).mean(axis=1, dtype=np.float32)


def centred(x: np.ndarray) -> np.ndarray:
    """Each image (N, C, H, W) rolled by whole pixels so that its centre of mass sits at
    the centre (channels averaged for the mass); (N, C, H, W) float32. An image with no
    mass stays where it is."""
    g = _gray(x)
    n, h, w = g.shape
    mass = g.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1)
    cy = (g.sum(axis=2) * np.arange(h)).sum(axis=1) / safe
    cx = (g.sum(axis=1) * np.arange(w)).sum(axis=1) / safe
    dy = np.where(mass > 0, np.floor((h - 1) / 2 - cy + 0.5), 0).astype(int)
    dx = np.where(mass > 0, np.floor((w - 1) / 2 - cx + 0.5), 0).astype(int)
    out = to_float32(x).copy()
    for sy, sx in set(zip(dy.tolist(), dx.tolist())):
        if sy or sx:
            rows = np.flatnonzero((dy == sy) & (dx == sx))
            out[rows] = np.roll(out[rows], (sy, sx), axis=(2, 3))
    return out


def _pool2(g: np.ndarray) -> np.ndarray:
    n, h, w = g.shape
    return g[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def _unit(v: np.ndarray) -> np.ndarray:
    v = v - v.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(norm > 1e-6, v / np.maximum(norm, 1e-12), 0).astype(np.float32)


def _subpixel(g: np.ndarray) -> np.ndarray:
    """(N, H, W) images moved by the fraction of a pixel (bilinear) that brings each
    one's centre of mass to the centre; what whole-pixel centring leaves, so a copy
    shifted by a pixel gets the same descriptor as its original."""
    n, h, w = g.shape
    mass = np.maximum(g.sum(axis=(1, 2)), 1e-12)
    fy = ((h - 1) / 2 - (g.sum(axis=2) * np.arange(h)).sum(axis=1) / mass)[:, None, None]
    fx = ((w - 1) / 2 - (g.sum(axis=1) * np.arange(w)).sum(axis=1) / mass)[:, None, None]
    for f, axis in ((fy, 1), (fx, 2)):
        toward = np.where(f > 0, np.roll(g, 1, axis=axis), np.roll(g, -1, axis=axis))
        g = (1 - np.abs(f)) * g + np.abs(f) * toward
    return g.astype(np.float32)


def descriptors(c: np.ndarray) -> np.ndarray:
    """Near-duplicate descriptors of centred images (N, C, H, W): moved to the exact
    centre of mass, blurred (3x3 box), pooled 4x4, less the mean, unit length;
    (N, D) float32."""
    g = _subpixel(c.mean(axis=1, dtype=np.float32))
    n, h, w = g.shape
    p = np.pad(g, ((0, 0), (1, 1), (1, 1)))
    blur = sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / np.float32(9)
    return _unit(_pool2(_pool2(blur)).reshape(n, -1))


def best_correlation(a: np.ndarray, b: np.ndarray, reach: int = 1) -> np.ndarray:
    """Normalised cross-correlation of image pairs a[i], b[i] ((P, C, H, W) float), best
    over shifts of b by up to ``reach`` pixels each way (wrapping); 0 where either
    image is flat."""
    n = len(a)
    ua = _unit(a.reshape(n, -1))
    best = np.full(n, -1.0, np.float32)
    for sy in range(-reach, reach + 1):
        for sx in range(-reach, reach + 1):
            ub = _unit(np.roll(b, (sy, sx), axis=(2, 3)).reshape(n, -1))
            best = np.maximum(best, np.einsum("ij,ij->i", ua, ub))
    return best


def _kind(s1: str, s2: str) -> str:
    return "across train and valid" if s1 != s2 else f"within {s1}"


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first of each group of identical images, and each image's group."""
    from .dupes import image_hashes

    seen: dict[bytes, int] = {}
    inverse = np.empty(len(x), np.int64)
    first = []
    for i, h in enumerate(image_hashes(x)):
        if h not in seen:
            seen[h] = len(first)
            first.append(i)
        inverse[i] = seen[h]
    return np.asarray(first, np.int64), inverse


class Images:
    """The scored splits stacked, with what both checks need, each computed once:
    ``where`` (split, index) of each row, ``first`` (the first row of each group of
    identical images) and ``inverse`` (each row's group), the unique images
    ``centred`` and their ``descriptors``."""

    def __init__(self, splits: dict[str, tuple[np.ndarray, tuple[str, ...] | None]]) -> None:
        names = list(splits)
        self.splits = splits
        self.x = np.concatenate([splits[s][0] for s in names]) if len(names) > 1 else splits[names[0]][0]
        self.where = [(s, i) for s in names for i in range(len(splits[s][0]))]
        self.first, self.inverse = _unique_rows(self.x)

    @cached_property
    def centred(self) -> np.ndarray:
        f = self.first
        return np.concatenate([centred(self.x[f[a:a + _CHUNK]]) for a in range(0, len(f), _CHUNK)])

    @cached_property
    def descriptors(self) -> np.ndarray:
        return descriptors(self.centred)

    @cached_property
    def flat(self) -> np.ndarray:
        """(unique images,) bool: one value in every pixel and channel."""
        f = self.first
        out = np.empty(len(f), bool)
        for a in range(0, len(f), _CHUNK):
            x = np.asarray(self.x[f[a:a + _CHUNK]])
            x = x.reshape(len(x), -1)
            out[a:a + len(x)] = (x == x[:, :1]).all(axis=1)
        return out


def similar_pairs(d: np.ndarray, *, at_least: float, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Pairs (i, j), i < j, of rows of ``d`` (N, D) unit vectors whose cosine is at
    least ``at_least``, each row keeping its ``neighbours`` most similar; (P, 2) int64.
    Exact, in chunks of rows (memory bounded by the chunk times N)."""
    def block(a: int, b: int) -> np.ndarray:
        s = d[a:b] @ d.T
        s[np.arange(len(s)), np.arange(a, b)] = -np.inf  # not with itself
        rows, cols = np.nonzero(s >= at_least)
        sims = s[rows, cols]
        # the most similar first within each row, then at most `neighbours` a row
        order = np.lexsort((-sims, rows))
        rows, cols = rows[order], cols[order]
        start = np.searchsorted(rows, rows, side="left")
        keep = (np.arange(len(rows)) - start) < neighbours
        i, j = rows[keep] + a, cols[keep]
        return np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)

    # at most 32M similarities a block
    pairs = [p for p in in_blocks(block, len(d), min(_CHUNK, _BLOCK // max(len(d), 1)), block_bytes=_BLOCK_BYTES)
             if len(p)]
    if not pairs:
        return np.empty((0, 2), np.int64)
    return np.unique(np.concatenate(pairs).astype(np.int64), axis=0)


# past this many (unique) images the candidate search is indexed (:func:`indexed_pairs`),
# not exact: an exact search's time grows with N squared
INDEX_FROM = 100_000
PROBES = 8  # lists an indexed search looks in for each image


def candidate_pairs(d: np.ndarray, *, at_least: float, neighbours: int = NEIGHBOURS, seed: int = 0) -> np.ndarray:
    """:func:`similar_pairs` up to INDEX_FROM rows, :func:`indexed_pairs` past it."""
    if len(d) <= INDEX_FROM:
        return similar_pairs(d, at_least=at_least, neighbours=neighbours)
    return indexed_pairs(d, at_least=at_least, neighbours=neighbours, seed=seed)


def indexed_pairs(d: np.ndarray, *, at_least: float, neighbours: int = NEIGHBOURS, lists: int | None = None,
                  probes: int = PROBES, seed: int = 0) -> np.ndarray:
    """:func:`similar_pairs` by an inverted-file index, in time about N^1.5: the rows
    are cut into ``lists`` (default sqrt N) by k-means on their unit vectors
    (scikit-learn's MiniBatchKMeans on a seeded sample, centroids made unit length),
    each row belonging to the list of its most similar centroid; each row is compared
    with the rows of the ``probes`` lists whose centroids are most similar to it. A pair
    is found when either row's list is among the other's probes, so it misses only
    pairs split across lists far apart (a near-duplicate pair at cosine 0.98 rarely
    is: the recall is measured in bench/README.md). Memory is bounded by the chunks."""
    from sklearn.cluster import MiniBatchKMeans

    n = len(d)
    lists = int(lists or min(4096, max(1, round(n ** 0.5))))
    probes = min(probes, lists)
    rng = np.random.default_rng(seed)
    sample = d[np.sort(rng.choice(n, size=min(n, 64 * lists), replace=False))]
    km = MiniBatchKMeans(n_clusters=lists, random_state=seed, n_init=1, batch_size=4096).fit(sample)
    centres = km.cluster_centers_.astype(d.dtype)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)

    def probed(a: int, b: int) -> np.ndarray:  # rows' probed lists, the most similar first
        s = d[a:b] @ centres.T
        top = np.argpartition(-s, probes - 1, axis=1)[:, :probes]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)

    near = np.concatenate(in_blocks(probed, n, _BLOCK // lists, block_bytes=_BLOCK_BYTES)).astype(np.int64)
    home = near[:, 0]
    members = np.argsort(home, kind="stable")
    bounds = np.searchsorted(home[members], np.arange(lists + 1))
    queries = np.argsort(near.ravel(), kind="stable")
    q_bounds = np.searchsorted(near.ravel()[queries], np.arange(lists + 1))

    def compared(first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # lists [first, last)
        found_i, found_j, found_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, d.dtype)]
        for lst in range(first, last):
            m = members[bounds[lst]:bounds[lst + 1]]
            q = queries[q_bounds[lst]:q_bounds[lst + 1]] // probes
            if not len(m) or not len(q):
                continue
            qstep = max(1, _BLOCK // len(m))
            for a in range(0, len(q), qstep):
                qq = q[a:a + qstep]
                s = d[qq] @ d[m].T
                s[qq[:, None] == m[None, :]] = -np.inf  # not with itself
                r, c = np.nonzero(s >= at_least)
                found_i.append(qq[r])
                found_j.append(m[c])
                found_s.append(s[r, c])
        return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)

    found = in_blocks(compared, lists, 16, block_bytes=_BLOCK_BYTES)
    i, j, sims = (np.concatenate([f[x] for f in found]) for x in range(3))
    if not len(i):
        return np.empty((0, 2), np.int64)
    order = np.lexsort((-sims, i))  # the most similar first within each row, at most `neighbours` a row
    i, j = i[order], j[order]
    keep = (np.arange(len(i)) - np.searchsorted(i, i, side="left")) < neighbours
    i, j = i[keep], j[keep]
    return np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1).astype(np.int64), axis=0)


def near_duplicates(splits: dict[str, tuple[np.ndarray, tuple[str, ...] | None]], *,
                    threshold: float = NEAR_THRESHOLD, neighbours: int = NEIGHBOURS,
                    images: Images | None = None) -> pd.DataFrame:
    """Pairs of near-duplicate images among ``splits`` ({name: (images, paths)}): one row
    per image of a pair (NEAR_COLUMNS, two rows share ``pair``), pairs across train and
    valid first, then by similarity. Identical images are one image here (they are
    exact duplicates, :mod:`audit.dupes`); a pair names the first copy of each.
    ``images``: the splits prepared already (:class:`Images`)."""
    check_threshold(threshold)
    images = images or Images(splits)
    where, first, c = images.where, images.first, images.centred
    empty = pd.DataFrame(columns=list(NEAR_COLUMNS))
    if len(first) < 2:
        return empty
    p = candidate_pairs(images.descriptors, at_least=CANDIDATE_COSINE, neighbours=neighbours)
    if not len(p):
        return empty
    sim = np.concatenate([best_correlation(c[p[a:a + _CHUNK, 0]], c[p[a:a + _CHUNK, 1]])
                          for a in range(0, len(p), _CHUNK)])
    keep = sim >= threshold
    found = []
    for (u, v), s in zip(p[keep].tolist(), sim[keep].tolist()):
        (s1, i1), (s2, i2) = where[first[u]], where[first[v]]
        found.append((KINDS.index(_kind(s1, s2)), -s, s1, i1, s2, i2))
    found.sort()
    recs = []
    for pair, (kind, neg, s1, i1, s2, i2) in enumerate(found):
        p1, p2 = splits[s1][1], splits[s2][1]
        for a, b, ia, ib, pa, pb in ((s1, s2, i1, i2, p1, p2), (s2, s1, i2, i1, p2, p1)):
            recs.append({"pair": pair, "split": a, "index": ia, "path": pa[ia] if pa else "", "other_split": b,
                         "other_index": ib, "other_path": pb[ib] if pb else "", "similarity": round(-neg, 5),
                         "kind": KINDS[kind]})
    return pd.DataFrame(recs, columns=list(NEAR_COLUMNS)) if recs else empty


def robust_z(d: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    """(d - median) / (1.4826 MAD), the scale at least ``floor``."""
    med = np.median(d)
    mad = np.median(np.abs(d - med)) * 1.4826
    return ((d - med) / max(mad, floor)).astype(np.float32)


def knn_mean_distance(f: np.ndarray, k: int, *, reference: int = REFERENCE, seed: int = 0) -> np.ndarray:
    """Each row's mean Euclidean distance to its ``k`` nearest other rows of ``f`` (N, D),
    the others drawn from a reference of at most ``reference`` rows (seeded): a score of
    typicality that costs N x reference, not N x N. In chunks of rows."""
    n = len(f)
    ref = np.arange(n) if n <= reference else np.sort(np.random.default_rng(seed).choice(n, reference, replace=False))
    k = min(k, len(ref) - 1)
    if k < 1:
        return np.zeros(n, np.float32)
    r = f[ref].astype(np.float32)
    rr = (r * r).sum(axis=1)

    def block(a: int, b: int) -> np.ndarray:
        q = f[a:b].astype(np.float32)
        d2 = (q * q).sum(axis=1)[:, None] + rr[None, :] - 2 * (q @ r.T)
        mine = np.flatnonzero((ref >= a) & (ref < b))  # a row is not its own neighbour
        d2[ref[mine] - a, mine] = np.inf
        near = np.partition(d2, k - 1, axis=1)[:, :k]
        return np.sqrt(np.maximum(near, 0)).mean(axis=1).astype(np.float32)

    return np.concatenate(in_blocks(block, n, min(_CHUNK, _BLOCK // len(ref)), block_bytes=_BLOCK_BYTES))


def reduce_features(f: np.ndarray, dims: int = FEATURE_DIMS, seed: int = 0) -> np.ndarray:
    """Features (N, D) reduced by PCA (scikit-learn, randomized, fitted on at most
    20,000 rows drawn by ``seed``) to ``dims`` dimensions; as they are when D <= dims."""
    from sklearn.decomposition import PCA

    f = np.asarray(f, np.float32)
    if f.shape[1] <= dims or len(f) <= dims:
        return f
    rng = np.random.default_rng(seed)
    fit = f if len(f) <= 20000 else f[np.sort(rng.choice(len(f), 20000, replace=False))]
    # the same sums on any number of cores (see in_blocks); images all alike have no
    # variance to explain, which is no reason to warn
    with threadpool_limits(limits=1), np.errstate(invalid="ignore", divide="ignore"):
        pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit(fit)
    return np.concatenate(in_blocks(lambda a, b: pca.transform(f[a:b]).astype(np.float32), len(f), _CHUNK))


def quarter_turns(shape) -> tuple[int, ...]:
    """The quarter turns (1, 2, 3: by 90, 180, 270 degrees) an image of ``shape`` (..., H,
    W) can take and keep its shape: all three where it is square, else only the half."""
    return (1, 2, 3) if shape[-1] == shape[-2] else (2,)


def turned(x: np.ndarray, k: int) -> np.ndarray:
    """Images (N, C, H, W) turned ``k`` quarters anticlockwise."""
    return np.ascontiguousarray(np.rot90(x, k, axes=(-2, -1)))


def turn_sample(labels: np.ndarray, *, size: int = TURN_SAMPLE, seed: int = 0) -> np.ndarray:
    """Sorted rows of a seeded sample of at most ``size`` images that keeps each class's
    share (every image where there are no more than ``size``)."""
    n = len(labels)
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([
        rng.choice(rows, max(1, round(len(rows) * size / n)), replace=False)
        for rows in (np.flatnonzero(labels == c) for c in np.unique(labels))]))


def rows_of(parts, rows: np.ndarray) -> np.ndarray:
    """``rows`` (sorted) of the arrays ``parts`` stacked one after the other, taken from
    each part without stacking them."""
    starts = np.cumsum([0, *(len(p) for p in parts)])
    return np.concatenate([p[rows[(rows >= a) & (rows < b)] - a] for p, a, b in zip(parts, starts[:-1], starts[1:])])


def turned_probability(features: np.ndarray, labels: np.ndarray, sample: np.ndarray,
                       turned_features: dict[int, np.ndarray], *, seed: int = 0) -> np.ndarray:
    """Each image's probability, by the orientation probe, that it is not upright as
    the images of its class are; NaN where its class has fewer than TURN_MIN images in
    the sample. ``features``: the trunk's (N, D) for all images, or a list of such
    arrays whose rows follow each other (one per split: nothing is copied whole); ``sample``: rows of
    :func:`turn_sample`; ``turned_features[k]``: the trunk's features of those rows
    turned ``k`` quarters (:func:`quarter_turns`). The same numbers on any number of
    cores: the fits run on single-threaded BLAS, one class per thread.

    Per class two probes (logistic regressions) are taught, each by half of the class's
    sample in every orientation; an image of the sample is judged by the probe it did
    not teach, the others by the mean of both. A class whose probes call more than
    TURN_DOUBT of its own sample turned, or do no better on it than chance (on average
    no more than 1/orientations on upright), is not judged (NaN): it looks alike every
    way up, or it had too few images to teach a probe."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    turns = sorted(turned_features)
    parts = [features] if isinstance(features, np.ndarray) else list(features)
    flat = [np.asarray(p).reshape(len(p), -1) for p in parts]  # views: no copy of all the features
    n = sum(len(p) for p in flat)
    taught = [rows_of(flat, sample), *(np.asarray(turned_features[k]).reshape(len(sample), -1) for k in turns)]
    taught = [t.astype(np.float32, copy=False) for t in taught]
    dims = min(TURN_DIMS, taught[0].shape[1], len(sample))
    # fitted on every len(taught)-th row of each orientation's copies: as many rows as the
    # sample, every orientation alike (on MNIST as good as all of them, a quarter the time)
    with threadpool_limits(limits=1), np.errstate(invalid="ignore", divide="ignore"):
        pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit(
            np.concatenate([t[::len(taught)] for t in taught]))
    taught = [pca.transform(t) for t in taught]
    # one scale for all coordinates (their mean square 1): TURN_C means the same for
    # features of any magnitude, and the coordinates keep their relative spread
    scale = np.float32(1 / max(float(np.sqrt(np.mean([np.mean(t * t) for t in taught]))), 1e-12))
    taught = [t * scale for t in taught]
    reduced = np.concatenate([
        r for p in flat
        for r in in_blocks(lambda a, b, p=p: pca.transform(p[a:b].astype(np.float32, copy=False)) * scale,
                           len(p), _CHUNK)])
    out = np.full(n, np.nan, np.float32)
    classes = [c for c in np.unique(labels) if (labels[sample] == c).sum() >= TURN_MIN]

    def probe(a: int, b: int) -> None:
        for c in classes[a:b]:
            # two probes, each taught by every other image of the class's sample: an image
            # of the sample is judged by the probe it did not teach (a probe taught by a
            # turned image would call it upright), the rest by the mean of both
            mine = np.flatnonzero(labels[sample] == c)
            rows = np.flatnonzero(labels == c)
            p = np.zeros((2, len(rows)))
            for half in (0, 1):
                taught_by = mine[half::2]
                x = np.concatenate([t[taught_by] for t in taught])
                y = np.repeat(np.arange(len(taught)), len(taught_by))
                fit = LogisticRegression(C=TURN_C, max_iter=1000).fit(x, y)
                p[half] = 1 - fit.predict_proba(reduced[rows])[:, 0]
            where = np.searchsorted(rows, sample[mine])  # the sample's rows among the class's
            judged = p.mean(axis=0)
            judged[where[0::2]] = p[1, where[0::2]]
            judged[where[1::2]] = p[0, where[1::2]]
            own = judged[where]
            if (own >= TURNED_P).mean() <= TURN_DOUBT and own.mean() < 1 - 1 / len(taught):
                out[rows] = judged

    in_blocks(probe, len(classes), 1)
    return out


def pooled(x: np.ndarray, side: int = SHAPE_SIDE) -> np.ndarray:
    """Images (N, C, H, W) as float32 in [0, 1], averaged over square blocks of the
    smallest whole size that leaves at most ``side`` pixels a side (as they are where
    they are no larger)."""
    x = to_float32(x)
    f = -(-max(x.shape[-2:]) // side)
    if f == 1:
        return x
    n, c, h, w = x.shape
    return x[:, :, :h // f * f, :w // f * f].reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))


SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


class ClassShapes:
    """Each class's principal shapes, to measure how far an image is from them: per class
    two PCAs (scikit-learn, randomized) of the :func:`pooled` pixels, each fitted on every
    other image of a sample of at most SHAPE_FIT of the class's images drawn by ``seed``,
    ``dims`` components each. An image of the sample is measured against the components
    it did not help fit (an odd image among few would otherwise get a component of its
    own), the others by the mean of both. A class with fewer than SHAPE_MIN images gets
    none. ``x`` (N, C, H, W); ``rows``: the images judged (default all), read a block at
    a time; ``labels``: theirs."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, *, rows: np.ndarray | None = None,
                 dims: int = SHAPE_DIMS, seed: int = 0) -> None:
        from sklearn.decomposition import PCA

        self.x = x
        self.rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        self.labels = np.asarray(labels)
        rng = np.random.default_rng(seed)
        self.bases: dict = {}
        self.fitted_by = np.full(len(self.rows), -1, np.int8)  # the half an image helped fit
        with threadpool_limits(limits=1), np.errstate(invalid="ignore", divide="ignore"):
            for c in np.unique(self.labels):
                mine = np.flatnonzero(self.labels == c)
                if len(mine) < SHAPE_MIN:
                    continue
                fit = mine if len(mine) <= SHAPE_FIT else np.sort(rng.choice(mine, SHAPE_FIT, replace=False))
                halves = []
                for half in (0, 1):
                    a = pooled(x[self.rows[fit[half::2]]]).reshape(len(fit[half::2]), -1)
                    k = min(dims, a.shape[1] // 4, len(a) // 2)
                    if k < 1:  # images of under 4 values have no shapes to speak of
                        break
                    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(a)
                    halves.append((pca.mean_.astype(np.float32), pca.components_.astype(np.float32)))
                else:
                    self.bases[c] = halves
                    for half in (0, 1):
                        self.fitted_by[fit[half::2]] = half

    def residual(self, *, only: np.ndarray | None = None, turn: int = 0) -> np.ndarray:
        """The judged images' (positions ``only`` among them, default all) residual after
        projecting onto their class's principal shapes, the smallest over shifts of the
        image by up to one pixel each way (a digit written a pixel off its class's usual
        place reconstructs; a scribble reconstructs from no shift), over the image's own
        norm: scale-free, most images in [0, 1]. Each image turned ``turn`` quarters
        first. NaN where the class has no shapes, and for a flat image (no shape)."""
        only = np.arange(len(self.rows)) if only is None else np.asarray(only)

        def block(a: int, b: int) -> np.ndarray:
            at = only[a:b]
            g = pooled(self.x[self.rows[at]])
            if turn:
                g = turned(g, turn)
            flat = g.reshape(len(g), -1)
            norm = np.linalg.norm(flat, axis=1)
            out = np.full(len(g), np.nan, np.float32)
            has_shape = (flat != flat[:, :1]).any(axis=1)
            for c, halves in self.bases.items():
                mine = np.flatnonzero((self.labels[at] == c) & has_shape)
                if not len(mine):
                    continue
                r = np.full((2, len(mine)), np.inf, np.float32)
                for h, (mean, comps) in enumerate(halves):
                    for dy, dx in SHIFTS:
                        v = np.roll(g[mine], (dy, dx), axis=(2, 3)).reshape(len(mine), -1) - mean
                        r[h] = np.minimum(r[h], np.linalg.norm(v - (v @ comps.T) @ comps, axis=1))
                by = self.fitted_by[at[mine]]
                out[mine] = np.where(by == 0, r[1], np.where(by == 1, r[0], r.mean(axis=0))) / np.maximum(
                    norm[mine], 1e-12)
            return out

        return np.concatenate(in_blocks(block, len(only), _CHUNK)) if len(only) else np.zeros(0, np.float32)

    def turned_gain(self, only: np.ndarray, upright: np.ndarray | None = None) -> np.ndarray:
        """How much the residual of the judged images at positions ``only`` falls when
        they are turned back: their residual as they are (``upright``, where computed
        already) less the smallest over the quarter turns their shape allows
        (:func:`quarter_turns`). Positive where some turn fits the class better."""
        if not len(only):
            return np.zeros(0, np.float32)
        upright = self.residual(only=only) if upright is None else upright
        back = np.min([self.residual(only=only, turn=k) for k in quarter_turns(self.x.shape)], axis=0)
        return (upright - back).astype(np.float32)


def shape_residual(x: np.ndarray, labels: np.ndarray, *, rows: np.ndarray | None = None, dims: int = SHAPE_DIMS,
                   seed: int = 0) -> np.ndarray:
    """Each image's distance from the principal shapes of its class, over its own norm
    (:class:`ClassShapes`, :meth:`ClassShapes.residual`). The same numbers on any number
    of cores."""
    return ClassShapes(x, labels, rows=rows, dims=dims, seed=seed).residual()


def is_turned(turned, gain=None) -> np.ndarray:
    """Which images are listed as turned: the orientation probe at TURNED_P or more, and
    turned back they fit their class's principal shapes better by at least TURN_GAIN
    (:meth:`ClassShapes.turned_gain`): two views, the network's features and the pixels,
    agreeing. ``gain`` None (a run scored before the second view): the probe alone."""
    listed = np.nan_to_num(np.asarray(turned, np.float64), nan=0) >= TURNED_P
    if gain is not None:
        listed &= np.nan_to_num(np.asarray(gain, np.float64), nan=-np.inf) >= TURN_GAIN
    return listed


def outlier_scores(splits: dict[str, tuple[np.ndarray, tuple[str, ...] | None]], labels: dict[str, np.ndarray],
                   features: dict[str, np.ndarray], *, neighbours: int = OUTLIER_NEIGHBOURS,
                   images: Images | None = None, turned: np.ndarray | None = None) -> pd.DataFrame:
    """Every image's outlier score (OUTLIER_COLUMNS; higher = more unlike the rest), in
    the order of ``splits``. ``features``: the trunk's (N, D) per split; ``images``: the
    splits prepared already (:class:`Images`); ``turned``: each image's probability of
    not being upright (:func:`turned_probability`), NaN where not judged or not given.
    ``shape_z``: the robust z of :func:`shape_residual` (over the images it judges; NaN
    where it does not), on its own scale: listed from SHAPE_Z, not with outlier_score."""
    images = images or Images(splits)
    where, first, inverse = images.where, images.first, images.inverse
    f = np.concatenate([np.asarray(features[s], np.float32).reshape(len(features[s]), -1) for s in splits])
    f = reduce_features(f)[first]
    pixel = knn_mean_distance(images.descriptors, neighbours)
    # A flat image (one value everywhere: blank, saturated, one colour, a failed decode)
    # is at distance about 1 from every image with a shape, which a dataset's most
    # unusual digits reach too; it gets the largest distance unit descriptors can have,
    # so it is always listed.
    pixel[images.flat] = FLAT_DISTANCE
    pixel_z = robust_z(pixel)[inverse]
    feature_z = robust_z(knn_mean_distance(f, neighbours))[inverse]
    label = np.concatenate([np.asarray(labels[s], np.int64) for s in splits])
    shapes = ClassShapes(images.x, label[first], rows=first)
    residual = shapes.residual()
    judged = np.isfinite(residual)
    shape = np.full(len(first), np.nan, np.float32)
    if judged.any():
        shape[judged] = robust_z(residual[judged], floor=SHAPE_SCALE)
    turned = np.full(len(where), np.nan, np.float32) if turned is None else np.asarray(turned, np.float32)
    gain = np.full(len(first), np.nan, np.float32)
    probed = np.unique(inverse[np.nan_to_num(turned, nan=0) >= TURNED_P])
    gain[probed] = shapes.turned_gain(probed, residual[probed])
    paths = [(splits[s][1][i] if splits[s][1] else "") for s, i in where]
    return pd.DataFrame({
        "split": [s for s, _ in where], "index": np.array([i for _, i in where], np.int64), "path": paths,
        "label": label, "outlier_score": np.maximum(pixel_z, feature_z), "pixel_z": pixel_z, "feature_z": feature_z,
        "turned": turned, "turned_gain": gain[inverse], "shape_z": shape[inverse],
    }, columns=list(OUTLIER_COLUMNS))


def imbalance(labels: dict[str, np.ndarray], class_names) -> dict:
    """Images per class and split, the ratio of the largest class to the smallest in
    the training split, and the classes with under a third of an even share."""
    c = len(class_names)
    counts = {s: np.bincount(np.asarray(y, np.int64), minlength=c).tolist() for s, y in labels.items()}
    train = counts.get("train") or next(iter(counts.values()))
    total = sum(train)
    rare = [str(class_names[i]) for i, n in enumerate(train) if total and n < total / c / 3]
    smallest = min(train) if train else 0
    return {"counts": counts, "ratio": (round(max(train) / smallest, 3) if smallest else None),
            "rare": rare, "empty": [str(class_names[i]) for i, n in enumerate(train) if n == 0]}
