"""CNI plugin log lines → structured events. Sans-IO: one line of text in, one `CniEvent` out.

Styles, tried in this order (what each looks like is in docs/components/cni-log.md):

- JSON objects: Cilium's CNI log (``subsys: cilium-cni``, ``eventUUID``), the
  AWS VPC CNI plugin's zap log (``caller: routed-eni-cni-plugin/...``), the
  Azure CNI's zap log (``component: cni``); any other object is ``json``.
- ``calico``: ``2024-05-01 10:00:00.123 [INFO][4242] k8s.go 73: message
  Key="value" ...`` (libcalico-go's formatter: local time without a zone,
  level, pid, file and line, then the fields sorted by key).
- bracketed level: ``2024-05-01T10:00:00Z [verbose] message``: Multus when
  the level is one of Multus's (panic, error, verbose, debug), else the AWS
  VPC CNI plugin's older text log (``[INFO]``).
- ``kv``: the generic key=value fallback (logrus and slog text output,
  ``time=... level=info msg="..." key=value``), also Cilium's CNI log in its
  text format (``subsys=cilium-cni``).
- ``unparsed``: anything else (the receiver keeps the raw line and counts it).

Invariants:
- `LineParser.parse` returns for every str and never raises (fuzzed with
  hypothesis); a line that no style recognises has style ``unparsed``, time
  0 and no attributes but its style (and the plugin hint, when given).
- Attribute values are str, int or list[str], and their keys come from one
  vocabulary whatever the style (`ATTRIBUTES`): every style that knows the
  container id puts it under ``container.id``, and so on. Fields a style
  carries beyond that vocabulary are kept under ``tapio.cni.field.<key>``,
  at most `MAX_EXTRA_FIELDS` of them, values cut to `MAX_EXTRA_VALUE` characters.
- Time: a timestamp with a zone is exact; one without (Calico's) is read in
  the parser's ``naive_timezone``. A time that cannot be read is 0 (the
  receiver then uses the time it read the line).
- The parser's only state is a bounded cache of timestamp seconds
  (`TIME_CACHE_SIZE`), so one parser serves any number of files.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

#: every attribute key the parser writes (besides ``tapio.cni.field.*``), with what it holds
ATTRIBUTES = {
    "tapio.cni.style": "which line format was recognised (calico, cilium, multus, aws-vpc-cni, azure-cni, json, kv)",
    "tapio.cni.plugin": "the plugin that wrote the line (calico, cilium-cni, multus, aws-cni, azure-vnet, or the file's hint)",
    "tapio.cni.operation": "the CNI command: ADD, DEL, CHECK, GC, STATUS or VERSION",
    "container.id": "the sandbox (pause) container id the command is for",
    "tapio.cni.netns": "the network namespace path",
    "network.interface.name": "the interface inside the pod (CNI_IFNAME)",
    "k8s.namespace.name": "the pod's namespace (K8S_POD_NAMESPACE)",
    "k8s.pod.name": "the pod's name (K8S_POD_NAME)",
    "k8s.pod.uid": "the pod's uid (K8S_POD_UID)",
    "tapio.cni.ips": "addresses assigned to the pod, as written (10.1.2.3/32)",
    "tapio.cni.network": "the network (attachment) name, where the line names one (Multus)",
    "tapio.cni.result": "the result the plugin logged (a CNI result, an IPAM response)",
    "error.message": "the error text: an error field, or the message of an error-level line",
    "code.file.path": "the plugin's source file that logged the line",
    "code.line.number": "the line in that source file",
    "process.pid": "the plugin process's pid (Calico)",
    "tapio.cni.event_id": "the id the plugin gave this invocation (Cilium's eventUUID)",
}
EXTRA_PREFIX = "tapio.cni.field."
#: a plugin that logs many fields (a netconf dump) must not blow up every record
MAX_EXTRA_FIELDS = 16
MAX_EXTRA_VALUE = 256
#: distinct timestamp seconds remembered; a log's lines share few, so this is plenty
TIME_CACHE_SIZE = 4096

STYLES = ("calico", "cilium", "multus", "aws-vpc-cni", "azure-cni", "json", "kv", "unparsed")
#: the plugin name each style implies
_STYLE_PLUGIN = {"calico": "calico", "cilium": "cilium-cni", "multus": "multus", "aws-vpc-cni": "aws-cni", "azure-cni": "azure-vnet"}

#: path fragments of the plugins' usual log locations → the plugin
_PATH_PLUGINS = (
    ("calico", "calico"),
    ("cilium", "cilium-cni"),
    ("multus", "multus"),
    ("aws-routed-eni", "aws-cni"),
    ("azure-vnet", "azure-vnet"),
)

#: level words as plugins write them → (OTLP severity number, severity text)
SEVERITIES = {
    "trace": (1, "TRACE"),
    "debug": (5, "DEBUG"),
    "verbose": (9, "INFO"),  # Multus's level for its one-line-per-command summaries
    "info": (9, "INFO"),
    "information": (9, "INFO"),
    "notice": (10, "INFO"),
    "warn": (13, "WARN"),
    "warning": (13, "WARN"),
    "error": (17, "ERROR"),
    "err": (17, "ERROR"),
    "critical": (21, "FATAL"),
    "fatal": (21, "FATAL"),
    "panic": (21, "FATAL"),
    "dpanic": (21, "FATAL"),
}
_ERROR_LEVELS = frozenset(("error", "err", "critical", "fatal", "panic", "dpanic"))


def severity(level: str) -> tuple[int, str]:
    """The OTLP severity (number, text) of a level word; (0, "") when unknown."""
    return SEVERITIES.get(level, (0, ""))


@dataclass(slots=True)
class CniEvent:
    """One parsed line. ``attributes`` is ordered; ``message`` is the line's text without its header and fields."""

    style: str
    time_unix_nano: int = 0
    level: str = ""
    message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ patterns

