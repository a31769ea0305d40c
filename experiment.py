"""Train small transformers on algorithmic data and watch them grok.

Usage:
    python experiment.py --out_dir=run_0                      # the full default experiment
    python experiment.py --out_dir=run_t --ops=x_plus_y --seeds=1 --steps=300 --capture_every=100
    python experiment.py --help                               # every flag, with its meaning

Writes run_dir/final_info.json in the schema of the AI-Scientist grokking
template, plus per-(op, seed) logs, example tables and activation snapshots
(see docs/experiment.md, "Outputs"). Running the same command again resumes.
"""

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_context, resource_tracker
from multiprocessing.connection import wait as wait_for_connections

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if __name__ in ("__main__", "__mp_main__"):  # plugin files `import experiment`: give them this very module
    sys.modules.setdefault("experiment", sys.modules[__name__])


# =============================================================================
# WHAT AN EXPERIMENT CHANGES: the plugin list and the Config defaults below (the harness passes no flags, so
# these defaults are the experiment), and plugins: subclass Plugin (hooks listed in its docstring) and add its
# name to DEFAULT_PLUGINS. The example interventions after Plugin show each hook in under 30 lines.
# =============================================================================


OPS = ("x_div_y", "x_minus_y", "x_plus_y", "permutation")
MODELS = ("transformer", "gpt2")
DTYPES = ("fp32", "bf16")
# The plugins every run gets, in order: builtin names (BUILTIN_PLUGINS, at the end of the plugin section:
# capture, measures, grokfast, norms, fourier, rqi, xavier_init, layer_lr, swap_operands, step_val_acc_95) or
# paths to .py files. capture saves activation snapshots, measures the dense progress measures. To try an
# intervention without flags, add it here, e.g. DEFAULT_PLUGINS = ["capture", "measures", "xavier_init"].
DEFAULT_PLUGINS = ["capture", "measures"]


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    """One experiment. The defaults are the AI-Scientist grokking template's."""

    out_dir: str = "run_0"  # where every result goes; rerunning on it resumes
    ops: tuple[str, ...] = OPS  # comma-separated: x_div_y, x_minus_y, x_plus_y, permutation
    seeds: int = 3  # seeds per op: 0 .. seeds-1
    p: int = 97  # modulus of the modular ops (prime when x_div_y is run)
    perm_k: int = 5  # permutation op: the group S_k
    train_frac: float = 0.5  # share of all pairs used for training
    steps: int = 7500  # optimizer updates
    batch_size: int = 512  # training pairs per update, sampled with replacement
    lr: float = 1e-3  # AdamW peak learning rate
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    weight_decay: float = 0.5  # AdamW decoupled weight decay
    warmup_steps: int = 50  # linear warm-up from 0, then constant
    eval_every: int = 10  # updates between evaluations on the whole validation set
    model: str = "transformer"  # transformer (the template's) or gpt2 (transformers' GPT2Model)
    num_layers: int = 2  # decoder blocks
    d_model: int = 128  # residual width
    n_heads: int = 4  # attention heads
    dtype: str = "fp32"  # fp32, or bf16 autocast for the matrix multiplies
    device: str = "auto"  # auto (cuda when present), cpu or cuda
    plugins: tuple[str, ...] = ()  # extra plugins: builtin names or paths to .py files
    capture: bool = True  # run the activation-capture plugin
    capture_every: int = 1000  # capture a snapshot every this many updates (and at 0 and the end)
    capture_thresholds: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99)  # also capture when val acc first exceeds these
    capture_dtype: str = "float16"  # float16 or float32
    measure: bool = True  # run the dense progress-measures plugin (measures.jsonl)
    measure_every: int = 100  # measures plugin: updates between measurements from memorisation to dense_after past grokking
    measure_sparse_every: int = 500  # ... and between measurements after that
    measure_dense_after: int = 1000  # updates after the grokking step that are still measured densely
    grokfast_alpha: float = 0.98  # grokfast plugin: EMA decay of the gradient
    grokfast_lamb: float = 2.0  # grokfast plugin: weight of the EMA added to the gradient
    fourier_topk: int = 5  # fourier plugin: how many key frequencies
    rqi_tol: float = 0.1  # rqi plugin: a parallelogram closes when its unit phases differ by less
    workers: int = 0  # parallel (op, seed) processes; 0 = one per core (one on a GPU)
    threads: int = 0  # torch threads per (op, seed); 0 = 1 on a CPU. Other counts round differently
    overwrite: bool = False  # discard results in out_dir made with another config
    progress: str = "auto"  # auto (a bar on a terminal, plain lines otherwise), bar, lines or none


# Fields that never change a number, so a resumed run may change them freely.


# ----------------------------------------------------------------------------- plugin API
class Plugin:
    """Base class of plugins: override the hooks you need. `run` is the Run below.

    In the order they are called for each (op, seed):
    init_model       the model is built (under init_seed), the optimizer is not: re-initialise run.model here
    param_groups     return the optimizer's parameter groups (a list of dicts, e.g. a learning rate per layer)
    on_train_begin   before the first update
    transform_batch  return the (x, y) training batch to use (augmentation); validation pairs never pass here
    on_after_backward, on_step_end, on_eval, on_train_end: see each one below.
    """

    name = "plugin"

    def init_model(self, run): ...  # the global torch RNG continues from init_seed, so a random init is seeded

    def param_groups(self, run): ...  # None: one group of every parameter; at most one plugin may return groups

    def on_train_begin(self, run): ...

    def transform_batch(self, run, step, x, y): ...  # x (batch, 4) tokens, y (batch,) classes -> (x, y)

    def on_after_backward(self, run, step): ...  # gradients exist; the update has not happened

    def on_step_end(self, run, step): ...  # after update number `step` (1-based)

    def on_eval(self, run, step, metrics): ...  # keys added to `metrics` go into the log

    def on_train_end(self, run, final_info): ...  # keys added to `final_info` are saved, averaged in final_info.json


# ----------------------------------------------------------------------------- example interventions
# The four kinds of change that AI-Scientist agents made to the grokking template, each as a plugin. Switch one
# on by adding its name to DEFAULT_PLUGINS; copy one to start your own.
class XavierInit(Plugin):
    """Xavier-uniform initialisation of every weight matrix and embedding, zero biases (instead of PyTorch's
    defaults). Runs under the init seed, so it is as reproducible as the default initialisation."""

    name = "xavier_init"

    @torch.no_grad()
    def init_model(self, run):
        for name, parameter in run.model.named_parameters():
            if parameter.dim() >= 2:
                nn.init.xavier_uniform_(parameter)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)


class LayerLearningRates(Plugin):
    """A learning rate per layer: cfg.lr times the scale of the first matching name prefix (1 if none)."""

    name = "layer_lr"
    scales = {"token_embeddings": 0.5, "position_embeddings": 0.5, "blocks.0": 1.0, "blocks.1": 1.0, "head": 2.0}

    def param_groups(self, run):
        groups = {}
        for name, parameter in run.model.named_parameters():
            scale = next((s for prefix, s in self.scales.items() if name.startswith(prefix)), 1.0)
            groups.setdefault(scale, []).append(parameter)
        return [{"params": params, "lr": run.cfg.lr * scale} for scale, params in groups.items()]


class SwapOperands(Plugin):
    """Augmentation: each training pair (a, b) is replaced by (b, a) with probability 1/2; for x_minus_y the
    answer becomes -(a - b). Other ops are left alone. Validation pairs never pass through transform_batch; but
    (b, a) may itself be a validation pair, so this teaches commutativity from held-out inputs by design."""

    name = "swap_operands"

    def on_train_begin(self, run):
        self.generator = torch.Generator(device=run.device).manual_seed(derived_seeds(run.seed)["batch_seed"] + 1)

    def transform_batch(self, run, step, x, y):
        if run.op not in ("x_plus_y", "x_minus_y"):
            return x, y
        swap = torch.rand(len(x), generator=self.generator, device=x.device) < 0.5
        x = torch.where(swap[:, None], x[:, [2, 1, 0, 3]], x)  # tokens [a, "o", b, "="] -> [b, "o", a, "="]
        if run.op == "x_minus_y":
            y = torch.where(swap, (-y) % run.cfg.p, y)
        return x, y


class StepValAcc95(Plugin):
    """A metric: the first evaluated step with val accuracy > 0.95, None when never reached. final_info.json
    averages it over the seeds that reached it and says how many did (step_val_acc_95_n)."""

    name = "step_val_acc_95"

    def on_train_begin(self, run):
        self.reached = None

    def on_eval(self, run, step, metrics):
        if self.reached is None and metrics["val_acc"] > 0.95:
            self.reached = step

    def on_train_end(self, run, final_info):
        final_info["step_val_acc_95"] = self.reached


