"""plot.py's numbers: reading runs, phases, spikes after grokking, the lead-lag analysis and the metrics of saved
snapshots. Definitions in docs/analysis.md."""

import functools
import hashlib
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from lab import measures, onset, stats
from lab.stats import mean_stderr
from lab.files import read_json, write_json
from lab.schema import (ACTIVATIONS, CONFIG, EXAMPLES, FINAL_KEYS, INDEX, LOG, LOG_MEASURES, LOG_METRICS, LAYERS,
                        MEASURES, METRIC_SPLITS, PLUGIN_FILES, RUN, Job, final_info_file, grok_step, half_step,
                        is_predictor, job_dir, memorisation_step, phase_of, reads)

PHASES = ("before", "during", "after")


def warn(message: str) -> None:
    print(f"plot.py: warning: {message}", file=sys.stderr)



# ----------------------------------------------------------------------------- reading runs
@dataclass
class TrainedJob:
    """One trained job (run, op, seed) as plot.py reads it: its log, its result if finished, and its snapshots. (A
    *pair* is an example (a, b); a *job* is what trains.)"""

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
        """step_val_acc_99, or None where val accuracy never grokked (lab.schema.grokked)."""
        reached = self.final.get("step_val_acc_99") if self.final is not None else None
        if isinstance(reached, (int, float)) and not isinstance(reached, bool):
            return reached if self.final.get("grokked", True) else None
        # unfinished, or an odd final_info
        return grok_step(self.log)

    @property
    def memorisation_step(self):
        return memorisation_step(self.log)


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


def load_run(run_dir: str, name: str, quiet: bool = False) -> list:
    """Every (op, seed) of a run with whatever it has finished so far (quiet: no warning for missing snapshots)."""
    try:
        config = read_json(os.path.join(run_dir, CONFIG))
        ops, seeds = config["ops"], config["seeds"]
    except (OSError, ValueError, KeyError) as e:
        warn(f"{run_dir}: no readable config.json ({e}); run skipped")
        return []
    pairs = []
    for op in ops:
        for seed in range(seeds):
            folder = job_dir(run_dir, Job(op, seed))
            log_path = os.path.join(folder, LOG)
            if not os.path.exists(log_path):
                continue  # not started yet
            log = read_log(log_path)
            if not log:
                warn(f"{log_path}: no readable rows; {op} seed {seed} skipped")
                continue
            final = None
            final_path = final_info_file(run_dir, Job(op, seed))
            if os.path.exists(final_path):
                try:
                    final = read_json(final_path)
                except ValueError:
                    warn(f"{final_path} is corrupt; treated as unfinished")
            pair = TrainedJob(name, op, seed, folder, log, final)
            index_path = os.path.join(folder, ACTIVATIONS, INDEX)
            if os.path.exists(index_path):
                try:
                    index = read_json(index_path)
                    pair.modules = {layer: module for layer, module in index["modules"].items()}
                    for snap in index["snapshots"]:
                        path = os.path.join(folder, ACTIVATIONS, snap["file"])
                        if not os.path.exists(path):
                            warn(f"{path} is listed in {index_path} but missing; skipped")
                            continue
                        val_acc = snap.get("val_acc", val_acc_at(log, snap["step"]))
                        pair.snapshots.append({**snap, "path": path, "val_acc": val_acc})
                except (ValueError, KeyError) as e:
                    warn(f"{index_path} is corrupt ({e}); {op} seed {seed} without snapshots")
            pairs.append(pair)
    if pairs and not quiet and not any(p.snapshots for p in pairs):
        warn(f"{run_dir}: no activation snapshots; learning curves only")
    return pairs


