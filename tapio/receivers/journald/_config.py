"""The journald receiver's configuration, shaped like the OpenTelemetry Collector's journald receiver.

Invariants:
- At most one of `directory`, `files`, `namespace` selects the journal;
  none selects the local system journal.
- `validate` reports every problem, each prefixed with its dotted key; a
  config it accepts turns into journal matches without error
  (`_filters.plan`): unit names, field names and priorities are checked here.
- The defaults read the local journal from its end, keep priorities info
  and more important, and turn systemd's messages about the Kubernetes node
  units into unit state events.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from tapio.component import StorageRef, setting
from tapio.units import Duration

#: the node services a Kubernetes node runs under systemd (kubelet and the container runtimes)
KUBERNETES_NODE_UNITS = ("kubelet.service", "containerd.service", "crio.service", "docker.service")

#: journalctl's priority names (syslog severities), most important first
PRIORITY_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
#: a journal field name: upper-case letters, digits and underscores, not starting with a digit, at most 64 bytes
FIELD_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
#: the unit types systemd knows (a unit name without one is a service, as with journalctl -u)
UNIT_SUFFIXES = (
    ".service", ".socket", ".target", ".device", ".mount", ".automount", ".swap", ".timer", ".path", ".slice", ".scope",
)
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+$")
MAX_BATCH = 100_000


def unit_name(name: str) -> str:
    """A unit name as systemd spells it: ``kubelet`` → ``kubelet.service``."""
    return name if name.endswith(UNIT_SUFFIXES) else name + ".service"


def parse_priority(text: str) -> tuple[int, int]:
    """``info``, ``6`` or a range ``err..info`` → (most, least important) priority numbers, inclusive.

    Raises ValueError naming the accepted forms.
    """
    def one(word: str) -> int:
        w = word.strip().lower()
        if w.isdigit() and int(w) < len(PRIORITY_NAMES):
            return int(w)
        if w in PRIORITY_NAMES:
            return PRIORITY_NAMES.index(w)
        raise ValueError(f"unknown priority {word!r}: use one of {', '.join(PRIORITY_NAMES)} or 0-7, or a range like err..info")

    if ".." in text:
        first, _, last = text.partition("..")
        a, b = one(first), one(last)
        return min(a, b), max(a, b)
    return 0, one(text)


@dataclass(frozen=True, kw_only=True)
class UnitStateConfig:
    enabled: bool = setting(
        True,
        doc="Turn systemd's own journal messages about units (started, stopped, failed, restart scheduled, process exited …) "
        "into unit state events with `systemd.unit.*` attributes.",
    )
    units: list[str] = setting(
        default_factory=lambda: list(KUBERNETES_NODE_UNITS),
        doc="The units whose messages become unit state events (a name without a type is a service: `kubelet` is "
        "`kubelet.service`); messages about other units stay plain records. Empty means every unit.",
    )

    def validate(self, prefix: str = "unit_state") -> list[str]:
        return [p for i, u in enumerate(self.units) if (p := _unit_problem(f"{prefix}.units[{i}]", u))]


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    enabled: bool = setting(
        True,
        doc="When the pipeline reports entries as not delivered (an exporter gave up, a memory limiter refused them), "
        "read them again from the journal after a backoff. false counts them as dropped and goes on.",
    )
    initial_interval: Duration = setting(Duration(1.0), doc="Wait before the first re-read.")
    max_interval: Duration = setting(Duration(30.0), doc="Longest wait between re-reads (the wait doubles each time).")
    max_elapsed_time: Duration = setting(
        Duration(300.0),
        doc="How long the same entries are re-read before they are counted as dropped and skipped; 0 retries forever.",
    )

    def validate(self, prefix: str = "retry_on_failure") -> list[str]:
        problems = []
        for key in ("initial_interval", "max_interval", "max_elapsed_time"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{prefix}.{key}: must be a duration of 0 or more, got {value!r}")
        if self.enabled and self.initial_interval <= 0:
            problems.append(f"{prefix}.initial_interval: must be more than 0")
        if self.max_interval < self.initial_interval:
            problems.append(f"{prefix}.max_interval: must be at least initial_interval ({self.initial_interval:g}s)")
        return problems


@dataclass(frozen=True, kw_only=True)
class Config:
    directory: str = setting(
        "",
        doc="A directory of journal files to read, with its machine-id subdirectories (e.g. the host's /var/log/journal "
        "mounted into the pod). Empty reads the local system journal (/var/log/journal and /run/log/journal of this machine).",
    )
    files: list[str] = setting(default_factory=list, doc="Journal files to read instead of a directory. Empty: none.")
    namespace: str = setting(
        "",
        doc="A journald namespace to read (as `journalctl --namespace`); `*` reads every namespace and the default one. "
        "Empty: the default namespace.",
    )
    units: list[str] = setting(
        default_factory=list,
        doc="Keep only entries of these units, as `journalctl --unit`: what the unit logged, systemd's messages about it, "
        "its core dumps (`kubelet` means `kubelet.service`). Empty: every unit.",
    )
    identifiers: list[str] = setting(
        default_factory=list, doc="Keep only entries with one of these SYSLOG_IDENTIFIERs (`journalctl -t`). Empty: any."
    )
    priority: str = setting(
        "info",
        doc="Keep entries of this priority and more important (`emerg` … `debug`, or 0-7), or of a range like `err..info`. "
        "`debug` keeps every entry, also those without a PRIORITY field.",
    )
    matches: list[dict[str, str]] = setting(
        default_factory=list,
        doc="Keep entries matching at least one of these field groups; within a group every field must match "
        "(`- {_SYSTEMD_UNIT: ssh.service, _UID: \"0\"}`). Empty: no such filter.",
    )
    grep: str = setting(
        "",
        doc="Keep only entries whose MESSAGE matches this regular expression (Python syntax; case-insensitive when it "
        "has no upper-case letter, as journalctl's). Empty: no filter.",
    )
    start_at: Literal["end", "beginning"] = setting(
        "end",
        doc="Where to start when no cursor is saved: `end` reads only new entries, `beginning` everything the journal holds.",
    )
    storage: StorageRef | None = setting(
        None,
        doc="The id of a storage extension (listed in `service.extensions`) to keep the cursor in; it is saved only "
        "after the entries before it were delivered, so a restart resumes without loss. Empty keeps it in memory: "
        "a restart starts at `start_at`.",
    )
    reader: Literal["auto", "library", "journalctl"] = setting(
        "auto",
        doc="How the journal is read: `library` through libsystemd (systemd-python), `journalctl` by running "
        "`journalctl -o json`, `auto` the library when it is installed, else journalctl.",
    )
    max_batch_size: int = setting(1000, doc="Most entries read into one batch.")
    unit_state: UnitStateConfig = setting(default_factory=UnitStateConfig, doc="systemd unit state events.")
    retry_on_failure: RetryConfig = setting(default_factory=RetryConfig, doc="Re-reading entries the pipeline did not deliver.")

    def validate(self) -> list[str]:
        problems: list[str] = []
        chosen = [k for k in ("directory", "files", "namespace") if getattr(self, k)]
        if len(chosen) > 1:
            problems.append(f"{chosen[1]}: cannot be combined with {chosen[0]}; pick one way to select the journal")
        if self.directory and not self.directory.startswith("/"):
            problems.append(f"directory: must be an absolute path, got {self.directory!r}")
        for i, f in enumerate(self.files):
            if not f.startswith("/"):
                problems.append(f"files[{i}]: must be an absolute path, got {f!r}")
        if self.namespace and self.namespace != "*" and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,255}", self.namespace):
            problems.append(f"namespace: not a journald namespace name: {self.namespace!r}")
        problems += [p for i, u in enumerate(self.units) if (p := _unit_problem(f"units[{i}]", u))]
        for i, ident in enumerate(self.identifiers):
            if not ident or "\n" in ident:
                problems.append(f"identifiers[{i}]: must be a non-empty line, got {ident!r}")
        try:
            parse_priority(self.priority)
        except ValueError as exc:
            problems.append(f"priority: {exc}")
        for i, group in enumerate(self.matches):
            if not group:
                problems.append(f"matches[{i}]: an empty group would match every entry; remove it")
            for field in group:
                if not FIELD_NAME.match(field):
                    problems.append(
                        f"matches[{i}].{field}: not a journal field name (upper-case letters, digits and '_', e.g. _SYSTEMD_UNIT)"
                    )
        if self.grep:
            try:
                re.compile(self.grep)
            except re.error as exc:
                problems.append(f"grep: not a regular expression: {exc}")
        if not 1 <= self.max_batch_size <= MAX_BATCH:
            problems.append(f"max_batch_size: must be between 1 and {MAX_BATCH}, got {self.max_batch_size}")
        problems += self.unit_state.validate()
        problems += self.retry_on_failure.validate()
        return problems

    @property
    def source(self) -> str:
        """What is read, for log lines: ``directory /var/log/journal``, ``namespace kube``, ``the local system journal``."""
        if self.directory:
            return f"directory {self.directory}"
        if self.files:
            return f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        if self.namespace:
            return "every namespace" if self.namespace == "*" else f"namespace {self.namespace}"
        return "the local system journal"


def _unit_problem(key: str, name: str) -> str | None:
    if not name:
        return f"{key}: must not be empty"
    if any(c in name for c in "*?["):
        return f"{key}: glob patterns are not supported, list the units by name (got {name!r})"
    if not _UNIT_NAME.match(name) or len(name) > 255:
        return f"{key}: not a unit name: {name!r}"
    return None