# ----------------------------------------------------------------------------- data
def device_of(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def derived_seeds(seed: int) -> dict:
    """Independent seeds for the split, the initialisation and the batch order."""
    return {"split_seed": seed, "init_seed": 1337 + seed, "batch_seed": 2**20 + seed}


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


@dataclass
class Task:
    """Every pair of one op as tensors. Row i of x/y is pair (a[i], b[i])."""

    op: str
    x: torch.Tensor  # (n_pairs, 4) int64 tokens [a, "o", b, "="]
    y: torch.Tensor  # (n_pairs,) int64 answer class
    a: torch.Tensor  # (n_pairs,) index of the left operand among the elements
    b: torch.Tensor  # (n_pairs,) index of the right operand among the elements
    n_vocab: int
    n_classes: int
    elements: list  # class index -> element (int residue or permutation tuple)


def make_task(op: str, p: int = 97, perm_k: int = 5) -> Task:
    """All pairs of `op`; vocabulary = ["o", "="] + the elements, class = element index."""
    if op == "permutation":
        elements = list(itertools.permutations(range(perm_k)))
        perms = torch.tensor(elements)  # (n, k)
        n = len(elements)
        a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        a, b = a.reshape(-1), b.reshape(-1)
        composed = torch.gather(perms[a], 1, perms[b])  # (a o b)[i] = a[b[i]]
        # Rank of each permutation in lexicographic order (= its index in `elements`).
        radix = torch.tensor([math.factorial(perm_k - 1 - i) for i in range(perm_k)])
        smaller_later = (composed.unsqueeze(2) > composed.unsqueeze(1)).triu(1).sum(2)  # (n*n, k)
        y = (smaller_later * radix).sum(1)
    else:
        elements = list(range(p))
        first = torch.arange(p)
        second = torch.arange(1, p) if op == "x_div_y" else torch.arange(p)
        a, b = torch.meshgrid(first, second, indexing="ij")
        a, b = a.reshape(-1), b.reshape(-1)
        if op == "x_plus_y":
            y = (a + b) % p
        elif op == "x_minus_y":
            y = (a - b) % p
        elif op == "x_div_y":
            inverse = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])
            y = (a * inverse[b]) % p
        else:
            raise ValueError(f"unknown op {op}")
        n = p
    x = torch.stack([a + 2, torch.zeros_like(a), b + 2, torch.ones_like(a)], dim=1)
    return Task(op, x, y, a, b, n_vocab=n + 2, n_classes=n, elements=elements)


