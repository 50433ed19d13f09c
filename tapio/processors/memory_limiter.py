"""The ``memory_limiter`` processor: keeps tapio's memory under a limit by refusing new data.

As the OpenTelemetry Collector's memorylimiter: the process's resident
memory (RSS, from /proc/self/statm: one small read) is measured every
``check_interval``. Above the soft limit (the limit minus the expected
spike) new data is refused until memory is back below it; above the hard
limit the garbage collector also runs.

Invariants:
- A batch is either passed on unchanged or refused; a refused batch's
  sources are told it was not delivered (``done(False)``) and its items
  counted, nothing is dropped silently:
  - refused before it entered the processor's queue, when the runtime asks
    `MemoryLimiter.admit` (the sender gets `tapio.component.Refused`, which
    OTLP receivers answer with 503/UNAVAILABLE so the client retries):
    ``tapio_processor_refused_items_total{reason="memory_limit"}``;
  - refused when it reaches the head of the queue while memory is still
    above the soft limit: ``tapio_processor_dropped_items_total{reason="memory_limit"}``;
  - a batch whose hand-on is cancelled (shutdown deadline) is handed on
    under the shielded shutdown grace, else dropped:
    ``tapio_processor_dropped_items_total{reason="shutdown"}``.
- Measurement is the only thing on the timer; refusing costs one attribute
  read per batch.
- The limits are fixed at start: ``limit_mib`` (or ``limit_percentage`` of
  the cgroup memory limit, or of the machine's memory when the cgroup sets
  none), and the spike allowance ``spike_limit_mib`` (or
  ``spike_limit_percentage``, or a fifth of the limit).
- The soft limit is above 0: a spike allowance at or above the hard limit
  is a config problem (`MemoryLimiterConfig.validate`) when both are known
  statically, and stops the processor from starting when the hard limit
  comes from a percentage of the memory found at start.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trio

from tapio.component import Factory, Kind, Ports, Refused, Settings, setting
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER, GAUGE
from tapio.units import Duration

MIB = 1024 * 1024
REASON = "memory_limit"
REFUSED_METRIC = "tapio_processor_refused_items_total"
RSS_METRIC = "tapio_processor_memory_limiter_rss_bytes"
LIMIT_METRIC = "tapio_processor_memory_limiter_limit_bytes"
GC_METRIC = "tapio_processor_memory_limiter_gc_runs_total"
#: with no spike setting, the allowance is this share of the hard limit (the Collector's default)
DEFAULT_SPIKE_SHARE = 0.2
#: cgroup v1 reports "no limit" as a huge number near 2**63
_CGROUP_V1_UNLIMITED = 1 << 60


# ---------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class MemoryLimiterConfig:
    check_interval: Duration = setting(
        Duration(1.0),
        doc="How often memory use is measured. Shorter catches spikes sooner; must be more than 0.",
    )
    limit_mib: int = setting(
        0,
        doc="Hard limit on resident memory, in MiB. 0 means use limit_percentage instead.",
    )
    spike_limit_mib: int = setting(
        0,
        doc="Largest growth expected between two checks, in MiB; data is refused from limit minus this (the soft limit) on. "
        "0 means use spike_limit_percentage, or a fifth of the limit when that is 0 too. Must be less than the hard limit: "
        "less than limit_mib (checked by validate), or, with limit_percentage, than the limit computed at start (else tapio does not start).",
    )
    limit_percentage: int = setting(
        80,
        doc="Hard limit as a percentage of the memory available: the cgroup's memory limit if one is set, else the machine's. "
        "Used only when limit_mib is 0; 0 together with limit_mib 0 is invalid.",
    )
    spike_limit_percentage: int = setting(
        0,
        doc="Spike allowance as a percentage of the memory available, used with limit_percentage when spike_limit_mib is 0. "
        "0 means a fifth of the limit. Must be less than limit_percentage.",
    )

    def validate(self) -> list[str]:
        problems = []
        if self.check_interval <= 0:
            problems.append(f"check_interval: must be more than 0, got {self.check_interval}")
        if self.limit_mib < 0:
            problems.append(f"limit_mib: must be 0 (use limit_percentage) or more, got {self.limit_mib}")
        if self.spike_limit_mib < 0:
            problems.append(f"spike_limit_mib: must be 0 or more, got {self.spike_limit_mib}")
        elif self.limit_mib > 0 and self.spike_limit_mib >= self.limit_mib:
            problems.append(f"spike_limit_mib: must be less than limit_mib ({self.limit_mib}), got {self.spike_limit_mib}")
        for key in ("limit_percentage", "spike_limit_percentage"):
            v = getattr(self, key)
            if not 0 <= v <= 100:
                problems.append(f"{key}: must be between 0 and 100, got {v}")
        if self.limit_mib == 0:
            if self.limit_percentage == 0:
                problems.append("limit_mib: set limit_mib or limit_percentage (both are 0)")
            elif 0 < self.limit_percentage <= 100 and self.spike_limit_percentage >= self.limit_percentage:
                problems.append(
                    f"spike_limit_percentage: must be less than limit_percentage ({self.limit_percentage}), got {self.spike_limit_percentage}"
                )
        return problems


# ---------------------------------------------------------------- measuring


def read_rss() -> int:
    """This process's resident memory in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), or None."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        path = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates += [Path(root, path, "memory.max"), Path(root, "unified", path, "memory.max")]
        elif "memory" in controllers.split(","):
            candidates.append(Path(root, "memory", path, "memory.limit_in_bytes"))
    for file in candidates:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            continue
        value = int(text)
        if 0 < value < _CGROUP_V1_UNLIMITED:
            return value
    return None


