"""The ebpf receiver against the real kernel: each event kind, container ids, loss, filters, restart.

Needs root, bcc, kernel headers and tracefs. With CI=true a missing
prerequisite fails; elsewhere the tests skip and say why.

Compiling costs over a second, so one receiver with the default config is
started once for this module (`live`) in a thread of its own with its own
trio loop; tests wait on its recorded batches with a deadline. The storm,
filter and restart tests need their own configs and start their own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing import prereq
from tapio.testing.batches import log_records, spans
from tapio.testing.sink import RecordingConsumer

CGROUP2 = Path("/sys/fs/cgroup/unified")
MEMCG = Path("/sys/fs/cgroup/memory")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not importable (run scripts/setup.sh)"
    build = Path(f"/lib/modules/{os.uname().release}/build/include")
    if not build.is_dir():
        return f"kernel headers missing at {build}"
    return None


def require(what: str | None) -> None:
    if what is not None:
        prereq.missing(what, "the ebpf kernel tests run as root with bcc and kernel headers (scripts/setup.sh installs them)")


def make_settings(telemetry: Telemetry, name: str = "") -> Settings:
    return Settings(
        id=ComponentID("ebpf", name),
        kind=Kind.RECEIVER,
        telemetry=telemetry.for_component("receiver", str(ComponentID("ebpf", name))),
        logger=logging.getLogger("test.ebpf"),
    )


class ThreadSink:
    """A Consumer whose batches can be awaited from another trio loop (the tests')."""

    signals = frozenset(Signal)

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self._cond = threading.Condition()

    async def send(self, batch: Batch) -> None:
        self.send_nowait(batch)

    def send_nowait(self, batch: Batch) -> None:
        with self._cond:
            self.batches.append(batch)
            self._cond.notify_all()

    def wait(self, pick: Callable[[list[Batch]], Any], timeout: float) -> Any:
        with self._cond:
            found = None

            def ready() -> bool:
                nonlocal found
                found = pick(list(self.batches))
                return bool(found)

            self._cond.wait_for(ready, timeout)
            return found


class LiveReceiver:
    """The default-config receiver running in its own thread and trio loop."""

    def __init__(self) -> None:
        from tapio.receivers.ebpf import factory
        from tapio.receivers.ebpf._config import Config

        self.sink = ThreadSink()
        self.telemetry = Telemetry()
        self.receiver = factory.create(make_settings(self.telemetry, "live"), Config(flush_interval=0.01, metrics_interval=1.0), Ports(output=self.sink))
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._token: Any = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._main, name="ebpf-live", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.receiver.run)
                self._token = trio.lowlevel.current_trio_token()
                self._cancel = nursery.cancel_scope
                self._started.set()

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = exc
            self._started.set()

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None:
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(30)

    async def wait_record(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10) -> tuple[dict[str, Any], Any]:
        def pick(batches: list[Batch]) -> Any:
            return next(((a, r) for a, r in log_records(batches) if match(a)), None)

        found = await trio.to_thread.run_sync(self.sink.wait, pick, timeout)
        assert found, "no matching log record within the deadline"
        return found

    async def wait_span(self, match: Callable[[dict[str, Any], Any], bool], timeout: float = 10) -> tuple[dict[str, Any], Any]:
        def pick(batches: list[Batch]) -> Any:
            return next(((a, s) for a, s in spans(batches) if match(a, s)), None)

        found = await trio.to_thread.run_sync(self.sink.wait, pick, timeout)
        assert found, "no matching span within the deadline"
        return found


@pytest.fixture(scope="module")
def live():
    require(_missing())
    receiver = LiveReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


async def test_exec_and_exit_name_the_child(live):
    proc = await trio.run_process(["/bin/sh", "-c", "exit 3"], check=False)
    assert proc.returncode == 3
    # run_process does not tell the pid; find the exec by its argv and check the pid in the exit
    exec_attrs, exec_rec = await live.wait_record(
        lambda a: a.get("tapio.ebpf.event") == "exec" and a.get("process.command_args") == ["/bin/sh", "-c", "exit 3"]
    )
    assert exec_attrs["process.executable.path"] == "/bin/sh"
    assert exec_attrs["process.parent_pid"] == os.getpid()
    pid = exec_attrs["process.pid"]
    assert exec_rec.time_unix_nano > 0 and exec_rec.event_name == "tapio.ebpf.exec"
    exit_attrs, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "exit" and a["process.pid"] == pid)
    assert exit_attrs["process.exit.code"] == 3
    assert exit_attrs["tapio.ebpf.exit.lifetime_ns"] > 0
    span_attrs, span = await live.wait_span(lambda a, s: a.get("process.pid") == pid)
    assert span.name == "process sh" and span.end_time_unix_nano > span.start_time_unix_nano


async def test_exec_pid_matches_a_started_child(live):
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(trio.run_process, ["/bin/sleep", "0.2"])
        pid = proc.pid
    a, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "exec" and a["process.pid"] == pid)
    assert a["process.executable.path"] == "/bin/sleep"
    assert a["process.command_args"] == ["/bin/sleep", "0.2"]
    b, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "exit" and a["process.pid"] == pid)
    assert b["process.exit.code"] == 0


