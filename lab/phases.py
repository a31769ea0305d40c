"""A sweep's phase diagram and the early-warning evaluation of every measure (plot.py's sweep analysis).

Phases, per job, from its log (docs/analysis.md, "Sweeps"): memorisation is the first evaluation with train
accuracy >= 0.99, grokking the first with val accuracy > 0.99 (step_val_acc_99), the delay the steps between.
    no fit    train accuracy never reached 0.99
    memorise  memorised; val accuracy never passed 0.99 within the budget
    grok      val accuracy passed 0.99 at least as many steps after memorisation as memorisation took
    fit       val accuracy passed 0.99 sooner than that (no delay to speak of)
A cell's phase is the phase of more than half its seeds, else "mixed".

Early warning, per measure: the alarm is raised at the first measurement after memorisation at which the measure
has moved, in the direction it moves in grokking runs, by at least `level` times its typical change (the median,
over grokking runs, of its change from memorisation to grokking). Over a sweep's grokking runs the alarm's lead is
val accuracy's 50% step minus the alarm's step, and a hit is a lead > 0; over its runs that memorise and never
reach val accuracy 0.5 (those that pass 0.5 but not 0.99 within the budget are left out: the event an alarm
announces did happen in them, grokking did not), a false alarm is an alarm within the same number of steps
since memorisation that grokking runs take to reach 50% (the largest such delay). Direction, typical change and
level are fitted on the other seeds (leave one seed out): each seed's runs are judged with thresholds they did not
help choose. The score that ranks measures is hit rate - false-alarm rate (Youden's J) on the held-out runs.
"""

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lab.analysis import load_run, mean_stderr, measure_label, measure_rows, measure_series
from lab.files import read_json
from lab.schema import GROKKED_ABOVE, MEMORISED_AT, SWEEP

PHASES = ("no fit", "memorise", "grok", "fit", "mixed")
GROK_DELAY_RATIO = 1.0  # grok: delay >= this x the memorisation step; less is "fit"
ALARM_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # candidate alarm thresholds, shares of the typical change
HALF = 0.5  # val accuracy's half-way mark, the event an alarm must precede


def phase_of_job(memorisation_step, grok_step) -> str:
    if memorisation_step is None:
        return "no fit"
    if grok_step is None:
        return "memorise"
    return "grok" if grok_step - memorisation_step >= GROK_DELAY_RATIO * memorisation_step else "fit"


