"""Real journald and systemd peers for tests and benchmarks, on a machine whose PID 1 is not systemd.

- `Journald`: an isolated journald namespace instance
  (``systemd-journald NAME``): sockets in /run/systemd/journal.NAME/, files
  in /var/log/journal/<machine-id>.NAME/. Entries are written with journald's
  native protocol (one datagram per entry to its ``socket``, the format
  sd_journal_send uses; systemd.journal.send itself only reaches the default
  namespace's socket). A namespace instance exits after ~30 s without
  clients, so one stdout stream stays connected for its whole life.
- `UserManager`: a real systemd service manager (``systemd --user``) whose
  log goes to that namespace, so `systemd-run --user` starts real transient
  units and the unit messages (started, failed, restart scheduled …) come
  from systemd itself. It runs in a private mount namespace where
  /run/systemd/journal is the namespace instance's socket directory and
  /run/systemd/system exists (systemd refuses a user instance otherwise).
  A user manager names units in ``USER_UNIT=`` where PID 1 uses ``UNIT=``;
  everything else about the messages is the same code in systemd.
  The manager starts in a cgroup of its own (a slice, in the name=systemd
  and unified hierarchies; removed on exit), and does not see the v1
  controller hierarchies (unmounted in its mount namespace): a manager
  started in a root cgroup moves every process there into its init.scope,
  as PID 1 would, in every hierarchy it sees.

Both stop their processes by PID on exit and remove what they created.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

JOURNALD = "/lib/systemd/systemd-journald"
SYSTEMD = "/lib/systemd/systemd"


def machine_id() -> str:
    return Path("/etc/machine-id").read_text().strip()


def native_datagram(fields: dict[str, str | bytes]) -> bytes:
    """One entry in journald's native protocol: ``KEY=value\\n``, or ``KEY\\n<le64 size>value\\n`` for binary values."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        if b"\n" in data or isinstance(value, bytes):
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


