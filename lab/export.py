"""A trained model into TransformerLens (transformer-lens 4.x, its TransformerBridge over a TL-native model built from
a config: no hub call, no download), for researchers' own circuit analysis: attention patterns, activation patching,
run_with_cache.

    from lab.export import to_transformer_lens
    bridge = to_transformer_lens("run_n", "x_plus_y", seed=0)          # checkpoint="step_0001000.safetensors" too
    logits, cache = bridge.run_with_cache(task.x)                      # logits (n, seq, n_classes): read [:, -1]

    python -m lab.export run_n --op=x_plus_y --seed=0                  # writes transformer_lens.safetensors + .json

TransformerLens's native block is pre-LN (x + attn(LN(x)), x + mlp(LN(x)), a final LN), or has no LayerNorm at all;
this project's pre-LN and no-LN transformers (the nanda2023, grokfast2024 and prieto2025 presets) map onto it weight
for weight: qkv splits into q, k, v; the FFN into mlp.in / mlp.out; the head's bias is TransformerLens's b_U. A
post-LN model (the template's default, power2022) computes another function and is refused in one line, as is the
gpt2 backbone.
"""

import argparse
import os
import sys

import torch

from lab.config import config_from_dict, load_script
from lab.files import atomic_write, read_json, write_json
from lab.job import load_model, load_task
from lab.plugins import UsageError
from lab.schema import CONFIG, Job, job_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE, SETTINGS = "transformer_lens.safetensors", "transformer_lens.json"  # what the command writes, per job
NORMS = {"pre": "LN", "none": None}  # this project's --norm -> TransformerLens's normalization_type
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}  # --activation -> act_fn (nn.GELU is the exact gelu, not tanh's)


def experiment_module():
    """The experiment.py this lab belongs to (already imported, or loaded from the project root)."""
    return sys.modules.get("experiment") or load_script(os.path.join(ROOT, "experiment.py"), "experiment")


def why_not(cfg) -> str | None:
    """Why a run's model has no TransformerLens twin, in a few words; None when it has."""
    if cfg.model != "transformer":
        return f"--model={cfg.model}: only the transformer model maps onto TransformerLens's native one"
    if cfg.norm not in NORMS:
        return (f"--norm={cfg.norm}: TransformerLens's native blocks are pre-LN or have no LayerNorm; a post-LN "
                "block (x = LN(x + attn(x))) computes another function")
    if cfg.activation not in ACTIVATIONS:
        return f"--activation={cfg.activation}: not one of {', '.join(ACTIVATIONS)}"
    return None


def bridge_config(cfg, model, task) -> dict:
    """TransformerBridgeConfig's fields for a run's model (a dict: it is also what the command writes as JSON)."""
    block = model.blocks[0]
    d_model = model.token_embeddings.weight.shape[1]
    return {"d_model": d_model, "d_head": d_model // block.n_heads, "n_heads": block.n_heads,
            "n_layers": len(model.blocks), "n_ctx": task.x.shape[1], "d_vocab": task.n_vocab,
            "d_vocab_out": task.n_classes, "d_mlp": block.ffn[0].out_features, "act_fn": ACTIVATIONS[cfg.activation],
            "normalization_type": NORMS[cfg.norm], "eps": model.norm.eps if cfg.norm == "pre" else 1e-5,
            "init_weights": False}


