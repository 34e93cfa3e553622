"""Active learning with a person labelling: ``audit next`` picks a batch from the
unlabelled pool, a person labels it (the labelling page, or Label Studio), and
``audit label`` brings the labels back into the run's ledger.

The run (``run.json`` command "loop") holds:

- ``labels.csv``: the ledger, one row per decision on a pool image (round, index,
  path, label, status, source, source_sha256, time); rows are only ever appended;
- ``rounds/R/batch.csv``: round R's batch (rank, pool index and path, score, the
  model's guess and its probability), ``rounds/R/label.html`` (the labelling page) and
  ``rounds/R/tasks.json`` (Label Studio tasks with the guesses as predictions);
- ``label_config.xml``: the Label Studio labelling config for the run's classes.

Round R trains on the training split plus every pool image labelled so far and picks
from the rest of the pool, through the same functions as ``audit acquire``'s
simulation (:func:`audit.active.loop_dataset`, :func:`audit.active.choose_batch`) and
with the same seeds, so a person who labels as the dataset's labels say draws the
simulation's curve.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import runs
from .acquire import parse_strategy
from .active import AL_TRAIN, ALConfig, _seed, choose_batch, loop_dataset
from .data import Dataset, Split, load_dataset
from .device import describe, get_device
from .errors import AuditError, bad_param
from .mc import SHARE_BLOCK, mc_predict
from .progress import NullProgress, Progress
from .tables import parse_table, restore
from .train import TrainConfig, check_run_free, train

if TYPE_CHECKING:
    from .cluster import ClusterConfig

LEDGER = "labels.csv"
LEDGER_COLUMNS = ("round", "index", "path", "label", "status", "source", "source_sha256", "time")
BATCH_COLUMNS = ("round", "rank", "index", "path", "score", "guess", "p_guess")
STATUSES = ("labelled", "skipped", "unsure")
LS_CONFIG = "label_config.xml"
# the Label Studio names of the config's tags, which its export's results carry
LS_CHOICES, LS_IMAGE = "label", "image"
# the labelling page's export: the run and round it came from, then one row per decided image
PAGE_COLUMNS = ("run", "round", "index", "path", "label", "status")
# audit next trains each round as audit acquire does, with a seed set of any size
LOOP_TRAIN = AL_TRAIN


def batch_file(r: int) -> str:
    return f"rounds/{r}/batch.csv"


def page_file(r: int) -> str:
    return f"rounds/{r}/label.html"


def tasks_file(r: int) -> str:
    return f"rounds/{r}/tasks.json"


@dataclass(frozen=True)
class LoopState:
    """Where a loop run stands, read from its files."""

    meta: runs.RunMeta
    config: ALConfig
    run_id: str
    batches: list[pd.DataFrame]  # round r's batch at [r - 1]
    ledger: pd.DataFrame

    @property
    def rounds(self) -> int:
        return len(self.batches)

    def current(self) -> dict[int, tuple[str, str]]:
        """pool index -> (status, label) of its latest ledger row."""
        out: dict[int, tuple[str, str]] = {}
        for row in self.ledger.itertuples(index=False):
            out[int(row.index)] = (row.status, row.label)
        return out

    def labelled(self) -> dict[int, str]:
        """pool index -> class name, for every image whose latest decision is a label."""
        return {i: lab for i, (st, lab) in self.current().items() if st == "labelled"}

    def picked(self) -> dict[int, int]:
        """pool index -> the last round whose batch holds it."""
        out: dict[int, int] = {}
        for r, b in enumerate(self.batches, 1):
            for i in b["index"]:
                out[int(i)] = r
        return out

    def open_in(self, r: int) -> list[int]:
        """Round r's images with no decision since it was picked (none before round 1)."""
        if r < 1:
            return []
        done = {int(row.index) for row in self.ledger.itertuples(index=False) if int(row.round) >= r}
        return [int(i) for i in self.batches[r - 1]["index"] if int(i) not in done]


