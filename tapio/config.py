"""Loading pipelines.yaml: read, expand ``${env:VAR}``, merge files, decode and validate.

Invariants:
- `load_config` either returns a `Config` in which every component config is
  an instance of its factory's config class that passed ``validate()``, and
  every pipeline names only defined components that support its signal; or
  it raises `ConfigError` carrying every problem found, never just the
  first. Bad input never makes it raise anything else.
- Every problem names the dotted key path and, when the value came from a
  file, the file, line and column where that value (or its key, for unknown
  and duplicate keys) was written, in the file it came from after merging.
- What a config field accepts is decided by its type annotation alone (the
  decoder in `tapio.decode`); component code never sees raw YAML.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping as MappingType, Sequence as SequenceType

from tapio._yamlnodes import Entry, Loc, Mapping, Node, Scalar, Sequence, describe, expand_env, is_null, join_path, merge, parse_yaml
from tapio.component import (
    AcknowledgesBeforeDelivery,
    ComponentID,
    Factory,
    Kind,
    PipelineID,
    QueuesDurably,
    Registry,
    describe_signals,
    setting,
)
from tapio.decode import (
    INVALID,
    ConfigError,
    Problem,
    Problems,
    config_fields,
    decode_dataclass,
    decode_node,
    decode_validated,
    did_you_mean,
    type_hints,
)
from tapio.pdata import Signal
from tapio.units import Duration, parse_listen_address

__all__ = [
    "Config",
    "ConfigError",
    "LogsTelemetry",
    "MetricsTelemetry",
    "PipelineConfig",
    "Problem",
    "RestartBackoff",
    "ServiceConfig",
    "TelemetryConfig",
    "config_fields",
    "decode_dataclass",
    "expand_env",
    "load_config",
]


# --- the result ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LogsTelemetry:
    level: Literal["debug", "info", "warn", "error"] = setting("info", doc="Lowest level of tapio's own log messages that is written.")
    encoding: Literal["text", "json"] = setting("text", doc="Format of tapio's own log lines: human-readable text or one JSON object per line.")


@dataclass(frozen=True, kw_only=True)
class MetricsTelemetry:
    address: str = setting(
        "127.0.0.1:8888",
        doc="host:port of the self-telemetry server (/metrics, /healthz, /readyz); empty disables it, port 0 picks a free port.",
    )

    def validate(self) -> list[str]:
        if not self.address:
            return []
        try:
            parse_listen_address(self.address, example="127.0.0.1:8888")
        except ValueError as exc:
            return [f"address: {exc} (or '' to disable)"]
        return []


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    logs: LogsTelemetry = setting(default_factory=LogsTelemetry, doc="tapio's own logs.")
    metrics: MetricsTelemetry = setting(default_factory=MetricsTelemetry, doc="tapio's own metrics server.")

    def validate(self) -> list[str]:
        return [f"metrics.{p}" for p in self.metrics.validate()]


@dataclass(frozen=True, kw_only=True)
class RestartBackoff:
    initial: Duration = setting(Duration(1.0), doc="Wait before the first restart of a failed component; doubled after each further failure.")
    max: Duration = setting(Duration(30.0), doc="Longest wait between restarts.")

    def validate(self) -> list[str]:
        problems = []
        if self.initial <= 0:
            problems.append("initial: must be more than 0s")
        if self.max < self.initial:
            problems.append(f"max: must be at least initial ({self.initial})")
        return problems


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    receivers: list[ComponentID] = field(default_factory=list)
    processors: list[ComponentID] = field(default_factory=list)
    exporters: list[ComponentID] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    pipelines: dict[PipelineID, PipelineConfig] = field(default_factory=dict)
    extensions: list[ComponentID] = field(default_factory=list)
    telemetry: TelemetryConfig = setting(default_factory=TelemetryConfig, doc="tapio's own logs and metrics.")
    shutdown_timeout: Duration = setting(Duration(10.0), doc="Overall deadline for draining the pipelines on SIGTERM/SIGINT.")
    on_component_failure: Literal["restart", "stop"] = setting(
        "restart", doc="What happens when a running component fails: restart it with backoff, or stop tapio."
    )
    restart_backoff: RestartBackoff = setting(default_factory=RestartBackoff, doc="Backoff between restarts of a failed component.")


@dataclass(frozen=True)
class Config:
    """A loaded and validated configuration.

    The component sections hold every defined component, used or not, keyed
    by id; each value is its factory's config class instance. Components no
    pipeline (or, for extensions, ``service.extensions``) names are listed in
    ``warnings`` and need not be started.
    """

    receivers: dict[ComponentID, Any] = field(default_factory=dict)
    processors: dict[ComponentID, Any] = field(default_factory=dict)
    exporters: dict[ComponentID, Any] = field(default_factory=dict)
    connectors: dict[ComponentID, Any] = field(default_factory=dict)
    extensions: dict[ComponentID, Any] = field(default_factory=dict)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    #: the files it was loaded from, in merge order
    files: list[str] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def section(self, kind: Kind) -> dict[ComponentID, Any]:
        """The component configs of one kind, by id."""
        return getattr(self, kind.plural)


# --- loading ---------------------------------------------------------------------

_SECTIONS = {k.plural: k for k in (Kind.RECEIVER, Kind.PROCESSOR, Kind.EXPORTER, Kind.CONNECTOR, Kind.EXTENSION)}
_TOP_KEYS = (*_SECTIONS, "service")
_SERVICE_KEYS = tuple(f.name for f in dataclasses.fields(ServiceConfig))
_PIPELINE_ROLES = (("receivers", Kind.RECEIVER), ("processors", Kind.PROCESSOR), ("exporters", Kind.EXPORTER))


@dataclass
class _Defined:
    key: str
    key_loc: Loc
    factory: Factory | None  # None: unknown type (already reported)
    config: Any  # INVALID when it did not decode or validate


@dataclass(frozen=True)
class _ConnectorUse:
    """A connector listed in a pipeline: as an exporter (its input) or a receiver (its output)."""

    connector: ComponentID
    pipeline: PipelineID
    as_exporter: bool
    loc: Loc
    path: str


def load_config(
    paths: SequenceType[str | Path],
    registry: Registry,
    env: MappingType[str, str] | None = None,
    overrides: SequenceType[str] = (),
) -> Config:
    """Read, merge and validate config sources (later ones override earlier ones), then ``overrides``.

    A source is a file path or a URI, as ``--config`` takes them in the
    OpenTelemetry Collector: ``file:PATH``, ``env:NAME`` (the YAML in an
    environment variable) or ``yaml:TEXT`` (inline YAML whose keys may
    name nested keys joined by ``::``). ``overrides`` are ``--set``
    values, ``key::key=value``, applied after every source. ``env`` is
    where ``env:`` sources and ``${env:NAME}`` references are looked up
    (default `os.environ`). Raises `ConfigError` with every problem found;
    the returned `Config` carries the warnings (unset variables, unused
    components).
    """
    env = os.environ if env is None else env
    sources = [str(p) for p in paths]
    report = Problems()
    if not sources:
        raise ConfigError([Problem(None, None, None, "", "no config file given")])

    files = [source_name(s) for s in sources] + [f"--set {o}" for o in overrides]
    roots: list[Mapping] = []
    for source in sources:
        root = _read_source(source, env, report)
        if root is not None:
            roots.append(root)
    for override in overrides:
        root = _read_override(override, env, report)
        if root is not None:
            roots.append(root)
    if report.has_errors:
        # A file that could not be read or parsed would make every later check misleading.
        raise ConfigError(report.sorted(files))

    merged: Mapping = Mapping({}, Loc(files[-1]))
    for root in roots:
        merged = merge(merged, root)  # type: ignore[assignment]

    for key, entry in merged.entries.items():
        if key not in _TOP_KEYS:
            hint = did_you_mean(key, _TOP_KEYS) or f" (valid keys: {', '.join(_TOP_KEYS)})"
            report(entry.key_loc, join_path("", key), f"unknown top-level key {key!r}{hint}")

    defined: dict[Kind, dict[ComponentID, _Defined]] = {}
    for section, kind in _SECTIONS.items():
        defined[kind] = _decode_section(kind, merged.entries.get(section), registry, report)

    _check_ambiguous_connectors(defined, report)
    used: dict[Kind, set[ComponentID]] = {kind: set() for kind in _SECTIONS.values()}
    uses: list[_ConnectorUse] = []
    service = _decode_service(merged, defined, used, uses, report)
    if service is not None or any(used.values()):
        _warn_unused(defined, used, report)  # not when there is no service section to speak of
    if service is not None:
        if not _check_connectors(uses, defined, report):
            service = None
    if service is not None:
        _check_extension_refs(service, defined, report)
        _warn_acknowledged_but_not_durable(service, defined, report)
    if report.has_errors or service is None:
        raise ConfigError(report.sorted(files))
    return Config(
        **{section: {cid: d.config for cid, d in defined[kind].items()} for section, kind in _SECTIONS.items()},
        service=service,
        files=files,
        warnings=report.sorted(files),
    )


#: the ``--config`` URI schemes tapio reads (the OpenTelemetry Collector's file, env and yaml providers)
SOURCE_SCHEMES = ("file", "env", "yaml")
#: schemes the Collector also knows that tapio does not read: named in the error rather than taken for a file name
_UNSUPPORTED_SCHEMES = ("http", "https", "s3")
_URI = re.compile(r"([a-z][a-z0-9+.\-]*):(.*)", re.S)
#: joins nested keys in ``yaml:`` sources and ``--set`` (a ``.`` may be part of a key, as in the Collector)
KEY_SEPARATOR = "::"


def _scheme(source: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a config source; ``("file", source)`` for a plain path."""
    m = _URI.fullmatch(source)
    if m is not None and m.group(1) in (*SOURCE_SCHEMES, *_UNSUPPORTED_SCHEMES):
        return m.group(1), m.group(2)
    return "file", source