async def test_open_reports_path_flags_fd_and_errno(live, tmp_path):
    target = tmp_path / f"opened-{uuid.uuid4().hex}"
    missing = tmp_path / f"missing-{uuid.uuid4().hex}"
    code = f"open({str(target)!r}, 'w').close()\ntry:\n    open({str(missing)!r})\nexcept OSError:\n    pass\n"
    await trio.run_process([sys.executable, "-c", code])
    a, _ = await live.wait_record(lambda a: a.get("file.path") == str(target))
    assert {"O_WRONLY", "O_CREAT", "O_TRUNC"} <= set(a["tapio.ebpf.open.flags_text"].split("|"))
    assert a["tapio.ebpf.open.fd"] >= 0
    assert a["tapio.ebpf.comm"].startswith("python")
    b, _ = await live.wait_record(lambda a: a.get("file.path") == str(missing))
    assert b["error.type"] == "ENOENT" and "tapio.ebpf.open.fd" not in b


TCP_CHILD = textwrap.dedent(
    """
    import json, socket, sys, time
    family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((host, 0)); srv.listen()
    cli = socket.create_connection((host, srv.getsockname()[1]))
    conn, peer = srv.accept()
    time.sleep(0.05)
    cli.sendall(b"x"); conn.recv(1)
    print(json.dumps({"server_port": srv.getsockname()[1], "client_port": cli.getsockname()[1]}))
    cli.close(); conn.close(); srv.close()
    """
)


@pytest.mark.parametrize("version", ["4", "6"])
async def test_tcp_connect_accept_close_on_loopback(live, version):
    proc = await trio.run_process([sys.executable, "-c", TCP_CHILD, version], capture_stdout=True)
    ports = json.loads(proc.stdout)
    server, client = ports["server_port"], ports["client_port"]
    loopback = "::1" if version == "6" else "127.0.0.1"
    net = f"ipv{version}"

    def tcp(event: str, local: int, peer: int) -> Callable[[dict[str, Any]], bool]:
        return lambda a: (
            a.get("tapio.ebpf.tcp.event") == event
            and a["network.local.port"] == local
            and a["network.peer.port"] == peer
            and a["network.type"] == net
        )

    conn, _ = await live.wait_record(tcp("connect", client, server))
    assert conn["network.peer.address"] == loopback and conn["network.transport"] == "tcp"
    assert conn["tapio.ebpf.tcp.old_state"] == "SYN_SENT" and conn["tapio.ebpf.tcp.new_state"] == "ESTABLISHED"
    pid = conn["process.pid"]
    assert conn["tapio.ebpf.comm"].startswith("python")
    acc, _ = await live.wait_record(tcp("accept", server, client))
    assert acc["process.pid"] == pid, "accept is attributed to the accepting process"
    assert acc["network.local.address"] == loopback and acc["tapio.ebpf.tcp.fd"] >= 0
    # the client closes first (active close), the server then (passive close); states in the kernel's numbering order
    paths = {
        client: ["ESTABLISHED", "SYN_SENT", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
        server: ["ESTABLISHED", "SYN_RECV", "CLOSE", "CLOSE_WAIT", "LAST_ACK"],
    }
    for local, peer in ((client, server), (server, client)):
        close, _ = await live.wait_record(tcp("close", local, peer))
        assert close["process.pid"] == pid
        assert close["tapio.ebpf.tcp.new_state"] == "CLOSE"
        assert close["tapio.ebpf.tcp.duration_ns"] >= 50_000_000  # the child held the connection 50 ms
        assert close["tapio.ebpf.tcp.states"] == paths[local]
    span_attrs, span = await live.wait_span(lambda a, s: a.get("network.local.port") == client and a.get("tapio.ebpf.tcp.event") == "close")
    assert span.name == f"tcp connect {'[::1]' if version == '6' else loopback}:{server}"
    assert span.end_time_unix_nano - span.start_time_unix_nano >= 50_000_000


async def test_signal_names_sender_target_and_number(live):
    async with trio.open_nursery() as nursery:
        target = await nursery.start(partial(trio.run_process, ["/bin/sleep", "30"], check=False))
        kill = await trio.run_process(["/bin/kill", "-USR1", str(target.pid)], check=False)
        assert kill.returncode == 0
    a, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "signal" and a["tapio.ebpf.signal.target_pid"] == target.pid and a["tapio.ebpf.signal.number"] == signal.SIGUSR1)
    assert a["tapio.ebpf.signal.name"] == "SIGUSR1"
    assert a["tapio.ebpf.comm"] == "kill"
    assert a["tapio.ebpf.signal.target_comm"] == "sleep"
    b, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "exit" and a["process.pid"] == target.pid)
    assert b["tapio.ebpf.exit.signal"] == "SIGUSR1"


