"""The one HTTP transport: httpx2/httpcore2, status mapping, SSE, body caps, foreign exceptions mapped once.

Theory of operation
-------------------
* **One exchange, one shape.** ``HttpTransport.exchange(request, fold)`` sends a codec's
  ``HttpRequest`` and feeds what comes back to a fold: the whole body as one event, or, for a
  streamed request, each server-sent event's ``data`` (reading stops once the fold is ``done``).
  Text pieces go to ``on_delta``; the fold's ``result()`` is the answer. JSON fetches (``fetch``)
  and status-only checks (``check``) are the same exchange with a small fold of their own.
* **Errors are mapped once**, here, around the whole exchange (sending, reading, and the fold's
  decoding of every event): HTTP status -> our error classes (400/413/422 caller error, 401/403
  credentials, 404 model, 408/504 timeout, 429 with ``Retry-After``, 5xx upstream; a codec's
  ``status_error`` hook may decide otherwise from the status and the body's message, once), and
  httpx2/httpcore2 transport errors, malformed bodies (a fold raising ``KeyError``/``TypeError``/a decode
  error) and cut streams -> ``ProviderError``. ``on_delta`` runs outside the mapping: a bug in
  the caller is not an upstream's malformed response.
* **Bodies are capped**: every upstream body (errors, JSON replies, the whole of an event stream)
  is read incrementally and counted; past ``[server] max_upstream_bytes`` (or with a larger
  ``Content-Length``) the exchange ends with ``UpstreamTooLarge`` and the connection is closed,
  so no more than about the cap is ever held. ``Accept-Encoding: identity`` is asked for, so the
  bytes counted are the bytes decoded (a plain body read through ``read_body`` is counted after
  decoding as well).
* **Connections** (``pool.py``): per transport (per provider), made lazily inside trio, HTTP/1.1
  keep-alive. A ``trio.CapacityLimiter`` of ``max_concurrency`` bounds the requests in flight (so
  the connections in use), and only it ever makes a request wait; idle connections wait on a stack
  (up to ``max_idle``, by default as many), O(1) per request. httpx2's client is not used: this
  module builds the httpcore2 request and reads the reply through httpx2's ``Response`` (decoding)
  and ``EventSource`` (SSE); the client's layers cost more per request than the exchange itself.
  httpcore (1.0.9) was left for its pool: quadratic per request in the connections, and it leaked
  entries when requests were cancelled while it was contended (its issue #1093: afterwards every
  request failed with ``PoolTimeout``). A proxy named by the environment (``HTTPS_PROXY``...) for
  the base URL is honoured through httpcore2's proxy pool.
* **Quiet wire loggers**: ``httpx2`` (a line per request at info, logged here since the client is
  not used) and ``httpcore2`` (each step, headers included, at debug) stay at warning unless the
  application set them (``[server] wire_debug``).
* **No timeouts here** beyond connect: the caller owns the deadline with cancel scopes, and
  cancelling a request closes its connection (the upstream sees the disconnect).
* **Secrets** never reach an error text: every message built from an upstream body or error is
  redacted (every run of 8 or more of a key's characters) before it is cut short (``redact.clip``).
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, Generic, NamedTuple, TypeVar

import httpcore2
import httpx2
import msgspec
import trio

from .. import errors, tracing
from ..config import ProviderConfig, ServerConfig
from ..redact import SCAN_CHARS, clip
from . import OnDelta
from .codecs import DETAIL_CHARS, BodyFold, Fold, HttpRequest, StatusHook, error_object, retry_info_ms, too_large
from .pool import KEEPALIVE_EXPIRY_S, ConnectionStack, PoolSnapshot

CONNECT_TIMEOUT_S = 10.0
# what httpx2's client sends by default, but Accept-Encoding: the bytes counted are the bytes decoded
DEFAULT_HEADERS = {"accept": "*/*", "accept-encoding": "identity", "connection": "keep-alive",
                   "user-agent": f"python-httpx2/{httpx2.__version__}"}
_EXTENSIONS = {"timeout": {"connect": CONNECT_TIMEOUT_S, "read": None, "write": None, "pool": None}}
MAX_TARGETS = 256  # parsed URLs kept per transport


def _quiet_by_default(*names: str) -> None:
    """Loggers at warning unless the application set their level (``[server] wire_debug``): httpx2
    logs a line per request at info, httpcore2 every step, headers included, at debug."""
    for name in names:
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


_quiet_by_default("httpx2", "httpcore2")
_WIRE_LOG = logging.getLogger("httpx2")

T = TypeVar("T")


class CappedStream(httpx2.AsyncByteStream):
    """A response body that raises ``UpstreamTooLarge`` once more than ``limit`` bytes came."""

    def __init__(self, inner: AsyncIterable[bytes], limit: int, provider: str) -> None:
        self._inner = inner
        self._limit = limit
        self._provider = provider

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise too_large(self._provider, self._limit)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()  # type: ignore[attr-defined]  # httpcore2's streams have it


# ---- status mapping ------------------------------------------------------------------------------

def retry_after_ms(headers: Mapping[str, str]) -> int | None:
    """``retry-after-ms`` (OpenAI), or ``Retry-After`` in seconds or as an HTTP date."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(1, math.ceil(float(raw_ms)))
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(1, math.ceil(float(raw) * 1000))
    except ValueError:
        when = email.utils.parsedate_to_datetime(raw) if raw else None
        return max(1, math.ceil((when.timestamp() - time.time()) * 1000)) if when else None


