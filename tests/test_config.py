"""Tests of tapio.config: loading, env expansion, merging, decoding and validation of pipelines.yaml.

Each hostile case asserts the whole message and where it points (file:line:column).
"""

from __future__ import annotations

import os
import textwrap
import time
import uuid
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
from tapio.testing.batches import log_batch
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
from tapio.units import ByteSize, Duration, parse_listen_address

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
            return [f"protocols.grpc.endpoint: port {port} is out of range (0-65535; 0 picks a free port)"]
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
        tags=["a", "b", "3", "2024-01-31", "on"],
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
        "7:19: receivers.otlp.protocols.grpc.endpoint: port 70000 is out of range (0-65535; 0 picks a free port)",
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
        ("receivers: {nop: {delay: ''}}", "1:26: receivers.nop.delay: invalid duration '': expected a number with a unit (ns, us, ms, s, m, h), e.g. '5s' or '200ms'"),
        ("receivers: {nop: {delay: ' '}}", "1:26: receivers.nop.delay: invalid duration ' ': expected a number with a unit (ns, us, ms, s, m, h), e.g. '5s' or '200ms'"),
    ],
)
def test_bad_component_values(tmp_path, text, expected):
    path = write(tmp_path, text + "\n" + "\n".join(MINIMAL.splitlines()[1:]) + "\n")
    assert problems_of([path])[0] == f"{path}:{expected}"


LONGEST = "the longest accepted is 87600h (10 years)"


@pytest.mark.parametrize(
    "written, expected",
    [
        (".inf", f"duration inf is infinite: {LONGEST}"),
        ("-.inf", "duration -inf is negative"),
        (".nan", "duration nan is not a number: write one like '5s' or '200ms'"),
        ("99999999999999999999h", f"duration '99999999999999999999h' is too long: {LONGEST}"),
        ("87600h1ms", f"duration '87600h1ms' is too long: {LONGEST}"),
        ("1" + "0" * 400, f"duration 10000000000000000000...(401 characters) is too long: {LONGEST}"),
    ],
)
def test_non_finite_and_absurd_durations_are_rejected(tmp_path, written, expected):
    path = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {delay: %s}}" % written, 1))
    assert problems_of([path]) == [f"{path}:1:26: receivers.nop.delay: {expected}"]


def test_the_longest_duration_is_accepted():
    assert Duration.parse("87600h") == 87600 * 3600
    assert Duration.parse(87600 * 3600) == 87600 * 3600


@given(st.text(alphabet="0123456789.+- smhunµsKMGiBb", max_size=12) | st.text(max_size=12))
def test_duration_and_size_parse_raise_only_value_errors(text):
    # the config decoder turns ValueError (and OverflowError) into a problem; anything else would crash `tapio validate`
    for parse in (Duration.parse, ByteSize.parse):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            continue
        assert value >= 0


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
    "text, expected",
    [
        ("127.0.0.1:4317", ("127.0.0.1", 4317)),
        (":0", ("", 0)),
        ("localhost:1", ("localhost", 1)),
        ("tapio-0.tapio.ns.svc.cluster.local.:80", ("tapio-0.tapio.ns.svc.cluster.local.", 80)),
        ("[::1]:1", ("::1", 1)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
    ],
)
def test_listen_address_hosts_that_are_accepted(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("a$b:1", "host 'a$b' is neither an IP address nor a valid host name (letters, digits and '-' in dot-separated parts)"),
        ("-a.b:1", "host '-a.b' is neither an IP address nor a valid host name"),
        ("a..b:1", "host 'a..b' is neither an IP address nor a valid host name"),
        ("é.example:1", "host 'é.example' is neither an IP address nor a valid host name"),
        ("x" * 64 + ":1", "host 'xxxx"),
        ("999.1.1.1:1", "host '999.1.1.1' is not a valid IPv4 address"),
        ("10.1.1:1", "host '10.1.1' is not a valid IPv4 address"),
        ("[node-a]:1", "'node-a' in brackets is not an IPv6 address; write [::1]:4317, or a host name without brackets"),
        ("[10.0.0.1]:1", "'10.0.0.1' in brackets is not an IPv6 address"),
    ],
)
def test_listen_address_hosts_that_are_rejected(text, message):
    with pytest.raises(ValueError) as info:
        parse_listen_address(text)
    assert str(info.value).startswith(message)


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
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  telemetry: {metrics: {address: localhost}}", "5:34: service.telemetry.metrics.address: 'localhost' has no port: write host:port, e.g. 127.0.0.1:8888 (or '' to disable)"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  telemetry: {metrics: {address: ':70000'}}", "5:34: service.telemetry.metrics.address: port 70000 is out of range (0-65535; 0 picks a free port)"),
        ("service:\n  pipelines: {logs: {receivers: [nop], exporters: [nop]}}\n  telemetry: {metrics: {address: 'a$b:1'}}", "5:34: service.telemetry.metrics.address: host 'a$b' is neither an IP address nor a valid host name"),
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
        f"{path}:1:1: x-common: unknown top-level key 'x-common' (valid keys: receivers, processors, exporters, connectors, extensions, service)"
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
    assert problems[0] == f"{path}:1:1: a0: unknown top-level key 'a0' (valid keys: receivers, processors, exporters, connectors, extensions, service)"


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


