"""``audit``: the command line, a thin layer over the library.

Each command parses its options, calls one library function and prints where its
outputs are. Errors the user can fix (AuditError) become one line on stderr and
exit status 1 (2 for a bad option value), never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar

from .errors import AuditError

try:  # typer >= 0.26 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer with click
    import click.exceptions as click_exceptions
from typer.core import TyperGroup


class OneLineGroup(TyperGroup):
    """Usage errors (an option's value that does not parse, an unknown option) as one
    line on stderr, like every other error, instead of click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                print(e.format_message(), file=sys.stderr)
                sys.exit(2)
            where = f" (see `audit {e.ctx.info_name} --help`)" if e.ctx is not None and e.ctx.parent else ""
            print(f"error: {' '.join(e.format_message().split())}{where}", file=sys.stderr)
            sys.exit(e.exit_code)
        except click_exceptions.ClickException as e:
            print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Audit a labelled image dataset with Monte-Carlo dropout.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class BarProgress:
    """A rich progress bar on stderr; one summary line per finished task."""

    def __init__(self, console: Console = err) -> None:
        self.console = console
        self.bar: RichBar | None = None
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.close()
        self.bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=total or None, info="")

    def advance(self, n: int, **fields: Any) -> None:
        if self.bar is None:
            return
        info = " ".join(_fmt(k, v) for k, v in fields.items())
        self.bar.update(self.task, advance=n, info=info)

    def close(self, summary: str | None = None) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if summary:
            self.console.print(summary, markup=False)


def _fmt(key: str, value: Any) -> str:
    if key == "ips":
        return f"{value:,.0f} img/s"
    if isinstance(value, float):
        return f"{key} {value:.4f}"
    return f"{key} {value}"


# library parameters whose flag is not simply --name-with-dashes
FLAGS = {"stop_error": "--stop-at-error", "strategies": "--strategy", "flag_top": "--flag-top"}


def flag_for(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def one_line(e: BaseException) -> tuple[str, int]:
    """What the user sees for ``e``, and the exit status: one line naming the file or
    option, what was expected and what was found."""
    from .runs import free_space_hint

    if isinstance(e, AuditError):
        msg = str(e)
        if e.param and msg.startswith(f"{e.param}:"):
            msg = flag_for(e.param) + msg[len(e.param):]
        return msg, 2 if e.usage else 1
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else "a file"
        return f"{where}: {e.strerror or e}; {free_space_hint(e)}", 1
    if isinstance(e, MemoryError):
        return ("out of memory; lower --batch-size or --samples (or score fewer images at a time); "
                "nothing was written"), 1
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError):
        return f"an image is too large to decode safely ({e}); nothing was written", 1
    return (f"internal error ({type(e).__name__}: {e}); nothing was written. This is a bug in audit: please "
            "report it, with the output of the same command run with AUDIT_DEBUG=1"), 1


