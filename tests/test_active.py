from __future__ import annotations

import dataclasses
from dataclasses import replace
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import audit
from audit.active import AL_TRAIN, ALConfig, initial_set, pool_runs, run_active_learning
from audit.curves import reach_table, versus
from audit.cli import app
from audit.errors import AuditError

runner = CliRunner()
SMALL = dict(initial=6, step=3, rounds=2, samples=4, pool_subset=60, train=replace(AL_TRAIN, epochs=3, batch_size=16))


def acquire_args(data, run, strategy, *extra, rounds=1, epochs=2):
    """`audit acquire` on the small generated data, in a few seconds; ``extra`` goes last."""
    return ["acquire", "--data", str(data), "--run", str(run), "--strategy", strategy, "--initial", "6",
            "--step", "3", "--rounds", str(rounds), "--samples", "4", "--pool-subset", "60",
            "--epochs", str(epochs), "--batch-size", "16", *extra]


def test_initial_set_is_balanced():
    labels = np.repeat(np.arange(10), 50)
    idx = initial_set(labels, 20, 10, np.random.default_rng(0))
    assert np.bincount(labels[idx], minlength=10).tolist() == [2] * 10 and len(set(idx)) == 20
    idx = initial_set(labels, 13, 10, np.random.default_rng(0))
    assert sorted(np.bincount(labels[idx], minlength=10)) == [1] * 7 + [2] * 3


@pytest.mark.parametrize("arch", ["origin", "gal"])
def test_loop_shares_the_start_and_records_everything(shapes_npz, arch):
    ds = audit.load_dataset(shapes_npz)
    cfg = ALConfig(strategies=("bald", "batchbald", "random"), **{**SMALL, "train": replace(SMALL["train"], model=arch)})
    res = run_active_learning(ds, cfg)
    c, a = res.curve, res.acquired
    assert len(c) == 3 * (cfg.rounds + 1)
    assert c[c.strategy == "bald"].n_labelled.tolist() == [6, 9, 12]
    assert c.valid_accuracy.between(0, 1).all() and (c.seconds > 0).all()
    starts = {s: set(a[(a.strategy == s) & (a["round"] == 0)]["index"]) for s in cfg.strategies}
    assert starts["bald"] == starts["batchbald"] == starts["random"] and len(starts["bald"]) == 6
    for s in cfg.strategies:
        picked = a[a.strategy == s]["index"]
        assert picked.is_unique and len(picked) == 12  # nothing acquired twice, 6 + 2 x 3
        assert (a[(a.strategy == s) & (a["round"] > 0)].groupby("round").size() == 3).all()
    assert a[(a.strategy == "bald") & (a["round"] > 0)].score.gt(0).all()


def test_same_seed_same_curve(shapes_npz):
    ds = audit.load_dataset(shapes_npz)
    cfg = ALConfig(strategies=("entropy",), **SMALL)
    a, b = run_active_learning(ds, cfg), run_active_learning(ds, cfg)
    pd.testing.assert_frame_equal(a.acquired, b.acquired)
    np.testing.assert_array_equal(a.curve.valid_accuracy, b.curve.valid_accuracy)