# --- environment expansion --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, env, expected, unset",
    [
        ("${env:A}", {"A": "1"}, "1", ()),
        ("${A}", {"A": "1"}, "1", ()),
        ("x-${env:A}-${B}-y", {"A": "1", "B": "2"}, "x-1-2-y", ()),
        ("${env:A:-dflt}", {}, "dflt", ()),
        ("${A:-dflt}", {}, "dflt", ()),
        ("${env:A:-}", {}, "", ()),
        ("${env:A:-d}", {"A": ""}, "", ()),  # set to empty: the default is not used (as the OTel Collector)
        ("${env:A:-a:b-c}", {}, "a:b-c", ()),
        ("${env:A}", {}, "", ("A",)),
        ("$${env:A}", {"A": "1"}, "${env:A}", ()),
        ("a$$b", {}, "a$b", ()),
        ("$$$${A}", {"A": "1"}, "$${A}", ()),
        ("$$${A}", {"A": "1"}, "$1", ()),
        ("cost: $5", {}, "cost: $5", ()),
        ("$", {}, "$", ()),
        ("${env:A}${env:A}", {"A": "ab"}, "abab", ()),
    ],
)
def test_expand_env(text, env, expected, unset):
    result = expand_env(text, env)
    assert (result.text, result.unset, result.errors) == (expected, unset, ())


def test_expand_env_whole_reference_only():
    assert expand_env("${env:A}", {"A": "1"}).whole
    assert not expand_env(" ${env:A}", {"A": "1"}).whole
    assert not expand_env("${env:A}${env:A}", {"A": "1"}).whole
    assert not expand_env("$${env:A}", {"A": "1"}).whole


@pytest.mark.parametrize(
    "text, error",
    [
        ("${file:/etc/passwd}", "unsupported reference '${file:/etc/passwd}': only ${env:NAME} and ${env:NAME:-default} are supported"),
        ("${env:1A}", "invalid environment variable name in '${env:1A}': use letters, digits and '_', not starting with a digit"),
        ("${}", "invalid reference '${}': expected ${env:NAME} or ${env:NAME:-default} (write '$$' for a literal '$')"),
        ("${A B}", "invalid reference '${A B}': expected ${env:NAME} or ${env:NAME:-default} (write '$$' for a literal '$')"),
        ("x${env:A", "unterminated reference '${env:A': close it with '}', or write '$$' for a literal '$'"),
    ],
)
def test_expand_env_errors_keep_the_text(text, error):
    result = expand_env(text, {"A": "1"})
    assert result.errors == (error,)
    assert result.text == text


