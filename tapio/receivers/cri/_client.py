"""The CRI runtime service from trio: grpcio's blocking stub, each call in a worker thread.

Invariants:
- Every unary call carries ``timeout=``, so a worker thread is never held
  longer than the configured deadline, even when trio abandoned the call.
- The event stream (GetContainerEvents) has no deadline: one worker thread
  iterates it and hands each event into trio through a bounded memory
  channel (``trio.from_thread.run``), so a slow pipeline slows the reader
  instead of growing a queue. Cancelling `follow_events` cancels the call,
  which ends the thread.
- All threads run under the client's own capacity limiter (`THREADS`),
  never trio's process-wide default.
- Every failure of the runtime surfaces as `RuntimeUnavailable`, carrying
  the gRPC status code name.
"""

from __future__ import annotations

from typing import Any

import grpc
import trio

from ._proto import api_pb2 as pb
from ._proto import api_pb2_grpc as pb_grpc

#: one thread for the event stream, two for the unary calls around it
THREADS = 3


class RuntimeUnavailable(Exception):
    """A CRI call failed; ``code`` is the gRPC status name (UNAVAILABLE, DEADLINE_EXCEEDED, UNIMPLEMENTED …)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def _unavailable(err: grpc.RpcError) -> RuntimeUnavailable:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return RuntimeUnavailable(code.name if code is not None else "UNKNOWN", details or "")


class RuntimeClient:
    """One grpcio channel to the runtime's socket. `open` and `aclose` are its ownership."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._limiter = trio.CapacityLimiter(THREADS)
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.RuntimeServiceStub | None = None

    def open(self) -> None:
        """Create the channel (it connects on the first call)."""
        self._channel = grpc.insecure_channel(
            self._endpoint,
            options=[
                # our reconnect loop paces attempts; grpcio's own backoff would delay the first after a runtime restart
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),  # a big node's ListContainers
                ("grpc.enable_retries", 0),
            ],
        )
        self._stub = pb_grpc.RuntimeServiceStub(self._channel)

    async def aclose(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await trio.to_thread.run_sync(channel.close, limiter=self._limiter)

    async def _call(self, method: str, request: Any) -> Any:
        assert self._stub is not None, "open() first"
        fn = getattr(self._stub, method)
        timeout = self._timeout

        def call() -> Any:
            try:
                return fn(request, timeout=timeout, wait_for_ready=False)
            except grpc.RpcError as err:
                return _unavailable(err)

        result = await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self._limiter)
        if isinstance(result, RuntimeUnavailable):
            raise result
        return result

    async def version(self) -> pb.VersionResponse:
        return await self._call("Version", pb.VersionRequest())

    async def list_sandboxes(self) -> list[pb.PodSandbox]:
        return list((await self._call("ListPodSandbox", pb.ListPodSandboxRequest())).items)

    async def list_containers(self) -> list[pb.Container]:
        return list((await self._call("ListContainers", pb.ListContainersRequest())).containers)

    async def container_status(self, container_id: str) -> pb.ContainerStatus | None:
        """The container's status, or None when the runtime no longer knows it (NOT_FOUND)."""
        try:
            return (await self._call("ContainerStatus", pb.ContainerStatusRequest(container_id=container_id))).status
        except RuntimeUnavailable as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise

    async def follow_events(self, send: trio.MemorySendChannel[pb.ContainerEventResponse]) -> None:
        """Hand every event of GetContainerEvents to ``send`` until the stream ends; then raise `RuntimeUnavailable`.

        Cancellation cancels the call (the reader thread then ends on its own).
        """
        assert self._stub is not None, "open() first"
        stream = self._stub.GetContainerEvents(pb.GetEventsRequest())

        def read() -> RuntimeUnavailable:
            try:
                for event in stream:
                    trio.from_thread.run(send.send, event)
            except grpc.RpcError as err:
                return _unavailable(err)
            except (trio.Cancelled, trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
                stream.cancel()  # trio gave up on us (shutdown): end the call
                return RuntimeUnavailable("CANCELLED", "the receiver stopped reading")
            return RuntimeUnavailable("UNAVAILABLE", "the runtime ended the event stream")

        try:
            failure = await trio.to_thread.run_sync(read, abandon_on_cancel=True, limiter=self._limiter)
        finally:
            stream.cancel()
        raise failure