def handle_errors(fn):
    """Turn every failure into one line on stderr and a non-zero exit (with AUDIT_DEBUG=1,
    unexpected ones show their traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err.print("interrupted; the run is as the last finished step left it, no file is half-written",
                      markup=False)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as e:
            if os.environ.get("AUDIT_DEBUG") and not isinstance(e, AuditError):
                raise
            msg, code = one_line(e)
            err.print(f"error: {msg}", markup=False)
            raise typer.Exit(code) from None

    return wrapper


@app.callback()
def _root() -> None:
    """Audit a labelled image dataset with Monte-Carlo dropout."""


RunOpt = typer.Option(Path("runs/default"), "--run", help="Run folder (created by train).")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, gpu, or a chainer spec such as @cupy:1.")
WorkersOpt = typer.Option(None, "--workers", help="Run the independent pieces on a local Dask cluster of this many "
                          "single-threaded worker processes (default: in this process); with --device gpu one "
                          "worker per GPU, each pinned to its own.")
SchedulerOpt = typer.Option(None, "--scheduler", metavar="ADDRESS", help="Run the pieces on a running Dask cluster: "
                            "its scheduler's address (tcp://host:8786) or scheduler file; default $AUDIT_SCHEDULER.")
ImageSizeOpt = typer.Option(None, "--image-size", metavar="HxW", help="Resize folder and manifest images to this "
                            "size with Pillow's Lanczos filter (default: the most common size of the train and valid "
                            "images).")
FlagRuleOpt = typer.Option("cleanlab", "--flag-rule", help="Who calls an image mislabeled where it was scored out "
                           "of sample (valid; train with --folds): cleanlab (cleanlab's filter, the cl_issue column) "
                           "or confidence (another class gets at least --confidence). In-sample images always "
                           "follow --confidence.")
EvenBatchesOpt = typer.Option(True, "--even-batches/--no-even-batches", help="Near-equal batches per epoch (130 "
                              "images at 128: 65 + 65); --no-even-batches: full batches and the remainder.")


@app.command()
@handle_errors
def train(
    data: str = typer.Option("mnist", "--data", help="mnist, an .npz file, a folder DIR/{train,valid}/<class>/*.png, or a CSV manifest path,label,split."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with MNIST's four IDX files."),
    run: Path = RunOpt,
    recipe: str = typer.Option("origin", "--recipe", help="origin: the origin's settings (Adam 1e-4, batches of "
                               "1,000, 10 epochs); strong: 99.45% on MNIST's test images in 1.76 times the "
                               "origin's time, and fit for fold models and small data (Adam 2e-3 along a cosine, "
                               "batches of 500, 12 epochs, images moved by up to 2 pixels, at least 1,200 steps). "
                               "The options below override its settings."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam's alpha (at the start, with --schedule cosine)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant, or cosine: alpha falls to 0 over the "
                                           "training."),
    shift: Optional[int] = typer.Option(None, "--shift", help="Move each training image by a random offset of up "
                                        "to this many pixels each way, each epoch (0: none)."),
    min_steps: Optional[int] = typer.Option(None, "--min-steps", help="Small data: shrink the batches (to 32 at "
                                            "least), then add epochs, until training takes this many steps (0: no "
                                            "floor)."),
    even_batches: Optional[bool] = typer.Option(None, "--even-batches/--no-even-batches", help="Near-equal batches "
                                                "per epoch (130 images at 128: 65 + 65); --no-even-batches: full "
                                                "batches and the remainder."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout ratio of both dropout layers."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: str = DeviceOpt,
    subset: Optional[Path] = typer.Option(None, "--subset", help="Train only on these training indices (one per line, or .npy)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    image_size: Optional[str] = ImageSizeOpt,
) -> None:
    """Train the origin CNN and write RUN/model.npz, train_log.csv and run.json."""
    from .config import train_recipe
    from .data import parse_image_size
    from .train import train_run

    config = train_recipe(recipe, epochs=epochs, batch_size=batch_size, lr=lr, dropout=dropout, seed=seed,
                          schedule=schedule, even_batches=even_batches, shift=shift, min_steps=min_steps or None)
    if min_steps == 0:
        config = dataclasses.replace(config, min_steps=None)
    result = train_run(
        run,
        data=data,
        data_dir=None if data_dir is None else str(data_dir),
        config=config,
        subset=subset,
        device=device,
        overwrite=overwrite,
        progress=BarProgress(),
        image_size=parse_image_size(image_size),
    )
    err.print(
        f"trained on {result.n_train:,} images in {result.seconds:.1f} s on {result.device}; "
        f"validation accuracy {result.valid_accuracy:.4f}",
        markup=False,
    )
    typer.echo(f"run written to {run}/ (model.npz, train_log.csv, run.json)")


@app.command()
@handle_errors
def score(
    run: Path = RunOpt,
    samples: str = typer.Option("50", "--samples", "-T", help="Stochastic passes per image, or auto: passes are "
                                "added to each image until its scores' standard errors are within --tolerance."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="With --samples auto: the standard error "
                                              "each image's entropy and mutual information must reach [0.02]."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="With --samples auto: the most passes an "
                                              "image gets [100]."),
    splits: str = typer.Option("train,valid", "--splits", help="Comma-separated: train, valid."),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(128, "--batch-size", help="Images per batch of the dense engine (--masks independent)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dropout masks."),
    masks: str = typer.Option("shared", "--masks", help="shared: 1,024 images share each pass's masks (the fast "
                              "kept-units engine); independent: every image its own (the dense reference)."),
    folds: int = typer.Option(0, "--folds", help="Score training images out of sample with K fold models (K >= 2; "
                              "trains K models); the validation images are scored by all K + 1 models, pooled."),
    fold_repeats: int = typer.Option(1, "--fold-repeats", help="With --folds K: R partitions into K folds (R x K "
                                     "models); each training image is scored by the R models that did not see it, "
                                     "pooled."),
    confidence: float = typer.Option(0.5, "--confidence", help="Flag as mislabeled when another class gets at least this p̄."),
    flag_top: int = typer.Option(50, "--flag-top", help="At most this many flags of each kind per split and class (0: no cap)."),
    flag_rule: str = FlagRuleOpt,
    near_threshold: float = typer.Option(0.99, "--near-threshold", help="Near-duplicates: two images whose correlation "
                                         "(centred, best over one-pixel shifts) is at least this."),
    outlier_z: float = typer.Option(5.0, "--outlier-z", help="Outliers: images whose robust z-score of distance to "
                                    "their nearest images (pixels or features) is at least this."),
    data_checks: bool = typer.Option(True, "--data-checks/--no-data-checks", help="Look for exact and near "
                                     "duplicates, outliers and class imbalance (these hold every image's features in "
                                     "memory; leave them out past a few million images)."),
    data: str = typer.Option("mnist", "--data", help="Data to train on when the run has no model yet."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with MNIST's four IDX files."),
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
    image_size: Optional[str] = ImageSizeOpt,
) -> None:
    """Score every image by MC dropout into RUN/scores.csv and mc_summary.npz (trains first if needed)."""
    from .cluster import ClusterConfig
    from .data import parse_image_size
    from .flags import FlagConfig
    from .score import ScoreConfig, score_run

    samples_n, tol = parse_samples(samples, tolerance, max_samples)
    config = ScoreConfig(samples=samples_n, splits=splits, batch_size=batch_size, seed=seed, folds=folds,
                         fold_repeats=fold_repeats, masks=masks,
                         near_threshold=near_threshold, outlier_z=outlier_z, data_checks=data_checks, tolerance=tol)
    cluster = ClusterConfig.from_options(workers, scheduler)
    result = score_run(
        run,
        config,
        device=device,
        flags=FlagConfig(confidence=confidence, flag_top=flag_top or None, rule=flag_rule),
        data=data,
        data_dir=None if data_dir is None else str(data_dir),
        cluster=cluster,
        progress=BarProgress(),
        image_size=parse_image_size(image_size),
    )
    df = result.scores
    per_split = ", ".join(f"{k} {v:,}" for k, v in df["split"].value_counts(sort=False).items())
    passes = (f"{df['passes'].mean():.1f} passes on average (auto: standard errors within {tol:g}, at most "
              f"{samples_n})") if tol is not None else f"{samples_n} passes"
    err.print(
        f"scored {len(df):,} images ({per_split}) x {passes} in {result.seconds:.1f} s "
        f"({len(df) / result.seconds:,.0f} images/s on {result.device}"
        f"{'' if cluster.in_process else ', ' + result.workers}); accuracy of the MC mean "
        f"{result.accuracy:.4f}; mean entropy {df['entropy'].mean():.4f}",
        markup=False,
    )
    _print_ensemble(run)
    _print_flags(run)
    _print_confident(run)
    if data_checks:
        _print_duplicates(run)
        _print_data_checks(run)
    else:
        err.print("data checks (duplicates, near-duplicates, outliers, class balance): not run (--no-data-checks)",
                  markup=False)
    _print_calibration(run)
    typer.echo(f"scores written to {run}/scores.csv and {run}/mc_summary.npz")


def _print_ensemble(run: Path) -> None:
    """How --folds scored: pooled over every model that did not see an image."""
    from .runs import RunStore

    e = (RunStore(run).meta().score or {}).get("ensemble")
    if not e:
        return
    if "skipped" in e:
        err.print(f"validation images not pooled over the fold models: {e['skipped']}", markup=False)
        return
    who = {"valid": "the run's and each fold's", "train": "one of each fold partition"}
    for split, v in e.items():
        err.print(f"{split} images: {v['passes']:,} passes pooled from {v['models']} models that did not see them "
                  f"({who[split]}); mean disagreement between them {v['mean_disagreement']:.4f} nats (column "
                  "disagreement)", markup=False)


def _print_confident(run: Path) -> None:
    """cleanlab's estimate of the label errors per out-of-sample split."""
    from .runs import RunStore

    cl = (RunStore(run).meta().score or {}).get("confident_learning") or {}
    parts = [f"{s}: skipped ({c['skipped']})" if "skipped" in c else
             f"{s} {c['estimated_errors']:,} of {c['n']:,} estimated, {c['flagged']:,} called issues (cl_issue)"
             for s, c in cl.items()]
    if parts:
        err.print("confident learning (cleanlab, out-of-sample probabilities): label errors " + "; ".join(parts),
                  markup=False)