def _detail(body: bytes, secrets: Sequence[str | None]) -> str:
    """The human part of an upstream error body (most APIs use {"error": {"message": ...}}),
    redacted, then cut to ``DETAIL_CHARS``."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return clip(body[:SCAN_CHARS].decode("utf-8", "replace"), DETAIL_CHARS, secrets).strip()
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # Gemini wraps errors in a list on some endpoints
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return clip(str(err.get("message") or err.get("type") or err), DETAIL_CHARS, secrets)
        return clip(str(err), DETAIL_CHARS, secrets)
    return clip(str(data), DETAIL_CHARS, secrets)


STATUS_ERRORS: dict[int, type[errors.LlmsrvError]] = {
    400: errors.ValidationFailed, 413: errors.ValidationFailed, 422: errors.ValidationFailed,
    401: errors.MissingCredentials, 403: errors.MissingCredentials,
    404: errors.ProviderNotFound,
    408: errors.ProviderTimeout, 504: errors.ProviderTimeout,
    429: errors.RateLimited,
}
_PREFIXES: dict[type[errors.LlmsrvError], str] = {
    errors.ValidationFailed: "the request was rejected upstream: ",
    errors.MissingCredentials: "credentials refused: ",
    errors.ProviderNotFound: "model or endpoint not found: ",
}


def error_for_status(provider: str, status: int, body: bytes, headers: Mapping[str, str],
                     secrets: Sequence[str | None] = (), hook: StatusHook | None = None) -> errors.LlmsrvError:
    """The error for an HTTP status >= 400: ``hook`` (a codec's ``status_error``) first, then the table.
    The retry hint (``Retry-After``, ``retry-after-ms``, Google's ``RetryInfo``) rides on a rate limit and
    on any upstream failure that gives one (503, Anthropic's 529 overloaded)."""
    detail = _detail(body, secrets)
    try:
        error = error_object(msgspec.json.decode(body))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        error = None
    where = f"{provider} answered HTTP {status}: {detail}" if detail else f"{provider} answered HTTP {status}"
    cls = (hook(status, detail, error) if hook is not None else None) or STATUS_ERRORS.get(status, errors.ProviderError)
    if cls in (errors.RateLimited, errors.ProviderError):
        return cls(where, retry_after_ms=retry_after_ms(headers) or retry_info_ms(error))
    return cls(_PREFIXES.get(cls, "") + where)


# The two layers' failures (httpcore2 raises its own while sending and reading; httpx2 its own while
# decoding and parsing events), by what they mean for the call.
_TIMEOUTS = (httpx2.TimeoutException, httpcore2.TimeoutException)
_UNREACHABLE = (httpx2.ConnectError, httpx2.UnsupportedProtocol, httpx2.InvalidURL, httpcore2.ConnectError,
                httpcore2.UnsupportedProtocol)
_BROKEN = (httpx2.RequestError, httpx2.StreamError, httpcore2.NetworkError, httpcore2.ProtocolError,
           httpcore2.ProxyError)


@contextmanager
def _mapped(provider: str, secrets: Sequence[str | None]) -> Iterator[None]:
    """httpx2 / httpcore2 / SSE / JSON failures of an exchange -> ``ProviderError`` (no secret in the text)."""
    try:
        yield
    except _TIMEOUTS as exc:
        raise errors.ProviderTimeout(f"{provider}: {type(exc).__name__}") from None
    except _UNREACHABLE as exc:  # never reached the upstream at all
        text = clip(_reason(exc), DETAIL_CHARS, secrets)
        raise errors.ProviderUnreachable(f"{provider}: cannot connect ({type(exc).__name__}: {text})") from None
    except httpx2.SSEError as exc:  # a TransportError in httpx2: caught first
        text = clip(str(exc), DETAIL_CHARS, secrets)
        raise errors.ProviderError(f"{provider}: malformed event stream ({text})") from None
    except _BROKEN as exc:
        text = clip(_reason(exc), DETAIL_CHARS, secrets)
        raise errors.ProviderError(f"{provider}: connection failed ({type(exc).__name__}: {text})") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, KeyError, IndexError, TypeError,
            AttributeError) as exc:
        raise errors.ProviderError(f"{provider}: malformed response ({type(exc).__name__})") from None


def _reason(exc: BaseException) -> str:
    """The first non-empty text down the chain of causes (trio's broken-stream errors have none; the
    ``ssl.SSLError`` under them says which certificate check failed)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None or str(seen):
            break
        seen = seen.__cause__ or seen.__context__
    return str(seen) if seen is not None else ""


# ---- the fold of a status-only check ----------------------------------------------------------------

class StatusOnly:
    """The status is the answer: the body is never read (a model list can be large)."""

    done = True

    def feed(self, data: str | bytes, event: str = "") -> str:
        return ""

    def result(self) -> None:
        return None


class _Target(NamedTuple):
    url: httpcore2.URL
    host: bytes  # the Host header
    text: str  # for the wire log and SSE errors


class _Result(Generic[T]):
    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


# ---- the transport --------------------------------------------------------------------------------

class HttpTransport:
    """One provider's HTTP connections, gate and limits; every exchange of that provider goes through it."""

    def __init__(self, name: str, base_url: str, *, max_concurrency: int, max_body: int,
                 secrets: Callable[[], Sequence[str | None]] = tuple, max_idle: int | None = None) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.max_body = max_body
        self._secrets = secrets
        self._max_connections = max_concurrency
        self._max_idle = max_concurrency if max_idle is None else max_idle
        self._gate = trio.CapacityLimiter(max_concurrency)
        self._pool: ConnectionStack | httpcore2.AsyncHTTPProxy | None = None
        self._targets: dict[tuple[str, tuple[tuple[str, str], ...] | None], _Target] = {}

    @classmethod
    def configured(cls, name: str, base_url: str, cfg: ProviderConfig, server: ServerConfig | None,
                   secrets: Callable[[], Sequence[str | None]]) -> HttpTransport:
        """The transport of a provider section: its concurrency, and the server's body cap."""
        return cls(name, base_url, max_concurrency=cfg.max_concurrency,
                   max_body=(server or ServerConfig()).max_upstream_bytes, secrets=secrets)

    def pool(self) -> ConnectionStack | httpcore2.AsyncHTTPProxy:
        """The connections (made at the first exchange, inside trio): a ``ConnectionStack``, or httpcore2's
        proxy pool when the environment names a proxy for the base URL (``HTTPS_PROXY``, ``NO_PROXY``...)."""
        if self._pool is None:
            proxy = _env_proxy(self.base_url)
            if proxy is None:
                self._pool = ConnectionStack(max_idle=self._max_idle, ssl_context=httpx2.create_ssl_context)
            else:
                url = httpx2.URL(proxy)
                self._pool = httpcore2.AsyncHTTPProxy(
                    proxy_url=httpcore2.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                                            target=url.raw_path),
                    ssl_context=httpx2.create_ssl_context(), max_connections=self._max_connections,
                    max_keepalive_connections=self._max_idle, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        return self._pool

    def statistics(self) -> PoolSnapshot | None:
        """The connections in use, idle and opened so far (None before the first exchange, or proxied)."""
        return self._pool.statistics() if isinstance(self._pool, ConnectionStack) else None

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    # ---- exchanges -----------------------------------------------------------------------------

    async def exchange(self, request: HttpRequest, fold: Fold[T], on_delta: OnDelta | None = None, *,
                       headers: Mapping[str, str], base: str | None = None,
                       status_error: StatusHook | None = None) -> T:
        """Send ``request``, fold the reply (``on_delta`` gets each text piece), return the fold's result."""
        steps = self._steps(request, fold, headers, base or self.base_url, status_error)
        async with aclosing(steps):
            async for step in steps:
                if isinstance(step, _Result):
                    return step.value
                if on_delta is not None:
                    on_delta(step)
        raise AssertionError("an exchange ends with its result")  # pragma: no cover

    async def fetch(self, request: HttpRequest, parse: Callable[[Any], T], *, headers: Mapping[str, str],
                    base: str | None = None, status_error: StatusHook | None = None) -> T:
        """A JSON reply through ``parse`` (run inside the mapping: a KeyError there is a malformed reply)."""
        return await self.exchange(request, BodyFold(parse), headers=headers, base=base, status_error=status_error)

    async def check(self, request: HttpRequest, *, headers: Mapping[str, str], base: str | None = None,
                    status_error: StatusHook | None = None) -> None:
        """Raise the mapped error unless the status is 2xx; the body is not read."""
        await self.exchange(request, StatusOnly(), headers=headers, base=base, status_error=status_error)

    async def _steps(self, request: HttpRequest, fold: Fold[T], headers: Mapping[str, str], base: str,
                     status_error: StatusHook | None) -> AsyncGenerator[str | _Result[T], None]:
        """The exchange itself: text pieces, then the result. The only place foreign errors are mapped."""
        secrets = self._secrets()
        try:
            self._gate.acquire_nowait()  # a free slot costs no trip through the scheduler
        except trio.WouldBlock:
            await self._gate.acquire()
        try:
            with _mapped(self.name, secrets):
                response = await self._send(request, headers, base)
                try:
                    length = response.headers.get("content-length", "")
                    if length.isascii() and length.isdigit() and int(length) > self.max_body:
                        raise too_large(self.name, self.max_body)
                    if response.status_code >= 400:
                        body = await self._read_body(response)
                        raise error_for_status(self.name, response.status_code, body, response.headers,
                                               secrets, status_error)
                    if request.stream:
                        async for event in httpx2.EventSource(response, max_event_size=None):  # capped as a whole
                            if piece := fold.feed(event.data, event.event):
                                yield piece
                            if fold.done:
                                break
                    elif not fold.done:
                        fold.feed(await self._read_body(response))
                    yield _Result(fold.result())
                finally:
                    await response.aclose()
        finally:
            self._gate.release()

    async def _send(self, request: HttpRequest, headers: Mapping[str, str], base: str) -> httpx2.Response:
        """``request`` sent through the pool: an httpcore2 request built here, an httpx2 response (its
        decoding and event parsing). httpx2's client is not used: its layers (a ``Request`` model,
        redirects, cookies, auth, hooks) cost more than the exchange itself."""
        url = request.path if request.path.startswith("http") else base.rstrip("/") + request.path
        target = self._target(url, request.params)
        merged = dict(DEFAULT_HEADERS)
        for key, value in headers.items():
            merged[key.lower()] = value
        if tracing.ENABLED:  # the attempt's span goes on upstream (W3C traceparent/tracestate)
            tracing.inject(merged)
        head = [(b"host", target.host), *[(key.encode(), value.encode()) for key, value in merged.items()]]
        content = b""
        if request.body is not None:
            content = msgspec.json.encode(request.body)
            head += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
        method = request.method.encode()
        got = await self.pool().handle_async_request(
            httpcore2.Request(method, target.url, headers=head, content=content, extensions=_EXTENSIONS))
        sent = httpx2.Request(request.method, target.text) if request.stream else None  # for the SSE errors
        response = httpx2.Response(got.status, headers=got.headers, request=sent, extensions=got.extensions,
                                   stream=CappedStream(got.stream, self.max_body, self.name))  # type: ignore[arg-type]
        if _WIRE_LOG.isEnabledFor(logging.INFO):  # the line httpx2's client logs (that client is not used)
            _WIRE_LOG.info('HTTP Request: %s %s "%s %d %s"', request.method, target.text, response.http_version,
                           response.status_code, response.reason_phrase)
        return response

    def _target(self, url: str, params: Mapping[str, str] | None) -> _Target:
        """``url`` with ``params`` merged in, parsed (httpx2's URL rules) once per distinct URL."""
        key = (url, tuple(params.items()) if params else None)
        found = self._targets.get(key)
        if found is None:
            parsed = httpx2.URL(url)
            if params:
                parsed = parsed.copy_merge_params(params)
            found = _Target(httpcore2.URL(scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port,
                                          target=parsed.raw_path), parsed.netloc, str(parsed))
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()  # URLs carry model names, which come from requests: keep a bounded few
            self._targets[key] = found
        return found

    async def _read_body(self, response: httpx2.Response) -> bytes:
        """The whole (decoded) body of ``response``, at most ``max_body`` bytes (else ``UpstreamTooLarge``)."""
        body = bytearray()
        # a body sent as asked (identity) is read as it came, without httpx2's decoding layers
        plain = response.headers.get("content-encoding", "identity").lower() == "identity"
        chunks = response.stream if plain else response.aiter_bytes()
        async for chunk in chunks:  # type: ignore[union-attr]
            body += chunk
            if len(body) > self.max_body:
                raise too_large(self.name, self.max_body)
        return bytes(body)


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTP(S)_PROXY``/``ALL_PROXY`` unless ``NO_PROXY``)."""
    proxies = urllib.request.getproxies()
    if not proxies:
        return None
    parsed = httpx2.URL(url)
    if urllib.request.proxy_bypass(parsed.host):
        return None
    return proxies.get(parsed.scheme) or proxies.get("all")