def test_repeats_split_over_runs_give_the_same_curves(shapes_npz):
    ds = audit.load_dataset(shapes_npz)
    cfg = ALConfig(strategies=("bald", "random"), **{**SMALL, "rounds": 1})
    both = run_active_learning(ds, dataclasses.replace(cfg, repeats=2))
    second = run_active_learning(ds, dataclasses.replace(cfg, first_repeat=1))
    assert second.curve.repeat.unique().tolist() == [1]
    want = both.curve[both.curve.repeat == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(second.curve.drop(columns="seconds"), want.drop(columns="seconds"))
    pd.testing.assert_frame_equal(second.acquired, both.acquired[both.acquired.repeat == 1].reset_index(drop=True))
    # and the two repeats started from different images
    a = both.acquired[both.acquired["round"] == 0]
    assert set(a[a.repeat == 0]["index"]) != set(a[a.repeat == 1]["index"])


def test_reach_table():
    curve = pd.DataFrame({"strategy": "bald", "repeat": 0, "round": [0, 1, 2], "n_labelled": [20, 30, 40],
                          "valid_accuracy": [0.8, 0.9, 0.96], "seconds": 1.0})  # 0.9 is exactly 10% error
    assert reach_table(curve, 20) == {"bald": {"acquired_max": 20, "10%": 10, "10% per repeat": [10],
                                               "5%": 20, "5% per repeat": [20]}}
    never = reach_table(curve.assign(valid_accuracy=0.5), 20)["bald"]
    assert never["10%"] is None and never["5% per repeat"] == [None]
    # per repeat, then the mean; a repeat that stopped early still counts
    two = pd.concat([curve, curve.iloc[:2].assign(repeat=1, valid_accuracy=[0.7, 0.95])])
    r = reach_table(two, 20)["bald"]
    assert r["10% per repeat"] == [10, 10] and r["5% per repeat"] == [20, 10] and r["5%"] == 15
    r = reach_table(pd.concat([curve, curve.assign(repeat=1, valid_accuracy=0.93)]), 20)["bald"]
    assert r["5%"] is None and r["5% per repeat"] == [20, None] and r["10%"] == 5


def test_versus_counts_repeats_against_random():
    def rows(strategy, rep, accs):
        return [dict(strategy=strategy, repeat=rep, round=k, n_labelled=20 + 10 * k, valid_accuracy=a, seconds=1.0)
                for k, a in enumerate(accs)]

    curve = pd.DataFrame(
        rows("random", 0, [0.8, 0.9, 0.95]) + rows("random", 1, [0.8, 0.85, 0.9]) + rows("random", 2, [0.8, 0.9])
        + rows("random", 3, [0.8, 0.85])
        + rows("bald", 0, [0.8, 0.95]) + rows("bald", 1, [0.8, 0.9, 0.92]) + rows("bald", 2, [0.8, 0.85, 0.9])
        + rows("bald", 3, [0.8, 0.85, 0.88, 0.9])
    )
    v = versus(curve, 20)
    assert list(v) == ["bald"]
    # 10% after (bald, random) acquired: repeat 0 (10, 10) tied, 1 (10, 20) ahead, 2 (20, 10) behind,
    # 3: random stopped at 10 without reaching it, bald reached it at 30: open
    assert v["bald"]["10%"] == dict(ahead=1, tied=1, behind=1, open=1)
    # 5%: repeat 0 (10, 20) ahead; in 1 to 3 neither reached it: open
    assert v["bald"]["5%"] == dict(ahead=1, tied=0, behind=0, open=3)
    # random stopped short but after bald got there: ahead
    curve2 = pd.DataFrame(rows("random", 0, [0.8, 0.85, 0.88]) + rows("bald", 0, [0.8, 0.9]))
    assert versus(curve2, 20)["bald"]["10%"]["ahead"] == 1
    assert versus(curve[curve.strategy == "bald"], 20) == {}


def test_stop_at_error_ends_a_curve(shapes_npz):
    ds = audit.load_dataset(shapes_npz)
    cfg = ALConfig(strategies=("entropy", "random"), **{**SMALL, "rounds": 3})
    full = run_active_learning(ds, cfg).curve
    level = 1 - full[full.strategy == "entropy"].valid_accuracy.iloc[1]  # reached at round 1
    stopped = run_active_learning(ds, dataclasses.replace(cfg, stop_error=level))
    c, a = stopped.curve, stopped.acquired
    for s in ("entropy", "random"):
        want = full[full.strategy == s]
        hit = [i for i, acc in enumerate(want.valid_accuracy) if acc >= 1 - level - 1e-9]
        n = hit[0] + 1 if hit else len(want)
        got = c[c.strategy == s]
        assert len(got) == n and got.valid_accuracy.tolist() == want.valid_accuracy.tolist()[:n]
        assert a[a.strategy == s]["round"].max() == n - 1  # nothing acquired after the stop


@pytest.mark.parametrize("kwargs, option", [
    (dict(strategies=("bald", "coreset")), "strategies"), (dict(step=0), "step"),
    (dict(pool_subset=2, step=3), "pool_subset"), (dict(samples=0), "samples"),
    (dict(stop_error=0.0), "stop_error"), (dict(stop_error=1.5), "stop_error"),
    (dict(first_repeat=-1), "first_repeat"), (dict(batchbald_samples=0), "batchbald_samples"),
    (dict(seed=-1), "seed"), (dict(train="fast"), "train"),
])
def test_bad_config(kwargs, option):
    with pytest.raises(AuditError, match=f"^{option}: "):
        ALConfig(**kwargs)


def test_acquire_command(shapes_npz, tmp_path):
    run = tmp_path / "al"
    args = acquire_args(shapes_npz, run, "varratio,meanstd", "--schedule", "constant", "--model", "origin")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "varratio repeat 1/1 round 1/1: 9 labelled" in r.output
    assert r.output.strip().splitlines()[-1] == f"active learning written to {run}/ (al_curve.csv, acquired.csv, run.json)"
    curve = pd.read_csv(run / "al_curve.csv")
    assert list(curve.columns) == ["strategy", "repeat", "round", "n_labelled", "valid_accuracy", "seconds"]
    assert list(pd.read_csv(run / "acquired.csv").columns) == ["strategy", "repeat", "round", "index", "score"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["complete"] and set(meta["results"]) == {"varratio", "meanstd"}
    assert (meta["config"]["schedule"], meta["config"]["lr"], meta["config"]["even_batches"]) == ("constant", 5e-3, True)
    r = runner.invoke(app, args)  # the run exists now
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, args[:-2] + ["--model", "vgg", "--overwrite"])
    assert r.exit_code == 2 and "--model: expected one of origin, gal" in r.output
    r = runner.invoke(app, [*args[:5], "--strategy", "bald", "--rounds", "500", "--run", str(tmp_path / "x")])
    assert r.exit_code == 1 and "exceed the 300 training images" in r.output


def test_report_of_an_active_learning_run(shapes_npz, tmp_path):
    run = tmp_path / "al"
    args = acquire_args(shapes_npz, run, "bald,random", "--model", "origin", "--repeats", "2", rounds=2)
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "index.html").read_text()
    assert html.count('<polyline class="curve"') == 2 and html.count('<polygon class="band"') == 2
    assert html.count("<figure") == 2 * 2 * 3  # 2 strategies x 2 rounds x 3 images
    assert "https://" not in html and "http://" not in html
    # bald against random, repeat by repeat: the counts of both levels cover the two repeats
    cell = html.split('<td class="versus">')[1].split("</td>")[0]
    for part in cell.split(" · "):
        nums = [int(t) for t in part.replace("(", " ").split() if t.isdigit()]
        assert sum(nums) == 2, cell


