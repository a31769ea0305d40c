"""Reproduce the reference setups' headline results (README, "Reproducing the papers"): a benchmark, not a test.

    python tests/reproduce.py run nanda2023            # train one preset's runs into repro/ (hours on 2 cores)
    python tests/reproduce.py run all
    python tests/reproduce.py run grokfast2024 --only=grokfast2024_ema   # some of a preset's runs
    python tests/reproduce.py report                   # numbers, times and figures from whatever has finished

`run` calls experiment.py with the commands in EXPERIMENTS (rerunning resumes); `report` prints the reproduction
table as markdown, each preset's single-seed training time with the CPU, and draws one figure per preset into
--figures (default docs/reproduce/). The budgets are what a 2-core CPU affords, not always the paper's: each
command says its own.
"""

import argparse
import csv
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from lab.analysis import load_run  # noqa: E402
from lab.files import read_json  # noqa: E402
from lab.stats import bootstrap, kaplan_meier, km_median, km_median_interval, km_ratio_interval  # noqa: E402
from bench_plot import cpu_description  # noqa: E402

SEEDS = "--seeds=3"
LEAN = ["--capture=false", "--measure=false"]  # the table reads log.jsonl (and the norms plugin's columns) only
POWER_FRACTIONS = (0.3, 0.35, 0.4, 0.5, 0.6, 0.7)
POWER_OPS = "x_div_y,x_minus_y"
POWER_BUDGET = 10_000  # the paper's is 10^5 updates; 10^4 is what 2 cores afford for 36 jobs
GROKFAST_BUDGET = 50_000  # the paper's baseline reaches 95% at 39,890
GROKFAST_ARMS = {  # run folder suffix -> (flags, label); weight decay 0.005 and 0.01 are the filter runs' (the paper's)
    "baseline": ([], "baseline (Adam, wd 0)"),
    "wd0.005": (["--weight_decay=0.005"], "no filter, wd 0.005"),
    "ema": (["--plugins=grokfast", "--weight_decay=0.005"], "Grokfast-EMA (alpha 0.98, lamb 2, wd 0.005)"),
    "wd0.01": (["--weight_decay=0.01"], "no filter, wd 0.01"),
    "ma": (["--plugins=grokfast", "--grokfast_filter=ma", "--grokfast_window=100", "--grokfast_lamb=5",
            "--weight_decay=0.01"], "Grokfast-MA (window 100, lamb 5, wd 0.01)"),
}
PRIETO_STEPS = 5000  # the paper's transformer runs: 5,000 full-batch epochs
PRIETO_ARMS = {  # run folder suffix -> (flags, label)
    "softmax": ([], "softmax cross-entropy"),
    "stablemax": (["--loss=stablemax"], "StableMax"),
    "perp_adamw": (["--optimizer=perp_adamw"], "⊥AdamW"),
    "softmax_wd": (["--weight_decay=1"], "softmax, weight decay 1"),
    "fp64": (["--dtype=fp64"], "softmax in float64"),
}
NANDA_STEPS = 40_000

# run folder (under --root) -> experiment.py flags; grouped by preset
EXPERIMENTS = {
    "ais2024": {"ais2024": ["--ops=x_plus_y", "--seeds=1"]},  # one (op, seed) of the default run, for its time
    "nanda2023": {"nanda2023": ["--preset=nanda2023", f"--steps={NANDA_STEPS}", SEEDS],
                  "nanda2023_wd0": ["--preset=nanda2023", f"--steps={NANDA_STEPS}", SEEDS, "--weight_decay=0"]},
    "grokfast2024": {f"grokfast2024_{name}": ["--preset=grokfast2024", SEEDS, f"--steps={GROKFAST_BUDGET}", *LEAN,
                                              *flags] for name, (flags, _) in GROKFAST_ARMS.items()},
    "power2022": {f"power2022_frac{f}": ["--preset=power2022", f"--ops={POWER_OPS}", SEEDS, f"--train_frac={f}",
                                         f"--steps={POWER_BUDGET}", *LEAN] for f in POWER_FRACTIONS},
    "prieto2025": {f"prieto2025_{name}": ["--preset=prieto2025", SEEDS, f"--steps={PRIETO_STEPS}", "--plugins=norms",
                                          *LEAN, *flags] for name, (flags, _) in PRIETO_ARMS.items()},
}