@given(st.text())
def test_expand_env_escaping_round_trips(text):
    assert expand_env(text.replace("$", "$$"), {}).text == text


def test_env_values_are_retyped_when_they_are_the_whole_value(tmp_path):
    path = write(
        tmp_path,
        """\
        receivers:
          nop:
            count: ${env:COUNT}
            ratio: "${RATIO}"
            enabled: ${env:ENABLED}
            endpoint: ${env:HOSTPORT}
            tags: ["${env:COUNT}", "n${env:COUNT}", !!str "${env:COUNT}"]
            delay: ${env:DELAY}
            mode: ${env:MODE:-safe}
        exporters: {nop: }
        service:
          pipelines:
            logs: {receivers: [nop], exporters: [nop]}
        """,
    )
    env = {"COUNT": "12", "RATIO": "0.5", "ENABLED": "false", "HOSTPORT": "1:30", "DELAY": "90"}
    cfg = load([path], env=env)
    nop = cfg.receivers[ComponentID("nop")]
    assert (nop.count, nop.ratio, nop.enabled, nop.delay, nop.mode) == (12, 0.5, False, Duration(90.0), "safe")
    # "1:30" is a YAML 1.1 base-60 int, but a string field keeps the text as written
    assert nop.endpoint == "1:30"
    assert nop.tags == ["12", "n12", "12"]


def test_env_value_of_the_wrong_type_is_reported_where_it_is_used(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {count: '${env:COUNT}'}}", 1))
    assert problems_of([path], env={"COUNT": "many"}) == [f"{path}:1:26: receivers.nop.count: expected an integer, got 'many'"]


def test_unset_env_variable_is_a_warning_saying_what_the_value_becomes(tmp_path):
    path = write(
        tmp_path,
        """\
        receivers:
          nop:
            count: ${env:UNSET_COUNT}
            endpoint: "${env:UNSET_HOST}:4317"
            labels: {name: !!str "${env:UNSET_NAME}"}
            tags: [a, "${env:UNSET_TAG}"]
        exporters: {nop: }
        service:
          pipelines:
            logs: {receivers: [nop], exporters: [nop]}
        """,
    )
    hint = "(give a default with ${env:%s:-value})"
    assert problems_of([path]) == [
        f"{path}:3:12: warning: receivers.nop.count: environment variable 'UNSET_COUNT' is not set {hint % 'UNSET_COUNT'}; "
        "the value is empty, so the setting keeps its default",
        f"{path}:4:15: warning: receivers.nop.endpoint: environment variable 'UNSET_HOST' is not set {hint % 'UNSET_HOST'}; "
        "it is replaced by nothing, giving ':4317'",
        f"{path}:5:20: warning: receivers.nop.labels.name: environment variable 'UNSET_NAME' is not set {hint % 'UNSET_NAME'}; "
        "the value is an empty string",
        f"{path}:6:15: warning: receivers.nop.tags[1]: environment variable 'UNSET_TAG' is not set {hint % 'UNSET_TAG'}; "
        "this list item is null",
        f"{path}:6:15: receivers.nop.tags[1]: expected a string, got null",
    ]
    path = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {count: '${env:UNSET_COUNT}', endpoint: 'x:${env:UNSET_PORT}1'}}", 1))
    cfg = load([path])
    nop = cfg.receivers[ComponentID("nop")]
    assert nop.count == NopConfig().count  # what the warning says: the default
    assert nop.endpoint == "x:1"


def test_bad_env_references_are_errors(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {endpoint: '${file:x}', tags: ['${env:A']}}", 1))
    assert problems_of([path]) == [
        f"{path}:1:29: receivers.nop.endpoint: unsupported reference '${{file:x}}': only ${{env:NAME}} and ${{env:NAME:-default}} are supported",
        f"{path}:1:49: receivers.nop.tags[0]: unterminated reference '${{env:A': close it with '}}', or write '$$' for a literal '$'",
    ]


