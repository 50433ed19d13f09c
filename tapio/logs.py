"""tapio's own logs: structured, as text for people or JSON for log pipelines.

Every record carries a UTC timestamp, the level, the component (taken from
the logger name ``tapio.<kind>.<id>``), the message, and the key/values
passed as ``extra={"kv": {...}}``. Values that look like secrets (keys
containing ``authorization``, ``token``, ``password``, ``secret``,
``api_key``) are replaced by ``<redacted>`` whatever the caller passed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error", logging.CRITICAL: "fatal"}
_SECRET_HINTS = ("authorization", "token", "password", "secret", "api_key", "apikey")


def _component(name: str) -> str:
    # tapio.receiver.otlp/2 -> receiver:otlp/2 ; tapio.service -> service
    parts = name.split(".", 2)
    if parts[0] != "tapio":
        return name
    if len(parts) == 3:
        return f"{parts[1]}:{parts[2]}"
    return parts[-1]


def _redact(kv: dict[str, Any]) -> dict[str, Any]:
    return {k: ("<redacted>" if any(h in k.lower() for h in _SECRET_HINTS) else v) for k, v in kv.items()}


def _level(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelno, record.levelname.lower())


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        kv = _redact(getattr(record, "kv", None) or {})
        parts = [_timestamp(record.created), f"{_level(record):5}", f"{_component(record.name):20}", record.getMessage()]
        line = "  ".join(parts)
        if kv:
            line += "  " + " ".join(f"{k}={_text_value(v)}" for k, v in kv.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": _level(record),
            "component": _component(record.name),
            "msg": record.getMessage(),
        }
        kv = _redact(getattr(record, "kv", None) or {})
        for k, v in kv.items():
            doc.setdefault(k, v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def setup_logging(level: str = "info", encoding: str = "text", stream: TextIO | None = None) -> None:
    """Configure the ``tapio`` logger tree (idempotent: replaces handlers set before)."""
    root = logging.getLogger("tapio")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if encoding == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    root.propagate = False