@dataclass(frozen=True)
class Limits:
    hard: int
    soft: int

    @classmethod
    def of(cls, config: MemoryLimiterConfig, available: int, *, available_from: str = "the memory available") -> "Limits":
        """The byte limits ``config`` sets when ``available`` bytes of memory are there.

        Raises:
            ValueError: the spike allowance is not below the hard limit, so the
                soft limit would be 0 or less and every batch refused. With
                ``limit_mib`` `MemoryLimiterConfig.validate` already rules that
                out; with ``limit_percentage`` the hard limit depends on the
                memory found at start (``available_from`` names where it came from).
        """
        if config.limit_mib > 0:
            hard = config.limit_mib * MIB
            hard_text = f"limit_mib {config.limit_mib}"
        else:
            hard = available * config.limit_percentage // 100
            hard_text = f"limit_percentage {config.limit_percentage}% of {available // MIB} MiB, {available_from}"
        if config.spike_limit_mib > 0:
            spike, spike_text = config.spike_limit_mib * MIB, f"spike_limit_mib {config.spike_limit_mib}"
        elif config.limit_mib == 0 and config.spike_limit_percentage > 0:
            spike = available * config.spike_limit_percentage // 100
            spike_text = f"spike_limit_percentage {config.spike_limit_percentage}%"
        else:
            spike, spike_text = int(hard * DEFAULT_SPIKE_SHARE), "a fifth of the limit"
        if spike >= hard:
            raise ValueError(
                f"the spike allowance ({spike_text}: {spike // MIB} MiB) is not below the hard limit "
                f"({hard_text}: {hard // MIB} MiB), so every batch would be refused; lower the spike limit or raise the limit"
            )
        return cls(hard=hard, soft=hard - spike)


# ---------------------------------------------------------------- the processor


