"""Training images/s of audit's train() against a plain Chainer loop, same model and data.

Both do the same job: E epochs of shuffled minibatches with Adam, then the loss and
accuracy on the validation images after each epoch. The plain loop runs the network
with chainer's own functions (``trunk_chainer``: chainer's CPU convolution and
pooling, ``F.dropout``); audit's trains through ``fastconv``. They run alternately,
R rounds, in one process, and the best round of each is compared (the machine is
shared and noisy; the best is the least disturbed). Prints the ratio audit / plain.

    python bench/train_speed.py [--model origin|gal] [--n 10000] [--valid 1000] [--epochs 2] [--rounds 3]

``--model gal`` trains Gal et al.'s CNN at batch 128 and Adam 1e-3, as the
active-learning loops do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import audit  # noqa: E402  (its compat module first)
import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402

from _common import mnist_or_synthetic, timed  # noqa: E402


def plain_chainer(ds, epochs: int, batch: int, lr: float, seed: int, arch: str) -> float:
    """The loop a Chainer user would write; returns the final validation accuracy."""
    np.random.seed(seed)
    net = audit.build_model(ds.n_classes, ds.image_shape, seed=seed, arch=arch)

    def model(x):
        return net.head(net.trunk_chainer(x))  # chainer's functions only

    opt = chainer.optimizers.Adam(alpha=lr)
    opt.setup(net)
    x, y = ds.train.x, ds.train.y
    for _ in range(epochs):
        perm = np.random.permutation(len(y))
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            loss = F.softmax_cross_entropy(model(x[idx].astype(np.float32) / 255), y[idx])
            net.cleargrads()
            loss.backward()
            opt.update()
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            correct = 0
            for i in range(0, len(ds.valid), 250):
                out = model(ds.valid.x[i : i + 250].astype(np.float32) / 255)
                correct += int((out.array.argmax(1) == ds.valid.y[i : i + 250]).sum())
    return correct / len(ds.valid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="training images")
    p.add_argument("--valid", type=int, default=1000, help="validation images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model", choices=["origin", "gal"], default="origin")
    p.add_argument("--batch-size", type=int, default=None, help="default: 1000 (origin), 128 (gal)")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    ds, what = mnist_or_synthetic(a.n, a.valid)
    gal = a.model == "gal"
    batch = a.batch_size or (128 if gal else 1000)
    cfg = audit.TrainConfig(epochs=a.epochs, batch_size=batch, model=a.model, lr=1e-3 if gal else 1e-4)
    images = a.n * a.epochs
    print(f"data: {what}, model {a.model}, {a.n} train / {a.valid} valid images, {a.epochs} epochs, batch {batch}")
    best = {"audit": float("inf"), "plain": float("inf")}
    for r in range(a.rounds):
        t_plain, acc_plain = timed(plain_chainer, ds, a.epochs, batch, cfg.lr, cfg.seed, a.model)
        t_audit, res = timed(audit.train, ds, cfg)
        best["plain"] = min(best["plain"], t_plain)
        best["audit"] = min(best["audit"], t_audit)
        print(
            f"round {r + 1}: plain chainer {images / t_plain:7.0f} images/s (valid acc {acc_plain:.4f})   "
            f"audit.train {images / t_audit:7.0f} images/s (valid acc {res.valid_accuracy:.4f})"
        )
    ratio = best["plain"] / best["audit"]
    print(
        f"best: plain {images / best['plain']:.0f} images/s, audit {images / best['audit']:.0f} images/s; "
        f"ratio audit/plain = {ratio:.3f} (target >= 0.9)"
    )


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
