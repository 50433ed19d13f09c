"""Compile, load and attach the BPF program in a short-lived child process; hand the fds back.

Run by `_loader.open_program` as ``python _compile.py <socket fd>`` (a file
path, not ``-m``, so that only the standard library and bcc are imported
here). Keeping bcc and LLVM in this child keeps them out of the agent: they
map ~60 MB into a process that imports them and LLVM keeps ~100 MB after a
compile.

Protocol, over a SOCK_SEQPACKET unix socket (one message each way):
- request: JSON ``{"source", "cflags", "optional", "cgroup_ids", "comms",
  "describe"}``, where ``optional`` maps a kernel feature's name to the -D
  flag that uses it and ``describe`` (optional) names maps whose value type
  to report;
- answer: JSON ``{"maps": {name: index}, "links": [index...], "ring_size",
  "counter_slots", "features": {name: true | "why not"}, "layouts": {map:
  {"size": n, "members": {name: size}, "fields": {"member.field": [offset,
  size]}}}}`` with the fds in
  SCM_RIGHTS (indices into them), or ``{"error": message}`` and no fds.
  A layout is the map value's C type as compiled (bcc builds its ctypes
  description from the compiler's record layout, implicit padding included
  as ``__pad_*`` fields), nested structs and unions flattened with dots.

A request with ``"programs": {function: program type}`` (bcc's type names,
e.g. "XDP", "SCHED_CLS") and ``"maps": [name...]`` instead loads those
functions without attaching them (the agent attaches them itself, e.g. to
network interfaces) and answers ``{"programs": {function: index}, "maps":
{name: index}, "map_info": {name: {"max_entries", "key_size",
"value_size"}}}`` (see `_load_programs`).

A program that fails to load with the optional flags is compiled again
without them (an older kernel): only a program that fails without them too
is an error.

Invariants:
- The attachments live as long as their perf-event fds are open anywhere:
  once the parent holds its copies, this process may go. It leaves with
  ``os._exit`` so bcc's atexit cleanup never runs: that cleanup disables the
  perf events (PERF_EVENT_IOC_DISABLE), and a disable acts on the shared
  open file, the parent's copy included.
- If this process dies before answering, the kernel closes its fds and
  frees everything it loaded.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

#: the maps the agent needs: the ring buffer and the per-CPU loss counters
HANDED_MAPS = (b"events", b"counters")


def describe(ctype: type, base: int = 0, prefix: str = "") -> dict[str, list[int]]:
    """Every leaf field of a ctypes struct or union as ``{"a.b": [offset, size]}`` (offsets from the outermost start)."""
    import ctypes

    out: dict[str, list[int]] = {}
    for name, ftype, *_ in ctype._fields_:
        where = getattr(ctype, name)
        key = prefix + name
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            out.update(describe(ftype, base + where.offset, key + "."))
        else:
            out[key] = [base + where.offset, where.size]
    return out


def _build(request: dict) -> tuple[dict, list[int]]:
    try:
        import bcc
    except ImportError as exc:
        return {"error": f"bcc is not importable in the compile helper ({exc})"}, []
    optional = request.get("optional", {})
    features: dict[str, object] = {}
    try:
        bpf = bcc.BPF(text=request["source"].encode(), cflags=request["cflags"] + list(optional.values()))
        features = {name: True for name in optional}
    except Exception as exc:
        if not optional:
            return {"error": f"compiling or loading the BPF program failed: {exc}"}, []
        why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        features = {name: f"not supported here ({why})" for name in optional}
        try:
            bpf = bcc.BPF(text=request["source"].encode(), cflags=request["cflags"])
        except Exception as exc2:
            return {"error": f"compiling or loading the BPF program failed: {exc2}"}, []
    if request["cgroup_ids"]:
        table = bpf[b"cgroup_filter"]
        for cid in request["cgroup_ids"]:
            table[table.Key(cid)] = table.Leaf(1)
    if request["comms"]:
        table = bpf[b"comm_filter"]
        for comm in request["comms"]:
            key = table.Key()
            key.comm = comm.encode()
            table[key] = table.Leaf(1)
    fds: list[int] = []
    maps = {}
    for name in HANDED_MAPS:
        maps[name.decode()] = len(fds)
        fds.append(bpf[name].get_fd())
    links = []
    for fd in list(bpf.tracepoint_fds.values()) + list(bpf.raw_tracepoint_fds.values()):
        links.append(len(fds))
        fds.append(fd)
    import ctypes

    layouts = {}
    for name in request.get("describe", []):
        leaf = bpf[name.encode()].Leaf
        if issubclass(leaf, ctypes.Array):  # a per-CPU map's value: one element per CPU
            leaf = leaf._type_
        members = {fname: ctypes.sizeof(ftype) for fname, ftype, *_ in leaf._fields_}
        layouts[name] = {"size": ctypes.sizeof(leaf), "members": members, "fields": describe(leaf)}
    answer = {
        "maps": maps,
        "links": links,
        "ring_size": int(bpf[b"events"].max_entries),
        "counter_slots": int(bpf[b"counters"].max_entries),
        "features": features,
        "layouts": layouts,
    }
    return answer, fds


def _load_programs(request: dict) -> tuple[dict, list[int]]:
    """Compile, then load (not attach) the requested functions; hand back their fds and the named maps'."""
    try:
        import bcc
    except ImportError as exc:
        return {"error": f"bcc is not importable in the compile helper ({exc})"}, []
    try:
        bpf = bcc.BPF(text=request["source"].encode(), cflags=request["cflags"])
    except Exception as exc:
        return {"error": f"compiling the BPF program failed: {exc}"}, []
    fds: list[int] = []
    programs = {}
    for name, kind in request["programs"].items():
        try:
            fn = bpf.load_func(name.encode(), getattr(bcc.BPF, kind))
        except Exception as exc:
            return {"error": f"loading the BPF program {name} failed (the kernel's verifier refused it): {exc}"}, []
        programs[name] = len(fds)
        fds.append(fn.fd)
    maps, info = {}, {}
    for name in request["maps"]:
        table = bpf[name.encode()]
        maps[name] = len(fds)
        fds.append(table.get_fd())
        info[name] = {"max_entries": int(table.max_entries), "key_size": ctypes.sizeof(table.Key), "value_size": ctypes.sizeof(table.Leaf)}
    return {"programs": programs, "maps": maps, "map_info": info}, fds


def main(sock_fd: int) -> None:
    sock = socket.socket(fileno=sock_fd)
    request = json.loads(sock.recv(1 << 20))
    try:
        answer, fds = _load_programs(request) if "programs" in request else _build(request)
    except Exception as exc:  # a bug here must still reach the agent as a message
        answer, fds = {"error": f"the BPF compile helper failed: {type(exc).__name__}: {exc}"}, []
    if fds:
        socket.send_fds(sock, [json.dumps(answer).encode()], fds)
    else:
        sock.send(json.dumps(answer).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]))
