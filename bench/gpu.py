"""The GPU check, one script for a session with a lent GPU (under 5 minutes end to end).

    python bench/gpu.py [--epochs 10] [--gal-epochs 10]

MNIST if $AUDIT_DATA_DIR has it, else random images of its shape (the speed does not
depend on the pixels). It prints, on the first CUDA GPU:

1. the main job as a user runs it: ``audit score`` from an empty run folder to
   scores.csv (training the origin CNN, 10 epochs at batch 1,000, then 70,000 x 50
   passes), wall time (target on an H200: under 30 s);
2. the scoring alone, 70,000 images x 50 passes, with the kept-units engine (shared
   masks, the default) and the dense one (independent masks) (target: under 2 s);
3. Gal et al.'s CNN at batch 128, Adam 1e-3, as the active-learning loops train it;
4. CPU/GPU agreement: the same model scored on both with the same masks (the dense
   engine's, drawn on the CPU and sent to the GPU): max |p_gpu - p_cpu| over 2,000
   images; and the default engine on each device (other random streams, the same
   estimator): mean |p_gpu - p_cpu|;
5. the inputs of a projection, and the projection: an ImageNet-sized label audit
   (1,281,167 training and 50,000 validation images of 224x224x3, 1,000 classes, ``audit score --folds 4`` with the
   model trained beside the folds, 10 epochs, T = 20) on 8 and on 64 GPU workers, from the
   training and scoring rates of the origin CNN measured here on random images of
   that shape (the speed does not depend on the pixels).

    python bench/gpu.py --only projection --device cpu --projection-images 256   # the same on a CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import audit  # noqa: E402
import chainer  # noqa: E402
from audit import mc  # noqa: E402
from audit.device import describe, get_device  # noqa: E402

from _common import mnist_or_synthetic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10, help="the main job's training epochs")
    p.add_argument("--gal-epochs", type=int, default=10)
    p.add_argument("--only", default="main,projection", help="main (sections 1-4) and/or projection (5)")
    p.add_argument("--device", default="gpu", help="gpu; cpu runs the projection's measurements on this CPU")
    p.add_argument("--projection-images", type=int, default=4096, help="random 224x224x3 images timed")
    a = p.parse_args()
    only = set(a.only.split(","))
    if "projection" in only:
        projection(a.device, a.projection_images)
        if only == {"projection"}:
            return
    dev = get_device("gpu")
    ds, what = mnist_or_synthetic(60000, 10000)
    x = np.concatenate([ds.train.x, ds.valid.x])
    print(f"device: {describe(dev)}; data: {what}, {len(x):,} images", flush=True)

    if "main" not in only:
        return
    # 1. the main job, from an empty folder (the dataset as the user's: MNIST, or an npz of the same)
    with tempfile.TemporaryDirectory() as d:
        data = "mnist"
        if what != "MNIST":
            data = str(Path(d) / "data.npz")
            np.savez(data, x_train=ds.train.x, y_train=ds.train.y, x_valid=ds.valid.x, y_valid=ds.valid.y)
        t0 = time.perf_counter()
        audit.train_run(Path(d) / "run", data=data, device="gpu",
                        config=audit.TrainConfig(epochs=a.epochs))
        t_train = time.perf_counter() - t0
        res = audit.score_run(Path(d) / "run", audit.ScoreConfig(samples=50), device="gpu", data=data)
        t_all = time.perf_counter() - t0
        model = audit.RunStore(Path(d) / "run").load_model()
    print(f"main job (train {a.epochs} epochs + score 70,000 x 50): {t_all:.1f} s wall "
          f"(training {t_train:.1f} s, scoring {res.seconds:.1f} s); MC accuracy {res.accuracy:.4f} "
          f"(target: under 30 s)", flush=True)

    # 2. the scoring alone, both engines
    model.to_device(dev)
    for masks in ("shared", "independent"):
        mc.mc_predict(model, x[:4096], samples=50, device="gpu", masks=masks, batch_size=1024)  # warm up
        t0 = time.perf_counter()
        mc.mc_predict(model, x, samples=50, device="gpu", masks=masks, batch_size=1024)
        dt = time.perf_counter() - t0
        print(f"scoring, {masks} masks: {len(x):,} images x 50 passes in {dt:.2f} s = {len(x) / dt:,.0f} images/s "
              f"(target: under 2 s)", flush=True)

    # 3. Gal et al.'s CNN at batch 128
    r_gal = audit.train(ds, audit.TrainConfig(epochs=a.gal_epochs, batch_size=128, lr=1e-3, model="gal"),
                        device="gpu")
    print(f"Gal's CNN, batch 128, {a.gal_epochs} epochs on {len(ds.train):,}: {r_gal.seconds:.1f} s "
          f"({a.gal_epochs * len(ds.train) / r_gal.seconds:,.0f} images/s), valid accuracy "
          f"{r_gal.valid_accuracy:.4f}", flush=True)

    # 4. agreement: the same masks on both devices, then the default engine on each
    sub = x[:2000]
    sampler = mc.MaskSampler.for_model(model, samples=50, seed=0, mode="independent")
    m1, m2 = sampler(0, len(sub))
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        import cupy

        gpu = mc.softmax(mc.head_passes(model, model.trunk_array(dev.send(audit.data.to_float32(sub))),
                                        cupy.asarray(m1), cupy.asarray(m2)))
        gpu = cupy.asnumpy(gpu)
        g_default = mc.mc_predict(model, sub, samples=50, device="gpu").probs
        model.to_cpu()
        cpu = mc.softmax(mc.head_passes(model, model.trunk_array(audit.data.to_float32(sub)), m1, m2))
        c_default = mc.mc_predict(model, sub, samples=50, device="cpu").probs
    print(f"same masks: max |p_gpu - p_cpu| over 2,000 images x 50 passes = {np.abs(gpu - cpu).max():.2e}; "
          f"default engine on each: mean |p_gpu - p_cpu| = {np.abs(g_default - c_default).mean():.4f}")


# the projection's job: ImageNet's training images, audited as `audit score --folds K` does it
PROJ_N, PROJ_V, PROJ_SHAPE, PROJ_CLASSES, PROJ_FOLDS, PROJ_EPOCHS, PROJ_T = (1_281_167, 50_000, (3, 224, 224), 1000, 4,
                                                                     10, 20)


def training_wall(pieces: list[float], workers: int) -> float:
    """Seconds until the last of ``pieces`` (seconds each) is done on ``workers``, each
    piece given in turn, largest first, to the worker free soonest (as Dask hands them out)."""
    free = [0.0] * workers
    for p in sorted(pieces, reverse=True):
        i = free.index(min(free))
        free[i] += p
    return max(free)


def projection(device: str, n: int) -> None:
    """Rates of the origin CNN on ``n`` random images of ImageNet's shape, and the audit's
    time on W workers from them (each worker one device as fast as this one):

    wall(W) = training_wall([E*N/r_train] + K * [E*N*(K-1)/K/r_train], W)
                                               the run's model and K fold models, one piece
                                               each, largest first (max E*N/r_train from
                                               K+1 workers on)
            + (N + (K+1)*V)/(W*r_score)        each training image by its fold model, the V
                                               validation images by all K+1 models
    with r_train in images/s of an epoch and r_score in images/s at T passes.
    Left out: loading and decoding the images (the cache is built once), the command's
    own part (pooling, features, data checks) and Dask's fixed costs (seconds)."""
    from audit.data import Dataset, Split

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *PROJ_SHAPE), dtype=np.uint8)
    y = rng.integers(0, PROJ_CLASSES, n).astype(np.int32)
    ds = Dataset(Split(x, y), Split(x[:64], y[:64]), tuple(str(i) for i in range(PROJ_CLASSES)), "random")
    cfg = audit.TrainConfig(epochs=1, batch_size=128, lr=1e-4)
    audit.train(Dataset(Split(x[:256], y[:256]), ds.valid, ds.class_names, "random"), cfg, device=device)  # warm up
    r = audit.train(ds, cfg, device=device)
    r_train = n / r.seconds
    mc.mc_predict(r.model, x[:256], samples=PROJ_T, device=device)  # warm up
    t0 = time.perf_counter()
    mc.mc_predict(r.model, x, samples=PROJ_T, device=device)
    r_score = n / (time.perf_counter() - t0)
    dev = get_device(device)
    print(f"origin CNN on {n:,} random {PROJ_SHAPE[1]}x{PROJ_SHAPE[2]}x{PROJ_SHAPE[0]} images, {PROJ_CLASSES} classes, "
          f"on {describe(dev)}: training {r_train:,.1f} images/s (batch 128, one epoch, validation included), "
          f"scoring {r_score:,.1f} images/s at T = {PROJ_T}", flush=True)
    print_projection(r_train, r_score)


def print_projection(r_train: float, r_score: float) -> None:
    big_n, k, e = PROJ_N, PROJ_FOLDS, PROJ_EPOCHS
    main_model, fold = e * big_n / r_train, e * big_n * (k - 1) / k / r_train
    for w in (8, 64):
        training = training_wall([main_model] + [fold] * k, w)
        scoring = (big_n + (k + 1) * PROJ_V) / (w * r_score)
        print(f"projection, {big_n:,} images, --folds {k}, {e} epochs, T = {PROJ_T}, on {w} workers like this one: "
              f"{(training + scoring) / 3600:,.1f} h = training {training / 3600:,.1f} h (the run's model "
              f"{main_model / 3600:,.1f} h beside {k} fold models of {fold / 3600:,.1f} h each, {min(k + 1, w)} at "
              f"once) + scoring {scoring / 3600:,.2f} h", flush=True)


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
