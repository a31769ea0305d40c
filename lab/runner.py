"""Running an experiment: the out_dir lock, resume, the worker pool and signals, and final_info.json.
`E` below is the experiment module (experiment.py): its Config, registries and train_one."""

import gc
import importlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from multiprocessing import get_context, resource_tracker
from multiprocessing.connection import wait as wait_for_connections

import numpy as np
import torch

from lab import batched, sweep
from lab.cli import parse_args
from lab.config import RUNTIME_FIELDS, check_contract, config_dict
from lab.files import atomic_write, read_json, remove_partials, write_json
from lab.job import STOP, WorkerError, device_of, label, line_due, unit_label
from lab.plugins import PluginError, UsageError
from lab.schema import CONFIG, FINAL_INFO, LOG, SWEEP, Job, cell_name, final_info_file, job_dir
from lab.stats import mean_stderr






def resolved_workers(cfg, n_jobs: int) -> tuple[int, int]:
    """(processes, torch threads per process) for n_jobs independent jobs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Small models use a core badly from several threads: one single-threaded process per
    # core trains about 1.3x more steps per second than one process on all cores. The thread
    # count also changes float rounding, so it is fixed (1) unless set: then the numbers do not
    # depend on --workers or on the machine's core count.
    threads = cfg.threads or 1
    workers = cfg.workers or (1 if device_of(cfg).type == "cuda" else max(1, cores // threads))
    return max(1, min(workers, n_jobs)), threads




# ----------------------------------------------------------------------------- a job's files
















# ----------------------------------------------------------------------------- out_dir, resume
def jobs_of(cfg) -> list:
    """Every job of a run, in order: each op's seeds 0 .. seeds-1 (of each sweep cell, cell by cell)."""
    return [Job(op, seed, cell) for cell in sweep.cells(cfg) for op in cfg.ops for seed in range(cfg.seeds)]


def prepare_out_dir(cfg, E) -> list:
    """Check a saved config, clean up a killed run, and return the jobs still to train. A field missing from a
    saved config (a run made before that field existed) counts as its default. A sweep's own config.json may
    list other cells (a sweep grown or cut: finished cells are kept); each cell is then prepared as a run."""
    saved_path = os.path.join(cfg.out_dir, CONFIG)
    ignored = RUNTIME_FIELDS + (("sweep",) if cfg.sweep else ())
    if os.path.exists(saved_path):
        saved = read_json(saved_path)
        now, defaults = config_dict(cfg), config_dict(E.Config())
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in ignored and saved.get(k, defaults.get(k)) != now.get(k))
        if changed and not cfg.overwrite:
            raise UsageError(f"{cfg.out_dir} holds results of another config (differs in {', '.join(changed)}); "
                             "pass --overwrite to discard them or choose another --out_dir")
        if changed:
            for name in os.listdir(cfg.out_dir):
                path = os.path.join(cfg.out_dir, name)
                if name.startswith("final_info") or name.startswith("all_results") or name in (CONFIG, SWEEP):
                    os.remove(path)
                elif os.path.isdir(path) and (any(name.startswith(f"{op}_") for op in E.OPS)
                                              or "=" in name and os.path.exists(os.path.join(path, CONFIG))):
                    shutil.rmtree(path)  # an (op, seed) folder or a sweep cell
    os.makedirs(cfg.out_dir, exist_ok=True)
    remove_partials(cfg.out_dir)
    write_json(saved_path, config_dict(cfg))
    if cfg.sweep:
        sweep.write_sweep_json(cfg, os.path.join(cfg.out_dir, SWEEP))
        for cell in sweep.cells(cfg):
            prepare_out_dir(sweep.cell_config(cfg, cell), E)
    return [job for job in jobs_of(cfg) if not os.path.exists(final_info_file(cfg.out_dir, job))]






