"""Sweeps and phase diagrams: parsing and refusal of bad values, resume of a killed sweep, the phase rule and the
early-warning arithmetic on synthetic runs whose answers are known, and plot.py on a sweep."""
import csv
import json
import os
import subprocess

import pytest

import experiment as E
from conftest import TINY, kill_when, read_json, run_script, start_experiment
from lab.phases import cell_phase, cell_row, job_summary, phase_of_job
from lab.analysis import TrainedJob
from lab.earlywarning import CLOCK_COLUMNS
from lab.schema import READS
from lab.plugins import UsageError
from lab.sweep import cells, parse

SWEEP = ["--ops=x_plus_y", "--seeds=2", "--steps=40", *TINY[3:], "--capture=false", "--measure=false",
         "--sweep=weight_decay=0.1,1 lr=0.001,0.003"]
CELLS = [f"weight_decay={wd}__lr={lr}" for wd in (0.1, 1.0) for lr in (0.001, 0.003)]


def test_sweep_parses_into_the_grid_in_the_order_written():
    assert parse("train_frac=0.2,0.3 weight_decay=0.1,1", E.Config) == [("train_frac", (0.2, 0.3)),
                                                                         ("weight_decay", (0.1, 1.0))]
    cfg = E.Config(sweep="num_layers=1,2  op_token=true,false")
    assert cells(cfg) == [(("num_layers", 1), ("op_token", True)), (("num_layers", 1), ("op_token", False)),
                          (("num_layers", 2), ("op_token", True)), (("num_layers", 2), ("op_token", False))]
    assert cells(E.Config()) == [()]
    for bad, said in (("train_frac", "FIELD=VALUE"), ("nonsense=1", "not a Config field"), ("seeds=1,2", "--seeds"),
                      ("ops=x_plus_y", "cannot be swept"), ("lr=0.1 lr=0.2", "given twice"),
                      ("steps=10,ten", "not a int"), ("lr=0.1,0.1", "distinct"), (" ", "names no field")):
        with pytest.raises(UsageError, match=said):
            parse(bad, E.Config)


