"""Real etcd servers for tests and benchmarks: one member or a small cluster on loopback, and a small client.

`EtcdMember` runs Debian's ``etcd`` (3.4) as a child process on free
loopback ports with a data directory of its own; `start` waits until it
answers ``/health``, `kill` is a SIGKILL (a crash), `stop` a SIGTERM, and
`start` again brings the same member back with its data. `etcd_cluster`
starts several members of one cluster. `EtcdAdmin` writes, deletes,
compacts and sets up authentication through the v3 JSON gateway, the way
an operator's etcdctl would. `k8s_object` builds a Kubernetes protobuf value
as the API server stores it.

Every process is killed on exit of its context manager, so a failing test
leaves nothing running.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

from tapio.testing import prereq
from tapio.testing.process import free_port

#: how long a member may take to answer /health (it takes ~0.1 s; a busy CI machine more)
START_TIMEOUT = 30.0


def etcd_command() -> str:
    """The etcd binary, or the test's `prereq.missing` (a skip locally, a failure in CI)."""
    return prereq.command("etcd", "the etcd tests run etcd 3.4: apt-get install etcd-server (scripts/setup.sh does)")


@dataclass(frozen=True)
class ServerTLS:
    """Server certificate and key; with ``client_ca_file`` the member demands client certificates signed by it."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""


class EtcdMember:
    def __init__(self, data_dir: Path, *, name: str = "m0", tls: ServerTLS | None = None) -> None:
        self.data_dir = data_dir
        self.name = name
        self.tls = tls
        self.client_port = free_port()
        self.peer_port = free_port()
        self.initial_cluster = f"{name}=http://127.0.0.1:{self.peer_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = data_dir.with_name(data_dir.name + ".log")

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self) -> list[str]:
        cmd = [
            etcd_command(), "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster, "--initial-cluster-token", "tapio-test",
            "--logger", "zap", "--log-level", "error",
            # a loopback cluster elects a leader in well under a second with these
            "--heartbeat-interval", "10", "--election-timeout", "100",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            if self.tls.client_ca_file:
                cmd += ["--client-cert-auth", "--trusted-ca-file", self.tls.client_ca_file]
        return cmd

    def launch(self) -> None:
        """Start the process without waiting for it to serve (a cluster's members must start together)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def start(self, admin: "EtcdAdmin | None" = None) -> None:
        self.launch()
        self.wait_healthy(admin)

    def wait_healthy(self, admin: "EtcdAdmin | None" = None) -> None:
        """Wait until the member answers /health with true (it has a leader and can serve)."""
        probe = admin or EtcdAdmin(self.url)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"etcd {self.name} exited with {self.proc.returncode}:\n{self.log_text()}")
                if probe.healthy():
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd {self.name} not healthy after {START_TIMEOUT}s:\n{self.log_text()}")
                time.sleep(0.02)
        finally:
            if admin is None:
                probe.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: the member's data stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@contextlib.contextmanager
def etcd_member(tmp_path: Path, *, tls: ServerTLS | None = None, admin_tls: dict[str, Any] | None = None) -> Iterator[EtcdMember]:
    """One running member (killed on exit); ``admin_tls`` are the `EtcdAdmin` TLS arguments to check its health."""
    member = EtcdMember(tmp_path / "etcd-m0", tls=tls)
    probe = EtcdAdmin(member.url, **(admin_tls or {}))
    try:
        member.start(probe)
        yield member
    finally:
        probe.close()
        member.kill()