class Progress:
    """A tqdm bar on a terminal; otherwise a plain line per job and about every 1000 steps."""

    def __init__(self, cfg, total_steps: int):
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.cfg = mode, cfg
        self.bar, self.done = None, {}
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def __call__(self, job, step, metrics):
        if self.bar is not None:
            done = self.done.get(job, 0)
            self.bar.update(step - done)
            self.done[job] = step
            self.bar.set_postfix_str(f"{label(job)} val_acc {metrics['val_acc']:.3f}", refresh=False)
        elif self.mode == "lines" and line_due(step, steps := job.config(self.cfg).steps):
            self.line(f"{label(job)}: step {step}/{steps} train_acc {metrics['train_acc']:.3f} "
                      f"val_acc {metrics['val_acc']:.3f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- workers and signals


def _stop_at_next_step(signum, frame):
    """SIGTERM while training: raising here could land in any finalizer (an 'Exception ignored' traceback), so
    only ask the training loop to stop; a process already past its loop finishes its pair first."""
    STOP.set()


def _exit_quietly(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # once is enough: a second signal would interrupt the clean-up
    raise SystemExit(128 + signum)












def _train_in_worker(train_one, cfg, unit, threads: int, conn) -> None:
    """train_unit in a child process: progress, then each record or the error, go back through `conn`.

    The child ignores Ctrl-C: the parent stops it with SIGTERM, on which the training loop unwinds at its
    next step, so one line is printed, not a traceback per process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_at_next_step)  # the parent's stop; the training loop unwinds, cleaning up
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the start (_signals_held)
    for handle in _LOCKS:  # a forked child's copy of the out_dir lock: the parent alone holds it (it lives on in
        handle.close()  # the parent's descriptor), so a killed parent frees the folder at once
    try:  # Linux: if the parent dies (kill -9), get SIGTERM rather than train on as an orphan
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    # tqdm (bars off or on, in whatever a job imports: transformers for gpt2) makes a multiprocessing lock, a named
    # semaphore that a child killed before its exit-time clean-up leaks, and the resource tracker then warns on
    # stderr. A child draws no bar, so a thread lock does.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    try:
        for record in batched.train_unit(train_one, cfg, unit, report=lambda *args: conn.send(("progress", args))):
            conn.send(("done", {k: v for k, v in record.items() if k != "log"}))
    except PluginError as e:
        conn.send(("plugin_error", str(e)))
    except Exception as e:
        import traceback

        conn.send(("error", f"{unit_label(unit)} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


HELD = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and a harness's stop


@contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM held back while a child process starts, in the child and in this process.

    The child inherits both blocked: a Ctrl-C while it still starts up (importing torch, before _train_in_worker
    runs) would print its own traceback, and a SIGTERM would run whatever handler it inherited (a forked child:
    this process's, which raised SystemExit wherever the child was, in threading's after-fork hook say: "Exception
    ignored", and the child trained on). _train_in_worker unblocks SIGTERM once its own handler is in place.
    Here, blocking is not enough: a signal sent to the process may be handed to another thread (OpenMP's,
    pyarrow's), and Python then runs its handler in the main thread at its next check, which could fall inside
    start() after the fork: that child went untracked, unstopped, and printed after the run's last line. So a
    signal here is only noted, and raised again once the child is tracked.
    """
    held = []
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there alone
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in HELD} if in_main_thread else {}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in previous.items():  # None: a handler not set from Python
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    for signum in dict.fromkeys(held):
        signal.raise_signal(signum)


def _reap(child, timeout: float = 60) -> None:
    """Wait for a child to exit; one that is past its training loop no longer acts on SIGTERM, so kill it
    if its clean-up hangs."""
    child.join(timeout=timeout)
    if child.is_alive():
        child.kill()
        child.join()


def _finished(progress, record) -> None:
    progress.line(f"{label(Job(record['op'], record['seed'], tuple(record.get('overrides', ()))))}: done in "
                  f"{record['train_seconds']:.0f}s, "
                  f"final val_acc {record['final_info']['final_val_acc']:.3f}")


def start_method(cfg, threads: int) -> str:
    """How worker processes start. fork on a Linux CPU with one thread per worker (the default there): a child
    starts with the parent's imports (torch: about 2 s a process) and exits without the interpreter's tear-down.
    Otherwise spawn: CUDA cannot be used in a forked child, and an OpenMP thread pool that the parent may have
    started is not safe across a fork when the child runs several threads (one thread never enters it, which is
    also why torch's DataLoader workers run one)."""
    return "fork" if sys.platform == "linux" and threads == 1 and device_of(cfg).type == "cpu" else "spawn"


def preload() -> None:
    """What a job process imports on first use (torch.optim imports torch._dynamo, write_examples pyarrow), imported
    in the parent once, so that forked workers after the first wave have them: 1.5 to 3 s a job on a 2-core CPU."""
    for name in ("pyarrow.parquet", "torch._dynamo"):
        importlib.import_module(name)


def train_jobs(train_one, cfg, todo: list, workers: int, threads: int, progress) -> None:
    """Train the units in todo (tuples of jobs: batched.plan), in this process or in up to `workers` child
    processes."""
    if workers == 1:
        torch.set_num_threads(threads)
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stop_at_next_step) if in_main_thread else None
        try:  # SIGTERM stops the training loop at its next step, as in a child
            for unit in todo:
                progress.line(f"{unit_label(unit)}: start")
                for record in batched.train_unit(train_one, cfg, unit, report=progress):
                    _finished(progress, record)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
        return
    ctx = get_context(start_method(cfg, threads))
    if ctx.get_start_method() == "fork" and len(todo) > workers:  # a process per unit (a job, or a batch)
        preload()  # imported once here, each later unit's process starts with them
    # Started now, not inside the first child.start() below: starting it unblocks SIGINT, which the children
    # must inherit blocked.
    resource_tracker.ensure_running()
    waiting, running, unfinished = list(todo), {}, sum(map(len, todo))  # running: pipe -> child process
    reported = set()  # pipes whose child has sent its results
    try:
        while unfinished or running:  # a child that has reported still has to exit: wait, never kill it then
            while waiting and len(running) < workers:
                unit = waiting.pop(0)
                receiver, sender = ctx.Pipe(duplex=False)  # a pipe per child: no locks for Ctrl-C to break
                child = ctx.Process(target=_train_in_worker, args=(train_one, cfg, unit, threads, sender),
                                    daemon=True)
                with _signals_held():  # until the child is tracked: the clean-up below must stop it too
                    child.start()
                    running[receiver] = child
                    child.name = unit_label(unit)
                sender.close()
            for receiver in wait_for_connections(list(running), timeout=1.0):
                try:
                    kind, payload = receiver.recv()
                except EOFError:  # the child is exiting
                    child = running.pop(receiver)
                    if receiver in reported:  # its results are written: let it clean up, but not hang the run
                        _reap(child)
                        continue
                    child.join()
                    raise WorkerError(f"the process training {child.name} ended without reporting its results "
                                      f"(exit code {child.exitcode})")
                if kind == "progress":
                    progress(*payload)
                elif kind == "done":
                    _finished(progress, payload)
                    reported.add(receiver)
                    unfinished -= 1
                elif kind == "plugin_error":
                    raise PluginError(payload)
                else:
                    raise WorkerError(payload)
    finally:
        for child in running.values():  # Ctrl-C or an error: stop the jobs in flight (they restart on resume)
            child.terminate()  # stops at its next step; a child past its loop finishes and exits
        for child in running.values():
            _reap(child)


