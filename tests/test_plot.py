"""plot.py as a user runs it, on the tiny run and on odd folders."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lab import analysis as A
from lab import report as R
import plot
from conftest import ROOT, run_script

OPS = ("x_plus_y", "permutation")


@pytest.fixture(scope="module")
def plotted(tiny_run, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("plotted")
    shutil.copytree(tiny_run, cwd / "run_0")
    proc = run_script("plot.py", [], cwd)
    return cwd, proc


def test_writes_curves_pictures_table_and_summary(plotted):
    cwd, _ = plotted
    for op in OPS:
        for kind in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert (cwd / f"{kind}_{op}.png").stat().st_size > 10_000
        for layer in ("first", "last"):
            for kind in ("pca", "tsne", "metrics"):
                assert (cwd / f"{kind}_run_0_{op}_{layer}.png").exists()
    rows = list(csv.DictReader(open(cwd / "metrics.csv")))
    assert list(rows[0]) == ["run", "op", "seed", "layer", "step", "phase", "split", "metric", "value"]
    expected_splits = sum(len(s) for s in A.METRIC_SPLITS.values())
    keys = {(r["op"], r["seed"], r["layer"], r["step"], r["split"], r["metric"]) for r in rows}
    assert len(keys) == len(rows)
    for op in OPS:
        for seed in ("0", "1"):
            steps = {r["step"] for r in rows if r["op"] == op and r["seed"] == seed}
            assert {"0", "20", "40", "60"} <= steps
            for layer in ("first", "last"):
                for step in steps:
                    found = [r for r in rows if (r["op"], r["seed"], r["layer"], r["step"]) == (op, seed, layer, step)]
                    assert len(found) == expected_splits
    assert {r["metric"] for r in rows if r["layer"] in ("first", "last")} == set(A.METRIC_SPLITS)
    model_level = {(r["op"], r["metric"]) for r in rows if r["layer"] in ("model", "embedding")}
    assert {m for op, m in model_level if op == "x_plus_y"} == {
        "param_norm", "weight_alpha", "logit_norm", "softmax_collapse", "restricted_loss", "excluded_loss",
        "logit_key_frac", "fourier_topk_frac", "rqi"}
    assert {m for op, m in model_level if op == "permutation"} == {"param_norm", "weight_alpha", "logit_norm",
                                                                    "softmax_collapse"}
    assert all(np.isfinite(float(r["value"])) for r in rows)
    import pyarrow.parquet as pq

    assert pq.read_table(cwd / "metrics.parquet").num_rows == len(rows)
    summary = (cwd / "analysis_summary.md").read_text()
    for name in os.listdir(cwd):
        if name.endswith(".png"):
            assert f"`{name}`" in summary
    assert "x_plus_y" in summary and "silhouette" in summary and "before" in summary


def test_second_run_with_nothing_changed_redraws_nothing(plotted):
    cwd, _ = plotted
    pngs = {name: (cwd / name).stat().st_mtime_ns for name in os.listdir(cwd) if name.endswith(".png")}
    run_script("plot.py", [], cwd)
    assert {name: (cwd / name).stat().st_mtime_ns for name in pngs} == pngs


def test_no_runs_is_one_line_and_exit_1(tmp_path):
    proc = run_script("plot.py", [], tmp_path, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "no runs" in proc.stderr


def test_odd_folders_are_analysed_as_far_as_possible(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run_odd")
    # Without measures.jsonl, metrics come from the snapshots: a truncated snapshot, a corrupt log line, a run
    # without snapshots, and a corrupt line in the one measures.jsonl kept.
    for folder in (tmp_path / "run_odd").glob("*_*/measures.jsonl"):
        if folder.parent.name != "permutation_0":
            folder.unlink()
    with open(tmp_path / "run_odd" / "permutation_0" / "measures.jsonl", "a") as f:
        f.write('{"step": 80, "val_')
    snapshot = tmp_path / "run_odd" / "x_plus_y_0" / "activations" / "step_000040.safetensors"
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    with open(tmp_path / "run_odd" / "permutation_1" / "log.jsonl", "a") as f:
        f.write('{"step": 70, "train_lo')
    shutil.copytree(tiny_run, tmp_path / "run_nosnap")
    for op in OPS:
        for seed in (0, 1):
            shutil.rmtree(tmp_path / "run_nosnap" / f"{op}_{seed}" / "activations")
            os.remove(tmp_path / "run_nosnap" / f"{op}_{seed}" / "measures.jsonl")
    proc = run_script("plot.py", ["--no_tsne", "--runs=run_odd,run_nosnap,run_missing"], tmp_path)
    assert "step_000040.safetensors" in proc.stderr and "unreadable" in proc.stderr
    assert "permutation_1/log.jsonl: line 7 is corrupt" in proc.stderr
    assert "run_nosnap: no activation snapshots" in proc.stderr
    assert "run_missing does not exist" in proc.stderr
    assert "permutation_0/measures.jsonl: line 5 is corrupt" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    steps = {r["step"] for r in rows if r["op"] == "x_plus_y" and r["seed"] == "0" and r["run"] == "run_odd"}
    assert "40" not in steps and {"0", "20", "60"} <= steps
    assert not any(r["run"] == "run_nosnap" and r["layer"] in ("first", "last") for r in rows)
    assert (tmp_path / "val_acc_x_plus_y.png").exists()


def test_run_in_progress_is_analysed(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run_live")
    os.remove(tmp_path / "run_live" / "final_info.json")
    os.remove(tmp_path / "run_live" / "final_info_permutation_1.json")
    pairs = A.load_run(str(tmp_path / "run_live"), "run_live")
    assert len(pairs) == 4 and [p.final is None for p in pairs].count(True) == 1
    run_script("plot.py", ["--no_tsne"], tmp_path)
    assert (tmp_path / "metrics.csv").exists()


def test_phases_follow_the_definitions():
    log = [{"step": s, "train_acc": t, "val_acc": v} for s, t, v in
           [(100, 0.5, 0.0), (200, 1.0, 0.01), (300, 1.0, 0.05), (400, 1.0, 0.3), (500, 1.0, 0.6), (600, 1.0, 1.0)]]
    snaps = [{"step": s, "val_acc": v, "path": ""} for s, v in [(0, float("nan")), (150, 0.0), (300, 0.05),
                                                                 (450, 0.45), (500, 0.6), (700, 1.0)]]
    pair = A.TrainedJob("r", "x_plus_y", 0, "", log, {"step_val_acc_99": 600, "grokked": True}, snaps)
    assert pair.memorisation_step == 200 and pair.grok_step == 600
    chosen = [s["step"] for _, s in A.phase_snapshots(pair)]
    assert chosen == [300, 450, 700]
    # after means grokked (above 0.99, as the grokking step): exactly 0.99 is still during
    assert [A.phase_of(v) for v in (float("nan"), 0.09, 0.1, 0.98, 0.99, 0.991)] == \
        ["before", "before", "during", "during", "during", "after"]
    never = A.TrainedJob("r", "x_plus_y", 0, "", log, {"step_val_acc_99": 600, "grokked": False}, snaps)
    assert never.grok_step is None
    assert [label for label, _ in A.phase_snapshots(never)] == ["step 0", "middle", "final, never grokked"]


def test_worker_processes_use_one_thread_in_every_library():
    """Two workers on two cores: a library left at 2 threads oversubscribes and spins (3x slower)."""
    code = ("import json; from lab import report; report._limit_threads(); "
            "from threadpoolctl import threadpool_info; "
            "print(json.dumps([(i['internal_api'], i['num_threads']) for i in threadpool_info()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=plot.os.path.dirname(plot.__file__),
                         env={**os.environ, "OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "4"},
                         capture_output=True, text=True, check=True).stdout
    found = json.loads(out)
    assert {api for api, _ in found} >= {"openmp", "openblas"}
    assert all(threads == 1 for _, threads in found), found


def test_grokking_step_summary_never_invents_a_stderr():
    def pair(seed, step):
        final = {"step_val_acc_99": step if step else 7500, "grokked": step is not None}
        return A.TrainedJob("run_0", "x_plus_y", seed, "", [], final)

    assert A.describe_grokking([pair(0, 3070), pair(1, None), pair(2, None)]) == "3070 (1/3 seeds grokked)"
    assert A.describe_grokking([pair(0, None), pair(1, None)]) == "never grokked (0/2 seeds)"
    # 2000 and 3000: mean 2500, std (ddof=1) 707.1, stderr 707.1 / sqrt(2) = 500
    assert A.describe_grokking([pair(0, 2000), pair(1, 3000), pair(2, None)]) == "2500 ± 500 (2/3 seeds grokked)"
    assert A.format_mean_stderr([0.25], ".3g", ".2g") == "0.25 (n=1)"


def test_editing_plot_py_redraws_and_editing_a_metric_recomputes(plotted, tmp_path):
    """Research code gets edited: a cached figure or metric must not outlive the code that made it."""
    cwd, _ = plotted
    work = tmp_path / "work"
    shutil.copytree(cwd, work)
    for stale in [*work.glob("run_0/*/measures.jsonl"), *work.glob("*.png")]:  # metrics from the snapshots
        stale.unlink()
    experiment_source = open(os.path.join(os.path.dirname(plot.__file__), "experiment.py")).read()
    (work / "experiment.py").write_text(experiment_source)
    shutil.copytree(os.path.join(os.path.dirname(plot.__file__), "lab"), work / "lab")
    measures_source = (work / "lab" / "measures.py").read_text()
    source = open(plot.__file__).read()
    edited = work / "plot_edited.py"

    def run_edited(text):
        edited.write_text(text)
        subprocess.run([sys.executable, str(edited), "--no_tsne"], cwd=work, check=True, capture_output=True)

    def mtimes():
        cached = {f"cache/{p.name}": p.stat().st_mtime_ns for p in work.glob(".plot_cache/metrics_*.json")}
        return {**cached, **{p.name: p.stat().st_mtime_ns for p in work.glob("*.png")}}

    run_edited(source)  # the copy's own path: its first run fills the cache
    before = mtimes()
    assert sum(n.startswith("cache/") for n in before) == 4 and sum(n.endswith(".png") for n in before) > 10
    run_edited(source.replace('fontsize=8)\n', 'fontsize=7)\n', 1))  # a figure edit only
    after_figure_edit = mtimes()
    assert all(after_figure_edit[n] != before[n] for n in before if n.endswith(".png"))
    assert all(after_figure_edit[n] == before[n] for n in before if n.startswith("cache/"))
    edit = "silhouette_rows: int = 500"  # a metric's code lives in lab/measures.py, shared with training
    assert measures_source.count(edit) == 1
    (work / "lab" / "measures.py").write_text(measures_source.replace(edit, "silhouette_rows: int = 450"))
    run_edited(source)
    after_metric_edit = mtimes()
    assert all(after_metric_edit[n] != after_figure_edit[n] for n in before if n.startswith("cache/"))


def spiky_pair(seed, ends_in_spike):
    """A seed that groks at 300, then spikes at 400-410 and at 700 (and at 1000, its last step, if asked)."""
    low = {400: (0.5, 0.3), 410: (0.95, 0.6), 700: (0.97, 0.8)} | ({1000: (0.6, 0.49)} if ends_in_spike else {})
    log = [{"step": s, "train_acc": low.get(s, (1.0, 1.0))[0] if s >= 200 else 0.5,
            "val_acc": low.get(s, (1.0, 1.0))[1] if s >= 300 else 0.02} for s in range(10, 1001, 10)]
    for r in log:
        r["train_loss"], r["val_loss"] = 1.01 - r["train_acc"], 1.01 - r["val_acc"]
    final = {"step_val_acc_99": 300, "grokked": True, "final_val_acc": log[-1]["val_acc"]}
    snaps = [{"step": s, "val_acc": A.val_acc_at(log, s), "path": ""} for s in (0, 250, 500, 1000)]
    return A.TrainedJob("r", "x_plus_y", seed, "", log, final, snaps)


def test_spikes_after_grokking_are_counted_and_an_end_inside_one_is_said():
    steady, spiky = spiky_pair(0, ends_in_spike=False), spiky_pair(1, ends_in_spike=True)
    spikes = A.spikes_after_grokking(spiky)
    assert [(s["from_step"], s["start"], s["end"]) for s in spikes] == [(390, 400, 410), (690, 700, 700), (990, 1000, 1000)]
    assert spikes[0]["min_train_acc"] == 0.5 and spikes[0]["min_val_acc"] == 0.3
    state = A.end_state(spiky)
    assert state["ends_in_spike"] and state["final_val_acc"] == 0.49 and state["tail_val_acc"] == 1.0
    assert not A.end_state(steady)["ends_in_spike"] and len(A.spikes_after_grokking(steady)) == 2
    text = " ".join(A.describe_spikes([steady, spiky]))
    assert "5 in 2 of 2 grokked seeds" in text and "seed 0: 2, seed 1: 3" in text
    assert "Seed 1 ends in a spike: val acc 0.49 at the last step, 1.00 (median) over the last 10% of steps." in text
    assert "Seed 0 ends" not in text
    flat = A.TrainedJob("r", "x_plus_y", 2, "", [{"step": s, "train_acc": 1.0, "val_acc": 1.0} for s in (10, 20)],
                     {"step_val_acc_99": 10, "grokked": True})
    assert A.describe_spikes([flat]) == ["No spike after grokking in the 1 grokked seed(s)."]
    assert A.describe_spikes([flat], say_none=False) == []
    # the "after" pictures show the last snapshot after grokking, not one inside the final spike
    labels = A.phase_snapshots(spiky)
    assert labels[2][1]["step"] == 500 and labels[2][0].startswith("after (final snapshot: val acc 0.49")
    assert A.phase_snapshots(steady)[2] == ("after", steady.snapshots[-1])


def test_the_lead_lag_heatmap_says_where_it_reads_a_seed_that_ends_in_a_spike(tmp_path, monkeypatch):
    pairs = [spiky_pair(0, ends_in_spike=False), spiky_pair(1, ends_in_spike=True)]
    rows = [{"run": "r", "op": "x_plus_y", "seed": p.seed, "layer": "last", "split": "val", "metric": "early",
             "step": step, "value": float(step >= 250)} for p in pairs for step in range(0, 1001, 50)]
    leadlag = A.leadlag_rows(pairs, rows)[0]
    titles = []

    def keep_title(fig, path):
        titles.append(fig.get_suptitle())
        plot.plt.close(fig)

    monkeypatch.setattr(plot, "save", keep_title)
    assert plot.progress_figure("r", "x_plus_y", pairs, rows, leadlag, str(tmp_path))
    last_line = titles[0].splitlines()[-1]
    assert last_line == "read up to the evaluation before a spike that lasts to the end: seed 1 at step 990"
    assert plot.progress_figure("r", "x_plus_y", pairs[:1], rows, leadlag, str(tmp_path))
    assert "spike" not in titles[1]


def test_spikes_reach_the_summary_the_notes_block_and_spikes_csv(tmp_path):
    pairs = [spiky_pair(0, False), spiky_pair(1, True)]
    R.write_spikes(pairs, str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "spikes.csv")))
    assert [(r["seed"], r["spikes"], r["spike_steps"], r["ends_in_spike"]) for r in rows] == \
        [("0", "2", "400;700", "False"), ("1", "3", "400;700;1000", "True")]
    summary = "\n".join(R.run_op_markdown("r", "x_plus_y", pairs, {"r": "r"}, {}, [], {}))
    block = R.findings_block({"x_plus_y": {"r": pairs}}, {"r": "r"}, {}, [], [])
    for text in (summary, block):
        assert "Seed 1 ends in a spike: val acc 0.49" in text and "5 in 2 of 2 grokked seeds" in text
    figures = plot.plot_curves({"x_plus_y": {"r": pairs}}, {"r": "r"}, str(tmp_path))
    assert len(figures) == 4 and all(os.path.getsize(path) > 0 for path, _ in figures)


GUARD = """
import pickle, runpy, sys
import numpy, torch

