"""Train small transformers on algorithmic data and watch them grok.

Usage:
    python experiment.py --out_dir=run_0                      # the full default experiment
    python experiment.py --out_dir=run_t --ops=x_plus_y --seeds=1 --steps=300 --capture_every=100
    python experiment.py --help                               # every flag, with its meaning

Writes run_dir/final_info.json in the schema of the AI-Scientist grokking
template, plus per-(op, seed) logs, example tables and activation snapshots
(see docs/experiment.md, "Outputs"). Running the same command again resumes.

This file holds what an experiment changes: Config, the plugin list, the ops, the models, the loss, optimizer,
schedule and batch sampler (each a registry: a new one is one entry), the example plugins, the training step
and the evaluation. The machinery that must never break (flags, validation, files, resume, workers, the
research plugins and the metrics) is in the package lab/ beside this file.
"""

import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

if __name__ in ("__main__", "__mp_main__"):  # plugin files `import experiment`: give them this very module
    sys.modules.setdefault("experiment", sys.modules[__name__])

from lab import loop, runner  # noqa: E402
from lab.job import device_of, write_examples  # noqa: E402
from lab.ops import Op, Task, additive, build_task, compose, inverses, modular, multiplicative  # noqa: E402
from lab.ops import POWER_OPS, permutation_group  # noqa: E402
from lab.presets import REFERENCE_SETUPS  # noqa: E402
from lab.plugins import (RESEARCH_PLUGINS, HookPoint, Plugin, PluginError, PluginHooks, Run, UsageError,  # noqa: E402
                         check_model, forward_hooks, load_plugin_file)
from lab.schema import EXAMPLES, Job, job_dir  # noqa: E402
from lab.rules import EarlyWarning  # noqa: E402
from lab.trackers import TRACKER_PLUGINS, tracker_names  # noqa: E402

