"""Render a `MetricsState` as Prometheus text (0.0.4) or OpenMetrics text (1.0.0).

Invariants:
- Pure: the output depends only on the state and the arguments; nothing is
  changed, nothing is read from a clock.
- Every family appears once, sorted by name, with its HELP (when it has a
  description) and TYPE before its samples; ``target_info`` (a gauge in both
  formats, as the OTel Collector writes it) comes last, then, in
  OpenMetrics, ``# EOF``.
- A histogram's buckets are cumulative, in increasing ``le``, ending with
  ``le="+Inf"`` whose value equals ``_count`` and is at least every other
  bucket's: the point's count, or the total of its bucket counts when bad
  input made them add up to more.
- Label text is the series' own, escaped once when the series was made;
  sample lines are built with one f-string each (this is where the time
  goes at 100k series: see bench/bench_prometheus_render.py).
"""

from __future__ import annotations

from tapio.promtext import COUNTER, GAUGE, HISTOGRAM, SUMMARY, escape_help, format_float

from ._state import MetricsState

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_TARGET_HELP = "Target metadata"
#: Go's shortest 'g' format switches to an exponent from 1e+06 on
_GO_EXPONENT_FROM = 6


def go_float(v: float) -> str:
    """``v`` as Go's ``strconv.FormatFloat(v, 'g', -1, 64)`` writes it (``1``, ``0.005``, ``1e+06``).

    The Prometheus Go client writes ``le`` and ``quantile`` label values this
    way, so series from tapio match those from the OTel Collector.
    """
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if str(v).startswith("-") else "0"
    mantissa = repr(abs(v)).partition("e")[0]
    digits = len(mantissa.replace(".", "").strip("0")) or 1  # significant digits of the shortest form
    exp = int(f"{abs(v):.{digits - 1}e}".partition("e")[2])
    if exp < -4 or exp >= _GO_EXPONENT_FROM:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{max(digits - 1 - exp, 0)}f}"


def _om_float(v: float) -> str:
    """A label value float as OpenMetrics wants it: integral values keep ``.0``."""
    text = go_float(v)
    if text[-1].isdigit() and "." not in text and "e" not in text:
        return text + ".0"
    return text


def render_text(state: MetricsState, *, timestamps: bool = False) -> str:
    """The Prometheus text exposition format, version 0.0.4."""
    out: list[str] = []
    add = out.append
    fmt = format_float
    le_text: dict[tuple[float, ...], list[str]] = {}
    for name in sorted(state.families):
        family = state.families[name]
        series = family.series.values()
        if not series:
            continue
        if family.help:
            add(f"# HELP {name} {escape_help(family.help, openmetrics=False)}\n")
        add(f"# TYPE {name} {family.kind}\n")
        kind = family.kind
        if kind == COUNTER or kind == GAUGE:
            if timestamps:
                out += [f"{name}{s.labels} {fmt(s.value)}{_ms(s.time_ns)}\n" for s in series]
            else:
                out += [f"{name}{s.labels} {s.value if s.value.__class__ is int else fmt(s.value)}\n" for s in series]
        elif kind == HISTOGRAM:
            for s in series:
                les = le_text.get(s.bounds)
                if les is None:
                    les = le_text[s.bounds] = [go_float(b) for b in s.bounds]
                ts = _ms(s.time_ns) if timestamps else ""
                head = f"{name}_bucket{{{s.body}," if s.body else f"{name}_bucket{{"
                cum = 0
                for le, c in zip(les, s.buckets):
                    cum += c
                    add(f'{head}le="{le}"}} {cum}{ts}\n')
                count = _count(s, cum)
                add(f'{head}le="+Inf"}} {count}{ts}\n')
                if s.sum is not None:
                    add(f"{name}_sum{s.labels} {fmt(s.sum)}{ts}\n")
                add(f"{name}_count{s.labels} {count}{ts}\n")
        elif kind == SUMMARY:
            for s in series:
                ts = _ms(s.time_ns) if timestamps else ""
                head = f"{name}{{{s.body}," if s.body else f"{name}{{"
                for q, v in s.quantiles:
                    add(f'{head}quantile="{go_float(q)}"}} {fmt(v)}{ts}\n')
                add(f"{name}_sum{s.labels} {fmt(s.sum)}{ts}\n")
                add(f"{name}_count{s.labels} {s.count}{ts}\n")
    if state.targets:
        add(f"# HELP target_info {_TARGET_HELP}\n# TYPE target_info gauge\n")
        out += [f"target_info{t.labels} 1\n" for t in state.targets.values()]
    return "".join(out)


