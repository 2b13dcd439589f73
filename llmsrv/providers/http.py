"""What every HTTP provider shares: credentials, one httpx client, error mapping, SSE.

Theory of operation
-------------------
* **Credentials** come from environment variables, first found wins, each also as ``NAME_FILE``
  (a path whose content is the secret, for Docker/Kubernetes secrets). ``[providers.X]
  api_key_env`` names another variable. The secret is never logged, put in an error or a reply:
  ``read_secret`` registers it with ``llmsrv.redact`` (the logging filter removes it from every
  log record), and every message built from an upstream body or error is redacted (every run of
  8 or more of the key's characters) before it is cut short (``redact.clip``).
* **Bodies are capped**: every upstream body (errors, JSON replies, the whole of an event stream)
  is read incrementally and counted; past ``[server] max_upstream_bytes`` (or with a larger
  ``Content-Length``) the exchange ends with ``UpstreamTooLarge`` and the connection is closed,
  so no more than about the cap is ever held. ``Accept-Encoding: identity`` is asked for, so the
  bytes counted are the bytes decoded (a plain body read through ``read_body`` is counted after
  decoding as well).
* **One ``httpx.AsyncClient`` per provider**, created lazily inside trio, HTTP/1.1 keep-alive,
  ``max_connections = max_concurrency``. httpcore 1.0.9 leaks pool entries when requests are
  cancelled while the pool is contended (its issue #1093; afterwards every request fails with
  ``PoolTimeout``): a ``trio.CapacityLimiter`` of the same size sits in front of the client so
  no request ever waits inside the pool.
* **No timeouts here** beyond connect: the caller owns the deadline with cancel scopes, and
  cancelling a request closes its connection (the upstream sees the disconnect).
* **Errors are mapped once**, here: HTTP status -> our error classes (400/422 caller error,
  401/403 credentials, 404 model, 408/504 timeout, 429 with ``Retry-After``, 5xx upstream), and
  httpx transport errors, malformed bodies and cut streams -> ``ProviderError``.
"""

from __future__ import annotations

import email.utils
import math
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import httpx_sse
import msgspec
import trio

from .. import errors
from ..config import ProviderConfig, ServerConfig
from ..redact import SCAN_CHARS, clip, register
from . import ProviderStatus

CONNECT_TIMEOUT_S = 10.0
DETAIL_CHARS = 300  # of an upstream error text, in our error messages
CAP_KEY = "server.max_upstream_bytes"


def read_secret(env: Mapping[str, str], names: Sequence[str]) -> tuple[str | None, str | None]:
    """(secret, problem): the first of ``names`` (or ``NAME_FILE``) that is set."""
    for name in names:
        if env.get(name):
            value = env[name].strip()
            register(value)
            return value, None
        path = env.get(f"{name}_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    value = fh.read().strip()
            except OSError as exc:
                return None, f"{name}_FILE is set but unreadable ({exc.strerror})"
            if not value:
                return None, f"{name}_FILE points to an empty file"
            register(value)
            return value, None
    return None, None


def too_large(provider: str, limit: int) -> errors.UpstreamTooLarge:
    return errors.UpstreamTooLarge(f"{provider}: the upstream body is larger than {limit} bytes "
                                   f"({CAP_KEY}); not read further")


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


def retry_after_ms(headers: httpx.Headers) -> int | None:
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


def _retry_info_ms(body: bytes) -> int | None:
    """Google APIs put the retry hint in the body: ``error.details[] RetryInfo.retryDelay = "36s"``."""
    try:
        details = msgspec.json.decode(body)["error"]["details"]
        for item in details:
            if str(item.get("@type", "")).endswith("RetryInfo"):
                return max(1, math.ceil(float(str(item["retryDelay"]).rstrip("s")) * 1000))
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
        pass
    return None


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


def error_for_status(provider: str, status: int, body: bytes, headers: httpx.Headers,
                     secrets: Sequence[str | None] = ()) -> errors.LlmsrvError:
    detail = _detail(body, secrets)
    where = f"{provider} answered HTTP {status}: {detail}" if detail else f"{provider} answered HTTP {status}"
    if status in (400, 413, 422):
        return errors.ValidationFailed(f"the request was rejected upstream: {where}")
    if status in (401, 403):
        return errors.MissingCredentials(f"credentials refused: {where}")
    if status == 404:
        return errors.ProviderNotFound(f"model or endpoint not found: {where}")
    if status in (408, 504):
        return errors.ProviderTimeout(where)
    if status == 429:
        return errors.RateLimited(where, retry_after_ms=retry_after_ms(headers) or _retry_info_ms(body))
    return errors.ProviderError(where, retry_after_ms=retry_after_ms(headers) if status == 503 else None)


@contextmanager
def map_transport_errors(provider: str, secrets: Sequence[str | None] = ()) -> Iterator[None]:
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
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, KeyError, IndexError, TypeError) as exc:
        raise errors.ProviderError(f"{provider}: malformed response ({type(exc).__name__})") from None


