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
    analysis_summary.md                                       paste-ready summary for notes.txt
Phases, metrics, spikes, lead-lag and the cache are described in docs/analysis.md.
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
    "within_class_var": ("all",),
    "participation_ratio": ("all",),
}
METRIC_TITLES = {
    "silhouette": "silhouette (higher: tighter classes)",
    "davies_bouldin": "Davies-Bouldin (lower: better separated)",
    "calinski_harabasz": "Calinski-Harabasz (higher: better separated)",
    "nc1": "nc1 = tr(S_w S_b^+)/C (lower: collapsed)",
    "ncc_acc": "nearest-centroid acc (val, train centroids)",
    "knn_acc": "kNN acc (val, k=5 train neighbours)",
    "within_class_var": "within-class share of variance (all pairs)",
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

    tsne: bool = True  # draw t-SNE figures
    tsne_per_class: int = 6  # t-SNE subsample: points per answer class (stratified, seeded)
    tsne_max_points: int = 600  # ... and at most this many in all
    tsne_iterations: int = 400  # t-SNE optimisation steps per panel
    scatter_max_points: int = 4000  # PCA scatter: at most this many points drawn
    gif_points: int = 2000  # projection GIFs: points drawn per frame (a fixed seeded subsample)
    gif_dpi: int = 80  # projection GIFs: resolution (5 x 5.3 inches)
    seed: int = 0  # seed of every subsample and of t-SNE (metric subsamples: experiment.metric_samples)


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
        reached = self.final.get("step_val_acc_99") if self.final is not None else None
        if isinstance(reached, (int, float)) and not isinstance(reached, bool):
            return reached if self.final.get("grokked", True) else None
        return next((r["step"] for r in self.log if r["val_acc"] > 0.99), None)  # unfinished, or an odd final_info

    @property
    def memorisation_step(self):
        return next((r["step"] for r in self.log if r["train_acc"] >= 0.99), None)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_log(path: str, required=("step", "train_acc", "val_acc")) -> list:
    """Rows of a .jsonl log; a corrupt line, or one whose required keys are missing or not numbers where they
    should be (an edited experiment.py writing None, say), is skipped with a warning."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not all(k in row for k in required) or not all(
                    isinstance(row[k], (int, float)) for k in required if k in ("step", "train_acc", "val_acc")):
                warn(f"{path}: line {number} is corrupt, skipped")
                continue
            rows.append(row)
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
MODEL_MEASURES = {  # layer model / embedding: metric -> title
    "param_norm": "param_norm: L2 norm of all weights",
    "logit_norm": "logit_norm (train pairs)",
    "softmax_collapse": "softmax_collapse (train pairs)",
    "restricted_loss": "restricted loss (key freqs only, all pairs)",
    "excluded_loss": "excluded loss (key freqs removed, train)",
    "logit_key_frac": "logits' power in the key freqs",
    "fourier_topk_frac": "embedding power in top-k freqs",
    "rqi": "RQI of the embedding",
}
LOG_MEASURES = [("train", "loss", "train_loss"), ("val", "loss", "val_loss"), ("train", "acc", "train_acc"),
                ("val", "acc", "val_acc")]  # learning curves as measures: (split, metric, log key), layer "log"


def measure_rows(pair: Pair) -> list:
    """Rows of metrics.csv from everything logged per step: the measures plugin's measures.jsonl (dense), the
    norms plugin's keys in log.jsonl, and the fourier and rqi plugins' files. Where two sources hold the same
    (layer, step, split, metric), the first read is kept: the log, then the plugin files, then measures.jsonl."""
    rows, seen = [], set()

    def add(step, layer, split, metric, value, val_acc=None):
        if (layer, step, split, metric) in seen or value is None or not np.isfinite(value):
            return
        seen.add((layer, step, split, metric))
        acc = val_acc if val_acc is not None else val_acc_at(pair.log, step)
        rows.append({"run": pair.run, "op": pair.op, "seed": pair.seed, "layer": layer, "step": step,
                     "phase": phase_of(acc), "split": split, "metric": metric, "value": float(value)})

    for r in pair.log:
        for metric, split in PLUGIN_LOG_METRICS.items():
            if isinstance(r.get(metric), (int, float)):
                add(r["step"], "model", split, metric, r[metric])
    for name, (key, metric) in PLUGIN_FILES.items():
        path = os.path.join(pair.folder, f"{name}.jsonl")
        if os.path.exists(path):
            for r in read_log(path, required=("step", key)):
                add(r["step"], "embedding", "all", metric, r[key])
    path = os.path.join(pair.folder, "measures.jsonl")
    if os.path.exists(path):
        for r in read_log(path, required=("step", "val_acc", "values")):
            try:
                for layer, splits in r["values"].items():
                    for split, metrics in splits.items():
                        for metric, value in metrics.items():
                            if isinstance(value, (int, float)):
                                add(r["step"], layer, split, metric, value, r["val_acc"])
            except AttributeError:
                warn(f"{path}: a row of step {r['step']} is not of the measures plugin's shape; skipped")
    return rows


def phase_of(val_acc: float) -> str:
    """before (< 0.1), during (0.1 to < 0.99), after (>= 0.99); an unknown accuracy (step 0) is before."""
    if not val_acc >= 0.1:
        return "before"
    return "during" if val_acc < 0.99 else "after"


def phase_snapshots(pair: Pair) -> list:
    """[(label, snapshot)] x 3: last 'before' after memorisation (else step 0), nearest 0.5, final.

    When the final snapshot is not 'after' (the run ends in a spike or a dip below 0.99), the third is the last
    snapshot that is, labelled so. A run that never grokked gets step 0, the middle snapshot and the final one.
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
    grokked = [s for s in snaps if phase_of(s["val_acc"]) == "after"]
    if phase_of(final["val_acc"]) == "after" or not grokked:
        return [("before", first), ("during", during), ("after", final)]
    # The run ends in a spike or a dip: "after grokking" is the last snapshot that is.
    return [("before", first), ("during", during),
            (f"after (final snapshot: val acc {final['val_acc']:.2f})", grokked[-1])]


SPIKE_BELOW = 0.9  # a spike after grokking: train or val accuracy below this at an evaluation
TAIL_SHARE = 0.1  # how a seed ends is also read over this last share of its steps


def spikes_after_grokking(pair: Pair) -> list:
    """Loss spikes after grokking (the "slingshots" of Thilak et al. 2022): maximal runs of consecutive evaluations
    after the grokking step at which train or val accuracy is below SPIKE_BELOW. One dict per spike: from_step (the
    last evaluation before it), start, end (its first and last evaluation), min_train_acc, min_val_acc."""
    if pair.grok_step is None:
        return []
    found, current, previous = [], None, None
    for r in pair.log:
        if r["step"] > pair.grok_step and min(r["train_acc"], r["val_acc"]) < SPIKE_BELOW:
            if current is None:
                current = {"from_step": previous, "start": r["step"], "end": r["step"],
                           "min_train_acc": r["train_acc"], "min_val_acc": r["val_acc"]}
                found.append(current)
            current["end"] = r["step"]
            current["min_train_acc"] = min(current["min_train_acc"], r["train_acc"])
            current["min_val_acc"] = min(current["min_val_acc"], r["val_acc"])
        else:
            current = None
        previous = r["step"]
    return found


def end_state(pair: Pair) -> dict:
    """How a seed ends: its spikes after grokking, whether the last evaluation is inside one, the final val accuracy
    and the median val accuracy over the last TAIL_SHARE of its steps."""
    last = pair.log[-1]["step"]
    tail = [r["val_acc"] for r in pair.log if r["step"] >= last * (1 - TAIL_SHARE)]
    found = spikes_after_grokking(pair)
    return {"spikes": found, "ends_in_spike": bool(found) and found[-1]["end"] == last,
            "final_val_acc": pair.log[-1]["val_acc"], "tail_val_acc": float(np.median(tail))}


def describe_spikes(pairs: list, say_none: bool = True) -> list:
    """Sentences on the spikes after grokking: how many, in which seeds, and every seed that ends inside one
    (say_none: also say when there are none)."""
    grokked = [p for p in pairs if p.grok_step is not None]
    if not grokked:
        return []
    states = {p.seed: end_state(p) for p in grokked}
    counts = {seed: len(state["spikes"]) for seed, state in states.items()}
    if not any(counts.values()):
        text = f"No spike after grokking in the {len(grokked)} grokked seed(s)" if say_none else ""
    else:
        lowest = min(s["min_val_acc"] for state in states.values() for s in state["spikes"])
        text = (f"Spikes after grokking (train or val acc < {SPIKE_BELOW} at an evaluation): {sum(counts.values())} "
                f"in {sum(1 for c in counts.values() if c)} of {len(grokked)} grokked seeds ("
                + ", ".join(f"seed {seed}: {c}" for seed, c in counts.items()) + f"; lowest val acc {lowest:.2f})")
    sentences = [text + "."] if text else []
    for seed, state in states.items():
        if state["ends_in_spike"]:
            sentences.append(f"Seed {seed} ends in a spike: val acc {state['final_val_acc']:.2f} at the last step, "
                             f"{state['tail_val_acc']:.2f} (median) over the last {TAIL_SHARE:.0%} of steps.")
    return sentences


def spike_rows(pairs: list) -> list:
    """Rows of spikes.csv: one per seed that grokked."""
    rows = []
    for p in pairs:
        if p.grok_step is None:
            continue
        state = end_state(p)
        found = state["spikes"]
        rows.append({"run": p.run, "op": p.op, "seed": p.seed, "grok_step": p.grok_step, "spikes": len(found),
                     "spike_steps": ";".join(str(s["start"]) for s in found),
                     "min_train_acc": min((s["min_train_acc"] for s in found), default=""),
                     "min_val_acc": min((s["min_val_acc"] for s in found), default=""),
                     "ends_in_spike": state["ends_in_spike"], "final_val_acc": state["final_val_acc"],
                     "tail_val_acc": state["tail_val_acc"]})
    return rows


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


def snapshot_metrics(x: np.ndarray, y: np.ndarray, is_train: np.ndarray, settings: Settings) -> list:
    """[(metric, split, value)] for one layer's snapshot x (n, d): experiment.py's representation_metrics, the
    same code that the measures plugin runs during training, on the same seeded subsamples."""
    import torch

    import experiment

    is_train = torch.from_numpy(np.asarray(is_train, dtype=bool))
    samples = experiment.metric_samples(is_train, settings.seed)
    return experiment.representation_metrics(torch.from_numpy(np.asarray(x, dtype=np.float32)),
                                             torch.from_numpy(np.asarray(y, dtype=np.int64)), is_train, samples)


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
        import experiment

        functions = (load_snapshot, read_examples, snapshot_metrics, Settings, experiment.metric_samples,
                     experiment.representation_metrics, experiment.class_centroids, experiment.silhouette,
                     experiment.davies_bouldin, experiment.scatter_metrics, experiment.within_class_var,
                     experiment.participation_ratio)
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


def write_atomically(path: str, write) -> None:
    """write(tmp) then rename over path: a crash or Ctrl-C never leaves a half file that looks whole. The temporary
    name keeps the extension (matplotlib and pyarrow pick the format from it)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial-{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    write_atomically(path, write)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj))


# ----------------------------------------------------------------------------- figures
def save(fig, path: str) -> None:
    """Write a figure atomically."""
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


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


def color_key(op: str) -> str:
    if op == "x_div_y":
        return ("top: k x discrete log of the answer mod p-1 (its place on the ring; 0 in black), bottom: discrete "
                "log")
    if op in CYCLIC_OPS:
        return "top: k x answer mod p (its place on the ring of frequency k), bottom: answer (cyclic map)"
    return "answer class"


def class_colors(op: str, y: np.ndarray, n_classes: int, freq=None):
    """A colour per answer: its place on the op's cycle (cyclic map): the residue, or for x_div_y its discrete
    logarithm (0, which has none, black). With freq = k, its place on the circle of frequency k (k * position
    mod m), so that a Fourier ring of that frequency shows as an ordered colour wheel."""
    cmap = plt.get_cmap("twilight" if op in CYCLIC_OPS else "viridis")
    cycle = class_cycle(op, n_classes)
    if cycle is None:
        return cmap(y / max(n_classes, 1))
    position = np.full(n_classes, np.nan)
    position[cycle] = (np.arange(len(cycle)) * (freq or 1)) % len(cycle) / len(cycle)
    colors = cmap(np.nan_to_num(position[y]))
    colors[np.isnan(position[y])] = (0, 0, 0, 1)
    return colors


def class_cycle(op: str, n_classes: int):
    """For a cyclic op, the answer classes in the order of their group (residues 0..p-1; for x_div_y the powers
    g^0..g^(p-2) of a primitive root, 0 left out); None otherwise."""
    if op in ("x_plus_y", "x_minus_y"):
        return np.arange(n_classes)
    if op == "x_div_y":
        import experiment

        g = experiment.primitive_root(n_classes)
        return np.array([pow(g, t, n_classes) for t in range(n_classes - 1)])
    return None


def centroid_axes(x: np.ndarray, y: np.ndarray, op: str, freq=None):
    """(mean (d,), 2 axes (2, d), their share of the centroids' variance, a description, the frequency used).

    The axes describe how the answer classes are arranged rather than where most of the pairs' variance lies.
    For the cyclic ops: the plane of the class centroids' strongest Fourier frequency k over the group order (or
    `freq`), on which a Fourier representation is a ring; otherwise the centroids' two principal axes."""
    classes, inverse = np.unique(y, return_inverse=True)
    centroids = np.zeros((len(classes), x.shape[1]))
    np.add.at(centroids, inverse, x)
    centroids /= np.bincount(inverse)[:, None]
    mean = centroids.mean(0)
    centred = centroids - mean
    total = max((centred ** 2).sum(), 1e-30)
    cycle = class_cycle(op, int(y.max()) + 1)
    if cycle is not None and len(classes) == int(y.max()) + 1:
        spectrum = np.fft.fft(centred[cycle], axis=0)  # (m, d): row k is frequency k over the group order
        power = (np.abs(spectrum[1: len(cycle) // 2 + 1]) ** 2).sum(1)
        k = int(freq) if freq is not None else int(power.argmax()) + 1
        first = spectrum[k].real / max(np.linalg.norm(spectrum[k].real), 1e-30)
        second = spectrum[k].imag - (spectrum[k].imag @ first) * first
        if np.linalg.norm(second) < 1e-6 * np.linalg.norm(spectrum[k].real):  # k = m/2: a line (+1, -1, ...), not
            rest = centred - np.outer(centred @ first, first)  # a plane: add the centroids' main other direction
            second = np.linalg.svd(rest, full_matrices=False)[2][0]
        plane = np.stack([first, second / np.linalg.norm(second)], axis=1)  # (d, 2) orthonormal
        directions = plane.T
        share = ((centred @ plane) ** 2).sum(0) / total
        return mean, directions, share, f"centroids' Fourier plane k={k}", k
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    return mean, directions[:2], singular[:2] ** 2 / total, "centroids' principal axes", None


def projection_gif(pair: Pair, layer: str, module: str, y, is_train, settings: Settings, out_dir: str) -> list:
    """proj_{run}_{op}_{layer}.gif: the class-centroid projection through every snapshot, in one frame: each
    snapshot's projection is scaled to unit root-mean-square radius and rotated (orthogonal Procrustes on the
    centroids) onto the final snapshot's, so that motion in the GIF is motion of the representation, not of
    the axes."""
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
    *_, axes_name, freq = centroid_axes(loaded[-1][1], y, pair.op)  # one plane for every frame: the final one's
    cycle = class_cycle(pair.op, int(y.max()) + 1)
    frames = []
    for snap, x in loaded:
        mean, directions, share, _, _ = centroid_axes(x, y, pair.op, freq)
        classes, inverse = np.unique(y, return_inverse=True)
        points = (x - mean) @ directions.T  # (n, 2)
        centroids = np.zeros((len(classes), 2))
        np.add.at(centroids, inverse, points)
        centroids /= np.bincount(inverse)[:, None]
        scale = max(np.sqrt((points ** 2).sum(1).mean()), 1e-12)  # unit spread: frames compare by shape
        frames.append((snap, points[shown] / scale, centroids / scale, share))
    reference = frames[-1][2]
    aligned = []
    for snap, points, centroids, share in frames:
        u, _, vt = np.linalg.svd(centroids.T @ reference)
        rotation = u @ vt  # orthogonal (2, 2) minimising |centroids @ R - reference|
        aligned.append((snap, points @ rotation, centroids @ rotation, share))
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
        write_atomically(path, lambda tmp: FuncAnimation(fig, draw, frames=len(aligned)).save(
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
        fig, axes = plt.subplots(2, len(loaded), figsize=(4.2 * len(loaded), 8.8), squeeze=False)
        for ax, plain, (label, snap, tensors) in zip(axes[0], axes[1], loaded):
            x = tensors[module]
            mean, directions, share, axes_name, freq = centroid_axes(x, y, pair.op)
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
                     f"bottom: plain PCA; colour = {color_key(pair.op)}, o train, x val", fontsize=9, y=1.01)
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
        fig, axes = plt.subplots(3, 3, figsize=(14, 11))
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


# ----------------------------------------------------------------------------- lead-lag
LEADLAG_HALF_WIDTH = 100  # steps: the running median covers [step - 100, step + 100]
LEADLAG_LEVELS = (0.1, 0.5, 0.9)


def running_median(steps: np.ndarray, values: np.ndarray, half_width: float) -> np.ndarray:
    """Median of the values within half_width steps of each step: removes spikes shorter than half_width and
    keeps the edges of a real jump where they are (a running mean would smear them)."""
    lo = np.searchsorted(steps, steps - half_width, side="left")
    hi = np.searchsorted(steps, steps + half_width, side="right")
    return np.array([np.median(values[a:b]) for a, b in zip(lo, hi)])


def completion(steps, values, start: int, half_width: float = LEADLAG_HALF_WIDTH, levels=LEADLAG_LEVELS):
    """Steps at which a measure completes each level (share) of its change from `start` to the last step.

    The curve is smoothed by running_median; the change is smoothed(last) - smoothed(first step >= start),
    the progress (smoothed - first) / change, made monotone by a running maximum, and each level's step
    interpolated linearly between samples. Returns (times, steps, progress) or None when the measure does not
    change: the raw values of the window's first and last tenths (at least 3 samples each) do not differ by 4
    standard errors (noise), or the net change is under a quarter of the smoothed range (it goes and comes back).
    """
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    steps, values = steps[finite], values[finite]
    smooth = running_median(steps, values, half_width)
    keep = steps >= start
    if keep.sum() < 3:
        return None
    s, v, raw = steps[keep], smooth[keep], values[keep]
    change = v[-1] - v[0]
    n = max(3, len(raw) // 10)
    first, last = raw[:n], raw[-n:]
    standard_error = np.sqrt(first.var(ddof=1) / n + last.var(ddof=1) / n)
    if change == 0 or abs(last.mean() - first.mean()) <= 4 * standard_error or abs(change) < 0.25 * (v.max() - v.min()):
        return None
    progress = (v - v[0]) / change
    envelope = np.maximum.accumulate(progress)
    times = []
    for level in levels:
        i = int(np.argmax(envelope >= level))  # exists: envelope[-1] >= progress[-1] = 1
        if i == 0:
            times.append(float(s[0]))
        else:
            share = (level - envelope[i - 1]) / (envelope[i] - envelope[i - 1])
            times.append(float(s[i - 1] + share * (s[i] - s[i - 1])))
    return times, s, progress


def measure_series(pair: Pair, rows: list) -> dict:
    """(layer, split, metric) -> (steps, values) of one pair: its metric rows and its learning curves."""
    series = {}
    for r in rows:
        series.setdefault((r["layer"], r["split"], r["metric"]), []).append((r["step"], r["value"]))
    for split, metric, key in LOG_MEASURES:
        series[("log", split, metric)] = [(r["step"], r[key]) for r in pair.log if key in r]
    out = {}
    for key, points in series.items():
        points.sort()
        out[key] = (np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float))
    return out


def leadlag_rows(pairs: list, rows: list) -> tuple[list, list]:
    """(rows of leadlag.csv, seeds left out): per grokked seed and measure, t10/t50/t90 from its memorisation
    step to the end, and lead = val accuracy's t50 - the measure's t50 (positive: the measure moves first)."""
    out, left_out = [], []
    for pair in pairs:
        if pair.grok_step is None or pair.memorisation_step is None:
            left_out.append(pair.seed)
            continue
        mine = [r for r in rows if r["seed"] == pair.seed]
        series = measure_series(pair, mine)
        reference = completion(*series[("log", "val", "acc")], pair.memorisation_step)
        if reference is None:
            left_out.append(pair.seed)
            continue
        val_t50 = reference[0][1]
        for (layer, split, metric), (steps, values) in sorted(series.items()):
            found = completion(steps, values, pair.memorisation_step)
            times = found[0] if found else [None] * 3
            out.append({"run": pair.run, "op": pair.op, "seed": pair.seed, "measure": metric, "layer": layer,
                        "split": split, "t10": times[0], "t50": times[1], "t90": times[2],
                        "lead": None if found is None else val_t50 - times[1], "grok_step": pair.grok_step,
                        "memorisation_step": pair.memorisation_step})
    return out, left_out


def leadlag_table(rows: list) -> list:
    """Per measure over seeds: mean ± stderr of the lead, how many seeds it leads / lags in, mean t50 relative
    to grokking; sorted by mean lead, leaders first. Measures that never change are kept with n = 0."""
    by_measure = {}
    for r in rows:
        by_measure.setdefault((r["layer"], r["split"], r["measure"]), []).append(r)
    table = []
    for (layer, split, measure), found in by_measure.items():
        leads = np.array([r["lead"] for r in found if r["lead"] is not None], dtype=float)
        t50 = np.array([r["t50"] - r["grok_step"] for r in found if r["t50"] is not None], dtype=float)
        mean, err = mean_stderr(leads[:, None]) if len(leads) else (np.array([np.nan]), np.array([np.nan]))
        table.append({"layer": layer, "split": split, "measure": measure, "n": len(leads), "seeds": len(found),
                      "lead_mean": float(mean[0]), "lead_stderr": float(err[0]),
                      "leads": int((leads > 0).sum()), "lags": int((leads < 0).sum()),
                      "t50_from_grok": float(t50.mean()) if len(t50) else float("nan")})
    return sorted(table, key=lambda t: (t["n"] == 0, -t["lead_mean"] if t["n"] else 0, t["measure"]))


def is_trivial(t: dict) -> bool:
    """Val accuracy is the reference, and train accuracy, >= 0.99 from the memorisation step on, leads by definition:
    neither is named as a finding (both stay in the tables)."""
    return t["layer"] == "log" and t["measure"] == "acc"


def measure_label(layer: str, split: str, measure: str) -> str:
    return f"{measure} ({layer}, {split})" if layer != "log" else f"{split}_{measure}"


def describe_leaders(table: list) -> str:
    """One sentence: what leads validation accuracy in every seed, by how much, and what lags in every seed."""
    usable = [t for t in table if t["n"] and not is_trivial(t)]
    if not usable:
        return "No measure changed enough to time."
    n = max(t["seeds"] for t in usable)

    def name(t):
        return f"{measure_label(t['layer'], t['split'], t['measure'])} by {lead_text(t)}"

    always_lead = [t for t in usable if t["leads"] == t["seeds"] == n]
    always_lag = [t for t in usable if t["lags"] == t["seeds"] == n]
    if always_lead:
        text = (f"Leading validation accuracy's 50% step in all {n} grokked seeds: "
                + "; ".join(name(t) for t in always_lead[:5]) + (" (and more)" if len(always_lead) > 5 else ""))
    else:
        text = f"No measure leads validation accuracy in all {n} grokked seeds"
    if always_lag:
        text += f"; lagging in all {n}: " + "; ".join(name(t) for t in always_lag[-3:])
    return text + "."


def lead_text(t: dict) -> str:
    """'mean ± stderr steps' of a leadlag_table row; a single seed is marked n=1."""
    if t["n"] == 1:
        return f"{t['lead_mean']:.0f} steps (n=1)"
    return f"{t['lead_mean']:.0f} ± {t['lead_stderr']:.0f} steps"


def progress_figure(run: str, op: str, pairs: list, rows: list, leadlag: list, out_dir: str) -> list:
    """Every measure's progress (0 to 1 between the memorisation step and the end) on one time axis aligned on each
    seed's grokking step, as a heatmap ordered by mean lead, with the leads beside it."""
    full_table = leadlag_table(leadlag)
    table = [t for t in full_table if t["n"]]
    grokked = [p for p in pairs if p.grok_step is not None and p.memorisation_step is not None]
    if not table or not grokked:
        return []
    grid = np.arange(min(p.memorisation_step - p.grok_step for p in grokked),
                     max(p.log[-1]["step"] - p.grok_step for p in grokked) + 1, 25, dtype=float)
    image = np.full((len(table), len(grid)), np.nan)
    series = {p.seed: measure_series(p, [r for r in rows if r["seed"] == p.seed]) for p in grokked}
    for row, t in enumerate(table):
        curves = []
        for p in grokked:
            key = (t["layer"], t["split"], t["measure"])
            found = completion(*series[p.seed][key], p.memorisation_step) if key in series[p.seed] else None
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
    ax.scatter([t["t50_from_grok"] for t in table], range(len(table)), marker="|", color="white", s=60,
               label="mean t50 (half the change done)")
    ax.legend(fontsize=7, loc="lower left")
    labels = [measure_label(t["layer"], t["split"], t["measure"]) for t in table]
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels(labels, fontsize=7)
    for tick, t in zip(ax.get_yticklabels(), table):
        if t["layer"] == "log" and t["split"] == "val" and t["measure"] == "acc":
            tick.set_fontweight("bold")
            tick.set_color("crimson")
    ax.set_xlabel("update step relative to each seed's grokking step (val acc > 0.99)")
    fig.colorbar(mesh, ax=ax, fraction=0.03, pad=0.01).set_label("share of the change completed (0 to 1)")
    means = np.array([t["lead_mean"] for t in table])
    errs = np.array([t["lead_stderr"] if t["n"] > 1 else 0 for t in table])
    colors = ["crimson" if t["layer"] == "log" and t["split"] == "val" and t["measure"] == "acc" else ("C2" if t["leads"] == t["n"] else
              "C3" if t["lags"] == t["n"] else "grey") for t in table]
    bars.barh(range(len(table)), means, xerr=errs, color=colors, height=0.6, error_kw={"linewidth": 0.8})
    bars.axvline(0, color="black", linewidth=0.8)
    for i, t in enumerate(table):
        bars.text(1.0, i, f" {t['leads']}/{t['n']}", va="center", fontsize=6, transform=bars.get_yaxis_transform())
    bars.set_xlabel("lead over val acc's 50% step (steps)\ngreen: leads in every seed, red: lags in every seed")
    bars.grid(axis="x", alpha=0.3)
    never = [t for t in full_table if not t["n"]]
    steps_text = ", ".join(str(p.grok_step) for p in grokked)
    fig.suptitle(f"Who moves first: {run}, {op}; {len(grokked)} grokked seed(s) (grokking steps {steps_text}), "
                 f"{len(pairs) - len(grokked)} left out\nrows ordered by mean lead (top: first to move); colour: "
                 f"mean over seeds of each measure's progress, running median over ±{LEADLAG_HALF_WIDTH} steps"
                 + (f"; {len(never)} measure(s) never change (see analysis_summary.md)" if never else ""),
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"progress_{run}_{op}.png".replace(os.sep, "_"))
    save(fig, path)
    return [(path, f"Every measure of {op} (run {run}) as the share of its change completed, aligned on each seed's "
                   "grokking step and ordered by its mean lead over validation accuracy (top: moves first), "
                   "with the leads (mean ± stderr, seeds leading) beside it.")]


# ----------------------------------------------------------------------------- outputs
def write_csv(path: str, columns: list, rows) -> None:
    import csv

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def write_tables(rows: list, out_dir: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["run", "op", "seed", "layer", "step", "phase", "split", "metric", "value"]
    write_csv(os.path.join(out_dir, "metrics.csv"), columns, rows)
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    write_atomically(os.path.join(out_dir, "metrics.parquet"), lambda tmp: pq.write_table(table, tmp))


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


def summary_markdown(by_op: dict, run_names: dict, rows_by: dict, figures: list, leadlag: list,
                     left_out: dict) -> str:
    lines = ["# Grokking analysis summary", "",
             "Written by plot.py. Phases: a snapshot is *before* (val acc < 0.1), *during* (0.1 to < 0.99) or "
             "*after* (>= 0.99). The before/during/after columns are each seed's phase snapshots: the last "
             "*before* snapshot after memorisation (train acc >= 0.99; step 0 if none), the snapshot nearest "
             "0.5 val acc, and the final one; for seeds that never grokked: step 0, the middle snapshot, the "
             "final one. Values are mean ± stderr (ddof=1, /sqrt(n)) over seeds.", ""]
    for op, runs in by_op.items():
        for run, pairs in runs.items():
            try:
                lines += run_op_markdown(run, op, pairs, run_names, rows_by, leadlag, left_out)
            except Exception as e:  # an odd run keeps its heading and a note; the rest of the summary is written
                warn(f"summary of {run} {op} incomplete ({type(e).__name__}: {e})")
                lines += [f"## {run_names[run]} ({run}), {op}", "", f"Not summarised: {type(e).__name__}: {e}", ""]
    lines += ["## Figures", ""]
    lines += [f"- `{os.path.basename(path)}`: {text}" for path, text in figures]
    lines += ["- `metrics.csv` / `metrics.parquet`: every metric value, one row per "
              "(run, op, seed, layer, step, split, metric).",
              "- `leadlag.csv`: per grokked seed and measure, the steps t10/t50/t90 at which it completes 10/50/90% "
              "of its change after memorisation, and its lead over val accuracy's t50.",
              f"- `spikes.csv`: per grokked seed, its spikes after grokking (train or val acc < {SPIKE_BELOW} at an "
              "evaluation after the grokking step; consecutive evaluations are one spike), their first steps, the "
              f"lowest accuracies, whether the run ends inside one, the final val acc and its median over the last "
              f"{TAIL_SHARE:.0%} of steps.", ""]
    return "\n".join(lines)


def run_op_markdown(run: str, op: str, pairs: list, run_names: dict, rows_by: dict, leadlag: list,
                    left_out: dict) -> list:
    """One (run, op) section of analysis_summary.md."""
    lines = [f"## {run_names[run]} ({run}), {op}", "",
             f"- Grokking step (first step with val acc > 0.99): {describe_grokking(pairs)}.",
             f"- Final val accuracy: {np.mean([p.log[-1]['val_acc'] for p in pairs]):.3f} "
             f"(mean over {len(pairs)} seeds; median over the last {TAIL_SHARE:.0%} of steps: "
             f"{np.mean([end_state(p)['tail_val_acc'] for p in pairs]):.3f}).",
             *(f"- {sentence}" for sentence in describe_spikes(pairs)), ""]
    rows = rows_by.get((run, op), [])
    if not rows:
        return lines + ["No activation snapshots or measures: no representation metrics.", ""]
    lines += ["| layer | metric | split | before | during | after |", "|---|---|---|---|---|---|"]
    present = {(r["layer"], r["metric"], r["split"]) for r in rows}
    listed = [(layer, metric, split) for layer in LAYERS for metric, splits in METRIC_SPLITS.items()
              for split in splits]
    listed += sorted(present - set(listed))
    for layer, metric, split in listed:
        if (layer, metric, split) in present:
            values = phase_values(pairs, rows, layer, metric, split)
            cells = [format_mean_stderr(values[phase], ".3g", ".2g") if values.get(phase) else "n/a"
                     for phase in PHASES]
            lines.append(f"| {layer} | {metric} | {split} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines + leadlag_markdown(run, op, pairs, leadlag, left_out.get((run, op), []))


def leadlag_markdown(run: str, op: str, pairs: list, leadlag: list, left_out: list) -> list:
    """The lead-lag section of one (run, op) in analysis_summary.md."""
    mine = [r for r in leadlag if r["run"] == run and r["op"] == op]
    grokked = len({r["seed"] for r in mine})
    lines = [f"### Lead-lag: who moves before validation accuracy ({grokked} of {len(pairs)} seeds grokked"
             + (f"; left out: seed(s) {', '.join(map(str, left_out))}, never grokked" if left_out else "") + ")", ""]
    if not mine:
        return lines + ["No seed grokked: nothing to time.", ""]
    table = leadlag_table(mine)
    lines += [describe_leaders(table), "",
              "Each measure's t50 is the step at which it completes half of its change between the seed's "
              "memorisation step (train acc >= 0.99) and the end of training (running median over "
              f"±{LEADLAG_HALF_WIDTH} steps, made monotone by a running maximum); lead = val accuracy's t50 minus "
              "the measure's (positive: moves first). Mean ± stderr over seeds; per-seed t10/t50/t90 in leadlag.csv.",
              "", "| measure | layer | split | lead (steps) | leads in | lags in | t50 - grokking step |",
              "|---|---|---|---|---|---|---|"]
    for t in table:
        if t["n"]:
            lines.append(f"| {t['measure']} | {t['layer']} | {t['split']} | {lead_text(t)} | {t['leads']}/{t['n']} | "
                         f"{t['lags']}/{t['n']} | {t['t50_from_grok']:.0f} |")
    never = [measure_label(t["layer"], t["split"], t["measure"]) for t in table if not t["n"]]
    if never:
        lines += ["", "Never change between memorisation and the end (no net change above noise): "
                  + ", ".join(never) + "."]
    return lines + [""]


def largest_changes(pairs: list, rows: list, k: int = 3) -> list:
    """The k last-layer metrics whose value changed most between the before and after phase snapshots
    (relative change |after - before| / (|before| + |after|)), as (metric, split, before, after)."""
    changes = []
    for metric, splits in METRIC_SPLITS.items():
        for split in splits:
            values = phase_values(pairs, [r for r in rows if r["layer"] == "last"], "last", metric, split)
            if "before" in values and "after" in values:
                before, after = float(np.mean(values["before"])), float(np.mean(values["after"]))
                scale = abs(before) + abs(after)
                if scale > 0:
                    changes.append((abs(after - before) / scale, metric, split, before, after))
    return [c[1:] for c in sorted(changes, reverse=True)[:k]]


NOTES_BEGIN = "=== BEGIN plot.py findings (rewritten by every `python plot.py`; edit outside this block) ==="
NOTES_END = "=== END plot.py findings ==="
NOTES_LIMIT = 6000  # characters: the block must stay useful inside a prompt


def figure_patterns(figures: list) -> list:
    """One line per kind of figure at the folder root: the file-name pattern, what it shows, and which exist."""
    kinds = {}
    for path, text in figures:
        name = os.path.basename(path)
        kind = name.split("_", 1)[0]
        if name.startswith(("train_", "val_")):
            kind = "curves"
        kinds.setdefault(kind, []).append(name)
    described = {
        "curves": "{train,val}_{loss,acc}_{op}.png: learning curves, one line per run (mean ± stderr, each seed "
                  "thin, grokking steps dotted, spikes after grokking shaded)",
        "progress": "progress_{run}_{op}.png: every measure's progress aligned on grokking, ordered by lead over "
                    "val acc (who moves first)",
        "pca": "pca_{run}_{op}_{layer}.png: before/during/after on the class-centroid axes (rings) and plain PCA",
        "tsne": "tsne_{run}_{op}_{layer}.png: t-SNE before/during/after",
        "metrics": "metrics_{run}_{op}_{layer}.png: the representation metrics against step",
        "plugins": "plugins_{run}_{op}.png: weight/logit norms, softmax collapse, restricted/excluded loss, "
                   "Fourier and RQI against step",
        "fourier": "fourier_{run}_{op}.png: the embedding's Fourier spectrum before/during/after",
        "proj": "proj_{run}_{op}_{layer}.gif: animation through every snapshot (not for LaTeX)",
    }
    lines = []
    for kind, names in sorted(kinds.items()):
        text = described.get(kind, f"{kind}_*: see analysis_summary.md")
        shown = names[0] if len(names) == 1 else f"{len(names)} files, e.g. {sorted(names)[0]}"
        lines.append(f"- {text} [{shown}]")
    return lines


def findings_block(by_op: dict, run_names: dict, rows_by: dict, leadlag: list, figures: list,
                   limit: int = NOTES_LIMIT) -> str:
    """The block plot.py keeps in notes.txt: per run and op the grokking steps, final val accuracy, the largest
    metric changes and what leads; then every kind of figure. Detail is dropped level by level (lagging measures,
    then the second and third leader and change) until it fits in `limit` characters."""
    sections = []
    for op, runs in by_op.items():
        for run, pairs in runs.items():
            try:
                rows = rows_by.get((run, op), [])
                head = " ".join([f"[{run_names[run]}] {op}: grokking step {describe_grokking(pairs)}; final val acc "
                                 f"{np.mean([p.log[-1]['val_acc'] for p in pairs]):.3f}.",
                                 *describe_spikes(pairs, say_none=False)])
                changes = [f"{m} ({s}) {b:.3g} -> {a:.3g}" for m, s, b, a in largest_changes(pairs, rows)]
                table = [t for t in leadlag_table([r for r in leadlag if r["run"] == run and r["op"] == op])
                         if t["n"] and not is_trivial(t)]
                n = max((t["seeds"] for t in table), default=0)
                leaders = [f"{measure_label(t['layer'], t['split'], t['measure'])} {lead_text(t)}"
                           for t in table if t["leads"] == t["seeds"] == n]
                laggers = [f"{measure_label(t['layer'], t['split'], t['measure'])} {lead_text(t)}"
                           for t in reversed(table) if t["lags"] == t["seeds"] == n]
                sections.append((head, changes, leaders, laggers, n))
            except Exception as e:  # an odd run must not cost the rest of the block
                warn(f"notes.txt findings for {run} {op} skipped ({type(e).__name__}: {e})")

    def render(n_changes, n_leaders, n_laggers):
        lines = [NOTES_BEGIN,
                 "Full tables: analysis_summary.md (every metric before/during/after, lead-lag tables), metrics.csv "
                 "(every value per step), leadlag.csv (t10/t50/t90 and lead per seed and measure), spikes.csv (spikes "
                 "after grokking per seed). Lead = steps by "
                 "which a measure's 50% point precedes val accuracy's (memorisation to end of training).", ""]
        for head, changes, leaders, laggers, n in sections:
            line = head
            if changes[:n_changes]:
                line += " Last layer before->after: " + "; ".join(changes[:n_changes]) + "."
            if n and n_leaders:
                line += (f" Leads val acc in all {n} grokked seeds: " + "; ".join(leaders[:n_leaders]) + "."
                         if leaders else f" Nothing leads val acc in all {n} grokked seeds.")
            if n and laggers[:n_laggers]:
                line += f" Lags in all {n}: " + "; ".join(laggers[:n_laggers]) + "."
            lines.append(line)
        lines += ["", "Figures (at the folder root; every one is listed in analysis_summary.md):"]
        lines += figure_patterns(figures) + [NOTES_END]
        return "\n".join(lines) + "\n"

    for detail in ((3, 3, 2), (3, 2, 1), (2, 2, 1), (2, 1, 0), (1, 1, 0), (0, 1, 0), (0, 0, 0)):
        text = render(*detail)
        if len(text) <= limit:
            return text
    return text[: limit - len(NOTES_END) - 6] + "\n...\n" + NOTES_END + "\n"


def update_notes(path: str, block: str) -> None:
    """Replace the findings block in notes.txt (or append it, or create the file), leaving every byte outside the
    block as it was; written to a temporary file and renamed."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    begin = text.find(NOTES_BEGIN)
    if begin >= 0:
        end = text.find(NOTES_END, begin)
        if end < 0:
            warn(f"{path}: the findings block has no end marker; it is taken to run to the end of the file")
            end = len(text)
        else:
            end += len(NOTES_END)
            if text[end:end + 1] == "\n":
                end += 1
        text = text[:begin] + block + text[end:]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + block
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else None

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if mode is not None:  # the user's file keeps its permissions
            os.chmod(tmp, mode)

    write_atomically(path, write)


def write_spikes(pairs: list, out_dir: str) -> None:
    columns = ["run", "op", "seed", "grok_step", "spikes", "spike_steps", "min_train_acc", "min_val_acc",
               "ends_in_spike", "final_val_acc", "tail_val_acc"]
    write_csv(os.path.join(out_dir, "spikes.csv"), columns,
              ({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in spike_rows(pairs)))


def write_leadlag(rows: list, out_dir: str) -> None:
    columns = ["run", "op", "seed", "measure", "layer", "split", "t10", "t50", "t90", "lead"]
    write_csv(os.path.join(out_dir, "leadlag.csv"), columns,
              ({k: "" if v is None else round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
               for r in rows))


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
    parser.add_argument("--notes", default="notes.txt",
                        help="the notes file whose findings block is rewritten (empty: leave notes alone)")
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
        # Pairs with a measures.jsonl have every metric densely from training; the others get them from snapshots.
        metric_jobs = [(p, pool.submit(pair_metrics, p, settings, cache_dir)) for p in with_snaps
                       if not os.path.exists(os.path.join(p.folder, "measures.jsonl"))]
        key = inputs_key(settings, pairs, "curves", runs)
        cached = drawn.get("curves", key)
        if cached is None:
            try:
                cached = plot_curves(by_op, runs, args.out_dir)
                drawn.put("curves", key, cached)
            except Exception as e:
                warn(f"learning curves skipped ({type(e).__name__}: {e})")
                cached = []
        figures += cached
        rows, rows_by = [], {}
        for p, job in metric_jobs:
            found = job.result()
            rows += found
            rows_by.setdefault((p.run, p.op), []).extend(found)
        for p in pairs:
            found = measure_rows(p)
            rows += found
            rows_by.setdefault((p.run, p.op), []).extend(found)
        leadlag, left_out = [], {}
        for (run, op), found in rows_by.items():
            try:
                made, left_out[(run, op)] = leadlag_rows(by_op[op][run], found)
            except Exception as e:
                warn(f"lead-lag of {run} {op} skipped ({type(e).__name__}: {e})")
                made, left_out[(run, op)] = [], []
            leadlag += made
            key = settings_key(settings, "progress", found, inputs_key(settings, by_op[op][run]))
            cached = drawn.get(f"progress/{run}/{op}", key)
            if cached is None:
                jobs[f"progress/{run}/{op}"] = (key, pool.submit(progress_figure, run, op, by_op[op][run], found,
                                                                 made, args.out_dir))
            else:
                figures += cached
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
            try:
                made = job.result()
            except Exception as e:  # a run an agent changed may lack what one figure needs: skip that figure only
                warn(f"{name.replace('/', ' ')}: figure skipped ({type(e).__name__}: {e})")
                continue
            drawn.put(name, key, made)
            figures += made
    drawn.save()
    write_tables(rows, args.out_dir)
    write_leadlag(leadlag, args.out_dir)
    write_spikes(pairs, args.out_dir)
    summary = os.path.join(args.out_dir, "analysis_summary.md")
    write_text(summary, summary_markdown(by_op, runs, rows_by, sorted(figures), leadlag, left_out))
    if args.notes:
        update_notes(args.notes, findings_block(by_op, runs, rows_by, leadlag, sorted(figures)))
    print(f"plot.py: {len(figures)} figures, {len(rows)} metric rows, summary in {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
