"""Training images/s of audit's train() against PyTorch (CPU) and a plain Chainer loop,
same architecture, batch, optimizer and data, and against this machine's training limit.

Every contender does the same job: E epochs of shuffled minibatches of the same images
with Adam, dropout in the head, then the loss and accuracy on the validation images
after each epoch.

* ``audit.train``: the tool's trainer (fastconv's kernels, fused Adam);
* a plain Chainer loop: chainer's own functions (``trunk_chainer``: chainer's CPU
  convolution and pooling, ``F.dropout``, ``F.linear``) and chainer's Adam;
* PyTorch (CPU), when torch is installed (``pip install -e '.[bench]'``): the same
  network as ``torch.nn`` layers (NCHW, ``MaxPool2d(ceil_mode=True)`` for chainer's
  ``cover_all``), ``torch.optim.Adam``, its default threads (one per core).

They run alternately, R rounds in one process, their order rotating each round, and the
best round of each is compared (the machine is shared and noisy; the best is the least
disturbed). The training limit is the network's arithmetic per training image (forward,
the weight gradient and, but for the first convolution, the input gradient of every
convolution and dense layer) divided by this machine's float32 matrix-product rate,
measured here with NumPy's BLAS on all cores (best of 5 products of 2048 x 2048).

    python bench/train_speed.py [--model origin gal] [--n 10000] [--epochs 2] [--rounds 3] [--profile]

``--model gal`` trains Gal et al.'s CNN at batch 128 and Adam 1e-3, as the active-learning
loops do; the origin CNN at batch 1000, Adam 1e-4, as the main job. ``--profile`` adds, per
model, where one epoch of ``audit.train``'s step goes (exclusive time of each function
node, forward and backward, the dropout masks, Adam's update, the batch assembly, and the
rest: Python and chainer's bookkeeping).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import audit  # noqa: E402  (its compat module first)
import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from _common import mnist_or_synthetic, timed  # noqa: E402

BATCH = {"origin": 1000, "gal": 128}
LR = {"origin": 1e-4, "gal": 1e-3}


def plain_chainer(ds, epochs: int, batch: int, lr: float, seed: int, arch: str) -> float:
    """The loop a Chainer user would write; returns the final validation accuracy."""
    np.random.seed(seed)
    net = audit.build_model(ds.n_classes, ds.image_shape, seed=seed, arch=arch)

    def model(x):
        hl = net.head_layers()
        h = F.dropout(net.trunk_chainer(x), hl.first_ratio)
        h = F.dropout(F.relu(hl.first(h)), hl.second_ratio)
        return hl.second(h)

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
        acc = _accuracy(lambda v: model(v).array, ds)
    return acc


def _accuracy(predict, ds) -> float:
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        correct = 0
        for i in range(0, len(ds.valid), 250):
            out = predict(ds.valid.x[i : i + 250].astype(np.float32) / 255)
            correct += int((np.asarray(out).argmax(1) == ds.valid.y[i : i + 250]).sum())
    return correct / len(ds.valid)


def torch_net(arch: str, shape, n_classes: int):
    import torch.nn as nn

    c, h, w = shape
    if arch == "origin":
        flat = 32 * (((h - 2 + 1) // 2 - 2 + 1) // 2) * (((w - 2 + 1) // 2 - 2 + 1) // 2)
        return nn.Sequential(
            nn.Conv2d(c, 16, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
            nn.Linear(flat, 1000), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(1000, 1000), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1000, n_classes))
    flat = 32 * ((h - 6 + 1) // 2) * ((w - 6 + 1) // 2)
    return nn.Sequential(
        nn.Conv2d(c, 32, 4), nn.ReLU(), nn.Conv2d(32, 32, 4), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, n_classes))


def pytorch(ds, epochs: int, batch: int, lr: float, seed: int, arch: str) -> float:
    """The same training in PyTorch (CPU); returns the final validation accuracy."""
    import torch
    import torch.nn.functional as tF

    torch.manual_seed(seed)
    net = torch_net(arch, ds.image_shape, ds.n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = ds.train.x, ds.train.y
    gen = np.random.default_rng(seed)
    for _ in range(epochs):
        net.train()
        perm = gen.permutation(len(y))
        for i in range(0, len(y), batch):
            idx = np.sort(perm[i : i + batch])
            xb = torch.from_numpy(x[idx].astype(np.float32) / 255)
            loss = tF.cross_entropy(net(xb), torch.from_numpy(y[idx].astype(np.int64)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = _accuracy(lambda v: net(torch.from_numpy(v)).numpy(), ds)
    return acc


def flops_per_image(model) -> float:
    """Multiply-adds x 2 of one training image: forward, weight gradient, and input
    gradient (all but the first convolution, whose input is the image)."""
    total = 0.0
    x = np.zeros((1, *model.spec.image_shape), np.float32)
    sizes = {}

    def record(link, out_pixels):
        sizes[link.name] = out_pixels

    with chainer.using_config("train", False), chainer.no_backprop_mode():
        h = x
        for name in ("conv1", "conv2"):
            conv = getattr(model, name)
            h = conv(h)
            record(conv, h.shape[2] * h.shape[3])
            if model.spec.arch == "origin" or name == "conv2":
                h = F.max_pooling_2d(F.relu(h), 2)
            else:
                h = F.relu(h)
    for name, link in model.namedlinks(skipself=True):
        if isinstance(link, chainer.links.Convolution2D):
            co, ci, kh, kw = link.W.shape
            one = 2.0 * sizes[link.name] * co * ci * kh * kw
        elif isinstance(link, chainer.links.Linear):
            one = 2.0 * link.W.size
        else:
            continue
        total += one * (2 if name == "/conv1" else 3)
    return total


def gemm_rate(n: int = 2048, reps: int = 5) -> float:
    """float32 matrix-product FLOP/s on all cores (best of ``reps``)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = min(timed(np.matmul, a, a)[0] for _ in range(reps))
    return 2.0 * n**3 / best