def measure_rows(pair: TrainedJob, measured: list | None = None) -> list:
    """Rows of metrics.csv from everything logged per step: the measures plugin's measures.jsonl (dense; or its
    rows `measured`, as the plugin holds them while it trains), the norms plugin's keys in log.jsonl, and the
    fourier and rqi plugins' files. Where two sources hold the same (layer, step, split, metric), the first read is
    kept: the log, then the plugin files, then measures.jsonl."""
    rows, seen = [], set()
    logged = np.array([r["step"] for r in pair.log], dtype=float)

    def add(step, layer, split, metric, value, val_acc=None):
        if (layer, step, split, metric) in seen or value is None or not np.isfinite(value):
            return
        seen.add((layer, step, split, metric))
        at = int(np.searchsorted(logged, step, side="right")) - 1  # val_acc_at(pair.log, step), by bisection
        acc = val_acc if val_acc is not None else pair.log[at]["val_acc"] if at >= 0 else float("nan")
        rows.append({"run": pair.run, "op": pair.op, "seed": pair.seed, "layer": layer, "step": step,
                     "phase": phase_of(acc), "split": split, "metric": metric, "value": float(value)})

    for r in pair.log:
        for metric, split in LOG_METRICS.items():
            if isinstance(r.get(metric), (int, float)):
                add(r["step"], "model", split, metric, r[metric])
    for name, (key, metric) in PLUGIN_FILES.items():
        path = os.path.join(pair.folder, f"{name}.jsonl")
        if os.path.exists(path):
            for r in read_log(path, required=("step", key)):
                add(r["step"], "embedding", "all", metric, r[key])
    path = os.path.join(pair.folder, FINAL_KEYS)  # lab.final_keys: the final model's key frequencies, over checkpoints
    if os.path.exists(path):
        for r in read_json(path).get("rows", []):
            add(r["step"], "model", "all", "restricted_loss_final_keys", r.get("restricted_loss"))
            add(r["step"], "model", "train", "excluded_loss_final_keys", r.get("excluded_loss"))
    path = os.path.join(pair.folder, MEASURES)
    if measured is not None or os.path.exists(path):
        for r in measured if measured is not None else read_log(path, required=("step", "val_acc", "values")):
            try:
                for layer, splits in r["values"].items():
                    for split, metrics in splits.items():
                        for metric, value in metrics.items():
                            if isinstance(value, (int, float)):
                                add(r["step"], layer, split, metric, value, r["val_acc"])
            except AttributeError:
                warn(f"{path}: a row of step {r['step']} is not of the measures plugin's shape; skipped")
    return rows


def phase_snapshots(pair: TrainedJob) -> list:
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


def spikes_after_grokking(pair: TrainedJob) -> list:
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


def end_state(pair: TrainedJob) -> dict:
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


# ----------------------------------------------------------------------------- metrics
def load_snapshot(path: str) -> dict:
    from safetensors.numpy import load_file

    return {name: t.astype(np.float32) for name, t in load_file(path).items()}


def snapshot_metrics(x: np.ndarray, y: np.ndarray, is_train: np.ndarray, split_seed: int) -> list:
    """[(metric, split, value)] for one layer's snapshot x (n, d): lab.measures.representation_metrics, the
    same code that the measures plugin runs during training, on the same subsamples (seeded by the job's
    split seed, as the plugin's)."""
    import torch

    is_train = torch.from_numpy(np.asarray(is_train, dtype=bool))
    samples = measures.metric_samples(is_train, split_seed)
    x, y = np.array(x, dtype=np.float32), np.array(y, dtype=np.int64)  # writable copies: pyarrow's are read-only
    return measures.representation_metrics(torch.from_numpy(x), torch.from_numpy(y), is_train, samples)


