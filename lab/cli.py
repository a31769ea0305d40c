"""Config flags and their validation: every Config field is a --field=value flag, checked before any file is
written. `E` below is the experiment module (experiment.py): its Config and registries."""

import argparse
import dataclasses
import os
import sys
import typing

import torch

from lab import sweep
from lab.config import check_contract, defaults, field_comments, field_defaults, flag_type, load_script
from lab.ops import is_prime
from lab.plugins import UsageError
from lab.schema import cell_name
from lab.trackers import TRACKERS, tracker_names


REGISTRY_FIELDS = {"model": "MODELS", "loss": "LOSSES", "optimizer": "OPTIMIZERS", "schedule": "SCHEDULES",
                   "sampler": "SAMPLERS"}  # Config field -> the registry of experiment.py that names its values


def validate(cfg, E) -> None:
    """Raise UsageError naming the first problem in cfg. Creates nothing. Plugin files are loaded first: they may
    add entries to experiment.py's registries (an op, a model, a loss)."""
    check_contract(E)
    if any(t not in TRACKERS for t in tracker_names(cfg.tracker)):
        raise UsageError(f"--tracker={cfg.tracker}: choose none, or from {','.join(TRACKERS)} (comma-separated)")
    for plugin in E.plugin_classes(cfg):  # raises UsageError for an unknown plugin or a broken plugin file
        plugin.check_config(cfg)
    _check_ops(cfg, E)
    _check_numbers(cfg)
    _check_choices(cfg, E)
    _check_out_dir(cfg)
    with torch.random.fork_rng(devices=[]):  # the model contract, once per op, before anything is written
        for op in cfg.ops:
            E.build_model(cfg, E.task_of(cfg, op))
    if cfg.sweep:
        check_sweep(cfg, E)


def _check_ops(cfg, E) -> None:
    bad = [op for op in cfg.ops if op not in E.OPS]
    if bad or not cfg.ops:
        raise UsageError(f"unknown op {','.join(bad) or '(none)'}: choose from {','.join(E.OPS)}")
    if len(set(cfg.ops)) != len(cfg.ops):
        raise UsageError(f"--ops lists an op twice: {','.join(cfg.ops)}")
    if cfg.p < 3:
        raise UsageError(f"--p={cfg.p}: the modulus must be at least 3")
    for op in cfg.ops:
        if E.OPS[op].prime and not is_prime(cfg.p):
            raise UsageError(f"--p={cfg.p} is not prime; {op} needs a prime modulus (e.g. 97)")


def _check_numbers(cfg) -> None:
    if not 0 < cfg.train_frac < 1:
        raise UsageError(f"--train_frac={cfg.train_frac} must lie strictly between 0 and 1")
    for name in ("steps", "seeds", "eval_every", "num_layers", "d_model", "n_heads", "capture_every",
                 "measure_every", "measure_sparse_every", "grokfast_window"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name}={getattr(cfg, name)} must be at least 1")
    if not 2 <= cfg.perm_k <= 6:
        raise UsageError(f"--perm_k={cfg.perm_k} must be between 2 and 6")
    if cfg.d_model % cfg.n_heads:
        raise UsageError(f"--d_model={cfg.d_model} must be divisible by --n_heads={cfg.n_heads}")
    for name in ("lr", "weight_decay", "warmup_steps", "workers", "threads", "rqi_tol", "batch_size",
                 "checkpoint_every", "d_mlp"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name}={getattr(cfg, name)} must not be negative")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and 0 <= cfg.grokfast_alpha < 1):
        raise UsageError("--beta1, --beta2 and --grokfast_alpha must lie in [0, 1)")
    for name in ("measure_every", "measure_sparse_every"):
        if getattr(cfg, name) % cfg.eval_every:
            raise UsageError(f"--{name}={getattr(cfg, name)} must be a multiple of --eval_every={cfg.eval_every} "
                             "(measurements reuse the evaluation's forward pass)")
    if cfg.measure_dense_after < 0:
        raise UsageError(f"--measure_dense_after={cfg.measure_dense_after} must not be negative")
    if cfg.fourier_topk < 1:
        raise UsageError(f"--fourier_topk={cfg.fourier_topk} must be at least 1")


