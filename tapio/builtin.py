"""The component factories that ship with tapio (one import per component module)."""

from __future__ import annotations

from tapio.component import Factory
from tapio.exporters.debug import factory as debug_exporter
from tapio.exporters.file import factory as file_exporter
from tapio.extensions.storage import factory as storage
from tapio.processors.batch import factory as batch
from tapio.receivers.otlp import factory as otlp_receiver

FACTORIES: list[Factory] = [
    # receivers
    otlp_receiver,
    # processors
    batch,
    # exporters
    debug_exporter,
    file_exporter,
    # extensions
    storage,
]