@dataclass(frozen=True)
class NextResult:
    run: Path
    round: int
    batch: pd.DataFrame
    n_labelled: int  # images the round's model trained on
    valid_accuracy: float | None  # None without validation images
    pool_size: int  # images it chose from
    seconds_train: float
    seconds_choose: float  # scoring the pool and picking
    device: str
    strategy: str = ""  # what chose the batch: the one asked for, or random before any label


def _read_state(store: runs.RunStore) -> LoopState:
    meta = store.meta()
    if meta.command != "loop":
        raise AuditError(f"--run: {store.path} is an `audit {meta.command}` run, not one made by `audit next`")
    cfg = dict(meta.config)
    run_id = cfg.pop("run_id", None)
    if not isinstance(run_id, str):
        raise AuditError(f"{store.path / runs.RUN_JSON}: field 'config.run_id' is missing; not a loop run")
    try:
        config = ALConfig.from_json(cfg)
    except (TypeError, AuditError) as e:
        raise AuditError(f"{store.path / runs.RUN_JSON}: field 'config': {e}") from None
    n_rounds = len((meta.results or {}).get("rounds", []))
    batches = []
    for r in range(1, n_rounds + 1):
        b = store.read_table(batch_file(r), BATCH_COLUMNS, numeric=("round", "rank", "index", "score", "p_guess"),
                             dtype={"path": str, "guess": str}, keep_default_na=False)
        batches.append(b.astype({"index": "int64"}))
    if store.has(LEDGER):
        ledger = store.read_table(LEDGER, LEDGER_COLUMNS, numeric=("round", "index"), dtype=str,
                                  keep_default_na=False)
        ledger = ledger.astype({"round": "int64", "index": "int64"})
        for c in ("path", "label", "source"):
            ledger[c] = ledger[c].map(restore)
    else:
        ledger = pd.DataFrame({c: pd.Series(dtype="int64" if c in ("round", "index") else object)
                               for c in LEDGER_COLUMNS})
    for b in batches:
        b["path"] = b["path"].map(restore)
        b["guess"] = b["guess"].map(restore)
    return LoopState(meta, config, run_id, batches, ledger)


def labelled_dataset(run: str | os.PathLike, *, progress: Progress | None = None) -> Dataset:
    """The data of an `audit next` run as labelled so far: train = its training images
    followed by every pool image the ledger labels (in pool order), valid as it was, no
    pool; so ``audit train --data runs/loop`` trains a model on the final labelled set."""
    store = runs.RunStore(run, option="--data").require()
    if store.meta().command != "loop":
        raise AuditError(f"--data: {store.path} is an `audit {store.meta().command}` run folder; as data audit takes "
                         "an `audit next` run (what it has labelled), an .npz, an image folder or a manifest")
    state = _read_state(store)
    dataset = store.base_dataset(progress=progress)
    names = list(dataset.class_names)
    labelled = state.labelled()
    idx = np.array(sorted(labelled), np.int64)
    p, t = dataset.pool, dataset.train
    x = np.concatenate([t.x, p.x[idx]])
    y = np.concatenate([t.y, np.array([names.index(labelled[i]) for i in idx], np.int32)])
    paths = None if t.paths is None or p.paths is None else (*t.paths, *(p.paths[i] for i in idx))
    from .data import _finish

    return _finish(Split(x, y, paths), dataset.valid, dataset.class_names,
                   f"{store.path} ({len(t)} training + {len(idx)} labelled pool images)")


def loop_state(run: str | os.PathLike) -> LoopState:
    """The state of the loop run in ``run`` (for reports and scripts)."""
    return _read_state(runs.RunStore(run).require())


# ------------------------------------------------------------------------------ next