# The plugins every run gets, in order: names in PLUGINS (capture, measures, norms, fourier, rqi: lab/plugins.py;
# grokfast, xavier_init, layer_lr, swap_operands, step_val_acc_95: below) or paths to .py files. capture saves
# activation snapshots, measures the dense progress measures. To try an intervention without flags, add it
# here, e.g. DEFAULT_PLUGINS = ["capture", "measures", "xavier_init"].
DEFAULT_PLUGINS = ["capture", "measures"]


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    """One experiment. The defaults are the AI-Scientist grokking template's."""

    out_dir: str = "run_0"  # where every result goes; rerunning on it resumes
    preset: str = "ais2024"  # a reference setup (PRESETS): its values replace these defaults; flags replace both
    ops: tuple[str, ...] = ("x_div_y", "x_minus_y", "x_plus_y", "permutation")  # comma-separated names of OPS
    seeds: int = 3  # seeds per op: 0 .. seeds-1
    sweep: str = ""  # a grid of runs, e.g. "train_frac=0.3,0.5 weight_decay=0.1,1": each cell a run folder in out_dir
    p: int = 97  # modulus of the modular ops (prime when x_div_y is run)
    perm_k: int = 5  # permutation op: the group S_k
    train_frac: float = 0.5  # share of all pairs used for training
    steps: int = 7500  # optimizer updates
    batch_size: int = 512  # training pairs per update (sampler random); 0: min(512, half the training pairs)
    sampler: str = "random"  # batch sampler (SAMPLERS): random (with replacement, the template's) or full
    loss: str = "cross_entropy"  # loss (LOSSES): cross_entropy or stablemax; training, evaluation and measures use it
    optimizer: str = "adamw"  # optimizer (OPTIMIZERS): adamw, adam (L2 weight decay) or perp_adamw (⊥Grad + AdamW)
    schedule: str = "warmup"  # learning-rate schedule (SCHEDULES): warmup (linear, then constant) or constant
    lr: float = 1e-3  # AdamW peak learning rate
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    weight_decay: float = 0.5  # AdamW decoupled weight decay
    warmup_steps: int = 50  # linear warm-up from 0, then constant
    eval_every: int = 10  # updates between evaluations on the whole validation set
    stop_at_val_acc: float = 1.0  # stop at the first evaluation with val accuracy above this (1: never)
    checkpoint_every: int = 0  # also save the model every this many updates (checkpoints/); 0: the final one only
    model: str = "transformer"  # model (MODELS): transformer (the template's) or gpt2 (transformers' GPT2Model)
    num_layers: int = 2  # decoder blocks
    d_model: int = 128  # residual width
    n_heads: int = 4  # attention heads
    d_mlp: int = 0  # FFN width; 0: 4 * d_model (the template's)
    norm: str = "post"  # transformer's LayerNorm: post (the template's), pre (with a final LayerNorm) or none
    activation: str = "gelu"  # transformer's FFN nonlinearity: gelu or relu
    op_token: bool = True  # input [a, "o", b, "="]; false: [a, b, "="] over the elements + "=" (Nanda et al.'s)
    init: str = "torch"  # initialisation (INITS): torch (PyTorch's defaults, the template's) or nanda (N(0, 1/d_model))
    init_scale: float = 1.0  # every parameter times this after initialisation (Omnigrok's alpha)
    dtype: str = "fp32"  # fp32; bf16 (autocast for the matrix multiplies); fp64 (weights, activations and loss)
    device: str = "auto"  # auto (cuda when present), cpu or cuda
    plugins: tuple[str, ...] = ()  # extra plugins: builtin names or paths to .py files
    tracker: str = "none"  # also log each job to tensorboard, wandb (offline), or both: "tensorboard,wandb"
    capture: bool = True  # run the activation-capture plugin
    capture_every: int = 1000  # capture a snapshot every this many updates (and at 0 and the end)
    capture_thresholds: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99)  # also capture when val acc first exceeds these
    capture_dtype: str = "float16"  # float16 or float32
    measure: bool = True  # run the dense progress-measures plugin (measures.jsonl)
    measure_every: int = 100  # measures plugin: updates between measurements from memorisation to dense_after past grokking
    measure_sparse_every: int = 500  # ... and between measurements after that
    measure_dense_after: int = 1000  # updates after the grokking step that are still measured densely
    grokfast_alpha: float = 0.98  # grokfast plugin: EMA decay of the gradient
    grokfast_lamb: float = 2.0  # grokfast plugin: weight of the filtered gradient added to the gradient
    grokfast_filter: str = "ema"  # grokfast plugin: ema (decay grokfast_alpha) or ma (mean of a window)
    grokfast_window: int = 100  # grokfast plugin, filter ma: gradients averaged (added once the window is full)
    fourier_topk: int = 5  # fourier plugin: how many key frequencies
    rqi_tol: float = 0.1  # rqi plugin: a parallelogram closes when its unit phases differ by less
    warning_rules: str = ""  # earlywarning plugin: a frozen rules file; empty: lab/earlywarning_rules.json
    batched: str = "auto"  # train same-shape models as one stacked model: on, off or auto (on a GPU, not on a CPU)
    workers: int = 0  # parallel (op, seed) processes; 0 = one per core (one on a GPU)
    ray_address: str = ""  # HOST:PORT of a Ray cluster to train on (out_dir on a shared filesystem); "": train locally
    threads: int = 0  # torch threads per (op, seed); 0 = 1 on a CPU. Other counts round differently
    overwrite: bool = False  # discard results in out_dir made with another config
    progress: str = "auto"  # auto (a bar on a terminal, plain lines otherwise), bar, lines or none


# The reference setups (--preset=NAME): lab/presets.py, one entry a paper; a new one is one entry there, or here:
# PRESETS["mine"] = {"p": 113, ...}.
PRESETS = dict(REFERENCE_SETUPS)


# ----------------------------------------------------------------------------- ops
# An op is an entry of OPS (lab.ops.Op: its table of pairs and answers, and its cycle if it has one); both
# scripts read them here. Vocabulary: ["o", "="] + the elements, input [a, "o", b, "="] (--op_token=false: the
# elements + ["="], input [a, b, "="]); class = element index.
OPS = {op.name: op for op in (
    Op("x_div_y", "x / y mod p (y != 0)", modular(lambda a, b, p: a * inverses(p)[b], b_from=1), multiplicative(-1),
       prime=True),
    Op("x_minus_y", "(x - y) mod p", modular(lambda a, b, p: a - b), additive(-1)),
    Op("x_plus_y", "(x + y) mod p", modular(lambda a, b, p: a + b), additive(1)),
    Op("permutation", "a o b in S_k", permutation_group(compose)),
    *POWER_OPS,  # Power et al. 2022's other binary ops (lab/ops.py)
)}


def make_task(op: str, p: int = 97, perm_k: int = 5, op_token: bool = True) -> Task:
    """Every pair of `op` as tensors (lab.ops.Task)."""
    return build_task(OPS[op], p, perm_k, op_token)


def task_of(cfg: Config, op: str) -> Task:
    return make_task(op, cfg.p, cfg.perm_k, cfg.op_token)


