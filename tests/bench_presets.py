"""Step time of every preset (not collected by pytest): python tests/bench_presets.py [--repeats=5] [--threads=1]

For each preset: one training update on its own batch (full batch for nanda2023 and prieto2025), with this
project's model (the shared prefix and the first block's per-vocabulary projections) and with the same weights
computed plainly (shared_prefix=False, the straightforward computation), side by side; median of --repeats rounds
of --inner updates, after a warm-up. Prints the CPU and the ratio. A preset's whole single-seed run, evaluation and
plugins included, is timed by tests/reproduce.py (train_seconds in each run.json).
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiment as E  # noqa: E402
from bench_plot import cpu_description  # noqa: E402
from bench_speed import median_time  # noqa: E402
from lab import cli  # noqa: E402


def step_time(cfg, shared_prefix: bool, repeats: int, inner: int) -> float:
    task = E.task_of(cfg, cfg.ops[0])
    train_idx, _ = E.split_pairs(len(task.y), cfg.train_frac, 0)
    torch.manual_seed(0)
    model = E.build_model(cfg, task)
    model.shared_prefix = shared_prefix
    optimizer = E.OPTIMIZERS[cfg.optimizer](model.parameters(), cfg)
    sample = E.SAMPLERS[cfg.sampler](len(train_idx), cfg, torch.device("cpu"), 0)
    x, y = task.x[train_idx], task.y[train_idx]
    loss_fn = E.LOSSES[cfg.loss]

    def update():
        rows = sample(0)
        loss = loss_fn(model(x[rows]).float(), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_time(update, repeats, inner)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_description()}; torch {torch.__version__}, {args.threads} thread(s); median of {args.repeats} x "
          f"{args.inner} updates")
    print("| preset | batch | plain (ms/update) | ours (ms/update) | speed-up |")
    print("|---|---|---|---|---|")
    for name in E.PRESETS:
        cfg = cli.resolve(E, {"preset": name})
        plain = step_time(cfg, False, args.repeats, args.inner)
        ours = step_time(cfg, True, args.repeats, args.inner)
        batch = "full" if cfg.sampler == "full" else cfg.batch_size or "min(512, n/2)"
        print(f"| {name} | {batch} | {plain * 1e3:.1f} | {ours * 1e3:.1f} | {plain / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
