"""tapio.httpserver against real TCP clients: httpx for well-formed HTTP, raw trio sockets for the rest."""

from __future__ import annotations

import logging

import h11
import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings, strategies as st

from tapio.httpserver import Limits, Request, Response, serve_http

LIMIT = 1024


class Recorder:
    """A handler that echoes the body and remembers every request and bad-request reason."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.bad: list[str] = []

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        if request.path == "/fail":
            raise RuntimeError("handler bug")
        return Response(200, [("content-type", "application/octet-stream")], request.body)


async def start(nursery: trio.Nursery, handler=None, **kwargs) -> tuple[int, Recorder]:
    rec = Recorder()
    kwargs.setdefault("max_body_bytes", LIMIT)
    port = await nursery.start(
        lambda task_status: serve_http(
            handler or rec, "127.0.0.1", 0, on_bad_request=rec.bad.append, logger=logging.getLogger("test"),
            task_status=task_status, **kwargs,
        )
    )
    return port, rec


async def raw_exchange(port: int, data: bytes, *, eof: bool = True) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(data)
                if eof:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass
            out = bytearray()
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                out += chunk
            return bytes(out)


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split a byte stream from the server into (status, headers, body) with an h11 client."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")
    out = []
    while True:
        # h11 needs a request on its side to parse each response
        if client.our_state is h11.IDLE:
            if not client.trailing_data[0]:
                return out
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        event = client.next_event()
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, (h11.ConnectionClosed,)) or event is h11.NEED_DATA:
            return out
        assert isinstance(event, h11.Response), event
        status, headers = event.status_code, dict(event.headers)
        body = b""
        while True:
            e = client.next_event()
            if isinstance(e, h11.Data):
                body += e.data
            elif isinstance(e, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {e!r}")
        out.append((status, headers, body))
        if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
            return out
        client.start_next_cycle()


async def test_keep_alive_reuses_one_connection(nursery):
    port, rec = await start(nursery)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r1 = await client.post("/a?x=1&x=2&y=", content=b"hello")
        r2 = await client.post("/b%20c", content=b"world")
    assert (r1.status_code, r1.content) == (200, b"hello")
    assert (r2.status_code, r2.content) == (200, b"world")
    assert [r.client for r in rec.requests][0] == rec.requests[1].client
    assert rec.requests[0].query == {"x": ["1", "2"], "y": [""]}
    assert rec.requests[0].method == "POST"
    assert rec.requests[1].path == "/b c"
    assert rec.requests[1].target == "/b%20c"
    assert rec.requests[0].header("content-length") == "5"
    assert all(name == name.lower() for name, _ in rec.requests[0].headers)


async def test_chunked_upload(nursery):
    port, rec = await start(nursery)

    async def parts():
        for i in range(10):
            yield bytes([65 + i]) * 50

    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}/up", content=parts())
    assert r.status_code == 200
    assert rec.requests[0].header("transfer-encoding") == "chunked"
    assert rec.requests[0].body == b"".join(bytes([65 + i]) * 50 for i in range(10))


async def test_oversize_content_length_is_refused_unread(nursery):
    port, rec = await start(nursery)
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}/big", content=b"x" * (LIMIT + 1))
        assert r.status_code == 413
        assert r.headers["connection"] == "close"
        ok = await client.post(f"http://127.0.0.1:{port}/small", content=b"x" * LIMIT)
        assert ok.status_code == 200
    assert rec.bad == ["body_too_large"]
    assert [r.path for r in rec.requests] == ["/small"]


async def test_oversize_announced_body_is_never_waited_for(nursery):
    # the client announces 100 MB and sends none of it: the answer comes anyway
    port, rec = await start(nursery)
    out = await raw_exchange(port, b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 100000000\r\n\r\n", eof=False)
    assert parse_responses(out)[0][0] == 413


async def test_oversize_chunked_body_is_refused(nursery):
    port, rec = await start(nursery)

    async def parts():
        for _ in range(5):
            yield b"y" * (LIMIT // 2)

    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}/big", content=parts())
    assert r.status_code == 413
    assert rec.bad == ["body_too_large"]
    assert rec.requests == []


async def test_malformed_request_gets_400_and_server_keeps_serving(nursery):
    port, rec = await start(nursery)
    out = await raw_exchange(port, b"THIS IS NOT HTTP\r\n\r\n")
    responses = parse_responses(out)
    assert [s for s, _, _ in responses] == [400]
    assert rec.bad == ["malformed"]
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"http://127.0.0.1:{port}/", content=b"ok")).status_code == 200


@pytest.mark.parametrize(
    "cut",
    [b"POST /v1/logs HTTP/1.1\r\nhost: a\r\n", b"POST /v1/logs HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc"],
    ids=["in-the-head", "in-the-body"],
)
async def test_a_request_the_client_cuts_short_by_closing_is_counted_as_closed_not_malformed(nursery, cut):
    port, rec = await start(nursery)
    assert await raw_exchange(port, cut) == b""  # nobody left to answer
    async with httpx.AsyncClient() as client:  # and the server keeps serving
        assert (await client.post(f"http://127.0.0.1:{port}/", content=b"ok")).status_code == 200
    assert rec.bad == ["closed"]


async def test_bad_chunk_framing_gets_400(nursery):
    port, rec = await start(nursery)
    out = await raw_exchange(port, b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
    assert [s for s, _, _ in parse_responses(out)] == [400]
    assert rec.bad == ["malformed"]


async def test_expect_100_continue(nursery):
    port, rec = await start(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"POST /c HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
            interim = await stream.receive_some(1024)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"body")
            await stream.send_eof()
            out = interim
            while chunk := await stream.receive_some(1024):
                out += chunk
    assert [(s, b) for s, _, b in parse_responses(out)] == [(200, b"body")]


async def test_handler_failure_is_500_and_not_fatal(nursery, caplog):
    port, rec = await start(nursery)
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"http://127.0.0.1:{port}/fail")).status_code == 500
        assert (await client.post(f"http://127.0.0.1:{port}/fine")).status_code == 200
    assert "handler failed" in caplog.text


async def open_slow(port: int, data: bytes = b"") -> trio.SocketStream:
    """A connection that sends ``data`` (part of a request, or nothing) and then nothing more."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if data:
        await stream.send_all(data)
    return stream


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    with trio.fail_after(120):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