_LOCKS = []  # the out_dir locks this process holds (lock_out_dir), closed in forked children


def lock_out_dir(out_dir: str):
    """One writer per out_dir: an exclusive flock on out_dir/.lock, held by the returned open file. The kernel
    releases it when the process ends, kill -9 included, so a dead run never leaves the folder locked."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    handle = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(f"{out_dir} is being written by another experiment.py (pid {holder}); wait for it to "
                         "finish or choose another --out_dir")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def main(E, cfg) -> dict:
    """Train every unfinished job of cfg with E.train_one, then write final_info.json (and the template's
    all_results files)."""
    check_contract(E)
    cluster = None
    if cfg.ray_address:  # before any file is written: an unreachable cluster is bad input
        from lab import raycluster

        resources = raycluster.connect(cfg.ray_address)
        # (resources, the config tasks train with, tasks at a time); --device=cuda without GPUs is refused here
        cluster = (resources, *raycluster.placement(cfg, resources, cfg.threads or 1))
    lock = lock_out_dir(cfg.out_dir)
    _LOCKS.append(lock)
    try:
        return _main_locked(E, cfg, cluster)
    finally:
        _LOCKS.remove(lock)
        lock.close()


def _main_locked(E, cfg, cluster=None) -> dict:
    """cluster: (its resources, the config tasks train with, tasks at a time) on a Ray cluster."""
    todo = prepare_out_dir(cfg, E)
    every = jobs_of(cfg)
    workers, threads = resolved_workers(cfg, max(1, len(every)))
    run_cfg = cfg  # what trains: on a Ray cluster, with the cluster's device
    if cluster:
        from lab import raycluster

        resources, run_cfg, workers = cluster
    progress = Progress(cfg, sum(job.config(cfg).steps for job in todo))
    for job in every:
        if job not in todo:
            progress.line(f"{label(job)}: already finished in {cfg.out_dir}, skipped")
    start = time.perf_counter()
    try:
        # Batches are planned over every job, then keep their unfinished jobs (on CUDA, their finished ones too, as
        # ghosts): a resumed job trains in the batch it was planned in.
        units = batched.resume_units(batched.plan(E, run_cfg, every, workers, progress.line), todo,
                                     device_of(run_cfg).type)
        workers = min(workers, max(1, len(units)))
        batches = [unit for unit in units if unit.batched]
        for unit in units:
            if unit.ghosts:
                progress.line(f"{unit_label(unit)}: its {len(unit.ghosts)} finished job(s) train again, written "
                              "nowhere, so that the others train in the batch they were planned in (on CUDA the "
                              "number of models in a batch moves the last bits)")
        where = raycluster.describe(run_cfg, resources, workers) if cluster else (
            f"{device_of(cfg)} with {workers} worker(s) x {threads} thread(s)")
        progress.line(f"training {len(todo)} (op, seed) pairs "
                      f"({sum(len(u) - len(u.ghosts) for u in batches)} of them in {len(batches)} "
                      f"batches of models) on {where} into {cfg.out_dir}")
        if cluster:
            raycluster.train_on_ray(E.train_one, run_cfg, units, threads, progress, _finished)
        else:
            train_jobs(E.train_one, cfg, units, workers, threads, progress)
    finally:
        progress.close()

    if not cfg.sweep:
        results = write_results(cfg)
    else:  # the template's schema over the whole sweep: one entry per (op, cell), for harnesses that read it
        results = {}
        for cell in sweep.cells(cfg):
            for op, block in write_results(sweep.cell_config(cfg, cell)).items():
                results[f"{op}__{cell_name(cell)}"] = block
        write_json(os.path.join(cfg.out_dir, FINAL_INFO), results)
    progress.line(f"finished in {time.perf_counter() - start:.0f}s: {os.path.join(cfg.out_dir, FINAL_INFO)}")
    return results


def write_results(cfg) -> dict:
    """A finished run folder's final_info.json (per op: means, stderrs, per-seed lists) and the template's
    all_results files. Returns final_info.json's content."""
    results, all_results = {}, {}
    for op in cfg.ops:
        infos = []
        for seed in range(cfg.seeds):
            job = Job(op, seed)
            info = read_json(final_info_file(cfg.out_dir, job))
            with open(os.path.join(job_dir(cfg.out_dir, job), LOG)) as f:
                log = [json.loads(line) for line in f]
            infos.append(info)
            all_results[f"{op}_{seed}_final_info"] = info
            all_results[f"{op}_{seed}_train_info"] = [
                {"step": r["step"], "train_loss": r["train_loss"], "train_accuracy": r["train_acc"]} for r in log]
            all_results[f"{op}_{seed}_val_info"] = [
                {"step": r["step"], "val_loss": r["val_loss"], "val_accuracy": r["val_acc"]} for r in log]
        results[op] = summarize(infos)
    write_json(os.path.join(cfg.out_dir, "all_results.json"), all_results)
    # The template's pickle, for its old plotting scripts; this project never reads it.
    def write_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.array(all_results, dtype=object), allow_pickle=True)

    atomic_write(os.path.join(cfg.out_dir, "all_results.npy"), write_npy)
    write_json(os.path.join(cfg.out_dir, FINAL_INFO), results)
    return results


