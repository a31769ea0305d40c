"""Nanda et al. 2023's progress measures as the paper computes them: the key frequencies are taken once, from the
final model, and restricted and excluded loss are recomputed with them at every checkpoint the run kept
(--checkpoint_every). The measures plugin's restricted_loss / excluded_loss choose their key frequencies anew at
each step instead; both are reported, under different names (docs/presets.md, "Two definitions").

`E` below is the experiment module (experiment.py): its Config, ops and models.
"""

import os

import numpy as np
import torch
from safetensors.torch import load_model as load_weights

from lab import measures as M
from lab.analysis import LEADLAG_HALF_WIDTH, completion, leadlag_end, read_examples, read_log
from lab.config import config_from_dict, load_script
from lab.files import read_json, write_json
from lab.ops import cyclic_coordinates
from lab.job import checkpoints, load_model
from lab.schema import CHECKPOINTS, CONFIG, FINAL_KEYS, LOG, MEASURES, MODEL, Job, job_dir

FINAL_KEYS_VERSION = 1  # bump when the computation below changes


def final_key_progress(E, run_dir: str, job: Job) -> dict | None:
    """The job's final_keys.json, computed (and cached) when missing or stale; None for an op without a cyclic
    group or a job without checkpoints.

    key_freqs: the cfg.fourier_topk frequencies holding most of the final model's logit power (all pairs);
    key_shares: each one's share of that power; rows: per checkpoint and the final model, step, train/test loss
    and accuracy, restricted_loss (every pair, the final key frequencies only, plus each class's mean logit)
    and excluded_loss (training pairs, those frequencies removed), with the run's loss function.
    """
    folder = job_dir(run_dir, job)
    saved = checkpoints(run_dir, job)
    model_path = os.path.join(folder, MODEL)
    if not saved or not os.path.exists(model_path):
        return None
    stamp = {"version": FINAL_KEYS_VERSION, "checkpoints": [name for _, name in saved],
             "model": os.stat(model_path).st_mtime_ns}
    path = os.path.join(folder, FINAL_KEYS)
    if os.path.exists(path):
        cached = read_json(path)
        if cached.get("stamp") == stamp:
            return cached
    cfg = config_from_dict(E.Config, read_json(os.path.join(run_dir, CONFIG)))
    cfg = job.config(cfg)
    task = E.task_of(cfg, job.op)
    cyclic = cyclic_coordinates(task, E.OPS[job.op])
    if cyclic is None:
        return None
    rows, i, j, m, sign, _ = cyclic
    basis = M.FourierBasis(i, j, m, sign)
    is_train = torch.from_numpy(read_examples(folder)[1])
    loss = E.LOSSES[cfg.loss]
    y = task.y

    def measure(key):
        with torch.inference_mode():
            logits = model(task.x).float()  # (n_pairs, n_classes)
        nanda = M.fourier_progress(logits[rows], y[rows], is_train[rows], basis, cfg.fourier_topk, loss, key=key)
        train, test = is_train, ~is_train
        right = logits.argmax(-1) == y
        return {"train_loss": loss(logits[train], y[train]).item(), "test_loss": loss(logits[test], y[test]).item(),
                "train_acc": right[train].float().mean().item(), "test_acc": right[test].float().mean().item(),
                "restricted_loss": nanda["restricted_loss"], "excluded_loss": nanda["excluded_loss"],
                "logit_key_frac": nanda["logit_key_frac"]}, nanda

    model = load_model(E, run_dir, job.op, job.seed, job=job)
    final_row, final = measure(None)  # its own top-k: the final key frequencies
    out = []
    for step, name in saved:  # the same model object, each checkpoint's weights in turn
        load_weights(model, os.path.join(folder, CHECKPOINTS, name))
        out.append({"step": step, **measure(final["key_index"])[0]})
    last_step = read_log(os.path.join(folder, LOG))[-1]["step"]
    if out[-1]["step"] != last_step:
        out.append({"step": last_step, **final_row})
    result = {"stamp": stamp, "key_freqs": final["key_freqs"], "key_shares": final["key_shares"],
              "definition": "key frequencies of the final model's logits (top fourier_topk by power), fixed over "
                            "the run", "rows": out}
    write_json(path, result)
    return result


def _log_completion(steps, losses, start: int, half_width: float):
    """t10, t50, t90 of log10(loss) from `start` (analysis.completion), or None when it does not change."""
    found = completion(np.asarray(steps), np.log10(np.maximum(np.asarray(losses, dtype=float), 1e-30)), start,
                       half_width)
    return None if found is None else found[0]