def test_keys_and_non_strings_are_not_expanded(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {labels: {'${env:K}': v}}}", 1))
    cfg = load([path], env={"K": "expanded"})
    assert cfg.receivers[ComponentID("nop")].labels == {"${env:K}": "v"}


def test_env_defaults_to_the_process_environment(tmp_path):
    name = f"TAPIO_TEST_COUNT_{uuid.uuid4().hex}"  # certainly set by nobody else
    os.environ[name] = "41"
    try:
        path = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {count: '${env:%s}'}}" % name, 1))
        assert load_config([path], REGISTRY).receivers[ComponentID("nop")].count == 41
    finally:
        del os.environ[name]


# --- merging several files -----------------------------------------------------------


def test_files_merge_in_order():
    good, overlay = str(CONFIGS / "good.yaml"), str(CONFIGS / "overlay.yaml")
    cfg = load([good, overlay], env={"NOP_COUNT": "2"})
    assert cfg.files == [good, overlay]
    nop = cfg.receivers[ComponentID("nop")]
    assert nop.tags == ["only"]  # lists are replaced
    assert nop.limits == NopLimits(max_items=5, window=Duration(0.5))  # mappings merge key by key
    assert nop.count == 2 and nop.mode == "safe"  # untouched keys stay
    assert cfg.processors[ComponentID("batch")] == BatchConfig(send_batch_size=1024, timeout=Duration(1.0))
    logs = cfg.service.pipelines[PipelineID(Signal.LOGS)]
    assert logs.receivers == [ComponentID("otlp"), ComponentID("nop")]
    assert logs.exporters == [ComponentID("nop")]
    assert PipelineID(Signal.METRICS) in cfg.service.pipelines
    assert PipelineID(Signal.TRACES, "jaeger") in cfg.service.pipelines
    # `file` is no longer in any pipeline after the overlay
    assert [str(w) for w in cfg.warnings] == [
        f"{good}:27:3: warning: exporters.file: exporter 'file' is defined but not used in any pipeline"
    ]


def test_problems_point_to_the_file_the_value_came_from(tmp_path):
    base = write(
        tmp_path,
        """\
        receivers:
          nop:
            count: 1
            ratio: 7
        exporters: {nop: }
        service:
          pipelines:
            logs: {receivers: [nop], exporters: [nop]}
        """,
        "base.yaml",
    )
    over = write(
        tmp_path,
        """\
        receivers:
          nop:
            count: lots
        service:
          pipelines:
            logs: {exporters: [nopp]}
        """,
        "over.yaml",
    )
    assert problems_of([base, over]) == [
        f"{base}:4:12: receivers.nop.ratio: must be between 0 and 1, got 7",
        f"{base}:5:13: warning: exporters.nop: exporter 'nop' is defined but not used in any pipeline",
        f"{over}:3:12: receivers.nop.count: expected an integer, got 'lots'",
        f"{over}:6:24: service.pipelines.logs.exporters[0]: exporter 'nopp' is not defined in exporters; did you mean 'nop'?",
    ]


def test_later_scalar_or_null_replaces_a_mapping(tmp_path):
    base = write(tmp_path, MINIMAL.replace("{nop: }", "{nop: {count: 3}}", 1), "base.yaml")
    reset = write(tmp_path, "receivers:\n  nop:\n", "reset.yaml")
    assert load([base, reset]).receivers[ComponentID("nop")] == NopConfig()
    assert load([reset, base]).receivers[ComponentID("nop")] == NopConfig(count=3)


# --- the decoder ---------------------------------------------------------------------


