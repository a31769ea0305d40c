"""Learning curves and representation analysis of experiment.py's runs.

Usage (in the folder that holds the run_* directories):
    python plot.py                         # every run_* folder, or those named in `labels`
    python plot.py --runs=run_0,run_1 --out_dir=figures --no_tsne

Writes, into --out_dir (default: here):
    train_loss_{op}.png, val_loss_{op}.png, train_acc_{op}.png, val_acc_{op}.png
    pca_{run}_{op}_{layer}.png, tsne_{run}_{op}_{layer}.png   before / during / after grokking
    metrics_{run}_{op}_{layer}.png                            cluster metrics over training
    metrics.csv, metrics.parquet                              every number, one tidy table
    leadlag.csv, spikes.csv                                   who moves first; spikes after grokking per seed
    earlywarning_applied.csv                                  the frozen early-warning rules on every job
    analysis_summary.md                                       paste-ready summary for notes.txt
Phases, metrics, spikes, lead-lag and the cache are described in docs/analysis.md.
The machinery (reading runs, the lead-lag and spike analyses, the process pool, the cache, the tables and the
notes.txt block) is in lab/analysis.py and lab/report.py, a sweep's figures in lab/figures.py; this file holds the
figures of runs.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lab import report  # noqa: E402
from lab.figures import save  # noqa: E402
from lab.analysis import (LEADLAG_HALF_WIDTH, TrainedJob, completion, describe_grokking, end_state,  # noqa: E402
                          grok_summary, is_trivial, leadlag_end, leadlag_table, load_snapshot, mean_stderr,
                          measure_label, measure_series, phase_snapshots, reads_tag, read_examples, read_log, warn)
from lab.files import atomic_write, read_json  # noqa: E402
from lab.projection import aligned_frames, centroid_axes  # noqa: E402
from lab.schema import FINAL_KEYS, GROKKED_ABOVE, LAYERS, METRIC_SPLITS, METRIC_TITLES, MODEL_MEASURES  # noqa: E402

# Run folders -> legend names. Empty: every run_* folder under its own name.
labels = {}

CURVES = [("train_loss", "Training loss"), ("val_loss", "Validation loss"),
          ("train_acc", "Training accuracy"), ("val_acc", "Validation accuracy")]


@dataclass
class Settings:
    """Knobs of the analysis; part of every cache key."""

    tsne: bool = True  # draw t-SNE figures
    tsne_per_class: int = 6  # t-SNE subsample: points per answer class (stratified, seeded)
    tsne_max_points: int = 600  # ... and at most this many in all
    tsne_iterations: int = 400  # t-SNE optimisation steps per panel
    scatter_max_points: int = 4000  # PCA scatter: at most this many points drawn
    gif_points: int = 2000  # projection GIFs: points drawn per frame (a fixed seeded subsample)
    gif_dpi: int = 80  # projection GIFs: resolution (5 x 5.3 inches)
    seed: int = 0  # seed of every subsample and of t-SNE (metric subsamples: the job's split seed)


# ----------------------------------------------------------------------------- figures
def mark_grokking(ax, pairs: list, color) -> None:
    """A dotted line at each grokked seed's step; seeds that never grokked get none."""
    for p in pairs:
        if p.grok_step is not None:
            ax.axvline(p.grok_step, color=color, linestyle=":", linewidth=1, alpha=0.8)


def mark_spikes(ax, pairs: list, key: str, color) -> None:
    """Shade each seed's spikes after grokking; an x on the last value of a seed that ends inside one."""
    for p in pairs:
        state = end_state(p)  # a seed that never grokked has no spikes
        for spike in state["spikes"]:
            ax.axvspan(spike["from_step"], spike["end"], color=color, alpha=0.12, linewidth=0)
        last = p.log[-1]
        if state["ends_in_spike"] and isinstance(last.get(key), (int, float)):
            ax.plot([last["step"]], [last[key]], marker="x", color=color, markersize=8, mew=2)


