"""Learning curves and representation analysis of experiment.py's runs.

Usage (in the folder that holds the run_* directories):
    python plot.py                         # every run_* folder, or those named in `labels`
    python plot.py --runs=run_0,run_1 --out_dir=figures --no_tsne

Writes, into --out_dir (default: here):
    train_loss_{op}.png, val_loss_{op}.png, train_acc_{op}.png, val_acc_{op}.png
    pca_{run}_{op}_{layer}.png, tsne_{run}_{op}_{layer}.png   before / during / after grokking
    metrics_{run}_{op}_{layer}.png                            cluster metrics over training
    metrics.csv, metrics.parquet                              every number, one tidy table
    analysis_summary.md                                       paste-ready summary for notes.txt
Phases, metrics and the cache are described in README.md ("plot.py").
"""

import argparse
import glob
import functools
import hashlib
import inspect
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Run folders -> legend names. Empty: every run_* folder under its own name.
labels = {}

METRIC_SPLITS = {  # metric -> the splits it is computed on
    "silhouette": ("train", "val"),
    "davies_bouldin": ("train", "val"),
    "calinski_harabasz": ("train", "val"),
    "nc1": ("train", "val"),
    "ncc_acc": ("val",),
    "knn_acc": ("val",),
    "participation_ratio": ("all",),
}
METRIC_TITLES = {
    "silhouette": "silhouette (higher: tighter classes)",
    "davies_bouldin": "Davies-Bouldin (lower: better separated)",
    "calinski_harabasz": "Calinski-Harabasz (higher: better separated)",
    "nc1": "nc1 = tr(S_w S_b^+)/C (lower: collapsed)",
    "ncc_acc": "nearest-centroid acc (val, train centroids)",
    "knn_acc": "kNN acc (val, k=5 train neighbours)",
    "participation_ratio": "participation ratio (effective dim)",
}
LAYERS = ("first", "last")
PHASES = ("before", "during", "after")
CURVES = [("train_loss", "Training loss"), ("val_loss", "Validation loss"),
          ("train_acc", "Training accuracy"), ("val_acc", "Validation accuracy")]
CYCLIC_OPS = ("x_plus_y", "x_minus_y", "x_div_y")
# Bump to invalidate every cached metric (editing the metric functions themselves already does: see code_key).
ANALYSIS_VERSION = 1


@dataclass
class Settings:
    """Knobs of the analysis; part of every cache key."""

    silhouette_sample: int = 1500  # points per split for the silhouette (fixed seeded subsample)
    knn_k: int = 5  # neighbours for knn_acc
    knn_queries: int = 1000  # val points whose neighbours are looked up (fixed seeded subsample)
    tsne: bool = True  # draw t-SNE figures
    tsne_per_class: int = 6  # t-SNE subsample: points per answer class (stratified, seeded)
    tsne_max_points: int = 600  # ... and at most this many in all
    tsne_iterations: int = 400  # t-SNE optimisation steps per panel
    scatter_max_points: int = 4000  # PCA scatter: at most this many points drawn
    seed: int = 0  # seed of every subsample and of t-SNE