def test_first_repeat_in_the_command_and_report(shapes_npz, tmp_path):
    run = tmp_path / "al"
    args = acquire_args(shapes_npz, run, "bald", "--model", "origin", "--first-repeat", "2")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "bald repeat 3/3 round 1/1" in r.output
    assert pd.read_csv(run / "al_curve.csv").repeat.unique().tolist() == [2]
    assert json.loads((run / "run.json").read_text())["config"]["first_repeat"] == 2
    r = runner.invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "acquired in the first 2 round(s), repeat 3" in html and html.count("<figure") == 3
    r = runner.invoke(app, args[:-1] + ["-1", "--overwrite"])
    assert r.exit_code == 2 and "--first-repeat: expected an integer at least 0, got -1" in r.output


def test_stop_at_error_in_the_command_and_report(shapes_npz, tmp_path):
    run = tmp_path / "al"
    args = acquire_args(shapes_npz, run, "entropy,random", "--model", "origin", "--stop-at-error", "0.5",
                        rounds=3, epochs=3)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "stopped after round" in r.output
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["stop_error"] == 0.5
    curve = pd.read_csv(run / "al_curve.csv")
    for _, g in curve.groupby("strategy"):  # each curve ends at its first round with accuracy >= 0.5
        assert (g.valid_accuracy.iloc[:-1] < 0.5).all()
    r = runner.invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "--stop-at-error 0.5" in html
    r = runner.invoke(app, args[:-1] + ["1.5", "--overwrite"])
    assert r.exit_code == 2 and "--stop-at-error: expected an error rate between 0 and 1, got 1.5" in r.output


