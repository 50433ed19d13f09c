"""Flow datagrams for tests and benches: NetFlow v5/v9, IPFIX and sFlow v5 written from their specs, and real exporters.

The writers build exactly the bytes RFC 3954, RFC 7011 and sFlow v5 lay
out, so tests can make what no exporter at hand sends (options templates
with sampling, withdrawals, variable-length and enterprise fields, padding,
broken lengths). `run_softflowd` and `run_nfreplay` drive the real
exporters from Debian.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

#: a field of a template: (element id, length) or (element id, length, enterprise number)
FieldSpec = tuple[int, ...]


def _fields(fields: Iterable[FieldSpec], ipfix: bool) -> bytes:
    out = b""
    for f in fields:
        eid, length, *pen = f
        if pen and pen[0]:
            if not ipfix:
                raise ValueError("enterprise fields are IPFIX only")
            out += struct.pack("!HHI", eid | 0x8000, length, pen[0])
        else:
            out += struct.pack("!HH", eid, length)
    return out


def flow_set(set_id: int, body: bytes, pad_to: int = 4) -> bytes:
    """A set (flowset) with its header, padded with zeros to a multiple of ``pad_to`` bytes."""
    pad = (-(len(body) + 4)) % pad_to if pad_to > 1 else 0
    return struct.pack("!HH", set_id, len(body) + 4 + pad) + body + b"\x00" * pad


def template_set(templates: Sequence[tuple[int, Sequence[FieldSpec]]], *, ipfix: bool) -> bytes:
    """A template set: v9 set id 0, IPFIX set id 2; a template with no fields is an IPFIX withdrawal."""
    body = b"".join(struct.pack("!HH", tid, len(fields)) + _fields(fields, ipfix) for tid, fields in templates)
    return flow_set(2 if ipfix else 0, body, pad_to=1)


def options_template_set(template_id: int, scope: Sequence[FieldSpec], options: Sequence[FieldSpec], *, ipfix: bool) -> bytes:
    """An options template set (v9 set id 1, IPFIX set id 3)."""
    if ipfix:
        body = struct.pack("!HHH", template_id, len(scope) + len(options), len(scope)) + _fields([*scope, *options], True)
        return flow_set(3, body, pad_to=1)
    body = struct.pack("!HHH", template_id, 4 * len(scope), 4 * len(options)) + _fields([*scope, *options], False)
    return flow_set(1, body)


def v9_datagram(sets: Sequence[bytes], *, sequence: int = 0, source_id: int = 0, uptime_ms: int = 10_000, unix_secs: int = 1_700_000_000, count: int | None = None) -> bytes:
    header = struct.pack("!HHIIII", 9, len(sets) if count is None else count, uptime_ms, unix_secs, sequence, source_id)
    return header + b"".join(sets)


def ipfix_message(sets: Sequence[bytes], *, sequence: int = 0, domain: int = 0, export_time: int = 1_700_000_000) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), export_time, sequence, domain) + body


V5_RECORD = struct.Struct("!4s4s4sHHIIIIHHxBBBHHBBxx")


def v5_record(src: str, dst: str, *, sport: int = 0, dport: int = 0, proto: int = 6, packets: int = 1, octets: int = 64,
              first_ms: int = 0, last_ms: int = 0, tcp_flags: int = 0, tos: int = 0, in_if: int = 0, out_if: int = 0,
              next_hop: str = "0.0.0.0", src_as: int = 0, dst_as: int = 0, src_mask: int = 0, dst_mask: int = 0) -> bytes:
    return V5_RECORD.pack(socket.inet_aton(src), socket.inet_aton(dst), socket.inet_aton(next_hop), in_if, out_if, packets, octets,
                          first_ms, last_ms, sport, dport, tcp_flags, proto, tos, src_as, dst_as, src_mask, dst_mask)


def v5_datagram(records: Sequence[bytes], *, sequence: int = 0, uptime_ms: int = 10_000, unix_secs: int = 1_700_000_000,
                engine_type: int = 0, engine_id: int = 0, sampling: int = 0) -> bytes:
    header = struct.pack("!HHIIIIBBH", 5, len(records), uptime_ms, unix_secs, 0, sequence, engine_type, engine_id, sampling)
    return header + b"".join(records)


# -- sFlow v5 (XDR: big-endian, 4-byte aligned)


def _opaque(fmt: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("!II", fmt, len(body)) + body


def sflow_raw_header(header: bytes, *, frame_length: int | None = None, protocol: int = 1) -> bytes:
    """A raw packet header flow record (format 1) of an Ethernet frame (protocol 1) or IP packet (11, 12)."""
    length = len(header) if frame_length is None else frame_length
    return _opaque(1, struct.pack("!IIII", protocol, length, 4, len(header)) + header)


def sflow_switch(src_vlan: int, dst_vlan: int) -> bytes:
    return _opaque(1001, struct.pack("!IIII", src_vlan, 0, dst_vlan, 0))


def sflow_flow_sample(records: Sequence[bytes], *, sequence: int = 1, rate: int = 1, in_if: int = 1, out_if: int = 2, source: int = 1) -> bytes:
    body = struct.pack("!IIIIIIII", sequence, source, rate, sequence * rate, 0, in_if, out_if, len(records)) + b"".join(records)
    return _opaque(1, body)


def sflow_counter_sample(if_index: int, *, in_octets: int = 0, out_octets: int = 0, in_packets: int = 0, out_packets: int = 0,
                         in_errors: int = 0, out_errors: int = 0, in_discards: int = 0, out_discards: int = 0, sequence: int = 1) -> bytes:
    generic = struct.pack("!IIQIIQIIIIIIQIIIIII", if_index, 6, 1_000_000_000, 1, 3, in_octets, in_packets, 0, 0, in_discards, in_errors, 0,
                          out_octets, out_packets, 0, 0, out_discards, out_errors, 0)
    return _opaque(2, struct.pack("!III", sequence, if_index, 1) + _opaque(1, generic))


def sflow_datagram(samples: Sequence[bytes], *, agent: str = "192.0.2.1", sub_agent: int = 0, sequence: int = 1, uptime_ms: int = 10_000) -> bytes:
    if ":" in agent:
        addr = struct.pack("!I", 2) + socket.inet_pton(socket.AF_INET6, agent)
    else:
        addr = struct.pack("!I", 1) + socket.inet_aton(agent)
    return struct.pack("!I", 5) + addr + struct.pack("!IIII", sub_agent, sequence, uptime_ms, len(samples)) + b"".join(samples)


# -- real exporters


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (apt: softflowd / nfdump; scripts/setup.sh installs them)")
    return path


def run_softflowd(pcap: Path, port: int, version: int, *, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Export the flows of ``pcap`` with softflowd (v5, v9 or 10 = IPFIX) to ``host:port``; returns when it has exited.

    softflowd hangs when its control socket path has 13 or more characters,
    so it runs in a fresh short temporary directory with relative paths.
    It is stopped by its PID if it outlives ``timeout``.
    """
    workdir = tempfile.mkdtemp(prefix="sf", dir="/tmp")
    try:
        _run_tool(["softflowd", "-r", str(Path(pcap).resolve()), "-n", f"{host}:{port}", "-v", str(version), "-6", "-a", "-d", "-p", "p", "-c", "c"], timeout, cwd=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_tool(command: list[str], timeout: float, cwd: str | None = None) -> None:
    """Run an exporter to completion; killed by its PID past ``timeout``, RuntimeError with its stderr if it fails."""
    proc = subprocess.Popen([_tool(command[0]), *command[1:]], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} exited with {proc.returncode}: {err.decode(errors='replace')[-500:]}")


def capture_with_nfcapd(send, directory: Path, port: int, *, timeout: float = 20.0) -> Path:
    """Run nfcapd on ``port`` while ``send()`` exports to it; returns the capture file it wrote (nfcapd is stopped by PID)."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([_tool("nfcapd"), "-b", "127.0.0.1", "-p", str(port), "-w", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_udp_bound(port, proc, timeout)
        send()
    finally:
        proc.terminate()  # nfcapd writes its file on SIGTERM
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    files = sorted(p for p in directory.rglob("nfcapd.*") if p.is_file() and not p.name.startswith("nfcapd.current"))
    if not files:
        raise RuntimeError(f"nfcapd wrote no capture file in {directory}")
    return files[-1]


def run_nfreplay(capture: Path, port: int, version: int, *, timeout: float = 30.0) -> None:
    """Re-send a capture file's flows as NetFlow v5 or v9 to 127.0.0.1:``port`` with nfreplay."""
    _run_tool(["nfreplay", "-r", str(capture), "-H", "127.0.0.1", "-p", str(port), "-v", str(version)], timeout)


def udp_port_bound(port: int) -> bool:
    """Whether some socket has UDP ``port`` bound (IPv4 or IPv6), from /proc/net/udp{,6}."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                if any(line.split()[1].endswith(suffix) for line in f):
                    return True
        except OSError:
            continue
    return False


def _wait_udp_bound(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the collector exited with {proc.returncode} before binding port {port}")
        if udp_port_bound(port):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing bound UDP port {port} within {timeout}s")


# -- load for benches

#: softflowd's IPv4 flow template (element, length): what the benches send
SOFTFLOWD_V4_TEMPLATE: tuple[FieldSpec, ...] = (
    (8, 4), (12, 4), (22, 4), (21, 4), (1, 4), (2, 4), (10, 4), (14, 4), (61, 1), (136, 1), (7, 2), (11, 2), (4, 1), (6, 1), (60, 1), (5, 1),
)
_SOFTFLOWD_V4 = struct.Struct("!4s4sIIIIIIBBHHBBBB")


def blast(version: int, datagrams: int, *, records: int = 30, hosts: int = 256, seed: int = 1) -> list[bytes]:
    """``datagrams`` NetFlow v9 (9) or IPFIX (10) export packets of ``records`` flows each, the template in the first.

    Flows are between ``hosts`` addresses with random ports, TCP and UDP, so
    repeated values (addresses, protocols) repeat as on a real network.
    Sequence numbers follow the spec (v9: packets, IPFIX: data records).
    """
    import random

    rng = random.Random(seed)
    addrs = [socket.inet_aton(f"10.{i >> 8 & 255}.{i & 255}.1") for i in range(hosts)]
    ipfix = version == 10
    out = []
    sequence = 0
    for n in range(datagrams):
        body = b"".join(
            _SOFTFLOWD_V4.pack(rng.choice(addrs), rng.choice(addrs), 1000 + n, 2000 + n, rng.randrange(40, 1500 * 20), rng.randrange(1, 20),
                               1, 2, 0, 1, rng.randrange(1024, 65535), rng.choice((80, 443, 53, 22, 8080)), rng.choice((6, 6, 6, 17)), 0x18, 4, 0)
            for _ in range(records)
        )
        sets = [template_set([(1024, SOFTFLOWD_V4_TEMPLATE)], ipfix=ipfix)] if n == 0 else []
        sets.append(flow_set(1024, body, pad_to=1 if ipfix else 4))
        if ipfix:
            out.append(ipfix_message(sets, sequence=sequence, export_time=1_700_000_000 + n // 1000))
            sequence += records
        else:
            out.append(v9_datagram(sets, sequence=n, uptime_ms=100_000 + n, unix_secs=1_700_000_000 + n // 1000))
    return out