def warn(message: str) -> None:
    print(f"plot.py: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- reading runs
@dataclass
class Pair:
    """One (run, op, seed): its log, its result if finished, and its snapshots."""

    run: str
    op: str
    seed: int
    folder: str
    log: list
    final: dict | None
    snapshots: list = field(default_factory=list)  # index entries, with "path" and "val_acc"
    modules: dict = field(default_factory=dict)  # layer ("first"/"last") -> module name

    @property
    def grok_step(self):
        """step_val_acc_99, or None where val accuracy never exceeded 0.99."""
        if self.final is not None:
            return self.final["step_val_acc_99"] if self.final.get("grokked", True) else None
        return next((r["step"] for r in self.log if r["val_acc"] > 0.99), None)

    @property
    def memorisation_step(self):
        return next((r["step"] for r in self.log if r["train_acc"] >= 0.99), None)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_log(path: str, required=("step", "train_acc", "val_acc")) -> list:
    """Rows of a .jsonl log; a corrupt line is skipped with a warning."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                rows.append(row if all(k in row for k in required) else None)
            except json.JSONDecodeError:
                rows.append(None)
            if rows[-1] is None:
                rows.pop()
                warn(f"{path}: line {number} is corrupt, skipped")
    return rows


def val_acc_at(log: list, step: int) -> float:
    """Val accuracy of the last evaluation at or before step (nan before the first)."""
    known = [r["val_acc"] for r in log if r["step"] <= step]
    return known[-1] if known else float("nan")


def load_run(run_dir: str, name: str) -> list:
    """Every (op, seed) of a run with whatever it has finished so far."""
    try:
        config = read_json(os.path.join(run_dir, "config.json"))
        ops, seeds = config["ops"], config["seeds"]
    except (OSError, ValueError, KeyError) as e:
        warn(f"{run_dir}: no readable config.json ({e}); run skipped")
        return []
    pairs = []
    for op in ops:
        for seed in range(seeds):
            folder = os.path.join(run_dir, f"{op}_{seed}")
            log_path = os.path.join(folder, "log.jsonl")
            if not os.path.exists(log_path):
                continue  # not started yet
            log = read_log(log_path)
            if not log:
                warn(f"{log_path}: no readable rows; {op} seed {seed} skipped")
                continue
            final = None
            final_path = os.path.join(run_dir, f"final_info_{op}_{seed}.json")
            if os.path.exists(final_path):
                try:
                    final = read_json(final_path)
                except ValueError:
                    warn(f"{final_path} is corrupt; treated as unfinished")
            pair = Pair(name, op, seed, folder, log, final)
            index_path = os.path.join(folder, "activations", "index.json")
            if os.path.exists(index_path):
                try:
                    index = read_json(index_path)
                    pair.modules = {layer: module for layer, module in index["modules"].items()}
                    for snap in index["snapshots"]:
                        path = os.path.join(folder, "activations", snap["file"])
                        if not os.path.exists(path):
                            warn(f"{path} is listed in {index_path} but missing; skipped")
                            continue
                        val_acc = snap.get("val_acc", val_acc_at(log, snap["step"]))
                        pair.snapshots.append({**snap, "path": path, "val_acc": val_acc})
                except (ValueError, KeyError) as e:
                    warn(f"{index_path} is corrupt ({e}); {op} seed {seed} without snapshots")
            pairs.append(pair)
    if pairs and not any(p.snapshots for p in pairs):
        warn(f"{run_dir}: no activation snapshots; learning curves only")
    return pairs


PLUGIN_LOG_METRICS = {"param_norm": "all", "logit_norm": "train", "softmax_collapse": "train"}  # norms plugin
PLUGIN_FILES = {"fourier": ("topk_frac", "fourier_topk_frac"), "rqi": ("rqi", "rqi")}  # file -> (key, metric)


def plugin_rows(pair: Pair) -> list:
    """Rows of metrics.csv from what the norms, fourier and rqi plugins logged (layer `model` or `embedding`)."""
    rows = []

    def add(step, layer, split, metric, value):
        rows.append({"run": pair.run, "op": pair.op, "seed": pair.seed, "layer": layer, "step": step,
                     "phase": phase_of(val_acc_at(pair.log, step)), "split": split, "metric": metric,
                     "value": float(value)})

    for r in pair.log:
        for metric, split in PLUGIN_LOG_METRICS.items():
            if metric in r:
                add(r["step"], "model", split, metric, r[metric])
    for name, (key, metric) in PLUGIN_FILES.items():
        path = os.path.join(pair.folder, f"{name}.jsonl")
        if os.path.exists(path):
            for r in read_log(path, required=("step", key)):
                add(r["step"], "embedding", "all", metric, r[key])
    return rows


def phase_of(val_acc: float) -> str:
    """before (< 0.1), during (0.1 to < 0.99), after (>= 0.99); an unknown accuracy (step 0) is before."""
    if not val_acc >= 0.1:
        return "before"
    return "during" if val_acc < 0.99 else "after"


def phase_snapshots(pair: Pair) -> list:
    """[(label, snapshot)] x 3: last 'before' after memorisation (else step 0), nearest 0.5, final.

    A run that never grokked gets step 0, the middle snapshot and the final one.
    """
    snaps = sorted(pair.snapshots, key=lambda s: s["step"])
    if not snaps:
        return []
    final = snaps[-1]
    if pair.grok_step is None:
        return [("step 0", snaps[0]), ("middle", snaps[len(snaps) // 2]), ("final, never grokked", final)]
    memorised = pair.memorisation_step if pair.memorisation_step is not None else math.inf
    before = [s for s in snaps if phase_of(s["val_acc"]) == "before" and s["step"] >= memorised]
    first = before[-1] if before else snaps[0]
    during = min(snaps, key=lambda s: abs(s["val_acc"] - 0.5) if s["val_acc"] == s["val_acc"] else math.inf)
    return [("before", first), ("during", during), ("after", final)]


def discover_runs(args) -> dict:
    """Run folder -> legend name, from --runs, `labels` or every run_* folder."""
    if args.runs:
        chosen = {r: labels.get(r, r) for r in args.runs.split(",") if r}
    elif labels:
        chosen = dict(labels)
    else:
        chosen = {r: r for r in sorted(glob.glob("run_*")) if os.path.isdir(r)}
    found = {}
    for run, name in chosen.items():
        if os.path.isdir(run):
            found[run] = name
        else:
            warn(f"run folder {run} does not exist; skipped")
    return found


# ----------------------------------------------------------------------------- metrics
def load_snapshot(path: str) -> dict:
    from safetensors.numpy import load_file

    return {name: t.astype(np.float32) for name, t in load_file(path).items()}


def scatter_matrices(x: np.ndarray, y: np.ndarray):
    """(within-class S_w, between-class S_b, number of classes), both (d, d), class-balanced as in Papyan et al."""
    classes = np.unique(y)
    centroids = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - centroids[np.searchsorted(classes, y)]
    s_w = centred.T @ centred / len(x)
    between = centroids - centroids.mean(0)
    s_b = between.T @ between / len(classes)
    return s_w, s_b, len(classes)


def davies_bouldin(x: np.ndarray, y: np.ndarray) -> float:
    """sklearn's davies_bouldin_score, vectorised over classes (sklearn loops over them in Python)."""
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    x = x.astype(np.float64)
    centroids = np.add.reduceat(x[order], starts, axis=0) / counts[:, None]
    spread = np.bincount(inverse, weights=np.linalg.norm(x - centroids[inverse], axis=1)) / counts
    gaps = np.sqrt(np.clip((centroids ** 2).sum(1)[:, None] - 2 * centroids @ centroids.T
                           + (centroids ** 2).sum(1)[None], 0, None))
    if np.allclose(spread, 0) or np.allclose(gaps, 0):
        return 0.0
    np.fill_diagonal(gaps, np.inf)
    gaps[gaps == 0] = np.inf
    return float(np.max((spread[:, None] + spread[None]) / gaps, axis=1).mean())


def participation_ratio(x: np.ndarray) -> float:
    eig = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None)
    return float(eig.sum() ** 2 / (eig ** 2).sum())