class Journald:
    """A journald namespace instance; use as a context manager."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"tapio{secrets.token_hex(4)}"
        self.run_dir = Path(f"/run/systemd/journal.{self.name}")
        self.log_dir = Path(f"/var/log/journal/{machine_id()}.{self.name}")
        self.proc: subprocess.Popen | None = None
        self._keepalive: socket.socket | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)

    def __enter__(self) -> "Journald":
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._sock.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def start(self) -> None:
        """Start (or restart) the instance; returns once its sockets accept."""
        self.proc = subprocess.Popen([JOURNALD, self.name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._ready, 10, f"journald {self.name} to listen")
        # A connected stdout stream keeps a namespace instance from exiting when idle.
        keep = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        keep.connect(str(self.run_dir / "stdout"))
        keep.sendall(b"tapio-keepalive\n\n6\n0\n0\n0\n0\n")
        self._keepalive = keep

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-journald {self.name} exited: {self.proc.stderr.read().decode(errors='replace') if self.proc.stderr else ''}")
        return (self.run_dir / "socket").exists() and (self.run_dir / "stdout").exists() and (self.run_dir / "io.systemd.journal").exists()

    def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.close()
            self._keepalive = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    # -- writing

    def send(self, message: str | bytes | None = None, **fields: str | bytes | int) -> None:
        """Write one entry (MESSAGE plus ``fields``; PRIORITY defaults to 6)."""
        entry: dict[str, str | bytes] = {}
        if message is not None:
            entry["MESSAGE"] = message
        entry.setdefault("PRIORITY", "6")
        for k, v in fields.items():
            entry[k] = str(v) if isinstance(v, int) else v
        self.send_raw(native_datagram(entry))

    def send_raw(self, datagram: bytes) -> None:
        for _ in range(500):
            try:
                self._sock.sendto(datagram, str(self.run_dir / "socket"))
                return
            except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
                time.sleep(0.01)  # the receive queue is full (or journald is restarting): wait for it
        raise RuntimeError(f"journald {self.name} does not accept entries")

    # -- maintenance, through journalctl as an operator would

    def journalctl(self, *args: str) -> str:
        done = subprocess.run(["journalctl", f"--namespace={self.name}", *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"journalctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def sync(self) -> None:
        """Make journald write every entry it received to its files."""
        self.journalctl("--sync")

    def rotate(self) -> None:
        self.journalctl("--rotate")

    def vacuum(self, files: int = 1) -> None:
        """Delete archived journal files, leaving ``files`` files (the active one counts)."""
        self.journalctl(f"--vacuum-files={files}")

    def files(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.journal"))

    def count(self, *matches: str) -> int:
        """How many entries journalctl finds (with ``matches``, as journalctl's FIELD=value arguments)."""
        return len(self.journalctl("-o", "json", "--output-fields=__CURSOR", *matches).splitlines())


class UserManager:
    """A ``systemd --user`` service manager logging to ``journald``; use as a context manager."""

    def __init__(self, journald: Journald) -> None:
        self.journald = journald
        self._tmp = Path(tempfile.mkdtemp(prefix="tapio-systemd-"))
        self.runtime_dir = self._tmp / "runtime"
        self.runtime_dir.mkdir(mode=0o700)
        self.proc: subprocess.Popen | None = None
        # A slice name: journald skips slices when it names the unit a cgroup belongs to, so the
        # units' entries carry _SYSTEMD_UNIT=<unit> and the manager's _SYSTEMD_UNIT=init.scope, as on a node.
        slice_name = f"tapio{secrets.token_hex(4)}.slice"  # one path in every hierarchy, as systemd expects
        self.cgroups = [Path(h) / slice_name for h in _cgroup_hierarchies()]

    def __enter__(self) -> "UserManager":
        bind = self._tmp / "journal"
        bind.mkdir()
        for cgroup in self.cgroups:
            cgroup.mkdir()
        script = (
            "set -e\n"
            + "".join(f"echo $$ > {c}/cgroup.procs\n" for c in self.cgroups)
            # hide the controller hierarchies (memory, cpu, pids …): the manager then leaves every
            # process's resource cgroups as they were and uses only its own tracking hierarchies
            + "".join(f"umount -l {h}\n" for h in _controller_hierarchies())
            + f"mount --bind {self.journald.run_dir} {bind}\n"
            "mount -t tmpfs tmpfs /run/systemd\n"
            "mkdir -p /run/systemd/journal /run/systemd/system\n"
            f"mount --bind {bind} /run/systemd/journal\n"
            f"exec {SYSTEMD} --user\n"
        )
        # debug: a user manager logs some unit messages (such as "Deactivated successfully") only at debug level
        env = dict(os.environ, XDG_RUNTIME_DIR=str(self.runtime_dir), SYSTEMD_LOG_TARGET="journal", SYSTEMD_LOG_LEVEL="debug")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_for(self._ready, 20, "the systemd user manager")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd --user exited: {self.proc.stderr.read().decode(errors='replace') if self.proc.stderr else ''}")
        if not (self.runtime_dir / "systemd" / "private").exists():
            return False
        done = subprocess.run(
            ["systemctl", "--user", "show", "--property=SystemState"], env=self.env(), capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip() in ("SystemState=running", "SystemState=degraded")

    def env(self) -> dict[str, str]:
        return dict(os.environ, XDG_RUNTIME_DIR=str(self.runtime_dir))

    def run(self, unit: str, *command: str, properties: dict[str, str] | None = None) -> None:
        """Start ``command`` as the transient service ``unit`` (``systemd-run --user``)."""
        props = [f"--property={k}={v}" for k, v in (properties or {}).items()]
        done = subprocess.run(
            ["systemd-run", "--user", "--quiet", f"--unit={unit}", *props, *command],
            env=self.env(), capture_output=True, text=True, timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"systemd-run {unit} failed: {done.stderr.strip()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # sh exec'd systemd: this is the manager; it stops its units and exits
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        for cgroup in self.cgroups:
            _remove_cgroup(cgroup)
        shutil.rmtree(self._tmp, ignore_errors=True)


def _cgroup_hierarchies() -> list[str]:
    """The cgroup hierarchies the manager is placed in: cgroup2 alone, or name=systemd and unified (hybrid)."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return ["/sys/fs/cgroup"]
    return [h for h in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified") if Path(h, "cgroup.procs").exists()]


def _controller_hierarchies() -> list[str]:
    """The mounted cgroup v1 controller hierarchies (memory, cpu, pids …), empty on a cgroup2-only machine."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] == "cgroup" and "name=systemd" not in parts[3].split(","):
            out.append(parts[1])
    return out


def _remove_cgroup(path: Path) -> None:
    """Remove a cgroup and those below it, deepest first (each must be empty of processes by now)."""
    # The kernel releases a cgroup a moment after its last process was reaped: retry for a while.
    deadline = time.monotonic() + 5
    while path.exists():
        for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [path]:
            try:
                sub.rmdir()
            except OSError:
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
