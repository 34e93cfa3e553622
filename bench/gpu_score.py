"""GPU check: 70,000 images x 50 passes on CuPy, and the CPU/GPU agreement.

For a session with a lent GPU: `python bench/gpu_score.py` (MNIST if $AUDIT_DATA_DIR
has it, else random images of its shape — the speed does not depend on the pixels).
Prints the device, the wall time of the scoring, images/s, and the mean |p_gpu - p_cpu|
on 2,000 images (other random streams, same estimator).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import audit  # noqa: E402
from audit import mc  # noqa: E402
from audit.device import describe, get_device  # noqa: E402

from _common import mnist_or_synthetic  # noqa: E402


def main() -> None:
    dev = get_device("gpu")
    ds, what = mnist_or_synthetic(60000, 10000)
    x = np.concatenate([ds.train.x, ds.valid.x])
    print(f"device: {describe(dev)}; data: {what}, {len(x):,} images")
    res = audit.train(ds, audit.TrainConfig(epochs=1), device="gpu")
    print(f"1 epoch of training on the GPU: {res.seconds:.1f} s, validation accuracy {res.valid_accuracy:.4f}")
    model = res.model
    for batch in (512, 2048):
        mc.mc_predict(model, x[:batch], samples=50, device="gpu", batch_size=batch)  # warm up
        t0 = time.perf_counter()
        r = mc.mc_predict(model, x, samples=50, device="gpu", batch_size=batch)
        dt = time.perf_counter() - t0
        print(f"batch {batch}: {len(x):,} images x 50 passes in {dt:.2f} s = {len(x) / dt:,.0f} images/s")
    model.to_cpu()
    c = mc.mc_predict(model, x[:2000], samples=50, device="cpu")
    print(f"mean |p_gpu - p_cpu| on 2,000 images: {np.abs(r.probs[:2000] - c.probs).mean():.4f}")


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
