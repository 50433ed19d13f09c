"""Benchmark of the k8sattributes processor with 10,000 pods cached. Prints one JSON line.

Run: ``.venv/bin/python bench/bench_k8sattributes.py``.

- ``cache_mib``: memory held for 10,000 realistic pods (labels, annotations,
  two containers, a ReplicaSet owner), measured with tracemalloc: the
  processor's pod cache with every pod's attributes computed
  (``pod_cache_mib``) plus the shared watch's store of the objects
  (``watch_store_mib``). Goal: <= 50 MiB.
- ``shared_records_per_s``: records per second on one core when a batch's
  records share their resources (OTLP from SDKs: 16 resources of 512 records,
  each resource naming its pod by ``k8s.pod.ip``). Goal: >= 200k/s.
- ``per_record_records_per_s``: records per second when every record names
  its own container (the ebpf receiver's shape: one node resource, 8192
  records, each with its own ``container.id`` and a dozen attributes),
  regrouped into one resource per pod. The containers are those of one
  node's pods (100 of the 10,000), as a node agent sees them. Goal: >= 100k/s.
  ``per_record_all_pods_records_per_s`` draws them from all 10,000 pods
  instead (nearly every record its own resource: the worst case).
- The peer, measured in the same run: the same regrouping done the obvious
  way with the protobuf API (read each record's attributes, copy the
  records into new per-pod ResourceLogs, serialize for the exporter):
  ``peer_protobuf_records_per_s`` and ``ratio_vs_protobuf``. The peer does
  less than the processor: it looks for container.id only, stops at the
  first match, and counts no reasons. (A processor built this way, with
  every association attribute and the counting, measured ~20% slower than
  the byte-level one.)
- ``ebpf_layout_us_per_record``: the issue's question, regroup in the
  processor or group in the receiver. The ebpf receiver's own encoder
  writes the same records both ways (one node resource; one resource per
  container carrying container.id, container.runtime.name and k8s.pod.uid),
  and the processor runs behind each: CPU µs per record of the receiver's
  part, the processor's part and their sum (``grouped_vs_flat`` < 1: the
  receiver should group).
- The processor's figures start from the batch as it arrives (parsed, with
  its bytes); the peer starts from the parsed request.
All rates are CPU time of this process (``time.process_time``), so one core.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import time
import tracemalloc
import uuid

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.k8s._watch import _compress
from tapio.pdata import Batch, Signal
from tapio.processors.k8sattributes import factory
from tapio import otlpwire as ebpf_enc
from tapio.config import decode_dataclass
from tapio.telemetry import Telemetry
from tapio.testing import fake_kube as fk

PODS = 10_000
BATCH = 8192
ROUNDS = 12


def make_pods() -> list[dict]:
    rnd = random.Random(7)
    pods = []
    for i in range(PODS):
        app = f"svc-{i % 400}"
        rs_hash = f"{rnd.getrandbits(40):010x}"
        pod = fk.pod(
            f"{app}-{rs_hash}-{i:05d}",
            namespace=f"team-{i % 40}",
            node=f"node-{i % 100}",
            uid=str(uuid.UUID(int=rnd.getrandbits(128))),
            ip=f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
            labels={"app.kubernetes.io/name": app, "app.kubernetes.io/version": "1.4.2", "pod-template-hash": rs_hash, "team": f"team-{i % 40}"},
            annotations={"prometheus.io/scrape": "true", "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            owner=fk.owner_ref("ReplicaSet", f"{app}-{rs_hash}", f"rs-{i % 2000}"),
            containers={"app": f"containerd://{rnd.getrandbits(256):064x}", "proxy": f"containerd://{rnd.getrandbits(256):064x}"},
        )
        pod["metadata"]["resourceVersion"] = str(1000 + i)
        pods.append(pod)
    return pods


def make_processor(pods: list[dict]):
    config = decode_dataclass(
        factory.config_class,
        {"extract": {"metadata": ["k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.pod.start_time", "k8s.deployment.name", "k8s.node.name", "k8s.container.name"],
                     "labels": [{"tag_name": "app", "key": "app.kubernetes.io/name"}]}},
    )
    settings = Settings(id=ComponentID("k8sattributes"), kind=Kind.PROCESSOR, telemetry=Telemetry().for_component("processor", "k8sattributes"), logger=logging.getLogger("bench"))
    proc = factory.create(settings, config, Ports(input=object(), output=object()))
    for pod in pods:
        proc.cache.apply("ADDED", pod, 0.0)
    for uid, owner in list(proc.cache.owners.items()):
        proc.cache.owner_found(uid, {"metadata": {"uid": uid, "ownerReferences": [fk.owner_ref("Deployment", owner.name.rsplit("-", 1)[0], "d-" + uid)]}})
    return proc


def mib(n: int) -> float:
    return round(n / (1 << 20), 1)


def measure_memory(pods: list[dict]) -> tuple[float, float]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    proc = make_processor(pods)
    for pod in proc.cache.by_uid.values():
        proc.cache.extra(pod, "")
        proc.cache.extra(pod, next(iter(pod.containers)))
    gc.collect()
    cache = tracemalloc.get_traced_memory()[0] - base
    base = tracemalloc.get_traced_memory()[0]
    store = {(p["metadata"]["namespace"], p["metadata"]["name"]): (p["metadata"]["resourceVersion"], _compress(p)) for p in pods}
    gc.collect()
    stored = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del store, proc
    return mib(cache), mib(stored)


def kv(key: str, value) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value))


def ebpf_record_attributes(i: int, cid: str, uid: str) -> list[tuple[str, object]]:
    return [
        ("tapio.ebpf.event", "open"), ("process.pid", 1000 + i % 300), ("thread.id", 1000 + i % 300), ("process.user.id", 0),
        ("tapio.ebpf.comm", "nginx"), ("tapio.ebpf.cgroup_id", 5000 + i % 300), ("container.id", cid),
        ("container.runtime.name", "containerd"), ("k8s.pod.uid", uid), ("file.path", f"/var/cache/{i}"),
        ("tapio.ebpf.open.flags", 0), ("tapio.ebpf.open.fd", 3),
    ]


def per_record_request(pods: list[dict], rnd: random.Random) -> bytes:
    """An ebpf-shaped request; the records' containers are drawn from ``pods`` (a node's pods, or the whole cache)."""
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend([kv("host.name", "node-1"), kv("os.type", "linux"), kv("service.name", "tapio")])
    sl = rl.scope_logs.add()
    sl.scope.name = "tapio.ebpf"
    for i in range(BATCH):
        pod = pods[rnd.randrange(len(pods))]
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://")[1]
        lr = sl.log_records.add(time_unix_nano=1_700_000_000_000_000_000 + i, severity_number=9, event_name="tapio.ebpf.open")
        lr.body.string_value = f"open /var/cache/{i}"
        lr.attributes.extend(kv(k, v) for k, v in ebpf_record_attributes(i, cid, pod["metadata"]["uid"]))
    return req.SerializeToString()


def shared_request(pods: list[dict], rnd: random.Random, resources: int = 16) -> bytes:
    req = ExportLogsServiceRequest()
    per = BATCH // resources
    for r in range(resources):
        pod = pods[rnd.randrange(len(pods))]
        rl = req.resource_logs.add()
        rl.resource.attributes.extend([kv("service.name", "checkout"), kv("telemetry.sdk.language", "python"), kv("k8s.pod.ip", pod["status"]["podIP"])])
        sl = rl.scope_logs.add()
        sl.scope.name = "app"
        for i in range(per):
            lr = sl.log_records.add(time_unix_nano=1_700_000_000_000_000_000 + i, severity_number=9)
            lr.body.string_value = f"GET /api/items/{i} 200"
            lr.attributes.extend([kv("http.route", "/api/items/{id}"), kv("http.response.status_code", 200), kv("user.id", f"u{i % 97}")])
    return req.SerializeToString()


def rate(fn, inputs: list) -> float:
    """Records per CPU second of ``fn`` over ``inputs`` (``fn`` returns how many records it handled)."""
    fn(inputs[0].copy() if isinstance(inputs[0], Batch) else inputs[0])  # warm caches (attribute blobs); the processor merges into a batch's resources
    t0 = time.process_time()
    n = 0
    for item in inputs:
        n += fn(item)
    return n / (time.process_time() - t0)


def arrived(data: bytes) -> Batch:
    """The batch as the processor receives it: parsed by the receiver, arrival bytes kept (not timed: upstream work)."""
    return Batch.from_bytes(Signal.LOGS, data)


def run_processor(proc, batch: Batch) -> int:
    counts = {"associated": 0, "regrouped": 0, "no_association_attribute": 0, "no_matching_pod": 0, "host_process": 0}
    request, raw = proc.process_request(Signal.LOGS, batch.requests[0], batch.raw[0], "", counts)
    assert raw is not None and counts["associated"] == batch.count, counts
    return batch.count


def protobuf_peer(proc, req: ExportLogsServiceRequest) -> int:
    """The same regrouping with the protobuf API, from the parsed request: read each record's attributes, copy records, serialize."""
    out = ExportLogsServiceRequest()
    by_pod: dict[str, object] = {}
    n = 0
    for rl in req.resource_logs:
        for sl in rl.scope_logs:
            for rec in sl.log_records:
                n += 1
                cid = next((a.value.string_value for a in rec.attributes if a.key == "container.id"), "")
                pod = proc.cache.by_container.get(cid)
                group = by_pod.get(pod.uid) if pod else None
                if group is None and pod is not None:
                    new = out.resource_logs.add()
                    new.resource.CopyFrom(rl.resource)
                    new.resource.MergeFromString(proc.cache.extra(pod, cid).blob)
                    group = by_pod[pod.uid] = new.scope_logs.add(scope=sl.scope)
                group.log_records.append(rec)
    out.SerializeToString()
    return n


