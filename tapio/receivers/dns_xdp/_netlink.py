"""rtnetlink for the dns-xdp receiver: interface events, XDP and TC attachments, route lookups.

Two halves:
- `parse_link_messages` (pure) reads RTM_NEWLINK/RTM_DELLINK messages from
  a link-group subscription; `open_link_monitor` opens that subscription as
  a non-blocking socket the receiver waits on under trio.
- `Netlink` makes requests (dump links, set XDP, clsact and bpf filters,
  route lookups) through pyroute2. Its calls block for as long as the
  kernel takes (detaching waits for an RCU grace period): callers run them
  in a worker thread, one at a time.

Both work in one network namespace, chosen when they are opened: a netlink
socket belongs to the namespace it was created in, so the receiver can
watch another namespace's interfaces without moving itself there.

Invariants: a message the parser does not understand is skipped, never
raised past `parse_link_messages` as anything but `NetlinkError`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_IFNAME = 3
IFF_UP = 1
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
#: link types whose frames start with an Ethernet header (what the programs parse)
ETHERNET_LIKE = frozenset({ARPHRD_ETHER, ARPHRD_LOOPBACK})
CLONE_NEWNET = 0x40000000
RTN_LOCAL = 2

#: linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_MODE_FLAGS = {"auto": 0, "generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
#: clsact's parents (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / _EGRESS))
TC_INGRESS, TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
#: the preference our filters are added with, so we can find and remove exactly them
TC_PRIO = 0xD53

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")


class NetlinkError(ValueError):
    """A netlink message that does not have the layout the kernel's headers give it."""


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """An interface that exists (``present``) or was removed."""

    present: bool
    index: int
    name: str
    link_type: int
    up: bool


def parse_link_messages(data: bytes) -> list[LinkEvent]:
    """Every RTM_NEWLINK / RTM_DELLINK in one datagram from a link-group subscription."""
    out: list[LinkEvent] = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            raise NetlinkError(f"netlink message of length {length} at offset {off} in a {len(data)}-byte datagram")
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            body = off + _NLMSG.size
            if body + _IFINFO.size > off + length:
                raise NetlinkError(f"link message of length {length} has no room for its ifinfomsg")
            _family, link_type, index, flags, _change = _IFINFO.unpack_from(data, body)
            name = ""
            a = body + _IFINFO.size
            end = off + length
            while a + _RTATTR.size <= end:
                alen, atype = _RTATTR.unpack_from(data, a)
                if alen < _RTATTR.size or a + alen > end:
                    raise NetlinkError(f"link attribute of length {alen} overruns its message")
                if atype == IFLA_IFNAME:
                    name = data[a + _RTATTR.size : a + alen].split(b"\0", 1)[0].decode(errors="replace")
                a += (alen + 3) & ~3
            out.append(LinkEvent(msg_type == RTM_NEWLINK, index, name, link_type, bool(flags & IFF_UP)))
        off += (length + 3) & ~3
    return out


def netns_path(name: str) -> str:
    """A network namespace given by path or by its name under /var/run/netns."""
    return name if "/" in name else f"/var/run/netns/{name}"


_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def _in_netns(path: str) -> Iterator[None]:
    """Run the body with this thread in the network namespace at ``path`` (then back)."""
    if not path:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as exc:
        os.close(own)
        raise OSError(exc.errno, f"network namespace {path}: {exc.strerror}") from None
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # a thread left in the wrong namespace would be a bug
                err = ctypes.get_errno()
                raise SystemError(f"could not return to the agent's network namespace: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


def open_link_monitor(netns: str = "") -> socket.socket:
    """A non-blocking NETLINK_ROUTE socket subscribed to link events in ``netns`` (a path; empty: our own)."""
    with _in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, RTMGRP_LINK))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    link_type: int
    up: bool
    #: the attached XDP program's id (0: none) and the mode it runs in (IFLA_XDP_ATTACHED: 1 driver, 2 generic, 3 offload)
    xdp_prog_id: int = 0
    xdp_mode: int = 0


