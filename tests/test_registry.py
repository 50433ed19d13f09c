"""Every component tapio ships: its config, its lifecycle, and its documentation page.

One parametrized walk over the registry, so a new component is checked the
moment it is registered: its default (or minimal) config validates, it exits
cleanly when cancelled before it started, processors and exporters pass one
record and end when their input ends (connectors hand it on), and
docs/components/ documents exactly its config keys.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import trio

from tapio.builtin import default_registry
from tapio.component import Kind, Ports, Settings
from tapio.config import config_fields, decode_dataclass
from tapio.pdata import Signal
from tapio.telemetry import Telemetry
from tapio.testing.batches import log_batch
from tapio.testing.sink import RecordingConsumer

DOCS = Path(__file__).resolve().parent.parent / "docs" / "components"
REGISTRY = default_registry()
FACTORIES = REGISTRY.all()


def minimal_config(factory, tmp_path: Path) -> dict:
    """Settings a component cannot do without (everything else stays default)."""
    # Kubernetes components: a kubeconfig naming a server that refuses connections (they start, retry, stop)
    kubeconfig = tmp_path / "kubeconfig"
    if not kubeconfig.exists():
        kubeconfig.write_text(KUBECONFIG_NOWHERE)
    kube = {"auth_type": "kubeConfig", "kube_config_path": str(kubeconfig)}
    return {
        (Kind.PROCESSOR, "k8sattributes"): kube,
        (Kind.RECEIVER, "kubeapi"): kube,
        (Kind.EXPORTER, "file"): {"path": str(tmp_path / "out.jsonl")},
        (Kind.RECEIVER, "otlp"): {"protocols": {"grpc": {"endpoint": "127.0.0.1:0"}, "http": {"endpoint": "127.0.0.1:0"}}},
        (Kind.EXTENSION, "storage"): {"path": str(tmp_path / "tapio.db")},
        (Kind.RECEIVER, "kubeletstats"): {"endpoint": "https://127.0.0.1:1", "auth_type": "none"},
        (Kind.EXPORTER, "prometheus"): {"endpoint": "127.0.0.1:0"},
        (Kind.RECEIVER, "netflow"): {"protocols": {"netflow": {"endpoint": "127.0.0.1:0"}, "sflow": {"endpoint": "127.0.0.1:0"}}},
        (Kind.EXPORTER, "otlp"): {"endpoint": "127.0.0.1:1", "retry_on_failure": {"enabled": False}},
        (Kind.EXPORTER, "otlphttp"): {"endpoint": "http://127.0.0.1:1", "retry_on_failure": {"enabled": False}},
    }.get((factory.kind, factory.type), {})


KUBECONFIG_NOWHERE = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:1"}}]
users: [{name: u, user: {}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


def ids(f) -> str:
    return f"{f.kind.value}-{f.type}"


def settings_for(factory) -> Settings:
    return Settings(
        id=__import__("tapio.component", fromlist=["ComponentID"]).ComponentID(factory.type),
        kind=factory.kind,
        telemetry=Telemetry().for_component(factory.kind.value, factory.type),
        logger=logging.getLogger(f"test.{factory.type}"),
        shutdown_grace=1.0,
    )


@pytest.mark.parametrize("factory", FACTORIES, ids=ids)
def test_config_defaults_validate(factory, tmp_path):
    assert factory.description and not factory.description.endswith("\n")
    assert dataclasses.is_dataclass(factory.config_class)
    for f in dataclasses.fields(factory.config_class):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f"{factory.type}.{f.name} has no default"
    cfg = decode_dataclass(factory.config_class, minimal_config(factory, tmp_path))
    assert cfg.validate() == []
    if factory.summary is not None:
        assert isinstance(factory.summary(cfg), str)


@pytest.mark.parametrize("factory", FACTORIES, ids=ids)
async def test_cancelled_before_started_exits_cleanly(factory, tmp_path):
    cfg = decode_dataclass(factory.config_class, minimal_config(factory, tmp_path))
    send, recv = trio.open_memory_channel(1)
    ports = Ports(input=recv if factory.kind in (Kind.PROCESSOR, Kind.EXPORTER, Kind.CONNECTOR) else None,
                  output=RecordingConsumer() if factory.kind in (Kind.RECEIVER, Kind.PROCESSOR, Kind.CONNECTOR) else None)
    component = factory.create(settings_for(factory), cfg, ports)
    with trio.CancelScope() as scope:
        scope.cancel()
        await component.run()
    with trio.move_on_after(10) as timeout:  # and starts-then-stops when cancelled after start
        async with trio.open_nursery() as n:
            component = factory.create(settings_for(factory), cfg, ports)
            await n.start(component.run)
            n.cancel_scope.cancel()
    assert not timeout.cancelled_caught


@pytest.mark.parametrize("factory", [f for f in FACTORIES if f.kind in (Kind.PROCESSOR, Kind.EXPORTER, Kind.CONNECTOR) and Signal.LOGS in f.signals], ids=ids)
async def test_one_record_passes_and_component_ends_with_its_input(factory, tmp_path):
    cfg = decode_dataclass(factory.config_class, minimal_config(factory, tmp_path))
    send, recv = trio.open_memory_channel(1)
    sink = RecordingConsumer()
    settings = settings_for(factory)
    component = factory.create(settings, cfg, Ports(input=recv, output=sink if factory.kind in (Kind.PROCESSOR, Kind.CONNECTOR) else None))
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(component.run)
            await send.send(log_batch(["hello"]))
            await send.aclose()  # end of input: the component must flush and return on its own
    if factory.kind in (Kind.PROCESSOR, Kind.CONNECTOR):
        assert sink.item_count >= 1
    else:
        tel = settings.telemetry.telemetry
        handled = sum(tel.value(f"tapio_exporter_{what}_log_records_total") for what in ("sent", "send_failed", "enqueue_failed"))
        assert handled == 1


def config_table_keys(markdown: str) -> set[str]:
    """Keys in the first column of the tables headed ``| key | ...`` (the config tables)."""
    keys: set[str] = set()
    in_table = False
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            in_table = False
        elif cells[0].lower() == "key":
            in_table = True
        elif in_table:
            m = re.fullmatch(r"`([^`]+)`", cells[0])
            if m:
                keys.add(m.group(1))
    return keys


def doc_page(factory) -> Path:
    specific = DOCS / f"{factory.type}-{factory.kind.value}.md"
    return specific if specific.exists() else DOCS / f"{factory.type}.md"


@pytest.mark.parametrize("factory", FACTORIES, ids=ids)
def test_doc_page_documents_exactly_the_config_keys(factory):
    page = doc_page(factory)
    assert page.exists(), f"{factory.kind.value} {factory.type} has no page in docs/components/"
    text = page.read_text()
    documented = config_table_keys(text)
    keys = {key for key, *_ in config_fields(factory.config_class)}
    if not keys:
        assert not documented and "has no settings" in text, f"{page.name} should say the component has no settings"
        return
    assert documented, f"{page.name} has no config table (a table whose first column is headed 'key')"
    assert keys - documented == set(), f"{page.name} does not document {sorted(keys - documented)}"
    groups = {key.rsplit(".", i)[0] for key in keys for i in range(1, key.count(".") + 1)}
    extra = documented - keys - groups
    assert extra == set(), f"{page.name} documents keys the config does not have: {sorted(extra)}"


def test_components_index_lists_every_component():
    index = (DOCS / "README.md").read_text()
    for factory in FACTORIES:
        assert f"| {factory.kind.value} | `{factory.type}` |" in index, f"docs/components/README.md does not list {factory.kind.value} {factory.type}"
        assert f"({doc_page(factory).name})" in index