def command(root: str, folder: str, flags: list, workers: int = 0) -> list:
    return [sys.executable, os.path.join(ROOT, "experiment.py"), f"--out_dir={os.path.join(root, folder)}",
            "--progress=lines", f"--workers={workers}", *flags]


def run(root: str, presets: list, only=None, workers: int = 0) -> None:
    for preset in presets:
        for folder, flags in EXPERIMENTS[preset].items():
            if only and folder not in only:
                continue
            print(" ".join(command(root, folder, flags, workers)), flush=True)
            subprocess.run(command(root, folder, flags, workers), check=True)


# ----------------------------------------------------------------------------- report
def finished(root: str, folder: str) -> tuple:
    """(finished jobs, how many have started but not finished) of a run folder."""
    path = os.path.join(root, folder)
    pairs = load_run(path, path) if os.path.isdir(path) else []
    return [p for p in pairs if p.final is not None], sum(p.final is None and bool(p.log) for p in pairs)


def first_step_above(log: list, level: float):
    return next((r["step"] for r in log if r["val_acc"] > level), None)


def event_times(pairs: list, level: float) -> tuple:
    """(times, events) per job: the first evaluation with val accuracy above level (an event), else the last
    evaluated step (censored there: the run ended, at its budget or stopped, before it)."""
    steps = [first_step_above(p.log, level) for p in pairs]
    return ([s if s is not None else p.log[-1]["step"] for s, p in zip(steps, pairs)], [s is not None for s in steps])


def seconds(pair) -> float:
    return read_json(os.path.join(pair.folder, "run.json"))["train_seconds"]


def number(x: float, fmt: str = ",.0f") -> str:
    return "not reached" if x == math.inf else "n/a" if not np.isfinite(x) else format(x, fmt)


def interval(low: float, high: float, fmt: str = ",.0f") -> str:
    return "" if not (np.isfinite(low) or low == math.inf) else f" [{number(low, fmt)}, {number(high, fmt)}]"


def verdict(paper: float, median: float, low: float, high: float, budget: float | None = None) -> str:
    """A numeric headline against ours: 'reproduces' when the paper's value lies in our 95% interval; 'within Nx'
    when our estimate is within a factor N <= 4 of it (N the factor rounded up, at least 2); 'does not' beyond;
    'not measured' with no runs, or where our runs end (budget) before the paper's value and have not got there."""
    if np.isnan(median):
        return "not measured: no finished runs"
    if median == math.inf:
        if budget is not None and budget < paper:
            return f"not measured: the budget ({budget:,.0f}) ends before the paper's {paper:,.0f}"
        return f"does not: not reached by {budget:,.0f}" if budget is not None else "does not: not reached"
    if np.isfinite(low) and low <= paper <= high or median == paper:
        return "reproduces"
    factor = max(median / paper, paper / median)
    side = "above" if median > paper else "below"
    if factor <= 4:
        return f"within {max(2, math.ceil(factor))}x ({side})"
    return f"does not: {factor:.1f}x {side} the paper's"


def claim(holds, why: str) -> str:
    """A qualitative headline: 'reproduces' or 'does not' (holds True / False), 'not measured' (None), with why."""
    return f"{ {True: 'reproduces', False: 'does not', None: 'not measured'}[holds]}: {why}"


def km_cell(times, events) -> tuple:
    """(median, low, high, 'median [low, high] (k/n reached)') of steps to an event, Kaplan-Meier over the runs."""
    median, (low, high) = km_median(times, events), km_median_interval(times, events)
    return median, low, high, f"{number(median)}{interval(low, high)} ({sum(events)}/{len(events)} reached)"


def row(preset: str, headline: str, source: str, ours: str, budget: str, pairs: list, verdict_: str,
        file: str, running: int = 0) -> dict:
    times = [seconds(p) for p in pairs]
    return {"preset": preset, "headline": headline, "source": source, "this project (95% interval)": ours,
            "budget": budget, "seeds": f"{len(pairs)}" + (f" (+{running} running)" if running else ""),
            "one seed, minutes": f"{np.median(times) / 60:.1f}" if times else "n/a", "verdict": verdict_,
            "file": file}


