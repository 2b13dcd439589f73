"""Real providers end to end: a NATS request routed to a provider whose upstream is a fake server.

Also the cross-cutting guarantee: a canary key never appears in replies or logs, whatever the
upstream echoes back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
import pytest

from llmsrv.messages import StreamChunk

from .conftest import running, user
from .fakes import FakeUpstream, Json, Request, Sse

CANARY = "sk-ant-canary-0c9d1e7a"
ENC = msgspec.json.encode


def _claude(request: Request) -> Json | Sse:
    if request.headers.get("x-api-key") != CANARY:
        return Json({"type": "error", "error": {"type": "authentication_error",
                                                "message": f"invalid x-api-key {request.headers.get('x-api-key')}"}},
                    status=401)
    if request.json().get("stream"):
        events: list[tuple[str, object]] = [
            ("message_start", {"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
                "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *[("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": piece}})
              for piece in ("Hel", "lo ", "there")],
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 3}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return Sse(events, interval_s=0.03)
    return Json({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                 "content": [{"type": "text", "text": "Hello there"}], "stop_reason": "end_turn",
                 "usage": {"input_tokens": 12, "output_tokens": 3}})


async def test_claude_over_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", CANARY)
    async with FakeUpstream(_claude) as up, running(nats_url, providers={"claude": {"base_url": up.url}}) as h:
        reply = await h.client.complete({"messages": user("hi"), "model": "claude:sonnet"})
        chunks: list[StreamChunk] = []
        streamed = await h.client.stream({"messages": user("hi"), "model": "claude:sonnet"}, chunks.append)
        auto = await h.client.complete({"messages": user("Design a distributed system architecture, step by step")})
    assert (reply.text, reply.model, reply.finish_reason) == ("Hello there", "claude:claude-sonnet-4-6", "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.tokens_used) == (12, 3, 15)
    assert reply.cost_cents == pytest.approx((12 * 3.0 + 3 * 15.0) / 1e6 * 100)  # default price table
    assert "".join(c.delta for c in chunks) == streamed.text == "Hello there" and len(chunks) >= 2
    assert auto.model == "claude:claude-sonnet-4-6"  # auto routing now finds a provider with credentials
    assert up.requests[0].json()["model"] == "claude-sonnet-4-6"


async def test_canary_key_never_in_replies_or_logs(nats_url: str, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ANTHROPIC_API_KEY", CANARY + "-wrong")  # the fake echoes the bad key back
    async with FakeUpstream(_claude) as up, running(nats_url, providers={"claude": {"base_url": up.url}}) as h:
        msg = await h.raw(ENC({"messages": user(), "model": "claude:sonnet"}))
        health = await h.client.request_json("health")
    body = msg.data.decode()
    assert "MISSING_CREDENTIALS" in body and "credentials refused" in body
    assert CANARY not in body and CANARY not in str(msg.headers) and CANARY not in str(health)
    assert CANARY not in caplog.text


def _openai_compatible(seen_auth: list[str | None]) -> Callable[[Request], Json | Sse]:
    """A chat-completions server that answers with a tool call (plain) or text (streamed)."""

    def handler(request: Request) -> Json | Sse:
        seen_auth.append(request.headers.get("authorization"))
        body = request.json()
        if body.get("stream"):
            def chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
                return {"id": "c", "object": "chat.completion.chunk", "model": body["model"],
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return Sse([chunk({"role": "assistant", "content": "str"}), chunk({"content": "eamed"}),
                        chunk({}, "stop"),
                        {"id": "c", "object": "chat.completion.chunk", "model": body["model"], "choices": [],
                         "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
                        "[DONE]"], interval_s=0.03)
        return Json({"id": "c", "object": "chat.completion", "model": body["model"], "choices": [{
            "index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}})

    return handler


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("key", "env", "model", "sent_model"), [
    ("openai_compat", None, "openai_compat:llama-3-8b", "llama-3-8b"),
    ("github", "GITHUB_TOKEN", "github:openai/gpt-4.1", "openai/gpt-4.1"),
    ("openrouter", "OPENROUTER_API_KEY", "openrouter:auto", "openrouter/auto"),
])
async def test_openai_compatible_providers_over_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch, key: str,
                                                     env: str | None, model: str, sent_model: str) -> None:
    for name in ("GITHUB_TOKEN", "GH_TOKEN", "OPENROUTER_API_KEY", "OPENAI_COMPAT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    if env:
        monkeypatch.setenv(env, CANARY)
    auth: list[str | None] = []
    async with FakeUpstream(_openai_compatible(auth)) as up, \
            running(nats_url, providers={key: {"base_url": up.url}}) as h:
        reply = await h.client.complete({"messages": user("weather in Oslo?"), "model": model, "tools": [TOOL]})
        chunks: list[StreamChunk] = []
        streamed = await h.client.stream({"messages": user("hi"), "model": model}, chunks.append)
    assert reply.finish_reason == "tool_calls" and reply.model == model
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [("call_1", "get_weather", '{"city": "Oslo"}')]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (9, 5)
    assert streamed.text == "streamed" == "".join(c.delta for c in chunks)
    assert (streamed.usage.prompt_tokens, streamed.usage.completion_tokens) == (4, 2)
    assert up.requests[0].json()["model"] == sent_model
    assert up.requests[0].json()["tools"][0]["function"]["name"] == "get_weather"
    assert auth[0] == (f"Bearer {CANARY}" if env else None)


# ---- a tool round trip and a refusal, end to end (CONTRACT sections 2 and 3) ------------------------

WEATHER = {"type": "function", "function": {"name": "weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Oslo and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_oslo", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_rome", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
    # answered in the other order: each result names its call
    {"role": "tool", "tool_call_id": "call_rome", "content": '{"celsius": 21}'},
    {"role": "tool", "tool_call_id": "call_oslo", "content": '{"celsius": 3}'},
]


def _chat_reply(message: dict[str, object], finish: str) -> Json:
    return Json({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
                 "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}})


async def test_a_tool_round_trip_over_nats_is_accepted_upstream(nats_url: str) -> None:
    from .upstream_rules import validating

    upstream = validating("openai_chat", lambda request: _chat_reply(
        {"content": "Oslo 3 C, Rome 21 C."}, "stop"))
    async with FakeUpstream(upstream) as up, \
            running(nats_url, providers={"openai_compat": {"base_url": up.url}}) as h:
        reply = await h.client.complete({"messages": ROUND_TRIP, "tools": [WEATHER], "model": "openai_compat:m"})
        bad = await h.error_of(ENC({"messages": ROUND_TRIP[:2] + [{"role": "tool", "tool_call_id": "call_x",
                                                                   "content": "1"}], "model": "openai_compat:m"}))
    assert upstream.problems == [], upstream.problems
    assert reply.text == "Oslo 3 C, Rome 21 C." and reply.finish_reason == "stop"
    sent = up.requests[0].json()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_oslo", "call_rome"]
    assert [m["tool_call_id"] for m in sent[2:]] == ["call_rome", "call_oslo"]
    # a tool turn answering no call is refused here, naming the field, before any upstream call
    assert bad["error_code"] == "VALIDATION_ERROR" and "$.messages[2].tool_call_id" in bad["error"]
    assert len(up.requests) == 1


async def test_a_refusal_over_nats_is_content_filter_with_its_text(nats_url: str) -> None:
    upstream = lambda request: _chat_reply({"content": None, "refusal": "I can't help with that."}, "stop")  # noqa: E731
    async with FakeUpstream(upstream) as up, \
            running(nats_url, providers={"openai_compat": {"base_url": up.url}}) as h:
        msg = await h.raw(ENC({"messages": user("something refused"), "model": "openai_compat:m"}))
        raw = msgspec.json.decode(msg.data)
        plain = await h.client.complete({"messages": user("hi"), "model": "openai_compat:m"})
    assert raw["finish_reason"] == "content_filter" and raw["refusal"] == "I can't help with that."
    assert raw["text"] == "" and len(up.requests) == 2
    assert plain.finish_reason == "content_filter"


async def test_an_exhausted_quota_moves_on_at_once_and_is_not_retried(nats_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-quota")
    quota = Json({"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                            "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}},
                 status=429, headers={"retry-after": "20"})
    matrix = {"general": {"simple": ["codex:gpt-4.1", "openai_compat:m"]}}
    async with FakeUpstream(lambda request: quota) as billing, \
            FakeUpstream(lambda request: _chat_reply({"content": "from the next one"}, "stop")) as other, \
            running(nats_url, routing={"matrix": matrix, "retry": {"max_attempts": 3}},
                    providers={"codex": {"base_url": billing.url}, "openai_compat": {"base_url": other.url}}) as h:
        moved = await h.client.complete({"messages": user("hi"), "complexity": "simple"})
        alone = await h.error_of(ENC({"messages": user("hi"), "model": "codex:gpt-4.1", "timeout_ms": 30000}))
    assert moved.text == "from the next one" and moved.model == "openai_compat:m"
    assert [(a.provider, a.outcome) for a in moved.attempts] == [("codex", "quota_exhausted"), ("openai_compat", "ok")]
    # alone, it is answered after one attempt: no backoff, no second try, no wait for the Retry-After
    assert alone["error_code"] == "PROVIDER_ERROR" and "quota" in alone["error"]
    assert [a["outcome"] for a in alone["attempts"]] == ["quota_exhausted"] and "retry_after_ms" not in alone
    assert len(billing.requests) == 2
