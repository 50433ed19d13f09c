"""The typed config decoder: YAML nodes → frozen config dataclasses, every problem reported with where it was written.

Invariants:
- What a config field accepts is decided by its type annotation alone (see
  `decode_dataclass`); component code never sees raw YAML.
- Decoding never stops at the first problem: every problem found is
  collected in `Problems` with its dotted key path and, when the value came
  from a file, its file, line and column; bad input never makes a decode
  raise anything but `ConfigError`.
- A field of a type the decoder does not support is a programming error
  (TypeError), never reported as a config problem.

`tapio.config` builds pipelines.yaml loading on top of this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence as SequenceType, TypeVar, Union

from tapio._yamlnodes import Entry, Loc, Mapping, Node, Scalar, Sequence, describe, from_python, is_null, join_path, to_python
from tapio.component import ComponentID, ExtensionRef, config_problems
from tapio.units import ByteSize, Duration

__all__ = ["ConfigError", "INVALID", "Problem", "Problems", "config_fields", "decode_dataclass", "decode_node", "decode_validated", "did_you_mean"]

T = TypeVar("T")
Severity = Literal["error", "warning"]


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


# --- problems --------------------------------------------------------------------


class Problems:
    """Where a decode collects what is wrong: call it with a location, a key path and a message."""

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


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``candidates``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- the generic decoder ---------------------------------------------------------

#: what a decode returns after reporting why the node could not be decoded
INVALID: Any = object()
_NONE_TYPE = type(None)
_NODE_TYPES = (Scalar, Mapping, Sequence)


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (cached: resolving them is slow)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The settings of ``cls`` by the key written in YAML (the field name, or the ``key`` given to `setting`, e.g. ``from``)."""
    return {f.metadata.get("key") or f.name: f for f in dataclasses.fields(cls) if f.init}


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


def decode_node(tp: Any, node: Node, path: str, report: Problems) -> Any:
    """``node`` decoded as type ``tp``, or `INVALID` after reporting why not."""
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
        return decode_node(rest[0], node, path, report)
    if _is_group(tp):
        return _decode_dataclass(tp, node, path, report)
    if tp is list or origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(node, Sequence):
            report(node.loc, path, f"expected a list, got {describe(node)}")
            return INVALID
        items = [decode_node(item_tp, item, f"{path}[{i}]", report) for i, item in enumerate(node.items)]
        return INVALID if any(v is INVALID for v in items) else items
    if tp is dict or origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (str, Any)
        if key_tp is not str:
            raise TypeError(f"config field {path}: unsupported type {tp!r} (mapping keys must be str)")
        if not isinstance(node, Mapping):
            report(node.loc, path, f"expected a mapping, got {describe(node)}")
            return INVALID
        out = {k: decode_node(value_tp, e.node, join_path(path, k), report) for k, e in node.entries.items()}
        return INVALID if any(v is INVALID for v in out.values()) else out
    if origin is Literal:
        return _decode_literal(typing.get_args(tp), node, path, report)
    if not isinstance(tp, type):
        raise TypeError(f"config field {path}: unsupported type {tp!r}")
    if not isinstance(node, Scalar):
        report(node.loc, path, f"expected {_what(tp)}, got {describe(node)}")
        return INVALID
    value = node.value
    if callable(getattr(tp, "parse", None)):  # Duration, ByteSize, ComponentID: parse() raises ValueError
        if value is None:
            report(node.loc, path, f"expected {_what(tp)}, got null")
            return INVALID
        try:
            parsed = tp.parse(value)
        except ValueError as e:
            report(node.loc, path, str(e))
            return INVALID
        except OverflowError:
            report(node.loc, path, f"{describe(node)} is too large")
            return INVALID
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
    return INVALID


def _decode_literal(options: tuple[Any, ...], node: Node, path: str, report: Problems) -> Any:
    if isinstance(node, Scalar):
        for opt in options:
            if type(opt) is type(node.value) and opt == node.value:
                return opt
        if not isinstance(node.value, str) and node.text in options:  # `mode: off` is YAML false
            return node.text
    names = [str(o) for o in options]
    got = describe(node)
    hint = did_you_mean(node.value, names) if isinstance(node, Scalar) and isinstance(node.value, str) else ""
    report(node.loc, path, f"expected one of {', '.join(repr(o) for o in options)}, got {got}{hint}")
    return INVALID


def _decode_dataclass(cls: type, node: Node, path: str, report: Problems) -> Any:
    fields = _decode_fields(cls, node, path, report)
    if fields is None:
        return INVALID
    kwargs, bad = fields
    if bad:
        return INVALID
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        report(node.loc, path, str(e))
        return INVALID


def _decode_fields(cls: type, node: Node, path: str, report: Problems) -> tuple[dict[str, Any], set[str]] | None:
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
    hints = type_hints(cls)
    kwargs: dict[str, Any] = {}
    bad: set[str] = set()
    for key, entry in entries.items():
        kpath = join_path(path, key)
        if key not in fields:
            if not fields:
                report(entry.key_loc, kpath, f"unknown key {key!r} (this has no settings)")
            else:
                hint = did_you_mean(key, fields) or f" (valid keys: {', '.join(fields)})"
                report(entry.key_loc, kpath, f"unknown key {key!r}{hint}")
            bad.add(key)
            continue
        tp = hints[fields[key].name]
        if is_null(entry.node) and not _accepts_none(tp):
            continue  # `key:` or `key: null` keeps the default, as an empty component body does
        value = decode_node(tp, entry.node, kpath, report)
        if value is INVALID:
            bad.add(key)
        else:
            kwargs[fields[key].name] = value
    for name, f in fields.items():
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
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


def decode_validated(cls: type, node: Node, path: str, report: Problems, loc: Loc) -> Any:
    """Decode then run ``validate()``, attaching each problem to the key it names (``"key: message"``).

    When some fields did not decode, ``validate()`` still runs on a config
    made of the fields that did (the others at their defaults), and what it
    says about the broken fields is left out, so one pass reports both kinds
    of problem.
    """
    config = decode_node(cls, node, path, report)
    bad: set[str] = set()
    if config is INVALID:
        if not dataclasses.is_dataclass(cls):
            return INVALID
        partial = _decode_partial(cls, node, "")
        if partial is None:
            return INVALID
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
    return INVALID if problems or config is INVALID else config


def _decode_partial(cls: type, node: Node, prefix: str) -> tuple[Any, set[str]] | None:
    """``cls`` made of the fields of ``node`` that decode (others at their defaults), and the dotted keys that did not."""
    fields = _decode_fields(cls, node, "", Problems())
    if fields is None:
        return None
    kwargs, bad = fields
    entries = node.entries if isinstance(node, Mapping) else {}
    hints = type_hints(cls)
    names = {key: f.name for key, f in _init_fields(cls).items()}
    bad_keys: set[str] = set()
    for key in bad:
        group = _group_type(hints[names[key]]) if key in names else None
        entry = entries.get(key)
        if group is not None and entry is not None:
            inner = _decode_partial(group, entry.node, f"{prefix}{key}.")
            if inner is not None:
                kwargs[names[key]], inner_bad = inner
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
    report = Problems()
    node = value if isinstance(value, _NODE_TYPES) else from_python(value)
    if validate:
        result = decode_validated(cls, node, path, report, node.loc)
    else:
        result = decode_node(cls, node, path, report)
    if result is INVALID:
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
    hints = type_hints(cls)
    for name, f in _init_fields(cls).items():
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if instance is not dataclasses.MISSING and instance is not None:
            default = getattr(instance, f.name, default)
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
