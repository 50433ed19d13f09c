"""The etcd-watch receiver's configuration.

Invariants:
- The default config validates and watches ``/registry/`` (where the
  Kubernetes API server keeps its objects) on ``http://127.0.0.1:2379``.
- `validate` reports every problem, each prefixed with its dotted key; the
  password never appears in a problem, a repr or a log line.
- No two prefixes overlap (one a prefix of another), so no event is
  reported twice.
"""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from tapio.component import StorageRef, setting
from tapio.tls import client_tls_problems
from tapio.units import Duration

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
#: where the Kubernetes API server keeps its objects (its --etcd-prefix default)
KUBERNETES_PREFIX = "/registry/"
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    ca_file: str = setting("", doc="PEM file of the CA(s) that signed the etcd members' certificates; empty trusts the system's CAs.")
    cert_file: str = setting("", doc="PEM client certificate for mutual TLS (etcd's `--client-cert-auth`); empty sends none. Needs `key_file`.")
    key_file: str = setting("", doc="PEM private key of `cert_file`.")
    insecure_skip_verify: bool = setting(False, doc="Accept any server certificate (testing only).")
    min_version: Literal["1.2", "1.3"] = setting("1.2", doc="Oldest TLS version accepted.")

    def validate(self, prefix: str = "tls") -> list[str]:
        return client_tls_problems(self, prefix, TLS_VERSIONS)


@dataclass(frozen=True, kw_only=True)
class ReconnectConfig:
    initial_interval: Duration = setting(
        Duration(0.1),
        doc="Wait before reconnecting once every endpoint failed in a row (the next endpoint is tried at once).",
    )
    max_interval: Duration = setting(Duration(10.0), doc="Longest wait between two rounds of reconnecting; each wait doubles up to it (with jitter).")

    def validate(self, prefix: str = "reconnect") -> list[str]:
        problems = []
        if self.initial_interval <= 0:
            problems.append(f"{prefix}.initial_interval: must be more than 0")
        if self.max_interval < self.initial_interval:
            problems.append(f"{prefix}.max_interval: must be >= initial_interval ({self.initial_interval}), got {self.max_interval}")
        return problems


@dataclass(frozen=True, kw_only=True)
class Config:
    endpoints: list[str] = setting(
        default_factory=lambda: [DEFAULT_ENDPOINT],
        doc="Client URLs of the etcd members (`http://host:port` or `https://host:port`), tried in order: "
        "when one fails the watch moves to the next and resumes where it stopped.",
    )
    prefixes: list[str] = setting(
        default_factory=lambda: [KUBERNETES_PREFIX],
        doc="Key prefixes to watch, one watch each; they must not overlap. An empty string watches every key.",
    )
    storage: StorageRef | None = setting(
        None,
        doc="The id of a storage extension (listed in `service.extensions`) to keep each prefix's revision in, "
        "so a restart resumes where the last run's delivered records end. None: every start begins as `start_revision` says.",
    )
    start_revision: int = setting(
        0,
        doc="Where to start a prefix that has no checkpoint: 0 means now (changes from the current revision on); "
        "N > 0 replays from revision N (a compacted N re-lists, see `relist_on_compaction`).",
    )
    prev_kv: bool = setting(True, doc="Ask etcd for each event's previous value, so a DELETE carries the deleted object and a PUT what it replaced.")
    raw_values: bool = setting(
        True,
        doc="Keep each value's bytes as they are in etcd (`tapio.etcd.value`, `tapio.etcd.prev_value`) beside the decoded body.",
    )
    relist_on_compaction: bool = setting(
        True,
        doc="When the revision to resume from was compacted away, report every key of the prefix as it is now "
        "(after the resync marker) before watching on; false reports only the marker.",
    )
    kubernetes_prefix: str = setting(
        KUBERNETES_PREFIX,
        doc="Keys under this prefix are read as Kubernetes objects (`<prefix><resource>/[<namespace>/]<name>`) for the "
        "`k8s.*` attributes; the API server's `--etcd-prefix`. Empty turns that off.",
    )
    username: str = setting("", doc="etcd user (with `password`) for etcd's authentication; empty sends no credentials.")
    password: str = setting(
        "",
        doc="That user's password; write `${env:ETCD_PASSWORD}` to take it from the environment. Never logged.",
        secret=True,
    )
    tls: TLSConfig = setting(default_factory=TLSConfig, doc="Transport security for `https://` endpoints.")
    dial_timeout: Duration = setting(Duration(5.0), doc="How long connecting to one endpoint may take before the next is tried.")
    request_timeout: Duration = setting(Duration(30.0), doc="How long one request (authenticate, one page of a re-list) may take.")
    reconnect: ReconnectConfig = setting(default_factory=ReconnectConfig, doc="Backoff between rounds of reconnect attempts.")
    max_events_per_batch: int = setting(
        256,
        doc="Most events in one batch handed on; a larger watch response is split, so no step holds the event loop long.",
    )
    relist_page_size: int = setting(500, doc="Keys read per request while re-listing a prefix.")

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.endpoints:
            problems.append("endpoints: give at least one etcd client URL, e.g. http://127.0.0.1:2379")
        for i, endpoint in enumerate(self.endpoints):
            trouble = endpoint_problem(endpoint)
            if trouble:
                problems.append(f"endpoints[{i}]: {trouble}")
        if len(set(self.endpoints)) != len(self.endpoints):
            problems.append("endpoints: lists the same URL twice")
        if not self.prefixes:
            problems.append("prefixes: give at least one key prefix, e.g. /registry/")
        for i, a in enumerate(self.prefixes):
            for j, b in enumerate(self.prefixes):
                if i < j and (a.startswith(b) or b.startswith(a)):
                    problems.append(f"prefixes[{j}]: {b!r} overlaps {a!r} (prefixes[{i}]): their events would be reported twice")
        if self.start_revision < 0:
            problems.append(f"start_revision: must be 0 (now) or a revision >= 1, got {self.start_revision}")
        if bool(self.username) != bool(self.password):
            missing = "password" if self.username else "username"
            problems.append(f"{missing}: username and password must be given together")
        problems += self.tls.validate()
        problems += self.reconnect.validate()
        for key in ("dial_timeout", "request_timeout"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                problems.append(f"{key}: must be more than 0")
        if self.max_events_per_batch < 1:
            problems.append(f"max_events_per_batch: must be at least 1, got {self.max_events_per_batch}")
        if self.relist_page_size < 1:
            problems.append(f"relist_page_size: must be at least 1, got {self.relist_page_size}")
        return problems

    @property
    def uses_tls(self) -> bool:
        return any(e.startswith("https://") for e in self.endpoints)


def endpoint_problem(endpoint: str) -> str | None:
    """What is wrong with an etcd client URL, or None."""
    try:
        url = urllib.parse.urlsplit(endpoint)
        port = url.port
    except ValueError as exc:
        return f"{endpoint!r} is not a URL: {exc}"
    if url.scheme not in ("http", "https"):
        return f"{endpoint!r} must start with http:// or https://"
    if not url.hostname:
        return f"{endpoint!r} has no host"
    if port is None:
        return f"{endpoint!r} has no port (etcd's client port is usually 2379)"
    if url.path not in ("", "/") or url.query or url.fragment or url.username or url.password:
        return f"{endpoint!r} must be only scheme://host:port"
    return None
