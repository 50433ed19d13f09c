"""/metrics is valid Prometheus text (checked by the real promtool); /healthz and /readyz say what fails."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tapio import selftelemetry
from tapio.pdata import Signal
from tapio.telemetry import COUNTER, Telemetry
from tapio.testing import prereq


def promtool() -> str:
    return prereq.command("promtool", "install Debian's prometheus package (scripts/setup.sh does)")


def sample_telemetry() -> Telemetry:
    tel = Telemetry()
    r = tel.for_component("receiver", "otlp", transport="http")
    r.signal_add("receiver_accepted", Signal.LOGS, 120)
    r.signal_add("receiver_refused", Signal.TRACES, 3)
    e = tel.for_component("exporter", "file")
    e.signal_add("exporter_sent", Signal.LOGS, 100)
    e.gauge("tapio_exporter_queue_size", lambda: 2)
    e.gauge("tapio_exporter_queue_capacity", lambda: 16)
    p = tel.for_component("processor", "batch", pipeline="logs", otel_signal="logs")
    p.add("tapio_processor_incoming_items_total", 120)
    p.bad_input('weird "quoted"\nreason\\')
    tel.declare("tapio_test_ratio", "gauge", "A gauge with a fractional value.")
    tel.gauge("tapio_test_ratio", {}, lambda: 0.25)
    return tel


def test_render_is_valid_for_promtool(tmp_path):
    text = selftelemetry.render_prometheus(sample_telemetry())
    res = subprocess.run([promtool(), "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode() + "\n" + text
    assert 'tapio_receiver_accepted_log_records_total{receiver="otlp",transport="http"} 120' in text
    assert 'tapio_exporter_queue_capacity{exporter="file"} 16' in text
    assert 'reason="weird \\"quoted\\"\\nreason\\\\"' in text
    assert "tapio_test_ratio 0.25" in text
    # every family has exactly one HELP and TYPE line
    types = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len({t.split()[2] for t in types})


def test_counters_only_grow():
    tel = Telemetry()
    with pytest.raises(ValueError, match="cannot decrease"):
        tel.add("tapio_processor_dropped_items_total", -1, {"processor": "x"})
    with pytest.raises(KeyError):
        tel.add("tapio_not_declared_total", 1, {})
    assert tel.value("tapio_processor_dropped_items_total") == 0
    assert any(name == "tapio_processor_dropped_items_total" and info.kind == COUNTER for name, info, _ in tel.collect())


async def test_endpoints_over_http(nursery):
    tel = sample_telemetry()
    failing: list[str] = []
    ready = {"v": False}
    health = selftelemetry.Health(lambda: ready["v"], lambda: list(failing))
    port = await nursery.start(selftelemetry.serve, tel, health, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "tapio_exporter_sent_log_records_total" in r.text
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        ready["v"] = True
        assert (await client.get("/readyz")).status_code == 200
        failing.append("receiver:otlp")
        r = await client.get("/healthz")
        assert r.status_code == 503 and r.json() == {"status": "failing", "failing": ["receiver:otlp"]}
        assert (await client.get("/nope")).status_code == 404
        assert (await client.post("/metrics", content=b"x")).status_code == 405


def test_gauge_registered_again_replaces_the_old_one():
    tel = Telemetry()
    e = tel.for_component("exporter", "otlp")
    e.gauge("tapio_exporter_queue_size", lambda: 5)
    e.gauge("tapio_exporter_queue_size", lambda: 7)  # e.g. after a restart
    assert tel.value("tapio_exporter_queue_size", exporter="otlp") == 7
    text = selftelemetry.render_prometheus(tel)
    assert text.count('tapio_exporter_queue_size{exporter="otlp"}') == 1
