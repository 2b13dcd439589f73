"""The shared HTTP provider machinery against a real fake upstream: error mapping, SSE, cancellation,
secrets, and the httpcore pool-leak mitigation."""

from __future__ import annotations

import pytest
import trio

from llmsrv import errors
from llmsrv.config import ProviderConfig
from llmsrv.providers.http import HttpProvider, read_secret

from .fakes import FakeUpstream, Hang, Json, Raw, Request, Sse

CANARY = "sk-canary-7f3a9c1e"


class Plain(HttpProvider):
    name = "plain"
    key_env = ("PLAIN_API_KEY",)


def _provider(url: str, **cfg: object) -> Plain:
    return Plain(ProviderConfig(base_url=url, **cfg), {"PLAIN_API_KEY": CANARY})  # type: ignore[arg-type]


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
        got = []
        async with provider.open("POST", "/ok", headers={}, json={}) as response:
            async for event in provider.events(response):
                got.append(event.json()["n"])
        assert got == [0, 1, 2, 3, 4]
        got = []
        with pytest.raises(errors.ProviderError):
            async with provider.open("POST", "/cut", headers={}, json={}) as response:
                async for event in provider.events(response):
                    got.append(event.json()["n"])
        assert got == [0, 1, 2]


async def test_cancel_closes_the_upstream_connection() -> None:
    async with FakeUpstream(lambda r: Hang()) as up:
        provider = _provider(up.url)
        with trio.move_on_after(0.3):
            await provider.call_json("POST", "/hang", headers={}, json={})
        cancelled_at = trio.current_time()
        seen = await up.wait_disconnect()
    assert seen - cancelled_at < 0.05


async def test_pool_survives_hundreds_of_cancellations_under_contention() -> None:
    # httpcore #1093: cancelling requests waiting on a contended pool used to leave orphan
    # connection entries and every later request failed with PoolTimeout.
    def handler(request: Request) -> Json | Hang:
        return Hang() if request.path == "/hang" else Json({"ok": True})

    async with FakeUpstream(handler) as up:
        provider = _provider(up.url, max_concurrency=4)
        for _ in range(5):
            async with trio.open_nursery() as nursery:
                for _ in range(60):
                    async def one() -> None:
                        with trio.move_on_after(0.05):
                            await provider.call_json("POST", "/hang", headers={}, json={})
                    nursery.start_soon(one)
        with trio.fail_after(5):
            results = [await provider.call_json("GET", "/ok", headers={}) for _ in range(10)]
    assert results == [{"ok": True}] * 10
    assert len(up.disconnects) >= 4  # the cancelled calls really reached the upstream and left


def test_credentials_from_env_and_file(tmp_path: object) -> None:
    import pathlib

    secret = pathlib.Path(str(tmp_path)) / "key"
    secret.write_text(CANARY + "\n")
    assert read_secret({"A": "x"}, ["A"]) == ("x", None)
    assert read_secret({"A_FILE": str(secret)}, ["A"]) == (CANARY, None)
    assert read_secret({"B": "y"}, ["A", "B"]) == ("y", None)
    value, problem = read_secret({"A_FILE": "/nonexistent/key"}, ["A"])
    assert value is None and problem and "A_FILE" in problem
    missing = Plain(ProviderConfig(base_url="http://x"), {})
    invalid = Plain(ProviderConfig(base_url="http://x"), {"PLAIN_API_KEY_FILE": "/nonexistent"})
    assert (missing.status().state, invalid.status().state) == ("missing", "invalid")
    assert "PLAIN_API_KEY" in (missing.status().reason or "")
