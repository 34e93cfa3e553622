"""Active learning on MNIST by a paper's protocol, at a size this machine allows.

``--protocol gal`` (the default): Gal et al. 2017. 20 class-balanced initial images, 10
acquired per round, retrained from scratch each round, tested on the 10,000 test images;
trained as the paper's code trained (50 epochs in batches of 128 and the remainder, Adam
at a constant 1e-3, weight decay 3.5/N), where ``audit acquire`` by default trains harder
(``--batch-size 32 --lr 5e-3 --schedule cosine --even-batches``: README says what that
changes). Prints, per strategy, the number of acquired images at which the test error
first reaches 10% and 5% (per repeat and their mean), next to the paper's Table 1.

``--protocol batchbald``: Kirsch et al. 2019 (BatchBALD), as their code and logs ran it:
their CNN (``--recipe batchbald``: Adam 1e-3, batch 64, epochs of 5,056 draws, at most
30, early stopping with patience 3 on 1,024 images carved from the training images,
best weights restored), 20 initial images (2 per class), b = 10, T = 100, the whole
pool scored each round with consistent MC dropout. Their tables count the training-set
size at which an accuracy is first reached, minus b.

``--protocol sba``: Kirsch et al. 2023 (stochastic batch acquisition): the same CNN with
patience 20 on 4,096 carved images, MNIST's training images with Gaussian noise of
sigma 0.1 added (pixels in [0, 1]; the test images clean), PowerBALD, BALD and random at
b = 10, BatchBALD at b = 5 (one run folder per b under --run). Their tables count the
training-set size, initial images included.

Each protocol prints its paper's counting next to the paper's figures, and this
project's (images acquired beyond the initial set), per repeat and the mean.

    python bench/al_mnist.py [--protocol gal|batchbald|sba] [--rounds N] [--repeats 3]
                             [--pool-subset 2000] [--strategies bald,batchbald,...]
                             [--stop-at-error 0.05] [--samples 100] [--seed 0] [--first-repeat 0]
                             [--model gal] [--epochs 50] [--batch-size 128] [--lr 1e-3]
                             [--schedule constant] [--even-batches]
                             [--run runs/al-bench] [--resume]
    python bench/al_mnist.py --time-rounds 20,500,1000     # one round's parts at those sizes
    python bench/al_mnist.py --summarize runs/a,runs/b [--protocol P]  # one table from several runs

A repeat's initial images and seeds follow from --seed and its number alone, so
``--first-repeat 3 --repeats 2`` adds repeats 4 and 5 to an earlier three-repeat run
and ``--summarize`` pools them (it refuses runs whose settings differ); ``--resume``
takes a run further in its own folder (``--stop-at-error 0.05`` after a 0.10 run goes
on from each curve's last round). ``--pool-subset 0`` scores the whole pool.

A full protocol (many rounds, several repeats and strategies) takes many hours on a
2-core CPU; ``--stop-at-error 0.05`` ends each curve once it reaches 5% error, which is
all the tables need; a curve that never does runs to ``--rounds`` and is reported as
"not within" that many acquisitions. Say which size you ran. Each finished round is
a line on stderr (and al_curve.csv in the run folder is rewritten after each round).
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import replace
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import audit  # noqa: F401
from audit.active import AL_TRAIN, BATCHBALD_TRAIN, PAPER_TRAIN, ALConfig, _acquire_step, acquire_run, initial_set, pool_runs
from audit.curves import last_accuracy, reach_table, versus
from audit.data import load_dataset
from audit.device import get_device
from audit.train import train

sys.path.insert(0, str(Path(__file__).parent))
from _common import Lines, stop_split  # noqa: E402

# each paper's figures, in its own counting: (90% accuracy, 95%); None where not given
PAPER = {
    "gal": {"bald": (145, 335), "varratio": (120, 295), "entropy": (165, 355), "random": (255, 835)},
    # BatchBALD paper, MNIST, b = 10: training-set size at first reach, minus b
    "batchbald": {"batchbald": (None, 190), "bald": (None, 240)},
    # SBA paper's logs: training-set size (initial images included), sigma 0.1 MNIST
    "sba": {"powerbald": (100, 240), "batchbald": (105, 220), "bald": (150, 250), "random": (170, ">300")},
}

# what each protocol sets; a command-line option overrides it
PROTOCOLS = {
    "gal": dict(strategies="bald,entropy,varratio,meanstd,random,batchbald", rounds=98, pool_subset=2000,
                train=PAPER_TRAIN, valid_size=None, consistent=False, noise=None),
    "batchbald": dict(strategies="batchbald,bald,powerbald,random", rounds=48, pool_subset=0,
                      train=BATCHBALD_TRAIN, valid_size=1024, consistent=True, noise=None),
    "sba": dict(strategies="powerbald:10,batchbald:5,bald:10,random:10", rounds=60, pool_subset=0,
                train=replace(BATCHBALD_TRAIN, patience=20), valid_size=4096, consistent=True, noise=0.1),
}


def time_rounds(cfg: ALConfig, sizes: list[int]) -> None:
    """Train, evaluate and score-and-acquire once at each labelled-set size (BALD)."""
    ds = load_dataset("mnist", download=False)
    dev = get_device("cpu")
    print(f"one round at n labelled (model {cfg.train.model}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
          f"lr {cfg.train.lr:g} {cfg.train.schedule}, "
          f"T={cfg.samples}, pool subset {cfg.pool_subset}, evaluation on {len(ds.valid)}):")
    for n in sizes:
        labelled = initial_set(ds.train.y, n, ds.n_classes, np.random.default_rng(n))
        stop = stop_split(ds, labelled, cfg.valid_size, n + 1) if cfg.valid_size else None
        t0 = time.perf_counter()
        result = train(ds, cfg.train_config(n, 0), subset=labelled, validate=False, stop_split=stop)
        t_fit = time.perf_counter() - t0
        t1 = time.perf_counter()
        _acquire_step(result.model, ds, labelled, "bald", cfg, 0, 0, dev)
        t_acq = time.perf_counter() - t1
        train_only = sum(r.seconds for r in result.log)
        print(f"  {n:5d}: {t_fit + t_acq:6.1f} s = train+evaluate {t_fit:6.1f} s "
              f"(last epoch with evaluation {result.log[-1].seconds:.1f} s, all epochs {train_only:.1f} s) "
              f"+ score {cfg.pool_subset} x {cfg.samples} and acquire {t_acq:.1f} s; "
              f"accuracy {result.valid_accuracy:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default="gal", help=f"one of {', '.join(PROTOCOLS)}")
    p.add_argument("--strategies", default=None, help="comma-separated; for sba name:b (powerbald:10,batchbald:5)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pool-subset", type=int, default=None, help="score this many random pool images a round "
                   "(0: the whole pool, the batchbald and sba protocols' default)")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=int, default=None)
    # the gal protocol trains as the paper's code; audit acquire's defaults (32, 5e-3, cosine) train better
    p.add_argument("--batch-size", type=int, default=None, help=f"audit acquire's default: {AL_TRAIN.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"audit acquire's default: {AL_TRAIN.lr:g}")
    p.add_argument("--schedule", default=None, help=f"audit acquire's default: {AL_TRAIN.schedule}")
    p.add_argument("--even-batches", action="store_true", default=None, help="near-equal batches per epoch "
                   "(audit acquire's default); without it full batches and the remainder, as the papers' code")
    p.add_argument("--patience", type=int, default=None, help="early stopping (batchbald: 3, sba: 20)")
    p.add_argument("--valid-size", type=int, default=None, help="images carved for early stopping "
                   "(batchbald: 1024, sba: 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-repeat", type=int, default=0, help="start at this repeat, counted from 0: 3 runs the 4th onwards")
    p.add_argument("--stop-at-error", type=float, default=None)
    p.add_argument("--run", default="runs/al-bench")
    p.add_argument("--resume", action="store_true", help="go on with the run in --run (more rounds, repeats, "
                   "strategies, a lower --stop-at-error); without it --run is replaced")
    p.add_argument("--time-rounds", default=None, help="comma-separated labelled-set sizes: time one round at each")
    p.add_argument("--summarize", default=None, help="comma-separated run folders: pool their curves into one table")
    a = p.parse_args()
    if a.protocol not in PROTOCOLS:
        raise SystemExit(f"error: --protocol: expected one of {', '.join(PROTOCOLS)}, got {a.protocol!r}")
    proto = PROTOCOLS[a.protocol]
    if a.summarize:
        summarize(a.summarize.split(","), a.protocol)
        return
    base = proto["train"]
    overrides = {k: v for k, v in dict(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                                      schedule=a.schedule, even_batches=a.even_batches).items() if v is not None}
    if a.patience is not None:
        if a.patience < 1:
            raise SystemExit(f"error: --patience: expected at least 1 epoch, got {a.patience}")
        overrides["patience"] = a.patience
    train = replace(base, **overrides)
    pool_subset = proto["pool_subset"] if a.pool_subset is None else a.pool_subset
    by_step = steps(a.strategies or proto["strategies"], a.protocol)
    data = noisy_mnist(proto["noise"]) if proto["noise"] else "mnist"
    configs = {b: ALConfig(strategies=tuple(names), step=b, rounds=a.rounds or proto["rounds"], repeats=a.repeats,
                           pool_subset=pool_subset or None, samples=a.samples, seed=a.seed, train=train,
                           first_repeat=a.first_repeat, stop_error=a.stop_at_error,
                           valid_size=proto["valid_size"] if a.valid_size is None else a.valid_size or None,
                           consistent=proto["consistent"])
               for b, names in by_step.items()}
    if a.time_rounds:
        time_rounds(next(iter(configs.values())), [int(n) for n in a.time_rounds.split(",")])
        return
    timed = time_choices()
    for b, cfg in configs.items():
        run = Path(a.run) if len(configs) == 1 else Path(a.run) / f"b{b}"
        if not a.resume:
            shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        res = acquire_run(run, data=data, config=cfg, resume=a.resume, progress=Lines())
        wall = time.perf_counter() - t0
        print(f"\nprotocol {a.protocol}, {run}: up to {cfg.rounds} rounds of {b} x {len(cfg.strategies)} strategies x "
              f"{cfg.repeats} repeats (from repeat {cfg.first_repeat + 1}), {settings(cfg.to_json())}, "
              f"data {data}, stop at error {cfg.stop_error}; wall {wall:.0f} s")
        print_table(res.curve, cfg.initial, a.protocol, b)
    print("acquisition time per round (scoring the pool and choosing; training not included), mean over the "
          "rounds this command ran: " + ", ".join(f"{s} {np.mean(v):.2f} s ({len(v)} rounds)"
                                                   for s, v in timed.items()))


def time_choices() -> dict[str, list[float]]:
    """Seconds of each call of audit.active.choose_batch, by strategy, from now on."""
    import audit.active as active

    timed: dict[str, list[float]] = {}
    real = active.choose_batch

    def choose_batch(model, images, candidates, strategy, *args, **kw):
        t0 = time.perf_counter()
        out = real(model, images, candidates, strategy, *args, **kw)
        timed.setdefault(strategy, []).append(time.perf_counter() - t0)
        return out

    active.choose_batch = choose_batch
    return timed


def steps(spec: str, protocol: str) -> dict[int, list[str]]:
    """Strategies by acquisition size: ``name`` (b = 10) or ``name:b``."""
    out: dict[int, list[str]] = {}
    for tok in (t.strip() for t in spec.split(",") if t.strip()):
        name, _, b = tok.partition(":")
        if b and not b.isdigit() or b == "0":
            raise SystemExit(f"error: --strategies: expected name or name:b with b a whole number > 0, got {tok!r}")
        out.setdefault(int(b or 10), []).append(name)
    return out


def noisy_mnist(sigma: float) -> str:
    """MNIST as an npz whose training images carry Gaussian noise of ``sigma`` (pixels in
    [0, 1], seeded, not clipped; the test images clean), written once to bench-out/."""
    path = Path("bench-out") / f"mnist-noise{sigma:g}.npz"
    if not path.exists():
        ds = load_dataset("mnist", download=False)
        rng = np.random.default_rng(12345)
        x = ds.train.x.astype(np.float32) / np.float32(255)
        x += rng.normal(0, sigma, size=x.shape).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # two benches may start at once
        np.savez(tmp, x_train=x, y_train=ds.train.y, x_valid=ds.valid.x.astype(np.float32) / np.float32(255),
                 y_valid=ds.valid.y)
        tmp.replace(path)
    return str(path)


def settings(c: dict) -> str:
    stop = (f", early stopping: patience {c['patience']} on {c['valid_size']} carved images"
            if c.get("patience") else "")
    return (f"model {c['model']}, {c['epochs']} epochs"
            f"{' of ' + str(c['epoch_samples']) + ' draws' if c.get('epoch_samples') else ''}, batch {c['batch_size']}"
            f"{' (even)' if c.get('even_batches') else ''}, lr {c['lr']:g} {c['schedule']}{stop}, "
            f"T={c['samples']}{' consistent masks' if c.get('consistent') else ''}, "
            f"pool {'subset ' + str(c['pool_subset']) if c['pool_subset'] else 'whole'}, seed {c['seed']}")


def paper_count(protocol: str, acquired, initial: int, b: int):
    """Images acquired (this project's count) in the paper's counting."""
    if acquired is None:
        return None
    if protocol == "batchbald":
        return acquired + initial - b
    if protocol == "sba":
        return acquired + initial
    return acquired


def print_table(curve: pd.DataFrame, initial: int, protocol: str = "gal", b: int = 10) -> None:
    reach = reach_table(curve, initial)
    counting = {"gal": "acquired images", "batchbald": "training-set size minus b",
                "sba": "training-set size, initial images included"}[protocol]
    print(f"test accuracy 90% / 95% (error 10% / 5%) first reached: acquired images beyond the {initial} initial "
          f"(this project's counting), and in the {protocol} paper's counting ({counting}), b = {b}:")
    print(f"{'strategy':10s} {'90%':>7s} {'95%':>7s} | {'paper count 90%/95%':>19s} {'paper':>9s} | "
          f"{'per repeat (90%; 95%)':24s} {'last acc':>8s} {'rounds':>6s} {'s/round':>7s}")
    final = last_accuracy(curve)
    for s in curve.strategy.unique():
        r, g, last = reach[s], curve[curve.strategy == s], final[s]
        # a repeat that never reached a level went this far (curves may stop at different points)
        went = (g.groupby("repeat").n_labelled.max() - initial).tolist()

        def fmt(key, conv=lambda v: v):
            if r[key] is not None:
                return f"{conv(r[key]):g}"
            # not reached by every repeat: "> N" when each that missed it went the full N
            short = [m for v, m in zip(r[f"{key} per repeat"], went) if v is None]
            return f">{conv(r['acquired_max'])}" if min(short) == r["acquired_max"] else "-"

        def per(key):
            return "[" + ", ".join(str(v) if v is not None else f">{m}" for v, m in zip(r[key], went)) + "]"

        def conv(v):
            return paper_count(protocol, v, initial, b)

        fig = PAPER.get(protocol, {}).get(s)
        paper = "/".join("-" if v is None else str(v) for v in fig) if fig else "-"
        theirs = f"{fmt('10%', conv)}/{fmt('5%', conv)}"
        print(f"{s:10s} {fmt('10%'):>7s} {fmt('5%'):>7s} | {theirs:>19s} {paper:>9s} | {per('10% per repeat')}; "
              f"{per('5% per repeat')} {last:8.4f} {len(g):6d} {g.seconds.mean():7.1f}")
    vs = versus(curve, initial)
    if vs:
        print("against random, repeat by repeat from the same initial images (ahead/tied/behind, open: not settled):")
        for s, row in vs.items():
            print(f"  {s:10s} " + "; ".join(
                f"{level}: " + "/".join(str(c[k]) for k in ("ahead", "tied", "behind"))
                + (f", {c['open']} open" if c["open"] else "") for level, c in row.items()))
    print("repeats: " + "; ".join(f"{s} {sorted(int(k) + 1 for k in g.repeat.unique())}"
                                   for s, g in curve.groupby("strategy", sort=False)))
    per_n = curve.groupby("n_labelled")["seconds"].mean()
    print("mean seconds per round at n labelled: " + ", ".join(
        f"{n}: {v:.1f}" for n, v in per_n.items() if n in (20, 100, 200, 300, 500, 1000) or n == per_n.index.max()))


def summarize(run_dirs: list[str], protocol: str = "gal") -> None:
    """One table from the curves of several runs (e.g. repeats split with --first-repeat)."""
    pooled = pool_runs(run_dirs)
    print(f"pooled from {', '.join(run_dirs)}: {settings(pooled.config)}")
    print_table(pooled.curve, pooled.config["initial"], protocol, pooled.config["step"])


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
