"""Big acquisition batches on MNIST: top-k BALD against powerbald, batchbald and random.

    python bench/al_batch.py curves [--strategies random,bald,powerbald,batchbald] [--step 100]
                                    [--rounds 9] [--repeats 3] [--first-repeat 0] [--pool-subset 2000]
                                    [--samples 100] [--epochs 50] [--out bench-out/al_batch.json]
    python bench/al_batch.py pick [--pool 100000] [--k 100] [--samples 100] [--batchbald-pool 2000,8000]
                                  [--recipe gal|batchbald] [--consistent] [--powerbald-samples T]
    python bench/al_batch.py table bench-out/a.json bench-out/b.json ...

``curves``: Gal et al.'s CNN trained as `audit acquire` trains (audit.active.AL_TRAIN),
20 class-balanced images to start, ``--step`` acquired per round from the rest of the
training images (a random ``--pool-subset`` of them scored each round), validation on
10,000 images carved from MNIST's *training* images (audit.data.holdout; the test
images are not used). Per strategy and round: the accuracy, and the seconds spent
choosing the batch (scoring the pool by MC dropout and picking), by timing
audit.active.choose_batch. Writes a JSON file that ``table`` reads (several files, e.g.
from processes run side by side, pool into one table).

``pick``: the time to pick ``--k`` from a pool of ``--pool`` MNIST-sized images (MNIST's
training images, cycled) on this machine: one MC scoring (T = ``--samples``, per-image
scores only, bounded memory), then each strategy's choice from those scores; BatchBALD
needs the (N, T, C) passes with consistent masks and a greedy joint step per image, and
is timed on ``--batchbald-pool`` images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

import audit
import audit.active as active
from audit.active import AL_TRAIN, ALConfig, run_active_learning
from audit.data import holdout, load_dataset

sys.path.insert(0, str(Path(__file__).parent))
from _common import stop_split, threads  # noqa: E402


def curves(a) -> None:
    ds = holdout(load_dataset("mnist", download=False), 10_000, seed=0)
    spent: dict = {}
    original = active.choose_batch

    def timed_choice(model, images, candidates, strategy, config, rep, rnd, dev, **kw):
        t0 = time.perf_counter()
        out = original(model, images, candidates, strategy, config, rep, rnd, dev, **kw)
        spent[(strategy, rep, rnd + 1)] = time.perf_counter() - t0
        return out

    active.choose_batch = timed_choice  # run_active_learning looks it up in its module
    rows = []
    for s in a.strategies.split(","):
        cfg = ALConfig(strategies=(s,), initial=20, step=a.step, rounds=a.rounds, samples=a.samples,
                       pool_subset=a.pool_subset or None, repeats=a.repeats, first_repeat=a.first_repeat, seed=a.seed,
                       train=replace(AL_TRAIN, epochs=a.epochs))
        t0 = time.perf_counter()
        res = run_active_learning(ds, cfg)
        print(f"{s}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for r in res.curve.itertuples(index=False):
            rows.append({"strategy": s, "repeat": int(r.repeat), "round": int(r.round), "n_labelled": int(r.n_labelled),
                         "valid_accuracy": float(r.valid_accuracy),
                         "seconds_choose": spent.get((s, int(r.repeat), int(r.round)))})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k not in ("fn", "out")},
                                 "threads": threads(), "rows": rows}, indent=1))
    print(f"wrote {a.out}")


def table(a) -> None:
    rows, settings = [], []
    for f in a.files:
        d = json.loads(Path(f).read_text())
        rows += d["rows"]
        settings.append({k: v for k, v in d["settings"].items() if k not in ("strategies", "repeats", "first_repeat")})
    if any(s != settings[0] for s in settings[1:]):
        sys.exit(f"error: the files were made with other settings: {settings}")
    df = pd.DataFrame(rows)
    acc = df.pivot_table(index="n_labelled", columns="strategy", values="valid_accuracy", aggfunc="mean")
    n_rep = df.groupby("strategy").repeat.nunique()
    print(f"settings: {settings[0]}; repeats per strategy: {n_rep.to_dict()}\n")
    print("mean validation accuracy (10,000 images carved from MNIST's training images)")
    print(acc.to_string(float_format=lambda v: f"{v:.4f}"))
    print("\nlabelled images at which the mean curve first reaches 90% / 95%")
    for s in acc.columns:
        reach = [next((int(n) for n, v in acc[s].items() if v >= lvl), None) for lvl in (0.90, 0.95)]
        print(f"  {s:10s} " + " / ".join("not within" if r is None else str(r) for r in reach))
    sec = df.dropna(subset=["seconds_choose"]).groupby("strategy").seconds_choose.mean()
    print("\nmean seconds choosing a batch (scoring the pool subset and picking)")
    for s, v in sec.items():
        print(f"  {s:10s} {v:8.2f}")


def pick(a) -> None:
    from audit.acquire import acquire, from_scores
    from audit.mc import mc_predict

    ds = load_dataset("mnist", download=False)
    idx = np.resize(np.arange(len(ds.train)), a.pool)  # cycled past 60,000
    pool = ds.train.x[idx]
    start = audit.active.initial_set(ds.train.y, 20, 10, np.random.default_rng(0))
    train_cfg, held = active.recipe_config(a.recipe)
    stop = stop_split(ds, start, held, 1) if held else None  # the recipe's early stopping, outside the start
    model = audit.train(ds, train_cfg, subset=start, validate=False, stop_split=stop).model
    masks = "consistent" if a.consistent else "shared"
    print(f"pool {a.pool:,} images of 28x28, k = {a.k}, T = {a.samples}, recipe {a.recipe} ({train_cfg.model} CNN), "
          f"{masks} masks; {threads()}")
    t0 = time.perf_counter()
    r = mc_predict(model, pool, samples=a.samples, seed=1, masks=masks)
    score_s = time.perf_counter() - t0
    print(f"  MC scoring of the pool (shared by every score-based strategy): {score_s:.1f} s "
          f"({a.pool / score_s:,.0f} images/s)")
    choice = {}
    for s in ("bald", "powerbald", "softmaxbald", "entropy", "powerentropy"):
        t0 = time.perf_counter()
        from_scores(r.scores(), s, a.k, seed=2)
        choice[s] = time.perf_counter() - t0
        print(f"  {s:14s} choice {1e3 * choice[s]:8.1f} ms")
    t0 = time.perf_counter()
    np.random.default_rng(0).choice(a.pool, a.k, replace=False)
    print(f"  {'random':14s} choice {1e3 * (time.perf_counter() - t0):8.1f} ms (no scoring)")
    greedy = {}
    for n in (int(v) for v in str(a.batchbald_pool).split(",")):
        t0 = time.perf_counter()
        rb = mc_predict(model, pool[:n], samples=a.samples, seed=1, masks="consistent", return_mc=True)
        t1 = time.perf_counter()
        acquire(rb.mc_probs, "batchbald", a.k, num_samples=2000)
        greedy[n] = time.perf_counter() - t1
        print(f"  batchbald on {n:,} of the pool: scoring with the passes kept {t1 - t0:.1f} s, greedy choice of "
              f"{a.k} {greedy[n]:.1f} s (its choice grows with pool x k x 2,000 sampled configurations x T)")
    n, g = max(greedy.items())
    whole = score_s + g * a.pool / n
    power, power_t = score_s + choice["powerbald"], a.samples
    if a.powerbald_samples and a.powerbald_samples != a.samples:  # PowerBALD's own, cheaper scoring
        power_t = a.powerbald_samples
        t0 = time.perf_counter()
        rp = mc_predict(model, pool, samples=power_t, seed=1, masks=masks)
        t1 = time.perf_counter()
        from_scores(rp.scores(), "powerbald", a.k, seed=2)
        power = time.perf_counter() - t0
        print(f"  powerbald at T = {power_t}: scoring {t1 - t0:.1f} s, choice {1e3 * (power - (t1 - t0)):.1f} ms")
    print(f"  acquisition of {a.k} from the whole pool of {a.pool:,}: powerbald at T = {power_t} {power:.1f} s (scoring "
          f"+ choice); batchbald at T = {a.samples} about {whole:.0f} s (scoring + its greedy choice on {n:,} scaled "
          f"linearly to {a.pool:,}): powerbald takes {power / whole:.3f} of batchbald's time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves")
    c.add_argument("--strategies", default="random,bald,powerbald,batchbald")
    c.add_argument("--step", type=int, default=100)
    c.add_argument("--rounds", type=int, default=9)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--pool-subset", type=int, default=2000)
    c.add_argument("--samples", type=int, default=100)
    c.add_argument("--epochs", type=int, default=50)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--first-repeat", type=int, default=0, help="number the repeats from here (their starts and "
                   "seeds follow from --seed and the number), so runs side by side add repeats to a table")
    c.add_argument("--out", type=Path, default=Path("bench-out/al_batch.json"))
    c.set_defaults(fn=curves)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.set_defaults(fn=table)
    k = sub.add_parser("pick")
    k.add_argument("--pool", type=int, default=100_000)
    k.add_argument("--k", type=int, default=100)
    k.add_argument("--samples", type=int, default=100)
    k.add_argument("--batchbald-pool", default="2000", help="comma-separated pool sizes to time BatchBALD's "
                   "greedy choice on (it grows linearly with the pool)")
    k.add_argument("--recipe", default="gal", help="gal or batchbald: the model and how it trains on 20 images")
    k.add_argument("--consistent", action="store_true", help="score the pool with consistent masks")
    k.add_argument("--powerbald-samples", type=int, default=None, help="T for PowerBALD's own scoring (default: "
                   "--samples, the same scoring as the other strategies)")
    k.set_defaults(fn=pick)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
