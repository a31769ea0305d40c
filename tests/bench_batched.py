"""Batched-training benchmark (not collected by pytest): python tests/bench_batched.py [--quick] [--skip_runs]

Prints, for this machine (CPU model and flags first):
  1. update throughput, models x updates per second, of K models trained as one batch (lab/batched.py) and one
     by one (train_one's update: the model, fused AdamW), one thread, median of several timings, for the small
     config (p=31, d_model=64) and the default config (p=97, d_model=128);
  2. whole experiment.py runs, side by side: --batched=off (the worker pool, one process per core) against
     --batched=on, for the small config (2 ops x 6 seeds x 1500 steps) and the default config (2 ops x 3 seeds
     x 600 steps), wall time of the whole process with the default plugins;
  3. with CUDA: the same update throughput on the GPU for K = 1, 2, 4, ... default-size models, until it stops
     growing (the number of models one GPU trains at once).
--quick: fewer repeats and a tenth of the steps in 2. --skip_runs: only 1 and 3. --gpu_only: only 3.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiment as E  # noqa: E402
from bench_plot import cpu_description  # noqa: E402
from lab import batched  # noqa: E402
from lab.schema import Job  # noqa: E402

SMALL = ["--p=31", "--d_model=64", "--train_frac=0.7", "--weight_decay=1"]
CONFIGS = {"small": dict(p=31, d_model=64, train_frac=0.7, weight_decay=1.0), "default": {}}


def throughput(cfg, k: int, device: str, repeats: int) -> tuple[float, float]:
    """(batched, one by one) models x updates per second of k models of cfg."""
    cfg = E.Config(**{**cfg, "device": device})
    jobs = jobs_of(k)
    times = [batched.time_batch(E, cfg, jobs, repeats=repeats) for _ in range(3)]
    t_batched = statistics.median(t["seconds_batched"] for t in times)
    t_single = statistics.median(t["seconds_one_by_one"] for t in times)
    return k / t_batched, k / t_single


def jobs_of(k: int) -> tuple:
    return tuple(Job("x_plus_y", seed) for seed in range(k))


def whole_run(args: list, mode: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "experiment.py"), f"--out_dir={tmp}/run", *args,
                        f"--batched={mode}", "--progress=none"], check=True)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip_runs", action="store_true")
    parser.add_argument("--gpu_only", action="store_true")
    opts = parser.parse_args()
    if opts.gpu_only and not torch.cuda.is_available():
        raise SystemExit("bench_batched: --gpu_only but no CUDA device is available")
    repeats = 3 if opts.quick else 5
    torch.set_num_threads(1)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, 1 thread per process")
    if not opts.gpu_only:
        print("\n1. update throughput, models x updates / s (median), K models batched vs one by one, CPU")
        for name, cfg in CONFIGS.items():
            for k in (2, 6, 12):
                fast, slow = throughput(cfg, k, "cpu", repeats)
                print(f"  {name:8s} K={k:3d}: batched {fast:7.1f}  one by one {slow:7.1f}  ratio {fast / slow:5.2f}")
    if not (opts.skip_runs or opts.gpu_only):
        scale = 10 if opts.quick else 1
        runs = {"small": ["--ops=x_plus_y,x_minus_y", "--seeds=6", *SMALL, f"--steps={1500 // scale}"],
                "default": ["--ops=x_plus_y,x_minus_y", "--seeds=3", f"--steps={600 // scale}"]}
        print("\n2. whole experiment.py runs, wall seconds (one run each), pool (--batched=off) vs --batched=on")
        for name, args in runs.items():
            pool, together = whole_run(args, "off"), whole_run(args, "on")
            print(f"  {name:8s} {' '.join(args)}: pool {pool:6.1f} s  batched {together:6.1f} s  "
                  f"ratio {pool / together:5.2f}")
    if torch.cuda.is_available():
        gpu_scaling(repeats)


def gpu_scaling(repeats: int):
    """Section 3: default-size models x updates / s on the GPU for K = 1, 2, 4, ... trained as one batch, until
    throughput stops growing (under 1.1x the best so far) or the GPU's memory runs out; one by one at K = 2."""
    one = throughput({}, 2, "cuda", repeats)[1]
    print(f"\n3. GPU {torch.cuda.get_device_name()}: default-size models x updates / s (median)")
    print(f"  one by one (train_one's update): {one:8.1f}")
    best, k = 0.0, 2
    while True:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            fast = statistics.median(k / batched.time_batch(E, E.Config(device="cuda"), jobs_of(k), repeats=repeats,
                                                            one_by_one=False)["seconds_batched"] for _ in range(3))
        except torch.cuda.OutOfMemoryError:
            print(f"  K={k:5d}: out of GPU memory")
            break
        memory = torch.cuda.max_memory_allocated() / 2**30
        print(f"  K={k:5d}: batched {fast:9.1f} = {fast / one:6.1f}x one by one; peak GPU memory {memory:5.1f} GiB",
              flush=True)
        if fast < 1.1 * best:
            print(f"  throughput stops growing at about K={k // 2}")
            break
        best, k = max(best, fast), 2 * k

if __name__ == "__main__":
    main()
