"""Tailing files for receivers: settings every file receiver shares, and the `Tailer` that follows the files.

A file receiver subclasses `TailSettings` for its config, and runs a `Tailer`
with a ``convert`` function (records of one file → a batch, called in a
worker thread). See `_tailer` for what is promised about rotation,
truncation, delivery and checkpoints, `_lines` for records.
"""

from ._config import MultilineConfig, TailSettings
from ._lines import Lines, LineSplitter
from ._tailer import Tailer

__all__ = ["Lines", "LineSplitter", "MultilineConfig", "TailSettings", "Tailer"]
