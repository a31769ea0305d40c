"""Science, not plumbing: a small config really groks, and its last layer really clusters by answer."""
import csv
import json

import pytest

import plot
from conftest import read_json, run_script

# Groks in about 1100 steps, some 20 s on one CPU core.
GROKS = ["--ops=x_plus_y", "--seeds=1", "--p=31", "--d_model=64", "--lr=2e-3", "--weight_decay=1.0",
         "--train_frac=0.7", "--steps=1500", "--capture_every=250", "--workers=1", "--threads=1"]


@pytest.fixture(scope="module")
def grokked_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("science")
    run_script("experiment.py", ["--out_dir=run_grok", *GROKS], cwd)
    run_script("plot.py", ["--no_tsne"], cwd)
    return cwd


def test_validation_accuracy_goes_from_chance_to_above_095(grokked_run):
    log = [json.loads(line) for line in open(grokked_run / "run_grok" / "x_plus_y_0" / "log.jsonl")]
    assert log[0]["val_acc"] < 0.1  # chance is 1/31
    assert log[-1]["val_acc"] > 0.95 and log[-1]["train_acc"] > 0.95
    info = read_json(grokked_run / "run_grok" / "final_info.json")["x_plus_y"]
    assert info["final_info_dict"]["grokked"] == [True]
    assert info["final_info_dict"]["step_val_acc_99"][0] < 1500


def test_last_layer_classes_tighten_after_grokking(grokked_run):
    pair = plot.load_run(str(grokked_run / "run_grok"), "run_grok")[0]
    (_, before), _, (_, after) = plot.phase_snapshots(pair)
    assert plot.phase_of(before["val_acc"]) == "before" and plot.phase_of(after["val_acc"]) == "after"
    rows = list(csv.DictReader(open(grokked_run / "metrics.csv")))

    def value(step, metric, layer="last", split="val"):
        (row,) = [r for r in rows if r["layer"] == layer and r["metric"] == metric and r["split"] == split
                  and int(r["step"]) == step]
        return float(row["value"])

    assert value(after["step"], "silhouette") > value(before["step"], "silhouette") + 0.2
    assert value(after["step"], "ncc_acc") > 0.9 > 0.2 > value(before["step"], "ncc_acc")
    assert value(after["step"], "knn_acc") > 0.9
    assert value(after["step"], "davies_bouldin") < value(before["step"], "davies_bouldin")
