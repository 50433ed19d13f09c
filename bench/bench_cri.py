"""cri receiver benchmark against a real containerd 1.7, with a bare grpcio event reader as the peer, same run.

Run: ``.venv/bin/python bench/bench_cri.py [PODS]`` (default 110, the
kubelet's default pod limit; root, after scripts/setup.sh). It starts a
containerd (tapio.testing.containerd), runs the cri receiver and, beside it,
drives PODS pods through their whole life over CRI (sandbox and one
container each: created, started, stopped, deleted) twice: first followed by
a plain grpcio reader of GetContainerEvents alone (what any CRI client must
at least do), then by the cri receiver alone (containerd 1.7 gives each event
to one subscriber only, so the two cannot listen at once). containerd is
restarted between the passes: containerd 1.7 goes on waiting on its event
queue for a stream its client cancelled and takes the next event for it, so
without the restart the reader's stream would take the first event of the
receiver's pass (the receiver then reports that stage inferred, see
docs/components/cri.md). Reported:

- ``bare_events_per_s``: the events the bare reader saw per second of the
  first pass, the rate containerd produces them at;
- ``receiver_records_per_s`` and ``lag_ms``: the records the receiver
  reported in the second pass (each stage once, stopped containers with
  their ContainerStatus) per second, and how long after the driving ended
  its last record came: whether it keeps up with the runtime;
  ``receiver_events``: the events it received (all of them: as many as the
  bare reader saw); ``receiver_missing``: stages of the driven pods (each
  sandbox and container, created to deleted) with no record 120 s after the
  driving ended (then ``lag_ms`` is that wait, not a lag), the first few in
  ``missing_examples``; ``receiver_duplicates``: stages reported twice;
  ``records_from_lists`` and ``records_inferred``: how many stages a list
  or an inference had to supply;
- ``replay``: the events recorded in the run, each with its own ids, pushed
  through the receiver's tracker and record building alone, in events per
  CPU second, against the bare cost of parsing the same messages from bytes.

Prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.decode import decode_dataclass
from tapio.receivers.cri import factory
from tapio.receivers.cri._proto import api_pb2 as pb
from tapio.receivers.cri._proto import api_pb2_grpc as pb_grpc
from tapio.receivers.cri._records import STAGES, Tracker, implied, record
from tapio.telemetry import Telemetry
from tapio.testing.containerd import Containerd
from tapio.testing.sink import RecordingConsumer

MISSING_EXAMPLES = 5
REPLAY_EVENTS = 20_000


class BareReader:
    """The peer: GetContainerEvents read in a thread with grpcio, nothing else done."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.call = pb_grpc.RuntimeServiceStub(self.channel).GetContainerEvents(pb.GetEventsRequest())
        self.events: list[tuple[float, bytes]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for ev in self.call:
                self.events.append((time.monotonic(), ev.SerializeToString()))
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)
        self.channel.close()


def drive(containerd: Containerd, pods: int) -> tuple[float, set[tuple[str, str, str]]]:
    """Every pod through its life, two at a time: the wall time taken and every (kind, id, stage) that happened."""

    def one(i: int) -> list[tuple[str, str, str]]:
        with containerd.client() as cri:
            pod = cri.run_pod(f"bench-{i}", "bench")
            cid = cri.run_container(pod, "app", "exit 0")
            cri.wait_exited(cid)
            cri.stop_pod(pod)
            cri.remove_pod(pod)
        return [(kind, id_, stage) for kind, id_ in (("pod_sandbox", pod.id), ("container", cid)) for stage in STAGES]

    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        happened = {s for stages in pool.map(one, range(pods)) for s in stages}
    return time.monotonic() - t0, happened


def reported(sink: RecordingConsumer) -> list[tuple[str, str, str]]:
    """(kind, id, stage) of every record the receiver handed on."""
    out = []
    for req in sink.requests():
        for rl in req.resource_logs:
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    _, _, kind, stage = rec.event_name.split(".")
                    key = "container.id" if kind == "container" else "tapio.cri.pod_sandbox.id"
                    id_ = next(kv.value.string_value for kv in rec.attributes if kv.key == key)
                    out.append((kind, id_, stage))
    return out