def receiver_grouping(pods: list[dict], rnd: random.Random) -> dict:
    """What it costs the ebpf receiver to emit one ResourceLogs per container instead of one for all.

    Both ways use the receiver's own encoder (tapio.otlpwire)
    on the same encoded records, and include `Batch.from_bytes` (the receiver
    parses what it wrote once): ``flat`` is today's request, ``grouped``
    puts the records of each container under a resource of their own
    (host attributes plus container.id, container.runtime.name and
    k8s.pod.uid), the records keeping their attributes.
    """
    host = [("host.name", "node-1"), ("os.type", "linux"), ("service.name", "tapio")]
    host_blob = ebpf_enc.attributes(ebpf_enc.T_ATTR_RESOURCE, host)
    scope = ebpf_enc.scope("tapio.ebpf", "0.1.0")
    items = []
    for i in range(BATCH):
        pod = pods[rnd.randrange(len(pods))]
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://")[1]
        attrs = ebpf_enc.attributes(ebpf_enc.T_ATTR_LOG, ebpf_record_attributes(i, cid, pod["metadata"]["uid"]))
        record = ebpf_enc.log_record(
            time_unix_nano=1_700_000_000_000_000_000 + i, observed_time_unix_nano=1_700_000_000_000_000_000 + i,
            severity_number=9, severity_text="INFO", body=f"open /var/cache/{i}", attrs=attrs, event_name="tapio.ebpf.open",
        )
        items.append(((cid, pod["metadata"]["uid"]), ebpf_enc.item(record)))
    resources: dict[tuple[str, str], bytes] = {}

    def flat() -> Batch:
        return Batch.from_bytes(Signal.LOGS, ebpf_enc.request(host_blob, scope, [it for _, it in items]))

    def grouped() -> Batch:
        groups: dict[tuple[str, str], list[bytes]] = {}
        for key, it in items:
            group = groups.get(key)
            if group is None:
                group = groups[key] = []
            group.append(it)
        parts = []
        for key, group in groups.items():
            blob = resources.get(key)
            if blob is None:
                cid, uid = key
                blob = resources[key] = ebpf_enc.attributes(ebpf_enc.T_ATTR_RESOURCE, [*host, ("container.id", cid), ("container.runtime.name", "containerd"), ("k8s.pod.uid", uid)])
            parts.append(ebpf_enc.request(blob, scope, group))  # a one-resource request is one field 1: requests concatenate
        return Batch.from_bytes(Signal.LOGS, b"".join(parts))

    def cost(fn) -> float:
        fn()
        t0 = time.process_time()
        for _ in range(ROUNDS):
            fn()
        return (time.process_time() - t0) / ROUNDS / BATCH * 1e6

    flat_us, grouped_us = cost(flat), cost(grouped)
    return {"flat_us": flat_us, "grouped_us": grouped_us, "flat": flat(), "grouped": grouped()}


