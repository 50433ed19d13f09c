"""Live reload of a running configuration: on SIGHUP, or when a watched config file changes.

Invariants:
- Nothing that runs is touched unless the new configuration is valid: an
  invalid one is refused, every problem logged with its file:line, and the
  running graph stays as it was.
- Only what can change while running is applied: the pipelines and their
  components (`Service.reload` keeps every component whose config did not
  change), tapio's own log level and encoding, and the runtime options
  (shutdown timeout, failure policy, restart backoff). Extensions and the
  self-telemetry address are bound at startup: a reload that changes them
  is refused, saying that a restart is needed.
- Reloads run one at a time, in the order they were asked for; each is
  counted in ``tapio_config_reloads_total`` by result and logged with what
  changed.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Sequence

import trio

from tapio.component import Kind
from tapio.telemetry import Telemetry

if TYPE_CHECKING:
    from tapio.config import Config
    from tapio.service import Service

log = logging.getLogger("tapio.reload")

#: longest a reload may take to read and check the config files (a hung network mount must not hang reloads forever)
LOAD_TIMEOUT = 30.0


def components_of(cfg: "Config") -> dict[Kind, dict[Any, Any]]:
    return {Kind.RECEIVER: cfg.receivers, Kind.PROCESSOR: cfg.processors, Kind.EXPORTER: cfg.exporters, Kind.CONNECTOR: cfg.connectors}


def needs_restart(old: "Config", new: "Config") -> list[str]:
    """What ``new`` changes that a running tapio cannot apply (empty when a reload can apply all of it)."""
    out = []
    if old.service.extensions != new.service.extensions or any(old.extensions.get(e) != new.extensions.get(e) for e in new.service.extensions):
        out.append("extensions")
    if old.service.telemetry.metrics.address != new.service.telemetry.metrics.address:
        out.append("service.telemetry.metrics.address")
    return out


class Reloader:
    """Re-reads the configuration with ``load`` and applies it to a running `Service`.

    ``load`` is blocking (it reads files): it runs in a worker thread of the
    reloader's own, under `LOAD_TIMEOUT`. It returns a validated `Config` or
    raises `tapio.config.ConfigError`.
    """

    def __init__(self, service: "Service", current: "Config", load: Callable[[], "Config"], telemetry: Telemetry) -> None:
        self.service = service
        self.current = current
        self._load = load
        self._telemetry = telemetry
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)

    def _count(self, result: str) -> None:
        self._telemetry.add("tapio_config_reloads_total", 1, {"result": result})

    async def reload(self, why: str) -> bool:
        """Read, check and apply the configuration; True if it was applied."""
        from tapio.config import ConfigError
        from tapio.service import ReloadError, runtime_options

        async with self._lock:
            log.info("%s: reloading the configuration", why)
            try:
                with trio.fail_after(LOAD_TIMEOUT):
                    new = await trio.to_thread.run_sync(self._load, limiter=self._limiter, abandon_on_cancel=True)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("%s", problem)
                errors = sum(1 for p in exc.problems if getattr(p, "severity", "error") == "error")
                log.error("reload refused: the configuration has %d error%s; the running configuration stays", errors, "s" if errors != 1 else "")
                self._count("refused")
                return False
            except trio.TooSlowError:
                log.error("reload refused: reading the configuration took more than %gs; the running configuration stays", LOAD_TIMEOUT)
                self._count("refused")
                return False
            for warning in new.warnings:
                log.warning("%s", warning)
            blocked = needs_restart(self.current, new)
            if blocked:
                log.error("reload refused: %s cannot change while tapio runs; restart tapio to apply it (the running configuration stays)", " and ".join(blocked))
                self._count("refused")
                return False
            try:
                report = await self.service.reload(pipelines=new.service.pipelines, components=components_of(new))
            except ReloadError as exc:
                log.error("reload failed: %s; the running configuration stays", exc)
                self._count("failed")
                return False
            self.service.options = runtime_options(new)
            if new.service.telemetry.logs != self.current.service.telemetry.logs:
                from tapio.logs import setup_logging

                setup_logging(new.service.telemetry.logs.level, new.service.telemetry.logs.encoding)
            self.current = new
            self._count("applied")
            log.info("configuration reloaded: %s", report.summary())
            return True

    async def on_sighup(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload on every SIGHUP, until cancelled (one at a time: signals that arrive during a reload queue up)."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                await self.reload("received SIGHUP")

    async def watch(self, paths: Sequence[str], interval: float) -> None:
        """Reload when one of ``paths`` changes (checked every ``interval`` seconds), until cancelled.

        A file counts as changed when what it resolves to has another inode,
        size or modification time, so a Kubernetes ConfigMap update (a
        symlink swapped to a new directory) is seen too. A file caught
        half-written is refused like any invalid config and applied once
        the write completes (the next change).
        """
        seen = await self._fingerprint(paths)
        while True:
            await trio.sleep(interval)
            now = await self._fingerprint(paths)
            if now != seen:
                seen = now
                await self.reload("a config file changed")

    async def _fingerprint(self, paths: Sequence[str]) -> tuple[Any, ...]:
        def stat_all() -> tuple[Any, ...]:
            out = []
            for p in paths:
                try:
                    st = os.stat(p)
                    out.append((st.st_ino, st.st_size, st.st_mtime_ns))
                except OSError as exc:
                    out.append(exc.errno)
            return tuple(out)

        with trio.fail_after(LOAD_TIMEOUT):
            return await trio.to_thread.run_sync(stat_all, limiter=self._limiter, abandon_on_cancel=True)
