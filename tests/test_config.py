"""Tests of tapio.config: loading, env expansion, merging, decoding and validation of pipelines.yaml.

Each hostile case asserts the whole message and where it points (file:line:column).
"""

from __future__ import annotations

import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import trio
import trio.testing
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from tapio.component import ComponentID, Factory, Kind, PipelineID, Ports, Registry, Settings, setting
from tapio.config import (
    Config,
    ConfigError,
    LogsTelemetry,
    MetricsTelemetry,
    PipelineConfig,
    Problem,
    RestartBackoff,
    ServiceConfig,
    config_fields,
    decode_dataclass,
    expand_env,
    load_config,
)
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing.components import (
    NopConfig,
    NopExporter,
    NopLimits,
    NopProcessor,
    NopReceiver,
    nop_exporter_factory,
    nop_processor_factory,
    nop_receiver_factory,
)
from tapio.units import ByteSize, Duration

CONFIGS = Path(__file__).parent / "configs"


# --- a small registry of test components -------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GrpcSettings:
    endpoint: str = setting("127.0.0.1:4317", doc="host:port to listen on.")


@dataclass(frozen=True, kw_only=True)
class OtlpProtocols:
    grpc: GrpcSettings | None = setting(None, doc="gRPC server; enabled when present.")


@dataclass(frozen=True, kw_only=True)
class OtlpConfig:
    protocols: OtlpProtocols = setting(default_factory=lambda: OtlpProtocols(grpc=GrpcSettings()), doc="Servers to run.")

    def validate(self) -> list[str]:
        grpc = self.protocols.grpc
        if grpc is None:
            return ["protocols: must enable grpc"]
        port = grpc.endpoint.rpartition(":")[2]
        if not port.isdigit():
            return [f"protocols.grpc.endpoint: expected host:port, got {grpc.endpoint!r}"]
        if not 1 <= int(port) <= 65535:
            return [f"protocols.grpc.endpoint: port {port} is out of range (1-65535)"]
        return []


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    send_batch_size: int = setting(8192, doc="Items that trigger a send.")
    send_batch_max_size: int = setting(0, doc="Largest batch; 0 means no limit.")
    timeout: Duration = setting(Duration(0.2), doc="Longest wait before a send.")

    def validate(self) -> list[str]:
        if self.send_batch_max_size and self.send_batch_max_size < self.send_batch_size:
            return [f"send_batch_max_size: must be 0 or >= send_batch_size ({self.send_batch_size})"]
        return []


@dataclass(frozen=True, kw_only=True)
class FileConfig:
    path: str = setting("", doc="File to write.")

    def validate(self) -> list[str]:
        return [] if self.path else ["path: must be set"]


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    path: str = setting("state.db", doc="SQLite file.")


def _factory(type_: str, kind: Kind, config_class: type, signals: frozenset[Signal], create: Any) -> Factory:
    return Factory(type=type_, kind=kind, config_class=config_class, signals=signals, create=create, description=f"test {type_}")


REGISTRY = Registry(
    [
        nop_receiver_factory,
        nop_processor_factory,
        nop_exporter_factory,
        _factory("otlp", Kind.RECEIVER, OtlpConfig, frozenset({Signal.LOGS, Signal.TRACES}), NopReceiver),
        _factory("batch", Kind.PROCESSOR, BatchConfig, frozenset(Signal), NopProcessor),
        _factory("file", Kind.EXPORTER, FileConfig, frozenset({Signal.LOGS}), NopExporter),
        _factory("storage", Kind.EXTENSION, StorageConfig, frozenset(), NopReceiver),
    ]
)

MINIMAL = """\
receivers: {nop: }
exporters: {nop: }
service:
  pipelines:
    logs: {receivers: [nop], exporters: [nop]}
"""