def unmeasured(preset: str, headline: str, source: str, budget: str, folder: str, running: int = 0) -> dict:
    """The row of a headline whose runs have not finished: what to run for it."""
    return row(preset, headline, source, "no finished runs", budget, [], "not measured: no finished runs "
               f"(python tests/reproduce.py run {preset} --only={folder})", "", running)


def save_panels(fig, axes, path: str, title: str, xlabel: str, ylabels: list) -> None:
    """Label, grid and legend each panel, then write the figure and close it."""
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def km_curve(ax, times, events, color: str, label: str) -> None:
    """The share of runs not yet at the event against the step (Kaplan-Meier), censored runs as ticks."""
    steps, survival = kaplan_meier(times, events)
    ax.step([0, *steps], [1, *survival], where="post", color=color, label=label)
    for t, e in zip(times, events):
        if not e:
            ax.plot([t], [survival[np.searchsorted(steps, t, side="right") - 1] if len(steps) and t >= steps[0]
                          else 1], "|", color=color, markersize=10)


def report_nanda(root: str, figures: str) -> list:
    import plot
    from lab.final_keys import final_key_progress_of, summary_row

    pairs, running = finished(root, "nanda2023")
    rows = []
    budget = f"{NANDA_STEPS:,} full-batch steps (the paper's)"
    if not pairs:
        rows.append(unmeasured("nanda2023", "phases end at 1.4k / 9.4k / 14k; about 5 key frequencies",
                               "Nanda et al. 2023, Sec. 4-5", budget, "nanda2023", running))
    else:
        found = [summary_row(p, final_key_progress_of(p.run, p.op, p.seed)) for p in pairs]
        made = plot.final_keys_figure("nanda2023", "x_plus_y", pairs, found, figures)
        os.replace(made[0][0], os.path.join(figures, "nanda2023.png"))
        for key, paper, words in (("memorisation_end", 1400, "memorisation ends"),
                                  ("circuit_formation_end", 9400, "circuit formation ends"),
                                  ("cleanup_end", 14000, "cleanup ends")):
            values = np.array([r[key] for r in found if r[key] is not None], dtype=float)
            mean = float(values.mean()) if len(values) else float("nan")
            low, high = bootstrap(list(values), np.mean)
            rows.append(row("nanda2023", f"{words} at {paper:,}", "Nanda et al. 2023, Fig. 7 / Sec. 5.1",
                            f"{number(mean)}{interval(low, high)} (mean of {len(values)} seeds; 10% / 90% of log "
                            "test loss's fall)", budget, pairs, verdict(paper, mean, low, high), "final_keys.json",
                            running))
        counts = [r["n_key_freqs"] for r in found]
        rows.append(row("nanda2023", "about 5 key frequencies", "Nanda et al. 2023, Sec. 4",
                        f"{', '.join(map(str, counts))} (frequencies holding >= 1% of the final logits' power)",
                        budget, pairs, claim(all(3 <= c <= 7 for c in counts) if counts else None,
                                             "3 to 7 in every seed" if counts else "no runs"),
                        "final_keys.json", running))
    control, running = finished(root, "nanda2023_wd0")
    if not control:
        rows.append(unmeasured("nanda2023", "weight decay drives the cleanup: without it no grokking",
                               "Nanda et al. 2023, Sec. 5.2", budget, "nanda2023_wd0", running))
    else:
        times, events = event_times(control, 0.99)
        *_, text = km_cell(times, events)
        rows.append(row("nanda2023", "weight decay drives the cleanup: without it no grokking",
                        "Nanda et al. 2023, Sec. 5.2", f"weight decay 0: steps to 99% val acc {text}",
                        f"{NANDA_STEPS:,} full-batch steps", control,
                        claim(not any(events), f"{sum(events)}/{len(events)} seeds reach 99%"), "log.jsonl", running))
    return rows


def load_arms(root: str, prefix: str, arms: dict, level: float) -> dict:
    """name -> (pairs, running, times, events) of each arm (run folder prefix_name) with finished jobs, steps to
    val accuracy above level; in the arms' order."""
    found = {}
    for name in arms:
        pairs, running = finished(root, f"{prefix}_{name}")
        if pairs:
            found[name] = (pairs, running, *event_times(pairs, level))
    return found


