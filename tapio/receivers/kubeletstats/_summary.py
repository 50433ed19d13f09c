"""The kubelet's /stats/summary (stats/v1alpha1) and /pods documents → OTLP metrics. Pure: no I/O, no clock.

Invariants:
- `parse_summary` and `parse_pod_specs` accept any bytes: what is not JSON
  of the documented shape raises `SummaryError`; inside a valid document, a
  field of the wrong type or missing is left out (counted in
  `Build.skipped`), never guessed and never a crash.
- Metric names, units, types and attributes are those of the OpenTelemetry
  Collector's kubeletstats receiver; one ResourceMetrics per node, pod,
  container and volume, as the Collector emits them.
- Cumulative sums (``*.cpu.time``, ``*.network.io``, ``*.network.errors``,
  ``*.uptime``) start at the entity's ``startTime``; every data point's time
  is the time of the stats block it came from.
- Limit and request utilisation is the working set (memory) or the usage
  (CPU) divided by the limit or request of the pod spec, only where the spec
  sets one; a pod's limit is the sum of its containers' limits, and only when
  every container sets one (otherwise the pod is not limited).
"""

from __future__ import annotations

import calendar
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, NumberDataPoint, ResourceMetrics

GROUPS = ("node", "pod", "container", "volume")
CUMULATIVE = 2
SCOPE_NAME = "tapio.kubeletstats"
SCOPE_VERSION = "0.1.0"


class SummaryError(ValueError):
    """The document is not a kubelet summary (or pod list); ``reason`` is a short label for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _load(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SummaryError("not_json", f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SummaryError("not_an_object", f"{what} is a JSON {type(doc).__name__}, not an object")
    return doc


def parse_summary(data: bytes) -> dict:
    """The summary document, checked to have a ``node`` object and a ``pods`` list (empty when absent)."""
    doc = _load(data, "the summary")
    if not isinstance(doc.get("node"), dict):
        raise SummaryError("no_node", "the summary has no node object")
    pods = doc.get("pods")
    if pods is None:
        doc["pods"] = []
    elif not isinstance(pods, list):
        raise SummaryError("bad_pods", "the summary's pods is not a list")
    return doc


# --- quantities and pod specs


_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE]([+-]?\d+))?$")
_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}


def parse_quantity(text: Any) -> float | None:
    """A Kubernetes resource quantity (``128Mi``, ``500m``, ``1e3``, ``2``) as a number, or None when it is not one."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        return None
    m = _QUANTITY.match(text.strip())
    if m is None:
        return None
    number = float(m.group(1))
    if m.group(2):
        return number * _SUFFIX[m.group(2)]
    if m.group(3):
        try:
            return number * 10 ** int(m.group(3))
        except OverflowError:
            return None
    return number


@dataclass(frozen=True, slots=True)
class Resources:
    """Limits and requests of one container (or pod): memory in bytes, CPU in cores; None where unset."""

    memory_limit: float | None = None
    memory_request: float | None = None
    cpu_limit: float | None = None
    cpu_request: float | None = None


@dataclass
class PodSpecs:
    """What the pod specs say, by pod uid: each container's resources, the pod's, and each volume's type."""

    containers: dict[tuple[str, str], Resources] = field(default_factory=dict)
    pods: dict[str, Resources] = field(default_factory=dict)
    volumes: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)


_VOLUME_TYPES = ("persistentVolumeClaim", "emptyDir", "configMap", "secret", "hostPath", "projected", "downwardAPI", "nfs", "csi", "ephemeral")


def _positive(q: float | None) -> float | None:
    return q if q is not None and q > 0 else None


