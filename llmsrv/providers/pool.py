"""The keep-alive connections of one HTTP transport: opened here, lent one request at a time, kept on a stack.

Theory of operation
-------------------
httpcore's own pool re-plans every connection at each request start and end (a pass over all of
them, a readability poll per idle one), so its cost per request grows with the connections: under
trio, llmsrv's CPU per request was 2.2 ms at 10 in flight and 54 ms at 200 with httpcore 1.0.9
(quadratic); httpcore2 2.16's pass is linear but still most of the HTTP cost at 200. This pool
neither waits nor plans; a request costs O(1) here:

* **No queue.** The caller bounds the requests in flight (``HttpTransport``'s
  ``trio.CapacityLimiter``), so a request never waits here: it takes the most recently released
  idle connection of its origin (LIFO: the warmest, the least likely to have been closed by the
  server), checks that one (idle, not expired, its socket not readable) and otherwise opens one.
* **Opening** is TCP, then TLS for https (ALPN ``http/1.1``; the SSL context made once, at the
  first https connection), then an ``httpcore2.AsyncHTTP11Connection``: HTTP/1.1 only. Lent to
  one request at a time, a connection needs no lock of its own (httpcore2's ``AsyncHTTPConnection``
  takes one per request: a trip through the trio scheduler). A connect or handshake that fails or
  is cancelled closes its socket.
* **Hand-back.** Closing a response's stream returns its connection to the stack if the exchange
  ended cleanly. httpcore2 closes a connection whose exchange was cut (a cancellation, a body not
  read to its end, an error): such a connection is dropped, never reused.
* **Bounded and expiring.** At most ``max_idle`` idle connections per origin (the oldest closed
  first); each expires ``keepalive_expiry_s`` after its release, checked against the bottom of the
  stack at every release, so the surplus of a burst is closed once traffic calms down.
* **One send per request**: a connection's writes are held until its next read, so a request's
  head and body leave together (each trio send is a trip through the scheduler).
* **Closing is shielded and bounded** (``CLOSE_TIMEOUT_S``): a cancelled request still closes the
  connection it was using, and a wedged peer cannot hold the caller.
"""

from __future__ import annotations

import collections
import math
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore2
import msgspec
import trio

CLOSE_TIMEOUT_S = 1.0
KEEPALIVE_EXPIRY_S = 5.0  # httpx's default

Key = tuple[bytes, bytes, int]
_TrioStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class PoolSnapshot(msgspec.Struct, frozen=True):
    in_use: int  # connections lent to a request whose response is not closed yet
    idle: int  # kept alive, ready for the next request
    opened: int  # connections opened since the start


