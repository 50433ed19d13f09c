"""A stand-in kubelet: /stats/summary and /pods over HTTPS, for the kubeletstats receiver's tests and bench.

Why a stand-in: no kubelet can run here (it needs an API server to
register with and a node to manage), while what the receiver reads is two
documents. They are served as the kubelet serves them (JSON, on
``GET /stats/summary`` and ``GET /pods``), behind the kubelet's
authentication: TLS always, then a bearer token (401 without it, 403 with
another), a client certificate (the TLS handshake fails without one), or
nothing.

`FakeKubelet.accesses` names what each request served asks of the API
server when the kubelet authorizes it (webhook mode, a SubjectAccessReview):
`kubelet_access` maps a method and path as the kubelet does, so a test can
hold a ClusterRole against what the receiver really requested.

`summary_document` and `pod_list` build documents shaped as the kubelet's
published types (``k8s.io/kubelet/pkg/apis/stats/v1alpha1`` Summary and a
core/v1 PodList: the same field names, nesting and units) for any number of
pods, with the values a busy node shows.
"""

from __future__ import annotations

import json
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio

from tapio.httpserver import Request, Response, open_http_listeners, serve_http_listeners
from tapio.testing.fake_kube import Access
from tapio.testing.otlpsink import _TLSListener

__all__ = ["FakeKubelet", "kubelet_access", "open_fake_kubelet", "pod_list", "summary_document"]

#: kubelet path prefixes with a subresource of their own (any kubelet that authorizes through the API server)
_SUBRESOURCES = {"/stats": "stats", "/metrics": "metrics", "/logs": "log", "/spec": "spec", "/checkpoint": "checkpoint"}
#: paths the kubelet checks a fine-grained subresource for first, then nodes/proxy (KubeletFineGrainedAuthz:
#: beta and on by default from Kubernetes 1.33, always on from 1.36; before, only nodes/proxy)
_FINE_GRAINED = {"/pods": "pods", "/runningpods": "pods", "/healthz": "healthz", "/configz": "configz"}
_VERB_OF_METHOD = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def kubelet_access(method: str, path: str, node: str) -> tuple[Access, ...]:
    """What the kubelet asks the API server to authorize for a request, in the order it asks.

    One `Access` on ``nodes/<subresource>`` named ``node``; two for the
    paths with a fine-grained subresource (``nodes/pods`` for ``/pods``),
    whose second, ``nodes/proxy``, is what kubelets before 1.33 ask for and
    newer ones fall back to. nodes/proxy also authorizes exec, attach and
    port-forward in every container of the node.
    """
    verb = _VERB_OF_METHOD.get(method, method.lower())
    path = "/" + path.strip("/")
    for prefix, sub in _SUBRESOURCES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return (Access(verb, "", "nodes", sub, name=node),)
    proxy = Access(verb, "", "nodes", "proxy", name=node)
    fine = _FINE_GRAINED.get(path.lower())
    return (Access(verb, "", "nodes", fine, name=node), proxy) if fine else (proxy,)


@dataclass
class FakeKubelet:
    summary: bytes
    pods: bytes
    token: str | None = None
    port: int = 0
    #: (path, Authorization header) of each request served, in order
    requests: list[tuple[str, str]] = field(default_factory=list)
    #: when set, /stats/summary answers this status instead (e.g. 503)
    fail_with: int | None = None
    #: when set, /pods answers this status instead (e.g. 403: a kubelet that does not grant it)
    fail_pods_with: int | None = None
    #: the node this kubelet runs on (the name it authorizes requests for)
    node: str = "node-1"
    #: (method, path) of each request served, in order
    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def accesses(self) -> set[tuple[Access, ...]]:
        """What the requests so far asked to be authorized for: per request, the accesses the kubelet tries in turn."""
        return {kubelet_access(method, path, self.node) for method, path in self.calls}

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def handle(self, request: Request) -> Response:
        auth = next((v for k, v in request.headers if k.lower() == "authorization"), "")
        self.requests.append((request.path, auth))
        self.calls.append((request.method, request.path))
        if self.token is not None:
            if not auth:
                return Response(401, [("content-type", "text/plain")], b"Unauthorized")
            if auth != f"Bearer {self.token}":
                return Response(403, [("content-type", "text/plain")], b"Forbidden")
        if request.path == "/stats/summary":
            if self.fail_with is not None:
                return Response(self.fail_with, [("content-type", "text/plain")], b"failing on purpose")
            return Response(200, [("content-type", "application/json")], self.summary)
        if request.path == "/pods":
            if self.fail_pods_with is not None:
                return Response(self.fail_pods_with, [("content-type", "text/plain")], b"Forbidden (user=system:serviceaccount:observability:tapio, verb=get, resource=nodes, subresource=pods)")
            return Response(200, [("content-type", "application/json")], self.pods)
        return Response(404, [("content-type", "text/plain")], b"404 page not found")


