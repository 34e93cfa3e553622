"""The HTML report: per class, the images a metric ranks lowest and highest.

One self-contained file (images inlined as PNG data URIs, no external requests) that
opens from disk in any browser. Python prepares plain data; the jinja template in
``templates/report.html.j2`` does all the HTML, with autoescaping on, so class and
file names from users' folders are always text.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import runs
from .data import SPLITS, Dataset
from .errors import AuditError, bad_param
from .flags import pair_counts
from .progress import NullProgress, Progress

# Metrics the page can switch between, and which end is suspicious.
METRICS = {
    "entropy": {"title": "entropy", "bad": "high", "doc": "predictive entropy H[p̄]"},
    "mutual_info": {"title": "mutual information", "bad": "high", "doc": "BALD: disagreement between passes"},
    "variation_ratio": {"title": "variation ratio", "bad": "high", "doc": "1 − modal votes / T"},
    "p_label": {"title": "p(label)", "bad": "low", "doc": "mean probability of the given label"},
}
HIST_BINS = 20
TEMPLATE = "report.html.j2"
# past this many classes the report is an index page plus one page per class
SPLIT_CLASSES = 50


@dataclass(frozen=True)
class ReportResult:
    path: Path
    n_images: int  # image cells on the page(s)
    n_unique: int  # distinct images encoded
    bytes: int  # of every page written
    seconds: float
    pages: tuple[Path, ...] = ()  # every page written (index.html first)


def template_dirs() -> list[Path]:
    """Where the templates are: inside the installed package (wheel), or the
    repository's top-level ``templates/`` (editable install, source checkout)."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "templates", here.parent / "templates") if (d / TEMPLATE).is_file()]