def test_bad_sweep_values_are_refused_one_line_each_before_any_file(tmp_path):
    proc = run_script("experiment.py", ["--out_dir=s", *TINY, "--sweep=train_frac=0.5,1.5 weight_decay=-1,0.1 "
                                        "d_model=32,30"], tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 3, proc.stderr
    assert all(line.startswith("experiment.py: error: --sweep") for line in lines)
    assert "train_frac=1.5" in lines[0] and "weight_decay=-1" in lines[1] and "d_model=30" in lines[2]
    proc = run_script("experiment.py", ["--out_dir=s", *TINY, "--sweep=weight_decay=-1 lr=x,0.1"], tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()  # a value that does not parse does not hide one that is out of range
    assert proc.returncode == 2 and len(lines) == 2 and "lr='x'" in lines[0] and "weight_decay=-1" in lines[1]
    assert os.listdir(tmp_path) == []


def test_progress_lines_count_a_cells_own_steps(capsys):
    from lab.runner import Progress
    from lab.schema import Job

    progress = Progress(E.Config(steps=1500, progress="lines"), total_steps=1800)
    short, long = Job("x_plus_y", 0, (("steps", 300),)), Job("x_plus_y", 0, (("steps", 2000),))
    for job, steps in ((short, (300,)), (long, (300, 1000)), (Job("x_plus_y", 0), (300, 1000))):
        for step in steps:
            progress(job, step, {"train_acc": 1.0, "val_acc": 0.5})
    assert capsys.readouterr().err.splitlines() == [
        "x_plus_y seed 0 steps=300: step 300/300 train_acc 1.000 val_acc 0.500",
        "x_plus_y seed 0 steps=2000: step 1000/2000 train_acc 1.000 val_acc 0.500",
        "x_plus_y seed 0: step 1000/1500 train_acc 1.000 val_acc 0.500"]


@pytest.fixture(scope="module")
def clean_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    run_script("experiment.py", ["--out_dir=sweep_0", *SWEEP], cwd)
    return cwd / "sweep_0"


def test_a_sweep_writes_a_run_folder_per_cell_and_the_templates_schema(clean_sweep):
    listed = read_json(clean_sweep / "sweep.json")
    assert [c["name"] for c in listed["cells"]] == CELLS and listed["fields"] == ["weight_decay", "lr"]
    top = read_json(clean_sweep / "final_info.json")
    assert sorted(top) == sorted(f"x_plus_y__{c}" for c in CELLS)
    for cell in CELLS:
        config = read_json(clean_sweep / cell / "config.json")
        assert config["sweep"] == "" and f"weight_decay={config['weight_decay']}__lr={config['lr']}" == cell
        assert read_json(clean_sweep / cell / "final_info.json")["x_plus_y"] == top[f"x_plus_y__{cell}"]
        assert set(top[f"x_plus_y__{cell}"]["means"]) >= {"final_val_acc_mean", "step_val_acc_99_mean"}
        logs = [read_json(clean_sweep / cell / f"x_plus_y_{s}" / "run.json") for s in (0, 1)]
        assert {tuple(map(tuple, r["overrides"])) for r in logs} == {tuple(dict(
            weight_decay=config["weight_decay"], lr=config["lr"]).items())}
    lrs = {c: {r["lr"] for r in map(json.loads, open(clean_sweep / c / "x_plus_y_0" / "log.jsonl"))} for c in CELLS}
    assert lrs[CELLS[0]] != lrs[CELLS[1]]  # each cell really trained with its values


def test_a_killed_sweep_resumes_to_the_clean_sweeps_results(clean_sweep, tmp_path):
    proc = start_experiment(["--out_dir=sweep_k", *SWEEP], tmp_path, stderr=subprocess.DEVNULL)
    first = tmp_path / "sweep_k" / CELLS[1] / "final_info_x_plus_y_0.json"  # a job of the second cell
    kill_when(proc, first)
    assert first.exists() and not (tmp_path / "sweep_k" / "final_info.json").exists()
    assert not (tmp_path / "sweep_k" / CELLS[-1] / "final_info.json").exists()
    resumed = run_script("experiment.py", ["--out_dir=sweep_k", *SWEEP], tmp_path)
    assert "x_plus_y seed 0 weight_decay=0.1 lr=0.001: already finished" in resumed.stderr
    assert read_json(tmp_path / "sweep_k" / "final_info.json") == read_json(clean_sweep / "final_info.json")
    for cell in CELLS:
        for seed in (0, 1):
            job = f"{cell}/x_plus_y_{seed}/log.jsonl"
            assert (tmp_path / "sweep_k" / job).read_bytes() == (clean_sweep / job).read_bytes()


def test_a_grown_sweep_keeps_its_finished_cells_and_a_changed_base_is_refused(clean_sweep, tmp_path):
    import shutil

    shutil.copytree(clean_sweep, tmp_path / "sweep_0")
    before = (tmp_path / "sweep_0" / CELLS[0] / "final_info_x_plus_y_0.json").read_bytes()
    grown = [a if not a.startswith("--sweep") else "--sweep=weight_decay=0.1,1,3 lr=0.001,0.003" for a in SWEEP]
    out = run_script("experiment.py", ["--out_dir=sweep_0", *grown], tmp_path)
    assert out.stderr.count("already finished") == 8
    assert len(read_json(tmp_path / "sweep_0" / "final_info.json")) == 6
    assert (tmp_path / "sweep_0" / CELLS[0] / "final_info_x_plus_y_0.json").read_bytes() == before
    proc = run_script("experiment.py", ["--out_dir=sweep_0", *grown, "--steps=50"], tmp_path, check=False)
    assert proc.returncode == 2 and "differs in steps" in proc.stderr


def test_plot_draws_the_phase_diagram_of_a_sweep(clean_sweep, tmp_path):
    run_script("plot.py", [f"--runs={clean_sweep}", "--out_dir=figs", "--notes=notes.txt"], tmp_path)
    name = str(clean_sweep).replace(os.sep, "_")
    for kind in ("map", "stats"):
        assert (tmp_path / "figs" / f"phase_{kind}_{name}_x_plus_y.png").stat().st_size > 10_000
    rows = (tmp_path / "figs" / "phases.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(CELLS) and rows[0].startswith("run,cell,weight_decay,lr,op,phase")
    assert len((tmp_path / "figs" / "phase_jobs.csv").read_text().strip().splitlines()) == 1 + 2 * len(CELLS)
    notes = (tmp_path / "notes.txt").read_text()
    assert "sweep over weight_decay=[0.1, 1.0], lr=[0.001, 0.003]" in notes
    # the early-warning tables: every rule with what it reads, the baselines among them; a clock row per family
    warning = list(csv.DictReader(open(tmp_path / "figs" / "earlywarning.csv")))
    assert {"config lookup", "fixed delay after memorisation", "memorisation step"} <= {r["measure"] for r in warning}
    assert all(r["reads"] in READS and r["role"] in ("baseline", "predictor", "reference") for r in warning)
    assert {r["role"] for r in warning if r["reads"] == "val_labels"} == {"reference"}
    # this sweep's runs never memorise (40 steps): the clock table has its columns and no rows; its arithmetic is
    # test_earlywarning.py's
    assert (tmp_path / "figs" / "clock.csv").read_text().strip() == ",".join(CLOCK_COLUMNS)
    assert "Early warning, " in notes and "config lookup" in notes


# ----------------------------------------------------------------------------- the arithmetic, on known answers
def test_the_phase_rule():
    assert phase_of_job(None, None) == "no fit"
    assert phase_of_job(300, None) == "memorise"
    assert phase_of_job(300, 600) == "grok" and phase_of_job(300, 5000) == "grok"
    assert phase_of_job(300, 590) == "fit" and phase_of_job(300, 200) == "fit"
    assert cell_phase(["grok", "grok", "memorise"]) == "grok"
    assert cell_phase(["grok", "memorise", "fit"]) == "mixed" and cell_phase(["grok", "memorise"]) == "mixed"
    log = [{"step": s, "train_acc": min(1.0, s / 300), "val_acc": 0.0 if s < 1500 else 1.0}
           for s in range(10, 3001, 10)]
    summary = job_summary(TrainedJob("run", "x_plus_y", 0, "", log, None))
    assert (summary["memorisation_step"], summary["grok_step"], summary["delay"], summary["half_step"]) == (
        300, 1500, 1200, 1500) and summary["phase"] == "grok"
    row = cell_row([summary, {**summary, "grok_step": None, "delay": None, "phase": "memorise", "final_val_acc": 0.1},
                    {**summary, "grok_step": 1700, "delay": 1400}])
    assert row["grokked"] == 2 and row["share_grokked"] == pytest.approx(2 / 3) and row["phase"] == "grok"
    assert row["grok_step_mean"] == 1600 and row["grok_step_stderr"] == pytest.approx(100)
    assert row["phases"] == "memorise:1 grok:2"


def test_an_agent_sets_a_sweep_as_the_default_and_the_harness_reads_it(tmp_path):
    from test_agent_loop import agent_copy, harness_run_experiment, harness_run_plotting

    folder = agent_copy(tmp_path / "idea", edit=('    sweep: str = ""  #', '    sweep: str = "weight_decay=0.1,1"  #'))
    code, prompt = harness_run_experiment(folder, 0)
    assert code == 0, prompt
    results = read_json(folder / "run_0" / "final_info.json")
    assert sorted(results) == sorted(f"{op}__weight_decay={wd}" for op in ("x_plus_y", "x_minus_y")
                                     for wd in (0.1, 1.0))
    assert all("final_val_acc_mean" in block["means"] for block in results.values())
    code, stderr = harness_run_plotting(folder)
    assert code == 0, stderr
    assert (folder / "phase_stats_run_0_x_minus_y.png").exists()  # a 1-D sweep: lines with stderr bands
    assert "[run_0] sweep over weight_decay=[0.1, 1.0]" in (folder / "notes.txt").read_text()
