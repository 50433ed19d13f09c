"""The running correlate connector: log batches in, incidents out as traces, logs and metrics.

Invariants:
- Only records some rule's member could match are looked at beyond their
  event name and scope (`_records.events`).
- A member record of an established incident that passes through in the
  current batch gets the incident's trace id and its child span's id,
  unless it already belongs to a trace; the batch then forgets its
  arrival bytes so exporters send what was stamped.
- With a logs pipeline after the connector, every incoming record goes on
  (with the batch's delivery callbacks) followed by a record per incident;
  without one, incoming batches end here as delivered.
- Windows are decided on a one-second tick. Without storage, on shutdown
  every complete incident still open is sent before the outputs close.
  With storage, open windows are saved every ``checkpoint_interval`` and on
  shutdown (instead of deciding them), and put back at start before the
  first batch is read (`_state`), so an incident whose events straddle a
  restart is still one incident. A saved state that cannot be read is
  logged and counted, and the connector starts empty.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import trio

from tapio.component import Ports, Refused, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER, GAUGE

from . import _spans, _state
from ._config import CorrelateConfig
from ._engine import Appended, Emitted, Engine, Output, compile_rule
from ._records import events

TICK_S = 1.0


class Correlate:
    def __init__(self, settings: Settings, config: CorrelateConfig, ports: Ports) -> None:
        assert ports.input is not None and ports.output is not None, "a connector needs an input and an output"
        self._input = ports.input
        self._output = ports.output
        self._wired: frozenset[Signal] = getattr(ports.output, "signals", frozenset(Signal))
        self._log: logging.Logger = settings.logger
        self._tel = settings.telemetry
        self._grace = settings.shutdown_grace
        self.rules = [compile_rule(name, rule) for name, rule in config.effective_rules().items()]
        self.engine = Engine(
            self.rules,
            max_keys=config.max_keys,
            max_events_per_member=config.max_events_per_member,
            lateness_s=float(config.lateness),
        )
        self._start_ns = time.time_ns()
        self._reported: dict[str, int] = {}
        self._storage = settings.storage(config.storage) if config.storage is not None else None
        self._checkpoints = self._storage.checkpoints(f"connector/{settings.id}") if self._storage is not None else None
        self._checkpoint_s = float(config.checkpoint_interval)

    def running_summary(self) -> list[str]:
        outputs = ", ".join(s.value for s in sorted(self._wired)) or "nothing"
        kept = f"; open windows saved every {self._checkpoint_s:g}s" if self._checkpoints is not None else ""
        return [f"{len(self.rules)} rules ({', '.join(r.name for r in self.rules) or 'none'}); incidents to {outputs}{kept}"]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        t = self._tel
        t.declare("tapio_correlate_incidents_total", COUNTER, "Incidents sent, by rule and severity.")
        t.declare("tapio_correlate_member_events_total", COUNTER, "Records that joined an incident window, by rule.")
        t.declare("tapio_correlate_discarded_total", COUNTER, "Windows and member events left out, by reason (evicted, incomplete, ruled_out, resolved, no_join_key, too_late, kept_over_cap, restore_dropped, state_unreadable).")
        t.declare("tapio_correlate_open_windows", GAUGE, "Incident windows open now.")
        t.gauge("tapio_correlate_open_windows", lambda: float(self.engine.open_windows()))
        t.declare("tapio_correlate_state_saves_total", COUNTER, "Saves of the open windows to storage, by result (ok, failed).")
        if self._checkpoints is not None:
            await self._restore()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tick)
                async for batch in self._input:
                    await self._handle(batch)
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(self._grace) as scope:
                scope.shield = True
                if self._checkpoints is None:
                    await self._send(self.engine.flush(trio.current_time()))
                else:
                    await self._save()

    async def _tick(self) -> None:
        next_save = trio.current_time() + self._checkpoint_s
        while True:
            await trio.sleep(TICK_S)
            await self._send(self.engine.tick(trio.current_time()))
            if self._checkpoints is not None and trio.current_time() >= next_save:
                await self._save()
                next_save = trio.current_time() + self._checkpoint_s

    async def _restore(self) -> None:
        assert self._storage is not None and self._checkpoints is not None
        data = await self._storage.run_sync(self._checkpoints.get, "windows")
        if data is None:
            return
        try:
            restored, dropped = _state.load(self.engine, data, trio.current_time())
        except (ValueError, KeyError, TypeError) as e:
            self._tel.add("tapio_correlate_discarded_total", 1, reason="state_unreadable")
            self._log.warning("the saved correlation windows cannot be read (%s); starting without them", e)
            return
        if dropped:
            self._tel.add("tapio_correlate_discarded_total", dropped, reason="restore_dropped")
        self._log.info("restored %d open incident windows from storage (%d left out: their rule changed)", restored, dropped)

    async def _save(self) -> None:
        assert self._storage is not None and self._checkpoints is not None
        snap = _state.snapshot(self.engine, trio.current_time())
        checkpoints = self._checkpoints
        try:
            await self._storage.run_sync(lambda: checkpoints.put("windows", _state.encode(snap)))
        except Exception as e:  # a full disk or a broken file must not stop correlation
            self._tel.add("tapio_correlate_state_saves_total", 1, result="failed")
            self._log.warning("saving the open correlation windows failed: %s", e)
        else:
            self._tel.add("tapio_correlate_state_saves_total", 1, result="ok")

    async def _handle(self, batch: Batch) -> None:
        now = trio.current_time()
        engine = self.engine
        out: list[Output] = []
        seen = []
        stamped = False
        try:
            for request in batch.requests:
                for event in events(request, engine.candidates):
                    seen.append(event)
                    sent, stamps = engine.feed(event, now)
                    out += sent
                    for trace_id, joined in stamps:
                        record = joined.event.record
                        if record is not None and not record.trace_id:
                            record.trace_id, record.span_id = trace_id, joined.span_id
                            stamped = True
        finally:
            for event in seen:
                event.record = None  # only this batch's records may be stamped; kept events keep no record
        if stamped:
            batch.forget_raw()
        self._count_stats()
        if Signal.LOGS in self._wired:
            try:
                await self._output.send(batch)
            except Refused:
                pass  # counted by the stage that refused it, its sources told
            except trio.Cancelled:
                batch.done(False)
                raise
        else:
            batch.done(True)
        await self._send(out)

    async def _send(self, out: Iterable[Output]) -> None:
        out = list(out)
        if not out:
            self._count_stats()
            return
        emitted = [o.incident for o in out if isinstance(o, Emitted)]
        for incident in emitted:
            self._tel.add("tapio_correlate_incidents_total", 1, rule=incident.rule.name, severity=incident.rule.severity)
            self._log.info(
                "incident %s (%s, confidence %.2f): %s",
                incident.rule.name,
                incident.rule.severity,
                incident.confidence,
                incident.summary,
                extra={"rule": incident.rule.name, "trace_id": incident.trace_id.hex()},
            )
        batches: list[Batch] = []
        if Signal.TRACES in self._wired:
            traces = [
                _spans.incident_trace(o.incident) if isinstance(o, Emitted) else _spans.appended_trace(o.incident, o.added)
                for o in out
                if isinstance(o, (Emitted, Appended))
            ]
            batches.append(Batch.of(Signal.TRACES, *traces))
        if emitted and Signal.LOGS in self._wired:
            batches.append(Batch.of(Signal.LOGS, _spans.incident_log(emitted, time.time_ns())))
        if emitted and Signal.METRICS in self._wired:
            batches.append(Batch.of(Signal.METRICS, _spans.incident_counter(self.engine.incidents, self._start_ns, time.time_ns())))
        for b in batches:
            try:
                await self._output.send(b)
            except Refused:
                self._log.warning("a stage after the connector refused %d incident %s", b.count, b.signal.item_name)
        self._count_stats()

    def _count_stats(self) -> None:
        for reason, n in self.engine.stats.items():
            seen = self._reported.get(reason, 0)
            if n != seen:
                self._tel.add("tapio_correlate_discarded_total", n - seen, reason=reason)
                self._reported[reason] = n
        for rule, n in self.engine.joined.items():
            key = f"joined:{rule}"
            seen = self._reported.get(key, 0)
            if n != seen:
                self._tel.add("tapio_correlate_member_events_total", n - seen, rule=rule)
                self._reported[key] = n
