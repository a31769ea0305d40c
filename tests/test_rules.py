"""Frozen early-warning rules (lab/rules.py): the file round-trips, applying it to the runs it was fitted on gives
the fit's alarms, a stale or broken file is refused in one line (by plot.py and experiment.py, before any file is
written), and the earlywarning plugin's alarms while a job trains equal the file applied to the finished job."""
import copy
import csv
import json
import os

import numpy as np
import pytest

from lab import earlywarning as W
from lab import rules as R
from lab.analysis import TrainedJob
from conftest import read_json, run_script
from test_earlywarning import JUMP, make_run


def weights_sweep(rng):
    """test_earlywarning.sweep's cells with real predictors' names: param_norm falls 700 steps before val
    accuracy's 0.5 in the positives and never in the negatives (it warns), weight_alpha falls 900 steps after
    memorisation in every run (a clock), fourier_topk_frac never moves."""
    runs = []
    for cell in "abcd":
        for seed in range(4):
            t50 = 1600 + 400 * seed if cell in "ab" else None
            measures = {"param_norm": lambda s, t=t50: np.where(s >= (t or 1e9) - 700, -JUMP, 0.0),
                        "weight_alpha": lambda s: np.where(s >= 900, -JUMP, 0.0),
                        "fourier_topk_frac": lambda s: np.zeros_like(s)}
            runs.append(make_run(rng, cell=cell, seed=seed, t50=t50, budget=5000, measures=measures))
    return runs


SWEEP = {"run": "synthetic", "ops": ["x_plus_y"], "values": {"cell": list("abcd")}, "seeds": 4, "cells": []}


@pytest.fixture(scope="module")
def fitted():
    runs = weights_sweep(np.random.default_rng(3))
    table = W.earlywarning_table(runs)
    return runs, table, R.fit(runs, table, SWEEP)


def test_a_rules_file_round_trips_and_reproduces_the_fits_alarms(fitted, tmp_path):
    runs, table, rules = fitted
    path = str(tmp_path / R.RULES_FILE)
    R.write(path, rules)
    back = R.read(path)
    assert back == json.loads(json.dumps(rules))  # nan written as null, nothing else changed
    by_metric = {r["metric"]: r for r in back["rules"]}
    assert set(by_metric) == {"fixed_delay", "val_acc_3x_chance", "param_norm", "weight_alpha", "fourier_topk_frac"}
    assert by_metric["param_norm"]["direction"] == "down" and back["horizon"] == W.horizon(runs) == 2800
    held = {t["metric"]: t for t in table}
    assert by_metric["param_norm"]["held_out"]["J"] == held["param_norm"]["J"] == 1.0
    assert by_metric["param_norm"]["held_out"]["c_500"] == held["param_norm"]["c_500"]
    window, alarmed = W.horizon(runs), 0
    for rule in back["rules"]:
        key = (rule["layer"], rule["split"], rule["metric"])
        if rule["layer"] == "baseline":
            fit_rule = R.BASELINE_RULES[rule["metric"]]
        else:
            fit_rule = W.Measure(key)
        fit = fit_rule.fit(runs, window)
        for run in runs:
            alarm = R.alarm_of(rule, run)
            assert alarm == fit_rule.alarm(run, fit, [])
            alarmed += alarm is not None
    assert alarmed >= 16  # param_norm in 8 positives, weight_alpha in all 16: the equality is not of Nones
    assert [r for r in runs if R.alarm_of(by_metric["param_norm"], r) is not None] == [
        r for r in runs if r.t50 is not None]
    assert R.outcome(R.alarm_of(by_metric["param_norm"], runs[0]), runs[0], window) == "hit"
    assert R.outcome(None, runs[0], window) == "miss"
    assert R.outcome(None, runs[-1], window) == "correct rejection"
    assert R.outcome(R.alarm_of(by_metric["weight_alpha"], runs[-1]), runs[-1], window) == "false alarm"
    assert [r["measure"] for r in R.best(back, 1)] == ["param_norm (model, all)"]


