"""Journal entries → OTLP log records (bytes, see `tapio.otlpwire`). Pure: no I/O, no clocks.

An entry is what libsystemd hands out: field name → value bytes, a list of
them when the field repeats, plus ``__REALTIME_TIMESTAMP`` in µs.

Invariants:
- Nothing of an entry is lost: MESSAGE is the body, PRIORITY the severity,
  ``__REALTIME_TIMESTAMP`` the time; every other field is an attribute,
  under its semantic-convention name where one exists (`SEMCONV`), else as
  ``journald.<FIELD>`` with the field name unchanged. Values that are UTF-8
  become strings, others stay bytes (bytes_value); a repeated field becomes
  an array in journal order.
- ``systemd.unit.name`` names the unit a record is about: the unit that
  wrote it (``_SYSTEMD_UNIT``), or for systemd's messages about a unit
  (`_units.UNIT_MESSAGES`), the unit the message concerns (``UNIT=``, or
  ``USER_UNIT=`` from a user manager); the writer of those, PID 1 in
  ``init.scope``, then stays in
  ``journald._SYSTEMD_UNIT``. Both kinds of record of one unit share the key.
- Mapping an entry never raises for any field names or values; a PRIORITY
  that is not 0-7 leaves the severity unset and is kept as
  ``journald.PRIORITY``.
- Encoded attributes are cached by (field, value), bounded
  (`CACHE_SIZE` entries, emptied when full): most fields of a journal
  repeat from entry to entry (host, boot, unit, command line …).
"""

from __future__ import annotations

import re
import signal
from typing import Union

from tapio import otlpwire as enc

from ._units import EXIT_CODE_IS_SIGNAL, UNIT_FAILING_JOB_RESULTS, UNIT_MESSAGES, UnitMessage

#: a field's value as libsystemd gives it: bytes, or a list of them when the field repeats
Value = Union[bytes, list]

#: journal field → (attribute, whether its value is an integer)
SEMCONV: dict[str, tuple[str, bool]] = {
    "_SYSTEMD_UNIT": ("systemd.unit.name", False),
    "_PID": ("process.pid", True),
    "_COMM": ("process.command", False),
    "_EXE": ("process.executable.path", False),
    "_CMDLINE": ("process.command_line", False),
    "_HOSTNAME": ("host.name", False),
    "_MACHINE_ID": ("host.id", False),
    "TID": ("thread.id", True),
    "CODE_FILE": ("code.file.path", False),
    "CODE_FUNC": ("code.function.name", False),
    "CODE_LINE": ("code.line.number", True),
    "CONTAINER_ID_FULL": ("container.id", False),
    "CONTAINER_NAME": ("container.name", False),
}
#: PRIORITY (syslog severity) → (OTLP severity number, severity text as journalctl names it)
SEVERITY: dict[bytes, tuple[int, str]] = {
    b"0": (21, "emerg"),  # FATAL
    b"1": (19, "alert"),  # ERROR3
    b"2": (18, "crit"),  # ERROR2
    b"3": (17, "err"),  # ERROR
    b"4": (13, "warning"),  # WARN
    b"5": (10, "notice"),  # INFO2
    b"6": (9, "info"),  # INFO
    b"7": (5, "debug"),  # DEBUG
}
#: fields that differ in nearly every entry: encoded directly, never cached
UNCACHED = ("_SOURCE_REALTIME_TIMESTAMP", "_SOURCE_MONOTONIC_TIMESTAMP", "SYSLOG_TIMESTAMP")
#: encoded attributes remembered; the cache is emptied when it reaches this
CACHE_SIZE = 8192
#: longer values are encoded each time instead of cached (bounds the cache's memory to ~4 MiB)
CACHE_MAX_VALUE = 512

_DIGITS = re.compile(rb"-?[0-9]{1,18}")


