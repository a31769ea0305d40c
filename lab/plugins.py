"""The plugin API (Plugin, Run, the hook dispatch, forward hooks) and the builtin research plugins: activation
capture, the dense progress measures, norms, and the embedding probes. experiment.py registers them in PLUGINS.
Reference: docs/plugins.md."""

import importlib.util
import math
import os
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn as nn

from lab import measures as M
from lab.files import atomic_write, write_json, write_jsonl
from lab.ops import adds, cyclic_coordinates, in_residue_order
from lab.schema import ACTIVATIONS, INDEX, MEASURES, grokked, memorised


class UsageError(Exception):
    """Bad input from the user: one line on stderr, exit code 2."""


class PluginError(Exception):
    """A plugin raised; the message names the plugin, the hook and the step."""


class Plugin:
    """Base class of plugins: override the hooks you need, listed here in the order they are called for each
    job. `run` is the Run below (one model). A fresh instance is made for every job."""

    name = "plugin"
    # True: the plugin also works when its job trains in a batch of models (lab/batched.py). Then run.model is a
    # module whose parameters view this model's slice of the batch: read it, evaluate it, change its weights in
    # place in on_step_end; run.optimizer is None and param_groups, transform_batch and on_after_backward are not
    # available. False (a plugin written for one model): its jobs train one by one.
    batchable = False
    last = False  # True: its hooks run after every other plugin's (it reads what they add to a step's log row)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise UsageError for a setting this plugin cannot run with; called before any file is written."""

    def init_model(self, run):
        """The model is built under init_seed and the optimizer is not: re-initialise run.model here (the global
        torch RNG continues from init_seed, so a random init is seeded)."""

    def param_groups(self, run):
        """Return the optimizer's parameter groups (a list of dicts, e.g. a learning rate per layer); None: one
        group of every parameter. At most one plugin may return groups."""

    def on_train_begin(self, run):
        """Before the first update."""

    def transform_batch(self, run, step, x, y):
        """Return the (x, y) training batch to use (augmentation): x (batch, 4) tokens, y (batch,) classes.
        Validation pairs never pass here."""

    def on_after_backward(self, run, step):
        """Gradients exist, the update has not happened: gradient filters go here."""

    def on_step_end(self, run, step):
        """After update number `step` (1-based)."""

    def on_eval(self, run, step, metrics):
        """After each evaluation; keys added to `metrics` go into log.jsonl."""

    def on_train_end(self, run, final_info):
        """Keys added to `final_info` are saved, and averaged in final_info.json."""


def hooks_markdown() -> str:
    """The hook list of docs/plugins.md, generated from Plugin's docstrings (`python -m lab.cli`)."""
    import inspect

    lines = []
    for hook in PluginHooks.HOOKS:
        method = getattr(Plugin, hook)
        args = ", ".join(list(inspect.signature(method).parameters)[1:])
        lines.append(f"- `{hook}({args})`: {' '.join(inspect.getdoc(method).split())}")
    return "\n".join(lines) + "\n"