def derived_seeds(seed: int) -> dict:
    """Independent seeds for the split, the initialisation and the batch order."""
    return {"split_seed": seed, "init_seed": 1337 + seed, "batch_seed": 2**20 + seed}


def split_pairs(n_pairs: int, train_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of range(n_pairs) into sorted (train, val) index tensors."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed))
    n_train = int(n_pairs * train_frac)
    return order[:n_train].sort().values, order[n_train:].sort().values


# ----------------------------------------------------------------------------- model
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # the FFN's nonlinearity (--activation)


class Block(nn.Module):
    """A decoder block. norm "post" (the template's, and Power et al.'s): x = LN(x + attn(x)); x = LN(x + FFN(x)).
    "pre" (GPT-2's, Grokfast's): x = x + attn(LN(x)); x = x + FFN(LN(x)). "none" (Nanda et al.'s): no LayerNorm.

    forward(x) is a plain causal block over x (batch, seq, d_model).
    forward(x, prefix, prefix_index) treats row i's sequence as prefix[prefix_index[i]]
    followed by x[i]: the prefix rows (n_rows, n_prefix, d_model) are computed once
    each, not once per example. It returns (x's new states, prefix's new states).
    With last_only, queries, the output projection and the FFN of x run for its last
    position alone (all a causal model's answer needs), and no prefix states are returned.
    """

    def __init__(self, d_model: int, n_heads: int, d_mlp: int = 0, norm: str = "post", activation: str = "gelu"):
        super().__init__()
        self.n_heads, self.pre_norm = n_heads, norm == "pre"
        # where ideas look (forward_hooks on "blocks.{i}.hook_..."): attention weights (batch, q_len, k_len, heads),
        # attention output after its projection (batch, q_len, d), FFN hidden activation (batch, q_len, d_mlp),
        # the block's output (batch, q_len, d; what capture reads as blocks.{i})
        self.hook_pattern, self.hook_attn_out = HookPoint(), HookPoint()
        self.hook_mlp_post, self.hook_resid_post = HookPoint(), HookPoint()
        layer_norm = nn.Identity if norm == "none" else nn.LayerNorm
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_norm = layer_norm(d_model)
        d_mlp = d_mlp or 4 * d_model
        self.ffn = nn.Sequential(nn.Linear(d_model, d_mlp), ACTIVATIONS[activation](), nn.Linear(d_mlp, d_model))
        self.ffn_norm = layer_norm(d_model)
        # nn.MultiheadAttention's initialisation, as in the template.
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def _project(self, x: torch.Tensor, queries_from: int = 0):
        """Queries of positions queries_from.. (batch, q_len, d) and keys|values of all (batch, seq, 2d)."""
        d_model = x.shape[-1]
        if self.pre_norm:
            x = self.attn_norm(x)
        if queries_from == 0:
            q, kv = self.qkv(x).split([d_model, 2 * d_model], dim=-1)
        else:
            w_q, w_kv = self.qkv.weight.split([d_model, 2 * d_model])
            b_q, b_kv = self.qkv.bias.split([d_model, 2 * d_model])
            q = F.linear(x[:, queries_from:].contiguous(), w_q, b_q)  # contiguous: one GEMM under vmap too
            kv = F.linear(x, w_kv, b_kv)
        return q, kv

    def _attend_and_mix(self, residual, q, kv):
        """Causal attention of the last q_len positions over all k_len positions, then the FFN.

        Written out with broadcasting: for sequences of 4 tokens this beats
        scaled_dot_product_attention's kernels several times over on a CPU. Heads stay in (batch, len, heads, hd)
        order and the softmax runs over the key axis where it lies: no transposes, no copies.
        """
        q_len, k_len, d_model = q.shape[-2], kv.shape[-2], q.shape[-1]
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)) for t in (q, *kv.split(d_model, dim=-1)))
        scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * q.shape[-1] ** -0.5  # (batch, q_len, k_len, heads)
        # query j is position k_len - q_len + j and sees keys 0 .. k_len - q_len + j
        hidden = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(k_len - q_len + 1)[..., None]
        weights = scores.masked_fill(hidden, float("-inf")).softmax(2)
        if self.hook_pattern.hooked():
            weights = self.hook_pattern(weights)
        attn = self.out((weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2).flatten(-2))  # (batch, q_len, d_model)
        if self.hook_attn_out.hooked():
            attn = self.hook_attn_out(attn)
        if self.pre_norm:
            h = residual + attn
            out = h + self._mlp(self.ffn_norm(h))
        else:
            h = self.attn_norm(residual + attn)  # norm "none": Identity
            out = self.ffn_norm(h + self._mlp(h))
        return self.hook_resid_post(out) if self.hook_resid_post.hooked() else out

    def _mlp(self, x):
        """The FFN, its hidden activation through hook_mlp_post when a hook is attached."""
        if not self.hook_mlp_post.hooked():
            return self.ffn(x)
        first, activation, second = self.ffn
        return second(self.hook_mlp_post(activation(first(x))))

    def forward(self, x, prefix=None, prefix_index=None, last_only: bool = False, by_token=None):
        queries_from = x.shape[1] - 1 if last_only else 0
        if by_token is None:
            q, kv = self._project(x, queries_from)
        else:  # (table (n_vocab, seq, d), tokens (batch, seq)): x[i, j] = table[tokens[i, j], j]
            table, tokens = by_token
            q_table, kv_table = self._project(table, queries_from)  # each vocabulary entry once, then gathered
            seq = tokens.shape[1]
            rows = tokens * seq + torch.arange(seq, device=tokens.device)  # (batch, seq) rows of table's (vocab, seq)
            kv = kv_table.reshape(-1, kv_table.shape[-1]).index_select(0, rows.flatten()).view(*rows.shape, -1)
            q_rows = (tokens[:, queries_from:] * (seq - queries_from)
                      + torch.arange(seq - queries_from, device=tokens.device))
            q = q_table.reshape(-1, q_table.shape[-1]).index_select(0, q_rows.flatten()).view(*q_rows.shape, -1)
        if prefix is None:
            return self._attend_and_mix(x[:, queries_from:], q, kv)
        q_pre, kv_pre = self._project(prefix)  # (n_rows, n_prefix, .): the prefix sees only itself
        prefix_out = None if last_only else self._attend_and_mix(prefix, q_pre, kv_pre)
        kv = torch.cat([kv_pre.index_select(0, prefix_index), kv], dim=1)  # (batch, n_prefix + seq, 2d)
        return self._attend_and_mix(x[:, queries_from:], q, kv), prefix_out


