"""Memory per open client connection: tapio's OTLP listeners against Python's threading HTTP server, in one run.

Starts ``tapio run`` with the otlp receiver (HTTP and gRPC, timeouts raised
so nothing is cut while measuring) and opens N connections of each kind that
a slow client leaves open: an HTTP request head cut short, a TCP connection
to the gRPC port that never starts HTTP/2, and one that starts HTTP/2 (the
preface and an empty SETTINGS frame) and then sends no call. For each kind it
waits until tapio holds all N sockets (counted in /proc/PID/fd) and divides
the growth of tapio's resident memory (VmRSS) by N. The peer is the standard
library's ThreadingHTTPServer (a thread per connection, what a small Python
agent would use) given the same cut-short heads. Kernel socket buffers are
not in RSS and are the same for both. Prints one JSON line.

Usage: bench_listener_connections.py [--connections N]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SLOW_HEAD = b"POST /v1/logs HTTP/1.1\r\nHost: x\r\n"
#: the client connection preface of HTTP/2 and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5)
HTTP2_START = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def settled_rss(pid: int) -> int:
    """RSS once it stopped moving (the server finished taking the connections in)."""
    last = rss_bytes(pid)
    while True:
        time.sleep(0.5)
        now = rss_bytes(pid)
        if abs(now - last) < 64 * 1024:
            return now
        last = now


def per_connection(pid: int, port: int, payload: bytes, n: int) -> float:
    """RSS growth of ``pid`` per connection while ``n`` connections that sent ``payload`` stay open."""
    fds0, rss0 = open_fds(pid), settled_rss(pid)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            if payload:
                s.sendall(payload)
            socks.append(s)
        wait_for(lambda: open_fds(pid) >= fds0 + n, f"{n} connections accepted ({open_fds(pid) - fds0} are)")
        rss1 = settled_rss(pid)
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: open_fds(pid) <= fds0 + 5, "the connections closed")
    return (rss1 - rss0) / n


def ready(url: str, proc: subprocess.Popen) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=1)
            return True
        except httpx.TransportError:
            return False

    wait_for(up, url, 30)


STDLIB_SERVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
        do_POST = do_GET
        def log_message(self, *args):
            pass

    ThreadingHTTPServer.request_queue_size = 4096
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=1000)
    args = ap.parse_args()
    n = args.connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * n + 100), hard))

    out: dict[str, object] = {"bench": "listener_connections", "connections": n}
    with tempfile.TemporaryDirectory() as tmp:
        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        cfg = Path(tmp, "bench.yaml")
        cfg.write_text(f"""
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:{http_port}", max_connections: {n + 50}, read_header_timeout: 10m}}
      grpc: {{endpoint: "127.0.0.1:{grpc_port}", handshake_timeout: 10m}}
exporters:
  debug: {{verbosity: basic}}
service:
  pipelines:
    logs: {{receivers: [otlp], exporters: [debug]}}
  telemetry:
    logs: {{level: warn}}
    metrics: {{address: "127.0.0.1:{metrics_port}"}}
""")
        proc = subprocess.Popen([str(ROOT / ".venv/bin/tapio"), "run", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            ready(f"http://127.0.0.1:{metrics_port}/readyz", proc)
            per_connection(proc.pid, http_port, SLOW_HEAD, min(n, 200))  # warm up allocators and trio's tables
            out["tapio_idle_rss_mb"] = round(rss_bytes(proc.pid) / 2**20, 1)
            out["tapio_http_slow_head_bytes_per_connection"] = round(per_connection(proc.pid, http_port, SLOW_HEAD, n))
            out["tapio_grpc_before_http2_bytes_per_connection"] = round(per_connection(proc.pid, grpc_port, b"", n))
            out["tapio_grpc_http2_idle_bytes_per_connection"] = round(per_connection(proc.pid, grpc_port, HTTP2_START, n))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    peer_port = free_port()
    peer = subprocess.Popen([sys.executable, "-c", STDLIB_SERVER, str(peer_port)], stderr=subprocess.PIPE)
    try:
        ready(f"http://127.0.0.1:{peer_port}/", peer)
        per_connection(peer.pid, peer_port, SLOW_HEAD, min(n, 200))
        out["stdlib_threading_http_slow_head_bytes_per_connection"] = round(per_connection(peer.pid, peer_port, SLOW_HEAD, n))
    finally:
        peer.terminate()
        peer.wait(timeout=30)
    out["ratio_tapio_http_vs_stdlib"] = round(
        out["tapio_http_slow_head_bytes_per_connection"] / out["stdlib_threading_http_slow_head_bytes_per_connection"], 3  # type: ignore[operator]
    )
    out["python"] = sys.version.split()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
