"""Cost of the label-free measures and of the frozen early-warning rules (not collected by pytest):

    python tests/bench_labelfree.py [--steps=2000] [--repeats=3]

Trains one pair of the benchmark sweep's small config (x_plus_y, p 31, d_model 64, lr 2e-3, train fraction 0.35,
weight decay 0.5: it memorises early and is measured densely from then on, the schedule's worst case) in this
process on one thread, alternating four arms --repeats times each: no plugins; the measures plugin without the
label-free measures (spectral_entropy, effective_rank, distance_ratio, weight_alpha, loss_lowfreq patched out);
the measures plugin as shipped; and that plus the earlywarning plugin applying a rules file with a rule for every
predictor the job measures. Prints the CPU, each run's wall time, the medians and their ratios, the seconds the
label-free measures took by their own timer, and the seconds plot.py's default apply (lab.rules.apply) takes on
the finished job.
"""

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experiment as E  # noqa: E402
from lab import measures as M  # noqa: E402
from lab import rules as R  # noqa: E402
from lab.earlywarning import keys_of, warn_run  # noqa: E402
from lab.analysis import load_run  # noqa: E402
from lab.config import config_dict  # noqa: E402
from lab.files import write_json  # noqa: E402
from lab.schema import CONFIG, Job, is_predictor, reads  # noqa: E402
from bench_plot import cpu_description  # noqa: E402

LABEL_FREE = ("spectrum_metrics", "distance_ratio", "weight_alpha", "lowfreq_power")
ABSENT = {"spectrum_metrics": lambda x: {}, "distance_ratio": lambda x, y: math.nan,
          "weight_alpha": lambda model: math.nan, "lowfreq_power": lambda losses: math.nan}


class Timed:
    """lab.measures' label-free functions wrapped with a timer (or replaced by ABSENT's) while the block runs."""

    def __init__(self, absent=False):
        self.absent, self.seconds, self.saved = absent, 0.0, {}

    def __enter__(self):
        for name in LABEL_FREE:
            self.saved[name] = getattr(M, name)
            setattr(M, name, ABSENT[name] if self.absent else self.timed(self.saved[name]))
        return self

    def timed(self, fn):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(M, name, fn)


def train(cfg) -> None:
    """One job, with the run folder's config.json that plot.py reads."""
    E.train_one(cfg, Job("x_plus_y", 0))
    write_json(os.path.join(cfg.out_dir, CONFIG), config_dict(cfg))


def rules_for(run_dir: str) -> dict:
    """A rules file with one rule (up, 1 band half-width) per predictor the finished job measured: the plugin's
    work grows with the number of rules, and this is every one it could be given."""
    pair = load_run(run_dir, run_dir, quiet=True)[0]
    run = warn_run(pair, "", {}, 1 / 31)
    keys = [k for k in keys_of([run]) if is_predictor(reads(*k))]
    return {"version": R.VERSION, "fitted_on": {"sweep": "bench", "ops": ["x_plus_y"], "config": {}, "commit": "",
                                                "runs": {}}, "constants": R.constants(), "horizon": 2000,
            "rules": [{"measure": "-", "layer": k[0], "split": k[1], "metric": k[2], "reads": reads(*k),
                       "role": "predictor", "direction": "up", "level": 1, "held_out": {}} for k in keys]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {cpu_description()}, torch {torch.__version__}; 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        base = E.Config(out_dir=os.path.join(tmp, "base"), ops=("x_plus_y",), p=31, d_model=64, lr=2e-3,
                        steps=args.steps, capture=False, train_frac=0.35, weight_decay=0.5, progress="none")
        train(base)
        rules_path = os.path.join(tmp, R.RULES_FILE)
        R.write(rules_path, rules_for(base.out_dir))
        n_rules = len(R.read(rules_path)["rules"])
        print(f"{n_rules} rules for the earlywarning arm")
        arms = {"no plugins": (dataclasses.replace(base, measure=False), True),
                "measures without label-free": (base, True),
                "measures": (base, False),
                "measures + earlywarning": (dataclasses.replace(base, plugins=("earlywarning",),
                                                                warning_rules=rules_path), False)}
        times, own = {name: [] for name in arms}, []
        for repeat in range(args.repeats):
            for i, (name, (cfg, absent)) in enumerate(arms.items()):
                cfg = dataclasses.replace(cfg, out_dir=os.path.join(tmp, f"{repeat}_{i}"))
                with Timed(absent) as timer:
                    start = time.perf_counter()
                    train(cfg)
                    times[name].append(time.perf_counter() - start)
                if name == "measures":
                    own.append(timer.seconds)
                print(f"  repeat {repeat}: {name}: {times[name][-1]:.1f} s", flush=True)
        jobs = R.jobs_of([os.path.join(tmp, "0_3")])
        start = time.perf_counter()
        R.apply(R.read(rules_path), jobs)
        apply_seconds = time.perf_counter() - start
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name}: median {m:.1f} s over {args.repeats} runs of {args.steps} steps")
    print(f"label-free measures: measures / measures without them = "
          f"{medians['measures'] / medians['measures without label-free']:.3f}; their own timer "
          f"{statistics.median(own):.2f} s = {statistics.median(own) / medians['no plugins']:.1%} of the run "
          f"without plugins")
    print(f"earlywarning plugin: {medians['measures + earlywarning'] / medians['measures']:.3f} x the measures arm")
    print(f"plot.py's apply of the {n_rules} rules to the job: {apply_seconds:.2f} s")


if __name__ == "__main__":
    main()
