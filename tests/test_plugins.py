"""The research plugins, the GPT-2 backbone, and a user's plugin file from docs/plugins.md."""
import json
import math
import os
import re

import pytest
import torch

import experiment as E
from lab import measures as M
from lab.plugins import Norms
from conftest import ROOT, TINY, make_run, read_json, run_script

SMALL = ["--ops=x_plus_y,permutation", "--seeds=1", "--steps=40", "--capture_every=20", "--p=11", "--perm_k=3",
         "--batch_size=64", "--d_model=32", "--workers=1"]


def log_of(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


def test_grokfast_with_zero_lambda_is_the_baseline_and_otherwise_is_not(tiny_run, tmp_path):
    run_script("experiment.py", ["--out_dir=zero", *TINY, "--plugins=grokfast", "--grokfast_lamb=0"], tmp_path)
    run_script("experiment.py", ["--out_dir=fast", *TINY, "--plugins=grokfast"], tmp_path)
    if "batch" in read_json(tiny_run / "x_plus_y_0" / "run.json"):  # auto batches on a GPU; grokfast does not
        run_script("experiment.py", ["--out_dir=base", *TINY, "--batched=off"], tmp_path)
        tiny_run = tmp_path / "base"
    baseline = read_json(tiny_run / "final_info.json")
    assert read_json(tmp_path / "zero" / "final_info.json") == baseline
    assert log_of(tmp_path / "zero" / "x_plus_y_0") == log_of(tiny_run / "x_plus_y_0")
    assert log_of(tmp_path / "fast" / "x_plus_y_0") != log_of(tiny_run / "x_plus_y_0")


def test_grokfast_adds_lambda_times_the_gradient_ema():
    model = torch.nn.Linear(3, 1, bias=False)
    cfg = E.Config(grokfast_alpha=0.5, grokfast_lamb=2.0)
    run = make_run(cfg, "x_plus_y", None, None, None, model)
    plugin = E.Grokfast()
    plugin.on_train_begin(run)
    g1, g2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 0.0, -1.0]])
    model.weight.grad = g1.clone()
    plugin.on_after_backward(run, 1)
    assert torch.allclose(model.weight.grad, g1 + 2.0 * g1)  # the EMA starts at the first gradient
    model.weight.grad = g2.clone()
    plugin.on_after_backward(run, 2)
    assert torch.allclose(model.weight.grad, g2 + 2.0 * (0.5 * g1 + 0.5 * g2))


def test_norms_are_logged_and_correct(tmp_path):
    run_script("experiment.py", ["--out_dir=r", *SMALL, "--plugins=norms"], tmp_path)
    log = log_of(tmp_path / "r" / "x_plus_y_0")
    for row in log:
        assert row["param_norm"] > 0 and row["logit_norm"] > 0 and 0 <= row["softmax_collapse"] <= 1
    # The same numbers by hand, on a model whose training set is fully collapsed.
    task = E.make_task("x_plus_y", 5)
    model = E.Transformer(task.n_vocab, task.n_classes, d_model=8)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([200.0, 0, 0, 0, 0]))
    train_idx = torch.nonzero(task.y == 0).flatten()
    run = make_run(E.Config(), "x_plus_y", task, train_idx, train_idx, model)
    metrics = {}
    Norms().on_eval(run, 10, metrics)
    expected = math.sqrt(sum(p.pow(2).sum().item() for p in model.parameters()))
    assert metrics["param_norm"] == pytest.approx(expected, rel=1e-5)
    assert metrics["logit_norm"] == pytest.approx(200.0)
    assert metrics["softmax_collapse"] == 1.0  # exp(-200) underflows: p(true class) is exactly 1.0 in float32
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([2.0, 0, 0, 0, 0]))
    Norms().on_eval(run, 10, metrics)
    assert metrics["softmax_collapse"] == 0.0
    assert "grad_norm" not in metrics  # no update yet: no gradient
    for p, value in zip(model.parameters(), (3.0, 4.0)):
        p.grad = torch.zeros_like(p)
        p.grad.view(-1)[0] = value
    Norms().on_eval(run, 10, metrics)
    assert metrics["grad_norm"] == pytest.approx(5.0)