def snapshot_metrics(x: np.ndarray, y: np.ndarray, is_train: np.ndarray, settings: Settings) -> list:
    """[(metric, split, value)] for one layer's representations x (n, d), labels y, split mask."""
    from sklearn.metrics import calinski_harabasz_score, silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    out = []
    for split, mask in (("train", is_train), ("val", ~is_train)):
        xs, ys = x[mask], y[mask]
        if len(np.unique(ys)) < 2 or len(ys) <= len(np.unique(ys)):
            continue
        sample = min(settings.silhouette_sample, len(ys))
        rng = np.random.RandomState(settings.seed)
        out.append(("silhouette", split, float(silhouette_score(xs, ys, sample_size=sample, random_state=rng))))
        out.append(("davies_bouldin", split, davies_bouldin(xs, ys)))
        out.append(("calinski_harabasz", split, float(calinski_harabasz_score(xs, ys))))
        s_w, s_b, n_classes = scatter_matrices(xs.astype(np.float64), ys)
        out.append(("nc1", split, float(np.trace(s_w @ np.linalg.pinv(s_b, rcond=1e-6, hermitian=True)) / n_classes)))
    x_train, y_train, x_val, y_val = x[is_train], y[is_train], x[~is_train], y[~is_train]
    if len(y_val) and len(y_train):
        classes = np.unique(y_train)
        centroids = np.stack([x_train[y_train == c].mean(0) for c in classes])
        distances = (centroids ** 2).sum(1) - 2 * x_val @ centroids.T  # + |x|^2, the same for every centroid
        out.append(("ncc_acc", "val", float((classes[distances.argmin(1)] == y_val).mean())))
        queries = np.random.RandomState(settings.seed).permutation(len(y_val))[: settings.knn_queries]
        knn = KNeighborsClassifier(n_neighbors=min(settings.knn_k, len(y_train)), algorithm="brute")
        predicted = knn.fit(x_train, y_train).predict(x_val[queries])
        out.append(("knn_acc", "val", float((predicted == y_val[queries]).mean())))
    out.append(("participation_ratio", "all", participation_ratio(x.astype(np.float64))))
    return out


