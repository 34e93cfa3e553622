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
   estimator): mean |p_gpu - p_cpu|.
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
    a = p.parse_args()
    dev = get_device("gpu")
    ds, what = mnist_or_synthetic(60000, 10000)
    x = np.concatenate([ds.train.x, ds.valid.x])
    print(f"device: {describe(dev)}; data: {what}, {len(x):,} images", flush=True)

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


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
