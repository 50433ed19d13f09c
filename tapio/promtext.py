"""Prometheus names and the text format's escaping, shared by the prometheus exporter and self-telemetry.

Invariants:
- Every function is pure: the same input gives the same text.
- `metric_name` and `label_name` always return names valid in both the
  Prometheus text format 0.0.4 and OpenMetrics 1.0 (OpenMetrics reserves a
  leading ``__``, which `label_name` never produces).
- `escape_label_value` and `escape_help` produce text both formats parse back
  to the input; `format_float` writes values both parse (``NaN``, ``+Inf``).
"""

from __future__ import annotations

import re
from typing import Iterable

#: Prometheus family kinds (the TYPE line)
COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"
SUMMARY = "summary"

# OTel unit → Prometheus unit word (UCUM case-sensitive codes the spec and the Collector translate)
_MAIN_UNITS = {
    "d": "days",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "TiBy": "tibibytes",
    "KBy": "kilobytes",
    "MBy": "megabytes",
    "GBy": "gigabytes",
    "TBy": "terabytes",
    "m": "meters",
    "V": "volts",
    "A": "amperes",
    "J": "joules",
    "W": "watts",
    "g": "grams",
    "Cel": "celsius",
    "Hz": "hertz",
    "%": "percent",
}
_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}

_NAME_SPLIT = re.compile(r"[^a-zA-Z0-9:]+")
_LABEL_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_BRACES = re.compile(r"\{[^}]*\}")


def metric_name(name: str, unit: str, kind: str, *, namespace: str = "", suffixes: bool = True) -> str:
    """The Prometheus name of an OTLP metric: sanitised, with unit and type suffixes.

    ``kind`` is the Prometheus family kind (`COUNTER`, `GAUGE` …). Invalid
    characters become ``_`` and runs of them one ``_``; the unit (``ms`` →
    ``milliseconds``, ``By/s`` → ``bytes_per_second``, ``{packet}`` → none)
    is appended unless the name already ends with it, then ``_total`` for
    counters and ``_ratio`` for gauges of unit ``1``. A name starting with
    a digit gets a leading ``_``.
    """
    tokens = [t for t in _NAME_SPLIT.split(name) if t]
    if suffixes:
        if kind == COUNTER and tokens and tokens[-1] == "total":
            tokens.pop()  # re-added after the unit, which comes first
        for word in _unit_words(unit):
            if not _ends_with(tokens, word):
                tokens.extend(word)
        if kind == COUNTER:
            tokens.append("total")
        elif kind == GAUGE and unit == "1" and not _ends_with(tokens, ["ratio"]):
            tokens.append("ratio")
    out = "_".join(tokens)
    if namespace:
        out = f"{namespace}_{out}" if out else namespace
    if not out:
        return "_"
    if out[0].isdigit():
        out = "_" + out
    return out


def _unit_words(unit: str) -> list[list[str]]:
    """The unit as suffix words: ``"By/s"`` → ``[["bytes", "per", "second"]]``; none for ``{…}``, ``1`` or empty."""
    unit = _BRACES.sub("", unit).strip()
    if not unit or unit == "1":
        return []
    main, _, per = unit.partition("/")
    words: list[str] = []
    main = main.strip()
    if main and main != "1":
        words += [t for t in _NAME_SPLIT.split(_MAIN_UNITS.get(main, main)) if t]
    per = per.strip()
    if per:
        per_words = [t for t in _NAME_SPLIT.split(_PER_UNITS.get(per, per)) if t]
        if per_words:
            words += ["per", *per_words]
    return [words] if words else []


def _ends_with(tokens: list[str], words: list[str]) -> bool:
    return len(tokens) >= len(words) and tokens[len(tokens) - len(words) :] == words


def label_name(key: str) -> str:
    """A valid Prometheus label name for an attribute key, as the OTel Collector's translator makes it.

    Every character outside ``[a-zA-Z0-9_]`` becomes one ``_`` (runs are not
    collapsed: ``a..b`` → ``a__b``); then a leading digit gets ``key_``
    (``1st`` → ``key_1st``) and a leading single ``_`` gets ``key``
    (``_x`` → ``key_x``). Two differences from the Collector, which would
    write names that OpenMetrics forbids: a leading ``__`` (reserved) gets
    ``key`` too (``__x`` → ``key__x``; the Collector keeps it), and the
    empty key becomes ``key_``.
    """
    out = _LABEL_INVALID.sub("_", key)
    if not out:
        return "key_"
    if out[0] in "0123456789":
        return "key_" + out
    if out[0] == "_":
        return "key" + out
    return out


def escape_label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def label_text(labels: Iterable[tuple[str, str]]) -> str:
    """``a="1",b="2"`` for sorted, valid (name, value) pairs; values escaped."""
    return ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)


def format_float(v: float) -> str:
    """A sample value as Prometheus and OpenMetrics both parse it (``NaN``, ``+Inf``, ``-Inf``)."""
    if v.__class__ is int:
        return str(v)
    s = repr(v)
    if s[-1] in "nf":
        return "NaN" if v != v else ("+Inf" if v > 0 else "-Inf")
    return s


def escape_help(text: str, *, openmetrics: bool = False) -> str:
    """HELP text escaped: backslash and newline; OpenMetrics escapes double quotes too."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    if openmetrics:
        text = text.replace('"', '\\"')
    return text
