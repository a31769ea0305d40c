"""Training on a real Ray cluster that the test starts on 127.0.0.1 (`ray start --head`) and stops: the same
numbers and progress lines as this machine's pool, a dying worker retried (its retry writing what a local run
writes), a failure reported in one line with finished jobs kept, Ctrl-C cancelling the tasks in flight, and an
address where no cluster answers refused before any file is written."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import TINY, exited, proc_stat, read_json, run_script, start_experiment, wait_for, wait_until

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, capture_output=True, timeout=300)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_cluster(str(temp))


def stop_cluster(temp: str) -> None:
    """Stop this cluster's processes alone: those naming its temp dir and their descendants (`ray stop` would stop
    every Ray cluster on the machine, a user's or another test run's too), with SIGKILL as `ray stop --force`."""
    parents = {int(e): int(stat[1]) for e in os.listdir("/proc") if e.isdigit() and (stat := proc_stat(int(e)))}
    mine = set()
    for pid in set(parents) - {os.getpid()}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if temp.encode() in f.read():
                    mine.add(pid)
        except OSError:
            continue
    while True:  # and their descendants (the agents and workers the raylet started)
        more = {pid for pid, parent in parents.items() if parent in mine} - mine
        if not more:
            break
        mine |= more
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert wait_until(lambda: all(exited(pid) for pid in mine), 30, 0.1), "the test's Ray cluster did not stop"


def test_a_run_on_the_cluster_gives_the_numbers_of_a_local_run(cluster, tmp_path):
    args = [*TINY, "--batched=on", "--device=cpu"]  # the same on a machine with a GPU, whose cluster has none here
    local = run_script("experiment.py", ["--out_dir=local", *args, "--workers=2"], tmp_path)
    proc = run_script("experiment.py", ["--out_dir=ray", *args, f"--ray_address={cluster}"], tmp_path)
    assert f"on the Ray cluster at {cluster} (2 CPUs; 2 task(s) at a time on cpu)" in proc.stderr
    assert "in 2 batches" in proc.stderr

    def progress(stderr):  # each job's progress lines (its last step here) and "done" lines, in order
        return [line for line in stderr.splitlines() if ": step " in line or ": done in " in line]

    lines = progress(proc.stderr)  # the reports come back from the tasks as from the local pool's children
    assert sorted(line for line in lines if ": step " in line) == \
        sorted(line for line in progress(local.stderr) if ": step " in line) != []
    done = [i for i, line in enumerate(lines) if ": done in " in line]
    assert len(done) == 4, proc.stderr
    for i in done:  # a job's report comes before its task's "done"
        job = lines[i].split(": done in ")[0]
        assert any(line.startswith(f"{job}: step ") for line in lines[:i]), proc.stderr
    assert read_json(tmp_path / "ray" / "final_info.json") == read_json(tmp_path / "local" / "final_info.json")
    for job in ("x_plus_y_0", "permutation_1"):
        for name in ("log.jsonl", "measures.jsonl", "model.safetensors"):
            assert (tmp_path / "ray" / job / name).read_bytes() == (tmp_path / "local" / job / name).read_bytes()
    again = run_script("experiment.py", ["--out_dir=ray", *args, f"--ray_address={cluster}"], tmp_path)
    assert again.stderr.count("already finished") == 4


def test_auto_takes_the_clusters_gpus_one_task_each_and_cuda_without_gpus_is_refused():
    import experiment as E
    from lab import raycluster
    from lab.plugins import UsageError

    cfg = E.Config(ray_address="h:1")
    gpu_cfg, tasks = raycluster.placement(cfg, {"CPU": 32.0, "GPU": 2.0}, threads=1)
    assert (gpu_cfg.device, tasks) == ("cuda", 2)  # whatever the driver has: the nodes' GPUs, one task per GPU
    cpu_cfg, tasks = raycluster.placement(cfg, {"CPU": 8.0}, threads=2)
    assert (cpu_cfg.device, tasks) == ("cpu", 4)
    assert raycluster.placement(E.Config(device="cpu"), {"CPU": 8.0, "GPU": 1.0}, threads=1)[0].device == "cpu"
    with pytest.raises(UsageError, match="has no GPU"):
        raycluster.placement(E.Config(device="cuda", ray_address="h:1"), {"CPU": 8.0}, threads=1)


DIES = """import os
import experiment


class Dies(experiment.Plugin):
    name = "dies"

    def on_train_begin(self, run):
        if run.op == "x_plus_y" and run.seed == 1:
            with open(os.path.join(run.cfg.out_dir, "deaths"), "a") as f:
                f.write("died\\n")
            os._exit(3)  # the worker process dies, as on a lost node
"""


def test_a_dying_worker_is_retried_once_then_reported_in_one_line(cluster, tmp_path):
    (tmp_path / "dies.py").write_text(DIES)
    args = ["--out_dir=r", *TINY, "--ops=x_plus_y", "--seeds=3", "--capture=false", "--measure=false",
            f"--plugins={tmp_path / 'dies.py'}", f"--ray_address={cluster}"]
    proc = run_script("experiment.py", args, tmp_path, check=False)
    own = [line for line in proc.stderr.splitlines() if line.startswith("experiment.py:")]
    assert proc.returncode == 1 and len(own) == 1, proc.stderr
    assert "the Ray task training x_plus_y seed 1 failed (a dead worker is retried once)" in own[0]
    assert (tmp_path / "r" / "deaths").read_text() == "died\n" * 2  # the first try and one retry
    finished = sorted(p.name for p in (tmp_path / "r").glob("final_info_*.json"))
    assert "final_info_x_plus_y_1.json" not in finished and not (tmp_path / "r" / "final_info.json").exists()


DIES_ONCE = """import os
import experiment