class HttpProvider:
    """Base of the HTTP providers; subclasses set the class attributes and implement ``complete``."""

    name = ""
    key_env: tuple[str, ...] = ()  # environment variables holding the key, first found wins
    key_required = True
    default_base_url = ""

    def __init__(self, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *,
                 server: ServerConfig | None = None) -> None:
        env = os.environ if env is None else env
        self.cfg = cfg
        self.max_body = (server or ServerConfig()).max_upstream_bytes
        self.base_url = (cfg.base_url or self.default_base_url).rstrip("/")
        names = ((cfg.api_key_env,) if cfg.api_key_env else ()) + self.key_env
        self.key, self._problem = read_secret(env, names)
        self._gate = trio.CapacityLimiter(cfg.max_concurrency)
        self._client: httpx.AsyncClient | None = None

    # ---- state -------------------------------------------------------------------------------

    def status(self) -> ProviderStatus:
        if self._problem:
            return ProviderStatus(False, self._problem, state="invalid")
        if self.key is None and self.key_required:
            names = " or ".join(((self.cfg.api_key_env,) if self.cfg.api_key_env else ()) + self.key_env)
            return ProviderStatus(False, f"no credentials: set {names} (or {names.split(' or ')[0]}_FILE)",
                                  state="missing")
        if not self.base_url:
            return ProviderStatus(False, "no base_url configured", state="missing")
        return ProviderStatus(True)

    def has_model(self, model: str) -> bool:
        return True

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self.key,)

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            n = self.cfg.max_concurrency
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
                headers={"accept-encoding": "identity"})
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # ---- exchanges ---------------------------------------------------------------------------

    @asynccontextmanager
    async def open(self, method: str, url: str, *, headers: Mapping[str, str],
                   json: Any = None, params: Mapping[str, str] | None = None) -> AsyncIterator[httpx.Response]:
        """A streamed response with a 2xx status (others raise the mapped error); closed on exit."""
        async with self._gate:
            with map_transport_errors(self.name, self.secrets):
                request = self.client().build_request(
                    method, url if url.startswith("http") else self.base_url + url,
                    headers=headers, params=params,
                    content=msgspec.json.encode(json) if json is not None else None)
                if json is not None:
                    request.headers["content-type"] = "application/json"
                response = await self.client().send(request, stream=True)
                try:
                    length = response.headers.get("content-length", "")
                    if length.isascii() and length.isdigit() and int(length) > self.max_body:
                        raise too_large(self.name, self.max_body)
                    assert isinstance(response.stream, httpx.AsyncByteStream)
                    response.stream = CappedStream(response.stream, self.max_body, self.name)
                    if response.status_code >= 400:
                        body = await self.read_body(response)
                        raise error_for_status(self.name, response.status_code, body, response.headers,
                                               self.secrets)
                    yield response
                finally:
                    await response.aclose()

    async def call_json(self, method: str, url: str, *, headers: Mapping[str, str], json: Any = None,
                        params: Mapping[str, str] | None = None) -> Any:
        async with self.open(method, url, headers=headers, json=json, params=params) as response:
            body = await self.read_body(response)
            with map_transport_errors(self.name, self.secrets):
                return msgspec.json.decode(body)

    async def read_body(self, response: httpx.Response) -> bytes:
        """The whole (decoded) body of ``response``, at most ``max_body`` bytes (else ``UpstreamTooLarge``)."""
        body = bytearray()
        with map_transport_errors(self.name, self.secrets):
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_body:
                    raise too_large(self.name, self.max_body)
        return bytes(body)

    async def events(self, response: httpx.Response) -> AsyncIterator[httpx_sse.ServerSentEvent]:
        """The server-sent events of ``response`` (errors mapped; a cut stream raises)."""
        with map_transport_errors(self.name, self.secrets):
            async for event in httpx_sse.EventSource(response).aiter_sse():
                yield event
