"""The cni-log record writer's one-pass encoding equals the general per-record encoder, for every style."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio import otlpwire
from tapio.pdata import Batch, Signal
from tapio.receivers.cni_log._parser import LineParser, plugin_for_path, severity
from tapio.receivers.cni_log._records import SCOPE_NAME, SCOPE_VERSION, RecordWriter

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


def test_fixtures_cover_every_style() -> None:
    parser = LineParser()
    styles = {parser.parse(line, "").style for line in LINES}
    assert {"calico", "cilium", "multus", "aws-vpc-cni", "azure-cni", "kv"} <= styles


@pytest.mark.parametrize("path", ["/var/log/calico/cni/cni.log", "/var/log/aws-routed-eni/plugin.log", "/var/run/multus/multus.log", "/logs/other.log"])
def test_fast_path_equals_general(path: str) -> None:
    parser = LineParser()
    oversize = "2024-05-01 10:00:00.123 [INFO][4242] k8s.go 73: " + "x" * 70_000
    multiline = LINES[0] + "\n  continued\n\tstack frame"
    lines = [*LINES, oversize, multiline, "", "plain text no style", "héllo \ufffd"]
    truncated = frozenset({len(LINES), 3})
    writer = RecordWriter(parser, RESOURCE)
    for observed in (1_700_000_000_123_456_789, 0):
        written = writer.write(path, lines, observed, truncated)
        assert written.request == general(parser, path, lines, observed, truncated)
        assert written.count == len(lines) == sum(written.styles.values())
    records = Batch.from_bytes(Signal.LOGS, written.request).requests[0].resource_logs[0].scope_logs[0].log_records
    assert [r.body.string_value for r in records] == lines


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(LINES), st.text(max_size=300)), max_size=20), st.integers(0, 2**64 - 1))
def test_fast_path_equals_general_fuzzed(lines: list[str], observed: int) -> None:
    parser = LineParser()
    truncated = frozenset(range(0, len(lines), 3))
    written = RecordWriter(parser, RESOURCE).write("/var/log/cni.log", lines, observed, truncated)
    assert written.request == general(parser, "/var/log/cni.log", lines, observed, truncated)