def split_seed(pair: TrainedJob) -> int:
    """The job's split seed, from its run.json (the seed itself in runs without one)."""
    try:
        return int(read_json(os.path.join(pair.folder, RUN))["split_seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return pair.seed


def read_examples(folder: str):
    """(labels, is_train) of the example table, rows aligned with the snapshots."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(folder, EXAMPLES), columns=["label", "split"])
    return table.column("label").to_numpy(), np.asarray(table.column("split").to_pylist()) == "train"


def file_key(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


ANALYSIS_VERSION = 2  # bump to invalidate every cached metric (editing the metric code already does: metrics_key)


@functools.cache
def metrics_key() -> str:
    """Hash of the code behind cached snapshot metrics (lab/measures.py and the functions here that feed it), so
    that editing it recomputes them; editing a figure leaves them cached."""
    text = inspect.getsource(measures) + "".join(
        inspect.getsource(f) for f in (load_snapshot, read_examples, snapshot_metrics, split_seed))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def settings_key(settings, *extra) -> str:
    text = json.dumps([ANALYSIS_VERSION, vars(settings), *extra], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def pair_metrics(pair: TrainedJob, settings, cache_dir: str) -> list:
    """Metric rows of every snapshot of a pair, cached per snapshot file."""
    cache_path = os.path.join(cache_dir, f"metrics_{pair.run}_{pair.op}_{pair.seed}.json".replace(os.sep, "_"))
    try:
        cache = read_json(cache_path)
    except (OSError, ValueError):
        cache = {}
    code = metrics_key()
    key_of = {s["file"]: settings_key(settings, code, file_key(s["path"])) for s in pair.snapshots}
    missing = [s for s in pair.snapshots if cache.get(s["file"], {}).get("key") != key_of[s["file"]]]
    if missing:
        try:
            y, is_train = read_examples(pair.folder)
        except Exception as e:  # a corrupt or missing table: no metrics for this pair
            warn(f"{os.path.join(pair.folder, EXAMPLES)} unreadable ({type(e).__name__}); "
                 f"no metrics for {pair.run} {pair.op} seed {pair.seed}")
            return []
        seed = split_seed(pair)
        for snap in missing:
            try:
                tensors = load_snapshot(snap["path"])
                values = {}
                for layer, module in pair.modules.items():
                    x = tensors[module]
                    if x.shape[0] != len(y):
                        raise ValueError(f"{x.shape[0]} rows, the example table has {len(y)}")
                    values[layer] = snapshot_metrics(x, y, is_train, seed)
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


# ----------------------------------------------------------------------------- lead-lag
LEADLAG_HALF_WIDTH = 100  # steps: the running median covers [step - 100, step + 100]
LEADLAG_LEVELS = (0.1, 0.5, 0.9)


def running_median(steps: np.ndarray, values: np.ndarray, half_width: float) -> np.ndarray:
    """Median of the values within half_width steps of each step: removes spikes shorter than half_width and
    keeps the edges of a real jump where they are (a running mean would smear them)."""
    lo = np.searchsorted(steps, steps - half_width, side="left")
    hi = np.searchsorted(steps, steps + half_width, side="right")
    return np.array([np.median(values[a:b]) for a, b in zip(lo, hi)])


def completion(steps, values, start: int, half_width: float = LEADLAG_HALF_WIDTH, levels=LEADLAG_LEVELS,
               end: float | None = None):
    """Steps at which a measure completes each level (share) of its change from `start` to the last step (to `end`
    when given: later samples are dropped first).

    The curve is smoothed by running_median; the change is smoothed(last) - smoothed(first step >= start),
    the progress (smoothed - first) / change, made monotone by a running maximum, and each level's step
    interpolated linearly between samples. Returns (times, steps, progress) or None when the measure does not
    change: the raw values of the window's first and last tenths (at least 3 samples each) do not differ by 4
    standard errors (noise), or the net change is under a quarter of the smoothed range (it goes and comes back).
    """
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    finite = np.isfinite(values) & (steps <= (np.inf if end is None else end))
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


def measure_series(pair: TrainedJob, rows: list) -> dict:
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


def leadlag_end(pair: TrainedJob) -> int | None:
    """Where a seed's lead-lag window ends: None (its last step), or, for a seed whose last evaluation is inside a
    spike after grokking, the evaluation before that spike: a measure's final level is not read inside a spike
    (the running median cannot remove one at the end of a curve: its window there is one-sided)."""
    state = end_state(pair)
    return state["spikes"][-1]["from_step"] if state["ends_in_spike"] else None


GRID_EVERY = 100  # the measurement grid of a run without measures.jsonl: its evaluations every this many steps


def measurement_grid(pair: TrainedJob, rows: list, start: int) -> np.ndarray:
    """The steps of the job's representation measurements (measures.jsonl: layers first/last) at or after start;
    for a job without enough of them, its evaluations from start on, every GRID_EVERY steps. Onsets are read on
    it (lab.onset), so every measure, the learning curves included, is read at the same steps."""
    steps = sorted({r["step"] for r in rows if r["layer"] in LAYERS and r["step"] >= start})
    if len(steps) < onset.BAND:
        logged = [r["step"] for r in pair.log if r["step"] >= start]
        steps = [s for s in logged if (s - logged[0]) % GRID_EVERY == 0]
    return np.array(steps, dtype=float)


def onsets(series: dict, grid: np.ndarray) -> dict:
    """(layer, split, metric) -> (step, side) of each measure's onset on the grid (lab.onset), or None."""
    return {key: onset.onset(grid, onset.grid_values(steps, values, grid)) for key, (steps, values) in series.items()}


def half_inside_band(half_step, band_end) -> bool:
    """A seed whose val accuracy reaches 0.5 by the end of its post-memorisation band: the band holds most of its
    rise, so val accuracy's onset (leaving that band) times its last percent, not its start. Its seed gets no onset
    leads (the early-warning evaluation excludes such runs too: lab.earlywarning)."""
    return half_step is not None and band_end is not None and half_step <= band_end


def leadlag_rows(pairs: list, rows: list) -> tuple[list, list]:
    """(rows of leadlag.csv, seeds left out): per grokked seed and measure, its onset (the first step it leaves its
    post-memorisation band, lab.onset) and onset_lead = val accuracy's onset minus the measure's (positive: the
    measure moves first; none in a seed that is half-way inside its band, half_inside_band); and, secondary,
    t10/t50/t90 from its memorisation step to the end (leadlag_end) with t50_lead = val accuracy's t50 - the
    measure's t50."""
    out, left_out = [], []
    for pair in pairs:
        if pair.grok_step is None or pair.memorisation_step is None:
            left_out.append(pair.seed)
            continue
        mine = [r for r in rows if r["seed"] == pair.seed]
        series = measure_series(pair, mine)
        end = leadlag_end(pair)
        reference = completion(*series[("log", "val", "acc")], pair.memorisation_step, end=end)
        grid = measurement_grid(pair, mine, pair.memorisation_step)
        started = onsets(series, grid)
        val_onset = started.get(("log", "val", "acc"))
        band_end = float(grid[onset.BAND - 1]) if len(grid) >= onset.BAND else None
        half = half_step(pair.log)
        if half_inside_band(half, band_end):
            val_onset = None  # already half-way before its band ends: no onset times the start of its rise
        if reference is None and val_onset is None:
            left_out.append(pair.seed)
            continue
        val_t50 = None if reference is None else reference[0][1]
        for (layer, split, metric), (steps, values) in sorted(series.items()):
            found = completion(steps, values, pair.memorisation_step, end=end)
            times = found[0] if found else [None] * 3
            began = started[(layer, split, metric)]
            out.append({"run": pair.run, "op": pair.op, "seed": pair.seed, "measure": metric, "layer": layer,
                        "split": split, "reads": reads(layer, split, metric),
                        "onset": None if began is None else began[0],
                        "onset_side": None if began is None else "up" if began[1] > 0 else "down",
                        "onset_lead": None if began is None or val_onset is None else val_onset[0] - began[0],
                        "t10": times[0], "t50": times[1], "t90": times[2],
                        "t50_lead": None if found is None or val_t50 is None else val_t50 - times[1],
                        "grok_step": pair.grok_step, "memorisation_step": pair.memorisation_step,
                        "band_end": band_end, "half_step": half})
    return out, left_out


LEADLAG_COLUMNS = ["run", "op", "seed", "measure", "layer", "split", "reads", "onset", "onset_side", "onset_lead",
                   "t10", "t50", "t90", "t50_lead", "memorisation_step", "band_end", "half_step", "grok_step"]


def leadlag_table(rows: list) -> list:
    """Per measure over seeds: the onset lead's mean with a bootstrap interval over seeds (lab.stats), in how many
    seeds it leads / lags, its mean onset relative to grokking; the t50 lead's mean ± stderr. Sorted by mean onset
    lead, leaders first; measures that never leave their band are kept with n = 0."""
    by_measure = {}
    for r in rows:
        by_measure.setdefault((r["layer"], r["split"], r["measure"]), []).append(r)
    table = []
    for (layer, split, measure), found in by_measure.items():
        leads = np.array([r["onset_lead"] for r in found if r["onset_lead"] is not None], dtype=float)
        low, high = stats.bootstrap(list(leads), np.mean)
        t50_leads = np.array([r["t50_lead"] for r in found if r["t50_lead"] is not None], dtype=float)
        mean, err = mean_stderr(t50_leads[:, None]) if len(t50_leads) else (np.array([np.nan]), np.array([np.nan]))
        relative = [r["onset"] - r["grok_step"] for r in found if r["onset"] is not None]
        t50s = [r["t50"] - r["grok_step"] for r in found if r["t50"] is not None]
        table.append({"layer": layer, "split": split, "measure": measure, "reads": reads(layer, split, measure),
                      "n": len(leads), "seeds": len(found),
                      "lead_mean": float(leads.mean()) if len(leads) else float("nan"), "lead_lo": low,
                      "lead_hi": high, "leads": int((leads > 0).sum()), "lags": int((leads < 0).sum()),
                      "onset_from_grok": float(np.mean(relative)) if relative else float("nan"),
                      "t50_n": len(t50_leads), "t50_lead_mean": float(mean[0]), "t50_lead_stderr": float(err[0]),
                      "t50_from_grok": float(np.mean(t50s)) if t50s else float("nan")})
    return sorted(table, key=lambda t: (t["n"] == 0, -t["lead_mean"] if t["n"] else 0, t["measure"]))


def is_trivial(t: dict) -> bool:
    """Val accuracy is the reference, and train accuracy, >= 0.99 from the memorisation step on, leads by definition:
    neither is named as a finding (both stay in the tables)."""
    return t["layer"] == "log" and t["measure"] == "acc"


def measure_label(layer: str, split: str, measure: str) -> str:
    return f"{measure} ({layer}, {split})" if layer != "log" else f"{split}_{measure}"


READS_TAGS = {"val_labels": " [reads val labels]", "final_model": " [reads the final model]",
              "unknown": " [reads: undeclared]"}


def reads_tag(kind: str) -> str:
    """'' for a measure that reads no validation labels, else what a sentence names beside it (READS_TAGS)."""
    return "" if is_predictor(kind) else READS_TAGS.get(kind, f" [reads {kind}]")


def describe_leaders(table: list) -> str:
    """One sentence: which measures leave their post-memorisation band before validation accuracy does (the onset
    lead's interval above 0), by how much, what each reads, and which after (interval below 0)."""
    usable = [t for t in table if t["n"] and not is_trivial(t)]
    if not usable:
        return "No measure leaves its post-memorisation band."
    n = max(t["seeds"] for t in usable)

    def name(t):
        return f"{measure_label(t['layer'], t['split'], t['measure'])}{reads_tag(t['reads'])} by {lead_text(t)}"

    leaders = [t for t in usable if t["n"] >= 2 and t["lead_lo"] > 0]
    laggers = [t for t in usable if t["n"] >= 2 and t["lead_hi"] < 0]
    if leaders:
        text = (f"Leaving its post-memorisation band before validation accuracy (onset lead, 95% bootstrap interval "
                f"above 0, over {n} grokked seeds): " + "; ".join(name(t) for t in leaders[:5])
                + (" (and more)" if len(leaders) > 5 else ""))
    else:
        text = f"No measure's onset leads validation accuracy's with an interval above 0 ({n} grokked seeds)"
    if laggers:
        text += "; after it (interval below 0): " + "; ".join(name(t) for t in laggers[-3:])
    return text + "."


def lead_text(t: dict, short: bool = False) -> str:
    """'mean [low, high] steps (k/n seeds)' of a leadlag_table row's onset lead; short: 'mean [low, high]'."""
    if t["n"] == 1:
        return f"{t['lead_mean']:.0f}" + ("" if short else " steps (n=1)")
    text = f"{t['lead_mean']:.0f} [{t['lead_lo']:.0f}, {t['lead_hi']:.0f}]"
    return text if short else f"{text} steps ({t['leads']}/{t['n']} seeds)"


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

