"""The correlation engine: join member events by key inside a time window and decide incidents.

Sans-IO: the connector feeds it `Event`s with the current (monotonic) time
and calls `Engine.tick` now and then; both return what to send. The
scenario tests drive it with event times as the clock.

Invariants:
- State is bounded: at most ``max_keys`` open windows per rule (the least
  recently touched is dropped beyond it, counted in ``stats["evicted"]``;
  a dropped window whose incident was complete is sent first, so an
  incident is never lost to the cap), and at most
  ``max_events_per_member`` events kept per member of a window (more are
  counted in the window, not kept).
- An incident is sent once (`Emitted`); a member event joining it later,
  inside its window, is sent as an addition to the same trace
  (`Appended`), never as a second incident.
- Member event times decide what belongs together: an event more than the
  rule's window away from its window's first event starts a new window
  (the old one is decided first). The clock passed in (arrival time)
  decides when a window is over: ``window`` after it opened, plus
  ``lateness`` for events arriving out of order.
- A rule with an ``absent`` member sends only at the end of its window, and
  only if no such event arrived; a ``resolves`` event at or after the last
  required event cancels an incident not yet sent (counted), or is
  appended to one already sent.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ._config import RuleConfig
from ._match import Event, EventMatch

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
#: distinct (event name, scope) pairs whose candidate members are remembered
_CANDIDATE_CACHE = 4096


@dataclass(frozen=True)
class Member:
    name: str
    role: str
    match: EventMatch
    min_count: int
    join: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    severity: str
    summary: str
    join: tuple[str, ...]
    window_s: float
    settle_s: float
    confidence: float
    confidence_per_optional: float
    members: tuple[Member, ...]

    @property
    def window_ns(self) -> int:
        return int(self.window_s * 1e9)

    @property
    def has_absent(self) -> bool:
        return any(m.role == "absent" for m in self.members)


def compile_rule(name: str, cfg: RuleConfig) -> Rule:
    members = tuple(
        Member(mname, m.role, m.compile(), m.min_count, tuple(m.join) or tuple(cfg.join)) for mname, m in cfg.members.items()
    )
    return Rule(
        name=name,
        description=cfg.description,
        severity=cfg.severity,
        summary=cfg.summary,
        join=tuple(cfg.join),
        window_s=float(cfg.window),
        settle_s=float(cfg.settle),
        confidence=cfg.confidence,
        confidence_per_optional=cfg.confidence_per_optional,
        members=members,
    )


@dataclass(slots=True)
class Joined:
    """A member event in a window, with the child span id it gets in the incident's trace."""

    member: Member
    event: Event
    span_id: bytes
    sent: bool = False


@dataclass(eq=False)
class Window:
    rule: Rule
    key: tuple[str, ...]
    opened: float
    first_ns: int
    last_ns: int
    joined: list[Joined] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    complete_at: float | None = None
    trace_id: bytes = b""
    root_span_id: bytes = b""
    emitted: bool = False
    ruled_out: bool = False

    def present(self, member: Member) -> bool:
        return self.counts.get(member.name, 0) >= member.min_count

    def complete(self) -> bool:
        return all(self.present(m) for m in self.rule.members if m.role == "required")

    def resolved(self) -> bool:
        required = [j.event.time_ns for j in self.joined if j.member.role == "required"]
        last = max(required, default=self.first_ns)
        return any(j.member.role == "resolves" and j.event.time_ns >= last for j in self.joined)


@dataclass(frozen=True)
class Incident:
    """What a trace shows: the rule, its key, the member events (child spans) and the root span's figures."""

    rule: Rule
    key: tuple[str, ...]
    trace_id: bytes
    root_span_id: bytes
    members: tuple[Joined, ...]
    first_ns: int
    last_ns: int
    confidence: float
    summary: str
    resolved: bool = False


@dataclass(frozen=True)
class Emitted:
    incident: Incident


@dataclass(frozen=True)
class Appended:
    """Member events that joined an incident after it was sent (same trace, new child spans)."""

    incident: Incident
    added: tuple[Joined, ...]


Output = Emitted | Appended


def render_summary(template: str, rule: str, events: Iterable[Event]) -> str:
    """``template`` with each ``{attribute}`` replaced from the first event holding it (``?`` when none does)."""
    events = list(events)

    def value(m: re.Match[str]) -> str:
        name = m.group(1).strip()
        if name == "rule":
            return rule
        for e in events:
            v = e.attrs.get(name)
            if v is not None and v != "":
                return str(v)
        return "?"

    return _PLACEHOLDER.sub(value, template)