def next_batch(
    run: str | os.PathLike,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    k: int = 100,
    strategy: str = "bald",
    samples: int | None = None,
    pool_subset: int | None = None,
    beta: float | None = None,
    seed: int | None = None,
    train_config: TrainConfig | None = None,
    model: str | None = None,
    epochs: int | None = None,
    partial: bool = False,
    device: str = "cpu",
    cluster: "ClusterConfig | None" = None,
    progress: Progress | None = None,
    image_size: tuple[int, int] | None = None,
    classes: tuple[str, ...] | None = None,
) -> NextResult:
    """Train on everything labelled so far, score the pool by MC dropout and commit the
    next batch of ``k`` (batch.csv, the labelling page, Label Studio tasks).

    The first call makes the run from ``data`` (which needs a pool); later calls take
    the run's data and training settings, and may change ``k``, ``strategy``,
    ``samples`` and ``pool_subset`` from round to round. Refused while the last batch
    has images with no decision yet, unless ``partial`` (they go back to the pool).

    ``cluster``: the pool is scored in pieces on Dask workers (:mod:`audit.cluster`),
    each loading the data itself; the batch is the one this process would pick."""
    from .cluster import ClusterConfig, connect, worker_device

    progress = progress or NullProgress()
    cluster = cluster or ClusterConfig()
    store = runs.RunStore(run)
    dev = get_device(device)
    wdev = worker_device(cluster, device)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise bad_param("k", f"expected a positive number of images, got {k!r}")
    parse_strategy(strategy)  # one strategy a round
    with store.writing(), connect(cluster, wdev) as client:
        if store.exists():
            state = _read_state(store)
            meta = state.meta
            if image_size is not None and list(image_size) != meta.data.get("image_size"):
                raise AuditError(f"--image-size: {store.path} was made at "
                                 f"{'x'.join(map(str, meta.data.get('image_size') or ())) or 'the data size'}; "
                                 "leave out --image-size to go on with the run", usage=True)
            if classes is not None and list(classes) != meta.data.get("classes"):
                raise AuditError(f"--classes: {store.path} was made with "
                                 f"{','.join(meta.data.get('classes') or ()) or 'the classes of its data'}; "
                                 "leave out --classes to go on with the run", usage=True)
            if data is not None and (data if data == "mnist" else str(Path(data).resolve())) != meta.data["data"]:
                raise AuditError(f"--data: {store.path} was made on {meta.data['data']}, not {data}; leave out "
                                 "--data to go on with the run, or choose another --run")
            dataset = store.base_dataset(progress=progress)
            config = state.config
            if seed is not None and seed != config.seed:
                raise bad_param("seed", f"{store.path} was made with --seed {config.seed}; a run keeps its seed (leave "
                                "out --seed, or start another --run)")
            asked = train_config or config.train
            asked = replace(asked, model=model or asked.model, epochs=asked.epochs if epochs is None else epochs)
            if replace(asked, seed=config.train.seed, weight_decay=config.train.weight_decay) != config.train:
                raise AuditError(f"--model/--epochs: {store.path} trains each round as {config.train.model}, "
                                 f"{config.train.epochs} epochs; a run keeps how it trains (leave them out, or "
                                 "start another --run)", usage=True)
        else:
            check_run_free(store, overwrite=False)
            if data is None:
                raise AuditError(f"--data: {store.path} is a new run; name its data (a folder with train/, valid/ "
                                 "and pool/, a manifest with pool rows, or an .npz with x_pool)", usage=True)
            dataset = load_dataset(data, data_dir=data_dir, progress=progress, image_size=image_size,
                                   classes=classes)
            if dataset.pool is None:
                raise AuditError(f"--data: {data} has no unlabelled pool; expected a folder with pool/ beside "
                                 "train/ and valid/, a manifest with pool rows, or an .npz with x_pool")
            config = ALConfig(strategies=(strategy,), initial=max(len(dataset.train), 1), step=1, rounds=0,
                              samples=100 if samples is None else samples, pool_subset=pool_subset,
                              seed=0 if seed is None else seed,
                              train=replace(train_config or LOOP_TRAIN, **({"model": model} if model else {}),
                                            **({"epochs": epochs} if epochs is not None else {})))
            state = None
            meta = runs.RunMeta(command="loop", created=runs.now(),
                                config={**config.to_json(), "run_id": secrets.token_hex(8)}, seed=config.seed,
                                data=runs.data_source(data, data_dir, dataset, run=store.path,
                                                      image_size=image_size, classes=classes,
                                                      n_pool=len(dataset.pool)),
                                device=str(device), versions=runs.versions(), results={"rounds": []})
        # this round's settings: the run's, but for what may change per round
        subset = pool_subset if pool_subset is not None else config.pool_subset
        if subset is not None and subset < k:
            raise bad_param("pool_subset", f"expected at least --k ({k}), got {subset}")
        config = replace(config, strategies=(strategy,), step=k, pool_subset=subset,
                         samples=config.samples if samples is None else samples,
                         beta=config.beta if beta is None else beta)
        rnd = 0 if state is None else state.rounds  # 0-based: the simulation's round of this training
        labelled_pool: dict[int, str] = {}
        if state is not None:
            if rnd and not partial:
                left = state.open_in(rnd)
                if left:
                    raise AuditError(
                        f"--run: round {rnd}'s batch has {len(left)} of {len(state.batches[-1])} images without a "
                        f"decision; label them ({store.path / page_file(rnd)}) and bring the labels with `audit "
                        f"label --run {store.path} FILE`, or pass --partial to send them back to the pool")
            labelled_pool = state.labelled()
        names = list(dataset.class_names)
        pool_y = np.full(len(dataset.pool), -1, np.int32)
        for i, lab in labelled_pool.items():
            pool_y[i] = names.index(lab)
        full, start = loop_dataset(replace(dataset, pool=Split(dataset.pool.x, pool_y, dataset.pool.paths)))
        n_train = len(dataset.train)
        labelled = np.sort(np.concatenate([start, n_train + np.array(sorted(labelled_pool), np.int64)]))
        candidates = np.setdiff1d(np.arange(len(full.train)), labelled)
        if k > len(candidates):
            raise bad_param("k", f"expected 1..{len(candidates)} (the images left in the pool), got {k}")

        t0 = time.perf_counter()
        result = None
        chosen_by = strategy
        if len(labelled):
            result = train(full, config.train_config(len(labelled), _seed(config.seed, 0, rnd, 1)),
                           subset=labelled, device=device, validate=False)
            accuracy = float(result.valid_accuracy) if len(dataset.valid) else None
            progress.close(f"round {rnd + 1}: trained on {len(labelled):,} labelled images, " + (
                f"validation accuracy {accuracy:.4f}" if accuracy is not None else "no validation images")
                + f" ({time.perf_counter() - t0:.1f} s)")
        else:  # nothing labelled yet: no model to ask; the first batch is a random one
            accuracy = None
            chosen_by = "random"
            progress.close(f"round {rnd + 1}: no labelled images yet, so no model: {k} chosen at random")
        t_train = time.perf_counter() - t0
        t1 = time.perf_counter()
        scorer = None
        if client is not None and result is not None:
            scorer = _cluster_scorer(client, meta.data, result.model, progress, wdev)
        new, scores, probs = choose_batch(result and result.model, full.train.x, candidates, chosen_by, config, 0,
                                          rnd, dev, progress=progress, scorer=scorer)
        if probs is None and result is not None:  # random: the guesses shown on the page
            probs = mc_predict(result.model, full.train.x[new], samples=config.samples,
                               seed=_seed(config.seed, 0, rnd, 5), device=dev).probs
        t_choose = time.perf_counter() - t1
        idx = new - n_train
        paths = dataset.pool.paths
        if probs is not None:
            guess = probs.argmax(axis=1)
            guesses, p_guess = [names[g] for g in guess], np.round(probs[np.arange(len(new)), guess], 4)
        else:
            guesses, p_guess = [""] * len(new), np.full(len(new), np.nan)
        batch = pd.DataFrame({
            "round": rnd + 1, "rank": np.arange(1, len(new) + 1), "index": idx,
            "path": [paths[i] if paths else "" for i in idx], "score": np.round(scores.astype(np.float64), 6),
            "guess": guesses, "p_guess": p_guess})
        info = {"round": rnd + 1, "strategy": chosen_by, "k": k, "samples": config.samples, "beta": config.beta,
                "pool_subset": config.pool_subset, "pool_size": int(len(candidates)),
                "n_labelled": int(len(labelled)), "n_labelled_pool": len(labelled_pool),
                "valid_accuracy": accuracy, "seconds_train": round(t_train, 3),
                "seconds_choose": round(t_choose, 3), "created": runs.now()}
        rounds = [*((meta.results or {}).get("rounds", [])), info]
        run_id = meta.config["run_id"]
        with store.transaction() as txn:
            txn.write_bytes(batch_file(rnd + 1), _batch_csv(batch))
            txn.write_text(page_file(rnd + 1), labelling_page(dataset, batch, run_id, rnd + 1, str(store.path)))
            txn.write_text(tasks_file(rnd + 1), json.dumps(ls_tasks(dataset, batch, run_id, rnd + 1), indent=1))
            if rnd == 0:
                txn.write_text(LS_CONFIG, ls_config(dataset.class_names))
            txn.commit(meta.evolve(results={**(meta.results or {}), "rounds": rounds}))
    return NextResult(store.path, rnd + 1, batch, int(len(labelled)), accuracy, int(len(candidates)), t_train,
                      t_choose, describe(dev), chosen_by)


