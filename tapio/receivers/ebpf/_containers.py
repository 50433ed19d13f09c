"""From a process to its container: /proc/<pid>/cgroup text → container id.

Invariants:
- `parse_cgroup` is pure and accepts any text; it recognises the layouts of
  containerd, CRI-O and Docker under both the systemd and the cgroupfs
  cgroup drivers, on cgroup v1 and v2 lines alike, and never returns a
  container id that is not 64 lowercase hex digits.
- `ContainerResolver` remembers what it learned, bounded (least recently
  used first out), by (pid, cgroup id) and by cgroup id, so exit and OOM
  events of a process whose /proc entry is gone still resolve. The root
  cgroup's id (shared by every task not placed in a cgroup2 cgroup) is never
  used as a key on its own.
- `ContainerResolver.resolve` never walks a directory tree: it reads at
  most one small /proc file. When a process is gone before its first event
  is handled, `wants_walk` says whether its cgroup id is worth a walk of the
  cgroup2 tree; the caller runs `walk_cgroup_tree` (blocking: in a worker
  thread) and hands the result to `learn_walk`. A cgroup id a walk did not
  find is remembered, so a storm of short-lived processes in one cgroup
  costs one walk.
- Every lookup that finds no container says why, as one of `REASONS`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass

#: why no container id was found
REASONS = ("host", "process_gone", "no_pid", "unreadable")

_HEX64 = r"[0-9a-f]{64}"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"

# systemd driver: .../kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
_SYSTEMD = re.compile(rf"/(cri-containerd|crio|docker|libpod)-({_HEX64})\.scope(?:/|$)")
# cgroupfs driver: /kubepods/burstable/pod<uid>/<id>, /docker/<id>, /k8s.io/<id>, /crio/<id>
_CGROUPFS = re.compile(rf"/(kubepods|docker|k8s\.io|crio|system\.slice/containerd\.service)(?:/[^/\n]*)*?/({_HEX64})(?:/|$)")
_POD_UID = re.compile(rf"pod({_UID})")

_RUNTIME = {
    "cri-containerd": "containerd",
    "k8s.io": "containerd",
    "crio": "cri-o",
    "docker": "docker",
    "libpod": "podman",
}


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    runtime: str  # containerd, cri-o, docker, podman, or "" when the layout does not say
    pod_uid: str  # "" when the path has none


def parse_cgroup(text: str) -> Container | None:
    """The container a /proc/<pid>/cgroup text places its process in, or None for a host process.

    The cgroup v2 line (``0::/path``) is tried first, then each v1 line.
    """
    lines = text.splitlines()
    lines.sort(key=lambda line: not line.startswith("0::"))
    for line in lines:
        _, _, path = line.partition(":")
        _, _, path = path.partition(":")
        found = parse_cgroup_path(path)
        if found is not None:
            return found
    return None


def parse_cgroup_path(path: str) -> Container | None:
    """The container of one cgroup path (``/kubepods.slice/.../cri-containerd-<id>.scope``)."""
    m = _SYSTEMD.search(path)
    if m is not None:
        runtime = _RUNTIME[m.group(1)]
        cid = m.group(2)
    else:
        m = _CGROUPFS.search(path)
        if m is None:
            return None
        cid = m.group(2)
        top = m.group(1)
        if top == "kubepods":
            runtime = ""  # cgroupfs kubelet layout: the runtime is not in the path
        elif top == "system.slice/containerd.service":
            runtime = "containerd"
        else:
            runtime = _RUNTIME[top]
    pod = _POD_UID.search(path)
    pod_uid = pod.group(1).replace("_", "-") if pod else ""
    return Container(cid, runtime, pod_uid)


def walk_cgroup_tree(root: str) -> dict[int, Container]:
    """Every container cgroup under a cgroup2 mount, by cgroup id (the directory's inode).

    Blocking (it lists every cgroup directory): call it from a worker thread.
    Directories that vanish during the walk are skipped.
    """
    root = root.rstrip("/")
    found: dict[int, Container] = {}
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = f"{dirpath}/{name}"
            container = parse_cgroup_path(path[len(root):] + "/")
            if container is None:
                continue
            try:
                found[os.stat(path).st_ino] = container
            except OSError:
                continue
    return found


class ContainerResolver:
    """Resolves (pid, cgroup id) to a container, reading /proc/<pid>/cgroup at most once per pair.

    Args:
        proc_root: where procfs is mounted.
        max_entries: entries kept in each cache.
        root_cgroup_id: the cgroup2 root's id; events carrying it say nothing
            about the container, so it is not cached on its own.

    Reading /proc is synchronous: a small procfs read that never blocks on
    a disk, done once per new process.
    """

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        max_entries: int = 16384,
        root_cgroup_id: int = 1,
        cgroup2_root: str | None = None,
    ) -> None:
        self._proc = proc_root.rstrip("/")
        #: the cgroup2 mount `walk_cgroup_tree` is run on (None: no walks)
        self.cgroup2_root = cgroup2_root
        #: cgroup ids a tree walk did not find (not containers, or already gone)
        self._walk_missed: OrderedDict[int, None] = OrderedDict()
        #: tree walks learned from, for tests and benchmarks
        self.walks = 0
        self._max = max_entries
        self._root = root_cgroup_id
        self._by_pid: OrderedDict[tuple[int, int], Container | None] = OrderedDict()
        self._by_cgroup: OrderedDict[int, Container] = OrderedDict()

    def resolve(self, pid: int, cgroup_id: int) -> tuple[Container | None, str]:
        """The container and "" when found, else None and a reason from `REASONS`."""
        key = (pid, cgroup_id)
        if key in self._by_pid:
            self._by_pid.move_to_end(key)
            found = self._by_pid[key]
            return (found, "") if found is not None else (None, "host")
        if cgroup_id and cgroup_id != self._root:
            known = self._by_cgroup.get(cgroup_id)
            if known is not None:
                self._by_cgroup.move_to_end(cgroup_id)
                return known, ""
        found, reason = self._from_proc(pid)
        if found is not None or reason == "host":
            self._remember(key, found)
        return found, reason

    def wants_walk(self, cgroup_id: int) -> bool:
        """Whether a walk of the cgroup2 tree could find this cgroup id (asked after `resolve` found nothing for a gone process)."""
        return (
            self.cgroup2_root is not None
            and bool(cgroup_id)
            and cgroup_id != self._root
            and cgroup_id not in self._by_cgroup
            and cgroup_id not in self._walk_missed
        )

    def learn_walk(self, found: dict[int, Container], wanted: set[int]) -> None:
        """Take in a `walk_cgroup_tree` result; the ``wanted`` ids it lacks are not walked for again."""
        self.walks += 1
        for cgroup_id, container in found.items():
            self._by_cgroup[cgroup_id] = container
            if len(self._by_cgroup) > self._max:
                self._by_cgroup.popitem(last=False)
        for cgroup_id in wanted:
            if cgroup_id not in found:
                self._walk_missed[cgroup_id] = None
                if len(self._walk_missed) > self._max:
                    self._walk_missed.popitem(last=False)

    def by_cgroup(self, cgroup_id: int) -> Container | None:
        """The container known for a cgroup id (from a process seen in it, or a walk)."""
        return self._by_cgroup.get(cgroup_id)

    def _from_proc(self, pid: int) -> tuple[Container | None, str]:
        if pid <= 0:
            return None, "no_pid"
        try:
            with open(f"{self._proc}/{pid}/cgroup", "rb") as f:
                text = f.read(65536).decode("utf-8", "replace")
        except (FileNotFoundError, ProcessLookupError):
            return None, "process_gone"
        except OSError:
            return None, "unreadable"
        if not text:
            return None, "process_gone"  # a reaped zombie reads empty
        found = parse_cgroup(text)
        return found, "" if found is not None else "host"

    def forget_pid(self, pid: int, cgroup_id: int) -> None:
        """Drop a process that exited (its pid may be reused); its cgroup stays known."""
        self._by_pid.pop((pid, cgroup_id), None)

    def _remember(self, key: tuple[int, int], found: Container | None) -> None:
        self._by_pid[key] = found
        if len(self._by_pid) > self._max:
            self._by_pid.popitem(last=False)
        cgroup_id = key[1]
        if found is not None and cgroup_id and cgroup_id != self._root:
            self._by_cgroup[cgroup_id] = found
            self._by_cgroup.move_to_end(cgroup_id)
            if len(self._by_cgroup) > self._max:
                self._by_cgroup.popitem(last=False)
