"""The ``storage`` extension: opens the process's SQLite storage file and holds it.

Invariants:
- While ``run`` is between ``task_status.started(storage)`` and its return,
  the handed `Storage` is open and this process holds the file's lock.
- The file is closed, and the lock released, on every way out of ``run``
  after the open succeeded, even when cancelled (shielded close).
- Startup waits at most ``lock_timeout`` for another holder to let go (the
  previous pod of a rolling update still flushing); then it fails naming
  that holder's pid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from tapio.component import Factory, Kind, Ports, Settings, setting
from tapio.storage import Storage, StorageLocked, default_path
from tapio.telemetry import GAUGE
from tapio.units import Duration

#: how often startup retries a file another process holds
LOCK_RETRY_INTERVAL = 0.25


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    path: str = setting(
        "",
        doc="The SQLite file holding checkpoints and durable queues; its directory is created. "
        "Empty means `<state dir>/tapio.db`, the state dir being $TAPIO_STATE_DIR, "
        "else /var/lib/tapio when running as root, else $XDG_STATE_HOME/tapio (~/.local/state/tapio).",
    )
    synchronous: Literal["full", "normal"] = setting(
        "full",
        doc="`full`: every commit is fsynced and survives a power loss. `normal`: commits survive "
        "a crash or kill of tapio, but a power loss may roll back the last ones (never corrupting "
        "the file); about 20x cheaper per commit.",
    )
    lock_timeout: Duration = setting(
        Duration(30.0),
        doc="How long startup waits for another process holding the file (a previous tapio "
        "still shutting down) before failing; 0 means fail at once.",
    )

    def validate(self) -> list[str]:
        problems = []
        if self.path.strip() != self.path:
            problems.append(f"path: must not start or end with spaces ({self.path!r})")
        elif self.path == ":memory:":
            problems.append("path: ':memory:' is not durable; give a file path or leave it empty for the default")
        elif self.path.endswith("/"):
            problems.append(f"path: must name a file, not a directory ({self.path!r})")
        if self.synchronous not in ("full", "normal"):
            problems.append(f"synchronous: must be 'full' or 'normal', got {self.synchronous!r}")
        if not math.isfinite(self.lock_timeout) or self.lock_timeout < 0:
            problems.append(f"lock_timeout: must be a duration >= 0, got {self.lock_timeout!r}")
        return problems

    def resolved_path(self) -> Path:
        """`path`, or the default file when it is empty."""
        return Path(self.path).expanduser() if self.path else default_path()


class StorageExtension:
    def __init__(self, settings: Settings, config: StorageConfig) -> None:
        self.settings = settings
        self.config = config

    async def run(self, *, task_status: trio.TaskStatus[Storage] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file, hand the `Storage` to ``task_status.started``, close it when cancelled."""
        storage = await self._open()
        try:
            self._report_metrics(storage)
            sizes = await storage.run_sync(storage.queue_sizes)
            n, size = sum(v[0] for v in sizes.values()), sum(v[1] for v in sizes.values())
            self.settings.logger.info(
                "storage %s open (synchronous=%s, %d items in %d queues, %d bytes)",
                storage.path, storage.synchronous, n, len(sizes), size,
            )
            task_status.started(storage)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await storage.aclose()

    async def _open(self) -> Storage:
        path = self.config.resolved_path()
        deadline = trio.current_time() + self.config.lock_timeout
        logged = False
        while True:
            try:
                return await trio.to_thread.run_sync(
                    lambda: Storage.open(path, synchronous=self.config.synchronous)
                )
            except StorageLocked as e:
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    raise
                if not logged:
                    self.settings.logger.warning("%s; waiting up to %s for it to exit", e, self.config.lock_timeout)
                    logged = True
                await trio.sleep(min(LOCK_RETRY_INTERVAL, remaining))

    def _report_metrics(self, storage: Storage) -> None:
        t = self.settings.telemetry
        t.declare("tapio_storage_file_bytes", GAUGE, "Size of the storage file and its write-ahead log, in bytes.")
        t.declare("tapio_storage_queued_items", GAUGE, "Items in the storage's durable queues (those opened by this process).")
        t.declare("tapio_storage_queued_bytes", GAUGE, "Payload bytes in the storage's durable queues (those opened by this process).")
        t.gauge("tapio_storage_file_bytes", storage.file_bytes)
        t.gauge("tapio_storage_queued_items", lambda: storage.queued()[0])
        t.gauge("tapio_storage_queued_bytes", lambda: storage.queued()[1])


def _create(settings: Settings, config: StorageConfig, ports: Ports) -> StorageExtension:
    return StorageExtension(settings, config)


def _summary(config: StorageConfig) -> str:
    return f"{config.resolved_path()} (synchronous={config.synchronous})"


factory = Factory(
    type="storage",
    kind=Kind.EXTENSION,
    config_class=StorageConfig,
    signals=frozenset(),
    create=_create,
    description="One SQLite file for receivers' checkpoints and exporters' durable queues.",
    summary=_summary,
)
