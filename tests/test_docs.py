"""The README is a guide and docs/ the reference: every link resolves, every flag is documented, no lab-notebook words."""
import dataclasses
import os
import re

import experiment as E
from conftest import ROOT

DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))


def test_readme_is_short_and_every_link_and_image_resolves():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) < 15000
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: {target}"


def test_every_config_field_is_documented():
    reference = open(os.path.join(ROOT, "docs", "experiment.md"), encoding="utf-8").read()
    missing = [f.name for f in dataclasses.fields(E.Config) if f"`--{f.name}`" not in reference]
    assert not missing, f"docs/experiment.md lacks {missing}"


def test_no_words_about_how_the_work_was_done():
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        assert not re.search(r"session|device tool|this machine", text, re.IGNORECASE), path