class Transformer(nn.Module):
    """The template's model: embeddings -> blocks -> LayerNorm -> linear head, read at the last position.
    norm "none" drops the final LayerNorm too; "post" and "pre" keep it.

    fast (the default) turns on three speed-only paths, each the plain computation's numbers up to float rounding
    (tests/test_model.py; each an attribute of its own, for benchmarks): shared_prefix, the states of the positions
    before b (a, and the op token when there is one) depend on `a` alone under the causal mask when every row has
    the same tokens between a and b, so they are computed once per vocabulary entry and gathered (about 40% of the
    work on [a, "o", b, "="]; inputs that break the condition take the plain computation); vocab_table, the first
    block's projections at b and "=" once per vocabulary entry too; last_only, the last block at the answer's
    position alone. fast=False, or a hook attached to a hook point: the plain computation only.
    """

    def __init__(self, n_vocab: int, n_classes: int, num_layers: int = 2, d_model: int = 128,
                 n_heads: int = 4, seq_len: int = 4, d_mlp: int = 0, norm: str = "post", activation: str = "gelu",
                 fast: bool = True):
        super().__init__()
        self.token_embeddings = nn.Embedding(n_vocab, d_model)
        self.position_embeddings = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp, norm, activation) for _ in range(num_layers))
        self.norm = nn.Identity() if norm == "none" else nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        # fast=False: every forward is the plain computation below (the first branch of forward). An idea that edits
        # attention or the FFN edits Block._project / _attend_and_mix, which every path calls.
        self.shared_prefix = self.vocab_table = self.last_only = fast
        self.capture_modules = {"first": "blocks.0", "last": f"blocks.{num_layers - 1}"}
        self.hook_points = [point for block in self.blocks for point in (
            block.hook_pattern, block.hook_attn_out, block.hook_mlp_post, block.hook_resid_post)]

    def forward(self, tokens: torch.Tensor, shared: bool | None = None) -> torch.Tensor:
        positions = self.position_embeddings.weight
        n_blocks, n_prefix = len(self.blocks), tokens.shape[1] - 2  # the prefix: every position before b
        middle = tokens[:, 1:n_prefix]  # (batch, n_prefix - 1): the op token, or nothing
        hooked = any(point.hooked() for point in self.hook_points)  # hooks see every position: the plain path
        if shared is None:  # a caller under vmap, where no tensor may decide a branch, decides (forward_kwargs)
            shared = self.forward_kwargs(tokens)["shared"]
        if not shared or hooked:
            h = self.token_embeddings(tokens) + positions[: tokens.shape[1]]
            for i, block in enumerate(self.blocks):
                h = block(h, last_only=self.last_only and i == n_blocks - 1 and not hooked)
            return self.head(self.norm(h[:, -1]))
        n_vocab = self.token_embeddings.num_embeddings
        every_a = torch.arange(n_vocab, device=tokens.device)
        prefix_tokens = torch.cat([every_a[:, None], middle[:1].expand(n_vocab, -1)], dim=1)  # (n_vocab, n_prefix)
        prefix = self.token_embeddings(prefix_tokens) + positions[:n_prefix]  # (n_vocab, n_prefix, d_model)
        h = self.token_embeddings(tokens[:, n_prefix:]) + positions[n_prefix: tokens.shape[1]]  # (batch, 2, d_model)
        # The first block's input at b and "=" is one token's embedding too: project each vocabulary entry once.
        table = self.token_embeddings.weight[:, None] + positions[n_prefix: tokens.shape[1]]  # (n_vocab, 2, d_model)
        for i, block in enumerate(self.blocks):
            by_token = (table, tokens[:, n_prefix:]) if i == 0 and self.vocab_table else None
            h, prefix = block(h, prefix, tokens[:, 0], last_only=i == n_blocks - 1, by_token=by_token)
        return self.head(self.norm(h[:, -1]))  # (batch, n_classes)

    def forward_kwargs(self, tokens: torch.Tensor) -> dict:
        """forward's arguments decided from the tokens (batch..., seq) of one or of many models at once."""
        middle = tokens[..., 1:tokens.shape[-1] - 2].flatten(0, -2)  # (rows, n_prefix - 1): the op token, or nothing
        return {"shared": self.shared_prefix and tokens.shape[-1] > 2 and not bool((middle != middle[:1]).any())}

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