def broken_files(rules):
    def edit(change):
        edited = copy.deepcopy(rules)
        change(edited)
        return edited

    first_measure = next(i for i, r in enumerate(rules["rules"]) if r["layer"] != "baseline")
    return {
        "version": (edit(lambda r: r.update(version=0)), "version 0"),
        "band": (edit(lambda r: r["constants"].update(band=9)), "stale"),
        "levels": (edit(lambda r: r["constants"].update(levels=[1, 2])), "stale"),
        "unknown measure": (edit(lambda r: r["rules"][first_measure].update(metric="no_such_measure")),
                            "unknown measure"),
        "reads": (edit(lambda r: r["rules"][first_measure].update(reads="val_labels")), "reads weights"),
        "direction": (edit(lambda r: r["rules"][first_measure].update(direction="sideways")), "direction"),
        "level": (edit(lambda r: r["rules"][first_measure].update(level=float("nan"))), "level"),
        "baseline": (edit(lambda r: r["rules"][0].update(metric="oracle")), "unknown baseline"),
        "delay": (edit(lambda r: [x.pop("delay", None) for x in r["rules"]]), "delay"),
        "horizon": (edit(lambda r: r.update(horizon=-1)), "horizon"),
        "no rules": (edit(lambda r: r.update(rules=[])), "no rules"),
        "fitted_on": (edit(lambda r: r["fitted_on"].pop("sweep")), "fitted_on needs"),
        "held_out": (edit(lambda r: r["rules"][first_measure].update(held_out=[0.5])), "held_out"),
    }


