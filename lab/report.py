"""plot.py's machinery: finding runs, the process pool, the figure cache, the tables, analysis_summary.md and the
notes.txt findings block. `P` below is the plot module (plot.py): its Settings, `labels` and figure functions."""

import functools
import gc
import glob
import hashlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from lab.analysis import (LEADLAG_COLUMNS, LEADLAG_HALF_WIDTH, PHASES, SPIKE_BELOW, TAIL_SHARE, describe_grokking,
                          describe_leaders, describe_spikes, end_state, file_key, format_mean_stderr, half_inside_band,
                          is_trivial, largest_changes, lead_text, leadlag_rows, leadlag_table, load_run,
                          measure_label, measure_rows, pair_metrics, phase_values, reads_tag, settings_key, spike_rows,
                          warn)
from lab.files import atomic_write, read_json, write_json, write_text
from lab.final_keys import final_key_progress_of, summary_row
from lab import earlywarning, onset, phases, rules
from lab import figures as sweep_figures
from lab.trackers import figures_to_tensorboard
from lab.schema import (BEFORE_BELOW, CHECKPOINTS, GROKKED_ABOVE, HALF_AT, LAYERS, MEASURES, MEMORISED_AT,
                        METRIC_SPLITS, SWEEP)


def discover_runs(args, labels: dict) -> dict:
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



def write_csv(path: str, columns: list, rows) -> None:
    import csv

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def write_tables(rows: list, out_dir: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["run", "op", "seed", "layer", "step", "phase", "split", "metric", "value"]
    write_csv(os.path.join(out_dir, "metrics.csv"), columns, rows)
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    atomic_write(os.path.join(out_dir, "metrics.parquet"), lambda tmp: pq.write_table(table, tmp))


def summary_markdown(by_op: dict, run_names: dict, rows_by: dict, figures: list, leadlag: list,
                     left_out: dict) -> str:
    lines = ["# Grokking analysis summary", "",
             f"Written by plot.py. Phases: a snapshot is *before* (val acc < {BEFORE_BELOW}), *during* or *after* "
             f"(val acc > {GROKKED_ABOVE}, grokked). The before/during/after columns are each seed's phase snapshots: "
             f"the last *before* snapshot after memorisation (train acc >= {MEMORISED_AT}; step 0 if none), the "
             f"snapshot nearest {HALF_AT} val acc, and the final one; for seeds that never grokked: step 0, the middle "
             "snapshot, the final one. Values are mean ± stderr (ddof=1, /sqrt(n)) over seeds.", ""]
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
              "- `leadlag.csv`: per grokked seed and measure, what it reads, its onset (the first step it leaves its "
              "post-memorisation band) and onset lead over val accuracy's, and the steps t10/t50/t90 at which it "
              "completes 10/50/90% of its change after memorisation, with the t50 lead.",
              f"- `spikes.csv`: per grokked seed, its spikes after grokking (train or val acc < {SPIKE_BELOW} at an "
              "evaluation after the grokking step; consecutive evaluations are one spike), their first steps, the "
              f"lowest accuracies, whether the run ends inside one, the final val acc and its median over the last "
              f"{TAIL_SHARE:.0%} of steps.", ""]
    return "\n".join(lines)