class Engine:
    """Open windows per rule and join key; see the module invariants.

    ``new_id(n)`` makes trace (16 bytes) and span (8 bytes) ids.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        max_keys: int = 10000,
        max_events_per_member: int = 32,
        lateness_s: float = 5.0,
        new_id: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.rules = list(rules)
        self.max_keys = max_keys
        self.max_events = max_events_per_member
        self.lateness_s = lateness_s
        self._new_id = new_id
        self.windows: dict[str, OrderedDict[tuple[str, ...], Window]] = {r.name: OrderedDict() for r in self.rules}
        self._members = [(rule, m) for rule in self.rules for m in rule.members]
        #: (event name, scope) -> the members that may match such an event (decided once per pair)
        self._candidates: dict[tuple[str, str], tuple[tuple[Rule, Member], ...]] = {}
        #: counters by reason: evicted, no_join_key, too_late, incomplete, ruled_out, resolved, kept_over_cap
        self.stats: dict[str, int] = {}
        #: incidents sent, by (rule, severity)
        self.incidents: dict[tuple[str, str], int] = {}
        #: member events joined to a window, by rule
        self.joined: dict[str, int] = {}

    # -- feeding

    def candidates(self, name: str, scope: str) -> tuple[tuple[Rule, Member], ...]:
        """The members whose event name and scope conditions an event of this name and scope meets."""
        found = self._candidates.get((name, scope))
        if found is None:
            found = tuple((r, m) for r, m in self._members if m.match.names(name, scope))
            if len(self._candidates) < _CANDIDATE_CACHE:
                self._candidates[(name, scope)] = found
        return found

    def feed(self, event: Event, now: float) -> tuple[list[Output], list[tuple[bytes, Joined]]]:
        """Join ``event`` to every window it is a member of.

        Returns what to send now and the member events (this one or earlier
        ones) that now belong to an established incident, with its trace id:
        the caller may stamp their records with it and their span ids.
        """
        out: list[Output] = []
        stamps: list[tuple[bytes, Joined]] = []
        for rule, member in self.candidates(event.name, event.scope):
            if not member.match.attributes_hold(event):
                continue
            key = event.key(member.join)
            if key is None:
                self._count("no_join_key")
                continue
            self._join(rule, member, key, event, now, out, stamps)
        return out, stamps

    def _join(
        self, rule: Rule, member: Member, key: tuple[str, ...], event: Event, now: float, out: list[Output], stamps: list[tuple[bytes, Joined]]
    ) -> None:
        windows = self.windows[rule.name]
        w = windows.get(key)
        if w is not None and abs(event.time_ns - w.first_ns) > rule.window_ns:
            if event.time_ns < w.first_ns:
                self._count("too_late")
                return
            self._close(w, now, out)  # the old window is over in event time: decide it, start anew
            w = None
        if w is None:
            w = Window(rule, key, now, event.time_ns, event.time_ns)
            windows[key] = w
            if len(windows) > self.max_keys:
                _, oldest = windows.popitem(last=False)
                self._count("evicted")
                self._close(oldest, now, out)
        else:
            windows.move_to_end(key)
        w.first_ns = min(w.first_ns, event.time_ns)
        w.last_ns = max(w.last_ns, event.time_ns)
        n = w.counts.get(member.name, 0) + 1
        w.counts[member.name] = n
        if n > self.max_events:
            self._count("kept_over_cap")
            return
        event.retain()
        self.joined[rule.name] = self.joined.get(rule.name, 0) + 1
        joined = Joined(member, event, self._new_id(8))
        w.joined.append(joined)
        if member.role == "absent":
            if not w.emitted:
                w.ruled_out = True
            return
        # records are stamped when the incident is established (a rule with an absent member is decided
        # only at the end of its window, long after its records went on: those are not stamped)
        if w.complete_at is None and w.complete():
            w.complete_at = now
            w.trace_id, w.root_span_id = self._new_id(16), self._new_id(8)
            if not rule.has_absent:
                stamps.extend((w.trace_id, j) for j in w.joined)
        elif w.complete_at is not None and not rule.has_absent:
            stamps.append((w.trace_id, joined))
        if w.emitted:
            joined.sent = True
            out.append(Appended(self._incident(w), (joined,)))

    # -- time

    def tick(self, now: float) -> list[Output]:
        """Send what is due and close the windows that are over."""
        out: list[Output] = []
        for windows in self.windows.values():
            for w in list(windows.values()):
                end = w.opened + w.rule.window_s
                if now >= end + self.lateness_s:
                    windows.pop(w.key, None)
                    self._close(w, now, out)
                elif not w.emitted and self._due(w, now, end):
                    self._emit(w, out)
        return out

    def flush(self, now: float) -> list[Output]:
        """Decide every open window now (shutdown): complete incidents are sent, the rest dropped."""
        out: list[Output] = []
        for windows in self.windows.values():
            for w in list(windows.values()):
                self._close(w, now, out)
            windows.clear()
        return out

    def _due(self, w: Window, now: float, end: float) -> bool:
        if w.complete_at is None or w.ruled_out:
            return False
        if w.rule.has_absent:
            return now >= end
        return now >= min(w.complete_at + w.rule.settle_s, end)

    def _close(self, w: Window, now: float, out: list[Output]) -> None:
        if w.emitted:
            return
        if w.complete_at is None:
            self._count("incomplete")
        elif w.ruled_out:
            self._count("ruled_out")
        else:
            self._emit(w, out)

    def _emit(self, w: Window, out: list[Output]) -> None:
        if w.resolved():
            self._count("resolved")
            w.emitted = True  # decided: a resolved incident is never sent
            w.ruled_out = True
            return
        w.emitted = True
        for j in w.joined:
            j.sent = True
        incident = self._incident(w)
        out.append(Emitted(incident))
        k = (w.rule.name, w.rule.severity)
        self.incidents[k] = self.incidents.get(k, 0) + 1

    def _incident(self, w: Window) -> Incident:
        rule = w.rule
        members = tuple(j for j in w.joined if j.member.role != "absent")
        optional = sum(1 for m in rule.members if m.role == "optional" and w.present(m))
        confidence = min(1.0, rule.confidence + optional * rule.confidence_per_optional)
        events = [j.event for j in sorted(members, key=lambda j: j.event.time_ns)]
        return Incident(
            rule=rule,
            key=w.key,
            trace_id=w.trace_id,
            root_span_id=w.root_span_id,
            members=members,
            first_ns=w.first_ns,
            last_ns=w.last_ns,
            confidence=round(confidence, 3),
            summary=render_summary(rule.summary or rule.description or rule.name, rule.name, events),
            resolved=w.resolved(),
        )

    def _count(self, reason: str) -> None:
        self.stats[reason] = self.stats.get(reason, 0) + 1

    def open_windows(self) -> int:
        return sum(len(w) for w in self.windows.values())
