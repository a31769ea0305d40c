"""Many models at once: jobs whose models share a shape train as one stacked model on one device.

The parameters of K models are stacked along a new first dimension (torch.func.stack_module_state) and one
vmap of functional_call runs all K forwards and backwards as batched operations. Each model keeps what its
sequential run (experiment.train_one) would have: its split, initialisation, batch order (its own sampler),
learning rate and weight decay, its plugins and every file. Each job's model is a real nn.Module whose
parameters are views of its slice of the stack, so plugins read run.model and run.all_outputs() as they would
in a sequential run. The loss of the batch is the sum of the models' losses: a model's gradient is the gradient
of its own loss only (tests/test_batched.py checks it, perturbing one model's data).

Differences from the sequential run are float rounding: batched matrix multiplies block their sums otherwise,
and the optimizer below is the arithmetic of torch's AdamW written once for the stack (tests/test_batched.py
gives the tolerance). Config.batched chooses: off, on, or auto (AUTO below: batched on a GPU). Reference:
docs/batched.md.
"""

import ast
import dataclasses
import hashlib
import inspect
import shutil
import sys
import tempfile
import textwrap
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lab import loop, sweep
from lab.job import deterministic_on, device_of, keep_freed_memory
from lab.plugins import Plugin

PER_MODEL = ("lr", "weight_decay", "train_frac", "init_scale")  # Config fields that may differ inside one batch
# --batched=auto: device type -> batch? A rule, not a timing taken at run time: a timing near a tie would make
# the same config give other numbers (float rounding) from one run to the next. From tests/bench_batched.py's
# whole-run measurements (docs/batched.md, "Speed").
AUTO = {"cuda": True, "cpu": False}

# What a batch mirrors: experiment.make_update (one model's step) with train_one (which a batch does not call: it
# runs prepare, StackedUpdate and the loop itself), and the optimizers, as fingerprints of their
# code (comments, docstrings and layout left out: only a change to what runs counts). An edited step (a new loss
# term, gradient clipping) would not reach a batch: its jobs then train one by one, with a line saying so. The loop
# around the step (lab/loop.py) is shared, so nothing else of experiment.py needs mirroring. tests/test_batched.py
# fails when these change, so that whoever changes them updates StackedUpdate too.
MIRRORED = {"make_update": "a3044f1035", "adamw": "f3112aa80c", "adam": "abd6b96e21", "perp_adamw": "7d8f1746e2"}


def fingerprint(functions: list) -> str:
    """What the functions run, as a hash of their syntax trees without docstrings: a comment, a blank line or a
    docstring changes nothing."""
    parts = []
    for function in functions:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # a def (a lambda has no source of its own)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        parts.append(ast.dump(tree))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def mirrored_sources(E) -> dict:
    """name -> fingerprint of the code that StackedUpdate mirrors, as it is now in experiment.py."""
    mirrored = {"make_update": [E.make_update, E.train_one], "adamw": [E.adamw], "adam": [E.OPTIMIZERS["adam"]],
                "perp_adamw": [E.perp_adamw, E.orthogonal_gradients, E.adamw]}
    return {name: fingerprint(functions) for name, functions in mirrored.items()}


def unbatchable_plugins(classes: list) -> list:
    """The plugin classes that cannot train in a batch: not marked batchable (a plugin written for one model),
    or using a hook that acts inside the update (param_groups, transform_batch, on_after_backward)."""
    return [cls for cls in classes if not getattr(cls, "batchable", False)
            or any(getattr(cls, hook) is not getattr(Plugin, hook)
                   for hook in ("param_groups", "transform_batch", "on_after_backward"))]