def write(tmp_path: Path, text: str, name: str = "pipelines.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems_of(paths: list[str], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(paths, REGISTRY, env=env or {})
    return [str(p) for p in info.value.problems]


def load(paths: list[str], env: dict[str, str] | None = None) -> Config:
    return load_config(paths, REGISTRY, env=env or {})


# --- good configs ------------------------------------------------------------------------


def test_good_config_decodes_every_value():
    cfg = load([str(CONFIGS / "good.yaml")], env={"NOP_COUNT": "7"})
    assert cfg.files == [str(CONFIGS / "good.yaml")]
    assert cfg.warnings == []
    assert cfg.receivers[ComponentID("otlp")] == OtlpConfig(protocols=OtlpProtocols(grpc=GrpcSettings(endpoint="127.0.0.1:4317")))
    nop = cfg.receivers[ComponentID("nop")]
    assert nop == NopConfig(
        count=7,  # `${env:NOP_COUNT}` is a whole-scalar reference: re-typed as an int
        ratio=1.0,
        delay=Duration(90.0),
        max_size=ByteSize(64 * 1024 * 1024),
        mode="safe",
        enabled=False,
        tags=["a", "b", "3"],
        labels={"app.kubernetes.io/name": "tapio", "version": "1.10"},  # numbers keep their text in str fields
        endpoint="[::1]:9000",
        limits=NopLimits(max_items=1000, window=Duration(0.5)),
    )
    assert type(nop.ratio) is float and type(nop.delay) is Duration and type(nop.max_size) is ByteSize
    assert cfg.processors == {ComponentID("batch"): BatchConfig(send_batch_size=512, timeout=Duration(1.0)), ComponentID("nop"): NopConfig()}
    assert cfg.exporters[ComponentID("file")] == FileConfig(path="${HOME}/out.jsonl")  # `$$` is a literal `$`
    assert cfg.extensions == {ComponentID("storage"): StorageConfig(path="/var/lib/tapio/state.db")}
    assert cfg.section(Kind.EXTENSION) is cfg.extensions
    assert cfg.service == ServiceConfig(
        pipelines={
            PipelineID(Signal.LOGS): PipelineConfig(
                receivers=[ComponentID("otlp"), ComponentID("nop")],
                processors=[ComponentID("batch"), ComponentID("nop")],
                exporters=[ComponentID("file"), ComponentID("nop")],
            ),
            PipelineID(Signal.TRACES, "jaeger"): PipelineConfig(receivers=[ComponentID("otlp")], exporters=[ComponentID("nop")]),
        },
        extensions=[ComponentID("storage")],
        telemetry=cfg.service.telemetry,
        shutdown_timeout=Duration(20.0),
        on_component_failure="stop",
        restart_backoff=RestartBackoff(initial=Duration(0.5), max=Duration(60.0)),
    )
    assert cfg.service.telemetry.logs == LogsTelemetry(level="debug", encoding="json")
    assert cfg.service.telemetry.metrics == MetricsTelemetry(address="")


def test_env_default_and_override_in_good_config():
    cfg = load([str(CONFIGS / "good.yaml")], env={"NOP_COUNT": "1", "OTLP_ENDPOINT": "10.0.0.1:14317"})
    assert cfg.receivers[ComponentID("otlp")].protocols.grpc.endpoint == "10.0.0.1:14317"


def test_minimal_config_uses_defaults_everywhere(tmp_path):
    cfg = load([write(tmp_path, MINIMAL)])
    assert cfg.receivers == {ComponentID("nop"): NopConfig()}
    assert cfg.service.shutdown_timeout == 10.0
    assert cfg.service.on_component_failure == "restart"
    assert cfg.service.restart_backoff == RestartBackoff()
    assert cfg.service.telemetry.logs == LogsTelemetry()
    assert cfg.service.telemetry.metrics.address == "127.0.0.1:8888"
    assert cfg.service.extensions == []


def test_null_or_empty_bodies_mean_defaults(tmp_path):
    path = write(
        tmp_path,
        """\
        receivers:
          nop: null
          nop/2: {}
          nop/3:
            count:
            limits:
          otlp:
            protocols:
              grpc:
        exporters: {nop: ~}
        service:
          telemetry:
          restart_backoff:
          pipelines:
            logs: {receivers: [nop, nop/2, nop/3, otlp], exporters: [nop]}
        """,
    )
    cfg = load([path])
    assert all(c == NopConfig() for cid, c in cfg.receivers.items() if cid.type == "nop")
    # an empty optional group (`grpc:`) is the group with its defaults, as in the OTel Collector
    assert cfg.receivers[ComponentID("otlp")].protocols.grpc == GrpcSettings()
    assert cfg.service.restart_backoff == RestartBackoff()


# --- hostile configs -----------------------------------------------------------------------


def test_hostile_config_reports_every_problem_with_its_location():
    path = str(CONFIGS / "hostile.yaml")
    expected = [
        "3:3: receivers.otlpp: unknown receiver type 'otlpp'; did you mean 'otlp'? (registered: nop, otlp)",
        "7:19: receivers.otlp.protocols.grpc.endpoint: port 70000 is out of range (1-65535)",
        "8:3: receivers['Bad Id']: invalid component type 'Bad Id' in 'Bad Id': use lowercase letters, digits, '_' or '-'",
        "10:12: receivers.nop.count: expected an integer, got 'abc'",
        "11:12: receivers.nop.ratio: must be between 0 and 1, got 2.5",
        "12:12: receivers.nop.delay: invalid duration '5x': expected a number with a unit (ns, us, ms, s, m, h), e.g. '5s' or '200ms'",
        "13:15: receivers.nop.max_size: size -5 is negative",
        "14:11: receivers.nop.mode: expected one of 'fast', 'safe', got 'fsat'; did you mean 'fast'?",
        "15:14: receivers.nop.enabled: expected true or false, got 1",
        "16:5: receivers.nop.coutn: unknown key 'coutn'; did you mean 'count'?",
        "17:25: receivers.nop.limits.max_items: expected an integer, got true",
        "21:26: processors.batch.send_batch_max_size: must be 0 or >= send_batch_size (100)",
        "22:3: warning: processors.nop: processor 'nop' is defined but not used in any pipeline",
        "26:3: warning: exporters.nop/spare: exporter 'nop/spare' is defined but not used in any pipeline",
        "28:3: warning: extensions.storage: extension 'storage' is defined but not used in service.extensions",
        "29:1: recievers: unknown top-level key 'recievers'; did you mean 'receivers'?",
        "34:27: service.pipelines.logs.processors[1]: processor 'batch' is listed twice (first at processors[0])",
        "35:24: service.pipelines.logs.exporters[1]: exporter 'fil' is not defined in exporters; did you mean 'file'?",
        "38:19: service.pipelines.traces.exporters[0]: exporter 'file' does not support traces (it supports: logs)",
        "39:5: service.pipelines.metrics/empty: a pipeline needs at least one exporter (exporters: is missing)",
        "40:7: service.pipelines.metrics/empty.receivers: a pipeline needs at least one receiver",
        "41:5: service.pipelines.log: invalid pipeline id 'log': it must start with a signal type (logs, metrics, traces), e.g. 'logs/kernel'",
        "42:16: service.extensions[0]: extension 'storag' is not defined in extensions; did you mean 'storage'?",
        "43:3: service.pipeline: unknown key 'pipeline'; did you mean 'pipelines'?",
        "44:21: service.shutdown_timeout: duration '-1s' is negative",
        "45:25: service.on_component_failure: expected one of 'restart', 'stop', got 'ignore'",
    ]
    with pytest.raises(ConfigError) as info:
        load([path])
    assert [str(p) for p in info.value.problems] == [f"{path}:{line}" for line in expected]
    assert str(info.value) == "\n".join(f"{path}:{line}" for line in expected)
    assert len(info.value.errors) == len(expected) - 3
    first = info.value.problems[0]
    assert (first.file, first.line, first.column, first.path, first.severity) == (path, 3, 3, "receivers.otlpp", "error")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("receivers: {nop: {count: 1.5}}", "1:26: receivers.nop.count: expected an integer, got 1.5"),
        ("receivers: {nop: {count: true}}", "1:26: receivers.nop.count: expected an integer, got true"),
        ("receivers: {nop: {count: [1]}}", "1:26: receivers.nop.count: expected an integer, got a list"),
        ("receivers: {nop: {ratio: yes}}", "1:26: receivers.nop.ratio: expected a number, got true"),
        ("receivers: {nop: {ratio: '0.5'}}", "1:26: receivers.nop.ratio: expected a number, got '0.5'"),
        ("receivers: {nop: {enabled: 'true'}}", "1:28: receivers.nop.enabled: expected true or false, got 'true'"),
        ("receivers: {nop: {tags: a}}", "1:25: receivers.nop.tags: expected a list, got 'a'"),
        ("receivers: {nop: {tags: [a, [b]]}}", "1:29: receivers.nop.tags[1]: expected a string, got a list"),
        ("receivers: {nop: {labels: [a]}}", "1:27: receivers.nop.labels: expected a mapping, got a list"),
        ("receivers: {nop: {labels: {a: null}}}", "1:31: receivers.nop.labels.a: expected a string, got null"),
        ("receivers: {nop: {limits: 3}}", "1:27: receivers.nop.limits: expected a mapping of settings, got 3"),
        ("receivers: {nop: {delay: -5s}}", "1:26: receivers.nop.delay: duration '-5s' is negative"),
        ("receivers: {nop: {delay: [1]}}", "1:26: receivers.nop.delay: expected a duration, got a list"),
        ("receivers: {nop: {max_size: 12XB}}", "1:29: receivers.nop.max_size: invalid size '12XB': expected a number of bytes or a unit (KiB, MiB, GiB, KB, MB, GB), e.g. '64MiB'"),
        ("receivers: {nop: {max_size: 1.5}}", "1:29: receivers.nop.max_size: expected a size like '64MiB', got float"),
        ("receivers: {nop: {mode: 3}}", "1:25: receivers.nop.mode: expected one of 'fast', 'safe', got 3"),
        ("receivers: {nop: {endpoint: nocolon}}", "1:29: receivers.nop.endpoint: expected host:port, got 'nocolon'"),
        ("receivers: {nop: 5}", "1:18: receivers.nop: expected a mapping of settings, got 5"),
        ("receivers: [nop]", "1:12: receivers: expected a mapping of receiver ids to their settings, got a list"),
        ("receivers: {nop/: {}}", "1:13: receivers.nop/: invalid component name '' in 'nop/': must be non-empty without spaces or '/'"),
        ("receivers: {nop: {count: -1}}", "1:26: receivers.nop.count: must be 0 or more, got -1"),
    ],
)
def test_bad_component_values(tmp_path, text, expected):
    path = write(tmp_path, text + "\n" + "\n".join(MINIMAL.splitlines()[1:]) + "\n")
    assert problems_of([path])[0] == f"{path}:{expected}"


