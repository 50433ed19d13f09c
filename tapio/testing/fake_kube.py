"""A stand-in Kubernetes API server for tests: real list/watch over HTTP, no cluster behind it.

No kube-apiserver can be installed where tapio's tests run, so this small
server plays one. It is a test double, not a Kubernetes implementation: it
stores objects as the JSON a test gives it and speaks the parts of the API
protocol that clients of list and watch rely on, as the real server does:

- ``GET /api/v1/<resource>``, ``/api/v1/namespaces/<ns>/<resource>`` and the
  ``/apis/<group>/<version>/...`` forms list objects as ``<Kind>List`` with
  ``metadata.resourceVersion``; ``limit`` and ``continue`` page a list;
  ``GET .../<resource>/<name>`` gets one object (404 with a Status when absent).
- ``?watch=true`` answers 200 with a chunked body of one JSON watch event per
  line: ``{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}``.
  From a ``resourceVersion`` it replays the changes after it; without one
  (or ``0``) it first sends the current objects as ADDED. A resourceVersion
  older than the last `FakeKube.compact` gets an ERROR event carrying a
  Status with ``code: 410, reason: Expired``, as the real server answers
  once etcd compacted the revision. ``allowWatchBookmarks`` enables BOOKMARK
  events (sent by `FakeKube.bookmark`); ``timeoutSeconds`` ends the watch.
- ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``,
  ``!key``) and ``fieldSelector`` (``=``, ``==``, ``!=`` on dotted paths such
  as ``spec.nodeName`` and ``metadata.name``) filter lists and watches; a
  watched object that stops matching is sent as DELETED, one that starts
  matching as ADDED, as the real server does.
- With ``token`` set, requests without ``Authorization: Bearer <token>``
  get 401; with ``tls`` (a certificate and key file) it serves HTTPS; with
  `FakeKube.outage` set every request gets 503.

Every request, whatever its method, is recorded in `FakeKube.requests`, so
tests can count lists and watches; `FakeKube.accesses` turns them into what
each asks of the API server's authorizer (`Access`: verb, API group,
resource, subresource, namespace, name, as RBAC rules match them), so a
test can hold a ClusterRole against what the components really requested.
Methods other than GET are recorded and then refused (405): nothing here
writes. Resource versions are one counter across all resources (the
real server's etcd revision). It runs in a thread of its own, so synchronous
clients (the `kubernetes` package) and trio code can both use it.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import yaml

#: resource (plural) -> (group/version path prefix, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "pods": ("api/v1", "Pod", True),
    "nodes": ("api/v1", "Node", False),
    "namespaces": ("api/v1", "Namespace", False),
    "events": ("api/v1", "Event", True),
    "services": ("api/v1", "Service", True),
    "replicasets": ("apis/apps/v1", "ReplicaSet", True),
    "deployments": ("apis/apps/v1", "Deployment", True),
    "statefulsets": ("apis/apps/v1", "StatefulSet", True),
    "daemonsets": ("apis/apps/v1", "DaemonSet", True),
    "jobs": ("apis/batch/v1", "Job", True),
    "cronjobs": ("apis/batch/v1", "CronJob", True),
}
_API_VERSION = {prefix: prefix.removeprefix("apis/").removeprefix("api/") for prefix, _, _ in RESOURCES.values()}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    #: the Authorization header as sent ("" when none)
    authorization: str = ""

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")

    @property
    def access(self) -> "Access":
        return access_of(self.method, self.path, self.query)


@dataclass(frozen=True)
class Access:
    """What one request asks the API server's authorizer for, as its request-info step derives it.

    For a resource request: the verb (get, list, watch for GETs; create,
    update, patch, delete, deletecollection for the rest), the API group
    ("" for the core group), the resource, its subresource, the namespace
    and the object's name (for get and the other verbs on one object).
    A request outside the resource paths (``/version``, ``/api``, ...) is a
    non-resource request: ``resource`` is empty and ``path`` names it.
    """

    verb: str
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    @property
    def is_resource(self) -> bool:
        return bool(self.resource)


_VERB_OF_METHOD = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def access_of(method: str, path: str, query: dict[str, str]) -> Access:
    """The `Access` an API request asks for (the real server's request-info rules, for the paths clients use)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        rest = []
    verb = _VERB_OF_METHOD.get(method, "get")
    if not rest:
        return Access(verb, path=path)
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:  # /namespaces/<ns>/<resource>...; /namespaces/<ns> alone is the namespace itself
        namespace, rest = rest[1], rest[2:]
    resource, name, subresource = rest[0], rest[1] if len(rest) > 1 else "", "/".join(rest[2:])
    if rest[0] == "namespaces" and len(rest) >= 2:
        namespace = rest[1]
    watching = query.get("watch") in ("true", "1")
    if method == "GET":
        verb = "watch" if watching else ("get" if name else "list")
    elif method == "DELETE" and not name:
        verb = "deletecollection"
    return Access(verb, group, resource, subresource, namespace, name)


@dataclass
class _Change:
    rv: int
    resource: str
    type: str
    obj: dict
    old: dict | None


@dataclass
class _Watch:
    resource: str
    namespace: str
    labels: str
    fields: str
    bookmarks: bool
    #: events queued for this watch's writer (None: end the watch)
    queue: list = field(default_factory=list)


class FakeKube:
    """The stand-in API server (see the module docstring). Use as a context manager or call `start`/`stop`."""

    def __init__(self, *, token: str = "", tls: tuple[str, str] | None = None) -> None:
        self.token = token
        self._tls = tls
        self._lock = threading.Condition()
        self._rv = 100
        self._compacted = 0
        self._objects: dict[str, dict[tuple[str, str], dict]] = {r: {} for r in RESOURCES}
        self._log: list[_Change] = []
        self._watches: list[_Watch] = []
        self.requests: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: while set, every request is answered 503 (an API server that is down behind its load balancer)
        self.outage = False

    # -- lifecycle

    def start(self) -> "FakeKube":
        fake = self

        class Handler(_Handler):
            kube = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self._tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self._tls)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kube", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.end_watches()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeKube":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake first"
        host, port = self._server.server_address[:2]
        return f"{'https' if self._tls else 'http'}://{host}:{port}"

    def write_kubeconfig(self, path: str | Path, *, context: str = "fake", ca_file: str = "", token: str | None = None) -> Path:
        """A kubeconfig file whose current context points at this server (with its token)."""
        cluster: dict[str, Any] = {"server": self.url}
        if ca_file:
            cluster["certificate-authority"] = ca_file
        user: dict[str, Any] = {}
        tok = self.token if token is None else token
        if tok:
            user["token"] = tok
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(doc))
        return path

    # -- objects

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def apply(self, resource: str, obj: dict) -> dict:
        """Create or replace an object (ADDED or MODIFIED); returns the stored copy with its resourceVersion.

        Replacing keeps the stored object's uid and creationTimestamp, as an update does.
        """
        prefix, kind, namespaced = RESOURCES[resource]
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", _API_VERSION[prefix])
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta.setdefault("namespace", "default")
        key = (meta.get("namespace", ""), meta["name"])
        with self._lock:
            old = self._objects[resource].get(key)
            if old is not None:  # uid and creation time are immutable: an update keeps them
                meta["uid"] = old["metadata"]["uid"]
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._objects[resource][key] = obj
            self._record(_Change(self._rv, resource, "MODIFIED" if old else "ADDED", obj, old))
            return copy.deepcopy(obj)

    def delete(self, resource: str, name: str, namespace: str = "") -> dict:
        """Delete an object (DELETED carries its last state with a new resourceVersion)."""
        _, _, namespaced = RESOURCES[resource]
        key = (namespace or ("default" if namespaced else ""), name)
        with self._lock:
            obj = self._objects[resource].pop(key)
            obj = copy.deepcopy(obj)
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._record(_Change(self._rv, resource, "DELETED", obj, None))
            return obj

    def get(self, resource: str, name: str, namespace: str = "") -> dict | None:
        _, _, namespaced = RESOURCES[resource]
        with self._lock:
            found = self._objects[resource].get((namespace or ("default" if namespaced else ""), name))
            return copy.deepcopy(found) if found else None

    def compact(self) -> int:
        """Forget the change history up to now: watches from an older resourceVersion get 410 Expired."""
        with self._lock:
            self._compacted = self._rv
            self._log.clear()
            return self._rv

    def expire_watches(self) -> None:
        """Compact and end every open watch with a 410 Expired ERROR event (as after etcd compaction)."""
        with self._lock:
            self._compacted = self._rv
            self._log.clear()
            for w in self._watches:
                w.queue.append(_expired_event())
                w.queue.append(None)
            self._lock.notify_all()

    def bookmark(self) -> int:
        """Send a BOOKMARK with the current resourceVersion to every watch that allows bookmarks."""
        with self._lock:
            for w in self._watches:
                if w.bookmarks:
                    prefix, kind, _ = RESOURCES[w.resource]
                    w.queue.append({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": _API_VERSION[prefix], "metadata": {"resourceVersion": str(self._rv)}}})
            self._lock.notify_all()
            return self._rv

    def inject_line(self, text: str) -> None:
        """Send ``text`` as a line to every open watch (to test how clients take a malformed event)."""
        with self._lock:
            for w in self._watches:
                w.queue.append(text)
            self._lock.notify_all()

    def end_watches(self) -> None:
        """Close every open watch (clients see the stream end, as when the server times it out)."""
        with self._lock:
            for w in self._watches:
                w.queue.append(None)
            self._lock.notify_all()

    def open_watches(self, resource: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watches if resource is None or w.resource == resource)

    def accesses(self) -> set[Access]:
        """What the requests so far asked the authorizer for (see `Access`)."""
        with self._lock:
            return {r.access for r in self.requests}

    def count(self, resource: str, *, watch: bool) -> int:
        """Requests recorded for a resource's collection: lists (watch=False) or watches."""
        return sum(1 for r in list(self.requests) if _collection(r.path) == resource and r.watch == watch)

    # -- internals (called under the lock)

    def _record(self, change: _Change) -> None:
        self._log.append(change)
        for w in self._watches:
            if w.resource == change.resource:
                ev = _event_for(w, change)
                if ev is not None:
                    w.queue.append(ev)
        self._lock.notify_all()

    def _list(self, resource: str, namespace: str, labels: str, fields: str) -> list[dict]:
        return [
            o
            for (ns, _), o in sorted(self._objects[resource].items())
            if (not namespace or ns == namespace) and _matches(o, labels, fields)
        ]


def _collection(path: str) -> str | None:
    parts = [p for p in path.split("/") if p]
    for i, p in enumerate(parts):
        if p in RESOURCES and (i + 1 == len(parts)):
            return p
    return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expired_event() -> dict:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version",
            "reason": "Expired",
            "code": 410,
        },
    }