# images per Dask piece of a pool's scoring
POOL_PIECE = SHARE_BLOCK  # whole groups of shared masks: the same products as in-process


def _cluster_scorer(client, data: dict, model, progress: Progress, device: str = "cpu"):
    """A ``scorer`` for :func:`choose_batch` that scores the pool in pieces on ``client``'s
    workers: each loads the data from ``data`` (the run's data block) and gets the
    round's weights (sent to the cluster once); ``offset`` gives each piece the masks
    its images get in one in-process call, so the result is the same."""
    from .cluster import run_pieces
    from .mc import MCResult

    weights = client.scatter(runs.model_bytes(model), broadcast=True)
    spec = model.spec.to_json()

    def score(pool, samples, seed, masks, return_mc):
        pieces = [(data, spec, weights, pool[a:a + POOL_PIECE], a, samples, seed, masks, return_mc, device)
                  for a in range(0, len(pool), POOL_PIECE)]
        parts: list = [None] * len(pieces)
        progress.start(f"score {len(pool):,} pool images x {samples} passes in {len(pieces)} pieces", len(pool))

        def done(i, r):
            parts[i] = r
            progress.advance(len(r["probs"]))

        run_pieces(client, pool_piece, pieces, on_done=done)
        progress.close()
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if parts[0][k] is not None}
        return MCResult(**out)

    return score


