"""The HTTP listener: one ASGI application (the OpenAI-compatible API and the operations endpoints),
served by hypercorn's trio worker inside the llmsrv process (CONTRACT sections 6 and 9).

Theory of operation
-------------------
``App`` routes ``/v1/*`` (Bearer keys, ``openai_wire`` for the JSON) to a ``Backend``: the service,
which runs each request through the same pipeline, admission, deadline and cancel registry as a NATS
request. ``/metrics`` is prometheus_client's own ASGI app; ``/healthz``, ``/readyz`` and anything else
read by GET come from the ``documents`` callable (``ops.http_answer``), unauthenticated as before.

One request, one cancel scope: while the backend answers, a watcher task waits on ASGI ``receive``;
the ``http.disconnect`` of a client that went away cancels the scope at once, so the provider call
stops (its upstream connection is closed), as ``llm.cancel`` does on NATS. Errors known before the
first streamed byte get their HTTP status (section 3's table, OpenAI's error shape); once an SSE
stream has begun, an error is one ``data: {"error": {...}}`` frame and ``[DONE]``.

``serve`` runs hypercorn in the caller's nursery; cancelling it stops accepting, lets responses in
flight finish for ``grace_s`` (shielded, bounded), then closes. Without API keys ``/v1/*`` may only
be bound to loopback: ``http_api_keys`` (at startup) and ``serve`` refuse anything else.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from . import errors, messages, openai_wire, redact
from .config import ConfigError, ServerConfig
from .messages import LLMRequest, LLMResponse
from .providers import OnDelta

log = logging.getLogger("llmsrv.http")
_server_log = logging.getLogger("llmsrv.http.server")  # hypercorn's own lines: errors, not its banner
_server_log.setLevel(logging.WARNING)

Scope = Mapping[str, Any]
Event = dict[str, Any]
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[Event], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Documents = Callable[[str], tuple[int, str, bytes]]  # GET path -> (status, content type, body)


class Backend(Protocol):
    """What ``/v1/*`` needs of the service."""

    async def answer(self, request: LLMRequest, correlation_id: str, on_delta: OnDelta | None,
                     trace: Mapping[str, str] | None = None) -> LLMResponse:
        """Answer one request (admission, deadline, cancel registry, metrics), or raise an ``LlmsrvError``.
        Runs in the HTTP request's cancel scope: a client disconnect cancels it from outside. ``trace``:
        the request's W3C ``traceparent``/``tracestate`` headers (the request's span joins that trace)."""
        ...

    def models(self) -> list[tuple[str, str]]:
        """``(model id, provider)`` pairs for ``GET /v1/models`` (``openai_wire.configured_models``)."""
        ...


class _Outbox:
    """Deltas from the backend's ``on_delta`` (synchronous) to the task writing the SSE stream."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.result: LLMResponse | errors.LlmsrvError | None = None
        self._wake = trio.Event()

    def on_delta(self, text: str) -> None:
        self.pending.append(text)
        self._wake.set()

    def finish(self, result: LLMResponse | errors.LlmsrvError) -> None:
        self.result = result
        self._wake.set()

    async def take(self) -> str:
        """What arrived since the last call (coalesced while the client was slow to read)."""
        await self._wake.wait()
        self._wake = trio.Event()
        text = "".join(self.pending)
        self.pending.clear()
        return text


class App:
    """The ASGI application of the HTTP port. ``backend`` None: no ``/v1/*`` (operations only)."""

    def __init__(self, backend: Backend | None, *, documents: Documents, metrics: ASGIApp | None = None,
                 server: ServerConfig | None = None, api_keys: Sequence[str] = (),
                 rejected: Callable[[str, str], None] | None = None) -> None:
        self.backend, self.documents, self.metrics = backend, documents, metrics
        self.server = server or ServerConfig()
        self._keys = tuple(k.encode() for k in api_keys)
        self._rejected = rejected  # told (outcome, error code) of each request refused before it reached the backend
        self.created = int(time.time())
        # without keys, /v1/* must not be reachable from another host: serve() checks the bind
        self.requires_loopback = backend is not None and not api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: hypercorn closes the connection when the app returns
        path, method = scope["path"], scope["method"]
        if path.startswith("/v1/") and self.backend is not None:
            await self._v1(self.backend, scope, receive, send)
        elif method not in ("GET", "HEAD"):
            await _respond(send, 405, "text/plain", b"only GET\n", [("allow", "GET, HEAD")])
        elif path == "/metrics" and self.metrics is not None:
            await self.metrics(scope, receive, send)
        else:
            await _respond(send, *self.documents(path))

    # ---- /v1 -----------------------------------------------------------------------------------

    async def _v1(self, backend: Backend, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _Headers(scope)
        path, method = scope["path"], scope["method"]
        if not self._authorized(headers.get("authorization")):
            self._count("unauthorized", "INVALID_API_KEY")
            await _error(send, 401, "INVALID_API_KEY", "authentication_error",
                         "missing or invalid API key: send Authorization: Bearer <key>",
                         [("www-authenticate", "Bearer")])
        elif path == "/v1/chat/completions" and method == "POST":
            await self._chat(backend, headers, receive, send)
        elif path == "/v1/models" and method in ("GET", "HEAD"):
            doc = openai_wire.models_document(backend.models(), self.created)
            await _respond(send, 200, "application/json", messages.encode(doc))
        elif path.startswith("/v1/models/") and method in ("GET", "HEAD"):
            wanted = path.removeprefix("/v1/models/")
            owner = dict(backend.models()).get(wanted)
            if owner is None:
                await _llmsrv_error(send, errors.ProviderNotFound(f"no model {wanted[:200]!r}: see GET /v1/models"))
            else:
                await _respond(send, 200, "application/json",
                               messages.encode(openai_wire.model_document(wanted, owner, self.created)))
        elif path in ("/v1/chat/completions", "/v1/models"):
            await _error(send, 405, "METHOD_NOT_ALLOWED", "invalid_request_error", f"{method} is not allowed here")
        else:
            await _error(send, 404, "NOT_FOUND", "invalid_request_error",
                         f"no such endpoint: {path[:200]} (served: POST /v1/chat/completions, GET /v1/models)")

    def _authorized(self, header: str | None) -> bool:
        if not self._keys:
            return True
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        matched = False
        for key in self._keys:  # every key compared, in constant time each
            matched |= hmac.compare_digest(given, key)
        return matched and bool(given)

    def _count(self, outcome: str, error_code: str) -> None:
        if self._rejected is not None:
            self._rejected(outcome, error_code)

    async def _chat(self, backend: Backend, headers: _Headers, receive: Receive, send: Send) -> None:
        cid = ""
        try:
            cid = messages.header_correlation_id(headers) or ""
            body = await self._body(headers, receive)
            if body is None:
                return  # the client left while sending
            chat = openai_wire.decode_chat(
                body, max_depth=self.server.max_json_depth, correlation_id=cid or None,
                timeout_ms=messages.header_int(headers, "Llm-Timeout-Ms", 1, 600000))
        except errors.LlmsrvError as exc:
            self._count(exc.outcome, exc.error_code)
            await _llmsrv_error(send, exc, cid)
            return
        request = chat.request
        cid = request.correlation_id or messages.new_correlation_id()
        trace = headers.trace_context()
        if chat.ignored:
            log.debug("request %s: ignored fields %s", cid, ", ".join(chat.ignored))
        if request.stream:
            await self._stream(backend, request, cid, chat.include_usage, receive, send, trace)
            return
        outbox = _Outbox()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
            await _run(backend, request, cid, None, outbox, trace)
            nursery.cancel_scope.cancel()
        result = outbox.result
        if isinstance(result, LLMResponse):
            doc = openai_wire.completion_document(result, int(time.time()))
            await _respond(send, 200, "application/json", messages.encode(doc), _id_headers(cid))
        elif result is not None:
            await _llmsrv_error(send, result, cid)
        # None: the client disconnected and the request was cancelled; nobody is left to answer

    async def _stream(self, backend: Backend, request: LLMRequest, cid: str, include_usage: bool,
                      receive: Receive, send: Send, trace: dict[str, str] | None = None) -> None:
        """Headers go out with the first delta (or the outcome), so an error before any text keeps its status."""
        frames = openai_wire.ChunkStream(cid, request.model, int(time.time()), include_usage)
        outbox = _Outbox()
        started = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
            nursery.start_soon(_run, backend, request, cid, outbox.on_delta, outbox, trace)
            while True:
                text = await outbox.take()
                result = outbox.result
                out = frames.delta(text) if text else b""
                if not started and (out or isinstance(result, LLMResponse)):
                    await send({"type": "http.response.start", "status": 200, "headers": _sse_headers(cid)})
                    started, out = True, frames.start() + out
                if result is None:
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    continue
                if isinstance(result, LLMResponse):
                    await send({"type": "http.response.body", "body": out + frames.end(result)})
                elif started:
                    await send({"type": "http.response.body", "body": out + frames.error(result, cid)})
                else:
                    await _llmsrv_error(send, result, cid)
                break
            nursery.cancel_scope.cancel()

    async def _body(self, headers: _Headers, receive: Receive) -> bytes | None:
        """The request body, refused past ``[server] max_request_bytes`` (as soon as that is known)."""
        limit = self.server.max_request_bytes
        declared = headers.get("content-length") or ""
        if declared.isdigit() and int(declared) > limit:
            raise errors.PayloadTooLarge(
                f"body is {int(declared)} bytes; the limit is {limit} (server.max_request_bytes)")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return None
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise errors.PayloadTooLarge(f"body is over {limit} bytes (server.max_request_bytes)")
            chunks.append(chunk)
            if not event.get("more_body", False):
                return b"".join(chunks)


async def _run(backend: Backend, request: LLMRequest, cid: str, on_delta: OnDelta | None, outbox: _Outbox,
               trace: dict[str, str] | None = None) -> None:
    """The per-request boundary of ``/v1``: whatever the backend raises becomes the request's answer."""
    try:
        result: LLMResponse | errors.LlmsrvError = await backend.answer(request, cid, on_delta, trace)
    except errors.LlmsrvError as exc:
        result = exc
    except Exception:
        log.exception("internal error serving HTTP request %s", cid)
        result = errors.InternalError("internal error; see server log")
    outbox.finish(result)


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel the request's scope as soon as its client is gone (the body has been read by now)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _Headers:
    """A request's headers, looked up by any spelling of the name (what ``messages.header_int`` reads)."""

    def __init__(self, scope: Scope) -> None:
        self._by_name = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._by_name.get(name.lower(), default)

    def trace_context(self) -> dict[str, str] | None:
        """The W3C ``traceparent``/``tracestate`` headers, if the request has any."""
        found = {name: value for name in ("traceparent", "tracestate") if (value := self._by_name.get(name))}
        return found or None


def _id_headers(cid: str) -> list[tuple[str, str]]:
    # x-request-id: the OpenAI SDKs expose it as ``_request_id``
    return [("x-request-id", cid), ("llm-correlation-id", cid)] if cid else []


def _sse_headers(cid: str) -> list[tuple[bytes, bytes]]:
    pairs = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"),
             ("x-accel-buffering", "no"), *_id_headers(cid)]
    return [(k.encode(), v.encode("latin-1", "replace")) for k, v in pairs]


async def _respond(send: Send, status: int, content_type: str, body: bytes,
                   extra: Sequence[tuple[str, str]] = ()) -> None:
    pairs = [("content-type", content_type), ("content-length", str(len(body))), *extra]
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode("latin-1", "replace")) for k, v in pairs]})
    await send({"type": "http.response.body", "body": body})


async def _llmsrv_error(send: Send, exc: errors.LlmsrvError, cid: str = "") -> None:
    status = exc.status if 400 <= exc.status <= 599 else 500
    await _respond(send, status, "application/json", messages.encode(openai_wire.error_document(exc, cid)),
                   [*openai_wire.error_headers(exc), *_id_headers(cid)])


async def _error(send: Send, status: int, code: str, kind: str, message: str,
                 extra: Sequence[tuple[str, str]] = ()) -> None:
    doc = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    await _respond(send, status, "application/json", messages.encode(doc), [("x-should-retry", "false"), *extra])


# ---- startup -----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "": it may reach other hosts


def http_api_keys(server: ServerConfig, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The API keys of ``/v1/*``: the comma-separated list in the variable ``[server] http_api_keys_env``
    names, registered for log redaction. Call at startup: raises ``ConfigError`` when the HTTP port is
    open on a non-loopback ``http_host`` without any key."""
    env = os.environ if env is None else env
    keys = tuple(k.strip() for k in env.get(server.http_api_keys_env, "").split(",") if k.strip())
    redact.register(*keys)
    if server.http_port and not keys and not is_loopback(server.http_host):
        raise ConfigError(
            f"invalid config at `server.http_host`: {server.http_host!r} is not a loopback address and the "
            f"OpenAI-compatible API has no keys: set ${server.http_api_keys_env} (server.http_api_keys_env) to "
            "comma-separated keys, or bind server.http_host to 127.0.0.1")
    return keys


async def serve(app: ASGIApp, host: str, port: int, *, grace_s: float = 2.0,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``host:port`` (0: any free port) until cancelled; ``task_status`` gets the bound port.

    Cancelled, it stops accepting and gives responses in flight ``grace_s`` to finish (the service
    cancels their requests first, so they end with an answer), then closes every connection.
    """
    if getattr(app, "requires_loopback", False) and not is_loopback(host):
        raise ConfigError(f"invalid config at `server.http_host`: /v1/* without API keys may only be served on "
                          f"a loopback address, not {host!r}")
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = _server_log
    config.include_server_header = False
    config.graceful_timeout = grace_s
    stopping = trio.Event()
    server_scope = trio.CancelScope(shield=True)  # the outer cancellation becomes a graceful stop

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        with server_scope:
            await hypercorn_serve(cast(Any, app), config, shutdown_trigger=stopping.wait,
                                  task_status=task_status, mode="asgi")

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        task_status.started(int(binds[0].rpartition(":")[2]))
        try:
            await trio.sleep_forever()
        finally:
            stopping.set()
            server_scope.deadline = trio.current_time() + grace_s + 1