@asynccontextmanager
async def open_fake_kubelet(
    summary: bytes, pods: bytes, *, cert_file: str, key_file: str, token: str | None = None, client_ca_file: str | None = None
) -> AsyncIterator[FakeKubelet]:
    """Serve the documents on 127.0.0.1 (a free port) until the block ends."""
    kubelet = FakeKubelet(summary, pods, token)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.load_verify_locations(client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    listeners = await open_http_listeners("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        kubelet.port = await nursery.start(
            lambda task_status: serve_http_listeners(
                kubelet.handle, [_TLSListener(l, ctx) for l in listeners], max_body_bytes=1024, task_status=task_status, name="fake-kubelet"
            )
        )
        yield kubelet
        nursery.cancel_scope.cancel()


def _t(i: int) -> str:
    return f"2025-05-20T10:{i % 60:02d}:{(i * 7) % 60:02d}.{(123456789 + i) % 10**9:09d}Z"


def summary_document(pods: int = 3, containers: int = 2, *, node: str = "node-1", volumes: int = 1) -> dict:
    """A /stats/summary document of ``pods`` pods with ``containers`` containers and ``volumes`` volumes each."""
    now = "2025-05-20T10:30:00.123456789Z"
    fs = {"time": now, "availableBytes": 40_000_000_000, "capacityBytes": 100_000_000_000, "usedBytes": 60_000_000_000,
          "inodesFree": 6_000_000, "inodes": 6_500_000, "inodesUsed": 500_000}
    out_pods = []
    for p in range(pods):
        uid = f"00000000-0000-4000-8000-{p:012d}"
        ctrs = []
        for c in range(containers):
            ctrs.append({
                "name": f"app-{c}",
                "startTime": _t(p + c),
                "cpu": {"time": now, "usageNanoCores": 1_500_000 * (c + 1), "usageCoreNanoSeconds": 45_000_000_000 + p},
                "memory": {"time": now, "availableBytes": 20_000_000, "usageBytes": 14_000_000 + p, "workingSetBytes": 12_000_000 + p,
                           "rssBytes": 9_000_000, "pageFaults": 5000, "majorPageFaults": 3},
                "rootfs": {**fs, "usedBytes": 40960, "inodesUsed": 12},
                "logs": {**fs, "usedBytes": 8192, "inodesUsed": 2},
            })
        out_pods.append({
            "podRef": {"name": f"web-{p}", "namespace": "shop", "uid": uid},
            "startTime": _t(p),
            "containers": ctrs,
            "cpu": {"time": now, "usageNanoCores": 1_500_000 * containers, "usageCoreNanoSeconds": 90_000_000_000 + p},
            "memory": {"time": now, "availableBytes": 40_000_000, "usageBytes": 28_000_000, "workingSetBytes": 24_000_000 + p,
                       "rssBytes": 18_000_000, "pageFaults": 10000, "majorPageFaults": 6},
            "network": {"time": now, "name": "eth0", "rxBytes": 1_000_000 + p, "rxErrors": 0, "txBytes": 2_000_000, "txErrors": 0,
                        "interfaces": [{"name": "eth0", "rxBytes": 1_000_000 + p, "rxErrors": 0, "txBytes": 2_000_000, "txErrors": 0}]},
            "volume": [{**fs, "name": f"data-{v}", **({"pvcRef": {"name": f"data-web-{p}", "namespace": "shop"}} if v == 0 else {})}
                       for v in range(volumes)],
            "ephemeral-storage": {**fs, "usedBytes": 57344, "inodesUsed": 16},
            "process_stats": {"process_count": containers},
        })
    return {
        "node": {
            "nodeName": node,
            "systemContainers": [{"name": "kubelet", "startTime": _t(0), "cpu": {"time": now, "usageNanoCores": 30_000_000, "usageCoreNanoSeconds": 9_000_000_000},
                                  "memory": {"time": now, "usageBytes": 80_000_000, "workingSetBytes": 60_000_000, "rssBytes": 50_000_000, "pageFaults": 0, "majorPageFaults": 0}}],
            "startTime": "2025-05-19T08:00:00Z",
            "cpu": {"time": now, "usageNanoCores": 350_000_000, "usageCoreNanoSeconds": 123_000_000_000_000},
            "memory": {"time": now, "availableBytes": 6_000_000_000, "usageBytes": 3_000_000_000, "workingSetBytes": 2_000_000_000,
                       "rssBytes": 1_500_000_000, "pageFaults": 100_000, "majorPageFaults": 100},
            "network": {"time": now, "name": "eth0", "rxBytes": 9_000_000_000, "rxErrors": 1, "txBytes": 8_000_000_000, "txErrors": 0,
                        "interfaces": [{"name": "eth0", "rxBytes": 9_000_000_000, "rxErrors": 1, "txBytes": 8_000_000_000, "txErrors": 0},
                                       {"name": "cni0", "rxBytes": 700_000, "rxErrors": 0, "txBytes": 600_000, "txErrors": 0}]},
            "fs": fs,
            "runtime": {"imageFs": {**fs, "usedBytes": 5_000_000_000}, "containerFs": {**fs, "usedBytes": 5_000_000_000}},
            "rlimit": {"time": now, "maxpid": 4194304, "curproc": 300},
        },
        "pods": out_pods,
    }


def pod_list(pods: int = 3, containers: int = 2, *, memory_limit: str = "64Mi", cpu_limit: str = "500m", volumes: int = 1) -> dict:
    """The /pods document matching `summary_document`: every container limited except the last of odd pods."""
    items = []
    for p in range(pods):
        ctrs = []
        for c in range(containers):
            limited = not (p % 2 == 1 and c == containers - 1)
            resources = {"requests": {"memory": "32Mi", "cpu": "100m"}}
            if limited:
                resources["limits"] = {"memory": memory_limit, "cpu": cpu_limit}
            ctrs.append({"name": f"app-{c}", "image": "registry.local/shop/web:1.4", "resources": resources})
        vols = [{"name": f"data-{v}", **({"persistentVolumeClaim": {"claimName": f"data-web-{p}"}} if v == 0 else {"emptyDir": {}})}
                for v in range(volumes)]
        items.append({
            "metadata": {"name": f"web-{p}", "namespace": "shop", "uid": f"00000000-0000-4000-8000-{p:012d}"},
            "spec": {"nodeName": "node-1", "containers": ctrs, "volumes": vols},
            "status": {"phase": "Running"},
        })
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}


def as_bytes(doc: dict) -> bytes:
    return json.dumps(doc).encode()
