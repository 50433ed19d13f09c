"""What the runtime says → what to report: the lifecycle tracker and the log records. Pure: no I/O, no clock.

Invariants:
- A sandbox or container goes through the stages created < started <
  stopped < deleted; each is reported at most once per id, and never after
  a later one (`Tracker` keeps the last stage reported per id). An event or
  list entry that does not move an id forward is stale and skipped.
- An event older than the last list (by the runtime's clock) about an id
  that list did not show is stale: the id was gone by then. (containerd 1.7
  queues events while nobody subscribes and hands them to the next
  subscriber, so a new stream can start with old news.)
- A stage an id passed without being seen (its event went to another
  subscriber of containerd 1.7's stream, or happened between two lists) is
  reported before the later one that proves it, marked inferred, when the
  runtime's record of that later observation says when it happened
  (`implied`): ``created`` from ``created_at``, a container's ``started``
  from its status's ``started_at``. A sandbox's ``started`` and any
  ``stopped`` are never inferred: no record the runtime keeps dates them (a
  removed container's exit status is gone with it). The first list after
  start without storage is a snapshot: each id in its current stage only.
- Deleted ids are forgotten, but the most recent `TOMBSTONES` are
  remembered, so an event that arrives after a list already reported the
  deletion does not bring the id back.
- `Tracker.relist` turns a full list of sandboxes and containers into the
  observations of what moved since the last report: ids listed in a later
  stage than known, and known ids no longer listed (deleted). With
  ``silent`` it only learns the listed state (nothing is reported).
- A record's attributes follow the OpenTelemetry semantic conventions
  (container.*, k8s.*); what they do not cover is under ``tapio.cri.*``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from ._proto import api_pb2 as pb

STAGES = ("created", "started", "stopped", "deleted")
RANK = {s: i for i, s in enumerate(STAGES)}
#: deleted ids remembered so late events about them are recognised as stale
TOMBSTONES = 4096
SEV_INFO, SEV_WARN = 9, 13

_EVENT_STAGE = {
    pb.CONTAINER_CREATED_EVENT: "created",
    pb.CONTAINER_STARTED_EVENT: "started",
    pb.CONTAINER_STOPPED_EVENT: "stopped",
    pb.CONTAINER_DELETED_EVENT: "deleted",
}
_CONTAINER_STATE_STAGE = {pb.CONTAINER_CREATED: "created", pb.CONTAINER_RUNNING: "started", pb.CONTAINER_EXITED: "stopped"}
_SANDBOX_STATE_STAGE = {pb.SANDBOX_READY: "started", pb.SANDBOX_NOTREADY: "stopped"}
#: k8s.container.status.state, as the kubelet names a container's state
_K8S_STATE = {"created": "waiting", "started": "running", "stopped": "terminated"}
#: labels the kubelet sets; they become the k8s.* attributes instead of container.label.*
POD_NAME, POD_NAMESPACE, POD_UID, CONTAINER_NAME = (
    "io.kubernetes.pod.name", "io.kubernetes.pod.namespace", "io.kubernetes.pod.uid", "io.kubernetes.container.name",
)

Kind = str  # "container" or "pod_sandbox"


@dataclass(frozen=True, slots=True)
class PodIdentity:
    uid: str
    name: str
    namespace: str


@dataclass(slots=True)
class Observation:
    """One thing to report: an id reached ``stage`` (seen in an event or a list)."""

    kind: Kind
    id: str
    stage: str
    source: str  # "event" or "list"
    #: when it happened (the event's time, or the state's time in the status), 0 if unknown
    time_unix_nano: int
    pod: PodIdentity | None
    #: the container (`pb.Container` or `pb.ContainerStatus`) or sandbox (`pb.PodSandbox` or `pb.PodSandboxStatus`) as last seen
    detail: Any = None
    sandbox_id: str = ""
    #: stages this id passed since the last report without being seen (earliest first)
    skipped: tuple[str, ...] = ()
    #: not seen itself: implied by a later stage (see `implied`)
    inferred: bool = False

    @property
    def key(self) -> str:
        return ("c/" if self.kind == "container" else "s/") + self.id


def _pod_of(sandbox: Any) -> PodIdentity | None:
    meta = sandbox.metadata
    if not (meta.uid or meta.name):
        return None
    return PodIdentity(meta.uid, meta.name, meta.namespace)


@dataclass
class Tracker:
    """The last stage reported per sandbox and container id, and the pods of known sandboxes."""

    #: key ("c/<id>" or "s/<id>") → stage last reported
    stages: dict[str, str] = field(default_factory=dict)
    pods: dict[str, PodIdentity] = field(default_factory=dict)
    #: when the last list was asked for (unix ns), 0 before the first
    listed_at: int = 0
    _deleted: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def _advance(self, key: str, stage: str) -> tuple[str, ...] | None:
        """Move ``key`` to ``stage``: the stages passed over on the way (earliest first), or None when it does not move forward."""
        if key in self._deleted:
            return None
        known = self.stages.get(key)
        if known is not None and RANK[known] >= RANK[stage]:
            return None
        if stage == "deleted":
            self.stages.pop(key, None)
            self._deleted[key] = None
            if len(self._deleted) > TOMBSTONES:
                self._deleted.popitem(last=False)
        else:
            self.stages[key] = stage
        return STAGES[RANK[known] + 1 if known is not None else 0 : RANK[stage]]

    def event(self, ev: pb.ContainerEventResponse) -> Observation | None:
        """The observation an event makes, or None when it is stale (or of an unknown type)."""
        stage = _EVENT_STAGE.get(ev.container_event_type)
        if stage is None:
            return None
        sandbox = ev.pod_sandbox_status
        # A sandbox's own events carry its id as the container id; its DELETED event has an empty status.
        is_sandbox = ev.container_id == sandbox.id or (not sandbox.id and f"s/{ev.container_id}" in self.stages)
        kind = "pod_sandbox" if is_sandbox else "container"
        key = ("s/" if is_sandbox else "c/") + ev.container_id
        pod = _pod_of(sandbox) if sandbox.id else None
        if sandbox.id and pod is not None:
            self.pods[sandbox.id] = pod
        elif is_sandbox:
            pod = self.pods.get(ev.container_id)
        if key not in self.stages and ev.created_at and ev.created_at < self.listed_at:
            return None  # older than the list, which did not show it: gone since
        skipped = self._advance(key, stage)
        if skipped is None:
            return None
        detail: Any = sandbox if is_sandbox else next((c for c in ev.containers_statuses if c.id == ev.container_id), None)
        if is_sandbox and stage == "deleted":
            self.pods.pop(ev.container_id, None)
        return Observation(kind, ev.container_id, stage, "event", ev.created_at, pod, detail, sandbox.id, skipped)

    def relist(
        self, sandboxes: Iterable[Any], containers: Iterable[Any], *, silent: bool = False, snapshot: bool = False, asked_at: int = 0,
    ) -> list[Observation]:
        """What moved since the last report, from a full list of sandboxes (`pb.PodSandbox`) and containers (`pb.Container`).

        ``asked_at`` is when the list was asked for (unix ns). Sandboxes come
        first (a pod is reported before its containers), deletions last.
        With ``snapshot`` nothing is marked skipped (each id in its current
        stage only: what existed at start).
        """
        self.listed_at = max(self.listed_at, asked_at)
        out: list[Observation] = []
        listed: set[str] = set()
        for s in sandboxes:
            pod = _pod_of(s)
            if pod is not None:
                self.pods[s.id] = pod
            listed.add("s/" + s.id)
            stage = _SANDBOX_STATE_STAGE.get(s.state)
            skipped = self._advance("s/" + s.id, stage) if stage is not None else None
            if skipped is not None and not silent:
                when = s.created_at if stage == "started" else 0
                out.append(Observation("pod_sandbox", s.id, stage, "list", when, pod, s, s.id, () if snapshot else skipped))
        for c in containers:
            listed.add("c/" + c.id)
            stage = _CONTAINER_STATE_STAGE.get(c.state)
            skipped = self._advance("c/" + c.id, stage) if stage is not None else None
            if skipped is not None and not silent:
                when = c.created_at if stage == "created" else 0  # started and finished times come with the status
                pod = self.pods.get(c.pod_sandbox_id)
                out.append(Observation("container", c.id, stage, "list", when, pod, c, c.pod_sandbox_id, () if snapshot else skipped))
        gone = [k for k in self.stages if k not in listed]
        for key in sorted(gone, key=lambda k: k.startswith("s/")):  # containers before their sandboxes
            skipped = self._advance(key, "deleted") or ()
            kind, cid = ("pod_sandbox" if key.startswith("s/") else "container"), key[2:]
            pod = self.pods.pop(cid, None) if kind == "pod_sandbox" else None
            if not silent:
                out.append(Observation(kind, cid, "deleted", "list", 0, pod, None, cid if kind == "pod_sandbox" else "", skipped))
        return out

    def forget(self, key: str) -> None:
        """Forget what was reported of ``key`` (for a restore that found it gone)."""
        self.stages.pop(key, None)


def implied(obs: Observation) -> list[Observation]:
    """The stages ``obs`` skipped that its detail dates, earliest first, each marked inferred.

    ``created`` when the detail (a status, or a list entry) has ``created_at``;
    a container's ``started`` when the detail is its `pb.ContainerStatus` with
    ``started_at`` (a container that failed to start has none). Call it once
    the detail is final (for a stopped container, after `ContainerStatus`).
    """
    out = []
    for stage in obs.skipped:
        if stage == "created":
            when = getattr(obs.detail, "created_at", 0)
        elif stage == "started" and obs.kind == "container" and isinstance(obs.detail, pb.ContainerStatus):
            when = obs.detail.started_at
        else:
            when = 0
        if when:
            out.append(Observation(obs.kind, obs.id, stage, obs.source, when, obs.pod, obs.detail, obs.sandbox_id, inferred=True))
    return out


def image_name_tag(image: str) -> tuple[str, str]:
    """``registry:5000/app:1.2@sha256:…`` → (``registry:5000/app``, ``1.2``); an image without a tag has tag ``""``."""
    name = image.split("@", 1)[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, ""


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, list):
        kv = KeyValue(key=key)
        kv.value.array_value.values.extend(AnyValue(string_value=v) for v in value)
        return kv
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _times(detail: Any) -> tuple[int, int, int]:
    """(created, started, finished) in unix ns from a status (0 where the message has no such field)."""
    return (getattr(detail, "created_at", 0), getattr(detail, "started_at", 0), getattr(detail, "finished_at", 0))


def record(obs: Observation, *, observed_unix_nano: int, runtime: tuple[str, str], labels: bool) -> LogRecord:
    """The log record of one observation (for a stopped container, ``obs.detail`` should be its `pb.ContainerStatus`)."""
    attrs: list[tuple[str, Any]] = [("tapio.cri.source", obs.source)]
    if obs.inferred:
        attrs.append(("tapio.cri.inferred", True))
    if runtime[0]:
        attrs.append(("container.runtime.name", runtime[0]))
    if runtime[1]:
        attrs.append(("container.runtime.version", runtime[1]))
    detail = obs.detail
    pod = obs.pod
    if pod is None and detail is not None and POD_UID in detail.labels:
        lab = detail.labels
        pod = PodIdentity(lab[POD_UID], lab.get(POD_NAME, ""), lab.get(POD_NAMESPACE, ""))
    if pod is not None:
        attrs += [("k8s.pod.uid", pod.uid), ("k8s.pod.name", pod.name), ("k8s.namespace.name", pod.namespace)]
    severity = SEV_INFO
    where = f"{pod.namespace}/{pod.name}" if pod is not None else "unknown pod"
    time_ns = obs.time_unix_nano
    if obs.kind == "pod_sandbox":
        attrs.append(("tapio.cri.pod_sandbox.id", obs.id))
        body = f"pod sandbox {where} {obs.stage}"
        if detail is not None:
            ip = getattr(getattr(detail, "network", None), "ip", "")
            if ip:
                attrs.append(("k8s.pod.ip", ip))
            if labels:
                attrs += [(f"k8s.pod.label.{k}", v) for k, v in sorted(detail.labels.items()) if not k.startswith("io.kubernetes.")]
    else:
        attrs.append(("container.id", obs.id))
        if obs.sandbox_id:
            attrs.append(("tapio.cri.pod_sandbox.id", obs.sandbox_id))
        name = ""
        if detail is not None:
            name = detail.metadata.name
            attrs += [
                ("container.name", name),
                ("k8s.container.name", detail.labels.get(CONTAINER_NAME, name)),
                ("k8s.container.restart_count", detail.metadata.attempt),
            ]
            image = detail.image.image or detail.image_ref
            if image:
                image_name, tag = image_name_tag(image)
                attrs.append(("container.image.name", image_name))
                if tag:
                    attrs.append(("container.image.tags", [tag]))
            if detail.image_ref.startswith("sha256:"):
                attrs.append(("container.image.id", detail.image_ref))
            if labels:
                attrs += [(f"container.label.{k}", v) for k, v in sorted(detail.labels.items()) if not k.startswith("io.kubernetes.")]
        if obs.stage in _K8S_STATE:
            attrs.append(("k8s.container.status.state", _K8S_STATE[obs.stage]))
        what = f"container {name or obs.id[:12]} in {where}"
        body = f"{what} {obs.stage}"
        created, started, finished = _times(detail)
        if obs.stage == "started" and started:
            time_ns = time_ns or started
        if obs.stage == "stopped" and isinstance(detail, pb.ContainerStatus):
            time_ns = finished or time_ns
            attrs.append(("tapio.cri.container.exit_code", detail.exit_code))
            if detail.reason:
                attrs.append(("k8s.container.status.reason", detail.reason))
            if detail.message:
                attrs.append(("tapio.cri.container.message", detail.message))
            if started:
                attrs.append(("tapio.cri.container.started_time_unix_nano", started))
            if finished:
                attrs.append(("tapio.cri.container.finished_time_unix_nano", finished))
            reason = f"{detail.reason}, " if detail.reason else ""
            body = f"{what} stopped: {reason}exit code {detail.exit_code}"
            if detail.exit_code != 0 or detail.reason == "OOMKilled":
                severity = SEV_WARN
        time_ns = time_ns or (created if obs.stage == "created" else 0)
    rec = LogRecord(
        time_unix_nano=time_ns,
        observed_time_unix_nano=observed_unix_nano,
        severity_number=severity,
        severity_text="WARN" if severity == SEV_WARN else "INFO",
        event_name=f"tapio.cri.{obs.kind}.{obs.stage}",
    )
    rec.body.string_value = body
    rec.attributes.extend(_kv(k, v) for k, v in attrs)
    return rec