def refuse(*args, **kwargs):
    raise RuntimeError("a file was unpickled")

numpy_load = numpy.load
pickle.load = pickle.Unpickler = torch.load = refuse
numpy.load = lambda *args, **kwargs: numpy_load(*args, **{**kwargs, "allow_pickle": False})
sys.path.insert(0, ROOT)
if sys.argv[1] == "plot":
    sys.argv = ["plot.py", "--out_dir=figs"]
    runpy.run_path(ROOT + "/plot.py", run_name="__main__")
else:
    import experiment
    from lab.job import load_model, load_task
    model = load_model(experiment, "run_0", "x_plus_y", 0)
    print(model(load_task(experiment, "run_0", "x_plus_y").x[:3]).shape)
"""


def test_plot_py_and_load_model_read_no_file_with_pickle(tiny_run, tmp_path):
    """pickle.load, pickle.Unpickler and torch.load raise and numpy.load refuses pickles: plot.py still writes its
    outputs and load_model still rebuilds a model (the process pool's own messages are multiprocessing's, not files)."""
    shutil.copytree(tiny_run, tmp_path / "run_0")
    guard = tmp_path / "guard.py"
    guard.write_text(f"ROOT = {ROOT!r}\n" + GUARD)
    for what in ("plot", "model"):
        proc = subprocess.run([sys.executable, str(guard), what], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0 and "unpickled" not in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "figs" / "analysis_summary.md").exists() and "torch.Size([3," in proc.stdout
