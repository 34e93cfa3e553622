"""audit: find uncertain and mislabelled images with Monte-Carlo dropout.

The package imports its NumPy 2 compatibility fixes for Chainer 7.8.1 first, so
``import audit`` is all a notebook needs before using chainer.
"""

from . import _compat  # noqa: F401  (must precede every chainer import)
from .data import Dataset, Split, load_dataset
from . import metrics
from .curate import apply_decisions
from .errors import AuditError
from .flags import flag_issues
from .mc import MCResult, mc_predict
from .model import OriginCNN, build_model
from .score import ScoreResult, score_dataset, score_run
from .train import TrainConfig, TrainResult, evaluate, train, train_run

__version__ = "0.1.0"

__all__ = [
    "AuditError",
    "Dataset",
    "MCResult",
    "OriginCNN",
    "ScoreResult",
    "Split",
    "TrainConfig",
    "TrainResult",
    "apply_decisions",
    "build_model",
    "evaluate",
    "flag_issues",
    "load_dataset",
    "mc_predict",
    "metrics",
    "score_dataset",
    "score_run",
    "train",
    "train_run",
]