_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,9}))?(Z|z|[+-]\d\d(?::?\d\d)?)?")
_CALICO = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,9})?) \[([A-Za-z]+)\]\[(\d+)\] (?:(\S+) (\d+|<nil>|\?): )?(.*)", re.S
)
_BRACKETED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?) \[([A-Za-z]+)\] ?(.*)", re.S)
_MULTUS_LEVELS = frozenset(("panic", "error", "verbose", "debug"))
#: quoted strings are consumed whole; brackets and `` key=`` candidates are reported
_FIELD_SCAN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]()]| ([A-Za-z_][\w.\-]*)=')
#: Calico's line ending in simple fields (a quoted value, or one without spaces or quotes)
_SIMPLE_TAIL = re.compile(
    r' [A-Za-z_][\w.\-]*=(?:"[^"\\]*(?:\\.[^"\\]*)*"|[^\s"]*)(?: [A-Za-z_][\w.\-]*=(?:"[^"\\]*(?:\\.[^"\\]*)*"|[^\s"]*))*$'
)
_SIMPLE_PAIR = re.compile(r' ([A-Za-z_][\w.\-]*)=("[^"\\]*(?:\\.[^"\\]*)*"|[^\s"]*)')
_KEY_EQ = re.compile(r' ([A-Za-z_][\w.\-]*)=')
#: one logfmt pair: key=value, key="quoted value"
_LOGFMT = re.compile(r'\s*([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
#: a key=value pair anywhere in free text, at a word boundary
_LOOSE_PAIR = re.compile(r'(?<!\S)([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|[^\s"]+)')
_AWS_MARKERS = re.compile(r"\b(?:ContainerID|Netns|IfName)\(|\bipamd\b|\bCNI Plugin\b|aws-cni|\bENI\b")
_GO_ESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[abfnrtv\\"\'])')
_GO_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"', "'": "'"}

_OPERATION = re.compile(
    r"\b[Cc]md_?(Add|Del|Check|Status|GC)|\b(?:CNI|process) (add|del|delete|check) request|\b(ADD|DEL|CHECK|GC|STATUS)\b|^(Add|Del|Check):"
)
_OPERATIONS = {"add": "ADD", "del": "DEL", "delete": "DEL", "check": "CHECK", "gc": "GC", "status": "STATUS", "version": "VERSION"}
#: starts with a literal, so the regex engine skips to each occurrence
_CNI_ARG = re.compile(r"K8S_POD_(NAMESPACE|NAME|UID|INFRA_CONTAINER_ID)=([^;\s,)\"'\]}&\\]+)")
_CNI_ARG_ATTR = {
    "NAMESPACE": "k8s.namespace.name",
    "NAME": "k8s.pod.name",
    "UID": "k8s.pod.uid",
    "INFRA_CONTAINER_ID": "container.id",
}
#: the AWS VPC CNI plugin writes its arguments as Name(value)
_AWS_PAREN = re.compile(r"\b(ContainerID|Netns|IfName|Args|PodNamespace|PodName)\(([^()]*)\)")
_AWS_PAREN_ATTR = {
    "ContainerID": "container.id",
    "Netns": "tapio.cni.netns",
    "IfName": "network.interface.name",
    "PodNamespace": "k8s.namespace.name",
    "PodName": "k8s.pod.name",
}
_AWS_RESPONSE = re.compile(r"response from ipamd\b[^:]*: (.*)", re.S)
_AWS_FOR_POD = re.compile(r"\bfor pod (\S+) namespace (\S+?)(?: container| sandbox)? ?([0-9a-f]{12,})?(?::|$|\s)")
#: Multus's thick plugin: ``ADD starting CNI request ContainerID:"..." Netns:"..." IfName:"eth0" Args:"..."``
_GO_STRUCT_FIELD = re.compile(r"\b(ContainerID|Netns|IfName):(?:\"([^\"]*)\"|([^\s\"}]*))")
_GO_STRUCT_ATTR = {"ContainerID": "container.id", "Netns": "tapio.cni.netns", "IfName": "network.interface.name"}
#: ``[namespace/pod/uid:network]:`` in Multus's error messages
_MULTUS_POD = re.compile(r"\[([a-z0-9][a-z0-9.\-]*)/([a-z0-9][a-z0-9.\-]*)(?:/([0-9a-f\-]{8,}))?(?::([^\]\s]+))?\]")
_MESSAGE_IPS = re.compile(r"\b(?:IPv[46]|IPs?)(?:=|: )\[([^\]]*)\]|\bIPv[46]Addr:\"([^\"]+)\"")
_IP_TOKEN = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}(?:/\d{1,3})?|[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}(?:/\d{1,3})?")

#: field keys (lowercased) → what they are; "" marks keys the style already used (level, message, time)
_FIELD_ATTR = {
    "containerid": "container.id",
    "container_id": "container.id",
    "cni_containerid": "container.id",
    "netns": "tapio.cni.netns",
    "cni_netns": "tapio.cni.netns",
    "netnspath": "tapio.cni.netns",
    "ifname": "network.interface.name",
    "cni_ifname": "network.interface.name",
    "k8snamespace": "k8s.namespace.name",
    "k8s_pod_namespace": "k8s.namespace.name",
    "namespace": "k8s.namespace.name",
    "podnamespace": "k8s.namespace.name",
    "k8spodname": "k8s.pod.name",
    "k8s_pod_name": "k8s.pod.name",
    "pod": "k8s.pod.name",
    "podname": "k8s.pod.name",
    "k8s_pod_uid": "k8s.pod.uid",
    "poduid": "k8s.pod.uid",
    "k8s_pod_infra_container_id": "container.id",
    "container": "container.id",
    "error": "error.message",
    "err": "error.message",
    "errmsg": "error.message",
    "result": "tapio.cni.result",
    "eventuuid": "tapio.cni.event_id",
    "network": "tapio.cni.network",
    "networkname": "tapio.cni.network",
    "plugin": "tapio.cni.plugin",
}
_CMD_KEYS = frozenset(("command", "cni_command", "cmd"))
_ARGS_KEYS = frozenset(("args", "cni_args"))
_IP_KEYS = frozenset(("ip", "ips", "ipaddr", "ipv4", "ipv6", "ipv4addr", "ipv6addr", "ipaddress", "ip_address", "podip", "podips"))
_CALLER_KEYS = frozenset(("caller", "source"))
_LEVEL_KEYS = ("level", "lvl", "severity")
_MESSAGE_KEYS = ("msg", "message")
_TIME_KEYS = ("time", "ts", "timestamp", "@timestamp")
_HEADER_KEYS = frozenset(_LEVEL_KEYS + _MESSAGE_KEYS + _TIME_KEYS)


class LineParser:
    """Parses CNI plugin log lines; see the module docstring for the styles.

    Args:
        style: ``auto`` tries every style; naming one (``calico``, ``cilium``,
            ``multus``, ``aws-vpc-cni``, ``kv``…) accepts only lines of that
            style (JSON lines count as any JSON style) and reports the rest as
            ``unparsed``.
        naive_timezone: the zone of timestamps written without one (Calico's);
            None reads them in this machine's local time.
    """

    def __init__(self, *, style: str = "auto", naive_timezone: _dt.tzinfo | None = _dt.timezone.utc) -> None:
        if style != "auto" and style not in STYLES:
            raise ValueError(f"unknown CNI log style {style!r}; one of auto, {', '.join(STYLES)}")
        self.style = style
        self._naive_tz = naive_timezone
        self._seconds: dict[tuple[str, str | None], int | None] = {}

    # ---------------------------------------------------------------- entry

    def parse(self, line: str, plugin_hint: str = "") -> CniEvent:
        """Parse one line (without its newline). ``plugin_hint`` names the plugin when the line does not."""
        try:
            event = self._parse(line.strip(), plugin_hint)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError):
            event = None
        if event is None or (self.style != "auto" and not _style_accepted(self.style, event.style)):
            return _unparsed(plugin_hint)
        attrs = event.attributes
        if "K8S_POD_" in line:  # CNI_ARGS, wherever the style put them
            _from_cni_args(attrs, line)
        attrs["tapio.cni.style"] = event.style
        plugin = _STYLE_PLUGIN.get(event.style) or attrs.pop("tapio.cni.plugin", None) or plugin_hint
        if plugin:
            attrs["tapio.cni.plugin"] = plugin
        return event

    def _parse(self, line: str, plugin_hint: str) -> CniEvent | None:
        if not line:
            return None
        first = line[0]
        if first == "{":
            return self._parse_json(line, plugin_hint)
        if first.isdigit():
            m = _CALICO.match(line)
            if m is not None:
                return self._parse_calico(m)
            m = _BRACKETED.match(line)
            if m is not None:
                return self._parse_bracketed(m, plugin_hint)
        return self._parse_kv(line) or self._parse_loose(line)

    # --------------------------------------------------------------- styles

    def _parse_calico(self, m: re.Match[str]) -> CniEvent:
        stamp, level, pid, src, lineno, rest = m.groups()
        message, fields = _split_sorted_fields(rest)
        # the stamp is zoneless ``YYYY-MM-DD HH:MM:SS[.frac]`` (the pattern says so): a known second needs no regex
        seconds = self._seconds.get((stamp[:19], None), 0)
        if seconds == 0:
            ns = self._time(stamp)
        elif seconds is None:
            ns = 0
        else:
            frac = stamp[20:]
            ns = seconds * 1_000_000_000 + (int(frac) * 10 ** (9 - len(frac)) if frac else 0)
        event = CniEvent("calico", ns, level.lower(), message)
        attrs = event.attributes
        if src and src not in ("<nil>", "?"):
            attrs["code.file.path"] = src
        if lineno and lineno.isdigit():
            attrs["code.line.number"] = int(lineno)
        attrs["process.pid"] = int(pid)
        _apply_fields(attrs, fields)
        _from_message(event)
        return event

    def _parse_bracketed(self, m: re.Match[str], plugin_hint: str) -> CniEvent:
        stamp, level, message = m.groups()
        low = level.lower()
        if low in _MULTUS_LEVELS and level.islower():
            style = "multus"
        elif plugin_hint == "aws-cni" or _AWS_MARKERS.search(message):
            style = "aws-vpc-cni"  # its plugin's text log before it moved to zap's JSON
        else:
            style = "kv"
        event = CniEvent(style, self._time(stamp), low, message)
        if style == "multus":
            _from_multus_message(event)
        _from_message(event)
        return event

    def _parse_json(self, line: str, plugin_hint: str) -> CniEvent | None:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            return None
        level = _first_str(obj, _LEVEL_KEYS).lower()
        message = _first_str(obj, _MESSAGE_KEYS)
        stamp = next((obj[k] for k in _TIME_KEYS if k in obj), None)
        caller = obj.get("caller")
        if obj.get("subsys") == "cilium-cni" or "eventUUID" in obj:
            style = "cilium"
        elif plugin_hint == "aws-cni" or isinstance(caller, str) and "routed-eni-cni-plugin" in caller:
            style = "aws-vpc-cni"
        elif obj.get("component") == "cni" or message.startswith("[cni-"):
            style = "azure-cni"
        else:
            style = "json"
        event = CniEvent(style, self._any_time(stamp), level, message)
        _apply_fields(event.attributes, ((k, v) for k, v in obj.items() if k not in _HEADER_KEYS))
        _from_message(event)
        return event

    def _parse_kv(self, line: str) -> CniEvent | None:
        pairs = _logfmt(line)
        if not pairs:
            return None
        fields = dict(pairs)
        level = next((fields[k] for k in _LEVEL_KEYS if k in fields), "").lower()
        message = next((fields[k] for k in _MESSAGE_KEYS if k in fields), "")
        stamp = next((fields[k] for k in _TIME_KEYS if k in fields), None)
        style = "cilium" if fields.get("subsys") == "cilium-cni" else "kv"
        event = CniEvent(style, self._any_time(stamp), level, message)
        _apply_fields(event.attributes, ((k, v) for k, v in pairs if k not in _HEADER_KEYS))
        _from_message(event)
        return event

    def _parse_loose(self, line: str) -> CniEvent | None:
        """Free text with ``key=value`` pairs in it, maybe after a timestamp and a level word."""
        pairs = [(k, _unquote(v)) for k, v in _LOOSE_PAIR.findall(line)]
        if not pairs:
            return None
        stamp = 0
        text = line
        m = _TIME.match(line)
        if m is not None:
            stamp = self._time(line)
            text = line[m.end() :].lstrip()
        word, _, after = text.partition(" ")
        level = word.strip("[]:").lower()
        if level in SEVERITIES:
            text = after
        else:
            level = ""
        first = _LOOSE_PAIR.search(text)
        message = text[: first.start()].strip() if first is not None else text
        event = CniEvent("kv", stamp, level, message)
        _apply_fields(event.attributes, pairs)
        _from_message(event)
        return event

    # ----------------------------------------------------------------- time

    def _any_time(self, value: Any) -> int:
        if isinstance(value, str):
            return self._time(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _epoch_number(value)
        return 0

    def _time(self, text: str) -> int:
        """Unix ns of an RFC 3339-like timestamp (zone optional), 0 if it cannot be read."""
        m = _TIME.match(text)
        if m is None:
            return 0
        zone = m.group(8)
        key = (text[:19], zone)
        seconds = self._seconds.get(key, 0)
        if seconds == 0:
            seconds = self._seconds_of(m, zone)
            if len(self._seconds) >= TIME_CACHE_SIZE:
                self._seconds.clear()
            self._seconds[key] = seconds
        if seconds is None:
            return 0
        frac = m.group(7)
        return seconds * 1_000_000_000 + (int(frac) * 10 ** (9 - len(frac)) if frac else 0)

    def _seconds_of(self, m: re.Match[str], zone: str | None) -> int | None:
        y, mo, d, h, mi, s = (int(x) for x in m.group(1, 2, 3, 4, 5, 6))
        try:
            if zone is None and self._naive_tz is None:
                _dt.datetime(y, mo, d, h, mi, min(s, 59))  # range check
                seconds = int(time.mktime((y, mo, d, h, mi, min(s, 59), 0, 0, -1)))
            elif zone is None:
                stamp = _dt.datetime(y, mo, d, h, mi, min(s, 59), tzinfo=self._naive_tz).timestamp()
                seconds = int(stamp)
            else:
                _dt.datetime(y, mo, d, h, mi, min(s, 59))  # range check
                seconds = calendar.timegm((y, mo, d, h, mi, min(s, 59))) - _zone_offset(zone)
        except (ValueError, OverflowError):
            return None
        return seconds if seconds >= 0 else None


def _unparsed(plugin_hint: str) -> CniEvent:
    attrs: dict[str, Any] = {"tapio.cni.style": "unparsed"}
    if plugin_hint:
        attrs["tapio.cni.plugin"] = plugin_hint
    return CniEvent("unparsed", attributes=attrs)


def plugin_for_path(path: str) -> str:
    """The plugin a log file belongs to, told by its path (the usual locations), or ""."""
    for marker, plugin in _PATH_PLUGINS:
        if marker in path:
            return plugin
    return ""


def _style_accepted(wanted: str, got: str) -> bool:
    if wanted == got:
        return True
    json_styles = ("cilium", "aws-vpc-cni", "azure-cni", "json")
    return wanted in json_styles and got in json_styles


def _zone_offset(zone: str) -> int:
    if zone in ("Z", "z"):
        return 0
    sign = -1 if zone[0] == "-" else 1
    digits = zone[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
    return sign * (hours * 3600 + minutes * 60)


def _epoch_number(value: float) -> int:
    """zap's numeric ``ts``: seconds (or ms/µs/ns, told apart by size) since the epoch."""
    for scale in (1_000_000_000, 1_000_000, 1_000, 1):
        ns = value * scale
        if 1e17 <= ns < 1e20:
            return int(ns)
    return 0


def _first_str(obj: dict[str, Any], keys: Iterable[str]) -> str:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, str):
            return v
    return ""


# ------------------------------------------------------------------- fields


def _split_sorted_fields(rest: str) -> tuple[str, list[tuple[str, str]]]:
    """Split Calico's ``message Key=value ...`` into the message and its fields.

    The formatter writes the fields sorted by key, values quoted when they are
    Go strings and as Go prints them otherwise (which may hold spaces and
    brackets). So the fields start at the first `` key=`` outside brackets and
    quotes from which the keys are sorted to the end; ``k=v`` text earlier on
    belongs to the message.

    Fast path (most lines): the line ends in simple fields (quoted, or without
    spaces), found by one regex; the bracket-aware scan runs only when the
    text before them holds a `` key=`` that could start an earlier field.
    """
    if "=" not in rest:
        return rest, []
    m = _SIMPLE_TAIL.search(rest)
    if m is not None:
        start = m.start()
        pairs = _SIMPLE_PAIR.findall(rest, start)
        i = len(pairs) - 1
        while i > 0 and pairs[i - 1][0] <= pairs[i][0]:
            i -= 1
        for k, v in pairs[:i]:
            start += len(k) + len(v) + 2
        head = rest[:start]
        # the keys before the simple ones end the sorted run unless the last is <= its first key
        before = pairs[i - 1][0] if i else (_KEY_EQ.findall(head) or [""])[-1]
        if not before or before > pairs[i][0]:
            return head.rstrip(), [(k, _unquote(v)) for k, v in pairs[i:]]
    return _scan_sorted_fields(rest)


def _scan_sorted_fields(rest: str) -> tuple[str, list[tuple[str, str]]]:
    depth = 0
    cands: list[tuple[int, int, str]] = []  # (start of " key=", start of value, key)
    for m in _FIELD_SCAN.finditer(rest):
        key = m.group(1)
        if key is not None:
            if depth == 0:
                cands.append((m.start(), m.end(), key))
            continue
        c = rest[m.start()]
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth = max(0, depth - 1)
    if not cands:
        return rest, []
    i = len(cands) - 1
    while i > 0 and cands[i - 1][2] <= cands[i][2]:
        i -= 1
    fields = []
    for j in range(i, len(cands)):
        end = cands[j + 1][0] if j + 1 < len(cands) else len(rest)
        fields.append((cands[j][2], _unquote(rest[cands[j][1] : end].strip())))
    return rest[: cands[i][0]].rstrip(), fields


def _logfmt(line: str) -> list[tuple[str, str]]:
    """The pairs of a line that is key=value pairs from start to end (logfmt), else []."""
    pos, n, out = 0, len(line), []
    while pos < n:
        m = _LOGFMT.match(line, pos)
        if m is None or m.end() == pos:
            return []
        out.append((m.group(1), _unquote(m.group(2))))
        pos = m.end()
        if pos < n and not line[pos].isspace():
            return []
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        return _GO_ESCAPE.sub(_go_escape, inner) if "\\" in inner else inner
    return value


def _go_escape(m: re.Match[str]) -> str:
    code = m.group(1)
    if len(code) == 1:
        return _GO_SIMPLE_ESCAPES[code]
    n = int(code[1:], 16)
    return chr(n) if n <= 0x10FFFF and not 0xD800 <= n <= 0xDFFF else "\ufffd"


_K_ATTR, _K_CMD, _K_SKIP, _K_PID, _K_IPS, _K_CALLER, _K_EXTRA = range(7)
#: field key as written → (kind, attribute); filled on first sight, bounded by clearing
_KEY_KINDS: dict[str, tuple[int, str]] = {}
KEY_CACHE_SIZE = 4096


def _key_kind(key: str) -> tuple[int, str]:
    low = key.lower()
    attr = _FIELD_ATTR.get(low)
    if attr is not None:
        kind = (_K_ATTR, attr)
    elif low in _CMD_KEYS:
        kind = (_K_CMD, "tapio.cni.operation")
    elif low in _ARGS_KEYS or not key:
        kind = (_K_SKIP, "")  # CNI_ARGS are read from the whole line
    elif low == "pid":
        kind = (_K_PID, "process.pid")
    elif low in _IP_KEYS:
        kind = (_K_IPS, "tapio.cni.ips")
    elif low in _CALLER_KEYS:
        kind = (_K_CALLER, "code.file.path")
    else:
        kind = (_K_EXTRA, EXTRA_PREFIX + key)
    if len(_KEY_KINDS) >= KEY_CACHE_SIZE:
        _KEY_KINDS.clear()
    _KEY_KINDS[key] = kind
    return kind


def _apply_fields(attrs: dict[str, Any], fields: Iterable[tuple[str, Any]]) -> None:
    """Map a style's fields onto the attribute vocabulary; the rest go under ``tapio.cni.field.*``."""
    extra = 0
    kinds = _KEY_KINDS
    for key, value in fields:
        kind, attr = kinds.get(key) or _key_kind(key)
        if kind == _K_ATTR:
            if attr not in attrs:
                text = value if type(value) is str else _scalar(value)
                if text:
                    attrs[attr] = text
        elif kind == _K_EXTRA:
            if extra < MAX_EXTRA_FIELDS:
                text = value if type(value) is str else _scalar(value)
                if text or type(value) is str:
                    attrs[attr] = text if len(text) <= MAX_EXTRA_VALUE else text[: MAX_EXTRA_VALUE - 1] + "…"
                    extra += 1
        elif kind == _K_CMD:
            op = _OPERATIONS.get(_scalar(value).lower())
            if op:
                attrs.setdefault(attr, op)
        elif kind == _K_PID:
            if type(value) is int or type(value) is str and value.isdigit():
                attrs.setdefault(attr, int(value))
        elif kind == _K_IPS:
            _add_ips(attrs, value if isinstance(value, list) else [value])
        elif kind == _K_CALLER and isinstance(value, str) and ":" in value:
            path, _, line = value.rpartition(":")
            attrs.setdefault(attr, path)
            if line.isdigit():
                attrs.setdefault("code.line.number", int(line))


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return ""


def _from_cni_args(attrs: dict[str, Any], text: str) -> None:
    for name, value in _CNI_ARG.findall(text):
        attrs.setdefault(_CNI_ARG_ATTR[name], value)


#: text → the addresses in it; a pod's address repeats on many lines; bounded by clearing
_IPS_IN: dict[str, tuple[str, ...]] = {}
IPS_CACHE_SIZE = 4096


def _add_ips(attrs: dict[str, Any], values: Iterable[Any]) -> None:
    found = attrs.get("tapio.cni.ips")
    for value in values:
        if isinstance(value, dict):  # a CNI result's ips[]: {"address": "10.1.2.3/24", ...}
            value = value.get("address", "")
        if not isinstance(value, str):
            continue
        for ip in _IPS_IN.get(value) or ips_in(value):
            if found is None:
                found = attrs["tapio.cni.ips"] = []
            if ip not in found:
                found.append(ip)


def ips_in(value: str) -> tuple[str, ...]:
    """The addresses written in a text, through the bounded cache `_IPS_IN` (the compiled path calls this on a miss)."""
    ips = _IPS_IN.get(value)
    if ips is None:
        ips = tuple(t for t in _IP_TOKEN.findall(value) if _is_ip(t))
        if len(_IPS_IN) >= IPS_CACHE_SIZE:
            _IPS_IN.clear()
        _IPS_IN[value] = ips
    return ips


def _is_ip(token: str) -> bool:
    addr, _, prefix = token.partition("/")
    if prefix and not prefix.isdigit():
        return False
    if "." in addr:
        parts = addr.split(".")
        return len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts) and (not prefix or int(prefix) <= 32)
    if addr.count("::") > 1 or addr.count(":") < 2:
        return False
    return (not prefix or int(prefix) <= 128) and any(c not in ":" for c in addr)