def test_decode_dataclass_from_plain_data():
    cfg = decode_dataclass(NopConfig, {"count": 2, "ratio": 1, "delay": "2s", "limits": {"max_items": 0}, "endpoint": None})
    assert cfg == NopConfig(count=2, ratio=1.0, delay=Duration(2.0), limits=NopLimits(max_items=0))
    assert decode_dataclass(NopConfig, None) == NopConfig()
    assert decode_dataclass(NopConfig, yaml.safe_load("tags: [a, 1]\nlabels: {x: 2.50}")) == NopConfig(tags=["a", "1"], labels={"x": "2.5"})


def test_decode_dataclass_reports_every_problem_without_a_file():
    with pytest.raises(ConfigError) as info:
        decode_dataclass(NopConfig, {"count": "x", "ratio": 3, "limits": {"max_itemz": 1}}, path="receivers.nop")
    assert str(info.value).splitlines() == [
        "receivers.nop.count: expected an integer, got 'x'",
        "receivers.nop.limits.max_itemz: unknown key 'max_itemz'; did you mean 'max_items'?",
        "receivers.nop.ratio: must be between 0 and 1, got 3",  # validate() runs on the fields that did decode
    ]
    assert {(p.file, p.line, p.column) for p in info.value.problems} == {(None, None, None)}


def test_decode_dataclass_validate_flag():
    assert decode_dataclass(NopConfig, {"count": -1}, validate=False).count == -1
    with pytest.raises(ConfigError, match=r"^count: must be 0 or more, got -1$"):
        decode_dataclass(NopConfig, {"count": -1})
    with pytest.raises(ConfigError, match=r"^expected a mapping of settings, got 'abc'$"):
        decode_dataclass(NopConfig, "abc")


@dataclass(frozen=True, kw_only=True)
class _Required:
    name: str
    extra: Any = None
    choice: Literal[1, 2, "on"] = 1


@dataclass(frozen=True, kw_only=True)
class _WithId:
    storage: ComponentID | None = setting(None, doc="a storage extension")


def test_decoder_parses_component_ids():
    assert decode_dataclass(_WithId, {"storage": "storage/x"}).storage == ComponentID("storage", "x")
    assert decode_dataclass(_WithId, {"storage": None}).storage is None
    with pytest.raises(ConfigError, match=r"^storage: invalid component type 'Bad' in 'Bad': "):
        decode_dataclass(_WithId, {"storage": "Bad"})
    with pytest.raises(ConfigError, match=r"^storage: expected a component id, got a list$"):
        decode_dataclass(_WithId, {"storage": ["x"]})


@dataclass(frozen=True, kw_only=True)
class _Unsupported:
    when: set[str] = setting(default_factory=set, doc="not a decodable type")


def test_decoder_edge_types():
    with pytest.raises(ConfigError, match=r"^name: missing \(this setting has no default\)$"):
        decode_dataclass(_Required, {})
    assert decode_dataclass(_Required, {"name": "n", "extra": {"a": [1, None]}, "choice": 2}) == _Required(name="n", extra={"a": [1, None]}, choice=2)
    assert decode_dataclass(_Required, {"name": "n", "choice": "on"}).choice == "on"
    with pytest.raises(ConfigError, match=r"^choice: expected one of 1, 2, 'on', got true$"):
        decode_dataclass(_Required, {"name": "n", "choice": True})
    with pytest.raises(TypeError, match="unsupported type"):
        decode_dataclass(_Unsupported, {"when": ["x"]})


def test_config_fields_flattens_groups():
    fields = {key: (tp, default, doc) for key, tp, default, doc in config_fields(NopConfig)}
    assert list(fields) == [
        "count", "ratio", "delay", "max_size", "mode", "enabled", "tags", "labels", "endpoint",
        "limits.max_items", "limits.window",
    ]
    assert fields["limits.max_items"] == (int, 1000, "Largest number of items in one batch; 0 means no limit.")
    assert fields["delay"][:2] == (Duration, Duration(0.0))
    assert fields["tags"][1] == [] and fields["endpoint"][1] is None
    assert fields["mode"][0] == Literal["fast", "safe"]
    assert all(doc for _, _, doc in fields.values())
    # defaults of a group come from the parent's default instance
    otlp = {key: default for key, _, default, _ in config_fields(OtlpConfig)}
    assert otlp == {"protocols.grpc.endpoint": "127.0.0.1:4317"}


