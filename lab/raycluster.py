"""Training on a Ray cluster (--ray_address=HOST:PORT): each unit of work (a job, or a batch of jobs) is a Ray task
that writes its own folders under out_dir, which must lie on a filesystem every node shares. The driver
(experiment.py) keeps what it does locally: the lock, resume (a finished job is never sent), final_info.json.

A task imports experiment.py from its path, so every node must see the project at the same path too (a shared
home or a network filesystem). A worker that dies is retried once (a line says so when the retry's reports
start); a second death, or an error, stops the run with one line, finished jobs kept. Ctrl-C cancels the tasks
in flight. Progress reports come back through a queue actor, so the driver's bar and lines move as they do with
a local pool.
"""

import dataclasses
import os
import socket
import sys
import time

import torch

from lab.plugins import PluginError
from lab.config import load_script
from lab.job import WorkerError, label, line_due, unit_label


class _Reports:
    """A task's training report: sends (job, step, metrics) to the driver's queue in one call at most every every_s
    seconds (each job's latest report: the driver's bar), at once for the steps of its lines (lab.job.line_due),
    and what is left at flush(). Progress is not worth a job: once the queue is gone (the driver stopping),
    reports stop."""

    def __init__(self, queue, cfg, every_s: float = 1.0):
        self.queue, self.cfg, self.every_s = queue, cfg, every_s
        self.sent, self.latest = 0.0, {}

    def __call__(self, job, step, metrics):
        self.latest.pop(job, None)  # re-inserted last: a batch keeps the order of the reports
        self.latest[job] = (job, step, metrics)
        if line_due(step, job.config(self.cfg).steps) or time.monotonic() - self.sent >= self.every_s:
            self.flush()

    def flush(self):
        import ray

        if self.queue is not None and self.latest:
            try:
                self.queue.put_nowait_batch(list(self.latest.values()))
            except ray.exceptions.RayError:
                self.queue = None
        self.latest.clear()
        self.sent = time.monotonic()


def _train_unit_task(path: str, config: dict, jobs: tuple, batched: bool, threads: int, ghosts: tuple = (),
                     queue=None):
    """A Ray task: train one unit, its progress reports sent to queue; ("done", records) or (kind, message) of a
    failure."""
    from lab.batched import Unit, train_unit
    from lab.config import config_from_dict

    E = load_script(path, "experiment")  # once per worker process, as `experiment` for plugin files
    torch.set_num_threads(threads)
    try:
        cfg = config_from_dict(E.Config, config)
        reports = _Reports(queue, cfg)
        records = train_unit(E.train_one, cfg, Unit(jobs, batched, ghosts), report=reports)
        reports.flush()  # a job that stopped early (stop_at_val_acc) may have left its last report
    except PluginError as e:
        return "plugin_error", str(e)
    except Exception as e:
        import traceback

        return "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    return "done", [{k: v for k, v in record.items() if k != "log"} for record in records]


def connect(address: str) -> dict:
    """Join the cluster at address; its resources ({"CPU": n, "GPU": m, ...})."""
    import ray

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from lab.plugins import UsageError

    if not ray.is_initialized():
        host, _, port = address.rpartition(":")
        try:  # ray.init waits a long time for an address where nothing listens: ask first
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise UsageError(f"--ray_address={address}: no Ray cluster answers there ({e}); give HOST:PORT of a "
                             "head started with `ray start --head`")
        if not (sys.stdout.isatty() and sys.stderr.isatty()):  # a log file or a harness: no colour codes in it
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # (read by the driver as it prints its workers' lines)
        try:
            ray.init(address=address, logging_level="WARNING", runtime_env={"env_vars": {"PYTHONPATH": root}})
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"--ray_address={address}: no Ray cluster answers there ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); start one with `ray start --head`")
    return dict(ray.cluster_resources())


def placement(cfg, resources: dict, threads: int) -> tuple:
    """(cfg, concurrent tasks) on a cluster of these resources. --device=auto means the cluster's GPUs where it has
    any (the driver's own device says nothing of the nodes'), one task per GPU; otherwise one per `threads` CPUs."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device="cuda" if gpus else "cpu")
    if cfg.device == "cuda":
        if not gpus:
            from lab.plugins import UsageError

            raise UsageError(f"--device=cuda but the Ray cluster at {cfg.ray_address} has no GPU")
        return cfg, gpus
    return cfg, max(1, cpus // threads)


def describe(cfg, resources: dict, tasks: int) -> str:
    gpus = f", {int(resources['GPU'])} GPUs" if resources.get("GPU") else ""
    return f"the Ray cluster at {cfg.ray_address} ({int(resources.get('CPU', 0))} CPUs{gpus}; {tasks} task(s) at " \
        f"a time on {cfg.device})"


def train_on_ray(train_one, cfg, units: list, threads: int, progress, finished) -> None:
    """Train units as Ray tasks, their progress reports coming back through a queue (an actor on the cluster) as
    a local pool's do. Raises PluginError or WorkerError (one line)."""
    import ray
    from ray.util.queue import Queue

    path = os.path.abspath(sys.modules[train_one.__module__].__file__)
    shared = dataclasses.replace(cfg, out_dir=os.path.abspath(cfg.out_dir), plugins=tuple(
        os.path.abspath(p) if p.endswith(".py") else p for p in cfg.plugins))
    from lab.config import config_dict

    config = config_dict(shared)
    task = ray.remote(_train_unit_task).options(num_cpus=threads, num_gpus=1 if cfg.device == "cuda" else 0,
                                                max_retries=1)
    reports = Queue(actor_options={"num_cpus": 0})

    latest = {}  # job -> its latest reported step; a task retried after its worker died reports from the start

    def relay():
        for job, step, metrics in reports.get_nowait_batch(reports.qsize()):
            if step <= latest.get(job, 0):
                progress.line(f"{label(job)}: its Ray worker died; the retry trains it again from the start")
            latest[job] = step
            progress(job, step, metrics)

    pending = {task.remote(path, config, unit.jobs, unit.batched, threads, unit.ghosts, reports): unit
               for unit in units}
    for unit in units:
        progress.line(f"{unit_label(unit)}: sent to the Ray cluster")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            relay()  # a task puts its last report before it returns: it comes before the task's "done"
            if not ready:
                continue
            unit = pending.pop(ready[0])
            try:
                kind, payload = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise WorkerError(f"the Ray task training {unit_label(unit)} failed (a dead worker is retried once): "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if kind == "plugin_error":
                raise PluginError(payload)
            if kind == "error":
                raise WorkerError(f"{unit_label(unit)} failed on the Ray cluster: {payload}")
            for record in payload:
                finished(progress, record)
    finally:
        for ref in pending:  # Ctrl-C or a failure: cancel what is still running (it restarts on resume)
            ray.cancel(ref, force=True)
        reports.shutdown()
