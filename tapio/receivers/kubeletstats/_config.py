"""The kubeletstats receiver's configuration, shaped like the OpenTelemetry Collector's kubeletstatsreceiver.

Invariants:
- The defaults fit a DaemonSet pod: the kubelet of the pod's own node
  (``K8S_NODE_NAME`` from the downward API) over HTTPS, authenticated with
  the pod's service account token and verified with its CA.
- `validate` reports every problem, each prefixed with its dotted key.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal

from tapio.component import setting
from tapio.units import Duration

from ._summary import GROUPS

DEFAULT_ENDPOINT = "https://${env:K8S_NODE_NAME}:10250"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True, kw_only=True)
class Config:
    endpoint: str = setting(
        DEFAULT_ENDPOINT,
        doc="The kubelet's base URL: https://host:10250, or http://host:10255 for the read-only port (auth_type none). ${env:NAME} in the default is read from the environment at start.",
    )
    auth_type: Literal["serviceAccount", "tls", "none"] = setting(
        "serviceAccount",
        doc="serviceAccount: the pod's service account token as a bearer token, the kubelet verified with the account's CA. tls: a client certificate (cert_file, key_file). none: no credentials.",
    )
    service_account_dir: str = setting(
        SERVICE_ACCOUNT_DIR,
        doc="Where the service account's token and ca.crt are mounted (auth_type serviceAccount). The token is read again before each scrape, so a rotated token is used.",
    )
    ca_file: str = setting("", doc="CA to verify the kubelet's certificate with (tls; with serviceAccount it replaces the account's ca.crt). Empty: the system's CAs (tls) or ca.crt (serviceAccount).")
    cert_file: str = setting("", doc="Client certificate (auth_type tls).")
    key_file: str = setting("", doc="Client certificate's key (auth_type tls).")
    insecure_skip_verify: bool = setting(False, doc="Do not verify the kubelet's certificate (kubelets often serve a self-signed one). The connection is still encrypted.")
    collection_interval: Duration = setting(Duration(10.0), doc="How often to scrape /stats/summary.")
    initial_delay: Duration = setting(Duration(1.0), doc="Wait after start before the first scrape.")
    timeout: Duration = setting(Duration(10.0), doc="Deadline of each request to the kubelet.")
    metric_groups: list[str] = setting(
        default_factory=lambda: ["container", "pod", "node"],
        doc="Which metric groups to report: node, pod, container, volume.",
    )
    utilization: bool = setting(
        True,
        doc="Also report *_memory_limit_utilization, *_memory_request_utilization, *_cpu_limit_utilization and *_cpu_request_utilization for pods and containers whose spec sets a limit or request, from the kubelet's /pods (one more request per scrape). false reports none.",
    )

    def validate(self) -> list[str]:
        problems = []
        url = urllib.parse.urlsplit(self.endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            problems.append(f"endpoint: expected http(s)://host:port, got {self.endpoint!r}")
        elif url.scheme == "http" and self.auth_type != "none":
            problems.append(f"endpoint: auth_type {self.auth_type} sends credentials, so it needs https://, got {self.endpoint!r}")
        if self.auth_type == "tls" and not (self.cert_file and self.key_file):
            problems.append("auth_type: tls needs cert_file and key_file")
        if bool(self.cert_file) != bool(self.key_file):
            problems.append("cert_file, key_file: set both or neither")
        if self.collection_interval <= 0:
            problems.append(f"collection_interval: must be more than 0, got {self.collection_interval}")
        if self.initial_delay < 0:
            problems.append(f"initial_delay: must be 0 or more, got {self.initial_delay}")
        if self.timeout <= 0:
            problems.append(f"timeout: must be more than 0, got {self.timeout}")
        unknown = [g for g in self.metric_groups if g not in GROUPS]
        if unknown:
            problems.append(f"metric_groups: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(GROUPS)}")
        if not self.metric_groups:
            problems.append("metric_groups: name at least one group")
        return problems