def source_name(source: str) -> str:
    """What problems in ``source`` are reported against: the file's path, or the URI (``env:NAME``)."""
    scheme, rest = _scheme(source)
    return rest if scheme == "file" else source


def source_file(source: str) -> str | None:
    """The file a config source reads, None for ``env:`` and ``yaml:`` sources (for watching files)."""
    scheme, rest = _scheme(source)
    return rest if scheme == "file" else None


def _read_source(source: str, env: MappingType[str, str], report: Problems) -> Mapping | None:
    scheme, rest = _scheme(source)
    if scheme == "file":
        return _read_file(rest, env, report)
    if scheme in _UNSUPPORTED_SCHEMES:
        report(Loc(source), "", f"config source scheme {scheme!r} is not supported; use a file path, file:PATH, env:NAME or yaml:TEXT")
        return None
    if scheme == "env":
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rest):
            report(Loc(source), "", f"invalid environment variable name {rest!r}: use letters, digits and '_', not starting with a digit")
            return None
        if rest not in env:
            report(Loc(source), "", f"environment variable {rest!r} is not set (it should hold the YAML of a config)")
            return None
        return _top_mapping(parse_yaml(env[rest], source, env, report), report)
    root = _top_mapping(parse_yaml(rest, source, env, report), report)
    return _nest_keys(root) if root is not None else None


