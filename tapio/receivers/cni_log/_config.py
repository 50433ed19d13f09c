"""The cni-log receiver's configuration: the shared tailing settings, CNI log locations, and how lines are read.

Invariants:
- The default ``include`` globs are the log files the common CNI plugins
  write on a node by default (each plugin's own documentation), rotated
  copies included; none of them needs to exist at start.
- `validate` reports every problem, each prefixed with its key.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from typing import Literal

from tapio.component import setting
from tapio.receivers._tail import TailSettings

#: where CNI plugins log on a node by default; a rotated file keeps the name's start
DEFAULT_INCLUDE = (
    "/var/log/calico/cni/cni*.log",  # Calico: log_file_path (rotated as cni-<time>.log)
    "/var/run/cilium/cilium-cni*.log",  # Cilium: cni.logFile
    "/var/log/multus*.log",  # Multus: logFile (the path its documentation uses; off unless configured)
    "/var/log/aws-routed-eni/plugin*.log",  # AWS VPC CNI: AWS_VPC_K8S_PLUGIN_LOG_FILE
    "/var/log/azure-vnet*.log",  # Azure CNI
)

Style = Literal["auto", "calico", "cilium", "multus", "aws-vpc-cni", "azure-cni", "json", "kv"]


@dataclass(frozen=True, kw_only=True)
class Config(TailSettings):
    include: list[str] = setting(
        default_factory=lambda: list(DEFAULT_INCLUDE),
        doc="Glob patterns of the CNI log files to tail (`*`, `?`, `[...]`, `**`). The default covers where Calico, Cilium, Multus, the AWS VPC CNI and the Azure CNI write their logs. Files are told apart by their first bytes, not their names, so a renamed file is not read twice.",
    )
    parser: Style = setting(
        "auto",
        doc="Which line format to expect: `auto` recognises each line's style; naming one (`calico`, `cilium`, `multus`, `aws-vpc-cni`, `azure-cni`, `json`, `kv`) treats lines of any other style as unparsed.",
    )
    timezone: str = setting(
        "UTC",
        doc="The time zone of timestamps written without one (Calico's): `UTC`, `Local` (this machine's) or an IANA name such as `Europe/Berlin`.",
    )
    fallback_include: list[str] = setting(
        default_factory=list,
        doc="Glob patterns read from their beginning when `include` matches no file at start (the default pipelines.yaml points it at sample logs, so a machine without a CNI plugin shows what the receiver does). `include` is still watched. Empty: none.",
    )

    def naive_timezone(self) -> dt.tzinfo | None:
        """The zone for the parser (None: local time)."""
        if self.timezone.upper() == "UTC":
            return dt.timezone.utc
        if self.timezone.lower() == "local":
            return None
        return zoneinfo.ZoneInfo(self.timezone)

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.include and not self.fallback_include:
            problems.append("include: name at least one file pattern (the default covers the usual CNI log locations)")
        for i, pattern in enumerate(self.fallback_include):
            if not pattern.strip():
                problems.append(f"fallback_include[{i}]: must not be empty")
        try:
            self.naive_timezone()
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(f"timezone: unknown time zone {self.timezone!r}: use UTC, Local or an IANA name like Europe/Berlin")
        return problems