def _print_calibration(run: Path) -> None:
    from .runs import RunStore

    c = (RunStore(run).meta().score or {}).get("calibration")
    if not c:
        return
    parts = [f"deterministic {c['deterministic']['ece']:.4f} / {c['deterministic']['nll']:.4f}",
             f"MC mean {c['mc_mean']['ece']:.4f} / {c['mc_mean']['nll']:.4f}"]
    if "calibrated" in c:
        k = c["calibrated"]
        parts.append(f"MC mean at temperature {k['temperature']:.3f} (fitted on the out-of-sample training scores) "
                     f"{k['ece']:.4f} / {k['nll']:.4f}")
    else:
        parts.append("no temperature without --folds (it is fitted on images the model did not train on)")
    err.print(f"calibration on valid, ECE ({c['bins']} bins) / NLL: " + "; ".join(parts), markup=False)


def parse_samples(samples: str, tolerance: float | None, max_samples: int | None) -> tuple[int, float | None]:
    """--samples N, or --samples auto with its --tolerance and --max-samples: (passes or
    the cap, the tolerance or None)."""
    from .mc import AutoSamples

    if samples.strip().lower() == "auto":
        a = AutoSamples(**{k: v for k, v in (("tolerance", tolerance), ("cap", max_samples)) if v is not None})
        return a.cap, a.tolerance
    for name, given in (("--tolerance", tolerance), ("--max-samples", max_samples)):
        if given is not None:
            raise AuditError(f"{name}: applies with --samples auto; --samples is {samples}", usage=True)
    try:
        return int(samples), None
    except ValueError:
        raise AuditError(f"--samples: expected a number of passes or auto, got {samples!r}", usage=True) from None