# A model: forward(tokens (n, seq)) -> logits (n, n_classes); capture_modules {"first", "last": module path}, whose
# output's last position is read; token_embedding_matrix() -> (n_vocab, d). Checked when built (docs/experiment.md).
MODELS = {"transformer": Transformer, "gpt2": GPT2Classifier}


@torch.no_grad()
def nanda_init(model: nn.Module, task: Task) -> None:
    """Nanda et al. 2023's initialisation: every weight matrix and embedding N(0, 1/d_model), the unembedding
    N(0, 1/n_vocab), biases 0 (LayerNorms, if any, keep theirs)."""
    d_model = model.token_embedding_matrix().shape[1]
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2:
            parameter.normal_(0.0, (task.n_vocab if name.startswith("head.") else d_model) ** -0.5)
        elif name.endswith("bias") and "norm" not in name:
            parameter.zero_()


INITS = {"torch": None, "nanda": nanda_init}  # name -> (model, task) -> None, run under the init seed


def build_model(cfg: Config, task: Task) -> nn.Module:
    shape = {"d_mlp": cfg.d_mlp, "norm": cfg.norm, "activation": cfg.activation} if cfg.model == "transformer" else {}
    model = MODELS[cfg.model](task.n_vocab, task.n_classes, cfg.num_layers, cfg.d_model, cfg.n_heads,
                              seq_len=task.x.shape[1], **shape)
    check_model(model, task, cfg.model)
    return model.to(FLOATS[cfg.dtype])


# The float type of a run's weights, logits and loss, per --dtype (bf16 autocasts the matrix multiplies only).
FLOATS = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}