def _event_for(w: _Watch, change: _Change) -> dict | None:
    ns = change.obj["metadata"].get("namespace", "")
    if w.namespace and ns != w.namespace:
        return None
    now = _matches(change.obj, w.labels, w.fields)
    before = change.old is not None and _matches(change.old, w.labels, w.fields)
    if change.type == "DELETED":
        return {"type": "DELETED", "object": change.obj} if now else None
    if change.type == "ADDED" or not before:
        return {"type": "ADDED", "object": change.obj} if now else None
    return {"type": "MODIFIED" if now else "DELETED", "object": change.obj}


# ---------------------------------------------------------------- selectors

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _label_match(labels: dict[str, str], requirement: str) -> bool:
    m = _SET_RE.match(requirement)
    if m:
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
        return (labels.get(key) in values) if op == "in" else (labels.get(key) not in values)
    if "!=" in requirement:
        key, value = (s.strip() for s in requirement.split("!=", 1))
        return labels.get(key) != value
    if "=" in requirement:
        key, value = (s.strip() for s in requirement.replace("==", "=").split("=", 1))
        return labels.get(key) == value
    if requirement.startswith("!"):
        return requirement[1:].strip() not in labels
    return requirement in labels


def _field_value(obj: dict, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    return "" if cur is None else str(cur)


def _matches(obj: dict, labels: str, fields: str) -> bool:
    obj_labels = obj.get("metadata", {}).get("labels") or {}
    if labels and not all(_label_match(obj_labels, r) for r in _split_selector(labels)):
        return False
    for req in _split_selector(fields) if fields else []:
        if "!=" in req:
            key, value = req.split("!=", 1)
            if _field_value(obj, key.strip()) == value.strip():
                return False
        else:
            key, value = req.replace("==", "=").split("=", 1)
            if _field_value(obj, key.strip()) != value.strip():
                return False
    return True


# ---------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _recorded(self) -> tuple[Any, dict[str, str], str]:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        auth = self.headers.get("Authorization", "")
        with self.kube._lock:
            self.kube.requests.append(RecordedRequest(self.command, url.path, query, auth))
        return url, query, auth

    def _refuse_write(self) -> None:
        self._recorded()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._status(405, "MethodNotAllowed", f"{self.command} is not served by this stand-in: it only lists, watches and gets")

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse_write  # noqa: N815 - the http.server API

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        url, query, auth = self._recorded()
        kube = self.kube
        if kube.outage:
            return self._status(503, "ServiceUnavailable", "the API server is down")
        if kube.token and auth != f"Bearer {kube.token}":
            return self._status(401, "Unauthorized", "no or wrong bearer token")
        route = _route(url.path)
        if route is None:
            return self._status(404, "NotFound", f"the server could not find the requested resource ({url.path})")
        resource, namespace, name = route
        if name:
            found = kube.get(resource, name, namespace)
            if found is None:
                return self._status(404, "NotFound", f'{resource} "{name}" not found')
            return self._json(200, found)
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        if query.get("watch") in ("true", "1"):
            return self._watch(resource, namespace, labels, fields, query)
        with kube._lock:
            items = kube._list(resource, namespace, labels, fields)
            rv = kube._rv
        start = 0
        token = query.get("continue", "")
        if token:
            rv_s, _, start_s = token.partition(":")
            rv, start = int(rv_s), int(start_s)
        limit = int(query.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        page = items[start:]
        if limit and len(page) > limit:
            page = page[:limit]
            meta["continue"] = f"{rv}:{start + limit}"
            meta["remainingItemCount"] = len(items) - start - limit
        prefix, kind, _ = RESOURCES[resource]
        self._json(200, {"kind": f"{kind}List", "apiVersion": _API_VERSION[prefix], "metadata": meta, "items": page})

    def _watch(self, resource: str, namespace: str, labels: str, fields: str, query: dict[str, str]) -> None:
        kube = self.kube
        w = _Watch(resource, namespace, labels, fields, query.get("allowWatchBookmarks") in ("true", "1"))
        rv_text = query.get("resourceVersion", "")
        timeout = float(query.get("timeoutSeconds") or 0) or None
        with kube._lock:
            if rv_text in ("", "0"):
                w.queue.extend({"type": "ADDED", "object": o} for o in kube._list(resource, namespace, labels, fields))
            else:
                rv = int(rv_text)
                if rv < kube._compacted:
                    w.queue.append(_expired_event())
                    w.queue.append(None)
                else:
                    for change in kube._log:
                        if change.rv > rv and change.resource == resource:
                            ev = _event_for(w, change)
                            if ev is not None:
                                w.queue.append(ev)
            kube._watches.append(w)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        # the connection is closed when the watch ends: say so, or a client may send its next request on it
        self.send_header("Connection", "close")
        self.end_headers()
        deadline = None if timeout is None else _monotonic() + timeout
        try:
            for ev in _drain(kube, w, deadline):
                line = (ev.encode() if isinstance(ev, str) else json.dumps(ev).encode()) + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass
        finally:
            with kube._lock:
                kube._watches.remove(w)
            self.close_connection = True

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})


