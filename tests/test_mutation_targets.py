"""In-process tests of the modules that carry the data's safety and the sweep's bookkeeping (lab/files.py,
lab/schema.py, lab/sweep.py, lab/phases.py), written against the mutants mutmut left alive (docs/testing.md,
"Mutation testing"): the subprocess tests exercise the same code, but a mutant must die in this process too."""
import json
import os
import stat

import numpy as np
import pytest

import experiment as E
from lab import files, phases, schema, sweep
from lab.analysis import TrainedJob
from lab.plugins import UsageError
from lab.schema import Job


# ----------------------------------------------------------------------------- lab/files.py
def test_an_atomic_write_leaves_the_bytes_and_the_umasks_permissions(tmp_path):
    path = tmp_path / "a.json"
    files.write_json(str(path), {"b": [1, 2], "a": "x"})
    assert path.read_text() == '{\n "b": [\n  1,\n  2\n ],\n "a": "x"\n}'  # indent 1, keys in order
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    files.write_text(str(path), "é\r\n", mode=0o600)  # utf-8, no newline translation, the mode given
    assert path.read_bytes() == "é\r\n".encode() and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # no temporary left


def test_jsonl_is_one_row_a_line_and_reads_back(tmp_path):
    path = str(tmp_path / "log.jsonl")
    files.write_jsonl(path, [{"step": 1}, {"step": 2, "x": [0.5]}])
    assert open(path).read() == '{"step": 1}\n{"step": 2, "x": [0.5]}\n'
    files.write_json(path, [1])
    assert files.read_json(path) == [1]