_WORKER_DATA: dict = {}  # on a worker: loop datasets by (path, fingerprint), loaded once per process


def pool_piece(data: dict, spec: dict, weights: bytes, idx: np.ndarray, offset: int, samples: int, seed: int,
               masks: str, return_mc: bool, device: str = "cpu") -> dict:
    """On a worker: MC-score images ``idx`` of the loop's image array (training images,
    then the pool) at positions ``offset``.. of the round's scoring; ``data`` is the
    run's data block."""
    from .model import ModelSpec, model_from_spec

    key = (data["data"], data.get("data_dir"), data["fingerprint"])
    if key not in _WORKER_DATA:
        ds = runs.load_source(data)
        if ds.fingerprint != data["fingerprint"]:
            raise AuditError(f"{data['data']}: not the data of the run on this worker (fingerprint "
                             f"{ds.fingerprint[:12]}, the run's {data['fingerprint'][:12]}): the workers must see "
                             "the same files")
        _WORKER_DATA[key] = loop_dataset(ds)[0].train.x
    model = runs.load_weights(model_from_spec(ModelSpec.from_json(spec)), weights, "the round's model")
    r = mc_predict(model, _WORKER_DATA[key][idx], samples=samples, seed=seed, masks=masks, return_mc=return_mc,
                   workers=1, offset=offset, device=device)
    return {"probs": r.probs, "mc_probs": r.mc_probs, **r.scores()}