def _read_override(text: str, env: MappingType[str, str], report: Problems) -> Mapping | None:
    """One ``--set key::key=value``: the value read as YAML, placed at that key."""
    name = f"--set {text}"
    key, eq, value = text.partition("=")
    example = "e.g. --set processors::batch::timeout=2s"
    if not eq or not key.strip():
        report(Loc(name), "", f"expected key=value, with '::' between nested keys, {example}")
        return None
    if KEY_SEPARATOR not in key and "." in key:
        report(Loc(name), "", f"nested keys are joined with '::', not '.' (as in the OpenTelemetry Collector), {example}")
        return None
    keys = [k.strip() for k in key.split(KEY_SEPARATOR)]
    if not all(keys):
        report(Loc(name), "", f"empty key in {key!r}, {example}")
        return None
    node = parse_yaml(value, name, env, report) if value.strip() else None
    if node is None:
        node = Scalar(None, "", Loc(name, 1, 1))
    for k in reversed(keys):
        node = Mapping({k: Entry(node.loc, node)}, node.loc)
    return node  # type: ignore[return-value]


def _nest_keys(node: Mapping) -> Mapping:
    """``a::b: v`` as ``a: {b: v}``, at every level (what ``yaml:`` sources write)."""
    out: Mapping = Mapping({}, node.loc)
    for key, e in node.entries.items():
        value = _nest_keys(e.node) if isinstance(e.node, Mapping) else e.node
        parts = key.split(KEY_SEPARATOR)
        for k in reversed(parts[1:]):
            value = Mapping({k: Entry(e.key_loc, value)}, e.key_loc)
        out = merge(out, Mapping({parts[0]: Entry(e.key_loc, value)}, node.loc))  # type: ignore[assignment]
    return out