def parse_pod_specs(data: bytes) -> PodSpecs:
    """The kubelet's /pods document (a PodList) → `PodSpecs`; pods without a uid are left out."""
    doc = _load(data, "the pod list")
    items = doc.get("items")
    if not isinstance(items, list):
        raise SummaryError("bad_pod_list", "the pod list has no items list")
    out = PodSpecs()
    for pod in items:
        if not isinstance(pod, dict):
            continue
        meta, spec = pod.get("metadata"), pod.get("spec")
        if not isinstance(meta, dict) or not isinstance(spec, dict) or not isinstance(meta.get("uid"), str):
            continue
        uid = meta["uid"]
        totals: dict[str, float | None] = {"memory_limit": 0.0, "memory_request": 0.0, "cpu_limit": 0.0, "cpu_request": 0.0}
        containers = spec.get("containers")
        for c in containers if isinstance(containers, list) else []:
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                continue
            res = c.get("resources") if isinstance(c.get("resources"), dict) else {}
            limits = res.get("limits") if isinstance(res.get("limits"), dict) else {}
            requests = res.get("requests") if isinstance(res.get("requests"), dict) else {}
            r = Resources(
                memory_limit=_positive(parse_quantity(limits.get("memory"))),
                memory_request=_positive(parse_quantity(requests.get("memory"))),
                cpu_limit=_positive(parse_quantity(limits.get("cpu"))),
                cpu_request=_positive(parse_quantity(requests.get("cpu"))),
            )
            out.containers[(uid, c["name"])] = r
            for key in totals:
                value = getattr(r, key)
                totals[key] = None if value is None or totals[key] is None else totals[key] + value
        if containers:
            out.pods[uid] = Resources(**{k: v or None for k, v in totals.items()})
        volumes = spec.get("volumes")
        for v in volumes if isinstance(volumes, list) else []:
            if isinstance(v, dict) and isinstance(v.get("name"), str):
                kind = next((t for t in _VOLUME_TYPES if t in v), "")
                claim = v.get("persistentVolumeClaim")
                claim_name = claim.get("claimName", "") if isinstance(claim, dict) else ""
                out.volumes[(uid, v["name"])] = (kind, claim_name if isinstance(claim_name, str) else "")
    return out


# --- time

_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$")


def parse_time(text: Any) -> int:
    """An RFC 3339 time (as the kubelet writes them, to the nanosecond) in unix ns; 0 when it is not one."""
    if not isinstance(text, str):
        return 0
    found = _TIMES.get(text)
    if found is None:
        if len(_TIMES) >= TIME_CACHE_SIZE:
            _TIMES.clear()
        found = _TIMES[text] = _parse_time(text)
    return found


#: a summary repeats its few sample times in every block: each is parsed once (bounded; emptied when full)
_TIMES: dict[str, int] = {}
TIME_CACHE_SIZE = 4096


def _parse_time(text: str) -> int:
    m = _TIME.match(text)
    if m is None:
        return 0
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return 0
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return 0
    zone = m.group(8)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = int((m.group(7) or "0").ljust(9, "0"))
    ns = seconds * 1_000_000_000 + fraction
    return ns if 0 < ns < 1 << 63 else 0


# --- building metrics


_INT64 = 1 << 63


