"""The ``etcd-watch`` receiver: etcd v3 key changes (Kubernetes objects under /registry/) as log records, resumable by revision."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import EtcdWatchReceiver
from ._config import Config


def _summary(config: Config) -> str:
    prefixes = ", ".join(repr(p) for p in config.prefixes)
    resume = f"checkpoints in {config.storage}" if config.storage is not None else "no checkpoints"
    return f"{prefixes} on {', '.join(config.endpoints)} ({resume})"


factory = Factory(
    type="etcd-watch",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset({Signal.LOGS}),
    create=EtcdWatchReceiver,
    description="Watches etcd v3 key prefixes (Kubernetes objects under /registry/) and reports every change as a log record, resuming from a checkpointed revision.",
    summary=_summary,
)

__all__ = ["factory"]
