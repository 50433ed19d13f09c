"""Test prerequisites (a command, a device, root): a skip on a developer's machine, a failure in CI.

Invariant: with ``CI=true`` in the environment (GitHub Actions, GitLab CI and
most others set it) no test skips for a missing prerequisite: it fails, with
the same message a developer sees as the skip reason, saying what is missing
and how to get it (usually: run ``scripts/setup.sh``).
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

__all__ = ["command", "in_ci", "missing"]


def in_ci() -> bool:
    """Whether the tests run in CI (``CI`` is ``true``, ``1`` or ``yes``), where nothing may skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str, how: str) -> NoReturn:
    """Stop the current test because ``what`` is missing; ``how`` says how to get it.

    Fails the test under CI (see `in_ci`), skips it otherwise; never returns.
    """
    message = f"{what} is missing: {how}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing prerequisite fails the test instead of skipping it)", pytrace=False)
    pytest.skip(message)


def command(name: str, how: str) -> str:
    """The path of the executable ``name`` on PATH, or `missing` (with ``how`` to install it)."""
    path = shutil.which(name)
    if path is None:
        missing(f"the {name} command", how)
    return path