def why_not(E, cfg) -> str | None:
    """Why the jobs of cfg (one sweep cell) cannot train batched, in a few words; None when they can."""
    if cfg.dtype == "fp64":
        return "--dtype=fp64 trains one model at a time"
    if cfg.optimizer not in BATCHED_OPTIMIZERS:
        return f"optimizer {cfg.optimizer} has no batched version (lab/batched.py: {', '.join(BATCHED_OPTIMIZERS)})"
    plugins = unbatchable_plugins(E.plugin_classes(cfg))
    if plugins:
        return (f"plugin {', '.join(getattr(c, 'name', c.__name__) for c in plugins)} is written for one model "
                "(a plugin that can train in a batch sets batchable = True; docs/plugins.md)")
    now = mirrored_sources(E)
    changed = [name for name in ("make_update", cfg.optimizer) if now[name] != MIRRORED[name]]
    if changed:
        named = ", ".join("make_update or train_one" if name == "make_update" else name for name in changed)
        return f"experiment.py's {named} differs from what lab/batched.py mirrors, so a batch would not run the change"
    return None


def shape_key(E, cfg, job) -> tuple:
    """Jobs with equal keys can train in one batch: the same model shape, steps, schedule and batch size."""
    job_cfg = job.config(cfg)
    task = E.task_of(job_cfg, job.op)
    n_train = int(len(task.y) * job_cfg.train_frac)
    batch = n_train if job_cfg.sampler == "full" else job_cfg.batch_size or min(512, -(-n_train // 2))
    return (tuple((k, v) for k, v in job.overrides if k not in PER_MODEL), task.n_vocab, task.n_classes,
            tuple(task.x.shape[1:]), batch)


def describe(key: tuple) -> str:
    overrides, n_vocab, n_classes, _, batch = key
    return " ".join([f"vocab {n_vocab}, {n_classes} classes, batch {batch}", *(f"{k}={v}" for k, v in overrides)])


class Unit(NamedTuple):
    """What one worker trains at a time: one job one by one (experiment.train_one), or jobs as a batch. ghosts:
    jobs of the batch already finished, trained again but written nowhere (see resume_units)."""
    jobs: tuple
    batched: bool
    ghosts: tuple = ()

    def __len__(self):
        return len(self.jobs)


def plan(E, cfg, todo: list, workers: int, say) -> list[Unit]:
    """The units of work of todo. Jobs batch by shape_key, a key's jobs split into up to `workers` batches of at
    least two (one per core). A batched job always trains through train_group, alone too (after a resume), so its
    numbers never depend on what else is in its batch."""
    device = device_of(cfg).type
    on = cfg.batched == "on" or (cfg.batched == "auto" and AUTO.get(device, False))
    if not on:
        return [Unit((job,), False) for job in todo]
    reasons = {cell: why_not(E, sweep.cell_config(cfg, cell)) for cell in sweep.cells(cfg)}
    by_key, units = {}, []
    for job in todo:
        if reasons[job.overrides]:
            units.append(Unit((job,), False))
        else:
            by_key.setdefault(shape_key(E, cfg, job), []).append(job)
    for reason in dict.fromkeys(r for r in reasons.values() if r):
        say(f"batched training: off{'' if all(reasons.values()) else ' for some jobs'}: {reason}; "
            "they train one by one")
    for jobs in by_key.values():
        size = max(2, -(-len(jobs) // workers))  # one batch per worker, of two models at least
        units += [Unit(tuple(jobs[i:i + size]), True) for i in range(0, len(jobs), size)]
    return units


def resume_units(units: list, todo: list, device_type: str) -> list[Unit]:
    """The units of a run's plan (over every job) that still have work, given the unfinished jobs todo. A batch
    keeps its unfinished jobs; on CUDA, where the number of models in a batch can move a model's last bits, its
    finished jobs come along as ghosts (trained again, written nowhere), so the others train in the batch they
    were planned in and a resumed run gives the bytes of an uninterrupted one. On a CPU they are left out: there
    a job's numbers do not depend on its batch (tests/test_batched.py)."""
    resumed = []
    for unit in units:
        left = tuple(job for job in unit.jobs if job in todo)
        if not left:
            continue
        if unit.batched and len(left) < len(unit.jobs) and device_type == "cuda":
            resumed.append(Unit(unit.jobs, True, tuple(job for job in unit.jobs if job not in todo)))
        else:
            resumed.append(Unit(left, unit.batched))
    return resumed


# ----------------------------------------------------------------------------- the optimizer
class BatchedAdam:
    """Adam over stacked parameters (K, ...) with a learning rate and a weight decay per model: decoupled (AdamW,
    the arithmetic of torch.optim.AdamW) or as an L2 gradient term (torch.optim.Adam); orthogonal: ⊥Grad before
    the update (experiment.orthogonal_gradients, per model)."""

    def __init__(self, params: list, cfgs: list, decoupled: bool = True, orthogonal: bool = False):
        cfg = cfgs[0]
        self.params, self.decoupled, self.orthogonal = params, decoupled, orthogonal
        self.betas, self.eps, self.t = (cfg.beta1, cfg.beta2), 1e-8, 0
        self.lr = torch.tensor([c.lr for c in cfgs], dtype=torch.float64)
        self.wd = torch.tensor([c.weight_decay for c in cfgs], dtype=torch.float64)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def keep(self, index: torch.Tensor, params: list) -> None:
        """Only the models at index go on (the others finished), with params their new stack."""
        self.params = params
        self.m = [m[index.to(m.device)] for m in self.m]
        self.v = [v[index.to(v.device)] for v in self.v]
        self.lr, self.wd = self.lr[index], self.wd[index]

    @torch.no_grad()
    def step(self, multiplier: float) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        lr = self.lr * multiplier
        bias1, bias2_sqrt = 1 - beta1 ** self.t, (1 - beta2 ** self.t) ** 0.5
        for p, m, v in zip(self.params, self.m, self.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad
            if self.orthogonal:
                dims = tuple(range(1, p.dim()))
                along = (p * g).sum(dims, keepdim=True) / ((p * p).sum(dims, keepdim=True) + 1e-30)
                orthogonal = g - along * p
                g = orthogonal * (g.flatten(1).norm(dim=1) / (orthogonal.flatten(1).norm(dim=1) + 1e-30)).view(shape)
            if self.decoupled:
                p.mul_((1 - lr * self.wd).to(p).view(shape))
            else:
                g = g + self.wd.to(p).view(shape) * p
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.sub_(m / denom * (lr / bias1).to(p).view(shape))
            p.grad = None


BATCHED_OPTIMIZERS = {  # experiment.OPTIMIZERS name -> (stacked params, per-job configs) -> BatchedAdam
    "adamw": lambda params, cfgs: BatchedAdam(params, cfgs),
    "adam": lambda params, cfgs: BatchedAdam(params, cfgs, decoupled=False),
    "perp_adamw": lambda params, cfgs: BatchedAdam(params, cfgs, orthogonal=True),
}


# ----------------------------------------------------------------------------- the stack
class Stack:
    """The K models of a batch as one: stacked parameters whose slices the models' own parameters view."""

    def __init__(self, models: list):
        self.models, self.base = models, models[0]
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.params = {name: t.detach().requires_grad_(True) for name, t in params.items()}
        self.buffers = {name: t.detach() for name, t in buffers.items()}
        self._bind()
        kwargs = getattr(self.base, "forward_kwargs", None)
        self.forward_kwargs = kwargs if callable(kwargs) else lambda tokens: {}

    def _bind(self) -> None:
        for k, model in enumerate(self.models):
            for name, p in model.named_parameters():
                p.data = self.params[name].data[k]
            for name, b in model.named_buffers():
                b.data = self.buffers[name][k]

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the models at index; the others get their own copies of their weights."""
        kept = set(index.tolist())
        for k, model in enumerate(self.models):
            if k not in kept:
                for t in (*model.parameters(), *model.buffers()):
                    t.data = t.data.clone()
        device_index = index.to(next(iter(self.params.values())).device)
        self.models = [self.models[k] for k in index.tolist()]
        self.base = self.models[0]
        self.params = {n: t.detach()[device_index].requires_grad_(True) for n, t in self.params.items()}
        self.buffers = {n: t[device_index] for n, t in self.buffers.items()}
        self._bind()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (K, n, n_classes) of the K models on tokens (K, n, seq)."""
        kwargs = self.forward_kwargs(tokens)

        def one(params, buffers, x):
            return functional_call(self.base, (params, buffers), (x,), kwargs)

        # A CUDA GPU's fused attention kernels (flash, memory-efficient) do not run under vmap: the backward of the
        # memory-efficient one stops with "LSE is not correctly aligned" (the gpt2 backbone). The math kernel does.
        with sdpa_kernel(SDPBackend.MATH) if tokens.device.type == "cuda" else nullcontext():
            return vmap(one)(self.params, self.buffers, tokens)


# ----------------------------------------------------------------------------- training
def pad_rows(tensors: list) -> tuple[torch.Tensor, list]:
    """Tensors (n_k, ...) stacked to (K, max n_k, ...), short ones repeating their last row; and the n_k."""
    longest = max(len(t) for t in tensors)
    return torch.stack([torch.cat([t, t[-1:].expand(longest - len(t), *t.shape[1:])]) for t in tensors]), \
        [len(t) for t in tensors]


def train_group(E, cfg, jobs: list, report=None, ghosts: tuple = ()) -> list:
    """Train jobs (same shape_key) as one batch; write each job's folder as train_one would. Returns their
    records, in order. ghosts: jobs among them that are finished already: they train as before, in a scratch
    folder that is then removed, and get no record, no report and no file in out_dir."""
    scratch = tempfile.mkdtemp(prefix="grokking_ghosts_") if ghosts else None
    try:
        records = _train_group(E, cfg, jobs, report, ghosts, scratch)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return [record for record, job in zip(records, jobs) if job not in ghosts]


def _train_group(E, cfg, jobs: list, report, ghosts: tuple, scratch) -> list:
    deterministic_on(device_of(cfg))
    runs = [E.prepare(dataclasses.replace(cfg, out_dir=scratch) if job in ghosts else cfg, job) for job in jobs]
    for k, run in enumerate(runs):
        run.batch = (k, len(runs))
    return loop.train(runs, StackedUpdate(E, runs), E.final_info_of, report, quiet=ghosts)


class StackedUpdate:
    """The `steps` of lab/loop.py for a batch: experiment.make_update's update, for every model at once (the stack's
    forward, each model's own loss, one backward, BatchedAdam), and one evaluation pass for all."""

    def __init__(self, E, runs: list):
        self.runs, self.cfgs = runs, [run.cfg for run in runs]
        cfg0, device = self.cfgs[0], runs[0].device
        self.stack = Stack([run.model for run in runs])
        self.optimizer = BATCHED_OPTIMIZERS[cfg0.optimizer](list(self.stack.params.values()), self.cfgs)
        self.schedule = E.SCHEDULES[cfg0.schedule](cfg0)
        self.samplers = [E.SAMPLERS[c.sampler](len(run.y_train), c, device, run.seeds["batch_seed"])
                         for c, run in zip(self.cfgs, runs)]
        self.loss_fn, self.autocast = runs[0].loss, runs[0].autocast
        self.x_val, self.n_val = pad_rows([run.x_val for run in runs])
        self.y_val, _ = pad_rows([run.y_val for run in runs])

    def __call__(self, step: int, active: list):
        lr_multiplier = self.schedule(step - 1)  # the LambdaLR factor of update `step` in make_update
        picked = [self.samplers[k](step) for k in active]
        xb = torch.stack([self.runs[k].x_train[rows_k] for k, rows_k in zip(active, picked)])
        yb = torch.stack([self.runs[k].y_train[rows_k] for k, rows_k in zip(active, picked)])
        with self.autocast():
            logits = self.stack(xb)
        losses = vmap(self.loss_fn)(logits.float(), yb)  # (K,): each model's own mean loss
        losses.sum().backward()  # a model's parameters get the gradient of its own loss only
        self.optimizer.step(lr_multiplier)
        return (losses.detach(), (logits.detach().argmax(-1) == yb).sum(-1), yb.shape[1],
                [self.cfgs[k].lr * lr_multiplier for k in active])

    def validate(self, step: int, active: list):
        for k in active:  # the plugins' run.all_outputs() runs this model's own forward (its val rows too)
            self.runs[k].eval_outputs, self.runs[k].eval_step = {}, None
        return evaluate_stack(self.stack, self.loss_fn, self.autocast, self.x_val[active], self.y_val[active],
                              [self.n_val[k] for k in active])

    def keep(self, index: torch.Tensor) -> None:
        self.stack.keep(index)
        self.optimizer.keep(index, list(self.stack.params.values()))


@torch.no_grad()
def evaluate_stack(stack: Stack, loss_fn, autocast, x: torch.Tensor, y: torch.Tensor, n: list) -> tuple:
    """Each model's (val loss, val accuracy) on its own first n[k] rows of x (K, max n, seq), in one pass."""
    for model in stack.models:
        model.eval()
    try:
        with autocast():
            logits = stack(x).float()
    finally:
        for model in stack.models:
            model.train()
    losses, accuracies = [], []
    for k, n_k in enumerate(n):
        losses.append(loss_fn(logits[k, :n_k], y[k, :n_k]).item())
        accuracies.append((logits[k, :n_k].argmax(-1) == y[k, :n_k]).float().mean().item())
    return losses, accuracies


# ----------------------------------------------------------------------------- timing (tests/bench_batched.py)
def time_batch(E, cfg, jobs: tuple, repeats: int = 3, one_by_one: bool = True) -> dict:
    """Median seconds per update of the jobs' models trained as one batch and one by one (train_one's update;
    skipped, None, with one_by_one=False), on throwaway models and random batches of this shape (no RNG of a job
    is touched, no file written)."""
    import statistics

    rng_state = torch.get_rng_state()
    try:
        cfgs = [job.config(cfg) for job in jobs]
        device = device_of(cfgs[0])
        task = E.task_of(cfgs[0], jobs[0].op)
        torch.manual_seed(0)
        models = [E.build_model(c, task).to(device) for c in cfgs] if one_by_one else []
        batch = shape_key(E, cfg, jobs[0])[-1]
        x = task.x[torch.randint(len(task.y), (len(jobs), batch))].to(device)
        y = task.y[torch.randint(len(task.y), (len(jobs), batch))].to(device)
        loss_fn = E.LOSSES[cfgs[0].loss]
        stack = Stack([E.build_model(c, task).to(device) for c in cfgs])
        optimizer = BATCHED_OPTIMIZERS[cfgs[0].optimizer](list(stack.params.values()), cfgs)
        optimizers = [E.OPTIMIZERS[c.optimizer](m.parameters(), c) for c, m in zip(cfgs, models)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def batched():
            vmap(loss_fn)(stack(x).float(), y).sum().backward()
            optimizer.step(1.0)

        def sequential():
            for k, (model, opt) in enumerate(zip(models, optimizers)):
                loss = loss_fn(model(x[k]).float(), y[k])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        def seconds(fn):
            fn(), fn()  # warm-up
            times = []
            for _ in range(repeats):
                sync()
                begin = time.perf_counter()
                fn(), fn()
                sync()
                times.append((time.perf_counter() - begin) / 2)
            return statistics.median(times)

        t_batched, t_single = seconds(batched), seconds(sequential) if one_by_one else None
    finally:
        torch.set_rng_state(rng_state)
    return {"models": len(jobs), "device": str(device), "seconds_batched": t_batched,
            "seconds_one_by_one": t_single, "speedup": t_single / t_batched if one_by_one else None}


def train_unit(train_one, cfg, unit, report) -> list:
    """Train a unit of plan(): one job by train_one, or a batch by train_group. Their records."""
    keep_freed_memory()
    if not unit.batched:  # (train_group turns the deterministic kernels on itself)
        deterministic_on(device_of(cfg))
        return [train_one(cfg, job, report=report) for job in unit.jobs]
    return train_group(sys.modules[train_one.__module__], cfg, list(unit.jobs), report=report, ghosts=unit.ghosts)

