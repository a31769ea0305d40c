"""The README is a guide and docs/ the reference: every link resolves, every flag is documented, no lab-notebook words."""
import dataclasses
import os
import re
import shutil

import experiment as E
from conftest import ROOT
from lab.cli import regenerate_docs

DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))


def test_readme_is_short_and_every_link_and_image_resolves():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) < 15000
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: {target}"


def test_flags_and_hooks_are_documented_once_from_the_code(tmp_path):
    """docs/experiment.md's flag table and docs/plugins.md's hook list are what `python -m lab.cli` generates from
    the Config comments and the Plugin docstrings: editing either without regenerating fails here."""
    reference = open(os.path.join(ROOT, "docs", "experiment.md"), encoding="utf-8").read()
    missing = [f.name for f in dataclasses.fields(E.Config) if f"`--{f.name}`" not in reference]
    assert not missing, f"docs/experiment.md lacks {missing}"
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    regenerate_docs(str(tmp_path), E)
    for name in ("experiment.md", "plugins.md"):
        assert (tmp_path / "docs" / name).read_text() == open(os.path.join(ROOT, "docs", name)).read(), \
            f"docs/{name} is stale: run python -m lab.cli"
    assert "`on_after_backward(run, step)`" in (tmp_path / "docs" / "plugins.md").read_text()


def test_no_words_about_how_the_work_was_done():
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        assert not re.search(r"session|device tool|this machine", text, re.IGNORECASE), path
