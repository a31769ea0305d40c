"""The seams of experiment.py: each registry (loss, optimizer and schedule, batch sampler, op, model) swapped for a
toy entry, and the run checked to use it; job keys; hooks that no plugin overrides are no-ops."""
import dataclasses
import math
import json
import os

import pytest
import torch
import torch.nn as nn

import experiment as E
from lab.files import read_json
from lab.plugins import Plugin, PluginHooks, UsageError
from lab.schema import Job, job_dir, job_name
from conftest import ROOT, run_script

SMALL = dict(ops=("x_plus_y",), seeds=1, p=11, steps=30, batch_size=32, d_model=32, eval_every=10, capture_every=10,
             measure_every=10, measure_sparse_every=10)


def train(tmp_path, job=Job("x_plus_y", 0), **changes):
    cfg = E.Config(out_dir=str(tmp_path), **{**SMALL, **changes})
    return cfg, E.train_one(cfg, job)


def log_of(tmp_path, name="x_plus_y_0"):
    return [json.loads(line) for line in open(tmp_path / name / "log.jsonl")]


def measures_of(tmp_path, name="x_plus_y_0"):
    return [json.loads(line) for line in open(tmp_path / name / "measures.jsonl")]


class OffsetLoss:
    """Cross-entropy + 10: the same gradients, so the same training, but every loss it computes is >= 10; counts
    the probabilities it is asked for."""

    def __init__(self):
        self.prob_calls = 0

    def probs(self, logits):
        self.prob_calls += 1
        return logits.softmax(-1)

    def __call__(self, logits, y):
        return nn.functional.cross_entropy(logits, y) + 10.0


def test_a_new_loss_is_used_for_training_evaluation_and_the_loss_based_measures(tmp_path, monkeypatch):
    toy = OffsetLoss()
    monkeypatch.setitem(E.LOSSES, "offset", toy)
    train(tmp_path / "default", plugins=("norms",))
    train(tmp_path / "toy", loss="offset", plugins=("norms",))
    default, offset = log_of(tmp_path / "default"), log_of(tmp_path / "toy")
    for a, b in zip(default, offset):
        assert b["train_loss"] == pytest.approx(a["train_loss"] + 10, abs=1e-4)  # the training loss
        assert b["val_loss"] == pytest.approx(a["val_loss"] + 10, abs=1e-4)  # the evaluation
        assert b["train_acc"] == a["train_acc"] and b["val_acc"] == a["val_acc"]  # the same gradients
    last = measures_of(tmp_path / "toy")[-1]["values"]["model"]
    assert last["all"]["restricted_loss"] > 10 and last["train"]["excluded_loss"] > 10  # Nanda et al.'s losses
    # softmax collapse: the norms plugin at every evaluation, the measures plugin at every measurement
    assert toy.prob_calls == len(offset) + len(measures_of(tmp_path / "toy"))


def test_a_new_optimizer_and_schedule_are_used(tmp_path, monkeypatch):
    monkeypatch.setitem(E.OPTIMIZERS, "frozen", lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr))
    monkeypatch.setitem(E.SCHEDULES, "zero", lambda cfg: lambda s: 0.0)
    cfg, _ = train(tmp_path, optimizer="frozen", schedule="zero", capture=False, measure=False)
    assert {r["lr"] for r in log_of(tmp_path)} == {0.0}
    torch.manual_seed(E.derived_seeds(0)["init_seed"])
    fresh = E.build_model(cfg, E.make_task("x_plus_y", 11))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "x_plus_y_0" / "model.safetensors"))
    assert all(torch.equal(saved[name], value) for name, value in fresh.state_dict().items())  # never moved
    train(tmp_path / "constant", schedule="constant", capture=False, measure=False)
    assert {r["lr"] for r in log_of(tmp_path / "constant")} == {1e-3}  # no warm-up


class Batches(Plugin):
    name = "batches"
    seen = []

    def transform_batch(self, run, step, x, y):
        Batches.seen.append((len(run.train_idx), sorted(map(tuple, x.tolist()))))
        return x, y