def replay(raw_events: list[bytes]) -> dict:
    events = [pb.ContainerEventResponse.FromString(b) for b in raw_events]
    copies = []
    for i in range(REPLAY_EVENTS):
        ev = pb.ContainerEventResponse()
        ev.CopyFrom(events[i % len(events)])
        suffix = f"{i // len(events):08x}"
        if ev.pod_sandbox_status.id == ev.container_id:
            ev.pod_sandbox_status.id = ev.container_id = ev.container_id[:-8] + suffix
        else:
            ev.container_id = ev.container_id[:-8] + suffix
            if ev.pod_sandbox_status.id:
                ev.pod_sandbox_status.id = ev.pod_sandbox_status.id[:-8] + suffix
        copies.append(ev)
    data = [e.SerializeToString() for e in copies]
    t0 = time.process_time()
    for b in data:
        pb.ContainerEventResponse.FromString(b)
    parse = time.process_time() - t0
    tracker = Tracker()
    t0 = time.process_time()
    n = 0
    for b in data:
        obs = tracker.event(pb.ContainerEventResponse.FromString(b))
        if obs is not None:
            for o in (*implied(obs), obs):
                record(o, observed_unix_nano=1, runtime=("containerd", "1.7"), labels=True)
                n += 1
    ours = time.process_time() - t0
    return {
        "events": len(data),
        "records": n,
        "receiver_events_per_cpu_s": round(len(data) / ours),
        "protobuf_parse_events_per_cpu_s": round(len(data) / parse),
        "cost_vs_parse": round(ours / parse, 1),
    }


async def main(pods: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tapio-bench-cri-") as base, Containerd(Path(base)) as containerd:
        bare = BareReader(containerd.endpoint)
        t0 = time.monotonic()
        bare_drive, happened = await trio.to_thread.run_sync(drive, containerd, pods)
        with trio.fail_after(60):
            while len(bare.events) < len(happened):
                await trio.sleep(0.01)
        bare_span = bare.events[-1][0] - t0
        bare.close()
        # the reader's cancelled stream would take the next event (containerd 1.7): a new containerd process has none
        await trio.to_thread.run_sync(containerd.kill)
        await trio.to_thread.run_sync(containerd.start)

        telemetry = Telemetry()
        settings = Settings(id=ComponentID("cri"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "cri"),
                            logger=logging.getLogger("bench.cri"))
        sink = RecordingConsumer(ack=True)
        config = decode_dataclass(factory.config_class, {"endpoint": containerd.endpoint, "report_existing": False})
        receiver = factory.create(settings, config, Ports(output=sink))
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            await receiver.listed.wait()
            t0 = time.monotonic()
            receiver_drive, happened = await trio.to_thread.run_sync(drive, containerd, pods)
            driven = time.monotonic()
            with trio.move_on_after(120):  # a shortfall is reported (receiver_missing), not raised
                await sink.wait_until(lambda: happened <= set(reported(sink)))
            receiver_done = time.monotonic()
            nursery.cancel_scope.cancel()
    got = reported(sink)
    missing = sorted(happened - set(got), key=lambda s: (s[1], STAGES.index(s[2])))
    return {
        "bench": "cri",
        "pods": pods,
        "python": sys.version.split()[0],
        "bare_events": len(bare.events),
        "bare_events_per_s": round(len(bare.events) / bare_span, 1),
        "bare_drive_s": round(bare_drive, 2),
        "receiver_records": sink.item_count,
        "receiver_events": int(telemetry.value("tapio_cri_events_total")),
        "receiver_missing": len(missing),
        "missing_examples": [f"{kind} {id_[:12]} {stage}" for kind, id_, stage in missing[:MISSING_EXAMPLES]],
        "receiver_duplicates": len(got) - len(set(got)),
        "receiver_records_per_s": round(sink.item_count / (receiver_done - t0), 1),
        "receiver_drive_s": round(receiver_drive, 2),
        "lag_ms": round((receiver_done - driven) * 1e3, 1),
        "records_from_lists": int(telemetry.value("tapio_cri_records_total", source="list")),
        "records_inferred": int(telemetry.value("tapio_cri_inferred_records_total")),
        "replay": replay([b for _, b in bare.events]),
    }


if __name__ == "__main__":
    print(json.dumps(trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 110)), flush=True)