def test_validate_problem_without_a_key_points_at_the_component(tmp_path):
    path = write(
        tmp_path,
        """\
        receivers:
          otlp:
            protocols: {}
        exporters: {file: {path: x}}
        service:
          pipelines:
            logs: {receivers: [otlp], exporters: [file]}
        """,
    )
    # `protocols: {}` leaves grpc None; the message's key `protocols` is written, so it points there.
    assert problems_of([path]) == [f"{path}:3:16: receivers.otlp.protocols: must enable grpc"]


def test_validate_problem_about_an_unwritten_key_points_at_the_component(tmp_path):
    path = write(
        tmp_path,
        """\
        receivers: {nop: }
        exporters:
          file:
        service:
          pipelines:
            logs: {receivers: [nop], exporters: [file]}
        """,
    )
    assert problems_of([path]) == [f"{path}:3:3: exporters.file.path: must be set"]


@pytest.mark.parametrize(
    "service, expected",
    [
        ("service: {}", "3:1: service.pipelines: missing: define at least one pipeline"),
        ("service: 3", "3:10: service: expected a mapping with pipelines, got 3"),
        ("service:\n  telemetry: {}", "3:1: service.pipelines: missing: define at least one pipeline"),
        ("service:\n  pipelines: {}", "4:3: service.pipelines: no pipelines defined; define at least one"),
        ("service:\n  pipelines:", "4:3: service.pipelines: no pipelines defined; define at least one"),
        ("service:\n  pipelines: [logs]", "4:14: service.pipelines: expected a mapping of pipeline ids to pipelines, got a list"),
        ("service:\n  pipelines: {logs: [nop]}", "4:21: service.pipelines.logs: expected a mapping with receivers, processors and exporters, got a list"),
        ("service:\n  pipelines: {logs: {receivers: nop, exporters: [nop]}}", "4:33: service.pipelines.logs.receivers: expected a list of receiver ids like [otlp, otlp/2], got 'nop'"),
        ("service:\n  pipelines: {logs: {receivers: [{a: 1}], exporters: [nop]}}", "4:34: service.pipelines.logs.receivers[0]: expected a receiver id like 'otlp' or 'otlp/2', got a mapping"),
        ("service:\n  pipelines: {logs: {receivers: [Nop], exporters: [nop]}}", "4:34: service.pipelines.logs.receivers[0]: invalid component type 'Nop' in 'Nop': use lowercase letters, digits, '_' or '-'"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop], exporter: []}}", "4:58: service.pipelines.logs.exporter: unknown key 'exporter'; did you mean 'exporters'?"),
        ("service:\n  pipelines: {logs: {receivers: [nop, nop], exporters: [nop]}}", "4:39: service.pipelines.logs.receivers[1]: receiver 'nop' is listed twice (first at receivers[0])"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [otlp]}}", "4:52: service.pipelines.logs.exporters[0]: exporter 'otlp' is not defined in exporters (defined: nop)"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  extensions: storage", "5:15: service.extensions: expected a list of extension ids like [otlp, otlp/2], got 'storage'"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  telemetry: {logs: {level: verbose}}", "5:29: service.telemetry.logs.level: expected one of 'debug', 'info', 'warn', 'error', got 'verbose'"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  telemetry: {metrics: {address: localhost}}", "5:34: service.telemetry.metrics.address: expected host:port like '127.0.0.1:8888' (or '' to disable), got 'localhost'"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  telemetry: {metrics: {address: ':70000'}}", "5:34: service.telemetry.metrics.address: port 70000 is out of range (0-65535)"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  restart_backoff: {initial: 10s, max: 1s}", "5:40: service.restart_backoff.max: must be at least initial (10s)"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  restart_backoff: {initial: 0s}", "5:30: service.restart_backoff.initial: must be more than 0s"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  restart_backoff: {intial: 2s}", "5:21: service.restart_backoff.intial: unknown key 'intial'; did you mean 'initial'?"),
    ],
)
def test_service_problems(tmp_path, service, expected):
    path = write(tmp_path, "receivers: {nop: }\nexporters: {nop: }\n" + service + "\n")
    problems = problems_of([path])
    assert any(p.startswith(f"{path}:{expected}") for p in problems), problems


