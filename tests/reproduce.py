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
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lab.analysis import format_mean_stderr, load_run  # noqa: E402
from lab.files import read_json  # noqa: E402
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
def finished(root: str, folder: str, also_unfinished: bool = False) -> list:
    """The jobs of a run folder that finished (and, with also_unfinished, those stopped early with a log)."""
    path = os.path.join(root, folder)
    pairs = load_run(path, path) if os.path.isdir(path) else []
    return [p for p in pairs if p.final is not None or (also_unfinished and p.log)]


def first_step_above(log: list, level: float):
    return next((r["step"] for r in log if r["val_acc"] > level), None)


def seconds(pair) -> float:
    return read_json(os.path.join(pair.folder, "run.json"))["train_seconds"]


def mean_err(values, fmt=".0f") -> str:
    return format_mean_stderr(values, fmt, fmt) if len(values) else "n/a"


def report_nanda(root: str, figures: str) -> dict:
    import plot
    from lab.final_keys import final_key_progress_of, summary_row

    pairs = finished(root, "nanda2023")
    if not pairs:
        return {}
    rows = [summary_row(p, final_key_progress_of(p.run, p.op, p.seed)) for p in pairs]
    made = plot.final_keys_figure("nanda2023", "x_plus_y", pairs, rows, figures)
    os.replace(made[0][0], os.path.join(figures, "nanda2023.png"))

    def stat(key):
        values = [r[key] for r in rows if r[key] is not None]
        return f"{mean_err(values)} ({sum(v > 0 for v in values)}/{len(rows)} seeds > 0)" if "lead" in key \
            else mean_err(values)

    grok = [p.grok_step for p in pairs if p.grok_step is not None]
    return {
        "seeds": len(pairs), "key_freqs": "; ".join(r["key_freqs"] for r in rows),
        "n_key_freqs": [r["n_key_freqs"] for r in rows],
        "key_shares": "; ".join(r["key_shares"] for r in rows),
        "memorisation_end": stat("memorisation_end"), "test_loss_peak": stat("test_loss_peak"),
        "circuit_formation_end": stat("circuit_formation_end"),
        "cleanup_end": stat("cleanup_end"), "grok_step": mean_err(grok) + f" ({len(grok)}/{len(pairs)} grokked)",
        **{k: stat(k) for k in rows[0] if k.startswith("lead_")},
        "seconds": [seconds(p) for p in pairs], "steps": [p.log[-1]["step"] for p in pairs],
    }


def save_panels(fig, axes, path: str, title: str, xlabel: str, ylabels: list) -> None:
    """Label, grid and legend each panel, then write the figure and close it."""
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_grokfast(root: str, figures: str) -> dict:
    out = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, label) in enumerate((("baseline", "baseline (Adam, wd 0)"),
                                       ("ema", "Grokfast-EMA (alpha 0.98, lamb 2, wd 0.005)"),
                                       ("ma", "Grokfast-MA (window 100, lamb 5, wd 0.01)"))):
        pairs = finished(root, f"grokfast2024_{name}", also_unfinished=True)
        if not pairs:
            continue
        reached = [first_step_above(p.log, 0.95) for p in pairs]
        out[name] = {"reached": reached, "last_step": [p.log[-1]["step"] for p in pairs],
                     "last_val_acc": [p.log[-1]["val_acc"] for p in pairs],
                     "max_val_acc": [max(r["val_acc"] for r in p.log) for p in pairs],
                     "finished": [p.final is not None for p in pairs],
                     "seconds": [seconds(p) if p.final is not None else None for p in pairs]}
        if not all(out[name]["finished"]):
            label += f", stopped at step {max(out[name]['last_step'])}"
        for j, p in enumerate(pairs):
            ax.plot([r["step"] for r in p.log], [r["val_acc"] for r in p.log], color=f"C{i}", linewidth=1,
                    label=f"{label} ({len(pairs)} seeds)" if j == 0 else None)
    if not out:
        plt.close(fig)
        return out
    ax.axhline(0.95, color="black", linestyle=":", linewidth=0.8, label="95% (the paper's threshold)")
    ax.set_xscale("log")
    save_panels(fig, [ax], os.path.join(figures, "grokfast2024.png"), "grokfast2024: x*y mod 97, val accuracy "
                "per seed", "update step", ["val accuracy"])
    return out


