"""The cni-log record writer's one-pass encoding equals the general per-record encoder, for every style, on both paths (compiled helper and Python)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio import otlpwire
from tapio.pdata import Batch, Signal
from tapio.receivers.cni_log._parser import LineParser, plugin_for_path, severity
from tapio.receivers.cni_log import _records
from tapio.receivers.cni_log._records import SCOPE_NAME, SCOPE_VERSION, RecordWriter
from tapio.testing import prereq

FIXTURES = Path(__file__).parent / "data" / "cni"
RESOURCE = [("host.name", "node-1"), ("os.type", "linux")]
LINES = [line for f in sorted(FIXTURES.glob("*.log")) for line in f.read_text().splitlines()]


def general(parser: LineParser, path: str, lines: list[str], observed_ns: int, truncated: frozenset[int]) -> bytes:
    """The request built record by record with `otlpwire.log_record`, the reference the writer must match."""
    file_pieces = otlpwire.kv_pieces((("log.file.path", path), ("log.file.name", os.path.basename(path))))
    hint = plugin_for_path(path)
    items = []
    for i, line in enumerate(lines):
        event = parser.parse(line, hint)
        pieces = otlpwire.kv_pieces(event.attributes.items()) + file_pieces
        if i in truncated:
            pieces += otlpwire.kv_pieces((("tapio.cni.truncated", True),))
        number, text = severity(event.level)
        record = otlpwire.log_record(
            time_unix_nano=event.time_unix_nano,
            observed_time_unix_nano=observed_ns,
            severity_number=number,
            severity_text=text,
            body=line,
            attrs=otlpwire.frame(otlpwire.T_ATTR_LOG, pieces),
            event_name="",
        )
        items.append(otlpwire.item(record))
    resource = otlpwire.attributes(otlpwire.T_ATTR_RESOURCE, RESOURCE)
    return otlpwire.request(resource, otlpwire.scope(SCOPE_NAME, SCOPE_VERSION), items)


@pytest.fixture(params=[True, False], ids=["compiled", "python"])
def compiled(request: pytest.FixtureRequest) -> bool:
    """Each writer test runs with the compiled helper (the default when built) and with Python alone."""
    if request.param and _records.COMPILED is None:
        prereq.missing("the cni-log receiver's compiled line parser", _records.COMPILED_HOW)
    return request.param


def test_fixtures_cover_every_style() -> None:
    parser = LineParser()
    styles = {parser.parse(line, "").style for line in LINES}
    assert {"calico", "cilium", "multus", "aws-vpc-cni", "azure-cni", "kv"} <= styles


@pytest.mark.parametrize("path", ["/var/log/calico/cni/cni.log", "/var/log/aws-routed-eni/plugin.log", "/var/run/multus/multus.log", "/logs/other.log"])
def test_fast_path_equals_general(path: str, compiled: bool) -> None:
    parser = LineParser()
    oversize = "2024-05-01 10:00:00.123 [INFO][4242] k8s.go 73: " + "x" * 70_000
    multiline = LINES[0] + "\n  continued\n\tstack frame"
    lines = [*LINES, oversize, multiline, "", "plain text no style", "héllo \ufffd"]
    truncated = frozenset({len(LINES), 3})
    writer = RecordWriter(parser, RESOURCE, compiled=compiled)
    assert writer.compiled == compiled
    for observed in (1_700_000_000_123_456_789, 0):
        written = writer.write(path, lines, observed, truncated)
        assert written.request == general(parser, path, lines, observed, truncated)
        assert written.count == len(lines) == sum(written.styles.values())
    records = Batch.from_bytes(Signal.LOGS, written.request).requests[0].resource_logs[0].scope_logs[0].log_records
    assert [r.body.string_value for r in records] == lines


@pytest.mark.parametrize("use_compiled", [True, False], ids=["compiled", "python"])
@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(LINES), st.text(max_size=300)), max_size=20), st.integers(0, 2**64 - 1))
def test_fast_path_equals_general_fuzzed(use_compiled: bool, lines: list[str], observed: int) -> None:
    if use_compiled and _records.COMPILED is None:
        prereq.missing("the cni-log receiver's compiled line parser", _records.COMPILED_HOW)
    parser = LineParser()
    truncated = frozenset(range(0, len(lines), 3))
    written = RecordWriter(parser, RESOURCE, compiled=use_compiled).write("/var/log/cni.log", lines, observed, truncated)
    assert written.request == general(parser, "/var/log/cni.log", lines, observed, truncated)