def read_examples(folder: str):
    """(labels, is_train) of the example table, rows aligned with the snapshots."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(folder, "examples.parquet"), columns=["label", "split"])
    return table.column("label").to_numpy(), np.asarray(table.column("split").to_pylist()) == "train"


def file_key(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


@functools.cache
def code_key(kind: str) -> str:
    """Hash of the code behind cached results, so that editing it redraws or recomputes them.

    "metrics": the functions that compute the metrics (editing a figure leaves them cached);
    "figures": all of plot.py.
    """
    if kind == "metrics":
        functions = (load_snapshot, read_examples, scatter_matrices, davies_bouldin, participation_ratio,
                     snapshot_metrics, Settings)
        text = "".join(inspect.getsource(f) for f in functions)
    else:
        with open(os.path.abspath(__file__)) as f:
            text = f.read()
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def settings_key(settings: Settings, *extra) -> str:
    text = json.dumps([ANALYSIS_VERSION, vars(settings), *extra], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def pair_metrics(pair: Pair, settings: Settings, cache_dir: str) -> list:
    """Metric rows of every snapshot of a pair, cached per snapshot file."""
    cache_path = os.path.join(cache_dir, f"metrics_{pair.run}_{pair.op}_{pair.seed}.json".replace(os.sep, "_"))
    try:
        cache = read_json(cache_path)
    except (OSError, ValueError):
        cache = {}
    key_of = {s["file"]: settings_key(settings, code_key("metrics"), file_key(s["path"])) for s in pair.snapshots}
    missing = [s for s in pair.snapshots if cache.get(s["file"], {}).get("key") != key_of[s["file"]]]
    if missing:
        try:
            y, is_train = read_examples(pair.folder)
        except Exception as e:  # a corrupt or missing table: no metrics for this pair
            warn(f"{os.path.join(pair.folder, 'examples.parquet')} unreadable ({type(e).__name__}); "
                 f"no metrics for {pair.run} {pair.op} seed {pair.seed}")
            return []
        for snap in missing:
            try:
                tensors = load_snapshot(snap["path"])
                values = {}
                for layer, module in pair.modules.items():
                    x = tensors[module]
                    if x.shape[0] != len(y):
                        raise ValueError(f"{x.shape[0]} rows, the example table has {len(y)}")
                    values[layer] = snapshot_metrics(x, y, is_train, settings)
                cache[snap["file"]] = {"key": key_of[snap["file"]], "values": values}
            except Exception as e:  # truncated or corrupt file: skip it, analyse the rest
                warn(f"{snap['path']} unreadable ({type(e).__name__}: {e}); skipped")
                cache.pop(snap["file"], None)
        write_json(cache_path, cache)
    rows = []
    for snap in pair.snapshots:
        entry = cache.get(snap["file"])
        if entry is None or entry.get("key") != key_of[snap["file"]]:
            continue
        for layer, values in entry["values"].items():
            for metric, split, value in values:
                rows.append({"run": pair.run, "op": pair.op, "seed": pair.seed, "layer": layer,
                             "step": snap["step"], "phase": phase_of(snap["val_acc"]), "split": split,
                             "metric": metric, "value": value})
    return rows


def write_json(path: str, obj) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- figures
def save(fig, path: str) -> None:
    """Write a figure atomically."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial-{os.getpid()}{ext}"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def mean_stderr(values: np.ndarray):
    """Mean and stderr (ddof=1 std / sqrt(n)) over axis 0; stderr 0 for a single seed."""
    mean = values.mean(0)
    if len(values) < 2:
        return mean, np.zeros_like(mean)
    return mean, values.std(0, ddof=1) / np.sqrt(len(values))