class DiesOnce(experiment.Plugin):
    name = "dies_once"

    def on_step_end(self, run, step):
        marker = os.path.join(run.cfg.out_dir, "..", "die_once")
        if run.seed == 1 and step == 50 and os.path.exists(marker):
            os.remove(marker)
            os._exit(3)  # mid-run: its snapshots and log so far are on disk
"""


def test_a_worker_that_dies_mid_run_is_retried_and_the_retry_writes_what_a_local_run_writes(cluster, tmp_path):
    (tmp_path / "dies_once.py").write_text(DIES_ONCE)
    args = [*TINY, "--ops=x_plus_y", f"--plugins={tmp_path / 'dies_once.py'}"]
    run_script("experiment.py", ["--out_dir=local", *args], tmp_path)  # no marker: nothing dies
    (tmp_path / "die_once").touch()
    proc = run_script("experiment.py", ["--out_dir=ray", *args, f"--ray_address={cluster}"], tmp_path)
    assert not (tmp_path / "die_once").exists()  # seed 1's first try died
    said = [line for line in proc.stderr.splitlines() if "Ray worker died" in line]
    assert said == ["x_plus_y seed 1: its Ray worker died; the retry trains it again from the start"], proc.stderr
    printed = proc.stdout + proc.stderr  # Ray's own lines on the death, without colour codes (not a terminal)
    assert "(raylet)" in printed and "\x1b[" not in printed, printed

    def files(out_dir):  # every file of the job folders but run.json (its timings)
        root = tmp_path / out_dir
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("x_plus_y_*/**/*"))
                if p.is_file() and p.name != "run.json"}

    ray, local = files("ray"), files("local")
    assert sorted(ray) == sorted(local) and "x_plus_y_1/activations/step_000060.safetensors" in ray
    assert [name for name in ray if ray[name] != local[name]] == []
    assert read_json(tmp_path / "ray" / "final_info.json") == read_json(tmp_path / "local" / "final_info.json")


HANGS = """import os
import time
import experiment


class Hangs(experiment.Plugin):
    name = "hangs"

    def on_train_begin(self, run):
        hold = os.path.join(run.cfg.out_dir, "..", "hold")
        if run.seed == 1 and os.path.exists(hold):
            with open(hold, "w") as f:
                f.write(str(os.getpid()))
            while os.path.exists(hold):
                time.sleep(0.1)
"""


def test_ctrl_c_cancels_the_tasks_in_flight_and_keeps_finished_jobs(cluster, tmp_path):
    (tmp_path / "hangs.py").write_text(HANGS)
    (tmp_path / "hold").write_text("")
    args = ["--out_dir=r", *TINY, "--ops=x_plus_y", "--capture=false", "--measure=false",
            f"--plugins={tmp_path / 'hangs.py'}", f"--ray_address={cluster}", "--progress=none"]
    proc = start_experiment(args, tmp_path, new_session=True)
    wait_for(tmp_path / "r", "final_info_x_plus_y_0.json")
    wait_until((tmp_path / "hold").read_text, timeout=60)
    worker = int((tmp_path / "hold").read_text())  # the Ray worker training seed 1, held in its plugin
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the driver's process group, not the cluster
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("experiment.py: interrupted")
    gone = wait_until(lambda: not os.path.exists(f"/proc/{worker}"), timeout=60)  # cancelled: the cluster kills it
    assert gone, "the cancelled task's worker still runs"
    assert (tmp_path / "r" / "final_info_x_plus_y_0.json").exists()
    assert not (tmp_path / "r" / "final_info_x_plus_y_1.json").exists()
    (tmp_path / "hold").unlink()
    resumed = run_script("experiment.py", args[:-1], tmp_path)
    assert resumed.stderr.count("already finished") == 1 and (tmp_path / "r" / "final_info.json").exists()


def test_an_address_where_no_cluster_answers_is_refused_before_any_file(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = run_script("experiment.py", ["--out_dir=r", *TINY, f"--ray_address=127.0.0.1:{port}"], tmp_path,
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "no Ray cluster answers there" in proc.stderr and os.listdir(tmp_path) == []


def test_a_tasks_reports_go_in_one_call_a_second_and_the_lines_steps_at_once(monkeypatch):
    import ray

    import experiment as E
    from lab import raycluster
    from lab.schema import Job

    calls, clock = [], [100.0]
    monkeypatch.setattr(raycluster.time, "monotonic", lambda: clock[0])

    class Queue:
        def put_nowait_batch(self, items):
            calls.append([(job, step) for job, step, _ in items])

    a, b, short = Job("x_plus_y", 0), Job("x_plus_y", 1), Job("x_plus_y", 2, (("steps", 300),))
    reports = raycluster._Reports(Queue(), E.Config(steps=1500))
    reports(a, 10, {})  # the first goes at once
    reports(a, 20, {}), reports(b, 20, {}), reports(a, 30, {})  # within the second: kept, the latest of each
    clock[0] += 1.0
    reports(b, 40, {})
    reports(b, 1000, {})  # a progress line's step: at once
    reports(a, 1500, {})  # the last step: at once
    reports(short, 300, {})  # a sweep cell's own last step: at once
    reports(b, 1490, {})
    reports.flush()  # the task's end
    assert calls == [[(a, 10)], [(a, 30), (b, 40)], [(b, 1000)], [(a, 1500)], [(short, 300)], [(b, 1490)]]

    class Gone:
        def put_nowait_batch(self, items):
            raise ray.exceptions.RayError("the driver's queue is gone")

    reports = raycluster._Reports(Gone(), E.Config(steps=1500))
    reports(a, 1000, {}), reports(a, 1500, {})  # no error reaches the training: reports stop
    assert reports.queue is None
