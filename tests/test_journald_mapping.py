"""The journal field mapping and the delivery window, fuzzed (hypothesis); pure code, no journal needed."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from tapio import otlpwire as enc
from tapio.receivers.journald._mapping import SEMCONV, EntryMapper
from tapio.receivers.journald._window import NO_REWIND, DeliveryWindow

field_names = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,20}\Z").filter(lambda n: n not in ("MESSAGE", "PRIORITY"))
values = st.binary(max_size=64)
field_values = st.one_of(values, st.lists(values, min_size=2, max_size=3))


def decode(framed: bytes) -> LogRecord:
    # `item` frames a record as a length-delimited field; a request holding only it parses as one
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    request = ExportLogsServiceRequest.FromString(enc.request(b"", enc.scope("t", "1"), [framed]))
    (record,) = request.resource_logs[0].scope_logs[0].log_records
    return record


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind)


def expected(raw: bytes | list, integer: bool):
    if isinstance(raw, list):
        return [expected(r, integer) for r in raw]
    if integer and raw.lstrip(b"-").isdigit() and 0 < len(raw.lstrip(b"-")) <= 18 and raw.count(b"-") <= 1 and not raw.startswith(b"--") and (raw[:1] == b"-" or raw[:1].isdigit()):
        return int(raw)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(field_names, field_values, max_size=8),
    message=st.one_of(st.none(), values),
    priority=st.one_of(st.none(), st.sampled_from([b"0", b"3", b"6", b"7", b"9", b"x"])),
    unit_message=st.booleans(),
)
def test_every_field_survives_the_mapping(fields, message, priority, unit_message):
    entry = dict(fields)
    if message is not None:
        entry["MESSAGE"] = message
    if priority is not None:
        entry["PRIORITY"] = priority
    if unit_message:
        entry["MESSAGE_ID"] = b"d9b373ed55a64feb8242e02dbe79a49c"
        entry["UNIT"] = b"kubelet.service"
        entry["UNIT_RESULT"] = b"exit-code"
    mapper = EntryMapper(unit_state=True, units=None)
    record = decode(mapper.record(dict(entry), 1_700_000_000_000_000, 1))
    attrs = {kv.key: value(kv.value) for kv in record.attributes}
    assert record.time_unix_nano == 1_700_000_000_000_000_000
    if message is None:
        assert not record.HasField("body")
    else:
        assert value(record.body) == expected(message, False)
    if priority in (b"0", b"3", b"6", b"7"):
        assert record.severity_number > 0 and "journald.PRIORITY" not in attrs
    elif priority is not None:
        assert record.severity_number == 0 and attrs["journald.PRIORITY"] == expected(priority, False)
    if unit_message:
        assert record.event_name == "systemd.unit.failed"
        assert attrs["systemd.unit.name"] == "kubelet.service" and attrs["systemd.unit.result"] == "exit-code"
    for name, raw in fields.items():
        if unit_message and name in ("MESSAGE_ID", "UNIT", "UNIT_RESULT", "_SYSTEMD_UNIT"):
            continue
        if name in SEMCONV:
            key, integer = SEMCONV[name]
            if integer and not isinstance(raw, list) and isinstance(attrs[key], int):
                assert attrs[key] == int(raw)
            else:
                assert attrs[key] == expected(raw, False) if not integer else attrs[key] in (expected(raw, False), expected(raw, True))
        else:
            assert attrs["journald." + name] == expected(raw, False)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_window_never_commits_past_an_undelivered_batch(data):
    """Batches are reported in any order, some not delivered; `committed` only moves to a cursor all before it were delivered."""
    window = DeliveryWindow(None, clock=lambda: 0.0, retry=True, give_up_after=0.0)
    callbacks = []
    delivered: set[int] = set()
    history: list[str | None] = [None]
    n = data.draw(st.integers(1, 12))
    for i in range(n):
        callbacks.append((i, window.add(f"c{i}", 1)))
    order = data.draw(st.permutations(list(range(n))))
    failed_at = None
    for i in order:
        ok = data.draw(st.booleans())
        callbacks[i][1](ok)
        if ok:
            delivered.add(i)
        elif failed_at is None or i < failed_at:
            failed_at = i if failed_at is None or i < failed_at else failed_at
        history.append(window.committed)
        if window.committed is not None:
            upto = int(window.committed[1:])
            assert set(range(upto + 1)) <= delivered
            assert failed_at is None or upto < failed_at
    if window.rewind is not NO_REWIND:
        assert failed_at is not None
        assert window.rewind == (None if failed_at == 0 else window.rewind)
    committed = [int(c[1:]) if c else -1 for c in history]
    assert committed == sorted(committed)  # only forward


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_with_retries_off_a_failed_batch_is_skipped_and_nothing_is_read_again(data):
    """retry_on_failure off: a batch reported not delivered is counted and skipped, in any order of reports;
    the batches around it keep their reports, no rewind is asked for, and once all reported the window
    commits the last cursor. (Skipping one used to forget the batches read after it and read them again,
    sending them twice.)"""
    window = DeliveryWindow(None, clock=lambda: 0.0, retry=False)
    n = data.draw(st.integers(1, 12))
    sizes = [data.draw(st.integers(1, 5)) for _ in range(n)]
    callbacks = [window.add(f"c{i}", size) for i, size in enumerate(sizes)]
    failed = 0
    committed = [-1]
    for i in data.draw(st.permutations(list(range(n)))):
        ok = data.draw(st.booleans())
        callbacks[i](ok)
        failed += 0 if ok else sizes[i]
        assert window.rewind is NO_REWIND
        committed.append(int(window.committed[1:]) if window.committed else -1)
    assert committed == sorted(committed)
    assert window.committed == f"c{n - 1}" and window.pending == 0
    assert window.dropped == failed
