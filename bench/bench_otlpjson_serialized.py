"""OTLP/JSON from protobuf bytes: `otlpjson.encode_serialized`, compiled walk against the Python walk and the peers, one run.

Run: ``.venv/bin/python bench/bench_otlpjson_serialized.py [--items N] [--rounds R]``.
For three requests held as protobuf bytes, as a batch holds them:

- logs: cni-log-like records (13 attributes: strings, two ints, an array of
  IPs; a ~300-byte body; times and severity), what the file exporter writes
  for the cni-log receiver;
- metrics: gauge, sum and histogram data points with five attributes;
- traces: spans with ids, eight attributes, an event and a status;

it times, per item (record, data point, span; the best of R rounds):

- ``compiled``: the compiled walk (tapio/_wirejson.c), as encode_serialized runs it;
- ``python``: the Python walk (TAPIO_OTLPJSON_COMPILED=0 gives this one);
- ``encode_parsed``: ``otlpjson.encode(cls.FromString(data))``, tapio's encoder of the parsed message;
- ``json_format``: protobuf's own ``json_format.MessageToJson(cls.FromString(data))``, the peer.

All four are checked to agree first (the three of tapio byte for byte; the
peer's JSON, which has base64 ids and enum names, is only timed). Prints one
JSON line; the goal is compiled <= 1.5 µs per cni-log record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from google.protobuf import json_format  # noqa: E402
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest  # noqa: E402
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from tapio import otlpjson  # noqa: E402

GOAL_US = 1.5
T0 = 1_733_300_000_000_000_000


def _attrs(attrs, strings=(), ints=()) -> None:
    for k, v in strings:
        attrs.add(key=k).value.string_value = v
    for k, v in ints:
        attrs.add(key=k).value.int_value = v


def _scope(resources, scopes: str, name: str):
    """A new resource (a node's attributes) in ``resources`` and a new scope of its ``scopes`` field."""
    resource = resources.add()
    _attrs(resource.resource.attributes, (("host.name", "node-7"), ("k8s.node.name", "node-7"), ("service.name", "tapio")))
    scope = getattr(resource, scopes).add()
    scope.scope.name = name
    return scope


def logs_request(n: int) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    sl = _scope(req.resource_logs, "scope_logs", "tapio/cni-log")
    for i in range(n):
        cid = f"{i * 7919:064x}"
        pod, ip = f"checkout-{i % 5000}", f"10.244.{i % 250}.{i % 200 + 2}"
        body = (f'2024-12-04 10:{i % 60:02d}:{i % 60:02d}.{i % 1000:03d} [INFO][{1000 + i % 9000}] ipam/ipam.go 1235: '
                f'Successfully claimed IPs: [{ip}/26] block=10.244.{i % 250}.0/26 handle="k8s-pod-network.{cid}" '
                f'host="node-7" ContainerID="{cid}" Namespace="shop" Pod="{pod}"')
        r = sl.log_records.add(time_unix_nano=T0 + i * 1000, observed_time_unix_nano=T0 + i * 1000 + 5, severity_number=9, severity_text="INFO")
        r.body.string_value = body
        _attrs(r.attributes, (("log.file.name", "cni.log"), ("log.file.path", "/var/log/calico/cni/cni.log"), ("cni.plugin", "calico"),
                              ("cni.log.style", "calico"), ("cni.operation", "ADD"), ("container.id", cid), ("k8s.namespace.name", "shop"),
                              ("k8s.pod.name", pod), ("network.interface.name", "eth0"), ("cni.result", "Successfully claimed IPs")),
               (("process.pid", 1000 + i % 9000), ("code.lineno", 1235)))
        r.attributes.add(key="cni.ips").value.array_value.values.add().string_value = ip
    return req


def metrics_request(n: int) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    sm = _scope(req.resource_metrics, "scope_metrics", "tapio/kubeletstats")
    made = 0
    kinds = ("gauge", "sum", "histogram")
    while made < n:
        kind = kinds[(made // 100) % 3]
        m = sm.metrics.add(name=f"k8s.pod.metric.{made // 100}", description="A benchmark metric.", unit="By")
        for i in range(min(100, n - made)):
            if kind == "histogram":
                m.histogram.aggregation_temporality = 2
                p = m.histogram.data_points.add(start_time_unix_nano=T0, time_unix_nano=T0 + i, count=45, sum=12.5 + i, min=0.001, max=9.75)
                p.explicit_bounds.extend([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
                p.bucket_counts.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
            else:
                data = m.sum if kind == "sum" else m.gauge
                if kind == "sum":
                    m.sum.aggregation_temporality = 2
                    m.sum.is_monotonic = True
                p = data.data_points.add(start_time_unix_nano=T0, time_unix_nano=T0 + i)
                if i % 2:
                    p.as_int = i * 7919
                else:
                    p.as_double = i * 0.37
            _attrs(p.attributes, (("k8s.namespace.name", f"ns-{i % 20}"), ("k8s.pod.name", f"pod-{i}"), ("container", "app"), ("direction", "rx")),
                   (("interface.index", i % 8),))
        made += min(100, n - made)
    return req


def traces_request(n: int) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = _scope(req.resource_spans, "scope_spans", "tapio/ebpf")
    for i in range(n):
        s = ss.spans.add(trace_id=(i * 7919).to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"), parent_span_id=(i + 2).to_bytes(8, "big"),
                         name="tcp.connect", kind=3, start_time_unix_nano=T0 + i, end_time_unix_nano=T0 + i + 150_000)
        _attrs(s.attributes, (("network.peer.address", f"10.96.{i % 250}.{i % 200}"), ("network.transport", "tcp"),
                              ("k8s.pod.name", f"pod-{i % 300}"), ("k8s.namespace.name", "shop"), ("process.executable.name", "curl"),
                              ("container.id", f"{i:064x}")),
               (("network.peer.port", 443), ("process.pid", 4000 + i)))
        ev = s.events.add(time_unix_nano=T0 + i + 100, name="tcp.state")
        ev.attributes.add(key="tcp.state").value.string_value = "ESTABLISHED"
        s.status.code = 1
    return req


def best_us(fn, items: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best / items * 1e6, 3)


def measure(req, items: int, rounds: int) -> dict:
    cls = type(req)
    data = req.SerializeToString()
    walker = otlpjson._compiled_walker(cls)
    python = otlpjson._encode_serialized_python(cls, data)
    assert python == otlpjson.encode(cls.FromString(data))
    out = {"items": items, "protobuf_bytes_per_item": round(len(data) / items, 1), "json_bytes_per_item": round(len(python) / items, 1)}
    if walker is not None:
        compiled = walker.encode(data)
        assert compiled == python, "the compiled walk wrote other bytes"
        out["compiled_us"] = best_us(lambda: walker.encode(data), items, rounds)
    else:
        out["compiled_us"] = None
    out["python_us"] = best_us(lambda: otlpjson._encode_serialized_python(cls, data), items, max(3, rounds // 3))
    out["encode_parsed_us"] = best_us(lambda: otlpjson.encode(cls.FromString(data)), items, max(3, rounds // 3))
    out["json_format_us"] = best_us(lambda: json_format.MessageToJson(cls.FromString(data)), items, max(2, rounds // 10))
    if out["compiled_us"]:
        out["compiled_vs_python"] = round(out["python_us"] / out["compiled_us"], 1)
        out["compiled_vs_json_format"] = round(out["json_format_us"] / out["compiled_us"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000, help="records, data points or spans per request")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    result = {
        "bench": "otlpjson_encode_serialized",
        "compiled": otlpjson.COMPILED is not None or otlpjson.COMPILED_UNUSED_REASON,
        "logs_cni_like": measure(logs_request(args.items), args.items, args.rounds),
        "metrics": measure(metrics_request(args.items), args.items, args.rounds),
        "traces": measure(traces_request(args.items), args.items, args.rounds),
    }
    compiled = result["logs_cni_like"]["compiled_us"]
    result["goal_us_per_cni_record"] = GOAL_US
    result["goal_met"] = compiled is not None and compiled <= GOAL_US
    result["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
