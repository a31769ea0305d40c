import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny run: seconds on a 2-core CPU, in one process; tests of the worker pool add --workers=2 after TINY (the
# last flag wins).
TINY = ["--ops=x_plus_y,permutation", "--seeds=2", "--steps=60", "--capture_every=20", "--p=11",
        "--perm_k=3", "--batch_size=64", "--d_model=32", "--eval_every=10", "--measure_every=20",
        "--measure_sparse_every=20", "--workers=1"]


def run_script(script, args, cwd, timeout=600, check=True, env=None):
    """Run a project script as a user would (env: more environment variables); returns the CompletedProcess."""
    env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def default_sigint():
    """A shell starts background jobs with SIGINT ignored, and children inherit that: the suite run in the
    background would start experiment.py deaf to Ctrl-C. Give it a terminal's default, as a user's shell does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_experiment(args, cwd, stderr=subprocess.PIPE, new_session=False):
    """experiment.py in the background, as a user or a harness starts it."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "experiment.py"), *args], cwd=cwd,
                            env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True, start_new_session=new_session, preexec_fn=default_sigint)


def wait_until(condition, timeout=300, poll=0.05):
    """Poll until condition() is true or the timeout passes; returns its last value."""
    deadline = time.time() + timeout
    while not (done := condition()) and time.time() < deadline:
        time.sleep(poll)
    return done


def wait_for(folder, pattern, poll=0.05, timeout=300):
    """Until a file matching pattern exists under folder; the test fails when the timeout passes first."""
    assert wait_until(lambda: list(folder.glob(pattern)), timeout, poll), f"no {pattern} in {folder} after {timeout}s"


def kill_when(proc, path, timeout=300):
    """SIGKILL proc (as a lost machine would) once path exists; returns when it is dead. The test fails when the
    timeout passes first."""
    assert wait_until(lambda: path.exists() or proc.poll() is not None, timeout, poll=0.02), \
        f"{path} did not appear within {timeout}s"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def proc_stat(pid: int) -> list | None:
    """Linux: the fields of /proc/PID/stat after the command name (state, ppid, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def exited(pid: int) -> bool:
    """The process is gone, or a zombie: dead, not yet reaped (an orphan's new parent may never reap it)."""
    stat = proc_stat(pid)
    return stat is None or stat[0] == "Z"


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny experiment shared by the read-only tests."""
    cwd = tmp_path_factory.mktemp("tiny")
    run_script("experiment.py", ["--out_dir=run_0", *TINY], cwd)
    return cwd / "run_0"


def make_run(cfg, op, task, train_idx, val_idx, model, seed=0, out_dir=""):
    """The Run a plugin sees, built as train_one builds it (no optimizer)."""
    import torch

    import experiment as E
    from lab.plugins import Run
    from lab.schema import Job

    return Run(cfg, Job(op, seed), out_dir, task, train_idx, val_idx, model, torch.device("cpu"), E.LOSSES[cfg.loss],
               E.evaluate, E.OPS[op], E.derived_seeds(seed))