def _number(value: Any) -> int | float | None:
    """A finite JSON number within int64, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if -_INT64 < value < _INT64 else None


class Build:
    """Collects the ResourceMetrics of one scrape (see `metrics_request`)."""

    def __init__(self, now_ns: int) -> None:
        self.request = ExportMetricsServiceRequest()
        self.now = now_ns
        self.points = 0
        #: values left out because they were missing or of the wrong type
        self.skipped = 0
        self._rm: ResourceMetrics | None = None
        self._metrics: Any = None

    def resource(self, attributes: Iterable[tuple[str, str]]) -> None:
        rm = self.request.resource_metrics.add()
        rm.resource.attributes.extend(KeyValue(key=k, value={"string_value": v}) for k, v in attributes)
        sm = rm.scope_metrics.add()
        sm.scope.name, sm.scope.version = SCOPE_NAME, SCOPE_VERSION
        self._metrics = sm.metrics

    def _point(self, name: str, unit: str, value: Any, time_ns: int, *, as_int: bool, start_ns: int = 0,
               attributes: tuple[tuple[str, str], ...] = (), cumulative: bool = False, description: str = "") -> None:
        value = _number(value)
        if value is None:
            self.skipped += 1
            return
        m: Metric = self._metrics.add(name=name, unit=unit, description=description)
        if cumulative:
            m.sum.aggregation_temporality = CUMULATIVE
            m.sum.is_monotonic = True
            p: NumberDataPoint = m.sum.data_points.add()
        else:
            p = m.gauge.data_points.add()
        p.time_unix_nano = time_ns or self.now
        if start_ns and cumulative:
            p.start_time_unix_nano = start_ns
        if as_int:
            p.as_int = int(value)
        else:
            p.as_double = float(value)
        if attributes:
            p.attributes.extend(KeyValue(key=k, value={"string_value": v}) for k, v in attributes)
        self.points += 1

    def gauge(self, name: str, unit: str, value: Any, time_ns: int, *, as_int: bool = True, description: str = "") -> None:
        self._point(name, unit, value, time_ns, as_int=as_int, description=description)

    def sum(self, name: str, unit: str, value: Any, time_ns: int, start_ns: int, *, as_int: bool = True,
            attributes: tuple[tuple[str, str], ...] = (), description: str = "") -> None:
        self._point(name, unit, value, time_ns, as_int=as_int, start_ns=start_ns, attributes=attributes, cumulative=True, description=description)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _cpu(b: Build, prefix: str, cpu: dict, start: int) -> float | None:
    t = parse_time(cpu.get("time"))
    nano = _number(cpu.get("usageNanoCores"))
    if "usageNanoCores" in cpu:
        b.gauge(f"{prefix}.cpu.usage", "{cpu}", nano / 1e9 if nano is not None else None, t, as_int=False,
                description="Total CPU usage (sum of all cores) averaged over the sample window.")
    if "usageCoreNanoSeconds" in cpu:
        ns = _number(cpu.get("usageCoreNanoSeconds"))
        b.sum(f"{prefix}.cpu.time", "s", ns / 1e9 if ns is not None else None, t, start, as_int=False, description="Total cumulative CPU time (sum of all cores).")
    return nano / 1e9 if nano is not None else None


_MEMORY = (
    ("availableBytes", "available", "By"), ("usageBytes", "usage", "By"), ("rssBytes", "rss", "By"),
    ("workingSetBytes", "working_set", "By"), ("pageFaults", "page_faults", "1"), ("majorPageFaults", "major_page_faults", "1"),
)
_FS = (("availableBytes", "available"), ("capacityBytes", "capacity"), ("usedBytes", "usage"))


def _memory(b: Build, prefix: str, memory: dict) -> float | None:
    t = parse_time(memory.get("time"))
    for key, name, unit in _MEMORY:
        if key in memory:
            b.gauge(f"{prefix}.memory.{name}", unit, memory[key], t)
    ws = _number(memory.get("workingSetBytes"))
    return float(ws) if ws is not None else None


def _filesystem(b: Build, prefix: str, fs: dict) -> None:
    t = parse_time(fs.get("time"))
    for key, name in _FS:
        if key in fs:
            b.gauge(f"{prefix}.filesystem.{name}", "By", fs[key], t)


def _network(b: Build, prefix: str, net: dict, start: int) -> None:
    t = parse_time(net.get("time"))
    interfaces = net.get("interfaces")
    if not isinstance(interfaces, list) or not interfaces:
        interfaces = [net] if "name" in net else []
    for iface, name in _named(b, interfaces):
        for key, metric, direction in (("rxBytes", "io", "receive"), ("txBytes", "io", "transmit"), ("rxErrors", "errors", "receive"), ("txErrors", "errors", "transmit")):
            if key in iface:
                b.sum(f"{prefix}.network.{metric}", "By" if metric == "io" else "1", iface[key], t, start,
                      attributes=(("interface", name), ("direction", direction)))


def _uptime(b: Build, prefix: str, start: int) -> None:
    if start and b.now > start:
        b.sum(f"{prefix}.uptime", "s", (b.now - start) // 1_000_000_000, b.now, start, description="The time since it started.")


def _utilization(b: Build, prefix: str, resources: Resources | None, working_set: float | None, cores: float | None, t: int) -> None:
    if resources is None:
        return
    for value, bound, name in (
        (working_set, resources.memory_limit, "memory_limit_utilization"),
        (working_set, resources.memory_request, "memory_request_utilization"),
        (cores, resources.cpu_limit, "cpu_limit_utilization"),
        (cores, resources.cpu_request, "cpu_request_utilization"),
    ):
        if value is not None and bound:
            b.gauge(f"{prefix}.{name}", "1", value / bound, t, as_int=False)


def _named(b: Build, items: Any) -> Iterable[tuple[dict, str]]:
    """The objects of a list that have a string ``name``, with it; the others are counted as skipped."""
    for item in items if isinstance(items, list) else []:
        item = _dict(item)
        name = item.get("name")
        if isinstance(name, str):
            yield item, name
        else:
            b.skipped += 1


def metrics_request(summary: dict, *, groups: Iterable[str], now_ns: int, specs: PodSpecs | None = None) -> Build:
    """The metrics of one summary (from `parse_summary`) for the metric ``groups`` (`GROUPS`)."""
    groups = set(groups)
    b = Build(now_ns)
    node = summary["node"]
    node_name = node.get("nodeName") if isinstance(node.get("nodeName"), str) else ""
    if "node" in groups:
        start = parse_time(node.get("startTime"))
        b.resource([("k8s.node.name", node_name)])
        _cpu(b, "k8s.node", _dict(node.get("cpu")), start)
        _memory(b, "k8s.node", _dict(node.get("memory")))
        _filesystem(b, "k8s.node", _dict(node.get("fs")))
        _network(b, "k8s.node", _dict(node.get("network")), start)
        _uptime(b, "k8s.node", start)
    for pod in summary["pods"]:
        pod = _dict(pod)
        ref = _dict(pod.get("podRef"))
        uid, name, namespace = (ref.get(k) for k in ("uid", "name", "namespace"))
        if not all(isinstance(v, str) for v in (uid, name, namespace)):
            b.skipped += 1
            continue
        pod_attrs = [("k8s.pod.uid", uid), ("k8s.pod.name", name), ("k8s.namespace.name", namespace), ("k8s.node.name", node_name)]
        start = parse_time(pod.get("startTime"))
        if "pod" in groups:
            b.resource(pod_attrs)
            cpu, memory = _dict(pod.get("cpu")), _dict(pod.get("memory"))
            cores = _cpu(b, "k8s.pod", cpu, start)
            ws = _memory(b, "k8s.pod", memory)
            _filesystem(b, "k8s.pod", _dict(pod.get("ephemeral-storage")))
            _network(b, "k8s.pod", _dict(pod.get("network")), start)
            _uptime(b, "k8s.pod", start)
            if specs is not None:
                _utilization(b, "k8s.pod", specs.pods.get(uid), ws, cores, parse_time(memory.get("time")))
        if "container" in groups:
            for c, cname in _named(b, pod.get("containers")):
                cstart = parse_time(c.get("startTime"))
                b.resource(pod_attrs + [("k8s.container.name", cname)])
                memory = _dict(c.get("memory"))
                cores = _cpu(b, "container", _dict(c.get("cpu")), cstart)
                ws = _memory(b, "container", memory)
                _filesystem(b, "container", _dict(c.get("rootfs")))
                _uptime(b, "container", cstart)
                if specs is not None:
                    _utilization(b, "k8s.container", specs.containers.get((uid, cname)), ws, cores, parse_time(memory.get("time")))
        if "volume" in groups:
            for v, vname in _named(b, pod.get("volume")):
                kind, claim = specs.volumes.get((uid, vname), ("", "")) if specs is not None else ("", "")
                pvc = _dict(v.get("pvcRef"))
                if isinstance(pvc.get("name"), str):
                    kind, claim = "persistentVolumeClaim", pvc["name"]
                attrs = pod_attrs + [("k8s.volume.name", vname)]
                if kind:
                    attrs.append(("k8s.volume.type", kind))
                if claim:
                    attrs.append(("k8s.persistentvolumeclaim.name", claim))
                b.resource(attrs)
                t = parse_time(v.get("time"))
                for key, metric, unit in (("availableBytes", "available", "By"), ("capacityBytes", "capacity", "By"),
                                          ("inodes", "inodes", "1"), ("inodesFree", "inodes.free", "1"), ("inodesUsed", "inodes.used", "1")):
                    if key in v:
                        b.gauge(f"k8s.volume.{metric}", unit, v[key], t)
    return b