class ConnectionStack:
    """Idle keep-alive connections per origin; ``handle_async_request`` as httpcore2's pool has it."""

    def __init__(self, *, max_idle: int, keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
                 ssl_context: Callable[[], ssl.SSLContext] = ssl.create_default_context) -> None:
        self.max_idle = max_idle
        self.keepalive_expiry_s = keepalive_expiry_s
        self._make_ssl_context = ssl_context
        self._ssl_context: ssl.SSLContext | None = None  # made at the first https connection
        # (released at, connection), oldest first: pop() takes the warmest, popleft() drops the oldest
        self._idle: dict[Key, collections.deque[tuple[float, httpcore2.AsyncHTTP11Connection]]] = {}
        self._in_use = 0
        self._opened = 0
        self._closed = False  # after aclose(): connections handed back are closed, not kept

    def statistics(self) -> PoolSnapshot:
        return PoolSnapshot(self._in_use, sum(len(stack) for stack in self._idle.values()), self._opened)

    async def handle_async_request(self, request: httpcore2.Request) -> httpcore2.Response:
        scheme = request.url.scheme
        if scheme not in (b"http", b"https"):
            raise httpcore2.UnsupportedProtocol(f"Request URL has an unsupported protocol '{scheme.decode()}://'.")
        origin = request.url.origin
        key = (origin.scheme, origin.host, origin.port)
        connection = None
        stack = self._idle.get(key)
        while stack:
            _, candidate = stack.pop()
            if candidate.is_idle() and not candidate.has_expired():  # expired: its time, or the server closed it
                connection = candidate
                break
            await _close(candidate)
        if connection is None:
            connection = await self._open(origin, request.extensions.get("timeout", {}).get("connect"))
        self._in_use += 1
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            self._in_use -= 1
            await _close(connection)  # (httpcore2 closes a connection whose exchange was cut: this is for sure)
            raise
        return httpcore2.Response(status=response.status, headers=response.headers,
                                  content=_Lent(response.stream, connection, key, self),  # type: ignore[arg-type]
                                  extensions=response.extensions)

    async def _open(self, origin: httpcore2.Origin, timeout_s: float | None) -> httpcore2.AsyncHTTP11Connection:
        """A new HTTP/1.1 connection (TCP, then TLS for https); a failed or cancelled one leaves no socket."""
        host = origin.host.decode("ascii")
        with _connecting(timeout_s):
            tcp = await trio.open_tcp_stream(host, origin.port)
            stream: _TrioStream = tcp
            if origin.scheme == b"https":
                if self._ssl_context is None:
                    self._ssl_context = self._make_ssl_context()
                    self._ssl_context.set_alpn_protocols(["http/1.1"])
                stream = trio.SSLStream(tcp, self._ssl_context, server_hostname=host, https_compatible=True)
                try:
                    await stream.do_handshake()
                except BaseException:
                    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                        await tcp.aclose()
                    raise
        self._opened += 1
        return httpcore2.AsyncHTTP11Connection(origin, _Stream(stream), keepalive_expiry=self.keepalive_expiry_s)

    def _release(self, key: Key, connection: httpcore2.AsyncHTTP11Connection) -> list[httpcore2.AsyncHTTP11Connection]:
        """Back onto the stack if reusable; the connections to close (surplus, expired, this one if left busy)."""
        self._in_use -= 1
        closing = []
        now = time.monotonic()
        stack = self._idle.setdefault(key, collections.deque())
        if connection.is_idle() and not self._closed:
            stack.append((now, connection))
        elif not connection.is_closed():
            closing.append(connection)
        while stack and (len(stack) > self.max_idle or stack[0][0] + self.keepalive_expiry_s < now):
            closing.append(stack.popleft()[1])
        return closing

    async def aclose(self) -> None:
        """Close the idle connections; lent ones close with their responses."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for stack in idle.values():
            for _, connection in stack:
                await _close(connection)


class _Lent:
    """A response body whose ``aclose`` hands the connection back to the stack."""

    def __init__(self, stream: AsyncIterable[bytes], connection: httpcore2.AsyncHTTP11Connection, key: Key,
                 pool: ConnectionStack) -> None:
        self._stream = stream
        self._connection = connection
        self._key = key
        self._pool: ConnectionStack | None = pool

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()  # httpcore2's own iterator: no layer of ours per chunk

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await self._stream.aclose()  # type: ignore[attr-defined]  # httpcore2: idle again, or closed
        for connection in pool._release(self._key, self._connection):
            await _close(connection)


@contextmanager
def _connecting(timeout_s: float | None) -> Iterator[None]:
    """trio's failures to connect as httpcore2's (as its trio backend maps them)."""
    try:
        with trio.fail_after(math.inf if timeout_s is None else timeout_s):
            yield
    except trio.TooSlowError as exc:
        raise httpcore2.ConnectTimeout(str(exc)) from exc
    except (OSError, trio.BrokenResourceError) as exc:
        raise httpcore2.ConnectError(str(exc)) from exc


class _Stream(httpcore2.AsyncNetworkStream):
    """A connection's trio stream for httpcore2. Writes are held until the next read, so a request's
    head and body leave in one send (httpcore2 writes each h11 event, and every trio send is a trip
    through the scheduler); a read or write without a timeout opens no cancel scope (httpcore2's
    trio stream opens one per call). Failures are mapped as httpcore2's trio backend maps them."""

    def __init__(self, stream: _TrioStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []

    # (the signatures are httpcore2's stream interface, timeouts included: hence the noqa)
    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if buffer:
            self._held.append(buffer)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            try:
                if timeout is None:
                    await self._stream.send_all(data)
                else:
                    with trio.fail_after(timeout):
                        await self._stream.send_all(data)
            except trio.TooSlowError as exc:
                raise httpcore2.WriteTimeout(str(exc)) from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # as httpcore2 does on a write error: an upstream that stopped reading may have answered
        try:
            if timeout is None:
                return bytes(await self._stream.receive_some(max_bytes))
            with trio.fail_after(timeout):
                return bytes(await self._stream.receive_some(max_bytes))
        except trio.TooSlowError as exc:
            raise httpcore2.ReadTimeout(str(exc)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore2.ReadError(str(exc)) from exc

    async def aclose(self) -> None:
        self._held.clear()
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:  # noqa: ASYNC109
        raise NotImplementedError("TLS is set up when the connection opens")  # pragma: no cover

    def get_extra_info(self, info: str) -> Any:
        stream = self._stream
        tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if info == "is_readable":  # an idle connection with something to read: the server closed it
            return tcp.socket.is_readable()
        if info == "socket":
            return tcp.socket
        if info == "server_addr":
            return tcp.socket.getpeername()
        if info == "client_addr":
            return tcp.socket.getsockname()
        return None


async def _close(connection: httpcore2.AsyncHTTP11Connection) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        await connection.aclose()
