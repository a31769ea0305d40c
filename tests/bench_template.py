"""Whole-process benchmark against the AI-Scientist grokking template (not collected by pytest).

    python tests/bench_template.py --template=PATH/templates/grokking/experiment.py
        [--ops=x_div_y,x_minus_y] [--seeds=1] [--steps=600] [--repeats=3] [--device=cpu]

Times, alternating and each from launch to exit, the template's own experiment.py (copied to a temporary folder and
patched to train only --ops x --seeds for --steps updates; nothing else in it changes) and this project's
`python experiment.py --ops=... --seeds=... --steps=...` with its default plugins and workers. Prints both medians,
their ratio, the machine, and where this project's time went: the longest job's training loop (from its run.json),
the plugins' share of it, and the rest of the process (imports, starting the workers, building the jobs, writing). The template imports einops: put it on PYTHONPATH if the venv lacks it.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench_plot import cpu_description  # noqa: E402


def patched_template(source: str, ops: list[str], seeds: int, steps: int) -> str:
    """The template's text, training only `ops` x `seeds` for `steps` updates."""
    edits = [
        ("num_total_updates = 7500", f"num_total_updates = {steps}"),
        ('for dataset in ["x_div_y", "x_minus_y", "x_plus_y", "permutation"]:', f"for dataset in {ops!r}:"),
        ("range(num_seeds[dataset])", f"range({seeds})"),
    ]
    for old, new in edits:
        if source.count(old) != 1:
            raise SystemExit(f"bench_template: the template no longer contains {old!r} exactly once")
        source = source.replace(old, new)
    return source


def timed(cmd: list[str], cwd: str, device: str) -> float:
    """Wall seconds of one process, launch to exit; the device is hidden from the template on a CPU run."""
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_template: {' '.join(cmd[:2])} failed:\n{proc.stderr[-2000:]}")
    return wall


def breakdown(out_dir: str, wall: float) -> dict:
    """Where one of our runs spent its wall time: the longest job's training loop, its plugins, and the rest."""
    jobs = []
    for path in glob.glob(os.path.join(out_dir, "*", "run.json")):
        with open(path) as f:
            jobs.append(json.load(f))
    longest = max(jobs, key=lambda job: job["train_seconds"])
    plugins = sum(longest["plugin_seconds"].values())
    return {"loop": longest["train_seconds"], "plugins": plugins, "rest": wall - longest["train_seconds"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--template", required=True, help="the template's experiment.py")
    parser.add_argument("--ops", default="x_div_y,x_minus_y")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    ops = args.ops.split(",")
    with open(args.template) as f:
        template = patched_template(f.read(), ops, args.seeds, args.steps)
    print(f"machine: {cpu_description()}, torch {torch.__version__}; {len(ops) * args.seeds} pairs "
          f"({args.ops} x {args.seeds} seeds) x {args.steps} steps, whole process, medians of {args.repeats}")
    work = tempfile.mkdtemp(prefix="bench_template_")
    try:
        with open(os.path.join(work, "template.py"), "w") as f:
            f.write(template)
        ours = [sys.executable, os.path.join(ROOT, "experiment.py"), f"--ops={args.ops}", f"--seeds={args.seeds}",
                f"--steps={args.steps}", f"--device={args.device}", "--overwrite"]
        times, parts = {"template": [], "ours": []}, []
        for i in range(args.repeats):
            times["template"].append(timed([sys.executable, "template.py", f"--out_dir=t{i}"], work, args.device))
            out_dir = os.path.join(work, f"o{i}")
            times["ours"].append(timed(ours + [f"--out_dir={out_dir}"], work, args.device))
            parts.append(breakdown(out_dir, times["ours"][-1]))
            print(f"  repeat {i}: template {times['template'][-1]:.1f} s, ours {times['ours'][-1]:.1f} s "
                  f"(longest training loop {parts[-1]['loop']:.1f} s, of which plugins {parts[-1]['plugins']:.1f} s; "
                  f"the rest {parts[-1]['rest']:.1f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    template_s, ours_s = statistics.median(times["template"]), statistics.median(times["ours"])
    print(f"template {template_s:.1f} s, ours {ours_s:.1f} s: {template_s / ours_s:.2f}x")
    print("ours, medians: " + ", ".join(f"{k} {statistics.median(p[k] for p in parts):.1f} s" for k in parts[0]))


if __name__ == "__main__":
    main()