def report_power(root: str, figures: str) -> dict:
    out = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, op in enumerate(POWER_OPS.split(",")):
        for f in POWER_FRACTIONS:
            pairs = [p for p in finished(root, f"power2022_frac{f}", also_unfinished=True) if p.op == op]
            if pairs:
                p = pairs[0]
                out[(op, f)] = {"step": first_step_above(p.log, 0.99), "last_step": p.log[-1]["step"],
                                "finished": p.final is not None, "final_val_acc": p.log[-1]["val_acc"],
                                "seconds": seconds(p) if p.final is not None else None}
        mine = sorted((f, v) for (o, f), v in out.items() if o == op)
        hit = [(f, v["step"]) for f, v in mine if v["step"] is not None]
        miss = [f for f, v in mine if v["step"] is None]
        if hit:
            axes[0].plot(*zip(*hit), "o", color=f"C{i}", markersize=8, label=f"{op}: reached 99%")
        if miss:
            axes[0].plot(miss, [POWER_BUDGET] * len(miss), "x", color=f"C{i}", markersize=10,
                         label=f"{op}: not within {POWER_BUDGET} steps")
        axes[1].plot([f for f, _ in mine], [v["final_val_acc"] for _, v in mine], "o-", color=f"C{i}", label=op)
    if not out:
        plt.close(fig)
        return out
    axes[0].axhline(POWER_BUDGET, color="black", linestyle=":", linewidth=0.8, label="budget")
    axes[0].set_ylim(0, POWER_BUDGET * 1.1)
    axes[1].axhline(0.99, color="black", linestyle=":", linewidth=0.8, label="0.99")
    save_panels(fig, axes, os.path.join(figures, "power2022.png"), "power2022, seed 0: steps to val accuracy > 0.99 "
                "(left) and val accuracy at the end (right) against the training fraction", "training fraction",
                ["update steps", "val accuracy at the last step"])
    return out


def report_prieto(root: str, figures: str) -> dict:
    out = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(("softmax", "stablemax", "perp_adamw")):
        pairs = finished(root, f"prieto2025_{name}", also_unfinished=True)
        if not pairs:
            continue
        p = pairs[0]
        collapse = [(r["step"], r["softmax_collapse"]) for r in p.log if "softmax_collapse" in r]
        axes[0].plot([r["step"] for r in p.log], [r["val_acc"] for r in p.log], color=f"C{i}", label=name,
                     linestyle="--" if name == "stablemax" else "-")
        if collapse:
            axes[1].plot([s for s, _ in collapse], [100 * c for _, c in collapse], color=f"C{i}", label=name,
                         linestyle="--" if name == "stablemax" else "-")
        out[name] = {"final_val_acc": p.log[-1]["val_acc"], "final_train_acc": p.log[-1]["train_acc"],
                     "grok_step": first_step_above(p.log, 0.99),
                     "max_collapse": max((c for _, c in collapse), default=None),
                     "final_collapse": collapse[-1][1] if collapse else None,
                     "seconds": seconds(p) if p.final is not None else None, "steps": p.log[-1]["step"],
                     "finished": p.final is not None}
    if not out:
        plt.close(fig)
        return out
    axes[1].set_title("softmax collapse: training pairs whose float32 p(true) is exactly 1", fontsize=9)
    save_panels(fig, axes, os.path.join(figures, "prieto2025.png"), "prieto2025: x+y mod 113, no weight decay, "
                "1 seed: cross-entropy vs StableMax (dashed) vs ⊥AdamW", "full-batch update",
                ["val accuracy", "% of training pairs"])
    return out


def report(root: str, figures: str) -> None:
    os.makedirs(figures, exist_ok=True)
    found = {"cpu": cpu_description(), "nanda2023": report_nanda(root, figures),
             "grokfast2024": report_grokfast(root, figures), "power2022": report_power(root, figures),
             "prieto2025": report_prieto(root, figures)}
    found["power2022"] = {f"{op} {f}": v for (op, f), v in found["power2022"].items()}
    print(json.dumps(found, indent=1, default=str))


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
