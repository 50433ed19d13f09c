"""The ebpf receiver's pure parts: event decoding, cgroup → container id, config, doc page."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio.receivers.ebpf import factory
from tapio.receivers.ebpf import _decode as d
from tapio.receivers.ebpf._config import Config, FiltersConfig
from tapio.receivers.ebpf._containers import Container, ContainerResolver, parse_cgroup, parse_cgroup_path, walk_cgroup_tree
from tapio.receivers.ebpf import EbpfStartupError
from tapio.receivers.ebpf._loader import PATH_FILTER_PLACEHOLDER, check_layouts, path_filter_source, program_source, splice
from tapio.units import ByteSize

CID = "0123456789abcdef" * 4
UID = "3b5f0c1e-8a2d-4f6b-9c7e-1d2e3f4a5b6c"


def header(kind: int, pid: int = 42, comm: bytes = b"curl") -> bytes:
    return struct.pack("<QQIIII16s", 123456789, 7, kind, pid, pid + 1, 1000, comm)


def test_sizes_match_the_c_structs():
    # struct sizes from tapio/bpf/ebpf_receiver.bpf.c (natural alignment on x86-64/arm64)
    assert d.SIZES == {d.EV_EXEC: 1352, d.EV_EXIT: 72, d.EV_OPEN: 328, d.EV_TCP: 128, d.EV_OOM: 104, d.EV_SIGNAL: 88}


def test_exec_event_with_argv_and_truncation():
    argv = b"ls\0-l\0/tmp\0"
    raw = header(d.EV_EXEC) + struct.pack("<IIIIII256s1024s", 1, 42, len(argv), 3, 0, 0, b"/bin/ls", argv)
    ev = d.parse_event(raw)
    assert isinstance(ev, d.ExecEvent)
    assert (ev.h.pid, ev.h.tid, ev.h.comm, ev.h.cgroup_id) == (42, 43, "curl", 7)
    assert ev.filename == "/bin/ls" and ev.argv == ["ls", "-l", "/tmp"] and ev.ppid == 1
    cut = header(d.EV_EXEC) + struct.pack("<IIIIII256s1024s", 1, 42, 1024, 2, 1, 0, b"/bin/x", b"a" * 1024)
    ev = d.parse_event(cut)
    assert ev.args_truncated and ev.argv == ["a" * 1024]


def test_open_exit_signal_oom_events():
    ev = d.parse_event(header(d.EV_OPEN) + struct.pack("<qiIiI256s", -2, 0o1101, 0o644, -100, 0, b"/etc/x\0junk"))
    assert isinstance(ev, d.OpenEvent) and ev.path == "/etc/x" and ev.ret == -2
    assert d.open_flags_text(ev.flags) == "O_WRONLY|O_CREAT|O_TRUNC"
    ev = d.parse_event(header(d.EV_EXIT) + struct.pack("<QIiiI", 5, 1, -1, 9, 0))
    assert isinstance(ev, d.ExitEvent) and ev.exit_signal == 9 and ev.exit_code == -1
    ev = d.parse_event(header(d.EV_SIGNAL) + struct.pack("<iiiIiI16s", 10, 0, 0, 77, 1, 0, b"sleep"))
    assert isinstance(ev, d.SignalEvent) and (ev.sig, ev.target_pid, ev.target_comm) == (10, 77, "sleep")
    ev = d.parse_event(header(d.EV_OOM) + struct.pack("<QQQQQQIi", 1, 2, 3, 4, 5, 6, 0, -1000))
    assert isinstance(ev, d.OomEvent) and ev.anon_rss_kb == 3 and ev.oom_score_adj == -1000


@pytest.mark.parametrize(
    "family,raw,text",
    [
        (d.AF_INET, bytes([127, 0, 0, 1]) + bytes(12), "127.0.0.1"),
        (d.AF_INET6, bytes(15) + b"\1", "::1"),
        (d.AF_INET6, bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]), "::ffff:10.0.0.1"),
        (d.AF_INET6, bytes.fromhex("20010db8000000000001000000000001"), "2001:db8::1:0:0:1"),
    ],
)
def test_tcp_event_addresses(family, raw, text):
    body = struct.pack("<QQIHHHHiiIq16s16s", 0xFFFF1, 10, d.TCP_CLOSE, family, 80, 5555, 1, 9, 7, 0b10000010, -1, raw, raw)
    ev = d.parse_event(header(d.EV_TCP) + body)
    assert isinstance(ev, d.TcpEvent) and ev.saddr == text and ev.daddr == text
    assert d.states_list(ev.states_seen) == ["ESTABLISHED", "CLOSE"]


@given(st.binary(min_size=16, max_size=16))
def test_ipv6_formatting_matches_ipaddress(raw):
    want = ipaddress.IPv6Address(raw)
    got = d.format_address(d.AF_INET6, raw)
    assert ipaddress.IPv6Address(got) == want
    if want.ipv4_mapped is None:
        assert got == want.compressed


@given(st.binary(max_size=1500))
@settings(max_examples=300)
def test_any_bytes_decode_or_raise_decode_error(data):
    try:
        d.parse_event(data)
    except d.DecodeError:
        pass


@given(st.sampled_from(sorted(d.SIZES)), st.data())
@settings(max_examples=300)
def test_any_event_of_the_right_size_decodes_and_truncations_fail(kind, data):
    body = data.draw(st.binary(min_size=d.SIZES[kind] - 48, max_size=d.SIZES[kind] - 48))
    raw = header(kind) + body
    try:
        d.parse_event(raw)
    except d.DecodeError as exc:
        assert kind == d.EV_TCP and "tcp event" in str(exc)  # only an unknown tcp sub-event is refused
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(d.DecodeError):
        d.parse_event(raw[:cut])
    with pytest.raises(d.DecodeError):
        d.parse_event(raw + b"\0")


# ---------------------------------------------------------------- containers


@pytest.mark.parametrize(
    "path,runtime,pod",
    [
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope", "containerd", UID),
        (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope", "cri-o", UID),
        (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope", "docker", UID),
        (f"/kubepods/burstable/pod{UID}/{CID}", "", UID),
        (f"/kubepods/pod{UID}/{CID}", "", UID),
        (f"/docker/{CID}", "docker", ""),
        (f"/system.slice/docker-{CID}.scope", "docker", ""),
        (f"/k8s.io/{CID}", "containerd", ""),
        (f"/system.slice/containerd.service/kubepods-burstable-pod{UID.replace('-', '_')}.slice:cri-containerd:{CID}", None, None),
    ],
)
def test_parse_cgroup_path_layouts(path, runtime, pod):
    found = parse_cgroup_path(path)
    if runtime is None:
        assert found is None or found.id == CID
        return
    assert found is not None and found.id == CID and found.runtime == runtime and found.pod_uid == pod


def test_parse_cgroup_text_prefers_v2_and_reads_v1_lines():
    v1 = f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpu:/kubepods/burstable/pod{UID}/{CID}\n0::/\n"
    assert parse_cgroup(v1).id == CID
    host = "0::/init.scope\n1:name=systemd:/user.slice/user-0.slice/session-1.scope\n"
    assert parse_cgroup(host) is None
    assert parse_cgroup(f"0::/kubepods/besteffort/pod{UID}/{CID[:-1]}\n") is None  # 63 hex digits


@given(st.text(max_size=400))
def test_parse_cgroup_never_invents_an_id(text):
    found = parse_cgroup(text)
    if found is not None:
        assert re.fullmatch(r"[0-9a-f]{64}", found.id) and found.id in text


def test_resolver_caches_past_exit_and_counts_reasons(tmp_path):
    proc = tmp_path / "proc"
    (proc / "10").mkdir(parents=True)
    (proc / "10" / "cgroup").write_text(f"0::/kubepods/burstable/pod{UID}/{CID}\n")
    (proc / "11").mkdir()
    (proc / "11" / "cgroup").write_text("0::/init.scope\n")
    r = ContainerResolver(proc_root=str(proc), max_entries=4, root_cgroup_id=1)
    found, reason = r.resolve(10, 5000)
    assert found.id == CID and reason == ""
    (proc / "10" / "cgroup").unlink()
    (proc / "10").rmdir()
    assert r.resolve(10, 5000)[0].id == CID, "known after the process is gone"
    r.forget_pid(10, 5000)
    assert r.resolve(12, 5000)[0].id == CID, "another process in the same cgroup"
    assert r.resolve(11, 1) == (None, "host")
    assert r.resolve(99, 1) == (None, "process_gone")
    assert r.resolve(0, 1) == (None, "no_pid")


def test_resolver_finds_a_gone_process_by_walking_the_cgroup_tree(tmp_path):
    root = tmp_path / "cgroup2"
    leaf = root / "kubepods.slice" / f"kubepods-pod{UID.replace('-', '_')}.slice" / f"cri-containerd-{CID}.scope"
    leaf.mkdir(parents=True)
    (root / "system.slice").mkdir()
    r = ContainerResolver(proc_root=str(tmp_path / "noproc"), root_cgroup_id=1, cgroup2_root=str(root))
    cgroup = leaf.stat().st_ino
    assert r.resolve(1234, cgroup) == (None, "process_gone"), "resolve itself never walks"
    assert r.wants_walk(cgroup) and not r.wants_walk(1), "the root cgroup says nothing about a container"
    tree = walk_cgroup_tree(str(root))
    assert tree == {cgroup: Container(CID, "containerd", UID)}
    miss = (root / "system.slice").stat().st_ino
    r.learn_walk(tree, {cgroup, miss})
    assert r.by_cgroup(cgroup).pod_uid == UID
    assert r.resolve(1235, cgroup) == (Container(CID, "containerd", UID), ""), "known by its cgroup from now on"
    assert not r.wants_walk(cgroup) and not r.wants_walk(miss), "a cgroup id a walk did not find is not walked for again"
    assert r.resolve(1236, miss) == (None, "process_gone")


def test_resolver_is_bounded(tmp_path):
    proc = tmp_path / "proc"
    for pid in range(1, 20):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text("0::/\n")
    r = ContainerResolver(proc_root=str(proc), max_entries=5)
    for pid in range(1, 20):
        r.resolve(pid, 1)
    assert len(r._by_pid) == 5


# ---------------------------------------------------------------- config, factory, docs


def test_default_config_is_valid_and_factory_record():
    assert Config().validate() == []
    assert factory.type == "ebpf" and factory.kind.value == "receiver"
    assert factory.summary(Config()) == "process, file, network, oom, signal; ring buffer 4096 KiB"


def test_validate_reports_every_problem_with_its_key():
    cfg = Config(
        ring_buffer_size=ByteSize(5000),
        rate_limit_per_cgroup=-1,
        max_tracked=1,
        filters=FiltersConfig(comms=["a" * 16, ""], path_prefixes=["x" * 200], cgroups=["relative"]),
    )
    problems = cfg.validate()
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == sorted(
        [
            "ring_buffer_size",
            "rate_limit_per_cgroup",
            "max_tracked",
            "filters.comms[0]",
            "filters.comms[1]",
            "filters.path_prefixes[0]",
            "filters.cgroups[0]",
        ]
    )


def test_path_filter_source_is_straight_line_c():
    src = path_filter_source(["/tmp/"], ["/tmp/x"])
    assert "p[0] == 47 && p[1] == 116" in src and "for" not in src
    assert "if (!(1)) return 0;" in path_filter_source([], [])


def _yaml_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[]" if not value else str(value)
    if isinstance(value, ByteSize):
        return f"{int(value) // (1024 * 1024)}MiB" if int(value) % (1024 * 1024) == 0 else f"{int(value) // 1024}KiB"
    return str(value)


def _flatten(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _yaml_default(value)


def test_doc_page_lists_exactly_the_config_fields_with_their_defaults():
    page = Path(__file__).parent.parent / "docs" / "components" / "ebpf.md"
    section = page.read_text().split("## Configuration", 1)[1].split("## Example", 1)[0]
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", section, flags=re.M)
    assert dict(rows) == dict(_flatten(Config()))


# ---------------------------------------------------------------- layout check, source splice


def _reported(layouts=d.UNION_MEMBERS) -> dict:
    """A layout report as the compile helper sends it, built from our own layouts."""
    fields = {f"{m}.{name}": list(at) for m, layout in layouts.items() for name, at in layout.offsets.items()}
    return {"size": max(x.size for x in layouts.values()), "members": {m: x.size for m, x in layouts.items()}, "fields": fields}


def test_layouts_agree_with_themselves_and_ignore_implicit_padding():
    report = _reported()
    report["fields"]["tcp.__pad_0"] = [126, 2]
    assert d.layout_problems(report) == []


def test_a_swap_of_two_same_size_fields_is_reported_by_name():
    report = _reported()
    # the C struct declares dport before sport: same total size, same field sizes
    report["fields"]["tcp.sport"], report["fields"]["tcp.dport"] = report["fields"]["tcp.dport"], report["fields"]["tcp.sport"]
    (problem,) = d.layout_problems(report)
    assert problem == (
        "struct tcp_event: sport is at offset 72 (2 bytes) in the program, at 70 (2 bytes) here; "
        "dport is at offset 70 (2 bytes) in the program, at 72 (2 bytes) here"
    )


def test_missing_extra_and_resized_fields_and_members_are_reported():
    report = _reported()
    del report["fields"]["exit.ppid"]
    report["fields"]["open.extra"] = [328, 4]
    report["members"]["oom"] = 112
    del report["members"]["sig"]
    problems = d.layout_problems(report)
    assert len(problems) == 4
    assert "struct exit_event: ppid is missing from the program" in problems
    assert "struct open_event: extra (offset 328) is in the program but not read here" in problems
    assert "struct oom_event: 112 bytes in the program, 104 here" in problems
    assert "struct signal_event: the program's union has no member sig" in problems


def test_the_loader_refuses_a_program_whose_layout_differs():
    report = _reported()
    report["fields"]["exec.argc"], report["fields"]["exec.argv_len"] = report["fields"]["exec.argv_len"], report["fields"]["exec.argc"]
    with pytest.raises(EbpfStartupError, match=r"differ from what tapio/receivers/ebpf/_decode.py reads .*struct exec_event: argv_len is at offset 60"):
        check_layouts({"layouts": {"scratch": report}})
    with pytest.raises(EbpfStartupError, match="did not report the layout"):
        check_layouts({})


def test_the_path_filter_replaces_its_placeholder_line_exactly_once():
    source = program_source()
    assert [line.strip() for line in source.splitlines()].count(PATH_FILTER_PLACEHOLDER) == 1
    spliced = splice(source, PATH_FILTER_PLACEHOLDER, path_filter_source(["/tmp/"], []))
    assert PATH_FILTER_PLACEHOLDER not in [line.strip() for line in spliced.splitlines()]
    assert "static __always_inline int path_allowed" in spliced
    assert spliced.index("path_allowed(const char *p) {") < spliced.index("if (!path_allowed(e->path))")
    with pytest.raises(ValueError, match="exactly once, found 0"):
        splice("int x;\n// @PATH_FILTER@ in a comment\n", PATH_FILTER_PLACEHOLDER, "")
    with pytest.raises(ValueError, match="exactly once, found 2"):
        splice("@PATH_FILTER@\n@PATH_FILTER@\n", PATH_FILTER_PLACEHOLDER, "")
