"""In-process tests of lab/final_keys.py (Nanda et al.'s progress measures with the final model's key
frequencies), on run folders written by hand as experiment.py writes them: written against the mutants mutmut
left alive (docs/testing.md, "Mutation testing")."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_model

import experiment as E
from lab import files, measures, schema
from lab import final_keys as F
from lab import analysis as A
from lab.analysis import TrainedJob
from lab.config import config_dict
from lab.job import load_model, write_examples
from lab.ops import cyclic_coordinates
from lab.schema import CHECKPOINTS, Job

EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiment.py")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.safetensors"


def write_model(cfg, task, path, seed):
    torch.manual_seed(seed)
    save_model(E.build_model(cfg, task), path)


def make_run(tmp_path, steps=(20, 40), last=60, ops=("x_plus_y", "permutation")):
    """A run of one seed per op with untrained models saved as its checkpoints at `steps` and as its final model,
    a log to step `last` and the example table: what final_key_progress reads."""
    run = tmp_path / "run_0"
    run.mkdir()
    cfg = E.Config(out_dir=str(run), ops=ops, seeds=1, p=11, perm_k=3, d_model=32, fourier_topk=2,
                   checkpoint_every=20, steps=last, train_frac=0.5)
    files.write_json(str(run / schema.CONFIG), config_dict(cfg))
    for op in ops:
        task = E.task_of(cfg, op)
        folder = run / f"{op}_0"
        (folder / CHECKPOINTS).mkdir(parents=True)
        train_idx, _ = E.split_pairs(len(task.y), cfg.train_frac, 0)
        write_examples(str(folder / schema.EXAMPLES), task, train_idx)
        files.write_jsonl(str(folder / schema.LOG), [{"step": s, "train_acc": 1.0, "val_acc": 0.0}
                                                     for s in range(0, last + 1, 10)])
        for k, step in enumerate(steps):
            write_model(cfg, task, str(folder / CHECKPOINTS / checkpoint_name(step)), k)
        write_model(cfg, task, str(folder / schema.MODEL), 99)
    return run, cfg


def measured(cfg, task, model, is_train, key=None):
    """The row of one model, from the definitions: its losses and accuracies and fourier_progress's restricted and
    excluded loss and key share, with the final model's key frequencies (key) or its own (None)."""
    rows, i, j, m, sign, _ = cyclic_coordinates(task, E.OPS["x_plus_y"])
    loss = E.LOSSES[cfg.loss]
    with torch.inference_mode():
        logits = model(task.x).float()
    nanda = measures.fourier_progress(logits[rows], task.y[rows], is_train[rows], measures.FourierBasis(i, j, m, sign),
                                      cfg.fourier_topk, loss, key=key)
    right = logits.argmax(-1) == task.y
    return {"train_loss": loss(logits[is_train], task.y[is_train]).item(),
            "test_loss": loss(logits[~is_train], task.y[~is_train]).item(),
            "train_acc": right[is_train].float().mean().item(), "test_acc": right[~is_train].float().mean().item(),
            "restricted_loss": nanda["restricted_loss"], "excluded_loss": nanda["excluded_loss"],
            "logit_key_frac": nanda["logit_key_frac"]}, nanda


def test_final_key_progress_reads_every_checkpoint_with_the_final_models_key_frequencies(tmp_path):
    run, cfg = make_run(tmp_path)
    job = Job("x_plus_y", 0)
    got = F.final_key_progress(E, str(run), job)
    task = E.task_of(cfg, "x_plus_y")
    folder = run / "x_plus_y_0"
    train_idx, _ = E.split_pairs(len(task.y), cfg.train_frac, 0)
    is_train = torch.zeros(len(task.y), dtype=torch.bool)
    is_train[train_idx] = True
    final_row, final = measured(cfg, task, load_model(E, str(run), "x_plus_y", 0), is_train)
    want = [{"step": step, **measured(cfg, task, load_model(E, str(run), "x_plus_y", 0, checkpoint=name), is_train,
                                      key=final["key_index"])[0]}
            for step, name in ((20, checkpoint_name(20)), (40, checkpoint_name(40)))]
    want.append({"step": 60, **final_row})  # the last step is no checkpoint's: the final model's own row
    assert got["rows"] == want
    assert got["key_freqs"] == final["key_freqs"] and got["key_shares"] == final["key_shares"]
    assert len(got["key_freqs"]) == cfg.fourier_topk and got["key_shares"] == sorted(got["key_shares"], reverse=True)
    assert got["stamp"] == {"version": F.FINAL_KEYS_VERSION, "checkpoints": [checkpoint_name(20), checkpoint_name(40)],
                            "model": os.stat(folder / schema.MODEL).st_mtime_ns}
    assert got["definition"] == ("key frequencies of the final model's logits (top fourier_topk by power), fixed "
                                 "over the run")
    assert files.read_json(str(folder / schema.FINAL_KEYS)) == got
    # the checkpoints' rows differ from the final model's (other weights), and use its key frequencies, not theirs
    assert want[0]["test_loss"] != final_row["test_loss"]
    own = measured(cfg, task, load_model(E, str(run), "x_plus_y", 0, checkpoint=checkpoint_name(20)), is_train)[1]
    if own["key_freqs"] != final["key_freqs"]:
        assert want[0]["restricted_loss"] != own["restricted_loss"]


