"""Fake upstreams for provider tests: a real HTTP/1.1 server on 127.0.0.1 (h11 over trio sockets).

A test gives ``FakeUpstream`` a handler that maps each ``Request`` to a reply: ``Json`` (any
status, headers, delay), ``Sse`` (server-sent events at an interval, optionally cut mid-stream),
``Hang`` (never answers), ``Raw`` (arbitrary bytes, e.g. a truncated body, then close).
The server records every request and, with ``trio.current_time()``, every client disconnect that
happened before a response was complete (what a cancelled provider call must cause).

Tests wait on what the fake saw, never on the wall clock: ``await fake.wait_request(n)`` returns
once the n-th request has arrived, ``wait_disconnect(n)`` once the n-th client disconnect has been
seen, ``wait_until(predicate)`` once a predicate over any fake state holds (re-checked whenever the
fake records something). Their ``timeout_s`` is only a fail-safe against hangs.
"""

from __future__ import annotations

import inspect
import os
import selectors
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import msgspec
import trio


@dataclass
class Request:
    method: str
    target: str  # path and query
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


@dataclass
class Json:
    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Sse:
    events: Sequence[str | tuple[str, Any]]  # "data" or (event name, data); dicts become JSON
    interval_s: float = 0.0
    status: int = 200
    cut_after: int | None = None  # close the connection after this many events, mid-stream
    first_delay_s: float = 0.0


@dataclass
class Hang:
    pass


@dataclass
class Raw:
    data: bytes


Reply = Json | Sse | Hang | Raw
Handler = Callable[[Request], Reply | Awaitable[Reply]]


# A cancelled call must close its upstream connection at once: bench/README.md measures it (p99 about
# 3 ms, `python -m bench cancel`). Tests only bound it loosely, from the cancel to the fake seeing the
# close, so that a loaded 2-core CI machine passes; a connection left open fails their 5 s fail-safe.
CANCEL_CLOSE_BOUND_S = 1.0


@dataclass
class Cancellation:
    at: float  # trio.current_time() just before the cancel
    caught: bool  # the call was still running and ended by this cancellation (did not return first)
    ended: float  # when the cancelled call had returned


async def cancel_when(ready: Callable[[], Awaitable[object]], call: Callable[[], Awaitable[object]],
                      timeout_s: float = 10) -> Cancellation:
    """Run ``call``; once ``ready()`` returns (the fake got the request, a first delta arrived), cancel it.

    ``timeout_s`` is only a fail-safe: the whole exchange hanging fails the test with ``TooSlowError``.
    """
    scope = trio.CancelScope()
    at = 0.0

    async def run() -> None:
        with scope:
            await call()

    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await ready()
            at = trio.current_time()
            scope.cancel()
    return Cancellation(at, scope.cancelled_caught, trio.current_time())


class Deltas:
    """An ``on_delta`` callback that keeps the deltas and lets a test wait for the n-th one."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._changed = trio.Event()

    def __call__(self, delta: str) -> None:
        self.items.append(delta)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, count: int = 1, timeout_s: float = 5) -> None:
        with trio.fail_after(timeout_s):
            while len(self.items) < count:
                await self._changed.wait()


def sse_frame(event: str | tuple[str, Any]) -> bytes:
    name, data = event if isinstance(event, tuple) else (None, event)
    if not isinstance(data, str):
        data = msgspec.json.encode(data).decode()
    head = f"event: {name}\n" if name else ""
    return (head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n").encode()


class FakeUpstream:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.disconnects: list[float] = []
        self.port = 0
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()  # set (and replaced) whenever the fake records something

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeUpstream:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._nursery.start_soon(trio.serve_listeners, self._connection, listeners)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._cm.__aexit__(None, None, None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5) -> None:
        """Return once ``predicate()`` holds; it is re-checked after every request, reply and disconnect."""
        with trio.fail_after(timeout_s):
            while not predicate():
                await self._changed.wait()

    async def wait_request(self, count: int = 1, timeout_s: float = 5) -> Request:
        """The ``count``-th request, once it has been received (its handler has been called)."""
        await self.wait_until(lambda: len(self.requests) >= count, timeout_s)
        return self.requests[count - 1]

    async def wait_disconnect(self, count: int = 1, timeout_s: float = 5) -> float:
        """When the ``count``-th client disconnect mid-response was seen (``trio.current_time()``)."""
        await self.wait_until(lambda: len(self.disconnects) >= count, timeout_s)
        return self.disconnects[count - 1]

    # ---- one connection ------------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read(stream, conn)
                if request is None:
                    return
                self.requests.append(request)
                self._notify()
                reply = self.handler(request)
                if inspect.isawaitable(reply):
                    reply = await reply
                self._notify()  # after the handler: predicates over the handler's own state see it
                if await self._respond(stream, conn, reply) or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _read(self, stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
        head: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = {k.decode().lower(): v.decode() for k, v in head.headers}
                return Request(head.method.decode(), head.target.decode(), headers, body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _respond(self, stream: trio.SocketStream, conn: h11.Connection, reply: Reply) -> bool:
        """Send ``reply``; True when the connection is gone (client left, or we cut it)."""
        gone = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:  # the client closing its end = a cancelled call
                nonlocal gone
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.ClosedResourceError:  # we closed it ourselves (Raw, a cut Sse): no client act
                        gone = True
                        nursery.cancel_scope.cancel()
                        return
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        gone = True
                        self.disconnects.append(trio.current_time())
                        self._notify()
                        nursery.cancel_scope.cancel()
                        return
                    conn.receive_data(data)

            nursery.start_soon(watch)
            try:
                gone = await self._send(stream, conn, reply) or gone
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                gone = True
            nursery.cancel_scope.cancel()
        return gone

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, reply: Reply) -> bool:
        async def emit(event: Any) -> None:
            await stream.send_all(conn.send(event))

        if isinstance(reply, Hang):
            await trio.sleep_forever()
        if isinstance(reply, Raw):
            await stream.send_all(reply.data)
            await stream.aclose()
            return True
        if isinstance(reply, Json):
            await trio.sleep(reply.delay_s)
            body = reply.body if isinstance(reply.body, bytes) else msgspec.json.encode(reply.body)
            headers = {"content-type": "application/json", "content-length": str(len(body)), **reply.headers}
            await emit(h11.Response(status_code=reply.status, headers=list(headers.items())))
            await emit(h11.Data(data=body))
            await emit(h11.EndOfMessage())
            return False
        await trio.sleep(reply.first_delay_s)
        await emit(h11.Response(status_code=reply.status, headers=[("content-type", "text/event-stream"),
                                                                   ("transfer-encoding", "chunked")]))
        for i, event in enumerate(reply.events):
            if reply.cut_after is not None and i >= reply.cut_after:
                await stream.aclose()
                return True
            if i:
                await trio.sleep(reply.interval_s)
            await emit(h11.Data(data=sse_frame(event)))
        await emit(h11.EndOfMessage())
        return False


# ---- subprocesses ---------------------------------------------------------------------------------

def wait_for_line(proc: subprocess.Popen[bytes], needle: bytes, timeout_s: float = 30.0) -> bytes:
    """Read ``proc``'s stdout until a line holds ``needle``: bounded by ``timeout_s`` and by EOF."""
    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while needle not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no {needle!r} on stdout within {timeout_s}s: {seen[-500:]!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"stdout closed before {needle!r} (exit {proc.poll()}): {seen[-500:]!r}")
            seen += chunk
    return seen
