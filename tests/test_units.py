"""Pure modules (table-driven, no event loop) and trio pieces on virtual time."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsrv import errors, messages
from llmsrv.config import ConfigError, MockConfig, build_config
from llmsrv.messages import LLMRequest, Message
from llmsrv.providers import Call
from llmsrv.providers.mock import MockProvider
from llmsrv.streaming import Streamer

CFG = build_config({}, env={})

# ---- decoder properties -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)
request_like = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                                 "content": st.text(max_size=20)}), max_size=3)},
    optional={"model": st.text(max_size=10), "max_tokens": st.integers(-5, 200000),
              "temperature": st.floats(-1, 3, allow_nan=False), "stream": json_values,
              "correlation_id": st.text(max_size=140), "tools": json_values, "timeout_ms": json_values,
              "task_type": st.sampled_from(["general", "qa", "planner", "nope"]),
              "capabilities": st.lists(st.sampled_from(["code", "speed", "x"]), max_size=3)})
request_like = st.tuples(request_like, st.dictionaries(st.text(min_size=1, max_size=8), json_values,
                                                       max_size=2)).map(lambda t: {**t[1], **t[0]})


def _decode_only_typed(data: bytes) -> None:
    try:
        request = messages.decode_request(data)
    except errors.RequestError as exc:
        assert exc.error_code in ("INVALID_JSON", "VALIDATION_ERROR", "INVALID_TOOL")
        assert exc.message
    else:
        assert isinstance(request, LLMRequest) and request.messages


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_arbitrary_bytes(data: bytes) -> None:
    _decode_only_typed(data)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_decoder_arbitrary_json(value: Any) -> None:
    _decode_only_typed(msgspec.json.encode(value))


@settings(max_examples=400, deadline=None)
@given(request_like)
def test_decoder_request_shaped_json(value: dict[str, Any]) -> None:
    _decode_only_typed(msgspec.json.encode(value))


def test_decoder_defaults() -> None:
    r = messages.decode_request(b'{"messages":[{"role":"user","content":"x"}]}')
    assert (r.model, r.max_tokens, r.temperature) == ("auto", 4000, 0.7)
    assert (r.stream, r.task_type) == (False, "general")
    assert r.correlation_id is None and r.timeout_ms is None


def test_error_reply_shape() -> None:
    exc = errors.RateLimited("slow down\nplease", retry_after_ms=1500)
    body = msgspec.json.decode(messages.error_body(exc, "c1"))
    assert body["error_code"] == "RATE_LIMITED" and body["retry_after_ms"] == 1500
    assert messages.error_headers(exc) == {"Nats-Service-Error": "slow down please",
                                           "Nats-Service-Error-Code": "429"}
    assert "retry_after_ms" not in msgspec.json.decode(messages.error_body(errors.Timeout("t"), "c"))


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "env", "fragment"), [
    ({"server": {"max_inflight": 0}}, {}, "`server.max_inflight`"),
    ({"server": {"http_port": 70000}}, {}, "`server.http_port`"),
    ({"server": {"default_timeout_ms": 5000, "max_timeout_ms": 1000}}, {}, "`server.default_timeout_ms`"),
    ({"nats": {"subject_prefix": "a b"}}, {}, "`nats.subject_prefix`"),
    ({"providers": {"acme": {}}}, {}, "acme"),
    ({"routing": {"matrix": {"qa": {"simple": "mock:echo"}}}}, {}, "`routing.matrix.qa.simple`"),
    ({}, {"LLMSRV__SERVER__MAX_INFLIGHT": "lots"}, "`server.max_inflight`"),
], ids=["range", "port", "timeouts", "prefix", "unknown-provider", "cell-type", "env"])
def test_config_errors_name_the_key(data: dict[str, Any], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        build_config(data, env=env)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("file_url", "env", "expected"), [
    (None, {}, None),  # nothing anywhere: llmsrv serve embeds a nats-server
    (None, {"NATS_URL": "nats://pred:4222"}, "nats://pred:4222"),  # the predecessor's variable
    ("nats://file:4222", {"NATS_URL": "nats://pred:4222"}, "nats://pred:4222"),
    ("nats://file:4222", {}, "nats://file:4222"),
    (None, {"NATS_URL": "nats://pred:4222", "LLMSRV_NATS_URL": "nats://ours:4222"}, "nats://ours:4222"),
    (None, {"NATS_URL": "nats://pred:4222", "LLMSRV__NATS__URL": "nats://key:4222"}, "nats://key:4222"),
    (None, {"NATS_URL": ""}, None),
], ids=["none", "nats-url", "nats-url-over-file", "file", "llmsrv-nats-url-wins", "key-override-wins", "empty"])
def test_nats_url_precedence(file_url: str | None, env: dict[str, str], expected: str | None) -> None:
    data = {"nats": {"url": file_url}} if file_url else {}
    assert build_config(data, env=env).nats.url == expected


def test_config_merges_cells_and_env() -> None:
    cfg = build_config({"routing": {"matrix": {"general": {"simple": ["mock:lorem"]}}}},
                       env={"LLMSRV__PROVIDERS__MOCK__LATENCY_MS": "25", "LLMSRV_NATS_URL": "nats://h:1"})
    assert cfg.routing.matrix.general.simple == ["mock:lorem"]
    assert cfg.routing.matrix.general.medium == CFG.routing.matrix.general.medium
    assert cfg.providers.mock.latency_ms == 25 and cfg.nats.url == "nats://h:1"


# ---- mock provider on virtual time ------------------------------------------------------------

def _call(model: str = "lorem", max_tokens: int = 10) -> Call:
    return Call(model=model, messages=[Message("user", "one two three")], max_tokens=max_tokens,
                temperature=0.7)


async def test_mock_token_rate_timeline(autojump_clock: trio.testing.MockClock) -> None:
    mock = MockProvider(MockConfig(latency_ms=100, tokens_per_second=20))
    seen: list[tuple[float, str]] = []
    start = trio.current_time()
    result = await mock.complete(_call(max_tokens=4), lambda d: seen.append((trio.current_time() - start, d)))
    assert [round(t, 3) for t, _ in seen] == [0.15, 0.2, 0.25, 0.3]
    assert "".join(d for _, d in seen) == result.text == "lorem ipsum dolor sit"
    assert result.usage.completion_tokens == 4 and result.finish_reason == "length"


async def test_mock_cancellation_is_recorded(autojump_clock: trio.testing.MockClock) -> None:
    mock = MockProvider(MockConfig(latency_ms=1000))
    with trio.move_on_after(0.25):
        await mock.complete(_call("echo"))
    stats = mock.statistics()
    assert (stats.calls, stats.cancelled, stats.completed) == (1, 1, 0)
    assert stats.last_cancelled_at == pytest.approx(trio.current_time())


async def test_mock_errors_and_unknown_model() -> None:
    failing = MockProvider(MockConfig(error_rate=1.0))
    with pytest.raises(errors.ProviderError):
        await failing.complete(_call("echo"))
    assert failing.statistics().failed == 1
    with pytest.raises(errors.ProviderNotFound):
        await failing.complete(_call("gpt"))


async def test_mock_echo_returns_last_user_message() -> None:
    call = Call(model="echo", messages=[Message("user", "first"), Message("assistant", "a"),
                                        Message("user", "last  one")], max_tokens=5, temperature=0)
    assert (await MockProvider(MockConfig()).complete(call)).text == "last  one"


# ---- stream coalescing on virtual time ---------------------------------------------------------

async def test_streamer_first_chunk_at_once_then_every_interval(
        autojump_clock: trio.testing.MockClock) -> None:
    sent: list[tuple[float, dict[str, Any]]] = []
    start = trio.current_time()
    streamer = Streamer(lambda b: sent.append((trio.current_time() - start, msgspec.json.decode(b))),
                        "c", 0.025)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(streamer.run)
        for _ in range(10):  # a token every 10 ms
            streamer.on_delta("t")
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    streamer.flush()
    times = [round(t, 3) for t, _ in sent]
    assert times == [0.0, 0.025, 0.05, 0.075, 0.1]
    assert [c["seq"] for _, c in sent] == [0, 1, 2, 3, 4]
    assert "".join(c["delta"] for _, c in sent) == "t" * 10


def test_tool_call_id_reaches_openai_shapes() -> None:
    from llmsrv.providers import Call
    from llmsrv.providers.codecs.openai_chat import chat_body
    from llmsrv.providers.codecs.openai_responses import responses_body

    request = messages.decode_request(msgspec.json.encode({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function",
                                               "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_9"}]}))
    call = Call(model="gpt-4o", messages=request.messages, max_tokens=10, temperature=0.1)
    assert chat_body(call, "gpt-4o", stream=False)["messages"][2] == {
        "role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_9"}
    assert responses_body(call, stream=False)["input"][-1] == {
        "type": "function_call_output", "call_id": "call_9", "output": '{"temp": 3}'}


@pytest.mark.parametrize(("turns", "where"), [
    ([{"role": "user", "content": ""}], "$.messages[0].content"),
    ([{"role": "assistant", "content": ""}], "$.messages[0].content"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "$.messages[0].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "$.messages[0].tool_calls"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "3"}], "$.messages[1].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "3", "tool_call_id": "c9"}],
     "$.messages[1].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}],
     "$.messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}],
     "$.messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "no space", "arguments": "{}"}}]}],
     "$.messages[0].tool_calls[0].function.name"),
], ids=["empty-user", "empty-assistant", "id-on-user", "calls-on-user", "tool-without-id", "tool-unknown-id",
        "arguments-not-object", "arguments-not-json", "bad-name"])
def test_conversation_rules(turns: list[dict[str, object]], where: str) -> None:
    with pytest.raises(errors.ValidationFailed) as info:
        messages.decode_request(msgspec.json.encode({"messages": turns}))
    assert f"at `{where}`" in info.value.message


def test_a_tool_round_trip_answered_in_any_order_decodes() -> None:
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": f'{{"i": {i}}}'}}
             for i in range(2)]
    request = messages.decode_request(msgspec.json.encode({"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "1", "tool_call_id": "c1"},
        {"role": "tool", "content": "0", "tool_call_id": "c0"}]}))
    assistant = request.messages[1]
    assert assistant.tool_calls is not None and [c.id for c in assistant.tool_calls] == ["c0", "c1"]
    assert [m.tool_call_id for m in request.messages[2:]] == ["c1", "c0"]
