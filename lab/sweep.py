"""Sweeps: a grid of runs over Config fields, `--sweep="train_frac=0.3,0.5 weight_decay=0.1,1"` (fields separated
by spaces, values by commas), each cell a run folder of its own, out_dir/{cell_name}. Here: parsing (lab.cli.check_sweep
refuses bad values before anything is written). lab/runner.py trains every cell's jobs in one pool; plot.py draws
the phase diagrams (lab/phases.py)."""

import dataclasses
import functools
import itertools
import os
import typing

from lab.config import RUNTIME_FIELDS, flag_type
from lab.files import write_json
from lab.plugins import UsageError
from lab.schema import cell_name

# Fields a sweep may not vary, and why: the rest change the trained numbers.
NOT_SWEPT = {
    **{field: "it changes no number" for field in RUNTIME_FIELDS}, "out_dir": "it is where the sweep goes",
    "sweep": "a sweep cannot hold a sweep",
    "seeds": "every cell runs seeds 0 .. seeds-1; set --seeds", "ops": "every cell runs every op; set --ops",
    "preset": "a preset sets many fields; run one sweep per preset (--preset beside --sweep)",
    "plugins": "set --plugins beside --sweep", "capture": "it changes no trained number",
    "capture_every": "it changes no trained number", "capture_thresholds": "it changes no trained number",
    "capture_dtype": "it changes no trained number", "measure": "it changes no trained number",
    "measure_every": "it changes no trained number", "measure_sparse_every": "it changes no trained number",
    "measure_dense_after": "it changes no trained number",
    "batched": "it sets how jobs train, not what they are: set --batched beside --sweep",
}


def parse(text: str, Config, errors: list | None = None) -> list[tuple[str, tuple]]:
    """[(field, (value, ...)), ...] in the order written. Raises UsageError with one line per problem, or, given
    a list `errors`, appends the lines to it and returns what parsed."""
    hints = typing.get_type_hints(Config)
    spec, found = [], [] if errors is None else errors
    for part in text.split():
        field, sep, values = part.partition("=")
        if not sep or not field:
            found.append(f"--sweep: {part!r} is not FIELD=VALUE,VALUE,... (fields separated by spaces)")
            continue
        if field not in hints:
            found.append(f"--sweep: {field} is not a Config field (python experiment.py --help lists them)")
            continue
        if field in NOT_SWEPT or typing.get_origin(hints[field]) is tuple:
            found.append(f"--sweep: {field} cannot be swept: {NOT_SWEPT.get(field, 'it holds a list')}")
            continue
        if field in dict(spec):
            found.append(f"--sweep: {field} is given twice; list all its values once: {field}=A,B")
            continue
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(flag_type(hints[field])(value))
            except (ValueError, TypeError) as e:
                found.append(f"--sweep: {field}={value!r} is not a {hints[field].__name__} ({e})")
        if not values or len(parsed) != len(set(parsed)):
            found.append(f"--sweep: {field}={values} must list distinct values, separated by commas")
        spec.append((field, tuple(parsed)))
    if not spec and not found:
        found.append(f"--sweep={text!r} names no field; e.g. --sweep=\"train_frac=0.3,0.5 weight_decay=0.1,1\"")
    if found and errors is None:
        raise UsageError("\n".join(dict.fromkeys(found)))
    return spec


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed --sweep: its fields with their values, in the order written, and its cells."""

    text: str
    fields: tuple  # ((field, (value, ...)), ...)

    @property
    def cells(self) -> list[tuple]:
        """Every cell, ((field, value), ...) in the sweep's order; [()] for no sweep."""
        names = [f for f, _ in self.fields]
        return [tuple(zip(names, values)) for values in itertools.product(*(v for _, v in self.fields))]


@functools.lru_cache(maxsize=None)
def of(text: str, Config) -> Sweep:
    """The Sweep of a --sweep string (parsed once per string; a bad one raises UsageError): Sweep("", ()) for none."""
    return Sweep(text, tuple(parse(text, Config)) if text else ())


def cells(cfg) -> list[tuple]:
    """Every cell of cfg's sweep, ((field, value), ...) in the sweep's order; [()] without a sweep."""
    return of(cfg.sweep, type(cfg)).cells


def cell_config(cfg, cell: tuple):
    """The resolved Config of one cell: its values, no sweep, out_dir its folder."""
    return dataclasses.replace(cfg, **dict(cell), sweep="", out_dir=os.path.join(cfg.out_dir, cell_name(cell)))


def write_sweep_json(cfg, path: str) -> None:
    spec = of(cfg.sweep, type(cfg))
    write_json(path, {"sweep": cfg.sweep, "fields": [f for f, _ in spec.fields],
                      "values": {f: list(v) for f, v in spec.fields}, "ops": list(cfg.ops), "seeds": cfg.seeds,
                      "cells": [{"name": cell_name(c), "values": dict(c)} for c in spec.cells]})
