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
- What a config field accepts is decided by its type annotation alone (see
  `decode_dataclass`); component code never sees raw YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping as MappingType, Sequence as SequenceType, TypeVar, Union

from tapio._yamlnodes import (
    Entry,
    Loc,
    Mapping,
    Node,
    Scalar,
    Sequence,
    describe,
    expand_env,
    from_python,
    is_null,
    join_path,
    merge,
    parse_yaml,
    to_python,
)
from tapio.component import (
    AcknowledgesBeforeDelivery,
    ComponentID,
    ExtensionRef,
    Factory,
    Kind,
    PipelineID,
    QueuesDurably,
    Registry,
    config_problems,
    describe_signals,
    setting,
)
from tapio.units import ByteSize, Duration, parse_listen_address

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

T = TypeVar("T")
Severity = Literal["error", "warning"]


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
class Problem:
    """One thing wrong (or worth a warning) in the configuration, with where it was written."""

    file: str | None
    line: int | None
    column: int | None
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            parts.append(where)
        if self.severity == "warning":
            parts.append("warning")
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(Exception):
    """The configuration is not valid; ``problems`` holds every error (and the warnings), in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


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
    extensions: dict[ComponentID, Any] = field(default_factory=dict)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    #: the files it was loaded from, in merge order
    files: list[str] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def section(self, kind: Kind) -> dict[ComponentID, Any]:
        """The component configs of one kind, by id."""
        return getattr(self, kind.plural)


# --- problems --------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: list[Problem] = []
        #: every extension reference decoded, with where it was written (checked once the extensions are known)
        self.refs: list[tuple[Loc, str, ExtensionRef]] = []

    def __call__(self, loc: Loc, path: str, message: str, severity: str = "error") -> None:
        self.items.append(Problem(loc.file, loc.line, loc.column, path, message, severity))  # type: ignore[arg-type]

    @property
    def has_errors(self) -> bool:
        return any(p.severity == "error" for p in self.items)

    def sorted(self, files: SequenceType[str]) -> list[Problem]:
        order = {f: i for i, f in reversed(list(enumerate(files)))}

        def key(p: Problem) -> tuple[int, int, int]:
            return (order.get(p.file, len(files)) if p.file is not None else len(files), p.line or 0, p.column or 0)

        return sorted(self.items, key=key)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- the generic decoder ---------------------------------------------------------

_INVALID: Any = object()
_NONE_TYPE = type(None)
_NODE_TYPES = (Scalar, Mapping, Sequence)


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _accepts_none(tp: Any) -> bool:
    return tp is Any or (typing.get_origin(tp) in (Union, types.UnionType) and _NONE_TYPE in typing.get_args(tp))


def _is_group(tp: Any) -> bool:
    """A nested group of settings: a dataclass not written as one scalar (those have ``parse``, like `ComponentID`)."""
    return dataclasses.is_dataclass(tp) and isinstance(tp, type) and not callable(getattr(tp, "parse", None))


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _what(tp: type) -> str:
    if issubclass(tp, Duration):
        return "a duration"
    if issubclass(tp, ByteSize):
        return "a size"
    if tp is ComponentID:
        return "a component id"
    if issubclass(tp, ExtensionRef):
        return f"the id of a {tp.extension_type} extension like '{tp.extension_type}'" if tp.extension_type else "an extension id"
    return _KIND_WORDS.get(tp, tp.__name__)


def _decode(tp: Any, node: Node, path: str, report: _Problems) -> Any:
    """``node`` decoded as type ``tp``, or `_INVALID` after reporting why not."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return to_python(node)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not _NONE_TYPE]
        if is_null(node) and len(rest) < len(args) and not (len(rest) == 1 and _is_group(rest[0])):
            return None  # a `Group | None` field written empty (`grpc:`) is the group with its defaults, as in OTel
        if len(rest) != 1:
            raise TypeError(f"config field {path}: unsupported type {tp!r} (only `X | None` unions are supported)")
        return _decode(rest[0], node, path, report)
    if _is_group(tp):
        return _decode_dataclass(tp, node, path, report)
    if tp is list or origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(node, Sequence):
            report(node.loc, path, f"expected a list, got {describe(node)}")
            return _INVALID
        items = [_decode(item_tp, item, f"{path}[{i}]", report) for i, item in enumerate(node.items)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if tp is dict or origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (str, Any)
        if key_tp is not str:
            raise TypeError(f"config field {path}: unsupported type {tp!r} (mapping keys must be str)")
        if not isinstance(node, Mapping):
            report(node.loc, path, f"expected a mapping, got {describe(node)}")
            return _INVALID
        out = {k: _decode(value_tp, e.node, join_path(path, k), report) for k, e in node.entries.items()}
        return _INVALID if any(v is _INVALID for v in out.values()) else out
    if origin is Literal:
        return _decode_literal(typing.get_args(tp), node, path, report)
    if not isinstance(tp, type):
        raise TypeError(f"config field {path}: unsupported type {tp!r}")
    if not isinstance(node, Scalar):
        report(node.loc, path, f"expected {_what(tp)}, got {describe(node)}")
        return _INVALID
    value = node.value
    if callable(getattr(tp, "parse", None)):  # Duration, ByteSize, ComponentID: parse() raises ValueError
        if value is None:
            report(node.loc, path, f"expected {_what(tp)}, got null")
            return _INVALID
        try:
            parsed = tp.parse(value)
        except ValueError as e:
            report(node.loc, path, str(e))
            return _INVALID
        except OverflowError:
            report(node.loc, path, f"{describe(node)} is too large")
            return _INVALID
        if isinstance(parsed, ExtensionRef):
            report.refs.append((node.loc, path, parsed))
        return parsed
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is not None:  # numbers, booleans, dates: `version: 1.10` is "1.10", as written
            return node.text
    else:
        raise TypeError(f"config field {path}: unsupported type {tp!r}")
    report(node.loc, path, f"expected {_KIND_WORDS[tp]}, got {describe(node)}")
    return _INVALID


def _decode_literal(options: tuple[Any, ...], node: Node, path: str, report: _Problems) -> Any:
    if isinstance(node, Scalar):
        for opt in options:
            if type(opt) is type(node.value) and opt == node.value:
                return opt
        if not isinstance(node.value, str) and node.text in options:  # `mode: off` is YAML false
            return node.text
    names = [str(o) for o in options]
    got = describe(node)
    hint = _did_you_mean(node.value, names) if isinstance(node, Scalar) and isinstance(node.value, str) else ""
    report(node.loc, path, f"expected one of {', '.join(repr(o) for o in options)}, got {got}{hint}")
    return _INVALID


def _decode_dataclass(cls: type, node: Node, path: str, report: _Problems) -> Any:
    fields = _decode_fields(cls, node, path, report)
    if fields is None:
        return _INVALID
    kwargs, bad = fields
    if bad:
        return _INVALID
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        report(node.loc, path, str(e))
        return _INVALID


def _decode_fields(cls: type, node: Node, path: str, report: _Problems) -> tuple[dict[str, Any], set[str]] | None:
    """The decodable fields of ``node`` as keyword arguments for ``cls``, and the keys that were wrong.

    None when ``node`` is not a mapping (or null) at all.
    """
    if is_null(node):
        entries: dict[str, Entry] = {}
    elif isinstance(node, Mapping):
        entries = node.entries
    else:
        report(node.loc, path, f"expected a mapping of settings, got {describe(node)}")
        return None
    fields = _init_fields(cls)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    bad: set[str] = set()
    for key, entry in entries.items():
        kpath = join_path(path, key)
        if key not in fields:
            if not fields:
                report(entry.key_loc, kpath, f"unknown key {key!r} (this has no settings)")
            else:
                hint = _did_you_mean(key, fields) or f" (valid keys: {', '.join(fields)})"
                report(entry.key_loc, kpath, f"unknown key {key!r}{hint}")
            bad.add(key)
            continue
        tp = hints[key]
        if is_null(entry.node) and not _accepts_none(tp):
            continue  # `key:` or `key: null` keeps the default, as an empty component body does
        value = _decode(tp, entry.node, kpath, report)
        if value is _INVALID:
            bad.add(key)
        else:
            kwargs[key] = value
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if name not in entries:
                report(node.loc, join_path(path, name), "missing (this setting has no default)")
            bad.add(name)
    return kwargs, bad


def _locate(cls: type, node: Node, key: str, loc: Loc) -> Loc | None:
    """Where the value at dotted ``key`` (a validate() message's prefix) is written, if ``key`` names a field.

    The deepest part of ``key`` that is written wins; ``loc`` (the component's) if none is.
    """
    parts = key.split(".")
    head = parts[0].partition("[")[0]
    if not dataclasses.is_dataclass(cls) or head not in _init_fields(cls):
        return None
    cur: Node = node
    for part in parts:
        name, _, index = part.partition("[")
        if not isinstance(cur, Mapping) or name not in cur.entries:
            break
        cur = cur.entries[name].node
        loc = cur.loc
        if index:
            idx = index.rstrip("]")
            if not (idx.isdigit() and isinstance(cur, Sequence) and int(idx) < len(cur.items)):
                break
            cur = cur.items[int(idx)]
            loc = cur.loc
    return loc


def _decode_validated(cls: type, node: Node, path: str, report: _Problems, loc: Loc) -> Any:
    """Decode then run ``validate()``, attaching each problem to the key it names (``"key: message"``).

    When some fields did not decode, ``validate()`` still runs on a config
    made of the fields that did (the others at their defaults), and what it
    says about the broken fields is left out, so one pass reports both kinds
    of problem.
    """
    config = _decode(cls, node, path, report)
    bad: set[str] = set()
    if config is _INVALID:
        if not dataclasses.is_dataclass(cls):
            return _INVALID
        partial = _decode_partial(cls, node, "")
        if partial is None:
            return _INVALID
        candidate, bad = partial
        problems = [m for m in config_problems(candidate) if not _about(str(m), bad)]
    else:
        problems = config_problems(config)
    for message in problems:
        key, sep, rest = str(message).partition(": ")
        where = _locate(cls, node, key, loc) if sep and " " not in key else None
        if where is None:
            report(loc, path, str(message))
        else:
            report(where, f"{path}.{key}" if path else key, rest)
    return _INVALID if problems or config is _INVALID else config


def _decode_partial(cls: type, node: Node, prefix: str) -> tuple[Any, set[str]] | None:
    """``cls`` made of the fields of ``node`` that decode (others at their defaults), and the dotted keys that did not."""
    fields = _decode_fields(cls, node, "", _Problems())
    if fields is None:
        return None
    kwargs, bad = fields
    entries = node.entries if isinstance(node, Mapping) else {}
    hints = _hints(cls)
    bad_keys: set[str] = set()
    for key in bad:
        group = _group_type(hints[key]) if key in hints else None
        entry = entries.get(key)
        if group is not None and entry is not None:
            inner = _decode_partial(group, entry.node, f"{prefix}{key}.")
            if inner is not None:
                kwargs[key], inner_bad = inner
                bad_keys |= inner_bad
                continue
        bad_keys.add(prefix + key)
    try:
        return cls(**kwargs), bad_keys
    except (TypeError, ValueError):
        return None


def _about(message: str, keys: set[str]) -> bool:
    """Whether a ``"key.sub: message"`` problem is about one of ``keys`` (or something inside one)."""
    key = message.partition(": ")[0]
    return any(key == k or key.startswith((k + ".", k + "[")) for k in keys)


def decode_dataclass(cls: type[T], value: Any, *, path: str = "", validate: bool = True) -> T:
    """Decode plain data (as `yaml.safe_load` gives) into the config dataclass ``cls``.

    What each field accepts follows its annotation: ``bool`` (true/false
    only), ``int`` (not bool), ``float`` (int too), ``str`` (numbers and
    booleans as written), `Duration` and `ByteSize` (a number or text like
    "5s", "64MiB"), any class with a ``parse`` classmethod that raises
    ValueError (`ComponentID`: "storage/x"), ``Literal[...]``, ``list[X]``, ``dict[str, X]``, nested
    dataclasses (null means all defaults), ``X | None`` and ``Any``. A null
    value for a field that does not accept None keeps the field's default; a
    null ``Group | None`` (nested dataclass) field is the group with its
    defaults, so ``grpc:`` alone enables an optional group; leave the key out
    to keep it None.
    With ``validate``, the result's ``validate()`` runs too.

    ``path`` prefixes every problem's key path. Raises `ConfigError` listing
    every problem; raises TypeError if ``cls`` has a field of a type the
    decoder does not support (a programming error, not a config error).
    """
    report = _Problems()
    node = value if isinstance(value, _NODE_TYPES) else from_python(value)
    if validate:
        result = _decode_validated(cls, node, path, report, node.loc)
    else:
        result = _decode(cls, node, path, report)
    if result is _INVALID:
        raise ConfigError(report.items)
    return result


def config_fields(cls: type) -> list[tuple[str, Any, Any, str]]:
    """Every setting of a config dataclass as ``(dotted key, type, default, doc)``, nested groups flattened.

    A nested group (a dataclass field, or a ``Group | None`` field) contributes
    its own fields as ``group.key``; defaults come from the parent's default
    instance when it has one. A default of `dataclasses.MISSING` means none.
    """
    out: list[tuple[str, Any, Any, str]] = []
    _collect_fields(cls, "", dataclasses.MISSING, out)
    return out


def _collect_fields(cls: type, prefix: str, instance: Any, out: list[tuple[str, Any, Any, str]]) -> None:
    hints = _hints(cls)
    for name, f in _init_fields(cls).items():
        tp = hints[name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if instance is not dataclasses.MISSING and instance is not None:
            default = getattr(instance, name, default)
        group = _group_type(tp)
        if group is not None:
            _collect_fields(group, f"{prefix}{name}.", default if dataclasses.is_dataclass(default) else dataclasses.MISSING, out)
        else:
            out.append((prefix + name, tp, default, f.metadata.get("doc", "")))


def _group_type(tp: Any) -> type | None:
    if _is_group(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not _NONE_TYPE]
        if len(rest) == 1 and _is_group(rest[0]):
            return rest[0]
    return None


# --- loading ---------------------------------------------------------------------

_SECTIONS = {k.plural: k for k in (Kind.RECEIVER, Kind.PROCESSOR, Kind.EXPORTER, Kind.EXTENSION)}
_TOP_KEYS = (*_SECTIONS, "service")
_SERVICE_KEYS = tuple(f.name for f in dataclasses.fields(ServiceConfig))
_PIPELINE_ROLES = (("receivers", Kind.RECEIVER), ("processors", Kind.PROCESSOR), ("exporters", Kind.EXPORTER))


@dataclass
class _Defined:
    key: str
    key_loc: Loc
    factory: Factory | None  # None: unknown type (already reported)
    config: Any  # _INVALID when it did not decode or validate


def load_config(
    paths: SequenceType[str | Path], registry: Registry, env: MappingType[str, str] | None = None
) -> Config:
    """Read, merge and validate config files (later files override earlier ones).

    ``env`` is where ``${env:NAME}`` references are looked up (default
    `os.environ`). Raises `ConfigError` with every problem found; the
    returned `Config` carries the warnings (unset variables, unused
    components).
    """
    env = os.environ if env is None else env
    files = [str(p) for p in paths]
    report = _Problems()
    if not files:
        raise ConfigError([Problem(None, None, None, "", "no config file given")])

    roots: list[Mapping] = []
    for file in files:
        root = _read_file(file, env, report)
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
            hint = _did_you_mean(key, _TOP_KEYS) or f" (valid keys: {', '.join(_TOP_KEYS)})"
            report(entry.key_loc, join_path("", key), f"unknown top-level key {key!r}{hint}")

    defined: dict[Kind, dict[ComponentID, _Defined]] = {}
    for section, kind in _SECTIONS.items():
        defined[kind] = _decode_section(kind, merged.entries.get(section), registry, report)

    used: dict[Kind, set[ComponentID]] = {kind: set() for kind in _SECTIONS.values()}
    service = _decode_service(merged, defined, used, report)
    if service is not None or any(used.values()):
        _warn_unused(defined, used, report)  # not when there is no service section to speak of
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


def _read_file(file: str, env: MappingType[str, str], report: _Problems) -> Mapping | None:
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
    root = parse_yaml(text, file, env, report)
    if root is None or is_null(root):
        return None  # an empty file adds nothing
    if not isinstance(root, Mapping):
        report(root.loc, "", f"the top level of a config file must be a mapping (receivers:, exporters:, service: ...), got {describe(root)}")
        return None
    return root


def _decode_section(kind: Kind, entry: Entry | None, registry: Registry, report: _Problems) -> dict[ComponentID, _Defined]:
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
                f"unknown {kind.value} type {cid.type!r}{_did_you_mean(cid.type, known)} (registered: {', '.join(known) or 'none'})",
            )
            out[cid] = _Defined(key, e.key_loc, None, _INVALID)
            continue
        config = _decode_validated(factory.config_class, e.node, path, report, e.key_loc)
        out[cid] = _Defined(key, e.key_loc, factory, config)
    return out


def _decode_service(
    root: Mapping, defined: dict[Kind, dict[ComponentID, _Defined]], used: dict[Kind, set[ComponentID]], report: _Problems
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
    hints = _hints(ServiceConfig)
    for key, e in node.entries.items():
        path = join_path("service", key)
        if key not in _SERVICE_KEYS:
            hint = _did_you_mean(key, _SERVICE_KEYS) or f" (valid keys: {', '.join(_SERVICE_KEYS)})"
            report(e.key_loc, path, f"unknown key {key!r}{hint}")
            ok = False
        elif key in ("pipelines", "extensions"):
            continue
        elif is_null(e.node):
            continue
        else:
            tp = hints[key]
            value = (
                _decode_validated(tp, e.node, path, report, e.key_loc)
                if dataclasses.is_dataclass(tp)
                else _decode(tp, e.node, path, report)
            )
            if value is _INVALID:
                ok = False
            else:
                kwargs[key] = value

    extensions = _decode_id_list(
        node.entries.get("extensions"), "service.extensions", Kind.EXTENSION, None, defined, used, report
    )
    pipelines = _decode_pipelines(node, entry.key_loc, defined, used, report)
    if not ok or extensions is None or pipelines is None:
        return None
    return ServiceConfig(pipelines=pipelines, extensions=extensions, **kwargs)


def _decode_pipelines(
    service: Mapping,
    service_loc: Loc,
    defined: dict[Kind, dict[ComponentID, _Defined]],
    used: dict[Kind, set[ComponentID]],
    report: _Problems,
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
                hint = _did_you_mean(k, roles) or f" (valid keys: {', '.join(roles)})"
                report(ke.key_loc, join_path(path, k), f"unknown key {k!r}{hint}")
                ok = False
        lists: dict[str, list[ComponentID]] = {}
        for role, kind in _PIPELINE_ROLES:
            role_entry = body.entries.get(role)
            ids = _decode_id_list(role_entry, f"{path}.{role}", kind, pid, defined, used, report)
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
    report: _Problems,
) -> list[ComponentID] | None:
    """Component ids listed under ``path``, each checked to be defined (and to support the pipeline's signal)."""
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
        used[kind].add(cid)
        d = defined[kind].get(cid)
        if d is None:
            names = [str(c) for c in defined[kind]]
            hint = _did_you_mean(str(cid), names) or (f" (defined: {', '.join(names)})" if names else "")
            report(item.loc, ipath, f"{kind.value} '{cid}' is not defined in {kind.plural}{hint}")
            ok = False
        elif d.factory is not None and pipeline is not None and pipeline.signal not in d.factory.signals:
            supports = describe_signals(d.factory.signals) or "none"
            report(item.loc, ipath, f"{kind.value} '{cid}' does not support {pipeline.signal.value} (it supports: {supports})")
            ok = False
        out.append(cid)
    return out if ok else None


def _check_extension_refs(service: ServiceConfig, defined: dict[Kind, dict[ComponentID, _Defined]], report: _Problems) -> None:
    """Every `ExtensionRef` in a component's config names an extension of its type that the service starts."""
    extensions = defined[Kind.EXTENSION]
    enabled = set(service.extensions)
    for loc, path, ref in report.refs:
        want = ref.extension_type
        d = extensions.get(ref.id)
        of_type = [str(cid) for cid, e in extensions.items() if e.factory is not None and (not want or e.factory.type == want)]
        what = f"{want} extension" if want else "extension"
        if d is None:
            hint = _did_you_mean(str(ref.id), of_type) or (f" (defined: {', '.join(of_type)})" if of_type else "")
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


def _warn_acknowledged_but_not_durable(service: ServiceConfig, defined: dict[Kind, dict[ComponentID, _Defined]], report: _Problems) -> None:
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


def _warn_unused(defined: dict[Kind, dict[ComponentID, _Defined]], used: dict[Kind, set[ComponentID]], report: _Problems) -> None:
    for kind, comps in defined.items():
        for cid, d in comps.items():
            if cid in used[kind] or d.factory is None:
                continue
            where = "service.extensions" if kind is Kind.EXTENSION else "any pipeline"
            report(d.key_loc, join_path(kind.plural, d.key), f"{kind.value} '{cid}' is defined but not used in {where}", "warning")
