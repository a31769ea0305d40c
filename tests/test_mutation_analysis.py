"""In-process tests of lab/analysis.py (plot.py's numbers), on run folders written by hand as experiment.py writes
them, with every expected value worked out from the definitions in docs/analysis.md: written against the mutants
mutmut left alive (docs/testing.md, "Mutation testing")."""
import os
import types

import numpy as np
import pytest
import torch

from lab import analysis as A
from lab import files, measures, onset, schema, stats
from lab.analysis import TrainedJob
from lab.schema import Job


def log_of(train, val, every=10):
    """log.jsonl rows: one evaluation every `every` steps from 0, with these train and val accuracies."""
    return [{"step": i * every, "train_acc": t, "val_acc": v} for i, (t, v) in enumerate(zip(train, val))]


def said(capsys) -> list:
    return capsys.readouterr().err.splitlines()


# ----------------------------------------------------------------------------- reading a run
def write_job(run, op, seed, log=None, final=None, index=None, text=None):
    folder = run / f"{op}_{seed}"
    folder.mkdir(parents=True)
    if text is not None:
        (folder / schema.LOG).write_text(text)
    elif log is not None:
        files.write_jsonl(str(folder / schema.LOG), log)
    if final is not None:
        path = schema.final_info_file(str(run), Job(op, seed))
        if isinstance(final, str):
            with open(path, "w") as f:
                f.write(final)
        else:
            files.write_json(path, final)
    if index is not None:
        (folder / schema.ACTIVATIONS).mkdir()
        if isinstance(index, str):
            (folder / schema.ACTIVATIONS / schema.INDEX).write_text(index)
        else:
            files.write_json(str(folder / schema.ACTIVATIONS / schema.INDEX), index)
    return folder


LOG = log_of([0.2, 1.0, 1.0], [0.0, 0.25, 1.0])


def test_a_run_is_read_job_by_job_with_what_each_has_finished(tmp_path, capsys):
    """load_run: a job not started is skipped quietly, one whose log has no readable row and a corrupt final_info or
    index are each named in one warning, and the jobs after each are still read, their snapshots with their paths
    and val accuracies (the index's own, else the log's at that step)."""
    run = tmp_path / "run_0"
    run.mkdir()
    files.write_json(str(run / schema.CONFIG), {"ops": ["x_plus_y", "x_minus_y"], "seeds": 4})
    write_job(run, "x_plus_y", 1, text="not json\n")
    snaps = [{"step": 10, "file": "step_10.safetensors", "val_acc": 0.75},
             {"step": 15, "file": "gone.safetensors"},
             {"step": 20, "file": "step_20.safetensors"}]
    two = write_job(run, "x_plus_y", 2, LOG, final={"step_val_acc_99": 20},
                    index={"modules": {"first": "blocks.0.hook_resid_post", "last": "blocks.1.hook_resid_post"},
                           "snapshots": snaps})
    for name in ("step_10.safetensors", "step_20.safetensors"):
        (two / schema.ACTIVATIONS / name).write_bytes(b"")
    write_job(run, "x_plus_y", 3, LOG, final="{not json")
    write_job(run, "x_minus_y", 0, LOG, index={"modules": {}})
    pairs = A.load_run(str(run), "mine")
    assert [(p.run, p.op, p.seed, p.folder) for p in pairs] == [
        ("mine", "x_plus_y", 2, str(two)), ("mine", "x_plus_y", 3, str(run / "x_plus_y_3")),
        ("mine", "x_minus_y", 0, str(run / "x_minus_y_0"))]
    assert all(p.log == LOG for p in pairs)
    assert [p.final for p in pairs] == [{"step_val_acc_99": 20}, None, None]
    activations = two / schema.ACTIVATIONS
    assert pairs[0].modules == {"first": "blocks.0.hook_resid_post", "last": "blocks.1.hook_resid_post"}
    assert pairs[0].snapshots == [{**snaps[0], "path": str(activations / "step_10.safetensors"), "val_acc": 0.75},
                                  {**snaps[2], "path": str(activations / "step_20.safetensors"), "val_acc": 1.0}]
    assert pairs[1].modules == {} and pairs[1].snapshots == [] and pairs[2].snapshots == []
    lines = said(capsys)
    assert lines == [
        f"plot.py: warning: {run / 'x_plus_y_1' / schema.LOG}: line 1 is corrupt, skipped",
        f"plot.py: warning: {run / 'x_plus_y_1' / schema.LOG}: no readable rows; x_plus_y seed 1 skipped",
        f"plot.py: warning: {activations / 'gone.safetensors'} is listed in {activations / schema.INDEX} but "
        "missing; skipped",
        f"plot.py: warning: {schema.final_info_file(str(run), Job('x_plus_y', 3))} is corrupt; treated as unfinished",
        f"plot.py: warning: {run / 'x_minus_y_0' / schema.ACTIVATIONS / schema.INDEX} is corrupt ('snapshots'); "
        "x_minus_y seed 0 without snapshots"]


