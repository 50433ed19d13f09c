"""What an etcd key and value say: Kubernetes key paths, JSON values, Kubernetes protobuf values. Pure: no I/O.

Kubernetes protobuf values (apimachinery's "protobuf serializer") are the
4-byte magic ``k8s\\x00`` followed by a ``runtime.Unknown`` message:

    message Unknown  { TypeMeta typeMeta = 1; bytes raw = 2; string contentEncoding = 3; string contentType = 4; }
    message TypeMeta { string apiVersion = 1; string kind = 2; }

``raw`` is the object itself. Every top-level API object (Pod, Node,
Deployment, Event, Lease …) has ``ObjectMeta metadata = 1``; the fields read
from it here:

    message ObjectMeta { string name = 1; string namespace = 3; string uid = 5; string resourceVersion = 6;
                         int64 generation = 7; Time creationTimestamp = 8; Time deletionTimestamp = 9;
                         map<string, string> labels = 11; repeated OwnerReference ownerReferences = 13; }
    message Time { int64 seconds = 1; int32 nanos = 2; }
    message OwnerReference { string kind = 1; string name = 3; string uid = 4; string apiVersion = 5; bool controller = 6; }

(k8s.io/apimachinery/pkg/runtime/generated.proto and
pkg/apis/meta/v1/generated.proto.) Values encrypted at rest start with
``k8s:enc:<provider>:v1:<key name>:`` and are reported as such, undecoded.

Invariants:
- `decode_value` and `parse_key` never raise, whatever the bytes: a value
  that claims an encoding and does not hold it comes back with
  ``problem`` set (the caller counts it) and its raw bytes as the body.
- `ProtoReader` reads only inside the buffer it was given: a length or
  varint running past the end raises `ProtoError`.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Iterator

K8S_MAGIC = b"k8s\x00"
ENCRYPTED_MAGIC = b"k8s:enc:"

#: what `DecodedValue.encoding` can be
JSON, PROTOBUF, ENCRYPTED, TEXT, BINARY, EMPTY = "json", "kubernetes-protobuf", "kubernetes-encrypted", "text", "binary", "empty"

#: key path segments that are not the resource name they store (the API server's storage paths)
_STORED_AS = {
    "minions": "nodes",
    "services/specs": "services",
    "services/endpoints": "endpoints",
    "controllers": "replicationcontrollers",
    "ingress": "ingresses",
}
#: resources kept one level deeper than the others (`/registry/services/specs/<ns>/<name>`)
_NESTED = {"services"}


class ProtoError(ValueError):
    """Bytes that are not a valid protobuf message of the expected shape."""


@dataclass(slots=True, frozen=True)
class KeyPath:
    """What a Kubernetes storage key says: ``/registry/<resource>/[<namespace>/]<name>``."""

    resource: str
    namespace: str
    name: str


@dataclass(slots=True)
class DecodedValue:
    encoding: str
    #: the value as it will be shown: a JSON value, a mapping of what a protobuf object says, text, or the raw bytes
    body: Any
    api_version: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""
    uid: str = ""
    #: why a value that claims an encoding could not be decoded (counted as bad input), else ""
    problem: str = ""


def parse_key(key: bytes, prefix: str) -> KeyPath | None:
    """Resource, namespace and name from a key under the Kubernetes ``prefix``, or None for other keys.

    Cluster-scoped objects have no namespace (``/registry/nodes/n1``);
    custom resources are stored under their group and named
    ``<resource>.<group>`` as kubectl writes them
    (``/registry/cilium.io/ciliumendpoints/ns/x`` → ``ciliumendpoints.cilium.io``).
    """
    if not prefix:
        return None
    p = prefix.encode()
    if not key.startswith(p):
        return None
    text = key[len(p):].decode("utf-8", "replace")
    parts = text.split("/")
    if len(parts) < 2 or not all(parts):
        return None
    resource = parts[0]
    rest = parts[1:]
    if "." in resource and len(rest) >= 2:  # <group>/<resource>/...
        resource, rest = f"{rest[0]}.{resource}", rest[1:]
    elif resource in _NESTED and len(rest) >= 2:
        resource, rest = f"{resource}/{rest[0]}", rest[1:]
    resource = _STORED_AS.get(resource, resource)
    if len(rest) == 1:
        return KeyPath(resource, "", rest[0])
    if len(rest) == 2:
        return KeyPath(resource, rest[0], rest[1])
    return None


def decode_value(raw: bytes) -> DecodedValue:
    """What a value holds, by its first bytes: Kubernetes protobuf, encrypted, JSON, text, or binary."""
    if not raw:
        return DecodedValue(EMPTY, "")
    if raw.startswith(K8S_MAGIC):
        try:
            return _decode_k8s_protobuf(raw[len(K8S_MAGIC):])
        except ProtoError as exc:
            return DecodedValue(PROTOBUF, raw, problem=f"invalid Kubernetes protobuf: {exc}")
    if raw.startswith(ENCRYPTED_MAGIC):
        return DecodedValue(ENCRYPTED, raw)
    first = raw[:1]
    if first in (b"{", b"["):
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            text = _text(raw)
            return DecodedValue(TEXT if text is not None else BINARY, text if text is not None else raw, problem=f"invalid JSON: {exc}")
        out = DecodedValue(JSON, doc)
        if isinstance(doc, dict):
            _identity_from_json(out, doc)
        return out
    text = _text(raw)
    if text is not None:
        return DecodedValue(TEXT, text)
    return DecodedValue(BINARY, raw)


def _text(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # control characters other than whitespace mark binary data that happens to be valid UTF-8
    if any(c < " " and c not in "\t\n\r" for c in text):
        return None
    return text


def _identity_from_json(out: DecodedValue, doc: dict[str, Any]) -> None:
    out.api_version = _s(doc.get("apiVersion"))
    out.kind = _s(doc.get("kind"))
    meta = doc.get("metadata")
    if isinstance(meta, dict):
        out.name = _s(meta.get("name"))
        out.namespace = _s(meta.get("namespace"))
        out.uid = _s(meta.get("uid"))


def _s(value: Any) -> str:
    return value if isinstance(value, str) else ""


# ------------------------------------------------------------------ protobuf


class ProtoReader:
    """The fields of one protobuf message, in wire order: ``for number, wire_type, value in ProtoReader(buf)``.

    Varints come as int, fixed64/fixed32 as int, length-delimited fields as
    bytes. Groups (wire types 3 and 4, deprecated) are refused.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0

    def __iter__(self) -> Iterator[tuple[int, int, int | bytes]]:
        buf, end = self._buf, len(self._buf)
        while self._pos < end:
            tag = self._varint()
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                raise ProtoError("field number 0")
            if wire_type == 0:
                yield number, 0, self._varint()
            elif wire_type == 2:
                n = self._varint()
                start = self._pos
                if n > end - start:
                    raise ProtoError(f"field {number}: length {n} runs past the end")
                self._pos = start + n
                yield number, 2, buf[start:self._pos]
            elif wire_type in (1, 5):
                size = 8 if wire_type == 1 else 4
                start = self._pos
                if start + size > end:
                    raise ProtoError(f"field {number}: truncated fixed{size * 8}")
                self._pos = start + size
                yield number, wire_type, int.from_bytes(buf[start:self._pos], "little")
            else:
                raise ProtoError(f"field {number}: wire type {wire_type} is not supported")

    def _varint(self) -> int:
        buf, pos, result, shift = self._buf, self._pos, 0, 0
        while True:
            if pos >= len(buf):
                raise ProtoError("truncated varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift >= 70:
                raise ProtoError("varint longer than 10 bytes")
        self._pos = pos
        return result & ((1 << 64) - 1)


def _string(value: int | bytes, where: str) -> str:
    if not isinstance(value, bytes):
        raise ProtoError(f"{where}: expected a length-delimited string")
    return value.decode("utf-8", "replace")


def _message(value: int | bytes, where: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtoError(f"{where}: expected an embedded message")
    return value


def _signed(value: int | bytes, where: str) -> int:
    if not isinstance(value, int):
        raise ProtoError(f"{where}: expected a varint")
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_k8s_protobuf(data: bytes) -> DecodedValue:
    api_version = kind = content_type = ""
    raw = b""
    for number, _, value in ProtoReader(data):
        if number == 1:
            for n, _, v in ProtoReader(_message(value, "Unknown.typeMeta")):
                if n == 1:
                    api_version = _string(v, "TypeMeta.apiVersion")
                elif n == 2:
                    kind = _string(v, "TypeMeta.kind")
        elif number == 2:
            raw = _message(value, "Unknown.raw")
        elif number == 4:
            content_type = _string(value, "Unknown.contentType")
    if content_type and content_type != "application/vnd.kubernetes.protobuf":
        raise ProtoError(f"unexpected content type {content_type!r}")
    meta: dict[str, Any] = {}
    for number, _, value in ProtoReader(raw):
        if number == 1:
            meta = _object_meta(_message(value, "metadata"))
            break
    body: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": meta}
    return DecodedValue(
        PROTOBUF,
        body,
        api_version=api_version,
        kind=kind,
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        uid=meta.get("uid", ""),
    )


_META_STRINGS = {1: "name", 3: "namespace", 5: "uid", 6: "resourceVersion"}


def _object_meta(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    labels: dict[str, str] = {}
    owners: list[dict[str, Any]] = []
    for number, _, value in ProtoReader(data):
        if number in _META_STRINGS:
            meta[_META_STRINGS[number]] = _string(value, f"ObjectMeta.{_META_STRINGS[number]}")
        elif number == 7:
            meta["generation"] = _signed(value, "ObjectMeta.generation")
        elif number == 8:
            meta["creationTimestamp"] = _time(_message(value, "ObjectMeta.creationTimestamp"))
        elif number == 9:
            meta["deletionTimestamp"] = _time(_message(value, "ObjectMeta.deletionTimestamp"))
        elif number == 11:
            k = v = ""
            for n, _, x in ProtoReader(_message(value, "ObjectMeta.labels")):
                if n == 1:
                    k = _string(x, "labels.key")
                elif n == 2:
                    v = _string(x, "labels.value")
            labels[k] = v
        elif number == 13:
            owners.append(_owner(_message(value, "ObjectMeta.ownerReferences")))
    if labels:
        meta["labels"] = labels
    if owners:
        meta["ownerReferences"] = owners
    return meta


def _owner(data: bytes) -> dict[str, Any]:
    owner: dict[str, Any] = {}
    for number, _, value in ProtoReader(data):
        if number == 1:
            owner["kind"] = _string(value, "OwnerReference.kind")
        elif number == 3:
            owner["name"] = _string(value, "OwnerReference.name")
        elif number == 4:
            owner["uid"] = _string(value, "OwnerReference.uid")
        elif number == 5:
            owner["apiVersion"] = _string(value, "OwnerReference.apiVersion")
        elif number == 6:
            owner["controller"] = bool(_signed(value, "OwnerReference.controller"))
    return owner


def _time(data: bytes) -> str:
    """A meta/v1 Time as RFC 3339 in UTC, the way Kubernetes writes it in JSON (whole seconds)."""
    seconds = 0
    for number, _, value in ProtoReader(data):
        if number == 1:
            seconds = _signed(value, "Time.seconds")
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ProtoError(f"Time.seconds {seconds} is out of range") from None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