async def test_oom_kill_names_the_victim(live):
    if not (MEMCG / "cgroup.procs").exists():
        require("the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = MEMCG / f"tapio-oom-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(32 << 20))
        script = f'echo $$ > {group}/cgroup.procs; exec {sys.executable} -c "a=[b\\"x\\"*(1<<20) for _ in range(200)]"'
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(partial(trio.run_process, ["/bin/sh", "-c", script], check=False))
            proc_pid = proc.pid
        # the victim is the exec'ed python, which kept the shell's pid
        a, rec = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "oom" and a["process.pid"] == proc_pid)
        assert a["tapio.ebpf.comm"].startswith("python")
        assert a["tapio.ebpf.oom.anon_rss_kb"] > 20 * 1024
        assert rec.severity_text == "WARN"
        b, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "exit" and a["process.pid"] == proc_pid)
        assert b["tapio.ebpf.exit.signal"] == "SIGKILL"
    finally:
        with trio.fail_after(10):
            while True:
                try:
                    group.rmdir()
                    break
                except OSError:
                    await trio.sleep(0.05)


KUBELET_LAYOUTS = [
    (
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{cid}.scope",
        "containerd",
    ),
    ("kubepods/burstable/pod{uid}/{cid}", ""),
    ("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{cid}.scope", "cri-o"),
]


@pytest.mark.parametrize("layout,runtime", KUBELET_LAYOUTS)
async def test_container_id_from_kubelet_cgroup_layouts(live, tmp_path, layout, runtime):
    if not (CGROUP2 / "cgroup.procs").exists():
        require("cgroup2 mounted at /sys/fs/cgroup/unified")
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    pod = str(uuid.uuid4())
    top = f"tapio-test-{uuid.uuid4().hex[:8]}"
    leaf = CGROUP2 / top / layout.format(uid=pod, uid_=pod.replace("-", "_"), cid=cid)
    leaf.mkdir(parents=True)
    try:
        marker = tmp_path / "in-container"
        script = f"echo $$ > {leaf}/cgroup.procs; exec /bin/cat {marker}"
        marker.write_text("x")
        await trio.run_process(["/bin/sh", "-c", script], capture_stdout=True)
        a, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.event") == "exec" and a.get("process.command_args") == ["/bin/cat", str(marker)])
        assert a["tapio.ebpf.cgroup_id"] == leaf.stat().st_ino
        assert a["container.id"] == cid
        assert a["k8s.pod.uid"] == pod
        if runtime:
            assert a["container.runtime.name"] == runtime
        # the exit arrives after the process is gone; its container is still known
        b, _ = await live.wait_record(lambda b: b.get("tapio.ebpf.event") == "exit" and b["process.pid"] == a["process.pid"])
        assert b["container.id"] == cid
    finally:
        for d in sorted((p for p in (CGROUP2 / top).rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        (CGROUP2 / top).rmdir()


async def test_live_receiver_reports_metrics_and_counts(live):
    def pick(batches: list[Batch]) -> Any:
        return next((b for b in batches if b.signal is Signal.METRICS), None)

    batch = await trio.to_thread.run_sync(live.sink.wait, pick, 10)
    assert batch is not None
    names = {m.name for m in batch.requests[0].resource_metrics[0].scope_metrics[0].metrics}
    assert {"tapio.ebpf.events", "tapio.ebpf.events.lost", "tapio.ebpf.container.unresolved"} <= names
    assert live.telemetry.value("tapio_ebpf_events_total", kind="exec") > 0


def test_the_live_receiver_writes_with_the_compiled_loop(live):
    from tapio.receivers.ebpf import _records

    if _records.COMPILED is None:
        prereq.missing("the ebpf receiver's compiled record writer", _records.COMPILED_MISSING)
    assert live.receiver._writer.compiled
    assert live.receiver.writer_summary() == "TCP and open records written by the compiled loop"


# -- receivers of their own


async def _run_receiver(config: Any, sink: RecordingConsumer, telemetry: Telemetry, nursery: trio.Nursery) -> Any:
    from tapio.receivers.ebpf import factory

    receiver = factory.create(make_settings(telemetry), config, Ports(output=sink))
    await nursery.start(receiver.run)
    return receiver


async def test_without_the_compiled_loop_the_receiver_starts_says_so_and_writes_records(tmp_path, monkeypatch, caplog):
    """The compiled record writer is optional: without it the start summary says why, and records are written in Python."""
    require(_missing())
    from tapio.receivers.ebpf import _records
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    monkeypatch.setattr(_records, "COMPILED", None)
    monkeypatch.setattr(_records, "COMPILED_MISSING", "the compiled record writer is not built (hidden by this test)")
    caplog.set_level(logging.INFO, logger="test.ebpf")
    prefix = str(tmp_path) + "/"
    config = Config(events=EventsConfig(process=False, oom=False, signal=False), filters=FiltersConfig(path_prefixes=[prefix]), flush_interval=0.05)
    sink, telemetry = RecordingConsumer(), Telemetry()
    target = tmp_path / "written-in-python"
    async with trio.open_nursery() as nursery:
        receiver = await _run_receiver(config, sink, telemetry, nursery)
        assert not receiver._writer.compiled
        proc = await trio.run_process([sys.executable, "-c", f"open({str(target)!r}, 'w')\n" + TCP_CHILD, "4"], capture_stdout=True)
        client = json.loads(proc.stdout)["client_port"]
        with trio.fail_after(10):
            await sink.wait_until(
                lambda: any(a.get("file.path") == str(target) for a, _ in log_records(sink.batches))
                and any(a.get("tapio.ebpf.tcp.event") == "close" and a.get("network.local.port") == client for a, _ in log_records(sink.batches))
            )
        nursery.cancel_scope.cancel()
    (summary,) = [r.getMessage() for r in caplog.records if ": tracing " in r.getMessage()]
    assert summary.endswith("; records written in Python: the compiled record writer is not built (hidden by this test)")


async def test_storm_against_a_tiny_ring_buffer_counts_losses_and_keeps_running(tmp_path):
    require(_missing())
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    prefix = str(tmp_path) + "/"
    config = Config(
        events=EventsConfig(process=False, network=False, oom=False, signal=False),
        filters=FiltersConfig(path_prefixes=[prefix]),
        ring_buffer_size=4096,
        flush_interval=0.5,
    )
    sink, telemetry = RecordingConsumer(), Telemetry()
    async with trio.open_nursery() as nursery:
        receiver = await _run_receiver(config, sink, telemetry, nursery)
        storm = f"import os\nfor i in range(3000):\n    os.close(os.open({prefix!r} + 'storm', os.O_RDONLY | os.O_CREAT))\n"
        await trio.run_process([sys.executable, "-c", storm])
        with trio.fail_after(10):
            while receiver.kernel_counters()["lost"]["open"] == 0:
                await trio.sleep(0.1)
        assert telemetry.value("tapio_ebpf_events_lost_total", kind="open") > 0
        # still running: a later open arrives
        after = tmp_path / "after-storm"
        await trio.run_process([sys.executable, "-c", f"open({str(after)!r}, 'w')"])
        with trio.fail_after(10):
            await sink.wait_until(lambda: any(a.get("file.path") == str(after) for a, _ in log_records(sink.batches)))
        nursery.cancel_scope.cancel()


async def test_filters_keep_the_prefix_and_comm_and_drop_the_rest(tmp_path):
    require(_missing())
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    keep, drop = tmp_path / "keep", tmp_path / "drop"
    keep.mkdir(), drop.mkdir()
    comm = "tapio-filt"  # argv[0]-independent: set with prctl below
    config = Config(
        events=EventsConfig(process=False, network=False, oom=False, signal=False),
        filters=FiltersConfig(path_prefixes=[str(tmp_path) + "/"], exclude_path_prefixes=[str(drop) + "/"], comms=[comm]),
        flush_interval=0.01,
    )
    child = textwrap.dedent(
        f"""
        import ctypes, sys
        open({str(keep / 'a')!r}, 'w')            # wrong comm yet: dropped
        ctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)   # PR_SET_NAME
        open({str(drop / 'b')!r}, 'w')            # excluded prefix: dropped
        open('/etc/hostname')                     # outside the prefixes: dropped
        open({str(keep / 'c')!r}, 'w')            # kept
        """
    )
    sink, telemetry = RecordingConsumer(), Telemetry()
    async with trio.open_nursery() as nursery:
        await _run_receiver(config, sink, telemetry, nursery)
        await trio.run_process([sys.executable, "-c", child])
        with trio.fail_after(10):
            await sink.wait_until(lambda: any(a.get("file.path") == str(keep / "c") for a, _ in log_records(sink.batches)))
        nursery.cancel_scope.cancel()
    seen = [a for a, _ in log_records(sink.batches)]
    assert all(a["tapio.ebpf.comm"] == comm for a in seen)
    assert [a["file.path"] for a in seen] == [str(keep / "c")]


def _tapio_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out) if p.get("type") == "tracepoint"}


