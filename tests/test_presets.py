"""The reference setups: presets and their building blocks (Power's ops, LayerNorm placement, the input without the
op token, init scale, stopping, checkpoints, the Grokfast MA filter), on tiny versions of every preset; the
offline rebuild of a run's model and inputs; Nanda et al.'s progress measures with the final model's key
frequencies. The long runs that check each paper are tests/reproduce.py's, not tests."""
import dataclasses
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import experiment as E
from lab import cli
from lab.config import config_dict
from lab.files import read_json, write_json
from lab.plugins import UsageError
from lab.final_keys import final_key_progress, phases_and_leads
from lab.job import checkpoints, load_model, load_task
from lab.schema import Job
from conftest import run_script

# Every preset shrunk to seconds: a small modulus and width, a few steps, every research plugin on.
SHRINK = {"p": 11, "perm_k": 3, "d_model": 16, "d_mlp": 32, "steps": 40, "seeds": 1, "eval_every": 10,
          "measure_every": 10, "measure_sparse_every": 10, "capture_every": 20, "workers": 1,
          "plugins": ("norms", "fourier", "rqi")}


def tiny(tmp_path, preset, **changes):
    return cli.resolve(E, {"preset": preset, "out_dir": str(tmp_path), **SHRINK, **changes})


def test_preset_values_then_flags_and_config_json(tmp_path):
    cfg = cli.parse_args(E, ["--preset=nanda2023", "--steps=7", f"--out_dir={tmp_path}"])
    assert (cfg.num_layers, cfg.norm, cfg.op_token, cfg.sampler, cfg.p) == (1, "none", False, "full", 113)
    assert cfg.steps == 7  # the flag beats the preset's 40,000
    assert cli.parse_args(E, []) == E.Config()  # ais2024: the defaults themselves
    for name, values in E.PRESETS.items():
        resolved = cli.resolve(E, {"preset": name})
        assert all(getattr(resolved, k) == v for k, v in values.items()), name
        cli.validate(dataclasses.replace(resolved, out_dir=str(tmp_path)), E)  # each preset is a valid config
    run_script("experiment.py", [f"--out_dir={tmp_path / 'run'}", "--preset=prieto2025", "--p=7", "--d_model=16",
                                 "--d_mlp=16", "--steps=3", "--seeds=1", "--capture=false", "--measure=false",
                                 "--workers=1"], tmp_path)
    saved = read_json(tmp_path / "run" / "config.json")
    assert saved["preset"] == "prieto2025" and saved["weight_decay"] == 0.0 and saved["p"] == 7
    assert saved["sampler"] == "full" and saved["op_token"] is False and saved["schedule"] == "constant"


def test_bad_preset_or_block_is_one_line_before_any_file(tmp_path):
    for flags, says in ((["--preset=power2021"], "--preset=power2021"), (["--norm=mid"], "--norm=mid"),
                        (["--activation=tanh"], "--activation=tanh"), (["--init_scale=0"], "--init_scale=0"),
                        (["--stop_at_val_acc=1.5"], "--stop_at_val_acc"), (["--batch_size=-1"], "--batch_size"),
                        (["--grokfast_filter=kalman"], "--grokfast_filter"), (["--dtype=fp16"], "fp32,bf16,fp64")):
        proc = run_script("experiment.py", [f"--out_dir={tmp_path / 'run'}", *flags], tmp_path, check=False)
        assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, flags
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", list(E.PRESETS))
def test_every_preset_trains_with_every_plugin(tmp_path, preset):
    """A tiny version of each preset runs every research plugin; its final model and inputs rebuild offline and
    give the logged final validation accuracy."""
    cfg = tiny(tmp_path, preset, ops=("x_plus_y", "permutation"), checkpoint_every=20)
    write_json(tmp_path / "config.json", config_dict(cfg))  # as runner.main writes it: load_* read it back
    for op in cfg.ops:
        E.train_one(cfg, Job(op, 0))
    for op in cfg.ops:
        folder = tmp_path / f"{op}_0"
        for name in ("measures.jsonl", "log.jsonl", "model.safetensors", "activations"):
            assert (folder / name).exists(), (preset, op, name)
        if op == "x_plus_y":
            assert (folder / "fourier.jsonl").exists() and (folder / "rqi.jsonl").exists()
        last = [json.loads(line) for line in open(folder / "log.jsonl")][-1]
        task = load_task(E, str(tmp_path), op)
        model = load_model(E, str(tmp_path), op, 0)
        assert task.x.shape[1] == (4 if cfg.op_token else 3)
        table = pq.read_table(folder / "examples.parquet", columns=["a", "b", "split"]).to_pydict()
        assert table["a"] == task.a.tolist() and table["b"] == task.b.tolist()  # examples.parquet's row order
        val = torch.tensor([s == "val" for s in table["split"]])
        with torch.inference_mode():
            acc = (model(task.x[val]).argmax(-1) == task.y[val]).float().mean().item()
        assert acc == pytest.approx(last["val_acc"], abs=1e-9), (preset, op)
        assert [s for s, _ in checkpoints(str(tmp_path), Job(op, 0))] == [20, 40]