def format_mean_stderr(values, mean_format: str, err_format: str) -> str:
    """'mean ± stderr' over seeds; one seed has no stderr, so it is shown alone, marked n=1."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:{mean_format}} (n=1)"
    mean, err = mean_stderr(values[:, None])
    return f"{mean[0]:{mean_format}} ± {err[0]:{err_format}}"


def grok_summary(pairs: list):
    """(steps of the grokked seeds, number of seeds)."""
    steps = [p.grok_step for p in pairs if p.grok_step is not None]
    return steps, len(pairs)


def describe_grokking(pairs: list) -> str:
    steps, n = grok_summary(pairs)
    if not steps:
        return f"never grokked (0/{n} seeds)"
    shown = f"{steps[0]}" if len(steps) == 1 else format_mean_stderr(steps, ".0f", ".0f")
    return f"{shown} ({len(steps)}/{n} seeds grokked)"


def mark_grokking(ax, pairs: list, color) -> None:
    """A dotted line at each grokked seed's step; seeds that never grokked get none."""
    for p in pairs:
        if p.grok_step is not None:
            ax.axvline(p.grok_step, color=color, linestyle=":", linewidth=1, alpha=0.8)


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
                values = np.array([[r[key] for r in p.log[:length]] for p in pairs])
                mean, err = mean_stderr(values)
                ax.plot(steps, mean, color=color,
                        label=f"{run_names[run]} (n={len(pairs)}; grokking step {describe_grokking(pairs)})")
                ax.fill_between(steps, mean - err, mean + err, color=color, alpha=0.2)
                for row in values:  # each seed, thin: a mean of seeds that grokked and seeds that did not is neither
                    ax.plot(steps, row, color=color, linewidth=0.5, alpha=0.35)
                mark_grokking(ax, pairs, color)
            ax.set_title(f"{title} across runs, {op}\n(mean ± stderr over seeds; thin: each seed; dotted: each seed's "
                         "grokking step)", fontsize=9)
            ax.set_xlabel("update step")
            ax.set_ylabel(title)
            if key.endswith("loss"):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            path = os.path.join(out_dir, f"{key}_{op}.png")
            save(fig, path)
            written.append((path, f"{title} of {op} against update step, one line per run (mean over seeds, "
                                  f"stderr band, a thin line per seed), dotted lines at each seed's grokking step."))
    return written


def class_colors(op: str, y: np.ndarray, n_classes: int):
    cmap = plt.get_cmap("twilight" if op in CYCLIC_OPS else "viridis")
    return cmap(y / max(n_classes, 1))


