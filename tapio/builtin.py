"""The component factories that ship with tapio (one import per component module)."""

from __future__ import annotations

from tapio.component import Factory
from tapio.extensions.storage import factory as storage
from tapio.processors.batch import factory as batch
from tapio.receivers.otlp import factory as otlp_receiver

FACTORIES: list[Factory] = [
    # receivers
    otlp_receiver,
    # processors
    batch,
    # extensions
    storage,
]