@pytest.mark.parametrize("norm", ["post", "pre", "none"])
@pytest.mark.parametrize("op_token", [True, False])
@pytest.mark.parametrize("vocab_table", [True, False])
def test_shared_prefix_exact_and_off_where_it_does_not_apply(norm, op_token, vocab_table):
    task = E.make_task("x_minus_y", p=7, op_token=op_token)
    torch.manual_seed(0)
    model = E.Transformer(task.n_vocab, task.n_classes, num_layers=2, d_model=16, n_heads=2,
                          seq_len=task.x.shape[1], d_mlp=24, norm=norm, activation="relu")
    model.vocab_table = vocab_table
    plain = E.Transformer(task.n_vocab, task.n_classes, num_layers=2, d_model=16, n_heads=2,
                          seq_len=task.x.shape[1], d_mlp=24, norm=norm, activation="relu", fast=False)
    plain.load_state_dict(model.state_dict())
    x = task.x
    out, ref = model(x), plain(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    if op_token:  # rows with another token between a and b: the prefix is not shared, the plain path is taken
        mixed = x.clone()
        mixed[::2, 1] = 1
        torch.testing.assert_close(model(mixed), plain(mixed), atol=1e-5, rtol=1e-5)


def test_layer_norm_placement_and_activation_are_what_they_say():
    block = E.Block(8, 2, d_mlp=12, norm="none", activation="relu")
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in block.modules())
    assert isinstance(block.ffn[1], torch.nn.ReLU) and block.ffn[0].out_features == 12
    model = E.Transformer(10, 7, num_layers=1, d_model=8, n_heads=2, seq_len=3, norm="none")
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    pre, post = E.Block(8, 2, norm="pre"), E.Block(8, 2, norm="post")
    x = torch.randn(5, 3, 8)
    with torch.no_grad():  # sublayers that output 0: pre-LN leaves the residual stream alone, post-LN normalises it
        for block in (pre, post):
            for layer in (block.out, block.ffn[2]):
                layer.weight.zero_()
                layer.bias.zero_()
        torch.testing.assert_close(pre(x), x)
        torch.testing.assert_close(post(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-4, rtol=1e-4)


def test_power_ops_by_hand():
    def answer(op, a, b, p=11):
        task = E.make_task(op, p)
        row = ((task.a == a) & (task.b == b)).nonzero().item()
        return task.elements[task.y[row]]

    assert answer("x2_xy_y2", 3, 5) == (9 + 15 + 25) % 11
    assert answer("x3_xy2_y", 2, 3) == (8 + 18 + 3) % 11
    assert answer("x_floordiv_y_or_minus", 7, 3) == 2 and answer("x_floordiv_y_or_minus", 7, 4) == 3
    assert answer("x_times_y", 4, 6) == 24 % 11 and len(E.make_task("x_times_y", 11).y) == 11 * 10
    task = E.make_task("permutation_aba", perm_k=3)
    a, b = task.elements[task.a[17]], task.elements[task.b[17]]
    compose = lambda p, q: tuple(p[q[i]] for i in range(3))  # noqa: E731
    assert task.elements[task.y[17]] == compose(compose(a, b), a)


def test_init_scale_stop_and_power_batch_rule(tmp_path):
    base = dict(ops=("x_plus_y",), steps=1, lr=0.0, capture=False, measure=False)
    one = E.train_one(tiny(tmp_path / "one", "ais2024", **base), Job("x_plus_y", 0))
    half = E.train_one(tiny(tmp_path / "half", "ais2024", init_scale=0.5, **base), Job("x_plus_y", 0))
    assert one and half
    w1 = load_file(tmp_path / "one" / "x_plus_y_0" / "model.safetensors")
    w2 = load_file(tmp_path / "half" / "x_plus_y_0" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], 0.5 * w1[name], msg=name)
    stop = E.train_one(tiny(tmp_path / "stop", "ais2024", ops=("x_plus_y",), steps=200, eval_every=5,
                            stop_at_val_acc=0.0, capture=False, measure=False), Job("x_plus_y", 0))
    assert stop["log"][-1]["step"] < 200 and stop["log"][-1]["val_acc"] > 0
    sampler = E.SAMPLERS["random"](300, E.Config(batch_size=0), torch.device("cpu"), 0)
    assert len(sampler(1)) == 150  # Power et al.'s min(512, half the training pairs)
    assert len(E.SAMPLERS["random"](5000, E.Config(batch_size=0), torch.device("cpu"), 0)(1)) == 512


