"""``audit retrain``: a new run trained on a run's training set after review decisions.

The decisions themselves (reading, checking, applying) are :mod:`audit.decisions`.
The source data and the source run are never modified: a curated run keeps every
image, trains on the kept indices with the new labels, and records the decisions it
applied as its decisions.csv (covered by run.json's manifest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import runs
from .decisions import Curated, apply_decisions, flagged_decisions, read_decisions, validate_decisions
from .device import get_device
from .errors import AuditError
from .train import check_run_free, evaluate, fit_and_write, stored_train_config


@dataclass(frozen=True)
class RetrainResult:
    run: Path
    curated: Curated
    accuracy_before: float  # validation accuracy of the source run's model
    accuracy_after: float  # validation accuracy of the curated run's model
    seconds: float


def retrain_run(
    run: str | os.PathLike = "runs/default",
    *,
    decisions: str | os.PathLike | None = None,
    drop_flagged: bool = False,
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress=None,
) -> RetrainResult:
    """Train a new run on ``run``'s training set after review decisions.

    ``decisions`` is a decisions.csv; ``drop_flagged`` drops every training image
    flagged in scores.csv (explicit decisions win where both speak). The new run
    (default ``runs/<name>-curated``) keeps the decisions it applied as decisions.csv
    and in run.json; the source data and the source run are not modified.
    """
    from .score import read_scores

    source_store = runs.RunStore(run).require()
    if decisions is None and not drop_flagged:
        raise AuditError("retrain: give --decisions FILE, --drop-flagged, or both", usage=True)
    dev = get_device(device)
    name = source_store.path.resolve().name
    out_store = runs.RunStore(Path(out) if out is not None else source_store.path.resolve().parent / f"{name}-curated",
                              option="--out")
    if out_store.path.resolve() == source_store.path.resolve():
        raise AuditError(f"--out: {out_store.path} is the source run; a curated run goes into a new folder")
    meta = source_store.meta()
    with out_store.writing():
        check_run_free(out_store, overwrite)
        base = source_store.base_dataset(progress=progress)
        dataset = source_store.dataset(base=base)
        parts = []
        if decisions is not None:
            parts.append(validate_decisions(read_decisions(decisions), dataset, source=str(decisions)))
        if drop_flagged:
            scores = read_scores(source_store, ("split", "index", "label", "pred", "flag"),
                                 hint="; rerun `audit score` to add the flags")
            parts.append(validate_decisions(flagged_decisions(scores), dataset,
                                            source=str(source_store.path / runs.SCORES)))
        prior = meta.data.get("curation")
        if prior:  # a curated run's own decisions carry over, so the base data + one file rebuild it
            own = read_decisions(source_store.path / prior["decisions"], source_store.read_bytes(prior["decisions"]))
            parts.append(validate_decisions(own, dataset, source=str(source_store.path / prior["decisions"])))
        merged = pd.concat(parts, ignore_index=True).drop_duplicates(["split", "index"], keep="first")
        merged = merged.assign(
            index=merged["index"].astype(str),
            new_label=[dataset.class_names[i] if i >= 0 else "" for i in merged["new_label"]],
        )
        curated = apply_decisions(base, merged, train_indices=source_store.subset())
        if len(curated.train_indices) == 0:
            raise AuditError("retrain: the decisions drop every training image; nothing to train on")

        model = source_store.load_model()
        model.to_device(dev)
        _, before = evaluate(model, dataset.valid, device=dev)
        source = {k: v for k, v in meta.data.items() if k in ("data", "data_dir")}
        if meta.data.get("data_rel"):  # the data inside the source run: keep the path that finds it
            source["data"] = str(Path(source_store.data_path()).resolve())
        source = {**runs.data_source(source["data"], source.get("data_dir"), curated.dataset, run=out_store.path,
                                     **runs.source_options(meta.data)),
                  "curation": {
                      "source_run": str(source_store.path.resolve()),
                      "base_fingerprint": base.fingerprint,
                      "decisions": runs.DECISIONS,
                      "from_file": None if decisions is None else str(Path(decisions).resolve()),
                      "drop_flagged": drop_flagged,
                      "dropped": curated.dropped,
                      "relabelled": curated.relabelled,
                      "kept": curated.kept,
                      "valid_decisions_not_applied": curated.valid_decisions,
                  }}
        result = fit_and_write(
            out_store, curated.dataset, source,
            config=stored_train_config(meta.config, str(source_store.path / runs.RUN_JSON)),
            subset=curated.train_indices, device=device, progress=progress, command="retrain",
            extra={"results_before": {"valid_accuracy": before}},
            files={runs.DECISIONS: runs.csv_bytes(merged)},
        )
    return RetrainResult(out_store.path, curated, before, result.valid_accuracy, result.seconds)