def test_full_batch_sampling_uses_every_training_pair_at_every_update(tmp_path, monkeypatch):
    monkeypatch.setitem(E.PLUGINS, "batches", Batches)
    Batches.seen = []
    train(tmp_path, sampler="full", plugins=("batches",), capture=False, measure=False)
    task = E.make_task("x_plus_y", 11)
    train_idx, _ = E.split_pairs(len(task.y), 0.5, 0)
    everything = sorted(map(tuple, task.x[train_idx].tolist()))
    assert len(Batches.seen) == 30 and all(rows == everything for _, rows in Batches.seen)
    for r in log_of(tmp_path):  # train_acc counts the rows really used: a multiple of 1 / n_train
        assert r["train_acc"] * 10 * len(train_idx) == pytest.approx(round(r["train_acc"] * 10 * len(train_idx)))
    # a toy sampler: always the first training row
    monkeypatch.setitem(E.SAMPLERS, "first", lambda n, cfg, device, seed: lambda step: torch.zeros(4, dtype=torch.long))
    Batches.seen = []
    train(tmp_path / "first", sampler="first", plugins=("batches",), capture=False, measure=False)
    assert len(Batches.seen) == 30 and all(len(rows) == 4 and len(set(rows)) == 1 for _, rows in Batches.seen)


def test_a_new_op_is_trained_and_read_by_both_scripts(tmp_path, monkeypatch):
    from lab.ops import Op, modular

    import plot

    monkeypatch.setitem(E.OPS, "x_times_y", Op("x_times_y", "x * y mod p", modular(lambda a, b, p: a * b)))
    train(tmp_path, job=Job("x_times_y", 0), ops=("x_times_y",))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "x_times_y_0" / "examples.parquet").to_pydict()
    assert table["label"] == [(a * b) % 11 for a, b in zip(table["a"], table["b"])]
    assert "restricted_loss" not in measures_of(tmp_path, "x_times_y_0")[-1]["values"]["model"]["all"]  # not cyclic
    assert plot.class_cycle("x_times_y", 11) is None
    assert list(plot.class_cycle("x_plus_y", 11)) == list(range(11))
    assert list(plot.class_cycle("x_div_y", 11)) == [pow(2, t, 11) for t in range(10)]  # 2 generates Z_11*


class Tiny(nn.Module):
    """A toy model that keeps the contract: an embedding summed over the sequence, two layers, a head."""

    def __init__(self, n_vocab, n_classes, num_layers, d_model, n_heads, seq_len):
        super().__init__()
        self.embed = nn.Embedding(n_vocab, d_model)
        self.first, self.last = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, n_classes)
        self.capture_modules = {"first": "first", "last": "last"}

    def forward(self, tokens):
        h = self.last(torch.relu(self.first(self.embed(tokens).cumsum(1))))  # (n, seq, d)
        return self.head(h[:, -1])

    def token_embedding_matrix(self):
        return self.embed.weight


class NoCapture(Tiny):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.capture_modules


def test_a_new_model_is_used_and_a_model_that_breaks_the_contract_gets_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(E.MODELS, "tiny", Tiny)
    train(tmp_path, model="tiny")
    index = read_json(tmp_path / "x_plus_y_0" / "activations" / "index.json")
    assert index["modules"] == {"first": "first", "last": "last"}
    assert set(measures_of(tmp_path)[-1]["values"]) == {"first", "last", "model", "embedding"}
    monkeypatch.setitem(E.MODELS, "broken", NoCapture)
    with pytest.raises(UsageError, match="breaks the model contract: capture_modules"):
        E.build_model(E.Config(model="broken", **SMALL), E.make_task("x_plus_y", 11))


BROKEN_MODEL = '''
import experiment
from experiment import Transformer


class Headless(Transformer):
    def forward(self, tokens):
        return super().forward(tokens)[:, :3]


experiment.MODELS["headless"] = Headless


class Nothing(experiment.Plugin):
    name = "nothing"
'''


