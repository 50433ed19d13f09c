"""journald: journal entries read and mapped to OTLP records, against `journalctl -o json` into `json.loads`, in one run.

Starts a journald namespace instance (rate limiting off for it), writes N
kubelet-like entries to it with the native protocol, waits until journalctl
sees them all, then reads the same journal twice:

- tapio: the receiver's reader (`LibraryJournal`: libsystemd through
  systemd-python, every entry mapped to an OTLP log record and the records
  encoded into export requests of `max_batch_size` entries), on this
  process's thread;
- the peer: ``journalctl --namespace=NAME -o json --all`` piped into this
  process, each line parsed with ``json.loads`` (values as strings, no
  OTLP), which is what a journalctl-based reader does at the least.

Both figures are entries per CPU second (user + system; for the peer,
journalctl's CPU plus this process's). The goal is a ratio of at least 1.
Prints one JSON line.

Usage: bench_journald.py [--entries N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tapio.decode import decode_dataclass  # noqa: E402
from tapio.receivers.journald import factory  # noqa: E402
from tapio.receivers.journald._journal import LibraryJournal, Position, load_library  # noqa: E402
from tapio.receivers.journald._mapping import EntryMapper  # noqa: E402
from tapio.testing.journald import Journald, wait_for  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def write(journal: Journald, n: int) -> None:
    for i in range(n):
        journal.send(
            f'I1204 12:{i % 60:02d}:{i % 60:02d}.{i % 1000000:06d} 1234 kubelet.go:{2000 + i % 500}] "SyncLoop (PLEG): event for pod" '
            f'pod="kube-system/coredns-{i % 97:05d}" event={{ID:{i:032x} Type:ContainerStarted}}',
            SYSLOG_IDENTIFIER="kubelet", SYSLOG_FACILITY="3", CODE_FILE="kubelet.go", TEST="bench",
        )


def tapio_read(journal: Journald, n: int) -> tuple[float, int]:
    config = decode_dataclass(factory.config_class, {"namespace": journal.name, "start_at": "beginning"})
    reader = LibraryJournal(config, EntryMapper(), load_library())
    reader.open(Position(None, "head"))
    start, entries, size = cpu(), 0, 0
    while True:
        result = reader.read(config.max_batch_size)
        if not result.entries:
            break
        entries += result.entries
        if result.batch is not None:
            size += len(result.batch.to_bytes())
    seconds = cpu() - start
    reader.close()
    assert entries >= n, f"tapio read {entries} entries, expected at least {n}"
    return seconds, entries


def peer_read(journal: Journald, n: int) -> tuple[float, int]:
    start_self, start_children = cpu(), children_cpu()
    proc = subprocess.Popen(["journalctl", f"--namespace={journal.name}", "-o", "json", "--all", "--no-pager"], stdout=subprocess.PIPE)
    entries = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        json.loads(line)
        entries += 1
    proc.wait()
    seconds = (cpu() - start_self) + (children_cpu() - start_children)
    assert entries >= n, f"journalctl gave {entries} entries, expected at least {n}"
    return seconds, entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    if load_library() is None:
        sys.exit("systemd-python is not installed: run scripts/setup.sh")
    name = f"tapiobench{os.getpid()}"
    conf = Path(f"/etc/systemd/journald@{name}.conf")
    conf.write_text("[Journal]\nRateLimitBurst=0\nSystemMaxUse=1G\n")  # the bench writes far faster than the default limit
    try:
        with Journald(name) as journal:
            write(journal, args.entries)
            journal.sync()
            wait_for(lambda: journal.count("TEST=bench") >= args.entries, 120, "journald to store every entry")
            peer_read(journal, args.entries)  # warm the page cache for both
            tapio_s, tapio_n = tapio_read(journal, args.entries)
            peer_s, peer_n = peer_read(journal, args.entries)
    finally:
        conf.unlink(missing_ok=True)
    tapio_rate, peer_rate = tapio_n / tapio_s, peer_n / peer_s
    print(json.dumps({
        "bench": "journald",
        "entries": tapio_n,
        "tapio_entries_per_cpu_s": round(tapio_rate),
        "journalctl_json_loads_entries_per_cpu_s": round(peer_rate),
        "ratio": round(tapio_rate / peer_rate, 2),
        "goal": 1.0,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }))


if __name__ == "__main__":
    main()