def test_final_key_progress_is_cached_until_a_checkpoint_or_the_model_changes(tmp_path, monkeypatch):
    run, cfg = make_run(tmp_path, steps=(20, 40))
    job = Job("x_plus_y", 0)
    first = F.final_key_progress(E, str(run), job)
    real = F.load_model

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(F, "load_model", refuse)
    assert F.final_key_progress(E, str(run), job) == first
    monkeypatch.setattr(F, "load_model", real)
    task = E.task_of(cfg, "x_plus_y")
    folder = run / "x_plus_y_0"
    write_model(cfg, task, str(folder / CHECKPOINTS / checkpoint_name(60)), 5)  # a checkpoint at the last step
    again = F.final_key_progress(E, str(run), job)
    assert [r["step"] for r in again["rows"]] == [20, 40, 60]  # no extra final row: the last step has a checkpoint
    assert again["rows"][:2] == first["rows"][:2] and again["rows"][2] != first["rows"][2]
    assert again["stamp"]["checkpoints"] == [checkpoint_name(s) for s in (20, 40, 60)]
    files.write_json(str(folder / schema.FINAL_KEYS), {**again, "stamp": {**again["stamp"], "version": 0}})
    assert F.final_key_progress(E, str(run), job) == again  # a stale version: recomputed


def test_final_key_progress_needs_a_cyclic_op_checkpoints_and_a_model(tmp_path):
    run, _ = make_run(tmp_path)
    assert F.final_key_progress(E, str(run), Job("permutation", 0)) is None
    assert not os.path.exists(run / "permutation_0" / schema.FINAL_KEYS)
    os.remove(run / "x_plus_y_0" / schema.MODEL)
    assert F.final_key_progress(E, str(run), Job("x_plus_y", 0)) is None
    for name in os.listdir(run / "permutation_0" / CHECKPOINTS):
        os.remove(run / "permutation_0" / CHECKPOINTS / name)
    assert F.final_key_progress(E, str(run), Job("permutation", 0)) is None


def test_final_key_progress_of_loads_the_experiment_by_its_path(tmp_path):
    run, _ = make_run(tmp_path, ops=("x_plus_y",))
    got = F.final_key_progress_of(EXPERIMENT, str(run), "x_plus_y", 0)
    assert got == F.final_key_progress(E, str(run), Job("x_plus_y", 0)) and len(got["rows"]) == 3


def ramp(steps, start, stop, low, high):
    """log10 of the loss goes linearly from low to high between steps start and stop."""
    return 10 ** (low + (high - low) * np.clip((np.asarray(steps) - start) / (stop - start), 0, 1))


def loss_rows(end=300):
    steps = np.arange(0, end + 1, 10)
    test = ramp(steps, 100, 200, 0, -2)
    test[steps == 60] = 2.0  # the test loss's peak: where the paper's memorisation phase ends
    return [{"step": int(s), "test_loss": float(t), "restricted_loss": float(r), "excluded_loss": float(x)}
            for s, t, r, x in zip(steps, test, ramp(steps, 50, 150, 0, -3), ramp(steps, 80, 180, -1, 1))]


def test_the_phases_smoothing_spans_three_checkpoints_at_their_interval():
    """nanda2023 keeps a checkpoint every 200 steps: a running median of half-width 100 holds one checkpoint and
    leaves a one-checkpoint dip in, which moves circuit formation's end; the default half-width (the interval)
    removes it."""
    steps = np.arange(0, 20_001, 200)
    clean = ramp(steps, 6000, 12000, 0, -2)
    dipped = clean.copy()
    dipped[steps == 3000] = 10 ** -1.5  # one checkpoint far down, on the plateau

    def rows(test):
        return [{"step": int(s), "test_loss": float(t), "restricted_loss": 1.0, "excluded_loss": 1.0}
                for s, t in zip(steps, test)]

    smooth = F.phases_and_leads(rows(dipped), 1000)
    assert smooth["circuit_formation_end"] == pytest.approx(F.phases_and_leads(rows(clean), 1000)
                                                            ["circuit_formation_end"], abs=1)
    assert smooth["circuit_formation_end"] == pytest.approx(6600, abs=200)  # 10% of the fall: 6000 + 0.1 * 6000
    assert F.phases_and_leads(rows(dipped), 1000, half_width=100)["circuit_formation_end"] < 3100