def split_pairs(n_pairs: int, train_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of range(n_pairs) into sorted (train, val) index tensors."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed))
    n_train = int(n_pairs * train_frac)
    return order[:n_train].sort().values, order[n_train:].sort().values


# ----------------------------------------------------------------------------- model
class Block(nn.Module):
    """Post-LN decoder block of the template: x = LN(x + attn(x)); x = LN(x + FFN(x)).

    forward(x) is a plain causal block over x (batch, seq, d_model).
    forward(x, prefix, prefix_index) treats row i's sequence as prefix[prefix_index[i]]
    followed by x[i]: the prefix rows (n_rows, n_prefix, d_model) are computed once
    each, not once per example. It returns (x's new states, prefix's new states).
    With last_only, queries, the output projection and the FFN of x run for its last
    position alone (all a causal model's answer needs), and no prefix states are returned.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.ffn_norm = nn.LayerNorm(d_model)
        # nn.MultiheadAttention's initialisation, as in the template.
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = t.shape
        return t.view(batch, seq, self.n_heads, d_model // self.n_heads).transpose(1, 2)  # (batch, heads, seq, hd)

    def _project(self, x: torch.Tensor, queries_from: int = 0):
        """Queries of positions queries_from.. (batch, q_len, d) and keys|values of all (batch, seq, 2d)."""
        d_model = x.shape[-1]
        if queries_from == 0:
            q, kv = self.qkv(x).split([d_model, 2 * d_model], dim=-1)
        else:
            w_q, w_kv = self.qkv.weight.split([d_model, 2 * d_model])
            b_q, b_kv = self.qkv.bias.split([d_model, 2 * d_model])
            q = F.linear(x[:, queries_from:], w_q, b_q)
            kv = F.linear(x, w_kv, b_kv)
        return q, kv

    def _attend_and_mix(self, residual, q, kv):
        """Causal attention of the last q_len positions over all k_len positions, then the FFN.

        Written out with broadcasting: for sequences of 4 tokens this beats
        scaled_dot_product_attention's kernels several times over on a CPU.
        """
        d_model = q.shape[-1]
        k, v = kv.split(d_model, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (batch, heads, len, hd)
        q_len, k_len = q.shape[2], k.shape[2]
        scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) * q.shape[-1] ** -0.5  # (batch, heads, q_len, k_len)
        # query j is position k_len - q_len + j and sees keys 0 .. k_len - q_len + j
        hidden = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(k_len - q_len + 1)
        weights = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        attn = (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(3)  # (batch, heads, q_len, hd)
        attn = attn.transpose(1, 2).reshape(residual.shape)
        h = self.attn_norm(residual + self.out(attn))
        return self.ffn_norm(h + self.ffn(h))

    def forward(self, x, prefix=None, prefix_index=None, last_only: bool = False):
        queries_from = x.shape[1] - 1 if last_only else 0
        q, kv = self._project(x, queries_from)
        if prefix is None:
            return self._attend_and_mix(x[:, queries_from:], q, kv)
        q_pre, kv_pre = self._project(prefix)  # (n_rows, n_prefix, .): the prefix sees only itself
        prefix_out = None if last_only else self._attend_and_mix(prefix, q_pre, kv_pre)
        kv = torch.cat([kv_pre.index_select(0, prefix_index), kv], dim=1)  # (batch, n_prefix + seq, 2d)
        return self._attend_and_mix(x[:, queries_from:], q, kv), prefix_out


class Transformer(nn.Module):
    """The template's model: embeddings -> blocks -> LayerNorm -> linear head, read at the last position.

    With shared_prefix (the default), inputs must be [a, "o", b, "="] with the same
    token at position 1 in every row: under the causal mask the states of positions
    0 and 1 then depend on `a` alone, so they are computed once per vocabulary entry
    and gathered, which saves about 40% of the work. The numbers are those of the
    plain computation (shared_prefix=False) up to float rounding.
    """

    def __init__(self, n_vocab: int, n_classes: int, num_layers: int = 2, d_model: int = 128,
                 n_heads: int = 4, seq_len: int = 4, shared_prefix: bool = True):
        super().__init__()
        self.token_embeddings = nn.Embedding(n_vocab, d_model)
        self.position_embeddings = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        self.shared_prefix = shared_prefix
        self.capture_modules = {"first": "blocks.0", "last": f"blocks.{num_layers - 1}"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.position_embeddings.weight
        n_blocks = len(self.blocks)
        if not self.shared_prefix:
            h = self.token_embeddings(tokens) + positions[: tokens.shape[1]]
            for i, block in enumerate(self.blocks):
                h = block(h, last_only=i == n_blocks - 1)
            return self.head(self.norm(h[:, -1]))
        n_vocab = self.token_embeddings.num_embeddings
        every_a = torch.arange(n_vocab, device=tokens.device)
        prefix_tokens = torch.stack([every_a, tokens[:1, 1].expand(n_vocab)], dim=1)  # (n_vocab, 2)
        prefix = self.token_embeddings(prefix_tokens) + positions[:2]  # (n_vocab, 2, d_model)
        h = self.token_embeddings(tokens[:, 2:]) + positions[2: tokens.shape[1]]  # (batch, seq - 2, d_model)
        for i, block in enumerate(self.blocks):
            h, prefix = block(h, prefix, tokens[:, 0], last_only=i == n_blocks - 1)
        return self.head(self.norm(h[:, -1]))  # (batch, n_classes)

    def token_embedding_matrix(self) -> torch.Tensor:
        return self.token_embeddings.weight


class GPT2Classifier(nn.Module):
    """A transformers GPT2Model built from a config (no download), read at the last position."""

    def __init__(self, n_vocab: int, n_classes: int, num_layers: int = 2, d_model: int = 128,
                 n_heads: int = 4, seq_len: int = 4):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(vocab_size=n_vocab, n_positions=seq_len, n_embd=d_model, n_layer=num_layers,
                            n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                            bos_token_id=None, eos_token_id=None)  # no text: GPT-2's special tokens do not exist
        self.gpt2 = GPT2Model(config)
        self.head = nn.Linear(d_model, n_classes)
        self.capture_modules = {"first": "gpt2.h.0", "last": f"gpt2.h.{num_layers - 1}"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.gpt2(input_ids=tokens).last_hidden_state  # (batch, seq, d_model), after ln_f
        return self.head(hidden[:, -1])

    def token_embedding_matrix(self) -> torch.Tensor:
        return self.gpt2.wte.weight


def build_model(cfg: Config, task: Task) -> nn.Module:
    cls = GPT2Classifier if cfg.model == "gpt2" else Transformer
    return cls(task.n_vocab, task.n_classes, cfg.num_layers, cfg.d_model, cfg.n_heads, seq_len=task.x.shape[1])


# ----------------------------------------------------------------------------- hooks and research plugins
class forward_hooks:
    """Context manager: forward hooks on modules named by dotted path, removed in finally.

    with forward_hooks(model, {"blocks.0": fn}) as handles: ...
    fn(name, module, inputs, output) is called for each forward of that module.
    """

    def __init__(self, model: nn.Module, hooks: dict):
        self.model, self.hooks, self.handles = model, hooks, []

    def __enter__(self):
        try:
            for name, fn in self.hooks.items():
                module = self.model.get_submodule(name)
                self.handles.append(module.register_forward_hook(
                    lambda mod, inputs, output, name=name, fn=fn: fn(name, mod, inputs, output)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.handles

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False


def count_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class CaptureSchedule(Plugin):
    """Calls self.snapshot(run, step, reason) at step 0, every capture_every updates, at the last update, and when
    val accuracy first exceeds each of capture_thresholds; one call per step. A scheduled snapshot at an
    evaluation step is taken after the evaluation, so that run.all_outputs() reuses its forward pass."""

    def on_train_begin(self, run):
        self.crossed, self.last_step = set(), None
        self.snapshot_at(run, 0, "init")

    def scheduled(self, run, step) -> list:
        return (["periodic"] if step % run.cfg.capture_every == 0 else []) + (["final"] if step == run.cfg.steps else [])

    def on_step_end(self, run, step):
        if not (step % run.cfg.eval_every == 0 or step == run.cfg.steps):  # no evaluation follows at this step
            for reason in self.scheduled(run, step):
                self.snapshot_at(run, step, reason)

    def on_eval(self, run, step, metrics):
        for reason in self.scheduled(run, step):
            self.snapshot_at(run, step, reason)
        for threshold in run.cfg.capture_thresholds:
            if threshold not in self.crossed and metrics["val_acc"] > threshold:
                self.crossed.add(threshold)
                self.snapshot_at(run, step, f"val_acc>{threshold}")

    def snapshot_at(self, run, step, reason):
        self.snapshot(run, step, reason, again=self.last_step == step)
        self.last_step = step

    def snapshot(self, run, step, reason, again): ...  # again: a snapshot of this step was already taken


class ActivationCapture(CaptureSchedule):
    """Snapshots of the first and last block at the answer position, for every pair.

    One safetensors file per snapshot in activations/, listed in activations/index.json.
    """

    name = "capture"

    def on_train_begin(self, run):
        from safetensors.torch import save_file

        self.save_file = save_file
        self.folder = os.path.join(run.out_dir, "activations")
        os.makedirs(self.folder, exist_ok=True)
        modules = run.model.capture_modules
        self.index = {"modules": modules, "dtype": run.cfg.capture_dtype, "n_rows": len(run.task.y),
                      "rows": "examples.parquet", "position": "answer (last input token)", "snapshots": []}
        super().on_train_begin(run)

    def snapshot(self, run, step, reason, again):
        snapshots = self.index["snapshots"]
        start = time.perf_counter()
        if again:
            snapshots[-1]["reasons"].append(reason)
        else:
            outputs = run.all_outputs()
            logits = outputs["logits"]
            dtype = getattr(torch, run.cfg.capture_dtype)
            tensors = {name: outputs[name].to(dtype).contiguous() for name in self.index["modules"].values()}
            file = f"step_{step:06d}.safetensors"
            atomic_write(os.path.join(self.folder, file),
                         lambda tmp: self.save_file(tensors, tmp, metadata={"step": str(step)}))
            correct = logits.argmax(-1) == run.task.y
            snapshots.append({"step": step, "file": file, "reasons": [reason],
                              "train_acc": correct[run.train_idx].float().mean().item(),
                              "val_acc": correct[run.val_idx].float().mean().item()})
        write_json(os.path.join(self.folder, "index.json"), self.index)
        run.timings[self.name] = run.timings.get(self.name, 0.0) + time.perf_counter() - start


class Grokfast(Plugin):
    """Grokfast-EMA (Lee et al. 2024, arXiv:2405.20233): amplify the slow part of the gradient.

    ema = alpha * ema + (1 - alpha) * grad;  grad = grad + lamb * ema  (--grokfast_alpha, --grokfast_lamb).
    """

    name = "grokfast"

    def on_train_begin(self, run):
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        self.ema = None

    @torch.no_grad()
    def on_after_backward(self, run, step):
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.ema is None:  # as in the paper's code: the EMA starts at the first gradient
            self.ema = [g.clone() for g in grads]
        else:
            torch._foreach_lerp_(self.ema, grads, 1 - run.cfg.grokfast_alpha)
        if run.cfg.grokfast_lamb:
            torch._foreach_add_(grads, self.ema, alpha=run.cfg.grokfast_lamb)


class Norms(Plugin):
    """Logs weight norm, logit norm and softmax collapse at every evaluation (into log.jsonl).

    param_norm: L2 norm of all parameters (Omnigrok, Liu et al. 2022).
    logit_norm: mean L2 norm of the training examples' logit vectors.
    softmax_collapse: share of training examples whose float32 softmax probability of the
    true class is exactly 1.0 (Prieto et al. 2025, "Grokking at the edge of numerical stability").
    Costs one forward over the training pairs per evaluation.
    """

    name = "norms"

    @torch.inference_mode()
    def on_eval(self, run, step, metrics):
        metrics["param_norm"] = param_norm(run.model)
        x, y = run.task.x[run.train_idx].to(run.device), run.task.y[run.train_idx].to(run.device)
        _, _, outputs = evaluate(run.model, x, y, run.autocast)
        metrics.update(logit_stats(outputs["logits"], y))  # logits (n_train, n_classes)


def fourier_spectrum(embedding: torch.Tensor) -> torch.Tensor:
    """Power of a (p, d) embedding of the residues 0..p-1 at frequencies 0..p//2, after centring.

    Centring removes the mean embedding (frequency 0), which says nothing about the algorithm.
    Frequencies k and p-k are one real frequency, so their powers are added.
    """
    p = embedding.shape[0]
    centred = embedding.double() - embedding.double().mean(0)
    power = torch.fft.fft(centred, dim=0).abs().pow(2).sum(1)  # (p,)
    folded = power[: p // 2 + 1].clone()
    folded[1:] += power.flip(0)[: p // 2]  # power[p - k] for k = 1..p//2
    if p % 2 == 0:
        folded[-1] = power[p // 2]  # the Nyquist frequency is its own partner
    return folded


def fourier_sparsity(spectrum: torch.Tensor, k: int) -> tuple[float, list]:
    """(share of the power in the top-k frequencies, those frequencies, strongest first)."""
    order = spectrum[1:].argsort(descending=True)[:k] + 1
    return (spectrum[order].sum() / spectrum.sum()).item(), order.tolist()


class EmbeddingProbe(CaptureSchedule):
    """A measure of the residues' token embedding (p, d), taken at each capture step into {name}.jsonl."""

    ops = ()

    def on_train_begin(self, run):
        self.active = run.op in self.ops
        if not self.active:
            if run.seed == 0:  # once per op, not once per seed
                print(f"experiment.py: {self.name} plugin: not meaningful for {run.op} (only for "
                      f"{', '.join(self.ops)}); not measured", file=sys.stderr)
            return
        self.rows = []
        super().on_train_begin(run)

    def on_step_end(self, run, step):
        if self.active:
            super().on_step_end(run, step)

    def on_eval(self, run, step, metrics):
        if self.active:
            super().on_eval(run, step, metrics)

    def snapshot(self, run, step, reason, again):
        if again:
            return
        with torch.no_grad():
            embedding = run.model.token_embedding_matrix()[2: run.cfg.p + 2].detach().float().cpu()
        self.rows.append({"step": step, **self.measure(run, embedding)})
        write_jsonl(os.path.join(run.out_dir, f"{self.name}.jsonl"), self.rows)

    def measure(self, run, embedding) -> dict: ...


class FourierEmbedding(EmbeddingProbe):
    """Nanda et al. 2023's progress measure: how sparse the token embedding is in the Fourier basis.

    fourier.jsonl rows: step, topk_frac (share of the power in the top --fourier_topk non-constant
    frequencies), key_freqs (those frequencies), spectrum (power share of frequencies 0..p//2).
    """

    name = "fourier"
    ops = ("x_plus_y", "x_minus_y")

    def measure(self, run, embedding):
        spectrum = fourier_spectrum(embedding)
        topk_frac, key_freqs = fourier_sparsity(spectrum, run.cfg.fourier_topk)
        return {"topk_frac": topk_frac, "key_freqs": key_freqs, "spectrum": (spectrum / spectrum.sum()).tolist()}


def representation_quality(embedding: torch.Tensor, tol: float) -> float:
    """RQI after Liu et al. 2022: the share of parallelograms i + j = m + n (mod p), {i, j} != {m, n},
    that close in the standardised embedding.

    Vector sums cannot close modulo p (Z_p has no non-trivial additive embedding in R^d, so even a
    perfect ring fails that test), so closure is tested where modular addition is exact: on the
    circle of the embedding's strongest Fourier frequency. Each residue's standardised embedding is
    projected onto that frequency's plane, giving a unit phase u_i, and the parallelogram closes when
    |u_i u_j - u_m u_n| < tol. A ring scores 1, random vectors about tol / pi.
    """
    p = embedding.shape[0]
    e = embedding.double() - embedding.double().mean(0)
    e = e / e.pow(2).sum(1).mean().sqrt()  # rows of unit root-mean-square norm
    coefficients = torch.fft.fft(e, dim=0)  # (p, d): row k is frequency k
    k = int(fourier_spectrum(e)[1:].argmax()) + 1
    z = e.to(coefficients.dtype) @ coefficients[k].conj()  # (p,) position on that frequency's circle
    u = z / z.abs().clamp_min(1e-12)
    closed = total = 0
    i = torch.arange(p)
    for s in range(p):
        j = (s - i) % p
        keep = i <= j  # each unordered pair {i, j} with i + j = s once
        products = (u[i[keep]] * u[j[keep]])[:, None]  # (n_pairs, 1)
        dist = torch.cdist(torch.view_as_real(products).flatten(1), torch.view_as_real(products).flatten(1))
        upper = torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)
        closed += (dist[upper] < tol).sum().item()
        total += upper.sum().item()
    return closed / total


