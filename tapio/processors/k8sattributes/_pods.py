"""The pod cache behind k8sattributes: pods by uid, IP, container id and name; owners; what to add for each.

Invariants:
- Only what the configured attributes need is kept per pod (a few strings,
  the container ids, the labels and annotations the rules extract), never
  the object itself: a pod costs about a kilobyte.
- A deleted pod stays findable by uid, container id and IP until
  ``pod_delete_grace_period`` after its deletion (`sweep` forgets it); a live
  pod that takes over its IP or name replaces it in those indexes at once.
  Index entries are removed only by the pod they point to.
- Owners: a pod's controller (its ownerReference with ``controller: true``)
  is kept by uid, with the number of cached pods that name it. Only
  ReplicaSets and Jobs are looked up (their controllers are the Deployment
  and the CronJob), once each, through ``on_owner_needed``; an owner no
  cached pod names any more is forgotten. Nothing here watches owners.
- The attributes added for (pod, container) are computed once and cached on
  the pod (`Extra`), and recomputed after anything they depend on changed
  (the pod, its owner, its namespace or node labels): `generation` counts
  those changes.
- Pure: no I/O, no clock (the caller passes ``now``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import _wire
from ._config import CONTAINER_METADATA, Config, ExtractRule

intern = sys.intern

#: an owner reference: (kind, name, uid)
OwnerRef = tuple[str, str, str]
#: owner kinds whose own controller is looked up, and the resource to GET them from
LOOKED_UP_KINDS = {"ReplicaSet": "replicasets", "Job": "jobs"}
_OWNER_ATTRIBUTES = {
    "ReplicaSet": ("k8s.replicaset.name", "k8s.replicaset.uid"),
    "Deployment": ("k8s.deployment.name", "k8s.deployment.uid"),
    "StatefulSet": ("k8s.statefulset.name", "k8s.statefulset.uid"),
    "DaemonSet": ("k8s.daemonset.name", "k8s.daemonset.uid"),
    "Job": ("k8s.job.name", "k8s.job.uid"),
    "CronJob": ("k8s.cronjob.name", "k8s.cronjob.uid"),
}
OTEL_ANNOTATION_PREFIX = "resource.opentelemetry.io/"


class Container:
    __slots__ = ("name", "image", "restart_count")

    def __init__(self, name: str, image: str, restart_count: int) -> None:
        self.name = name
        self.image = image
        self.restart_count = restart_count


class Extra:
    """What to add to a resource for one (pod, container): the Resource bytes, and the keys in them.

    Only the bytes are kept per pod (the key sets are shared between pods):
    a resource that has some of the keys already asks `PodCache.without`.
    """

    __slots__ = ("blob", "keys", "generation", "pod", "container_id")

    def __init__(self, blob: bytes, keys: frozenset[str], generation: int, pod: "Pod", container_id: str) -> None:
        self.blob = blob
        self.keys = keys
        self.generation = generation
        self.pod = pod
        self.container_id = container_id


class Pod:
    __slots__ = (
        "uid", "name", "namespace", "node", "ip", "ips", "start_time", "hostname", "host_network",
        "owner", "template_hash", "extracted", "containers", "deleted_at", "extras",
    )

    def __init__(self) -> None:
        self.deleted_at: float | None = None
        self.extras: dict[str, Extra] = {}


@dataclass(slots=True)
class Owner:
    kind: str
    name: str
    uid: str
    namespace: str
    #: the owner's own controller, once looked up
    parent: OwnerRef | None = None
    #: pending (not looked up yet), done, missing (404), failed (gave up)
    state: str = "pending"
    pods: int = 0


def image_name_tag(image: str) -> tuple[str, str]:
    """``registry:5000/app:1.2@sha256:…`` → (``registry:5000/app``, ``1.2``); no tag is ``latest``, as the Collector."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "latest" if "@" not in image else ""


def _controller(meta: dict) -> OwnerRef | None:
    refs = meta.get("ownerReferences") or []
    for ref in refs:
        if isinstance(ref, dict) and ref.get("controller"):
            return (intern(str(ref.get("kind", ""))), str(ref.get("name", "")), str(ref.get("uid", "")))
    return None


def _bare_container_id(text: str) -> str:
    return text.rpartition("://")[2]


def _expand(tag_name: str, match: re.Match) -> str:
    """``$1`` (or ``$$1``, as written in Collector configs) replaced by the regex's group 1, and so on."""
    return re.sub(r"\$\$?(\d+)", lambda g: match.group(int(g.group(1))) or "", tag_name)


