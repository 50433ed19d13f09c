"""The cri receiver's configuration.

Invariants:
- The defaults work on a containerd node as root: containerd's CRI socket,
  the event stream with a list at every (re)connect, existing containers
  reported once at start.
- `validate` reports every problem, each prefixed with its dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass

from tapio.component import StorageRef, setting
from tapio.units import Duration

#: containerd's CRI socket (CRI-O: unix:///var/run/crio/crio.sock)
DEFAULT_ENDPOINT = "unix:///run/containerd/containerd.sock"


@dataclass(frozen=True, kw_only=True)
class ReconnectConfig:
    initial_interval: Duration = setting(Duration(1.0), doc="Wait before the first reconnect after the runtime went away; doubles after each failed attempt.")
    max_interval: Duration = setting(Duration(30.0), doc="Longest wait between two reconnect attempts.")


@dataclass(frozen=True, kw_only=True)
class Config:
    endpoint: str = setting(
        DEFAULT_ENDPOINT,
        doc="The runtime's CRI socket, as unix:///path (containerd: unix:///run/containerd/containerd.sock, CRI-O: unix:///var/run/crio/crio.sock).",
    )
    timeout: Duration = setting(Duration(10.0), doc="Deadline of each CRI call (Version, the lists, ContainerStatus); the event stream has none.")
    event_stream: bool = setting(
        True,
        doc="Follow GetContainerEvents. false (or a runtime without it, such as containerd 1.6) lists sandboxes and containers every poll_interval instead.",
    )
    resync_interval: Duration = setting(
        Duration(30.0),
        doc="With the event stream, also list sandboxes and containers this often, to find what events did not tell (containerd 1.7 gives each event to one subscriber only: another client of the stream takes some). 0 lists only at connect.",
    )
    poll_interval: Duration = setting(
        Duration(10.0),
        doc="How often to list sandboxes and containers when there is no event stream (see event_stream).",
    )
    report_existing: bool = setting(
        True,
        doc="At start, report each sandbox and container that already exists, in its current state (tapio.cri.source=list). false reports only changes after start. Ignored with storage, which remembers what was reported.",
    )
    storage: StorageRef | None = setting(
        None,
        doc="A storage extension in which to remember the state last reported of each sandbox and container (after delivery), so a restart reports only what changed while tapio was down. null remembers nothing across restarts.",
    )
    labels: bool = setting(True, doc="Add a container's labels as container.label.<key> and a pod sandbox's as k8s.pod.label.<key>, except the io.kubernetes.* labels (they give the k8s.* attributes). false adds none.")
    reconnect: ReconnectConfig = setting(default_factory=ReconnectConfig, doc="Backoff between attempts to reach the runtime.")

    def validate(self) -> list[str]:
        problems = []
        if not self.endpoint.startswith("unix://") or len(self.endpoint) <= len("unix://"):
            problems.append(f"endpoint: expected unix:///path/to/socket, got {self.endpoint!r}")
        if self.timeout <= 0:
            problems.append(f"timeout: must be more than 0, got {self.timeout}")
        if self.resync_interval < 0:
            problems.append(f"resync_interval: must be 0 (only at connect) or more, got {self.resync_interval}")
        if self.poll_interval <= 0:
            problems.append(f"poll_interval: must be more than 0, got {self.poll_interval}")
        r = self.reconnect
        if r.initial_interval <= 0:
            problems.append(f"reconnect.initial_interval: must be more than 0, got {r.initial_interval}")
        if r.max_interval < r.initial_interval:
            problems.append(f"reconnect.max_interval: must be at least reconnect.initial_interval ({r.initial_interval}), got {r.max_interval}")
        return problems
