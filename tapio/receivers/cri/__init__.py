"""The ``cri`` receiver: container and pod sandbox lifecycle from the container runtime, over the CRI API.

The CRI stubs (``_proto``) are generated from the vendored ``api.proto`` and
checked in (see ``_proto/__init__.py``).
"""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import CriReceiver
from ._config import Config


def _summary(config: Config) -> str:
    mode = "event stream" if config.event_stream else f"listing every {float(config.poll_interval):g}s"
    return f"{config.endpoint} ({mode}{', checkpoints in ' + str(config.storage) if config.storage else ''})"


factory = Factory(
    type="cri",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset({Signal.LOGS}),
    create=CriReceiver,
    description="Container and pod sandbox lifecycle (created, started, stopped with exit code and reason, deleted) from the container runtime over CRI.",
    summary=_summary,
)

__all__ = ["factory"]