def _top_mapping(root: Node | None, report: Problems) -> Mapping | None:
    if root is None or is_null(root):
        return None  # an empty source adds nothing
    if not isinstance(root, Mapping):
        report(root.loc, "", f"the top level of a config file must be a mapping (receivers:, exporters:, service: ...), got {describe(root)}")
        return None
    return root


def _read_file(file: str, env: MappingType[str, str], report: Problems) -> Mapping | None:
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        report(Loc(file), "", f"cannot read config file: {e.strerror or e}")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        report(Loc(file, line, column), "", f"not valid UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8")
        return None
    return _top_mapping(parse_yaml(text, file, env, report), report)


def _decode_section(kind: Kind, entry: Entry | None, registry: Registry, report: Problems) -> dict[ComponentID, _Defined]:
    out: dict[ComponentID, _Defined] = {}
    if entry is None or is_null(entry.node):
        return out
    node = entry.node
    if not isinstance(node, Mapping):
        report(node.loc, kind.plural, f"expected a mapping of {kind.value} ids to their settings, got {describe(node)}")
        return out
    for key, e in node.entries.items():
        path = join_path(kind.plural, key)
        try:
            cid = ComponentID.parse(key)
        except ValueError as ex:
            report(e.key_loc, path, str(ex))
            continue
        if cid in out:
            report(e.key_loc, path, f"{kind.value} '{cid}' is defined twice (also as {out[cid].key!r})")
            continue
        factory = registry.get(kind, cid.type)
        if factory is None:
            known = registry.types(kind)
            report(
                e.key_loc,
                path,
                f"unknown {kind.value} type {cid.type!r}{did_you_mean(cid.type, known)} (registered: {', '.join(known) or 'none'})",
            )
            out[cid] = _Defined(key, e.key_loc, None, INVALID)
            continue
        config = decode_validated(factory.config_class, e.node, path, report, e.key_loc)
        out[cid] = _Defined(key, e.key_loc, factory, config)
    return out


def _decode_service(
    root: Mapping,
    defined: dict[Kind, dict[ComponentID, _Defined]],
    used: dict[Kind, set[ComponentID]],
    uses: list[_ConnectorUse],
    report: Problems,
) -> ServiceConfig | None:
    entry = root.entries.get("service")
    if entry is None:
        report(root.loc, "service", "missing: a config needs a service section with at least one pipeline (service.pipelines)")
        return None
    node = entry.node
    if not isinstance(node, Mapping):
        report(node.loc if not is_null(node) else entry.key_loc, "service", f"expected a mapping with pipelines, got {describe(node)}")
        return None
    ok = True
    kwargs: dict[str, Any] = {}
    hints = type_hints(ServiceConfig)
    for key, e in node.entries.items():
        path = join_path("service", key)
        if key not in _SERVICE_KEYS:
            hint = did_you_mean(key, _SERVICE_KEYS) or f" (valid keys: {', '.join(_SERVICE_KEYS)})"
            report(e.key_loc, path, f"unknown key {key!r}{hint}")
            ok = False
        elif key in ("pipelines", "extensions"):
            continue
        elif is_null(e.node):
            continue
        else:
            tp = hints[key]
            value = (
                decode_validated(tp, e.node, path, report, e.key_loc)
                if dataclasses.is_dataclass(tp)
                else decode_node(tp, e.node, path, report)
            )
            if value is INVALID:
                ok = False
            else:
                kwargs[key] = value

    extensions = _decode_id_list(
        node.entries.get("extensions"), "service.extensions", Kind.EXTENSION, None, defined, used, uses, report
    )
    pipelines = _decode_pipelines(node, entry.key_loc, defined, used, uses, report)
    if not ok or extensions is None or pipelines is None:
        return None
    return ServiceConfig(pipelines=pipelines, extensions=extensions, **kwargs)


