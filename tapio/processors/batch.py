"""The ``batch`` processor: groups records into batches by size and time, as the OTel Collector's.

Invariants:
- Items leave in the order they arrived, each exactly once; none is lost
  silently: what cannot be sent by the end of a shutdown is handed back to
  its sources as not delivered (``on_done(False)``) and counted in
  ``tapio_processor_dropped_items_total{reason="shutdown"}``.
- With ``send_batch_max_size`` > 0 no outgoing batch holds more items than
  it. The buffer is cut where batches arrive, so every multiple of the max
  size (counted from the start of the buffer) falls on a piece boundary;
  taking whole pieces up to the max then always yields exactly the max, or
  all that is buffered.
- Incoming requests are never changed: whole requests pass on as they are,
  and a request that must be cut is copied into new requests, each carrying
  its own copy of the resource, scope (and metric) envelope around the items
  it holds. Containers that hold no items are not carried into the parts.
- An ``on_done`` callback of an incoming batch is called exactly once, after
  every part holding some of its items reported done; it is told "delivered"
  only if every part was delivered (`DoneCountdown`).
- No item waits in the buffer longer than ``timeout`` (plus the time the
  next stage makes us wait: backpressure passes upstream, nothing is
  dropped to avoid it).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import trio

from tapio.component import Factory, Kind, Ports, Settings, setting
from tapio.pdata import Batch, DoneCountdown, Request, Signal, count_items
from tapio.telemetry import COUNTER
from tapio.units import Duration

TIMEOUT_TRIGGER_METRIC = "tapio_processor_batch_timeout_trigger_send_total"
SIZE_TRIGGER_METRIC = "tapio_processor_batch_batch_size_trigger_send_total"

# ---------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    send_batch_size: int = setting(
        8192,
        doc="Number of items (log records, spans or metric data points) after which a batch is sent "
        "without waiting for the timeout. It is a trigger, not a limit: a batch can hold more "
        "(see send_batch_max_size). 0 sends every incoming batch at once, like timeout 0.",
    )
    send_batch_max_size: int = setting(
        0,
        doc="Most items an outgoing batch may hold; larger batches are split at item granularity. "
        "0 means no upper limit. Otherwise it must be >= send_batch_size.",
    )
    timeout: Duration = setting(
        Duration(0.2),
        doc="How long items may wait in the buffer: a non-empty, smaller batch is sent this long after "
        "its oldest item arrived. 0 sends every incoming batch at once (split by send_batch_max_size only).",
    )

    def validate(self) -> list[str]:
        problems = []
        if self.send_batch_size < 0:
            problems.append(f"send_batch_size: must be >= 0, got {self.send_batch_size}")
        if self.send_batch_max_size < 0:
            problems.append(f"send_batch_max_size: must be >= 0 (0 = no limit), got {self.send_batch_max_size}")
        elif 0 < self.send_batch_max_size < self.send_batch_size:
            problems.append(
                f"send_batch_max_size: must be 0 or >= send_batch_size ({self.send_batch_size}), "
                f"got {self.send_batch_max_size}"
            )
        if self.timeout < 0:
            problems.append(f"timeout: must not be negative, got {self.timeout}")
        return problems


# ---------------------------------------------------------------- on_done accounting


# ---------------------------------------------------------------- splitting


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the items sit in one signal's export request."""

    #: repeated fields from the request down to the message that holds the items
    levels: tuple[str, ...]
    #: the repeated field of items in the innermost message (metrics: inside its data oneof)
    items: str


_LAYOUTS = {
    Signal.LOGS: _Layout(("resource_logs", "scope_logs"), "log_records"),
    Signal.TRACES: _Layout(("resource_spans", "scope_spans"), "spans"),
    Signal.METRICS: _Layout(("resource_metrics", "scope_metrics", "metrics"), "data_points"),
}


def _item_holder(signal: Signal, msg: Any) -> Any:
    """The message whose ``items`` field holds the items: a metric's data (gauge, sum …), else ``msg``."""
    if signal is Signal.METRICS:
        kind = msg.WhichOneof("data")
        return None if kind is None else getattr(msg, kind)
    return msg