def _bench_al_mnist():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "al_mnist.py"
    spec = importlib.util.spec_from_file_location("al_mnist", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pool_runs_split_by_repeat(tmp_path, capsys):
    bench = _bench_al_mnist()
    cfg = ALConfig(strategies=("bald",)).to_json()

    def rows(rep, accs):
        return [dict(strategy="bald", repeat=rep, round=k, n_labelled=20 + 10 * k, valid_accuracy=a, seconds=1.0)
                for k, a in enumerate(accs)]

    def make(name, curve, config=cfg, fingerprint="f0"):
        (tmp_path / name).mkdir(exist_ok=True)
        pd.DataFrame(curve).to_csv(tmp_path / name / "al_curve.csv", index=False)
        data = {"data": "mnist", "source": "mnist", "fingerprint": fingerprint, "class_names": list("0123456789"),
                "n_train": 60000, "n_valid": 10000, "image_shape": [1, 28, 28]}
        (tmp_path / name / "run.json").write_text(json.dumps(
            {"command": "acquire", "created": "2026-11-30T00:00:00", "seed": 0, "device": "cpu", "config": config,
             "data": data, "complete": True}))
        return str(tmp_path / name)

    a = make("a", rows(0, [0.8, 0.9, 0.95]))
    b = make("b", rows(0, [0.8, 0.9]) + rows(1, [0.85, 0.92]))
    pooled = pool_runs([a, b, a])
    assert pooled.runs == [tmp_path / "a", tmp_path / "b"] and len(pooled.curve) == 5 and pooled.incomplete == [] and pooled.acquired.empty
    bench.summarize([a, b])
    out = capsys.readouterr().out
    # repeat 1 (0-based 0) from both runs is pooled once, with a's longer curve
    line = next(l for l in out.splitlines() if l.startswith("bald "))
    assert line.split()[1:3] == ["10", "-"] and "[10, 10]; [20, >10]" in line and "bald [1, 2]" in out
    c = make("c", rows(0, [0.7]))
    with pytest.raises(AuditError, match="disagree on bald repeat 1 round 0"):
        pool_runs([a, c])
    make("c", rows(0, [0.8]), config={**cfg, "lr": 1e-3})
    with pytest.raises(AuditError, match="lr 0.001"):
        pool_runs([a, c])
    with pytest.raises(AuditError, match="runs/none: expected an `audit acquire` run"):
        pool_runs([a, "runs/none"])
    make("c", rows(0, [0.8]), fingerprint="f1")
    with pytest.raises(AuditError, match="made on other data than .*fingerprint f1, not f0"):
        pool_runs([a, c])
    # a run made before --schedule existed trained at a constant step size
    make("c", rows(0, [0.8]), config={k: v for k, v in cfg.items() if k not in ("schedule", "even_batches")})
    with pytest.raises(AuditError, match="schedule 'constant', even_batches False"):
        pool_runs([a, c])
    (tmp_path / "c" / "al_curve.csv").write_text("strategy,repeat\nbald,0\n")
    with pytest.raises(AuditError, match="al_curve.csv: missing column"):
        pool_runs([a, c])


def test_report_pools_acquire_runs(shapes_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, first in (("r1", "0"), ("r2", "1")):
        args = acquire_args(shapes_npz, name, "bald,random", "--model", "origin", "--first-repeat", first)
        assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, ["report", "--run", "r1", "--run", "r2"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == "report written to reports/r1+r2/index.html"
    html = (tmp_path / "reports" / "r1+r2" / "index.html").read_text()
    assert "2 strategies · 2 repeat(s)" in html and "2 runs pooled" in html and "incomplete" not in html
    cell = html.split('<td class="versus">')[1].split("</td>")[0]  # bald against random over both repeats
    for part in cell.split(" · "):
        assert sum(int(t) for t in part.replace("(", " ").split() if t.isdigit()) == 2, cell
    assert html.count("<figure") == 2 * 1 * 3  # the first repeat's first round, per strategy
    # runs with other settings, a folder that is no acquire run, several runs none of them acquire runs:
    # one line, nothing written
    args = acquire_args(shapes_npz, "r3", "bald", "--model", "origin", "--step", "2")
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, ["report", "--run", "r1", "--run", "r3", "--out", "x"])
    assert r.exit_code == 1 and "r3: step 2; r1 has 3" in r.output and not (tmp_path / "x").exists()
    r = runner.invoke(app, ["report", "--run", "r1", "--run", "nothing", "--out", "x"])
    assert r.exit_code == 1 and "nothing: expected an `audit acquire` run" in r.output
    r = runner.invoke(app, ["score", "--run", "r1"])  # an acquire run has no model to score
    assert r.exit_code == 1 and "r1 is an `audit acquire` run" in r.output and not (tmp_path / "r1" / "scores.csv").exists()
    r = runner.invoke(app, ["report", "--run", "nothing", "--run", "nothing2", "--out", "x"])
    assert r.exit_code == 2 and "--run: 2 runs given; several runs pool" in r.output
    assert not (tmp_path / "x").exists()


def _same(a: pd.DataFrame, b: pd.DataFrame, sort: list[str]) -> None:
    a = a.drop(columns="seconds", errors="ignore").sort_values(sort).reset_index(drop=True)
    b = b.drop(columns="seconds", errors="ignore").sort_values(sort).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_resume_gives_the_uninterrupted_curves(shapes_npz):
    ds = audit.load_dataset(shapes_npz)
    cfg = ALConfig(strategies=("bald", "random"), **{**SMALL, "rounds": 3})
    whole = run_active_learning(ds, cfg)
    key_c, key_a = ["strategy", "repeat", "round"], ["strategy", "repeat", "round", "index"]
    c, a = whole.curve, whole.acquired
    # interrupted after round 1 had acquired for round 2; after round 1 before acquiring;
    # a shorter run taken further; and the whole run, which has nothing left to do
    for curve_to, acquired_to in ((1, 2), (1, 1), (0, 1), (3, 3)):
        prior = audit.active.ALResult(c[c["round"] <= curve_to], a[a["round"] <= acquired_to])
        went_on = run_active_learning(ds, cfg, prior=prior)
        _same(went_on.curve, c, key_c)
        _same(went_on.acquired, a, key_a)
        # and in the order one run writes them
        assert went_on.curve[key_c].equals(c[key_c]) and went_on.acquired[key_a].equals(a[key_a])
    # interrupted after its first new round, a call has saved every earlier row (random's too)
    saved = []

    def stop(res):
        saved.append(res)
        raise KeyboardInterrupt

    prior = audit.active.ALResult(c[c["round"] <= 1], a[a["round"] <= 2])
    with pytest.raises(KeyboardInterrupt):
        run_active_learning(ds, cfg, prior=prior, on_round=stop)
    got = saved[0].curve
    assert len(got) == len(prior.curve) + 1 and (got.strategy == "random").sum() == 2
    assert len(saved[0].acquired) == len(prior.acquired) + 3  # round 2 trained, round 3's acquired
    # another strategy's rows, not run again here, are kept as they were
    only_bald = run_active_learning(ds, dataclasses.replace(cfg, strategies=("bald",)), prior=whole)
    _same(only_bald.curve, c, key_c)
    # fewer rounds, or a stop level the curves went past: nothing runs and nothing is deleted
    stop = float(1 - c[c.strategy == "bald"].valid_accuracy.iloc[1])
    for fewer in (dataclasses.replace(cfg, stop_error=stop), dataclasses.replace(cfg, rounds=1)):
        kept = run_active_learning(ds, fewer, prior=whole)
        _same(kept.curve, c, key_c)
        _same(kept.acquired, a, key_a)


def test_resume_in_the_command(shapes_npz, tmp_path):
    run = tmp_path / "al"
    assert runner.invoke(app, acquire_args(shapes_npz, run, "bald", rounds=1)).exit_code == 0
    r = runner.invoke(app, acquire_args(shapes_npz, run, "bald", "--resume", rounds=2))
    assert r.exit_code == 0, r.output
    curve = pd.read_csv(run / "al_curve.csv")
    assert curve["round"].tolist() == [0, 1, 2]
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["rounds"] == 2 and len(meta["resumed"]) == 1 and meta["complete"]
    fresh = tmp_path / "fresh"
    assert runner.invoke(app, acquire_args(shapes_npz, fresh, "bald", rounds=2)).exit_code == 0
    _same(pd.read_csv(run / "acquired.csv"), pd.read_csv(fresh / "acquired.csv"), ["round", "index"])
    # other settings than the run's: refused, the run untouched
    r = runner.invoke(app, acquire_args(shapes_npz, run, "bald", "--resume", "--lr", "0.01", rounds=3))
    assert r.exit_code == 2 and "--resume: " in r.output and "lr 0.005" in r.output and "0.01" in r.output
    assert pd.read_csv(run / "al_curve.csv")["round"].tolist() == [0, 1, 2]
    r = runner.invoke(app, acquire_args(shapes_npz, run, "bald", "--resume", "--no-even-batches", rounds=3))
    assert r.exit_code == 2 and "made with --even-batches; this command has --no-even-batches" in r.output
    r = runner.invoke(app, acquire_args(shapes_npz, tmp_path / "none", "bald", "--resume"))
    assert r.exit_code == 1 and "--resume: " in r.output and "nothing to go on with" in r.output
    r = runner.invoke(app, acquire_args(shapes_npz, run, "bald", "--resume", "--overwrite"))
    assert r.exit_code == 2 and "--resume and --overwrite" in r.output


def test_early_stopping_split_is_carved_out_of_the_pool(shapes_npz):
    """--valid-size images: drawn per repeat from the training images, never in the
    initial set, never acquired; the curve is the same run after run."""
    from audit.active import carve_valid

    ds = audit.load_dataset(shapes_npz)
    cfg = ALConfig(strategies=("bald", "random"), **{**SMALL, "train": replace(SMALL["train"], patience=1)},
                   valid_size=40, repeats=2)
    res = run_active_learning(ds, cfg)
    for rep in (0, 1):
        held, start = carve_valid(cfg, rep, ds.train.y, ds.n_classes, None)
        assert len(held) == 40 and len(start) == 6 and not set(held) & set(start)
        mine = res.acquired[res.acquired.repeat == rep]
        assert not set(held) & set(mine["index"]) and set(start) == set(mine[mine["round"] == 0]["index"])
    assert not np.array_equal(*(carve_valid(cfg, r, ds.train.y, ds.n_classes, None)[0] for r in (0, 1)))
    again = run_active_learning(ds, cfg)
    pd.testing.assert_frame_equal(res.curve.drop(columns="seconds"), again.curve.drop(columns="seconds"))


def test_recipe_batchbald_in_the_command(shapes_npz, tmp_path):
    run = tmp_path / "bb"
    args = ["acquire", "--data", str(shapes_npz), "--run", str(run), "--strategy", "batchbald,powerbald",
            "--recipe", "batchbald", "--initial", "6", "--step", "3", "--rounds", "1", "--samples", "4",
            "--pool-subset", "60", "--epochs", "3", "--epoch-samples", "64", "--valid-size", "30"]
    r = runner.invoke(app, [*args, "--consistent-masks"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert (cfg["model"], cfg["batch_size"], cfg["lr"], cfg["patience"], cfg["valid_size"], cfg["epoch_samples"],
            cfg["consistent"]) == ("batchbald", 64, 1e-3, 3, 30, 64, True)
    assert len(pd.read_csv(run / "al_curve.csv")) == 4
    # going on needs the same recipe: another early-stopping split is another curve
    r = runner.invoke(app, [*args[:-2], "--valid-size", "20", "--consistent-masks", "--rounds", "2", "--resume"])
    assert r.exit_code == 2 and "valid_size 30" in r.output


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "batchbald", "--valid-size", "295"], "--valid-size: the early-stopping split is carved from the 300 "
     "labelled training images beside the --initial 6: expected at most 294, got 295"),
    (["--recipe", "batchbald", "--valid-size", "290", "--rounds", "2"], "--rounds: 6 + 2 x 3 images exceed the 10 "
     "training images left beside the 290 of --valid-size"),
    (["--patience", "0"], "--patience: expected at least 1 epoch without improvement before stopping, got 0"),
    (["--recipe", "batchbald", "--patience", "0"], "--patience: expected at least 1 epoch"),
    (["--patience", "3"], "early stopping needs both --patience and --valid-size"),
    (["--valid-size", "30"], "early stopping needs both --patience and --valid-size"),
    (["--recipe", "fast"], "--recipe: expected one of gal, batchbald, got 'fast'"),
    (["--model", "batchbald", "--epoch-samples", "-3"], "--epoch-samples: expected an integer at least 1, got -3"),
])
def test_bad_early_stopping_options_write_nothing(shapes_npz, tmp_path, extra, message):
    run = tmp_path / "bad"
    r = runner.invoke(app, acquire_args(shapes_npz, run, "bald", *extra))
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not run.exists()


