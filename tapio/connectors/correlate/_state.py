"""Open windows as bytes, so a restart with storage keeps incidents that were being assembled.

Sans-IO: `snapshot` copies an engine's open windows into plain values and
`encode` makes one JSON document of them (`dump` does both); `load` puts
them back into an engine built from the current rules.

Invariants:
- Times that the engine keeps on its monotonic clock (when a window opened,
  when it became complete) are written as ages at ``now``; on load they are
  placed before the new clock's ``now`` by that age plus the time tapio was
  down (wall clock), so a window's end does not move with a restart.
- Attribute values are JSON as they are, except bytes (``{"b": base64}``),
  so every value a record can carry survives.
- A window of a rule that no longer exists, or whose join attributes
  changed, is dropped; so is a member event of a member the rule no longer
  has. Both are counted (``restore_dropped``), never an error: rules are
  edited between runs.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from ._engine import Engine, Joined, Window
from ._match import Event

FORMAT = 1


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"b": base64.b64encode(v).decode()}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    return v


def _unvalue(v: Any) -> Any:
    if isinstance(v, dict):
        return base64.b64decode(v["b"])
    if isinstance(v, list):
        return [_unvalue(x) for x in v]
    return v


def _plain(attrs: Any) -> dict:
    return dict(attrs) if isinstance(attrs, dict) else attrs.materialize()


def _event(e: Event) -> dict:
    return {
        "t": e.time_ns,
        "n": e.name,
        "s": e.scope,
        "a": {k: _value(v) for k, v in _plain(e.attrs).items()},
        "r": {k: _value(v) for k, v in _plain(e.resource).items()},
        "b": e.body,
        "v": e.severity,
    }


def _unevent(d: dict) -> Event:
    return Event(
        time_ns=d["t"],
        name=d["n"],
        scope=d["s"],
        attrs={k: _unvalue(v) for k, v in d["a"].items()},
        resource={k: _unvalue(v) for k, v in d["r"].items()},
        body=d["b"],
        severity=d["v"],
    )


def dump(engine: Engine, now: float, wall_now: float | None = None) -> bytes:
    """The engine's open windows, with their ages at ``now`` (its clock) and the wall time."""
    return encode(snapshot(engine, now, wall_now))


def encode(snap: dict) -> bytes:
    """A `snapshot` as bytes (it shares nothing with the engine: this may run in another thread)."""
    return json.dumps(snap, separators=(",", ":")).encode()


def snapshot(engine: Engine, now: float, wall_now: float | None = None) -> dict:
    """The engine's open windows as plain values, copied, so the engine may go on while they are encoded."""
    windows = []
    for rule_name, by_key in engine.windows.items():
        for w in by_key.values():
            windows.append(
                {
                    "rule": rule_name,
                    "join": [list(m.join) for m in w.rule.members],
                    "key": list(w.key),
                    "age": now - w.opened,
                    "complete_age": None if w.complete_at is None else now - w.complete_at,
                    "first_ns": w.first_ns,
                    "last_ns": w.last_ns,
                    "counts": dict(w.counts),
                    "trace_id": w.trace_id.hex(),
                    "root_span_id": w.root_span_id.hex(),
                    "emitted": w.emitted,
                    "ruled_out": w.ruled_out,
                    "joined": [{"m": j.member.name, "id": j.span_id.hex(), "sent": j.sent, "e": _event(j.event)} for j in w.joined],
                }
            )
    return {"format": FORMAT, "saved_at": time.time() if wall_now is None else wall_now, "windows": windows}


def load(engine: Engine, data: bytes, now: float, wall_now: float | None = None) -> tuple[int, int]:
    """Put saved windows back into ``engine``; returns (windows restored, windows or member events dropped).

    Raises ValueError when ``data`` is not a saved state of this format.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a saved correlate state: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a saved correlate state of format {FORMAT}")
    down = max(0.0, (time.time() if wall_now is None else wall_now) - float(doc["saved_at"]))
    rules = {r.name: r for r in engine.rules}
    restored = dropped = 0
    for d in doc["windows"]:
        rule = rules.get(d["rule"])
        if rule is None or d["join"] != [list(m.join) for m in rule.members]:
            dropped += 1
            continue
        members = {m.name: m for m in rule.members}
        w = Window(rule, tuple(d["key"]), now - d["age"] - down, d["first_ns"], d["last_ns"])
        w.counts = {k: v for k, v in d["counts"].items() if k in members}
        w.complete_at = None if d["complete_age"] is None else now - d["complete_age"] - down
        w.trace_id, w.root_span_id = bytes.fromhex(d["trace_id"]), bytes.fromhex(d["root_span_id"])
        w.emitted, w.ruled_out = d["emitted"], d["ruled_out"]
        for j in d["joined"]:
            member = members.get(j["m"])
            if member is None:
                dropped += 1
                continue
            w.joined.append(Joined(member, _unevent(j["e"]), bytes.fromhex(j["id"]), j["sent"]))
        by_key = engine.windows[rule.name]
        by_key[w.key] = w
        restored += 1
        while len(by_key) > engine.max_keys:
            by_key.popitem(last=False)
            dropped += 1
    return restored, dropped