def test_missing_service_reports_no_unused_warnings(tmp_path):
    path = write(tmp_path, "receivers: {nop: }\n")
    assert problems_of([path]) == [
        f"{path}:1:1: service: missing: a config needs a service section with at least one pipeline (service.pipelines)"
    ]


def test_signal_support_is_checked_for_receivers_and_processors(tmp_path):
    path = write(
        tmp_path,
        """\
        receivers: {otlp: }
        exporters: {nop: }
        service:
          pipelines:
            metrics: {receivers: [otlp], exporters: [nop]}
        """,
    )
    assert problems_of([path]) == [
        f"{path}:5:27: service.pipelines.metrics.receivers[0]: receiver 'otlp' does not support metrics (it supports: logs, traces)"
    ]


def test_unknown_type_in_a_pipeline_is_reported_once(tmp_path):
    path = write(
        tmp_path,
        """\
        receivers: {nop: }
        exporters: {debug: }
        service:
          pipelines:
            logs: {receivers: [nop], exporters: [debug]}
        """,
    )
    assert problems_of([path]) == [
        f"{path}:2:13: exporters.debug: unknown exporter type 'debug' (registered: file, nop)"
    ]


def test_unused_components_are_warnings_not_errors(tmp_path):
    path = write(tmp_path, MINIMAL.replace("receivers: {nop: }", "receivers: {nop: , nop/idle: }"))
    cfg = load([path])
    assert [str(w) for w in cfg.warnings] == [
        f"{path}:1:20: warning: receivers.nop/idle: receiver 'nop/idle' is defined but not used in any pipeline"
    ]
    assert cfg.warnings[0].severity == "warning"
    assert ComponentID("nop", "idle") in cfg.receivers