async def test_restart_leaves_no_programs_behind():
    require(_missing())
    if shutil.which("bpftool") is None:
        require("bpftool")
    from tapio.receivers.ebpf._config import Config

    before = _tapio_prog_ids()
    for _ in range(2):
        sink, telemetry = RecordingConsumer(), Telemetry()
        async with trio.open_nursery() as nursery:
            await _run_receiver(Config(), sink, telemetry, nursery)
            ours = _tapio_prog_ids() - before
            assert len(ours) >= 10, "every event kind's programs are loaded"
            nursery.cancel_scope.cancel()
        assert not (_tapio_prog_ids() & ours), "programs still loaded after the receiver stopped"


AGENT_PROBE = """
import json, sys, trio, logging
from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.receivers.ebpf import factory
from tapio.receivers.ebpf._config import Config
from tapio.telemetry import Telemetry
from tapio.testing.sink import RecordingConsumer

async def main():
    t = Telemetry()
    settings = Settings(id=ComponentID("ebpf"), kind=Kind.RECEIVER, telemetry=t.for_component("receiver", "ebpf"), logger=logging.getLogger("probe"))
    async with trio.open_nursery() as nursery:
        await nursery.start(factory.create(settings, Config(), Ports(output=RecordingConsumer())).run)
        maps = open("/proc/self/maps").read()
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        print(json.dumps({"bcc_imported": "bcc" in sys.modules, "libbcc_mapped": "libbcc" in maps, "llvm_mapped": "LLVM" in maps,
                          "rss_kb": int(status["VmRSS"].split()[0])}))
        nursery.cancel_scope.cancel()

trio.run(main)
"""