def run_op_markdown(run: str, op: str, pairs: list, run_names: dict, rows_by: dict, leadlag: list,
                    left_out: dict) -> list:
    """One (run, op) section of analysis_summary.md."""
    lines = [f"## {run_names[run]} ({run}), {op}", "",
             f"- Grokking step (first step with val acc > {GROKKED_ABOVE}): {describe_grokking(pairs)}.",
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
    inside = sorted({r["seed"] for r in mine if half_inside_band(r["half_step"], r["band_end"])})
    early = (f" Seed(s) {', '.join(map(str, inside))} reach val acc 0.5 inside their post-memorisation band: "
             "no onset lead (their onsets would time the end of the rise)." if inside else "")
    lines += [describe_leaders(table) + early, "",
              f"A measure's onset is the first measurement after its post-memorisation band (its first {onset.BAND} "
              f"measurements from memorisation on) that starts {onset.RUN} in a row all above or all below it; "
              "onset lead = val accuracy's onset minus the measure's (positive: leaves first), mean over seeds with a "
              "95% bootstrap interval. Onsets do not move under a monotone rescaling of a measure or with the budget. "
              "Secondary: t50, the step at which it completes half of its change between memorisation and the end "
              f"(running median over ±{LEADLAG_HALF_WIDTH} steps), t50 lead against val accuracy's t50 (mean ± "
              "stderr); both depend on the budget and the t50 on the scale. reads: what the measure reads "
              "(val_labels: a reference, not a predictor). Per seed: leadlag.csv.",
              "", "| measure | layer | split | reads | onset lead (steps) | leads in | lags in | onset - grokking step "
              "| t50 lead | t50 - grokking step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        if t["n"]:
            t50 = "n/a" if not t["t50_n"] else f"{t['t50_lead_mean']:.0f} ± {t['t50_lead_stderr']:.0f}"
            lines.append(f"| {t['measure']} | {t['layer']} | {t['split']} | {t['reads']} | {lead_text(t)} | "
                         f"{t['leads']}/{t['n']} | {t['lags']}/{t['n']} | {t['onset_from_grok']:.0f} | {t50} | "
                         f"{t['t50_from_grok']:.0f} |")
    never = [measure_label(t["layer"], t["split"], t["measure"]) for t in table if not t["n"]]
    if never:
        lines += ["", "Never leave their post-memorisation band: " + ", ".join(never) + "."]
    early = sorted({r["seed"] for r in mine if r["band_end"] is not None and r["half_step"] is not None
                    and r["half_step"] <= r["band_end"]})
    if early:
        lines += ["", f"Seed(s) {', '.join(map(str, early))}: val accuracy reached 0.5 inside the post-memorisation "
                  "band (no plateau to leave): their onsets time the rest of the rise, not its start."]
    return lines + [""]


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
        "progress": "progress_{run}_{op}.png: every measure's progress aligned on grokking, ordered by onset lead "
                    "over val acc (who leaves its post-memorisation band first)",
        "pca": "pca_{run}_{op}_{layer}.png: before/during/after on the class-centroid axes (rings) and plain PCA",
        "tsne": "tsne_{run}_{op}_{layer}.png: t-SNE before/during/after",
        "metrics": "metrics_{run}_{op}_{layer}.png: the representation metrics against step",
        "plugins": "plugins_{run}_{op}.png: weight/logit norms, softmax collapse, restricted/excluded loss, "
                   "Fourier and RQI against step",
        "fourier": "fourier_{run}_{op}.png: the embedding's Fourier spectrum before/during/after",
        "proj": "proj_{run}_{op}_{layer}.gif: animation through every snapshot (not for LaTeX)",
        "phase": "phase_map_{run}_{op}.png / phase_stats_{run}_{op}.png: a sweep's phase diagram (each cell's phase) "
                 "and per-cell heatmaps of share grokked, grokking step, delay, final val acc",
        "earlywarning": "earlywarning_{run}.png: per measure and baseline, held-out within-cell concordance with "
                        "time to grokking, J (hit - false-alarm rate) and clock slope, with 95% intervals",
    }
    lines = []
    for kind, names in sorted(kinds.items()):
        text = described.get(kind, f"{kind}_*: see analysis_summary.md")
        shown = names[0] if len(names) == 1 else f"{len(names)} files, e.g. {sorted(names)[0]}"
        lines.append(f"- {text} [{shown}]")
    return lines


def findings_block(by_op: dict, run_names: dict, rows_by: dict, leadlag: list, figures: list,
                   limit: int = NOTES_LIMIT, key_rows: list = (), extra: list = ()) -> str:
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
                def named(t):
                    label = measure_label(t["layer"], t["split"], t["measure"])
                    return f"{label}{reads_tag(t['reads'])} {lead_text(t, True)}"

                leaders = [named(t) for t in table if t["n"] >= 2 and t["lead_lo"] > 0]
                laggers = [named(t) for t in reversed(table) if t["n"] >= 2 and t["lead_hi"] < 0]
                mine = [k for k in key_rows if k["run"] == run and k["op"] == op]
                if mine:  # Nanda et al.'s definition, from checkpoints: lab/final_keys.py
                    head += " Final-model key frequencies: " + describe_final_keys(mine) + "."
                sections.append((head, changes, leaders, laggers, n))
            except Exception as e:  # an odd run must not cost the rest of the block
                warn(f"notes.txt findings for {run} {op} skipped ({type(e).__name__}: {e})")

    def render(n_changes, n_leaders, n_laggers):
        lines = [NOTES_BEGIN,
                 "Full tables: analysis_summary.md (every metric before/during/after, lead-lag tables), metrics.csv "
                 "(every value per step), leadlag.csv (onsets, t50s and leads per seed and measure), spikes.csv. "
                 "Onset lead = steps by which a measure leaves its post-memorisation band before val acc does, mean "
                 "[95% bootstrap interval] over grokked seeds. A lead is not a prediction: the weight norm moves as "
                 "much in runs that never grok, and one marked [reads val labels] reads what it would predict; a "
                 "sweep's earlywarning.csv and clock.csv test measures against such runs and the configuration.", ""]
        for head, changes, leaders, laggers, n in sections:
            line = head
            if changes[:n_changes]:
                line += " Last layer before->after: " + "; ".join(changes[:n_changes]) + "."
            if n and n_leaders:
                line += (f" Onset leads (steps, interval > 0, {n} seeds): "
                         + "; ".join(leaders[:n_leaders]) + "." if leaders
                         else f" No onset leads val acc's with an interval > 0 ({n} seeds).")
            if n and laggers[:n_laggers]:
                line += " After it: " + "; ".join(laggers[:n_laggers]) + "."
            lines.append(line)
        lines += list(extra)  # sweeps: phases and the early-warning ranking
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
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else None  # the user's file keeps its permissions
    write_text(path, text, mode)


def write_spikes(pairs: list, out_dir: str) -> None:
    columns = ["run", "op", "seed", "grok_step", "spikes", "spike_steps", "min_train_acc", "min_val_acc",
               "ends_in_spike", "final_val_acc", "tail_val_acc"]
    write_csv(os.path.join(out_dir, "spikes.csv"), columns,
              ({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in spike_rows(pairs)))


def write_leadlag(rows: list, out_dir: str) -> None:
    write_csv(os.path.join(out_dir, "leadlag.csv"), LEADLAG_COLUMNS,
              ({k: "" if v is None else round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
               for r in rows))


# ----------------------------------------------------------------------------- Nanda et al.'s definition
FINAL_KEY_COLUMNS = ["run", "op", "seed", "key_freqs", "n_key_freqs", "key_shares", "memorisation_end",
                     "test_loss_peak", "circuit_formation_end", "cleanup_end", "test_loss_t50",
                     "t50_restricted_loss_final", "lead_restricted_loss_final", "t50_excluded_loss_final",
                     "lead_excluded_loss_final", "t50_restricted_loss_per_step", "lead_restricted_loss_per_step",
                     "t50_excluded_loss_per_step", "lead_excluded_loss_per_step"]


def final_key_rows(pairs: list, pool, experiment_path: str) -> list:
    """lab.final_keys.summary_row of every job that kept checkpoints (--checkpoint_every), its final_keys.json
    computed in the pool where missing (by the experiment module at experiment_path)."""
    submitted = [(p, pool.submit(final_key_progress_of, experiment_path, p.run, p.op, p.seed)) for p in pairs
                 if p.final is not None and os.path.isdir(os.path.join(p.folder, CHECKPOINTS))]
    out = []
    for p, job in submitted:
        try:
            result = job.result()
            if result is not None:
                out.append(summary_row(p, result))
        except Exception as e:
            warn(f"final-model key frequencies of {p.run} {p.op} seed {p.seed} skipped ({type(e).__name__}: {e})")
    return out


def describe_final_keys(rows: list) -> str:
    """Phases and the leads over test loss, mean ± stderr over seeds, for one (run, op)."""
    def stat(key, fmt=".0f"):
        values = [r[key] for r in rows if r[key] is not None]
        return format_mean_stderr(values, fmt, ".0f") if values else "n/a"

    def lead(key):
        values = [r[key] for r in rows if r[key] is not None]
        return f"{stat(key)}, leads in {sum(v > 0 for v in values)}/{len(rows)}"

    return (f"key freqs per seed {'; '.join(r['key_freqs'] for r in rows)}; phases end at memorisation "
            f"{stat('memorisation_end')} (test loss peaks at {stat('test_loss_peak')}), circuit formation "
            f"{stat('circuit_formation_end')}, cleanup "
            f"{stat('cleanup_end')}; lead over test loss (steps, t50 of log loss): restricted loss "
            f"{lead('lead_restricted_loss_final')}, excluded loss {lead('lead_excluded_loss_final')} with the final "
            f"model's key freqs; {lead('lead_restricted_loss_per_step')} and {lead('lead_excluded_loss_per_step')} "
            "with each step's")


def final_keys_markdown(rows: list) -> str:
    if not rows:
        return ""
    lines = ["", "## Progress measures with the final model's key frequencies (Nanda et al. 2023's definition)", "",
             "From the checkpoints (--checkpoint_every): key frequencies = the fourier_topk frequencies with the most "
             "power in the final model's logits; restricted/excluded loss recomputed with them at every checkpoint "
             "(lab/final_keys.py). Phases on log10(test loss) from the memorisation step: circuit formation ends at "
             "its 10% point, cleanup at its 90% point. Per seed in `final_keys.csv`.", ""]
    for run, op in dict.fromkeys((r["run"], r["op"]) for r in rows):
        lines.append(f"- {run}, {op}: " + describe_final_keys([r for r in rows if r["run"] == run
                                                                  and r["op"] == op]) + ".")
    return "\n".join(lines) + "\n"


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


def figures_key(P) -> str:
    """Hash of plot.py, so that editing it redraws every figure."""
    return _file_hash(os.path.abspath(P.__file__))


@functools.cache
def _file_hash(path: str) -> str:
    with open(path) as f:
        return hashlib.sha1(f.read().encode()).hexdigest()[:16]


def inputs_key(P, settings, pairs: list, *extra) -> str:
    """Cache key of figures drawn from these pairs' logs, results and snapshots."""
    inputs = [(p.run, p.op, p.seed, len(p.log), p.log[-1], p.grok_step,
               [(file_key(s["path"]), s["val_acc"]) for s in p.snapshots]) for p in pairs]
    return settings_key(settings, figures_key(P), *extra, inputs)


def sweep_outputs(run: str, name: str, out_dir: str) -> dict:
    """A sweep's phase figures (lab.figures.phase_figures per op), early-warning figure, table rows (phases.csv,
    phase_jobs.csv, earlywarning.csv, clock.csv), summary lines and notes.txt lines."""
    sweep = phases.load_sweep(run, name)
    jobs = phases.job_rows(sweep)
    if not jobs:
        warn(f"sweep {run}: no finished job yet; skipped")
        return {}
    cells = phases.cell_rows(sweep, jobs)
    figures = [f for op in sweep["ops"]
               for f in sweep_figures.phase_figures(sweep, op, [c for c in cells if c["op"] == op], out_dir)]
    markdown, notes = phases.sweep_markdown(sweep, cells), phases.sweep_notes(sweep, cells)
    table, clock = [], []
    if sweep["seeds"] < 2:
        warn(f"sweep {run}: early warning needs 2 seeds or more (the config lookup reads a cell's other seeds); "
             "skipped")
    else:
        runs = earlywarning.sweep_runs(sweep)
        table = [{"run": name, **t} for t in earlywarning.earlywarning_table(runs)]
        clock = [{"run": name, **c} for c in earlywarning.clock_table(runs)]
        counts = earlywarning.tally(runs)
        figures += sweep_figures.earlywarning_figure(name, table, clock, counts, out_dir)
        markdown += earlywarning.markdown(name, table, clock, counts)
        notes += earlywarning.notes(name, table, clock, counts)
    fitted = rules.fit(runs, table, sweep) if table and any(r.status(0) == "positive" for r in runs) else None
    return {"figures": figures, "fields": sweep["fields"], "phases.csv": cells, "phase_jobs.csv": jobs,
            "earlywarning.csv": table, "clock.csv": clock, "markdown": markdown, "notes": notes, "rules": fitted,
            "name": name}


def write_sweep_tables(outputs: list, out_dir: str) -> None:
    """phases.csv (per cell and op), phase_jobs.csv (per job), earlywarning.csv (per measure and baseline) and
    clock.csv (per measure and family), every sweep's."""
    fields = list(dict.fromkeys(f for o in outputs for f in o["fields"]))
    for file, columns in (
            ("phases.csv", ["run", "cell", *fields, "op", "phase", "phases", "n", "grokked", "share_grokked",
                            "grok_step_mean", "grok_step_stderr", "delay_mean", "delay_stderr", "final_val_acc_mean",
                            "final_val_acc_stderr"]),
            ("phase_jobs.csv", ["run", "cell", *fields, "op", "seed", "phase", "memorisation_step", "grok_step",
                                "delay", "half_step", "final_val_acc"]),
            ("earlywarning.csv", earlywarning.EARLYWARNING_COLUMNS), ("clock.csv", earlywarning.CLOCK_COLUMNS)):
        write_csv(os.path.join(out_dir, file), columns, [r for o in outputs for r in o[file]])
    fitted = [o for o in outputs if o["rules"] and o["rules"]["rules"]]
    for o in fitted:  # each sweep's rules, fitted on all its runs: freeze one by copying it (docs/analysis.md)
        name = rules.RULES_FILE if len(fitted) == 1 else rules.RULES_FILE.replace(
            ".json", f"_{o['name']}.json".replace(os.sep, "_"))
        rules.write(os.path.join(out_dir, name), o["rules"])


def experiment_path(P) -> str:
    """experiment.py beside the plot module P: the one that trained the runs plot.py reads."""
    return os.path.join(os.path.dirname(os.path.abspath(P.__file__)), "experiment.py")


class Drawing:
    """The figures of one plot.py call: each group drawn in the pool, unless the cache holds it for the same inputs."""

    def __init__(self, pool, cache: FigureCache):
        self.pool, self.cache, self.figures, self.jobs = pool, cache, [], {}

    def draw(self, name: str, key: str, function, *arguments) -> None:
        cached = self.cache.get(name, key)
        if cached is None:
            self.jobs[name] = (key, self.pool.submit(function, *arguments))
        else:
            self.figures.extend(cached)

    def collect(self) -> None:
        """Wait for the groups in the pool; one that fails is skipped (a run an agent changed may lack what one
        figure needs), the others kept."""
        for name, (key, job) in self.jobs.items():
            try:
                made = job.result()
            except Exception as e:
                warn(f"{name.replace('/', ' ')}: figure skipped ({type(e).__name__}: {e})")
                continue
            self.cache.put(name, key, made)
            self.figures += made


def find_jobs(args, labels):
    """(runs, sweeps, trained jobs of the runs) that plot.py reads: a sweep's cells are analysed as a grid."""
    runs = discover_runs(args, labels)
    sweeps = {run: name for run, name in runs.items() if os.path.exists(os.path.join(run, SWEEP))}
    runs = {run: name for run, name in runs.items() if run not in sweeps}
    return runs, sweeps, [p for run in runs for p in load_run(run, run)]


def curves(P, settings, pairs, by_op, runs, out_dir, drawing) -> None:
    """The learning curves, drawn here (they read every job), or from the cache."""
    key = inputs_key(P, settings, pairs, "curves", runs)
    cached = drawing.cache.get("curves", key)
    if cached is None:
        try:
            cached = P.plot_curves(by_op, runs, out_dir)
            drawing.cache.put("curves", key, cached)
        except Exception as e:
            warn(f"learning curves skipped ({type(e).__name__}: {e})")
            cached = []
    drawing.figures += cached


def metric_rows(pairs, metric_jobs) -> tuple[list, dict]:
    """Every metric row (from snapshots, computed in the pool, and from measures.jsonl), and by (run, op)."""
    rows, rows_by = [], {}
    for p, job in metric_jobs:
        found = job.result()
        rows += found
        rows_by.setdefault((p.run, p.op), []).extend(found)
    for p in pairs:
        found = measure_rows(p)
        rows += found
        rows_by.setdefault((p.run, p.op), []).extend(found)
    return rows, rows_by


def run_figures(P, settings, by_op, rows_by, key_rows, out_dir, drawing) -> tuple[list, dict]:
    """Lead-lag of every (run, op) and the figures that read the metric rows: who moves first, Nanda et al.'s final
    keys, the plugins' measures, the representation metrics. Returns (leadlag rows, seeds left out by (run, op))."""
    leadlag, left_out = [], {}

    def key_of(kind, found, run, op):
        return settings_key(settings, kind, found, inputs_key(P, settings, by_op[op][run]))

    for (run, op), found in rows_by.items():
        try:
            made, left_out[(run, op)] = leadlag_rows(by_op[op][run], found)
        except Exception as e:
            warn(f"lead-lag of {run} {op} skipped ({type(e).__name__}: {e})")
            made, left_out[(run, op)] = [], []
        leadlag += made
        drawing.draw(f"progress/{run}/{op}", key_of("progress", found, run, op),
                     P.progress_figure, run, op, by_op[op][run], found, made, out_dir)
    for (run, op) in dict.fromkeys((k["run"], k["op"]) for k in key_rows):
        mine = [k for k in key_rows if k["run"] == run and k["op"] == op]
        drawing.draw(f"final_keys/{run}/{op}", key_of("final_keys", mine, run, op),
                     P.final_keys_figure, run, op, by_op[op][run], mine, out_dir)
    for (run, op), found in rows_by.items():
        model_rows = [r for r in found if r["layer"] in ("model", "embedding")]
        drawing.draw(f"plugins/{run}/{op}", key_of("plugins", found, run, op),
                     P.plugin_figures, run, op, by_op[op][run], model_rows, out_dir)
    for (run, op), found in rows_by.items():
        found = [r for r in found if r["layer"] in LAYERS]
        if found:
            drawing.draw(f"metrics/{run}/{op}", key_of("metrics", found, run, op),
                         P.metric_figures, run, op, by_op[op][run], found, out_dir)
    return leadlag, left_out


def sweeps_analysed(sweeps: dict, out_dir: str, figures: list) -> tuple[list, list]:
    """Each sweep's phases, early warning and clock test (their tables and figures); (markdown, notes lines)."""
    outputs = []
    for run, name in sweeps.items():
        try:
            made = sweep_outputs(run, name, out_dir)
        except Exception as e:  # a broken sweep must not cost the other runs' analysis
            warn(f"sweep {run} skipped ({type(e).__name__}: {e})")
            continue
        if made:
            outputs.append(made)
            figures += made["figures"]
    if outputs:
        write_sweep_tables(outputs, out_dir)
    return [line for o in outputs for line in o["markdown"]], [line for o in outputs for line in o["notes"]]


def frozen_rules(args) -> tuple:
    """(rules, path) that plot.py applies: --warning_rules=FILE (a bad file is an error: RulesError), by default
    the shipped lab/earlywarning_rules.json (a bad one is a warning), none with --warning_rules=none."""
    if args.warning_rules == "none":
        return None, None
    if args.warning_rules:
        return rules.read(args.warning_rules), args.warning_rules
    try:
        return rules.read(rules.SHIPPED), os.path.relpath(rules.SHIPPED)
    except rules.RulesError as e:
        warn(f"{e}; no frozen rules applied")
        return None, None


def applied_rules(frozen: tuple, run_dirs: list, out_dir: str, figures: list) -> list:
    """earlywarning_applied.csv of the frozen rules on every job, earlywarning_frozen.csv and its figure of their
    scores there; their lines for the summary and the notes."""
    found, path = frozen
    if found is None:
        return []
    jobs = rules.jobs_of(run_dirs)
    runs = rules.warn_runs(found, jobs)  # each job's log and measures read once, for both tables
    applied = rules.apply(found, jobs, runs)
    write_csv(os.path.join(out_dir, rules.APPLIED_FILE), rules.APPLIED_COLUMNS, applied)
    if not applied:
        return []
    scores = rules.frozen_scores(found, jobs, runs)
    write_csv(os.path.join(out_dir, rules.FROZEN_FILE), rules.FROZEN_COLUMNS, scores)
    figures += sweep_figures.frozen_figure(found, path, scores, out_dir)
    return rules.summary_lines(found, path, applied, scores)


def main(P, args) -> int:
    """Everything plot.py writes: figures (P's functions, in a process pool, cached), metrics.csv/parquet,
    leadlag.csv, spikes.csv, analysis_summary.md and the notes.txt block. Returns the exit code."""
    gc.freeze()  # the imported modules live until exit: no collection or exit walks them (runner.cli says why)
    try:  # bad input first: a broken --warning_rules stops plot.py before it reads or writes anything
        explicit = frozen_rules(args) if args.warning_rules else None
    except rules.RulesError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    runs, sweeps, pairs = find_jobs(args, P.labels)
    if not pairs and not sweeps:
        print("plot.py: error: no runs found (no run_* folder with results here; see --runs)", file=sys.stderr)
        return 1
    frozen = explicit or frozen_rules(args)  # the shipped rules: a broken one is a warning, once there are runs
    settings = P.Settings(tsne=not args.no_tsne)
    cache_dir = os.path.join(args.out_dir, ".plot_cache")
    os.makedirs(cache_dir, exist_ok=True)
    by_op = {}
    for p in pairs:
        by_op.setdefault(p.op, {}).setdefault(p.run, []).append(p)
    with_snaps = [p for p in pairs if p.snapshots]
    shown = {}  # the pictures show the first seed with snapshots of each (run, op)
    for p in with_snaps:
        shown.setdefault((p.run, p.op), p)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ProcessPoolExecutor(args.workers or cores, mp_context=get_context("fork"),
                             initializer=_limit_threads) as pool:
        drawing = Drawing(pool, FigureCache(os.path.join(cache_dir, "figures.json")))
        for (run, op), p in shown.items():
            drawing.draw(f"representations/{run}/{op}", inputs_key(P, settings, [p], "representations"),
                         P.representation_figures, p, settings, args.out_dir)
        # Jobs with a measures.jsonl have every metric densely from training; the others get them from snapshots.
        metric_jobs = [(p, pool.submit(pair_metrics, p, settings, cache_dir)) for p in with_snaps
                       if not os.path.exists(os.path.join(p.folder, MEASURES))]
        curves(P, settings, pairs, by_op, runs, args.out_dir, drawing)
        # before metric_rows, which reads the final_keys.json they write
        key_rows = final_key_rows(pairs, pool, experiment_path(P))
        rows, rows_by = metric_rows(pairs, metric_jobs)
        leadlag, left_out = run_figures(P, settings, by_op, rows_by, key_rows, args.out_dir, drawing)
        drawing.collect()
    drawing.cache.save()
    figures = drawing.figures
    write_tables(rows, args.out_dir)
    write_leadlag(leadlag, args.out_dir)
    write_spikes(pairs, args.out_dir)
    write_csv(os.path.join(args.out_dir, "final_keys.csv"), FINAL_KEY_COLUMNS,
              ({k: "" if v is None else round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
               for r in key_rows))
    sweep_md, sweep_notes = sweeps_analysed(sweeps, args.out_dir, figures)
    rule_lines = applied_rules(frozen, [*runs, *sweeps], args.out_dir, figures)
    sweep_md, sweep_notes = sweep_md + ["", *rule_lines] * bool(rule_lines), sweep_notes + rule_lines
    figures_to_tensorboard(figures, [*runs, *sweeps])  # for runs trained with --tracker=tensorboard
    summary = os.path.join(args.out_dir, "analysis_summary.md")
    write_text(summary, summary_markdown(by_op, runs, rows_by, sorted(figures), leadlag, left_out)
               + final_keys_markdown(key_rows) + "".join(f"\n{line}" for line in sweep_md))
    if args.notes:
        update_notes(args.notes, findings_block(by_op, runs, rows_by, leadlag, sorted(figures), key_rows=key_rows,
                                                extra=sweep_notes))
    print(f"plot.py: {len(figures)} figures, {len(rows)} metric rows, summary in {summary}", file=sys.stderr)
    return 0