# --- YAML and files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("receivers:\n  nop: {count: 1\nservice: {}\n", "3:8: invalid YAML: expected ',' or '}', but got ':' (while parsing a flow mapping at line 2, column 8)"),
        ("receivers:\n  nop\n  count: 1\n", "3:8: invalid YAML: mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", "2:1: invalid YAML: expected a single document in the stream at line 1, column 1, but found another document"),
        ("a: *nowhere\n", "1:4: invalid YAML: found undefined alias 'nowhere'"),
        ("a: \"unterminated\n", "2:1: invalid YAML: found unexpected end of stream (while scanning a quoted scalar at line 1, column 4)"),
        ("a: 1\x00\n", "1:5: invalid YAML: unacceptable character #x0000: special characters are not allowed"),
        ("a:\n\tb: 1\n", "2:1: invalid YAML: found character '\\t' that cannot start any token (while scanning for the next token)"),
    ],
)
def test_yaml_syntax_errors_point_at_line_and_column(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert problems_of([path]) == [f"{path}:{expected}"]


def test_syntax_errors_in_every_file_are_reported_together(tmp_path):
    a = write(tmp_path, "a: [\n", "a.yaml")
    b = write(tmp_path, "b: {\n", "b.yaml")
    problems = problems_of([a, b])
    assert [p.split(":")[0] for p in problems] == [a, b]


def test_unreadable_files_are_named(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    assert problems_of([missing]) == [f"{missing}: cannot read config file: No such file or directory"]
    assert problems_of([str(tmp_path)]) == [f"{tmp_path}: cannot read config file: Is a directory"]
    with pytest.raises(ConfigError) as info:
        load_config([], REGISTRY, env={})
    assert str(info.value) == "no config file given"


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"receivers:\n  nop: {tags: [caf\xe9]}\n")
    assert problems_of([str(path)]) == [f"{path}:2:19: not valid UTF-8 text (byte 0xe9); save the file as UTF-8"]


def test_utf8_bom_and_non_ascii_values_are_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeff".encode() + MINIMAL.replace("{nop: }", "{nop: {tags: [café, 日本]}}", 1).encode())
    assert load([str(path)]).receivers[ComponentID("nop")].tags == ["café", "日本"]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    (problem,) = problems_of([path])
    assert problem.startswith(f"{path}:1:1: the top level of a config file must be a mapping")


def test_empty_file_adds_nothing(tmp_path):
    empty = write(tmp_path, "# nothing here\n", "empty.yaml")
    main = write(tmp_path, MINIMAL)
    assert load([main, empty]).receivers == {ComponentID("nop"): NopConfig()}
    assert problems_of([empty]) == [
        f"{empty}: service: missing: a config needs a service section with at least one pipeline (service.pipelines)"
    ]


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path, MINIMAL + "receivers: {}\n")
    assert problems_of([path]) == [
        f"{path}:6:1: receivers: duplicate key 'receivers' (first defined at line 1); the last one is used"
    ]