class MemoryLimiter:
    """Passes batches on while memory is below the soft limit; refuses them above it.

    Args:
        measure: returns the memory in use, in bytes (``read_rss`` by default;
            tests hand in their own).
        available: memory the percentages refer to (default: the cgroup limit,
            else the machine's memory).
    """

    def __init__(
        self,
        settings: Settings,
        config: MemoryLimiterConfig,
        ports: Ports,
        *,
        measure: Callable[[], int] = read_rss,
        available: int | None = None,
    ) -> None:
        if ports.input is None or ports.output is None:
            raise ValueError("a processor needs both an input and an output")
        self._settings = settings
        self._config = config
        self._input = ports.input
        self._output = ports.output
        self._measure = measure
        available_from = "the memory available"
        if available is None:
            cgroup, machine = cgroup_memory_limit(), machine_memory()
            if cgroup and cgroup < machine:
                available, available_from = cgroup, "the cgroup memory limit"
            else:
                available, available_from = machine, "the machine's memory"
        self.limits = Limits.of(config, available, available_from=available_from)
        #: the last measurement, in bytes
        self.rss = 0
        #: True while memory is above the soft limit: new data is refused
        self.refusing = False
        tel = settings.telemetry
        tel.declare(REFUSED_METRIC, COUNTER, "Number of items a processor refused to take (the sender was told to retry), by reason.")
        tel.declare(RSS_METRIC, GAUGE, "Resident memory of the process at the memory limiter's last check, in bytes.")
        tel.declare(LIMIT_METRIC, GAUGE, "The memory limiter's limits in bytes: soft (data is refused above it) and hard (garbage is collected too).")
        tel.declare(GC_METRIC, COUNTER, "Number of times the memory limiter ran the garbage collector because memory was above the hard limit.")
        tel.gauge(RSS_METRIC, lambda: self.rss)
        tel.gauge(LIMIT_METRIC, lambda: self.limits.soft, limit="soft")
        tel.gauge(LIMIT_METRIC, lambda: self.limits.hard, limit="hard")

    def check(self) -> None:
        """Measure memory once and decide whether to refuse (what the timer calls)."""
        rss = self._measure()
        if rss > self.limits.hard:
            gc.collect()
            self._settings.telemetry.add(GC_METRIC)
            rss = self._measure()
        self.rss = rss
        refusing = rss > self.limits.soft
        if refusing != self.refusing:
            log = self._settings.logger
            if refusing:
                log.warning(
                    "%s: memory use %d MiB is above the soft limit %d MiB: refusing data",
                    self._settings.id, rss // MIB, self.limits.soft // MIB,
                )
            else:
                log.info("%s: memory use %d MiB is below the soft limit again: accepting data", self._settings.id, rss // MIB)
        self.refusing = refusing

    def admit(self, batch: Batch) -> None:
        """Raise `Refused` (after ``batch.done(False)``, counted) when memory is above the soft limit.

        For the runtime to call before the batch enters this processor's
        queue, so the sender can push back on its client instead of the
        batch being dropped later.
        """
        if self.refusing:
            self._settings.telemetry.add(REFUSED_METRIC, batch.count, reason=REASON)
            batch.done(False)
            raise Refused(f"memory use {self.rss // MIB} MiB is above the soft limit {self.limits.soft // MIB} MiB")

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.check()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            task_status.started()
            async for batch in self._input:
                if self.refusing:
                    self._settings.telemetry.add("tapio_processor_dropped_items_total", batch.count, reason=REASON)
                    batch.done(False)
                    continue
                try:
                    await self._output.send(batch)
                except trio.Cancelled:
                    await self._flush_on_cancel(batch)
                    raise
            nursery.cancel_scope.cancel()

    async def _flush_on_cancel(self, batch: Batch) -> None:
        """Hand on the batch whose send was cancelled, within the shutdown grace; else drop it, counted."""
        with trio.CancelScope(shield=True), trio.move_on_after(self._settings.shutdown_grace):
            await self._output.send(batch)
            return
        self._settings.telemetry.add("tapio_processor_dropped_items_total", batch.count, reason="shutdown")
        batch.done(False)

    async def _watch(self) -> None:
        interval = float(self._config.check_interval)
        while True:
            await trio.sleep(interval)
            self.check()


def _summary(config: MemoryLimiterConfig) -> str:
    limit = f"{config.limit_mib} MiB" if config.limit_mib else f"{config.limit_percentage}% of memory"
    return f"limit {limit}, checked every {config.check_interval}"


factory = Factory(
    type="memory_limiter",
    kind=Kind.PROCESSOR,
    config_class=MemoryLimiterConfig,
    signals=frozenset(Signal),
    create=MemoryLimiter,
    description="Refuses data while the process's memory is above a limit, so tapio stays within it.",
    summary=_summary,
)