def _decode_pipelines(
    service: Mapping,
    service_loc: Loc,
    defined: dict[Kind, dict[ComponentID, _Defined]],
    used: dict[Kind, set[ComponentID]],
    uses: list[_ConnectorUse],
    report: Problems,
) -> dict[PipelineID, PipelineConfig] | None:
    entry = service.entries.get("pipelines")
    example = "e.g. pipelines: {logs: {receivers: [otlp], exporters: [debug]}}"
    if entry is None:
        report(service_loc, "service.pipelines", f"missing: define at least one pipeline, {example}")
        return None
    node = entry.node
    if is_null(node) or (isinstance(node, Mapping) and not node.entries):
        report(entry.key_loc, "service.pipelines", f"no pipelines defined; define at least one, {example}")
        return None
    if not isinstance(node, Mapping):
        report(node.loc, "service.pipelines", f"expected a mapping of pipeline ids to pipelines, got {describe(node)}")
        return None
    ok = True
    out: dict[PipelineID, PipelineConfig] = {}
    for key, e in node.entries.items():
        path = join_path("service.pipelines", key)
        pid: PipelineID | None
        try:
            pid = PipelineID.parse(key)
        except ValueError as ex:
            report(e.key_loc, path, str(ex))
            pid, ok = None, False
        if pid is not None and pid in out:
            report(e.key_loc, path, f"pipeline '{pid}' is defined twice")
            ok = False
        body = e.node
        if is_null(body):
            body = Mapping({}, e.key_loc)
        if not isinstance(body, Mapping):
            report(body.loc, path, f"expected a mapping with receivers, processors and exporters, got {describe(body)}")
            ok = False
            continue
        roles = [r for r, _ in _PIPELINE_ROLES]
        for k, ke in body.entries.items():
            if k not in roles:
                hint = did_you_mean(k, roles) or f" (valid keys: {', '.join(roles)})"
                report(ke.key_loc, join_path(path, k), f"unknown key {k!r}{hint}")
                ok = False
        lists: dict[str, list[ComponentID]] = {}
        for role, kind in _PIPELINE_ROLES:
            role_entry = body.entries.get(role)
            ids = _decode_id_list(role_entry, f"{path}.{role}", kind, pid, defined, used, uses, report)
            if ids is None:
                ok = False
                continue
            lists[role] = ids
            if kind is not Kind.PROCESSOR and not ids:
                if role_entry is None:
                    report(e.key_loc, path, f"a pipeline needs at least one {kind.value} ({role}: is missing)")
                else:
                    report(role_entry.key_loc, f"{path}.{role}", f"a pipeline needs at least one {kind.value}")
                ok = False
        if pid is not None and len(lists) == len(_PIPELINE_ROLES):
            out[pid] = PipelineConfig(**lists)
    return out if ok else None


def _decode_id_list(
    entry: Entry | None,
    path: str,
    kind: Kind,
    pipeline: PipelineID | None,
    defined: dict[Kind, dict[ComponentID, _Defined]],
    used: dict[Kind, set[ComponentID]],
    uses: list[_ConnectorUse],
    report: Problems,
) -> list[ComponentID] | None:
    """Component ids listed under ``path``, each checked to be defined (and to support the pipeline's signal).

    In a pipeline's receivers and exporters an id may name a connector
    instead; each such use is appended to ``uses`` for `_check_connectors`.
    """
    if entry is None or is_null(entry.node):
        return []
    node = entry.node
    if not isinstance(node, Sequence):
        report(node.loc, path, f"expected a list of {kind.value} ids like [otlp, otlp/2], got {describe(node)}")
        return None
    ok = True
    out: list[ComponentID] = []
    first: dict[ComponentID, int] = {}
    role = path.rpartition(".")[2]
    for i, item in enumerate(node.items):
        ipath = f"{path}[{i}]"
        if not isinstance(item, Scalar) or not isinstance(item.value, str):
            report(item.loc, ipath, f"expected a {kind.value} id like 'otlp' or 'otlp/2', got {describe(item)}")
            ok = False
            continue
        try:
            cid = ComponentID.parse(item.value)
        except ValueError as ex:
            report(item.loc, ipath, str(ex))
            ok = False
            continue
        if cid in first:
            report(item.loc, ipath, f"{kind.value} '{cid}' is listed twice (first at {role}[{first[cid]}])")
            ok = False
            continue
        first[cid] = i
        if pipeline is not None and kind in (Kind.RECEIVER, Kind.EXPORTER) and cid not in defined[kind] and cid in defined[Kind.CONNECTOR]:
            used[Kind.CONNECTOR].add(cid)
            uses.append(_ConnectorUse(cid, pipeline, kind is Kind.EXPORTER, item.loc, ipath))
            c = defined[Kind.CONNECTOR][cid]
            if c.factory is not None and pipeline.signal not in (c.factory.signals if kind is Kind.EXPORTER else c.factory.emits):
                role_word = "take" if kind is Kind.EXPORTER else "emit"
                report(item.loc, ipath, f"connector '{cid}' does not {role_word} {pipeline.signal.value} (it connects: {_pairs(c.factory)})")
                ok = False
            out.append(cid)
            continue
        used[kind].add(cid)
        d = defined[kind].get(cid)
        if d is None:
            names = [str(c) for c in defined[kind]]
            if kind in (Kind.RECEIVER, Kind.EXPORTER):
                names += [str(c) for c in defined[Kind.CONNECTOR]]
            hint = did_you_mean(str(cid), names) or (f" (defined: {', '.join(names)})" if names else "")
            report(item.loc, ipath, f"{kind.value} '{cid}' is not defined in {kind.plural}{hint}")
            ok = False
        elif d.factory is not None and pipeline is not None and pipeline.signal not in d.factory.signals:
            supports = describe_signals(d.factory.signals) or "none"
            report(item.loc, ipath, f"{kind.value} '{cid}' does not support {pipeline.signal.value} (it supports: {supports})")
            ok = False
        out.append(cid)
    return out if ok else None


