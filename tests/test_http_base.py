"""The HTTP transport against a real fake upstream: error mapping, SSE, cancellation, secrets, body
caps, and the httpcore pool-leak mitigation; and where HTTP providers find their keys."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import msgspec
import pytest
import trio

from llmsrv import errors, redact
from llmsrv.config import ProviderConfig
from llmsrv.providers.api import HttpApiProvider, HttpRow
from llmsrv.providers.auth import read_secret
from llmsrv.providers.codecs import HttpRequest
from llmsrv.providers.codecs.openai_chat import CODEC
from llmsrv.providers.http import HttpTransport

from .fakes import CANCEL_CLOSE_BOUND_S, FakeUpstream, Hang, Json, Raw, Request, Sse, cancel_when

CANARY = "sk-canary-7f3a9c1e"


PLAIN = HttpRow(name="plain", codec=CODEC, key_env=("PLAIN_API_KEY",))
DEFAULT_CAP = 16 * 2**20


class Plain(HttpTransport):
    """The transport as a provider sees it, with a few shorthands for these tests."""

    def __init__(self, url: str, *, secret: str | None = CANARY, max_concurrency: int = 64,
                 max_body: int = DEFAULT_CAP) -> None:
        super().__init__("plain", url, max_concurrency=max_concurrency, max_body=max_body,
                         secrets=lambda: (secret,))

    async def call_json(self, method: str, path: str, *, headers: Mapping[str, str], json: Any = None) -> Any:
        return await self.fetch(HttpRequest(method=method, path=path, body=json), lambda data: data, headers=headers)

    async def events(self, path: str) -> list[int]:
        """The ``n`` of every event of an SSE reply, into ``got`` as they come."""
        await self.exchange(HttpRequest(method="POST", path=path, body={}, stream=True), _Numbers(self.got),
                            headers={})
        return self.got

    got: list[int]


class _Numbers:
    """A fold that keeps the ``n`` of each event."""

    done = False

    def __init__(self, got: list[int]) -> None:
        self.got = got

    def feed(self, data: str | bytes, event: str = "") -> str:
        self.got.append(msgspec.json.decode(data)["n"])
        return ""

    def result(self) -> None:
        return None


def _provider(url: str, **cfg: Any) -> Plain:
    return Plain(url, **cfg)


@pytest.mark.parametrize(("reply", "error", "code"), [
    (Json({"error": {"message": "bad field"}}, status=400), errors.ValidationFailed, "VALIDATION_ERROR"),
    (Json({"error": {"message": f"key {CANARY} invalid"}}, status=401), errors.MissingCredentials,
     "MISSING_CREDENTIALS"),
    (Json({"error": {"message": "no"}}, status=403), errors.MissingCredentials, "MISSING_CREDENTIALS"),
    (Json({"error": {"message": "model x"}}, status=404), errors.ProviderNotFound, "PROVIDER_NOT_FOUND"),
    (Json({}, status=408), errors.ProviderTimeout, "PROVIDER_ERROR"),
    (Json({}, status=504), errors.ProviderTimeout, "PROVIDER_ERROR"),
    (Json({"error": {"message": "slow down"}}, status=429, headers={"retry-after": "7"}), errors.RateLimited,
     "RATE_LIMITED"),
    (Json({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}, status=429),
     errors.RateLimited, "RATE_LIMITED"),
    (Json({"error": "boom"}, status=500), errors.ProviderError, "PROVIDER_ERROR"),
    (Json({"error": "overloaded"}, status=529), errors.ProviderError, "PROVIDER_ERROR"),
    (Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"trunc"), errors.ProviderError, "PROVIDER_ERROR"),
    (Raw(b""), errors.ProviderError, "PROVIDER_ERROR"),
    (Json(b"not json at all"), errors.ProviderError, "PROVIDER_ERROR"),
], ids=["400", "401-echoes-key", "403", "404", "408", "504", "429", "429-google-retry-info",
        "500", "529", "truncated", "reset",
        "malformed"])
async def test_error_mapping(reply: object, error: type[Exception], code: str) -> None:
    async with FakeUpstream(lambda r: reply) as up:  # type: ignore[arg-type, return-value]
        provider = _provider(up.url)
        with pytest.raises(error) as info:
            await provider.call_json("POST", "/v1/x", headers={"authorization": f"Bearer {CANARY}"}, json={})
    assert info.value.error_code == code  # type: ignore[attr-defined]
    assert CANARY not in str(info.value)
    if code == "RATE_LIMITED":
        assert info.value.retry_after_ms == 7000  # type: ignore[attr-defined]


async def test_sse_events_and_cut_stream() -> None:
    events = [("message", {"n": i}) for i in range(5)]
    async with FakeUpstream(lambda r: Sse(events, cut_after=3 if r.path == "/cut" else None)) as up:
        provider = _provider(up.url)
        provider.got = []
        got = await provider.events("/ok")
        assert got == [0, 1, 2, 3, 4]
        provider.got = got = []
        with pytest.raises(errors.ProviderError):
            await provider.events("/cut")
        assert got == [0, 1, 2]


async def test_cancel_closes_the_upstream_connection() -> None:
    async with FakeUpstream(lambda r: Hang()) as up:
        provider = _provider(up.url)
        cancel = await cancel_when(up.wait_request, lambda: provider.call_json("POST", "/hang", headers={}, json={}))
        seen = await up.wait_disconnect()
    assert cancel.caught and cancel.at <= seen < cancel.at + CANCEL_CLOSE_BOUND_S


async def test_pool_survives_hundreds_of_cancellations_under_contention() -> None:
    # httpcore #1093 (1.0.9): cancelling requests waiting on a contended pool left orphan connection
    # entries and every later request failed with PoolTimeout. The transport has no such pool any more
    # (a trio gate, a stack of idle connections): the path stays tested.
    def handler(request: Request) -> Json | Hang:
        return Hang() if request.path == "/hang" else Json({"ok": True})

    async with FakeUpstream(handler) as up:
        provider = _provider(up.url, max_concurrency=4)
        for round_no in range(1, 6):
            async with trio.open_nursery() as nursery:
                for _ in range(60):
                    nursery.start_soon(partial(provider.call_json, "POST", "/hang", headers={}, json={}))
                await up.wait_request(4 * round_no)  # the pool is full: 4 calls upstream, 56 waiting
                nursery.cancel_scope.cancel()  # cancel them all, the waiting ones and those upstream
        await up.wait_disconnect(20)  # the cancelled calls really reached the upstream and left
        with trio.fail_after(5):
            results = [await provider.call_json("GET", "/ok", headers={}) for _ in range(10)]
    assert results == [{"ok": True}] * 10


def test_credentials_from_env_and_file(tmp_path: object) -> None:
    import pathlib

    secret = pathlib.Path(str(tmp_path)) / "key"
    secret.write_text(CANARY + "\n")
    assert read_secret({"A": "x"}, ["A"]) == ("x", None)
    assert read_secret({"A_FILE": str(secret)}, ["A"]) == (CANARY, None)
    assert read_secret({"B": "y"}, ["A", "B"]) == ("y", None)
    value, problem = read_secret({"A_FILE": "/nonexistent/key"}, ["A"])
    assert value is None and problem and "A_FILE" in problem
    missing = HttpApiProvider(PLAIN, ProviderConfig(base_url="http://x"), {})
    invalid = HttpApiProvider(PLAIN, ProviderConfig(base_url="http://x"), {"PLAIN_API_KEY_FILE": "/nonexistent"})
    assert (missing.status().state, invalid.status().state) == ("missing", "invalid")
    assert "PLAIN_API_KEY" in (missing.status().reason or "")


# ---- secrets cut after redaction, bodies capped (issue 7 items 2 and 4) -------------------------

LONG_CANARY = "sk-canary-Q7w2E9r4T1y8U3i6O0p5A2s7D4f9G1h6Xk4L"  # 46 characters, like a real key


def _windows(secret: str) -> list[str]:
    return [secret[i:i + 8] for i in range(len(secret) - 7)]


def _leaks(text: str, secret: str = LONG_CANARY) -> list[str]:
    return [w for w in _windows(secret) if w in text]


@pytest.mark.parametrize("offset", [0, 250, 270, 280, 290, 295, 299, 300, 301, 1000])
@pytest.mark.parametrize("shape", ["json", "text"])
async def test_error_detail_is_redacted_before_it_is_cut(offset: int, shape: str) -> None:
    message = "MARK" + "E" * offset + LONG_CANARY + " tail"
    body = msgspec.json.encode({"error": {"message": message}}) if shape == "json" else message.encode()
    async with FakeUpstream(lambda r: Json(body, status=500)) as up:
        provider = Plain(up.url, secret=LONG_CANARY)
        with pytest.raises(errors.ProviderError) as info:
            await provider.call_json("POST", "/x", headers={}, json={})
    text = info.value.message
    assert len(LONG_CANARY) == 46
    assert "answered HTTP 500: MARK" in text  # the upstream's text is there, minus the key
    assert _leaks(text) == [], text


async def test_deeply_nested_error_body_keeps_its_status_mapping() -> None:
    async with FakeUpstream(lambda r: Json(b"[" * 200000, status=401)) as up:
        with pytest.raises(errors.MissingCredentials) as info:
            await _provider(up.url).call_json("POST", "/x", headers={}, json={})
    assert "answered HTTP 401" in info.value.message


def _chunked(status: int, content_type: str, total: int) -> Raw:
    piece = b"a" * 100
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(total // 100))
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
    return Raw(head + chunks + b"0\r\n\r\n")


CAP = 1000


@pytest.mark.parametrize("reply", [
    Json(b'{"x": "' + b"a" * 2000 + b'"}'),
    Json(b'{"error": "' + b"a" * 2000 + b'"}', status=500),
    _chunked(200, "application/json", 5000),
    _chunked(500, "application/json", 5000),
], ids=["json-length", "error-length", "json-chunked", "error-chunked"])
async def test_a_body_over_the_cap_is_upstream_too_large(reply: Json | Raw) -> None:
    async with FakeUpstream(lambda r: reply) as up:
        provider = Plain(up.url, max_body=CAP)
        with pytest.raises(errors.UpstreamTooLarge) as info:
            await provider.call_json("POST", "/x", headers={}, json={})
    assert info.value.error_code == "PROVIDER_ERROR"
    assert "server.max_upstream_bytes" in info.value.message and str(CAP) in info.value.message
    assert up.requests[0].headers.get("accept-encoding") == "identity"


async def test_an_event_stream_over_the_cap_is_upstream_too_large() -> None:
    events = [("message", {"n": i, "pad": "p" * 50}) for i in range(100)]
    async with FakeUpstream(lambda r: Sse(events)) as up:
        provider = Plain(up.url, secret=None, max_body=CAP)
        provider.got = got = []
        with pytest.raises(errors.UpstreamTooLarge):
            await provider.events("/s")
    assert 0 < len(got) < 20  # the first events came through, the rest was never read


async def test_a_body_at_the_cap_is_read() -> None:
    body = b'{"x": "' + b"a" * (CAP - 10) + b'"}'
    assert len(body) == CAP - 1
    async with FakeUpstream(lambda r: Json(body)) as up:
        provider = Plain(up.url, secret=None, max_body=CAP)
        assert await provider.call_json("GET", "/x", headers={}) == {"x": "a" * (CAP - 10)}


def test_read_secret_registers_the_secret_for_the_log_filter() -> None:
    secret = "sk-registered-" + "r" * 20
    assert secret not in redact.registered()
    assert read_secret({"K": secret}, ["K"]) == (secret, None)
    assert secret in redact.registered()
    assert redact.redact_known(f"key={secret}.") == "key=***."