def test_grad_norm_is_the_last_updates_full_batch_gradient(tmp_path):
    """With lr 0 the weights stay at their initial values, so every logged grad_norm of a full-batch run is the
    training loss's gradient norm at the saved model."""
    from lab.job import load_model, load_task

    run_script("experiment.py", ["--out_dir=r", *SMALL, "--ops=x_plus_y", "--plugins=norms", "--sampler=full",
                                 "--lr=0", "--capture=false", "--measure=false"], tmp_path)
    logged = [row["grad_norm"] for row in log_of(tmp_path / "r" / "x_plus_y_0")]
    model, task = load_model(E, str(tmp_path / "r"), "x_plus_y", 0), load_task(E, str(tmp_path / "r"), "x_plus_y")
    import pyarrow.parquet as pq
    split = pq.read_table(tmp_path / "r" / "x_plus_y_0" / "examples.parquet", columns=["split"]).column(0)
    train = torch.tensor([s == "train" for s in split.to_pylist()])
    model.train()
    torch.nn.functional.cross_entropy(model(task.x[train]), task.y[train]).backward()
    expected = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    assert len(logged) == 4 and logged == pytest.approx([expected] * 4, rel=1e-4)


def test_fourier_finds_known_frequencies():
    p = 97
    i = torch.arange(p, dtype=torch.float64)
    columns = []
    for k, amplitude in [(3, 1.0), (17, 2.0), (40, 0.5)]:
        columns += [amplitude * torch.cos(2 * math.pi * k * i / p), amplitude * torch.sin(2 * math.pi * k * i / p)]
    embedding = torch.stack(columns, 1) + 5.0  # a constant offset must not count as a frequency
    frac, freqs = M.fourier_sparsity(M.fourier_spectrum(embedding), 3)
    assert freqs == [17, 3, 40]
    assert frac == pytest.approx(1.0)
    assert M.fourier_sparsity(M.fourier_spectrum(embedding), 2)[0] == pytest.approx((4 + 1) / (4 + 1 + 0.25))
    noise = torch.randn(p, 128, generator=torch.Generator().manual_seed(0))
    assert M.fourier_sparsity(M.fourier_spectrum(noise), 5)[0] < 0.3


def test_rqi_of_a_ring_is_one_and_of_random_vectors_near_zero():
    p = 97
    i = torch.arange(p, dtype=torch.float64)
    ring = torch.stack([torch.cos(2 * math.pi * 7 * i / p), torch.sin(2 * math.pi * 7 * i / p)], 1)
    rotation = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).double())[0][:2]
    assert M.representation_quality(ring @ rotation * 3 + 1, tol=0.1) > 0.99
    noise = torch.randn(p, 64, generator=torch.Generator().manual_seed(1))
    assert M.representation_quality(noise, tol=0.1) < 0.1


def test_fourier_and_rqi_plugins_write_per_capture_rows_and_skip_other_ops(tmp_path):
    proc = run_script("experiment.py", ["--out_dir=r", *SMALL, "--plugins=fourier,rqi"], tmp_path)
    for name in ("fourier", "rqi"):
        rows = [json.loads(line) for line in open(tmp_path / "r" / "x_plus_y_0" / f"{name}.jsonl")]
        index = read_json(tmp_path / "r" / "x_plus_y_0" / "activations" / "index.json")
        assert [r["step"] for r in rows] == [s["step"] for s in index["snapshots"]]
        assert not (tmp_path / "r" / "permutation_0" / f"{name}.jsonl").exists()
        assert proc.stderr.count(f"{name} plugin: not meaningful for permutation") == 1
    row = rows[-1]
    assert 0 <= row["rqi"] <= 1
    fourier = json.loads(open(tmp_path / "r" / "x_plus_y_0" / "fourier.jsonl").readline())
    assert len(fourier["spectrum"]) == 11 // 2 + 1 and len(fourier["key_freqs"]) == 5