def _print_data_checks(run: Path) -> None:
    """Near-duplicates, outliers and class imbalance, one line each."""
    from .runs import RunStore

    c = (RunStore(run).meta().score or {}).get("data_checks")
    if not c:
        return
    n = c["near_duplicates"]
    err.print(f"near-duplicates (correlation >= {n['threshold']}): {n['pairs']:,} pairs, "
              f"{n['across train and valid']:,} across train and valid (leakage), {n['within train']:,} within train, "
              f"{n['within valid']:,} within valid; listed in {run}/near_duplicates.csv", markup=False)
    o = c["outliers"]
    turned = f", {o['turned']:,} of them turned (sideways or upside down)" if "turned" in o else ""
    shape = f", {o['odd_shape']:,} unlike their class's shapes" if "odd_shape" in o else ""
    rule = f", or turned, or shape z >= {o['shape_z']:g}" if "shape_z" in o else ", or turned"
    err.print(f"outliers (robust z >= {o['z']:g}{rule}): {o['flagged']:,} images{turned}{shape}; listed in "
              f"{run}/outliers.csv, every image's outlier_score in scores.csv", markup=False)
    i = c["imbalance"]
    ratio = "a class has no training images" if i["ratio"] is None else f"largest/smallest class {i['ratio']:g}"
    rare = f"; under a third of an even share: {', '.join(i['rare'])}" if i["rare"] else ""
    err.print(f"class balance (train): {ratio}{rare}", markup=False)


