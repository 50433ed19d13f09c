"""etcd events → OTLP log records (bytes). Pure: the caller passes the time and counts what is returned.

One record per event. Its body is the object the event is about, decoded
(`_values.decode_value`): the new value of a PUT, the deleted (previous)
value of a DELETE. Attributes, on every record:

- ``tapio.etcd.key``, ``tapio.etcd.operation`` (``PUT``, ``DELETE``;
  ``RESYNC`` for a resync marker), ``tapio.etcd.revision`` (the event's
  mod_revision: the revision of the change), ``tapio.etcd.prefix`` (the
  watched prefix);
- PUT: ``tapio.etcd.create_revision``, ``tapio.etcd.version``,
  ``tapio.etcd.lease`` (when the key has one);
- with the previous value: ``tapio.etcd.prev_revision``;
- ``tapio.etcd.value.encoding`` (see `_values`), and with ``raw_values``
  ``tapio.etcd.value`` / ``tapio.etcd.prev_value`` (the bytes);
- keys under the Kubernetes prefix: ``k8s.resource``, ``k8s.namespace.name``
  (namespaced objects), ``k8s.object.name``; a decoded object adds
  ``k8s.object.api_version``, ``k8s.object.kind`` and ``k8s.object.uid``;
- records of a re-list (after a compaction): ``tapio.etcd.resync`` = true.

Records carry no ``time_unix_nano``: etcd keeps no time for a change, so
only ``observed_time_unix_nano`` (when tapio read it) is set.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from . import _encode as enc
from ._gateway import Event, KeyValue
from ._values import DecodedValue, decode_value, parse_key

SCOPE_NAME = "tapio.etcd-watch"
SCOPE_VERSION = "0.1.0"
EVENT_PUT, EVENT_DELETE, EVENT_RESYNC = "tapio.etcd.put", "tapio.etcd.delete", "tapio.etcd.resync"
_SCOPE = enc.scope(SCOPE_NAME, SCOPE_VERSION)


@dataclass(slots=True)
class Built:
    """One encoded record, and what the caller counts about it."""

    record: bytes
    encoding: str
    #: why the value could not be decoded as it claims ("" when it could)
    problem: str = ""


class RecordBuilder:
    """Builds the records of one receiver instance (see the module docstring for their shape)."""

    def __init__(self, *, raw_values: bool, kubernetes_prefix: str) -> None:
        self._raw = raw_values
        self._k8s_prefix = kubernetes_prefix
        self._resources: dict[int, bytes] = {}

    def event(self, ev: Event, prefix: str, observed_ns: int, *, resync: bool = False) -> Built:
        kv, prev = ev.kv, ev.prev
        shown = prev if ev.deleted else kv
        decoded = decode_value(shown.value) if shown is not None else DecodedValue("empty", "")
        pairs: list[tuple[str, Any]] = [
            ("tapio.etcd.key", kv.key.decode("utf-8", "replace")),
            ("tapio.etcd.operation", "DELETE" if ev.deleted else "PUT"),
            ("tapio.etcd.revision", kv.mod_revision),
            ("tapio.etcd.prefix", prefix),
        ]
        if not ev.deleted:
            pairs += [("tapio.etcd.create_revision", kv.create_revision), ("tapio.etcd.version", kv.version)]
            if kv.lease:
                pairs.append(("tapio.etcd.lease", kv.lease))
        if prev is not None:
            pairs.append(("tapio.etcd.prev_revision", prev.mod_revision))
        pairs.append(("tapio.etcd.value.encoding", decoded.encoding))
        if self._raw:
            if not ev.deleted:
                pairs.append(("tapio.etcd.value", kv.value))
            if prev is not None:
                pairs.append(("tapio.etcd.prev_value", prev.value))
        self._kubernetes(pairs, kv, decoded)
        if resync:
            pairs.append(("tapio.etcd.resync", True))
        record = enc.log_record(
            observed_time_unix_nano=observed_ns,
            severity_number=enc.SEVERITY_INFO,
            severity_text="INFO",
            body=enc.any_value(decoded.body),
            attrs=enc.attributes(pairs),
            event_name=EVENT_DELETE if ev.deleted else EVENT_PUT,
        )
        return Built(record, decoded.encoding, decoded.problem)

    def listed(self, kv: KeyValue, prefix: str, observed_ns: int) -> Built:
        """A key as a re-list found it: shaped as its PUT, marked ``tapio.etcd.resync``."""
        return self.event(Event(False, kv, None), prefix, observed_ns, resync=True)

    def resync_marker(self, *, prefix: str, reason: str, wanted_revision: int, revision: int, compact_revision: int, relist: bool, observed_ns: int) -> bytes:
        """The record saying that changes between ``wanted_revision`` and ``revision`` could not be watched."""
        what = {
            "compacted": f"revision {wanted_revision} was compacted (etcd keeps revisions from {compact_revision} on)",
            "cluster_changed": "the etcd cluster is not the one the checkpoint was taken from",
            "ahead_of_cluster": f"the checkpoint (revision {wanted_revision - 1}) is ahead of the cluster (revision {revision})",
        }[reason]
        then = f"re-listing every key at revision {revision}" if relist else f"watching on from revision {revision + 1}"
        pairs: list[tuple[str, Any]] = [
            ("tapio.etcd.operation", "RESYNC"),
            ("tapio.etcd.prefix", prefix),
            ("tapio.etcd.revision", revision),
            ("tapio.etcd.resync.reason", reason),
            ("tapio.etcd.resync.from_revision", wanted_revision),
            ("tapio.etcd.resync.relist", relist),
        ]
        if compact_revision:
            pairs.append(("tapio.etcd.compact_revision", compact_revision))
        return enc.log_record(
            observed_time_unix_nano=observed_ns,
            severity_number=enc.SEVERITY_WARN,
            severity_text="WARN",
            body=enc.any_value(f"etcd changes under {prefix!r} may be missing: {what}; {then}"),
            attrs=enc.attributes(pairs),
            event_name=EVENT_RESYNC,
        )

    def request(self, cluster_id: int, records: list[bytes]) -> bytes:
        """An ExportLogsServiceRequest holding ``records`` under the resource of ``cluster_id``."""
        resource = self._resources.get(cluster_id)
        if resource is None:
            resource = self._resources[cluster_id] = enc.attributes(
                [("service.name", "tapio"), ("host.name", socket.gethostname()), ("tapio.etcd.cluster_id", f"{cluster_id:x}")],
                tag=b"\x0a",
            )
        return enc.request(resource, _SCOPE, records)

    def _kubernetes(self, pairs: list[tuple[str, Any]], kv: KeyValue, decoded: DecodedValue) -> None:
        path = parse_key(kv.key, self._k8s_prefix)
        if path is None:
            return
        pairs.append(("k8s.resource", path.resource))
        if path.namespace:
            pairs.append(("k8s.namespace.name", path.namespace))
        pairs.append(("k8s.object.name", path.name))
        for key, value in (("k8s.object.api_version", decoded.api_version), ("k8s.object.kind", decoded.kind), ("k8s.object.uid", decoded.uid)):
            if value:
                pairs.append((key, value))