@functools.lru_cache(maxsize=None)
def environment():
    """The jinja environment (one per process: it caches the compiled templates)."""
    import jinja2

    dirs = template_dirs()
    if not dirs:
        raise AuditError(f"templates: {TEMPLATE} not found beside the package; reinstall audit")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in dirs]),
        autoescape=jinja2.select_autoescape(["html", "j2", "html.j2"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def png_data_uri(img: np.ndarray) -> str:
    """A (C, H, W) uint8 or float image as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)).round().astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)  # (1,H,W) -> (H,W); (3,H,W) -> (H,W,3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")




def _histogram(values: np.ndarray, lo: float, hi: float) -> list[float]:
    """Fractions of ``values`` in HIST_BINS equal bins over [lo, hi]."""
    counts, _ = np.histogram(values, bins=HIST_BINS, range=(lo, hi if hi > lo else lo + 1))
    return (counts / max(len(values), 1)).round(4).tolist()


def report_context(
    run: str | os.PathLike,
    *,
    top: int = 30,
    metric: str = "entropy",
    split: str = "valid",
    dataset: Dataset | None = None,
    progress: Progress | None = None,
) -> dict:
    """Everything the template shows, as plain data."""
    from .score import read_scores

    progress = progress or NullProgress()
    store = runs.RunStore(run).require()
    run = store.path
    check_options(top, metric)
    meta = store.meta()
    scores = read_scores(store, ("split", "index", "label", "pred", *METRICS))
    if split not in set(scores["split"]):
        have = ", ".join(sorted(set(scores["split"]))) or "none"
        raise AuditError(f"--split: {split!r} was not scored in {run} (scored: {have}); run `audit score --splits {split}`")
    dataset = dataset or store.dataset(progress=progress)
    names = list(dataset.class_names)
    images = dataset.split(split).x
    df = scores[scores["split"] == split]

    uris: dict[int, str] = {}
    cells: dict[int, dict] = {}  # an image shown in several grids is one cell, made once
    info: dict[int, str] = {}  # its tooltip

    def cell(row) -> dict:
        i = int(row["index"])
        if i in cells:
            return cells[i]
        uris[i] = png_data_uri(images[i])
        cells[i] = {
            "index": i,
            "label": names[int(row["label"])],
            "pred": names[int(row["pred"])],
            "wrong": int(row["label"]) != int(row["pred"]),
            "path": str(row["path"]) if "path" in row and isinstance(row["path"], str) else "",
            "v": {m: float(row[m]) for m in METRICS},
        }
        x = cells[i]
        pm = {m: (f" ± {float(row[m + '_se']):.4f}" if f"{m}_se" in row else "") for m in METRICS}
        info[i] = (f"{split} #{i}{' · ' + x['path'] if x['path'] else ''}\nlabel {x['label']} · predicted {x['pred']}\n"
                   f"p(label) {x['v']['p_label']:.4f} · entropy {x['v']['entropy']:.4f}{pm['entropy']}\n"
                   f"mutual information {x['v']['mutual_info']:.4f}{pm['mutual_info']} · variation ratio "
                   f"{x['v']['variation_ratio']:.3f}{pm['variation_ratio']}")
        return x

    has_flags = "flag" in df.columns
    flagged = df[df["flag"] != ""] if has_flags else df.iloc[:0]

    def review_cell(row) -> dict:
        x = dict(cell(row))
        s = int(row["suggested_label"])
        x.update(flag=row["flag"], reason=row["reason"], suggested=names[s] if s >= 0 else "", suggested_id=s,
                 score=float(row["mislabel_score"]))
        return x

    def used(c: dict) -> list[int]:
        ids = {x["index"] for x in c["review"]}
        ids.update(x["index"] for g in c["grids"].values() for side in g.values() for x in side)
        return sorted(ids)

    ranges = {m: (float(df[m].min()), float(df[m].max())) for m in METRICS}  # one x-axis per metric
    classes = []
    progress.start("render report", len(names))
    for c, name in enumerate(names):
        dc = df[df["label"] == c]
        review = flagged[flagged["label"] == c].sort_values(["mislabel_score", "index"], ascending=[False, True])
        grids = {}
        hists = {}
        stable = {}
        for m in METRICS:
            ranked = dc.sort_values([m, "index"], kind="stable")
            grids[m] = {
                "low": [cell(r) for r in ranked.head(top).to_dict("records")],
                "high": [cell(r) for r in ranked.tail(top).iloc[::-1].to_dict("records")],
            }
            if f"{m}_se" in dc.columns:
                v, e = dc[m].to_numpy(np.float64), dc[f"{m}_se"].to_numpy(np.float64)
                stable[m] = {"low": top_stability(-v, e, top), "high": top_stability(v, e, top)}
            lo, hi = ranges[m]
            hists[m] = {"bins": _histogram(dc[m].to_numpy(), lo, hi), "lo": lo, "hi": hi}
        classes.append(
            {
                "id": c,
                "name": name,
                "n": int(len(dc)),
                "accuracy": float((dc["pred"] == dc["label"]).mean()) if len(dc) else float("nan"),
                "mean": {m: float(dc[m].mean()) if len(dc) else float("nan") for m in METRICS},
                "grids": grids,
                "hists": hists,
                "stable": stable,
                "review": [review_cell(r) for r in review.to_dict("records")],
                "href": f"#class-{c}" if len(names) <= SPLIT_CLASSES else f"class-{c}.html",
            }
        )
        classes[-1]["images"] = used(classes[-1])
        progress.advance(1)
    progress.close()

    duplicates = duplicate_context(store, dataset)
    checks = data_checks_context(store, dataset)
    per_split = [
        {"split": s, "n": int((scores["split"] == s).sum()),
         "accuracy": float((g["pred"] == g["label"]).mean()), "mean_entropy": float(g["entropy"].mean())}
        for s, g in scores.groupby("split", sort=False)
    ]
    return {
        "title": f"audit report: {run.resolve().name}",
        "run": str(run),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "split": split,
        "top": top,
        "metric": metric,
        "metrics": [{"key": k, **v} for k, v in METRICS.items()],
        "per_split": per_split,
        "n_split": int(len(df)),
        "accuracy": float((df["pred"] == df["label"]).mean()),
        "classes": classes,
        "class_names": names,
        "has_flags": has_flags,
        "n_flagged": {f: int((flagged["flag"] == f).sum()) for f in ("mislabeled", "ambiguous")},
        "left_out": {k.split("/", 1)[1]: n for k, n in ((meta.flags or {}).get("left_out") or {}).items()
                     if k.startswith(f"{split}/")},
        "flag_top": (meta.flags or {}).get("flag_top"),
        "pairs": pair_counts(flagged, names) if has_flags else [],
        "provenance": {
            "created": meta.created,
            "config": json.dumps(meta.config, sort_keys=True),
            "seed": meta.seed,
            "model": json.dumps(meta.model or {}, sort_keys=True),
            "data_source": meta.data.get("source", ""),
            "fingerprint": meta.fingerprint,
            "device": meta.device,
            "versions": ", ".join(f"{k} {v}" for k, v in meta.versions.items()),
            # without confident learning's C x C matrices (its own section shows them; run.json has them)
            "score": json.dumps({k: v for k, v in (meta.score or {}).items() if k != "confident_learning"},
                                sort_keys=True),
        },
        "n_unique": len(uris),
        "uris": uris,
        "info": info,
        "class_keys": review_keys(names),
        "storage_key": f"audit-review-{meta.fingerprint[:16]}-{split}",
        "split_pages": len(names) > SPLIT_CLASSES,
        "duplicates": duplicates,
        "checks": checks,
        "reliability": reliability_chart((meta.score or {}).get("calibration")),
        "ensemble": ((meta.score or {}).get("ensemble") or {}).get("valid") if split == "valid" else None,
        "confident": confident_context(((meta.score or {}).get("confident_learning") or {}).get(split), names),
    }


def confident_context(cl: dict | None, names) -> dict | None:
    """run.json's confident-learning block of the report's split, for the page: per
    class its threshold, images, estimated label errors and cleanlab's issues, and the
    largest off-diagonal cells of the estimated joint."""
    from .confident import top_pairs

    if not cl:
        return None
    if "skipped" in cl:
        return {"skipped": cl["skipped"]}
    rows = [{"name": names[c], "threshold": cl["thresholds"][c], "images": cl["images"][c],
             "estimated": cl["estimated_errors_per_class"][c], "flagged": cl["flagged_per_class"][c]}
            for c in range(len(names))]
    return {"n": cl["n"], "estimated": cl["estimated_errors"], "flagged": cl["flagged"], "rows": rows,
            "pairs": top_pairs(cl, names), "probabilities": cl.get("probabilities", "")}


def reliability_chart(cal: dict | None) -> dict | None:
    """A reliability diagram of run.json's calibration block, as SVG coordinates: per
    curve (deterministic, MC mean, calibrated) its points (confidence, accuracy), sized
    by the images in the bin, and its ECE; the diagonal is perfect calibration."""
    if not cal or not cal.get("mc_mean", {}).get("bins"):
        return None
    size, pad = 260, 30
    colours = {"deterministic": "#7f7f7f", "mc_mean": "#1f77b4", "calibrated": "#d62728"}
    titles = {"deterministic": "deterministic (dropout off)", "mc_mean": "MC mean",
              "calibrated": "MC mean, temperature {:.2f}"}
    curves = []
    for key in ("deterministic", "mc_mean", "calibrated"):
        c = cal.get(key)
        if not c or not c.get("bins"):
            continue
        n = sum(b["n"] for b in c["bins"])
        pts = [{"x": pad + b["confidence"] * size, "y": pad + (1 - b["accuracy"]) * size,
                "r": 2 + 6 * (b["n"] / n) ** 0.5, "n": b["n"], "conf": b["confidence"], "acc": b["accuracy"]}
               for b in c["bins"]]
        curves.append({"key": key, "colour": colours[key], "points": pts, "ece": c["ece"], "nll": c["nll"],
                       "title": titles[key].format(c.get("temperature", 1.0)),
                       "path": " ".join(f"{'M' if i == 0 else 'L'}{p['x']:.1f},{p['y']:.1f}" for i, p in enumerate(pts))})
    return {"size": size, "pad": pad, "curves": curves, "bins": cal.get("bins", 15), "split": cal.get("split", "valid")}


MAX_DUPLICATE_GROUPS = 30  # groups shown in the report (leakage first); duplicates.csv has all


def duplicate_context(store: runs.RunStore, dataset: Dataset) -> dict | None:
    """The exact-duplicate groups `audit score` found (duplicates.csv), for the page:
    counts, and the first groups with their images (keys ``q<n>`` in the style sheet)."""
    from .dupes import DUPLICATE_COLUMNS, KINDS, duplicate_summary
    from .tables import restore_frame

    if not store.has(runs.DUPLICATES):
        return None  # scored before audit looked for duplicates
    d = store.read_table(runs.DUPLICATES, DUPLICATE_COLUMNS, numeric=("group", "index"),
                         dtype={"split": str, "path": str, "kind": str}, keep_default_na=False)
    restore_frame(d, ["path"])
    check_rows(store.path / runs.DUPLICATES, d["split"], d["index"], dataset)
    rank = {k: i for i, k in enumerate(KINDS)}
    order = d.drop_duplicates("group").assign(_r=lambda f: f["kind"].map(rank)).sort_values(["_r", "group"])
    groups, images = [], []
    for gid in order["group"].head(MAX_DUPLICATE_GROUPS):
        members = []
        for r in d[d["group"] == gid].itertuples(index=False):
            key = f"q{len(images)}"
            images.append((key, png_data_uri(dataset.split(r.split).x[int(r.index)])))
            members.append({"key": key, "split": r.split, "index": int(r.index), "path": r.path})
        groups.append({"kind": d[d["group"] == gid]["kind"].iloc[0], "members": members})
    return {"summary": duplicate_summary(d), "groups": groups, "images": images,
            "more": max(0, int(d["group"].nunique()) - len(groups))}


def check_rows(path, splits, indices, dataset: Dataset) -> None:
    """Every (split, index) of a table the report shows names an image of the run's
    data: one line naming the file and the first row that does not."""
    sizes = {name: len(dataset.split(name)) for name in SPLITS}
    for i, (split, index) in enumerate(zip(splits, indices)):
        if split not in sizes or not np.isfinite(index) or not (0 <= index < sizes[split]) or index != int(index):
            raise AuditError(f"{path}: line {i + 2}: {split} #{index} is not an image of this run's data; "
                             "rerun `audit score`")


MAX_CHECK_ROWS = 30  # near-duplicate pairs and outliers shown; the CSVs have all


def data_checks_context(store: runs.RunStore, dataset: Dataset) -> dict | None:
    """Near-duplicate pairs (leakage first) and the most unlike images, from
    near_duplicates.csv and outliers.csv, for the page (image keys ``n<k>``, ``o<k>``);
    with run.json's counts and class balance. None for a run scored before these checks."""
    from .datachecks import NEAR_COLUMNS, OUTLIER_COLUMNS, OUTLIER_Z, SHAPE_Z, is_turned
    from .tables import restore_frame

    checks = (store.meta().score or {}).get("data_checks")
    if not checks or not store.has(runs.NEAR_DUPLICATES) or not store.has(runs.OUTLIERS):
        return None
    near = store.read_table(runs.NEAR_DUPLICATES, NEAR_COLUMNS, numeric=("pair", "index", "other_index", "similarity"),
                            dtype={"split": str, "path": str, "other_split": str, "other_path": str, "kind": str},
                            keep_default_na=False)
    # "turned", "turned_gain" and "shape_z" are not required: a run scored before the
    # orientation probe or the class shapes has no such column
    out = store.read_table(runs.OUTLIERS, OUTLIER_COLUMNS[:-3],
                           numeric=("index", "outlier_score", "pixel_z", "feature_z", "turned", "turned_gain",
                                    "shape_z"),
                           dtype={"split": str, "path": str, "label": str}, keep_default_na=False)
    gain = out["turned_gain"].to_numpy() if "turned_gain" in out else None
    for optional in ("turned", "turned_gain", "shape_z"):
        if optional not in out:
            out[optional] = np.nan
    o = checks.get("outliers") or {}
    turned = out[is_turned(out["turned"], gain)].sort_values("turned", ascending=False, kind="stable")
    odd = out[out["shape_z"].to_numpy() >= float(o.get("shape_z", SHAPE_Z))].sort_values(
        "shape_z", ascending=False, kind="stable")
    unlike = out[out["outlier_score"].to_numpy(float) >= float(o.get("z", OUTLIER_Z))]
    restore_frame(near, ["path", "other_path"])
    restore_frame(out, ["path", "label"])
    for name, df, pairs_of in ((runs.NEAR_DUPLICATES, near, (("split", "index"), ("other_split", "other_index"))),
                               (runs.OUTLIERS, out, (("split", "index"),))):
        for split_col, index_col in pairs_of:
            check_rows(store.path / name, df[split_col], df[index_col], dataset)
    images, pairs, outliers, turns, shapes = [], [], [], [], []

    def image(prefix: str, split: str, index: int) -> str:
        key = f"{prefix}{len(images)}"
        images.append((key, png_data_uri(dataset.split(split).x[int(index)])))
        return key

    for r in near.drop_duplicates("pair").head(MAX_CHECK_ROWS).itertuples(index=False):
        pairs.append({"kind": r.kind, "similarity": float(r.similarity),
                      "members": [{"key": image("n", r.split, r.index), "split": r.split, "index": int(r.index)},
                                  {"key": image("n", r.other_split, r.other_index), "split": r.other_split,
                                   "index": int(r.other_index)}]})
    for shown, rows, prefix in ((outliers, unlike, "o"), (turns, turned, "t"), (shapes, odd, "s")):
        for r in rows.head(MAX_CHECK_ROWS).itertuples(index=False):
            shown.append({"key": image(prefix, r.split, r.index), "split": r.split, "index": int(r.index),
                          "label": r.label, "score": float(r.outlier_score), "turned": float(r.turned),
                          "shape_z": float(r.shape_z)})
    counts = checks["imbalance"]["counts"]
    balance = counts.get("train") or next(iter(counts.values()), [])
    return {"summary": checks, "balance_split": "train" if "train" in counts else next(iter(counts), ""),
            "balance": list(zip(dataset.class_names, balance)), "pairs": pairs, "outliers": outliers, "images": images,
            "more_pairs": max(0, int(near["pair"].nunique()) - len(pairs)),
            "more_outliers": max(0, len(unlike) - len(outliers)), "turned": turns,
            "more_turned": max(0, len(turned) - len(turns)), "shapes": shapes,
            "more_shapes": max(0, len(odd) - len(shapes))}


STABILITY_DRAWS = 200


def top_stability(values: np.ndarray, se: np.ndarray, top: int, *, seed: int = 0) -> float | None:
    """The share of the ``top`` highest ``values`` that stay among the ``top`` highest when
    the passes are drawn again, estimated by drawing each score from a normal with its
    standard error (``se``, the jackknife's) STABILITY_DRAWS times; None where every
    image is in the list anyway, or the errors are unknown."""
    n = len(values)
    if n <= top or not np.isfinite(se).all():
        return None
    rng = np.random.default_rng(seed)
    chosen = np.zeros(n, bool)
    chosen[np.argsort(-values, kind="stable")[:top]] = True
    sims = values[None, :] + se[None, :] * rng.standard_normal((STABILITY_DRAWS, n))
    again = np.argpartition(-sims, top - 1, axis=1)[:, :top]  # each draw's top
    return float(chosen[again].mean())


def class_keys(names: list[str], reserved: set[str]) -> dict[str, str]:
    """The key that picks each class on a page: the class names themselves where each is
    one distinct letter or digit and none is one of the page's own keys (``reserved``),
    else 1-9 and 0 for the first ten classes."""
    if all(len(n) == 1 and n.isalnum() for n in names) and len({n.lower() for n in names}) == len(names) \
            and not reserved & {n.lower() for n in names}:
        return {n.lower(): n for n in names}
    return {str((i + 1) % 10): n for i, n in enumerate(names[:10])}


def review_keys(names: list[str]) -> dict[str, str]:
    """Keys that relabel to a class in the review, beside its own k, d, s and u."""
    return class_keys(names, {"k", "d", "s", "u"})


def render_pages(ctx: dict) -> dict[str, str]:
    """The report's pages, {file name: html}: one page, or past SPLIT_CLASSES classes an
    index page and one page per class. Each page inlines each image it shows once."""
    pair_ids = {n: i for i, n in enumerate(ctx["class_names"])}
    for p in ctx["pairs"]:
        p["href"] = (f"class-{pair_ids[p['given']]}.html" if ctx["split_pages"] else "") + \
            f"#pair={pair_ids[p['given']]}-{pair_ids[p['suggested']]}"
    base = {k: v for k, v in ctx.items() if k not in ("uris", "info")}

    def page(classes: list[dict], kind: str) -> str:
        ids = sorted({i for c in classes for i in c["images"]})
        # the index page's sections (exact duplicates, data checks) bring their own images
        dup = [] if kind == "class" else [im for sec in ("duplicates", "checks") if ctx[sec] for im in ctx[sec]["images"]]
        return render_report({**base, "page_classes": classes, "page": kind,
                              "images": [(f"p{i}", ctx["uris"][i]) for i in ids] + dup,
                              "info_json": script_json({str(i): ctx["info"][i] for i in ids})})

    if not ctx["split_pages"]:
        return {"index.html": page(ctx["classes"], "all")}
    pages = {"index.html": page([], "index")}
    for c in ctx["classes"]:
        pages[f"class-{c['id']}.html"] = page([c], "class")
    return pages


def check_options(top: int, metric: str) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise bad_param("top", f"expected at least 1 image per grid, got {top}")
    if metric not in METRICS:
        raise bad_param("metric", f"expected one of {', '.join(METRICS)}, got {metric!r}")


def render_report(context: dict, template: str = TEMPLATE) -> str:
    if template == TEMPLATE:
        context = {**context, "review_json": script_json({
            "storage_key": context["storage_key"], "keys": context["class_keys"], "split": context["split"],
            "names": context["class_names"]})}
    return environment().get_template(template).render(**context)


def script_json(obj) -> "Markup":
    """JSON for a ``<script type="application/json">`` block: nothing inside a script is
    unescaped, so ``<``, ``>`` and ``&`` are written as JSON escapes instead."""
    from markupsafe import Markup

    text = json.dumps(obj).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return Markup(text)


# Plot area of the learning-curve chart, in SVG user units.
CHART_W, CHART_H, CHART_PAD = 640, 300, 40
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")


def al_context(run: str | os.PathLike | list, *, first_rounds: int = 2, progress: Progress | None = None) -> dict:
    """The data of an active-learning run's page (or of several runs pooled, as
    ``active.pool_runs`` does): curves (mean and range over repeats) in chart
    coordinates, the reach table, and the first acquisitions."""
    from .active import pool_runs
    from .curves import last_accuracy, reach_table, versus

    pooled = pool_runs(run if isinstance(run, (list, tuple)) else [run])
    meta, curve, acquired = pooled.meta, pooled.curve, pooled.acquired
    if acquired.empty:
        raise AuditError(f"{pooled.runs[0]}: no acquired.csv; the report shows the images acquired")
    dataset = runs.RunStore(pooled.runs[0]).base_dataset(progress=progress)
    names = list(dataset.class_names)
    x_lo, x_hi = float(curve.n_labelled.min()), float(max(curve.n_labelled.max(), curve.n_labelled.min() + 1))
    y_lo = float(np.floor(curve.valid_accuracy.min() * 10) / 10)

    def xy(n, acc):
        return (round(CHART_PAD + (n - x_lo) / (x_hi - x_lo) * (CHART_W - 2 * CHART_PAD), 1),
                round(CHART_H - CHART_PAD - (acc - y_lo) / (1 - y_lo) * (CHART_H - 2 * CHART_PAD), 1))

    strategies = []
    final = last_accuracy(curve)
    shown = int(acquired.repeat.min())  # the first repeat in the run (--first-repeat may start later)
    for i, (name, g) in enumerate(curve.groupby("strategy", sort=False)):
        stats = g.groupby("n_labelled")["valid_accuracy"].agg(["mean", "min", "max"]).sort_index()
        first = acquired[(acquired.strategy == name) & (acquired.repeat == shown)
                         & acquired["round"].between(1, first_rounds)]
        strategies.append({
            "name": name,
            "color": PALETTE[i % len(PALETTE)],
            "line": [xy(n, r["mean"]) for n, r in stats.iterrows()],
            "band": [xy(n, r["max"]) for n, r in stats.iterrows()] + [xy(n, r["min"]) for n, r in stats[::-1].iterrows()],
            "final": float(final[name]),
            "acquired": [{"src": png_data_uri(dataset.train.x[int(r.index)]), "index": int(r.index),
                          "label": names[int(dataset.train.y[int(r.index)])], "round": int(r.round),
                          "score": float(r.score)} for r in first.itertuples()],
        })
    initial = int(pooled.config.get("initial", x_lo))
    y_ticks = [round(y_lo + k * (1 - y_lo) / 5, 3) for k in range(6)]
    x_ticks = sorted(set(int(v) for v in np.linspace(x_lo, x_hi, 6)))
    return {
        "title": f"audit active learning: {' + '.join(r.name for r in pooled.runs)}",
        "run": ", ".join(map(str, pooled.runs)),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": json.dumps(meta.config, sort_keys=True),
        "incomplete": [str(r) for r in pooled.incomplete],
        "pooled": len(pooled.runs) if len(pooled.runs) > 1 else 0,  # how many runs, when several
        "repeats": int(curve.repeat.nunique()),
        "shown_repeat": shown + 1,
        "strategies": strategies,
        "reach": reach_table(curve, initial),
        "versus": versus(curve, initial),
        "chart": {"w": CHART_W, "h": CHART_H, "pad": CHART_PAD,
                  "x_ticks": [(t, xy(t, y_lo)[0]) for t in x_ticks],
                  "y_ticks": [(t, xy(x_lo, t)[1]) for t in y_ticks]},
        "first_rounds": first_rounds,
        "stop_error": meta.config.get("stop_error"),
        "versions": ", ".join(f"{k} {v}" for k, v in meta.versions.items()),
        "fingerprint": meta.fingerprint,
    }


def loop_context(run: str | os.PathLike, *, progress: Progress | None = None) -> dict:
    """An `audit next` run per round: what was picked, labelled, skipped, how often the
    model's guess was kept, and the validation accuracy of the round's model."""
    from .loop import loop_state

    store = runs.RunStore(run).require()
    state = loop_state(store.path)
    dataset = store.base_dataset(progress=progress)
    info = (state.meta.results or {}).get("rounds", [])
    uris: dict[int, str] = {}
    out = []
    for r, (batch, meta) in enumerate(zip(state.batches, info), 1):
        # each image's decision made for this round's batch (the ledger's last row of that round)
        decided = {int(row.index): (row.status, row.label) for row in state.ledger.itertuples(index=False)
                   if int(row.round) == r}
        cells, counts = [], {"labelled": 0, "skipped": 0, "unsure": 0, "open": 0}
        kept = 0
        for row in batch.itertuples(index=False):
            i = int(row.index)
            st, lab = decided.get(i, ("open", ""))
            counts[st] += 1
            kept += st == "labelled" and bool(row.guess) and lab == row.guess
            if i not in uris:
                uris[i] = png_data_uri(dataset.pool.x[i])
            cells.append({"src": uris[i], "index": i, "path": row.path, "guess": row.guess, "state": st,
                          "text": lab if st == "labelled" else st,
                          "changed": st == "labelled" and bool(row.guess) and lab != row.guess})
        out.append({**meta, **counts, "kept": int(kept), "cells": cells})
    return {"title": f"audit loop: {store.path.name}", "rounds": out, "n_pool": int(state.meta.data.get("n_pool", 0)),
            "n_labelled_pool": len(state.labelled()), "n_unique": len(uris),
            "generated": time.strftime("%Y-%m-%d %H:%M")}


def write_report(
    run: str | os.PathLike | list = "runs/default",
    *,
    out: str | os.PathLike | None = None,
    top: int = 30,
    metric: str = "entropy",
    split: str = "valid",
    progress: Progress | None = None,
) -> ReportResult:
    """Render the report of ``run`` into ``out/index.html`` (default ``reports/<run name>``).

    ``run`` may name several acquire runs (a list): their curves are pooled into one
    page (``active.pool_runs``), by default in ``reports/<name>+<name>…``."""
    t0 = time.perf_counter()
    run_list = [Path(r) for r in (run if isinstance(run, (list, tuple)) else [run])]
    if not run_list:
        raise AuditError("--run: expected a run folder, got none", usage=True)
    check_options(top, metric)
    if len(run_list) == 1:
        runs.RunStore(run_list[0]).require()
    if out is None:  # named after the run folder itself, also for --run .. or --run .
        name = "+".join(r.resolve().name for r in run_list)
        out = Path("reports") / (name if len(name) <= 120 else f"{run_list[0].name}+{len(run_list) - 1}-more")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AuditError(f"--out: {out} exists and is not a folder")
    if len(run_list) == 1 and runs.RunStore(run_list[0]).meta().command == "loop":
        ctx = loop_context(run_list[0], progress=progress)
        html = render_report(ctx, "loop.html.j2")
        n_cells = sum(len(r["cells"]) for r in ctx["rounds"])
        n_unique = ctx["n_unique"]
    elif any((r / runs.AL_CURVE).is_file() and not (r / runs.SCORES).is_file() for r in run_list):  # acquire runs
        ctx = al_context(run_list, progress=progress)
        html = render_report(ctx, "active.html.j2")
        n_cells = n_unique = sum(len(s["acquired"]) for s in ctx["strategies"])
    elif len(run_list) > 1:
        raise AuditError(f"--run: {len(run_list)} runs given; several runs pool into one page only when they are "
                         "`audit acquire` runs (a scored run's report shows that run)", usage=True)
    else:
        ctx = report_context(run_list[0], top=top, metric=metric, split=split, progress=progress)
        pages = render_pages(ctx)
        n_cells = sum(len(g["low"]) + len(g["high"]) for c in ctx["classes"] for g in c["grids"].values())
        # index.html last: a reader who opens it finds the class pages it links to
        written = []
        for name in sorted(pages, key=lambda n: n == "index.html"):
            runs.write_atomic(out / name, pages[name].encode())
            written.append(out / name)
        stale = [p for p in out.glob("class-*.html") if p not in written]
        for p in stale:  # class pages of an earlier report of more classes
            p.unlink()
        size = sum(len(h.encode()) for h in pages.values())
        return ReportResult(out / "index.html", n_cells, ctx["n_unique"], size, time.perf_counter() - t0,
                            tuple([written[-1], *written[:-1]]))
    path = out / "index.html"
    runs.write_atomic(path, html.encode())
    return ReportResult(path, n_cells, n_unique, len(html.encode()), time.perf_counter() - t0, (path,))