def main() -> None:
    pods = make_pods()
    cache_mib, store_mib = measure_memory(pods)
    proc = make_processor(pods)
    rnd = random.Random(1)
    shared = [arrived(shared_request(pods, rnd)) for _ in range(ROUNDS)]
    node_pods = [p for p in pods if p["spec"]["nodeName"] == "node-1"]  # a node agent's records come from its node's pods
    per_record_bytes = [per_record_request(node_pods, rnd) for _ in range(ROUNDS)]
    per_record = [arrived(d) for d in per_record_bytes]
    scattered = [arrived(per_record_request(pods, rnd)) for _ in range(ROUNDS)]
    shared_rate = rate(lambda b: run_processor(proc, b), shared)
    per_record_rate = rate(lambda b: run_processor(proc, b), per_record)
    scattered_rate = rate(lambda b: run_processor(proc, b), scattered)
    peer_rate = rate(lambda r: protobuf_peer(proc, r), [ExportLogsServiceRequest.FromString(d) for d in per_record_bytes])
    grouping = receiver_grouping(node_pods, rnd)
    # the processor behind each receiver layout: one node resource (regrouped per record), or one resource per container
    flat_rate = rate(lambda b: run_processor(proc, b), [grouping["flat"].copy() for _ in range(ROUNDS)])
    grouped_rate = rate(lambda b: run_processor(proc, b), [grouping["grouped"].copy() for _ in range(ROUNDS)])
    flat_total = grouping["flat_us"] + 1e6 / flat_rate
    grouped_total = grouping["grouped_us"] + 1e6 / grouped_rate
    result = {
        "bench": "k8sattributes",
        "pods": PODS,
        "cache_mib": round(cache_mib + store_mib, 1),
        "pod_cache_mib": cache_mib,
        "watch_store_mib": store_mib,
        "cache_goal_mib": 50,
        "shared_records_per_s": round(shared_rate),
        "shared_goal": 200_000,
        "per_record_records_per_s": round(per_record_rate),
        "per_record_goal": 100_000,
        "per_record_pods_in_batch": len(node_pods),
        "per_record_all_pods_records_per_s": round(scattered_rate),
        "peer_protobuf_records_per_s": round(peer_rate),
        "ratio_vs_protobuf": round(per_record_rate / peer_rate, 2),
        "ebpf_layout_us_per_record": {
            "receiver_flat": round(grouping["flat_us"], 3),
            "processor_regroups": round(1e6 / flat_rate, 3),
            "flat_total": round(flat_total, 3),
            "receiver_grouped": round(grouping["grouped_us"], 3),
            "processor_resource_path": round(1e6 / grouped_rate, 3),
            "grouped_total": round(grouped_total, 3),
            "grouped_vs_flat": round(grouped_total / flat_total, 3),
        },
        "batch": BATCH,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
