"""tapio's own logs: one line per record, text or JSON, component named, secrets redacted."""

from __future__ import annotations

import io
import json
import logging

from tapio.logs import setup_logging


def emit(encoding: str) -> list[str]:
    stream = io.StringIO()
    setup_logging("info", encoding, stream)
    try:
        log = logging.getLogger("tapio.exporter.otlp/tempo")
        log.debug("not shown at info")
        log.warning("send failed, retrying", extra={"kv": {"attempt": 3, "authorization": "Bearer s3cret", "reason": "UNAVAILABLE here"}})
        logging.getLogger("tapio.service").info("started")
    finally:
        setup_logging("info", "text")
    return stream.getvalue().splitlines()


def test_text_lines():
    lines = emit("text")
    assert len(lines) == 2
    first = lines[0]
    assert " warn " in first and "exporter:otlp/tempo" in first and "send failed, retrying" in first
    assert "attempt=3" in first and 'reason="UNAVAILABLE here"' in first
    assert "s3cret" not in first and "authorization=<redacted>" in first
    assert lines[1].split()[1:4] == ["info", "service", "started"]


def test_json_lines():
    docs = [json.loads(line) for line in emit("json")]
    assert docs[0]["level"] == "warn" and docs[0]["component"] == "exporter:otlp/tempo"
    assert docs[0]["attempt"] == 3 and docs[0]["authorization"] == "<redacted>"
    assert docs[0]["ts"].endswith("Z")
    assert docs[1]["msg"] == "started"