def cli(E, argv=None) -> None:
    """`python experiment.py [flags]`: parse and validate the flags, run, and turn every failure into one line
    on stderr and an exit code (2 bad input, 1 a plugin or worker failed, 130 Ctrl-C, 143 SIGTERM)."""
    config = parse_args(E, argv)
    # torch's modules live until exit: out of the collector's sight, its full collections (here and in the forked
    # workers) and the interpreter's exit stop walking them (exit 0.17 s, not 0.53, on a 2-core AMD EPYC)
    gc.freeze()
    signal.signal(signal.SIGTERM, _exit_quietly)  # a harness's timeout: stop the children, keep finished pairs
    try:
        main(E, config)
    except UsageError as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except (PluginError, WorkerError) as e:
        print(f"experiment.py: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print(f"experiment.py: interrupted; finished (op, seed) pairs are kept in {config.out_dir}, "
              "run the same command again to resume", file=sys.stderr)
        raise SystemExit(130)
    except SystemExit as e:
        if e.code == 128 + signal.SIGTERM:
            print(f"experiment.py: terminated; finished (op, seed) pairs are kept in {config.out_dir}, "
                  "run the same command again to resume", file=sys.stderr)
        raise


# ----------------------------------------------------------------------------- final_info.json
TEMPLATE_KEYS = ("final_train_loss", "final_val_loss", "final_train_acc", "final_val_acc", "step_val_acc_99")


