"""kubeletstats scrape time for 110 pods, against a bare fetch-and-json.loads of the same documents, same run.

Run: ``.venv/bin/python bench/bench_kubeletstats.py [PODS]`` (default 110,
the kubelet's default pod limit, two containers and one volume each). A
stand-in kubelet (tapio.testing.fake_kubelet) serves /stats/summary and
/pods over TLS with a bearer token. Timed, median of `ROUNDS`:

- ``tapio_scrape_ms``: one whole scrape of the receiver (both GETs, parsing,
  every metric group, utilisation, handing the batch on);
- ``bare_fetch_parse_ms``: the peer, the least any scraper does: the same two
  GETs on the same httpx client and ``json.loads`` of both bodies;
- ``tapio_convert_ms``: the receiver's parsing and metric building alone.

Prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.decode import decode_dataclass
from tapio.receivers.kubeletstats import factory
from tapio.receivers.kubeletstats._summary import metrics_request, parse_pod_specs, parse_summary
from tapio.telemetry import Telemetry
from tapio.testing.fake_kubelet import as_bytes, open_fake_kubelet, pod_list, summary_document
from tapio.testing.sink import RecordingConsumer

ROUNDS = 15
TOKEN = "bench-token"
GROUPS = ["node", "pod", "container", "volume"]


def make_certs(d: Path) -> tuple[str, str, str]:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kubelet")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem",
            "-days", "1", "-extfile", "ext")
    return str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key")


async def median(fn) -> float:
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def main(pods: int) -> dict:
    summary, specs = as_bytes(summary_document(pods, 2, volumes=1)), as_bytes(pod_list(pods, 2, volumes=1))
    with tempfile.TemporaryDirectory(prefix="tapio-bench-kubelet-") as tmp:
        d = Path(tmp)
        ca, cert, key = make_certs(d)
        sa = d / "sa"
        sa.mkdir()
        (sa / "token").write_text(TOKEN)
        (sa / "ca.crt").write_text(Path(ca).read_text())
        async with open_fake_kubelet(summary, specs, cert_file=cert, key_file=key, token=TOKEN) as kubelet:
            config = decode_dataclass(factory.config_class, {"endpoint": kubelet.endpoint, "service_account_dir": str(sa), "metric_groups": GROUPS})
            telemetry = Telemetry()
            settings = Settings(id=ComponentID("kubeletstats"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "kubeletstats"),
                                logger=logging.getLogger("bench"))
            sink = RecordingConsumer(ack=True)
            receiver = factory.create(settings, config, Ports(output=sink))
            receiver._endpoint = kubelet.endpoint
            headers = receiver._headers()
            async with httpx.AsyncClient(verify=receiver._ssl_context(), timeout=30, trust_env=False) as client:
                await receiver.scrape(client, headers)  # warm: connection and TLS session

                async def ours() -> None:
                    await receiver.scrape(client, headers)

                async def bare() -> None:
                    for path in ("/stats/summary", "/pods"):
                        response = await client.get(kubelet.endpoint + path, headers=headers)
                        json.loads(response.content)

                tapio_s = await median(ours)
                bare_s = await median(bare)
    assert telemetry.value("tapio_kubeletstats_scrapes_total", outcome="ok") == ROUNDS + 1
    points = sink.batches[-1].count
    doc = parse_summary(summary)
    pod_specs = parse_pod_specs(specs)
    convert = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        metrics_request(parse_summary(summary), groups=GROUPS, now_ns=time.time_ns(), specs=parse_pod_specs(specs))
        convert.append(time.perf_counter() - t0)
    assert doc and pod_specs
    return {
        "bench": "kubeletstats",
        "pods": pods,
        "containers": pods * 2,
        "python": sys.version.split()[0],
        "summary_bytes": len(summary),
        "points": points,
        "tapio_scrape_ms": round(tapio_s * 1e3, 2),
        "bare_fetch_parse_ms": round(bare_s * 1e3, 2),
        "ratio": round(tapio_s / bare_s, 2),
        "tapio_convert_ms": round(statistics.median(convert) * 1e3, 2),
    }


if __name__ == "__main__":
    print(json.dumps(trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 110)), flush=True)