def seed_lines(arms: dict, spec: dict):
    """(job, line style) of every finished job of every arm: an arm's colour, its label on its first seed only."""
    for name, (pairs, *_) in arms.items():
        label = f"{spec[name][1]} ({len(pairs)} seeds)"
        for j, p in enumerate(pairs):
            yield p, {"color": f"C{list(spec).index(name)}", "linewidth": 0.8, "label": label if j == 0 else None}


def report_grokfast(root: str, figures: str) -> list:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    arms = load_arms(root, "grokfast2024", GROKFAST_ARMS, 0.95)
    for p, style in seed_lines(arms, GROKFAST_ARMS):
        axes[0].plot([r["step"] for r in p.log], [r["val_acc"] for r in p.log], **style)
    for name, (_, _, times, events) in arms.items():
        km_curve(axes[1], times, events, f"C{list(GROKFAST_ARMS).index(name)}", GROKFAST_ARMS[name][1])
    axes[0].axhline(0.95, color="black", linestyle=":", linewidth=0.8, label="95% (the paper's threshold)")
    for ax in axes:
        ax.set_xscale("log")
    if arms:
        save_panels(fig, axes, os.path.join(figures, "grokfast2024.png"), "grokfast2024: x*y mod 97, val accuracy "
                    "per seed (left); share of seeds not yet at 95% val accuracy, Kaplan-Meier, ticks censored "
                    "(right)", "update step", ["val accuracy", "share of seeds below 95%"])
    plt.close(fig)
    rows = []
    budget = f"{GROKFAST_BUDGET:,} steps, stop at 95%"
    for name, paper, words in (("baseline", 39890, "baseline reaches 95% at 39,890 steps"),
                               ("ema", 910, "Grokfast-EMA reaches 95% at 910 steps"),
                               ("ma", 790, "Grokfast-MA reaches 95% at 790 steps"),
                               ("wd0.005", None, "control: the EMA's weight decay (0.005), no filter"),
                               ("wd0.01", None, "control: the MA's weight decay (0.01), no filter")):
        if name not in arms:
            if paper:
                rows.append(unmeasured("grokfast2024", words, "ironjr/grokfast README", budget,
                                       f"grokfast2024_{name}", finished(root, f"grokfast2024_{name}")[1]))
            continue
        pairs, running, times, events = arms[name]
        median, low, high, text = km_cell(times, events)
        rows.append(row("grokfast2024", words, "ironjr/grokfast README" if paper else "none (a control)",
                        f"{GROKFAST_ARMS[name][1]}: {text}", budget, pairs,
                        verdict(paper, median, low, high, GROKFAST_BUDGET) if paper else "control (no paper value)",
                        "log.jsonl", running))
    for fast, base, paper, words in (("ema", "baseline", 43.8, "EMA speed-up 43.8x"),
                                     ("ma", "baseline", 50.5, "MA speed-up 50.5x"),
                                     ("wd0.005", "baseline", None, "control: speed-up of weight decay 0.005 alone"),
                                     ("ema", "wd0.005", None, "control: speed-up of the EMA filter at equal "
                                      "weight decay (0.005)"),
                                     ("wd0.01", "baseline", None, "control: speed-up of weight decay 0.01 alone"),
                                     ("ma", "wd0.01", None, "control: speed-up of the MA filter at equal weight "
                                      "decay (0.01)")):
        if fast not in arms or base not in arms:
            if paper:
                rows.append(unmeasured("grokfast2024", words, "ironjr/grokfast README", budget,
                                       ",".join(f"grokfast2024_{a}" for a in (base, fast) if a not in arms)))
            continue
        ratio, low, high = km_ratio_interval(*arms[base][2:], *arms[fast][2:])
        text = f"{number(ratio, '.1f')}x{interval(low, high, '.1f')}"
        if ratio == math.inf:
            text = f"> {GROKFAST_BUDGET / km_median(*arms[fast][2:]):.1f}x ({base} not at 95% by the budget)"
        rows.append(row("grokfast2024", words, "ironjr/grokfast README" if paper else "none (a control)",
                        f"ratio of the steps to 95% (Kaplan-Meier medians): {text}", budget, arms[fast][0],
                        (verdict(paper, ratio, low, high) if ratio != math.inf else
                         claim(GROKFAST_BUDGET / km_median(*arms[fast][2:]) >= paper or None,
                               "a lower bound only")) if paper else "control (no paper value)",
                        "log.jsonl", arms[fast][1]))
    return rows