def _monotonic() -> float:
    import time

    return time.monotonic()


def _drain(kube: FakeKube, w: _Watch, deadline: float | None) -> Iterator[dict]:
    while True:
        with kube._lock:
            while not w.queue:
                left = None if deadline is None else deadline - _monotonic()
                if left is not None and left <= 0:
                    return
                kube._lock.wait(timeout=left if left is not None else 1.0)
                if kube._server is None:
                    return
            ev = w.queue.pop(0)
        if ev is None:
            return
        yield ev


def _route(path: str) -> tuple[str, str, str] | None:
    """(resource, namespace, name) for an API path, or None."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api" and parts[1] == "v1":
        rest = parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        rest = parts[3:]
        if f"apis/{parts[1]}/{parts[2]}" not in _API_VERSION:
            return None
    else:
        return None
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in RESOURCES:
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in RESOURCES or len(rest) > 2:
        return None
    resource = rest[0]
    prefix = RESOURCES[resource][0]
    if not path.lstrip("/").startswith(prefix + "/"):
        return None
    return resource, namespace, rest[1] if len(rest) == 2 else ""


# ---------------------------------------------------------------- objects for tests


def pod(
    name: str,
    *,
    namespace: str = "default",
    node: str = "node-1",
    uid: str | None = None,
    ip: str = "",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    owner: dict | None = None,
    containers: dict[str, str] | None = None,
    phase: str = "Running",
    host_network: bool = False,
    container_states: dict[str, dict] | None = None,
    restart_counts: dict[str, int] | None = None,
) -> dict:
    """A Pod as the API returns it. ``containers`` maps container name -> container id (``containerd://<hex>``)."""
    containers = containers if containers is not None else {"app": ""}
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()), "labels": labels or {}, "annotations": annotations or {}}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    status: dict[str, Any] = {
        "phase": phase,
        "startTime": _now(),
        "conditions": [{"type": "Ready", "status": "True" if phase == "Running" else "False"}],
        "containerStatuses": [
            {
                "name": cname,
                "image": f"registry.example/{cname}:1.0",
                "imageID": "",
                "containerID": cid,
                "ready": phase == "Running",
                "restartCount": (restart_counts or {}).get(cname, 0),
                "state": (container_states or {}).get(cname, {"running": {"startedAt": _now()}}),
            }
            for cname, cid in containers.items()
        ],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": c, "image": f"registry.example/{c}:1.0"} for c in containers],
        },
        "status": status,
    }