def _copy_envelope(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of ``src`` into ``dst`` except the repeated field or oneof named ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip or (fd.containing_oneof is not None and fd.containing_oneof.name == skip):
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def split_request(signal: Signal, request: Request, sizes: Sequence[int]) -> list[Request]:
    """Cut one export request into new requests holding ``sizes[0]``, ``sizes[1]`` … items, in order.

    ``sizes`` must be positive and add up to the request's item count. Each
    part gets its own copy of the resource and scope (for metrics also the
    metric's name, description, unit, metadata, and its type with temporality
    and monotonicity) around the items it holds. ``request`` is not changed.
    One pass; every item is copied once.
    """
    if any(s <= 0 for s in sizes):
        raise ValueError(f"part sizes must be positive, got {list(sizes)}")
    total = count_items(signal, request)
    if sum(sizes) != total:
        raise ValueError(f"part sizes add up to {sum(sizes)} but the request holds {total} items")
    layout = _LAYOUTS[signal]
    parts: list[Request] = []
    sizes_left = iter(sizes)
    want = 0
    # The envelope copies made in the current part: made[i] is the copy at
    # level i, with the index path of its source, so that the items of one
    # scope (or metric) that land in the same part share one envelope.
    made: list[tuple[tuple[int, ...], Any]] = []
    for path, chain in _item_holders(request, layout.levels):
        src_holder = _item_holder(signal, chain[-1])
        if src_holder is None:
            continue
        items = getattr(src_holder, layout.items)
        start, n = 0, len(items)
        while start < n:
            if want == 0:
                want = next(sizes_left)
                parts.append(signal.request_class())
                made.clear()
            take = min(want, n - start)
            dst = _envelope_in(parts[-1], made, path, chain, layout.levels, signal)
            getattr(_dst_item_holder(signal, chain[-1], dst), layout.items).extend(items[start : start + take])
            start += take
            want -= take
    return parts


def _item_holders(request: Request, levels: tuple[str, ...]) -> list[tuple[tuple[int, ...], tuple[Any, ...]]]:
    """(index path, chain of messages from the resource level down) for each innermost message, in order."""
    out: list[tuple[tuple[int, ...], tuple[Any, ...]]] = []

    def walk(msg: Any, level: int, path: tuple[int, ...], chain: tuple[Any, ...]) -> None:
        if level == len(levels):
            out.append((path, chain))
            return
        for i, child in enumerate(getattr(msg, levels[level])):
            walk(child, level + 1, path + (i,), chain + (child,))

    walk(request, 0, (), ())
    return out


def _envelope_in(part: Request, made: list, path: tuple[int, ...], chain: tuple[Any, ...], levels: tuple[str, ...], signal: Signal) -> Any:
    """The innermost envelope copy for ``path`` in ``part``, making the missing levels."""
    keep = 0
    while keep < len(made) and made[keep][0] == path[: keep + 1]:
        keep += 1
    del made[keep:]
    parent = made[-1][1] if made else part
    for level in range(keep, len(levels)):
        dst = getattr(parent, levels[level]).add()
        if level + 1 < len(levels):
            inner = levels[level + 1]
        else:
            inner = "data" if signal is Signal.METRICS else _LAYOUTS[signal].items
        _copy_envelope(chain[level], dst, inner)
        made.append((path[: level + 1], dst))
        parent = dst
    return parent


def _dst_item_holder(signal: Signal, src: Any, dst: Any) -> Any:
    """Where items go in the envelope copy ``dst`` of ``src``: for a metric, its data of the same type."""
    if signal is not Signal.METRICS:
        return dst
    kind = src.WhichOneof("data")
    holder = getattr(dst, kind)
    if dst.WhichOneof("data") is None:
        _copy_envelope(getattr(src, kind), holder, "data_points")
        holder.SetInParent()
    return holder


def split_batch(batch: Batch, sizes: Sequence[int]) -> list[Batch]:
    """Cut a batch into batches of ``sizes[0]``, ``sizes[1]`` … items, in order.

    ``sizes`` must be positive and add up to ``batch.count``. Whole requests
    are shared with ``batch``, not copied; a request straddling a cut is
    split by `split_request`. The parts carry the batch's ``on_done``
    callbacks through one `DoneCountdown`: they run once, after every part
    reported. With a single size the batch itself is returned. ``batch`` is
    not changed; do not report it done besides its parts.
    """
    if sum(sizes) != batch.count or any(s <= 0 for s in sizes):
        raise ValueError(f"part sizes {list(sizes)} must be positive and add up to the batch's {batch.count} items")
    if len(sizes) == 1:
        return [batch]
    signal = batch.signal
    parts = [Batch(signal, [], size) for size in sizes]
    pi, room = 0, sizes[0]
    raws = batch.raw if len(batch.raw) == len(batch.requests) else [None] * len(batch.requests)
    for request, raw in zip(batch.requests, raws):
        n = count_items(signal, request)
        while room == 0 and pi + 1 < len(parts):
            pi += 1
            room = sizes[pi]
        if n <= room:
            parts[pi].append(request, raw)
            room -= n
            continue
        cuts, left, first = [], n, pi
        while left:
            if room == 0:
                pi += 1
                room = sizes[pi]
            take = min(room, left)
            cuts.append(take)
            room -= take
            left -= take
        for offset, piece in enumerate(split_request(signal, request, cuts)):
            parts[first + offset].append(piece)
    if batch.on_done:
        countdown = DoneCountdown(batch.on_done, len(parts))
        for part in parts:
            part.on_done.append(countdown.part_done)
    return parts


def _cut_sizes(count: int, offset: int, limit: int) -> list[int]:
    """Sizes that cut ``count`` items, starting ``offset`` items into the buffer, at every multiple of ``limit``."""
    if limit <= 0:
        return [count]
    sizes = []
    room = limit - offset % limit
    while count > 0:
        take = min(room, count)
        sizes.append(take)
        count -= take
        room = limit
    return sizes


# ---------------------------------------------------------------- the processor


class BatchProcessor:
    """Buffers incoming batches and sends them on by size, max size and timeout.

    Cancellation: what is buffered is sent under a shielded
    ``settings.shutdown_grace``; whatever is still unsent after that (or
    after an error from the next stage) is reported done-not-delivered to
    its sources and counted as dropped. The processor never closes its
    channels.
    """

    def __init__(self, settings: Settings, config: BatchConfig, ports: Ports) -> None:
        if ports.input is None or ports.output is None:
            raise ValueError("the batch processor needs an input channel and an output consumer")
        self._settings = settings
        self._config = config
        self._input = ports.input
        self._output = ports.output
        self._tel = settings.telemetry
        self._max = config.send_batch_max_size
        #: send every incoming batch at once (split by the max size only)
        self._immediate = config.timeout == 0 or config.send_batch_size == 0
        self._pending: deque[Batch] = deque()
        self._pending_count = 0
        self._deadline = math.inf
        self._tel.declare(TIMEOUT_TRIGGER_METRIC, COUNTER, "Number of times a batch was sent because the timeout expired (or at the final flush).")
        self._tel.declare(SIZE_TRIGGER_METRIC, COUNTER, "Number of times a batch was sent because send_batch_size items were buffered.")

    @property
    def buffered(self) -> int:
        """Items waiting in the buffer."""
        return self._pending_count

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._steady_state()
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(self._settings.shutdown_grace):
                await self._send_while(1, TIMEOUT_TRIGGER_METRIC)
            raise
        finally:
            self._drop_pending("shutdown")

    async def _steady_state(self) -> None:
        while True:
            batch = None
            with trio.move_on_at(self._deadline):
                try:
                    batch = await self._input.receive()
                except trio.EndOfChannel:
                    break
            if batch is None:
                await self._send_while(1, TIMEOUT_TRIGGER_METRIC)
                self._deadline = math.inf
            else:
                await self._add(batch)
        # End of stream: flush what is left (unshielded: a cancel still stops us).
        await self._send_while(1, TIMEOUT_TRIGGER_METRIC)

    async def _add(self, batch: Batch) -> None:
        if batch.count == 0:
            batch.done(True)  # nothing in it to deliver
            return
        arrived = trio.current_time()
        sizes = _cut_sizes(batch.count, self._pending_count, self._max)
        self._pending.extend(split_batch(batch, sizes))
        self._pending_count += batch.count
        if self._immediate:
            await self._send_while(1, SIZE_TRIGGER_METRIC)
            return
        was_waiting = self._pending_count > batch.count
        sent = await self._send_while(self._config.send_batch_size, SIZE_TRIGGER_METRIC)
        if self._pending_count == 0:
            self._deadline = math.inf
        elif sent or not was_waiting:
            # What is left after a size-triggered send came in with this batch.
            self._deadline = arrived + self._config.timeout

    async def _send_while(self, threshold: int, trigger_metric: str) -> bool:
        """Send batches of up to the max size while at least ``threshold`` items are buffered."""
        sent = False
        while self._pending_count and self._pending_count >= threshold:
            chunk = self._take()
            try:
                await self._output.send(chunk)
            except BaseException:
                self._pending.appendleft(chunk)
                self._pending_count += chunk.count
                raise
            self._tel.add(trigger_metric)
            sent = True
        return sent

    def _take(self) -> Batch:
        pieces = [self._pending.popleft()]
        n = pieces[0].count
        while self._pending and (self._max == 0 or n + self._pending[0].count <= self._max):
            piece = self._pending.popleft()
            pieces.append(piece)
            n += piece.count
        self._pending_count -= n
        return pieces[0] if len(pieces) == 1 else Batch.concat(pieces)

    def _drop_pending(self, reason: str) -> None:
        if not self._pending:
            return
        dropped, self._pending = self._pending, deque()
        count, self._pending_count = self._pending_count, 0
        self._tel.add("tapio_processor_dropped_items_total", count, reason=reason)
        self._settings.logger.warning("batch processor dropped %d buffered items on %s", count, reason)
        for b in dropped:
            b.done(False)


def _summary(config: BatchConfig) -> str:
    limit = config.send_batch_max_size or "unlimited"
    return f"size {config.send_batch_size}, max {limit}, timeout {config.timeout}"


factory = Factory(
    type="batch",
    kind=Kind.PROCESSOR,
    config_class=BatchConfig,
    signals=frozenset(Signal),
    create=BatchProcessor,
    description="Groups records into batches by item count and time, splitting batches above a maximum size.",
    summary=_summary,
)