def report_power(root: str, figures: str) -> list:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    rows, found = [], False
    for i, op in enumerate(POWER_OPS.split(",")):
        medians = []
        for f in POWER_FRACTIONS:
            pairs, running = finished(root, f"power2022_frac{f}")
            pairs = [p for p in pairs if p.op == op]
            if not pairs:
                continue
            found = True
            times, events = event_times(pairs, 0.99)
            median, *_ = km_cell(times, events)
            medians.append((f, median))
            for t, e in zip(times, events):
                axes[0].plot([f], [t], "o" if e else "^", color=f"C{i}", markerfacecolor=None if e else "none")
            axes[1].plot([f] * len(pairs), [p.log[-1]["val_acc"] for p in pairs], "o", color=f"C{i}", alpha=0.6)
        if not medians:
            rows.append(unmeasured("power2022", f"{op}: the less data, the more steps to 99% val acc",
                                   "Power et al. 2022, Fig. 1 (centre)", f"{POWER_BUDGET:,} steps",
                                   ",".join(f"power2022_frac{f}" for f in POWER_FRACTIONS)))
            continue
        shown = [(f, m) for f, m in medians if np.isfinite(m)]
        if shown:
            axes[0].plot(*zip(*shown), "-", color=f"C{i}", label=f"{op}: Kaplan-Meier median (open: censored)")
        cells = "; ".join(f"{f}: {number(m)}" for f, m in medians)
        values = [m for _, m in medians]
        falling = all(a >= b for a, b in zip(values, values[1:]))  # inf (not reached) counts as the slowest
        reached = sum(np.isfinite(values))
        rows.append(row("power2022", f"{op}: the less data, the more steps to 99% val acc, steeply near the "
                        "smallest fraction that generalises", "Power et al. 2022, Fig. 1 (centre)",
                        f"median steps to 99% by train fraction: {cells}", f"{POWER_BUDGET:,} steps (the paper's "
                        "10^5), stop at 99%", [p for p in finished(root, f"power2022_frac{POWER_FRACTIONS[-1]}")[0]
                                               if p.op == op],
                        claim(falling if reached >= 3 else None, f"the medians never rise as the fraction grows "
                              f"({reached} fractions reached)" if falling else "the medians rise somewhere")
                        if reached >= 3 else claim(None, f"only {reached} fractions reach 99% within the budget"),
                        "log.jsonl"))
    if not found:
        plt.close(fig)
        return rows
    axes[0].axhline(POWER_BUDGET, color="black", linestyle=":", linewidth=0.8, label="budget")
    axes[0].set_yscale("log")
    axes[1].axhline(0.99, color="black", linestyle=":", linewidth=0.8, label="0.99")
    save_panels(fig, axes, os.path.join(figures, "power2022.png"), "power2022: steps to val accuracy > 0.99 per "
                "seed (left; open triangles: not reached by the budget) and val accuracy at the end (right)",
                "training fraction", ["update steps", "val accuracy at the last step"])
    return rows