def test_a_broken_model_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "headless.py").write_text(BROKEN_MODEL)
    proc = run_script("experiment.py", ["--out_dir=out", "--model=headless", "--plugins=headless.py", "--p=11",
                                        "--steps=10"], tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "breaks the model contract: forward() gave shape (2, 3)" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["headless.py"]


def test_job_keys_name_one_folder_and_apply_their_overrides(tmp_path):
    assert job_name("x_plus_y", 0) == Job("x_plus_y", 0).name == "x_plus_y_0"  # today's layout
    assert job_dir("run", Job("x_plus_y", 0)) == os.path.join("run", "x_plus_y_0")
    job = Job("x_plus_y", 1, (("weight_decay", 0.1), ("lr", 0.0)))
    assert job.name == "x_plus_y_1__weight_decay=0.1__lr=0.0"
    train(tmp_path, job=job, capture=False, measure=False)
    cell = tmp_path / "weight_decay=0.1__lr=0.0"  # a sweep cell's folder, a run folder of its own
    assert job_dir(str(tmp_path), job) == str(cell / "x_plus_y_1")
    assert {r["lr"] for r in log_of(cell, "x_plus_y_1")} == {0.0}  # the override, not Config's 1e-3
    assert (cell / "final_info_x_plus_y_1.json").exists()
    assert read_json(cell / "x_plus_y_1" / "run.json")["overrides"] == [["weight_decay", 0.1], ["lr", 0.0]]


def test_every_hook_is_callable_and_a_no_op_without_plugins():
    hooks = PluginHooks([])
    x, y = torch.zeros(3, 4), torch.zeros(3)
    assert hooks.transform_batch(None, 1, x, y) == (x, y)
    for hook in ("init_model", "param_groups", "on_train_begin", "on_train_end"):
        assert getattr(hooks, hook)(None) == []
    assert hooks.on_eval(None, 10, {}) == [] and hooks.on_step_end(None, 1) == []


def test_registries_and_config_fields_agree():
    from lab.cli import REGISTRY_FIELDS

    cfg = E.Config()
    for field, registry in REGISTRY_FIELDS.items():
        assert getattr(cfg, field) in getattr(E, registry), (field, registry)
    assert set(cfg.ops) <= set(E.OPS) and {f.name for f in dataclasses.fields(cfg)} >= set(REGISTRY_FIELDS)
    assert os.path.isdir(os.path.join(ROOT, "lab"))


def test_layer_lr_refuses_a_model_whose_names_it_does_not_know():
    cfg = E.Config(model="gpt2", **SMALL)
    task = E.make_task("x_plus_y", 11)
    model = E.build_model(cfg, task)
    run = type("R", (), {"model": model, "cfg": cfg})()
    with pytest.raises(ValueError, match="match no parameter of GPT2Classifier"):
        E.LayerLearningRates().param_groups(run)
    run.model = E.build_model(E.Config(**SMALL), task)
    groups = E.LayerLearningRates().param_groups(run)
    assert sorted(g["lr"] for g in groups) == [5e-4, 1e-3, 2e-3]


def test_plot_measures_a_snapshot_as_the_measures_plugin_measured_it(tmp_path):
    """Same code, same subsamples (the job's split seed), same activations (float32 snapshots): the same numbers."""
    from lab import analysis
    from lab.config import config_dict
    from lab.files import write_json

    cfg, _ = train(tmp_path, job=Job("x_plus_y", 1), seeds=2, capture_dtype="float32")
    write_json(tmp_path / "config.json", config_dict(cfg))
    (pair,) = analysis.load_run(str(tmp_path), "r")  # seed 0 never ran
    assert pair.seed == 1
    measured = {r["step"]: r["values"] for r in measures_of(tmp_path, "x_plus_y_1")}
    y, is_train = analysis.read_examples(pair.folder)
    snap = next(s for s in pair.snapshots if s["step"] in measured and s["step"] > 0)
    x = analysis.load_snapshot(snap["path"])[pair.modules["last"]]
    found = {(m, split): v for m, split, v in analysis.snapshot_metrics(x, y, is_train, analysis.split_seed(pair))}
    for split, metrics in measured[snap["step"]]["last"].items():
        for metric, value in metrics.items():
            assert found[(metric, split)] == pytest.approx(value, rel=1e-4, abs=1e-6), (metric, split)


def test_a_run_saved_before_a_config_field_existed_still_resumes(tmp_path):
    from conftest import TINY
    from lab.files import write_json

    args = ["--out_dir=old", *TINY, "--ops=x_plus_y", "--seeds=1", "--capture=false", "--measure=false"]
    run_script("experiment.py", args, tmp_path)
    saved = read_json(tmp_path / "old" / "config.json")
    write_json(tmp_path / "old" / "config.json", {k: v for k, v in saved.items() if k not in ("loss", "sampler")})
    again = run_script("experiment.py", args, tmp_path)  # missing fields count as their defaults
    assert "x_plus_y seed 0: already finished" in again.stderr
    proc = run_script("experiment.py", [*args, "--sampler=full"], tmp_path, check=False)  # a real change is refused
    assert proc.returncode == 2 and "differs in sampler" in proc.stderr


def test_stablemax_is_the_papers_function_and_does_not_collapse_where_softmax_does():
    stablemax = E.LOSSES["stablemax"]
    logits = torch.tensor([[200.0, 0.0, -3.0], [1.0, 0.0, -1.0]], requires_grad=True)
    p = stablemax.probs(logits)
    s = torch.tensor([[201.0, 1.0, 1 / 4], [2.0, 1.0, 1 / 2]], dtype=torch.float64)
    assert p.dtype == torch.float64 and torch.allclose(p, s / s.sum(1, keepdim=True))
    assert E.LOSSES["cross_entropy"].probs(logits[:1].float())[0, 0] == 1.0  # softmax collapses ...
    assert p[0, 0] < 1.0  # ... StableMax does not
    loss = stablemax(logits, torch.tensor([0, 2]))
    assert loss.item() == pytest.approx(-(math.log(201 / 202.25) + math.log(0.5 / 3.5)) / 2)
    loss.backward()
    assert torch.isfinite(logits.grad).all()  # also at logits exactly 0 and 1


def test_perp_adamw_steps_on_the_gradient_orthogonal_to_each_weight():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = E.OPTIMIZERS["perp_adamw"](model.parameters(), E.Config(weight_decay=0.0))
    model(torch.randn(8, 4)).pow(2).sum().backward()
    before = {name: (w.detach().clone(), w.grad.norm().item()) for name, w in model.named_parameters()}
    optimizer.step()
    for name, w in model.named_parameters():
        weight, norm = before[name]
        cosine = (weight * w.grad).sum() / (weight.norm() * w.grad.norm())
        assert abs(cosine.item()) < 1e-5  # orthogonal to the weight ...
        assert w.grad.norm().item() == pytest.approx(norm, rel=1e-5)  # ... at the gradient's own norm
    adam = E.OPTIMIZERS["adam"](model.parameters(), E.Config(weight_decay=0.01))
    assert type(adam) is torch.optim.Adam and adam.defaults["weight_decay"] == 0.01
    assert not adam.defaults.get("decoupled_weight_decay", False)  # L2, as in Grokfast's code


def test_stablemax_with_perp_adamw_trains_full_batch_without_weight_decay(tmp_path):
    train(tmp_path, loss="stablemax", optimizer="perp_adamw", sampler="full", weight_decay=0.0, plugins=("norms",))
    log = log_of(tmp_path)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in log)
    assert log[-1]["train_loss"] < log[0]["train_loss"] and log[-1]["softmax_collapse"] == 0.0


def test_what_applies_to_an_op_is_read_from_its_registry_entry():
    """The fourier and rqi plugins and the measures' RQI ask the op's cycle (lab.ops), not its name: a new op that
    adds residues gets them; one in another order does not."""
    from lab.ops import Op, additive, adds, in_residue_order, modular, multiplicative

    plus_again = Op("x_plus_y_again", "(x + y) mod p", modular(lambda a, b, p: a + b), additive(1))
    minus = Op("m", "(x - y) mod p", modular(lambda a, b, p: a - b), additive(-1))
    times = Op("t", "x * y mod p", modular(lambda a, b, p: a * b, b_from=1), multiplicative(1))
    assert adds(plus_again, 11) and in_residue_order(minus, 11) and not adds(minus, 11)
    assert not in_residue_order(times, 11) and not in_residue_order(E.OPS["permutation"], 120)
    assert [name for name, op in E.OPS.items() if adds(op, 11)] == ["x_plus_y"]
