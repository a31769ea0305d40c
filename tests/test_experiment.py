"""Smoke tests: run experiment.py as a user would and check what it writes."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import ROOT, TINY, kill_when, read_json, run_script, start_experiment, wait_for, wait_until

TEMPLATE_KEYS = ["final_train_loss", "final_val_loss", "final_train_acc", "final_val_acc", "step_val_acc_99"]


def child_pids(pid):
    """Linux: the direct children of a process."""
    return [int(c) for task in os.listdir(f"/proc/{pid}/task")
            for c in open(f"/proc/{pid}/task/{task}/children").read().split()]


def sigint_blocked(pid):
    """Linux: whether SIGINT (signal 2, bit 1) is in the process's blocked mask."""
    mask = next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("SigBlk:"))
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def running(pid) -> bool:
    """Linux: whether a process exists and is not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def partial_files(folder):
    return [f for _, _, files in os.walk(folder) for f in files if ".partial-" in f]


def test_final_info_has_the_template_schema(tiny_run):
    info = read_json(tiny_run / "final_info.json")
    assert list(info) == ["x_plus_y", "permutation"]
    for op, block in info.items():
        assert set(block) == {"means", "stderrs", "final_info_dict"}
        assert set(block["means"]) == {f"{k}_mean" for k in TEMPLATE_KEYS}
        assert set(block["stderrs"]) == {f"{k}_stderr" for k in TEMPLATE_KEYS}
        per_seed = block["final_info_dict"]
        assert set(per_seed) == set(TEMPLATE_KEYS) | {"grokked"}
        for key in TEMPLATE_KEYS:
            values = np.array(per_seed[key], dtype=float)
            assert len(values) == 2
            assert block["means"][f"{key}_mean"] == pytest.approx(values.mean())
            assert block["stderrs"][f"{key}_stderr"] == pytest.approx(values.std(ddof=1) / np.sqrt(2))
        for seed in range(2):
            assert read_json(tiny_run / f"final_info_{op}_{seed}.json")["step_val_acc_99"] == per_seed["step_val_acc_99"][seed]
        for reached, grokked in zip(per_seed["step_val_acc_99"], per_seed["grokked"]):
            assert grokked or reached == 60


def test_every_output_file_is_written(tiny_run):
    config = read_json(tiny_run / "config.json")
    assert config["steps"] == 60 and config["ops"] == ["x_plus_y", "permutation"]
    results = read_json(tiny_run / "all_results.json")
    # the template's pickle, for its old scripts (the project never reads it; this test does, to check it):
    # the same dict as all_results.json, with its {op}_{seed}_final_info / _train_info / _val_info keys
    template = np.load(tiny_run / "all_results.npy", allow_pickle=True).item()
    assert template == results and sorted(template) == sorted(
        f"{op}_{seed}_{kind}" for op in ("x_plus_y", "permutation") for seed in range(2)
        for kind in ("final_info", "train_info", "val_info"))
    assert template["x_plus_y_0_train_info"][0].keys() == {"step", "train_loss", "train_accuracy"}
    for op, n_pairs in (("x_plus_y", 121), ("permutation", 36)):
        for seed in range(2):
            folder = tiny_run / f"{op}_{seed}"
            log = [json.loads(line) for line in open(folder / "log.jsonl")]
            assert [r["step"] for r in log] == list(range(10, 61, 10))
            assert set(log[0]) >= {"step", "train_loss", "train_acc", "val_loss", "val_acc", "lr"}
            assert results[f"{op}_{seed}_val_info"][-1]["val_accuracy"] == log[-1]["val_acc"]
            assert results[f"{op}_{seed}_train_info"][-1]["train_loss"] == log[-1]["train_loss"]
            import datasets

            table = datasets.Dataset.from_parquet(str(folder / "examples.parquet"))
            assert table.num_rows == n_pairs and set(table["split"]) == {"train", "val"}
            assert table["pair"] == list(range(n_pairs))
            index = read_json(folder / "activations" / "index.json")
            assert index["modules"] == {"first": "blocks.0", "last": "blocks.1"}
            steps = [s["step"] for s in index["snapshots"]]
            assert {0, 20, 40, 60} <= set(steps) and steps == sorted(set(steps))
            for snap in index["snapshots"]:
                tensors = load_file(folder / "activations" / snap["file"])
                assert set(tensors) == {"blocks.0", "blocks.1"}
                for t in tensors.values():
                    assert t.shape == (n_pairs, 32) and str(t.dtype) == "torch.float16"
                    assert bool(t.float().isfinite().all())
            assert not [n for n in os.listdir(folder) if ".partial-" in n]


def test_same_config_gives_identical_results_with_and_without_capture(tiny_run, tmp_path):
    run_script("experiment.py", ["--out_dir=again", *TINY], tmp_path)
    run_script("experiment.py", ["--out_dir=no_capture", "--capture=false", "--workers=1", *TINY], tmp_path)
    reference = read_json(tiny_run / "final_info.json")
    assert read_json(tmp_path / "again" / "final_info.json") == reference
    assert read_json(tmp_path / "no_capture" / "final_info.json") == reference
    for op in ("x_plus_y", "permutation"):
        logs = [open(folder / f"{op}_0" / "log.jsonl").read() for folder in (tiny_run, tmp_path / "no_capture")]
        assert logs[0] == logs[1]
    assert not (tmp_path / "no_capture" / "x_plus_y_0" / "activations").exists()


def test_parallel_workers_match_a_sequential_run(tiny_run, tmp_path):
    run_script("experiment.py", ["--out_dir=par", *TINY, "--workers=2"], tmp_path)  # tiny_run: one worker
    assert read_json(tiny_run / "final_info.json") == read_json(tmp_path / "par" / "final_info.json")
    for job in ("x_plus_y_1", "permutation_0"):
        assert (tiny_run / job / "log.jsonl").read_text() == (tmp_path / "par" / job / "log.jsonl").read_text()


def test_workers_are_forked_on_a_linux_cpu_with_one_thread_and_spawned_otherwise():
    import sys

    import experiment as E
    from lab import runner

    linux = sys.platform == "linux"
    assert runner.start_method(E.Config(device="cpu"), threads=1) == ("fork" if linux else "spawn")
    assert runner.start_method(E.Config(device="cpu"), threads=2) == "spawn"  # the parent's OpenMP pool
    assert runner.start_method(E.Config(device="cuda"), threads=1) == "spawn"  # CUDA cannot start in a fork


PAGE_FAULTS_PER_STEP = """
import json, resource
from contextlib import nullcontext
import torch
import torch.nn.functional as F
import experiment as E
from lab.job import keep_freed_memory

