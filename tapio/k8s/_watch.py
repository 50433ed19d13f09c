"""List + watch of one Kubernetes collection, shared by every component of the process that asks for it.

Invariants:
- One `SharedWatch` per (trio run, API server and way of authenticating,
  resource, namespace, selectors): `REGISTRY.subscribe` hands out the
  existing one or makes it, counts its users, and forgets it when the last
  one leaves. That registry is the only process-wide state.
- The watch always runs in the nursery of one of its users: each user's
  `subscribe` runs `SharedWatch.serve`, which waits for the watch's driver
  lock; the holder drives (lists and watches), the others wait. When the
  driving user leaves, the next takes over from the same resourceVersion,
  with the store intact: no re-list.
- The protocol, as client-go's reflector: list (paged, ``limit`` and
  ``continue``), then watch from the list's resourceVersion with
  bookmarks; a stream that ends is re-opened from the last resourceVersion
  seen (an event's or a bookmark's); a 410 Expired (an ERROR event or the
  HTTP status) re-lists, and the re-list is compared with the store: what
  is new is delivered ADDED, what changed MODIFIED, what is gone DELETED
  (with its last known state). Connection and server errors back off
  (exponentially, with jitter) and retry; nothing here ends the watch but
  cancellation.
- The store keeps every object (less ``metadata.managedFields``) as
  zlib-compressed JSON, so a user that joins late, or a restarted one, gets
  the current objects first (a snapshot) and then the same changes as
  everyone, in order: the store is updated and the users to deliver to are
  chosen without an await in between.
- Lists (large bodies) are parsed and compressed in a worker thread with a
  limiter of the watch's own; watch events, one object each, on the loop.
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
import trio

from tapio.telemetry import COUNTER, GAUGE, Telemetry

from ._api import Connection, KubeApiError, collection_path, http_error_text, status_message

#: objects per list page (the API server's own default chunking is 500 too)
LIST_PAGE_SIZE = 500
#: a watch request asks the server to end it after a random time in this range (as client-go), then it is re-opened
WATCH_TIMEOUT_RANGE = (300, 600)
#: extra read time allowed beyond the watch's own timeout before the connection is deemed dead
READ_SLACK_SECONDS = 60.0
BACKOFF_INITIAL, BACKOFF_MAX = 0.5, 30.0
#: a watch that stayed up this long resets the backoff
HEALTHY_SECONDS = 30.0
#: changes per delivery, so one delivery never holds a whole re-list
DELIVERY_CHUNK = 256
#: deliveries buffered per user before the watch waits for it
USER_BUFFER = 64

METRICS = {
    "tapio_kube_lists_total": (COUNTER, "List requests sent to the Kubernetes API, by resource (re-lists included)."),
    "tapio_kube_watches_total": (COUNTER, "Watch requests opened, by resource."),
    "tapio_kube_relists_total": (COUNTER, "Re-lists after a watch could not resume (410 Expired or a broken stream), by resource and reason."),
    "tapio_kube_errors_total": (COUNTER, "Failed list, watch or get requests, by resource and reason (HTTP status or connection error)."),
    "tapio_kube_watch_events_total": (COUNTER, "Watch events received, by resource and type (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR)."),
    "tapio_kube_objects": (GAUGE, "Objects held in the shared watch cache, by resource."),
}


@dataclass(frozen=True)
class WatchSpec:
    """What to watch: a resource (plural, as in the API path), optionally one namespace, and selectors."""

    resource: str
    namespace: str = ""
    label_selector: str = ""
    field_selector: str = ""

    def __str__(self) -> str:
        parts = [self.resource]
        if self.namespace:
            parts.append(f"namespace={self.namespace}")
        if self.label_selector:
            parts.append(f"labels={self.label_selector}")
        if self.field_selector:
            parts.append(f"fields={self.field_selector}")
        return " ".join(parts)


@dataclass(slots=True)
class Change:
    """One object change: ADDED, MODIFIED or DELETED, with the object as the API sent it (less managedFields)."""

    type: str
    obj: dict
    #: found by a (re-)list rather than reported by the watch
    listed: bool = False


@dataclass(slots=True)
class Delivery:
    """What a user receives: a snapshot of the store (on joining), or changes, in order."""

    changes: list[Change] = field(default_factory=list)
    #: compressed objects (decode with `decode_blob`); only in the first delivery of a late joiner
    snapshot: list[bytes] = field(default_factory=list)
    #: the store holds a complete list (the first list finished)
    synced: bool = False


def decode_blob(blob: bytes) -> dict:
    return json.loads(zlib.decompress(blob))


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def _rv(obj: dict) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _compress(obj: dict) -> bytes:
    return zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 1)


def _strip(obj: Any) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    obj["metadata"].pop("managedFields", None)
    return obj


def _parse_page(body: bytes) -> tuple[list[tuple[dict, bytes]], str, str, int]:
    """A list response: (objects with their compressed form, resourceVersion, continue token, malformed items). Runs in a thread."""
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("a list response must be a JSON object")
    meta = doc.get("metadata") or {}
    out, bad = [], 0
    for item in doc.get("items") or []:
        obj = _strip(item)
        if obj is None or not _key(obj)[1]:
            bad += 1
            continue
        out.append((obj, _compress(obj)))
    return out, str(meta.get("resourceVersion") or ""), str(meta.get("continue") or ""), bad


class _Expired(Exception):
    """The resourceVersion is too old to watch from: re-list."""


class _Broken(Exception):
    """The stream cannot be trusted any more (a malformed event): re-list."""


class SharedWatch:
    """The list+watch of one `WatchSpec` and its store; see the module invariants."""

    def __init__(self, connection: Connection, spec: WatchSpec, telemetry: Telemetry, logger: logging.Logger) -> None:
        self.connection = connection
        self.spec = spec
        self._tel = telemetry
        self._log = logger
        self._labels = {"resource": spec.resource}
        for name, (kind, help) in METRICS.items():
            telemetry.declare(name, kind, help)
        telemetry.gauge("tapio_kube_objects", {**self._labels, "watch": str(spec)}, lambda: len(self.store))
        #: (namespace, name) -> (resourceVersion, compressed object)
        self.store: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.resource_version = ""
        self.synced = trio.Event()
        self._need_list = True
        self._users: list[trio.MemorySendChannel[Delivery]] = []
        self._driver = trio.Lock()
        self._thread_limiter = trio.CapacityLimiter(1)
        self.refs = 0

    # -- users

    def join(self) -> trio.MemoryReceiveChannel[Delivery]:
        """A new user's channel; its first delivery is a snapshot of the store when the store holds anything."""
        send, receive = trio.open_memory_channel[Delivery](USER_BUFFER)
        if self.store or self.synced.is_set():
            send.send_nowait(Delivery(snapshot=[blob for _, blob in self.store.values()], synced=self.synced.is_set()))
        self._users.append(send)
        return receive

    def leave(self, receive: trio.MemoryReceiveChannel[Delivery]) -> None:
        receive.close()

    async def _deliver(self, changes: list[Change], synced: bool) -> None:
        users = list(self._users)  # chosen before any await (see the invariants)
        for start in range(0, max(len(changes), 1), DELIVERY_CHUNK):
            delivery = Delivery(changes=changes[start : start + DELIVERY_CHUNK], synced=synced)
            for send in users:
                try:
                    await send.send(delivery)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if send in self._users:
                        self._users.remove(send)

    # -- driving

    async def serve(self) -> None:
        """Drive the watch while holding the driver lock (waits while another user drives); runs until cancelled."""
        async with self._driver:
            async with self.connection.client(timeout=30.0) as client:
                await self._drive(client)

    async def _drive(self, client: httpx.AsyncClient) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            started = trio.current_time()
            try:
                if self._need_list:
                    await self._list(client)
                await self._watch(client)
                backoff = BACKOFF_INITIAL  # the server ended the stream: re-open at once
                continue
            except _Expired:
                self._tel.add("tapio_kube_relists_total", 1, {**self._labels, "reason": "expired"})
                self._log.info("watch of %s: resourceVersion %s expired (410), re-listing", self.spec, self.resource_version)
                self._need_list = True
                continue
            except _Broken as exc:
                self._tel.add("tapio_kube_relists_total", 1, {**self._labels, "reason": "broken_stream"})
                self._log.warning("watch of %s: %s; re-listing", self.spec, exc)
                self._need_list = True
            except KubeApiError as exc:
                reason = f"http_{exc.status}" if exc.status else "connection"
                self._tel.add("tapio_kube_errors_total", 1, {**self._labels, "reason": reason})
                self._log.warning("watch of %s: %s (retrying in %.1fs)", self.spec, exc, backoff)
            if trio.current_time() - started > HEALTHY_SECONDS:
                backoff = BACKOFF_INITIAL
            await trio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _params(self) -> dict[str, str]:
        params = {}
        if self.spec.label_selector:
            params["labelSelector"] = self.spec.label_selector
        if self.spec.field_selector:
            params["fieldSelector"] = self.spec.field_selector
        return params

    async def _request(self, client: httpx.AsyncClient, path: str, params: dict[str, str]) -> bytes:
        try:
            response = await client.get(path, params=params, headers=await self.connection.authorization())
        except httpx.HTTPError as exc:
            raise KubeApiError(0, f"GET {self.connection.host}{path}: {http_error_text(exc)}") from None
        if response.status_code == 410:
            raise _Expired()
        if response.status_code != 200:
            raise KubeApiError(response.status_code, f"GET {self.connection.host}{path}: HTTP {response.status_code}: {status_message(response.content)}")
        return response.content

    async def _list(self, client: httpx.AsyncClient) -> None:
        path = collection_path(self.spec.resource, self.spec.namespace)
        seen: set[tuple[str, str]] = set()
        token, rv = "", ""
        relist = self.synced.is_set() or bool(self.store)
        while True:
            params = {**self._params(), "limit": str(LIST_PAGE_SIZE)}
            if token:
                params["continue"] = token
            self._tel.add("tapio_kube_lists_total", 1, self._labels)
            body = await self._request(client, path, params)
            try:
                items, rv, token, bad = await trio.to_thread.run_sync(_parse_page, body, limiter=self._thread_limiter)
            except ValueError as exc:
                raise KubeApiError(200, f"list of {self.spec}: the response is not a list: {exc}") from None
            if bad:
                self._tel.add("tapio_bad_input_total", bad, {"component": "k8s", "reason": "kube_object_malformed"})
            changes = []
            for obj, blob in items:
                key = _key(obj)
                seen.add(key)
                old = self.store.get(key)
                new_rv = _rv(obj)
                if old is None:
                    changes.append(Change("ADDED", obj, listed=True))
                elif old[0] != new_rv:
                    changes.append(Change("MODIFIED", obj, listed=True))
                self.store[key] = (new_rv, blob)
            if changes:
                await self._deliver(changes, self.synced.is_set())
            if not token:
                break
        gone = [key for key in self.store if key not in seen]
        deleted = [Change("DELETED", decode_blob(self.store.pop(key)[1]), listed=True) for key in gone]
        self.resource_version = rv
        self._need_list = False
        first = not self.synced.is_set()
        self.synced.set()
        if deleted or first or relist:
            await self._deliver(deleted, True)
        self._log.debug("listed %s: %d objects at resourceVersion %s", self.spec, len(self.store), rv)

    async def _watch(self, client: httpx.AsyncClient) -> None:
        path = collection_path(self.spec.resource, self.spec.namespace)
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        params = {
            **self._params(),
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version,
            "timeoutSeconds": str(timeout),
        }
        headers = await self.connection.authorization()
        self._tel.add("tapio_kube_watches_total", 1, self._labels)
        read_timeout = httpx.Timeout(30.0, read=timeout + READ_SLACK_SECONDS)
        failure: Exception | None = None
        try:
            async with client.stream("GET", path, params=params, headers=headers, timeout=read_timeout) as response:
                if response.status_code == 410:
                    raise _Expired()
                if response.status_code != 200:
                    body = await response.aread()
                    raise KubeApiError(response.status_code, f"watch {self.connection.host}{path}: HTTP {response.status_code}: {status_message(body)}")
                # httpx's line iterator nests async generators that only finish when the
                # stream does: on a bad event close the response and let the iteration end
                # (with an error from the closed stream), instead of abandoning it mid-way.
                async for line in response.aiter_lines():
                    if failure is None and line.strip():
                        try:
                            await self._on_line(line)
                        except (_Expired, _Broken, KubeApiError) as exc:
                            failure = exc
                            await response.aclose()
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if failure is None:
                raise KubeApiError(0, f"watch {self.connection.host}{path}: {http_error_text(exc)}") from None
        if failure is not None:
            raise failure

    async def _on_line(self, line: str) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
        except (ValueError, KeyError, TypeError) as exc:
            self._tel.add("tapio_bad_input_total", 1, {"component": "k8s", "reason": "kube_watch_event_malformed"})
            raise _Broken(f"a watch event is not JSON with type and object ({exc})") from None
        self._tel.add("tapio_kube_watch_events_total", 1, {**self._labels, "type": str(kind)})
        if kind == "BOOKMARK":
            rv = _rv(obj) if isinstance(obj, dict) else ""
            if rv:
                self.resource_version = rv
            return
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == 410:
                raise _Expired()
            raise KubeApiError(int(code or 0), f"watch of {self.spec}: error event: {status_message(json.dumps(obj).encode())}")
        obj = _strip(obj)
        if obj is None or kind not in ("ADDED", "MODIFIED", "DELETED") or not _key(obj)[1]:
            self._tel.add("tapio_bad_input_total", 1, {"component": "k8s", "reason": "kube_watch_event_malformed"})
            raise _Broken(f"a {kind!r} watch event without a proper object")
        key = _key(obj)
        rv = _rv(obj)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = (rv, _compress(obj))
        if rv:
            self.resource_version = rv
        await self._deliver([Change(kind, obj)], True)

    async def aclose(self) -> None:
        for send in self._users:
            send.close()
        self._users.clear()


