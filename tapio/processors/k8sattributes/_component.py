"""The running k8sattributes processor: a pod cache fed by the shared watch; records put under their pod's resource.

Invariants:
- After the processor, every item (log record, span, metric point) whose pod
  is found sits under a Resource carrying that pod's attributes: the
  resource's own attributes first (never overwritten), then the pod's. When
  the resource names no pod but its log records or spans do (the ebpf
  receiver tags each record with container.id and k8s.pod.uid), the items
  are regrouped into one Resource per pod (and container), each keeping
  its scope; items of no pod stay where they were. Items keep their order
  within each resource and scope, and none is lost or duplicated.
- Every item that finds no pod is counted by reason:
  ``no_association_attribute`` (nothing to look a pod up by),
  ``no_matching_pod`` (a pod uid, container id or IP that no cached pod has),
  ``host_process`` (a process outside any container: it carries a
  process.pid but no container identity, or it came from the node's own
  address).
- What arrived as OTLP bytes leaves as bytes (`Batch.raw` kept in step):
  adding attributes appends to the resource's bytes and merges the same
  bytes into the parsed resource; a regrouped request is re-framed from the
  items' bytes and parsed once. Requests with nothing to add pass untouched.
- The pod cache follows one shared watch of pods (`tapio.k8s.REGISTRY`), so
  a kubeapi receiver watching the same pods in the same process adds no
  second watch. Owners (ReplicaSet, Job) are fetched by GET, at most
  ``owner_lookup_concurrency`` at a time, only for pods in the cache.
- A batch whose hand-on is cancelled is handed on under the shielded
  shutdown grace, else reported not delivered and counted dropped.
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from typing import Any

import trio

from tapio import k8s
from tapio.component import Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER, GAUGE

from . import _wire
from ._config import CONTAINER_METADATA, Config
from ._pods import LOOKED_UP_KINDS, Owner, Pod, PodCache

REASONS = ("no_association_attribute", "no_matching_pod", "host_process")
#: how often deleted pods past their grace period are forgotten (at most)
SWEEP_SECONDS = 5.0
OWNER_RETRIES = 3

_RESOURCES_FIELD = {Signal.LOGS: "resource_logs", Signal.TRACES: "resource_spans", Signal.METRICS: "resource_metrics"}
_SCOPES_FIELD = {Signal.LOGS: ("scope_logs", "log_records"), Signal.TRACES: ("scope_spans", "spans")}
_ATTR_TAG = {Signal.LOGS: _wire.LOG_ATTRIBUTES_TAG, Signal.TRACES: _wire.SPAN_ATTRIBUTES_TAG}

ASSOCIATED = "tapio_k8sattributes_associated_items_total"
UNASSOCIATED = "tapio_k8sattributes_unassociated_items_total"
REGROUPED = "tapio_k8sattributes_regrouped_items_total"
PODS = "tapio_k8sattributes_pods"
OWNER_LOOKUPS = "tapio_k8sattributes_owner_lookups_total"
POD_CHANGES = "tapio_k8sattributes_pod_changes_total"
DROPPED = "tapio_processor_dropped_items_total"


def _metric_points(rx: Any) -> int:
    n = 0
    for sm in rx.scope_metrics:
        for m in sm.metrics:
            kind = m.WhichOneof("data")
            if kind is not None:
                n += len(getattr(m, kind).data_points)
    return n


def _is_local(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class K8sAttributesProcessor:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.input is None or ports.output is None:
            raise ValueError("the k8sattributes processor needs an input channel and an output consumer")
        self._settings = settings
        self._config = config
        self._input = ports.input
        self._output = ports.output
        self._tel = settings.telemetry
        self._log = settings.logger
        self.cache = PodCache(config, self._owner_needed)
        #: each rule as [(attribute, or "connection")]
        self._rules = [[("connection" if s.from_ == "connection" else s.name) for s in rule.sources] for rule in config.association]
        attributes = {a for rule in self._rules for a in rule if a != "connection"}
        self._wanted = attributes | {"process.pid", "container.id"}
        self._record_prefixes = tuple(_wire.key_prefix(a) for a in sorted(self._wanted))
        self._record_level = bool(attributes)
        self._wants_container = any(m in CONTAINER_METADATA for m in config.extract.metadata)
        self._owner_queue: deque[Owner] = deque()
        self._owner_wakeup = trio.Event()
        self._changed = trio.Event()
        self._pods_synced = trio.Event()
        self._extra_synced: list[trio.Event] = []
        self._forbidden_logged: set[str] = set()
        self._declare()

    def _declare(self) -> None:
        t = self._tel
        t.declare(ASSOCIATED, COUNTER, "Items (log records, spans, metric points) put under their pod's resource.")
        t.declare(UNASSOCIATED, COUNTER, "Items no pod was found for, by reason (no_association_attribute, no_matching_pod, host_process).")
        t.declare(REGROUPED, COUNTER, "Items that named their pod themselves and were moved under a resource of that pod.")
        t.declare(PODS, GAUGE, "Pods in the cache (deleted pods within their grace period included).")
        t.declare(OWNER_LOOKUPS, COUNTER, "Owner objects (ReplicaSets, Jobs) fetched for the owner chain, by result (found, missing, error).")
        t.declare(POD_CHANGES, COUNTER, "Pod changes applied to the cache, by type (added, modified, deleted).")
        t.gauge(PODS, lambda: len(self.cache))

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        config = self._config
        if config.passthrough:
            task_status.started()
            await self._steady_state()
            return
        node = k8s.node_name(config.filter.node, config.filter.node_from_env_var)
        connection = await k8s.connect(config)
        fields = [f"spec.nodeName={node}"] if node else []
        pods = k8s.WatchSpec(
            "pods",
            namespace=config.filter.namespace,
            label_selector=k8s.label_selector(config.filter.labels),
            field_selector=k8s.field_selector(config.filter.fields, fields),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow, connection, pods, self._on_pods, self._pods_synced)
            if self.cache.wants_namespaces:
                spec = k8s.WatchSpec("namespaces", field_selector=f"metadata.name={config.filter.namespace}" if config.filter.namespace else "")
                nursery.start_soon(self._follow, connection, spec, self._on_namespaces, self._new_synced())
            if self.cache.wants_nodes:
                spec = k8s.WatchSpec("nodes", field_selector=f"metadata.name={node}" if node else "")
                nursery.start_soon(self._follow, connection, spec, self._on_nodes, self._new_synced())
            if self.cache.wants_owners or "k8s.cluster.uid" in config.extract.metadata:
                for _ in range(config.owner_lookup_concurrency):
                    nursery.start_soon(self._owner_worker, connection)
            if "k8s.cluster.uid" in config.extract.metadata:
                nursery.start_soon(self._cluster_uid, connection)
            nursery.start_soon(self._sweeper)
            failure = None
            if config.wait_for_metadata:
                with trio.move_on_after(float(config.wait_for_metadata_timeout)) as waited:
                    await self._wait_loaded()
                if waited.cancelled_caught:
                    failure = RuntimeError(
                        f"wait_for_metadata: the pods ({pods}) were not loaded from {connection.host} within "
                        f"{config.wait_for_metadata_timeout} ({len(self.cache)} pods, {self.cache.pending_owners} owners pending)"
                    )
            if failure is None:
                self._log.info("%s: caching pods from %s (%s)", self._settings.id, connection.host, pods)
                task_status.started()
                await self._steady_state()
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure  # outside the nursery: the start fails with this error, not a group

    def _new_synced(self) -> trio.Event:
        event = trio.Event()
        self._extra_synced.append(event)
        return event

    async def _wait_loaded(self) -> None:
        while not (self._pods_synced.is_set() and all(e.is_set() for e in self._extra_synced) and self.cache.pending_owners == 0):
            await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _follow(self, connection: k8s.Connection, spec: k8s.WatchSpec, handle: Any, synced: trio.Event) -> None:
        telemetry = self._tel.telemetry
        async with k8s.REGISTRY.subscribe(connection, spec, telemetry=telemetry, logger=self._log) as subscription:
            async for delivery in subscription:
                now = trio.current_time()
                if delivery.snapshot:
                    # a late join: decode the store a chunk at a time, letting the loop run
                    objects = []
                    for i, blob in enumerate(delivery.snapshot):
                        objects.append(k8s.decode_blob(blob))
                        if i % 256 == 255:
                            await trio.lowlevel.checkpoint()
                    handle("SNAPSHOT", objects, now)
                for change in delivery.changes:
                    handle(change.type, change.obj, now)
                if delivery.synced:
                    synced.set()
                self._notify()

    def _on_pods(self, kind: str, obj: Any, now: float) -> None:
        if kind == "SNAPSHOT":
            self.cache.replace_all(obj, now)
            return
        self.cache.apply(kind, obj, now)
        self._tel.add(POD_CHANGES, 1, type=kind.lower())
        if kind == "DELETED" and self._config.pod_delete_grace_period == 0:
            self.cache.sweep(now)

    def _on_namespaces(self, kind: str, obj: Any, now: float) -> None:
        for o in obj if kind == "SNAPSHOT" else [obj]:
            self.cache.apply_namespace("ADDED" if kind == "SNAPSHOT" else kind, o)

    def _on_nodes(self, kind: str, obj: Any, now: float) -> None:
        for o in obj if kind == "SNAPSHOT" else [obj]:
            self.cache.apply_node("ADDED" if kind == "SNAPSHOT" else kind, o)

    async def _sweeper(self) -> None:
        interval = max(0.5, min(SWEEP_SECONDS, float(self._config.pod_delete_grace_period) / 4 or SWEEP_SECONDS))
        while True:
            await trio.sleep(interval)
            self.cache.sweep(trio.current_time())

    # -- owners

    def _owner_needed(self, owner: Owner) -> None:
        self._owner_queue.append(owner)
        self._owner_wakeup.set()

    async def _owner_worker(self, connection: k8s.Connection) -> None:
        async with connection.client() as client:
            while True:
                while not self._owner_queue:
                    self._owner_wakeup = trio.Event()
                    await self._owner_wakeup.wait()
                owner = self._owner_queue.popleft()
                if self.cache.owners.get(owner.uid) is not owner:
                    continue  # no cached pod names it any more
                await self._look_up(connection, client, owner)
                self._notify()

    async def _look_up(self, connection: k8s.Connection, client: Any, owner: Owner) -> None:
        resource = LOOKED_UP_KINDS[owner.kind]
        delay = 1.0
        for attempt in range(OWNER_RETRIES):
            try:
                obj = await k8s.get_object(connection, client, resource, owner.name, owner.namespace)
            except k8s.KubeApiError as exc:
                if exc.status == 403 and resource not in self._forbidden_logged:
                    self._forbidden_logged.add(resource)
                    self._log.warning("%s: may not get %s (%s): owner names above them are left out; grant get on %s", self._settings.id, resource, exc, resource)
                if exc.status in (401, 403) or attempt + 1 == OWNER_RETRIES:
                    self._tel.add(OWNER_LOOKUPS, 1, result="error")
                    self.cache.owner_found(owner.uid, None, failed=True)
                    return
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay *= 2
                continue
            if obj is not None and str((obj.get("metadata") or {}).get("uid")) != owner.uid:
                obj = None  # a newer object of the same name: not this pod's owner
            self._tel.add(OWNER_LOOKUPS, 1, result="found" if obj is not None else "missing")
            self.cache.owner_found(owner.uid, obj)
            return

    async def _cluster_uid(self, connection: k8s.Connection) -> None:
        """k8s.cluster.uid is the uid of the kube-system namespace (the semantic conventions' recommendation)."""
        async with connection.client() as client:
            while True:
                try:
                    obj = await k8s.get_object(connection, client, "namespaces", "kube-system")
                except k8s.KubeApiError as exc:
                    self._log.warning("%s: cannot get namespace kube-system for k8s.cluster.uid: %s", self._settings.id, exc)
                    await trio.sleep(30)
                    continue
                if obj is not None:
                    self.cache.cluster_uid = str((obj.get("metadata") or {}).get("uid") or "")
                    self.cache.generation += 1
                return

    # -- the steady state

    async def _steady_state(self) -> None:
        while True:
            try:
                batch = await self._input.receive()
            except trio.EndOfChannel:
                return
            await self.process(batch)
            try:
                await self._output.send(batch)
            except trio.Cancelled:
                with trio.CancelScope(shield=True), trio.move_on_after(self._settings.shutdown_grace) as grace:
                    await self._output.send(batch)
                if grace.cancelled_caught:
                    self._tel.add(DROPPED, batch.count, reason="shutdown")
                    batch.done(False)
                raise

    async def process(self, batch: Batch) -> None:
        """Put the batch's items under their pods' resources, in place (requests and their bytes)."""
        raws = batch.raw if len(batch.raw) == len(batch.requests) else [None] * len(batch.requests)
        counts = {"associated": 0, "regrouped": 0, **{r: 0 for r in REASONS}}
        new_raw: list[bytes | None] = []
        for i, request in enumerate(batch.requests):
            if i:
                await trio.lowlevel.checkpoint()
            try:
                request, raw = self.process_request(batch.signal, request, raws[i], batch.client_address, counts)
            except _wire.WireError as exc:
                self._tel.bad_input("otlp_wire")
                self._log.warning("%s: a %s request could not be read as OTLP (%s); passed on unchanged", self._settings.id, batch.signal, exc)
                raw = raws[i]
            batch.requests[i] = request
            new_raw.append(raw)
        batch.raw = new_raw
        self._tel.add(ASSOCIATED, counts.pop("associated"))
        self._tel.add(REGROUPED, counts.pop("regrouped"))
        for reason, n in counts.items():
            self._tel.add(UNASSOCIATED, n, reason=reason)

    # -- association

    def _associate(self, values: dict[str, str]) -> tuple[Pod | None, str, bool]:
        """The first rule whose sources all have values and find a pod: (pod, container id, whether any rule had values)."""
        had = False
        for rule in self._rules:
            pod = None
            for attribute in rule:
                value = values.get(attribute)
                if not value:
                    break
            else:
                had = True
                pod = self._lookup(rule, values)
                if pod is not None:
                    cid = values.get("container.id", "") if self._wants_container else ""
                    if cid and cid not in pod.containers:
                        cid = cid.rpartition("://")[2]
                        if cid not in pod.containers:
                            cid = ""
                    return pod, cid, True
        return None, "", had

    def _lookup(self, rule: list[str], values: dict[str, str]) -> Pod | None:
        cache = self.cache
        pod = None
        for attribute in rule:
            pod = cache.find(attribute, values[attribute])
            if pod is not None or attribute in ("k8s.pod.uid", "container.id", "k8s.pod.ip", "connection"):
                break
        if pod is None and "k8s.pod.name" in rule and "k8s.namespace.name" in rule:
            pod = cache.by_name.get((values["k8s.namespace.name"], values["k8s.pod.name"]))
        if pod is None:
            return None
        for attribute in rule:
            value = values[attribute]
            if attribute == "k8s.pod.name" and pod.name != value:
                return None
            if attribute == "k8s.namespace.name" and pod.namespace != value:
                return None
            if attribute == "k8s.pod.uid" and pod.uid != value:
                return None
            if attribute in ("k8s.pod.ip", "connection") and value not in pod.ips:
                return None
            if attribute == "container.id" and value.rpartition("://")[2] not in pod.containers:
                return None
        return pod

    def _reason(self, had_value: bool, values: dict[str, Any]) -> str:
        if had_value:
            connection = values.get("connection", "")
            only_connection = connection and all(not values.get(a) for a in self._wanted if a not in ("process.pid", "container.id"))
            if only_connection and not values.get("container.id") and (_is_local(connection) or connection in self.cache.host_ips):
                return "host_process"
            return "no_matching_pod"
        if "process.pid" in values and not values.get("container.id"):
            return "host_process"
        return "no_association_attribute"

    # -- requests

    def process_request(self, signal: Signal, request: Any, raw: bytes | None, client: str, counts: dict[str, int]) -> tuple[Any, bytes | None]:
        """One export request with its items under their pods' resources: (request, its bytes or None when unknown)."""
        resources = getattr(request, _RESOURCES_FIELD[signal])
        passthrough = self._config.passthrough
        plans: list[Any] = []
        regroup = False
        for rx in resources:
            present: dict[str, Any] = {}
            for kv in rx.resource.attributes:
                if kv.key in self._wanted or passthrough:
                    v = kv.value
                    present[kv.key] = v.string_value if v.WhichOneof("value") == "string_value" else ""
            n = self._items(signal, rx)
            if passthrough:
                if client and "k8s.pod.ip" not in present and not any(kv.key == "k8s.pod.ip" for kv in rx.resource.attributes):
                    plans.append(_wire.resource_attributes([("k8s.pod.ip", client)]))
                else:
                    plans.append(None)
                continue
            values = present
            if client:
                values = {**present, "connection": client}
            pod, cid, had = self._associate(values)
            if pod is not None:
                extra = self.cache.extra(pod, cid)
                plans.append(self.cache.without(extra, (kv.key for kv in rx.resource.attributes)) if extra.keys else b"")
                counts["associated"] += n
            elif signal in _ATTR_TAG and self._record_level and n:
                plans.append(("records", values, had))
                regroup = True
            else:
                plans.append(None)
                counts[self._reason(had, values)] += n
        if regroup:
            return self._regroup(signal, request, raw, plans, counts)
        if not any(plans):
            return request, raw
        # attributes to add only: merge them into the parsed resources and append the same bytes
        for rx, extra in zip(resources, plans):
            if extra:
                rx.resource.MergeFromString(extra)
        if raw is None:
            return request, None
        parts = []
        offsets = _wire.resources(raw)
        if len(offsets) != len(plans):
            raise _wire.WireError("the bytes hold a different number of resources than the parsed request")
        for (fs, ps, end), extra in zip(offsets, plans):
            parts.append(_wire.frame_resource(_wire.add_resource_attributes(raw[ps:end], extra)) if extra else raw[fs:end])
        return request, b"".join(parts)

    @staticmethod
    def _items(signal: Signal, rx: Any) -> int:
        if signal is Signal.METRICS:
            return _metric_points(rx)
        scopes, items = _SCOPES_FIELD[signal]
        return sum(len(getattr(s, items)) for s in getattr(rx, scopes))

    def _regroup(self, signal: Signal, request: Any, raw: bytes | None, plans: list[Any], counts: dict[str, int]) -> tuple[Any, bytes | None]:
        if raw is None:
            raw = request.SerializeToString()
        offsets = _wire.resources(raw)
        if len(offsets) != len(plans):
            raise _wire.WireError("the bytes hold a different number of resources than the parsed request")
        tag = _ATTR_TAG[signal]
        prefixes = self._record_prefixes
        parts: list[bytes] = []
        changed = False
        for (fs, ps, end), plan in zip(offsets, plans):
            if plan is None:
                parts.append(raw[fs:end])
                continue
            if not isinstance(plan, tuple):
                parts.append(_wire.frame_resource(_wire.add_resource_attributes(raw[ps:end], plan)) if plan else raw[fs:end])
                changed = changed or bool(plan)
                continue
            _, resource_values, resource_had = plan
            layout = _wire.ResourceLayout(raw, ps, end)
            groups: list[int] = []
            extras: list[bytes] = [b""]
            group_of: dict[tuple[str, str], int] = {}
            resource_keys = _resource_keys(raw, layout)
            #: the found attributes of an item -> its group, or the reason it has none
            #: (records of one process and container repeat them)
            seen: dict[tuple[tuple[bytes, bytes | None], ...], int | str] = {}
            for _, items in layout.scopes:
                for _, ips, ie in items:
                    found = _wire.find_attributes(raw, ips, ie, tag, prefixes)
                    memo = tuple(found.items())
                    outcome = seen.get(memo)
                    if outcome is None:
                        outcome = seen[memo] = self._group_of(found, resource_values, resource_had, group_of, extras, resource_keys)
                    if outcome.__class__ is str:
                        groups.append(0)
                        counts[outcome] += 1
                    else:
                        groups.append(outcome)
                        counts["associated"] += 1
                        counts["regrouped"] += 1
            if len(extras) == 1:
                parts.append(raw[fs:end])
                continue
            changed = True
            parts.extend(_wire.frame_resource(p) for p in _wire.regroup(raw, layout, groups, extras))
        if not changed:
            return request, raw
        new_raw = b"".join(parts)
        return signal.request_class.FromString(new_raw), new_raw

    def _group_of(
        self,
        found: dict[bytes, bytes | None],
        resource_values: dict[str, Any],
        resource_had: bool,
        group_of: dict[tuple[str, str], int],
        extras: list[bytes],
        resource_keys: list[str],
    ) -> int | str:
        """The group (index into ``extras``, added if new) of an item with ``found`` attributes, or why it has no pod."""
        if not found:
            return self._reason(resource_had, resource_values)
        values = dict(resource_values)
        for k, v in found.items():
            values[k.decode()] = v.decode("utf-8", "replace") if v is not None else ""
        pod, cid, had = self._associate(values)
        if pod is None:
            return self._reason(had or resource_had, values)
        key = (pod.uid, cid)
        g = group_of.get(key)
        if g is None:
            g = group_of[key] = len(extras)
            extras.append(self.cache.without(self.cache.extra(pod, cid), resource_keys))
        return g


def _resource_keys(raw: bytes, layout: _wire.ResourceLayout) -> list[str]:
    """The attribute keys of the resource in a ResourceX envelope (its own win over the pod's)."""
    keys = []
    env = layout.envelope
    for number, _, ps, end in _wire.fields(env, 0, len(env)):
        if number != 1:
            continue
        for n2, _, ps2, end2 in _wire.fields(env, ps, end):
            if n2 == 1:
                for n3, _, ps3, end3 in _wire.fields(env, ps2, end2):
                    if n3 == 1:
                        keys.append(env[ps3:end3].decode("utf-8", "replace"))
    return keys