def as_float(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the type the loss is computed in: float32, or float64 where the model computes in float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


# ----------------------------------------------------------------------------- loss, optimizer, schedule, batches
class CrossEntropy:
    """A loss: probs(logits) and a mean loss(logits, y), logits (n, C). Training, evaluation, restricted/excluded
    loss and softmax collapse all use the run's loss, so a new loss is one entry in LOSSES."""

    def probs(self, logits):
        return logits.softmax(-1)

    def __call__(self, logits, y):
        return F.cross_entropy(logits, y)


class StableMax:
    """StableMax cross-entropy (Prieto et al. 2025): s(x) = x + 1 for x >= 0, 1 / (1 - x) below, in place of exp;
    probabilities s(x_i) / sum_j s(x_j) and the loss in float64, so that they do not collapse to exactly 1."""

    def probs(self, logits):
        x = logits.double()
        s = torch.where(x < 0, 1 / (1 - x.clamp(max=0)), x + 1)  # the clamp keeps the unused branch finite
        return s / s.sum(-1, keepdim=True)

    def __call__(self, logits, y):
        return -self.probs(logits).gather(1, y[:, None]).log().mean()


LOSSES = {"cross_entropy": CrossEntropy(), "stablemax": StableMax()}


def adamw(params, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             fused=True)


@torch.no_grad()
def adam(params, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def orthogonal_gradients(optimizer, args, kwargs):
    """⊥Grad (Prieto et al. 2025), before each step: every gradient minus its projection on its own weight,
    rescaled to the gradient's norm, so that no update just scales the weights up."""
    for group in optimizer.param_groups:
        for w in group["params"]:
            if w.grad is not None:
                g = w.grad
                orthogonal = g - (w * g).sum() / ((w * w).sum() + 1e-30) * w
                g.copy_(orthogonal * (g.norm() / (orthogonal.norm() + 1e-30)))


def perp_adamw(params, cfg: Config) -> torch.optim.Optimizer:
    optimizer = adamw(params, cfg)
    optimizer.register_step_pre_hook(orthogonal_gradients)
    return optimizer


OPTIMIZERS = {  # name -> (parameters or groups, cfg) -> optimizer
    "adamw": adamw,  # decoupled weight decay
    "adam": adam,  # weight decay as an L2 gradient
    "perp_adamw": perp_adamw,
}
# name -> cfg -> multiplier of lr at scheduler step s (update s + 1 uses it). The template's: min(s / warmup, 1).
SCHEDULES = {"warmup": lambda cfg: lambda s: min(s / cfg.warmup_steps, 1.0) if cfg.warmup_steps else 1.0,
             "constant": lambda cfg: lambda s: 1.0}


class RandomBatches:
    """batch_size training rows per update, drawn uniformly with replacement (the template's sampling)."""

    def __init__(self, n_train: int, cfg: Config, device, seed: int):
        self.n, self.size, self.device = n_train, cfg.batch_size or min(512, math.ceil(n_train / 2)), device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, step: int) -> torch.Tensor:  # row indices into the training pairs
        return torch.randint(self.n, (self.size,), device=self.device, generator=self.generator)


class FullBatch:
    """Every training row at every update (full-batch training; batch_size is not used)."""

    def __init__(self, n_train: int, cfg: Config, device, seed: int):
        self.rows = torch.arange(n_train, device=device)

    def __call__(self, step: int) -> torch.Tensor:
        return self.rows


SAMPLERS = {"random": RandomBatches, "full": FullBatch}  # name -> (n_train, cfg, device, seed) -> sampler


# ----------------------------------------------------------------------------- example plugins
# Plugin hooks, in call order: init_model, param_groups, on_train_begin, transform_batch, on_after_backward,
# on_step_end, on_eval, on_train_end; `run` is a lab.plugins.Run (docs/plugins.md). The four kinds of change that
# AI-Scientist agents made to the grokking template, and grokfast, each as a plugin: switch one on by adding its
# name to DEFAULT_PLUGINS; copy one to start your own.
class XavierInit(Plugin):
    """Xavier-uniform initialisation of every weight matrix and embedding, zero biases (instead of PyTorch's
    defaults). Runs under the init seed, so it is as reproducible as the default initialisation."""

    name = "xavier_init"
    batchable = True  # it never touches the update: it can train in a batch of models

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
    scales = {"token_embeddings": 0.5, "position_embeddings": 0.5, "blocks": 1.0, "head": 2.0}  # any depth

    def param_groups(self, run):
        names = [name for name, _ in run.model.named_parameters()]
        unmatched = [prefix for prefix in self.scales if not any(name.startswith(prefix) for name in names)]
        if unmatched:  # another model names its layers otherwise (gpt2: gpt2.wte, gpt2.h.0, ...)
            raise ValueError(f"prefixes {unmatched} match no parameter of {type(run.model).__name__} "
                             f"(e.g. {names[0]}); set LayerLearningRates.scales for its names")
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
        self.generator = torch.Generator(device=run.device).manual_seed(run.seeds["batch_seed"] + 1)

    def transform_batch(self, run, step, x, y):
        if run.op not in ("x_plus_y", "x_minus_y"):
            return x, y
        swap = torch.rand(len(x), generator=self.generator, device=x.device) < 0.5
        order = list(range(x.shape[1]))
        order[0], order[-2] = order[-2], order[0]  # [a, "o", b, "="] -> [b, "o", a, "="]; [a, b, "="] -> [b, a, "="]
        x = torch.where(swap[:, None], x[:, order], x)
        if run.op == "x_minus_y":
            y = torch.where(swap, (-y) % run.cfg.p, y)
        return x, y


class StepValAcc95(Plugin):
    """A metric: the first evaluated step with val accuracy > 0.95, None when never reached. final_info.json
    averages it over the seeds that reached it and says how many did (step_val_acc_95_n)."""

    name = "step_val_acc_95"
    batchable = True  # it never touches the update: it can train in a batch of models

    def on_train_begin(self, run):
        self.reached = None

    def on_eval(self, run, step, metrics):
        if self.reached is None and metrics["val_acc"] > 0.95:
            self.reached = step

    def on_train_end(self, run, final_info):
        final_info["step_val_acc_95"] = self.reached



class Grokfast(Plugin):
    """Grokfast (Lee et al. 2024, arXiv:2405.20233): amplify the slow part of the gradient, grad += lamb * slow.

    --grokfast_filter=ema: slow = alpha * slow + (1 - alpha) * grad, starting at the first gradient (the paper's
    code), --grokfast_alpha, --grokfast_lamb. ma: slow = the mean of the last --grokfast_window gradients, added
    once the window is full (the code's warm-up).
    """

    name = "grokfast"

    def on_train_begin(self, run):
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        self.slow, self.window = None, []

    @torch.no_grad()
    def on_after_backward(self, run, step):
        cfg = run.cfg
        grads = [p.grad for p in self.params if p.grad is not None]
        if cfg.grokfast_filter == "ma":
            self.window.append([g.clone() for g in grads])
            if self.slow is None:
                self.slow = [g.clone() for g in grads]  # the window's running sum
            else:
                torch._foreach_add_(self.slow, grads)
            if len(self.window) > cfg.grokfast_window:
                torch._foreach_sub_(self.slow, self.window.pop(0))
            if len(self.window) == cfg.grokfast_window:
                torch._foreach_add_(grads, self.slow, alpha=cfg.grokfast_lamb / cfg.grokfast_window)
            return
        if self.slow is None:  # as in the paper's code: the EMA starts at the first gradient
            self.slow = [g.clone() for g in grads]
        else:
            torch._foreach_lerp_(self.slow, grads, 1 - cfg.grokfast_alpha)
        if cfg.grokfast_lamb:
            torch._foreach_add_(grads, self.slow, alpha=cfg.grokfast_lamb)


PLUGINS = {plugin.name: plugin for plugin in (
    *RESEARCH_PLUGINS, EarlyWarning, Grokfast, XavierInit, LayerLearningRates, SwapOperands, StepValAcc95,
    *TRACKER_PLUGINS)}


def plugin_classes(cfg: Config) -> list:
    """The plugin classes of a run: DEFAULT_PLUGINS (less capture or measures if switched off), cfg.plugins, then
    cfg.tracker's (lab/trackers.py)."""
    switched_off = {"capture": not cfg.capture, "measures": not cfg.measure}
    specs = [s for s in DEFAULT_PLUGINS if not switched_off.get(s)] + list(cfg.plugins) + tracker_names(cfg.tracker)
    classes = []
    for spec in specs:
        if spec.endswith(".py"):  # a file may add Plugin subclasses, registry entries, or both
            classes += load_plugin_file(spec, (OPS, MODELS, LOSSES, OPTIMIZERS, SCHEDULES, SAMPLERS, INITS, PLUGINS,
                                               PRESETS, ACTIVATIONS))
        elif spec in PLUGINS:
            classes.append(PLUGINS[spec])
        else:
            raise UsageError(f"unknown plugin {spec!r}: give a builtin ({','.join(PLUGINS)}) or a .py file")
    return list(dict.fromkeys(classes))


# ----------------------------------------------------------------------------- train / eval
@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast, loss, keep=()) -> tuple[float, float, dict]:
    """(loss, accuracy, outputs) over all of x in one pass.

    outputs: "logits" (n, n_classes) float32 (float64 for an fp64 model) and, for each module name in keep, its output at the last
    position (n, d_model) float32, taken by forward hooks that change no number.
    """
    outputs = {}

    def hold(name, module, inputs, output):
        outputs[name] = (output[0] if isinstance(output, tuple) else output)[:, -1].float()

    model.eval()
    try:
        with forward_hooks(model, {name: hold for name in keep}), autocast():
            logits = as_float(model(x))
    finally:
        model.train()
    acc = (logits.argmax(-1) == y).float().mean()
    return loss(logits, y).item(), acc.item(), {"logits": logits, **outputs}


