"""Which interfaces the dns-xdp programs are attached to, kept in step with the namespace's interfaces.

Invariants:
- `attached` holds exactly the interfaces this receiver attached and has
  not detached or seen disappear; `detach_all` empties it, removing only
  what is still ours (an XDP program whose id is ours, TC filters whose
  name carries our pid and start time), and the clsact qdisc only if we
  added it and no filter is left on it.
- A stale attachment is one of our programs whose loader is gone: an XDP
  program named `XDP_PROG` that no process holds a descriptor of, or a TC
  filter whose name names a process that no longer runs. `sweep_stale`
  removes those and nothing else, so two agents (or two dns-xdp receivers)
  in one namespace never remove each other's attachments.
- Every netlink request runs in a worker thread, one at a time (a
  capacity limiter of this object's own), with a deadline: detaching waits
  for the kernel (an RCU grace period), the event loop does not.
- An interface that cannot be attached (another XDP program is there, the
  driver lacks native XDP, not an Ethernet-like link) is skipped, logged
  and counted by reason; it never stops the receiver.
"""

from __future__ import annotations

import errno
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import trio

from . import _netlink as nl
from ._bpfsys import held_prog_ids, prog_info, prog_name_by_id
from ._config import Config
from ._loader import TC_EGRESS_PROG, TC_INGRESS_PROG, XDP_PROG, Program

#: longest a netlink request may take before the receiver gives up on it
NETLINK_TIMEOUT = 10.0
#: how long a route lookup (for "is the response path observed") is trusted
ROUTE_CACHE_SECONDS = 10.0
ROUTE_CACHE_SIZE = 4096
#: the kernel's XDP modes as IFLA_XDP_ATTACHED reports them → the flag that detaches them
_ATTACHED_MODE_FLAGS = {1: nl.XDP_FLAGS_DRV_MODE, 2: nl.XDP_FLAGS_SKB_MODE, 3: 1 << 3}


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return stat.rsplit(b")", 1)[1].split()[19].decode()
    except IndexError:
        return None


def tc_filter_name(prog: str, pid: int, start: str) -> str:
    """The name our TC filters carry: the program and the process that attached it."""
    return f"{prog} pid={pid} start={start}"


def tc_filter_owner(name: str) -> tuple[int, str] | None:
    """(pid, start time) from a filter name written by `tc_filter_name`, or None if it is not ours."""
    prog, _, rest = name.partition(" ")
    if prog not in (TC_INGRESS_PROG, TC_EGRESS_PROG):
        return None
    fields = dict(part.split("=", 1) for part in rest.split() if "=" in part)
    try:
        return int(fields["pid"]), fields["start"]
    except (KeyError, ValueError):
        return None


def tc_filter_is_stale(name: str) -> bool:
    owner = tc_filter_owner(name)
    if owner is None:
        return False
    pid, start = owner
    return _start_time(pid) != start