@contextlib.contextmanager
def etcd_cluster(tmp_path: Path, size: int = 3) -> Iterator[list[EtcdMember]]:
    """``size`` members of one cluster, started together and healthy (killed on exit)."""
    members = [EtcdMember(tmp_path / f"etcd-m{i}", name=f"m{i}") for i in range(size)]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    try:
        for m in members:
            m.initial_cluster = initial
            m.launch()
        for m in members:
            m.wait_healthy()
        yield members
    finally:
        for m in members:
            m.kill()


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class EtcdAdmin:
    """Writes to etcd through its JSON gateway (blocking; each call is one request).

    ``ca_file`` is the CA to trust and ``cert`` a (certificate, key) pair of
    PEM files for mutual TLS; with a ``user`` every call authenticates once and sends the token.
    """

    def __init__(self, url: str, *, ca_file: str = "", cert: tuple[str, str] | None = None, user: tuple[str, str] | None = None) -> None:
        self.url = url
        verify: ssl.SSLContext | bool = True
        if ca_file or cert:
            verify = ssl.create_default_context(cafile=ca_file or None)
            if cert:
                verify.load_cert_chain(*cert)
        self._client = httpx.Client(verify=verify, timeout=10, trust_env=False)
        self._user = user
        self._token: str | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "EtcdAdmin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {}
        if self._user is not None:
            if self._token is None:
                self._token = self._post("/v3/auth/authenticate", {"name": self._user[0], "password": self._user[1]}, {})["token"]
            headers["authorization"] = self._token
        return self._post(path, body, headers)

    def _post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        response = self._client.post(self.url + path, json=body, headers=headers)
        if response.status_code != 200:
            raise AssertionError(f"etcd {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def healthy(self) -> bool:
        try:
            response = self._client.get(self.url + "/health", timeout=1)
            return response.status_code == 200 and response.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def put(self, key: bytes | str, value: bytes | str) -> int:
        """Write ``key``; returns the revision of the write."""
        return int(self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})["header"]["revision"])

    def delete(self, key: bytes | str) -> int:
        """Delete ``key``; returns the revision of the delete."""
        return int(self.call("/v3/kv/deleterange", {"key": _b64(key)})["header"]["revision"])

    def txn_put(self, items: list[tuple[bytes | str, bytes | str]]) -> int:
        """Write several keys in one transaction (one revision); returns it."""
        ops = [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in items]
        return int(self.call("/v3/kv/txn", {"success": ops})["header"]["revision"])

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True})["header"]["revision"])

    def compact(self, revision: int) -> None:
        """Drop every revision before ``revision`` (waiting until it is done)."""
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def enable_auth(self, root_password: str, *, user: str = "", password: str = "", read_prefix: str = "") -> None:
        """Create root (and a ``user`` allowed to read keys from ``read_prefix``), then turn authentication on."""
        self.call("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        if user:
            self.call("/v3/auth/user/add", {"name": user, "password": password})
            self.call("/v3/auth/role/add", {"name": "reader"})
            key = read_prefix.encode() or b"\0"
            end = bytearray(key)
            end[-1] += 1
            self.call("/v3/auth/role/grant", {"name": "reader", "perm": {"permType": "READ", "key": _b64(key), "range_end": _b64(bytes(end))}})
            self.call("/v3/auth/user/grant", {"user": user, "role": "reader"})
        self.call("/v3/auth/enable", {})
        self._user = ("root", root_password)


# ---------------------------------------------------------------- Kubernetes protobuf values, from the published wire format
# (k8s.io/apimachinery runtime.Unknown and meta/v1 ObjectMeta field numbers), written
# independently of the receiver's decoder so tests check one against the other.


def varint(n: int) -> bytes:
    """A protobuf base-128 varint (negative numbers as their 64-bit two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field."""
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(field << 3 | 2) + varint(len(data)) + data


def vi(field: int, n: int) -> bytes:
    """A varint field."""
    return varint(field << 3) + varint(n)


def k8s_object(api_version: str, kind: str, *, name: str, namespace: str = "", uid: str = "", labels: dict[str, str] | None = None,
               created: int = 0, owners: list[dict[str, str]] | None = None, generation: int = 0, spec: bytes = b"") -> bytes:
    """A value as the API server stores it in protobuf: the ``k8s\\x00`` magic, then runtime.Unknown{typeMeta, raw = object{metadata, spec}}."""
    meta = ld(1, name)
    if namespace:
        meta += ld(3, namespace)
    if uid:
        meta += ld(5, uid)
    meta += ld(6, "12345")  # resourceVersion
    if generation:
        meta += vi(7, generation)
    if created:
        meta += ld(8, vi(1, created))  # Time{seconds}
    for k, v in (labels or {}).items():
        meta += ld(11, ld(1, k) + ld(2, v))  # map entry
    for o in owners or []:
        meta += ld(13, ld(1, o["kind"]) + ld(3, o["name"]) + ld(4, o["uid"]) + ld(5, o["apiVersion"]) + vi(6, 1))
    raw = ld(1, meta) + (ld(2, spec) if spec else b"")
    unknown = ld(1, ld(1, api_version) + ld(2, kind)) + ld(2, raw) + ld(4, "application/vnd.kubernetes.protobuf")
    return b"k8s\x00" + unknown