def _print_duplicates(run: Path) -> None:
    from .runs import RunStore

    d = (RunStore(run).meta().score or {}).get("duplicates")
    if not d:
        return
    if not d["groups"]:
        err.print("exact duplicates: none", markup=False)
        return
    leak = d.get("across train and valid", 0)
    err.print(f"exact duplicates: {d['groups']:,} groups of {d['images']:,} identical images"
              + (f"; {leak:,} across train and valid (leakage)" if leak else "")
              + f"; listed in {run}/duplicates.csv", markup=False)


def _print_flags(run: Path) -> None:
    """The flag counts of run.json, and what --flag-top left out."""
    from .runs import RunStore

    summary = RunStore(run).meta().flags or {}
    counts = {k: n for k, n in summary.get("counts", {}).items() if not k.endswith("/none")}
    text = ", ".join(f"{k.replace('/', ' ')} {n:,}" for k, n in counts.items()) or "none"
    cut = summary.get("left_out") or {}
    if cut:
        text += (f"; {sum(cut.values()):,} more left out by --flag-top {summary.get('flag_top')} "
                 f"({', '.join(f'{k.replace(chr(47), chr(32))} {n:,}' for k, n in cut.items())}; "
                 "--flag-top 0 keeps all)")
    if summary.get("probabilities", "MC mean") != "MC mean":
        text += f"; decided on the {summary['probabilities']}"
    if summary.get("by_cleanlab"):
        text += (f"; mislabeled by cleanlab's filter on the out-of-sample {' and '.join(summary['by_cleanlab'])} "
                 "images (--flag-rule confidence: by --confidence)")
    err.print(f"flagged: {text}", markup=False)


@app.command()
@handle_errors
def flag(
    run: Path = RunOpt,
    confidence: float = typer.Option(0.5, "--confidence", help="Flag as mislabeled when another class gets at least this p̄."),
    flag_top: int = typer.Option(50, "--flag-top", help="At most this many flags of each kind per split and class (0: no cap)."),
    flag_rule: str = FlagRuleOpt,
) -> None:
    """Recompute the flags of RUN/scores.csv with other settings, without rescoring."""
    from .flags import FlagConfig
    from .score import flag_run

    flag_run(run, flags=FlagConfig(confidence=confidence, flag_top=flag_top or None, rule=flag_rule))
    _print_flags(run)
    typer.echo(f"flags written to {run}/scores.csv")