def phases_and_leads(rows: list, memorisation_step: int, per_step: list = (), half_width: float | None = None,
                     end: int | None = None) -> dict:
    """Nanda et al.'s three phases and the leads of restricted and excluded loss over test loss, all read on
    log10(loss) from the memorisation step (analysis.completion: t10/t50/t90 = the steps at which 10/50/90% of
    the change to the end is done).

    memorisation: ends at the first evaluation with train accuracy >= MEMORISED_AT (given); test_loss_peak, the
    checkpoint with the highest test loss, is where the paper's memorisation phase ends (test loss stops rising);
    circuit formation: ends when test loss has done 10% of its fall (t10); cleanup: ends at its t90.
    lead_<measure> = test loss's t50 - the measure's t50, in steps (positive: the measure moves first), for the
    final-model key frequencies (rows) and, where given, the per-step ones (per_step: measures.jsonl rows as
    {"step", "restricted_loss", "excluded_loss"}). end: rows after it are left out (analysis.leadlag_end: a seed
    that ends inside a spike is read up to the evaluation before it). half_width: the running median's, in steps;
    None: LEADLAG_HALF_WIDTH, or the checkpoints' interval where that is longer, so that the median spans three
    checkpoints and acts (at nanda2023's 200-step checkpoints a 100-step half-width holds one).
    """
    if end is not None:
        rows, per_step = [r for r in rows if r["step"] <= end], [r for r in per_step if r["step"] <= end]
    steps = [r["step"] for r in rows]
    if half_width is None:
        half_width = max(LEADLAG_HALF_WIDTH, float(np.median(np.diff(steps))) if len(steps) > 1 else 0.0)
    test = _log_completion(steps, [r["test_loss"] for r in rows], memorisation_step, half_width)
    peak = max(rows, key=lambda r: r["test_loss"])["step"] if rows else None  # where Nanda et al.'s memorisation ends
    out = {"memorisation_end": memorisation_step, "test_loss_peak": peak,
           "circuit_formation_end": test[0] if test else None, "cleanup_end": test[2] if test else None,
           "test_loss_t50": test[1] if test else None}
    for source, series in (("final", rows), ("per_step", per_step)):
        for measure in ("restricted_loss", "excluded_loss"):
            points = [(r["step"], r[measure]) for r in series if r.get(measure) is not None]
            found = _log_completion([s for s, _ in points], [v for _, v in points], memorisation_step,
                                    half_width) if len(points) >= 3 else None
            out[f"t50_{measure}_{source}"] = found[1] if found else None
            out[f"lead_{measure}_{source}"] = test[1] - found[1] if found and test else None
    return out


def final_key_progress_of(experiment_path: str, run_dir: str, op: str, seed: int):
    """final_key_progress for plot.py's process pool: a module cannot be passed to a worker, its path can."""
    return final_key_progress(load_script(experiment_path, "experiment"), run_dir, Job(op, seed))


def per_step_rows(folder: str) -> list:
    """The measures plugin's restricted and excluded loss (key frequencies chosen at each step) of one job."""
    path = os.path.join(folder, MEASURES)
    if not os.path.exists(path):
        return []
    out = []
    for r in read_log(path, required=("step", "values")):
        model = r["values"].get("model", {}) if isinstance(r["values"], dict) else {}
        out.append({"step": r["step"], "restricted_loss": model.get("all", {}).get("restricted_loss"),
                    "excluded_loss": model.get("train", {}).get("excluded_loss")})
    return out


KEY_SHARE = 0.01  # n_key_freqs counts the top fourier_topk frequencies holding at least this share of the power


def summary_row(pair, result: dict) -> dict:
    """One row of final_keys.csv: a job's final key frequencies (and how many hold >= KEY_SHARE of the logits'
    power), phases and leads (phases_and_leads)."""
    start = pair.memorisation_step if pair.memorisation_step is not None else 0
    found = phases_and_leads(result["rows"], start, per_step_rows(pair.folder), end=leadlag_end(pair))
    return {"run": pair.run, "op": pair.op, "seed": pair.seed,
            "key_freqs": " ".join(map(str, result["key_freqs"])),
            "n_key_freqs": sum(share >= KEY_SHARE for share in result["key_shares"]),
            "key_shares": " ".join(f"{s:.3f}" for s in result["key_shares"]), **found}