def test_a_run_without_snapshots_says_so_unless_quiet(tmp_path, capsys):
    run = tmp_path / "run_0"
    run.mkdir()
    files.write_json(str(run / schema.CONFIG), {"ops": ["x_plus_y"], "seeds": 1})
    write_job(run, "x_plus_y", 0, LOG)
    assert len(A.load_run(str(run), "r", quiet=True)) == 1 and said(capsys) == []
    assert len(A.load_run(str(run), "r")) == 1
    assert said(capsys) == [f"plot.py: warning: {run}: no activation snapshots; learning curves only"]
    (run / schema.CONFIG).write_text("{}")
    assert A.load_run(str(run), "r") == []
    assert said(capsys) == [f"plot.py: warning: {run}: no readable config.json ('ops'); run skipped"]


def test_a_jobs_grokking_step_from_its_final_info_or_its_log():
    log = log_of([1.0] * 4, [0.0, 0.5, 0.995, 1.0])
    assert TrainedJob("r", "x", 0, "", log, None).grok_step == 20
    assert TrainedJob("r", "x", 0, "", log, {"step_val_acc_99": 30}).grok_step == 30
    assert TrainedJob("r", "x", 0, "", log, {"step_val_acc_99": 30, "grokked": False}).grok_step is None
    assert TrainedJob("r", "x", 0, "", log, {"step_val_acc_99": True}).grok_step == 20  # a bool is no step
    assert TrainedJob("r", "x", 0, "", log_of([0.5, 0.99], [0.0, 0.0]), None).memorisation_step == 10


def test_a_log_row_whose_step_or_val_acc_is_not_a_number_is_skipped(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": "x", "train_acc": 1, "val_acc": 1}\n{"step": 1, "train_acc": 1, "val_acc": "a"}\n'
                    '{"step": 2, "train_acc": 1, "val_acc": 0.5}\n')
    assert A.read_log(str(path)) == [{"step": 2, "train_acc": 1, "val_acc": 0.5}]
    assert len(said(capsys)) == 2


# ----------------------------------------------------------------------------- spikes and phase snapshots
def spiky_job(seed=0, end_in_spike=False):
    """Grokked at step 50 (final_info), spikes after it at 80-90 and 150; an evaluation at the grokking step with
    train accuracy below SPIKE_BELOW (it is not after grokking) and one exactly at SPIKE_BELOW (not below it)."""
    val = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0, 0.9, 1.0, 0.5, 0.7, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.6, 0.7]
    train = [0.5, 1.0, 1.0, 1.0, 1.0, 0.8, 1.0, 1.0, 0.8, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 0.85, 1.0, 1.0, 1.0, 1.0, 1.0]
    if not end_in_spike:
        val[18:] = [1.0, 1.0, 1.0]
    log = log_of(train, val)
    return TrainedJob("r", "x_plus_y", seed, "", log, {"step_val_acc_99": 50})


def test_spikes_after_grokking_are_the_runs_of_evaluations_below_the_line():
    assert A.spikes_after_grokking(spiky_job()) == [
        {"from_step": 70, "start": 80, "end": 90, "min_train_acc": 0.6, "min_val_acc": 0.5},
        {"from_step": 140, "start": 150, "end": 150, "min_train_acc": 0.85, "min_val_acc": 1.0}]
    ending = A.spikes_after_grokking(spiky_job(end_in_spike=True))
    assert ending[-1] == {"from_step": 170, "start": 180, "end": 200, "min_train_acc": 1.0, "min_val_acc": 0.2}
    never = TrainedJob("r", "x_plus_y", 0, "", spiky_job().log, {"step_val_acc_99": 50, "grokked": False})
    assert A.spikes_after_grokking(never) == []


def test_how_a_seed_ends_reads_its_last_tenth_of_steps():
    state = A.end_state(spiky_job(end_in_spike=True))  # steps 180, 190, 200 (>= 200 * 0.9): 0.2, 0.6, 0.7
    assert state["ends_in_spike"] is True and state["final_val_acc"] == 0.7 and state["tail_val_acc"] == 0.6
    assert A.end_state(spiky_job())["ends_in_spike"] is False
    assert A.leadlag_end(spiky_job(end_in_spike=True)) == 170 and A.leadlag_end(spiky_job()) is None


def test_the_spike_table_has_a_row_per_grokked_seed():
    calm = TrainedJob("r", "x_plus_y", 2, "", log_of([1.0] * 3, [0.5, 1.0, 1.0]), None)
    never = TrainedJob("r", "x_plus_y", 3, "", log_of([1.0] * 3, [0.0, 0.0, 0.0]), None)
    rows = A.spike_rows([never, spiky_job(0), spiky_job(1, end_in_spike=True), calm])
    assert rows == [
        {"run": "r", "op": "x_plus_y", "seed": 0, "grok_step": 50, "spikes": 2, "spike_steps": "80;150",
         "min_train_acc": 0.6, "min_val_acc": 0.5, "ends_in_spike": False, "final_val_acc": 1.0, "tail_val_acc": 1.0},
        {"run": "r", "op": "x_plus_y", "seed": 1, "grok_step": 50, "spikes": 3, "spike_steps": "80;150;180",
         "min_train_acc": 0.6, "min_val_acc": 0.2, "ends_in_spike": True, "final_val_acc": 0.7, "tail_val_acc": 0.6},
        {"run": "r", "op": "x_plus_y", "seed": 2, "grok_step": 10, "spikes": 0, "spike_steps": "",
         "min_train_acc": "", "min_val_acc": "", "ends_in_spike": False, "final_val_acc": 1.0, "tail_val_acc": 1.0}]