def prepare(cfg: Config, job: Job) -> Run:
    """A job made ready to train: its folder (an unfinished earlier attempt's removed), split and example table,
    data on the device (run.x_train, y_train, x_val, y_val), its plugins (run.hooks) and its model, initialised
    under the init seed. train_one and the batched trainer (lab/batched.py) both start here."""
    cfg = job.config(cfg)
    device = device_of(cfg)
    seeds = derived_seeds(job.seed)
    out_dir = job_dir(cfg.out_dir, job)
    if os.path.exists(out_dir):  # an unfinished earlier attempt: start over
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    task = task_of(cfg, job.op)
    train_idx, val_idx = split_pairs(len(task.y), cfg.train_frac, seeds["split_seed"])
    write_examples(os.path.join(out_dir, EXAMPLES), task, train_idx)
    hooks = PluginHooks([cls() for cls in plugin_classes(cfg)])  # plugin files may add registry entries
    torch.manual_seed(seeds["init_seed"])
    run = Run(cfg, job, out_dir, task, train_idx, val_idx, build_model(cfg, task).to(device), device, LOSSES[cfg.loss],
              evaluate, OPS[job.op], seeds)
    run.hooks = hooks
    run.x_train, run.y_train = task.x[train_idx].to(device), task.y[train_idx].to(device)
    run.x_val, run.y_val = task.x[val_idx].to(device), task.y[val_idx].to(device)
    if cfg.dtype == "bf16":
        run.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if INITS[cfg.init] is not None:
        INITS[cfg.init](run.model, task)
    hooks.init_model(run)
    if cfg.init_scale != 1.0:
        with torch.no_grad():
            torch._foreach_mul_(list(run.model.parameters()), cfg.init_scale)
    return run