class ExclusiveTimer(chainer.FunctionHook):
    """Wall time of each function node, forward and backward, less the nodes it ran
    inside (a backward that applies a gradient node): exclusive times that add up."""

    name = "ExclusiveTimer"

    def __init__(self):
        self.times = defaultdict(float)
        self._stack: list[list] = []

    def _pre(self):
        self._stack.append([time.perf_counter(), 0.0])

    def _post(self, key):
        start, inner = self._stack.pop()
        took = time.perf_counter() - start
        self.times[key] += took - inner
        if self._stack:
            self._stack[-1][1] += took

    def forward_preprocess(self, function, in_data):
        self._pre()

    def forward_postprocess(self, function, in_data):
        self._post(function.label)

    def backward_preprocess(self, function, in_data, out_grad):
        self._pre()

    def backward_postprocess(self, function, in_data, out_grad):
        self._post(function.label + ".backward")


CATEGORY = {
    "Conv2DNHWC": "convolution forward",
    "Conv2DNHWCGrad": "convolution backward",
    "ReluMaxPool2": "ReLU + pooling",
    "_PoolScatter": "ReLU + pooling",
    "Linear": "dense products",
    "LinearGrad": "dense products",
    "Dropout": "dropout (applying the masks)",
    "DropoutGrad": "dropout (applying the masks)",
}