def test_problem_rendering():
    assert str(Problem("p.yaml", 3, 7, "a.b", "bad")) == "p.yaml:3:7: a.b: bad"
    assert str(Problem("p.yaml", 3, 7, "a.b", "unused", "warning")) == "p.yaml:3:7: warning: a.b: unused"
    assert str(Problem("p.yaml", None, None, "", "cannot read")) == "p.yaml: cannot read"
    assert str(Problem(None, None, None, "count", "bad")) == "count: bad"
    err = ConfigError([Problem("a", 1, 1, "x", "one"), Problem("a", 2, 1, "y", "two", "warning")])
    assert str(err) == "a:1:1: x: one\na:2:1: warning: y: two"
    assert [p.message for p in err.errors] == ["one"]


# --- fuzzing ------------------------------------------------------------------------------

_TOKENS = [
    "receivers", "processors", "exporters", "extensions", "service", "pipelines", "logs", "traces/x", "metrics",
    "nop", "otlp", "batch", "file", "storage", "count", "limits", "max_items", "delay", "5s", "64MiB", "tags",
    "${env:A}", "${env:B:-1}", "$$", "${", "}", "{", "[", "]", ",", ":", ": ", "- ", "\n", "\n  ", "\n    ", " ",
    "'", '"', "#", "&a", "*a", "<<", "!!str", "!x", "|", ">", "---", "~", "null", "true", "-1", "1e9", "0x1f",
    "\t", "%", "@", "`", "?", "\\", "é", "\x00", "\ufeff",
]


def _load_text(directory: str, text: str) -> None:
    path = os.path.join(directory, "fuzz.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        cfg = load_config([path], REGISTRY, env={"A": "1"})
    except ConfigError as e:
        assert e.problems
        assert all(isinstance(p, Problem) and str(p) for p in e.problems)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join))
def test_fuzz_token_soup_gives_config_or_config_error(tmp_path, text):
    _load_text(str(tmp_path), text)


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10),
    st.sampled_from(["nop", "otlp", "5s", "-1s", "64MiB", "${env:A}", "fast", "logs"]),
)
_KEYS = st.one_of(st.sampled_from(_TOKENS[:22] + ["nop/2", "logs/x", "protocols", "grpc", "endpoint", "mode"]), st.text(max_size=5))
_TREES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5), max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["receivers", "processors", "exporters", "extensions", "service", "x"]), _TREES, max_size=5))
def test_fuzz_structured_configs_give_config_or_config_error(tmp_path, tree):
    _load_text(str(tmp_path), yaml.safe_dump(tree, allow_unicode=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_good_config_gives_config_or_config_error(tmp_path, data):
    text = (CONFIGS / "good.yaml").read_text()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 20)))
        text = text[:i] + data.draw(st.sampled_from(_TOKENS + [""])) + text[j:]
    _load_text(str(tmp_path), text)


@given(_TREES)
def test_fuzz_decode_dataclass_gives_config_or_config_error(tree):
    try:
        cfg = decode_dataclass(NopConfig, tree)
    except ConfigError as e:
        assert e.problems
    else:
        assert isinstance(cfg, NopConfig)


# --- the nop components ---------------------------------------------------------------


def _settings(kind: Kind, telemetry: Telemetry) -> Settings:
    import logging

    return Settings(
        id=ComponentID("nop"),
        kind=kind,
        telemetry=telemetry.for_component(kind.value, "nop"),
        logger=logging.getLogger("tapio.test"),
    )


