"""The running journald receiver: follow the journal, hand batches on, save the cursor once they are delivered.

Invariants:
- The saved cursor never points past an entry that was not delivered (or
  skipped after retries ran out, counted): `_window.DeliveryWindow` decides
  it from the batches' ``on_done`` reports, and it is written to storage
  only from there. A crash or SIGKILL replays from it; nothing is lost, and
  at most the batches in flight are delivered twice.
- Entries the pipeline did not deliver are read again from the journal
  after a backoff (``retry_on_failure``); reading pauses meanwhile.
- The journal is read off the event loop, in batches of up to
  ``max_batch_size`` entries (see `_source`); the event loop only hands
  ready batches on and waits for the journal's fd.
- With ``start_at: end`` and no saved cursor, the newest entry's cursor is
  saved at start, so entries written while tapio is down later are read
  after a restart.
- Shutdown waits, within the shutdown grace, for the batches in flight to
  be delivered and saves the cursor they reach.
"""

from __future__ import annotations

import trio

from tapio.component import Ports, Refused, Settings
from tapio.storage import Checkpoints, StorageError
from tapio.telemetry import COUNTER, GAUGE

from ._config import Config, unit_name
from ._journal import Opened, Position, ReadResult
from ._mapping import EntryMapper, grep_pattern
from ._source import LibrarySource, make_source
from ._window import NO_REWIND, DeliveryWindow
from ._worker import open_worker

#: the checkpoint key of the cursor (namespace: the receiver's id)
CURSOR_KEY = "cursor"
#: the longest one blocking journal call (open, seek, read of one batch) may take; more means the
#: journal's storage hangs, and the receiver fails (the runtime restarts it)
CALL_TIMEOUT = 60.0
#: pause after a read error before reading on (a corrupt file would otherwise be retried in a loop)
READ_ERROR_PAUSE = 1.0
#: the same warning is logged at most once per this many seconds
WARNING_INTERVAL = 10.0


class JournaldReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the journald receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._tel = settings.telemetry
        self._log = settings.logger
        #: the delivery window while running (tests read its committed cursor)
        self.window: DeliveryWindow | None = None
        self._reading: trio.CancelScope | None = None
        self._settled = trio.Event()
        self._save_wanted = trio.Event()
        self._saved: str | None = None
        self._rewinds = 0
        self._last_committed: str | None = None
        self._dropped_reported = 0
        self._warned: dict[str, float] = {}
        self._declare_metrics()

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings, config = self._settings, self._config
        checkpoints, saved = await self._load_cursor()
        position = Position(saved) if saved else Position(None, "tail" if config.start_at == "end" else "head")
        mapper = EntryMapper(
            grep=grep_pattern(config.grep),
            unit_state=config.unit_state.enabled,
            units=frozenset(unit_name(u) for u in config.unit_state.units) if config.unit_state.units else None,
        )
        async with open_worker(f"journald {settings.id}", close_timeout=settings.shutdown_grace) as worker:
            source = make_source(config, mapper, worker, call_timeout=CALL_TIMEOUT)
            async with trio.open_nursery() as nursery:
                opened = await source.open(position, nursery)
                window = self.window = DeliveryWindow(
                    opened.start,
                    clock=trio.current_time,
                    retry=config.retry_on_failure.enabled,
                    give_up_after=float(config.retry_on_failure.max_elapsed_time),
                    on_change=self._on_change,
                )
                self._last_committed = opened.start
                self._saved = saved
                try:
                    if checkpoints is not None:
                        await self._save(checkpoints, opened.start)  # start_at end: remember where the end was
                        nursery.start_soon(self._save_loop, checkpoints, window)
                    self._log_start(source, opened, saved)
                    task_status.started()
                    await self._follow(source, window)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(settings.shutdown_grace):
                        await self._drain(window)
                        if checkpoints is not None:
                            await self._save(checkpoints, window.committed)
                        await source.aclose()
                    nursery.cancel_scope.cancel()

    async def _load_cursor(self) -> tuple[Checkpoints | None, str | None]:
        ref = self._config.storage
        if ref is None:
            return None, None
        storage = self._settings.storage(ref)
        checkpoints = storage.checkpoints(f"receiver/{self._settings.id}")
        raw = await checkpoints.aget(CURSOR_KEY)
        return checkpoints, (raw.decode() if raw else None)

    def _log_start(self, source, opened: Opened, saved: str | None) -> None:
        config, sid = self._config, self._settings.id
        how = "libsystemd" if isinstance(source, LibrarySource) else "journalctl"
        if saved is not None:
            start = "after the saved cursor" if opened.cursor_found else "at the oldest entry left (the saved cursor's entry was vacuumed)"
        else:
            start = "from the end" if config.start_at == "end" else "from the beginning"
        kept = "cursor saved in storage " + str(config.storage) if config.storage else "cursor kept in memory only (no storage)"
        if not opened.has_files:
            self._log.warning(
                "%s: no journal files in %s (PID 1 is %s): journald does not run here or keeps no journal; "
                "waiting for files to appear; %s",
                sid, config.source, _pid1_name(), kept,
            )
        else:
            self._log.info("%s: reading %s through %s %s; %s", sid, config.source, how, start, kept)
        if saved is not None and not opened.cursor_found:
            self._log.warning("%s: the journal no longer holds the entry of the saved cursor: entries after it were vacuumed before tapio read them", sid)

    async def _follow(self, source, window: DeliveryWindow) -> None:
        limit = self._config.max_batch_size
        retry = self._config.retry_on_failure
        while True:
            if window.rewind is not NO_REWIND:
                delay = min(float(retry.max_interval), float(retry.initial_interval) * 2 ** min(self._rewinds, 30))
                self._rewinds += 1
                await trio.sleep(delay)
                rewind = window.take_rewind()
                if rewind is not NO_REWIND:
                    self._tel.add("tapio_journald_rereads_total")
                    self._warn("reread", "%s: the pipeline did not deliver some entries; reading them again from the journal", self._settings.id)
                    await source.seek(Position(rewind) if isinstance(rewind, str) else Position(None, "head"))
                continue
            result: ReadResult | None = None
            with trio.CancelScope() as self._reading:
                result = await source.next(limit)
            self._reading = None
            if result is None:  # cancelled by a rewind
                continue
            self._account(result)
            if result.cursor is not None:
                on_done = window.add(result.cursor, result.records)
                if result.batch is not None:
                    result.batch.on_done.append(on_done)
                    try:
                        await self._output.send(result.batch)
                    except Refused:
                        pass  # the batch was reported not delivered: the window rewinds
            if result.error:
                self._tel.add("tapio_journald_read_errors_total")
                self._warn("read_error", "%s: %s", self._settings.id, result.error)
                await trio.sleep(READ_ERROR_PAUSE)

    async def _drain(self, window: DeliveryWindow) -> None:
        """Wait until every batch handed on was reported (delivered or not)."""
        while window.pending:
            await self._settled.wait()
            self._settled = trio.Event()

    def _on_change(self) -> None:
        window = self.window
        if window is None:
            return
        if window.committed != self._last_committed:
            self._last_committed = window.committed
            self._rewinds = 0
        if window.rewind is not NO_REWIND and self._reading is not None:
            self._reading.cancel()
        dropped = window.dropped - self._dropped_reported
        if dropped:
            self._dropped_reported = window.dropped
            self._tel.add("tapio_journald_entries_dropped_total", dropped, reason="not_delivered")
            self._log.error("%s: %d journal entries could not be delivered and were skipped (retry_on_failure)", self._settings.id, dropped)
        self._settled.set()
        self._save_wanted.set()

    # -- checkpoints

    async def _save_loop(self, checkpoints: Checkpoints, window: DeliveryWindow) -> None:
        while True:
            await self._save_wanted.wait()
            self._save_wanted = trio.Event()
            await self._save(checkpoints, window.committed)

    async def _save(self, checkpoints: Checkpoints, cursor: str | None) -> None:
        """Write ``cursor`` unless it is what was written last; a storage error is counted and logged."""
        if cursor is None or cursor == self._saved:
            return
        try:
            await checkpoints.aput(CURSOR_KEY, cursor.encode())
        except StorageError as exc:
            self._tel.add("tapio_journald_checkpoint_errors_total")
            self._warn("checkpoint", "%s: cannot save the journal cursor (a restart will read some entries twice): %s", self._settings.id, exc)
            return
        self._saved = cursor

    # -- telemetry

    def _declare_metrics(self) -> None:
        t = self._tel
        t.declare("tapio_journald_entries_read_total", COUNTER, "Journal entries read (after the journal's own matches).")
        t.declare("tapio_journald_entries_filtered_total", COUNTER, "Journal entries left out by grep.")
        t.declare("tapio_journald_unit_events_total", COUNTER, "systemd unit state events, by event (started, failed, restart_scheduled …).")
        t.declare("tapio_journald_rereads_total", COUNTER, "Times entries the pipeline did not deliver were read again from the journal.")
        t.declare("tapio_journald_entries_dropped_total", COUNTER, "Journal entries skipped, by reason (not_delivered: retries ran out).")
        t.declare("tapio_journald_read_errors_total", COUNTER, "Reads of the journal that failed (a corrupt or unreadable file).")
        t.declare("tapio_journald_checkpoint_errors_total", COUNTER, "Cursor saves that failed (storage errors).")
        t.declare("tapio_journald_batches_pending", GAUGE, "Batches handed on whose delivery is not known yet (the saved cursor waits for them).")
        t.gauge("tapio_journald_batches_pending", lambda: self.window.pending if self.window else 0)

    def _account(self, result: ReadResult) -> None:
        t = self._tel
        if result.entries:
            t.add("tapio_journald_entries_read_total", result.entries)
        if result.entries > result.records:
            t.add("tapio_journald_entries_filtered_total", result.entries - result.records)
        for event, n in result.unit_events.items():
            t.add("tapio_journald_unit_events_total", n, event=event)
        for reason, n in result.bad.items():
            t.bad_input(reason, n)

    def _warn(self, key: str, message: str, *args: object) -> None:
        now = trio.current_time()
        if now - self._warned.get(key, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self._warned[key] = now
            self._log.warning(message, *args)


def _pid1_name() -> str:
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"
