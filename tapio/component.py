"""Component ids, factories, the registry, and what a running component is handed.

Invariants:
- A component type is registered once, by its type name, with a `Factory`;
  registering a second factory under the same kind and name raises.
- A component never looks up its neighbours: `Factory.create` receives its
  `Settings`, its validated config, and its `Ports` (input channel and/or
  output consumer). The runtime owns the channels; a component never closes
  the channels it is handed — its ``run`` returning is its end of stream.
- A running component is one coroutine, ``run(*, task_status)``. Code before
  ``task_status.started()`` is startup (bind, attach, open); after it is the
  steady state; cancellation is shutdown. Processors and exporters end on
  their own when their input channel is closed and drained.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, runtime_checkable

import trio

from tapio.pdata import Batch, Signal
from tapio.telemetry import ComponentTelemetry


class Kind(enum.Enum):
    RECEIVER = "receiver"
    PROCESSOR = "processor"
    EXPORTER = "exporter"
    CONNECTOR = "connector"
    EXTENSION = "extension"

    @property
    def plural(self) -> str:
        return self.value + "s"


_TYPE_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
_NAME_RE = re.compile(r"^[^\s/]+$")


@dataclass(frozen=True, order=True)
class ComponentID:
    """``type[/name]``, as in the OpenTelemetry Collector: ``otlp``, ``otlp/tempo``."""

    type: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> "ComponentID":
        if not isinstance(text, str):
            raise ValueError(f"a component id must be a string like 'otlp' or 'otlp/tempo', got {text!r}")
        type_, sep, name = text.strip().partition("/")
        if not _TYPE_RE.match(type_):
            raise ValueError(f"invalid component type {type_!r} in {text!r}: use lowercase letters, digits, '_' or '-'")
        if sep and not _NAME_RE.match(name):
            raise ValueError(f"invalid component name {name!r} in {text!r}: must be non-empty without spaces or '/'")
        return cls(type_, name)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


@dataclass(frozen=True, order=True)
class PipelineID:
    """``signal[/name]``: ``logs``, ``metrics/kernel``."""

    signal: Signal
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> "PipelineID":
        if not isinstance(text, str):
            raise ValueError(f"a pipeline id must be a string like 'logs' or 'traces/jaeger', got {text!r}")
        sig, sep, name = text.strip().partition("/")
        try:
            signal = Signal(sig)
        except ValueError:
            raise ValueError(
                f"invalid pipeline id {text!r}: it must start with a signal type (logs, metrics, traces), e.g. 'logs/kernel'"
            ) from None
        if sep and not _NAME_RE.match(name):
            raise ValueError(f"invalid pipeline name {name!r} in {text!r}")
        return cls(signal, name)

    def __str__(self) -> str:
        return f"{self.signal.value}/{self.name}" if self.name else self.signal.value


@dataclass(frozen=True, order=True)
class ExtensionRef:
    """A config value naming an extension by id (``storage``, ``storage/queues``).

    Subclasses fix the extension type the reference must name
    (`extension_type`). `tapio validate` checks every reference in every
    component's config: the id must be defined under ``extensions`` with
    that type and be listed in ``service.extensions``. At run time the
    component gets the started extension with `Settings.extension`.
    """

    id: ComponentID

    #: the type of extension this reference must name
    extension_type: ClassVar[str] = ""

    @classmethod
    def parse(cls, text: str) -> "ExtensionRef":
        return cls(ComponentID.parse(text))

    def __str__(self) -> str:
        return str(self.id)


@dataclass(frozen=True, order=True)
class StorageRef(ExtensionRef):
    """The id of a ``storage`` extension: where a component keeps its queue or checkpoints."""

    extension_type: ClassVar[str] = "storage"


def setting(
    default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING, secret: bool = False, key: str = ""
) -> Any:
    """A config dataclass field with its user documentation (shown in docs/components/).

    ``secret`` fields (credentials, auth headers) are left out of the config's
    repr, so a logged or printed config never shows them. ``key`` is the key
    written in YAML when it cannot be the field's name (a Python keyword:
    ``from_`` is written ``from``).
    """
    meta = {"doc": doc, "secret": secret, "key": key}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


class Refused(Exception):
    """The pipeline cannot take this batch now (e.g. memory limit); nothing of it was kept.

    Raised from ``Consumer.send``/``send_nowait``. Receivers that can ask their
    client to retry do so (OTLP: HTTP 503 / gRPC UNAVAILABLE); others count
    the refusal. The batch's ``on_done`` callbacks were called with False.
    """


class Consumer(Protocol):
    """The entry to the next stage: where a receiver or processor hands its batches."""

    #: the signals something downstream is wired for
    signals: frozenset[Signal]

    async def send(self, batch: Batch) -> None:
        """Hand a batch on, waiting while the next stage is full (backpressure)."""

    def send_nowait(self, batch: Batch) -> None:
        """Hand a batch on or raise `trio.WouldBlock` (for sources that cannot wait, which count the refusal)."""


class Stage(Consumer, Protocol):
    """The runtime's view of the entry to a stage: a `Consumer` it can also ask and close."""

    def has_room(self) -> bool:
        """Whether `send_nowait` would find room now (every target of a fan-out has some)."""

    def admit(self, batch: Batch) -> None:
        """Raise `Refused` if the stage will not take ``batch`` (asked before it is handed on)."""

    async def aclose(self) -> None:
        """End of stream: nothing more is sent through this entry."""


# --- optional capabilities: what a component or config may declare, found with isinstance


@runtime_checkable
class Admits(Protocol):
    """A processor that may refuse input before it enters its channel (e.g. a memory limiter over its limit)."""

    def admit(self, batch: Batch) -> None:
        """Raise `Refused` to refuse ``batch``; the refusal reaches the receiver, which can ask its client to retry."""