def job_summary(pair) -> dict:
    """memorisation_step and grok_step (lab.analysis.Pair's), delay, half_step (val acc >= 0.5), final val acc and
    phase of one job."""
    mem, grok_step = pair.memorisation_step, pair.grok_step
    return {"memorisation_step": mem, "grok_step": grok_step,
            "delay": grok_step - mem if grok_step is not None and mem is not None else None,
            "half_step": next((r["step"] for r in pair.log if r["val_acc"] >= HALF), None),
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


# ----------------------------------------------------------------------------- early warning
@dataclass
class WarnRun:
    """One job as the early-warning evaluation sees it: its seed, phase, memorisation and half-way steps, and
    every measure's (steps, values)."""

    seed: int
    phase: str
    memorisation_step: int | None
    half_step: int | None
    grok_step: int | None = None
    series: dict = field(default_factory=dict)  # measure key -> (steps, values), numpy arrays
    name: str = ""


def _baseline(run: WarnRun, key):
    """(index, value) of the measure's first finite measurement at or after memorisation, or None."""
    if key not in run.series or run.memorisation_step is None:
        return None
    steps, values = run.series[key]
    ok = np.flatnonzero((steps >= run.memorisation_step) & np.isfinite(values))
    return (int(ok[0]), float(values[ok[0]])) if len(ok) else None


def _value_at(run: WarnRun, key, step):
    """The measure's last finite value at or before step, or None."""
    steps, values = run.series[key]
    ok = np.flatnonzero((steps <= step) & np.isfinite(values))
    return float(values[ok[-1]]) if len(ok) else None


def alarm_step(run: WarnRun, key, sign: float, threshold: float):
    """First step after the baseline at which sign * (value - baseline) >= threshold, or None."""
    base = _baseline(run, key)
    if base is None:
        return None
    i, v0 = base
    steps, values = run.series[key]
    moved = sign * (values[i + 1:] - v0) >= threshold
    hit = np.flatnonzero(moved & np.isfinite(values[i + 1:]))
    return float(steps[i + 1 + hit[0]]) if len(hit) else None


def typical_change(runs: list, key):
    """(sign, scale): the direction and median size of the measure's change from memorisation to grokking over
    the grokking runs; None when it has none."""
    changes = []
    for run in runs:
        base = _baseline(run, key)
        if run.phase != "grok" or base is None or run.grok_step is None:
            continue
        end = _value_at(run, key, run.grok_step)
        if end is not None:
            changes.append(end - base[1])
    if not changes or np.median(np.abs(changes)) == 0:
        return None
    median = float(np.median(changes))
    sign = 1.0 if median > 0 else -1.0 if median < 0 else (1.0 if np.mean(changes) >= 0 else -1.0)
    return sign, float(np.median(np.abs(changes)))


def horizon(runs: list):
    """Steps from memorisation to val accuracy's 50% over the grokking runs, the largest: the window in which a
    never-grokking run's alarm counts as false."""
    delays = [r.half_step - r.memorisation_step for r in runs if r.phase == "grok" and r.half_step is not None]
    return max(delays) if delays else None


def outcomes(runs: list, key, sign: float, threshold: float, window) -> tuple[list, list]:
    """(leads of the grokking runs, None where no alarm), (alarm of each never-grokking run, one that never reached
    val accuracy 0.5, within window since memorisation: its steps since memorisation, or None)."""
    leads, false = [], []
    for run in runs:
        step = alarm_step(run, key, sign, threshold)
        if run.phase == "grok":
            leads.append(None if step is None or run.half_step is None else run.half_step - step)
        elif run.phase == "memorise" and run.half_step is None:  # one past val acc 0.5 is neither: left out
            since = None if step is None else step - run.memorisation_step
            false.append(since if since is not None and window is not None and since <= window else None)
    return leads, false


def rates(leads: list, false: list) -> tuple:
    """(hit rate, false-alarm rate): shares of grokking runs whose alarm leads, of never-grokking runs that alarm."""
    hit = sum(1 for d in leads if d is not None and d > 0) / len(leads) if leads else float("nan")
    fa = sum(1 for s in false if s is not None) / len(false) if false else float("nan")
    return hit, fa


def fit(runs: list, key):
    """(sign, scale, level, window) fitted on runs: the level of ALARM_LEVELS with the best hit - false-alarm
    rate (ties: the lowest level, the earliest alarm); None when the measure has no typical change."""
    change = typical_change(runs, key)
    if change is None:
        return None
    sign, scale = change
    window = horizon(runs)
    best = None
    for level in ALARM_LEVELS:
        hit, fa = rates(*outcomes(runs, key, sign, level * scale, window))
        score = (0.0 if math.isnan(hit) else hit) - (0.0 if math.isnan(fa) else fa)
        if best is None or score > best[0]:
            best = (score, level)
    return sign, scale, best[1], window


def evaluate(runs: list, key) -> dict:
    """Held-out early warning of one measure: each seed's runs judged with the fit on the other seeds."""
    seeds = sorted({r.seed for r in runs})
    leads, false, levels = [], [], []
    for seed in seeds:
        fitted = fit([r for r in runs if r.seed != seed], key)
        held = [r for r in runs if r.seed == seed]
        if fitted is None:  # nothing to fit on: the measure raises no alarm for these runs
            leads += [None for r in held if r.phase == "grok"]
            false += [None for r in held if r.phase == "memorise" and r.half_step is None]
            levels.append(None)
            continue
        sign, scale, level, window = fitted
        got_leads, got_false = outcomes(held, key, sign, level * scale, window)
        leads += got_leads
        false += got_false
        levels.append((sign, level, window))
    hit, fa = rates(leads, false)
    known = [d for d in leads if d is not None]
    lead_mean, lead_stderr = _mean_stderr(known)
    return {"grok_runs": len(leads), "never_runs": len(false), "hit_rate": hit, "false_alarm_rate": fa,
            "score": hit - fa if not (math.isnan(hit) or math.isnan(fa)) else float("nan"),
            "lead_mean": lead_mean, "lead_stderr": lead_stderr, "alarms_in_grok_runs": len(known),
            "false_alarm_since_memorisation": float(np.median([s for s in false if s is not None]))
            if any(s is not None for s in false) else None,
            "direction": "/".join("-" if f is None else "up" if f[0] > 0 else "down" for f in levels),
            "level": "/".join("-" if f is None else f"{f[1]:g}" for f in levels),
            "window": "/".join("-" if f is None or f[2] is None else str(int(f[2])) for f in levels),
            "held_out_seeds": ",".join(map(str, seeds))}


def earlywarning_table(runs: list, keys: list) -> list:
    """evaluate() for every measure key, best score first (then the longer lead)."""
    table = [{"key": key, **evaluate(runs, key)} for key in keys]
    return sorted(table, key=lambda t: (-(t["score"] if not math.isnan(t["score"]) else -2),
                                        -(t["lead_mean"] if t["lead_mean"] is not None else -1e18)))


# ----------------------------------------------------------------------------- reading a sweep, its tables
def load_sweep(run_dir: str, name: str) -> dict:
    """A sweep folder: its fields and values (sweep.json) and, per cell, the finished jobs (lab.analysis.Pair)."""
    info = read_json(os.path.join(run_dir, SWEEP))
    cells = []
    for cell in info["cells"]:
        folder = os.path.join(run_dir, cell["name"])
        pairs = load_run(folder, f"{name}/{cell['name']}", quiet=True) if os.path.isdir(folder) else []
        cells.append({"name": cell["name"], "values": cell["values"],
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


def warn_runs(sweep: dict) -> list:
    """WarnRun of every finished job that groks or memorises only, with every measure but val/train accuracy."""
    runs = []
    for cell in sweep["cells"]:
        for p in cell["pairs"]:
            summary = job_summary(p)
            if summary["phase"] not in ("grok", "memorise"):
                continue
            series = {k: v for k, v in measure_series(p, measure_rows(p)).items() if k[:3:2] != ("log", "acc")}
            runs.append(WarnRun(p.seed, summary["phase"], summary["memorisation_step"], summary["half_step"],
                                summary["grok_step"], series, f"{cell['name']} {p.op} seed {p.seed}"))
    return runs


def warning_rows(sweep: dict, runs: list) -> list:
    """earlywarning.csv rows of one sweep, best score first."""
    keys = sorted({k for r in runs for k in r.series})
    return [{"run": sweep["run"], "measure": measure_label(*t["key"]), "layer": t["key"][0], "split": t["key"][1],
             "metric": t["key"][2], **{k: v for k, v in t.items() if k != "key"}}
            for t in earlywarning_table(runs, keys)]


WARNING_COLUMNS = ["run", "measure", "layer", "split", "metric", "grok_runs", "never_runs", "hit_rate",
                   "false_alarm_rate", "score", "lead_mean", "lead_stderr", "alarms_in_grok_runs",
                   "false_alarm_since_memorisation", "direction", "level", "window", "held_out_seeds"]


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def warning_text(t: dict) -> str:
    lead = "no alarm" if t["lead_mean"] is None else f"lead {t['lead_mean']:.0f} ± {t['lead_stderr']:.0f} steps"
    return (f"{t['measure']}: hits {_pct(t['hit_rate'])} of {t['grok_runs']} grokking runs, false alarms in "
            f"{_pct(t['false_alarm_rate'])} of {t['never_runs']} that never grok, J {t['score']:.2f}, {lead}")


def phase_counts(cells: list) -> str:
    counts = Counter(c["phase"] for c in cells)
    return ", ".join(f"{counts[p]} {p}" for p in PHASES if counts[p])


def sweep_markdown(sweep: dict, cells: list, table: list) -> list:
    """The sweep's section of analysis_summary.md: the grid per op, then the early-warning ranking."""
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
    if table:
        lines += [f"### Early warning ({table[0]['grok_runs']} grokking runs, {table[0]['never_runs']} that memorise "
                  f"and never reach val acc 0.5; runs past 0.5 but not 0.99 left out; thresholds fitted leaving one "
                  f"seed out, seeds {table[0]['held_out_seeds']})", "",
                  "| measure | hit rate | false-alarm rate | J | lead (steps) | level |", "|---|---|---|---|---|---|"]
        for t in table:
            lead = "-" if t["lead_mean"] is None else f"{t['lead_mean']:.0f} ± {t['lead_stderr']:.0f}"
            lines.append(f"| {t['measure']} | {_pct(t['hit_rate'])} | {_pct(t['false_alarm_rate'])} | "
                         f"{t['score']:.2f} | {lead} | {t['level']} |")
        lines.append("")
    return lines


def sweep_notes(sweep: dict, cells: list, table: list) -> list:
    """The sweep's lines in the notes.txt block."""
    lines = [f"[{sweep['run']}] sweep over {', '.join(f'{f}={v}' for f, v in sweep['values'].items())}: "
             + "; ".join(f"{op}: {phase_counts([c for c in cells if c['op'] == op])}" for op in sweep["ops"])
             + " (cells; phases.csv, phase_*.png)."]
    ranked = [t for t in table if not math.isnan(t["score"])]
    if ranked:
        param = [t for t in ranked if t["metric"] == "param_norm"]
        lines.append(f"Early warning over {ranked[0]['grok_runs']} grokking and {ranked[0]['never_runs']} "
                     "never-grokking runs (held-out seeds; earlywarning.csv): best " + "; ".join(
                         warning_text(t) for t in ranked[:2]) + ". Worst: " + "; ".join(
                         warning_text(t) for t in ranked[-2:]) + "."
                     + (f" Weight norm: {warning_text(param[0])}." if param and param[0] not in ranked[:2] else ""))
    return lines