class Run:
    """What plugins see of one training run (one job: one model)."""

    def __init__(self, cfg, job, out_dir, task, train_idx, val_idx, model, device, loss, evaluate, op_spec=None,
                 seeds=None):
        self.cfg, self.job, self.op, self.seed, self.out_dir = cfg, job, job.op, job.seed, out_dir
        self.task, self.train_idx, self.val_idx = task, train_idx, val_idx
        self.model, self.optimizer, self.device = model, None, device
        self.loss = loss  # the run's loss: .probs(logits) and loss(logits, y)
        self._evaluate = evaluate  # experiment.evaluate
        self.op_spec = op_spec  # the op's registry entry (lab.ops.Op)
        self.seeds = seeds or {}  # split_seed, init_seed, batch_seed
        self.step = 0
        self.history = []  # one dict per evaluation, as in log.jsonl
        self.autocast = nullcontext  # context manager of the run's dtype, for plugins that run the model
        self.eval_outputs, self.eval_step = {}, None  # the last evaluation's outputs (see evaluate) and its step
        self.timings = {}  # seconds spent per plugin, saved in run.json
        self._outputs = (None, None)  # (step, all_outputs at that step)
        self.hooks = None  # the job's PluginHooks
        self.x_train = self.y_train = self.x_val = self.y_val = None  # the split's tokens and classes on the device
        self.batch = None  # when trained in a batch of models (lab/batched.py): (its index, the batch's size)

    def evaluate(self, x, y, keep=()) -> tuple[float, float, dict]:
        """(loss, accuracy, outputs) of the model on x, y in one eval-mode pass (experiment.evaluate); x and y may
        be on any device (run.task's are on the CPU) and are moved to the run's."""
        return self._evaluate(self.model, x.to(self.device), y.to(self.device), self.autocast, self.loss, keep)

    def all_outputs(self) -> dict:
        """{"logits": (n_pairs, n_classes), capture module name: (n_pairs, d_model)} on the CPU, float32, rows in
        the task's order, at the current step, in eval mode. Computed once per step and shared by the plugins
        that ask; at an evaluation step the validation rows come from the evaluation's own forward pass."""
        if self._outputs[0] == self.step:
            return self._outputs[1]
        names = tuple(self.model.capture_modules.values())
        task = self.task
        if self.eval_step != self.step:  # step 0, or a step between evaluations
            _, _, self.eval_outputs = self.evaluate(task.x[self.val_idx], task.y[self.val_idx], names)
            self.eval_step = self.step
        _, _, train = self.evaluate(task.x[self.train_idx], task.y[self.train_idx], names)
        merged = {}
        for name in ("logits", *names):
            part_train, part_val = train[name].cpu().float(), self.eval_outputs[name].cpu().float()
            full = torch.empty(len(task.y), part_train.shape[1])
            full[self.train_idx], full[self.val_idx] = part_train, part_val
            merged[name] = full
        self._outputs = (self.step, merged)
        return merged


class PluginHooks:
    """Calls each hook on the plugins that override it; wraps failures in PluginError. Every hook is callable,
    with no plugin a no-op; the dispatch holds no model: one PluginHooks per Run.

    A hook returns the list of its plugins' return values; transform_batch instead passes each plugin's
    batch on to the next and returns the last (x, y).
    """

    HOOKS = ("init_model", "param_groups", "on_train_begin", "transform_batch", "on_after_backward", "on_step_end",
             "on_eval", "on_train_end")

    def __init__(self, plugins: list):
        self.plugins = plugins = sorted(plugins, key=lambda p: p.last)  # stable: the others keep their order
        for hook in self.HOOKS:
            users = [p for p in plugins if getattr(type(p), hook) is not getattr(Plugin, hook)]
            setattr(self, hook, self._caller(hook, users))

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
                                      f"({where(e)})") from e
                results.append(out)
            return args[1:] if hook == "transform_batch" else results

        return call