def snapped(log, steps, seed=0, final=None):
    """A job with a snapshot at each of these steps, at the log's val accuracy there."""
    job = TrainedJob("r", "x_plus_y", seed, "", log, final)
    job.snapshots = [{"step": s, "file": f"step_{s}", "val_acc": A.val_acc_at(log, s)} for s in steps]
    return job


def test_the_three_phase_snapshots():
    # memorised at 20 (still before: val 0.05), during from 30, grokked at 60
    log = log_of([0.5, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.02, 0.05, 0.3, 0.45, 0.8, 1.0, 1.0])
    job = snapped(log, [0, 10, 20, 30, 40, 50, 60, 70])
    assert [(label, s["step"]) for label, s in A.phase_snapshots(job)] == [("before", 20), ("during", 40),
                                                                           ("after", 70)]
    # no 'before' snapshot from memorisation on: the first one
    late = snapped(log, [10, 30, 40, 70])
    assert [(label, s["step"]) for label, s in A.phase_snapshots(late)] == [("before", 10), ("during", 40),
                                                                            ("after", 70)]
    # ends below 0.99: the last snapshot that is 'after', labelled with the final one's val accuracy
    dip = snapped(log + [{"step": 80, "train_acc": 1.0, "val_acc": 0.6}], [0, 20, 40, 60, 80])
    assert [(label, s["step"]) for label, s in A.phase_snapshots(dip)] == [
        ("before", 20), ("during", 40), ("after (final snapshot: val acc 0.60)", 60)]
    never = snapped(log_of([1.0] * 4, [0.0] * 4), [0, 10, 20, 30])
    assert [(label, s["step"]) for label, s in A.phase_snapshots(never)] == [
        ("step 0", 0), ("middle", 20), ("final, never grokked", 30)]
    # grokked but never memorised (train accuracy below 0.99 throughout): 'before' is the first snapshot
    unmemorised = snapped(log_of([0.9] * 4, [0.0, 0.05, 0.5, 1.0]), [10, 20, 30])
    assert [(label, s["step"]) for label, s in A.phase_snapshots(unmemorised)] == [("before", 10), ("during", 20),
                                                                                   ("after", 30)]
    assert A.phase_snapshots(TrainedJob("r", "x", 0, "", log, None)) == []


def test_phase_values_and_the_largest_changes_read_the_nearest_logged_step():
    log = log_of([0.5, 1.0, 1.0, 1.0, 1.0], [0.0, 0.05, 0.5, 1.0, 1.0])  # phase snapshots at 10, 20, 40
    jobs = [snapped(log, [0, 10, 20, 30, 40], seed=0), snapped(log, [0, 10, 20, 30, 40], seed=1)]

    def row(seed, step, metric, split, value, layer="last"):
        return {"seed": seed, "layer": layer, "step": step, "metric": metric, "split": split, "value": value}

    rows = [row(0, 10, "silhouette", "train", 0.1), row(0, 20, "silhouette", "train", 0.3),
            row(0, 40, "silhouette", "train", 0.9), row(1, 12, "silhouette", "train", 0.2),
            row(1, 19, "silhouette", "train", 0.4), row(1, 38, "silhouette", "train", 0.7),
            row(0, 10, "silhouette", "val", 5.0), row(0, 10, "silhouette", "train", 7.0, layer="first"),
            row(0, 10, "knn_acc", "train", 8.0)]
    got = A.phase_values(jobs, rows, "last", "silhouette", "train")
    assert got == {"before": [0.1, 0.2], "during": [0.3, 0.4], "after": [0.9, 0.7]}
    assert A.phase_values(jobs, rows, "last", "nc1", "all") == {}
    rows += [row(s, step, "participation_ratio", "all", v) for s, step, v in ((0, 10, 4.0), (0, 40, 1.0), (1, 10, 2.0), (1, 40, 1.0))]
    rows += [row(s, step, "davies_bouldin", "val", v) for s, step, v in ((0, 10, 1.0), (0, 40, 1.2), (1, 10, 1.0),
                                                                          (1, 40, 1.2))]
    rows += [row(s, step, "within_class_var", "all", 0.0) for s in (0, 1) for step in (10, 40)]  # no change
    rows += [row(s, step, "knn_acc", "val", v, layer="first") for s, step, v in ((0, 10, 0.0), (0, 40, 1.0),
                                                                                 (1, 10, 0.0), (1, 40, 1.0))]
    # silhouette train 0.15 -> 0.8 (0.684), participation ratio 3 -> 1 (0.5), davies_bouldin val 1 -> 1.2 (0.0909)
    assert A.largest_changes(jobs, rows) == [("silhouette", "train", 0.15000000000000002, 0.8),
                                             ("participation_ratio", "all", 3.0, 1.0), ("davies_bouldin", "val", 1.0, 1.2)]
    assert A.largest_changes(jobs, rows, k=1) == [("silhouette", "train", 0.15000000000000002, 0.8)]