def _close_opened(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


@dataclass
class Attached:
    index: int
    name: str
    #: tc: whether we added the clsact qdisc (and so may remove it)
    created_clsact: bool = False


class Attachments:
    def __init__(self, config: Config, program: Program, logger: logging.Logger, count: Callable[[str, int], None]) -> None:
        self._config = config
        self._program = program
        self._logger = logger
        self._count = count
        # pyroute2 keeps its asyncio state per thread (an event loop for each thread that calls it, closed
        # only in the thread that closes it), so every netlink call runs on this one thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dns-xdp netlink")
        self._netlink: nl.Netlink | None = None
        self.attached: dict[int, Attached] = {}
        #: interfaces seen that match but could not be attached: index -> reason
        self.skipped: dict[int, str] = {}
        self.lo_index = 0
        self._xdp_flags = nl.XDP_MODE_FLAGS[config.mode == "xdp" and config.xdp_mode or "auto"]
        self._own_xdp_id = prog_info(program.prog_fds[XDP_PROG])[0] if XDP_PROG in program.prog_fds else 0
        pid = os.getpid()
        start = _start_time(pid) or "0"
        self._tc_names = {prog: tc_filter_name(prog, pid, start) for prog in (TC_INGRESS_PROG, TC_EGRESS_PROG)}
        self._routes: dict[tuple[int, bytes], tuple[float, bool, int]] = {}

    async def _call(self, fn: Callable[..., Any], *args: Any, close_abandoned: bool = False) -> Any:
        """``fn(*args)`` on the netlink thread; a deadline or cancellation stops the wait, not the call.

        With ``close_abandoned``, what an abandoned call returns is closed on that thread once it is made
        (pyroute2 closes a connection's asyncio loop only from the thread that made it).
        """
        future = self._executor.submit(fn, *args)
        try:
            with trio.fail_after(NETLINK_TIMEOUT):
                return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except BaseException:
            if close_abandoned:
                self._executor.submit(_close_opened, future)
            raise

    # -- lifecycle

    async def open(self) -> list[nl.Link]:
        """Connect to the namespace; remove stale attachments; attach to every matching interface. Returns the links seen."""
        netns = nl.netns_path(self._config.network_namespace) if self._config.network_namespace else ""
        try:
            self._netlink = await self._call(nl.Netlink, netns, close_abandoned=True)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open rtnetlink in {netns or 'the agent’s network namespace'}: {exc.strerror}") from None
        links = await self._call(self._netlink.links)
        await self._call(self._sweep_stale_blocking, links)
        links = await self._call(self._netlink.links)
        await self.sync(links)
        return links

    async def sync(self, links: list[nl.Link]) -> None:
        """Attach to the matching links not attached yet; forget attached ones that are gone."""
        present = {link.index for link in links}
        for index in [i for i in self.attached if i not in present]:
            self.forget(index)
        for link in links:
            await self.on_link(nl.LinkEvent(True, link.index, link.name, link.link_type, link.up))

    async def on_link(self, ev: nl.LinkEvent) -> None:
        """Follow one link event: attach a new match, detach a renamed-away one, forget a removed one."""
        if ev.name == "lo" or ev.link_type == nl.ARPHRD_LOOPBACK:
            self.lo_index = ev.index
        if not ev.present:
            self.forget(ev.index)
            return
        wanted = self._config.wants(ev.name)
        current = self.attached.get(ev.index)
        if current is not None:
            if not wanted:
                await self.detach(ev.index)
            else:
                current.name = ev.name
            return
        if not wanted:
            self.skipped.pop(ev.index, None)
            return
        if ev.link_type not in nl.ETHERNET_LIKE:
            if self.skipped.get(ev.index) != "link_type":
                self.skipped[ev.index] = "link_type"
                self._count("link_type", 1)
                self._logger.warning("interface %s is not Ethernet-like (link type %d): not attached", ev.name, ev.link_type)
            return
        await self.attach(ev.index, ev.name)

    def forget(self, index: int) -> None:
        """The interface is gone, and its attachments with it."""
        gone = self.attached.pop(index, None)
        self.skipped.pop(index, None)
        if gone is not None:
            self._logger.info("interface %s is gone; forgotten", gone.name)

    async def attach(self, index: int, name: str) -> bool:
        try:
            created = await self._call(self._attach_blocking, index)
        except (OSError, trio.TooSlowError) as exc:
            code = getattr(exc, "code", None) or getattr(exc, "errno", None)
            if code == errno.ENODEV:  # removed meanwhile: its DELLINK follows
                return False
            reason = {errno.EBUSY: "busy", errno.EEXIST: "busy", errno.EOPNOTSUPP: "unsupported", errno.EINVAL: "unsupported"}.get(code, "error")
            self.skipped[index] = reason
            self._count(reason, 1)
            self._logger.warning("cannot attach to interface %s: %s", name, _why(exc, reason))
            return False
        self.attached[index] = Attached(index, name, created)
        self.skipped.pop(index, None)
        self._logger.info("attached to interface %s (%s)", name, self._mode_text())
        return True

    async def detach(self, index: int) -> None:
        entry = self.attached.pop(index, None)
        if entry is None:
            return
        try:
            await self._call(self._detach_blocking, entry)
        except (OSError, trio.TooSlowError) as exc:
            code = getattr(exc, "code", None) or getattr(exc, "errno", None)
            if code != errno.ENODEV:
                self._logger.warning("detaching from interface %s failed: %s", entry.name, exc)

    async def detach_all(self) -> None:
        """Detach from every interface (shutdown); then close the netlink connection."""
        try:
            for index in list(self.attached):
                await self.detach(index)
        finally:
            if self._netlink is not None:
                netlink, self._netlink = self._netlink, None
                await self._call(netlink.close)
            self._executor.shutdown(wait=False)

    async def links(self) -> list[nl.Link]:
        assert self._netlink is not None
        return await self._call(self._netlink.links)

    # -- where responses are seen

    async def response_path_observed(self, query_ifindex: int, family: int, server: bytes, server_text: str, now: float) -> bool:
        """Whether a response to a query seen on ``query_ifindex`` would cross an attached hook.

        tc hooks both directions of an interface, so (routing being
        symmetric) the response crosses the query's interface. XDP hooks
        ingress only: the response enters through the interface this
        namespace routes the server's traffic to, or through lo when the
        server is local and the query came in on lo too.
        """
        if self._config.mode == "tc":
            return query_ifindex in self.attached
        key = (family, server)
        cached = self._routes.get(key)
        if cached is None or cached[0] < now:
            try:
                local, oif = await self._call(self._netlink.route, nl.socket.AF_INET if family == 4 else nl.socket.AF_INET6, server_text)  # type: ignore[union-attr]
            except (OSError, trio.TooSlowError):
                local, oif = False, 0
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes.clear()
            cached = self._routes[key] = (now + ROUTE_CACHE_SECONDS, local, oif)
        _, local, oif = cached
        if local:
            return query_ifindex == self.lo_index and self.lo_index in self.attached
        return oif in self.attached

    # -- blocking halves (worker thread)

    def _mode_text(self) -> str:
        if self._config.mode == "tc":
            return "tc clsact ingress and egress"
        return f"xdp, {self._config.xdp_mode} mode"

    def _attach_blocking(self, index: int) -> bool:
        assert self._netlink is not None
        fds = self._program.prog_fds
        if self._config.mode == "xdp":
            self._netlink.set_xdp(index, fds[XDP_PROG], self._xdp_flags | nl.XDP_FLAGS_UPDATE_IF_NOEXIST)
            return False
        created = self._netlink.add_clsact(index)
        try:
            self._netlink.add_tc_filter(index, nl.TC_INGRESS, fds[TC_INGRESS_PROG], self._tc_names[TC_INGRESS_PROG])
            self._netlink.add_tc_filter(index, nl.TC_EGRESS, fds[TC_EGRESS_PROG], self._tc_names[TC_EGRESS_PROG])
        except BaseException:
            self._remove_tc(index, created, lambda f: f.name in self._tc_names.values())
            raise
        return created

    def _detach_blocking(self, entry: Attached) -> None:
        assert self._netlink is not None
        if self._config.mode == "xdp":
            link = self._netlink.link(entry.index)
            if link is not None and link.xdp_prog_id == self._own_xdp_id:
                self._netlink.set_xdp(entry.index, -1, _ATTACHED_MODE_FLAGS.get(link.xdp_mode, self._xdp_flags))
            return
        self._remove_tc(entry.index, entry.created_clsact, lambda f: f.name in self._tc_names.values())

    def _remove_tc(self, index: int, remove_clsact: bool, ours: Callable[[nl.TcFilter], bool]) -> int:
        """Delete the filters ``ours`` picks; then clsact if asked and nothing is left. Returns filters removed."""
        assert self._netlink is not None
        filters = self._netlink.tc_filters(index)
        removed = 0
        for f in filters:
            if ours(f):
                self._netlink.del_tc_filter(index, f)
                removed += 1
        if remove_clsact and len(filters) == removed:
            try:
                self._netlink.del_clsact(index)
            except OSError:
                pass
        return removed

    def _sweep_stale_blocking(self, links: list[nl.Link]) -> None:
        assert self._netlink is not None
        held: set[int] | None = None
        for link in links:
            if link.xdp_prog_id:
                if held is None:
                    held = held_prog_ids()
                if link.xdp_prog_id not in held:
                    try:
                        name = prog_name_by_id(link.xdp_prog_id)
                    except PermissionError:
                        # looking a program up by id takes CAP_SYS_ADMIN, which the least-privilege DaemonSet lacks:
                        # a program nobody holds (a killed dns-xdp's, or a pinned one of another tool) is left alone
                        self._count("stale_unverified", 1)
                        self._logger.warning(
                            "interface %s has an XDP program (id %d) that no process holds; without CAP_SYS_ADMIN dns-xdp "
                            "cannot tell whether it is a stale one of its own, so it is left there and %s is not attached in "
                            "xdp mode. If it is dns-xdp's (a killed agent's): ip link set dev %s xdp off",
                            link.name, link.xdp_prog_id, link.name, link.name,
                        )
                        name = None
                    if name == XDP_PROG:
                        self._netlink.set_xdp(link.index, -1, _ATTACHED_MODE_FLAGS.get(link.xdp_mode, 0))
                        self._count("stale_removed", 1)
                        self._logger.info("removed a stale dns-xdp XDP program (id %d) from %s: the process that attached it is gone", link.xdp_prog_id, link.name)
            try:
                filters = self._netlink.tc_filters(link.index)
            except OSError:
                continue
            if any(tc_filter_is_stale(f.name) for f in filters):
                n = self._remove_tc(link.index, True, lambda f: tc_filter_is_stale(f.name))
                self._count("stale_removed", n)
                self._logger.info("removed %d stale dns-xdp TC filter(s) from %s: the process that attached them is gone", n, link.name)


def _why(exc: BaseException, reason: str) -> str:
    if reason == "busy":
        return "another XDP program is attached there (dns-xdp does not replace it; use mode: tc there)"
    if reason == "unsupported":
        return "the driver does not support this XDP mode (try xdp_mode: generic or auto)"
    if isinstance(exc, trio.TooSlowError):
        return f"netlink did not answer within {NETLINK_TIMEOUT:g}s"
    return str(exc)
