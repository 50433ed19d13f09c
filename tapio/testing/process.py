"""Run ``tapio run`` as a real subprocess, for end-to-end tests and benchmarks.

`TapioProcess` writes nothing itself: give it config files. It waits for
``/readyz`` with a deadline, scrapes ``/metrics`` into a dict, sends signals,
and always kills the process on exit, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import httpx

from tapio.testing import prereq

ROOT = Path(__file__).resolve().parents[2]


#: where `free_port` picks from when the kernel's ephemeral range starts above it
_PICK_FROM = 20000
#: ports handed out lately by this process; not handed out again (two picked for one config must differ)
_recent: collections.deque[int] = collections.deque(maxlen=512)
#: not the `random` module's generator, which tests (hypothesis) seed alike in every process
_random = random.SystemRandom()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a config a test writes.

    Binding port 0 and closing would hand out a port from the kernel's
    ephemeral range, which every outgoing connection of every process on the
    machine draws from too, so one could take it before tapio binds it. The
    port is picked at random below that range instead (where only listeners
    go), checked to be bindable, and never one this process handed out
    lately. A small race with other processes remains: a config that can
    use port 0 should (`tapio run` prints the ports bound).
    """
    low, high = _PICK_FROM, _ephemeral_low() - 1
    for _ in range(100) if high - low > 1000 else ():
        port = _random.randint(low, high)
        if port not in _recent and _bindable(port):
            _recent.append(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range: let the kernel pick
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _recent.append(port)
    return port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def with_capabilities(caps: Iterable[str]) -> list[str]:
    """A command prefix (setpriv) under which uid 0 keeps only ``caps`` in its bounding set, as in a pod that adds just those."""
    setpriv = prereq.command("setpriv", "apt-get install util-linux")
    return [setpriv, "--bounding-set", "-all" + "".join(f",+{c.lower()}" for c in sorted(caps)), "--"]


def tapio_command() -> list[str]:
    exe = Path(sys.executable).with_name("tapio")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "tapio.cmd.main"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (labels as rendered)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, v in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


class TapioProcess:
    def __init__(
        self,
        configs: Sequence[str | Path],
        *,
        metrics_port: int,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        wrap: Sequence[str] = (),
    ) -> None:
        """``wrap`` is a command prefix tapio runs under (e.g. ``setpriv`` with its options)."""
        self.wrap = list(wrap)
        self.configs = [str(c) for c in configs]
        self.metrics_port = metrics_port
        self.env = {**os.environ, **(env or {})}
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr_path: Path | None = None

    def __enter__(self) -> "TapioProcess":
        import tempfile

        fd, path = tempfile.mkstemp(prefix="tapio-stderr-")
        self._stderr_path = Path(path)
        cmd = [*self.wrap, *tapio_command(), "run", *(a for c in self.configs for a in ("-c", c)), *self.args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd, env=self.env, cwd=ROOT)
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._stderr_path is not None:
            self._stderr_path.unlink(missing_ok=True)

    @property
    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace") if self._stderr_path else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        self.wait_for(ready, timeout, "tapio to answer /readyz")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` until true; fail with tapio's stderr if it exits or the deadline passes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"tapio exited with {self.proc.returncode} while waiting for {what}:\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.stderr}")
            time.sleep(0.02)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)


class PacedWriter(threading.Thread):
    """Calls ``write(i)`` for i in 0 … total-1 at ``per_second``, as a steady source would; ``written`` counts them."""

    def __init__(self, write: Callable[[int], None], total: int, per_second: int) -> None:
        super().__init__(daemon=True)
        self._write, self.total, self.per_second = write, total, per_second
        self.written = 0

    def run(self) -> None:
        start = time.monotonic()
        for i in range(self.total):
            self._write(i)
            self.written = i + 1
            ahead = (i + 1) / self.per_second - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


@dataclass
class KillRestart:
    """What `sigkill_mid_stream_then_restart` saw: the sequence numbers exported before the kill and in the end."""

    before: list[int]
    got: list[int]
    #: the restarted tapio's metrics, scraped once everything had arrived
    metrics: dict[str, float]


def sigkill_mid_stream_then_restart(
    configs: Sequence[str | Path], metrics_port: int, writer: PacedWriter, exported: Callable[[], list[int]], *, kill_after: int, settle: float = 0.0
) -> KillRestart:
    """Run tapio, start ``writer``, SIGKILL tapio once ``kill_after`` numbers were exported, start it again, and wait until every number 0 … writer.total-1 was.

    ``exported()`` reads the sequence numbers of the output so far (repeats
    included, in output order); ``settle`` seconds more are waited at the end,
    so that anything still to come shows as a repeat. The caller asserts on
    the result: what was lost and what was repeated is its receiver's contract.
    """
    with TapioProcess(configs, metrics_port=metrics_port) as t:
        t.wait_ready()
        writer.start()
        t.wait_for(lambda: len(exported()) >= kill_after, 30, f"{kill_after} records exported")
        t.signal(signal.SIGKILL)
        t.wait_exit(10)
    before = exported()
    assert writer.is_alive(), "the writer should still be writing when tapio is killed"
    with TapioProcess(configs, metrics_port=metrics_port) as t:
        t.wait_ready()
        writer.join(30)
        t.wait_for(lambda: set(exported()) >= set(range(writer.total)), 60, "every record exported")
        time.sleep(settle)
        return KillRestart(before, exported(), t.metrics())