# ----------------------------------------------------------------------------- snapshot metrics
def write_snapshots(tmp_path, n_train=400, n_val=300, classes=5):
    """A run with one job whose two snapshots hold two layers each, an example table and a run.json."""
    from safetensors.numpy import save_file
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run_0"
    run.mkdir()
    files.write_json(str(run / schema.CONFIG), {"ops": ["x_plus_y"], "seeds": 1})
    n = n_train + n_val
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    log = log_of([0.5, 1.0, 1.0], [0.0, 0.5, 1.0])
    index = {"modules": {"first": "blocks.0.hook_resid_post", "last": "blocks.1.hook_resid_post"},
             "snapshots": [{"step": 0, "file": "step_0.safetensors"}, {"step": 20, "file": "step_20.safetensors"}]}
    folder = write_job(run, "x_plus_y", 0, log, index=index)
    for snap, spread in zip(index["snapshots"], (1.0, 0.2)):
        save_file({"blocks.0.hook_resid_post": rng.normal(size=(n, 4)).astype(np.float16),
                   "blocks.1.hook_resid_post": (np.eye(classes, 4)[y] + spread * rng.normal(size=(n, 4))
                                                ).astype(np.float32)},
                  str(folder / schema.ACTIVATIONS / snap["file"]))
    pq.write_table(pa.table({"pair": np.arange(n), "label": y, "split": ["train"] * n_train + ["val"] * n_val}),
                   str(folder / schema.EXAMPLES))
    files.write_json(str(folder / schema.RUN), {"split_seed": 12345})
    return run, folder


def expected_rows(job, y, is_train, seed):
    rows = []
    for snap in job.snapshots:
        tensors = A.load_snapshot(snap["path"])
        for layer, module in job.modules.items():
            samples = measures.metric_samples(torch.from_numpy(is_train), seed)
            for metric, split, value in measures.representation_metrics(
                    torch.from_numpy(tensors[module].copy()), torch.from_numpy(y.astype(np.int64)),
                    torch.from_numpy(is_train), samples):
                rows.append({"run": job.run, "op": job.op, "seed": job.seed, "layer": layer, "step": snap["step"],
                             "phase": schema.phase_of(snap["val_acc"]), "split": split, "metric": metric,
                             "value": value})
    return rows