torch.set_num_threads(1)
task, cfg = E.make_task("x_plus_y"), E.Config()
model = E.build_model(cfg, task)
optimizer = E.adamw(model.parameters(), cfg)


def faults_per_step():
    for repeat in range(5):  # 2 to settle, 3 counted
        if repeat == 2:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = F.cross_entropy(model(task.x[:512]), task.y[:512])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        E.evaluate(model, task.x, task.y, nullcontext, E.LOSSES["cross_entropy"])
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3


default = faults_per_step()
keep_freed_memory()
print(json.dumps({"default": default, "keep": faults_per_step()}))
"""


def test_a_training_process_keeps_freed_memory_instead_of_faulting_it_in_again_each_step(tmp_path):
    """keep_freed_memory (glibc's mallopt): a step's buffers come back from the heap, not as fresh pages. Without
    it an update and an evaluation over every pair cost tens of thousands of page faults; with it, a few hundred."""
    (tmp_path / "faults.py").write_text(PAGE_FAULTS_PER_STEP)
    proc = subprocess.run([sys.executable, "faults.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
                          check=True, capture_output=True, text=True)
    faults = json.loads(proc.stdout)
    assert faults["keep"] < faults["default"] / 4, faults


PLUGIN_WITH_A_SLOW_EXIT = '''
import multiprocessing, multiprocessing.util, os, time
from experiment import Plugin

class SlowExit(Plugin):
    """x_plus_y finishes last (it waits for permutation to have exited), then takes a while to exit (clean-up that
    runs before a lock's, as tqdm's)."""
    name = "slow_exit"

    def on_train_end(self, run, final_info):
        self.lock = multiprocessing.get_context("spawn").RLock()
        if run.op == "x_plus_y":
            other = os.path.join(os.path.dirname(run.out_dir), "permutation_0", "exited_cleanly")
            deadline = time.time() + 120
            while not os.path.exists(other):
                if time.time() > deadline:
                    raise RuntimeError("permutation never exited")
                time.sleep(0.01)

        def finish():
            time.sleep(1.5)
            open(os.path.join(run.out_dir, "exited_cleanly"), "w").close()
        multiprocessing.util.Finalize(None, finish, exitpriority=10)
'''


def test_children_that_have_reported_are_left_to_exit_cleanly(tmp_path):
    """The last child was once killed while exiting: a 'leaked semaphore' warning at the end of a run."""
    (tmp_path / "slow.py").write_text(PLUGIN_WITH_A_SLOW_EXIT)
    args = ["--out_dir=r", *TINY, "--seeds=1", "--plugins=slow.py", "--workers=2"]
    proc = run_script("experiment.py", args, tmp_path)
    missing = [op for op in ("x_plus_y", "permutation") if not (tmp_path / "r" / f"{op}_0" / "exited_cleanly").exists()]
    assert missing == []
    assert "Warning" not in proc.stderr and "leaked" not in proc.stderr


PLUGIN_THAT_DIES = '''
import os
from experiment import Plugin

class Dies(Plugin):
    """The process vanishes as if the kernel's OOM killer had taken it."""
    name = "dies"

    def on_step_end(self, run, step):
        if run.op == "permutation" and step == 7:
            os._exit(3)
'''


def test_a_training_process_that_dies_is_named_and_finished_pairs_stay(tmp_path):
    (tmp_path / "dies.py").write_text(PLUGIN_THAT_DIES)
    args = ["--out_dir=r", *TINY, "--plugins=dies.py", "--workers=2", "--progress=none"]
    proc = run_script("experiment.py", args, tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "measures plugin:" not in line]  # a note, not an error
    assert lines == [f"experiment.py: the process training permutation seed {lines[0].split('seed ')[1][0]} ended "
                     "without reporting its results (exit code 3)"]
    assert (tmp_path / "r" / "final_info_x_plus_y_0.json").exists()
    assert not (tmp_path / "r" / "final_info.json").exists()


@pytest.mark.parametrize("args,words", [
    (["--ops=x_pow_y"], "unknown op"),
    (["--p=2"], "at least 3"),
    (["--p=91", "--ops=x_div_y"], "not prime"),
    (["--train_frac=1.0"], "between 0 and 1"),
    (["--train_frac=0"], "between 0 and 1"),
    (["--steps=0"], "--steps"),
    (["--seeds=0"], "--seeds"),
    (["--batch_size=-1"], "--batch_size"),
    (["--steps=ten"], "invalid"),
    (["--lr=fast"], "invalid"),
    (["--no_such_flag=1"], "unrecognized"),
    (["--plugins=nonexistent_plugin"], "unknown plugin"),
    (["--plugins=missing_file.py"], "does not exist"),
    (["--measure_every=15"], "must be a multiple of --eval_every=10"),
    (["--eval_every=20", "--measure_sparse_every=30"], "--measure_sparse_every=30 must be a multiple"),
    (["--stop_at_val_acc=1.5"], "--stop_at_val_acc"),
    (["--d_model=30", "--n_heads=4"], "divisible by --n_heads"),
    (["--sweep=lr"], "is not FIELD=VALUE"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, words):
    proc = run_script("experiment.py", ["--out_dir=out", *args], tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_out_dir_that_is_a_file_or_unwritable_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc = run_script("experiment.py", ["--out_dir=taken"], tmp_path, check=False)
    assert proc.returncode == 2 and "existing file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = "taken/sub"
        else:
            target = "locked/sub"
        proc = run_script("experiment.py", [f"--out_dir={target}"], tmp_path, check=False)
        assert proc.returncode == 2 and "cannot be written" in proc.stderr
    finally:
        locked.chmod(0o700)
    assert sorted(os.listdir(tmp_path)) == ["locked", "taken"] and os.listdir(locked) == []


def test_help_lists_every_flag(tmp_path):
    out = run_script("experiment.py", ["--help"], tmp_path).stdout
    for flag in ("--ops", "--seeds", "--steps", "--capture_every", "--p", "--train_frac", "--batch_size", "--lr",
                 "--weight_decay", "--plugins", "--workers", "--overwrite"):
        assert flag in out
    assert "modulus" in out


def test_changed_config_is_refused_unless_overwrite(tiny_run, tmp_path):
    run_script("experiment.py", ["--out_dir=r", *TINY, "--steps=20", "--ops=x_plus_y", "--seeds=1"], tmp_path)
    proc = run_script("experiment.py", ["--out_dir=r", *TINY, "--steps=30", "--ops=x_plus_y", "--seeds=1"],
                      tmp_path, check=False)
    assert proc.returncode == 2 and "steps" in proc.stderr and "--overwrite" in proc.stderr
    assert read_json(tmp_path / "r" / "config.json")["steps"] == 20
    run_script("experiment.py", ["--out_dir=r", *TINY, "--steps=30", "--ops=x_plus_y", "--seeds=1", "--overwrite"],
               tmp_path)
    assert read_json(tmp_path / "r" / "final_info_x_plus_y_0.json")["step_val_acc_99"] <= 30
    assert read_json(tmp_path / "r" / "config.json")["steps"] == 30


def same_bytes(clean, other) -> list:
    """The files of run folder `other` that differ from `clean`'s, or that one of them lacks: every file, except the
    timings in run.json and the fields that change no number in config.json (out_dir, workers, ...)."""
    from lab.config import RUNTIME_FIELDS

    names = {p.relative_to(clean) for p in clean.rglob("*") if p.is_file()} | {
        p.relative_to(other) for p in other.rglob("*") if p.is_file()}
    differ = []
    for name in sorted(names - {Path(".lock")}):
        a, b = clean / name, other / name
        if not (a.exists() and b.exists()):
            differ.append(str(name))
        elif name.name in ("run.json", "config.json"):
            drop = ("train_seconds", "plugin_seconds", *RUNTIME_FIELDS)
            if {k: v for k, v in read_json(a).items() if k not in drop} != {
                    k: v for k, v in read_json(b).items() if k not in drop}:
                differ.append(str(name))
        elif a.read_bytes() != b.read_bytes():
            differ.append(str(name))
    return differ


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_after_a_kill_mid_job_gives_the_uninterrupted_bytes(tiny_run, tmp_path, workers):
    """kill -9 while the second x+y job is two thirds through (its snapshot of step 40 written), then the same
    command: every file of every job (weights, logs, measures, snapshots, examples, final_info) is the
    uninterrupted run's, with one worker or two."""
    args = ["--out_dir=run_k", *TINY[:-1], f"--workers={workers}"]  # tiny_run's config, but for the workers
    proc = start_experiment(args, tmp_path, stderr=subprocess.DEVNULL)
    mid = tmp_path / "run_k" / "x_plus_y_1" / "activations" / "step_000040.safetensors"
    kill_when(proc, mid)
    assert not (tmp_path / "run_k" / "final_info.json").exists()
    finished = {p.name: p.read_bytes() for p in (tmp_path / "run_k").glob("final_info_*.json")}
    resumed = run_script("experiment.py", args, tmp_path)
    assert resumed.stderr.count("already finished") == len(finished)
    assert all((tmp_path / "run_k" / name).read_bytes() == data for name, data in finished.items())
    assert same_bytes(tiny_run, tmp_path / "run_k") == []
    assert partial_files(tmp_path / "run_k") == []


def test_two_threads_give_the_same_bytes_twice(tmp_path):
    """--threads=2 rounds otherwise than one thread, but the same way every time."""
    args = [*TINY, "--ops=x_plus_y", "--seeds=1", "--threads=2"]
    for out in ("a", "b"):
        run_script("experiment.py", [f"--out_dir={out}", *args], tmp_path)
    assert same_bytes(tmp_path / "a", tmp_path / "b") == []
    assert read_json(tmp_path / "a" / "x_plus_y_0" / "run.json")["threads"] == 2


PLUGIN_THAT_FAILS = '''
from experiment import Plugin

class Exploding(Plugin):
    name = "exploding"

    def on_step_end(self, run, step):
        if run.op == "permutation" and step == 7:
            raise ValueError("deliberate")
'''


def test_failing_plugin_names_itself_and_keeps_finished_pairs(tmp_path):
    (tmp_path / "boom.py").write_text(PLUGIN_THAT_FAILS)
    proc = run_script("experiment.py", ["--out_dir=r", *TINY, "--plugins=boom.py", "--workers=1"], tmp_path, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "exploding" in last and "step 7" in last and "deliberate" in last and "Traceback" not in proc.stderr
    assert (tmp_path / "r" / "final_info_x_plus_y_0.json").exists()
    assert (tmp_path / "r" / "final_info_x_plus_y_1.json").exists()
    assert not (tmp_path / "r" / "final_info.json").exists()


PLUGIN_THAT_HOLDS = '''
import os, time
from experiment import Plugin
from lab.job import STOP

class Hold(Plugin):
    """While the environment names a HOLD file: seed 1's jobs wait at step 5 (file 'held' in the job's folder) for a
    stop, so a signal the test sends lands mid-training, however fast the machine."""
    name = "hold"

    def on_step_end(self, run, step):
        if os.environ.get("HOLD") and run.seed == 1 and step == 5:
            open(os.path.join(run.out_dir, "held"), "w").close()
            deadline = time.time() + 120
            while not STOP.is_set():  # SIGTERM from the parent sets it; the training loop then unwinds
                if time.time() > deadline:
                    raise RuntimeError("never stopped")
                time.sleep(0.01)
'''


def test_ctrl_c_stops_every_process_with_one_line_and_keeps_finished_pairs(tmp_path, monkeypatch):
    (tmp_path / "hold.py").write_text(PLUGIN_THAT_HOLDS)
    monkeypatch.setenv("HOLD", "1")
    args = ["--out_dir=run_c", *TINY, "--workers=2", "--progress=none", "--plugins=hold.py"]
    proc = start_experiment(args, tmp_path, new_session=True)
    wait_for(tmp_path / "run_c", "final_info_*_0.json")
    wait_for(tmp_path / "run_c", "*_1/held")  # the run is going: a seed-1 job waits for the stop
    children = child_pids(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert children and wait_until(lambda: not [p for p in children if running(p)], timeout=5)  # none outlives it
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("experiment.py: interrupted") and "Traceback" not in stderr, stderr[-3000:]
    assert not partial_files(tmp_path / "run_c")
    finished = sorted(p.name for p in (tmp_path / "run_c").glob("final_info_*.json"))
    assert finished and "final_info.json" not in finished
    monkeypatch.delenv("HOLD")
    resumed = run_script("experiment.py", [a for a in args if a != "--progress=none"], tmp_path)  # with its lines
    assert resumed.stderr.count("already finished") == len(finished)
    assert (tmp_path / "run_c" / "final_info.json").exists()


class Stopped(Exception):
    pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_handed_to_another_thread_while_a_child_starts_is_raised_after_the_start(signum):
    """Ctrl-C goes to the whole process group, a harness's SIGTERM to the process; with the signal blocked in the
    main thread, the kernel hands it to another thread (OpenMP's, pyarrow's), and Python runs its handler in the
    main thread at its next check. While a worker starts, that check could fall after the fork, before the child
    was tracked: the child then went on unstopped. runner._signals_held holds such a signal until the block ends,
    with both signals blocked for the child to inherit."""
    from lab import runner

    def stop(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signum, stop)
    try:
        other = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)  # a thread that takes it
        other.start()
        done = []
        with pytest.raises(Stopped):
            with runner._signals_held():
                signal.pthread_kill(other.ident, signum)
                for _ in range(100):  # Python code with checks for signals in it (start()'s own, in the real case)
                    time.sleep(0.001)
                assert {signal.SIGINT, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
                done.append("the child is tracked")
        assert done == ["the child is tracked"] and signal.getsignal(signum) is stop
    finally:
        signal.signal(signum, previous)


PLUGIN_WITH_A_SLOW_CLEAN_UP = '''
import multiprocessing.util, os, time
from experiment import Plugin

class SlowCleanUp(Plugin):
    """A finished child's clean-up lasts until the test has sent its Ctrl-C (the file 'signalled' in the run)."""
    name = "slow_clean_up"

    def on_train_end(self, run, final_info):
        def finish():
            open(os.path.join(run.out_dir, "exiting"), "w").close()
            deadline = time.time() + 120
            while not os.path.exists(os.path.join(os.path.dirname(run.out_dir), "signalled")):
                if time.time() > deadline:
                    raise RuntimeError("no signal came")
                time.sleep(0.01)
            open(os.path.join(run.out_dir, "exited_cleanly"), "w").close()
        multiprocessing.util.Finalize(None, finish, exitpriority=10)
'''


def test_ctrl_c_while_a_finished_child_exits_lets_it_finish_quietly(tmp_path):
    (tmp_path / "slow.py").write_text(PLUGIN_WITH_A_SLOW_CLEAN_UP)
    args = ["--out_dir=run_c", *TINY[:2], "--steps=500", *TINY[4:], "--workers=2", "--progress=none",
            "--plugins=slow.py"]
    proc = start_experiment(args, tmp_path, new_session=True)
    wait_for(tmp_path / "run_c", "*/exiting", poll=0.02)
    os.killpg(proc.pid, signal.SIGINT)  # the child is inside its clean-up until 'signalled' exists: the run too
    (tmp_path / "run_c" / "signalled").touch()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [line for line in stderr.strip().splitlines() if "measures plugin:" not in line]  # a note, not an error
    assert len(lines) == 1 and lines[0].startswith("experiment.py: interrupted")  # one line: no child's traceback
    exiting = list((tmp_path / "run_c").glob("*/exiting"))
    assert exiting and all((folder.parent / "exited_cleanly").exists() for folder in exiting)


def test_ctrl_c_while_children_start_up_is_one_line(tmp_path):
    """A child still importing torch when Ctrl-C comes must not print a KeyboardInterrupt traceback. Two threads
    per worker: spawned children, which import torch first (as on a GPU); one-thread workers on a CPU are forked
    (runner.start_method) and start with torch imported."""
    args = ["--out_dir=run_c", *TINY, "--workers=2", "--threads=2"]
    proc = start_experiment(args, tmp_path, new_session=True)
    first = proc.stderr.readline()  # printed just before the children are started (after batched training's lines)
    while first.startswith("batched training"):
        first = proc.stderr.readline()
    assert first.startswith("training")

    def spawned():  # the children, now importing torch
        return [p for p in child_pids(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]

    assert wait_until(lambda: len(spawned()) == 2, timeout=60, poll=0.01), "the two workers did not start"
    workers = spawned()
    assert all(sigint_blocked(p) for p in workers)  # from their start, before any handler
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130
    assert rest.strip().splitlines() == [rest.strip().splitlines()[-1]] and "interrupted" in rest, rest[-3000:]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_from_a_harness_stops_with_one_line_and_no_partial_files(tmp_path, workers):
    """A harness's timeout signals the main process only; it and its children must stop, cleaning up."""
    args = ["--out_dir=run_t", *TINY[:2], "--steps=3000", *TINY[4:], f"--workers={workers}", "--progress=none"]
    proc = start_experiment(args, tmp_path)
    wait_for(tmp_path / "run_t", "*/activations/step_001000.safetensors")  # mid-training
    children = child_pids(proc.pid)
    assert len(children) >= (2 if workers == 2 else 0)  # the pool's workers (and multiprocessing's tracker)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143
    # no child outlives the run: the parent joins its workers before it exits, so each is gone within seconds (a
    # worker that ignored the stop and trained on would still be running)
    assert wait_until(lambda: not [p for p in children if running(p)], timeout=5), \
        [open(f"/proc/{p}/cmdline").read() for p in children if running(p)]
    lines = [line for line in stderr.strip().splitlines() if "measures plugin:" not in line]  # a note, not an error
    assert len(lines) == 1 and "terminated" in lines[0], stderr[-3000:]
    assert not partial_files(tmp_path / "run_t")
    assert not (tmp_path / "run_t" / "final_info.json").exists()


def test_leftovers_of_a_killed_write_are_removed_on_the_next_start_and_finished_files_kept(tiny_run, tmp_path):
    """Partial files planted where a killed run leaves them (beside final_info.json, in a job's folder, among its
    snapshots): the next start on that out_dir removes every one and no finished byte changes."""
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run_0")
    run = tmp_path / "run_0"
    planted = [run / ".final_info.partial-99.json", run / "x_plus_y_0" / ".log.partial-7.jsonl",
               run / "x_plus_y_0" / "activations" / ".step_000020.partial-7.safetensors"]
    for path in planted:
        path.write_bytes(b"half a file")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p not in planted and p.name != ".lock"}
    proc = run_script("experiment.py", ["--out_dir=run_0", *TINY], tmp_path)
    assert "already finished" in proc.stderr and not any(p.exists() for p in planted)
    changed = [p for p, data in before.items() if p.read_bytes() != data and p.name not in (
        "final_info.json", "all_results.json", "all_results.npy", "config.json")]
    assert changed == [] and partial_files(run) == []


def test_the_seeds_are_the_documented_formulas_and_reach_run_json(tiny_run):
    """README and docs/experiment.md: split_seed = seed, init_seed = 1337 + seed, batch_seed = 2^20 + seed."""
    import experiment as E

    for seed in (0, 1, 7):
        assert E.derived_seeds(seed) == {"split_seed": seed, "init_seed": 1337 + seed, "batch_seed": 2 ** 20 + seed}
    written = json.load(open(tiny_run / "x_plus_y_1" / "run.json"))
    assert (written["split_seed"], written["init_seed"], written["batch_seed"]) == (1, 1338, 2 ** 20 + 1)


def test_the_workers_stop_when_the_parent_is_killed(tmp_path):
    """kill -9 of experiment.py (a lost terminal, an OOM kill): its workers get SIGTERM from the kernel
    (PR_SET_PDEATHSIG), stop at their next step and exit, rather than train on as orphans."""
    args = ["--out_dir=run_k", *TINY[:2], "--steps=20000", *TINY[4:], "--workers=2", "--progress=none"]
    proc = start_experiment(args, tmp_path)
    wait_for(tmp_path / "run_k", "*/activations/step_001000.safetensors")  # the workers are training
    workers = [p for p in child_pids(proc.pid) if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    try:
        assert wait_until(lambda: not [p for p in workers if running(p)], timeout=30), "a worker trained on"
    finally:
        for pid in workers:  # a failing run must not leave orphans training on the test machine
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "run_k" / "final_info.json").exists()
