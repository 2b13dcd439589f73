"""The one HTTP transport: httpx, status mapping, SSE, body caps, and foreign exceptions mapped once.

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
  httpx transport errors, malformed bodies (a fold raising ``KeyError``/``TypeError``/a decode
  error) and cut streams -> ``ProviderError``. ``on_delta`` runs outside the mapping: a bug in
  the caller is not an upstream's malformed response.
* **Bodies are capped**: every upstream body (errors, JSON replies, the whole of an event stream)
  is read incrementally and counted; past ``[server] max_upstream_bytes`` (or with a larger
  ``Content-Length``) the exchange ends with ``UpstreamTooLarge`` and the connection is closed,
  so no more than about the cap is ever held. ``Accept-Encoding: identity`` is asked for, so the
  bytes counted are the bytes decoded (a plain body read through ``read_body`` is counted after
  decoding as well).
* **One ``httpx.AsyncClient`` per transport** (per provider), created lazily inside trio, HTTP/1.1
  keep-alive, ``max_connections = max_concurrency``. httpcore 1.0.9 leaks pool entries when
  requests are cancelled while the pool is contended (its issue #1093; afterwards every request
  fails with ``PoolTimeout``): a ``trio.CapacityLimiter`` of the same size sits in front of the
  client so no request ever waits inside the pool.
* **No timeouts here** beyond connect: the caller owns the deadline with cancel scopes, and
  cancelling a request closes its connection (the upstream sees the disconnect).
* **Secrets** never reach an error text: every message built from an upstream body or error is
  redacted (every run of 8 or more of a key's characters) before it is cut short (``redact.clip``).
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, Generic, TypeVar

import httpx
import httpx_sse
import msgspec
import trio

from .. import errors
from ..config import ProviderConfig, ServerConfig
from ..redact import SCAN_CHARS, clip
from . import OnDelta
from .codecs import DETAIL_CHARS, BodyFold, Fold, HttpRequest, StatusHook, error_object, retry_info_ms, too_large

CONNECT_TIMEOUT_S = 10.0

T = TypeVar("T")


class CappedStream(httpx.AsyncByteStream):
    """A response body that raises ``UpstreamTooLarge`` once more than ``limit`` bytes came."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int, provider: str) -> None:
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
        await self._inner.aclose()


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


@contextmanager
def _mapped(provider: str, secrets: Sequence[str | None]) -> Iterator[None]:
    """httpx / SSE / JSON failures of an exchange -> ``ProviderError`` (no secret in the text)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise errors.ProviderTimeout(f"{provider}: {type(exc).__name__}") from None
    except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:  # never reached the upstream at all
        text = clip(str(exc), DETAIL_CHARS, secrets)
        raise errors.ProviderUnreachable(f"{provider}: cannot connect ({type(exc).__name__}: {text})") from None
    except (httpx.TransportError, httpx.StreamError) as exc:
        text = clip(str(exc), DETAIL_CHARS, secrets)
        raise errors.ProviderError(f"{provider}: connection failed ({type(exc).__name__}: {text})") from None
    except httpx_sse.SSEError as exc:
        text = clip(str(exc), DETAIL_CHARS, secrets)
        raise errors.ProviderError(f"{provider}: malformed event stream ({text})") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, KeyError, IndexError, TypeError,
            AttributeError) as exc:
        raise errors.ProviderError(f"{provider}: malformed response ({type(exc).__name__})") from None


# ---- the fold of a status-only check ----------------------------------------------------------------

class StatusOnly:
    """The status is the answer: the body is never read (a model list can be large)."""

    done = True

    def feed(self, data: str | bytes, event: str = "") -> str:
        return ""

    def result(self) -> None:
        return None


class _Result(Generic[T]):
    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


# ---- the transport --------------------------------------------------------------------------------

class HttpTransport:
    """One provider's HTTP client, gate and limits; every exchange of that provider goes through it."""

    def __init__(self, name: str, base_url: str, *, max_concurrency: int, max_body: int,
                 secrets: Callable[[], Sequence[str | None]] = tuple) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.max_body = max_body
        self._secrets = secrets
        self._max_connections = max_concurrency
        self._gate = trio.CapacityLimiter(max_concurrency)
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def configured(cls, name: str, base_url: str, cfg: ProviderConfig, server: ServerConfig | None,
                   secrets: Callable[[], Sequence[str | None]]) -> HttpTransport:
        """The transport of a provider section: its concurrency, and the server's body cap."""
        return cls(name, base_url, max_concurrency=cfg.max_concurrency,
                   max_body=(server or ServerConfig()).max_upstream_bytes, secrets=secrets)

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            n = self._max_connections
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
                headers={"accept-encoding": "identity"})
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

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
        async with self._gate:
            with _mapped(self.name, secrets):
                url = request.path if request.path.startswith("http") else base.rstrip("/") + request.path
                sent = self.client().build_request(
                    request.method, url, headers=headers, params=request.params,
                    content=msgspec.json.encode(request.body) if request.body is not None else None)
                if request.body is not None:
                    sent.headers["content-type"] = "application/json"
                response = await self.client().send(sent, stream=True)
                try:
                    length = response.headers.get("content-length", "")
                    if length.isascii() and length.isdigit() and int(length) > self.max_body:
                        raise too_large(self.name, self.max_body)
                    assert isinstance(response.stream, httpx.AsyncByteStream)
                    response.stream = CappedStream(response.stream, self.max_body, self.name)
                    if response.status_code >= 400:
                        body = await self._read_body(response)
                        raise error_for_status(self.name, response.status_code, body, response.headers,
                                               secrets, status_error)
                    if request.stream:
                        async for event in httpx_sse.EventSource(response).aiter_sse():
                            if piece := fold.feed(event.data, event.event):
                                yield piece
                            if fold.done:
                                break
                    elif not fold.done:
                        fold.feed(await self._read_body(response))
                    yield _Result(fold.result())
                finally:
                    await response.aclose()

    async def _read_body(self, response: httpx.Response) -> bytes:
        """The whole (decoded) body of ``response``, at most ``max_body`` bytes (else ``UpstreamTooLarge``)."""
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_body:
                raise too_large(self.name, self.max_body)
        return bytes(body)
