"""The running cni-log receiver: a `Tailer` over the CNI log files, each line parsed into one log record.

Invariants:
- Every line read becomes one log record (see `_records`), parsed or not:
  lines no style recognises keep their raw body and are counted
  (``tapio_bad_input_total{reason="unparsed_line"}``), as are cut lines and
  lines with invalid bytes (counted by the tailer).
- Parsing and encoding run in the tailer's worker thread; counters are
  added on the event loop afterwards.
- Offsets are saved in the storage extension named by ``storage`` only once
  the records before them were delivered (see `tapio.receivers._tail`).
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Callable

import trio

from tapio.component import Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.receivers._tail import Lines, Tailer
from tapio.telemetry import COUNTER

from ._config import Config
from ._parser import LineParser
from ._records import RecordWriter


class CniLogReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the cni-log receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._tel = settings.telemetry
        self._writer = RecordWriter(
            LineParser(style=config.parser, naive_timezone=config.naive_timezone()),
            [("host.name", socket.gethostname()), ("os.type", "linux"), ("service.name", "tapio")],
        )
        self._tailer: Tailer | None = None
        self._tel.declare("tapio_cni_log_lines_total", COUNTER, "CNI log lines read, by the style that recognised them (unparsed: none).")

    @property
    def running_summary(self) -> str:
        """What the start banner shows: the files tailed (or the samples read when there are none), and which path parses lines."""
        return f"{self._tailer.summary}; {self._writer.summary()}" if self._tailer is not None else ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings, config = self._settings, self._config
        storage = settings.storage(config.storage) if config.storage is not None else None
        self._tailer = Tailer(
            config,
            convert=self._convert,
            output=self._output,
            telemetry=self._tel,
            logger=settings.logger,
            name=str(settings.id),
            storage=storage,
            fallback_include=config.fallback_include,
            shutdown_grace=settings.shutdown_grace,
        )
        await self._tailer.run(task_status=task_status)

    def _convert(self, path: str, lines: Lines, observed_ns: int) -> tuple[Batch | None, Callable[[], None]]:
        """In the tailer's worker thread: lines → a batch (parsed and encoded; the bytes are parsed only if a stage reads the records)."""
        written = self._writer.write(path, lines.texts, observed_ns, frozenset(lines.cut))
        batch = Batch.from_bytes(Signal.LOGS, written.request, written.count)
        return batch, lambda: self._count(written.styles)

    def _count(self, styles: Counter[str]) -> None:
        for style, n in styles.items():
            self._tel.add("tapio_cni_log_lines_total", n, style=style)
        unparsed = styles.get("unparsed", 0)
        if unparsed:
            self._tel.bad_input("unparsed_line", unparsed)