def final_info_of(run: Run, step_val_acc_99: int | None) -> dict:
    """A finished job's final info (before plugins add theirs): its last evaluation and its grokking step."""
    last = run.history[-1]
    return {
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "final_train_acc": last["train_acc"],
        "final_val_acc": last["val_acc"],
        # The template's convention: never reached -> the step budget; `grokked` says which.
        "step_val_acc_99": step_val_acc_99 if step_val_acc_99 is not None else run.cfg.steps,
        "grokked": step_val_acc_99 is not None,
    }


def make_update(run: Run):
    """One model's training step, where most ideas go (a loss term, gradient clipping, another optimizer): the
    optimizer and schedule are made here (run.optimizer), and update(step) does one update on a sampled batch and
    returns (its mean loss, correct answers, rows, the learning rate it used). lab/loop.py calls it every step; a
    batch of models (--batched) runs lab.batched.StackedUpdate instead, and only while this function is the one it
    mirrors (lab.batched.why_not says so in one line)."""
    cfg, hooks, model = run.cfg, run.hooks, run.model
    groups = [g for g in hooks.param_groups(run) if g is not None]
    if len(groups) > 1:
        raise PluginError(f"{len(groups)} plugins return parameter groups for {run.op} seed {run.seed}; one may")
    run.optimizer = optimizer = OPTIMIZERS[cfg.optimizer](groups[0] if groups else model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[cfg.schedule](cfg))
    sample = SAMPLERS[cfg.sampler](len(run.y_train), cfg, run.device, run.seeds["batch_seed"])

    def update(step: int):
        lr_used = scheduler.get_last_lr()[0]
        batch = sample(step)
        xb, yb = hooks.transform_batch(run, step, run.x_train[batch], run.y_train[batch])  # x_val never passes here
        with run.autocast():
            logits = model(xb)
        loss = run.loss(as_float(logits), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hooks.on_after_backward(run, step)
        optimizer.step()
        scheduler.step()
        return loss.detach(), (logits.detach().argmax(-1) == yb).sum(), len(yb), lr_used

    return update


def train_one(cfg: Config, job: Job, report=None) -> dict:
    """Train one job (an op, a seed, and Config overrides); write its folder, then its final_info file. The loop
    (evaluation schedule, log, grokking step, checkpoints, files) is lab/loop.py's, shared with batched training."""
    run = prepare(cfg, job)
    update = make_update(run)

    def validate(step: int):  # the whole validation split; keeps the captured modules for run.all_outputs()
        keep = tuple(run.model.capture_modules.values())
        val_loss, val_acc, run.eval_outputs = run.evaluate(run.x_val, run.y_val, keep)
        run.eval_step = step
        return val_loss, val_acc

    return loop.train([run], loop.OneModel(update, validate), final_info_of, report)[0]


if __name__ == "__main__":
    runner.cli(sys.modules[__name__])