def test_snapshot_metrics_are_the_plugins_on_the_same_subsamples_and_cached(tmp_path, monkeypatch, capsys):
    run, folder = write_snapshots(tmp_path)
    job, = A.load_run(str(run), "sweep/cell")
    y, is_train = A.read_examples(str(folder))
    assert y.tolist() == (np.arange(700) % 5).tolist() and is_train.dtype == bool
    assert is_train.tolist() == [True] * 400 + [False] * 300
    assert A.split_seed(job) == 12345
    tensors = A.load_snapshot(job.snapshots[0]["path"])
    assert set(tensors) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert all(t.dtype == np.float32 for t in tensors.values())
    want = expected_rows(job, y, is_train, 12345)
    assert len(want) > 0 and {r["phase"] for r in want} == {"before", "after"}
    assert {r["layer"] for r in want} == {"first", "last"} and {r["step"] for r in want} == {0, 20}
    settings = types.SimpleNamespace(tsne=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    assert A.pair_metrics(job, settings, str(cache)) == want
    assert os.listdir(cache) == ["metrics_sweep_cell_x_plus_y_0.json"]
    # the kNN queries are a subsample of the 300 val rows, seeded by the split seed: another seed, other values
    assert expected_rows(job, y, is_train, 0) != want
    loaded = []

    def counting(path):
        loaded.append(os.path.basename(path))
        return real(path)

    real = A.load_snapshot
    monkeypatch.setattr(A, "load_snapshot", counting)
    assert A.pair_metrics(job, settings, str(cache)) == want and loaded == []  # from the cache
    assert A.pair_metrics(job, types.SimpleNamespace(tsne=True), str(cache)) == want
    assert loaded == ["step_0.safetensors", "step_20.safetensors"]  # other settings: recomputed
    path = job.snapshots[1]["path"]
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    loaded.clear()
    assert A.pair_metrics(job, types.SimpleNamespace(tsne=True), str(cache)) == want
    assert loaded == ["step_20.safetensors"]  # only the file that changed
    loaded.clear()
    monkeypatch.setattr(A, "metrics_key", lambda: "other code")  # an edit to the metric code: recomputed
    assert A.pair_metrics(job, types.SimpleNamespace(tsne=True), str(cache)) == want and len(loaded) == 2
    assert said(capsys) == []


def test_a_bad_snapshot_is_skipped_and_retried_and_a_bad_table_gives_no_metrics(tmp_path, capsys):
    run, folder = write_snapshots(tmp_path)
    job, = A.load_run(str(run), "r")
    y, is_train = A.read_examples(str(folder))
    good = [r for r in expected_rows(job, y, is_train, 12345) if r["step"] == 20]
    first = job.snapshots[0]["path"]
    with open(first, "wb") as f:
        f.write(b"not a safetensors file")
    cache = tmp_path / "cache"
    cache.mkdir()
    settings = types.SimpleNamespace()
    assert A.pair_metrics(job, settings, str(cache)) == good
    lines = said(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"plot.py: warning: {first} unreadable (SafetensorError: ")
    assert lines[0].endswith("; skipped")
    assert set(files.read_json(str(cache / "metrics_r_x_plus_y_0.json"))) == {"step_20.safetensors"}  # no stale entry
    assert A.pair_metrics(job, settings, str(cache)) == good and len(said(capsys)) == 1  # tried again
    job.modules = {"first": "blocks.0.hook_resid_post"}
    short = tmp_path / "short.safetensors"
    from safetensors.numpy import save_file
    save_file({"blocks.0.hook_resid_post": np.zeros((9, 4), dtype=np.float32)}, str(short))
    job.snapshots = [{**job.snapshots[1], "path": str(short), "file": "short"}]
    assert A.pair_metrics(job, settings, str(cache)) == []
    assert "9 rows, the example table has 700" in said(capsys)[0]
    os.remove(folder / schema.EXAMPLES)
    assert A.pair_metrics(job, settings, str(cache)) == []
    assert said(capsys) == [f"plot.py: warning: {folder / schema.EXAMPLES} unreadable (FileNotFoundError); "
                            f"no metrics for r x_plus_y seed 0"]


def test_the_split_seed_falls_back_to_the_seed(tmp_path):
    job = TrainedJob("r", "x", 7, str(tmp_path), [], None)
    assert A.split_seed(job) == 7
    (tmp_path / schema.RUN).write_text('{"split_seed": null}')
    assert A.split_seed(job) == 7
    (tmp_path / schema.RUN).write_text('{"split_seed": "33"}')
    assert A.split_seed(job) == 33


def test_a_settings_key_is_the_settings_not_their_order(tmp_path):
    key = A.settings_key(types.SimpleNamespace(a=1, b=2))
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == A.settings_key(types.SimpleNamespace(b=2, a=1))
    assert key != A.settings_key(types.SimpleNamespace(a=1, b=3)) != A.settings_key(types.SimpleNamespace(a=1, b=2), 1)
    assert A.settings_key(types.SimpleNamespace(path=tmp_path)) != A.settings_key(types.SimpleNamespace(path="x"))
    path = tmp_path / "f"
    path.write_bytes(b"12")
    key = A.file_key(str(path))
    path.write_bytes(b"123")
    assert A.file_key(str(path)) != key and A.file_key(str(path)).startswith(os.path.abspath(path) + ":3:")


# ----------------------------------------------------------------------------- completion
def ramp():
    """A ramp from 0 to 1 over steps 100-200, flat before and after, sampled every 10 steps to 300."""
    steps = np.arange(0, 301, 10)
    return steps, np.clip((steps - 100) / 100, 0, 1)


def test_completion_on_a_ramp_interpolates_each_level():
    steps, values = ramp()
    times, s, progress = A.completion(steps, values, 0, half_width=1)
    assert times == pytest.approx([110, 150, 190])
    assert s.tolist() == steps.tolist() and progress[0] == 0 and progress[-1] == 1
    # from a start inside the ramp: the change is counted from the value at the start itself
    assert A.completion(steps, values, 150, half_width=1)[0] == pytest.approx([155, 175, 195])
    # level 0 at the first sample; a level reached between the first two samples is interpolated
    assert A.completion(steps, values, 150, half_width=1, levels=(0.0, 0.1))[0] == pytest.approx([150, 155])
    # end: later samples are dropped, the sample at the end kept
    assert A.completion(steps, values, 0, half_width=1, end=180)[0] == pytest.approx([108, 140, 172])
    # the ramp's last sample below the rest: the change is read at the last sample
    dip = values.copy()
    dip[-1] = 0.5
    assert A.completion(steps, dip, 0, half_width=1)[0] == pytest.approx([105, 125, 145])


def test_completion_says_no_change_for_noise_and_for_a_return():
    def series(first, middle, last):
        values = np.concatenate([first, middle, last])
        return np.arange(len(values)) * 10.0, values

    middle = np.linspace(1, 2.6, 24)
    # first and last tenths (3 samples each) with sample variance 1: the standard error is sqrt(2/3) = 0.816, so
    # 4 of them = 3.27: a difference of 3.6 is a change, 3.0 is not
    steps, values = series([-1, 0, 1], middle, [2.6, 3.6, 4.6])
    assert A.completion(steps, values, 0, half_width=0.1) is not None
    steps, values = series([-1, 0, 1], middle * 3.0 / 3.6, [2.0, 3.0, 4.0])
    assert A.completion(steps, values, 0, half_width=0.1) is None
    # n is max(3, a tenth): 30 samples, 3 from each end; the fourth holds a jump the test must not read
    steps, values = series([0, 0, 0], np.concatenate([[1.0], np.ones(23)]), [1, 1, 1])
    assert A.completion(steps, values, 0, half_width=0.1) is not None
    # a curve that goes up 10 and comes back: kept when the net change is at least a quarter of the range
    up = np.concatenate([np.linspace(0, 10, 15), np.linspace(10, 2.5, 15)])
    up[:3], up[-3:] = 0, 2.5  # first and last tenths without noise: only the quarter rule can say no
    assert A.completion(np.arange(30) * 10.0, up, 0, half_width=0.1) is not None  # 2.5 of 10: kept
    assert A.completion(np.arange(30) * 10.0, up + 100, 0, half_width=0.1) is not None  # the offset is no change
    low = np.concatenate([np.linspace(0, 10, 15), np.linspace(10, 2, 15)])
    low[:3], low[-3:] = 0, 2
    assert A.completion(np.arange(30) * 10.0, low, 0, half_width=0.1) is None  # 2 of 10
    assert A.completion(np.arange(30) * 10.0, np.ones(30), 0, half_width=0.1) is None
    assert A.completion([0, 10, 20], [0, 1, 2], 0) is None  # fewer than 3 samples beyond the first tenth


# ----------------------------------------------------------------------------- lead-lag
def leadlag_row(seed, lead, t50_lead=None, onset=None, t50=None, grok=1000, layer="last", split="train",
                measure="m"):
    return {"layer": layer, "split": split, "measure": measure, "seed": seed, "onset_lead": lead,
            "t50_lead": t50_lead, "onset": onset, "t50": t50, "grok_step": grok}


def test_the_leadlag_table_over_seeds():
    rows = [leadlag_row(0, 100, 50, onset=400, t50=600), leadlag_row(1, 300, 70, onset=500, t50=700, grok=1200),
            leadlag_row(2, 0, None, onset=900), leadlag_row(3, None, None),
            leadlag_row(0, -50, layer="log", split="val", measure="loss", onset=950),
            leadlag_row(0, None, layer="first", measure="nc1"), leadlag_row(1, None, layer="first", measure="nc1")]
    table = A.leadlag_table(rows)
    assert [(t["layer"], t["measure"]) for t in table] == [("last", "m"), ("log", "loss"), ("first", "nc1")]
    m, loss, nc1 = table
    low, high = stats.bootstrap([100.0, 300.0, 0.0], np.mean)
    mean, err = stats.mean_stderr(np.array([[50.0], [70.0]]))
    assert m == {"layer": "last", "split": "train", "measure": "m", "reads": "unknown", "n": 3, "seeds": 4,
                 "lead_mean": pytest.approx(400 / 3), "lead_lo": low, "lead_hi": high, "leads": 2, "lags": 0,
                 "onset_from_grok": pytest.approx((-600 - 700 - 100) / 3), "t50_n": 2,
                 "t50_lead_mean": float(mean[0]), "t50_lead_stderr": float(err[0]),
                 "t50_from_grok": pytest.approx((-400 - 500) / 2)}
    assert (loss["reads"], loss["n"], loss["leads"], loss["lags"], loss["onset_from_grok"]) == ("val_labels", 1, 0,
                                                                                                1, -50)
    assert np.isnan(loss["t50_lead_mean"]) and loss["t50_n"] == 0 and np.isnan(loss["t50_from_grok"])
    assert nc1["n"] == 0 and np.isnan(nc1["lead_mean"]) and np.isnan(nc1["onset_from_grok"])
    assert nc1["reads"] == "train" and m["lead_lo"] < m["lead_mean"] < m["lead_hi"]
    # leaders first, by mean lead; measures that never leave their band last, by name
    more = A.leadlag_table(rows + [leadlag_row(0, 500, measure="z"), leadlag_row(0, None, measure="a"),
                                   leadlag_row(0, 1, measure="one"), leadlag_row(1, 0.5, measure="one")])
    assert [t["measure"] for t in more] == ["z", "m", "one", "loss", "a", "nc1"]
    assert (more[2]["leads"], more[2]["lags"]) == (2, 0)  # a lead of a step (or less) is a lead


def table_row(measure, n, lo, hi, mean=100.0, layer="last", split="train", reads="train", leads=None, seeds=None):
    return {"layer": layer, "split": split, "measure": measure, "reads": reads, "n": n, "seeds": seeds or n,
            "lead_mean": mean, "lead_lo": lo, "lead_hi": hi, "leads": n if leads is None else leads}


def test_the_leaders_sentence():
    assert A.describe_leaders([]) == "No measure leaves its post-memorisation band."
    trivial = table_row("acc", 3, 10, 20, layer="log", split="val")
    assert A.describe_leaders([trivial, table_row("m", 0, np.nan, np.nan)]) == (
        "No measure leaves its post-memorisation band.")
    rows = [trivial, table_row("a", 3, 0.0, 5, mean=2, seeds=4), table_row("b", 2, 1, 9, mean=5, leads=1),
            table_row("c", 1, np.nan, np.nan, mean=7), table_row("d", 3, -9, -1, mean=-5, reads="val_labels"),
            table_row("e", 2, -3, 0.0, mean=-1)]
    assert A.describe_leaders(rows) == (
        "Leaving its post-memorisation band before validation accuracy (onset lead, 95% bootstrap interval above 0, "
        "over 4 grokked seeds): b (last, train) by 5 [1, 9] steps (1/2 seeds); after it (interval below 0): "
        "d (last, train) [reads val labels] by -5 [-9, -1] steps (3/3 seeds).")
    many = [table_row(name, 2, 1, 9) for name in "fghijk"]
    assert A.describe_leaders(many).endswith("; j (last, train) by 100 [1, 9] steps (2/2 seeds) (and more).")
    assert A.describe_leaders(many[:5]).endswith("j (last, train) by 100 [1, 9] steps (2/2 seeds).")
    lagging = [table_row(name, 2, -9, -1, mean=-3) for name in "lmno"]
    assert A.describe_leaders(lagging) == (
        "No measure's onset leads validation accuracy's with an interval above 0 (2 grokked seeds); after it "
        "(interval below 0): m (last, train) by -3 [-9, -1] steps (2/2 seeds); n (last, train) by -3 [-9, -1] steps "
        "(2/2 seeds); o (last, train) by -3 [-9, -1] steps (2/2 seeds).")


def test_a_leads_text_and_a_measures_label():
    assert A.lead_text(table_row("a", 1, np.nan, np.nan, mean=42.4)) == "42 steps (n=1)"
    assert A.lead_text(table_row("a", 1, np.nan, np.nan, mean=42.4), short=True) == "42"
    assert A.lead_text(table_row("a", 2, 1.2, 9.6, mean=5, leads=1)) == "5 [1, 10] steps (1/2 seeds)"
    assert A.lead_text(table_row("a", 2, 1.2, 9.6, mean=5, leads=1), short=True) == "5 [1, 10]"
    assert A.measure_label("log", "val", "acc") == "val_acc"
    assert A.measure_label("last", "val", "acc") == "acc (last, val)"
    assert A.is_trivial({"layer": "log", "measure": "acc"})
    assert not A.is_trivial({"layer": "log", "measure": "loss"}) and not A.is_trivial({"layer": "last",
                                                                                         "measure": "acc"})
    assert A.reads_tag("weights") == "" and A.reads_tag("val_labels") == " [reads val labels]"
    assert A.reads_tag("config") == " [reads config]"


def test_the_grokking_sentence():
    def job(seed, grok):
        return TrainedJob("r", "x", seed, "", log_of([1.0], [0.0]), {"step_val_acc_99": grok, "grokked": True})

    assert A.describe_grokking([job(0, 1000)]) == "1000 (1/1 seeds grokked)"
    assert A.describe_grokking([job(0, 1000), job(1, 2000)]) == "1500 ± 500 (2/2 seeds grokked)"
    assert A.format_mean_stderr([1, 2], ".1f", ".2f") == "1.5 ± 0.50"
    assert A.format_mean_stderr([3], ".1f", ".2f") == "3.0 (n=1)"


def test_the_measurement_grid_is_the_representation_measurements_else_the_evaluations():
    rows = [{"layer": "last", "step": s} for s in range(205, 1000, 100)] + [{"layer": "model", "step": 250}]
    log = [{"step": s} for s in range(0, 1500, 10)]
    job = TrainedJob("r", "x", 0, "", log, None)
    assert A.measurement_grid(job, rows, 200).tolist() == list(range(205, 1000, 100))  # 8 of them: enough
    assert A.measurement_grid(job, rows[1:], 230).tolist() == list(range(230, 1500, 100))  # 6: the evaluations'
    assert A.measurement_grid(job, rows, 200).dtype == float


def test_measure_series_are_sorted_by_step_and_hold_the_learning_curves():
    log = [{"step": 0, "train_acc": 0.5, "val_acc": 0.0, "val_loss": 3.0}, {"step": 10, "train_acc": 1.0,
                                                                            "val_acc": 0.1}]
    job = TrainedJob("r", "x", 0, "", log, None)
    series = A.measure_series(job, [{"layer": "last", "split": "train", "metric": "m", "step": 20, "value": 2},
                                    {"layer": "last", "split": "train", "metric": "m", "step": 10, "value": 1}])
    steps, values = series[("last", "train", "m")]
    assert steps.tolist() == [10, 20] and values.tolist() == [1, 2] and values.dtype == float
    assert series[("log", "val", "loss")][1].tolist() == [3.0]
    assert series[("log", "train", "acc")][1].tolist() == [0.5, 1.0] and ("log", "train", "loss") in series


def leadlag_job(seed, grokked=True):
    """Memorised at 200; val accuracy rises 1500 -> 2000 (grokked); measures every 50 steps: nc1 rises at 1000,
    m_down falls at 1100, m_flat does nothing."""
    steps = np.arange(0, 3001, 10)
    train = np.where(steps >= 200, 1.0, 0.5)
    val = np.clip((steps - 1500) / 500, 0.01, 1.0) if grokked else np.full(len(steps), 0.01)
    log = [{"step": int(s), "train_acc": float(t), "val_acc": float(v)} for s, t, v in zip(steps, train, val)]
    rows = []
    for s in range(0, 3001, 50):
        for metric, value in (("nc1", min(max((s - 1000) / 200, 0), 1)), ("m_down", -min(max((s - 1100) / 200, 0),
                                                                                            1)),
                              ("m_flat", (s // 50) % 2)):
            rows.append({"seed": seed, "layer": "last", "split": "train", "metric": metric, "step": s,
                         "value": value})
    return TrainedJob("r", "x_plus_y", seed, "", log, None), rows


def test_leadlag_rows_per_seed_and_measure():
    already = TrainedJob("r", "x_plus_y", 0, "", log_of([0.5] + [1.0] * 40, [0.0] + [1.0] * 40, every=50), None)
    job, rows = leadlag_job(1)
    never, never_rows = leadlag_job(2, grokked=False)
    unmemorised = TrainedJob("r", "x_plus_y", 3, "", log_of([0.9] * 40, [0.0] * 20 + [1.0] * 20), None)
    out, left_out = A.leadlag_rows([never, unmemorised, already, job], rows + never_rows)
    assert left_out == [2, 3, 0]
    by = {(r["layer"], r["split"], r["measure"]): r for r in out}
    assert set(by) == {("last", "train", m) for m in ("nc1", "m_down", "m_flat")} | {
        ("log", split, m) for split in ("train", "val") for m in ("acc", "loss")}  # a log without losses: empty
    assert all((r["run"], r["op"], r["seed"]) == ("r", "x_plus_y", 1) for r in out)
    series = A.measure_series(job, rows)
    grid = A.measurement_grid(job, rows, 200)
    val_onset = onset.onset(grid, onset.grid_values(*series[("log", "val", "acc")], grid))[0]
    val_t50 = A.completion(*series[("log", "val", "acc")], 200)[0][1]
    for key in (("last", "train", "nc1"), ("last", "train", "m_down")):
        began = onset.onset(grid, onset.grid_values(*series[key], grid))
        times = A.completion(*series[key], 200)[0]
        r = by[key]
        assert (r["onset"], r["onset_side"], r["onset_lead"]) == (began[0], "up" if key[2] == "nc1" else "down",
                                                                  val_onset - began[0])
        assert (r["t10"], r["t50"], r["t90"], r["t50_lead"]) == (*times, val_t50 - times[1])
        assert r["onset_lead"] > 0 and r["t50_lead"] > 0
    assert by[("last", "train", "nc1")]["onset"] < by[("last", "train", "m_down")]["onset"]
    flat = by[("last", "train", "m_flat")]
    assert (flat["onset"], flat["onset_side"], flat["onset_lead"], flat["t50"], flat["t50_lead"]) == (None,) * 5
    r = by[("last", "train", "nc1")]
    assert (r["reads"], r["grok_step"], r["memorisation_step"], r["band_end"], r["half_step"]) == (
        "train", 2000, 200, float(grid[onset.BAND - 1]), 1750)
    assert by[("log", "val", "acc")]["reads"] == "val_labels" and by[("log", "val", "acc")]["onset_lead"] == 0
    # a seed with fewer measurements than a band after memorisation: no band end, no onsets
    brief = TrainedJob("r", "x_plus_y", 4, "", log_of([0.5, 0.5] + [1.0] * 6, [0.0] * 5 + [0.6, 1.0, 1.0],
                                                      every=100), None)
    out, left_out = A.leadlag_rows([brief], [])
    assert left_out == [] and out and all(r["band_end"] is None and r["onset"] is None for r in out)


def test_a_seed_half_way_inside_its_band_gets_no_onset_leads():
    job, rows = leadlag_job(1)
    for r in job.log:  # val accuracy half-way at 300, within the band of measurements 200-550
        r["val_acc"] = min(1.0, 0.01 + max(0, r["step"] - 200) / 200) if r["step"] < 1500 else 1.0
    out, left_out = A.leadlag_rows([job], rows)
    assert left_out == [] and out and all(r["onset_lead"] is None for r in out)
    assert all(r["band_end"] == 550 and r["half_step"] == 300 for r in out)
    # a grid of exactly BAND measurements has a band end
    short = [r for r in rows if r["step"] <= 550]
    assert {r["band_end"] for r in A.leadlag_rows([job], short)[0]} == {550.0}


def test_the_final_key_losses_in_the_metric_rows(tmp_path):
    log = log_of([1.0, 1.0], [0.0, 1.0])
    job = TrainedJob("r", "x_plus_y", 0, str(tmp_path), log, None)
    files.write_json(str(tmp_path / schema.FINAL_KEYS), {"rows": [{"step": 10, "restricted_loss": 0.5,
                                                                     "excluded_loss": 2.0}]})
    assert [(r["layer"], r["step"], r["split"], r["metric"], r["value"]) for r in A.measure_rows(job)] == [
        ("model", 10, "all", "restricted_loss_final_keys", 0.5), ("model", 10, "train", "excluded_loss_final_keys", 2.0)]
    files.write_json(str(tmp_path / schema.FINAL_KEYS), {"key_freqs": []})  # no rows yet
    assert A.measure_rows(job) == []