@app.command()
@handle_errors
def retrain(
    run: Path = RunOpt,
    decisions: Optional[Path] = typer.Option(None, "--decisions", help="decisions.csv exported from the report."),
    drop_flagged: bool = typer.Option(False, "--drop-flagged", help="Drop every flagged training image."),
    out: Optional[Path] = typer.Option(None, "--out", help="The new run folder (default: RUN-curated)."),
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output run."),
) -> None:
    """Train a new run on RUN's training set after review decisions (drop / relabel)."""
    from .curate import retrain_run

    r = retrain_run(run, decisions=decisions, drop_flagged=drop_flagged, out=out, device=device,
                    overwrite=overwrite, progress=BarProgress())
    c = r.curated
    err.print(
        f"applied: {c.dropped:,} dropped, {c.relabelled:,} relabelled, {c.kept:,} kept as they are"
        + (f"; {c.valid_decisions:,} decisions on validation images recorded, not applied" if c.valid_decisions else "")
        + f"; trained on {len(c.train_indices):,} images",
        markup=False,
    )
    err.print(f"validation accuracy: before {r.accuracy_before:.4f}, after {r.accuracy_after:.4f}", markup=False)
    typer.echo(f"curated run written to {r.run}/ (model.npz, train_log.csv, run.json, decisions.csv)")


@app.command()
@handle_errors
def report(
    run: List[Path] = typer.Option([Path("runs/default")], "--run", metavar="RUN", help="Run folder; repeat --run to pool several "
                                   "`audit acquire` runs (e.g. repeats split with --first-repeat) into one page."),
    top: int = typer.Option(30, "--top", help="Images per grid: the lowest and the highest per class."),
    metric: str = typer.Option("entropy", "--metric", help="entropy, mutual_info, variation_ratio or p_label (switchable in the page)."),
    split: str = typer.Option("valid", "--split", help="Which scored split to show."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: reports/<run name>, or <name>+<name>… for several runs)."),
) -> None:
    """Render RUN's scores (or an acquire run's curves) as a self-contained HTML page: OUT/index.html."""
    from .report import write_report

    result = write_report(run, out=out, top=top, metric=metric, split=split, progress=BarProgress())
    err.print(
        f"{result.n_images:,} image cells ({result.n_unique:,} distinct images), "
        f"{result.bytes / 1e6:.1f} MB, rendered in {result.seconds:.1f} s",
        markup=False,
    )
    typer.echo(f"report written to {result.path}")