def plot_curves(by_op: dict, run_names: dict, out_dir: str) -> list:
    """The template's 4 curve files per op; mean over seeds with a stderr band."""
    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for op, runs in by_op.items():
        for key, title in CURVES:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for i, (run, pairs) in enumerate(runs.items()):
                color = colors[i % len(colors)]
                length = min(len(p.log) for p in pairs)
                steps = np.array([r["step"] for r in pairs[0].log[:length]])
                values = np.array([[r.get(key) if isinstance(r.get(key), (int, float)) else np.nan
                                    for r in p.log[:length]] for p in pairs], dtype=float)
                mean, err = mean_stderr(values)
                ax.plot(steps, mean, color=color,
                        label=f"{run_names[run]} (n={len(pairs)}; grokking step {describe_grokking(pairs)})")
                ax.fill_between(steps, mean - err, mean + err, color=color, alpha=0.2)
                for row in values:  # each seed, thin: a mean of seeds that grokked and seeds that did not is neither
                    ax.plot(steps, row, color=color, linewidth=0.5, alpha=0.35)
                mark_grokking(ax, pairs, color)
                mark_spikes(ax, pairs, key, color)
            ax.set_title(f"{title} across runs, {op}\n(mean ± stderr over seeds; thin: each seed; dotted: each seed's "
                         f"grokking step; shaded: spikes after grokking; x: a seed that ends in one)", fontsize=9)
            ax.set_xlabel("update step")
            ax.set_ylabel(title)
            if key.endswith("loss"):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            path = os.path.join(out_dir, f"{key}_{op}.png")
            save(fig, path)
            written.append((path, f"{title} of {op} against update step, one line per run (mean over seeds, "
                                  f"stderr band, a thin line per seed), dotted lines at each seed's grokking step, "
                                  f"spikes after grokking shaded, an x where a seed ends inside one."))
    return written


def color_key(op: str, n_classes: int) -> str:
    cycle = class_cycle(op, n_classes)
    if cycle is None:
        return "answer class"
    if not np.array_equal(cycle, np.arange(n_classes)):
        return ("top: k x discrete log of the answer mod p-1 (its place on the ring; 0 in black), bottom: discrete "
                "log")
    return "top: k x answer mod p (its place on the ring of frequency k), bottom: answer (cyclic map)"


def class_colors(op: str, y: np.ndarray, n_classes: int, freq=None):
    """A colour per answer: its place on the op's cycle (cyclic map): the residue, or for x_div_y its discrete
    logarithm (0, which has none, black). With freq = k, its place on the circle of frequency k (k * position
    mod m), so that a Fourier ring of that frequency shows as an ordered colour wheel."""
    cycle = class_cycle(op, n_classes)
    cmap = plt.get_cmap("viridis" if cycle is None else "twilight")
    if cycle is None:
        return cmap(y / max(n_classes, 1))
    position = np.full(n_classes, np.nan)
    position[cycle] = (np.arange(len(cycle)) * (freq or 1)) % len(cycle) / len(cycle)
    colors = cmap(np.nan_to_num(position[y]))
    colors[np.isnan(position[y])] = (0, 0, 0, 1)
    return colors


def class_cycle(op: str, n_classes: int):
    """For a cyclic op (its cycle in experiment.OPS), the answer classes in the order of their group (residues
    0..p-1; for x_div_y the powers g^0..g^(p-2) of a primitive root, 0 left out); None otherwise."""
    import experiment

    spec = experiment.OPS.get(op)
    return None if spec is None or spec.cycle is None else np.array(spec.cycle(n_classes)[1])


