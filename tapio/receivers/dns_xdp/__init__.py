"""The ``dns-xdp`` receiver: DNS queries and responses parsed and matched in the kernel (XDP or TC), with latency, rcode and unanswered queries."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import DnsXdpReceiver
from ._config import Config


def _summary(config: Config) -> str:
    mode = f"xdp ({config.xdp_mode})" if config.mode == "xdp" else "tc ingress+egress"
    where = f" in {config.network_namespace}" if config.network_namespace else ""
    return f"{', '.join(config.interfaces)}{where}, {mode}, ports {', '.join(map(str, config.ports))}"


factory = Factory(
    type="dns-xdp",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset(Signal),
    create=DnsXdpReceiver,
    description="DNS queries and responses parsed and matched in the kernel (XDP or TC): latency, response codes, unanswered queries.",
    summary=_summary,
)

__all__ = ["factory"]