def _number(value):
    """value as a float when it is a finite number (bools count as 0/1), else None."""
    if isinstance(value, (bool, int, float)) and not isinstance(value, complex) and math.isfinite(float(value)):
        return float(value)
    return None


def summarize(final_infos: list) -> dict:
    """The template's per-op block: means, stderrs (ddof=1 std / sqrt(n)) and per-seed lists.

    Keys that plugins add to final_info are averaged too, over the seeds where they are a finite number: a None
    or NaN in some seeds gives the mean of the others and `{key}_n`, the count, in means; a key that is never a
    number (a string, a list) is only kept per seed.
    """
    extra = [k for k in dict.fromkeys(k for info in final_infos for k in info) if k not in TEMPLATE_KEYS
             and k != "grokked"]
    per_seed = {k: [None if isinstance(v, float) and not math.isfinite(v) else v  # JSON has no NaN
                    for v in (info.get(k) for info in final_infos)] for k in (*TEMPLATE_KEYS, *extra)}
    means, stderrs = {}, {}
    for key, values in per_seed.items():
        numbers = [v for v in map(_number, values) if v is not None]
        if key in extra and not numbers and any(v is not None for v in values):
            continue  # not numeric: per seed only
        n = len(numbers)
        mean, err = mean_stderr(np.array(numbers, dtype=float)) if n else (None, None)
        means[f"{key}_mean"] = None if mean is None else float(mean)
        stderrs[f"{key}_stderr"] = None if err is None else float(err)
        if key in extra:
            means[f"{key}_n"] = n
    per_seed["grokked"] = [bool(info.get("grokked")) for info in final_infos]
    return {"means": means, "stderrs": stderrs, "final_info_dict": per_seed}