def test_a_failing_write_keeps_the_old_bytes_and_leaves_no_partial(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    seen = []

    def broken(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(str(path), broken)
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    name = os.path.basename(seen[0])  # beside the target, hidden, marked, the extension kept (format from it)
    assert os.path.dirname(seen[0]) == str(tmp_path)
    assert name == f".model.partial-{os.getpid()}.safetensors"


def test_an_atomic_write_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files.write_text("plain.txt", "x")
    assert (tmp_path / "plain.txt").read_text() == "x"


def test_remove_partials_removes_leftovers_at_any_depth_and_nothing_else(tmp_path):
    (tmp_path / "x_plus_y_0" / "activations").mkdir(parents=True)
    keep = [tmp_path / "final_info.json", tmp_path / "x_plus_y_0" / "log.jsonl", tmp_path / "partial.txt"]
    gone = [tmp_path / ".final_info.partial-12.json", tmp_path / "x_plus_y_0" / "activations" / ".s.partial-3.st"]
    for p in keep + gone:
        p.write_text("x")
    files.remove_partials(str(tmp_path))
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


# ----------------------------------------------------------------------------- lab/schema.py
def test_job_names_folders_and_the_finished_marker():
    plain, cell = Job("x_plus_y", 2), Job("x_minus_y", 0, (("train_frac", 0.3), ("weight_decay", 1.0)))
    assert plain.name == "x_plus_y_2" and schema.job_name("a", 1) == "a_1"
    assert cell.name == "x_minus_y_0__train_frac=0.3__weight_decay=1.0"
    assert schema.cell_name(cell.overrides) == "train_frac=0.3__weight_decay=1.0" and schema.cell_name(()) == ""
    assert schema.run_dir_of("out", plain) == "out"
    assert schema.run_dir_of("out", cell) == os.path.join("out", "train_frac=0.3__weight_decay=1.0")
    assert schema.job_dir("out", plain) == os.path.join("out", "x_plus_y_2")
    assert schema.job_dir("out", cell) == os.path.join("out", "train_frac=0.3__weight_decay=1.0", "x_minus_y_0")
    assert schema.final_info_file("out", plain) == os.path.join("out", "final_info_x_plus_y_2.json")
    assert schema.final_info_file("out", cell) == os.path.join("out", "train_frac=0.3__weight_decay=1.0",
                                                               "final_info_x_minus_y_0.json")
    cfg = cell.config(E.Config(train_frac=0.5, lr=0.01))
    assert (cfg.train_frac, cfg.weight_decay, cfg.lr) == (0.3, 1.0, 0.01)
    assert plain.config(E.Config(lr=0.01)) == E.Config(lr=0.01)


def test_the_thresholds_at_their_boundaries():
    assert schema.grokked(0.991) and not schema.grokked(schema.GROKKED_ABOVE)
    assert schema.memorised(schema.MEMORISED_AT) and not schema.memorised(0.989)
    assert [schema.phase_of(v) for v in (float("nan"), 0.0999, 0.1, 0.99, 0.9901)] == \
        ["before", "before", "during", "during", "after"]
    log = [{"step": 10, "train_acc": 0.5, "val_acc": 0.1}, {"step": 20, "train_acc": 0.99, "val_acc": 0.49},
           {"step": 30, "train_acc": 1.0, "val_acc": 0.5}, {"step": 40, "train_acc": 1.0, "val_acc": 0.99},
           {"step": 50, "train_acc": 1.0, "val_acc": 0.995}]
    assert (schema.memorisation_step(log), schema.half_step(log), schema.grok_step(log)) == (20, 30, 50)
    assert schema.grok_step(log[:4]) is None and schema.first_step(log, "val_acc", lambda v: v > 2) is None


def test_what_each_measure_reads():
    assert schema.reads("log", "train", "loss") == "train" and schema.reads("log", "val", "acc") == "val_labels"
    assert schema.reads("last", "train", "silhouette") == "train"
    assert schema.reads("last", "val", "silhouette") == "val_labels"
    assert schema.reads("first", "all", "within_class_var") == "val_labels"
    assert schema.reads("last", "all", "participation_ratio") == "inputs"
    assert schema.reads("last", "train", "participation_ratio") == "train"
    assert schema.reads("last", "weird", "silhouette") == "unknown"
    assert schema.reads("model", "all", "param_norm") == "weights" and schema.reads("model", "x", "new") == "unknown"
    assert schema.reads("embedding", "all", "rqi") == "weights"
    assert [k for k in schema.READS if schema.is_predictor(k)] == ["weights", "train", "inputs"]


# ----------------------------------------------------------------------------- lab/sweep.py
def test_a_sweep_parses_into_fields_values_and_cells_in_the_order_written():
    spec = sweep.of("weight_decay=0.1,1 train_frac=0.3", E.Config)
    assert spec.fields == (("weight_decay", (0.1, 1.0)), ("train_frac", (0.3,)))
    assert spec.cells == [(("weight_decay", 0.1), ("train_frac", 0.3)), (("weight_decay", 1.0), ("train_frac", 0.3))]
    assert sweep.of("weight_decay=0.1,1 train_frac=0.3", E.Config) is spec  # parsed once
    assert sweep.cells(E.Config()) == [()] and sweep.of("", E.Config).cells == [()]
    assert sweep.parse("steps=10,20 op_token=true,false", E.Config) == [("steps", (10, 20)),
                                                                        ("op_token", (True, False))]


@pytest.mark.parametrize("text, says", [
    ("lr", "is not FIELD=VALUE"), ("=1", "is not FIELD=VALUE"), ("nope=1", "is not a Config field"),
    ("workers=1,2", "cannot be swept: it changes no number"), ("out_dir=a,b", "it is where the sweep goes"),
    ("ops=x", "every cell runs every op"), ("plugins=a", "set --plugins beside --sweep"),
    ("lr=1,1", "must list distinct values"), ("lr=", "must list distinct values"), ("lr=a", "is not a float"),
    ("lr=1 lr=2", "is given twice"), ("plugins=a,b", "set --plugins beside --sweep"), ("ops=a,b", "every cell runs every op"), ("", "names no field"),
])
def test_a_bad_sweep_is_refused_with_its_reason(text, says):
    with pytest.raises(UsageError, match=says):
        sweep.parse(text, E.Config)
    errors = []
    sweep.parse(text, E.Config, errors)  # or collected, one line each
    assert errors and any(says in e for e in errors)


def test_every_problem_of_a_sweep_is_one_line_and_what_parses_is_kept():
    errors = []
    spec = sweep.parse("lr=a,0.1 nope=1 weight_decay=1,2", E.Config, errors)
    assert spec == [("lr", (0.1,)), ("weight_decay", (1.0, 2.0))] and len(errors) == 2
    with pytest.raises(UsageError) as info:
        sweep.parse("lr=a nope=1", E.Config)
    assert len(str(info.value).splitlines()) == 2


def test_a_cells_config_and_the_sweep_json(tmp_path):
    cfg = E.Config(out_dir=str(tmp_path), sweep="lr=0.001,0.002 weight_decay=0.5", seeds=2, ops=("x_plus_y",))
    cell = sweep.cells(cfg)[1]
    made = sweep.cell_config(cfg, cell)
    assert (made.lr, made.weight_decay, made.sweep) == (0.002, 0.5, "")
    assert made.out_dir == os.path.join(str(tmp_path), "lr=0.002__weight_decay=0.5")
    sweep.write_sweep_json(cfg, str(tmp_path / "sweep.json"))
    assert json.loads((tmp_path / "sweep.json").read_text()) == {
        "sweep": cfg.sweep, "fields": ["lr", "weight_decay"], "values": {"lr": [0.001, 0.002], "weight_decay": [0.5]},
        "ops": ["x_plus_y"], "seeds": 2,
        "cells": [{"name": "lr=0.001__weight_decay=0.5", "values": {"lr": 0.001, "weight_decay": 0.5}},
                  {"name": "lr=0.002__weight_decay=0.5", "values": {"lr": 0.002, "weight_decay": 0.5}}]}


# ----------------------------------------------------------------------------- lab/phases.py
def test_the_phase_of_a_job_at_its_boundaries():
    assert phases.phase_of_job(None, None) == "no fit" and phases.phase_of_job(None, 500) == "no fit"
    assert phases.phase_of_job(100, None) == "memorise"
    assert phases.phase_of_job(100, 200) == "grok"  # delay 100 = 1 x the memorisation step: grok
    assert phases.phase_of_job(100, 199) == "fit"
    assert phases.cell_phase(["grok", "grok", "fit"]) == "grok" and phases.cell_phase(["grok", "fit"]) == "mixed"
    assert phases.cell_phase([]) == "mixed" and phases.cell_phase(["fit"]) == "fit"


def job(seed, mem, grok, final=0.5, half=None):
    log = [{"step": 0, "train_acc": 0.0, "val_acc": 0.0}]
    if mem is not None:
        log.append({"step": mem, "train_acc": 1.0, "val_acc": 0.2})
    if half is not None:
        log.append({"step": half, "train_acc": 1.0, "val_acc": 0.6})
    if grok is not None:
        log.append({"step": grok, "train_acc": 1.0, "val_acc": 1.0})
    log.append({"step": 10_000, "train_acc": 1.0, "val_acc": final})
    return TrainedJob("s/c", "x_plus_y", seed, "", log, {"step_val_acc_99": grok or 10_000,
                                                          "grokked": grok is not None})


def test_a_jobs_summary_and_a_cells_row():
    summary = phases.job_summary(job(0, 100, 400, final=0.97, half=300))
    assert summary == {"memorisation_step": 100, "grok_step": 400, "delay": 300, "half_step": 300,
                       "final_val_acc": 0.97, "phase": "grok"}
    assert phases.job_summary(job(1, None, None))["delay"] is None
    assert phases.job_summary(job(1, 100, None))["delay"] is None
    jobs = [phases.job_summary(j) for j in (job(0, 100, 400, 1.0), job(1, 100, 600, 0.9), job(2, 100, None, 0.2))]
    row = phases.cell_row(jobs)
    assert (row["n"], row["grokked"], row["share_grokked"], row["phase"]) == (3, 2, 2 / 3, "grok")
    assert row["grok_step_mean"] == 500 and row["grok_step_stderr"] == pytest.approx(100)
    assert row["delay_mean"] == 400 and row["final_val_acc_mean"] == pytest.approx(0.7)
    assert row["phases"] == "memorise:1 grok:2"
    empty = phases.cell_row([phases.job_summary(job(0, 100, None))])
    assert empty["grok_step_mean"] is None and empty["grok_step_stderr"] is None and empty["phase"] == "memorise"


def test_a_sweeps_tables_markdown_and_notes_line():
    cells = [{"name": "lr=1", "values": {"lr": 1}, "pairs": [job(0, 100, 400), job(1, 100, 500)]},
             {"name": "lr=2", "values": {"lr": 2}, "pairs": [job(0, 100, None)]}]
    info = {"run": "s", "fields": ["lr"], "values": {"lr": [1, 2]}, "ops": ["x_plus_y", "x_minus_y"], "cells": cells}
    jobs = phases.job_rows(info)
    assert [(j["cell"], j["seed"], j["lr"], j["phase"]) for j in jobs] == [("lr=1", 0, 1, "grok"),
                                                                          ("lr=1", 1, 1, "grok"),
                                                                          ("lr=2", 0, 2, "memorise")]
    rows = phases.cell_rows(info, jobs)
    assert [(r["cell"], r["op"], r["phase"], r["lr"]) for r in rows] == [("lr=1", "x_plus_y", "grok", 1),
                                                                        ("lr=2", "x_plus_y", "memorise", 2)]
    assert phases.phase_counts(rows) == "1 memorise, 1 grok"
    text = "\n".join(phases.sweep_markdown(info, rows))
    assert "## Sweep s: lr (2)" in text and "### x_plus_y: 1 memorise, 1 grok" in text
    assert "| 1 | grok (grok:2) | 2/2 | 450 ± 50 | 350 ± 50 | 0.500 |" in text
    assert "| 2 | memorise (memorise:1) | 0/1 | - | - | 0.500 |" in text
    assert "### x_minus_y: " in text
    assert phases.sweep_notes(info, rows) == [
        "[s] sweep over lr=[1, 2]: x_plus_y: 1 memorise, 1 grok; x_minus_y:  (cells; phases.csv, phase_*.png)."]


def test_every_bad_part_of_a_sweep_is_named_and_the_parts_after_it_still_parse():
    for bad in ("lr", "nope=1", "workers=1,2", "weight_decay=3"):
        errors = []
        spec = sweep.parse(f"weight_decay=1 {bad} train_frac=0.3,0.4", E.Config, errors)
        assert len(errors) == 1 and spec[-1] == ("train_frac", (0.3, 0.4)), bad
    with pytest.raises(UsageError) as info:
        sweep.parse("lr=0.1=2 nope=1", E.Config)
    assert str(info.value) == ("--sweep: lr='0.1=2' is not a float (could not convert string to float: '0.1=2')\n"
                               "--sweep: nope is not a Config field (python experiment.py --help lists them)")


def test_a_list_field_cannot_be_swept():
    import dataclasses as dc

    @dc.dataclass
    class Small:
        xs: tuple[int, ...] = ()
        lr: float = 0.1

    with pytest.raises(UsageError, match="^--sweep: xs cannot be swept: it holds a list$"):
        sweep.parse("xs=1,2", Small)
    assert sweep.parse("lr=1,2", Small) == [("lr", (1.0, 2.0))]


def test_a_job_without_a_log_and_a_cell_without_jobs():
    assert phases.job_summary(TrainedJob("s", "x_plus_y", 0, "", [], None)) == {
        "memorisation_step": None, "grok_step": None, "delay": None, "half_step": None, "final_val_acc": None,
        "phase": "no fit"}
    row = phases.cell_row([])
    assert (row["n"], row["share_grokked"], row["phase"], row["phases"]) == (0, None, "mixed", "")


def test_the_sweeps_markdown_and_notes_whole():
    cells = [{"name": "lr=1__wd=2", "values": {"lr": 1, "wd": 2}, "pairs": [job(0, 100, 400), job(1, 100, 500)]}]
    info = {"run": "s", "fields": ["lr", "wd"], "values": {"lr": [1], "wd": [2, 3]}, "ops": ["x_plus_y"],
            "cells": cells}
    jobs = phases.job_rows(info)
    assert jobs[0]["run"] == "s" and jobs[0]["wd"] == 2
    rows = phases.cell_rows(info, jobs)
    assert rows[0]["run"] == "s"
    assert phases.sweep_markdown(info, rows) == [
        "## Sweep s: lr (1) x wd (2)", "",
        "Phase of a job: no fit (train acc never >= 0.99), memorise (never val acc > 0.99), grok (val acc > 0.99 at "
        "least 1x the memorisation step after memorisation), fit (sooner); a cell's phase is that of more than half "
        "its seeds, else mixed. Steps and delays are means over the seeds that grokked.", "",
        "### x_plus_y: 1 grok", "",
        "| lr | wd | phase | grokked | grokking step | delay | final val acc |",
        "|---|---|---|---|---|---|---|",
        "| 1 | 2 | grok (grok:2) | 2/2 | 450 ± 50 | 350 ± 50 | 0.500 |", ""]
    assert phases.sweep_notes(info, rows) == [
        "[s] sweep over lr=[1], wd=[2, 3]: x_plus_y: 1 grok (cells; phases.csv, phase_*.png)."]


def test_a_sweep_folder_is_read_cell_by_cell_with_its_finished_jobs(tmp_path, capsys):
    """load_sweep on a folder written by hand as experiment.py writes one: a cell with a finished and an unfinished
    job, a cell not started (no folder), a cell whose config.json is missing."""
    cfg = E.Config(out_dir=str(tmp_path), sweep="lr=0.001,0.002,0.003", seeds=2, ops=("x_plus_y",))
    sweep.write_sweep_json(cfg, str(tmp_path / schema.SWEEP))
    first = tmp_path / "lr=0.001"
    log = [{"step": 10, "train_loss": 1.0, "train_acc": 1.0, "val_loss": 1.0, "val_acc": 0.5}]
    for seed in (0, 1):
        (first / f"x_plus_y_{seed}").mkdir(parents=True)
        files.write_jsonl(str(first / f"x_plus_y_{seed}" / schema.LOG), log)
    files.write_json(str(first / "final_info_x_plus_y_0.json"), {"step_val_acc_99": 100, "grokked": False})
    files.write_json(str(first / schema.CONFIG), {"ops": ["x_plus_y"], "seeds": 2, "lr": 0.001})
    (tmp_path / "lr=0.003").mkdir()
    got = phases.load_sweep(str(tmp_path), "s")
    assert (got["run"], got["dir"], got["fields"], got["ops"], got["seeds"]) == ("s", str(tmp_path), ["lr"],
                                                                                 ["x_plus_y"], 2)
    assert got["values"] == {"lr": [0.001, 0.002, 0.003]}
    assert [c["name"] for c in got["cells"]] == ["lr=0.001", "lr=0.002", "lr=0.003"]
    one, two, three = got["cells"]
    assert one["values"] == {"lr": 0.001} and one["config"]["lr"] == 0.001
    assert [(p.seed, p.run, p.final) for p in one["pairs"]] == [(0, "s/lr=0.001", {"step_val_acc_99": 100,
                                                                                   "grokked": False})]
    assert two["pairs"] == [] and two["config"] == {} and three["pairs"] == [] and three["config"] == {}
    # quietly: a cell not started and jobs without snapshots are normal in a sweep (its warnings would be noise)
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and "lr=0.003: no readable config.json" in said[0], said


# ----------------------------------------------------------------------------- lab/analysis.py
def test_metric_rows_from_every_source_with_the_first_source_kept(tmp_path, capsys):
    """measure_rows reads the norms plugin's keys in log.jsonl, the fourier/rqi files, final_keys.json and
    measures.jsonl into metrics.csv's rows; where two sources hold the same (layer, step, split, metric) the first
    read is kept (log, plugin files, final keys, measures); None, nan and non-numbers are left out."""
    from lab import analysis as A

    log = [{"step": 10, "train_acc": 0.5, "val_acc": 0.05, "param_norm": 3.0, "logit_norm": None},
           {"step": 20, "train_acc": 1.0, "val_acc": 0.5, "param_norm": 2.5, "softmax_collapse": 0.25}]
    files.write_jsonl(str(tmp_path / "fourier.jsonl"), [{"step": 10, "topk_frac": 0.2}, {"step": 20}])
    files.write_jsonl(str(tmp_path / "rqi.jsonl"), [{"step": 20, "rqi": 0.75}])
    files.write_json(str(tmp_path / schema.FINAL_KEYS), {"rows": [{"step": 20, "restricted_loss": 0.125,
                                                                     "excluded_loss": float("nan")}]})
    files.write_jsonl(str(tmp_path / schema.MEASURES), [
        {"step": 20, "val_acc": 0.995, "values": {"model": {"all": {"param_norm": 99.0, "restricted_loss": 1.5}},
                                                  "last": {"val": {"silhouette": 0.5, "odd": "text"}}}},
        {"step": 30, "val_acc": 0.5, "values": ["not", "a", "dict"]}])
    pair = TrainedJob("r", "x_plus_y", 1, str(tmp_path), log, None)
    rows = A.measure_rows(pair)
    got = [(r["layer"], r["step"], r["split"], r["metric"], r["value"], r["phase"]) for r in rows]
    assert got == [("model", 10, "all", "param_norm", 3.0, "before"),
                   ("model", 20, "all", "param_norm", 2.5, "during"),
                   ("model", 20, "train", "softmax_collapse", 0.25, "during"),
                   ("embedding", 10, "all", "fourier_topk_frac", 0.2, "before"),
                   ("embedding", 20, "all", "rqi", 0.75, "during"),
                   ("model", 20, "all", "restricted_loss_final_keys", 0.125, "during"),
                   ("model", 20, "all", "restricted_loss", 1.5, "after"),  # the row's own val acc, 0.995
                   ("last", 20, "val", "silhouette", 0.5, "after")]
    assert all((r["run"], r["op"], r["seed"]) == ("r", "x_plus_y", 1) for r in rows)
    assert all(isinstance(r["value"], float) for r in rows)
    said = capsys.readouterr().err
    assert "fourier.jsonl: line 2 is corrupt, skipped" in said and "a row of step 30 is not of the measures" in said


def test_a_log_keeps_its_good_rows_and_names_each_bad_line(tmp_path, capsys):
    from lab import analysis as A

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "train_acc": 0.5, "val_acc": 0.1}\nnot json\n[1]\n{"step": 2, "train_acc": null, '
                    '"val_acc": 0.2}\n{"step": 3, "val_acc": 0.3}\n{"step": 4, "train_acc": 1, "val_acc": 0.4}\n')
    assert [r["step"] for r in A.read_log(str(path))] == [1, 4]
    said = capsys.readouterr().err
    assert all(f"line {n} is corrupt, skipped" in said for n in (2, 3, 4, 5)) and "line 6" not in said
    assert A.val_acc_at([{"step": 10, "val_acc": 0.25}, {"step": 20, "val_acc": 0.5}], 15) == 0.25
    assert A.val_acc_at([{"step": 10, "val_acc": 0.25}], 20) == 0.25
    assert np.isnan(A.val_acc_at([{"step": 10, "val_acc": 0.25}], 5))