def _batch_csv(batch: pd.DataFrame) -> bytes:
    return runs.csv_bytes(batch)  # text cells neutralised there


# ----------------------------------------------------------------- the labelling page


def labelling_page(dataset: Dataset, batch: pd.DataFrame, run_id: str, rnd: int, run_name: str) -> str:
    """The self-contained page for labelling ``batch``: images inlined, keyboard first."""
    from .report import class_keys, environment, png_data_uri, script_json

    names = list(dataset.class_names)
    keys = class_keys(names, {"s", "k"})  # s skips; k as in the report's review
    cells = [{"index": int(r.index), "path": r.path, "src": png_data_uri(dataset.pool.x[int(r.index)]),
              "guess": r.guess, "p": None if r.guess == "" else float(r.p_guess), "score": float(r.score),
              "rank": int(r.rank)}
             for r in batch.itertuples(index=False)]
    ctx = {"run": run_name, "run_id": run_id, "round": rnd, "classes": names,
           "keys": keys, "cells": cells, "columns": list(PAGE_COLUMNS),
           "storage_key": f"audit-label-{run_id}-{rnd}", "picker": len(names) > 10}
    blob = script_json({"classes": names, "keys": keys, "run_id": run_id, "round": rnd,
                        "columns": list(PAGE_COLUMNS), "storage_key": ctx["storage_key"]})
    return environment().get_template("label.html.j2").render(**ctx, data_json=blob)


# -------------------------------------------------------------------- Label Studio