async def test_the_agent_process_never_loads_bcc_or_llvm():
    require(_missing())
    done = await trio.run_process([sys.executable, "-c", AGENT_PROBE], capture_stdout=True)
    seen = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert not seen["bcc_imported"] and not seen["libbcc_mapped"] and not seen["llvm_mapped"], seen
    # issue 4's goal is 100 MB at ready; bcc alone used to map ~60 MB into this process
    assert seen["rss_kb"] < 100 * 1024, seen


async def test_cancelled_while_compiling_leaves_nothing_loaded():
    require(_missing())
    from tapio.receivers.ebpf import factory
    from tapio.receivers.ebpf._config import Config

    before = _tapio_prog_ids()
    receiver = factory.create(make_settings(Telemetry()), Config(), Ports(output=RecordingConsumer()))
    with trio.move_on_after(0.2) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
    assert scope.cancelled_caught
    assert not (_tapio_prog_ids() - before)
    assert receiver.program is None


async def test_startup_error_names_what_is_missing():
    from tapio.receivers.ebpf import EbpfStartupError

    with pytest.raises(EbpfStartupError, match="tracepoint sched/sched_process_fork"):
        from tapio.receivers.ebpf._config import Config
        from tapio.receivers.ebpf._loader import plan

        plan(Config(), "/nonexistent-tracefs")


class Cgroup2Leaf:
    """A cgroup2 directory of the test's own, removed afterwards; ``enter`` is a shell prefix that moves a child into it."""

    def __init__(self) -> None:
        if not (CGROUP2 / "cgroup.procs").exists():
            require("cgroup2 mounted at /sys/fs/cgroup/unified")
        self.path = CGROUP2 / f"tapio-test-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "Cgroup2Leaf":
        self.path.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.rmdir()

    @property
    def enter(self) -> str:
        return f"echo $$ > {self.path}/cgroup.procs; "


async def test_rate_limit_per_cgroup_caps_a_storm_and_counts_the_rest(tmp_path):
    require(_missing())
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    limit, storm_opens = 40, 400
    data = tmp_path / "data"  # the prefix: the storm's own script (run from tmp_path) is outside it
    data.mkdir()
    config = Config(
        events=EventsConfig(process=False, network=False, oom=False, signal=False),
        filters=FiltersConfig(path_prefixes=[str(data) + "/"]),
        rate_limit_per_cgroup=limit,
        flush_interval=0.01,
    )
    sink, telemetry = RecordingConsumer(), Telemetry()
    with Cgroup2Leaf() as cg:
        # two storming processes on two CPUs at once: the cgroup's count is shared between CPUs
        storm = tmp_path / "storm.py"
        storm.write_text(
            "import os, sys, time\n"
            "cpus = sorted(os.sched_getaffinity(0)); os.sched_setaffinity(0, {cpus[int(sys.argv[1]) % len(cpus)]})\n"
            f"t = time.monotonic()\nfor i in range({storm_opens // 2}):\n    os.close(os.open({str(data / 'storm')!r}, os.O_RDONLY | os.O_CREAT))\n"
            "print(time.monotonic() - t)\n"
        )
        async with trio.open_nursery() as nursery:
            receiver = await _run_receiver(config, sink, telemetry, nursery)
            both = f"{sys.executable} {storm} 0 & {sys.executable} {storm} 1; wait"
            done = await trio.run_process(["/bin/sh", "-c", cg.enter + both], capture_stdout=True)
            storm_seconds = max(float(x) for x in done.stdout.decode().split())
            # another cgroup (this test's) is not limited by the storm's
            calm = data / "calm"
            await trio.run_process([sys.executable, "-c", f"open({str(calm)!r}, 'w')"])
            with trio.fail_after(10):
                await sink.wait_until(lambda: any(a.get("file.path") == str(calm) for a, _ in log_records(sink.batches)))
                while receiver.kernel_counters()["rate_limited"]["open"] + _count_path(sink, data / "storm") < storm_opens:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        storm_cgroup = cg.path.stat().st_ino
    kept = _count_path(sink, data / "storm")
    windows = 1 + int(storm_seconds)  # a fixed one-second window per cgroup
    assert limit <= kept <= limit * (windows + 1), (kept, storm_seconds)
    # every open of the storm is either reported or counted as rate limited
    assert kept + receiver.kernel_counters()["rate_limited"]["open"] == storm_opens
    assert telemetry.value("tapio_ebpf_events_rate_limited_total", kind="open") == storm_opens - kept
    cgroup_ids = {a["tapio.ebpf.cgroup_id"] for a, _ in log_records(sink.batches) if a["file.path"] == str(data / "storm")}
    assert cgroup_ids == {storm_cgroup}