def report_prieto(root: str, figures: str) -> list:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    arms = load_arms(root, "prieto2025", PRIETO_ARMS, 0.99)
    for p, style in seed_lines(arms, PRIETO_ARMS):
        steps = [r["step"] for r in p.log]
        axes[0].plot(steps, [r["val_acc"] for r in p.log], **style)
        axes[1].plot(steps, [100 * r.get("softmax_collapse", np.nan) for r in p.log], **style)
        axes[2].plot(steps, [r.get("grad_norm", np.nan) for r in p.log], **style)
    axes[2].set_yscale("log")
    if arms:
        save_panels(fig, axes, os.path.join(figures, "prieto2025.png"), "prieto2025: x+y mod 113, 40% train, full "
                    "batch, no weight decay unless said: val accuracy, softmax collapse (training pairs whose p(true) "
                    "is exactly 1 in the run's float type) and the full-batch gradient's norm", "full-batch update",
                    ["val accuracy", "% of training pairs collapsed", "gradient L2 norm"])
    plt.close(fig)
    rows = []
    budget = f"{PRIETO_STEPS:,} full-batch steps (the paper's)"
    for name, headline, want in (("softmax", "without regularisation softmax cross-entropy does not grok", False),
                                 ("stablemax", "StableMax groks without regularisation", True),
                                 ("perp_adamw", "⊥AdamW groks without regularisation, quickly", True),
                                 ("softmax_wd", "weight decay lets softmax cross-entropy grok", True),
                                 ("fp64", "float64 delays softmax collapse and lets the model generalise further",
                                  True)):
        if name not in arms:
            rows.append(unmeasured("prieto2025", headline, "Prieto et al. 2025, Sec. 3-5", budget,
                                   f"prieto2025_{name}", finished(root, f"prieto2025_{name}")[1]))
            continue
        pairs, running, times, events = arms[name]
        *_, text = km_cell(times, events)
        collapse = [max(r.get("softmax_collapse", 0) for r in p.log) for p in pairs]
        final = [p.log[-1]["val_acc"] for p in pairs]
        onsets = ", ".join(f"{number(first_step(p.log, 'softmax_collapse', lambda v, _: v >= COLLAPSED))} / "
                           f"{number(first_step(p.log, 'grad_norm', lambda v, v0: v < STALLED * v0))}" for p in pairs)
        ours = (f"steps to 99% val acc {text}; final val acc {min(final):.3f} to {max(final):.3f}; most training "
                f"pairs collapsed {100 * min(collapse):.1f}% to {100 * max(collapse):.1f}%; per seed, collapse "
                f">= {COLLAPSED:.0%} / gradient below {STALLED:g} of its first value at step {onsets}")
        grokked = sum(events) > len(events) / 2
        rows.append(row("prieto2025", headline, "Prieto et al. 2025, Sec. 3-5", ours, budget, pairs,
                        claim(grokked == want, f"{sum(events)}/{len(events)} seeds reach 99%"), "log.jsonl", running))
    return rows


COLLAPSED = 0.1  # Prieto's rows: the first evaluation with this share of training pairs in softmax collapse ...
STALLED = 1e-4  # ... and the first whose gradient norm is below this share of the first evaluation's


def first_step(log: list, key: str, test) -> float:
    """The first logged step whose log[key] passes test(value, the first logged value); inf if none."""
    values = [(r["step"], r[key]) for r in log if r.get(key) is not None]
    return next((s for s, v in values if test(v, values[0][1])), math.inf) if values else math.nan


COLUMNS = ["preset", "headline", "source", "this project (95% interval)", "budget", "seeds", "one seed, minutes",
           "verdict", "file"]


def report(root: str, figures: str) -> None:
    os.makedirs(figures, exist_ok=True)
    rows = [*report_nanda(root, figures), *report_grokfast(root, figures), *report_power(root, figures),
            *report_prieto(root, figures)]
    with open(os.path.join(figures, "reproduction.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"Runs in {root}; {cpu_description()}; a job's minutes are the median of its seeds' train_seconds.\n")
    print("| " + " | ".join(COLUMNS[:-1]) + " |\n|" + "---|" * (len(COLUMNS) - 1))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in COLUMNS[:-1]) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("presets", nargs="*", default=["all"])
    parser.add_argument("--root", default=os.path.join(ROOT, "repro"), help="where the runs go")
    parser.add_argument("--figures", default=os.path.join(ROOT, "docs", "reproduce"))
    parser.add_argument("--only", default="", help="comma-separated run folders of the presets to run")
    parser.add_argument("--workers", type=int, default=0, help="experiment.py's --workers (0: one per core)")
    args = parser.parse_intermixed_args(argv)
    presets = list(EXPERIMENTS) if "all" in args.presets else args.presets
    unknown = [p for p in presets if p not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown preset {','.join(unknown)}: choose from {','.join(EXPERIMENTS)} or all")
    if args.action == "run":
        run(args.root, presets, [f for f in args.only.split(",") if f], args.workers)
    else:
        report(args.root, args.figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
