"""Cost of the capture and measures plugins (not collected by pytest):

    python tests/bench_measure.py [--steps=1000] [--repeats=3] [--op=x_plus_y]

Trains the same (op, seed) with the default config for --steps updates, in this process on one thread, with
the default plugins (capture + measures) and without any, alternating, --repeats times each. Below the
default grokking steps every measurement is a dense one (every measure_every updates), so this is the
worst case of the schedule. Prints the CPU, each run's wall time, the medians and their ratio, and the
seconds each plugin reports in run.json.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiment as E  # noqa: E402
from lab.schema import Job  # noqa: E402
from bench_plot import cpu_description  # noqa: E402


def one_run(cfg: E.Config, op: str) -> tuple[float, dict]:
    start = time.perf_counter()
    record = E.train_one(cfg, Job(op, 0))
    return time.perf_counter() - start, record["plugin_seconds"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--op", default="x_plus_y")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {cpu_description()}, torch {torch.__version__}; 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        base = E.Config(out_dir=tmp, ops=(args.op,), steps=args.steps, progress="none")
        configs = {"without plugins": dataclasses.replace(base, capture=False, measure=False), "with capture + measures": base}
        times = {name: [] for name in configs}
        plugin_seconds = []
        for repeat in range(args.repeats):
            for name, cfg in configs.items():
                seconds, plugins = one_run(cfg, args.op)
                times[name].append(seconds)
                if plugins:
                    plugin_seconds.append(plugins)
                print(f"  repeat {repeat}: {name}: {seconds:.1f} s {json.dumps(plugins) if plugins else ''}", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name}: median {m:.1f} s over {args.repeats} runs of {args.steps} steps ({args.op})")
    print(f"ratio with / without: {medians['with capture + measures'] / medians['without plugins']:.3f}")
    for plugin in plugin_seconds[0]:
        share = statistics.median(p[plugin] for p in plugin_seconds) / medians["without plugins"]
        print(f"{plugin}: {share:.1%} of the run without plugins (its own timer, median)")


if __name__ == "__main__":
    main()