def render_openmetrics(state: MetricsState, *, timestamps: bool = False) -> str:
    """The OpenMetrics text format 1.0.0, with exemplars on counters and histogram buckets."""
    out: list[str] = []
    add = out.append
    fmt = format_float
    le_text: dict[tuple[float, ...], list[str]] = {}
    for name in sorted(state.families):
        family = state.families[name]
        series = family.series.values()
        if not series:
            continue
        kind = family.kind
        # OpenMetrics names a counter family without _total; its sample keeps it.
        fname = name[:-6] if kind == COUNTER and name.endswith("_total") else name
        if family.help:
            add(f"# HELP {fname} {escape_help(family.help, openmetrics=True)}\n")
        add(f"# TYPE {fname} {kind}\n")
        if kind == COUNTER:
            sample = fname + "_total"
            for s in series:
                ts = _sec(s.time_ns) if timestamps else ""
                ex = s.exemplar.text if s.exemplar is not None else ""
                add(f"{sample}{s.labels} {fmt(s.value)}{ts}{ex}\n")
        elif kind == GAUGE:
            if timestamps:
                out += [f"{name}{s.labels} {fmt(s.value)}{_sec(s.time_ns)}\n" for s in series]
            else:
                out += [f"{name}{s.labels} {fmt(s.value)}\n" for s in series]
        elif kind == HISTOGRAM:
            for s in series:
                les = le_text.get(s.bounds)
                if les is None:
                    les = le_text[s.bounds] = [_om_float(b) for b in s.bounds]
                ts = _sec(s.time_ns) if timestamps else ""
                head = f"{name}_bucket{{{s.body}," if s.body else f"{name}_bucket{{"
                exemplars = _carried(s.exemplars, len(les) + 1)
                cum = 0
                for i, (le, c) in enumerate(zip(les, s.buckets)):
                    cum += c
                    add(f'{head}le="{le}"}} {cum}{ts}{exemplars[i]}\n')
                count = _count(s, cum)
                add(f'{head}le="+Inf"}} {count}{ts}{exemplars[-1]}\n')
                add(f"{name}_count{s.labels} {count}{ts}\n")
                if s.sum is not None:
                    add(f"{name}_sum{s.labels} {fmt(s.sum)}{ts}\n")
        elif kind == SUMMARY:
            for s in series:
                ts = _sec(s.time_ns) if timestamps else ""
                head = f"{name}{{{s.body}," if s.body else f"{name}{{"
                for q, v in s.quantiles:
                    add(f'{head}quantile="{_om_float(q)}"}} {fmt(v)}{ts}\n')
                add(f"{name}_count{s.labels} {s.count}{ts}\n")
                add(f"{name}_sum{s.labels} {fmt(s.sum)}{ts}\n")
    if state.targets:
        # A gauge, as the OTel Collector writes it: promtool and Prometheus' text parser know no "info" type.
        add(f"# HELP target_info {_TARGET_HELP}\n# TYPE target_info gauge\n")
        out += [f"target_info{t.labels} 1\n" for t in state.targets.values()]
    add("# EOF\n")
    return "".join(out)


def _count(s, finite: int) -> int:
    """The ``+Inf`` bucket and ``_count`` of histogram ``s`` whose finite buckets add up to ``finite``.

    That is the point's count, unless its bucket counts (the overflow bucket
    included) add up to more, which only bad input does: then their total,
    so that no bucket exceeds ``+Inf`` and ``_count`` stays equal to it, as
    both formats require.
    """
    total = finite + s.buckets[-1] if len(s.buckets) > len(s.bounds) else finite
    return total if total > s.count else s.count


def _carried(exemplars, n: int) -> list[str]:
    """Exemplar text per bucket; a bucket without one shows the nearest lower bucket's (as the OTel spec asks)."""
    if not exemplars or len(exemplars) != n:
        return [""] * n
    out: list[str] = []
    last = ""
    for e in exemplars:
        if e is not None:
            last = e.text
        out.append(last)
    return out


def _ms(ns: int) -> str:
    return f" {ns // 1_000_000}" if ns else ""


def _sec(ns: int) -> str:
    if not ns:
        return ""
    sec, frac = divmod(ns, 1_000_000_000)
    return f" {sec}.{frac:09d}".rstrip("0").rstrip(".") if frac else f" {sec}"