def text(value: bytes) -> str | bytes:
    """A field value as an attribute value: a string when it is UTF-8, else the bytes themselves."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def _value(value: Value, integer: bool = False) -> str | bytes | int | list:
    if type(value) is list:
        return [_value(v, integer) for v in value]
    if integer and _DIGITS.fullmatch(value):
        return int(value)
    return text(value)


def _piece(name: str, value) -> bytes:
    kv = enc.key_value(name, value)
    return enc.varint(len(kv)) + kv


def grep_pattern(pattern: str) -> re.Pattern[str] | None:
    """``grep`` compiled as journalctl treats it: case-insensitive when it has no upper-case letter."""
    if not pattern:
        return None
    return re.compile(pattern, 0 if any(c.isupper() for c in pattern) else re.IGNORECASE)


class EntryMapper:
    """Maps entries of one receiver; holds its attribute cache (not thread-safe: one reader thread uses it).

    Args:
        grep: entries whose MESSAGE does not match are left out (`grep_pattern`).
        unit_state: whether systemd's unit messages become unit state events.
        units: the unit names whose messages do; None means every unit.
    """

    def __init__(self, *, grep: re.Pattern[str] | None = None, unit_state: bool = True, units: frozenset[str] | None = None) -> None:
        self._grep = grep
        self._unit_state = unit_state
        self._units = None if units is None else frozenset(u.encode() for u in units)
        self._cache: dict[tuple[str, bytes], bytes] = {}
        #: unit state events mapped since the last `take_unit_events`, by ``systemd.unit.event``
        self.unit_events: dict[str, int] = {}

    def take_unit_events(self) -> dict[str, int]:
        """The unit state events mapped since the last call, by event (and start counting anew)."""
        events, self.unit_events = self.unit_events, {}
        return events

    def record(self, fields: dict[str, Value], realtime_us: int, observed_ns: int) -> bytes | None:
        """The entry as one framed LogRecord (`otlpwire.item`), or None when ``grep`` leaves it out.

        ``fields`` is consumed (fields are popped from it).
        """
        message = fields.pop("MESSAGE", None)
        body: str | bytes | None
        if message is None:
            body = None
        elif type(message) is list:
            body = text(message[0]) if message else None
            fields["MESSAGE"] = message  # every value stays, as journald.MESSAGE
        else:
            body = text(message)
        if self._grep is not None:
            if body is None or not self._grep.search(body if type(body) is str else body.decode(errors="replace")):
                return None
        severity, severity_text = 0, ""
        priority = fields.pop("PRIORITY", None)
        if priority is not None:
            found = SEVERITY.get(priority) if type(priority) is bytes else None
            if found is None:
                fields["PRIORITY"] = priority
            else:
                severity, severity_text = found
        pieces: list[bytes] = []
        event_name = ""
        if self._unit_state:
            about = self._unit_message(fields)
            if about is not None:
                event_name = self._unit_attributes(about, fields, pieces)
        for key in UNCACHED:
            value = fields.pop(key, None)
            if value is not None:
                pieces.append(_piece("journald." + key, _value(value)))
        cache = self._cache
        for key, value in fields.items():
            if type(value) is bytes and len(value) <= CACHE_MAX_VALUE:
                ck = (key, value)
                found = cache.get(ck)
                if found is None:
                    if len(cache) >= CACHE_SIZE:
                        cache.clear()
                    found = cache[ck] = self._field(key, value)
                pieces.append(found)
            else:
                pieces.append(self._field(key, value))
        return enc.item(
            enc.log_record(
                time_unix_nano=realtime_us * 1000,
                observed_time_unix_nano=observed_ns,
                severity_number=severity,
                severity_text=severity_text,
                body=body,
                attrs=enc.frame(enc.T_ATTR_LOG, pieces),
                event_name=event_name,
            )
        )

    @staticmethod
    def _field(key: str, value: Value) -> bytes:
        mapped = SEMCONV.get(key)
        if mapped is None:
            return _piece("journald." + key, _value(value))
        return _piece(mapped[0], _value(value, mapped[1]))

    # -- systemd unit state

    def _unit_message(self, fields: dict[str, Value]) -> UnitMessage | None:
        message_id = fields.get("MESSAGE_ID")
        if type(message_id) is not bytes:
            return None
        about = UNIT_MESSAGES.get(message_id)
        if about is None:
            return None
        unit = fields.get("UNIT")
        if unit is None:
            unit = fields.get("USER_UNIT")  # a user manager's message
        if type(unit) is not bytes or (self._units is not None and unit not in self._units):
            return None
        return about

    def _unit_attributes(self, about: UnitMessage, fields: dict[str, Value], pieces: list[bytes]) -> str:
        """Add the ``systemd.unit.*`` attributes of a unit message, consuming its fields; returns the event name."""
        def take(key: str) -> str | None:
            value = fields.get(key)
            if type(value) is not bytes:
                return None  # absent, or repeated (then kept as journald.<key>)
            del fields[key]
            return value.decode(errors="replace")

        def number(key: str) -> int | None:
            value = fields.get(key)
            if type(value) is bytes and _DIGITS.fullmatch(value):
                del fields[key]
                return int(value)
            return None

        writer = fields.pop("_SYSTEMD_UNIT", None)
        if writer is not None:
            pieces.append(_piece("journald._SYSTEMD_UNIT", _value(writer)))
        manager = "system" if "UNIT" in fields else "user"
        name = take("UNIT") if manager == "system" else take("USER_UNIT")
        attrs: list[tuple[str, object]] = [
            ("systemd.unit.name", name),
            ("systemd.unit.event", about.event),
            ("systemd.unit.manager", manager),
        ]
        result = take(about.result_field) if about.result_field else about.result
        state = about.state
        if about.event == "start_failed" and result not in UNIT_FAILING_JOB_RESULTS:
            state = "inactive"  # a dependency failed or the job was cancelled: the unit itself did not fail
        if state is not None:
            attrs.append(("systemd.unit.state", state))
        if result is not None:
            attrs.append(("systemd.unit.result", result))
        attrs += [
            ("systemd.unit.job.type", take("JOB_TYPE")),
            ("systemd.unit.job.id", number("JOB_ID")),
            ("systemd.unit.restart.count", number("N_RESTARTS")),
            ("systemd.unit.command", take("COMMAND")),
            ("systemd.unit.invocation_id", take("INVOCATION_ID")),
        ]
        exit_code = fields.get("EXIT_CODE")
        status = fields.get("EXIT_STATUS")
        if type(exit_code) is bytes and type(status) is bytes and _DIGITS.fullmatch(status):
            code = take("EXIT_CODE")
            value = number("EXIT_STATUS")
            attrs += [("systemd.unit.exit.code", code), ("systemd.unit.exit.status", value)]
            if EXIT_CODE_IS_SIGNAL.get(code or "") is False:
                attrs.append(("process.exit.code", value))
            elif EXIT_CODE_IS_SIGNAL.get(code or ""):
                attrs.append(("systemd.unit.exit.signal", _signal_name(value or 0)))
        pieces.extend(_piece(k, v) for k, v in attrs if v is not None)
        self.unit_events[about.event] = self.unit_events.get(about.event, 0) + 1
        return f"systemd.unit.{about.event}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"