def test_bench_protocols_and_their_counting(capsys):
    bench = _bench_al_mnist()
    with pytest.raises(SystemExit, match="^error: --protocol: expected one of gal, batchbald, sba, got 'x'$"):
        import sys

        sys.argv = ["al_mnist.py", "--protocol", "x"]
        bench.main()
    assert bench.steps("powerbald:10,batchbald:5,bald", "sba") == {10: ["powerbald", "bald"], 5: ["batchbald"]}
    with pytest.raises(SystemExit, match="name:b"):
        bench.steps("bald:0", "sba")
    # reached 95% at 200 labelled = 180 acquired beyond 20: BatchBALD's tables say 190 (size minus b = 10)
    assert bench.paper_count("batchbald", 180, 20, 10) == 190 and bench.paper_count("sba", 180, 20, 10) == 200
    curve = pd.DataFrame([dict(strategy="batchbald", repeat=0, round=k, n_labelled=20 + 10 * k,
                               valid_accuracy=a, seconds=1.0) for k, a in enumerate([0.5, 0.91, 0.96])])
    bench.print_table(curve, 20, "batchbald", 10)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("batchbald "))
    # this project's 10 / 20 acquired; the paper's counting 20 / 30; its figures -/190
    assert line.split()[1:7] == ["10", "20", "|", "20/30", "-/190", "|"]


def test_recipes_travel_through_run_json():
    """What a Dask worker and --resume rebuild from run.json's flat config is the config."""
    from audit.active import recipe_config

    for name in ("gal", "batchbald"):
        train, held = recipe_config(name)
        cfg = ALConfig(strategies=("powerbald",), train=train, valid_size=held, consistent=name == "batchbald")
        assert ALConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    train, held = recipe_config("batchbald", valid_size=0, epoch_samples=0, lr=2e-3)
    assert (held, train.patience, train.epoch_samples, train.lr, train.model) == (None, None, None, 2e-3, "batchbald")
