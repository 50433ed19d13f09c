"""Conditions on log records, compiled once from the rules: what a member event of an incident looks like.

Invariants:
- Pure: compiling or evaluating a condition does no I/O and keeps no state.
- A condition never raises on what a record holds: a value of another type
  than the condition expects simply does not match (a numeric comparison
  reads numbers, and text that parses as a number).
- `compile_condition` either returns a predicate or raises `ValueError`
  whose message starts with what is wrong, for the rule loader to report
  at the key it came from.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from tapio.decode import did_you_mean

#: what a record attribute holds once flattened (arrays and maps are kept as text)
Value = str | int | float | bool

#: every operator a condition may use, with what its operand must be
OPERATORS = ("equals", "not_equals", "in", "not_in", "regex", "gt", "gte", "lt", "lte", "exists")

_MISSING = object()

#: what people write for an operator from other query languages
_ALIASES = {
    "greater": "; did you mean 'gt'?",
    "less": "; did you mean 'lt'?",
    "eq": "; did you mean 'equals'?",
    "ne": "; did you mean 'not_equals'?",
    "matches": "; did you mean 'regex'?",
    "match": "; did you mean 'regex'?",
}


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def _same(a: Any, b: Value) -> bool:
    """Equality as a user writing YAML means it: ``137`` equals the text "137", true equals "true"."""
    if a is _MISSING:
        return False
    if isinstance(b, bool) or isinstance(a, bool):
        return str(a).lower() == str(b).lower()
    if isinstance(b, (int, float)):
        n = _number(a)
        return n is not None and n == b
    return str(a) == b


def compile_condition(spec: Any) -> Callable[[Any], bool]:
    """A predicate on one attribute value (`_MISSING` when the record lacks it).

    ``spec`` is a scalar (equality) or a mapping of operators (all must hold):
    ``equals``/``not_equals`` a scalar, ``in``/``not_in`` a list of scalars,
    ``regex`` a Python regular expression searched in the text of the value,
    ``gt``/``gte``/``lt``/``lte`` a number, ``exists`` true or false.
    """
    if isinstance(spec, (str, int, float, bool)):
        return lambda v, want=spec: _same(v, want)
    if spec is None:
        raise ValueError("a condition cannot be empty: write a value, or {exists: true}")
    if not isinstance(spec, Mapping):
        raise ValueError(f"a condition is a value or a mapping of {', '.join(OPERATORS)}; got a {type(spec).__name__}")
    if not spec:
        raise ValueError(f"a condition needs at least one of {', '.join(OPERATORS)}")
    checks: list[Callable[[Any], bool]] = []
    for op, operand in spec.items():
        if op not in OPERATORS:
            hint = did_you_mean(str(op), OPERATORS) or _ALIASES.get(str(op), "")
            raise ValueError(f"unknown operator {op!r}{hint} (operators: {', '.join(OPERATORS)})")
        checks.append(_operator(op, operand))
    return lambda v: all(c(v) for c in checks)


def _operator(op: str, operand: Any) -> Callable[[Any], bool]:
    if op in ("equals", "not_equals"):
        if not isinstance(operand, (str, int, float, bool)):
            raise ValueError(f"{op}: expects a value, got {type(operand).__name__}")
        if op == "equals":
            return lambda v: _same(v, operand)
        return lambda v: v is not _MISSING and not _same(v, operand)
    if op in ("in", "not_in"):
        if not isinstance(operand, list) or not operand or not all(isinstance(x, (str, int, float, bool)) for x in operand):
            raise ValueError(f"{op}: expects a non-empty list of values")
        if op == "in":
            return lambda v: any(_same(v, x) for x in operand)
        return lambda v: v is not _MISSING and not any(_same(v, x) for x in operand)
    if op == "regex":
        if not isinstance(operand, str):
            raise ValueError("regex: expects a regular expression as text")
        try:
            pattern = re.compile(operand)
        except re.error as e:
            raise ValueError(f"regex: {operand!r} is not a valid regular expression ({e})") from None
        return lambda v: v is not _MISSING and pattern.search(str(v)) is not None
    if op in ("gt", "gte", "lt", "lte"):
        bound = _number(operand)
        if bound is None or isinstance(operand, str):
            raise ValueError(f"{op}: expects a number, got {operand!r}")
        cmp = {"gt": lambda n: n > bound, "gte": lambda n: n >= bound, "lt": lambda n: n < bound, "lte": lambda n: n <= bound}[op]

        def numeric(v: Any) -> bool:
            n = _number(v) if v is not _MISSING else None
            return n is not None and cmp(n)

        return numeric
    # exists
    if not isinstance(operand, bool):
        raise ValueError("exists: expects true or false")
    return (lambda v: v is not _MISSING) if operand else (lambda v: v is _MISSING)


@dataclass(frozen=True)
class AttributeMatch:
    """Every listed attribute satisfies its condition (record attributes first, then the resource's)."""

    conditions: tuple[tuple[str, Callable[[Any], bool]], ...]

    @classmethod
    def compile(cls, spec: Mapping[str, Any]) -> "AttributeMatch":
        """Raises ValueError naming the attribute (``"k8s.pod.uid: ..."``)."""
        out = []
        for key, cond in spec.items():
            try:
                out.append((key, compile_condition(cond)))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return cls(tuple(out))

    def __call__(self, attrs: Mapping[str, Value]) -> bool:
        return all(pred(attrs.get(key, _MISSING)) for key, pred in self.conditions)


def glob(pattern: str) -> Callable[[str], bool]:
    """Exact text, or a shell-style pattern when it holds ``*``, ``?`` or ``[``; ``|`` separates alternatives."""
    alternatives = [a.strip() for a in pattern.split("|")]
    if not any(c in pattern for c in "*?["):
        if len(alternatives) == 1:
            return lambda s: s == pattern
        names = frozenset(alternatives)
        return lambda s: s in names
    rx = re.compile("|".join(f"(?:{fnmatch.translate(a)})" for a in alternatives))
    return lambda s: rx.match(s) is not None


@dataclass(frozen=True)
class EventMatch:
    """What one member of a rule matches: event name, scope, attributes, and alternatives (one must hold)."""

    event: str = ""
    scope: str = ""
    attributes: AttributeMatch = field(default_factory=lambda: AttributeMatch(()))
    any_of: tuple[AttributeMatch, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_event", glob(self.event) if self.event else None)
        object.__setattr__(self, "_scope", glob(self.scope) if self.scope else None)

    def names(self, name: str, scope: str) -> bool:
        """Whether an event of this name and scope can match (the attributes are checked by `attributes_hold`)."""
        if self._event is not None and not self._event(name):  # type: ignore[attr-defined]
            return False
        return self._scope is None or self._scope(scope)  # type: ignore[attr-defined]

    def attributes_hold(self, event: "Event") -> bool:
        if not self.attributes(event.attrs):
            return False
        return not self.any_of or any(m(event.attrs) for m in self.any_of)

    def __call__(self, event: "Event") -> bool:
        return self.names(event.name, event.scope) and self.attributes_hold(event)


@dataclass(slots=True)
class Event:
    """One log record as the rules see it.

    ``attrs`` holds the record's attributes over its resource's (a record
    attribute wins); ``resource`` the resource's alone, for the incident's
    own resource. ``record`` is the protobuf LogRecord, kept so the
    connector can stamp the incident's trace id on it.
    """

    time_ns: int
    name: str
    scope: str
    #: a dict, or a lazy view with ``get`` and ``materialize()`` (see `_records`)
    attrs: Any
    resource: Any
    body: str = ""
    severity: str = ""
    record: Any = None

    def retain(self) -> None:
        """Make the attributes plain values, so keeping this event does not keep the request it came in."""
        for name in ("attrs", "resource"):
            materialize = getattr(getattr(self, name), "materialize", None)
            if materialize is not None:
                setattr(self, name, materialize())

    def key(self, names: Iterable[str]) -> tuple[str, ...] | None:
        """The join key: the text of each named attribute, or None when one is missing or empty."""
        out = []
        for n in names:
            v = self.attrs.get(n)
            if v is None or v == "":
                return None
            out.append(str(v))
        return tuple(out)