def test_a_stale_or_broken_rules_file_is_refused_in_one_line(fitted, tmp_path):
    _, _, rules = fitted
    for name, (bad, said) in broken_files(rules).items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(R.RulesError) as e:
            R.read(str(path))
        assert said in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), name
    (tmp_path / "text.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, said in (("text.json", "not JSON"), ("list.json", "no version"), ("missing.json", "cannot be read")):
        with pytest.raises(R.RulesError, match=said):
            R.read(str(tmp_path / name))


LIVE = ["--ops=x_plus_y", "--p=11", "--seeds=2", "--steps=500", "--measure_every=10", "--measure_sparse_every=50",
        "--capture=false", "--train_frac=0.5", "--lr=3e-3", "--d_model=32", "--workers=1"]


def hand_rules(path):
    """Rules at level 1 in both directions for measures of every kind the plugin reads (the log, the model, both
    layers, the new spectral and loss measures), a fixed delay and the val-accuracy reference: most alarm in a
    short run, so that the live and afterwards alarms compare many steps, not Nones."""
    keys = [("log", "train", "loss"), ("model", "all", "param_norm"), ("model", "all", "weight_alpha"),
            ("model", "train", "loss_lowfreq"), ("model", "train", "logit_norm"), ("last", "train", "silhouette"),
            ("first", "train", "spectral_entropy"), ("last", "train", "distance_ratio"),
            ("last", "all", "participation_ratio")]
    held = {s: None for s in R.SCORES}
    rules = [{"measure": f"{k[2]} ({k[0]}, {k[1]}) {d}", "layer": k[0], "split": k[1], "metric": k[2],
              "reads": R.reads(*k), "role": "predictor", "direction": d, "level": 1}  # by hand: no scores
             for k in keys for d in ("up", "down")]
    rules += [{"measure": "fixed delay", "layer": "baseline", "split": "config", "metric": "fixed_delay",
               "reads": "config", "role": "baseline", "delay": 150, "held_out": held},
              {"measure": "val acc > 3x chance", "layer": "baseline", "split": "val_labels",
               "metric": "val_acc_3x_chance", "reads": "val_labels", "role": "reference", "held_out": held}]
    R.write(str(path), {"version": R.VERSION, "fitted_on": {"sweep": "by hand", "ops": ["x_plus_y"], "fields": {},
                                                            "seeds": 2, "config": {}, "commit": "none", "runs": {}},
                        "constants": R.constants(), "horizon": 300, "rules": rules})
    return rules


def test_the_live_plugin_alarms_equal_the_rules_applied_afterwards(tmp_path):
    rules = hand_rules(tmp_path / "rules.json")
    run_script("experiment.py", ["--out_dir=run_0", *LIVE, "--plugins=earlywarning",
                                 f"--warning_rules={tmp_path / 'rules.json'}"], tmp_path)
    live = {}
    for seed in range(2):
        for line in open(tmp_path / "run_0" / f"x_plus_y_{seed}" / R.LIVE_FILE):
            a = json.loads(line)
            assert a["step"] == a["alarm_step"] > a["memorisation_step"]  # known at the measurement that raises it
            live[f"run_0/x_plus_y_{seed}", a["measure"]] = a["alarm_step"]
    run_script("plot.py", ["--runs=run_0", "--no_tsne", "--notes=", f"--warning_rules={tmp_path / 'rules.json'}"],
               tmp_path)
    with open(tmp_path / R.APPLIED_FILE) as f:
        applied = list(csv.DictReader(f))
    assert list(applied[0]) == R.APPLIED_COLUMNS
    assert len(applied) == 2 * len(rules)
    after = {(r["job_dir"], r["measure"]): int(r["alarm_step"]) for r in applied if r["alarm_step"]}
    assert len(after) >= 10 and after == live
    assert {r["outcome"] for r in applied} <= set(R.OUTCOMES)
    for r in applied:
        assert r["memorisation_step"] and not r["grok_step"] and not r["half_step"]  # this run never groks
        assert (r["outcome"] == "false alarm") == (r["alarm_step"] != "" and
                                                   int(r["alarm_step"]) - int(r["memorisation_step"]) <= 300)
    summary = (tmp_path / "analysis_summary.md").read_text()
    assert "Frozen early-warning rules" in summary and R.APPLIED_FILE in summary


def test_a_bad_rules_file_stops_plot_and_experiment_before_any_file(fitted, tmp_path):
    _, _, rules = fitted
    bad, _ = broken_files(rules)["unknown measure"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    proc = run_script("experiment.py", ["--out_dir=run_0", *LIVE, "--plugins=earlywarning",
                                        "--warning_rules=bad.json"], tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "unknown measure" in proc.stderr
    assert not (tmp_path / "run_0").exists()
    proc = run_script("experiment.py", ["--out_dir=run_0", *LIVE, "--plugins=earlywarning", "--measure=false"],
                      tmp_path, check=False)
    assert proc.returncode == 2 and "measures plugin" in proc.stderr and not (tmp_path / "run_0").exists()
    run_script("experiment.py", ["--out_dir=run_0", *LIVE, "--steps=30"], tmp_path)
    os.mkdir(tmp_path / "out")
    proc = run_script("plot.py", ["--runs=run_0", "--out_dir=out", "--notes=notes.txt", "--warning_rules=bad.json"],
                      tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown measure" in proc.stderr
    assert os.listdir(tmp_path / "out") == [] and not (tmp_path / "notes.txt").exists()



def log_job(folder, half=None, drop=2000, top=0.9):
    """A job as plot.py reads it, from its log alone: memorised at step 200, its train loss falling from step `drop`
    (noise before), val accuracy `top` from `half` on (never when None)."""
    rng = np.random.default_rng(0)
    log = [{"step": s, "train_acc": 1.0 if s >= 200 else 0.5,
            "val_acc": top if half is not None and s >= half else 0.01,
            "train_loss": (0.1 if s < drop else 0.01) + 0.001 * rng.random(), "val_loss": 4.0}
           for s in range(0, 6001, 10)]
    return TrainedJob("run", "x_plus_y", 0, str(folder), log, None)


def test_applied_rows_say_when_and_how_a_rule_alarmed(tmp_path):
    """A hit's lead is half_step - alarm_step; a run half-way inside its band is excluded, not censored; one that
    never rises is judged against the horizon."""
    rules = {"horizon": 3000, "rules": [{"measure": "train loss", "layer": "log", "split": "train", "metric": "loss",
                                         "reads": "train", "role": "predictor", "direction": "down", "level": 1}]}
    jobs = [(log_job(tmp_path / "hit", half=3000), "", {}), (log_job(tmp_path / "early", half=300), "", {}),
            (log_job(tmp_path / "flat"), "", {})]
    hit, early, flat = R.apply(rules, jobs)
    # raised at the 5th measurement (every 100 steps, from the log) from 2000 on
    assert hit["alarm_step"] == 2400 and hit["half_step"] == 3000 and hit["outcome"] == "hit"
    assert hit["lead"] == hit["half_step"] - hit["alarm_step"] and hit["memorisation_step"] == 200
    assert early["outcome"] == "excluded" and early["half_step"] == 300
    assert flat["half_step"] is None and flat["lead"] is None and flat["outcome"] == "false alarm"
    rules["horizon"] = 1500  # the alarm (1800 steps after memorisation) is past the horizon: no false alarm
    assert R.apply(rules, jobs[2:])[0]["outcome"] == "correct rejection"

LOSS_RULE = {"measure": "train loss", "layer": "log", "split": "train", "metric": "loss", "reads": "train",
             "role": "predictor", "direction": "down", "level": 1, "held_out": {"J": 0.5, "J_lo": 0.1, "J_hi": 0.9}}


def test_frozen_scores_count_the_applied_outcomes_and_beside_them_the_config_lookup(tmp_path):
    """Cell a: three runs reach 0.5; cell b: two of three. The loss rule alarms in all six (5 hits, 1 false alarm:
    J 0); the config lookup alarms where more than half the *other* seeds of the cell reached 0.5: the three of
    cell a (hits) and cell b's flat run (a false alarm), not its two grokking runs (one of their two peers: misses):
    J 3/5 - 1."""
    rules = {"horizon": 5000, "rules": [LOSS_RULE]}
    jobs = [(log_job(tmp_path / f"a{i}", half=3000), "a", {}) for i in range(3)]
    jobs += [(log_job(tmp_path / f"b{i}", half=3000), "b", {}) for i in (0, 1)] + [(log_job(tmp_path / "b2"), "b", {})]
    loss, config = R.frozen_scores(rules, jobs)
    applied = [r["outcome"] for r in R.apply(rules, jobs)]
    assert (loss["hits"], loss["positives"]) == (applied.count("hit"), applied.count("hit") + applied.count("miss"))
    assert (loss["false_alarms"], loss["negatives"]) == (applied.count("false alarm"), 1)
    assert loss["J"] == pytest.approx(0.0) and loss["fitted_J"] == 0.5 and loss["threshold"] == "down 1 band half-widths"
    assert loss["hit_lo"] < 1 == loss["hit_rate"] and loss["lead"] == pytest.approx(600)
    assert config["measure"].startswith("config lookup") and config["role"] == "baseline"
    assert (config["hits"], config["positives"], config["false_alarms"], config["negatives"]) == (3, 5, 1, 1)
    assert config["J"] == pytest.approx(-0.4)
    other = [(TrainedJob("other", p.op, p.seed, p.folder, p.log, None), "b", {}) for p, *_ in jobs[:3]]
    # another run folder's cell b (three runs reaching 0.5) is not this run's cell b (whose runs would then see
    # four of five peers reach 0.5): its three hits, no more
    assert R.frozen_scores(rules, jobs[3:] + other)[1]["hits"] == 3


@pytest.mark.parametrize("direction, c", [("down", 1.0), ("up", 0.0)])
def test_frozen_scores_concordance_keeps_the_rules_direction(tmp_path, direction, c):
    """Within one cell the run whose loss falls first groks first: a falling rule orders them (C 1), a rising
    one the wrong way round (C 0); the direction is the file's, not refitted."""
    rules = {"horizon": 5000, "rules": [{**LOSS_RULE, "direction": direction}]}
    jobs = [(log_job(tmp_path / "soon", half=2500, drop=1000, top=1.0), "a", {}),  # grokked: C reads its step
            (log_job(tmp_path / "late", half=4000, drop=3000, top=1.0), "a", {})]
    loss, _ = R.frozen_scores(rules, jobs)
    assert loss["c_1000"] == c and loss["c_1000_pairs"] == 1


def test_the_shipped_rules_read_and_say_what_they_were_fitted_on():
    rules = R.read(R.SHIPPED)
    fitted = rules["fitted_on"]
    assert fitted["sweep"] == "sweep_ew" and len(fitted["commit"]) >= 40 and "+dirty" not in fitted["commit"]
    assert fitted["runs"]["positive"] > 0 and fitted["runs"]["negative"] > 0
    kinds = {r["role"] for r in rules["rules"]}
    assert kinds == {"baseline", "predictor", "reference"}
    assert all(r["reads"] in ("weights", "train", "inputs") for r in rules["rules"] if r["role"] == "predictor")
    assert {r["metric"] for r in rules["rules"]} >= {"spectral_entropy", "effective_rank", "distance_ratio",
                                                     "loss_lowfreq", "weight_alpha"}
