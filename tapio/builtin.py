"""The component factories that ship with tapio (one import per component module)."""

from __future__ import annotations

from tapio.component import Factory
from tapio.processors.batch import factory as batch

FACTORIES: list[Factory] = [
    batch,
]