async def test_nop_receiver_runs_until_cancelled():
    receiver = nop_receiver_factory.create(_settings(Kind.RECEIVER, Telemetry()), NopConfig(), Ports())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            await trio.testing.wait_all_tasks_blocked()
            assert len(nursery.child_tasks) == 1  # still running: it returns only when cancelled
            nursery.cancel_scope.cancel()


async def test_nop_processor_passes_batches_through():
    from tapio.testing.sink import RecordingConsumer

    telemetry = Telemetry()
    send, receive = trio.open_memory_channel[Batch](4)
    sink = RecordingConsumer()
    processor = nop_processor_factory.create(_settings(Kind.PROCESSOR, telemetry), NopConfig(), Ports(input=receive, output=sink))
    batches = [log_batch(["hello", "world"]), log_batch(["hello", "world"])]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(processor.run)
            for b in batches:
                await send.send(b)
            await send.aclose()  # end of stream: run returns on its own
    assert sink.batches == batches
    assert telemetry.value("tapio_processor_incoming_items_total", processor="nop") == 4
    assert telemetry.value("tapio_processor_outgoing_items_total", processor="nop") == 4


async def test_nop_exporter_counts_batches_as_sent():
    telemetry = Telemetry()
    send, receive = trio.open_memory_channel[Batch](4)
    exporter = nop_exporter_factory.create(_settings(Kind.EXPORTER, telemetry), NopConfig(), Ports(input=receive))
    batch = log_batch(["hello", "world"])
    delivered: list[bool] = []
    batch.on_done.append(delivered.append)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            await send.send(batch)
            await send.aclose()
    assert delivered == [True]
    assert telemetry.value("tapio_exporter_sent_log_records_total", exporter="nop") == 2


def test_nop_factories_support_every_signal_and_default_config_validates():
    for factory in (nop_receiver_factory, nop_processor_factory, nop_exporter_factory):
        assert factory.type == "nop" and factory.signals == frozenset(Signal)
        assert decode_dataclass(factory.config_class, {}) == NopConfig()


DURABLE = """
receivers:
  otlp: {ACK}
  otlp/other: {}
processors:
  batch: {}
exporters:
  otlp/tempo:
    endpoint: http://127.0.0.1:4317
    sending_queue: {QUEUE}
extensions:
  storage: {path: STATE/tapio.db}
service:
  extensions: [storage]
  pipelines:
    logs: {receivers: [otlp], processors: [batch], exporters: [otlp/tempo]}
    traces: {receivers: [otlp], processors: [batch], exporters: [otlp/tempo]}
    metrics: {receivers: [otlp/other], exporters: [otlp/tempo]}
"""


@pytest.mark.parametrize(
    "ack,queue,warned",
    [
        ("{}", "{storage: storage}", ["otlp", "otlp/other"]),  # once per receiver, not per pipeline
        ("{acknowledge: delivered}", "{storage: storage}", ["otlp/other"]),
        ("{}", "{}", []),  # an in-memory queue promises nothing across a crash: nothing to warn about
    ],
)
def test_acknowledging_before_delivery_in_front_of_a_storage_queue_is_a_warning(tmp_path, ack, queue, warned):
    from tapio.builtin import default_registry

    path = write(tmp_path, DURABLE.replace("{ACK}", ack).replace("{QUEUE}", queue).replace("STATE", str(tmp_path)))
    cfg = load_config([path], default_registry(), env={})
    ack_warnings = [str(w) for w in cfg.warnings if "answers its clients before export" in str(w)]
    assert [w.split("receiver '")[1].split("'")[0] for w in ack_warnings] == warned
    where = {"otlp": "3:3: warning: receivers.otlp.acknowledge: ", "otlp/other": "4:3: warning: receivers.otlp/other.acknowledge: "}
    for rid, text in zip(warned, ack_warnings):
        assert text.startswith(f"{path}:{where[rid]}")
        assert "exporter 'otlp/tempo' queues to storage; set acknowledge: delivered" in text


# --- extension references ----------------------------------------------------------