class RepresentationQuality(EmbeddingProbe):
    """Liu et al. 2022's representation quality index of the token embedding, for x_plus_y.

    rqi.jsonl rows: step, rqi (share of closed parallelograms at tolerance --rqi_tol).
    """

    name = "rqi"
    ops = ("x_plus_y",)

    def measure(self, run, embedding):
        return {"rqi": representation_quality(embedding, run.cfg.rqi_tol)}


# ----------------------------------------------------------------------------- progress measures
# The representation metrics below are the one implementation of each: the measures plugin computes them
# densely during training and plot.py on saved snapshots.
def class_centroids(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (n_classes, d), counts (n_classes,)); a class without rows has a zero centroid and count 0."""
    counts = torch.bincount(y, minlength=n_classes)
    sums = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    return sums / counts.clamp_min(1)[:, None].to(x.dtype), counts


def silhouette(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean silhouette by class, as sklearn's silhouette_score on the same rows (a lone member scores 0)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    counts = torch.bincount(inverse)
    sums = torch.cdist(x.float(), x.float()) @ F.one_hot(inverse, len(classes)).float()  # (n, C) distance sums
    per_class = sums.double() / counts  # mean distance from each row to each class
    rows = torch.arange(len(x))
    own_count = counts[inverse].double()
    inside = per_class[rows, inverse] * own_count / (own_count - 1).clamp_min(1)  # mean over the other members
    per_class[rows, inverse] = math.inf
    nearest = per_class.min(1).values
    score = (nearest - inside) / torch.maximum(inside, nearest).clamp_min(1e-300)
    return score.masked_fill(own_count == 1, 0.0).mean().item()


def davies_bouldin(x: torch.Tensor, y: torch.Tensor) -> float:
    """sklearn's davies_bouldin_score, vectorised over classes."""
    classes, inverse = torch.unique(y, return_inverse=True)
    centroids, counts = class_centroids(x.double(), inverse, len(classes))
    spread = torch.zeros(len(classes), dtype=torch.float64).index_add_(
        0, inverse, (x - centroids[inverse].float()).norm(dim=1).double()) / counts
    gaps = torch.cdist(centroids, centroids)
    if torch.allclose(spread, torch.zeros_like(spread)) or torch.allclose(gaps, torch.zeros_like(gaps)):
        return 0.0
    gaps.fill_diagonal_(math.inf)
    gaps[gaps == 0] = math.inf
    return ((spread[:, None] + spread[None]) / gaps).max(1).values.mean().item()


def scatter_metrics(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Calinski-Harabasz (as sklearn's) and nc1 = tr(S_w S_b^+)/C with class-balanced scatters (Papyan et al.)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    n, n_classes = len(x), len(classes)
    centroids, counts = class_centroids(x.float(), inverse, n_classes)
    centred = x - centroids[inverse]
    s_w = (centred.T @ centred).double() / n  # (d, d)
    within = torch.trace(s_w) * n
    centroids = centroids.double()
    between_weighted = (counts[:, None] * (centroids - x.double().mean(0)).pow(2)).sum()
    calinski = (between_weighted * (n - n_classes) / (within * (n_classes - 1))).item() if within > 0 else 1.0
    between = centroids - centroids.mean(0)
    s_b = between.T @ between / n_classes
    nc1 = torch.trace(s_w @ torch.linalg.pinv(s_b, rtol=1e-6, hermitian=True)).item() / n_classes
    return {"calinski_harabasz": calinski, "nc1": nc1}


def within_class_var(x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(S_w) / tr(S_total) over the rows given: the within-class share of the variance (Sakamoto and Sato's
    whole-population within-class variance, made scale-free)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    centroids, _ = class_centroids(x.float(), inverse, len(classes))
    within = (x - centroids[inverse]).pow(2).sum(1).double().sum()
    return (within / (x - x.mean(0)).pow(2).sum(1).double().sum()).item()


def participation_ratio(x: torch.Tensor) -> float:
    """(sum of covariance eigenvalues)^2 / sum of their squares: the effective dimension."""
    centred = x.float() - x.float().mean(0)
    eig = torch.linalg.eigvalsh((centred.T @ centred).double()).clamp_min(0)  # the 1/(n-1) cancels
    return (eig.sum() ** 2 / eig.pow(2).sum()).item()


def metric_samples(is_train: torch.Tensor, seed: int, silhouette_rows: int = 500, knn_queries: int = 250) -> dict:
    """Fixed seeded subsamples (row indices) for the silhouette of each split and the kNN queries (val rows)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for split, rows in (("train", torch.nonzero(is_train).flatten()), ("val", torch.nonzero(~is_train).flatten())):
        out[f"silhouette_{split}"] = rows[torch.randperm(len(rows), generator=gen)[:silhouette_rows]].sort().values
    val = torch.nonzero(~is_train).flatten()
    out["knn"] = val[torch.randperm(len(val), generator=gen)[:knn_queries]].sort().values
    return out


def representation_metrics(x: torch.Tensor, y: torch.Tensor, is_train: torch.Tensor, samples: dict,
                           knn_k: int = 5) -> list:
    """[(metric, split, value)] of one layer's representations x (n, d) with answer classes y and split mask.

    Table in docs/analysis.md ("Metrics"). Silhouette and kNN use the fixed subsamples of metric_samples.
    """
    x, y, is_train = x.float().cpu(), y.cpu(), is_train.cpu()
    out = []
    for split, mask in (("train", is_train), ("val", ~is_train)):
        xs, ys = x[mask], y[mask]
        n_classes = len(torch.unique(ys))
        if n_classes < 2 or len(ys) <= n_classes:
            continue
        rows = samples[f"silhouette_{split}"]
        out.append(("silhouette", split, silhouette(x[rows], y[rows])))
        out.append(("davies_bouldin", split, davies_bouldin(xs, ys)))
        out += [(metric, split, value) for metric, value in scatter_metrics(xs, ys).items()]
    if is_train.any() and (~is_train).any():
        x_train, y_train, x_val, y_val = x[is_train], y[is_train], x[~is_train], y[~is_train]
        classes = torch.unique(y_train)
        centroids = class_centroids(x_train, torch.searchsorted(classes, y_train), len(classes))[0]
        distances = centroids.pow(2).sum(1) - 2 * x_val @ centroids.T  # + |x|^2, the same for every centroid
        out.append(("ncc_acc", "val", (classes[distances.argmin(1)] == y_val).float().mean().item()))
        queries = samples["knn"]
        k = min(knn_k, len(y_train))
        d = x_train.pow(2).sum(1) - 2 * x[queries] @ x_train.T  # (n_queries, n_train): + |q|^2, the same per row
        neighbours = y_train[d.topk(k, largest=False).indices]  # (n_queries, k)
        votes = F.one_hot(neighbours, int(y.max()) + 1).sum(1)  # ties go to the smallest class, as in sklearn
        out.append(("knn_acc", "val", (votes.argmax(1) == y[queries]).float().mean().item()))
    out.append(("within_class_var", "all", within_class_var(x, y)))
    out.append(("participation_ratio", "all", participation_ratio(x)))
    return out


@torch.no_grad()
def param_norm(model: nn.Module) -> float:
    """L2 norm of all parameters (the weight-norm view of Omnigrok, Liu et al. 2022)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in model.parameters()])).item()


