"""A job's services, shared by the one-by-one and the batched training and by Ray's workers: its device and
deterministic kernels, the stop signal, its files (examples, weights, log, run.json, final_info), checkpoints, and
reading a trained model back. It imports no script: what it needs of experiment.py comes in as an argument (E)."""

import os
import threading

import numpy as np
import torch

from lab.config import config_from_dict
from lab.files import atomic_write, read_json, write_json, write_jsonl
from lab.schema import CHECKPOINTS, CONFIG, LOG, MODEL, RUN, Job, final_info_file, job_dir

STOP = threading.Event()  # set by SIGTERM while training; the training loop checks it every step


class WorkerError(Exception):
    """A training process failed or died; the message names the job."""


def device_of(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def write_examples(path: str, task, train_idx: torch.Tensor) -> None:
    """The example table: one row per pair, rows aligned with every snapshot. Written with pyarrow itself: importing
    datasets (pandas with it) would cost each job process about a second; datasets.Dataset.from_parquet reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = np.full(len(task.y), "val", dtype=object)
    split[train_idx.numpy()] = "train"
    table = pa.table({
        "pair": np.arange(len(task.y)),
        "a": task.a.numpy(),
        "b": task.b.numpy(),
        "label": task.y.numpy(),
        "split": split.tolist(),
    })
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def save_model(model, path: str) -> None:
    """The model's weights as safetensors (shared tensors handled by safetensors' save_model). A model trained in
    a batch views its slice of the batch's tensors, which safetensors refuses to save as they are: its own copies
    are saved, the same file."""
    from safetensors.torch import save_file, save_model as save

    state = model.state_dict()
    if all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in state.values()):
        atomic_write(path, lambda tmp: save(model, tmp))
    else:
        copies = {name: t.detach().clone().contiguous() for name, t in state.items()}
        atomic_write(path, lambda tmp: save_file(copies, tmp, metadata={"format": "pt"}))


def write_job(cfg, job: Job, run, final_info: dict, train_seconds: float) -> dict:
    """Every output of a finished job beside what plugins wrote: log.jsonl, model.safetensors, run.json, and last
    final_info_{job}.json, whose presence marks the job finished. Returns the job's record."""
    folder = job_dir(cfg.out_dir, job)
    write_jsonl(os.path.join(folder, LOG), run.history)
    save_model(run.model, os.path.join(folder, MODEL))
    record = {"op": job.op, "seed": job.seed, **({"overrides": job.overrides} if job.overrides else {}), **run.seeds,
              "final_info": final_info, "train_seconds": train_seconds, "plugin_seconds": run.timings,
              "device": str(run.device), "threads": torch.get_num_threads(),
              **({"batch": {"index": run.batch[0], "models": run.batch[1]}} if run.batch else {}), "log": run.history}
    write_json(os.path.join(folder, RUN), {k: v for k, v in record.items() if k != "log"})
    write_json(final_info_file(cfg.out_dir, job), final_info)  # written last: marks the job finished
    return record


def save_checkpoint(run, step: int) -> None:
    """The model at `step`, as checkpoints/step_{step:07d}.safetensors in the job's folder (--checkpoint_every)."""
    os.makedirs(os.path.join(run.out_dir, CHECKPOINTS), exist_ok=True)
    save_model(run.model, os.path.join(run.out_dir, CHECKPOINTS, f"step_{step:07d}.safetensors"))


def load_task(E, run_dir: str, op: str):
    """Every pair of op as the run was trained on it (lab.ops.Task; rows in examples.parquet's order): rebuilt
    from the run's config.json, so model(task.x) gives every pair's logits."""
    cfg = config_from_dict(E.Config, read_json(os.path.join(run_dir, CONFIG)))
    return E.task_of(cfg, op)


def load_model(E, run_dir: str, op: str, seed: int, device: str = "cpu", checkpoint: str | None = None,
               job: Job | None = None):
    """The final model of (op, seed) in run_dir, rebuilt offline from the run's config.json and the job's
    model.safetensors (or a file of its checkpoints/), in eval mode. No pickle, no download. Its inputs:
    load_task(E, run_dir, op). `job` names a job with overrides."""
    from safetensors.torch import load_model as load

    job = job or Job(op, seed)
    cfg = config_from_dict(E.Config, read_json(os.path.join(run_dir, CONFIG)))
    cfg = job.config(cfg)
    model = E.build_model(cfg, E.task_of(cfg, op))
    folder = job_dir(run_dir, job)
    load(model, os.path.join(folder, CHECKPOINTS, checkpoint) if checkpoint else os.path.join(folder, MODEL),
         device=device)
    return model.to(device).eval()


def checkpoints(run_dir: str, job: Job) -> list[tuple[int, str]]:
    """(step, file name) of every checkpoint of a job, by step."""
    folder = os.path.join(job_dir(run_dir, job), CHECKPOINTS)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [(int(name[5:-12]), name) for name in names if name.startswith("step_") and name.endswith(".safetensors")]


def label(job: Job) -> str:
    """A job for people: 'x_plus_y seed 0' (and its overrides)."""
    return " ".join([f"{job.op} seed {job.seed}", *(f"{k}={v}" for k, v in job.overrides)])


def line_due(step: int, steps: int) -> bool:
    """Whether Progress prints a job's line at this step (lines mode): every 1000th step and the last."""
    return step % 1000 == 0 or step == steps


def unit_label(unit) -> str:
    first = label(unit.jobs[0])
    return f"a batch of {len(unit)} models ({first}{', ...' if len(unit) > 1 else ''})" if unit.batched else first


def deterministic_on(device: torch.device) -> None:
    """On CUDA, the deterministic kernels: index_select's backward (the shared prefix's gather) otherwise adds with
    atomics, in an order that changes from run to run, and the same config would not give the same numbers.
    cuBLAS needs a fixed workspace for it (set before its first use). An op with no deterministic kernel warns
    rather than stops a run. A CPU's kernels are deterministic already."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """glibc's malloc gives a freed block above its mmap threshold (128 KiB, raised as blocks are freed, to 32 MiB at
    most) back to the system, and trims the heap's free top; a step's buffers (a few MB; an evaluation's or a
    snapshot's over every pair, up to about 40 MB) are then faulted in again, page by page, at the next step: about
    2,000 page faults an update and 2 to 3% of a default run's loop (docs/speed.md). Blocks up to 256 MiB (32 MiB on
    a glibc that refuses more) now come from the heap, and a freed top is kept up to 512 MiB. No number changes; a
    process's memory stays near its peak. Without glibc, nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if not libc.mallopt(M_MMAP_THRESHOLD, 256 << 20):  # setting it also stops the dynamic threshold
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)

