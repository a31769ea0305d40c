"""Training on a Ray cluster (--ray_address=HOST:PORT): each unit of work (a job, or a batch of jobs) is a Ray task
that writes its own folders under out_dir, which must lie on a filesystem every node shares. The driver
(experiment.py) keeps what it does locally: the lock, resume (a finished job is never sent), final_info.json.

A task imports experiment.py from its path, so every node must see the project at the same path too (a shared
home or a network filesystem). A worker that dies is retried once; a second death, or an error, stops the run
with one line, finished jobs kept. Ctrl-C cancels the tasks in flight.
"""

import dataclasses
import importlib.util
import os
import socket
import sys

import torch

from lab.plugins import PluginError


def _experiment(path: str):
    """The experiment module at path, imported once per worker process (as `experiment`, for plugin files)."""
    module = sys.modules.get("experiment")
    if module is None or os.path.abspath(getattr(module, "__file__", "")) != path:
        spec = importlib.util.spec_from_file_location("experiment", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["experiment"] = module
        spec.loader.exec_module(module)
    return module


def _train_unit_task(path: str, config: dict, jobs: tuple, batched: bool, threads: int, ghosts: tuple = ()):
    """A Ray task: train one unit; ("done", records) or (kind, message) of a failure."""
    from lab.batched import Unit
    from lab.cli import config_from_dict
    from lab.runner import train_unit

    E = _experiment(path)
    torch.set_num_threads(threads)
    try:
        records = train_unit(E.train_one, config_from_dict(E.Config, config), Unit(jobs, batched, ghosts),
                             report=None)
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


def train_on_ray(train_one, cfg, units: list, threads: int, progress, finished, unit_label, WorkerError) -> None:
    """Train units as Ray tasks; progress lines as each finishes. Raises PluginError or WorkerError (one line)."""
    import ray

    path = os.path.abspath(sys.modules[train_one.__module__].__file__)
    shared = dataclasses.replace(cfg, out_dir=os.path.abspath(cfg.out_dir), plugins=tuple(
        os.path.abspath(p) if p.endswith(".py") else p for p in cfg.plugins))
    from lab.cli import config_dict

    config = config_dict(shared)
    task = ray.remote(_train_unit_task).options(num_cpus=threads, num_gpus=1 if cfg.device == "cuda" else 0,
                                                max_retries=1)
    pending = {task.remote(path, config, unit.jobs, unit.batched, threads, unit.ghosts): unit for unit in units}
    for unit in units:
        progress.line(f"{unit_label(unit)}: sent to the Ray cluster")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
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
