"""Planted label noise on MNIST: does the audit find the flipped labels, and better than
cleanlab on what a user without this toolkit would have?

A grid of cells: noise model x rate x size. In each, a fraction of the first N of MNIST's
training labels is flipped (seeded), a run is trained on the noisy images with
``--recipe`` and scored out of sample with ``--folds`` K (``audit score --folds``: each
training image by the fold model that did not see it, T MC passes; flags at the
temperature fitted out of sample, no per-class cap). Noise models:

- uniform: the new label uniform over the other classes;
- pairs: confusable pairs (4<->9, 3<->5, 7<->1, 0<->6, 2<->8);
- asymmetric: class-conditional and asymmetric: each class flips at its own rate (the
  mean is the cell's rate) to classes drawn from its own seeded Dirichlet(0.3) row.

Each cell reports AUROC and precision at k (k = the number of flips) of three rankings,
and precision / recall / F1 of three flag sets:

- audit: ``mislabel_score`` and the ``mislabeled`` flags;
- cleanlab (MC): cleanlab's self-confidence ranking and ``find_label_issues`` on the same
  out-of-sample probabilities (the MC mean at the fitted temperature);
- cleanlab (det): the same cleanlab calls on one deterministic network per fold (the
  same fold networks, dropout off: no MC dropout, no calibration), what a user without
  this toolkit would have.

And the seconds each cell took (training the run and its folds, scoring). Labels of
MNIST's test images are never changed; they are the runs' validation images only.

    python bench/label_noise.py [--sizes 20000,60000] [--rates 0.01,0.03,0.1]
        [--noise uniform,pairs,asymmetric] [--recipe strong] [--folds 4] [--fold-repeats 1] [--samples 50]
        [--seed 0] [--csv table.csv]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import audit  # noqa: E402
from audit import runs  # noqa: E402
from audit.config import TRAIN_RECIPES  # noqa: E402
from audit.flags import FlagConfig, uncapped_flags  # noqa: E402
from audit.score import ScoreConfig, flag_probs, score_run  # noqa: E402
from audit.train import predict_probs, train_run  # noqa: E402

PAIRS = {4: 9, 9: 4, 3: 5, 5: 3, 7: 1, 1: 7, 0: 6, 6: 0, 2: 8, 8: 2}
NOISE = ("uniform", "pairs", "asymmetric")


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """P(a random positive outranks a random negative), ties counted half."""
    ranks = pd.Series(scores).rank().to_numpy()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="stable")[:k]
    return float(positives[top].mean())


def prf(flagged: np.ndarray, positives: np.ndarray) -> tuple[float, float, float, int]:
    tp, n = int((flagged & positives).sum()), int(flagged.sum())
    p, r = tp / max(n, 1), tp / max(int(positives.sum()), 1)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0), n


def plant(y: np.ndarray, model: str, rate: float, n_classes: int, seed: int) -> np.ndarray:
    """Noisy labels: ``rate`` of ``y`` flipped by noise ``model`` (seeded)."""
    rng = np.random.default_rng([seed, NOISE.index(model), int(rate * 1e6)])
    y_new = y.copy()
    if model == "asymmetric":
        # each class its own flip rate (mean: rate) and its own destinations
        class_rate = rng.uniform(0.5, 1.5, n_classes)
        class_rate *= rate / np.mean(class_rate)
        dest = np.zeros((n_classes, n_classes))
        for c in range(n_classes):
            others = [d for d in range(n_classes) if d != c]
            dest[c, others] = rng.dirichlet(np.full(n_classes - 1, 0.3))
        for c in range(n_classes):
            rows = np.flatnonzero(y == c)
            flip = rng.choice(rows, size=int(round(class_rate[c] * len(rows))), replace=False)
            y_new[flip] = rng.choice(n_classes, size=len(flip), p=dest[c])
        return y_new
    flip = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    if model == "pairs":
        y_new[flip] = [PAIRS[int(c)] for c in y[flip]]
    else:
        y_new[flip] = (y[flip] + rng.integers(1, n_classes, size=len(flip))) % n_classes
    return y_new


def cell(ds, n: int, noise: str, rate: float, a) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    x, y_true = ds.train.x[:n], ds.train.y[:n]
    y = plant(y_true, noise, rate, ds.n_classes, a.seed)
    is_flip = y != y_true
    k = int(is_flip.sum())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "noisy.npz"
        np.savez(data, x_train=x, y_train=y, x_valid=ds.valid.x, y_valid=ds.valid.y)
        run = Path(d) / "run"
        main = train_run(run, data=str(data), config=TRAIN_RECIPES[a.recipe])
        t_main = time.perf_counter() - t0
        res = score_run(run, ScoreConfig(samples=a.samples, folds=a.folds, fold_repeats=a.fold_repeats, seed=a.seed),
                        flags=FlagConfig(flag_top=None))
        t_score = time.perf_counter() - t0 - t_main
        store = runs.RunStore(run)
        oos = res.scores[res.scores["split"] == "train"].reset_index(drop=True)
        mc = flag_probs(res.probs[: len(y)], store.meta().score.get("calibration"))
        valid = res.scores[res.scores["split"] == "valid"]
        cal = store.meta().score.get("calibration") or {}
        pooled = (f"validation (MNIST's test images, labels untouched) pooled over {int(valid['models'].iloc[0])} "
                  f"models: accuracy {(valid['pred'] == valid['label']).mean():.4f}, ECE MC mean "
                  f"{cal['mc_mean']['ece']:.4f}, calibrated {cal.get('calibrated', {}).get('ece', float('nan')):.4f}")
        det = np.empty_like(mc)
        fold = oos["fold"].to_numpy()
        for f in range(a.folds):
            rows = np.flatnonzero(fold == f)
            det[rows] = predict_probs(store.load_model(runs.fold_model(a.folds, f)), x[rows])
    rank = {
        "audit": oos["mislabel_score"].to_numpy(),
        "cleanlab (MC)": -get_label_quality_scores(y, mc, method="self_confidence"),
        "cleanlab (det)": -get_label_quality_scores(y, det, method="self_confidence"),
    }
    flags = {
        "audit": oos["flag"].to_numpy() == "mislabeled",
        "cleanlab (MC)": find_label_issues(y, mc, filter_by="prune_by_noise_rate", n_jobs=1),
        "cleanlab (det)": find_label_issues(y, det, filter_by="prune_by_noise_rate", n_jobs=1),
    }
    # what --confidence trades: the same calibrated probabilities flagged at other levels
    sweep = []
    for conf in (0.5, 0.6, 0.7, 0.8, 0.9):
        p_, r_, f1_, n_ = prf(uncapped_flags(mc, y, conf) == "mislabeled", is_flip)
        sweep.append(f"{conf:.1f}: {n_} flagged, P {p_:.3f} R {r_:.3f} F1 {f1_:.3f}")
    out = {"size": n, "noise": noise, "rate": rate, "flips": k, "main_acc": main.valid_accuracy,
           "seconds": time.perf_counter() - t0, "train_s": t_main, "folds_and_score_s": t_score}
    print(f"\n{noise} {rate:.0%} of {n:,} ({k} flips): run trained in {t_main:.0f} s (test accuracy "
          f"{main.valid_accuracy:.4f}), folds + scoring {t_score:.0f} s; fold models' accuracy on the noisy "
          f"labels they did not see {(mc.argmax(1) == y).mean():.4f}, on the true ones {(mc.argmax(1) == y_true).mean():.4f}"
          f"; {pooled}")
    print(f"  {'':16s} {'AUROC':>7s} {'prec@k':>7s} | {'flags':>6s} {'prec':>6s} {'recall':>6s} {'F1':>6s}")
    for name in rank:
        au, pk = auroc(rank[name], is_flip), precision_at_k(rank[name], is_flip, k)
        p, r, f1, nf = prf(flags[name], is_flip)
        print(f"  {name:16s} {au:7.4f} {pk:7.4f} | {nf:6d} {p:6.3f} {r:6.3f} {f1:6.3f}", flush=True)
        out.update({f"{name} auroc": au, f"{name} prec@k": pk, f"{name} F1": f1, f"{name} P": p, f"{name} R": r})
    print("  audit's rule at --confidence " + "; ".join(sweep), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,60000", help="first N MNIST training images, comma-separated")
    p.add_argument("--rates", default="0.01,0.03,0.1", help="fractions of training labels flipped")
    p.add_argument("--noise", default=",".join(NOISE), help=f"noise models: {', '.join(NOISE)}")
    p.add_argument("--recipe", default="strong", help=f"audit train --recipe: {', '.join(TRAIN_RECIPES)}")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--fold-repeats", type=int, default=1, help="audit score --fold-repeats: K-fold partitions")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", help="also write the summary table here")
    a = p.parse_args()
    noises = a.noise.split(",")
    if set(noises) - set(NOISE) or a.recipe not in TRAIN_RECIPES:
        raise SystemExit(f"error: --noise: expected some of {', '.join(NOISE)}; --recipe one of "
                         f"{', '.join(TRAIN_RECIPES)}")
    t0 = time.perf_counter()
    ds = audit.load_dataset("mnist", download=False)
    print(f"MNIST; recipe {a.recipe}, {a.folds} folds x {a.fold_repeats} partitions, T={a.samples}, seed {a.seed}")
    rows = [cell(ds, int(n), noise, float(rate), a)
            for n in a.sizes.split(",") for rate in a.rates.split(",") for noise in noises]
    table = pd.DataFrame(rows)
    cols = ["size", "noise", "rate", "flips", "audit auroc", "audit prec@k", "audit F1", "cleanlab (MC) F1",
            "cleanlab (det) F1", "cleanlab (det) auroc", "cleanlab (det) prec@k", "seconds"]
    print("\n" + table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if a.csv:
        table.to_csv(a.csv, index=False)
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