async def wait_until(predicate) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.001)


HEAD = b"POST /slow HTTP/1.1\r\nhost: a\r\n"


async def test_stalled_request_head_times_out_with_408(nursery, autojump_clock):
    port, rec = await start(nursery, limits=Limits(read_header_timeout=5, idle_timeout=60))
    began = trio.current_time()
    async with await open_slow(port, HEAD) as stream:
        out = await read_until_closed(stream)
    assert [s for s, _, _ in parse_responses(out)] == [408]
    assert 5 <= trio.current_time() - began < 6  # the head timeout, not the idle one
    assert rec.bad == ["timeout"]


async def test_a_connection_that_sends_nothing_is_cut_at_the_head_timeout(nursery, autojump_clock):
    port, rec = await start(nursery, limits=Limits(read_header_timeout=5, idle_timeout=60))
    began = trio.current_time()
    async with await open_slow(port) as stream:
        assert await read_until_closed(stream) == b""  # nothing was asked: nothing is answered
    assert 5 <= trio.current_time() - began < 6
    assert rec.bad == ["timeout"]


async def test_keep_alive_waits_idle_timeout_then_a_new_head_gets_the_head_timeout(nursery, autojump_clock):
    port, rec = await start(nursery, limits=Limits(read_header_timeout=5, idle_timeout=60))
    async with await open_slow(port, b"POST /a HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi") as stream:
        first = b""
        with trio.fail_after(1):
            while not first.endswith(b"hi"):  # the echoed body ends the response
                first += await stream.receive_some(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        await trio.sleep(50)  # idle between requests, within idle_timeout: kept open
        began = trio.current_time()
        await stream.send_all(HEAD)
        out = await read_until_closed(stream)
    assert [s for s, _, _ in parse_responses(out)] == [408]
    assert 5 <= trio.current_time() - began < 6
    assert rec.bad == ["timeout"]
    async with await open_slow(port, b"GET /b HTTP/1.1\r\nhost: a\r\n\r\n") as idle:
        began = trio.current_time()
        out = await read_until_closed(idle)
    assert [s for s, _, _ in parse_responses(out)] == [200]
    assert 60 <= trio.current_time() - began < 61  # closed after idle_timeout, silently
    assert rec.bad == ["timeout"]


async def send_body_slowly(stream: trio.SocketStream, size: int, chunk: int, every: float) -> None:
    await stream.send_all(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % size)
    sent = 0
    try:
        while sent < size:
            await trio.sleep(every)
            await stream.send_all(b"x" * min(chunk, size - sent))
            sent += chunk
    except trio.BrokenResourceError:
        pass  # cut by the server


async def test_a_trickling_body_is_cut_with_408(nursery, autojump_clock):
    port, rec = await start(nursery, max_body_bytes=100_000, limits=Limits(read_body_timeout=10, min_body_rate=64 * 1024))
    async with await open_slow(port) as stream:
        began = trio.current_time()
        nursery.start_soon(send_body_slowly, stream, 100_000, 1, 1.0)
        out = await read_until_closed(stream)
    assert [s for s, _, _ in parse_responses(out)] == [408]
    assert 10 <= trio.current_time() - began < 11  # ~10 bytes earned no noticeable extension
    assert rec.bad == ["timeout"] and rec.requests == []


@pytest.mark.parametrize(("every", "served"), [(0.9, True), (1.5, False)])
async def test_a_body_must_keep_up_with_the_minimum_rate(nursery, autojump_clock, every, served):
    # 1000 bytes/s earn a second each: at 1000 bytes every 0.9 s the 20 s upload goes on; every 1.5 s it falls behind
    port, rec = await start(nursery, max_body_bytes=100_000, limits=Limits(read_body_timeout=2, min_body_rate=1000))
    async with await open_slow(port) as stream:
        began = trio.current_time()
        nursery.start_soon(send_body_slowly, stream, 20_000, 1000, every)
        if served:
            with trio.fail_after(60):
                while not rec.requests:
                    await trio.sleep(0.1)
            assert len(rec.requests[0].body) == 20_000 and rec.bad == []
            assert trio.current_time() - began >= 18  # far longer than read_body_timeout
        else:
            out = await read_until_closed(stream)
            assert [s for s, _, _ in parse_responses(out)] == [408] and rec.bad == ["timeout"]


async def test_at_the_limit_the_oldest_connection_without_a_head_is_closed_for_a_new_client(nursery):
    port, rec = await start(nursery, limits=Limits(max_connections=3))
    oldest = await open_slow(port, HEAD)
    middle = await open_slow(port)
    newest = await open_slow(port, b"POST /slow HTTP/1.1\r\n")
    async with oldest, middle, newest:
        await trio.testing.wait_all_tasks_blocked()
        async with httpx.AsyncClient() as client:
            with trio.fail_after(5):
                r = await client.post(f"http://127.0.0.1:{port}/fine", content=b"ok")
        assert r.status_code == 200
        out = await read_until_closed(oldest)
        assert [(s, h.get(b"retry-after")) for s, h, _ in parse_responses(out)] == [(503, b"1")]
        assert rec.bad == ["shed"]
        # the others are still open: no answer, no end of stream
        for stream in (middle, newest):
            with trio.move_on_after(0.2) as still_open:
                await stream.receive_some(1)
            assert still_open.cancelled_caught


async def test_connections_that_never_sent_a_head_go_before_idle_keep_alive_ones(nursery):
    port, rec = await start(nursery, limits=Limits(max_connections=2))
    keep_alive = await open_slow(port, b"GET /ka HTTP/1.1\r\nhost: a\r\n\r\n")
    with trio.fail_after(5):
        assert (await keep_alive.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
    silent = await open_slow(port)
    async with keep_alive, silent:
        await trio.testing.wait_all_tasks_blocked()
        async with httpx.AsyncClient() as client:
            with trio.fail_after(5):
                assert (await client.get(f"http://127.0.0.1:{port}/one")).status_code == 200
            assert await read_until_closed(silent) == b""  # closed: it had sent nothing, so it hears nothing
            assert rec.bad == ["shed"]
            # now only the idle keep-alive connection (and the client's own) are left: the next newcomer closes the idle one
            async with httpx.AsyncClient() as other:
                with trio.fail_after(5):
                    assert (await other.get(f"http://127.0.0.1:{port}/two")).status_code == 200
        assert await read_until_closed(keep_alive) == b""
    assert rec.bad == ["shed"]  # closing an idle keep-alive connection is not a bad request


async def test_connections_busy_with_a_request_are_not_closed_to_make_room(nursery):
    port, rec = await start(nursery, limits=Limits(max_connections=1))
    busy = await open_slow(port, b"POST /first HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nab")
    second = await trio.open_tcp_stream("127.0.0.1", port)
    async with busy, second:
        await second.send_all(b"POST /second HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        assert rec.requests == []  # the second waits in the backlog while the first sends its body
        await busy.send_all(b"cd")
        with trio.fail_after(10):
            assert (await busy.receive_some(1024)).startswith(b"HTTP/1.1 200 ")
            await busy.aclose()
            data = await second.receive_some(1024)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert [r.path for r in rec.requests] == ["/first", "/second"]
    assert rec.bad == []


async def test_cancellation_answers_in_flight_requests_with_503():
    entered = trio.Event()

    async def stuck(request: Request) -> Response:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    results = []
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def server(task_status):
            with server_scope:
                await serve_http(stuck, "127.0.0.1", 0, max_body_bytes=LIMIT, task_status=task_status)

        port = await outer.start(server)

        async def client():
            async with httpx.AsyncClient() as c:
                results.append(await c.post(f"http://127.0.0.1:{port}/", content=b"x"))

        outer.start_soon(client)
        with trio.fail_after(10):
            await entered.wait()
        server_scope.cancel()
    assert results[0].status_code == 503
    assert results[0].headers["retry-after"] == "1"


async def test_port_in_use_raises_before_started(nursery):
    port, _ = await start(nursery)
    with pytest.raises(OSError):
        await nursery.start(lambda task_status: serve_http(Recorder(), "127.0.0.1", port, max_body_bytes=LIMIT, task_status=task_status))


_GOOD = (
    b"POST /p?q=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello"
    b"POST /p HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
)


@st.composite
def mutated_requests(draw) -> bytes:
    data = bytearray(_GOOD)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=20))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 10))]
        else:
            del data[i:]
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=300), mutated_requests()))
async def test_fuzz_random_bytes_never_break_the_server(payload):
    async with trio.open_nursery() as nursery:
        port, rec = await start(nursery)
        out = await raw_exchange(port, payload)
        for status, headers, _ in parse_responses(out):
            assert status == 200 or 400 <= status < 500 or status == 501, status
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://127.0.0.1:{port}/after", content=b"still here")
        assert (r.status_code, r.content) == (200, b"still here")
        nursery.cancel_scope.cancel()


async def test_bind_error_names_the_address(nursery):
    from tapio.httpserver import open_http_listeners

    port, _ = await start(nursery)
    with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port}: address already in use"):
        await open_http_listeners("127.0.0.1", port)
