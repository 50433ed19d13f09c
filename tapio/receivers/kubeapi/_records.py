"""Kubernetes object changes → log records: what correlation needs, as attributes. Pure: no I/O, no clock.

Invariants:
- Every record names its object (``k8s.object.kind``, ``.name``, ``.uid``,
  ``k8s.namespace.name``) and the change (``tapio.kubeapi.change``: added,
  modified, deleted; ``tapio.kubeapi.listed`` when a list, not the watch,
  found it). Pod, container and event records also carry ``k8s.pod.uid``
  and ``k8s.pod.name`` of the pod concerned, so k8sattributes and correlate
  can join them with the pod's other records.
- A pod change gives one pod record, plus one container record per
  container whose state, reason, restart count or container id changed
  since the pod was last seen (every container the first time, when
  emitted at all); a node change gives a record only when its conditions
  or schedulability changed; events are emitted when new or when their
  count grew, never twice for the same resourceVersion.
- Severity: WARN for a Warning event, a container terminated other than
  Completed / exit 0, a container waiting for a failing reason
  (CrashLoopBackOff, ImagePullBackOff …), a pod Failed, a node not Ready;
  INFO otherwise.
- The trackers are bounded by the objects watched: what they remember of an
  object is dropped with its deletion.
"""

from __future__ import annotations

import datetime
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

SEV_INFO, SEV_WARN = 9, 13
#: waiting reasons that mean the container cannot start (kubelet's)
FAILING_WAITING = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "CreateContainerError", "InvalidImageName", "RunContainerError", "PreStartHookError", "PostStartHookError"}
)
#: events remembered for de-duplication across re-lists
EVENT_MEMORY = 16384

_OWNER_ATTRIBUTES = {
    "ReplicaSet": "k8s.replicaset.name",
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
}
_CONTAINER_REPEATS = frozenset(
    {"k8s.object.kind", "k8s.object.name", "k8s.object.uid", "tapio.kubeapi.change", "tapio.kubeapi.listed", "k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.node.name"}
)
_KIND = {
    "pods": "Pod",
    "nodes": "Node",
    "events": "Event",
    "namespaces": "Namespace",
    "replicasets": "ReplicaSet",
    "deployments": "Deployment",
    "statefulsets": "StatefulSet",
    "daemonsets": "DaemonSet",
    "jobs": "Job",
    "cronjobs": "CronJob",
}


@dataclass(slots=True)
class Record:
    time_unix_nano: int
    severity: int
    body: str
    event_name: str
    attributes: list[tuple[str, Any]]


def parse_time(text: Any) -> int:
    """An RFC 3339 time (``2024-05-01T10:00:00Z``, with or without fractions) as unix ns; 0 when absent or malformed."""
    if not isinstance(text, str) or not text:
        return 0
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def event_time(obj: dict) -> int:
    """When an Event last happened (series, lastTimestamp, eventTime, firstTimestamp, creation), as unix ns; 0 if none is set."""
    series = obj.get("series") or {}
    return (
        parse_time(series.get("lastObservedTime"))
        or parse_time(obj.get("lastTimestamp"))
        or parse_time(obj.get("eventTime"))
        or parse_time(obj.get("firstTimestamp"))
        or parse_time((obj.get("metadata") or {}).get("creationTimestamp"))
    )


def _identity(kind: str, obj: dict, change: str, listed: bool) -> list[tuple[str, Any]]:
    meta = obj.get("metadata") or {}
    out: list[tuple[str, Any]] = [
        ("k8s.object.kind", kind),
        ("k8s.object.name", str(meta.get("name") or "")),
        ("k8s.object.uid", str(meta.get("uid") or "")),
        ("k8s.object.resource_version", str(meta.get("resourceVersion") or "")),
        ("tapio.kubeapi.change", change.lower()),
    ]
    if meta.get("namespace"):
        out.append(("k8s.namespace.name", str(meta["namespace"])))
    if listed:
        out.append(("tapio.kubeapi.listed", True))
    return out


