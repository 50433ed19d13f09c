"""A small routed network of namespaces with a real DNS server, for dns-xdp tests and benchmarks.

Three network namespaces, as on a Kubernetes node: a client (a pod), a
node that routes, and a server (a resolver pod running dnsmasq)::

    client [c0] ──veth── [vc] node [vs] ──veth── [s0] server (dnsmasq)
    10.77.1.2               10.77.1.1  10.77.2.1              10.77.2.2
    fd77:1::2               fd77:1::1  fd77:2::1              fd77:2::2

XDP on the node's two interfaces sees queries (entering vc) and responses
(entering vs); TC on either sees both directions. dnsmasq answers
``*.example.test`` (A 10.1.2.3, AAAA fd00::123), NXDOMAIN for
``*.nx.test``, forwards ``*.fail.test`` to an upstream resolver that
fails (answers SERVFAIL, as a resolver does whose own upstreams are down;
dnsmasq passes an upstream's REFUSED on as REFUSED, and waits out a silent
one) and ``*.slow.test`` to one that answers after `SLOW_DELAY`.

Invariants: every namespace, process and interface it made is removed by
`close` (deleting a namespace also removes XDP and TC attachments in it);
traffic only flows between these namespaces. Requires root, iproute2,
dnsmasq and dig (scripts/setup.sh installs them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

CLIENT4, NODE_C4, NODE_S4, SERVER4 = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
CLIENT6, NODE_C6, NODE_S6, SERVER6 = "fd77:1::2", "fd77:1::1", "fd77:2::1", "fd77:2::2"
ANSWER4, ANSWER6 = "10.1.2.3", "fd00::123"
SLOW_DELAY = 0.05
FAILING_PORT, SLOW_PORT = 5300, 5301

#: an upstream: answers every query with a response code (no records) after a delay
_UPSTREAM = r"""
import socket, sys, time, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
delay, rcode = float(sys.argv[3]), int(sys.argv[4])
def answer(q, addr):
    time.sleep(delay)
    i = 12
    while i < len(q) and q[i]:
        i += 1 + q[i]
    end = i + 5
    s.sendto(q[:2] + bytes([0x80 | (q[2] & 1), 0x80 | rcode]) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + q[12:end], addr)
while True:
    q, addr = s.recvfrom(4096)
    if len(q) > 12:
        threading.Thread(target=answer, args=(q, addr), daemon=True).start()
"""


#: a client that times one query by the kernel's own software timestamps of its send and of the
#: response's arrival (SO_TIMESTAMPING), so that its scheduling does not count
_TIMED_CLIENT = r"""
import json, select, socket, struct, sys, time
import dns.message, dns.rcode
SO_TIMESTAMPING = 37
TX_SOFTWARE, RX_SOFTWARE, SOFTWARE, OPT_TSONLY = 1 << 1, 1 << 3, 1 << 4, 1 << 11
server, name, qtype, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, TX_SOFTWARE | RX_SOFTWARE | SOFTWARE | OPT_TSONLY)
s.settimeout(timeout)
s.connect((server, 53))
def stamp(ancillary):
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING:
            sec, nsec = struct.unpack_from("qq", data)
            return sec * 10**9 + nsec
    raise SystemExit("no kernel timestamp")
s.send(dns.message.make_query(name, qtype).to_wire())
sent = None
deadline = time.monotonic() + timeout
while sent is None:
    try:
        sent = stamp(s.recvmsg(2048, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)[1])
    except BlockingIOError:
        if time.monotonic() > deadline:
            raise SystemExit("no transmit timestamp")
        select.select([], [], [s], 0.01)
data, ancillary, _, _ = s.recvmsg(65535, 1024)
r = dns.message.from_wire(data)
print(json.dumps({"ns": stamp(ancillary) - sent, "rcode": dns.rcode.to_text(r.rcode()), "port": s.getsockname()[1]}))
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class DigResult:
    status: str
    query_ms: int | None
    answers: list[str]
    output: str


