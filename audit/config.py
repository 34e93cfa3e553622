"""Training settings: a frozen, self-checking :class:`TrainConfig` (pure: no I/O).

Below the run store, so a run's stored settings are checked where run.json is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .errors import AuditError, bad_param

SCHEDULES = ("constant", "cosine")
MIN_BATCH = 32  # the smallest batch min_steps shrinks to


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the origin's."""

    epochs: int = 10
    batch_size: int = 1000
    lr: float = 1e-4  # Adam's alpha
    dropout: float = 0.5
    seed: int = 0
    model: str = "origin"  # or "gal", the CNN of Gal et al. 2017, or "batchbald", the BatchBALD paper's
    weight_decay: float = 0.0  # L2 rate on the head's first dense layer (chainer WeightDecay)
    schedule: str = "constant"  # or "cosine": the step size falls from lr to 0 over the training
    # split each epoch into ceil(n / batch_size) batches of near-equal size, not full batches and a
    # remainder (130 images in batches of 128: 65 + 65, not 128 + 2); the same when batch_size divides n
    even_batches: bool = True
    # each epoch draws this many training images with replacement (the BatchBALD paper's
    # code: 5,056); None: an epoch is one pass over the images
    epoch_samples: int | None = None
    # early stopping: end training once the accuracy on an early-stopping split (carved
    # from the labelled training images, given to train()) has not improved for this many
    # epochs, and restore the best epoch's weights; None: train every epoch
    patience: int | None = None
    # augmentation: each training image is moved by a random whole-pixel offset of at most
    # this many pixels each way, each time it is drawn (the uncovered border is 0); 0: none
    shift: int = 0
    # small data: where ``epochs`` in batches of ``batch_size`` would take fewer optimiser
    # steps than this, batches shrink (down to MIN_BATCH), then epochs grow, until they do
    # not; None: ``epochs`` of ``batch_size`` whatever the number of images
    min_steps: int | None = None

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.epoch_samples is not None:
            check_int("epoch_samples", self.epoch_samples, 1)
        if self.patience is not None:
            check_int("patience", self.patience, 1)
        check_int("seed", self.seed, 0)
        check_int("shift", self.shift, 0, 8)
        if self.min_steps is not None:
            check_int("min_steps", self.min_steps, 1, 10_000_000)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad_param("lr", f"expected a positive, finite learning rate, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad_param("dropout", f"expected a ratio in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad_param("weight_decay", f"expected a finite rate >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise bad_param("schedule", f"expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        from .model import ARCHS

        if self.model not in ARCHS:
            raise bad_param("model", f"expected one of {', '.join(ARCHS)}, got {self.model!r}")


def check_int(param: str, value, lo: int, hi: int | None = None) -> None:
    """``value`` must be an integer in [lo, hi]; one line naming ``param`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        rng = f"at least {lo}" if hi is None else f"{lo}..{hi}"
        raise bad_param(param, f"expected an integer {rng}, got {value!r}")


def stored_train_config(config: dict, where: str = "run.json") -> TrainConfig:
    """The TrainConfig of a run's run.json, with what older runs did not record: they
    trained in full batches and a remainder. One line naming ``where`` if it is not one."""
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise AuditError(f"{where}: field 'config.{unknown[0]}' is not a training setting; not a run.json of "
                         "`audit train`")
    try:
        return TrainConfig(**{"even_batches": False, **config})
    except AuditError as e:
        raise AuditError(f"{where}: field 'config': {e}") from None
    except TypeError as e:
        raise AuditError(f"{where}: field 'config': {e}") from None


# `audit train --recipe`: named settings; the options a user sets override them one by one.
# origin: the mission's reproduction (Adam 1e-4, batches of 1,000, 10 epochs), the default.
# strong: the same network, Adam 2e-3 along a cosine, batches of 500, 12 epochs, images
# moved by up to 2 pixels, and at least 1,200 steps at any size (chosen by
# bench/train_recipe.py on images held out of MNIST's training set).
TRAIN_RECIPES = {
    "origin": TrainConfig(),
    "strong": TrainConfig(epochs=12, batch_size=500, lr=2e-3, schedule="cosine", shift=2, min_steps=1200),
}


def train_recipe(name: str, **overrides) -> TrainConfig:
    """The settings of `audit train --recipe` ``name`` with the options a user set (None:
    the recipe's); one line naming --recipe if there is no such recipe."""
    if name not in TRAIN_RECIPES:
        raise bad_param("recipe", f"expected one of {', '.join(TRAIN_RECIPES)}, got {name!r}")
    return replace(TRAIN_RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
