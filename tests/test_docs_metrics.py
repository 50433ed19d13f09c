"""docs/metrics.md lists every self-telemetry metric name the code uses, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: tapio_-prefixed strings in the code that are not metrics (BPF program names, a YAML node flag)
NOT_METRICS = {"tapio_dns_tc_eg", "tapio_dns_tc_in", "tapio_explicit_tag"}


def code_metrics() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tapio").rglob("*.py"):
        if "testing" in path.relative_to(ROOT / "tapio").parts:
            continue
        names |= set(re.findall(r'"(tapio_[a-z0-9_]+)"', path.read_text()))
    return names - NOT_METRICS


def test_the_metrics_reference_lists_every_metric_of_the_code():
    listed = set(re.findall(r"^\| `(tapio_[a-z0-9_]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    code = code_metrics()
    assert not code - listed, f"add to docs/metrics.md: {sorted(code - listed)}"
    assert not listed - code, f"no longer in the code, remove from docs/metrics.md: {sorted(listed - code)}"