def where(error: BaseException) -> str:
    """'file.py, line N, in function' of the innermost frame of an exception's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "no traceback"
    frame = frames[-1]
    return f"{frame.filename}, line {frame.lineno}, in {frame.name}"


# ----------------------------------------------------------------------------- train / eval

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


class HookPoint(nn.Module):
    """An identity module, named hook_* in the model (TransformerLens's convention), where a forward hook reads an
    activation or returns one to replace it: forward_hooks(model, {"blocks.0.hook_pattern": fn}). The model asks
    hooked() before calling it, so with nothing attached it costs an attribute check, not a module call."""

    def forward(self, x):
        return x

    def hooked(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)


def hook_points(model: nn.Module) -> list:
    """The dotted names of a model's hook points, in order."""
    return [name for name, module in model.named_modules() if isinstance(module, HookPoint)]


def count_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class CaptureSchedule(Plugin):
    """Calls self.snapshot(run, step, reason) at step 0, every capture_every updates, at the last update, and when
    val accuracy first exceeds each of capture_thresholds; one call per step. A scheduled snapshot at an
    evaluation step is taken after the evaluation, so that run.all_outputs() reuses its forward pass."""

    batchable = True

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
        self.folder = os.path.join(run.out_dir, ACTIVATIONS)
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
        write_json(os.path.join(self.folder, INDEX), self.index)
        run.timings[self.name] = run.timings.get(self.name, 0.0) + time.perf_counter() - start

class Norms(Plugin):
    """Logs weight norm, logit norm and softmax collapse at every evaluation (into log.jsonl).

    param_norm: L2 norm of all parameters (Omnigrok, Liu et al. 2022).
    logit_norm: mean L2 norm of the training examples' logit vectors.
    softmax_collapse: share of training examples whose softmax probability of the true class is exactly 1.0 in
    the run's float type (Prieto et al. 2025, "Grokking at the edge of numerical stability").
    grad_norm: L2 norm of the last update's gradient as the optimizer received it (after on_after_backward, e.g.
    grokfast's filter; in a full-batch run the whole training loss's gradient); absent at step 0 and in a batch of
    models.
    Costs one forward over the training pairs per evaluation.
    """

    batchable = True

    name = "norms"

    @torch.inference_mode()
    def on_eval(self, run, step, metrics):
        metrics["param_norm"] = M.param_norm(run.model)
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        if grads and run.batch is None:  # a batch's gradients live in its stacked parameters
            metrics["grad_norm"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
        x, y = run.task.x[run.train_idx].to(run.device), run.task.y[run.train_idx].to(run.device)
        _, _, outputs = run.evaluate(x, y)
        metrics.update(M.logit_stats(outputs["logits"], y, run.loss))  # logits (n_train, n_classes)


class EmbeddingProbe(CaptureSchedule):
    """A measure of the residues' token embedding (p, d), taken at each capture step into {name}.jsonl, for the ops
    `applies` accepts (read from the op's OPS entry: lab.ops)."""

    only_for = ""  # the ops it applies to, in words

    def applies(self, op, n_classes: int) -> bool: ...

    def on_train_begin(self, run):
        self.active = self.applies(run.op_spec, run.task.n_classes)
        if not self.active:
            if run.seed == 0:  # once per op, not once per seed
                print(f"experiment.py: {self.name} plugin: not meaningful for {run.op} (only for "
                      f"{self.only_for}); not measured", file=sys.stderr)
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
            embedding = run.model.token_embedding_matrix()[run.task.offset: run.task.offset + run.task.n_classes]
            embedding = embedding.detach().float().cpu()
        self.rows.append({"step": step, **self.measure(run, embedding)})
        write_jsonl(os.path.join(run.out_dir, f"{self.name}.jsonl"), self.rows)

    def measure(self, run, embedding) -> dict: ...


class FourierEmbedding(EmbeddingProbe):
    """Nanda et al. 2023's progress measure: how sparse the token embedding is in the Fourier basis.

    fourier.jsonl rows: step, topk_frac (share of the power in the top --fourier_topk non-constant
    frequencies), key_freqs (those frequencies), spectrum (power share of frequencies 0..p//2).
    """

    name = "fourier"
    only_for = "ops that add or subtract residues"

    def applies(self, op, n_classes):
        return in_residue_order(op, n_classes)

    def measure(self, run, embedding):
        spectrum = M.fourier_spectrum(embedding)
        topk_frac, key_freqs = M.fourier_sparsity(spectrum, run.cfg.fourier_topk)
        return {"topk_frac": topk_frac, "key_freqs": key_freqs, "spectrum": (spectrum / spectrum.sum()).tolist()}


class RepresentationQuality(EmbeddingProbe):
    """Liu et al. 2022's representation quality index of the token embedding, for ops that add residues.

    rqi.jsonl rows: step, rqi (share of closed parallelograms at tolerance --rqi_tol).
    """

    name = "rqi"
    only_for = "ops that add residues"

    def applies(self, op, n_classes):
        return adds(op, n_classes)

    def measure(self, run, embedding):
        return {"rqi": M.representation_quality(embedding, run.cfg.rqi_tol)}


class ProgressMeasures(Plugin):
    """Every progress measure on one time axis, into measures.jsonl: every measure_every updates from the
    memorisation step (train accuracy >= 0.99 at an evaluation) until measure_dense_after updates past the
    grokking step, every measure_sparse_every before and after that, and at 0 and the end.

    Rows: {"step", "train_acc", "val_acc", "key_freqs", "values": {layer: {split: {metric: value}}}} with layers
    first/last (representation_metrics at the answer position, all 9409 pairs), model (param_norm; logit_norm and
    softmax_collapse on the training pairs; weight_alpha, the weights' heavy-tail exponent; loss_lowfreq, the
    training loss's low-frequency power since memorisation; restricted_loss, excluded_loss, logit_key_frac for
    cyclic ops) and embedding (fourier_topk_frac for cyclic ops, rqi for ops that add residues). The validation
    pairs' activations come from the evaluation's own forward pass (hooks), so a measurement costs one forward over
    the training pairs.
    """

    batchable = True

    name = "measures"

    def on_train_begin(self, run):
        task = run.task
        self.layers = run.model.capture_modules  # layer -> module name
        self.is_train = torch.zeros(len(task.y), dtype=torch.bool)
        self.is_train[run.train_idx] = True
        self.samples = M.metric_samples(self.is_train, run.seeds["split_seed"])
        cyclic = cyclic_coordinates(task, run.op_spec) if run.op_spec is not None else None
        self.fourier = None
        if cyclic is not None:
            rows, i, j, m, sign, residues = cyclic
            self.fourier = (rows, M.FourierBasis(i, j, m, sign))
            self.embedding_rows = task.offset + residues  # token ids in group order: x_div_y's embedding in log coordinates
        elif run.seed == 0:  # once per op, not once per seed
            print(f"experiment.py: measures plugin: restricted/excluded loss and the Fourier measures need a cyclic "
                  f"group; {run.op} is not one, so they are not measured (the other measures are)", file=sys.stderr)
        self.rows, self.grok_step, self.memorised, self.seconds, self.losses = [], None, False, 0.0, []
        self.path = os.path.join(run.out_dir, MEASURES)
        self.measure(run, 0)

    def due(self, cfg, step) -> bool:
        dense = self.memorised and (self.grok_step is None or step <= self.grok_step + cfg.measure_dense_after)
        return step == cfg.steps or step % (cfg.measure_every if dense else cfg.measure_sparse_every) == 0

    def on_eval(self, run, step, metrics):
        self.memorised = self.memorised or memorised(metrics["train_acc"])  # plot.py's memorisation step
        if self.memorised:
            self.losses.append(metrics["train_loss"])  # every evaluation's, for loss_lowfreq
        if self.due(run.cfg, step):
            self.measure(run, step)
        if self.grok_step is None and grokked(metrics["val_acc"]):
            self.grok_step = step

    def measure(self, run, step):
        start = time.perf_counter()
        whole = run.all_outputs()  # name -> (n_pairs, .), rows = all pairs
        correct = whole["logits"].argmax(-1) == run.task.y
        train_acc = correct[self.is_train].float().mean().item()
        val_acc = correct[~self.is_train].float().mean().item()
        values = {}
        for layer, name in self.layers.items():
            for metric, split, value in M.representation_metrics(whole[name], run.task.y, self.is_train,
                                                                 self.samples):
                values.setdefault(layer, {}).setdefault(split, {})[metric] = value
        model_values = {"all": {"param_norm": M.param_norm(run.model), "weight_alpha": M.weight_alpha(run.model)},
                        "train": M.logit_stats(whole["logits"][self.is_train], run.task.y[self.is_train], run.loss)}
        lowfreq = M.lowfreq_power(self.losses)
        if math.isfinite(lowfreq):  # from LOWFREQ_MIN evaluations after memorisation on
            model_values["train"]["loss_lowfreq"] = lowfreq
        row = {"step": step, "train_acc": train_acc, "val_acc": val_acc}
        if self.fourier is not None:
            rows, basis = self.fourier
            nanda = M.fourier_progress(whole["logits"][rows], run.task.y[rows], self.is_train[rows], basis,
                                       run.cfg.fourier_topk, run.loss)
            row["key_freqs"] = nanda.pop("key_freqs")
            model_values["train"]["excluded_loss"] = nanda.pop("excluded_loss")
            model_values["all"].update({k: nanda[k] for k in ("restricted_loss", "logit_key_frac")})
            with torch.no_grad():
                embedding = run.model.token_embedding_matrix()[self.embedding_rows].detach().float().cpu()
            spectrum = M.fourier_spectrum(embedding)
            values["embedding"] = {"all": {"fourier_topk_frac": M.fourier_sparsity(spectrum, run.cfg.fourier_topk)[0]}}
            if adds(run.op_spec, run.task.n_classes):
                values["embedding"]["all"]["rqi"] = M.representation_quality(embedding, run.cfg.rqi_tol)
        values["model"] = model_values
        row["values"] = values
        self.rows.append(row)
        if step % run.cfg.capture_every == 0 or step == run.cfg.steps:  # as log.jsonl: readable while it trains
            write_jsonl(self.path, self.rows)
        self.seconds += time.perf_counter() - start
        run.timings[self.name] = self.seconds


REGISTERING = set()  # plugin files that added a registry entry once (loading one again may assign the same objects)


def load_plugin_file(path: str, registries: tuple = ()) -> list:
    """The Plugin subclasses defined in a user's .py file. A file may instead (or too) add entries to the
    registries (experiment.py's dicts: an optimizer, a schedule, an op); one that does neither is refused."""
    if not os.path.isfile(path):
        raise UsageError(f"plugin file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"user_plugin_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    before = [dict(registry) for registry in registries]
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"plugin file {path} failed to load: {type(e).__name__}: {e}")
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, Plugin) and obj is not Plugin
             and obj.__module__ == module.__name__]
    if any(registry.keys() != old.keys() or any(registry[k] is not old[k] for k in registry)
           for registry, old in zip(registries, before)):
        REGISTERING.add(os.path.abspath(path))
    if not found and os.path.abspath(path) not in REGISTERING:
        raise UsageError(f"plugin file {path} defines no subclass of experiment.Plugin and adds no entry to a "
                         "registry of experiment.py")
    return found


