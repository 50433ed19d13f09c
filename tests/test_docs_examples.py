"""Every complete pipelines example in the README and docs/ validates against the real registry.

A block counts as complete when it is YAML with a ``service:`` section;
fragments (a single component's settings) are checked by each component's
own doc test instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tapio.builtin import default_registry
from tapio.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def examples() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for i, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", page.read_text(), flags=re.S)):
            if re.search(r"^service:", block, flags=re.M) and "receivers:" in block:
                out.append((f"{page.relative_to(ROOT)}#{i}", block))
    return out


EXAMPLES = examples()


def test_there_are_examples():
    assert any(name.startswith("README.md") for name, _ in EXAMPLES)


@pytest.mark.parametrize("name,text", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_example_validates(tmp_path, name, text):
    path = tmp_path / "example.yaml"
    path.write_text(text)
    try:
        load_config([path], default_registry(), env={})
    except ConfigError as e:
        errors = [str(p) for p in e.problems if p.severity == "error"]
        pytest.fail(f"{name} does not validate:\n" + "\n".join(errors))