def _count_path(sink: RecordingConsumer, path: Path) -> int:
    return sum(1 for a, _ in log_records(sink.batches) if a.get("file.path") == str(path))


async def test_cgroup_filter_keeps_only_the_listed_cgroup(tmp_path):
    require(_missing())
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    with Cgroup2Leaf() as cg:
        config = Config(
            events=EventsConfig(network=False, oom=False, signal=False),
            filters=FiltersConfig(cgroups=[str(cg.path)], path_prefixes=[str(tmp_path) + "/"]),
            flush_interval=0.01,
        )
        sink, telemetry = RecordingConsumer(), Telemetry()
        async with trio.open_nursery() as nursery:
            await _run_receiver(config, sink, telemetry, nursery)
            await trio.run_process(["/bin/sh", "-c", f"exec /bin/cat {tmp_path / 'outside'}"], check=False, capture_stderr=True)
            await trio.run_process(["/bin/sh", "-c", cg.enter + f"exec /bin/cat {tmp_path / 'inside'}"], check=False, capture_stderr=True)
            with trio.fail_after(10):
                await sink.wait_until(lambda: any(a.get("tapio.ebpf.event") == "exit" and a.get("tapio.ebpf.comm") == "cat" for a, _ in log_records(sink.batches)))
            nursery.cancel_scope.cancel()
        inside_cgroup = cg.path.stat().st_ino
    seen = [a for a, _ in log_records(sink.batches)]
    assert seen, "the cgroup's own events arrive"
    assert {a["tapio.ebpf.cgroup_id"] for a in seen} == {inside_cgroup}
    assert [a["file.path"] for a in seen if a["tapio.ebpf.event"] == "open"] == [str(tmp_path / "inside")]
    assert all(a.get("process.command_args", [""])[-1] != str(tmp_path / "outside") for a in seen)


async def test_container_only_keeps_tasks_of_other_pid_namespaces(tmp_path):
    require(_missing())
    if shutil.which("unshare") is None:
        require("unshare (util-linux)")
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    config = Config(
        events=EventsConfig(process=False, network=False, oom=False, signal=False),
        filters=FiltersConfig(container_only=True, path_prefixes=[str(tmp_path) + "/"]),
        flush_interval=0.01,
    )
    sink, telemetry = RecordingConsumer(), Telemetry()
    host, contained = tmp_path / "host", tmp_path / "contained"
    async with trio.open_nursery() as nursery:
        await _run_receiver(config, sink, telemetry, nursery)
        await trio.run_process([sys.executable, "-c", f"open({str(host)!r}, 'w')"])
        await trio.run_process(["unshare", "--pid", "--fork", sys.executable, "-c", f"import os; assert os.getpid() == 1; open({str(contained)!r}, 'w')"])
        with trio.fail_after(10):
            await sink.wait_until(lambda: _count_path(sink, contained) == 1)
        nursery.cancel_scope.cancel()
    assert [a["file.path"] for a, _ in log_records(sink.batches)] == [str(contained)]


def test_a_missing_tracepoint_disables_only_the_kinds_that_need_it(tmp_path):
    """A tracefs copy without signal/signal_generate and oom/mark_victim: those kinds are off, the rest plan as usual."""
    from tapio.receivers.ebpf._config import Config
    from tapio.receivers.ebpf._loader import REQUIRED, plan

    fake = tmp_path / "tracefs"
    fields = "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n"
    for name in {t for ts in REQUIRED.values() for t in ts} | {"sched/sched_process_fork", "syscalls/sys_enter_exit_group"}:
        if name in ("signal/signal_generate", "oom/mark_victim"):
            continue
        (fake / "events" / name).mkdir(parents=True)
        (fake / "events" / name / "format").write_text(f"name: {name.split('/')[1]}\nformat:\n{fields}")
    enabled, disabled, cflags = plan(Config(), str(fake))
    assert enabled == ["process", "file", "network"]
    assert disabled == {"oom": "the kernel lacks the tracepoint oom/mark_victim", "signal": "the kernel lacks the tracepoint signal/signal_generate"}
    assert "-DKIND_OOM" not in cflags and "-DKIND_SIGNAL" not in cflags and "-DHAVE_SIGNAL_GENERATE" not in cflags
    assert {"-DKIND_EXEC", "-DKIND_OPEN", "-DKIND_TCP"} <= set(cflags)


