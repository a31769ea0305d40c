"""The TransformerLens export (lab/export.py): a tiny nanda2023 run (no LayerNorm) and a tiny grokfast2024 run
(pre-LN) give TransformerLens models whose logits equal ours on every pair and whose cached block outputs equal the
capture plugin's; the command writes a state dict that TransformerLens reloads by itself; a post-LN model is
refused in one line before any file is written."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import experiment as E
from lab import cli
from lab.analysis import load_snapshot
from lab.config import config_dict
from lab.export import STATE, SETTINGS, to_transformer_lens
from lab.files import write_json
from lab.job import load_model, load_task
from lab.plugins import UsageError
from lab.schema import Job
from conftest import ROOT


def export_command(*args):
    """python -m lab.export ARGS, from the project root as the docs say."""
    return subprocess.run([sys.executable, "-m", "lab.export", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)

SHRINK = {"p": 11, "d_model": 16, "n_heads": 2, "d_mlp": 32, "steps": 40, "seeds": 1, "eval_every": 10,
          "capture_every": 20, "capture_dtype": "float32", "checkpoint_every": 20, "workers": 1, "measure": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run folder -> op, for a tiny no-LN (nanda2023) and a tiny pre-LN (grokfast2024) run."""
    made = {}
    for preset, op in (("nanda2023", "x_plus_y"), ("grokfast2024", "x_times_y")):
        folder = tmp_path_factory.mktemp(preset)
        cfg = cli.resolve(E, {"preset": preset, "out_dir": str(folder), **SHRINK, "ops": (op,)})
        write_json(folder / "config.json", config_dict(cfg))
        E.train_one(cfg, Job(op, 0))
        made[folder] = op
    return made


def test_logits_and_cache_equal_ours_on_every_pair(runs):
    for folder, op in runs.items():
        task, ours = load_task(E, str(folder), op), load_model(E, str(folder), op, 0)
        bridge = to_transformer_lens(str(folder), op, 0)
        with torch.inference_mode():
            logits, cache = bridge.run_with_cache(task.x)
            assert logits.shape == (len(task.y), task.x.shape[1], task.n_classes)
            assert (logits[:, -1] - ours(task.x)).abs().max().item() <= 1e-4, folder
        captured = load_snapshot(str(folder / f"{op}_0" / "activations" / "step_000040.safetensors"))
        for i in range(len(ours.blocks)):  # the capture plugin's rows: every pair, the answer position
            theirs = cache[f"blocks.{i}.hook_resid_post"][:, -1].numpy()
            assert abs(theirs - captured[f"blocks.{i}"]).max() <= 1e-4, (folder, i)
        pattern = cache["blocks.0.attn.hook_pattern"]  # (pairs, heads, query, key), causal
        assert pattern.shape == (len(task.y), 2, task.x.shape[1], task.x.shape[1])
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert pattern.triu(1).abs().max().item() == 0.0


def test_a_checkpoint_and_a_bad_weight_are_the_model_at_that_step(runs):
    folder, op = next(iter(runs.items()))
    task = load_task(E, str(folder), op)
    at_20 = load_model(E, str(folder), op, 0, checkpoint="step_0000020.safetensors")
    bridge = to_transformer_lens(str(folder), op, 0, checkpoint="step_0000020.safetensors")
    with torch.inference_mode():
        assert (bridge(task.x)[:, -1] - at_20(task.x)).abs().max().item() <= 1e-4
        final = load_model(E, str(folder), op, 0)(task.x)
        assert (bridge(task.x)[:, -1] - final).abs().max().item() > 1e-3  # another step, other weights


def test_the_command_writes_a_state_dict_transformer_lens_reloads_alone(runs):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401

    folder, op = list(runs.items())[1]
    proc = export_command(folder, f"--op={op}", "--seed=0")
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((folder / f"{op}_0" / SETTINGS).read_text())
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**settings))
    bridge.load_state_dict(load_file(folder / f"{op}_0" / STATE))
    task, ours = load_task(E, str(folder), op), load_model(E, str(folder), op, 0)
    with torch.inference_mode():
        assert (bridge(task.x)[:, -1] - ours(task.x)).abs().max().item() <= 1e-4
        assert bridge.b_U.abs().max().item() > 0  # the head's bias is TransformerLens's b_U


def test_post_ln_and_gpt2_are_refused_in_one_line(tmp_path):
    for model, says in (("transformer", "--norm=post"), ("gpt2", "--model=gpt2")):
        folder = tmp_path / model
        folder.mkdir()
        cfg = cli.resolve(E, {"out_dir": str(folder), **SHRINK, "steps": 2, "capture": False, "model": model,
                              "ops": ("x_plus_y",), "checkpoint_every": 0})
        write_json(folder / "config.json", config_dict(cfg))  # the refusal reads the config alone
        with pytest.raises(UsageError, match=says):
            to_transformer_lens(str(folder), "x_plus_y", 0)
        proc = export_command(folder, "--op=x_plus_y")
        assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # nothing written
