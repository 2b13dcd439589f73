"""The claude provider: pure translation tables and properties, then the wire against a real fake
Anthropic upstream (plain JSON, SSE streams, stream errors, cut streams, HTTP errors, probe,
cancellation)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsrv import errors
from llmsrv.config import ProviderConfig, build_config
from llmsrv.messages import FunctionDef, Message, Tool
from llmsrv.providers import Call
from llmsrv.providers.api import HttpApiProvider
from llmsrv.providers.codecs import Origin
from llmsrv.providers.codecs.anthropic import StreamFold, finish_reason, request_body
from llmsrv.providers.registry import build_provider, build_providers

from .fakes import CANCEL_CLOSE_BOUND_S, Deltas, FakeUpstream, Hang, Json, Request, Sse, cancel_when

CANARY = "sk-ant-canary-5d1e2b"


def _call(*messages: tuple[str, str], **kw: Any) -> Call:
    fields: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100, "temperature": 0.7, **kw}
    return Call(messages=[Message(role, content) for role, content in messages], **fields)  # type: ignore[arg-type]


def _provider(url: str, env: dict[str, str] | None = None) -> HttpApiProvider:
    return build_provider("claude", ProviderConfig(base_url=url), {"ANTHROPIC_API_KEY": CANARY} if env is None else env)


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def use(id_: str, name: str = "f", **input_: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": id_, "name": name, "input": input_}


def result(id_: str, content: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": id_, "content": content}


OPENAI_TURN = _json({"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]})
LLMSRV_REPLY = _json({"text": "Checking.", "model": "claude:claude-sonnet-4-5", "tool_calls": [
    {"id": "toolu_a", "name": "f", "arguments": '{"x":1}', "type": "function"},
    {"id": "toolu_b", "name": "f", "arguments": '{"x":2}', "type": "function"}]})

# ---- request translation (pure) ----------------------------------------------------------------


@pytest.mark.parametrize(("messages", "system", "turns"), [
    ([("system", "be brief"), ("user", "hi"), ("system", "be kind")], "be brief\n\nbe kind",
     [("user", [text("hi")])]),
    ([("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d"), ("user", "e")], None,
     [("user", [text("a"), text("b")]), ("assistant", [text("c"), text("d")]), ("user", [text("e")])]),
    ([("user", "weather?"), ("assistant", OPENAI_TURN), ("tool", "-3C")], None,
     [("user", [text("weather?")]), ("assistant", [use("call_1", "weather", city="Oslo")]),
      ("user", [result("call_1", "-3C")])]),
    ([("user", "q"), ("assistant", LLMSRV_REPLY), ("tool", _json({"tool_call_id": "toolu_b", "content": "B"})),
      ("tool", "A")], None,
     [("user", [text("q")]), ("assistant", [text("Checking."), use("toolu_a", x=1), use("toolu_b", x=2)]),
      ("user", [result("toolu_b", "B"), result("toolu_a", "A")])]),
    ([("user", "q"), ("assistant", OPENAI_TURN), ("user", "also this"), ("tool", "-3C")], None,
     [("user", [text("q")]), ("assistant", [use("call_1", "weather", city="Oslo")]),
      ("user", [result("call_1", "-3C"), text("also this")])]),
    ([("user", "q"), ("tool", "42")], None, [("user", [text("q"), text("Tool result:\n42")])]),
    ([("user", "q"), ("assistant", OPENAI_TURN), ("tool", "1"), ("tool", "2")], None,
     [("user", [text("q")]), ("assistant", [use("call_1", "weather", city="Oslo")]),
      ("user", [result("call_1", "1"), text("Tool result:\n2")])]),
    ([("user", "q"), ("assistant", OPENAI_TURN), ("tool", _json({"tool_call_id": "nope", "content": {"t": 1}}))],
     None, [("user", [text("q")]), ("assistant", [use("call_1", "weather", city="Oslo")]),
            ("user", [text('Tool result (nope):\n{"t":1}')])]),
    ([("user", "q"), ("assistant", '{"tool_calls": "not a list"}')], None,
     [("user", [text("q")]), ("assistant", [text('{"tool_calls": "not a list"}')])]),
    ([("user", "list three"), ("assistant", "1. ")], None,
     [("user", [text("list three")]), ("assistant", [text("1.")])]),
    ([("user", "q"), ("assistant", "   ")], None, [("user", [text("q")])]),
], ids=["system-joined", "same-role-merged", "openai-tool-turn", "llmsrv-reply-parallel-named",
        "results-before-text", "orphan-tool-as-text", "surplus-result-as-text", "unknown-id-as-text",
        "malformed-tool-calls-is-text", "prefill-rstripped", "blank-prefill-dropped"])
def test_request_translation(messages: list[tuple[str, str]], system: str | None,
                             turns: list[tuple[str, list[dict[str, Any]]]]) -> None:
    body = request_body(_call(*messages))
    assert body.get("system") == system
    assert body["messages"] == [{"role": role, "content": content} for role, content in turns]


def test_sampling_and_tools() -> None:
    tools = [Tool("function", FunctionDef("weather", "Current weather",
                                          {"type": "object", "properties": {"city": {"type": "string"}}})),
             Tool("function", FunctionDef("now"))]
    body = request_body(_call(("user", "hi"), max_tokens=321, temperature=0.3, tools=tools))
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("claude-sonnet-4-5", 321, 0.3)
    assert "stream" not in body
    assert body["tools"] == [
        {"name": "weather", "description": "Current weather",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "now", "input_schema": {"type": "object"}}]
    assert request_body(_call(("user", "hi"), temperature=1.7))["temperature"] == 1.0  # Anthropic's max
    assert "tools" not in request_body(_call(("user", "hi")))


def test_only_system_messages_is_a_caller_error() -> None:
    with pytest.raises(errors.ValidationFailed):
        request_body(_call(("system", "you are terse")))


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), (None, "stop"), ("something_new", "stop")])
def test_finish_reason(stop: str | None, finish: str) -> None:
    assert finish_reason(stop) == finish


def _tool_turn(ids: list[str]) -> str:
    return _json({"content": "", "tool_calls": [{"id": i, "function": {"name": "f", "arguments": "{}"}} for i in ids]})


conversation = st.lists(st.one_of(
    st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), st.sampled_from(["x", "y z ", "{"])),
    st.tuples(st.just("assistant"), st.lists(st.sampled_from(["t1", "t2", "t3"]), min_size=1, max_size=3,
                                              unique=True).map(_tool_turn)),
    st.tuples(st.just("tool"), st.sampled_from(["t1", "t2", "t9"]).map(
        lambda i: _json({"tool_call_id": i, "content": "r"}))),
), min_size=1, max_size=12).filter(lambda ms: any(r != "system" for r, _ in ms))


@settings(max_examples=300, deadline=None)
@given(conversation)
def test_translation_keeps_the_api_rules(messages: list[tuple[str, str]]) -> None:
    try:
        turns = request_body(_call(*messages))["messages"]
    except errors.ValidationFailed:  # only a blank prefill was left
        return
    roles = [t["role"] for t in turns]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # turns alternate
    for i, turn in enumerate(turns):
        kinds = [b["type"] for b in turn["content"]]
        assert kinds, "no empty turn"
        assert kinds == sorted(kinds, key=lambda k: k != "tool_result")  # results before any text
        answered = [b["tool_use_id"] for b in turn["content"] if b["type"] == "tool_result"]
        if answered:  # each answers a distinct tool_use of the turn just before
            asked = {b["id"] for b in turns[i - 1]["content"] if b["type"] == "tool_use"} if i else set()
            assert len(set(answered)) == len(answered) and set(answered) <= asked
    if turns[-1]["role"] == "assistant" and turns[-1]["content"][-1]["type"] == "text":
        assert turns[-1]["content"][-1]["text"] == turns[-1]["content"][-1]["text"].rstrip()


# ---- stream folding (pure) ---------------------------------------------------------------------


def _start(input_tokens: int = 25, **extra: int) -> tuple[str, dict[str, Any]]:
    return ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                                                              **extra}}})


def _ev(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return (kind, {"type": kind, **fields})


def _text_delta(index: int, piece: str) -> tuple[str, dict[str, Any]]:
    return _ev("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})


def _json_delta(index: int, piece: str) -> tuple[str, dict[str, Any]]:
    return _ev("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": piece})


TOOL_STREAM = [
    _start(472),
    _ev("ping"),
    _ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    _text_delta(0, "Let me "), _text_delta(0, "check."),
    _ev("content_block_stop", index=0),
    _ev("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_01", "name": "weather",
                                                       "input": {}}),
    _json_delta(1, ""), _json_delta(1, '{"city": "San'), _json_delta(1, ' Francisco", "unit": "c"}'),
    _ev("content_block_stop", index=1),
    _ev("content_block_start", index=2, content_block={"type": "tool_use", "id": "toolu_02", "name": "now",
                                                       "input": {}}),
    _ev("content_block_stop", index=2),
    _ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 89}),
    _ev("message_stop"),
]


def test_stream_assembler_folds_text_tools_and_usage() -> None:
    stream = StreamFold()
    deltas = [piece for _, data in TOOL_STREAM if (piece := stream.feed(_json(data)))]
    done = stream.result()
    assert deltas == ["Let me ", "check."] and done.text == "Let me check."
    assert [(c.id, c.name, c.arguments) for c in done.tool_calls] == [
        ("toolu_01", "weather", '{"city":"San Francisco","unit":"c"}'), ("toolu_02", "now", "{}")]
    assert (done.finish_reason, done.usage.prompt_tokens, done.usage.completion_tokens) == ("tool_calls", 472, 89)


def test_stream_usage_counts_cache_tokens_and_ignores_unknown_blocks() -> None:
    stream = StreamFold()
    for _, data in [_start(10, cache_read_input_tokens=1000, cache_creation_input_tokens=5),
                    _ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
                    _ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hmm"}),
                    _ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "x"}),
                    _ev("content_block_stop", index=0), _ev("brand_new_event", payload=1),
                    _ev("message_delta", delta={"stop_reason": "max_tokens"}, usage={"output_tokens": 7}),
                    _ev("message_stop")]:
        stream.feed(_json(data))
    done = stream.result()
    assert (done.text, done.finish_reason, done.usage.prompt_tokens, done.usage.completion_tokens) == (
        "", "length", 1015, 7)


@pytest.mark.parametrize(("kind", "error"), [
    ("overloaded_error", errors.ProviderError), ("api_error", errors.ProviderError),
    ("rate_limit_error", errors.RateLimited), ("invalid_request_error", errors.ValidationFailed),
    ("authentication_error", errors.MissingCredentials), ("timeout_error", errors.ProviderTimeout),
    ("never_seen_error", errors.ProviderError)])
def test_stream_error_events(kind: str, error: type[errors.LlmsrvError]) -> None:
    stream = StreamFold(Origin("claude", (CANARY,)))
    with pytest.raises(error) as info:
        stream.feed(_json({"type": "error", "error": {"type": kind, "message": f"bad {CANARY}"}}))
    assert type(info.value) is error and kind in info.value.message and CANARY not in info.value.message


# ---- against a fake Anthropic upstream --------------------------------------------------------


def _message(content: list[dict[str, Any]], stop: str = "end_turn") -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 34}}


async def test_plain_call_wire_shape() -> None:
    reply = _message([text("I'll look."), use("toolu_9", "weather", city="Oslo")], stop="tool_use")
    async with FakeUpstream(lambda r: Json(reply)) as up:
        done = await _provider(up.url).complete(_call(("system", "terse"), ("user", "weather in Oslo?")))
    (req,) = up.requests
    assert (req.method, req.path) == ("POST", "/v1/messages")
    assert req.headers["x-api-key"] == CANARY
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["content-type"] == "application/json"
    assert req.json() == {"model": "claude-sonnet-4-5", "max_tokens": 100, "temperature": 0.7, "system": "terse",
                          "messages": [{"role": "user", "content": [text("weather in Oslo?")]}]}
    assert done.text == "I'll look." and done.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments, c.type) for c in done.tool_calls] == [
        ("toolu_9", "weather", '{"city":"Oslo"}', "function")]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (12, 34)


async def test_streamed_call_reports_deltas_and_assembles_tools() -> None:
    async with FakeUpstream(lambda r: Sse(TOOL_STREAM)) as up:
        deltas: list[str] = []
        done = await _provider(up.url).complete(_call(("user", "weather?")), deltas.append)
    assert up.requests[0].json()["stream"] is True
    assert deltas == ["Let me ", "check."] and done.text == "Let me check."
    assert [c.arguments for c in done.tool_calls] == ['{"city":"San Francisco","unit":"c"}', "{}"]
    assert (done.finish_reason, done.usage.prompt_tokens, done.usage.completion_tokens) == ("tool_calls", 472, 89)


@pytest.mark.parametrize(("kind", "error"), [("overloaded_error", errors.ProviderError),
                                             ("rate_limit_error", errors.RateLimited)])
async def test_error_event_mid_stream(kind: str, error: type[errors.LlmsrvError]) -> None:
    events = [_start(), _ev("content_block_start", index=0, content_block=text("")), _text_delta(0, "Hel"),
              _ev("error", error={"type": kind, "message": "try later"})]
    async with FakeUpstream(lambda r: Sse(events)) as up:
        deltas: list[str] = []
        with pytest.raises(error) as info:
            await _provider(up.url).complete(_call(("user", "hi")), deltas.append)
    assert deltas == ["Hel"] and type(info.value) is error


@pytest.mark.parametrize("cut", ["clean-end", "connection-reset"])
async def test_stream_without_message_stop_is_a_provider_error(cut: str) -> None:
    events = [_start(), _ev("content_block_start", index=0, content_block=text("")), _text_delta(0, "Hel"),
              _text_delta(0, "lo"), _ev("content_block_stop", index=0),
              _ev("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2})]
    reply = Sse(events) if cut == "clean-end" else Sse([*events, _ev("message_stop")], cut_after=4)
    async with FakeUpstream(lambda r: reply) as up:
        with pytest.raises(errors.ProviderError) as info:
            await _provider(up.url).complete(_call(("user", "hi")), lambda d: None)
    assert type(info.value) is errors.ProviderError
    if cut == "clean-end":
        assert "stream cut" in info.value.message


@pytest.mark.parametrize(("reply", "error"), [
    (Json({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, status=529),
     errors.ProviderError),
    (Json({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, status=429,
          headers={"retry-after": "2"}), errors.RateLimited),
    (Json({"type": "error", "error": {"type": "authentication_error", "message": f"bad key {CANARY}"}},
          status=401), errors.MissingCredentials),
    (Json({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too big"}},
          status=400), errors.ValidationFailed),
    (Json({"id": "msg_1", "content": "not a list of blocks"}), errors.ProviderError),
], ids=["529-overloaded", "429", "401", "400", "malformed-200"])
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
async def test_http_errors(reply: Json, error: type[errors.LlmsrvError], streamed: bool) -> None:
    async with FakeUpstream(lambda r: reply) as up:
        with pytest.raises(error) as info:
            await _provider(up.url).complete(_call(("user", "hi")), (lambda d: None) if streamed else None)
    assert type(info.value) is error and CANARY not in info.value.message
    if error is errors.RateLimited:
        assert info.value.retry_after_ms == 2000
    if reply.status == 529:
        assert "Overloaded" in info.value.message


async def test_probe_lists_models_and_spends_nothing() -> None:
    def handler(r: Request) -> Json:
        if r.headers.get("x-api-key") != CANARY:
            return Json({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
                        status=401)
        return Json({"data": [{"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5",
                               "created_at": "2025-09-29T00:00:00Z"}],
                     "has_more": False, "first_id": "claude-sonnet-4-5", "last_id": "claude-sonnet-4-5"})

    async with FakeUpstream(handler) as up:
        status = await _provider(up.url).probe()
        with pytest.raises(errors.MissingCredentials):
            await _provider(up.url, {"CLAUDE_API_KEY": "sk-wrong-key"}).probe()
    assert status.available and "1 model" in (status.reason or "")
    assert [(r.method, r.path, r.query) for r in up.requests] == [("GET", "/v1/models", "limit=1000")] * 2
    assert up.requests[0].headers["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
async def test_cancel_closes_the_upstream_connection(streamed: bool) -> None:
    slow = Sse([_start(), _ev("content_block_start", index=0, content_block=text(""))]
               + [_text_delta(0, "x")] * 100 + [_ev("message_stop")], interval_s=0.05)
    async with FakeUpstream(lambda r: slow if streamed else Hang()) as up:
        deltas = Deltas()
        # cancel once the upstream holds the request (streamed: once the first text delta arrived)
        cancel = await cancel_when(deltas.wait if streamed else up.wait_request,
                                   lambda: _provider(up.url).complete(_call(("user", "hi")),
                                                                      deltas if streamed else None))
        seen = await up.wait_disconnect()  # only a disconnect before the answer was complete counts
    assert cancel.caught and cancel.at <= seen and seen - cancel.at < CANCEL_CLOSE_BOUND_S
    assert len(up.disconnects) == len(up.requests) == 1
    assert (len(deltas.items) > 0) == streamed and len(deltas.items) < 100  # cut mid-stream


def test_credentials_and_defaults() -> None:
    cfg = ProviderConfig()
    assert build_provider("claude", cfg, {"ANTHROPIC_API_KEY": "a", "CLAUDE_API_KEY": "b"}).key == "a"
    assert build_provider("claude", cfg, {"CLAUDE_API_KEY": "b"}).key == "b"
    assert build_provider("claude", cfg, {}).base_url == "https://api.anthropic.com"
    missing = build_provider("claude", cfg, {}).status()
    assert missing.state == "missing" and "ANTHROPIC_API_KEY or CLAUDE_API_KEY" in (missing.reason or "")
    assert build_provider("claude", cfg, {"CLAUDE_API_KEY": "b"}).status().available


async def test_no_key_never_reaches_the_upstream() -> None:
    async with FakeUpstream(lambda r: Json(_message([text("hi")]))) as up:
        with pytest.raises(errors.MissingCredentials):
            await _provider(up.url, env={}).complete(_call(("user", "hi")))
    assert up.requests == []


def test_registry_builds_the_claude_provider() -> None:
    providers = build_providers(build_config({}, env={}), env={"ANTHROPIC_API_KEY": "k"})
    assert isinstance(providers["claude"], HttpApiProvider) and providers["claude"].row.name == "claude"
    assert providers["claude"].status().available
