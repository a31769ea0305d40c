"""Config helpers that need no script: flag types, defaults, the field comments, config.json both ways, and the
contract: the names lab reads from experiment.py (the module is passed in as `E`, never imported by name)."""

import argparse
import dataclasses
import importlib.util
import inspect
import os
import sys
import typing

from lab.plugins import UsageError

RUNTIME_FIELDS = ("out_dir", "workers", "overwrite", "progress", "ray_address")  # fields that never change a number

# What lab reads from experiment.py, and where: a script without one of them, or with one that is not callable
# where a function is read, is refused in one line before anything is written (check_contract).
CONTRACT = {
    "Config": "the dataclass of every flag (lab.cli, lab.runner, lab.job, lab.sweep)",
    "OPS": "op name -> lab.ops.Op (lab.cli, lab.runner, plot.py)",
    "PRESETS": "preset name -> the Config values it sets (lab.cli)",
    "MODELS": "lab.cli's check of --model", "LOSSES": "lab.cli's check of --loss; lab.batched",
    "OPTIMIZERS": "lab.cli's check of --optimizer; lab.batched", "SCHEDULES": "lab.cli; lab.batched",
    "SAMPLERS": "lab.cli; lab.batched", "ACTIVATIONS": "lab.cli's check of --activation",
    "INITS": "lab.cli's check of --init",
    "task_of": "(cfg, op) -> lab.ops.Task: the pairs of an op (lab.cli, lab.job, lab.batched)",
    "build_model": "(cfg, task) -> nn.Module (lab.cli, lab.job, lab.batched)",
    "plugin_classes": "(cfg) -> the run's plugin classes (lab.cli, lab.batched)",
    "prepare": "(cfg, job) -> lab.plugins.Run, a job ready to train (lab.batched)",
    "final_info_of": "(run, step_val_acc_99) -> final_info (lab.batched)",
    "train_one": "(cfg, job, report) -> the job's record (lab.runner, lab.raycluster)",
    "make_update": "(run) -> update(step): one model's training step, which lab.batched mirrors",
    "adamw": "the optimizer whose source lab.batched mirrors", "perp_adamw": "the same",
    "orthogonal_gradients": "the same",
}
CALLABLE = ("Config", "task_of", "build_model", "plugin_classes", "prepare", "final_info_of", "train_one",
            "make_update", "adamw", "perp_adamw", "orthogonal_gradients")


def check_contract(E) -> None:
    """Raise UsageError, one line, when the experiment module lacks a name of CONTRACT or has a non-callable one."""
    missing = [name for name in CONTRACT if not hasattr(E, name)]
    broken = [name for name in CALLABLE if hasattr(E, name) and not callable(getattr(E, name))]
    if missing or broken:
        what = "; ".join([*(f"{n} is missing ({CONTRACT[n]})" for n in missing),
                          *(f"{n} is not callable ({CONTRACT[n]})" for n in broken)])
        raise UsageError(f"{getattr(E, '__file__', 'the experiment module')} breaks the contract with lab/ "
                         f"(docs/experiment.md): {what}")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_type(annotation):
    """argparse type for a Config annotation: int, float, str, bool or tuple[X, ...]."""
    if annotation is bool:
        return parse_bool
    if typing.get_origin(annotation) is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}

        def parse_list(text):
            return tuple(item(part) for part in text.split(",") if part.strip())

        parse_list.__name__ = f"comma-separated {item.__name__} list"
        return parse_list
    return annotation


def field_comments(Config) -> dict:
    """The trailing '# ...' comment of each Config field: its --help text and its line in docs/experiment.md."""
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def defaults(Config) -> dict:
    """Field -> its default value."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(Config)}


def field_defaults(Config) -> dict:
    """Field -> its default as written on the command line (lists comma-separated)."""
    return {name: ",".join(map(str, d)) if isinstance(d, tuple) else d for name, d in defaults(Config).items()}


def config_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(Config, saved: dict):
    """A Config from a saved config.json: unknown keys are ignored, missing ones take today's defaults."""
    hints = typing.get_type_hints(Config)
    known = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in saved.items() if k in hints}
    return Config(**known)


def load_script(path: str, name: str):
    """A script (experiment.py, plot.py) imported from its path under `name`, once per process: how lab gets the
    module it is handed when it starts itself (a worker of a pool or of Ray, the docs' generator)."""
    if name in sys.modules and os.path.abspath(getattr(sys.modules[name], "__file__", "")) == os.path.abspath(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