def stratified_subsample(y: np.ndarray, per_class: int, max_points: int, seed: int) -> np.ndarray:
    """Fixed, seeded: up to per_class rows of each class, at most max_points in all, sorted."""
    rng = np.random.RandomState(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    rows = np.concatenate(chosen)
    if len(rows) > max_points:
        rows = rng.choice(rows, max_points, replace=False)
    return np.sort(rows)


def scatter_panel(ax, xy, y, is_train, op, n_classes):
    colors = class_colors(op, y, n_classes)
    ax.scatter(xy[is_train, 0], xy[is_train, 1], c=colors[is_train], s=4, marker="o", linewidths=0, label="train")
    ax.scatter(xy[~is_train, 0], xy[~is_train, 1], c=colors[~is_train], s=10, marker="x", linewidths=0.6,
               label="val")
    ax.set_xticks([])
    ax.set_yticks([])


def representation_figures(pair: Pair, settings: Settings, out_dir: str) -> list:
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
        fig, axes = plt.subplots(1, len(loaded), figsize=(4.2 * len(loaded), 4.4), squeeze=False)
        for ax, (label, snap, tensors) in zip(axes[0], loaded):
            pca = PCA(n_components=2, random_state=settings.seed).fit(tensors[module])
            xy = pca.transform(tensors[module][shown])
            scatter_panel(ax, xy, y[shown], is_train[shown], pair.op, n_classes)
            ax.set_title(f"{label}: step {snap['step']}, val acc {snap['val_acc']:.2f}\n"
                         f"PC1+PC2 explain {100 * pca.explained_variance_ratio_.sum():.1f}% "
                         f"({100 * pca.explained_variance_ratio_[0]:.1f}% + "
                         f"{100 * pca.explained_variance_ratio_[1]:.1f}%)", fontsize=8)
        axes[0][0].legend(fontsize=7, loc="lower left", markerscale=2)
        fig.suptitle(f"PCA of the {layer} block ({module}) at the answer position: {pair.run}, {pair.op}, "
                     f"seed {pair.seed}, {grok}; colour = answer class, o train, x val", fontsize=9, y=1.03)
        path = os.path.join(out_dir, f"pca_{base}_{layer}.png")
        save(fig, path)
        written.append((path, f"PCA of the {layer} layer of {pair.op} (run {pair.run}, seed {pair.seed}) before, "
                              "during and after grokking, coloured by answer class."))
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
        fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
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
                                     f"every seed captured; thin lines: each seed\n"
                                     f"with its own transition snapshots; dotted: grokking steps\n"
                                     f"grokking step: {describe_grokking(pairs)}", fontsize=9, va="center")
        fig.suptitle(f"Representation geometry of the {layer} layer over training: {run}, {op}", fontsize=11)
        fig.subplots_adjust(wspace=0.5, hspace=0.35)
        path = os.path.join(out_dir, f"metrics_{run}_{op}_{layer}.png".replace(os.sep, "_"))
        save(fig, path)
        written.append((path, f"The seven cluster metrics of the {layer} layer of {op} (run {run}) against step, "
                              "mean ± stderr over seeds, with val accuracy on a twin axis and grokking marked."))
    return written