@dataclass(frozen=True, slots=True)
class TcFilter:
    parent: int
    prio: int
    handle: int
    protocol: int
    name: str


_XDP_ATTACHED = {"xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}


def _os_error(exc: Exception, what: str) -> OSError:
    code = getattr(exc, "code", 0) or errno.EIO
    return OSError(code, f"{what}: {os.strerror(code)}")


class Netlink:
    """Blocking rtnetlink requests in one network namespace (pyroute2). Not thread-safe: one caller at a time.

    Every failure is an OSError whose errno is the kernel's answer.
    """

    def __init__(self, netns: str = "") -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        self._error = PyNetlinkError
        try:
            self._ipr = IPRoute(netns=netns) if netns else IPRoute()
        except self._error as exc:
            raise _os_error(exc, f"rtnetlink in {netns}") from None

    def _req(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._error as exc:
            raise _os_error(exc, what) from None

    def close(self) -> None:
        self._ipr.close()

    def links(self) -> list[Link]:
        out = []
        for msg in self._req("listing interfaces", self._ipr.get_links):
            xdp = msg.get_attr("IFLA_XDP")
            prog_id = mode = 0
            if xdp is not None:
                prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
                mode = _XDP_ATTACHED.get(xdp.get_attr("IFLA_XDP_ATTACHED"), 0)
            out.append(Link(msg["index"], msg.get_attr("IFLA_IFNAME") or "", msg["ifi_type"], bool(msg["flags"] & IFF_UP), prog_id, mode))
        return out

    def link(self, index: int) -> Link | None:
        for link in self.links():
            if link.index == index:
                return link
        return None

    def set_xdp(self, index: int, fd: int, flags: int) -> None:
        """Attach the XDP program ``fd`` (-1 detaches the one attached in the mode ``flags`` names)."""
        self._req(
            f"setting XDP on interface {index}", self._ipr.link, "set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]}
        )

    def add_clsact(self, index: int) -> bool:
        """Add the clsact qdisc; False if the interface has one already."""
        try:
            self._req(f"adding clsact to interface {index}", self._ipr.tc, "add", "clsact", index)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def del_clsact(self, index: int) -> None:
        self._req(f"removing clsact from interface {index}", self._ipr.tc, "del", "clsact", index)

    def add_tc_filter(self, index: int, parent: int, fd: int, name: str) -> None:
        self._req(
            f"adding a bpf filter to interface {index}",
            self._ipr.tc,
            "add-filter",
            "bpf",
            index,
            handle=1,
            fd=fd,
            name=name,
            parent=parent,
            prio=TC_PRIO,
            classid=1,
            direct_action=True,
        )

    def tc_filters(self, index: int) -> list[TcFilter]:
        """The bpf filters on the interface's clsact ingress and egress (none without clsact)."""
        out = []
        for parent in (TC_INGRESS, TC_EGRESS):
            try:
                msgs = self._req(f"listing filters of interface {index}", self._ipr.get_filters, index=index, parent=parent)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    continue
                raise
            for msg in msgs:
                if msg.get_attr("TCA_KIND") != "bpf":
                    continue
                opts = msg.get_attr("TCA_OPTIONS")
                if opts is None:
                    continue
                info = msg["info"]
                out.append(TcFilter(parent, info >> 16, msg["handle"], socket.ntohs(info & 0xFFFF), opts.get_attr("TCA_BPF_NAME") or ""))
        return out

    def del_tc_filter(self, index: int, f: TcFilter) -> None:
        self._req(
            f"removing a bpf filter from interface {index}", self._ipr.tc, "del-filter", "bpf", index, handle=f.handle, parent=f.parent, prio=f.prio, protocol=f.protocol
        )

    def route(self, family: int, address: str) -> tuple[bool, int]:
        """How this namespace reaches ``address``: (is it local, the outgoing interface's index)."""
        msgs = self._req(f"looking up the route to {address}", self._ipr.route, "get", dst=address, family=family)
        if not msgs:
            return False, 0
        msg = msgs[0]
        return msg["type"] == RTN_LOCAL, msg.get_attr("RTA_OIF") or 0
