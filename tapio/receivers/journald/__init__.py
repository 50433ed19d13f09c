"""The ``journald`` receiver: the systemd journal as log records, with systemd unit state events; resumes from a saved cursor."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import JournaldReceiver
from ._config import Config


def _summary(config: Config) -> str:
    parts = [config.source, f"start_at {config.start_at}", f"priority {config.priority}"]
    if config.units:
        parts.append(f"units {', '.join(config.units)}")
    if config.storage is not None:
        parts.append(f"cursor in {config.storage}")
    return "; ".join(parts)


factory = Factory(
    type="journald",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset({Signal.LOGS}),
    create=JournaldReceiver,
    description="Reads the systemd journal (libsystemd, or journalctl) into log records, with systemd unit state events; the cursor is saved only after delivery.",
    summary=_summary,
)

__all__ = ["factory"]