@pytest.mark.parametrize(
    "optional,expected",
    [
        ({}, {}),  # the fallback without task-local storage: pending calls in an LRU hash
        ({"broken_for_test": "-DRINGBUF_PAGES=3"}, {"broken_for_test": "not supported here"}),  # fails to load: compiled again without
    ],
    ids=["without-optional-features", "optional-feature-fails-to-load"],
)
async def test_pending_calls_work_without_optional_kernel_features(tmp_path, monkeypatch, optional, expected):
    require(_missing())
    from tapio.receivers.ebpf import _loader
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    monkeypatch.setattr(_loader, "OPTIONAL_FEATURES", optional)
    config = Config(
        events=EventsConfig(process=False, oom=False, signal=False),
        filters=FiltersConfig(path_prefixes=[str(tmp_path) + "/"]),
        flush_interval=0.01,
    )
    sink, telemetry = RecordingConsumer(), Telemetry()
    target = tmp_path / "opened"
    async with trio.open_nursery() as nursery:
        receiver = await _run_receiver(config, sink, telemetry, nursery)
        assert {k: (v if v is True else v.split(" (")[0]) for k, v in receiver.program.features.items()} == expected
        server = textwrap.dedent(
            f"""
            import socket
            open({str(target)!r}, 'w')
            srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
            c = socket.create_connection(srv.getsockname()); a, _ = srv.accept()
            print(srv.getsockname()[1]); a.close(); c.close()
            """
        )
        done = await trio.run_process([sys.executable, "-c", server], capture_stdout=True)
        port = int(done.stdout.decode())
        with trio.fail_after(10):
            await sink.wait_until(lambda: _count_path(sink, target) == 1)
            await sink.wait_until(lambda: any(a.get("tapio.ebpf.tcp.event") == "accept" and a.get("network.local.port") == port for a, _ in log_records(sink.batches)))
        nursery.cancel_scope.cancel()
    opened = next(a for a, _ in log_records(sink.batches) if a.get("file.path") == str(target))
    assert opened["tapio.ebpf.open.flags_text"].startswith("O_WRONLY") and opened["tapio.ebpf.open.fd"] >= 3


async def test_detaching_on_shutdown_does_not_block_the_event_loop():
    """Each detach waits for the kernel (~80 ms); other components must go on draining meanwhile."""
    require(_missing())
    from tapio.receivers.ebpf._config import Config

    gaps: list[float] = []
    stopped = trio.Event()

    async def ticker() -> None:
        last = trio.current_time()
        while not stopped.is_set():
            await trio.sleep(0.01)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as outer:
        outer.start_soon(ticker)
        async with trio.open_nursery() as nursery:
            receiver = await _run_receiver(Config(), RecordingConsumer(), Telemetry(), nursery)
            gaps.clear()
            started = trio.current_time()
            nursery.cancel_scope.cancel()
        shutdown = trio.current_time() - started
        stopped.set()
    assert receiver.program is None
    # detaching all probes on the event loop stalls it ~1.4 s; 0.5 s leaves room for a GC pause in a long test run
    assert max(gaps) < 0.5, f"the event loop stalled {max(gaps):.2f}s during a {shutdown:.2f}s shutdown"


async def test_a_refused_connect_is_reported_and_never_established(live):
    probe = textwrap.dedent(
        """
        import socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()   # nothing listens there
        c = socket.socket(); c.bind(("127.0.0.1", 0)); print(c.getsockname()[1], port)
        try:
            c.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            pass
        """
    )
    done = await trio.run_process([sys.executable, "-c", probe], capture_stdout=True)
    client, server = (int(x) for x in done.stdout.split())
    a, _ = await live.wait_record(lambda a: a.get("tapio.ebpf.tcp.event") == "connect" and a.get("network.local.port") == client)
    assert a["network.peer.port"] == server
    assert a["tapio.ebpf.tcp.old_state"] == "SYN_SENT" and a["tapio.ebpf.tcp.new_state"] == "CLOSE"
    assert a["tapio.ebpf.tcp.states"] == ["SYN_SENT", "CLOSE"]


def test_tapio_run_without_root_says_what_the_ebpf_receiver_needs():
    """As an unprivileged user (nobody), `tapio run` stops at start naming the receiver and the missing privilege, without a traceback."""
    require(None if os.geteuid() == 0 else "root (to start tapio as another user)")
    import tempfile

    from tapio.testing.process import tapio_command

    with tempfile.TemporaryDirectory(prefix="tapio-nobody-") as where:
        _run_as_nobody(Path(where), tapio_command())