def logit_stats(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """logit_norm: mean L2 norm of the logit vectors; softmax_collapse: share of rows whose float32 softmax
    probability of the true class is exactly 1.0 (Prieto et al. 2025: their gradient vanishes)."""
    logits = logits.float()
    p_true = logits.softmax(-1).gather(1, y[:, None])
    return {"logit_norm": torch.linalg.vector_norm(logits, dim=-1).mean().item(),
            "softmax_collapse": (p_true == 1.0).float().mean().item()}


def primitive_root(p: int) -> int:
    """The smallest generator of the multiplicative group mod a prime p."""
    factors = {q for q in range(2, p) if (p - 1) % q == 0 and is_prime(q)}
    return next(g for g in range(2, p) if all(pow(g, (p - 1) // q, p) != 1 for q in factors))


def cyclic_coordinates(task: Task, p: int):
    """(rows, i, j, m, sign, residues) putting an op's pairs on a cyclic group Z_m so that the answer is
    i + sign * j, residues[t] being the residue at coordinate t:
    x_plus_y and x_minus_y directly (m = p); x_div_y through discrete logarithms to a primitive root
    (m = p - 1; a / b = g^(log a - log b)), leaving out the pairs with a = 0, which have no logarithm.
    None for ops that are not cyclic (permutation)."""
    if task.op in ("x_plus_y", "x_minus_y"):
        rows = torch.arange(len(task.y))
        return rows, task.a, task.b, p, 1 if task.op == "x_plus_y" else -1, torch.arange(p)
    if task.op == "x_div_y":
        g = primitive_root(p)
        powers = torch.tensor([pow(g, t, p) for t in range(p - 1)])  # g^t
        log = torch.zeros(p, dtype=torch.long)
        log[powers] = torch.arange(p - 1)
        rows = torch.nonzero(task.a != 0).flatten()
        return rows, log[task.a[rows]], log[task.b[rows]], p - 1, -1, powers
    return None


class FourierBasis:
    """The unit directions cos(w_k (i + sign j)) and sin(w_k (i + sign j)), w_k = 2 pi k / m, k = 1 .. m//2, over
    the m x m grid of a cyclic op: the "answer structure" of Nanda et al. 2023, in which logits
    cos(w_k (i + sign j - c)) = cos(w_k c) cos(w_k (i + sign j)) + sin(w_k c) sin(w_k (i + sign j)) lie."""

    def __init__(self, i: torch.Tensor, j: torch.Tensor, m: int, sign: int):
        self.m, self.grid = m, i * m + j  # (n,) position of each pair on the flattened grid
        assert torch.equal(torch.sort(self.grid).values, torch.arange(m * m)), "pairs must cover the grid once"
        freqs = torch.arange(1, m // 2 + 1, dtype=torch.float64)
        t = torch.arange(m, dtype=torch.float64)
        angle = 2 * math.pi * freqs[:, None, None] * (t[None, :, None] + sign * t[None, None, :]) / m
        basis = torch.stack([angle.cos(), angle.sin()], 1).reshape(len(freqs), 2, m * m)  # (K, 2, m^2)
        norms = basis.norm(dim=-1, keepdim=True)
        self.basis = torch.where(norms > 1e-9, basis / norms.clamp_min(1e-9), 0.0).float()  # sin at k = m/2 is 0
        self.freqs = freqs.long()


def fourier_progress(logits: torch.Tensor, y: torch.Tensor, is_train: torch.Tensor, fb: FourierBasis,
                     k: int) -> dict:
    """Nanda et al. 2023's progress measures from the logits (n, C) of every pair of a cyclic op (rows as in fb).

    key_freqs: the k frequencies whose directions hold the most of the logits' power;
    logit_key_frac: their share of the power of the logits centred over the grid;
    restricted_loss: loss on every pair of the logits reduced to the key frequencies' components plus each
      class's mean logit (the paper's bias correction);
    excluded_loss: loss on the training pairs of the logits with the key frequencies' components removed.
    """
    grid = torch.empty_like(logits)
    grid[fb.grid] = logits.float()  # (m^2, C), rows in grid order
    labels = torch.empty_like(y)
    labels[fb.grid] = y
    train = torch.zeros(len(grid), dtype=torch.bool, device=grid.device)
    train[fb.grid] = is_train
    basis = fb.basis.to(grid.device)
    coef = torch.einsum("fzg,gc->fzc", basis, grid)  # (K, 2, C) projections onto each direction
    power = coef.pow(2).sum((1, 2))  # (K,)
    total = (grid - grid.mean(0)).pow(2).sum()
    key = power.topk(min(k, len(power))).indices
    components = torch.einsum("fzg,fzc->gc", basis[key], coef[key])  # (m^2, C)
    restricted = components + grid.mean(0)
    excluded = grid - components
    return {"restricted_loss": F.cross_entropy(restricted, labels).item(),
            "excluded_loss": F.cross_entropy(excluded[train], labels[train]).item(),
            "logit_key_frac": (power[key].sum() / total).item() if total > 0 else 0.0,
            "key_freqs": fb.freqs[key.cpu()].tolist()}


class ProgressMeasures(Plugin):
    """Every progress measure on one time axis, into measures.jsonl: every measure_every updates from the
    memorisation step (train accuracy >= 0.99 at an evaluation) until measure_dense_after updates past the
    grokking step, every measure_sparse_every before and after that, and at 0 and the end.

    Rows: {"step", "train_acc", "val_acc", "key_freqs", "values": {layer: {split: {metric: value}}}} with layers
    first/last (representation_metrics at the answer position, all 9409 pairs), model (param_norm; logit_norm and
    softmax_collapse on the training pairs; restricted_loss, excluded_loss, logit_key_frac for cyclic ops) and
    embedding (fourier_topk_frac for cyclic ops, rqi for x_plus_y). The validation pairs' activations come from
    the evaluation's own forward pass (hooks), so a measurement costs one forward over the training pairs.
    """

    name = "measures"

    def on_train_begin(self, run):
        cfg, task = run.cfg, run.task
        self.layers = run.model.capture_modules  # layer -> module name
        self.is_train = torch.zeros(len(task.y), dtype=torch.bool)
        self.is_train[run.train_idx] = True
        self.samples = metric_samples(self.is_train, derived_seeds(run.seed)["split_seed"])
        cyclic = cyclic_coordinates(task, cfg.p)
        self.fourier = None
        if cyclic is not None:
            rows, i, j, m, sign, residues = cyclic
            self.fourier = (rows, FourierBasis(i, j, m, sign))
            self.embedding_rows = 2 + residues  # token ids in group order: x_div_y's embedding in log coordinates
        elif run.seed == 0:  # once per op, not once per seed
            print(f"experiment.py: measures plugin: restricted/excluded loss and the Fourier measures need a cyclic "
                  f"group; {run.op} is not one, so they are not measured (the other measures are)", file=sys.stderr)
        self.rows, self.grok_step, self.memorised, self.seconds = [], None, False, 0.0
        self.path = os.path.join(run.out_dir, "measures.jsonl")
        self.measure(run, 0)

    def due(self, cfg, step) -> bool:
        dense = self.memorised and (self.grok_step is None or step <= self.grok_step + cfg.measure_dense_after)
        return step == cfg.steps or step % (cfg.measure_every if dense else cfg.measure_sparse_every) == 0

    def on_eval(self, run, step, metrics):
        self.memorised = self.memorised or metrics["train_acc"] >= 0.99  # plot.py's memorisation step
        if self.due(run.cfg, step):
            self.measure(run, step)
        if self.grok_step is None and metrics["val_acc"] > 0.99:
            self.grok_step = step

    def measure(self, run, step):
        start = time.perf_counter()
        whole = run.all_outputs()  # name -> (n_pairs, .), rows = all pairs
        correct = whole["logits"].argmax(-1) == run.task.y
        train_acc = correct[self.is_train].float().mean().item()
        val_acc = correct[~self.is_train].float().mean().item()
        values = {}
        for layer, name in self.layers.items():
            for metric, split, value in representation_metrics(whole[name], run.task.y, self.is_train, self.samples):
                values.setdefault(layer, {}).setdefault(split, {})[metric] = value
        model_values = {"all": {"param_norm": param_norm(run.model)},
                        "train": logit_stats(whole["logits"][self.is_train], run.task.y[self.is_train])}
        row = {"step": step, "train_acc": train_acc, "val_acc": val_acc}
        if self.fourier is not None:
            rows, basis = self.fourier
            nanda = fourier_progress(whole["logits"][rows], run.task.y[rows], self.is_train[rows], basis,
                                     run.cfg.fourier_topk)
            row["key_freqs"] = nanda.pop("key_freqs")
            model_values["train"]["excluded_loss"] = nanda.pop("excluded_loss")
            model_values["all"].update(nanda)
            with torch.no_grad():
                embedding = run.model.token_embedding_matrix()[self.embedding_rows].detach().float().cpu()
            spectrum = fourier_spectrum(embedding)
            values["embedding"] = {"all": {"fourier_topk_frac": fourier_sparsity(spectrum, run.cfg.fourier_topk)[0]}}
            if run.op == "x_plus_y":
                values["embedding"]["all"]["rqi"] = representation_quality(embedding, run.cfg.rqi_tol)
        values["model"] = model_values
        row["values"] = values
        self.rows.append(row)
        if step % run.cfg.capture_every == 0 or step == run.cfg.steps:  # as log.jsonl: readable while it trains
            write_jsonl(self.path, self.rows)
        self.seconds += time.perf_counter() - start
        run.timings[self.name] = self.seconds


BUILTIN_PLUGINS = {plugin.name: plugin for plugin in (
    ActivationCapture, ProgressMeasures, Grokfast, Norms, FourierEmbedding, RepresentationQuality,
    XavierInit, LayerLearningRates, SwapOperands, StepValAcc95)}


def load_plugin_file(path: str) -> list:
    """The Plugin subclasses defined in a user's .py file."""
    if not os.path.isfile(path):
        raise UsageError(f"plugin file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"user_plugin_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"plugin file {path} failed to load: {type(e).__name__}: {e}")
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, Plugin) and obj is not Plugin
             and obj.__module__ == module.__name__]
    if not found:
        raise UsageError(f"plugin file {path} defines no subclass of experiment.Plugin")
    return found


def plugin_classes(cfg: Config) -> list:
    """The plugin classes of a run: DEFAULT_PLUGINS (less capture or measures if switched off), then cfg.plugins."""
    switched_off = {"capture": not cfg.capture, "measures": not cfg.measure}
    specs = [s for s in DEFAULT_PLUGINS if not switched_off.get(s)] + list(cfg.plugins)
    classes = []
    for spec in specs:
        if spec.endswith(".py"):
            classes += load_plugin_file(spec)
        elif spec in BUILTIN_PLUGINS:
            classes.append(BUILTIN_PLUGINS[spec])
        else:
            raise UsageError(f"unknown plugin {spec!r}: give a builtin ({','.join(BUILTIN_PLUGINS)}) or a .py file")
    return list(dict.fromkeys(classes))


class Run:
    """What plugins see of one (op, seed) training run."""

    def __init__(self, cfg, op, seed, out_dir, task, train_idx, val_idx, model, optimizer, device):
        self.cfg, self.op, self.seed, self.out_dir = cfg, op, seed, out_dir
        self.task, self.train_idx, self.val_idx = task, train_idx, val_idx
        self.model, self.optimizer, self.device = model, optimizer, device
        self.step = 0
        self.history = []  # one dict per evaluation, as in log.jsonl
        self.autocast = nullcontext  # context manager of the run's dtype, for plugins that run the model
        self.eval_outputs, self.eval_step = {}, None  # the last evaluation's outputs (see evaluate) and its step
        self.timings = {}  # seconds spent per plugin, saved in run.json
        self._outputs = (None, None)  # (step, all_outputs at that step)

    def all_outputs(self) -> dict:
        """{"logits": (n_pairs, n_classes), capture module name: (n_pairs, d_model)} on the CPU, float32, rows in
        the task's order, at the current step, in eval mode. Computed once per step and shared by the plugins
        that ask; at an evaluation step the validation rows come from the evaluation's own forward pass."""
        if self._outputs[0] == self.step:
            return self._outputs[1]
        names = tuple(self.model.capture_modules.values())
        task = self.task
        if self.eval_step != self.step:  # step 0, or a step between evaluations
            _, _, self.eval_outputs = evaluate(self.model, task.x[self.val_idx].to(self.device),
                                               task.y[self.val_idx].to(self.device), self.autocast, names)
            self.eval_step = self.step
        _, _, train = evaluate(self.model, task.x[self.train_idx].to(self.device),
                               task.y[self.train_idx].to(self.device), self.autocast, names)
        merged = {}
        for name in ("logits", *names):
            part_train, part_val = train[name].cpu(), self.eval_outputs[name].cpu()
            full = torch.empty(len(task.y), part_train.shape[1])
            full[self.train_idx], full[self.val_idx] = part_train, part_val
            merged[name] = full
        self._outputs = (self.step, merged)
        return merged


class PluginHooks:
    """Calls each hook only on the plugins that override it; wraps failures in PluginError.

    A hook returns the list of its plugins' return values; transform_batch instead passes each plugin's
    batch on to the next and returns the last (x, y).
    """

    HOOKS = ("init_model", "param_groups", "on_train_begin", "transform_batch", "on_after_backward", "on_step_end",
             "on_eval", "on_train_end")

    def __init__(self, plugins: list):
        for hook in self.HOOKS:
            users = [p for p in plugins if getattr(type(p), hook) is not getattr(Plugin, hook)]
            setattr(self, hook, self._caller(hook, users) if users else None)

    @staticmethod
    def _caller(hook, users):
        def call(run, *args):
            results = []
            for plugin in users:
                try:
                    out = getattr(plugin, hook)(run, *args)
                    if hook == "transform_batch":
                        if not (isinstance(out, tuple) and len(out) == 2 and len(out[0]) == len(out[1])):
                            raise TypeError("transform_batch must return a tuple (x, y) of equal length")
                        args = (args[0], *out)  # the next plugin transforms this one's batch
                except Exception as e:
                    raise PluginError(f"plugin {plugin.name!r} ({type(plugin).__name__}) failed in {hook} "
                                      f"at step {run.step} of {run.op} seed {run.seed}: {type(e).__name__}: {e} "
                                      f"({_where(e)})") from e
                results.append(out)
            return args[1:] if hook == "transform_batch" else results

        return call


def _where(error: BaseException) -> str:
    """'file.py, line N, in function' of the innermost frame of an exception's traceback."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "no traceback"
    frame = frames[-1]
    return f"{frame.filename}, line {frame.lineno}, in {frame.name}"


# ----------------------------------------------------------------------------- train / eval
@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast, keep=()) -> tuple[float, float, dict]:
    """(loss, accuracy, outputs) over all of x in one pass.

    outputs: "logits" (n, n_classes) float32 and, for each module name in keep, its output at the last
    position (n, d_model) float32, taken by forward hooks that change no number.
    """
    outputs = {}

    def hold(name, module, inputs, output):
        outputs[name] = (output[0] if isinstance(output, tuple) else output)[:, -1].float()

    model.eval()
    try:
        with forward_hooks(model, {name: hold for name in keep}), autocast():
            logits = model(x).float()
    finally:
        model.train()
    loss = F.cross_entropy(logits, y)
    acc = (logits.argmax(-1) == y).float().mean()
    return loss.item(), acc.item(), {"logits": logits, **outputs}


def pair_dir(cfg: Config, op: str, seed: int) -> str:
    return os.path.join(cfg.out_dir, f"{op}_{seed}")


def final_info_path(cfg: Config, op: str, seed: int) -> str:
    return os.path.join(cfg.out_dir, f"final_info_{op}_{seed}.json")


def train_one(cfg: Config, op: str, seed: int, report=None) -> dict:
    """Train one (op, seed) pair; write its folder, then final_info_{op}_{seed}.json. Returns the record."""
    device = device_of(cfg)
    seeds = derived_seeds(seed)
    out_dir = pair_dir(cfg, op, seed)
    if os.path.exists(out_dir):  # an unfinished earlier attempt: start over
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    task = make_task(op, cfg.p, cfg.perm_k)
    train_idx, val_idx = split_pairs(len(task.y), cfg.train_frac, seeds["split_seed"])
    write_examples(os.path.join(out_dir, "examples.parquet"), task, train_idx)
    x_train, y_train = task.x[train_idx].to(device), task.y[train_idx].to(device)
    x_val, y_val = task.x[val_idx].to(device), task.y[val_idx].to(device)

    if cfg.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    torch.manual_seed(seeds["init_seed"])
    model = build_model(cfg, task).to(device)
    run = Run(cfg, op, seed, out_dir, task, train_idx, val_idx, model, None, device)
    run.autocast = autocast
    hooks = PluginHooks([cls() for cls in plugin_classes(cfg)])
    if hooks.init_model:
        hooks.init_model(run)
    groups = [g for g in hooks.param_groups(run) if g is not None] if hooks.param_groups else []
    if len(groups) > 1:
        raise PluginError(f"{len(groups)} plugins return parameter groups for {op} seed {seed}; at most one may")
    run.optimizer = optimizer = torch.optim.AdamW(
        groups[0] if groups else model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay, fused=True)
    # The template's schedule: update s (1-based) uses lr * min((s - 1) / warmup, 1).
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(s / warmup, 1.0) if warmup else 1.0)
    batch_gen = torch.Generator(device=device).manual_seed(seeds["batch_seed"])
    log_path = os.path.join(out_dir, "log.jsonl")
    if hooks.on_train_begin:
        hooks.on_train_begin(run)

    # Kept at every evaluation, for plugins (all_outputs); a custom model without capture_modules keeps none.
    capture_names = tuple(getattr(model, "capture_modules", {}).values())
    n_train = len(y_train)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    step_val_acc_99 = None
    start = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        if _STOP.is_set():  # a stop signal arrived in a child: unwind here, at a known point
            raise SystemExit(128 + signal.SIGTERM)
        run.step = step
        lr_used = scheduler.get_last_lr()[0]
        batch = torch.randint(n_train, (cfg.batch_size,), device=device, generator=batch_gen)
        xb, yb = x_train[batch], y_train[batch]
        if hooks.transform_batch:  # training batches only: x_val never passes through a plugin
            xb, yb = hooks.transform_batch(run, step, xb, yb)
        with autocast():
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hooks.on_after_backward:
            hooks.on_after_backward(run, step)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(-1) == yb).sum()
        seen += 1
        if hooks.on_step_end:
            hooks.on_step_end(run, step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss, val_acc, run.eval_outputs = evaluate(model, x_val, y_val, autocast, capture_names)
            run.eval_step = step
            metrics = {"step": step, "train_loss": loss_sum.item() / seen,
                       "train_acc": correct.item() / (seen * cfg.batch_size),
                       "val_loss": val_loss, "val_acc": val_acc, "lr": lr_used}
            loss_sum.zero_(), correct.zero_()
            seen = 0
            if step_val_acc_99 is None and val_acc > 0.99:
                step_val_acc_99 = step
            if hooks.on_eval:
                hooks.on_eval(run, step, metrics)
            run.history.append(metrics)
            if report:
                report(op, seed, step, metrics)
            if step % cfg.capture_every == 0:  # keep the log of a long run readable while it trains
                write_jsonl(log_path, run.history)
    last = run.history[-1]
    final_info = {
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "final_train_acc": last["train_acc"],
        "final_val_acc": last["val_acc"],
        # The template's convention: never reached -> the step budget; `grokked` says which.
        "step_val_acc_99": step_val_acc_99 if step_val_acc_99 is not None else cfg.steps,
        "grokked": step_val_acc_99 is not None,
    }
    if hooks.on_train_end:
        hooks.on_train_end(run, final_info)
    write_jsonl(log_path, run.history)
    save_model(model, os.path.join(out_dir, "model.safetensors"))
    record = {"op": op, "seed": seed, **seeds, "final_info": final_info,
              "train_seconds": time.perf_counter() - start, "plugin_seconds": run.timings, "device": str(device),
              "threads": torch.get_num_threads(), "log": run.history}
    write_json(os.path.join(out_dir, "run.json"), {k: v for k, v in record.items() if k != "log"})
    write_json(final_info_path(cfg, op, seed), final_info)  # written last: marks the pair finished
    return record


# ----------------------------------------------------------------------------- results
TEMPLATE_KEYS = ("final_train_loss", "final_val_loss", "final_train_acc", "final_val_acc", "step_val_acc_99")


def _number(value):
    """value as a float when it is a finite number (bools count as 0/1), else None."""
    if isinstance(value, (bool, int, float)) and not isinstance(value, complex) and math.isfinite(float(value)):
        return float(value)
    return None


def summarize(final_infos: list) -> dict:
    """The template's per-op block: means, stderrs (ddof=1 std / sqrt(n)) and per-seed lists.

    Keys that plugins add to final_info are averaged too, over the seeds where they are a finite number: a None
    or NaN in some seeds gives the mean of the others and `{key}_n`, the count, in means; a key that is never a
    number (a string, a list) is only kept per seed.
    """
    extra = [k for k in dict.fromkeys(k for info in final_infos for k in info) if k not in TEMPLATE_KEYS
             and k != "grokked"]
    per_seed = {k: [None if isinstance(v, float) and not math.isfinite(v) else v  # JSON has no NaN
                    for v in (info.get(k) for info in final_infos)] for k in (*TEMPLATE_KEYS, *extra)}
    means, stderrs = {}, {}
    for key, values in per_seed.items():
        numbers = [v for v in map(_number, values) if v is not None]
        if key in extra and not numbers and any(v is not None for v in values):
            continue  # not numeric: per seed only
        n = len(numbers)
        means[f"{key}_mean"] = float(np.mean(numbers)) if n else None
        stderrs[f"{key}_stderr"] = float(np.std(numbers, ddof=1) / math.sqrt(n)) if n > 1 else (0.0 if n else None)
        if key in extra:
            means[f"{key}_n"] = n
    per_seed["grokked"] = [bool(info.get("grokked")) for info in final_infos]
    return {"means": means, "stderrs": stderrs, "final_info_dict": per_seed}


# =============================================================================
# MACHINERY: nothing below needs editing for an experiment. Input validation and flags, safe files, the
# out_dir lock, resuming, worker processes and signals.
# =============================================================================


RUNTIME_FIELDS = ("out_dir", "workers", "overwrite", "progress")


class UsageError(Exception):
    """Bad input from the user: one line on stderr, exit code 2."""


class PluginError(Exception):
    """A plugin raised; the message names the plugin, the hook and the step."""


class WorkerError(Exception):
    """A training process failed or died; the message names the (op, seed)."""


def validate(cfg: Config) -> None:
    """Raise UsageError naming the first problem in cfg. Creates nothing."""
    bad = [op for op in cfg.ops if op not in OPS]
    if bad or not cfg.ops:
        raise UsageError(f"unknown op {','.join(bad) or '(none)'}: choose from {','.join(OPS)}")
    if len(set(cfg.ops)) != len(cfg.ops):
        raise UsageError(f"--ops lists an op twice: {','.join(cfg.ops)}")
    if cfg.p < 3:
        raise UsageError(f"--p={cfg.p}: the modulus must be at least 3")
    if "x_div_y" in cfg.ops and not is_prime(cfg.p):
        raise UsageError(f"--p={cfg.p} is not prime; x_div_y needs a prime modulus (e.g. 97)")
    if not 0 < cfg.train_frac < 1:
        raise UsageError(f"--train_frac={cfg.train_frac} must lie strictly between 0 and 1")
    for name in ("steps", "seeds", "batch_size", "eval_every", "num_layers", "d_model", "n_heads", "capture_every",
                 "measure_every", "measure_sparse_every"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name}={getattr(cfg, name)} must be at least 1")
    if not 2 <= cfg.perm_k <= 6:
        raise UsageError(f"--perm_k={cfg.perm_k} must be between 2 and 6")
    if cfg.d_model % cfg.n_heads:
        raise UsageError(f"--d_model={cfg.d_model} must be divisible by --n_heads={cfg.n_heads}")
    for name in ("lr", "weight_decay", "warmup_steps", "workers", "threads", "rqi_tol"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name}={getattr(cfg, name)} must not be negative")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and 0 <= cfg.grokfast_alpha < 1):
        raise UsageError("--beta1, --beta2 and --grokfast_alpha must lie in [0, 1)")
    if cfg.model not in MODELS:
        raise UsageError(f"--model={cfg.model}: choose from {','.join(MODELS)}")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype={cfg.dtype}: choose from {','.join(DTYPES)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device={cfg.device}: choose from auto, cpu, cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA device is available")
    if cfg.capture_dtype not in ("float16", "float32"):
        raise UsageError(f"--capture_dtype={cfg.capture_dtype}: choose float16 or float32")
    if any(not 0 < t < 1 for t in cfg.capture_thresholds):
        raise UsageError("--capture_thresholds must lie strictly between 0 and 1")
    if cfg.progress not in ("auto", "bar", "lines", "none"):
        raise UsageError(f"--progress={cfg.progress}: choose from auto, bar, lines, none")
    for name in ("measure_every", "measure_sparse_every"):
        if getattr(cfg, name) % cfg.eval_every:
            raise UsageError(f"--{name}={getattr(cfg, name)} must be a multiple of --eval_every={cfg.eval_every} "
                             "(measurements reuse the evaluation's forward pass)")
    if cfg.measure_dense_after < 0:
        raise UsageError(f"--measure_dense_after={cfg.measure_dense_after} must not be negative")
    if cfg.fourier_topk < 1:
        raise UsageError(f"--fourier_topk={cfg.fourier_topk} must be at least 1")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UsageError(f"--out_dir={cfg.out_dir} is an existing file, not a folder")
    existing = os.path.abspath(cfg.out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir={cfg.out_dir} cannot be written ({existing} is not a writable folder)")
    plugin_classes(cfg)  # raises UsageError for an unknown plugin or a broken plugin file


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(annotation):
    """argparse type for a Config annotation: int, float, str, bool or tuple[X, ...]."""
    if annotation is bool:
        return _parse_bool
    if typing.get_origin(annotation) is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}

        def parse_list(text):
            return tuple(item(part) for part in text.split(",") if part.strip())

        parse_list.__name__ = f"comma-separated {item.__name__} list"
        return parse_list
    return annotation


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None) -> Config:
    """Every Config field is a flag (--field=value or --field value). Exits 2 on bad input."""
    comments = _field_comments()
    parser = _OneLineParser(
        prog="experiment.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        is_bool = hints[f.name] is bool
        parser.add_argument(f"--{f.name}", type=_flag_type(hints[f.name]), default=default,
                            nargs="?" if is_bool else None, const=True if is_bool else None,
                            metavar=hints[f.name].__name__.upper() if isinstance(hints[f.name], type) else "LIST",
                            help=f"{comments.get(f.name, '')} (default: {shown})".replace("%", "%%"))
    try:
        cfg = Config(**vars(parser.parse_args(argv)))
        validate(cfg)
    except UsageError as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return cfg


def _field_comments() -> dict:
    """The trailing '# ...' comment of each Config field, for --help."""
    import inspect

    comments = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def resolved_workers(cfg: Config, n_jobs: int) -> tuple[int, int]:
    """(processes, torch threads per process) for n_jobs independent (op, seed) pairs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Small models use a core badly from several threads: one single-threaded process per
    # core trains about 1.3x more steps per second than one process on all cores. The thread
    # count also changes float rounding, so it is fixed (1) unless set: then the numbers do not
    # depend on --workers or on the machine's core count.
    threads = cfg.threads or 1
    workers = cfg.workers or (1 if device_of(cfg).type == "cuda" else max(1, cores // threads))
    return max(1, min(workers, n_jobs)), threads


# ----------------------------------------------------------------------------- files
def _file_mode() -> int:
    """What open() gives a new file under the current umask (some writers, safetensors', make 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename over path: a crash never leaves a half file."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def write_jsonl(path: str, rows: list) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    atomic_write(path, write)


def write_examples(path: str, task: Task, train_idx: torch.Tensor) -> None:
    """The example table: one row per pair, rows aligned with every snapshot."""
    import datasets

    datasets.disable_progress_bars()
    split = np.full(len(task.y), "val", dtype=object)
    split[train_idx.numpy()] = "train"
    table = datasets.Dataset.from_dict({
        "pair": np.arange(len(task.y)),
        "a": task.a.numpy(),
        "b": task.b.numpy(),
        "label": task.y.numpy(),
        "split": split.tolist(),
    })
    atomic_write(path, lambda tmp: table.to_parquet(tmp))


def save_model(model: nn.Module, path: str) -> None:
    """The model's weights as safetensors (shared tensors handled by safetensors' save_model)."""
    from safetensors.torch import save_model as save

    atomic_write(path, lambda tmp: save(model, tmp))


def load_model(run_dir: str, op: str, seed: int, device: str = "cpu") -> nn.Module:
    """The final model of (op, seed) in run_dir, rebuilt offline from the run's config.json and the pair's
    model.safetensors, in eval mode. No pickle, no download. The data: make_task(op, cfg.p, cfg.perm_k)."""
    from safetensors.torch import load_model as load

    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    hints = typing.get_type_hints(Config)
    known = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in saved.items() if k in hints}
    cfg = Config(**known)
    model = build_model(cfg, make_task(op, cfg.p, cfg.perm_k))
    load(model, os.path.join(run_dir, f"{op}_{seed}", "model.safetensors"), device=device)
    return model.to(device).eval()


def remove_partials(folder: str) -> None:
    """Delete temporary files left by a killed run (never a finished file)."""
    for root, _, files in os.walk(folder):
        for name in files:
            if ".partial-" in name:
                os.remove(os.path.join(root, name))


def config_dict(cfg: Config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def prepare_out_dir(cfg: Config) -> list:
    """Check a saved config, clean up a killed run, and return the (op, seed) pairs still to train."""
    saved_path = os.path.join(cfg.out_dir, "config.json")
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
        now = config_dict(cfg)
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in RUNTIME_FIELDS and saved.get(k) != now.get(k))
        if changed and not cfg.overwrite:
            raise UsageError(f"{cfg.out_dir} holds results of another config (differs in {', '.join(changed)}); "
                             "pass --overwrite to discard them or choose another --out_dir")
        if changed:
            for name in os.listdir(cfg.out_dir):
                path = os.path.join(cfg.out_dir, name)
                if name.startswith("final_info") or name.startswith("all_results") or name == "config.json":
                    os.remove(path)
                elif os.path.isdir(path) and any(name.startswith(f"{op}_") for op in OPS):
                    shutil.rmtree(path)
    os.makedirs(cfg.out_dir, exist_ok=True)
    remove_partials(cfg.out_dir)
    write_json(saved_path, config_dict(cfg))
    return [(op, seed) for op in cfg.ops for seed in range(cfg.seeds)
            if not os.path.exists(final_info_path(cfg, op, seed))]


class Progress:
    """A tqdm bar on a terminal; otherwise a plain line per pair and about every 1000 steps."""

    def __init__(self, cfg: Config, total_steps: int):
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.cfg = mode, cfg
        self.bar, self.done = None, {}
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def __call__(self, op, seed, step, metrics):
        if self.bar is not None:
            done = self.done.get((op, seed), 0)
            self.bar.update(step - done)
            self.done[(op, seed)] = step
            self.bar.set_postfix_str(f"{op} seed {seed} val_acc {metrics['val_acc']:.3f}", refresh=False)
        elif self.mode == "lines" and (step % 1000 == 0 or step == self.cfg.steps):
            self.line(f"{op} seed {seed}: step {step}/{self.cfg.steps} train_acc {metrics['train_acc']:.3f} "
                      f"val_acc {metrics['val_acc']:.3f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


_STOP = threading.Event()  # set by SIGTERM while training; the training loop checks it every step


def _stop_at_next_step(signum, frame):
    """SIGTERM while training: raising here could land in any finalizer (an 'Exception ignored' traceback), so
    only ask the training loop to stop; a process already past its loop finishes its pair first."""
    _STOP.set()


def _exit_quietly(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # once is enough: a second signal would interrupt the clean-up
    raise SystemExit(128 + signum)


def _train_in_worker(cfg: Config, op: str, seed: int, threads: int, conn) -> None:
    """train_one in a child process: progress, then the record or the error, go back through `conn`.

    The child ignores Ctrl-C: the parent stops it with SIGTERM, on which the training loop unwinds at its
    next step, so one line is printed, not a traceback per process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_at_next_step)  # the parent's stop; the training loop unwinds, cleaning up
    try:  # Linux: if the parent dies (kill -9), get SIGTERM rather than train on as an orphan
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    # tqdm (which datasets uses, bars off or on) makes a multiprocessing lock, a named semaphore that a child
    # killed before its exit-time clean-up leaks, and the resource tracker then warns on stderr. A child
    # draws no bar, so a thread lock does.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    try:
        record = train_one(cfg, op, seed, report=lambda *args: conn.send(("progress", args)))
        conn.send(("done", {k: v for k, v in record.items() if k != "log"}))
    except PluginError as e:
        conn.send(("plugin_error", str(e)))
    except Exception as e:
        import traceback

        conn.send(("error", f"{op} seed {seed} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _reap(child, timeout: float = 60) -> None:
    """Wait for a child to exit; one that is past its training loop no longer acts on SIGTERM, so kill it
    if its clean-up hangs."""
    child.join(timeout=timeout)
    if child.is_alive():
        child.kill()
        child.join()


def _finished(progress, record) -> None:
    progress.line(f"{record['op']} seed {record['seed']}: done in {record['train_seconds']:.0f}s, "
                  f"final val_acc {record['final_info']['final_val_acc']:.3f}")


def train_pairs(cfg: Config, todo: list, workers: int, threads: int, progress) -> None:
    """Train the (op, seed) pairs in todo, in this process or in up to `workers` child processes."""
    if workers == 1:
        torch.set_num_threads(threads)
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stop_at_next_step) if in_main_thread else None
        try:  # SIGTERM stops the training loop at its next step, as in a child
            for op, seed in todo:
                progress.line(f"{op} seed {seed}: start")
                _finished(progress, train_one(cfg, op, seed, report=progress))
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
        return
    ctx = get_context("spawn")
    # Started now, not inside the first child.start() below: starting it unblocks SIGINT, which the children
    # must inherit blocked.
    resource_tracker.ensure_running()
    waiting, running, unfinished = list(todo), {}, len(todo)  # running: pipe -> child process
    reported = set()  # pipes whose child has sent its results
    try:
        while unfinished or running:  # a child that has reported still has to exit: wait, never kill it then
            while waiting and len(running) < workers:
                op, seed = waiting.pop(0)
                receiver, sender = ctx.Pipe(duplex=False)  # a pipe per child: no locks for Ctrl-C to break
                child = ctx.Process(target=_train_in_worker, args=(cfg, op, seed, threads, sender), daemon=True)
                # The child inherits a blocked SIGINT: a Ctrl-C while it is still starting up (importing torch,
                # before _train_in_worker runs) would otherwise print its own KeyboardInterrupt traceback.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    child.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                sender.close()
                running[receiver] = child
                child.name = f"{op} seed {seed}"
            for receiver in wait_for_connections(list(running), timeout=1.0):
                try:
                    kind, payload = receiver.recv()
                except EOFError:  # the child is exiting
                    child = running.pop(receiver)
                    if receiver in reported:  # its results are written: let it clean up, but not hang the run
                        _reap(child)
                        continue
                    child.join()
                    raise WorkerError(f"the process training {child.name} ended without reporting its results "
                                      f"(exit code {child.exitcode})")
                if kind == "progress":
                    progress(*payload)
                elif kind == "done":
                    _finished(progress, payload)
                    reported.add(receiver)
                    unfinished -= 1
                elif kind == "plugin_error":
                    raise PluginError(payload)
                else:
                    raise WorkerError(payload)
    finally:
        for child in running.values():  # Ctrl-C or an error: stop the pairs in flight (they restart on resume)
            child.terminate()  # stops at its next step; a child past its loop finishes and exits
        for child in running.values():
            _reap(child)


def lock_out_dir(out_dir: str):
    """One writer per out_dir: an exclusive flock on out_dir/.lock, held by the returned open file. The kernel
    releases it when the process ends, kill -9 included, so a dead run never leaves the folder locked."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    handle = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(f"{out_dir} is being written by another experiment.py (pid {holder}); wait for it to "
                         "finish or choose another --out_dir")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def main(cfg: Config) -> dict:
    lock = lock_out_dir(cfg.out_dir)
    try:
        return _main_locked(cfg)
    finally:
        lock.close()


def _main_locked(cfg: Config) -> dict:
    todo = prepare_out_dir(cfg)
    pairs = [(op, seed) for op in cfg.ops for seed in range(cfg.seeds)]
    workers, threads = resolved_workers(cfg, max(1, len(todo)))
    progress = Progress(cfg, cfg.steps * len(todo))
    for op, seed in pairs:
        if (op, seed) not in todo:
            progress.line(f"{op} seed {seed}: already finished in {cfg.out_dir}, skipped")
    progress.line(f"training {len(todo)} (op, seed) pairs on {device_of(cfg)} with {workers} worker(s) "
                  f"x {threads} thread(s) into {cfg.out_dir}")
    start = time.perf_counter()
    try:
        train_pairs(cfg, todo, workers, threads, progress)
    finally:
        progress.close()

    results, all_results = {}, {}
    for op in cfg.ops:
        infos = []
        for seed in range(cfg.seeds):
            with open(final_info_path(cfg, op, seed)) as f:
                info = json.load(f)
            with open(os.path.join(pair_dir(cfg, op, seed), "log.jsonl")) as f:
                log = [json.loads(line) for line in f]
            infos.append(info)
            all_results[f"{op}_{seed}_final_info"] = info
            all_results[f"{op}_{seed}_train_info"] = [
                {"step": r["step"], "train_loss": r["train_loss"], "train_accuracy": r["train_acc"]} for r in log]
            all_results[f"{op}_{seed}_val_info"] = [
                {"step": r["step"], "val_loss": r["val_loss"], "val_accuracy": r["val_acc"]} for r in log]
        results[op] = summarize(infos)
    write_json(os.path.join(cfg.out_dir, "all_results.json"), all_results)
    # The template's pickle, for its old plotting scripts; this project never reads it.
    def write_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.array(all_results, dtype=object), allow_pickle=True)

    atomic_write(os.path.join(cfg.out_dir, "all_results.npy"), write_npy)
    write_json(os.path.join(cfg.out_dir, "final_info.json"), results)
    progress.line(f"finished in {time.perf_counter() - start:.0f}s: {os.path.join(cfg.out_dir, 'final_info.json')}")
    return results


if __name__ == "__main__":
    config = parse_args()
    signal.signal(signal.SIGTERM, _exit_quietly)  # a harness's timeout: stop the children, keep finished pairs
    try:
        main(config)
    except UsageError as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except (PluginError, WorkerError) as e:
        print(f"experiment.py: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print(f"experiment.py: interrupted; finished (op, seed) pairs are kept in {config.out_dir}, "
              "run the same command again to resume", file=sys.stderr)
        raise SystemExit(130)
    except SystemExit as e:
        if e.code == 128 + signal.SIGTERM:
            print(f"experiment.py: terminated; finished (op, seed) pairs are kept in {config.out_dir}, "
                  "run the same command again to resume", file=sys.stderr)
        raise