def native_state(model, norm: str) -> dict:
    """This project's weights under TransformerLens's native module names (NativeModel's state dict, and the
    unembedding's bias as the bias buffer TransformerBridge gives it)."""
    state = {"tok_embed.weight": model.token_embeddings.weight, "pos.weight": model.position_embeddings.weight,
             "head.weight": model.head.weight, "head.bias": model.head.bias}
    for i, block in enumerate(model.blocks):
        names = {"q": None, "k": None, "v": None}
        for name, weight, bias in zip(names, block.qkv.weight.chunk(3), block.qkv.bias.chunk(3)):
            state[f"layers.{i}.attn.{name}.weight"], state[f"layers.{i}.attn.{name}.bias"] = weight, bias
        state.update({f"layers.{i}.attn.o.weight": block.out.weight, f"layers.{i}.attn.o.bias": block.out.bias,
                      f"layers.{i}.mlp.fc_in.weight": block.ffn[0].weight, f"layers.{i}.mlp.fc_in.bias": block.ffn[0].bias,
                      f"layers.{i}.mlp.fc_out.weight": block.ffn[2].weight,
                      f"layers.{i}.mlp.fc_out.bias": block.ffn[2].bias})
        if norm == "pre":
            for ours, theirs in ((block.attn_norm, "ln1"), (block.ffn_norm, "ln2")):
                state[f"layers.{i}.{theirs}.weight"], state[f"layers.{i}.{theirs}.bias"] = ours.weight, ours.bias
    if norm == "pre":
        state["ln_out.weight"], state["ln_out.bias"] = model.norm.weight, model.norm.bias
    return state


def to_transformer_lens(run_dir: str, op: str, seed: int, checkpoint: str | None = None, job: Job | None = None,
                        E=None):
    """A TransformerBridge (TransformerLens 4.x, native) holding the trained weights of (op, seed) in run_dir (its
    final model, or a file of its checkpoints/), in eval mode, in the run's float type. Its logits at the last
    position are this project's model's; raises UsageError (one line) for a model TransformerLens cannot hold."""
    return exported(run_dir, op, seed, checkpoint, job, E)[0]


def exported(run_dir: str, op: str, seed: int, checkpoint=None, job=None, E=None) -> tuple:
    """(the bridge, its TransformerBridgeConfig fields) of to_transformer_lens."""
    E = E or experiment_module()
    job = job or Job(op, seed)
    if not os.path.exists(os.path.join(run_dir, CONFIG)):
        raise UsageError(f"{run_dir}: no {CONFIG}: not a run folder")
    cfg = job.config(config_from_dict(E.Config, read_json(os.path.join(run_dir, CONFIG))))
    reason = why_not(cfg)
    if reason:
        raise UsageError(f"{run_dir}: no TransformerLens export: {reason}")
    model = load_model(E, run_dir, op, seed, checkpoint=checkpoint, job=job)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches TransformerBridge.boot_native)

    settings = bridge_config(cfg, model, load_task(E, run_dir, op))
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**settings),
                                           dtype=next(model.parameters()).dtype)
    load_native(bridge, native_state(model, cfg.norm))
    return bridge.eval(), settings


def load_native(bridge, state: dict) -> None:
    """Copy weights given under NativeModel's names into a booted bridge (its modules wrap the native ones)."""
    held = {name.replace("._original_component", ""): tensor for name, tensor in
            [*bridge.original_model.named_parameters(), *bridge.original_model.named_buffers()]
            if not name.endswith("causal_mask")}
    if set(held) != set(state):
        raise UsageError(f"TransformerLens's native model does not match this one: missing "
                         f"{sorted(set(held) - set(state))}, unknown {sorted(set(state) - set(held))}")
    with torch.no_grad():
        for name, tensor in state.items():
            held[name].copy_(tensor)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--op", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a file name in the job's checkpoints/ (default: final)")
    args = parser.parse_args(argv)
    try:
        bridge, settings = exported(args.run_dir, args.op, args.seed, args.checkpoint)
    except (UsageError, FileNotFoundError) as error:
        print(f"lab.export: {error}", file=sys.stderr)
        return 2
    from safetensors.torch import save_file

    folder = job_dir(args.run_dir, Job(args.op, args.seed))
    stem = os.path.splitext(args.checkpoint)[0] + "." if args.checkpoint else ""
    state = {k: v.detach().contiguous() for k, v in bridge.state_dict().items()}
    path = os.path.join(folder, stem + STATE)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(os.path.join(folder, stem + SETTINGS), settings)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