def test_gpt2_backbone_trains_and_is_captured_by_the_same_plugin(tmp_path):
    # no warm-up and a higher lr: in 40 warm-up steps GPT-2's loss had barely moved (2.44 -> 2.36)
    run_script("experiment.py", ["--out_dir=g", *SMALL, "--model=gpt2", "--steps=80", "--warmup_steps=0", "--lr=3e-3"],
               tmp_path)
    index = read_json(tmp_path / "g" / "x_plus_y_0" / "activations" / "index.json")
    assert index["modules"] == {"first": "gpt2.h.0", "last": "gpt2.h.1"}
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "g" / "x_plus_y_0" / "activations" / index["snapshots"][-1]["file"])
    assert set(tensors) == {"gpt2.h.0", "gpt2.h.1"} and tensors["gpt2.h.1"].shape == (121, 32)
    log = log_of(tmp_path / "g" / "x_plus_y_0")
    late = sorted(r["train_loss"] for r in log[len(log) // 2:])  # a median over the second half: a spike may land
    assert late[len(late) // 2] < 0.8 * log[0]["train_loss"]  # on any one step, and where differs between CPUs


def test_gpt2_needs_no_download():
    task = E.make_task("x_plus_y", 7)
    model = E.build_model(E.Config(model="gpt2", d_model=32), task)
    assert model.gpt2.config.n_layer == 2 and model.gpt2.config.n_positions == 4
    assert model.gpt2.config.resid_pdrop == 0 and model.gpt2.config.attn_pdrop == 0
    assert model(task.x).shape == (len(task.y), task.n_classes)


def test_the_documented_plugin_example_works(tmp_path):
    readme = open(os.path.join(ROOT, "docs", "plugins.md")).read()
    code = re.search(r"An example, `my_plugin.py`.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_plugin.py").write_text(code)
    run_script("experiment.py", ["--out_dir=run_1", *SMALL, "--plugins=my_plugin.py"], tmp_path)
    log = log_of(tmp_path / "run_1" / "x_plus_y_0")
    assert all(row["grad_norm"] > 0 for row in log)


def test_a_plugin_file_that_only_adds_registry_entries_is_accepted_and_one_that_adds_nothing_is_not(tmp_path):
    """AI-Scientist's ideas as plugin files: SGD as an optimizer and a cyclic learning rate as a schedule, no Plugin
    subclass. A file that adds nothing is refused in one line before anything is written."""
    (tmp_path / "sgd.py").write_text(
        "import math\nimport torch\nimport experiment\n\n"
        "experiment.OPTIMIZERS['sgd'] = lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)\n"
        "experiment.SCHEDULES['cyclic'] = lambda cfg: lambda s: 0.5 * (1 + math.cos(math.pi * (s % 20) / 20))\n")
    proc = run_script("experiment.py", ["--out_dir=r", *SMALL, "--plugins=sgd.py", "--optimizer=sgd",
                                        "--schedule=cyclic", "--lr=0.05"], tmp_path)
    rows = log_of(tmp_path / "r" / "x_plus_y_0")  # the lr of update s is the schedule's factor at s - 1
    assert [row["lr"] for row in rows] == pytest.approx(
        [0.05 * 0.5 * (1 + math.cos(math.pi * ((row["step"] - 1) % 20) / 20)) for row in rows])
    assert read_json(tmp_path / "r" / "config.json")["optimizer"] == "sgd", proc.stderr
    (tmp_path / "empty.py").write_text("x = 1\n")
    proc = run_script("experiment.py", ["--out_dir=e", *SMALL, "--plugins=empty.py"], tmp_path, check=False)
    assert proc.returncode == 2 and not (tmp_path / "e").exists()
    assert proc.stderr.strip().splitlines() == [
        "experiment.py: error: plugin file empty.py defines no subclass of experiment.Plugin and adds no entry to "
        "a registry of experiment.py"]