def _pairs(factory: Factory) -> str:
    order = list(Signal)
    return ", ".join(f"{a.value} → {b.value}" for a, b in sorted(factory.connects, key=lambda p: (order.index(p[0]), order.index(p[1]))))


def _check_ambiguous_connectors(defined: dict[Kind, dict[ComponentID, _Defined]], report: Problems) -> None:
    """A connector id must not also be a receiver or exporter id: a pipeline list could not say which it means."""
    for cid, d in defined[Kind.CONNECTOR].items():
        for kind in (Kind.RECEIVER, Kind.EXPORTER):
            if cid in defined[kind]:
                report(d.key_loc, join_path("connectors", d.key), f"'{cid}' is both a connector and {'a receiver' if kind is Kind.RECEIVER else 'an exporter'}: rename one, so pipelines can say which they mean")


def _check_connectors(uses: list[_ConnectorUse], defined: dict[Kind, dict[ComponentID, _Defined]], report: Problems) -> bool:
    """Each connector is used on both sides, joins only signal pairs it supports, and closes no cycle of pipelines."""
    ok = True
    by_connector: dict[ComponentID, list[_ConnectorUse]] = {}
    for use in uses:
        by_connector.setdefault(use.connector, []).append(use)
    for cid, cuses in by_connector.items():
        factory = defined[Kind.CONNECTOR][cid].factory
        ins = [u for u in cuses if u.as_exporter]
        outs = [u for u in cuses if not u.as_exporter]
        if not ins or not outs:
            u = cuses[0]
            missing, there = ("receivers", "an exporter") if ins else ("exporters", "a receiver")
            report(u.loc, u.path, f"connector '{cid}' is used as {there} but not listed under the {missing} of any pipeline: "
                                  f"a connector joins the end of one pipeline to the start of another")
            ok = False
            continue
        if factory is None:
            continue
        for o in outs:
            for i in ins:
                if (i.pipeline.signal, o.pipeline.signal) not in factory.connects:
                    report(o.loc, o.path, f"connector '{cid}' cannot connect {i.pipeline.signal.value} (from pipeline {i.pipeline}) "
                                          f"to {o.pipeline.signal.value} (it connects: {_pairs(factory)})")
                    ok = False
    # pipeline A → pipeline B when A exports to a connector that B receives from
    follows: dict[PipelineID, set[PipelineID]] = {}
    via: dict[tuple[PipelineID, PipelineID], _ConnectorUse] = {}
    for cid, cuses in by_connector.items():
        for i in (u for u in cuses if u.as_exporter):
            for o in (u for u in cuses if not u.as_exporter):
                follows.setdefault(i.pipeline, set()).add(o.pipeline)
                via.setdefault((i.pipeline, o.pipeline), o)
    cycle = _find_cycle(follows)
    if cycle:
        o = via[(cycle[-2], cycle[-1])]
        report(o.loc, o.path, f"connectors make a cycle of pipelines: {' → '.join(map(str, cycle))}; data would loop forever")
        ok = False
    return ok