class Subscription:
    """A user's view of a `SharedWatch`: deliveries in order (iterate), and whether the first list is done."""

    def __init__(self, watch: SharedWatch, receive: trio.MemoryReceiveChannel[Delivery]) -> None:
        self.watch = watch
        self._receive = receive

    @property
    def synced(self) -> bool:
        return self.watch.synced.is_set()

    async def wait_synced(self) -> None:
        await self.watch.synced.wait()

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Delivery:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None


class WatchRegistry:
    """The process's shared watches, by what they watch and how they reach the API; ref-counted by their users."""

    def __init__(self) -> None:
        self._entries: dict[tuple, SharedWatch] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def users(self, connection: Connection, spec: WatchSpec) -> int:
        entry = self._entries.get(self._key(connection, spec))
        return entry.refs if entry is not None else 0

    @staticmethod
    def _key(connection: Connection, spec: WatchSpec) -> tuple:
        return (trio.lowlevel.current_trio_token(), connection.identity, spec)

    @asynccontextmanager
    async def subscribe(self, connection: Connection, spec: WatchSpec, *, telemetry: Telemetry, logger: logging.Logger) -> AsyncIterator[Subscription]:
        """Use the shared watch of ``spec`` (made now if nobody uses it yet) for the duration of the block.

        The block's task takes part in driving the watch (see the module
        invariants); leaving the block cancels that part and, for the last
        user, forgets the watch and its store.
        """
        key = self._key(connection, spec)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = SharedWatch(connection, spec, telemetry, logger)
        entry.refs += 1
        receive = entry.join()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(entry.serve)
                yield Subscription(entry, receive)
                nursery.cancel_scope.cancel()
        finally:
            entry.leave(receive)
            entry.refs -= 1
            if entry.refs == 0 and self._entries.get(key) is entry:
                del self._entries[key]
                await entry.aclose()


#: the one registry of the process (see the module invariants)
REGISTRY = WatchRegistry()
