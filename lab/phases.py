"""A sweep's phase diagram (plot.py's sweep analysis): per job its phase, per cell its seeds' phases and steps.

Phases, per job, from its log (docs/analysis.md, "Sweeps"): memorisation is the first evaluation with train
accuracy >= 0.99, grokking the first with val accuracy > 0.99 (step_val_acc_99), the delay the steps between.
    no fit    train accuracy never reached 0.99
    memorise  memorised; val accuracy never passed 0.99 within the budget
    grok      val accuracy passed 0.99 at least as many steps after memorisation as memorisation took
    fit       val accuracy passed 0.99 sooner than that (no delay to speak of)
A cell's phase is the phase of more than half its seeds, else "mixed".

The early-warning evaluation of a sweep's runs is lab.earlywarning's.
"""

import os
from collections import Counter

import numpy as np

from lab.analysis import load_run
from lab.stats import mean_stderr
from lab.files import read_json
from lab.schema import CONFIG, GROKKED_ABOVE, MEMORISED_AT, SWEEP, half_step

PHASES = ("no fit", "memorise", "grok", "fit", "mixed")
GROK_DELAY_RATIO = 1.0  # grok: delay >= this x the memorisation step; less is "fit"


def phase_of_job(memorisation_step, grok_step) -> str:
    if memorisation_step is None:
        return "no fit"
    if grok_step is None:
        return "memorise"
    return "grok" if grok_step - memorisation_step >= GROK_DELAY_RATIO * memorisation_step else "fit"


def job_summary(pair) -> dict:
    """memorisation_step and grok_step (lab.analysis.TrainedJob's), delay, half_step (val acc >= 0.5), final val acc and
    phase of one job."""
    mem, grok_step = pair.memorisation_step, pair.grok_step
    return {"memorisation_step": mem, "grok_step": grok_step,
            "delay": grok_step - mem if grok_step is not None and mem is not None else None,
            "half_step": half_step(pair.log),
            "final_val_acc": pair.log[-1]["val_acc"] if pair.log else None, "phase": phase_of_job(mem, grok_step)}


def cell_phase(phases: list) -> str:
    """The phase of more than half the seeds, else mixed."""
    if not phases:
        return "mixed"
    phase, count = Counter(phases).most_common(1)[0]
    return phase if count > len(phases) / 2 else "mixed"


def _mean_stderr(values: list):
    """(mean, stderr) of the values that are not None (lab.analysis.mean_stderr), or (None, None)."""
    known = np.array([v for v in values if v is not None], dtype=float)
    return tuple(float(x) for x in mean_stderr(known)) if len(known) else (None, None)


def cell_row(jobs: list) -> dict:
    """Per (cell, op) over its seeds' job_summary dicts: n, grokked share, grokking step, delay and final val acc
    (mean, stderr; the step and delay over the seeds that grokked), phase counts and the cell's phase."""
    grokked = [j for j in jobs if j["grok_step"] is not None]
    row = {"n": len(jobs), "grokked": len(grokked), "share_grokked": len(grokked) / len(jobs) if jobs else None}
    for key, over in (("grok_step", grokked), ("delay", grokked), ("final_val_acc", jobs)):
        row[f"{key}_mean"], row[f"{key}_stderr"] = _mean_stderr([j[key] for j in over])
    counts = Counter(j["phase"] for j in jobs)
    row["phase"] = cell_phase([j["phase"] for j in jobs])
    row["phases"] = " ".join(f"{p}:{counts[p]}" for p in PHASES if counts[p])
    return row


# ----------------------------------------------------------------------------- reading a sweep, its tables
def load_sweep(run_dir: str, name: str) -> dict:
    """A sweep folder: its fields and values (sweep.json) and, per cell, the finished jobs (lab.analysis.TrainedJob)."""
    info = read_json(os.path.join(run_dir, SWEEP))
    cells = []
    for cell in info["cells"]:
        folder = os.path.join(run_dir, cell["name"])
        pairs = load_run(folder, f"{name}/{cell['name']}", quiet=True) if os.path.isdir(folder) else []
        try:
            config = read_json(os.path.join(folder, CONFIG))
        except (OSError, ValueError):
            config = {}
        cells.append({"name": cell["name"], "values": cell["values"], "config": config,
                      "pairs": [p for p in pairs if p.final is not None]})
    return {"run": name, "dir": run_dir, "fields": info["fields"], "values": info["values"], "ops": info["ops"],
            "seeds": info["seeds"], "cells": cells}


def job_rows(sweep: dict) -> list:
    """phase_jobs.csv: one row per finished job."""
    return [{"run": sweep["run"], "cell": cell["name"], **cell["values"], "op": p.op, "seed": p.seed,
             **job_summary(p)} for cell in sweep["cells"] for p in cell["pairs"]]


def cell_rows(sweep: dict, jobs: list) -> list:
    """phases.csv: one row per (cell, op) with finished jobs."""
    rows = []
    for cell in sweep["cells"]:
        for op in sweep["ops"]:
            mine = [j for j in jobs if j["cell"] == cell["name"] and j["op"] == op]
            if mine:
                rows.append({"run": sweep["run"], "cell": cell["name"], **cell["values"], "op": op, **cell_row(mine)})
    return rows


def phase_counts(cells: list) -> str:
    counts = Counter(c["phase"] for c in cells)
    return ", ".join(f"{counts[p]} {p}" for p in PHASES if counts[p])


def sweep_markdown(sweep: dict, cells: list) -> list:
    """The sweep's phase section of analysis_summary.md: the grid per op."""
    fields = sweep["fields"]
    grid = " x ".join(f"{f} ({len(sweep['values'][f])})" for f in fields)
    lines = [f"## Sweep {sweep['run']}: {grid}", "",
             f"Phase of a job: no fit (train acc never >= {MEMORISED_AT}), memorise (never val acc > {GROKKED_ABOVE}"
             f"), grok (val acc > {GROKKED_ABOVE} at least {GROK_DELAY_RATIO:g}x the memorisation step after "
             "memorisation), fit (sooner); a cell's phase is that of more than half its seeds, else mixed. "
             "Steps and delays are means over the seeds that grokked.", ""]
    for op in sweep["ops"]:
        mine = [c for c in cells if c["op"] == op]
        lines += [f"### {op}: {phase_counts(mine)}", "",
                  "| " + " | ".join(fields) + " | phase | grokked | grokking step | delay | final val acc |",
                  "|" + "---|" * (len(fields) + 5)]
        for c in mine:
            step = "-" if c["grok_step_mean"] is None else f"{c['grok_step_mean']:.0f} ± {c['grok_step_stderr']:.0f}"
            delay = "-" if c["delay_mean"] is None else f"{c['delay_mean']:.0f} ± {c['delay_stderr']:.0f}"
            lines.append("| " + " | ".join(str(c[f]) for f in fields) + f" | {c['phase']} ({c['phases']}) | "
                         f"{c['grokked']}/{c['n']} | {step} | {delay} | {c['final_val_acc_mean']:.3f} |")
        lines.append("")
    return lines


def sweep_notes(sweep: dict, cells: list) -> list:
    """The sweep's phase line in the notes.txt block."""
    return [f"[{sweep['run']}] sweep over {', '.join(f'{f}={v}' for f, v in sweep['values'].items())}: "
            + "; ".join(f"{op}: {phase_counts([c for c in cells if c['op'] == op])}" for op in sweep["ops"])
            + " (cells; phases.csv, phase_*.png)."]
