"""The cri receiver's lifecycle tracker and records, from CRI messages alone (no runtime)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from tapio.receivers.cri._proto import api_pb2 as pb
from tapio.receivers.cri._records import RANK, Tracker, image_name_tag, implied, record

POD = "p" * 64
EVENT = {"created": pb.CONTAINER_CREATED_EVENT, "started": pb.CONTAINER_STARTED_EVENT,
         "stopped": pb.CONTAINER_STOPPED_EVENT, "deleted": pb.CONTAINER_DELETED_EVENT}
STATE = {"created": pb.CONTAINER_CREATED, "started": pb.CONTAINER_RUNNING, "stopped": pb.CONTAINER_EXITED}


def sandbox_status(pid: str = POD) -> pb.PodSandboxStatus:
    return pb.PodSandboxStatus(id=pid, metadata=pb.PodSandboxMetadata(name="web", namespace="shop", uid="u-1"), state=pb.SANDBOX_READY)


def event(cid: str, stage: str, pid: str = POD) -> pb.ContainerEventResponse:
    ev = pb.ContainerEventResponse(container_id=cid, container_event_type=EVENT[stage], created_at=1)
    if not (cid == pid and stage == "deleted"):  # a sandbox's DELETED event has no status, as containerd sends it
        ev.pod_sandbox_status.CopyFrom(sandbox_status(pid))
    return ev


def listed(cid: str, stage: str) -> pb.Container:
    return pb.Container(id=cid, pod_sandbox_id=POD, state=STATE[stage], metadata=pb.ContainerMetadata(name="app"))


def test_events_name_container_or_sandbox_and_carry_the_pod():
    t = Tracker()
    obs = t.event(event(POD, "created"))
    assert (obs.kind, obs.stage, obs.pod.name) == ("pod_sandbox", "created", "web")
    obs = t.event(event("c" * 64, "started"))
    assert (obs.kind, obs.pod.uid, obs.sandbox_id) == ("container", "u-1", POD)
    obs = t.event(event(POD, "deleted"))  # no status: known as a sandbox by its id
    assert (obs.kind, obs.stage, obs.pod.namespace) == ("pod_sandbox", "deleted", "shop")


def test_a_list_reports_what_moved_and_what_is_gone():
    t = Tracker()
    t.event(event("a", "started"))
    t.event(event("b", "started"))
    out = t.relist([pb.PodSandbox(id=POD, state=pb.SANDBOX_READY, metadata=sandbox_status().metadata)], [listed("a", "stopped"), listed("c", "created")])
    assert [(o.kind, o.id, o.stage, o.source) for o in out] == [
        ("pod_sandbox", POD, "started", "list"), ("container", "a", "stopped", "list"),
        ("container", "c", "created", "list"), ("container", "b", "deleted", "list"),
    ]
    assert t.event(event("b", "deleted")) is None  # the late event about what the list reported gone is stale
    assert t.relist([], [], silent=True) == [] and t.stages == {}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(list(EVENT)), st.booleans()), max_size=40))
def test_no_stage_is_reported_twice_or_after_a_later_one(steps):
    """Events and lists in any order: per id, the reported stages strictly rise."""
    t = Tracker()
    seen: dict[str, list[str]] = {}
    for cid, stage, as_list in steps:
        if as_list:
            out = t.relist([], [listed(cid, stage)] if stage != "deleted" else [])
        else:
            one = t.event(event(cid, stage))
            out = [one] if one else []
        for o in (i for seen_now in out for i in (*implied(seen_now), seen_now)):
            seen.setdefault(o.id, []).append(o.stage)
    for stages in seen.values():
        ranks = [RANK[s] for s in stages]
        assert ranks == sorted(set(ranks))


def test_image_names_and_tags():
    assert image_name_tag("registry:5000/team/app:1.2@sha256:ab") == ("registry:5000/team/app", "1.2")
    assert image_name_tag("registry:5000/app") == ("registry:5000/app", "")


def test_a_stopped_record_without_a_status_still_names_the_container():
    t = Tracker()
    obs = t.event(event("c" * 64, "stopped"))
    rec = record(obs, observed_unix_nano=5, runtime=("containerd", "1.7"), labels=True)
    keys = {kv.key: kv.value for kv in rec.attributes}
    assert rec.event_name == "tapio.cri.container.stopped" and keys["container.id"].string_value == "c" * 64
    assert keys["k8s.pod.name"].string_value == "web" and "tapio.cri.container.exit_code" not in keys
    assert rec.time_unix_nano == 1 and rec.observed_time_unix_nano == 5


def test_an_event_older_than_the_last_list_about_an_id_it_did_not_show_is_stale():
    t = Tracker()
    t.relist([], [listed("a", "started")], asked_at=100)
    old = event("gone", "created")
    old.created_at = 50  # queued by the runtime before we listed: the list did not show it, so it is gone
    assert t.event(old) is None
    old_known = event("a", "stopped")
    old_known.created_at = 50  # about a listed id: still news
    assert t.event(old_known).stage == "stopped"
    new = event("fresh", "created")
    new.created_at = 150
    assert t.event(new).stage == "created"


def test_a_stage_skipped_is_inferred_only_when_the_runtime_dates_it():
    t = Tracker()
    ev = event(POD, "started")
    ev.pod_sandbox_status.created_at = 40  # its created event went elsewhere; its status says when
    obs = t.event(ev)
    assert obs.skipped == ("created",)
    (created,) = implied(obs)
    assert (created.stage, created.time_unix_nano, created.inferred, created.source) == ("created", 40, True, "event")
    rec = record(created, observed_unix_nano=50, runtime=("", ""), labels=False)
    assert rec.event_name == "tapio.cri.pod_sandbox.created" and rec.time_unix_nano == 40
    assert {kv.key: kv.value.bool_value for kv in rec.attributes}["tapio.cri.inferred"] is True
    assert not [kv for kv in record(obs, observed_unix_nano=50, runtime=("", ""), labels=False).attributes if kv.key == "tapio.cri.inferred"]

    # a container seen first stopped: created and started from its status, when it has them
    stopped = event("c" * 64, "stopped")
    stopped.containers_statuses.add(id="c" * 64, created_at=10, started_at=20, finished_at=30)
    obs = t.event(stopped)
    assert [(i.stage, i.time_unix_nano) for i in implied(obs)] == [("created", 10), ("started", 20)]
    never_ran = event("d" * 64, "stopped")
    never_ran.containers_statuses.add(id="d" * 64, created_at=10)  # it failed to start: no started_at
    assert [i.stage for i in implied(t.event(never_ran))] == ["created"]
    # a list entry has no start time (the receiver asks ContainerStatus for a stopped one first); a sandbox's start is never dated
    out = t.relist([pb.PodSandbox(id="q" * 64, state=pb.SANDBOX_NOTREADY, created_at=5)],
                   [pb.Container(id="e" * 64, state=pb.CONTAINER_EXITED, created_at=7)])
    assert [[(i.kind, i.stage, i.time_unix_nano) for i in implied(o)] for o in out if o.stage != "deleted"] == [
        [("pod_sandbox", "created", 5)], [("container", "created", 7)],
    ]
    # removed before anyone saw it stop: no record dates the stop (the exit status went with the container)
    t.event(event("f" * 64, "started"))
    (gone,) = [o for o in t.relist([], []) if o.id == "f" * 64]
    assert (gone.stage, gone.skipped, implied(gone)) == ("deleted", ("stopped",), [])


def test_the_first_list_is_a_snapshot_of_the_current_stages():
    t = Tracker()
    out = t.relist([pb.PodSandbox(id=POD, state=pb.SANDBOX_READY, created_at=5)], [pb.Container(id="a", state=pb.CONTAINER_RUNNING, created_at=7)],
                   snapshot=True)
    assert [(o.stage, implied(o)) for o in out] == [("started", []), ("started", [])]