def test_anchors_aliases_and_merge_keys(tmp_path):
    path = write(
        tmp_path,
        """\
        x-common: &common {count: 3, tags: [a]}
        receivers:
          nop: *common
          nop/2:
            <<: *common
            count: 4
        exporters: {nop: }
        service:
          pipelines:
            logs: {receivers: [nop, nop/2], exporters: [nop]}
        """,
    )
    # `x-common` is not a known top-level key: an error, as in the OTel Collector.
    assert problems_of([path]) == [
        f"{path}:1:1: x-common: unknown top-level key 'x-common' (valid keys: receivers, processors, exporters, extensions, service)"
    ]
    text = Path(path).read_text().replace("x-common: &common {count: 3, tags: [a]}\n", "")
    text = text.replace("  nop: *common", "  nop: &common {count: 3, tags: [a]}")
    Path(path).write_text(text)
    cfg = load([path])
    assert cfg.receivers[ComponentID("nop")] == NopConfig(count=3, tags=["a"])
    assert cfg.receivers[ComponentID("nop", "2")] == NopConfig(count=4, tags=["a"])


def test_recursive_alias_is_an_error(tmp_path):
    path = write(tmp_path, "receivers:\n  nop: &a {tags: *a}\n")
    (problem, *_) = problems_of([path])
    assert problem == f"{path}:2:8: receivers.nop.tags: an alias refers to a mapping or list that contains it (recursive structures are not allowed)"


def test_alias_bomb_is_cheap(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 30):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    started = time.monotonic()
    problems = problems_of([path])
    assert time.monotonic() - started < 5
    assert problems[0] == f"{path}:1:1: a0: unknown top-level key 'a0' (valid keys: receivers, processors, exporters, extensions, service)"


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    path = write(tmp_path, "receivers: " + "[" * 5000 + "]" * 5000 + "\n")
    (problem,) = problems_of([path])
    assert problem.startswith(f"{path}:")
    assert "nested" in problem


def test_moderately_deep_nesting_is_reported_at_the_limit(tmp_path):
    path = write(tmp_path, "receivers: {nop: {tags: " + "[" * 80 + "]" * 80 + "}}\n")
    problems = problems_of([path])
    assert problems[0].startswith(f"{path}:1:")
    assert "nested more than 64 levels deep" in problems[0]


def test_unsupported_tags_are_errors(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {endpoint: !secret abc, count: !!int '12'}}", 1))
    assert problems_of([path]) == [
        f"{path}:1:29: receivers.nop.endpoint: cannot read 'abc' with YAML tag '!secret': could not determine a constructor for the tag '!secret'"
    ]