TWO_STORAGES = """\
receivers:
  otlp: {acknowledge: delivered}
exporters:
  otlp/tempo:
    endpoint: http://127.0.0.1:4317
    sending_queue: {storage: REF}
extensions:
  storage/a: {path: STATE/a.db}
  storage/b: {path: STATE/b.db}
service:
  extensions: [storage/a, storage/b]
  pipelines:
    logs: {receivers: [otlp], exporters: [otlp/tempo]}
"""


def _full_problems(path: str) -> list[str]:
    from tapio.builtin import default_registry

    with pytest.raises(ConfigError) as info:
        load_config([path], default_registry(), env={})
    return [str(p) for p in info.value.problems]


def test_a_storage_reference_names_the_extension_it_decodes_to(tmp_path):
    from tapio.builtin import default_registry
    from tapio.component import StorageRef

    path = write(tmp_path, TWO_STORAGES.replace("REF", "storage/b").replace("STATE", str(tmp_path)))
    cfg = load_config([path], default_registry(), env={})
    ref = cfg.exporters[ComponentID("otlp", "tempo")].sending_queue.storage
    assert ref == StorageRef(ComponentID("storage", "b")) and str(ref) == "storage/b"


@pytest.mark.parametrize(
    "ref,message",
    [
        ("storage/bb", "storage extension 'storage/bb' is not defined in extensions; did you mean 'storage/b'?"),
        ("storagee", "storage extension 'storagee' is not defined in extensions; did you mean 'storage/b'? A storage extension's id is 'storage' or 'storage/<name>'"),
        ("storage/c", "storage extension 'storage/c' is not defined in extensions; did you mean 'storage/b'? To add it, define `extensions: {storage/c: {}}`"),
        ("otlp", "storage extension 'otlp' is not defined in extensions (defined: storage/a, storage/b). A storage extension's id"),
    ],
)
def test_a_storage_reference_to_an_undefined_extension_is_an_error_at_its_line(tmp_path, ref, message):
    path = write(tmp_path, TWO_STORAGES.replace("REF", ref).replace("STATE", str(tmp_path)))
    problems = _full_problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:6:30: exporters.otlp/tempo.sending_queue.storage: {message}")
    assert ("list it in service.extensions" in problems[0]) == ref.startswith("storage/")


def test_a_storage_reference_to_an_extension_not_in_the_service_is_an_error(tmp_path):
    text = TWO_STORAGES.replace("REF", "storage/b").replace("[storage/a, storage/b]", "[storage/a]").replace("STATE", str(tmp_path))
    path = write(tmp_path, text)
    errors = [p for p in _full_problems(path) if ": warning: " not in p]
    assert errors == [
        f"{path}:6:30: exporters.otlp/tempo.sending_queue.storage: storage extension 'storage/b' is defined but not "
        "listed in service.extensions, so it does not run: add it there",
    ]


def test_an_extension_reference_must_name_an_extension_of_its_type(tmp_path):
    from tapio.builtin import default_registry
    from tapio.component import Factory, Kind, Registry

    @dataclass(frozen=True, kw_only=True)
    class _Other:
        pass

    class _Ext:
        async def run(self, *, task_status):  # pragma: no cover - never started
            task_status.started(None)

    registry = Registry([*default_registry().all(), Factory(
        type="other", kind=Kind.EXTENSION, config_class=_Other, signals=frozenset(), create=lambda s, c, p: _Ext(), description="test",
    )])
    text = TWO_STORAGES.replace("REF", "other").replace("storage/b: {path: STATE/b.db}", "other: {}").replace(
        "[storage/a, storage/b]", "[storage/a, other]").replace("STATE", str(tmp_path))
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config([path], registry, env={})
    assert [str(p) for p in e.value.errors] == [
        f"{path}:6:30: exporters.otlp/tempo.sending_queue.storage: extension 'other' is of type 'other', "
        f"not a storage extension (defined: storage/a)"
    ]