class DnsNet:
    def __init__(self, prefix: str | None = None) -> None:
        p = prefix or "dx" + uuid.uuid4().hex[:6]
        self.prefix = p
        self.client, self.node, self.server = f"{p}c", f"{p}n", f"{p}s"
        self._procs: dict[str, subprocess.Popen] = {}
        self._made: list[str] = []
        try:
            self._build()
            self.start_dns()
        except BaseException:
            self.close()
            raise

    @property
    def node_ns(self) -> str:
        return f"/var/run/netns/{self.node}"

    @property
    def server_ns(self) -> str:
        return f"/var/run/netns/{self.server}"

    @property
    def client_ns(self) -> str:
        return f"/var/run/netns/{self.client}"

    def _build(self) -> None:
        c, n, s = self.client, self.node, self.server
        for ns in (c, n, s):
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{self.prefix}a", "type", "veth", "peer", "name", f"{self.prefix}b")
        sh("ip", "link", "set", f"{self.prefix}a", "netns", n, "name", "vc")
        sh("ip", "link", "set", f"{self.prefix}b", "netns", c, "name", "c0")
        sh("ip", "link", "add", f"{self.prefix}a", "type", "veth", "peer", "name", f"{self.prefix}b")
        sh("ip", "link", "set", f"{self.prefix}a", "netns", n, "name", "vs")
        sh("ip", "link", "set", f"{self.prefix}b", "netns", s, "name", "s0")
        for ns, dev, a4, a6 in ((c, "c0", CLIENT4, CLIENT6), (n, "vc", NODE_C4, NODE_C6), (n, "vs", NODE_S4, NODE_S6), (s, "s0", SERVER4, SERVER6)):
            sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", c, "route", "add", "default", "via", NODE_C4)
        sh("ip", "-n", c, "-6", "route", "add", "default", "via", NODE_C6)
        sh("ip", "-n", s, "route", "add", "default", "via", NODE_S4)
        sh("ip", "-n", s, "-6", "route", "add", "default", "via", NODE_S6)
        sh("ip", "netns", "exec", n, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

    def _spawn(self, key: str, ns: str, *cmd: str) -> None:
        self._procs[key] = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start_dns(self) -> None:
        """Start the server's dnsmasq (and its two upstreams) and wait until it answers."""
        s = self.server
        common = ["dnsmasq", "--keep-in-foreground", "--no-hosts", "--bind-interfaces", "--user=root", "--pid-file=", "--cache-size=0"]
        if "failing" not in self._procs:
            self._spawn("failing", s, sys.executable, "-c", _UPSTREAM, SERVER4, str(FAILING_PORT), "0", "2")
            self._spawn("slow", s, sys.executable, "-c", _UPSTREAM, SERVER4, str(SLOW_PORT), str(SLOW_DELAY), "0")
        self._spawn(
            "dnsmasq", s, *common, "--no-resolv", f"--listen-address={SERVER4}", f"--listen-address={SERVER6}", "--port=53",
            f"--address=/example.test/{ANSWER4}", f"--address=/example.test/{ANSWER6}", "--address=/nx.test/",
            f"--server=/fail.test/{SERVER4}#{FAILING_PORT}", f"--server=/slow.test/{SERVER4}#{SLOW_PORT}",
        )
        deadline = time.monotonic() + 10
        ready = {SERVER4: False, SERVER6: False}
        while True:
            for server in ready:
                ready[server] = ready[server] or self.dig("ready.example.test", server=server, timeout=1).status == "NOERROR"
            if all(ready.values()) and self.dig("ready.slow.test").status == "NOERROR":
                return
            r = self.dig("ready.example.test", timeout=1)
            proc = self._procs["dnsmasq"]
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited ({proc.returncode}): {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq does not answer: {r.output}")
            time.sleep(0.05)

    def start_loopback_dns(self) -> None:
        """A second dnsmasq in the server namespace, on 127.0.0.1 only (as a node-local resolver); `stop_dns("loopback")` stops it."""
        s = self.server
        self._spawn(
            "loopback", s, "dnsmasq", "--keep-in-foreground", "--no-hosts", "--bind-interfaces", "--user=root", "--pid-file=", "--cache-size=0",
            "--no-resolv", "--listen-address=127.0.0.1", "--port=53", f"--address=/example.test/{ANSWER4}",
        )
        deadline = time.monotonic() + 10
        while self.dig("ready.example.test", server="127.0.0.1", timeout=1, ns=s).status != "NOERROR":
            proc = self._procs["loopback"]
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the loopback dnsmasq does not answer (exit code {proc.poll()})")
            time.sleep(0.05)

    def stop_dns(self, which: str = "dnsmasq") -> None:
        """Stop the server's dnsmasq (or the loopback one): queries to it go unanswered."""
        proc = self._procs.pop(which, None)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()

    def dig_command(self, name: str, qtype: str = "A", *, server: str = SERVER4, timeout: float = 2, tcp: bool = False, ns: str | None = None) -> list[str]:
        cmd = ["ip", "netns", "exec", ns or self.client, "dig", f"@{server}", name, qtype, "+tries=1", f"+time={max(1, int(timeout))}"]
        return cmd + (["+tcp"] if tcp else [])

    def dig(self, name: str, qtype: str = "A", **kwargs) -> DigResult:
        out = subprocess.run(self.dig_command(name, qtype, **kwargs), capture_output=True, text=True).stdout
        return parse_dig(out)

    def timed_query_command(self, name: str, qtype: str = "A", *, server: str = SERVER4, timeout: float = 2) -> list[str]:
        """A dnspython client in the client namespace; prints {"ns" (kernel send to kernel receive), "rcode", "port"} as JSON."""
        return ["ip", "netns", "exec", self.client, sys.executable, "-c", _TIMED_CLIENT, server, name, qtype, str(timeout)]

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        self._procs.clear()
        for ns in reversed(self._made):
            sh("ip", "netns", "del", ns, check=False)
        self._made.clear()

    def __enter__(self) -> "DnsNet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_dig(out: str) -> DigResult:
    status = re.search(r"status: (\w+)", out)
    ms = re.search(r"Query time: (\d+) msec", out)
    answers = []
    section = False
    for line in out.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            section = True
        elif section and not line.strip():
            section = False
        elif section:
            answers.append(line.split()[-1])
    return DigResult(status.group(1) if status else "", int(ms.group(1)) if ms else None, answers, out)