class _Rules:
    """Compiled label/annotation extraction rules of one object kind."""

    def __init__(self, labels: list[ExtractRule], annotations: list[ExtractRule], kind: str) -> None:
        self.labels = [(r, re.compile(r.key_regex) if r.key_regex else None) for r in labels if r.from_ == kind]
        self.annotations = [(r, re.compile(r.key_regex) if r.key_regex else None) for r in annotations if r.from_ == kind]
        self.kind = kind

    def __bool__(self) -> bool:
        return bool(self.labels or self.annotations)

    def extract(self, meta: dict) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for what, rules in (("labels", self.labels), ("annotations", self.annotations)):
            values = meta.get(what) or {}
            if not rules or not isinstance(values, dict):
                continue
            for rule, regex in rules:
                if regex is None:
                    if rule.key in values:
                        out.append((intern(rule.tag_name or f"k8s.{self.kind}.{what}.{rule.key}"), str(values[rule.key])))
                    continue
                for key in sorted(values):
                    m = regex.fullmatch(key)
                    if m is None:
                        continue
                    tag = _expand(rule.tag_name, m) if rule.tag_name else f"k8s.{self.kind}.{what}.{key}"
                    out.append((intern(tag), str(values[key])))
        return out


class PodCache:
    """See the module invariants. ``on_owner_needed`` is called with each new owner to look up."""

    def __init__(self, config: Config, on_owner_needed: Callable[[Owner], None] = lambda o: None) -> None:
        self._config = config
        self._metadata = list(dict.fromkeys(config.extract.metadata))
        self._pod_metadata = [m for m in self._metadata if m not in CONTAINER_METADATA]
        self._container_metadata = [m for m in self._metadata if m in CONTAINER_METADATA]
        self._pod_rules = _Rules(config.extract.labels, config.extract.annotations, "pod")
        self.namespace_rules = _Rules(config.extract.labels, config.extract.annotations, "namespace")
        self.node_rules = _Rules(config.extract.labels, config.extract.annotations, "node")
        self._excluded = [re.compile(p.name) for p in config.exclude.pods]
        self._grace = float(config.pod_delete_grace_period)
        self._on_owner_needed = on_owner_needed
        self.by_uid: dict[str, Pod] = {}
        self.by_ip: dict[str, Pod] = {}
        self.by_container: dict[str, Pod] = {}
        self.by_name: dict[tuple[str, str], Pod] = {}
        self.owners: dict[str, Owner] = {}
        #: namespace name -> extracted (tag, value) pairs
        self.namespaces: dict[str, list[tuple[str, str]]] = {}
        #: node name -> (uid, extracted pairs)
        self.nodes: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        self.cluster_uid = ""
        #: IPs of host-network pods (the nodes' own addresses)
        self.host_ips: set[str] = set()
        self.generation = 0
        #: the distinct key sets of `Extra`s (most pods share one)
        self._key_sets: dict[frozenset[str], frozenset[str]] = {}
        self.added = 0
        self.deleted = 0

    @property
    def wants_owners(self) -> bool:
        return any(m.startswith(("k8s.replicaset.", "k8s.deployment.", "k8s.statefulset.", "k8s.daemonset.", "k8s.job.", "k8s.cronjob.")) for m in self._metadata)

    @property
    def wants_nodes(self) -> bool:
        return bool(self.node_rules) or "k8s.node.uid" in self._metadata

    @property
    def wants_namespaces(self) -> bool:
        return bool(self.namespace_rules)

    def __len__(self) -> int:
        return len(self.by_uid)

    # -- changes

    def apply(self, change: str, obj: dict, now: float) -> None:
        """A pod ADDED, MODIFIED or DELETED (as a watch reports it)."""
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if not uid:
            return
        old = self.by_uid.get(uid)
        if change == "DELETED":
            if old is not None and old.deleted_at is None:
                old.deleted_at = now
                self.deleted += 1
            return
        name = str(meta.get("name") or "")
        if any(rx.fullmatch(name) for rx in self._excluded):
            return
        pod = self._parse(obj, meta, uid, name)
        if old is not None:
            self._unindex(old, keep=pod)
        else:
            self.added += 1
        self.by_uid[uid] = pod
        for ip in pod.ips:
            if pod.host_network:
                self.host_ips.add(ip)
            else:
                self.by_ip[ip] = pod
        for cid in pod.containers:
            self.by_container[cid] = pod
        self.by_name[(pod.namespace, pod.name)] = pod
        # hold the new owner before releasing the old: an update of an owner's only pod keeps what was looked up
        if pod.owner is not None:
            self._hold_owner(pod.owner, pod.namespace)
        if old is not None and old.owner is not None:
            self._release_owner(old.owner)

    def _parse(self, obj: dict, meta: dict, uid: str, name: str) -> Pod:
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        pod = Pod()
        pod.uid = uid
        pod.name = name
        pod.namespace = intern(str(meta.get("namespace") or ""))
        pod.node = intern(str(spec.get("nodeName") or ""))
        pod.host_network = bool(spec.get("hostNetwork"))
        ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if isinstance(p, dict) and p.get("ip")]
        if status.get("podIP") and status["podIP"] not in ips:
            ips.insert(0, str(status["podIP"]))
        pod.ips = tuple(ips)
        pod.ip = ips[0] if ips else ""
        pod.start_time = str(status.get("startTime") or "")
        pod.hostname = str(spec.get("hostname") or name)
        pod.owner = _controller(meta)
        labels = meta.get("labels") or {}
        pod.template_hash = str(labels.get("pod-template-hash", "")) if isinstance(labels, dict) else ""
        extracted = self._pod_rules.extract(meta) if self._pod_rules else []
        if self._config.extract.otel_annotations:
            for key, value in (meta.get("annotations") or {}).items():
                if key.startswith(OTEL_ANNOTATION_PREFIX) and len(key) > len(OTEL_ANNOTATION_PREFIX):
                    extracted.append((intern(key[len(OTEL_ANNOTATION_PREFIX) :]), str(value)))
        pod.extracted = extracted
        containers: dict[str, Container] = {}
        images = {c.get("name"): c.get("image", "") for c in spec.get("containers") or [] if isinstance(c, dict)}
        for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or []:
                if not isinstance(cs, dict) or not cs.get("containerID"):
                    continue
                cname = str(cs.get("name") or "")
                containers[_bare_container_id(str(cs["containerID"]))] = Container(
                    intern(cname), intern(str(images.get(cname) or cs.get("image") or "")), int(cs.get("restartCount") or 0)
                )
        pod.containers = containers
        return pod

    def _unindex(self, pod: Pod, keep: Pod | None = None) -> None:
        """Remove the index entries that point to ``pod`` (``keep``'s own keys are overwritten by the caller)."""
        for ip in pod.ips:
            if self.by_ip.get(ip) is pod:
                del self.by_ip[ip]
        for cid in pod.containers:
            if self.by_container.get(cid) is pod:
                del self.by_container[cid]
        key = (pod.namespace, pod.name)
        if self.by_name.get(key) is pod:
            del self.by_name[key]
        if keep is None and self.by_uid.get(pod.uid) is pod:
            del self.by_uid[pod.uid]

    def sweep(self, now: float) -> int:
        """Forget pods deleted more than the grace period ago; returns how many."""
        gone = [p for p in self.by_uid.values() if p.deleted_at is not None and now - p.deleted_at >= self._grace]
        for pod in gone:
            self._unindex(pod)
            if pod.owner is not None:
                self._release_owner(pod.owner)
        return len(gone)

    def replace_all(self, objects: Iterable[dict], now: float) -> None:
        """A snapshot: every pod there is (pods not in it are deleted now, and kept for the grace period)."""
        seen = set()
        for obj in objects:
            uid = str((obj.get("metadata") or {}).get("uid") or "")
            seen.add(uid)
            self.apply("MODIFIED", obj, now)
        for uid, pod in list(self.by_uid.items()):
            if uid not in seen and pod.deleted_at is None:
                pod.deleted_at = now
                self.deleted += 1

    # -- owners

    def _hold_owner(self, ref: OwnerRef, namespace: str) -> None:
        kind, name, uid = ref
        owner = self.owners.get(uid)
        if owner is None:
            owner = self.owners[uid] = Owner(kind, name, uid, namespace)
            needs_lookup = kind in LOOKED_UP_KINDS and self.wants_owners
            if kind == "ReplicaSet" and self._config.extract.deployment_name_from_replicaset:
                needs_lookup = False
            if needs_lookup:
                self._on_owner_needed(owner)
            else:
                owner.state = "done"
        owner.pods += 1

    def _release_owner(self, ref: OwnerRef) -> None:
        owner = self.owners.get(ref[2])
        if owner is not None:
            owner.pods -= 1
            if owner.pods <= 0:
                del self.owners[ref[2]]

    def owner_found(self, uid: str, obj: dict | None, *, failed: bool = False) -> None:
        """The lookup of owner ``uid`` returned ``obj`` (None: it does not exist, or ``failed``)."""
        owner = self.owners.get(uid)
        if owner is None:
            return
        if obj is None:
            owner.state = "failed" if failed else "missing"
        else:
            owner.parent = _controller(obj.get("metadata") or {})
            owner.state = "done"
        self.generation += 1

    @property
    def pending_owners(self) -> int:
        return sum(1 for o in self.owners.values() if o.state == "pending")

    # -- namespaces and nodes

    def apply_namespace(self, change: str, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        if change == "DELETED":
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = self.namespace_rules.extract(meta)
        self.generation += 1

    def apply_node(self, change: str, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        if change == "DELETED":
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = (str(meta.get("uid") or ""), self.node_rules.extract(meta))
        self.generation += 1

    # -- lookups

    def find(self, attribute: str, value: str) -> Pod | None:
        """The pod an association attribute's value names (``connection`` is an IP too)."""
        if attribute == "k8s.pod.uid":
            return self.by_uid.get(value)
        if attribute == "container.id":
            return self.by_container.get(_bare_container_id(value))
        if attribute in ("k8s.pod.ip", "connection"):
            return self.by_ip.get(value)
        return None

    def extra(self, pod: Pod, container_id: str = "") -> Extra:
        """The attributes to add for ``pod`` (and its container, when known), cached."""
        found = pod.extras.get(container_id)
        if found is not None and found.generation == self.generation:
            return found
        pairs = self._pairs(pod, container_id)
        keys = frozenset(k for k, _ in pairs)
        keys = self._key_sets.setdefault(keys, keys)
        found = pod.extras[container_id] = Extra(_wire.resource_attributes(pairs), keys, self.generation, pod, container_id)
        return found

    def without(self, extra: Extra, present: Iterable[str]) -> bytes:
        """``extra``'s Resource bytes less the attributes whose keys are in ``present`` (a resource's own values win)."""
        present = set(present)
        if not present & extra.keys:
            return extra.blob
        return _wire.resource_attributes([(k, v) for k, v in self._pairs(extra.pod, extra.container_id) if k not in present])

    def invalidate(self, pod: Pod) -> None:
        pod.extras.clear()

    def _pairs(self, pod: Pod, container_id: str) -> list[tuple[str, Any]]:
        chain: list[OwnerRef] = []
        if pod.owner is not None:
            chain.append(pod.owner)
            owner = self.owners.get(pod.owner[2])
            if owner is not None and owner.parent is not None:
                chain.append(owner.parent)
            elif pod.owner[0] == "ReplicaSet" and self._config.extract.deployment_name_from_replicaset and pod.template_hash:
                suffix = "-" + pod.template_hash
                if pod.owner[1].endswith(suffix):
                    chain.append(("Deployment", pod.owner[1][: -len(suffix)], ""))
        owned: dict[str, str] = {}
        for kind, name, uid in chain:
            names = _OWNER_ATTRIBUTES.get(kind)
            if names is not None:
                owned[names[0]] = name
                if uid:
                    owned[names[1]] = uid
        node = self.nodes.get(pod.node)
        values = {
            "k8s.namespace.name": pod.namespace,
            "k8s.pod.name": pod.name,
            "k8s.pod.uid": pod.uid,
            "k8s.pod.hostname": pod.hostname,
            "k8s.pod.ip": pod.ip,
            "k8s.pod.start_time": pod.start_time,
            "k8s.node.name": pod.node,
            "k8s.node.uid": node[0] if node else "",
            "k8s.cluster.uid": self.cluster_uid,
            **owned,
        }
        out: list[tuple[str, Any]] = []
        for name in self._pod_metadata:
            value = values.get(name, "")
            if value:
                out.append((name, value))
        container = pod.containers.get(container_id) if container_id else None
        if container is not None:
            image, tag = image_name_tag(container.image)
            cvalues: dict[str, Any] = {
                "k8s.container.name": container.name,
                "container.id": container_id,
                "container.image.name": image,
                "container.image.tag": tag,
                "k8s.container.restart_count": container.restart_count,
            }
            for name in self._container_metadata:
                value = cvalues[name]
                if value != "":
                    out.append((name, value))
        out.extend(pod.extracted)
        out.extend(self.namespaces.get(pod.namespace, ()))
        if node:
            out.extend(node[1])
        seen: set[str] = set()
        unique = []
        for k, v in out:
            if k not in seen:
                seen.add(k)
                unique.append((k, v))
        return unique