@runtime_checkable
class Listens(Protocol):
    """A running component that bound sockets: the start banner shows what it bound (port 0 picks one)."""

    @property
    def bound_endpoints(self) -> Mapping[str, str]:
        """Config key path (``endpoint``, ``protocols.grpc.endpoint``) → the ``host:port`` bound."""


@runtime_checkable
class DescribesItself(Protocol):
    """A running component whose start-banner line depends on what it found at start (e.g. the files a tailer watches)."""

    @property
    def running_summary(self) -> str:
        """What the banner shows for this instance, instead of its factory's ``summary`` of the config."""


@runtime_checkable
class QueuesDurably(Protocol):
    """An exporter config that can say whether what the exporter accepted survives a crash (kept in storage)."""

    @property
    def queues_durably(self) -> bool: ...


@runtime_checkable
class AcknowledgesBeforeDelivery(Protocol):
    """A receiver config that can answer its clients before export.

    ``acknowledges_before_delivery`` is the config key that changes it
    (e.g. ``acknowledge``) while it does, None when it acknowledges only
    what is delivered or durably queued.
    """

    @property
    def acknowledges_before_delivery(self) -> str | None: ...


@dataclass(kw_only=True)
class Ports:
    """A component's connections, owned by the runtime."""

    #: batches coming in (processors and exporters); end of stream when closed
    input: trio.MemoryReceiveChannel[Batch] | None = None
    #: where batches go (receivers and processors)
    output: Consumer | None = None


@dataclass(kw_only=True)
class Settings:
    """What the runtime hands every component besides its config."""

    id: ComponentID
    kind: Kind
    telemetry: ComponentTelemetry
    logger: logging.Logger
    #: for processors: the pipeline this instance belongs to
    pipeline: PipelineID | None = None
    #: the started extensions by id (what each one's ``run`` handed to ``task_status.started``)
    extensions: Mapping[ComponentID, Any] = field(default_factory=dict)
    #: how long a component may take to flush on shutdown
    shutdown_grace: float = 5.0

    def extension(self, ref: ExtensionRef) -> Any:
        """The started extension ``ref`` names.

        Raises `LookupError` naming the fix when it is not running (`tapio
        validate` reports that case first, so only hand-built settings get here).
        """
        try:
            return self.extensions[ref.id]
        except KeyError:
            kind = ref.extension_type or "extension"
            raise LookupError(
                f"{kind} extension '{ref}' is not running: define it under `extensions:` and list it in service.extensions"
            ) from None

    def storage(self, ref: StorageRef) -> Any:
        """The open `tapio.storage.Storage` of the storage extension ``ref`` names (see `extension`)."""
        return self.extension(ref)


class Component(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None: ...


@dataclass(frozen=True, kw_only=True)
class Factory:
    """How to make a component of one type."""

    type: str
    kind: Kind
    #: a frozen, keyword-only dataclass; every field has a default; ``validate()`` returns a list of problems
    config_class: type
    signals: frozenset[Signal]
    create: Callable[[Settings, Any, Ports], Component]
    description: str
    #: True if the component changes records in place (fan-out then hands it a copy)
    mutates_data: bool = False
    #: with mutates_data: the component keeps ``Batch.raw`` in step with every change it
    #: makes, so the runtime leaves the arrival bytes alone (exporters still send them)
    keeps_raw: bool = False
    #: a short summary of a running instance's config for `tapio run`'s start banner
    summary: Callable[[Any], str] | None = None
    #: connectors: the (from, to) signal pairs it joins, from the pipelines it
    #: exports from to those it receives into (``signals`` are then the ``from`` side)
    connects: frozenset[tuple[Signal, Signal]] = frozenset()

    def __post_init__(self) -> None:
        if not _TYPE_RE.match(self.type):
            raise ValueError(f"invalid component type name {self.type!r}")
        if (self.kind is Kind.CONNECTOR) != bool(self.connects):
            raise ValueError(f"{self.type!r}: a connector factory (and only one) declares the signal pairs it connects")
        if self.connects and self.signals != frozenset(f for f, _ in self.connects):
            raise ValueError(f"{self.type!r}: a connector's signals are the 'from' sides of its pairs")

    @property
    def emits(self) -> frozenset[Signal]:
        """The signals a receiver or connector can hand on (a connector's ``to`` sides)."""
        return frozenset(t for _, t in self.connects) if self.connects else self.signals


class Registry:
    """Factories by kind and type name."""

    def __init__(self, factories: Iterable[Factory] = ()) -> None:
        self._factories: dict[tuple[Kind, str], Factory] = {}
        for f in factories:
            self.register(f)

    def register(self, factory: Factory) -> None:
        key = (factory.kind, factory.type)
        if key in self._factories:
            raise ValueError(f"{factory.kind.value} type {factory.type!r} is already registered")
        self._factories[key] = factory

    def get(self, kind: Kind, type_: str) -> Factory | None:
        return self._factories.get((kind, type_))

    def types(self, kind: Kind) -> list[str]:
        return sorted(t for k, t in self._factories if k is kind)

    def all(self) -> list[Factory]:
        return sorted(self._factories.values(), key=lambda f: (list(Kind).index(f.kind), f.type))


def config_problems(config: Any) -> list[str]:
    """Run a config's ``validate()`` if it has one."""
    validate = getattr(config, "validate", None)
    return list(validate()) if validate is not None else []


def describe_signals(signals: Iterable[Signal]) -> str:
    return ", ".join(s.value for s in sorted(signals, key=lambda s: list(Signal).index(s)))