def profile(ds, cfg) -> list[tuple[str, float]]:
    """Where one epoch of audit.train's steps goes: (category, seconds)."""
    model_mod, train_mod = sys.modules["audit.model"], sys.modules["audit.train"]  # (audit.train is the function)

    masks = [0.0]
    keep_mask = model_mod.keep_mask

    def timed_mask(*a, **k):
        t0 = time.perf_counter()
        out = keep_mask(*a, **k)
        masks[0] += time.perf_counter() - t0
        return out

    update = train_mod.FusedAdam.update
    upd = [0.0]

    def timed_update(self, *a, **k):
        t0 = time.perf_counter()
        out = update(self, *a, **k)
        upd[0] += time.perf_counter() - t0
        return out

    batch_t = [0.0]
    to_float32 = train_mod.to_float32

    def timed_batch(x):
        t0 = time.perf_counter()
        out = to_float32(x)
        batch_t[0] += time.perf_counter() - t0
        return out

    audit.train(ds, cfg, validate=False)  # warm: compiled kernels, thread pool, allocator
    hook = ExclusiveTimer()
    saved = model_mod.keep_mask, train_mod.FusedAdam.update, train_mod.to_float32, train_mod.evaluate
    model_mod.keep_mask, train_mod.FusedAdam.update, train_mod.to_float32 = timed_mask, timed_update, timed_batch
    train_mod.evaluate = lambda *a, **k: (float("nan"), float("nan"))  # the training steps only
    try:
        t0 = time.perf_counter()
        with hook:
            audit.train(ds, cfg, validate=False)
        total = time.perf_counter() - t0
    finally:
        model_mod.keep_mask, train_mod.FusedAdam.update, train_mod.to_float32, train_mod.evaluate = saved
    cats = defaultdict(float)
    for key, sec in hook.times.items():
        cats[CATEGORY.get(key.removesuffix(".backward"), "other functions (ReLU, loss, reshapes)")] += sec
    cats["dropout masks (random bits)"] = masks[0]
    cats["Adam update"] = upd[0]
    cats["batch assembly (gather, to float32)"] = batch_t[0]
    cats["Python and chainer bookkeeping (the rest)"] = total - sum(cats.values())
    return sorted(cats.items(), key=lambda kv: -kv[1]), total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="training images")
    p.add_argument("--valid", type=int, default=1000, help="validation images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model", nargs="+", choices=["origin", "gal"], default=["origin", "gal"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also split one epoch of audit.train by component")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even where it is installed")
    a = p.parse_args()
    ds, what = mnist_or_synthetic(a.n, a.valid)
    try:
        if a.no_torch:
            raise ImportError
        import torch

        has_torch = f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        has_torch = None
    rate = gemm_rate()
    print(f"data: {what}, {a.n} train / {a.valid} valid images, {a.epochs} epochs, {a.rounds} rounds; "
          f"{has_torch or 'PyTorch not installed (pip install -e .[bench])'}")
    print(f"float32 matrix products here: {rate / 1e9:.0f} GFLOP/s")
    summary = []
    for arch in a.model:
        batch, lr = BATCH[arch], LR[arch]
        cfg = audit.TrainConfig(epochs=a.epochs, batch_size=batch, model=arch, lr=lr)
        flops = flops_per_image(audit.build_model(ds.n_classes, ds.image_shape, arch=arch))
        limit = rate / flops
        images = a.n * a.epochs
        print(f"\n{arch} CNN, batch {batch}, Adam {lr:g}: {flops / 1e6:.1f} MFLOP per training image, "
              f"limit {limit:,.0f} images/s")
        runners = {"audit": lambda: audit.train(ds, cfg).valid_accuracy,
                   "plain chainer": lambda: plain_chainer(ds, a.epochs, batch, lr, cfg.seed, arch)}
        if has_torch:
            runners["pytorch"] = lambda: pytorch(ds, a.epochs, batch, lr, cfg.seed, arch)
        best = {k: float("inf") for k in runners}
        names = list(runners)
        for r in range(a.rounds):
            line = []
            for k in names[r % len(names):] + names[: r % len(names)]:
                t, acc = timed(runners[k])
                best[k] = min(best[k], t)
                line.append(f"{k} {images / t:6.0f} images/s (valid acc {acc:.4f})")
            print(f"round {r + 1}: " + "   ".join(line))
        ips = {k: images / t for k, t in best.items()}
        print("best: " + ", ".join(f"{k} {v:,.0f} images/s" for k, v in ips.items()))
        ratios = f"audit/plain chainer = {ips['audit'] / ips['plain chainer']:.2f}"
        if has_torch:
            ratios += (f", audit/PyTorch = {ips['audit'] / ips['pytorch']:.2f} (target >= 1.0, stretch 1.5), "
                       f"PyTorch at {ips['pytorch'] / limit:.2f} of the limit")
        ratios += f", audit at {ips['audit'] / limit:.2f} of the limit (target >= 0.3)"
        print(ratios)
        summary.append((arch, ratios))
        if a.profile:
            with threadpool_limits(limits=None):
                rows, total = profile(ds, audit.TrainConfig(epochs=1, batch_size=batch, model=arch, lr=lr))
            print(f"profile of one epoch of audit.train ({a.n} images, {total:.2f} s, "
                  f"{a.n / total:,.0f} images/s under the profiler):")
            for name, sec in rows:
                print(f"  {name:45s} {sec:7.3f} s  {100 * sec / total:5.1f}%")
    print()
    for arch, ratios in summary:
        print(f"{arch}: {ratios}")


if __name__ == "__main__":
    try:
        main()
    except audit.AuditError as e:
        raise SystemExit(f"error: {e}") from None