def _body(obj: dict, include: bool, summary: str) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True) if include else summary


def _controller(meta: dict) -> tuple[str, str] | None:
    for ref in meta.get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", ""))
    return None


def _state(cs: dict) -> tuple[str, str, int | None, dict]:
    """(state, reason, exit code, the state's fields) of a containerStatus."""
    state = cs.get("state") or {}
    for name in ("terminated", "waiting", "running"):
        detail = state.get(name)
        if isinstance(detail, dict):
            code = detail.get("exitCode") if name == "terminated" else None
            return name, str(detail.get("reason") or ""), int(code) if isinstance(code, int) else None, detail
    return "unknown", "", None, {}


class Translator:
    """Turns the changes of one process's watches into records, remembering what it must to report only changes."""

    def __init__(self, *, include_object: bool = True) -> None:
        self._include = include_object
        #: pod uid -> container name -> (state, reason, restart count, container id)
        self._containers: dict[str, dict[str, tuple]] = {}
        #: node name -> signature of its conditions
        self._nodes: dict[str, tuple] = {}
        #: event uid -> resourceVersion last emitted
        self._events: OrderedDict[str, str] = OrderedDict()

    def translate(self, resource: str, change: str, obj: dict, *, listed: bool = False, emit: bool = True) -> list[Record]:
        """Records for one change (none when ``emit`` is false: only remember the state, e.g. for an initial list)."""
        if resource == "pods":
            records = self._pod(change, obj, listed)
        elif resource == "nodes":
            records = self._node(change, obj, listed)
        elif resource == "events":
            records = self._event(change, obj, listed)
        else:
            records = [self._workload(resource, change, obj, listed)]
        return records if emit else []

    # -- pods

    def _pod(self, change: str, obj: dict, listed: bool) -> list[Record]:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        uid = str(meta.get("uid") or "")
        name = str(meta.get("name") or "")
        ts = parse_time(meta.get("deletionTimestamp")) if change == "DELETED" else 0
        attrs = _identity("Pod", obj, change, listed) + [("k8s.pod.name", name), ("k8s.pod.uid", uid)]
        if spec.get("nodeName"):
            attrs.append(("k8s.node.name", str(spec["nodeName"])))
        phase = str(status.get("phase") or "")
        if phase:
            attrs.append(("k8s.pod.status.phase", phase))
        if status.get("reason"):
            attrs.append(("k8s.pod.status.reason", str(status["reason"])))
        if status.get("podIP"):
            attrs.append(("k8s.pod.ip", str(status["podIP"])))
        conditions = [f"{c.get('type')}={c.get('status')}" for c in status.get("conditions") or [] if isinstance(c, dict)]
        if conditions:
            attrs.append(("tapio.kubeapi.pod.conditions", conditions))
        owner = _controller(meta)
        if owner is not None and owner[0] in _OWNER_ATTRIBUTES:
            attrs.append((_OWNER_ATTRIBUTES[owner[0]], owner[1]))
        severity = SEV_WARN if phase == "Failed" else SEV_INFO
        summary = f"pod {meta.get('namespace', '')}/{name} {change.lower()}: {phase or 'no phase'}"
        records = [Record(ts, severity, _body(obj, self._include, summary), "k8s.pod.change", attrs)]
        #: what a container record repeats of its pod's: the object's identity, the change and the pod's names
        pod_attrs = [a for a in attrs if a[0] in _CONTAINER_REPEATS]
        known = self._containers.get(uid, {})
        now: dict[str, tuple] = {}
        for kind, key in (("init", "initContainerStatuses"), ("regular", "containerStatuses"), ("ephemeral", "ephemeralContainerStatuses")):
            for cs in status.get(key) or []:
                if not isinstance(cs, dict):
                    continue
                cname = str(cs.get("name") or "")
                state, reason, code, detail = _state(cs)
                restarts = int(cs.get("restartCount") or 0)
                cid = str(cs.get("containerID") or "").rpartition("://")[2]
                signature = (state, reason, restarts, cid)
                now[cname] = signature
                if known.get(cname) == signature or change == "DELETED":
                    continue
                records.append(self._container(pod_attrs, kind, cname, cs, state, reason, code, detail, restarts, cid, listed))
        if change == "DELETED":
            self._containers.pop(uid, None)
        else:
            self._containers[uid] = now
        return records

    def _container(self, pod_attrs: list, kind: str, cname: str, cs: dict, state: str, reason: str, code: int | None, detail: dict, restarts: int, cid: str, listed: bool) -> Record:
        attrs = list(pod_attrs) + [
            ("k8s.container.name", cname),
            ("tapio.kubeapi.container.type", kind),
            ("k8s.container.status.state", state),
            ("k8s.container.restart_count", restarts),
        ]
        if cid:
            attrs.append(("container.id", cid))
        if cs.get("image"):
            attrs.append(("container.image.name", str(cs["image"])))
        if reason:
            attrs.append(("k8s.container.status.reason", reason))
        if code is not None:
            attrs.append(("tapio.kubeapi.container.exit_code", code))
        if state == "terminated" and isinstance(detail.get("signal"), int):
            attrs.append(("tapio.kubeapi.container.signal", detail["signal"]))
        last = (cs.get("lastState") or {}).get("terminated")
        if isinstance(last, dict):
            if last.get("reason"):
                attrs.append(("k8s.container.status.last_terminated_reason", str(last["reason"])))
            if isinstance(last.get("exitCode"), int):
                attrs.append(("tapio.kubeapi.container.last_exit_code", last["exitCode"]))
        failed = (state == "terminated" and (reason not in ("Completed", "") or (code or 0) != 0)) or (state == "waiting" and reason in FAILING_WAITING)
        ts = parse_time(detail.get("finishedAt") if state == "terminated" else detail.get("startedAt"))
        message = str(detail.get("message") or "")
        body = f"container {cname} {state}" + (f": {reason}" if reason else "") + (f" (exit code {code})" if code is not None else "") + (f": {message}" if message else "")
        return Record(ts, SEV_WARN if failed else SEV_INFO, body, "k8s.container.status", attrs)

    # -- nodes

    def _node(self, change: str, obj: dict, listed: bool) -> list[Record]:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        name = str(meta.get("name") or "")
        conditions = {str(c.get("type")): (str(c.get("status")), str(c.get("reason") or "")) for c in status.get("conditions") or [] if isinstance(c, dict)}
        signature = (tuple(sorted(conditions.items())), bool(spec.get("unschedulable")))
        if change == "DELETED":
            self._nodes.pop(name, None)
        elif self._nodes.get(name) == signature and change == "MODIFIED":
            return []  # a heartbeat: nothing a user acts on changed
        else:
            self._nodes[name] = signature
        ready, ready_reason = conditions.get("Ready", ("Unknown", ""))
        attrs = _identity("Node", obj, change, listed) + [
            ("k8s.node.name", name),
            ("k8s.node.uid", str(meta.get("uid") or "")),
            ("k8s.node.condition.ready", ready),
            ("tapio.kubeapi.node.conditions", [f"{t}={s}" for t, (s, _) in sorted(conditions.items())]),
            ("tapio.kubeapi.node.unschedulable", bool(spec.get("unschedulable"))),
        ]
        if ready_reason:
            attrs.append(("tapio.kubeapi.node.ready_reason", ready_reason))
        summary = f"node {name} {change.lower()}: Ready={ready}"
        severity = SEV_WARN if ready != "True" and change != "DELETED" else SEV_INFO
        return [Record(0, severity, _body(obj, self._include, summary), "k8s.node.change", attrs)]

    # -- events

    def _event(self, change: str, obj: dict, listed: bool) -> list[Record]:
        if change == "DELETED":
            return []  # an event expiring says nothing
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        rv = str(meta.get("resourceVersion") or "")
        if uid and self._events.get(uid) == rv:
            return []
        if uid:
            self._events[uid] = rv
            self._events.move_to_end(uid)
            while len(self._events) > EVENT_MEMORY:
                self._events.popitem(last=False)
        involved = obj.get("involvedObject") or obj.get("regarding") or {}
        series = obj.get("series") or {}
        ts = event_time(obj)
        kind = str(involved.get("kind") or "")
        attrs: list[tuple[str, Any]] = [
            ("k8s.event.name", str(meta.get("name") or "")),
            ("k8s.event.uid", uid),
            ("k8s.event.reason", str(obj.get("reason") or "")),
            ("k8s.event.type", str(obj.get("type") or "")),
            ("k8s.event.count", int(obj.get("count") or series.get("count") or 1)),
            ("k8s.object.kind", kind),
            ("k8s.object.name", str(involved.get("name") or "")),
            ("k8s.object.uid", str(involved.get("uid") or "")),
            ("tapio.kubeapi.change", change.lower()),
        ]
        if involved.get("namespace") or meta.get("namespace"):
            attrs.append(("k8s.namespace.name", str(involved.get("namespace") or meta.get("namespace"))))
        if involved.get("fieldPath"):
            attrs.append(("k8s.object.fieldpath", str(involved["fieldPath"])))
        if kind == "Pod":
            attrs += [("k8s.pod.name", str(involved.get("name") or "")), ("k8s.pod.uid", str(involved.get("uid") or ""))]
        elif kind == "Node":
            attrs.append(("k8s.node.name", str(involved.get("name") or "")))
        source = obj.get("source") or {}
        component = str(source.get("component") or obj.get("reportingComponent") or obj.get("reportingController") or "")
        if component:
            attrs.append(("k8s.event.source.component", component))
        host = str(source.get("host") or obj.get("reportingInstance") or "")
        if host:
            attrs.append(("k8s.event.source.host", host))
        if listed:
            attrs.append(("tapio.kubeapi.listed", True))
        severity = SEV_WARN if obj.get("type") == "Warning" else SEV_INFO
        return [Record(ts, severity, str(obj.get("message") or obj.get("note") or ""), "k8s.event", attrs)]

    # -- everything else

    def _workload(self, resource: str, change: str, obj: dict, listed: bool) -> Record:
        kind = _KIND.get(resource, resource)
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        attrs = _identity(kind, obj, change, listed)
        name_attr = _OWNER_ATTRIBUTES.get(kind)
        if name_attr:
            attrs.append((name_attr, str(meta.get("name") or "")))
        for key in ("replicas", "readyReplicas", "availableReplicas", "updatedReplicas", "unavailableReplicas", "active", "succeeded", "failed"):
            if isinstance(status.get(key), int):
                attrs.append((f"tapio.kubeapi.status.{key}", status[key]))
        if isinstance(meta.get("generation"), int):
            attrs.append(("tapio.kubeapi.generation", meta["generation"]))
        if isinstance(status.get("observedGeneration"), int):
            attrs.append(("tapio.kubeapi.observed_generation", status["observedGeneration"]))
        conditions = [f"{c.get('type')}={c.get('status')}" for c in status.get("conditions") or [] if isinstance(c, dict)]
        if conditions:
            attrs.append(("tapio.kubeapi.conditions", conditions))
        failing = any(c.endswith("=False") and c.startswith(("Available=", "Ready=")) for c in conditions) or any(c == "Failed=True" for c in conditions)
        summary = f"{kind.lower()} {meta.get('namespace', '')}/{meta.get('name', '')} {change.lower()}"
        return Record(0, SEV_WARN if failing else SEV_INFO, _body(obj, self._include, summary), f"k8s.{kind.lower()}.change", attrs)