@app.command()
@handle_errors
def acquire(
    strategy: str = typer.Option("bald,random", "--strategy", help="Comma-separated: bald, batchbald, entropy, varratio, "
                                 "meanstd, random, powerbald (or power/softmax before any score: softmaxentropy, ...)."),
    initial: Optional[int] = typer.Option(None, "--initial", help="Class-balanced initial labelled images (default 20; "
                                          "with a labelled pool, x_pool and y_pool, the training split is the start)."),
    beta: float = typer.Option(1.0, "--beta", help="Exponent of power/softmax sampling (powerbald, ...): 1 is Kirsch "
                               "et al. 2023's default."),
    step: int = typer.Option(10, "--step", help="Images acquired per round."),
    rounds: int = typer.Option(10, "--rounds", help="Acquisition rounds."),
    samples: int = typer.Option(100, "--samples", "-T", help="MC passes per pool image (Gal et al.'s code used 100)."),
    pool_subset: int = typer.Option(2000, "--pool-subset", help="Score a random subset of this many pool images per round (0: all)."),
    repeats: int = typer.Option(1, "--repeats"),
    first_repeat: int = typer.Option(0, "--first-repeat", help="Start at this repeat, counted from 0 as in "
                                     "al_curve.csv: --first-repeat 3 --repeats 2 runs the 4th and 5th, with the start "
                                     "and seeds they have in any run (they follow from --seed and the number)."),
    seed: int = typer.Option(0, "--seed"),
    recipe: str = typer.Option("gal", "--recipe", help="How each round trains: gal (Gal et al. 2017's CNN, 50 "
                               "epochs, batch 32, Adam from 5e-3 along a cosine) or batchbald (the BatchBALD paper's "
                               "CNN, Adam 1e-3, batch 64, epochs of 5,056 draws, early stopping on 1,024 carved "
                               "training images, patience 3). The options below override its settings."),
    model: Optional[str] = typer.Option(None, "--model", help="gal (Gal et al. 2017's CNN), batchbald (the BatchBALD "
                                        "paper's, dropout in its convolutions: the slower engine) or origin."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs per round (the most, with early "
                                         "stopping)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch (Gal et al.'s code: 128)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam's alpha at the start (gal's 5e-3 chosen on a "
                                       "validation split carved from the training images; Gal et al.'s code: 1e-3)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine: alpha falls to 0 over each training; "
                                           "constant: as the papers' code."),
    even_batches: Optional[bool] = typer.Option(None, "--even-batches/--no-even-batches", help="Near-equal batches "
                                                "per epoch (130 images at 128: 65 + 65); --no-even-batches: full "
                                                "batches and the remainder."),
    epoch_samples: Optional[int] = typer.Option(None, "--epoch-samples", help="An epoch draws this many labelled "
                                                "images with replacement (0: one pass over them)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping: stop after this many epochs "
                                           "without a better accuracy on the --valid-size images; best weights "
                                           "restored (at least 1; --valid-size 0 turns early stopping off)."),
    valid_size: Optional[int] = typer.Option(None, "--valid-size", help="Training images carved out for early "
                                             "stopping, never in the pool (0: none, and no early stopping)."),
    consistent_masks: bool = typer.Option(False, "--consistent-masks", help="Score the pool with one set of T "
                                          "dropout masks for every image, for every strategy (batchbald always "
                                          "does)."),
    stop_at_error: Optional[float] = typer.Option(
        None, "--stop-at-error", help="End a strategy's repeat once its validation error is at most this (e.g. 0.05)."),
    data: str = typer.Option("mnist", "--data"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    run: Path = typer.Option(Path("runs/al"), "--run", help="Output folder."),
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite"),
    resume: bool = typer.Option(False, "--resume", help="Go on with the run in --run (interrupted, or with more "
                                "--rounds, --repeats, strategies or a lower --stop-at-error); the other settings "
                                "must be the run's."),
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
    image_size: Optional[str] = ImageSizeOpt,
) -> None:
    """Active-learning loops: acquire by MC-dropout strategies, retrain, evaluate; RUN/al_curve.csv."""
    from .active import ALConfig, acquire_run, recipe_config
    from .data import parse_image_size
    from .curves import last_accuracy

    train, held = recipe_config(recipe, model=model, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                                even_batches=even_batches, epoch_samples=epoch_samples, patience=patience,
                                valid_size=valid_size)
    config = ALConfig(
        strategies=tuple(s.strip() for s in strategy.split(",") if s.strip()), initial=initial or 20, step=step,
        rounds=rounds, samples=samples, pool_subset=pool_subset or None, repeats=repeats, first_repeat=first_repeat,
        seed=seed, stop_error=stop_at_error, beta=beta, train=train, valid_size=held, consistent=consistent_masks,
    )
    from .cluster import ClusterConfig

    cluster = ClusterConfig.from_options(workers, scheduler)
    result = acquire_run(run, data=data, data_dir=None if data_dir is None else str(data_dir), config=config,
                         device=device, overwrite=overwrite, resume=resume, cluster=cluster, progress=BarProgress(),
                         initial_from_data=initial is None, image_size=parse_image_size(image_size))
    final = last_accuracy(result.curve)
    err.print("last validation accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()), markup=False)
    typer.echo(f"active learning written to {run}/ (al_curve.csv, acquired.csv, run.json)")


@app.command("next")
@handle_errors
def next_(
    run: Path = typer.Option(Path("runs/loop"), "--run", help="The loop's run folder (made by the first call)."),
    data: Optional[str] = typer.Option(None, "--data", help="First call only: a folder with train/, valid/ and "
                                       "pool/, a manifest .csv with pool rows, or an .npz with x_pool."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    k: int = typer.Option(100, "--k", help="Images to pick."),
    strategy: str = typer.Option("bald", "--strategy", help="bald, powerbald, batchbald, entropy, varratio, "
                                 "meanstd, random, or power/softmax before any score (softmaxentropy, ...)."),
    samples: Optional[int] = typer.Option(None, "--samples", "-T", help="MC passes per pool image (default: the "
                                          "run's; 100 on the first call)."),
    pool_subset: Optional[int] = typer.Option(None, "--pool-subset", help="Score a random subset of this many pool "
                                              "images (default: the whole pool)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Exponent of power/softmax sampling (default: the "
                                         "run's; 1, Kirsch et al. 2023's, on the first call)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds every round's training and choice (set by the "
                                       "first call: default 0)."),
    model: Optional[str] = typer.Option(None, "--model", help="gal (Gal et al. 2017's CNN), batchbald (the "
                                        "BatchBALD paper's) or origin (set by the first call: default gal)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs per round (set by the first call: "
                                         "default 50)."),
    partial: bool = typer.Option(False, "--partial", help="Go on although the last batch has images without a "
                                 "decision; they go back to the pool."),
    device: str = DeviceOpt,
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
    image_size: Optional[str] = ImageSizeOpt,
    classes: Optional[str] = typer.Option(None, "--classes", help="First call only: the class names, a,b,c in "
                                          "order, as a classes.txt beside the data lists them (to start from "
                                          "pool images with no labels)."),
) -> None:
    """Pick the next batch to label: train on what is labelled, score the pool, write RUN/rounds/R/."""
    from .cluster import ClusterConfig
    from .data import parse_classes, parse_image_size
    from .loop import next_batch, page_file

    cluster = ClusterConfig.from_options(workers, scheduler)
    r = next_batch(run, data=data, data_dir=None if data_dir is None else str(data_dir), k=k, strategy=strategy,
                   samples=samples, pool_subset=pool_subset, beta=beta, seed=seed,
                   model=model, epochs=epochs, partial=partial, device=device,
                   cluster=cluster, progress=BarProgress(), image_size=parse_image_size(image_size),
                   classes=parse_classes(classes))
    guessed = r.batch["guess"].astype(bool).any()
    err.print(f"round {r.round}: chose {len(r.batch):,} of {r.pool_size:,} pool images by {r.strategy} in "
              f"{r.seconds_choose:.1f} s on {r.device}" + (f"; the model's guesses have mean probability "
                                                             f"{float(r.batch['p_guess'].mean()):.2f}" if guessed else ""),
              markup=False)
    typer.echo(f"batch written to {r.run}/rounds/{r.round}/ (batch.csv, label.html, tasks.json); label it in "
               f"{r.run / page_file(r.round)}, then `audit label --run {r.run} labels.csv`")


@app.command()
@handle_errors
def label(
    file: Path = typer.Argument(..., help="labels.csv from the labelling page, a path,label or index,label CSV, "
                                "or Label Studio's JSON export of the round's tasks."),
    run: Path = typer.Option(Path("runs/loop"), "--run", help="The loop's run folder."),
    relabel: bool = typer.Option(False, "--relabel", help="Record a new label for an image the ledger already "
                                 "has labelled (else refused)."),
) -> None:
    """Bring labels back: check FILE and append it to RUN/labels.csv (all of it or none)."""
    from .loop import import_labels

    r = import_labels(run, file, relabel=relabel)
    n = r.added["status"].value_counts().to_dict() if len(r.added) else {}
    err.print(f"{file}: {n.get('labelled', 0):,} labelled, {n.get('skipped', 0):,} skipped, {n.get('unsure', 0):,} "
              f"unsure (those back to the pool){f'; {r.unchanged:,} already in the ledger' if r.unchanged else ''}; "
              f"{r.n_labelled:,} pool images labelled in all; {r.open:,} of the last batch without a decision",
              markup=False)
    typer.echo(f"ledger written to {r.run}/labels.csv; next: `audit next --run {r.run}`")


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