def _run_as_nobody(tmp_path: Path, command: list[str]) -> None:
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(
        textwrap.dedent(
            """
            receivers: {ebpf: {}}
            exporters: {debug: {}}
            service:
              pipelines: {logs: {receivers: [ebpf], exporters: [debug]}}
              telemetry: {metrics: {address: "127.0.0.1:0"}}
            """
        )
    )
    tmp_path.chmod(0o755)
    cfg.chmod(0o644)
    done = subprocess.run(
        command + ["run", "-c", str(cfg)], capture_output=True, text=True, timeout=60, user=65534, group=65534, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert done.returncode != 0
    assert "receiver ebpf failed to start" in done.stderr
    assert "needs the capabilities CAP_BPF and CAP_PERFMON" in done.stderr and "lacks CAP_BPF, CAP_PERFMON" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_kernel_headers_are_named_with_the_fix(monkeypatch):
    from tapio.receivers.ebpf import EbpfStartupError, _loader

    monkeypatch.setattr(_loader.platform, "release", lambda: "0.0.0-no-such-kernel")
    with pytest.raises(EbpfStartupError, match=r"kernel headers are missing: /lib/modules/0\.0\.0-no-such-kernel/build/include does not exist; install linux-headers"):
        _loader.check_headers()


async def test_draining_a_full_ring_buffer_does_not_stall_the_event_loop(tmp_path):
    """Tens of thousands of buffered events are handed on in chunks, with the event loop running between them.

    Checked without a clock: a task that is always runnable looks at the
    sink at every scheduling point, so it sees the chunks arrive one by one
    only if the receiver yields between them (a single drain would show
    them all at once).
    """
    require(_missing())
    from tapio.receivers.ebpf._component import DRAIN_CHUNK
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    config = Config(
        events=EventsConfig(process=False, network=False, oom=False, signal=False),
        filters=FiltersConfig(path_prefixes=[str(tmp_path) + "/"]),
        flush_interval=2.0,  # the storm lands in the ring buffer before the first drain
        ring_buffer_size=16 << 20,
    )
    opens = 10 * DRAIN_CHUNK
    seen_counts: set[int] = set()
    sink, telemetry = RecordingConsumer(), Telemetry()
    async with trio.open_nursery() as nursery:
        await _run_receiver(config, sink, telemetry, nursery)
        storm = f"import os\nfor i in range({opens}):\n    os.close(os.open({str(tmp_path / 'storm')!r}, os.O_RDONLY | os.O_CREAT))\n"
        await trio.run_process([sys.executable, "-c", storm])
        with trio.fail_after(20):
            while _count_path(sink, tmp_path / "storm") < opens:
                seen_counts.add(_count_path(sink, tmp_path / "storm"))
                await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert telemetry.value("tapio_ebpf_events_lost_total") == 0
    assert max(len(b.requests[0].resource_logs[0].scope_logs[0].log_records) for b in sink.batches if b.signal is Signal.LOGS) <= DRAIN_CHUNK
    partial = sorted(c for c in seen_counts if 0 < c < opens)
    assert len(partial) >= 5, f"the event loop ran between only {len(partial)} of the {opens // DRAIN_CHUNK} chunks: {partial}"

async def test_a_field_swap_in_the_bpf_source_stops_the_start_with_both_fields_named(monkeypatch):
    """Two u16 fields of struct tcp_event declared the other way round: same sizes, so only the offsets tell."""
    require(_missing())
    from tapio.receivers.ebpf import EbpfStartupError, _loader
    from tapio.receivers.ebpf._config import Config

    shipped = _loader.program_source()
    swapped = shipped.replace("    u16 sport;\n    u16 dport;\n    u16 owner_known;", "    u16 dport;\n    u16 sport;\n    u16 owner_known;", 1)
    assert swapped != shipped
    monkeypatch.setattr(_loader, "program_source", lambda: swapped)
    before = _tapio_prog_ids()
    with pytest.raises(EbpfStartupError, match=r"struct tcp_event: sport is at offset 72 \(2 bytes\) in the program, at 70 \(2 bytes\) here; dport is at offset 70"):
        await _loader.open_program(Config())
    assert not (_tapio_prog_ids() - before), "the refused program's attachments were closed"


HANGING_HELPER = """
import os, sys, time
sys.path.insert(0, {where!r})
import _compile
with open({pid_file!r}, "w") as f:
    f.write(str(os.getpid()))
_compile.os._exit = lambda code: time.sleep(3600)   # answers, then never exits
_compile.main(int(sys.argv[1]))
"""


async def test_a_helper_that_never_exits_after_answering_is_killed_and_the_start_goes_on(tmp_path, monkeypatch):
    """A test double of the compile helper: the real one, whose exit is replaced by a long sleep."""
    require(_missing())
    from importlib import resources

    from tapio.receivers.ebpf import _loader
    from tapio.receivers.ebpf._config import Config

    real = resources.files("tapio.receivers.ebpf").joinpath("_compile.py")
    script, pid_file = tmp_path / "hanging_helper.py", tmp_path / "helper.pid"
    script.write_text(HANGING_HELPER.format(where=str(Path(str(real)).parent), pid_file=str(pid_file)))
    monkeypatch.setattr(_loader, "helper_path", lambda: str(script))
    monkeypatch.setattr(_loader, "HELPER_EXIT_SECONDS", 0.5)
    with trio.fail_after(30):
        program = await _loader.open_program(Config())
    try:
        pid = int(pid_file.read_text())
        assert not Path(f"/proc/{pid}").exists(), "the helper was killed and reaped"
        assert len(program.counters()) == program.counter_slots, "the handed-over maps work"
    finally:
        program.close()


async def test_shutdown_is_bounded_when_detaching_hangs(monkeypatch):
    """A Program.close that never returns (a stand-in for a kernel that never finishes detaching) cannot hang shutdown."""
    require(_missing())
    from tapio.receivers.ebpf import _component
    from tapio.receivers.ebpf._config import Config

    monkeypatch.setattr(_component, "DETACH_SECONDS", 0.5)
    release = threading.Event()
    receiver = None
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                receiver = await _run_receiver(Config(), RecordingConsumer(), Telemetry(), nursery)
                program = receiver.program
                real_close = program.close
                program.close = lambda: release.wait(60)
                nursery.cancel_scope.cancel()
        assert receiver.program is None
    finally:
        release.set()
        if receiver is not None:
            real_close()