def ls_config(class_names) -> str:
    """Label Studio's image-classification config for the run's classes."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in class_names)
    return (f'<View>\n  <Image name="{LS_IMAGE}" value="$image"/>\n'
            f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="single" showInLine="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def ls_tasks(dataset: Dataset, batch: pd.DataFrame, run_id: str, rnd: int) -> list[dict]:
    """Label Studio tasks for ``batch``: the image inlined as a data URI (Label Studio
    shows it with no storage to set up), audit's ids in ``data``, and the model's guess
    as a prediction (a pre-annotation the labeller accepts or changes)."""
    from .report import png_data_uri

    tasks = []
    for r in batch.itertuples(index=False):
        tasks.append({
            "data": {"image": png_data_uri(dataset.pool.x[int(r.index)]), "audit_run": run_id,
                     "audit_round": rnd, "audit_index": int(r.index), "audit_path": r.path},
            "predictions": [{"model_version": f"audit round {rnd}", "score": float(r.p_guess), "result": [
                {"from_name": LS_CHOICES, "to_name": LS_IMAGE, "type": "choices",
                 "value": {"choices": [r.guess]}}]}] if r.guess else [],
        })
    return tasks


# ------------------------------------------------------------------------------ label


@dataclass(frozen=True)
class LabelResult:
    run: Path
    added: pd.DataFrame  # the ledger rows this file added
    unchanged: int  # rows that repeated what the ledger says
    n_labelled: int  # pool images labelled in the run after it
    open: int  # images of the last batch still without a decision


def import_labels(run: str | os.PathLike, file: str | os.PathLike, *, relabel: bool = False) -> LabelResult:
    """Check the labels in ``file`` (the page's labels.csv, a ``path,label`` or
    ``index,label`` CSV, or Label Studio's JSON export of the run's tasks) and append
    them to the run's ledger in one commit: all of the file's rows, or none."""
    store = runs.RunStore(run)
    path = Path(file)
    if not path.is_file():
        raise AuditError(f"FILE: {path} {'is a folder, not a labels file' if path.is_dir() else 'does not exist'}")
    if not store.path.exists():
        raise AuditError(f"--run: {store.path} does not exist; start the loop with `audit next --run {store.path} "
                         "--data DATA`")
    raw = path.read_bytes()
    with store.writing():
        state = _read_state(store.require())
        if not state.batches:
            raise AuditError(f"--run: {store.path} has no batch yet; run `audit next --run {store.path}` first")
        rows = _parse_labels(path, raw, state)
        picked = state.picked()
        paths = {int(i): p for b in state.batches for i, p in zip(b["index"], b["path"])}  # pool index -> path
        by_path = {p: i for i, p in paths.items() if p}
        names = set(state.meta.class_names)
        seen: dict[int, tuple[str, str]] = {}
        for line, r in rows:
            where = f"{path}: {line}"
            i = r.get("index")
            if i is None:
                if r["path"] not in by_path:
                    raise AuditError(f"{where}: {r['path']!r} is not in any batch of {store.path} "
                                     "(labels are taken for the images `audit next` picked)")
                i = by_path[r["path"]]
            elif i not in picked:
                raise AuditError(f"{where}: pool image {i} is not in any batch of {store.path} (labels are taken "
                                 "for the images `audit next` picked)")
            if r["status"] == "labelled" and r["label"] not in names:
                raise AuditError(f"{where}: unknown class {r['label']!r}; the run's classes are "
                                 f"{', '.join(sorted(names))}")
            new = (r["status"], r["label"] if r["status"] == "labelled" else "")
            if i in seen and seen[i] != new:
                raise AuditError(f"{where}: pool image {i} appears twice, as {_say(seen[i])} and {_say(new)}; "
                                 "keep one")
            seen[i] = new
        current = state.current()
        added, unchanged = [], 0
        digest = hashlib.sha256(raw).hexdigest()
        stamp = runs.now()
        for i, new in seen.items():
            old = current.get(i)
            if old == new:
                unchanged += 1
                continue
            if old is not None and old[0] == "labelled" and not relabel:
                raise AuditError(f"{path}: pool image {i} ({paths[i] or 'no path'}) is labelled {old[1]!r} in the "
                                 f"ledger; this file says {_say(new)}. Pass --relabel to record the change")
            added.append({"round": picked[i], "index": i, "path": paths[i], "label": new[1], "status": new[0],
                          "source": path.name, "source_sha256": digest, "time": stamp})
        add = pd.DataFrame(added, columns=list(LEDGER_COLUMNS))
        if len(add):
            ledger = pd.concat([state.ledger, add], ignore_index=True) if len(state.ledger) else add
            with store.transaction() as txn:
                txn.write_bytes(LEDGER, runs.csv_bytes(ledger))  # text cells neutralised there
                txn.commit(state.meta)
            state = _read_state(store)
        return LabelResult(store.path, add, unchanged, len(state.labelled()), len(state.open_in(state.rounds)))


def _say(decision: tuple[str, str]) -> str:
    st, lab = decision
    return repr(lab) if st == "labelled" else st


def _parse_labels(path: Path, raw: bytes, state: LoopState) -> list[tuple[str, dict]]:
    """(where, {index or path, label, status}) for each row of a labels file."""
    if not raw.strip():
        raise AuditError(f"{path}: empty; expected labels.csv from the labelling page, a path,label or index,label "
                         "CSV, or Label Studio's JSON export")
    if raw.lstrip()[:1] in (b"[", b"{"):
        return _parse_ls(path, raw, state)
    df = parse_table(raw, path, ("label",), dtype=str, keep_default_na=False)
    if "index" not in df.columns and "path" not in df.columns:
        raise AuditError(f"{path}: expected a column 'index' or 'path' beside 'label' (found "
                         f"{', '.join(map(str, df.columns))})")
    if "run" in df.columns:
        other = sorted(set(df["run"]) - {state.run_id})
        if other:
            raise AuditError(f"{path}: labels for another run (its run column says {other[0]!r}; "
                             f"{runs.RUN_JSON} of this run says {state.run_id!r})")
    out = []
    for n, r in enumerate(df.to_dict("records"), 2):
        status = (r.get("status") or "labelled").strip()
        if status not in STATUSES:
            raise AuditError(f"{path}: line {n}: status {status!r}; expected one of {', '.join(STATUSES)}")
        label = restore(str(r["label"]).strip())
        if status == "labelled" and not label:
            raise AuditError(f"{path}: line {n}: no label; give one, or status skipped or unsure")
        row: dict = {"label": label, "status": status, "index": None, "path": None}
        idx = str(r.get("index", "")).strip()
        if idx:
            if not idx.isdigit():
                raise AuditError(f"{path}: line {n}: index {idx!r}; expected a pool index (a whole number >= 0)")
            row["index"] = int(idx)
        else:
            p = restore(str(r.get("path", "")).strip())
            if not p:
                raise AuditError(f"{path}: line {n}: neither an index nor a path")
            row["path"] = p
        out.append((f"line {n}", row))
    if not out:
        raise AuditError(f"{path}: a header but no labels")
    return out


def _parse_ls(path: Path, raw: bytes, state: LoopState) -> list[tuple[str, dict]]:
    """Label Studio's JSON export: per task ``data.audit_run`` / ``data.audit_index``
    (written into the tasks by ``audit next``), and per annotation ``was_cancelled``
    (a skip) and the ``choices`` result of the run's config. A task with no
    annotation stays open; two annotations must agree."""
    try:
        tasks = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AuditError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(tasks, list):
        raise AuditError(f"{path}: expected Label Studio's JSON export (a list of tasks), found a "
                         f"{type(tasks).__name__}")
    out = []
    for n, t in enumerate(tasks):
        where = f"task {t.get('id', n) if isinstance(t, dict) else n}"
        data = t.get("data") if isinstance(t, dict) else None
        if not isinstance(data, dict) or "audit_run" not in data or not isinstance(data.get("audit_index"), int):
            raise AuditError(f"{path}: {where} has no data.audit_run and data.audit_index: not a task `audit next` "
                             "wrote (an export of another Label Studio project?)")
        if data["audit_run"] != state.run_id:
            raise AuditError(f"{path}: {where} is from another run (data.audit_run {data['audit_run']!r}; "
                             f"{runs.RUN_JSON} of this run says {state.run_id!r}): an export of another project")
        decisions = set()
        for a in t.get("annotations") or []:
            if not isinstance(a, dict):
                continue
            if a.get("was_cancelled"):
                decisions.add(("skipped", ""))
                continue
            chosen = [c for res in a.get("result") or [] if isinstance(res, dict) and res.get("type") == "choices"
                      for c in (res.get("value") or {}).get("choices") or []]
            if len(chosen) > 1:
                raise AuditError(f"{path}: {where}: an annotation chose {len(chosen)} classes; expected one")
            if chosen:
                decisions.add(("labelled", str(chosen[0])))
        labels = {d for d in decisions if d[0] == "labelled"}
        if len(labels) > 1:
            raise AuditError(f"{path}: {where} (pool image {data['audit_index']}) has annotations that disagree: "
                             f"{', '.join(sorted(repr(lab) for _, lab in labels))}; settle it in Label Studio first")
        if labels:
            st, lab = labels.pop()
        elif decisions:
            st, lab = "skipped", ""
        else:
            continue  # not annotated yet: stays open
        out.append((where, {"index": data["audit_index"], "path": None, "label": lab, "status": st}))
    if not out:
        raise AuditError(f"{path}: no annotated task; label some in Label Studio, then export again")
    return out
