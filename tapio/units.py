"""Values that users write as text in config files: durations, byte sizes and listen addresses.

A config dataclass field annotated `Duration` or `ByteSize` accepts a number
(seconds, bytes) or a string (``"200ms"``, ``"1m30s"``, ``"64MiB"``); the
config decoder calls `parse` and reports the `ValueError` message with the
file, line and key. Both are plain float/int subclasses, so code using them
does arithmetic without unwrapping. Listen addresses (`parse_listen_address`)
are ``host:port`` or ``[v6]:port`` with a port from 0 to 65535, 0 picking a
free one.
"""

from __future__ import annotations

import ipaddress
import math
import re

#: longest duration accepted: nothing a node agent waits for is longer, and a bigger one is a typo (or .inf)
MAX_DURATION_SECONDS = 10 * 365 * 24 * 3600.0
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class Duration(float):
    """A duration in seconds; written like Go's time.ParseDuration ("5s", "200ms", "1h30m")."""

    @classmethod
    def parse(cls, value: object) -> "Duration":
        if isinstance(value, bool):
            raise ValueError(f"expected a duration like '5s' or '200ms', got {value!r}")
        if isinstance(value, (int, float)):
            try:
                seconds = float(value)
            except OverflowError:  # an int too large for a float
                seconds = math.inf
        elif isinstance(value, str):
            text = value.strip()
            if text in ("0", "0s"):
                return cls(0.0)
            pos, seconds = 0, 0.0
            sign = 1.0
            if text and text[0] in "+-":
                sign = -1.0 if text[0] == "-" else 1.0
                pos = 1
            if pos >= len(text):
                raise ValueError(f"invalid duration {value!r}: expected a number with a unit (ns, us, ms, s, m, h), e.g. '5s' or '200ms'")
            while pos < len(text):
                m = _DURATION_PART.match(text, pos)
                if m is None:
                    raise ValueError(f"invalid duration {value!r}: expected a number with a unit (ns, us, ms, s, m, h), e.g. '5s' or '200ms'")
                seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            seconds *= sign
        else:
            raise ValueError(f"expected a duration like '5s' or '200ms', got {type(value).__name__}")
        if math.isnan(seconds):
            raise ValueError(f"duration {value!r} is not a number: write one like '5s' or '200ms'")
        if seconds < 0:
            raise ValueError(f"duration {value!r} is negative")
        if seconds > MAX_DURATION_SECONDS:
            what = "infinite" if isinstance(value, float) else "too long"
            raise ValueError(f"duration {_shown(value)} is {what}: the longest accepted is {MAX_DURATION_SECONDS / 3600:g}h (10 years)")
        return cls(seconds)

    def __str__(self) -> str:
        s = float(self)
        if s == 0:
            return "0s"
        if s < 1e-3:
            return f"{s * 1e6:g}us"
        if s < 1:
            return f"{s * 1e3:g}ms"
        if s < 60 or s % 60:
            return f"{s:g}s"
        if s % 3600:
            return f"{s / 60:g}m"
        return f"{s / 3600:g}h"

    def __repr__(self) -> str:
        return f"Duration({str(self)!r})"


def _shown(value: object) -> str:
    """``value`` for a message, cut short if it is long (a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*")


class ByteSize(int):
    """A size in bytes; written as a number or with a unit ("512KiB", "64MiB", "1GB")."""

    @classmethod
    def parse(cls, value: object) -> "ByteSize":
        if isinstance(value, bool):
            raise ValueError(f"expected a size like '64MiB', got {value!r}")
        if isinstance(value, int):
            n = value
        elif isinstance(value, float) and value.is_integer():
            n = int(value)
        elif isinstance(value, str):
            m = _SIZE.fullmatch(value)
            unit = m.group(2).lower() if m else None
            if m is None or unit not in _SIZE_UNITS:
                raise ValueError(f"invalid size {value!r}: expected a number of bytes or a unit (KiB, MiB, GiB, KB, MB, GB), e.g. '64MiB'")
            n = int(float(m.group(1)) * _SIZE_UNITS[unit])
        else:
            raise ValueError(f"expected a size like '64MiB', got {type(value).__name__}")
        if n < 0:
            raise ValueError(f"size {value!r} is negative")
        return cls(n)

    def __repr__(self) -> str:
        return f"ByteSize({int(self)})"


def parse_listen_address(text: object, *, example: str = "127.0.0.1:4317") -> tuple[str, int]:
    """Split a listen address ``host:port`` (``[v6addr]:port`` for IPv6) into host and port.

    The host is empty (every interface), an IPv4 address, a DNS name, or an
    IPv6 address in brackets; port 0 means any free port (tests use it).
    Raises ValueError with a message that reads well after the key.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"must be host:port, e.g. {example}")
    text = text.strip()
    ex_port = example.rpartition(":")[2]
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} must be [address]:port for IPv6")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port: write host:port, e.g. {example}")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:{ex_port}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0-65535; 0 picks a free port)")
    if any(c.isspace() for c in host):
        raise ValueError(f"host {host!r} contains spaces")
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address; write [::1]:{ex_port}, or a host name without brackets") from None
    elif host:
        _check_host(host)
    return host, port


def with_port(endpoint: str, port: int) -> str:
    """A listen address ``host:port`` with another port (``[v6addr]:port`` kept bracketed): what was bound for port 0."""
    host, _ = parse_listen_address(endpoint)
    return join_host_port(host, port)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:4317``), as written in configs and logs."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: one label of a DNS name (RFC 1123, and '_' which resolvers accept): no '-' at either end, at most 63 characters
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _check_host(host: str) -> None:
    """Raise ValueError unless ``host`` is an IPv4 address or a DNS name (IPv6 goes in brackets)."""
    labels = host.removesuffix(".").split(".")
    if all(label.isascii() and label.isdigit() for label in labels):  # looks like IPv4: must be one
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"host {host!r} is not a valid IPv4 address") from None
        return
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"host {host!r} is neither an IP address nor a valid host name (letters, digits and '-' in dot-separated parts)"
        )