def test_grokfast_ma_adds_the_window_mean_once_full():
    class FakeRun:
        cfg = E.Config(grokfast_filter="ma", grokfast_window=3, grokfast_lamb=2.0)
        model = torch.nn.Linear(1, 1, bias=False)

    run, plugin = FakeRun(), E.Grokfast()
    plugin.on_train_begin(run)
    weight = run.model.weight
    seen = []
    for step, g in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        weight.grad = torch.tensor([[g]])
        seen.append(g)
        plugin.on_after_backward(run, step)
        expected = g + (2.0 * sum(seen[-3:]) / 3 if step >= 3 else 0.0)
        assert weight.grad.item() == pytest.approx(expected), step


def test_final_key_progress_matches_the_measures_plugin_at_the_end(tmp_path):
    """With the final model's key frequencies, the replayed restricted/excluded loss at the last step equal the
    measures plugin's there (the same model, so the same key frequencies); earlier checkpoints use the final keys,
    not their own."""
    cfg = tiny(tmp_path, "nanda2023", p=13, steps=60, checkpoint_every=20)
    write_json(tmp_path / "config.json", config_dict(cfg))
    E.train_one(cfg, Job("x_plus_y", 0))
    result = final_key_progress(E, str(tmp_path), Job("x_plus_y", 0))
    assert [r["step"] for r in result["rows"]] == [20, 40, 60] and len(result["key_freqs"]) == cfg.fourier_topk
    measures = [json.loads(line) for line in open(tmp_path / "x_plus_y_0" / "measures.jsonl")]
    last = measures[-1]
    assert last["step"] == 60 and sorted(last["key_freqs"]) == sorted(result["key_freqs"])
    model = last["values"]["model"]
    assert result["rows"][-1]["restricted_loss"] == pytest.approx(model["all"]["restricted_loss"], rel=1e-4)
    assert result["rows"][-1]["excluded_loss"] == pytest.approx(model["train"]["excluded_loss"], rel=1e-4)
    assert os.path.exists(tmp_path / "x_plus_y_0" / "final_keys.json")
    assert final_key_progress(E, str(tmp_path), Job("x_plus_y", 0)) == read_json(tmp_path / "x_plus_y_0" /
                                                                                 "final_keys.json")


def test_phases_and_leads_on_a_made_up_run():
    """A test loss that falls from step 1000 to 2000 (log-linearly), a restricted loss that falls 500 steps earlier
    and an excluded loss that rises 300 steps earlier: the phase ends and the leads come out as built."""
    steps = list(range(0, 4001, 50))

    def ramp(step, start, end, lo, hi):
        share = min(max((step - start) / (end - start), 0.0), 1.0)
        return 10 ** (lo + (hi - lo) * share)

    rows = [{"step": s, "test_loss": ramp(s, 1000, 2000, 1, -2), "restricted_loss": ramp(s, 500, 1500, 1, -2),
             "excluded_loss": ramp(s, 700, 1700, -2, 1)} for s in steps]
    rows[5]["test_loss"] = 100.0  # the peak, at step 250
    found = phases_and_leads(rows, memorisation_step=200, half_width=0)
    assert found["test_loss_peak"] == 250
    assert found["circuit_formation_end"] == pytest.approx(1100, abs=60)
    assert found["cleanup_end"] == pytest.approx(1900, abs=60)
    assert found["lead_restricted_loss_final"] == pytest.approx(500, abs=60)
    assert found["lead_excluded_loss_final"] == pytest.approx(300, abs=60)
    assert found["lead_restricted_loss_per_step"] is None
    # A seed that ends inside a spike (its last two checkpoints, test loss above the memorisation peak), read up to
    # the evaluation before it (end), gives the same phases and leads.
    spiky = [dict(r) for r in rows] + [{"step": s, "test_loss": 1000.0, "restricted_loss": 10.0, "excluded_loss": 0.01}
                                       for s in (4050, 4100)]
    assert phases_and_leads(spiky, memorisation_step=200, half_width=0, end=4000) == found
    assert phases_and_leads(spiky, memorisation_step=200, half_width=0)["test_loss_peak"] == 4050