def plugin_figures(run: str, op: str, pairs: list, rows: list, out_dir: str) -> list:
    """What the norms, fourier and rqi plugins logged, against step, grokking marked."""
    written = []
    base = f"{run}_{op}".replace(os.sep, "_")
    grokked, _ = grok_summary(pairs)
    panels = [(m, f"{m} ({split})") for m, split in PLUGIN_LOG_METRICS.items()] + \
             [(metric, metric) for _, metric in PLUGIN_FILES.values()]
    present = [(m, title) for m, title in panels if any(r["metric"] == m for r in rows)]
    if not present:
        return written
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 3.8), squeeze=False)
    for ax, (metric, title) in zip(axes[0], present):
        plot_over_seeds(ax, [r for r in rows if r["metric"] == metric], "C0", "mean over seeds")
        for s in grokked:
            ax.axvline(s, color="black", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("update step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Plugin measures: {run}, {op} (mean ± stderr over seeds; dotted: grokking steps)", fontsize=10)
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


# ----------------------------------------------------------------------------- outputs
def write_tables(rows: list, out_dir: str) -> None:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["run", "op", "seed", "layer", "step", "phase", "split", "metric", "value"]
    path = os.path.join(out_dir, "metrics.csv")
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    path = os.path.join(out_dir, "metrics.parquet")
    tmp = f"{path}.partial-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def phase_values(pairs: list, rows: list, layer: str, metric: str, split: str) -> dict:
    """phase -> per-seed values of the metric at that seed's phase snapshot."""
    out = {}
    for pair in pairs:
        at = {r["step"]: r["value"] for r in rows if r["seed"] == pair.seed and r["layer"] == layer
              and r["metric"] == metric and r["split"] == split}
        for (label, snap), phase in zip(phase_snapshots(pair), PHASES):
            if at:  # the logged step nearest the snapshot (norms are logged at evaluations only)
                out.setdefault(phase, []).append(at[min(at, key=lambda s: abs(s - snap["step"]))])
    return out


def summary_markdown(by_op: dict, run_names: dict, rows_by: dict, figures: list) -> str:
    lines = ["# Grokking analysis summary", "",
             "Written by plot.py. Phases: a snapshot is *before* (val acc < 0.1), *during* (0.1 to < 0.99) or "
             "*after* (>= 0.99). The before/during/after columns are each seed's phase snapshots: the last "
             "*before* snapshot after memorisation (train acc >= 0.99; step 0 if none), the snapshot nearest "
             "0.5 val acc, and the final one; for seeds that never grokked: step 0, the middle snapshot, the "
             "final one. Values are mean ± stderr (ddof=1, /sqrt(n)) over seeds.", ""]
    for op, runs in by_op.items():
        for run, pairs in runs.items():
            lines += [f"## {run_names[run]} ({run}), {op}", "",
                      f"- Grokking step (first step with val acc > 0.99): {describe_grokking(pairs)}.",
                      f"- Final val accuracy: {np.mean([p.log[-1]['val_acc'] for p in pairs]):.3f} "
                      f"(mean over {len(pairs)} seeds).", ""]
            rows = rows_by.get((run, op), [])
            if not rows:
                lines += ["No activation snapshots: no representation metrics.", ""]
                continue
            lines += ["| layer | metric | split | before | during | after |", "|---|---|---|---|---|---|"]
            present = {(r["layer"], r["metric"], r["split"]) for r in rows}
            listed = [(layer, metric, split) for layer in LAYERS for metric, splits in METRIC_SPLITS.items()
                      for split in splits]
            listed += sorted(present - set(listed))
            for layer, metric, split in listed:
                if (layer, metric, split) in present:
                    values = phase_values(pairs, rows, layer, metric, split)
                    cells = []
                    for phase in PHASES:
                        v = np.array(values.get(phase, []), dtype=float)
                        if len(v) == 0:
                            cells.append("n/a")
                        else:
                            cells.append(format_mean_stderr(v, ".3g", ".2g"))
                    lines.append(f"| {layer} | {metric} | {split} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Figures", ""]
    lines += [f"- `{os.path.basename(path)}`: {text}" for path, text in figures]
    lines += ["- `metrics.csv` / `metrics.parquet`: every metric value, one row per "
              "(run, op, seed, layer, step, split, metric).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def _limit_threads() -> None:
    """One thread per worker process. The libraries must be loaded first: threadpoolctl only limits those
    already loaded, and sklearn's OpenMP and scipy's OpenBLAS would otherwise spin 2 threads per worker."""
    import sklearn.manifold  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


class FigureCache:
    """Which figures were drawn from which inputs: a figure group whose key is unchanged is not redrawn."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.entries = read_json(path)
        except (OSError, ValueError):
            self.entries = {}

    def get(self, name: str, key: str):
        entry = self.entries.get(name)
        if entry and entry["key"] == key and all(os.path.exists(path) for path, _ in entry["figures"]):
            return [tuple(f) for f in entry["figures"]]
        return None

    def put(self, name: str, key: str, figures: list) -> None:
        self.entries[name] = {"key": key, "figures": figures}

    def save(self) -> None:
        write_json(self.path, self.entries)


def inputs_key(settings: Settings, pairs: list, *extra) -> str:
    """Cache key of figures drawn from these pairs' logs, results and snapshots."""
    inputs = [(p.run, p.op, p.seed, len(p.log), p.log[-1], p.grok_step,
               [(file_key(s["path"]), s["val_acc"]) for s in p.snapshots]) for p in pairs]
    return settings_key(settings, code_key("figures"), *extra, inputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="", help="comma-separated run folders (default: `labels`, else run_*)")
    parser.add_argument("--out_dir", default=".", help="where figures, tables and the summary go")
    parser.add_argument("--no_tsne", action="store_true", help="skip the t-SNE figures")
    parser.add_argument("--workers", type=int, default=0, help="parallel processes (default: one per core)")
    return parser.parse_args(argv)


def main(args) -> int:
    runs = discover_runs(args)
    pairs = [p for run in runs for p in load_run(run, run)]
    if not pairs:
        print("plot.py: error: no runs found (no run_* folder with results here; see --runs)", file=sys.stderr)
        return 1
    settings = Settings(tsne=not args.no_tsne)
    os.makedirs(args.out_dir, exist_ok=True)
    cache_dir = os.path.join(args.out_dir, ".plot_cache")
    os.makedirs(cache_dir, exist_ok=True)
    drawn = FigureCache(os.path.join(cache_dir, "figures.json"))
    by_op = {}
    for p in pairs:
        by_op.setdefault(p.op, {}).setdefault(p.run, []).append(p)
    with_snaps = [p for p in pairs if p.snapshots]
    shown = {}  # the pictures show the first seed with snapshots of each (run, op)
    for p in with_snaps:
        shown.setdefault((p.run, p.op), p)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    figures, jobs = [], {}
    with ProcessPoolExecutor(args.workers or cores, mp_context=get_context("fork"),
                             initializer=_limit_threads) as pool:
        for (run, op), p in shown.items():
            key = inputs_key(settings, [p], "representations")
            cached = drawn.get(f"representations/{run}/{op}", key)
            if cached is None:
                jobs[f"representations/{run}/{op}"] = (key, pool.submit(representation_figures, p, settings,
                                                                          args.out_dir))
            else:
                figures += cached
        metric_jobs = [(p, pool.submit(pair_metrics, p, settings, cache_dir)) for p in with_snaps]
        key = inputs_key(settings, pairs, "curves", runs)
        cached = drawn.get("curves", key)
        if cached is None:
            cached = plot_curves(by_op, runs, args.out_dir)
            drawn.put("curves", key, cached)
        figures += cached
        rows, rows_by = [], {}
        for p, job in metric_jobs:
            found = job.result()
            rows += found
            rows_by.setdefault((p.run, p.op), []).extend(found)
        for p in pairs:
            found = plugin_rows(p)
            rows += found
            rows_by.setdefault((p.run, p.op), []).extend(found)
        for (run, op), found in rows_by.items():
            key = settings_key(settings, "plugins", found, inputs_key(settings, by_op[op][run]))
            cached = drawn.get(f"plugins/{run}/{op}", key)
            if cached is None:
                mine = [r for r in found if r["layer"] in ("model", "embedding")]
                jobs[f"plugins/{run}/{op}"] = (key, pool.submit(plugin_figures, run, op, by_op[op][run], mine,
                                                                args.out_dir))
            else:
                figures += cached
        for (run, op), found in rows_by.items():
            found = [r for r in found if r["layer"] in LAYERS]
            if not found:
                continue
            key = settings_key(settings, "metrics", found, inputs_key(settings, by_op[op][run]))
            cached = drawn.get(f"metrics/{run}/{op}", key)
            if cached is None:
                jobs[f"metrics/{run}/{op}"] = (key, pool.submit(metric_figures, run, op, by_op[op][run], found,
                                                                args.out_dir))
            else:
                figures += cached
        for name, (key, job) in jobs.items():
            made = job.result()
            drawn.put(name, key, made)
            figures += made
    drawn.save()
    write_tables(rows, args.out_dir)
    summary = os.path.join(args.out_dir, "analysis_summary.md")
    with open(f"{summary}.partial", "w") as f:
        f.write(summary_markdown(by_op, runs, rows_by, sorted(figures)))
    os.replace(f"{summary}.partial", summary)
    print(f"plot.py: {len(figures)} figures, {len(rows)} metric rows, summary in {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
