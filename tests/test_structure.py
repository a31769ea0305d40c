"""The house: imports run one way (no lab module imports a script, no circle among lab's modules), and the names lab
reads from experiment.py are one contract, refused in one line when broken."""
import ast
import os
import types

import pytest

import experiment as E
from conftest import ROOT
from lab.config import CONTRACT, check_contract
from lab.plugins import UsageError

LAB = os.path.join(ROOT, "lab")


def imports_of(path: str) -> set:
    """Every module name an import statement of the file names, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "lab":
                found |= {f"lab.{alias.name}" for alias in node.names}
    return found


def lab_graph() -> dict:
    return {f"lab.{name[:-3]}": {m for m in imports_of(os.path.join(LAB, name)) if m.startswith("lab.")}
            for name in os.listdir(LAB) if name.endswith(".py") and name != "__init__.py"}


def test_no_lab_module_imports_a_script():
    for name in os.listdir(LAB):
        if name.endswith(".py"):
            assert not imports_of(os.path.join(LAB, name)) & {"experiment", "plot"}, name


def test_lab_has_no_import_circle():
    graph, state = lab_graph(), {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    assert len(graph) > 15
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_a_circle_is_found_when_there_is_one(monkeypatch):
    """The check above can fail: a graph with a circle trips it."""
    import test_structure as me

    monkeypatch.setattr(me, "lab_graph", lambda: {**{f"lab.m{i}": set() for i in range(16)},
                                                  "lab.a": {"lab.b"}, "lab.b": {"lab.a"}})
    with pytest.raises(AssertionError, match="lab.a -> lab.b -> lab.a"):
        test_lab_has_no_import_circle()


def test_the_contract_holds_for_experiment_py_and_a_broken_one_is_refused_in_one_line():
    check_contract(E)
    broken = types.ModuleType("experiment")
    broken.__file__ = "my_experiment.py"
    for name in CONTRACT:
        setattr(broken, name, getattr(E, name))
    del broken.train_one
    broken.build_model = None
    with pytest.raises(UsageError) as info:
        check_contract(broken)
    message = str(info.value)
    assert "\n" not in message and "my_experiment.py" in message
    assert "train_one is missing" in message and "build_model is not callable" in message


def test_every_name_of_the_contract_is_read_by_lab():
    """CONTRACT lists what lab reads as E.<name>, no more and no less."""
    read = set()
    for name in os.listdir(LAB):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(LAB, name)).read())):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "E":
                    read.add(node.attr)
    read -= {"__doc__"}
    registries = {"MODELS", "LOSSES", "OPTIMIZERS", "SCHEDULES", "SAMPLERS"}  # read by name (lab.cli.REGISTRY_FIELDS)
    assert read | registries == set(CONTRACT)