def test_phases_and_leads_on_log_loss_from_the_memorisation_step():
    got = F.phases_and_leads(loss_rows(), 50, half_width=1)
    assert got == pytest.approx({
        "memorisation_end": 50, "test_loss_peak": 60, "circuit_formation_end": 110, "cleanup_end": 190,
        "test_loss_t50": 150, "t50_restricted_loss_final": 100, "lead_restricted_loss_final": 50,
        "t50_excluded_loss_final": 130, "lead_excluded_loss_final": 20, "t50_restricted_loss_per_step": None,
        "lead_restricted_loss_per_step": None, "t50_excluded_loss_per_step": None,
        "lead_excluded_loss_per_step": None})
    per_step = [{"step": r["step"], "restricted_loss": r["excluded_loss"], "excluded_loss": None}
                for r in loss_rows()]
    got = F.phases_and_leads(loss_rows(), 50, per_step, half_width=1)
    assert (got["t50_restricted_loss_per_step"], got["lead_restricted_loss_per_step"]) == pytest.approx((130, 20))
    assert got["t50_excluded_loss_per_step"] is None and got["lead_excluded_loss_per_step"] is None
    # end: the rows after it are left out (test loss then done by 170: its t50 moves to 135)
    cut = F.phases_and_leads(loss_rows(), 50, per_step, half_width=1, end=170)
    assert cut == pytest.approx(F.phases_and_leads(loss_rows(170), 50, [r for r in per_step if r["step"] <= 170],
                                                   half_width=1))
    assert cut["test_loss_t50"] == pytest.approx(135)
    # smoothing over 100 steps (the default) moves the ends of the ramp, not its middle
    assert F.phases_and_leads(loss_rows(), 50)["test_loss_t50"] == pytest.approx(150, abs=5)
    flat = [{**r, "test_loss": 1.0} for r in loss_rows()]
    none = F.phases_and_leads(flat, 50, half_width=1)
    assert none["circuit_formation_end"] is none["cleanup_end"] is none["test_loss_t50"] is None
    assert none["lead_restricted_loss_final"] is None and none["t50_restricted_loss_final"] == pytest.approx(100)
    short = F.phases_and_leads(loss_rows()[:2], 0, half_width=1)
    assert short["t50_restricted_loss_final"] is None and short["test_loss_peak"] == 0
    assert F.phases_and_leads([], 0)["test_loss_peak"] is None


def test_a_loss_of_zero_is_read_as_1e_minus_30():
    steps = np.arange(0, 310, 10)
    losses = np.where(steps < 150, 1.0, 0.0)
    times = F._log_completion(steps, losses, 0, 1)
    assert times == pytest.approx([145, 145, 145], abs=5) and all(np.isfinite(times))


def test_the_measures_plugins_per_step_losses(tmp_path):
    assert F.per_step_rows(str(tmp_path)) == []
    files.write_jsonl(str(tmp_path / schema.MEASURES), [
        {"step": 10, "val_acc": 0.1, "values": {"model": {"all": {"restricted_loss": 1.5},
                                                          "train": {"excluded_loss": 2.5}}}},
        {"step": 20, "val_acc": 0.1, "values": {"last": {}}},
        {"step": 30, "val_acc": 0.1, "values": ["odd"]}])
    assert F.per_step_rows(str(tmp_path)) == [
        {"step": 10, "restricted_loss": 1.5, "excluded_loss": 2.5},
        {"step": 20, "restricted_loss": None, "excluded_loss": None},
        {"step": 30, "restricted_loss": None, "excluded_loss": None}]


def test_a_summary_row_of_final_keys_csv(tmp_path):
    log = [{"step": s, "train_acc": 1.0 if s >= 50 else 0.5, "val_acc": 0.0} for s in range(0, 310, 10)]
    pair = TrainedJob("r", "x_plus_y", 3, str(tmp_path), log, None)
    result = {"key_freqs": [3, 1, 4], "key_shares": [0.9, 0.01, 0.0049], "rows": loss_rows()}
    row = F.summary_row(pair, result)
    assert (row["run"], row["op"], row["seed"], row["key_freqs"], row["n_key_freqs"], row["key_shares"]) == (
        "r", "x_plus_y", 3, "3 1 4", 2, "0.900 0.010 0.005")
    assert {k: row[k] for k in F.phases_and_leads(loss_rows(), 50)} == F.phases_and_leads(loss_rows(), 50)
    # the measures plugin's per-step losses, and a seed that ends in a spike read up to the evaluation before it
    files.write_jsonl(str(tmp_path / schema.MEASURES), [{"step": r["step"], "val_acc": 0.0, "values": {
        "model": {"all": {"restricted_loss": r["excluded_loss"]}}}} for r in loss_rows()])
    spiking = TrainedJob("r", "x_plus_y", 3, str(tmp_path), [{**r, "val_acc": 1.0 if r["step"] < 250 else 0.2}
                                                              for r in log], None)
    assert A.leadlag_end(spiking) == 240
    row = F.summary_row(spiking, result)
    want = F.phases_and_leads(loss_rows(), 50, F.per_step_rows(str(tmp_path)), end=240)
    assert {k: row[k] for k in want} == want and want["lead_restricted_loss_per_step"] is not None
    assert want != F.phases_and_leads(loss_rows(), 50, F.per_step_rows(str(tmp_path)))
    unmemorised = TrainedJob("r", "x_plus_y", 3, str(tmp_path), [{**r, "train_acc": 0.5} for r in log], None)
    assert F.summary_row(unmemorised, result)["memorisation_end"] == 0
