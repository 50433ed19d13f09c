"""The cni-log receiver's compiled line parser (_fast.c) against the Python path, the reference.

For every line, `RecordWriter.write` with the compiled helper must give the
same request bytes and the same style counts as with the Python path forced:
fixture lines, the bench's corpus, and hypothesis-made lines (fixture lines
mutated with insertions, deletions and replacements of characters that
matter to the parsers: quotes, backslashes, brackets, '=', digits, unicode,
huge numbers, impossible dates; empty and very long lines), under several
files (plugin hints), truncated-line indexes, time zones and parser styles.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import re
import zoneinfo
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapio.receivers.cni_log import _parser, _records
from tapio.receivers.cni_log._parser import LineParser
from tapio.receivers.cni_log._records import RecordWriter
from tapio.testing import prereq

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "cni"
RESOURCE = [("host.name", "node-1"), ("os.type", "linux")]
LINES = [line for f in sorted(FIXTURES.glob("*.log")) for line in f.read_text().splitlines()]
PATHS = ["/var/log/calico/cni/cni.log", "/var/log/aws-routed-eni/plugin.log", "/var/run/cilium/cilium-cni.log", "/var/log/multus.log", "/logs/other.log"]
OBSERVED = 1_700_000_000_123_456_789


@pytest.fixture(autouse=True)
def compiled_helper() -> None:
    if _records.COMPILED is None:
        prereq.missing(
            f"the cni-log receiver's compiled line parser ({_records.COMPILED_MISSING})",
            _records.COMPILED_HOW,
        )


def bench_corpus(tmp_path: Path, lines: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_cni_log", ROOT / "bench" / "bench_cni_log.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log = tmp_path / "cni.log"
    bench.make_log(log, lines)
    return log.read_text().splitlines()


def writers(parser: LineParser | None = None) -> tuple[RecordWriter, RecordWriter]:
    parser = parser or LineParser()
    fast = RecordWriter(parser, RESOURCE)
    return fast, RecordWriter(parser, RESOURCE, compiled=False)


def assert_same(fast: RecordWriter, slow: RecordWriter, path: str, lines: list[str], truncated: frozenset[int] = frozenset(), observed: int = OBSERVED) -> None:
    """Both paths give the same request and style counts, for the batch and for each line alone."""
    a, b = fast.write(path, lines, observed, truncated), slow.write(path, lines, observed, truncated)
    if a.request != b.request or a.styles != b.styles:
        for i, line in enumerate(lines):  # name the first line that differs
            cut = frozenset({0}) if i in truncated else frozenset()
            x, y = fast.write(path, [line], observed, cut), slow.write(path, [line], observed, cut)
            assert (x.request, x.styles) == (y.request, y.styles), f"line {i} differs: {line!r}"
    assert a.request == b.request and a.styles == b.styles and a.count == b.count == len(lines)


def fallbacks(path: str, lines: list[str]) -> list[str]:
    """The lines the compiled helper leaves to Python."""
    _, rest, _ = _records.COMPILED.write(lines, _parser.plugin_for_path(path), b"", b"", b"", frozenset(), True)
    return [lines[i] for i in rest]


def test_the_default_writer_uses_the_compiled_helper_and_can_be_told_not_to() -> None:
    fast, slow = writers()
    assert fast.compiled and "compiled helper" in fast.summary()
    assert not slow.compiled and "in Python" in slow.summary()
    named = RecordWriter(LineParser(style="calico"), RESOURCE)
    assert not named.compiled and "parser: auto only" in named.summary()


@pytest.mark.parametrize("path", PATHS)
def test_every_fixture_line_is_written_alike_and_by_the_compiled_helper(path: str) -> None:
    fast, slow = writers()
    for line in LINES:
        assert_same(fast, slow, path, [line])
    assert_same(fast, slow, path, LINES, frozenset({0, 5, len(LINES) - 1}))
    assert_same(fast, slow, path, LINES, observed=0)
    assert fallbacks(path, LINES) == []


def test_the_bench_corpus_is_written_alike_and_all_by_the_compiled_helper(tmp_path: Path) -> None:
    corpus = bench_corpus(tmp_path, 47 * 60)
    fast, slow = writers()
    for start in range(0, len(corpus), 500):
        assert_same(fast, slow, "/var/log/cni.log", corpus[start : start + 500], frozenset(range(0, 500, 7)))
    assert fallbacks("/var/log/cni.log", corpus) == []


@pytest.mark.parametrize("zone", [zoneinfo.ZoneInfo("Europe/Berlin"), None], ids=["berlin", "local"])
def test_times_without_a_zone_outside_utc_are_left_to_python(zone: dt.tzinfo | None) -> None:
    fast, slow = writers(LineParser(naive_timezone=zone))
    assert_same(fast, slow, PATHS[0], LINES)
    left = fallbacks(PATHS[0], LINES)  # the helper is asked as for UTC here; the writer tells it otherwise
    assert left == []
    calico = [line for line in LINES if re.match(r"\d{4}-\d\d-\d\d \d", line)]
    _, rest, _ = _records.COMPILED.write(calico, "", b"", b"", b"", frozenset(), False)
    assert len(rest) == len(calico)


def test_a_parser_with_a_named_style_writes_in_python_alike() -> None:
    fast, slow = writers(LineParser(style="multus"))
    assert_same(fast, slow, PATHS[3], LINES)


def test_lines_it_is_not_sure_about_fall_back_and_are_written_alike() -> None:
    unsure = [
        "héllo wörld level=info",
        '{"msg":"tab\\there","level":"info"}',
        '{"msg":"\\u0041","level":"info"}',
        '{"a":1,"a":2}',
        '{"pid":' + "9" * 30 + "}",
        "2024-05-14 09:12:01.402 [INFO][27311] k8s.go 327: msg Key=\"a\\\"b\"",
        "level=info msg=\"tab\tinside\"",
        "x" * 20_000 + " a=b",
    ]
    assert fallbacks("/logs/x.log", unsure) == unsure
    fast, slow = writers()
    assert_same(fast, slow, "/logs/x.log", unsure, frozenset({1, 3}))


def test_a_parser_changed_since_the_helper_was_written_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_parser, "_TIME", re.compile(_parser._TIME.pattern + "x?"))
    monkeypatch.setitem(_parser.SEVERITIES, "loud", (13, "WARN"))
    module, why = _records._load_compiled()
    assert module is None and "PATTERNS" in why and "SEVERITIES" in why


def test_the_environment_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_records.PYTHON_ONLY_ENV, "1")
    module, why = _records._load_compiled()
    assert module is None and _records.PYTHON_ONLY_ENV in why
    monkeypatch.setenv(_records.PYTHON_ONLY_ENV, "0")
    assert _records._load_compiled()[0] is not None


# ----------------------------------------------------------------- fuzzing

SPECIAL = ' "\\\'=:;,.[](){}<>/-_0123456789aZ\tK8S_POD_é\u2026\U0001f600\x00\x7f'
INSERTS = st.one_of(
    st.text(alphabet=SPECIAL, min_size=1, max_size=4),
    st.sampled_from([
        "K8S_POD_NAME=x;", " key=value", ' Key="v"', " error=boom", " IPv4=[10.0.0.1/32]", "9" * 25, "-0", "1e999", "0.5",
        "9999-12-31T23:59:59.999999999-23:59", "0000-00-00", "2024-02-30 ", "2024-05-14T10:00:60Z", "+14:00", "\\\"", '\\"',
        "{", "}", '{"a":', "ContainerID(", "for pod p namespace n sandbox " + "a" * 12 + ":", "[ns/pod/" + "f" * 8 + ":net]",
        " [verbose] Add: a:b:c:d ", '{"ips":[{"address":"10.1.2.3/24"}]}', "ipamd: ", " response from ipamd x: y",
    ]),
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    line = draw(st.sampled_from(LINES))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(("insert", "delete", "replace")))
        pos = draw(st.integers(0, len(line)))
        if op == "insert":
            line = line[:pos] + draw(INSERTS) + line[pos:]
        elif op == "delete":
            line = line[:pos] + line[pos + draw(st.integers(1, 40)) :]
        else:
            line = line[:pos] + draw(INSERTS) + line[pos + draw(st.integers(1, 8)) :]
    return line


LINE = st.one_of(
    mutated(),
    st.sampled_from(LINES),
    st.just(""),
    st.text(alphabet=SPECIAL, max_size=80),
    st.builds(lambda line, n: line + " x=" + "y" * n, st.sampled_from(LINES), st.integers(0, 70_000)),
    st.builds(lambda line, cut: line[:cut], st.sampled_from(LINES), st.integers(0, 400)),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, min_size=1, max_size=12), st.sampled_from(PATHS), st.integers(0, 2**64 - 1), st.data())
def test_fuzzed_lines_are_written_alike(lines: list[str], path: str, observed: int, data: st.DataObject) -> None:
    truncated = frozenset(data.draw(st.sets(st.integers(0, len(lines) - 1), max_size=3)))
    fast, slow = writers()
    assert_same(fast, slow, path, lines, truncated, observed)


@settings(max_examples=150, deadline=None)
@given(st.lists(mutated(), min_size=1, max_size=8), st.sampled_from([dt.timezone.utc, zoneinfo.ZoneInfo("America/New_York"), None]))
def test_fuzzed_lines_are_written_alike_in_any_naive_zone(lines: list[str], zone: dt.tzinfo | None) -> None:
    fast, slow = writers(LineParser(naive_timezone=zone))
    assert_same(fast, slow, PATHS[0], lines)


KEYS = st.sampled_from([
    "level", "lvl", "severity", "msg", "message", "time", "ts", "timestamp", "@timestamp", "caller", "source", "subsys", "component",
    "eventUUID", "containerID", "netns", "ifName", "pid", "ip", "ipAddr", "ips", "cmd", "command", "args", "error", "plugin", "Pod",
    "Namespace", "ContainerID", "HandleID", "Workload", "a", "Z", "_x", "x.y-z",
])
TEXTS = st.one_of(
    st.sampled_from([
        "info", "ERROR", "debug", "cilium-cni", "cni", "routed-eni-cni-plugin/cni.go:128", "a/b.go:x", "ADD", "del", "10.0.0.1/24",
        "2024-05-14T09:20:11.834512903Z", "2024-05-14 09:12:01", "2024-05-14T09:40:31.5+02:00", "1970-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59",
        "2024-02-29T00:00:00+0530", "2023-02-29T00:00:00Z", "[cni-net] Processing ADD command", "Received CNI add request: ContainerID(abc) IfName(eth0)",
        "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", "IPv4=[10.1.1.1/32] IPs: [fe80::1/64]", "for pod p-1 namespace ns sandbox 0123456789abcdef:",
        "", " ", "12345", "x" * 300,
    ]),
    st.text(alphabet=SPECIAL, max_size=20),
)
NUMBERS = st.one_of(
    st.integers(-(10**19), 10**19), st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1715683323.5, 1715683323123, 1e17, 1e20, -0.0]),
)
VALUES = st.one_of(TEXTS, NUMBERS, st.booleans(), st.none(), st.lists(st.sampled_from(["10.0.0.1", 5]), max_size=2), st.dictionaries(st.just("address"), TEXTS, max_size=1))


def kv_value(v: object) -> str:
    text = str(v)
    return text if text and not any(c in text for c in ' "') else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES), max_size=12), st.sampled_from(["json", "kv", "calico", "bracketed"]), TEXTS, st.sampled_from(PATHS))
def test_structured_lines_are_written_alike(pairs: list[tuple[str, object]], shape: str, message: str, path: str) -> None:
    import json

    if shape == "json":
        line = json.dumps(dict(pairs))
    elif shape == "kv":
        line = " ".join(f"{k}={kv_value(v)}" for k, v in pairs if k[0] != "@")
    elif shape == "calico":
        fields = " ".join(f"{k}={kv_value(v)}" for k, v in sorted(pairs, key=lambda kv: kv[0]) if k[0] != "@")
        line = f"2024-05-14 09:12:01.402 [INFO][27311] k8s.go 73: {message} {fields}"
    else:
        line = f"2024-05-14T09:30:00Z [verbose] {message} " + " ".join(f"{k}={kv_value(v)}" for k, v in pairs)
    fast, slow = writers()
    assert_same(fast, slow, path, [line])
