"""etcd-watch events/s against a local etcd 3.4, beside etcdctl watching the same prefix in the same run.

Run: ``.venv/bin/python bench/bench_etcd_watch.py [--backlog N] [--storm-seconds S] [--writers W]``.

Values are what the Kubernetes API server writes: half protobuf pods (the
``k8s\\x00`` runtime.Unknown envelope, ~0.5 KiB), half JSON custom objects
(~1 KiB), cycling over a few hundred keys so every event has a previous
value (the watch asks for ``prev_kv``, as the receiver does by default).
etcd's data directory is on tmpfs when /dev/shm exists, so its fsyncs do
not set the pace.

Two measurements, each on one fresh member:

- ``catchup``: a backlog of N events (10 keys per transaction) is written
  first, then each watcher reads it from the backlog's first revision:
  the tapio receiver (records built, batches handed to a consumer that
  reports them delivered: the checkpoint path runs), etcdctl (Go, gRPC;
  output to a pipe, counted), and a bare JSON-gateway read with httpx that
  only counts events (the transport's floor in Python). Median of 3 rounds.
- ``storm``: writer processes put single keys as fast as etcd takes them
  for S seconds while the receiver and etcdctl watch live; reported: etcd's
  put rate, the receiver's delivered rate, how long after the last put each
  watcher had every event, and the receiver's events per CPU-second (this
  process runs only the receiver while it is measured).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import decode_dataclass
from tapio.pdata import Batch, Signal
from tapio.receivers.etcd_watch import factory
from tapio.telemetry import Telemetry
from tapio.receivers.etcd_watch._component import prefix_range
from tapio.testing.etcd import EtcdMember, k8s_object, ld

PREFIX = "/registry/"
#: distinct keys the writers cycle over (each write after the first of a key has a previous value)
KEYS = 500
#: keys per transaction of the backlog writer (one revision each)
PER_TXN = 10
ROUNDS = 3
#: how long a watcher may take to see every event before the bench gives up
DEADLINE = 120.0


def value(i: int) -> bytes:
    """The i-th value written: alternately a protobuf pod and a JSON custom object."""
    if i % 2 == 0:
        return k8s_object(
            "v1", "Pod", name=f"web-{i % KEYS}", namespace="shop", uid=f"uid-{i % KEYS:08d}", labels={"app": "web", "pod-template-hash": "5d8f7c"},
            created=1700000000, generation=i, owners=[{"kind": "ReplicaSet", "name": "web-5d8f7c", "uid": "rs-uid", "apiVersion": "apps/v1"}],
            spec=ld(2, b"x" * 200),  # a container, which the decoder skips
        )
    return json.dumps({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": f"w-{i % KEYS}", "namespace": "shop", "uid": f"uid-w-{i % KEYS:08d}", "generation": i,
                     "labels": {"app": "widget", "team": "platform"}, "annotations": {"note": "n" * 300}},
        "spec": {"replicas": 3, "template": {"image": "registry.example.com/widget:1.2.3", "args": ["--flag"] * 20}},
        "status": {"observedGeneration": i, "conditions": [{"type": "Ready", "status": "True", "reason": "AsExpected"}]},
    }).encode()


def key(i: int) -> str:
    return f"{PREFIX}pods/shop/web-{i % KEYS}" if i % 2 == 0 else f"{PREFIX}example.com/widgets/shop/w-{i % KEYS}"


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# ---------------------------------------------------------------- writers (a child process, so they do not share this one's GIL)


def write(url: str, threads: int, *, txns: int = 0, seconds: float = 0.0) -> dict[str, Any]:
    """``txns`` transactions of `PER_TXN` puts, or single puts for ``seconds``, from ``threads`` threads."""
    lock, counter = threading.Lock(), iter(range(1 << 62))
    revisions: list[int] = []
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(trust_env=False, timeout=30) as client:
            while True:
                with lock:
                    n = next(counter)
                if txns:
                    if n >= txns:
                        return
                    ops = [{"request_put": {"key": b64(key(n * PER_TXN + j)), "value": b64(value(n * PER_TXN + j))}} for j in range(PER_TXN)]
                    r = client.post(url + "/v3/kv/txn", json={"success": ops})
                else:
                    if time.monotonic() >= stop_at:
                        return
                    r = client.post(url + "/v3/kv/put", json={"key": b64(key(n)), "value": b64(value(n))})
                r.raise_for_status()
                rev = int(r.json()["header"]["revision"])
                with lock:
                    revisions.append(rev)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {
        "requests": len(revisions), "events": len(revisions) * (PER_TXN if txns else 1), "first": min(revisions), "last": max(revisions),
        # CLOCK_MONOTONIC, which the parent process reads too
        "started": started, "ended": time.monotonic(),
    }


def write_in_child(url: str, threads: int, **how: Any) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, "--write", url, str(threads), json.dumps(how)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def child_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=DEADLINE)
    if proc.returncode:
        raise SystemExit(f"the writer failed with {proc.returncode}")
    return json.loads(out)


# ---------------------------------------------------------------- watchers


class Counting:
    """A consumer that counts records and reports each batch delivered, as an exporter would."""

    signals = frozenset({Signal.LOGS})

    def __init__(self) -> None:
        self.count = 0
        self.last_at = 0.0
        self._changed = trio.Event()

    async def send(self, batch: Batch) -> None:
        self.send_nowait(batch)

    def send_nowait(self, batch: Batch) -> None:
        self.count += batch.count
        self.last_at = time.monotonic()
        batch.done(True)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, n: int) -> None:
        with trio.fail_after(DEADLINE):
            while self.count < n:
                await self._changed.wait()


def receiver(url: str, consumer: Counting, start_revision: int = 0):
    cfg = decode_dataclass(factory.config_class, {"endpoints": [url], "prefixes": [PREFIX], "start_revision": start_revision})
    settings = Settings(
        id=ComponentID("etcd-watch"), kind=Kind.RECEIVER, telemetry=Telemetry().for_component("receiver", "etcd-watch"),
        logger=logging.getLogger("tapio.receiver.etcd-watch"),
    )
    return factory.create(settings, cfg, Ports(output=consumer))


async def tapio_catchup(url: str, first: int, events: int) -> tuple[float, float]:
    """Seconds, and CPU seconds of this process, for the receiver to deliver ``events`` from revision ``first``."""
    consumer = Counting()
    cpu, start = time.process_time(), time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver(url, consumer, first).run)
        await consumer.wait_for(events)
        elapsed, cpu = consumer.last_at - start, time.process_time() - cpu
        nursery.cancel_scope.cancel()
    return elapsed, cpu


class Etcdctl:
    """``etcdctl watch`` of the prefix (with previous values), its events counted as it prints them."""

    def __init__(self, url: str, start_revision: int = 0) -> None:
        cmd = ["etcdctl", "--endpoints", url, "watch", "--prefix", PREFIX, "--prev-kv"]
        if start_revision:
            cmd += ["--rev", str(start_revision)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "ETCDCTL_API": "3"})
        self.started = time.monotonic()
        self.count = 0
        self.last_at = 0.0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        tail = b"\n"  # an event starts a line: "PUT\n<key>\n<value>\n[<prev key>\n<prev value>\n]"
        while chunk := self.proc.stdout.read1(1 << 20):
            data = tail + chunk
            self.count += data.count(b"\nPUT\n")
            self.last_at = time.monotonic()
            tail = data[-4:]

    def wait_for(self, n: int) -> float:
        deadline = time.monotonic() + DEADLINE
        while self.count < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"etcdctl saw {self.count} of {n} events")
            time.sleep(0.002)
        return self.last_at

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)


def etcdctl_catchup(url: str, first: int, events: int) -> float:
    watcher = Etcdctl(url, first)
    try:
        return watcher.wait_for(events) - watcher.started
    finally:
        watcher.stop()


async def gateway_catchup(url: str, first: int, events: int) -> float:
    """Seconds to read ``events`` through the JSON gateway with httpx, counting them without parsing."""
    start_key, end = prefix_range(PREFIX)
    request = {"create_request": {"key": b64(start_key), "range_end": b64(end), "start_revision": str(first), "prev_kv": True}}
    seen, tail, elapsed = 0, b"", None
    start = time.monotonic()
    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(30, read=None)) as client:
        async with client.stream("POST", url + "/v3/watch", json=request) as response:
            stream = response.aiter_raw()
            with trio.CancelScope() as reading:
                async for chunk in stream:
                    data = tail + chunk
                    seen += data.count(b'"kv":{')  # "prev_kv":{ does not match: a '_' precedes its kv
                    tail = data[-5:]
                    if seen >= events:
                        elapsed = time.monotonic() - start
                        reading.cancel()  # unwinds httpx's generators from the read (see the receiver's client)
    if elapsed is None:
        raise SystemExit(f"the gateway watch ended after {seen} of {events} events")
    return elapsed


# ---------------------------------------------------------------- the two measurements


def start_member(root: Path, name: str) -> EtcdMember:
    member = EtcdMember(root / name)
    member.start()
    return member


def catchup(root: Path, backlog: int, writers: int) -> dict[str, Any]:
    member = start_member(root, "catchup")
    try:
        wrote = child_result(write_in_child(member.url, writers, txns=backlog // PER_TXN))
        first, events = wrote["first"], wrote["events"]
        tapio, tapio_cpu, ctl, gateway = [], [], [], []
        for _ in range(ROUNDS):
            seconds, cpu = trio.run(tapio_catchup, member.url, first, events)
            tapio.append(seconds)
            tapio_cpu.append(cpu)
            ctl.append(etcdctl_catchup(member.url, first, events))
            gateway.append(trio.run(gateway_catchup, member.url, first, events))
    finally:
        member.kill()
    t, c, g = statistics.median(tapio), statistics.median(ctl), statistics.median(gateway)
    return {
        "catchup_events": events,
        "catchup_tapio_events_per_s": round(events / t),
        "catchup_tapio_events_per_cpu_s": round(events / statistics.median(tapio_cpu)),
        "catchup_etcdctl_events_per_s": round(events / c),
        "catchup_gateway_read_events_per_s": round(events / g),
        "catchup_tapio_vs_etcdctl": round(c / t, 3),
        "catchup_tapio_vs_gateway_read": round(g / t, 3),
    }


async def storm_watch(url: str, seconds: float, writers: int) -> dict[str, Any]:
    consumer = Counting()
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver(url, consumer).run)
        watcher = Etcdctl(url)
        try:
            await trio.sleep(0.5)  # etcdctl's watch is open (it has no ready signal; it starts in ~50 ms)
            cpu = time.process_time()
            proc = write_in_child(url, writers, seconds=seconds)
            wrote = await trio.to_thread.run_sync(child_result, proc)
            start, ended = wrote["started"], wrote["ended"]
            await consumer.wait_for(wrote["events"])
            cpu = time.process_time() - cpu
            ctl_done = await trio.to_thread.run_sync(watcher.wait_for, wrote["events"])
        finally:
            watcher.stop()
        nursery.cancel_scope.cancel()
    events = wrote["events"]
    return {
        "storm_seconds": round(ended - start, 2),
        "storm_writers": writers,
        "storm_events": events,
        "storm_etcd_puts_per_s": round(events / (ended - start)),
        "storm_tapio_events_per_s": round(events / (consumer.last_at - start)),
        "storm_tapio_lag_after_last_put_ms": round(max(0.0, consumer.last_at - ended) * 1000, 1),
        "storm_etcdctl_lag_after_last_put_ms": round(max(0.0, ctl_done - ended) * 1000, 1),
        "storm_tapio_events_per_cpu_s": round(events / cpu) if cpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=20000, help="events in the catch-up backlog")
    parser.add_argument("--storm-seconds", type=float, default=5.0, help="how long the put storm lasts")
    parser.add_argument("--writers", type=int, default=16, help="writer threads (in one child process)")
    parser.add_argument("--write", nargs=3, metavar=("URL", "THREADS", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        url, threads, how = args.write
        print(json.dumps(write(url, int(threads), **json.loads(how))))
        return
    for command in ("etcd", "etcdctl"):
        if shutil.which(command) is None:
            raise SystemExit(f"bench_etcd_watch needs {command} (etcd 3.4): apt-get install etcd-server etcd-client (scripts/setup.sh does)")
    on_tmpfs = Path("/dev/shm").is_dir()
    result: dict[str, Any] = {
        "bench": "etcd_watch",
        "etcd": subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0].split()[-1],
        "etcd_data_dir": "tmpfs" if on_tmpfs else "disk",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(dir="/dev/shm" if on_tmpfs else None) as d:
        result.update(catchup(Path(d), args.backlog, args.writers))
        member = start_member(Path(d), "storm")
        try:
            result.update(trio.run(storm_watch, member.url, args.storm_seconds, args.writers))
        finally:
            member.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