def owner_ref(kind: str, name: str, uid: str, api_version: str = "apps/v1") -> dict:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True, "blockOwnerDeletion": True}


def replicaset(name: str, *, namespace: str = "default", uid: str | None = None, deployment: tuple[str, str] | None = None) -> dict:
    """A ReplicaSet, owned by the Deployment ``(name, uid)`` when given."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4())}
    if deployment is not None:
        meta["ownerReferences"] = [owner_ref("Deployment", deployment[0], deployment[1])]
    return {"metadata": meta, "spec": {"selector": {"matchLabels": {}}}, "status": {"replicas": 1}}


def job(name: str, *, namespace: str = "default", uid: str | None = None, cronjob: tuple[str, str] | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4())}
    if cronjob is not None:
        meta["ownerReferences"] = [owner_ref("CronJob", cronjob[0], cronjob[1], "batch/v1")]
    return {"metadata": meta, "spec": {"template": {"spec": {"containers": [{"name": "job"}]}}}, "status": {}}


def node(name: str, *, ready: str = "True", labels: dict[str, str] | None = None, uid: str | None = None, ip: str = "10.0.0.1") -> dict:
    return {
        "metadata": {"name": name, "uid": uid or str(uuid.uuid4()), "labels": labels or {}},
        "spec": {},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {"type": "Ready", "status": ready, "reason": "KubeletReady" if ready == "True" else "KubeletNotReady", "message": ""},
            ],
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        },
    }


def namespace(name: str, *, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict:
    return {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}, "spec": {}, "status": {"phase": "Active"}}


def event(
    name: str,
    *,
    namespace: str = "default",
    reason: str,
    message: str,
    involved: dict,
    type: str = "Normal",
    count: int = 1,
    component: str = "kubelet",
    host: str = "node-1",
) -> dict:
    """A core/v1 Event about ``involved`` (a dict with kind, name, namespace, uid)."""
    now = _now()
    return {
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", **involved},
        "reason": reason,
        "message": message,
        "type": type,
        "count": count,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": component, "host": host},
        "reportingComponent": component,
        "reportingInstance": host,
    }