def _check_choices(cfg, E) -> None:
    for name, registry in REGISTRY_FIELDS.items():
        known = getattr(E, registry)
        if getattr(cfg, name) not in known:
            raise UsageError(f"--{name}={getattr(cfg, name)}: choose from {','.join(known)}")
    for name, choices in (("norm", ("post", "pre", "none")), ("activation", tuple(E.ACTIVATIONS)),
                          ("init", tuple(E.INITS)), ("grokfast_filter", ("ema", "ma")), ("dtype", ("fp32", "bf16", "fp64")),
                          ("batched", ("auto", "on", "off"))):
        if getattr(cfg, name) not in choices:
            raise UsageError(f"--{name}={getattr(cfg, name)}: choose from {','.join(choices)}")
    if not 0 < cfg.init_scale < float("inf"):
        raise UsageError(f"--init_scale={cfg.init_scale} must be positive")
    if not 0 <= cfg.stop_at_val_acc <= 1:
        raise UsageError(f"--stop_at_val_acc={cfg.stop_at_val_acc} must lie in [0, 1]")
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


def _check_out_dir(cfg) -> None:
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UsageError(f"--out_dir={cfg.out_dir} is an existing file, not a folder")
    existing = os.path.abspath(cfg.out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir={cfg.out_dir} cannot be written ({existing} is not a writable folder)")


def check_sweep(cfg, E) -> None:
    """Refuse bad sweep values before anything is written: each value alone, then each cell (for combinations
    such as d_model and n_heads), one line per problem."""
    errors = []
    spec = sweep.parse(cfg.sweep, E.Config, errors)  # a value that does not parse, then each that parses but is bad
    for field, values in spec:
        for value in values:
            try:
                validate(dataclasses.replace(cfg, sweep="", **{field: value}), E)
            except UsageError as e:
                errors.append(f"--sweep {field}={value}: {e}")
    if not errors:
        for cell in sweep.cells(cfg):
            try:
                validate(dataclasses.replace(cfg, sweep="", **dict(cell)), E)
            except UsageError as e:
                errors.append(f"--sweep cell {cell_name(cell)}: {e}")
    if errors:
        raise UsageError("\n".join(dict.fromkeys(errors)))






class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)








def parse_args(E, argv=None):
    """E.Config from flags (--field=value or --field value), validated. Exits 2 with one line on bad input."""
    comments, shown = field_comments(E.Config), field_defaults(E.Config)
    parser = _OneLineParser(prog="experiment.py", description=E.__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(E.Config)
    for f in dataclasses.fields(E.Config):
        is_bool = hints[f.name] is bool
        parser.add_argument(f"--{f.name}", type=flag_type(hints[f.name]), default=argparse.SUPPRESS,
                            nargs="?" if is_bool else None, const=True if is_bool else None,
                            metavar=hints[f.name].__name__.upper() if isinstance(hints[f.name], type) else "LIST",
                            help=f"{comments.get(f.name, '')} (default: {shown[f.name]})".replace("%", "%%"))
    try:
        cfg = resolve(E, vars(parser.parse_args(argv)))
        validate(cfg, E)
    except UsageError as e:
        for line in str(e).splitlines():  # a sweep's bad values: one line each
            print(f"experiment.py: error: {line}", file=sys.stderr)
        raise SystemExit(2)
    return cfg


def resolve(E, flags: dict):
    """E.Config from the flags given: the defaults, then the preset's values (the flag's preset, else the default
    one), then the flags."""
    preset = flags.get("preset", defaults(E.Config)["preset"])
    if preset not in E.PRESETS:
        raise UsageError(f"--preset={preset}: choose from {','.join(E.PRESETS)}")
    return E.Config(**{**defaults(E.Config), **E.PRESETS[preset], **flags})






def flags_markdown(Config) -> str:
    """The docs/experiment.md table of every flag, generated from the Config comments (`python -m lab.cli`)."""
    comments, shown = field_comments(Config), field_defaults(Config)
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for name, default in shown.items():
        lines.append(f"| `--{name}` | {f'`{default}`' if default != '' else '(none)'} | {comments.get(name, '')} |")
    return "\n".join(lines) + "\n"


def regenerate_docs(root: str, E) -> None:
    """Rewrite the generated blocks of docs/: the flag table (docs/experiment.md) and the hook list
    (docs/plugins.md), each between its two marker lines."""
    from lab.files import write_text
    from lab.plugins import hooks_markdown

    for name, text in (("experiment.md", flags_markdown(E.Config)), ("plugins.md", hooks_markdown())):
        path = os.path.join(root, "docs", name)
        with open(path) as f:
            head, rest = f.read().split(DOC_BEGIN)
        write_text(path, head + DOC_BEGIN + text + rest[rest.index(DOC_END):])


DOC_BEGIN, DOC_END = "<!-- generated by python -m lab.cli -->\n", "<!-- end of generated text -->"

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    regenerate_docs(root, load_script(os.path.join(root, "experiment.py"), "experiment"))