def test_unknown_preset_in_config_default_is_caught():
    with pytest.raises(UsageError, match="preset"):
        cli.resolve(E, {"preset": "nanda2024"})


def test_swap_operands_on_the_input_without_op_token():
    cfg = E.Config(p=11, d_model=16, op_token=False)
    task = E.task_of(cfg, "x_minus_y")
    train_idx, val_idx = E.split_pairs(len(task.y), 0.5, 0)
    from conftest import make_run
    run = make_run(cfg, "x_minus_y", task, train_idx, val_idx, E.build_model(cfg, task))
    swap = E.SwapOperands()
    swap.on_train_begin(run)
    x, y = task.x[train_idx], task.y[train_idx]
    new_x, new_y = swap.transform_batch(run, 1, x, y)
    swapped = new_x[:, 0] != x[:, 0]
    assert 15 < swapped.sum() < 45 and torch.equal(new_x[swapped][:, [1, 0, 2]], x[swapped])
    assert torch.equal(new_y, (new_x[:, 0] - new_x[:, 1]) % 11)  # elements are tokens 0 .. p-1 here


def test_example_plugins_on_a_one_layer_model(tmp_path):
    """layer_lr's prefixes match a 1-layer model too; xavier_init, grokfast and step_val_acc_95 run on nanda2023."""
    cfg = tiny(tmp_path, "nanda2023", ops=("x_plus_y",), steps=20,
               plugins=("layer_lr", "xavier_init", "grokfast", "step_val_acc_95", "swap_operands"))
    record = E.train_one(cfg, Job("x_plus_y", 0))
    assert "step_val_acc_95" in record["final_info"]
    task = E.task_of(cfg, "x_plus_y")
    from conftest import make_run
    run = make_run(cfg, "x_plus_y", task, *E.split_pairs(len(task.y), cfg.train_frac, 0), E.build_model(cfg, task))
    lr_of = {id(p): g["lr"] for g in E.LayerLearningRates().param_groups(run) for p in g["params"]}
    named = dict(run.model.named_parameters())
    assert lr_of[id(named["blocks.0.qkv.weight"])] == cfg.lr and lr_of[id(named["head.weight"])] == 2 * cfg.lr


def test_fp64_trains_evaluates_and_saves_in_float64(tmp_path):
    """--dtype=fp64 (Prieto et al.'s other remedy for softmax collapse): weights, logits, loss and gradient in
    float64, saved and rebuilt in float64, and measured as float64. A float32 cast anywhere on the way shows as an
    error of about 1e-7, far above the 1e-12 asserted."""
    from lab import batched
    from lab.measures import logit_stats

    cfg = tiny(tmp_path, "prieto2025", ops=("x_plus_y",), dtype="fp64", steps=3, eval_every=1, capture=False,
               measure=False, plugins=("norms",))
    run = E.prepare(cfg, Job("x_plus_y", 0))
    assert {p.dtype for p in run.model.parameters()} == {torch.float64}
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    E.make_update(run)(1)  # one full-batch update; its gradient stays in p.grad
    reference = E.build_model(cfg, run.task)
    reference.load_state_dict(before)
    torch.nn.functional.cross_entropy(reference(run.x_train), run.y_train).backward()  # float64 throughout
    for (name, p), q in zip(run.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)

    write_json(tmp_path / "config.json", config_dict(cfg))
    last = E.train_one(cfg, Job("x_plus_y", 0))["log"][-1]
    assert {t.dtype for t in load_file(tmp_path / "x_plus_y_0" / "model.safetensors").values()} == {torch.float64}
    model, task = load_model(E, str(tmp_path), "x_plus_y", 0), load_task(E, str(tmp_path), "x_plus_y")
    split = pq.read_table(tmp_path / "x_plus_y_0" / "examples.parquet", columns=["split"]).column(0).to_pylist()
    val = torch.tensor([s == "val" for s in split])
    with torch.inference_mode():
        logits = model(task.x[val])
    assert logits.dtype == torch.float64
    assert abs(torch.nn.functional.cross_entropy(logits, task.y[val]).item() - last["val_loss"]) < 1e-12

    margin = torch.tensor([[30.0, 0.0, 0.0]], dtype=torch.float64)  # p(true) = 1 - 2e-13: exactly 1 in float32
    assert logit_stats(margin, torch.tensor([0]), E.LOSSES["cross_entropy"])["softmax_collapse"] == 0.0
    assert logit_stats(margin.float(), torch.tensor([0]), E.LOSSES["cross_entropy"])["softmax_collapse"] == 1.0
    assert batched.why_not(E, cfg) == "--dtype=fp64 trains one model at a time"
