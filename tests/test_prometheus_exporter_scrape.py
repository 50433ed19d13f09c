"""A real Prometheus 2.42 scrapes the prometheus exporter; its query API must return what was sent.

Prometheus (Debian package ``prometheus``) runs as a subprocess on an
ephemeral port with its own TSDB directory and scrapes the exporter every
second; the test then asks ``/api/v1/query`` for a counter, a gauge, a
histogram bucket, a quantile computed from the buckets and target_info.
Once in the text format and once in OpenMetrics (which Prometheus prefers
when offered).
"""

from __future__ import annotations

import logging
import subprocess

import httpx
import pytest
import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import decode_dataclass
from tapio.exporters.prometheus import Config, factory
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing.process import free_port
from tapio.testing import prereq

from .test_prometheus_exporter import full_request

#: the first sample is queryable ~5.5 s after Prometheus starts, whatever the scrape interval
QUERY_DEADLINE = 25.0


def prometheus_binary() -> str:
    return prereq.command("prometheus", "install Debian's prometheus package (scripts/setup.sh does)")


async def query(client: httpx.AsyncClient, base: str, promql: str) -> list[dict]:
    r = await client.get(f"{base}/api/v1/query", params={"query": promql})
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def wait_for_result(client: httpx.AsyncClient, base: str, promql: str) -> list[dict]:
    with trio.fail_after(QUERY_DEADLINE):
        while True:
            try:
                result = await query(client, base, promql)
            except httpx.TransportError:
                result = []  # not listening yet
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 503:  # 503: up, but its storage is not ready yet
                    raise
                result = []
            if result:
                return result
            await trio.sleep(0.2)


@pytest.mark.parametrize("open_metrics", [False, True], ids=["text", "openmetrics"])
async def test_prometheus_scrapes_and_answers_queries(tmp_path, open_metrics):
    binary = prometheus_binary()
    telemetry = Telemetry()
    settings = Settings(
        id=ComponentID("prometheus"),
        kind=Kind.EXPORTER,
        telemetry=telemetry.for_component("exporter", "prometheus"),
        logger=logging.getLogger("test.prometheus"),
    )
    cfg = decode_dataclass(Config, {"endpoint": "127.0.0.1:0", "enable_open_metrics": open_metrics})
    send, recv = trio.open_memory_channel(1)
    exporter = factory.create(settings, cfg, Ports(input=recv))
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        await send.send(Batch.of(Signal.METRICS, full_request()))
        (tmp_path / "prometheus.yml").write_text(
            f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: tapio
    honor_labels: true   # keep the job/instance labels the exporter derives from the resource
    static_configs: [{{targets: ["127.0.0.1:{exporter.port}"]}}]
"""
        )
        web_port = free_port()
        base = f"http://127.0.0.1:{web_port}"
        proc = await trio.lowlevel.open_process(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                sel = 'job="shop/api",instance="pod-1",otel_scope_name="io.tapio.test"'
                (counter,) = await wait_for_result(client, base, f"http_server_requests_total{{{sel},http_method=\"GET\"}}")
                assert float(counter["value"][1]) == 42
                (gauge,) = await query(client, base, f"memory_usage_bytes{{{sel}}}")
                assert float(gauge["value"][1]) == 1.5e9
                (updown,) = await query(client, base, f"queue_depth{{{sel}}}")
                assert float(updown["value"][1]) == -3
                buckets = await query(client, base, f"http_server_duration_seconds_bucket{{{sel}}}")
                got = {b["metric"]["le"]: float(b["value"][1]) for b in buckets}
                assert sorted(got.values()) == [2, 5, 6, 10]
                assert got["+Inf"] == 10
                (count,) = await query(client, base, f"http_server_duration_seconds_count{{{sel}}}")
                assert float(count["value"][1]) == 10
                # half of the 10 observations lie at or below 1 s (buckets: 2 ≤ 0.1 s, 5 ≤ 1 s)
                (median,) = await query(client, base, f"histogram_quantile(0.5, http_server_duration_seconds_bucket{{{sel}}})")
                assert float(median["value"][1]) == pytest.approx(1.0)
                (target,) = await query(client, base, 'target_info{job="shop/api"}')
                assert target["metric"]["host_name"] == "node-a"
                assert target["metric"]["instance"] == "pod-1"
                assert float(target["value"][1]) == 1
                (up,) = await query(client, base, 'up{job="tapio"}')
                assert float(up["value"][1]) == 1
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        fmt = "openmetrics" if open_metrics else "text"
        assert telemetry.value("tapio_exporter_prometheus_scrapes_total", format=fmt) >= 1
        nursery.cancel_scope.cancel()