def _find_cycle(follows: dict[PipelineID, set[PipelineID]]) -> list[PipelineID]:
    """A cycle as ``[a, b, …, a]``, or [] (depth-first search, nodes in sorted order so the report is stable)."""
    state: dict[PipelineID, int] = {}  # 1 on the stack, 2 done
    stack: list[PipelineID] = []

    def visit(p: PipelineID) -> list[PipelineID]:
        state[p] = 1
        stack.append(p)
        for q in sorted(follows.get(p, ())):
            if state.get(q) == 1:
                return stack[stack.index(q):] + [q]
            if q not in state:
                found = visit(q)
                if found:
                    return found
        stack.pop()
        state[p] = 2
        return []

    for p in sorted(follows):
        if p not in state:
            found = visit(p)
            if found:
                return found
    return []


def _check_extension_refs(service: ServiceConfig, defined: dict[Kind, dict[ComponentID, _Defined]], report: Problems) -> None:
    """Every `ExtensionRef` in a component's config names an extension of its type that the service starts."""
    extensions = defined[Kind.EXTENSION]
    enabled = set(service.extensions)
    for loc, path, ref in report.refs:
        want = ref.extension_type
        d = extensions.get(ref.id)
        of_type = [str(cid) for cid, e in extensions.items() if e.factory is not None and (not want or e.factory.type == want)]
        what = f"{want} extension" if want else "extension"
        if d is None:
            hint = did_you_mean(str(ref.id), of_type) or (f" (defined: {', '.join(of_type)})" if of_type else "")
            if not want or ref.id.type == want:
                fix = f"To add it, define `extensions: {{{ref.id}: {{}}}}` and list it in service.extensions"
            else:
                fix = f"A {want} extension's id is '{want}' or '{want}/<name>'"
            sep = " " if hint.endswith("?") else ". "
            report(loc, path, f"{what} '{ref}' is not defined in extensions{hint}{sep}{fix}")
        elif d.factory is not None and want and d.factory.type != want:
            hint = f" (defined: {', '.join(of_type)})" if of_type else ""
            report(loc, path, f"extension '{ref}' is of type {d.factory.type!r}, not a {want} extension{hint}")
        elif ref.id not in enabled:
            report(loc, path, f"{what} '{ref}' is defined but not listed in service.extensions, so it does not run: add it there")


def _warn_acknowledged_but_not_durable(service: ServiceConfig, defined: dict[Kind, dict[ComponentID, _Defined]], report: Problems) -> None:
    """A receiver that answers its clients before export, in front of an exporter that queues to storage.

    The storage queue makes what reached the exporter survive a crash, but
    what the receiver acknowledged and the pipeline still holds (channels,
    the batch processor) is lost: the user most likely wants the receiver to
    acknowledge on delivery. Components opt in by declaring the capability:
    a receiver config `AcknowledgesBeforeDelivery`, an exporter config
    `QueuesDurably`.
    """
    def config_of(kind: Kind, cid: ComponentID) -> Any:
        d = defined[kind].get(cid)
        return d.config if d is not None else None

    warned: set[ComponentID] = set()
    for pid, pipeline in sorted(service.pipelines.items()):
        durable = [e for e in pipeline.exporters if isinstance(c := config_of(Kind.EXPORTER, e), QueuesDurably) and c.queues_durably]
        if not durable:
            continue
        for rid in pipeline.receivers:
            rc = config_of(Kind.RECEIVER, rid)
            key = rc.acknowledges_before_delivery if isinstance(rc, AcknowledgesBeforeDelivery) else None
            if key is None or rid in warned:
                continue
            warned.add(rid)
            d = defined[Kind.RECEIVER][rid]
            report(
                d.key_loc,
                join_path(join_path("receivers", d.key), key),
                f"receiver '{rid}' answers its clients before export, so in pipeline {pid} what it acknowledged and "
                f"tapio still holds (e.g. in the batch processor) is lost if tapio is killed, although exporter "
                f"'{durable[0]}' queues to storage; set {key}: delivered to acknowledge only what is delivered or on disk",
                "warning",
            )


def _warn_unused(defined: dict[Kind, dict[ComponentID, _Defined]], used: dict[Kind, set[ComponentID]], report: Problems) -> None:
    for kind, comps in defined.items():
        for cid, d in comps.items():
            if cid in used[kind] or d.factory is None:
                continue
            where = "service.extensions" if kind is Kind.EXTENSION else "any pipeline"
            report(d.key_loc, join_path(kind.plural, d.key), f"{kind.value} '{cid}' is defined but not used in {where}", "warning")