# ------------------------------------------------------------------ messages


#: (message, level) → the attributes the message text gives; most messages repeat
#: (the ids are in fields), so each is read once; bounded by clearing
_MESSAGE_ATTRS: dict[tuple[str, str], tuple[tuple[str, Any], ...]] = {}
MESSAGE_CACHE_SIZE = 4096


def _from_message(event: CniEvent) -> None:
    """What any style's message text says (the operation, AWS-style Name(value) pairs, IPs, errors), without overriding fields."""
    key = (event.message, event.level)
    found = _MESSAGE_ATTRS.get(key)
    if found is None:
        found = tuple(_read_message(event.message, event.level).items())
        if len(_MESSAGE_ATTRS) >= MESSAGE_CACHE_SIZE:
            _MESSAGE_ATTRS.clear()
        _MESSAGE_ATTRS[key] = found
    attrs = event.attributes
    for attr, value in found:
        if attr not in attrs:
            attrs[attr] = list(value) if type(value) is list else value
        elif attr == "tapio.cni.ips":
            for ip in value:
                if ip not in attrs[attr]:
                    attrs[attr].append(ip)


def _read_message(msg: str, level: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if msg and (
        "md" in msg or "ADD" in msg or "DEL" in msg or "CHECK" in msg or "GC" in msg or "STATUS" in msg
        or " request" in msg or msg.startswith(("Add:", "Del:", "Check:"))
    ):
        m = _OPERATION.search(msg)
        if m is not None:
            attrs["tapio.cni.operation"] = _OPERATIONS[next(g for g in m.groups() if g).lower()]
    if "(" in msg:
        for name, value in _AWS_PAREN.findall(msg):
            if value and name != "Args":  # CNI_ARGS are read from the whole line
                attrs.setdefault(_AWS_PAREN_ATTR[name], value)
    if "ipamd" in msg:
        m = _AWS_RESPONSE.search(msg)
        if m is not None:
            attrs.setdefault("tapio.cni.result", m.group(1).strip())
    if "for pod " in msg:
        m = _AWS_FOR_POD.search(msg)
        if m is not None:
            attrs.setdefault("k8s.pod.name", m.group(1))
            attrs.setdefault("k8s.namespace.name", m.group(2))
            if m.group(3):
                attrs.setdefault("container.id", m.group(3))
    if "IfName:" in msg or "ContainerID:" in msg:
        for name, quoted, bare in _GO_STRUCT_FIELD.findall(msg):
            value = quoted or bare
            if value:
                attrs.setdefault(_GO_STRUCT_ATTR[name], value)
    if "IP" in msg:
        for listed, single in _MESSAGE_IPS.findall(msg):
            _add_ips(attrs, [listed or single])
    if level in _ERROR_LEVELS and msg:
        attrs["error.message"] = msg
    return attrs


def _from_multus_message(event: CniEvent) -> None:
    """Multus's ``Add: ns:pod:uid:net(conf):ifname {result}`` summaries and ``[ns/pod/uid:net]:`` error prefixes."""
    attrs, msg = event.attributes, event.message
    verb, sep, rest = msg.partition(": ")
    if sep and verb in ("Add", "Del", "Check"):
        head, _, payload = rest.partition(" ")
        parts = head.split(":")
        if len(parts) in (4, 5) and all(parts):
            ns, pod, *middle, ifname = parts
            net = middle[-1]
            if len(middle) == 2 and middle[0] != "unknownUID":
                attrs["k8s.pod.uid"] = middle[0]
            attrs["k8s.namespace.name"] = ns
            attrs["k8s.pod.name"] = pod
            attrs["network.interface.name"] = ifname
            attrs["tapio.cni.network"] = net.partition("(")[0] or net
            if verb == "Add" and payload.startswith("{"):
                attrs["tapio.cni.result"] = payload
                try:
                    result = json.loads(payload)
                except ValueError:
                    result = None
                if isinstance(result, dict) and isinstance(result.get("ips"), list):
                    _add_ips(attrs, result["ips"])
        return
    m = _MULTUS_POD.search(msg)
    if m is not None:
        ns, pod, uid, net = m.groups()
        attrs["k8s.namespace.name"] = ns
        attrs["k8s.pod.name"] = pod
        if uid:
            attrs["k8s.pod.uid"] = uid
        if net:
            attrs["tapio.cni.network"] = net
