"""Fake upstreams for provider tests: a real HTTP/1.1 server on 127.0.0.1 (h11 over trio sockets).

A test gives ``FakeUpstream`` a handler that maps each ``Request`` to a reply: ``Json`` (any
status, headers, delay), ``Sse`` (server-sent events at an interval, optionally cut mid-stream),
``Hang`` (never answers), ``Raw`` (arbitrary bytes, e.g. a truncated body, then close).
The server records every request and, with ``trio.current_time()``, every client disconnect that
happened before a response was complete (what a cancelled provider call must cause).
"""

from __future__ import annotations

import inspect
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

    async def wait_disconnect(self, count: int = 1, timeout_s: float = 5) -> float:
        with trio.fail_after(timeout_s):
            while len(self.disconnects) < count:
                await trio.sleep(0.001)
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
                reply = self.handler(request)
                if inspect.isawaitable(reply):
                    reply = await reply
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
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        gone = True
                        self.disconnects.append(trio.current_time())
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