def projection_gif(pair: TrainedJob, layer: str, module: str, y, is_train, settings: Settings, out_dir: str) -> list:
    """proj_{run}_{op}_{layer}.gif: the class-centroid projection through every snapshot, aligned onto the final
    one (lab.projection.aligned_frames), so that motion in the GIF is motion of the representation, not of the
    axes."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    rng = np.random.RandomState(settings.seed)
    shown = np.sort(rng.permutation(len(y))[: settings.gif_points])
    loaded = []
    for snap in sorted(pair.snapshots, key=lambda s: s["step"]):
        try:
            loaded.append((snap, load_snapshot(snap["path"])[module]))
        except Exception as e:
            warn(f"{snap['path']} unreadable ({type(e).__name__}); left out of the animation")
    if len(loaded) < 2:
        return []
    cycle = class_cycle(pair.op, int(y.max()) + 1)
    aligned, axes_name, freq = aligned_frames(loaded, y, cycle, shown)
    limit = np.percentile(np.abs(np.concatenate([a[1] for a in aligned])), 99) * 1.1
    n_classes = int(y.max()) + 1
    fig, ax = plt.subplots(figsize=(5, 5.3))

    def draw(i):
        snap, points, centroids, share = aligned[i]
        ax.clear()
        scatter_panel(ax, points, y[shown], is_train[shown], pair.op, n_classes, freq)
        ax.scatter(centroids[:, 0], centroids[:, 1], c=class_colors(pair.op, np.unique(y), n_classes, freq), s=28,
                   edgecolors="black", linewidths=0.4)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_title(f"{pair.run} {pair.op} seed {pair.seed}, {layer} layer\nstep {snap['step']}, "
                     f"val acc {snap['val_acc']:.2f}; {axes_name}: {100 * share.sum():.0f}% of their variance"
                     + (f"\ncolour: the answer's place on the ring, k x position mod {len(cycle)}" if freq else ""),
                     fontsize=8)

    path = os.path.join(out_dir, f"proj_{pair.run}_{pair.op}_{layer}.gif".replace(os.sep, "_"))
    try:
        atomic_write(path, lambda tmp: FuncAnimation(fig, draw, frames=len(aligned)).save(
            tmp, writer=PillowWriter(fps=2), dpi=settings.gif_dpi))
    finally:
        plt.close(fig)
    if os.path.getsize(path) > 5 * 2**20:
        warn(f"{path} is {os.path.getsize(path) / 2**20:.1f} MiB, over 5 MiB: lower Settings.gif_points or gif_dpi")
    return [(path, f"Animation of the {layer} layer of {pair.op} (run {pair.run}, seed {pair.seed}) through all "
                   f"{len(aligned)} snapshots on the final snapshot's {axes_name}, aligned to the final frame, "
                   "step and val accuracy in each frame.")]


def stratified_subsample(y: np.ndarray, per_class: int, max_points: int, seed: int) -> np.ndarray:
    """Fixed, seeded: up to per_class rows of each class, at most max_points in all, sorted."""
    rng = np.random.RandomState(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    rows = np.concatenate(chosen)
    if len(rows) > max_points:
        rows = rng.choice(rows, max_points, replace=False)
    return np.sort(rows)


def scatter_panel(ax, xy, y, is_train, op, n_classes, freq=None):
    colors = class_colors(op, y, n_classes, freq)
    ax.scatter(xy[is_train, 0], xy[is_train, 1], c=colors[is_train], s=4, marker="o", linewidths=0, label="train")
    ax.scatter(xy[~is_train, 0], xy[~is_train, 1], c=colors[~is_train], s=10, marker="x", linewidths=0.6,
               label="val")
    ax.set_xticks([])
    ax.set_yticks([])


def representation_figures(pair: TrainedJob, settings: Settings, out_dir: str) -> list:
    """PCA and t-SNE before/during/after for both layers of one (run, op, seed)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    panels = phase_snapshots(pair)
    if not panels:
        return []
    y, is_train = read_examples(pair.folder)
    n_classes = int(y.max()) + 1
    loaded = []
    for label, snap in panels:
        try:
            loaded.append((label, snap, load_snapshot(snap["path"])))
        except Exception as e:
            warn(f"{snap['path']} unreadable ({type(e).__name__}); left out of the figures")
    written = []
    base = f"{pair.run}_{pair.op}".replace(os.sep, "_")
    grok = f"grokked at step {pair.grok_step}" if pair.grok_step is not None else "never grokked"
    rng = np.random.RandomState(settings.seed)
    shown = np.sort(rng.permutation(len(y))[: settings.scatter_max_points])
    tsne_rows = stratified_subsample(y, settings.tsne_per_class, settings.tsne_max_points, settings.seed)
    for layer, module in pair.modules.items():
        fig, axes = plt.subplots(2, len(loaded), figsize=(4.2 * len(loaded), 8.8), squeeze=False)
        for ax, plain, (label, snap, tensors) in zip(axes[0], axes[1], loaded):
            x = tensors[module]
            mean, directions, share, axes_name, freq = centroid_axes(x, y, class_cycle(pair.op, int(y.max()) + 1))
            scatter_panel(ax, (x[shown] - mean) @ directions.T, y[shown], is_train[shown], pair.op, n_classes, freq)
            ax.set_title(f"{label}: step {snap['step']}, val acc {snap['val_acc']:.2f}\n"
                         f"{axes_name}: {100 * share.sum():.1f}% of their variance", fontsize=8)
            pca = PCA(n_components=2, random_state=settings.seed).fit(x)
            scatter_panel(plain, pca.transform(x[shown]), y[shown], is_train[shown], pair.op, n_classes)
            plain.set_title(f"plain PCA of all pairs: PC1+PC2 explain {100 * pca.explained_variance_ratio_.sum():.1f}% "
                            f"({100 * pca.explained_variance_ratio_[0]:.1f}% + "
                            f"{100 * pca.explained_variance_ratio_[1]:.1f}%)", fontsize=8)
        axes[0][0].legend(fontsize=7, loc="lower left", markerscale=2)
        fig.suptitle(f"{layer} block ({module}) at the answer position: {pair.run}, {pair.op}, seed {pair.seed}, "
                     f"{grok}\ntop: projected on the class centroids' axes (cyclic ops: their strongest Fourier plane, where a "
                     f"Fourier representation is a ring); "
                     f"bottom: plain PCA; colour = {color_key(pair.op, n_classes)}, o train, x val", fontsize=9, y=1.01)
        fig.tight_layout()
        path = os.path.join(out_dir, f"pca_{base}_{layer}.png")
        save(fig, path)
        written.append((path, f"The {layer} layer of {pair.op} (run {pair.run}, seed {pair.seed}) before, during and "
                              "after grokking, projected on the class centroids' principal axes (top) and by plain "
                              "PCA (bottom), coloured by answer class."))
        written += projection_gif(pair, layer, module, y, is_train, settings, out_dir)
        if not settings.tsne:
            continue
        fig, axes = plt.subplots(1, len(loaded), figsize=(4.2 * len(loaded), 4.4), squeeze=False)
        init = "pca"
        for ax, (label, snap, tensors) in zip(axes[0], loaded):
            x = tensors[module][tsne_rows]
            tsne = TSNE(n_components=2, init=init, random_state=settings.seed, max_iter=settings.tsne_iterations,
                        perplexity=min(30.0, (len(x) - 1) / 3))
            xy = tsne.fit_transform(x)
            init = xy / max(np.std(xy[:, 0]), 1e-12) * 1e-4  # next panel starts from this layout, rescaled
            scatter_panel(ax, xy, y[tsne_rows], is_train[tsne_rows], pair.op, n_classes)
            ax.set_title(f"{label}: step {snap['step']}, val acc {snap['val_acc']:.2f}", fontsize=8)
        axes[0][0].legend(fontsize=7, loc="lower left", markerscale=2)
        fig.suptitle(f"t-SNE of the {layer} block ({module}): {pair.run}, {pair.op}, seed {pair.seed}, {grok}; "
                     f"{len(tsne_rows)} pairs stratified by class; each panel starts from the previous layout",
                     fontsize=9, y=1.0)
        path = os.path.join(out_dir, f"tsne_{base}_{layer}.png")
        save(fig, path)
        written.append((path, f"t-SNE of the {layer} layer of {pair.op} (run {pair.run}, seed {pair.seed}) at the "
                              "same three snapshots, each panel initialised from the previous one."))
    return written


