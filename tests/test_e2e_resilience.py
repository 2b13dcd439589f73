"""Routing and resilience end to end over a real nats-server, with the mock provider failing."""

from __future__ import annotations

import msgspec
import pytest
import trio

from .conftest import running, user

ENC = msgspec.json.encode


async def test_fallback_shows_every_attempt(nats_url: str) -> None:
    matrix = {"general": {"simple": ["mock:fail", "mock:echo"]}}
    async with running(nats_url, routing={"matrix": matrix}) as h:
        reply = await h.client.complete({"messages": user("what is up"), "complexity": "simple"})
    assert reply.text == "what is up" and reply.model == "mock:echo"
    assert [(a.provider, a.model, a.outcome) for a in reply.attempts] == [
        ("mock", "fail", "provider_error"), ("mock", "echo", "ok")]


@pytest.mark.parametrize("scope", ["provider", "model"])
async def test_failures_open_the_breaker_then_circuit_open(nats_url: str, scope: str) -> None:
    async with running(nats_url, providers={"mock": {"error_rate": 1.0, "breaker_threshold": 2,
                                                     "breaker_ttl_s": 30, "breaker_scope": scope}},
                       routing={"retry": {"max_attempts": 1}}) as h:
        first = await h.error_of(ENC({"messages": user(), "model": "mock:echo"}))
        second = await h.error_of(ENC({"messages": user(), "model": "mock:echo"}))
        third = await h.error_of(ENC({"messages": user(), "model": "mock:echo"}))
        health = await h.client.request_json("health")
        calls = h.service.providers["mock"].statistics().calls  # type: ignore[attr-defined]
        metrics = h.service.metrics.render().decode()
    assert first["error_code"] == second["error_code"] == "PROVIDER_ERROR"
    assert first["attempts"][0]["outcome"] == "provider_error"
    assert third["error_code"] == "CIRCUIT_OPEN" and third["_headers"]["Nats-Service-Error-Code"] == "503"
    assert 29000 < third["retry_after_ms"] <= 30000
    assert calls == 2  # the open breaker kept the third request away from the provider
    if scope == "provider":
        assert health["providers"]["mock"]["breaker"] == "open"
    else:  # only mock:echo's own breaker opened; the provider's stays closed for its other models
        assert health["providers"]["mock"]["breaker"] == "closed"
        assert health["providers"]["mock"]["models"] == {"echo": "open"}
    assert 'llmsrv_breaker_transitions_total{provider="mock",to="open"} 1.0' in metrics


async def test_deadline_expiry_is_not_a_breaker_failure(nats_url: str) -> None:
    async with running(nats_url, providers={"mock": {"latency_ms": 2000, "breaker_threshold": 1}}) as h:
        for _ in range(3):
            err = await h.error_of(ENC({"messages": user(), "model": "mock:echo", "timeout_ms": 50}))
            assert err["error_code"] == "TIMEOUT"
        assert h.service.pipeline.guards["mock"].breaker.state == "closed"


async def test_attempt_timeout_falls_back(nats_url: str) -> None:
    matrix = {"general": {"simple": ["mock:lorem", "mock:echo"]}}
    async with running(nats_url, routing={"matrix": matrix},
                       providers={"mock": {"tokens_per_second": 10, "timeout_ms": 200}}) as h:
        start = trio.current_time()
        reply = await h.client.complete({"messages": user("short"), "complexity": "simple",
                                         "max_tokens": 50, "timeout_ms": 5000})
    assert reply.model == "mock:echo" and trio.current_time() - start < 2
    assert [a.outcome for a in reply.attempts] == ["timeout", "ok"]


async def test_rate_limited_with_retry_after(nats_url: str) -> None:
    async with running(nats_url, providers={"mock": {"rpm": "2/hour"}}) as h:
        for _ in range(2):
            await h.client.complete({"messages": user(), "model": "mock:echo"})
        err = await h.error_of(ENC({"messages": user(), "model": "mock:echo", "timeout_ms": 1000}))
    assert err["error_code"] == "RATE_LIMITED" and err["_headers"]["Nats-Service-Error-Code"] == "429"
    assert 0 < err["retry_after_ms"] <= 3600000  # an hour window: no window boundary mid-test


async def test_resilience_can_be_switched_off(nats_url: str) -> None:
    async with running(nats_url, routing={"resilience": False},
                       providers={"mock": {"rpm": "1/minute"}}) as h:
        for _ in range(3):
            reply = await h.client.complete({"messages": user("x"), "model": "mock:echo"})
            assert reply.attempts[0].outcome == "ok"
