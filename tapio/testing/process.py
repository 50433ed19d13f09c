"""Run ``tapio run`` as a real subprocess, for end-to-end tests and benchmarks.

`TapioProcess` writes nothing itself: give it config files. It waits for
``/readyz`` with a deadline, scrapes ``/metrics`` into a dict, sends signals,
and always kills the process on exit, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """An ephemeral TCP port that was free a moment ago (good enough on a test machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, configs: Sequence[str | Path], *, metrics_port: int, env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
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
        cmd = [*tapio_command(), "run", *(a for c in self.configs for a in ("-c", c)), *self.args]
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