def plot_over_seeds(ax, rows: list, color, label: str, marker=None, each_seed=False) -> None:
    """Mean ± stderr over seeds of one metric's rows, at the steps every seed has.

    each_seed: also a thin line per seed through all of its own steps (the threshold snapshots around
    its transition are its own, so the mean cannot show them).
    """
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["step"]] = r["value"]
    if not by_seed:
        return
    if each_seed:
        for values in by_seed.values():
            steps = sorted(values)
            ax.plot(steps, [values[s] for s in steps], color=color, linewidth=0.6, alpha=0.45)
    common = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    mean, err = mean_stderr(np.array([[v[s] for s in common] for v in by_seed.values()]))
    ax.plot(common, mean, color=color, marker=marker, markersize=3, label=f"{label} (n={len(by_seed)})")
    ax.fill_between(common, mean - err, mean + err, color=color, alpha=0.2)


def metric_figures(run: str, op: str, pairs: list, rows: list, out_dir: str) -> list:
    """Each metric against step for one (run, op, layer): mean ± stderr over seeds, val acc on a twin axis."""
    written = []
    length = min(len(p.log) for p in pairs)
    log_steps = np.array([r["step"] for r in pairs[0].log[:length]])
    val_mean = np.mean([[r["val_acc"] for r in p.log[:length]] for p in pairs], axis=0)
    steps_grokked, _ = grok_summary(pairs)
    for layer in LAYERS:
        mine = [r for r in rows if r["layer"] == layer]
        if not mine:
            continue
        fig, axes = plt.subplots(3, 4, figsize=(18, 11))
        for ax, metric in zip(axes.flat, METRIC_SPLITS):
            for j, split in enumerate(METRIC_SPLITS[metric]):
                plot_over_seeds(ax, [r for r in mine if r["metric"] == metric and r["split"] == split],
                                f"C{j}", split, marker="o", each_seed=True)
            twin = ax.twinx()
            twin.plot(log_steps, val_mean, color="grey", linewidth=0.8, alpha=0.7)
            twin.set_ylim(-0.02, 1.02)
            twin.set_ylabel("val acc (grey)", fontsize=7)
            for s in steps_grokked:
                ax.axvline(s, color="black", linestyle=":", linewidth=1)
            ax.set_title(METRIC_TITLES[metric], fontsize=8)
            ax.set_xlabel("update step", fontsize=7)
            ax.legend(fontsize=6, loc="best")
            ax.grid(alpha=0.3)
        axes.flat[-1].axis("off")
        axes.flat[-1].text(0.0, 0.5, f"{run}, {op}, {layer} layer\nmean ± stderr over seeds at the steps\n"
                                     f"every seed was measured; thin lines: each seed\n"
                                     f"at all of its own steps; dotted: grokking steps\n"
                                     f"grokking step: {describe_grokking(pairs)}", fontsize=9, va="center")
        fig.suptitle(f"Representation geometry of the {layer} layer over training: {run}, {op}", fontsize=11)
        fig.subplots_adjust(wspace=0.5, hspace=0.35)
        path = os.path.join(out_dir, f"metrics_{run}_{op}_{layer}.png".replace(os.sep, "_"))
        save(fig, path)
        written.append((path, f"The {len(METRIC_SPLITS)} representation metrics of the {layer} layer of {op} (run {run}) against step, "
                              "mean ± stderr over seeds, with val accuracy on a twin axis and grokking marked."))
    return written


