"""audit: find uncertain and mislabelled images with Monte-Carlo dropout.

The package imports its NumPy 2 compatibility fixes for Chainer 7.8.1 first, so
``import audit`` is all a notebook needs before using chainer.

Layers, bottom up (``tests/test_layers.py`` keeps imports pointing down):
pure functions (``metrics``, ``acquire``, ``flags``, ``decisions``, ``curves``),
data, model and the MC engine; the run store (``runs``); the workflows (``train``,
``score``, ``curate``, ``alstate``, ``active``); the loop with a person labelling
(``loop``); ``report``; the CLI.
"""

from . import _compat  # noqa: F401  (must precede every chainer import)
from .data import Dataset, Split, load_dataset
from . import metrics
from .acquire import CandidateBatch, acquire
from .active import ALConfig, ALResult, acquire_run, pool_runs, run_active_learning
from .curate import RetrainResult, retrain_run
from .decisions import apply_decisions
from .errors import AuditError
from .flags import FlagConfig, flag_issues
from .loop import LabelResult, LoopState, NextResult, import_labels, loop_state, next_batch
from .mc import MCResult, mc_predict
from .model import OriginCNN, build_model
from .report import ReportResult, write_report
from .runs import RunMeta, RunStore
from .score import ScoreConfig, ScoreResult, flag_run, score_dataset, score_run
from .train import TrainConfig, TrainResult, evaluate, train, train_run

__version__ = "0.1.0"

__all__ = [
    "ALConfig",
    "ALResult",
    "AuditError",
    "CandidateBatch",
    "LabelResult",
    "LoopState",
    "NextResult",
    "Dataset",
    "FlagConfig",
    "MCResult",
    "OriginCNN",
    "ReportResult",
    "RetrainResult",
    "RunMeta",
    "RunStore",
    "ScoreConfig",
    "ScoreResult",
    "Split",
    "TrainConfig",
    "TrainResult",
    "acquire",
    "acquire_run",
    "apply_decisions",
    "build_model",
    "evaluate",
    "flag_issues",
    "flag_run",
    "import_labels",
    "load_dataset",
    "loop_state",
    "mc_predict",
    "metrics",
    "next_batch",
    "pool_runs",
    "retrain_run",
    "run_active_learning",
    "score_dataset",
    "score_run",
    "train",
    "train_run",
    "write_report",
]
