"""The figures of a sweep, which no idea changes: each op's phase diagram and per-cell heatmaps, and the
early-warning figure (every rule against the configuration, with intervals); and the atomic save that every figure
of plot.py uses. Definitions in docs/analysis.md ("Sweeps", "Early warning")."""

import itertools
import os
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from lab.earlywarning import FAMILIES, PRIMARY  # noqa: E402
from lab.files import atomic_write  # noqa: E402
from lab.phases import GROK_DELAY_RATIO, PHASES  # noqa: E402
from lab.schema import GROKKED_ABOVE, MEMORISED_AT  # noqa: E402


def save(fig, path: str) -> None:
    """Write a figure atomically."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


PHASE_COLORS = {"no fit": "#9e9e9e", "memorise": "#d62728", "grok": "#1f77b4", "fit": "#2ca02c", "mixed": "#f2c14e"}
PHASE_STATS = [("share_grokked", f"share of seeds with val acc > {GROKKED_ABOVE} (grok or fit)", "viridis", "{:.2f}"),
               ("grok_step_mean", f"step val acc > {GROKKED_ABOVE} (over those seeds)", "magma_r", "{:.0f}"),
               ("delay_mean", f"memorisation-to-val-acc-{GROKKED_ABOVE} delay (steps; those seeds)", "magma_r",
                "{:.0f}"),
               ("final_val_acc_mean", "final val accuracy", "viridis", "{:.2f}")]


def _phase_grids(sweep: dict, cells: list):
    """(suffix, title, x field, x values, y field or None, y values, [(row, column, cell row), ...]) per figure:
    the first two fields are the axes, one figure per combination of any further fields."""
    fields, values = sweep["fields"], sweep["values"]
    x, y = fields[0], fields[1] if len(fields) > 1 else None
    xs, ys, rest = values[x], values[y] if y else [None], fields[2:]
    for combo in itertools.product(*(values[f] for f in rest)):
        fixed = dict(zip(rest, combo))
        placed = [(ys.index(c[y]) if y else 0, xs.index(c[x]), c) for c in cells
                  if all(c[f] == v for f, v in fixed.items())]
        yield "".join(f"_{f}={v}" for f, v in fixed.items()), ", ".join(f"{f}={v}" for f, v in fixed.items()), \
            x, xs, y, ys, sorted(placed, key=lambda p: p[:2])


def phase_figures(sweep: dict, op: str, cells: list, out_dir: str) -> list:
    """A sweep's phase diagram of one op: the phase of every cell (phase_map_*) and four heatmaps (phase_stats_*),
    each cell annotated with its number and n; a 1-D sweep gives lines with stderr bands."""
    run, written = sweep["run"], []
    rule = (f"phase of a seed: no fit (train acc never >= {MEMORISED_AT}), memorise (val acc never > {GROKKED_ABOVE}), "
            f"grok (val acc > {GROKKED_ABOVE} at least {GROK_DELAY_RATIO:g}x the memorisation step after "
            "memorisation), fit (sooner); of a "
            "cell: that of more than half its seeds, else mixed")
    for suffix, fixed, x, xs, y, ys, placed in _phase_grids(sweep, cells):
        name = f"{run}_{op}{suffix}".replace(os.sep, "_")
        fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 0.9 * len(ys) + 2.2))
        image = np.full((len(ys), len(xs)), np.nan)
        for i, j, c in placed:
            image[i, j] = PHASES.index(c["phase"])
            step = "" if c["grok_step_mean"] is None else f"\n{c['grok_step_mean']:.0f}"
            ax.text(j, i, f"{c['phase']}\n{c['grokked']}/{c['n']} grok{step}", ha="center", va="center", fontsize=7,
                    color=_ink(matplotlib.colors.to_rgba(PHASE_COLORS[c["phase"]])))
        ax.imshow(image, cmap=ListedColormap([PHASE_COLORS[p] for p in PHASES]), vmin=-0.5, vmax=len(PHASES) - 0.5,
                  origin="lower", aspect="auto")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_yticks(range(len(ys)), [str(v) for v in ys] if y else [])
        ax.set_xlabel(x)
        ax.set_ylabel(y or "")
        ax.legend(handles=[Patch(color=PHASE_COLORS[p], label=p) for p in PHASES], fontsize=7,
                  bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.set_title(f"Phases of {op}, sweep {run}{' (' + fixed + ')' if fixed else ''}: seeds grokked / n, mean "
                     "grokking step\n" + "\n".join(textwrap.wrap(rule, 95)), fontsize=8)
        path = os.path.join(out_dir, f"phase_map_{name}.png")
        save(fig, path)
        written.append((path, f"Phase diagram of {op} over {x}{' x ' + y if y else ''} (sweep {run}): each cell "
                              f"coloured by its phase, annotated with seeds grokked / n and the mean grokking step; "
                              f"{rule}."))
        fig, axes = plt.subplots(2, 2, figsize=(2 * (1.2 * len(xs) + 2), 2 * (0.8 * len(ys) + 1.6)) if y
                                 else (10, 6.5))
        for ax, (key, title, cmap, fmt) in zip(axes.flat, PHASE_STATS):
            if y is None:  # 1-D: mean with a stderr band against the field
                found = [(xs[j], c) for _, j, c in placed if c[key] is not None]
                if found:
                    xv, mean = np.array([f[0] for f in found], float), np.array([f[1][key] for f in found], float)
                    spread = key[:-5] + "_stderr" if key.endswith("_mean") else None  # a share has no stderr
                    err = np.array([(f[1].get(spread) if spread else 0) or 0 for f in found], float)
                    ax.plot(xv, mean, marker="o")
                    ax.fill_between(xv, mean - err, mean + err, alpha=0.25)
                    for v, m, f in zip(xv, mean, found):
                        n = f[1]["grokked"] if key in ("grok_step_mean", "delay_mean") else f[1]["n"]
                        ax.annotate(f"n={n}", (v, m), fontsize=6, textcoords="offset points", xytext=(0, 5))
                    if min(xv) > 0 and max(xv) >= 10 * min(xv):
                        ax.set_xscale("log")
                else:
                    ax.text(0.5, 0.5, "no seed grokked", ha="center", va="center", transform=ax.transAxes)
                if key in ("share_grokked", "final_val_acc_mean"):
                    ax.set_ylim(-0.03, 1.03)
                ax.set_xlabel(x)
                ax.set_title(title + (" (mean ± stderr)" if key.endswith("_mean") else ""), fontsize=8)
                ax.grid(alpha=0.3)
                continue
            image = np.full((len(ys), len(xs)), np.nan)
            for i, j, c in placed:
                image[i, j] = np.nan if c[key] is None else c[key]
            mesh = ax.imshow(image, cmap=cmap, origin="lower", aspect="auto",
                             **({"vmin": 0, "vmax": 1} if key in ("share_grokked", "final_val_acc_mean") else {}))
            for i, j, c in ((i, j, c) for i, j, c in placed if c[key] is not None):
                n = c["grokked"] if key in ("grok_step_mean", "delay_mean") else c["n"]
                ax.text(j, i, f"{fmt.format(c[key])}\nn={n}", ha="center", va="center", fontsize=7,
                        color=_ink(mesh.cmap(mesh.norm(c[key]))))
            fig.colorbar(mesh, ax=ax, fraction=0.05)
            ax.set_xticks(range(len(xs)), [str(v) for v in xs])
            ax.set_yticks(range(len(ys)), [str(v) for v in ys])
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.set_title(title, fontsize=8)
        fig.suptitle(f"{op}, sweep {run}{' (' + fixed + ')' if fixed else ''}: per cell over its seeds (n: seeds "
                     "the number is over; blank: none)", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"phase_stats_{name}.png")
        save(fig, path)
        written.append((path, f"Per cell of sweep {run}, {op}: share of seeds whose val accuracy passed "
                              f"{GROKKED_ABOVE} (grok or fit), their mean step and memorisation-to-{GROKKED_ABOVE} "
                              "delay, final val accuracy; each cell "
                              "annotated with its value and n."))
    return written


def _ink(rgba) -> str:
    """Black or white text, whichever reads on a cell of this colour."""
    return "black" if 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5 else "white"


def _intervals(ax, rows: list, y, colour: dict, key: str, low: str, high: str, **style) -> None:
    """One dot per row at row[key] with its interval [row[low], row[high]] (None: nan), coloured by its role."""
    def column(k):
        return np.array([np.nan if t[k] is None else t[k] for t in rows], dtype=float)
    value, lo, hi = column(key), column(low), column(high)
    for role, c in colour.items():
        mine = np.array([t["role"] == role for t in rows])
        ax.errorbar(value[mine], y[mine], xerr=np.nan_to_num([value[mine] - lo[mine], hi[mine] - value[mine]]),
                    fmt="o", markersize=4, color=c, elinewidth=0.8, **style)


def earlywarning_figure(run: str, table: list, clock: list, counts: dict, out_dir: str) -> list:
    """Every rule of the sweep's early-warning table, baselines first: its held-out within-cell concordance, its
    held-out J (by cell; hollow: by op), and its clock slope, each with its 95% interval; colour: what it reads."""
    rows = [t for t in table if np.isfinite(t[f"c_{PRIMARY}"]) or np.isfinite(t["J"])]
    if not rows:
        return []
    family = next(iter(FAMILIES))
    slopes = {c["measure"]: c for c in clock if c["family"] == family}
    colour = {"baseline": "black", "predictor": "C0", "reference": "C1"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 1.8 + 0.22 * len(rows)), sharey=True)
    y = np.arange(len(rows))

    def dots(ax, key, low, high, **style):
        _intervals(ax, rows, y, colour, key, low, high, **style)

    dots(axes[0], f"c_{PRIMARY}", f"c_{PRIMARY}_lo", f"c_{PRIMARY}_hi")
    axes[0].axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set_xlabel(f"within-cell concordance with time to grokking, {PRIMARY} steps after memorisation\n"
                       "(held-out cells; 0.5: the configuration alone)")
    dots(axes[1], "J", "J_lo", "J_hi")
    axes[1].scatter([t["J_op"] for t in rows], y, facecolors="none", edgecolors="grey", s=18,
                    label="fitted on the other op")
    axes[1].axvline(0, color="grey", linestyle="--", linewidth=0.8)
    config = [t for t in rows if t["metric"] == "config_lookup" and np.isfinite(t["J"])]
    if config:  # the bar a measure must clear: alarms from the other seeds of the cell, no measurement
        axes[1].axvline(config[0]["J"], color="black", linestyle=":", linewidth=1, label="config lookup's J")
    axes[1].set_xlabel("J = hit rate - false-alarm rate\n(thresholds fitted on the other cells)")
    axes[1].legend(fontsize=7, loc="lower right")
    value = np.array([slopes[t["measure"]]["slope"] if t["measure"] in slopes else np.nan for t in rows])
    err = np.array([[v - slopes[t["measure"]]["slope_lo"], slopes[t["measure"]]["slope_hi"] - v]
                    if t["measure"] in slopes else [0, 0] for v, t in zip(value, rows)]).T
    axes[2].errorbar(value, y, xerr=np.nan_to_num(err), fmt="s", markersize=4, color="C2", elinewidth=0.8)
    for x in (0, 1):
        axes[2].axvline(x, color="grey", linestyle="--", linewidth=0.8)
    axes[2].set_xlabel(f"clock test: slope of onset on val acc's onset\nacross cells, {family} "
                       "(1: with grokking, 0: a clock)")
    axes[0].set_yticks(y, [f"{t['measure']} [{t['reads']}]" for t in rows], fontsize=7)
    for tick, t in zip(axes[0].get_yticklabels(), rows):
        tick.set_color(colour[t["role"]])
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Early warning, sweep {run}: {counts['positive']} runs reach val acc 0.5, {counts['negative']} never "
                 f"do, {counts['censored']} censored; 95% intervals (bootstrap over cells)\nblack: baselines (config), "
                 "blue: predictors (no validation labels), orange: references (read validation labels)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"earlywarning_{run}.png".replace(os.sep, "_"))
    save(fig, path)
    return [(path, f"Early warning over sweep {run}: per measure and baseline, the held-out within-cell concordance "
                   "of its value with the time to grokking (0.5: what the configuration alone gives), its held-out "
                   "hit - false-alarm rate, and its clock slope, each with a 95% interval; coloured by what it reads.")]


def frozen_figure(rules: dict, path: str, scores: list, out_dir: str) -> list:
    """The frozen rules on the runs they were applied to (lab.rules.frozen_scores): per rule, J here beside its
    held-out J on the sweep it was fitted on, and its within-cell concordance here, with 95% intervals; the config
    lookup on these runs as the line to beat."""
    rows = [s for s in scores if s["rule"] != "" and (np.isfinite(s["J"]) or np.isfinite(s[f"c_{PRIMARY}"]))]
    if not rows:
        return []
    config = next(s for s in scores if s["rule"] == "")
    colour = {"baseline": "black", "predictor": "C0", "reference": "C1"}
    rows.sort(key=lambda s: -np.nan_to_num(s["J"], nan=-2))
    fig, axes = plt.subplots(1, 2, figsize=(13, 2.2 + 0.24 * len(rows)), sharey=True)
    y = np.arange(len(rows))

    def bars(ax, key, y, **style):
        _intervals(ax, rows, y, colour, key, f"{key}_lo", f"{key}_hi", **style)

    bars(axes[0], "fitted_J", y - 0.2, alpha=0.35)
    bars(axes[0], "J", y + 0.1)
    if np.isfinite(config["J"]):
        axes[0].axvspan(config["J_lo"], config["J_hi"], color="black", alpha=0.08)
        axes[0].axvline(config["J"], color="black", linestyle=":", linewidth=1)
    axes[0].axvline(0, color="grey", linestyle="--", linewidth=0.8)
    sweep = rules["fitted_on"]["sweep"]
    axes[0].set_xlabel(f"J = hit rate - false-alarm rate\nfaint: held out on {sweep}; solid: here, frozen\n"
                       "dotted line, grey band: the config lookup here (other seeds of the cell)")
    bars(axes[1], f"fitted_c_{PRIMARY}", y - 0.2, alpha=0.35)
    bars(axes[1], f"c_{PRIMARY}", y + 0.1)
    axes[1].axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes[1].set_xlabel(f"within-cell concordance with time to grokking, {PRIMARY} steps after memorisation\n"
                       f"faint: held out on {sweep}; solid: here, in the rule's direction\n"
                       "0.5: what the configuration alone gives")
    axes[0].set_yticks(y, [f"{s['measure']} [{s['reads']}]" for s in rows], fontsize=7)
    for tick, s in zip(axes[0].get_yticklabels(), rows):
        tick.set_color(colour.get(s["role"], "black"))
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Frozen rules ({os.path.basename(path)}, fitted on {rules['fitted_on']['sweep']} at "
                 f"{rules['fitted_on']['commit'][:12]}) on these runs: {config['positives']} reach val acc 0.5, "
                 f"{config['negatives']} stay at chance; 95% intervals (Wilson counts, bootstrap over cells)\n"
                 "black: baselines (config), blue: predictors (no validation labels), orange: references (read "
                 "validation labels)", fontsize=9)
    fig.tight_layout()
    out = os.path.join(out_dir, "earlywarning_frozen.png")
    save(fig, out)
    return [(out, "The frozen early-warning rules on these runs: per rule its J and its within-cell concordance "
                  "here beside their held-out values on the sweep it was fitted on, against the config lookup here, "
                  "each with a 95% interval; coloured by what it reads.")]