def plugin_figures(run: str, op: str, pairs: list, rows: list, out_dir: str) -> list:
    """The model- and embedding-level measures (measures plugin, norms, fourier, rqi) against step."""
    written = []
    base = f"{run}_{op}".replace(os.sep, "_")
    grokked, _ = grok_summary(pairs)
    present = [(m, title) for m, title in MODEL_MEASURES.items() if any(r["metric"] == m for r in rows)]
    if not present:
        return written
    columns = min(4, len(present))
    n_rows = math.ceil(len(present) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.6 * columns, 3.6 * n_rows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, (metric, title) in zip(axes.flat, present):
        plot_over_seeds(ax, [r for r in rows if r["metric"] == metric], "C0", "mean over seeds")
        for s in grokked:
            ax.axvline(s, color="black", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("update step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Model-level measures: {run}, {op} (mean ± stderr over seeds; dotted: grokking steps)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"plugins_{base}.png")
    save(fig, path)
    names = ", ".join(m for m, _ in present)
    written.append((path, f"{names} of {op} (run {run}) against step, mean ± stderr over seeds, grokking marked."))
    shown = next((p for p in pairs if os.path.exists(os.path.join(p.folder, "fourier.jsonl"))), None)
    if shown is not None:
        spectra = {r["step"]: r for r in read_log(os.path.join(shown.folder, "fourier.jsonl"),
                                                   required=("step", "spectrum"))}
        fig, ax = plt.subplots(figsize=(8, 3.8))
        for j, (label, snap) in enumerate(phase_snapshots(shown) or []):
            step = min(spectra, key=lambda s: abs(s - snap["step"]))
            spectrum = spectra[step]["spectrum"]
            ax.bar(np.arange(len(spectrum)) + (j - 1) * 0.3, spectrum, width=0.3, color=f"C{j}",
                   label=f"{label}: step {step}, top-k {spectra[step]['topk_frac']:.2f}, "
                         f"key freqs {spectra[step]['key_freqs']}")
        ax.set_xlabel("frequency k")
        ax.set_ylabel("share of the embedding's power")
        ax.set_title(f"Fourier spectrum of the token embedding, {run}, {op}, seed {shown.seed}", fontsize=9)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, f"fourier_{base}.png")
        save(fig, path)
        written.append((path, f"The token embedding's Fourier spectrum of {op} (run {run}, seed {shown.seed}) "
                              "before, during and after grokking."))
    return written



def final_keys_figure(run: str, op: str, pairs: list, key_rows: list, out_dir: str) -> list:
    """Nanda et al. 2023's Figure: train, test, restricted and excluded loss (the final model's key frequencies,
    from the checkpoints; dashed: each step's, from the measures plugin) with the three phase ends, per seed."""
    from lab.final_keys import per_step_rows

    by_seed = {p.seed: p for p in pairs}
    shown = [k for k in key_rows if k["seed"] in by_seed][:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 4), squeeze=False)
    for ax, k in zip(axes[0], shown):
        pair = by_seed[k["seed"]]
        rows = read_json(os.path.join(pair.folder, FINAL_KEYS))["rows"]
        steps = [r["step"] for r in rows]
        for key, label, color in (("train_loss", "train loss", "C0"), ("test_loss", "test loss", "C1"),
                                  ("restricted_loss", "restricted loss", "C2"),
                                  ("excluded_loss", "excluded loss (train)", "C3")):
            ax.plot(steps, [r[key] for r in rows], color=color, label=label, linewidth=1.3)
        per_step = per_step_rows(pair.folder)
        for key, color in (("restricted_loss", "C2"), ("excluded_loss", "C3")):
            points = [(r["step"], r[key]) for r in per_step if r[key] is not None]
            if points:
                ax.plot(*zip(*points), color=color, linestyle="--", linewidth=0.8, alpha=0.7)
        for key, style in (("memorisation_end", ":"), ("test_loss_peak", (0, (1, 4))), ("circuit_formation_end", "-."),
                           ("cleanup_end", "--")):
            if k[key] is not None:
                ax.axvline(k[key], color="black", linestyle=style, linewidth=0.9,
                           label=f"{key.replace('_', ' ')} {k[key]:.0f}")
        ax.set_yscale("log")
        ax.set_xlabel("update step")
        ax.set_title(f"seed {k['seed']}: key freqs {k['key_freqs']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Progress measures, {run}, {op}: solid, the final model's key frequencies (checkpoints); "
                 "dashed, each step's (measures plugin)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"final_keys_{run}_{op}".replace(os.sep, "_") + ".png")
    save(fig, path)
    return [(path, f"Train, test, restricted and excluded loss of {op} (run {run}) per seed, with the final model's "
                   "key frequencies and each step's, and the three phases' ends (Nanda et al. 2023's Figure 7).")]


def progress_figure(run: str, op: str, pairs: list, rows: list, leadlag: list, out_dir: str) -> list:
    """Every measure's progress (0 to 1 between the memorisation step and the end) on one time axis aligned on each
    seed's grokking step, as a heatmap ordered by mean lead, with the leads beside it."""
    full_table = leadlag_table(leadlag)
    table = [t for t in full_table if t["n"] or t["t50_n"]]
    grokked = [p for p in pairs if p.grok_step is not None and p.memorisation_step is not None]
    if not table or not grokked:
        return []
    grid = np.arange(min(p.memorisation_step - p.grok_step for p in grokked),
                     max(p.log[-1]["step"] - p.grok_step for p in grokked) + 1, 25, dtype=float)
    image = np.full((len(table), len(grid)), np.nan)
    series = {p.seed: measure_series(p, [r for r in rows if r["seed"] == p.seed]) for p in grokked}
    ends = {p.seed: leadlag_end(p) for p in grokked}
    for row, t in enumerate(table):
        curves = []
        for p in grokked:
            key = (t["layer"], t["split"], t["measure"])
            found = (completion(*series[p.seed][key], p.memorisation_step, end=ends[p.seed])
                     if key in series[p.seed] else None)
            if found is None:
                continue
            _, steps, progress = found
            relative = steps - p.grok_step
            curve = np.interp(grid, relative, np.clip(progress, 0, 1), left=np.nan, right=np.nan)
            curves.append(curve)
        if curves:
            stacked = np.array(curves)
            seen = np.isfinite(stacked).sum(0)
            image[row] = np.where(seen > 0, np.nansum(stacked, 0) / np.maximum(seen, 1), np.nan)
    height = 1.6 + 0.24 * len(table)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(15, height), gridspec_kw={"width_ratios": [3, 1.2]}, sharey=True)
    mesh = ax.imshow(image, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                     extent=(grid[0], grid[-1], len(table) - 0.5, -0.5))
    ax.axvline(0, color="white", linestyle="--", linewidth=1)
    ax.scatter([t["onset_from_grok"] for t in table], range(len(table)), marker="o", color="white", s=14,
               edgecolors="black", linewidths=0.5, label="mean onset (leaves its post-memorisation band)")
    ax.scatter([t["t50_from_grok"] for t in table], range(len(table)), marker="|", color="white", s=60,
               label="mean t50 (half the change done)")
    ax.legend(fontsize=7, loc="lower left")
    labels = [measure_label(t["layer"], t["split"], t["measure"]) + reads_tag(t["reads"]) for t in table]
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels(labels, fontsize=7)
    for tick, t in zip(ax.get_yticklabels(), table):
        if t["layer"] == "log" and t["split"] == "val" and t["measure"] == "acc":
            tick.set_fontweight("bold")
            tick.set_color("crimson")
    ax.set_xlabel(f"update step relative to each seed's grokking step (val acc > {GROKKED_ABOVE})")
    fig.colorbar(mesh, ax=ax, fraction=0.03, pad=0.01).set_label("share of the change completed (0 to 1)")
    means = np.array([t["lead_mean"] for t in table])
    errs = np.array([[m - t["lead_lo"], t["lead_hi"] - m] if t["n"] > 1 else [0, 0] for m, t in zip(means, table)]).T
    colors = ["crimson" if is_trivial(t) and t["split"] == "val" else "C2" if t["n"] > 1 and t["lead_lo"] > 0
              else "C3" if t["n"] > 1 and t["lead_hi"] < 0 else "grey" for t in table]
    bars.barh(range(len(table)), means, xerr=np.nan_to_num(errs), color=colors, height=0.6,
              error_kw={"linewidth": 0.8})
    bars.axvline(0, color="black", linewidth=0.8)
    for i, t in enumerate(table):
        bars.text(1.0, i, f" {t['leads']}/{t['n']}", va="center", fontsize=6, transform=bars.get_yaxis_transform())
    bars.set_xlabel("onset lead over val acc's onset (steps; mean, 95% bootstrap interval over seeds)\n"
                    "green: interval above 0, red: below 0; k/n: seeds in which it leaves first")
    bars.grid(axis="x", alpha=0.3)
    never = [t for t in full_table if not t["n"] and not t["t50_n"]]
    steps_text = ", ".join(str(p.grok_step) for p in grokked)
    cut = ", ".join(f"seed {seed} at step {end}" for seed, end in ends.items() if end is not None)
    fig.suptitle(f"Who moves first: {run}, {op}; {len(grokked)} grokked seed(s) (grokking steps {steps_text}), "
                 f"{len(pairs) - len(grokked)} left out\nrows ordered by mean onset lead (top: first to move); colour: "
                 f"mean over seeds of each measure's progress, running median over ±{LEADLAG_HALF_WIDTH} steps"
                 + (f"; {len(never)} measure(s) never change (see analysis_summary.md)" if never else "")
                 + (f"\nread up to the evaluation before a spike that lasts to the end: {cut}" if cut else ""),
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"progress_{run}_{op}.png".replace(os.sep, "_"))
    save(fig, path)
    return [(path, f"Every measure of {op} (run {run}) as the share of its change completed, aligned on each seed's "
                   "grokking step and ordered by its onset lead over validation accuracy (top: leaves its "
                   "post-memorisation band first), with the onset leads (mean, 95% bootstrap interval, seeds "
                   "leading) beside it; [reads val labels] marks a reference, not a predictor.")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="", help="comma-separated run folders (default: `labels`, else run_*)")
    parser.add_argument("--out_dir", default=".", help="where figures, tables and the summary go")
    parser.add_argument("--no_tsne", action="store_true", help="skip the t-SNE figures")
    parser.add_argument("--workers", type=int, default=0, help="parallel processes (default: one per core)")
    parser.add_argument("--warning_rules", default="",
                        help="a frozen early-warning rules file to apply to the runs (default: the shipped "
                             "lab/earlywarning_rules.json; none: apply none); writes earlywarning_applied.csv")
    parser.add_argument("--notes", default="notes.txt",
                        help="the notes file whose findings block is rewritten (empty: leave notes alone)")
    return parser.parse_args(argv)



if __name__ == "__main__":
    raise SystemExit(report.main(sys.modules[__name__], parse_args()))