RESEARCH_PLUGINS = (ActivationCapture, ProgressMeasures, Norms, FourierEmbedding, RepresentationQuality)


def check_model(model: nn.Module, task, name: str) -> None:
    """The model contract (docs/experiment.md, "Models"), checked when a run builds its model: forward(tokens
    (n, seq)) -> logits (n, n_classes); capture_modules, a dict with "first" and "last" naming submodules whose
    output (or its [0]) is (n, positions, d); token_embedding_matrix() -> (n_vocab, d). Raises UsageError with one
    line naming what is missing. The capture reads each module's last position: the answer's. Runs one eval-mode
    forward of two pairs and leaves every RNG as it was."""
    def broken(what):
        return UsageError(f"model {name!r} ({type(model).__name__}) breaks the model contract: {what} "
                          "(docs/experiment.md, Models)")

    modules = getattr(model, "capture_modules", None)
    if not isinstance(modules, dict) or not {"first", "last"} <= set(modules):
        raise broken("capture_modules must be a dict with keys 'first' and 'last' naming submodules")
    for layer, module in modules.items():
        try:
            model.get_submodule(module)
        except AttributeError:
            raise broken(f"capture_modules[{layer!r}] = {module!r} is not a submodule")
    if not callable(getattr(model, "token_embedding_matrix", None)):
        raise broken("it has no token_embedding_matrix() method")
    seen = {}

    def hold(module_name, module, inputs, output):
        seen[module_name] = tuple((output[0] if isinstance(output, tuple) else output).shape)

    x = task.x[:2].to(next(model.parameters()).device)
    training, rng = model.training, torch.get_rng_state()
    try:
        model.eval()
        with torch.no_grad(), forward_hooks(model, {m: hold for m in modules.values()}):
            logits = model(x)
            embedding = model.token_embedding_matrix()
    except Exception as e:
        raise broken(f"a forward pass of two pairs failed: {type(e).__name__}: {e} ({where(e)})")
    finally:
        model.train(training)
        torch.set_rng_state(rng)
    if tuple(logits.shape) != (2, task.n_classes):
        raise broken(f"forward() gave shape {tuple(logits.shape)}, not (n, n_classes) = (2, {task.n_classes})")
    for module, shape in seen.items():
        if len(shape) != 3 or shape[0] != len(x):
            raise broken(f"{module} outputs shape {shape}, not (n, positions, d) = (2, positions, d)")
    if embedding.dim() != 2 or embedding.shape[0] < task.n_vocab:
        raise broken(f"token_embedding_matrix() has shape {tuple(embedding.shape)}, not ({task.n_vocab}, d)")
