"""The claude provider: pure translation tables and properties, the stream fold over the SDK's own
recorded streams (tests/fixtures/anthropic, see SOURCES.md), then the wire against a real fake
Anthropic upstream that validates every request like the real API (tests/upstream_rules.py): plain
JSON, SSE streams, recorded tool round trips, refusals, cut tool input, stream errors, cut streams,
HTTP errors and their retry hints, probe, cancellation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsrv import errors
from llmsrv.config import ProviderConfig, build_config
from llmsrv.messages import FunctionCall, FunctionDef, Message, MessageToolCall, Tool, check_turns
from llmsrv.providers import Call, Completion
from llmsrv.providers.api import HttpApiProvider
from llmsrv.providers.codecs import Origin
from llmsrv.providers.codecs.anthropic import (
    API_VERSION,
    StreamFold,
    finish_reason,
    parse_message,
    request_body,
    takes_temperature,
)
from llmsrv.providers.registry import build_provider, build_providers

from .fakes import CANCEL_CLOSE_BOUND_S, Deltas, FakeUpstream, Hang, Json, Raw, Request, Sse, cancel_when
from .upstream_rules import anthropic_problems, validating

CANARY = "sk-ant-canary-5d1e2b"
FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
HEADERS = {"x-api-key": "k", "anthropic-version": API_VERSION}

Turn = tuple[str, str] | Message


def _message(turn: Turn) -> Message:
    return turn if isinstance(turn, Message) else Message(*turn)  # type: ignore[arg-type]


def _call(*messages: Turn, **kw: Any) -> Call:
    fields: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100, "temperature": 0.7, **kw}
    return Call(messages=[_message(m) for m in messages], **fields)


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


def calling(content: str, *calls: tuple[str, str, str]) -> Message:
    """An assistant message making ``calls`` = (id, name, arguments JSON)."""
    return Message("assistant", content, tool_calls=[MessageToolCall(i, FunctionCall(n, a)) for i, n, a in calls])


def answer(call_id: str, content: str) -> Message:
    return Message("tool", content, tool_call_id=call_id)


def sse_events(name: str) -> list[tuple[str, str]]:
    """A recorded SSE text -> (event name, data text) pairs, the data exactly as recorded."""
    return _parse_sse((FIXTURES / name).read_text(encoding="utf-8"))


def _parse_sse(raw: str) -> list[tuple[str, str]]:
    events = []
    for frame in raw.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in frame.split("\n") if line]
        if not lines:
            continue
        event = next((line[len("event: "):] for line in lines if line.startswith("event: ")), "")
        data = "\n".join(line[len("data: "):] for line in lines if line.startswith("data: "))
        events.append((event, data))
    return events


def recorded(name: str) -> list[dict[str, Any]]:
    """The exchanges of an SDK cassette: [{"request": {..., "body"}, "response": {..., "body"}}]."""
    exchanges: list[dict[str, Any]] = msgspec.json.decode((FIXTURES / name).read_bytes())
    return exchanges


WEATHER = ("toolu_w", "weather", '{"city":"Oslo"}')

# ---- request translation (pure) ----------------------------------------------------------------


@pytest.mark.parametrize(("messages", "system", "turns"), [
    ([("system", "be brief"), ("user", "hi"), ("system", "be kind")], "be brief\n\nbe kind",
     [("user", [text("hi")])]),
    ([("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d"), ("user", "e")], None,
     [("user", [text("a"), text("b")]), ("assistant", [text("c"), text("d")]), ("user", [text("e")])]),
    ([("user", "weather?"), calling("", WEATHER), answer("toolu_w", "-3C")], None,
     [("user", [text("weather?")]), ("assistant", [use("toolu_w", "weather", city="Oslo")]),
      ("user", [result("toolu_w", "-3C")])]),
    ([("user", "q"), calling("Checking.", ("toolu_a", "f", '{"x":1}'), ("toolu_b", "f", '{"x":2}')),
      answer("toolu_b", "B"), answer("toolu_a", "A")], None,
     [("user", [text("q")]), ("assistant", [text("Checking."), use("toolu_a", x=1), use("toolu_b", x=2)]),
      ("user", [result("toolu_b", "B"), result("toolu_a", "A")])]),
    ([("user", "q"), calling("", WEATHER), ("user", "also this"), answer("toolu_w", "-3C")], None,
     [("user", [text("q")]), ("assistant", [use("toolu_w", "weather", city="Oslo")]),
      ("user", [result("toolu_w", "-3C"), text("also this")])]),
    ([("user", "q"), calling("  \n", WEATHER), answer("toolu_w", '{"t": -3}'), ("user", "and tomorrow?")], None,
     [("user", [text("q")]), ("assistant", [use("toolu_w", "weather", city="Oslo")]),
      ("user", [result("toolu_w", '{"t": -3}'), text("and tomorrow?")])]),
    ([("user", "q"), calling("", ("toolu_1", "f", "{}")), answer("toolu_1", "one"),
      calling("again", ("toolu_2", "f", '{"deep": {"a": [1, null]}}')), answer("toolu_2", "two")], None,
     [("user", [text("q")]), ("assistant", [use("toolu_1")]), ("user", [result("toolu_1", "one")]),
      ("assistant", [text("again"), use("toolu_2", deep={"a": [1, None]})]), ("user", [result("toolu_2", "two")])]),
    ([("user", "q"), ("assistant", '{"tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]}')],
     None, [("user", [text("q")]),
            ("assistant", [text('{"tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]}')])]),
    ([("user", "list three"), ("assistant", "1. ")], None,
     [("user", [text("list three")]), ("assistant", [text("1.")])]),
    ([("user", "q"), ("assistant", "   ")], None, [("user", [text("q")])]),
], ids=["system-joined", "same-role-merged", "tool-round-trip", "parallel-answered-out-of-order",
        "user-text-after-results", "blank-text-beside-calls-dropped", "two-rounds",
        "json-looking-content-is-text", "prefill-rstripped", "blank-prefill-dropped"])
def test_request_translation(messages: list[Turn], system: str | None,
                             turns: list[tuple[str, list[dict[str, Any]]]]) -> None:
    check_turns([_message(m) for m in messages])  # each conversation is one the contract lets through
    body = request_body(_call(*messages))
    assert body.get("system") == system
    assert body["messages"] == [{"role": role, "content": content} for role, content in turns]
    if turns[-1][0] == "user":
        assert anthropic_problems(body, HEADERS) == []


@pytest.mark.parametrize("messages", [
    [("user", "q"), calling("", ("toolu_1", "f", "[1]"))],
    [("user", "q"), Message("tool", "42")],
], ids=["arguments-not-an-object", "tool-without-call-id"])
def test_calls_built_in_code_that_break_the_contract_are_refused(messages: list[Turn]) -> None:
    with pytest.raises(errors.ValidationFailed):
        request_body(_call(*messages))


@pytest.mark.parametrize(("model", "sent"), [
    ("claude-sonnet-4-5", True), ("claude-sonnet-4-5-20250929", True), ("claude-sonnet-4-6", True),
    ("claude-haiku-4-5", True), ("claude-opus-4-6", True), ("claude-opus-4-1", True),
    ("claude-opus-4-20250514", True), ("claude-3-opus-20240229", True), ("claude-3-5-sonnet-20241022", True),
    ("claude-mythos-preview", True), ("some-proxy-model", True),
    ("claude-opus-4-7", False), ("claude-opus-4-7-20260416", False), ("claude-opus-4-8", False),
    ("claude-opus-4-10", False), ("claude-sonnet-5", False), ("claude-opus-5", False), ("claude-opus-5-5", False),
    ("claude-fable-5", False), ("claude-mythos-5", False), ("claude-haiku-5", False), ("claude-sonnet-6-1", False),
])
def test_temperature_only_to_models_that_take_it(model: str, sent: bool) -> None:
    assert takes_temperature(model) is sent
    body = request_body(_call(("user", "hi"), model=model, temperature=1.7))
    assert body.get("temperature") == (1.0 if sent else None)  # clamped to Anthropic's max where sent
    assert ("temperature" in body) is sent
    assert anthropic_problems(body, HEADERS) == []


def test_sampling_and_tools() -> None:
    tools = [Tool("function", FunctionDef("weather", "Current weather",
                                          {"type": "object", "properties": {"city": {"type": "string"}}})),
             Tool("function", FunctionDef("now"))]
    body = request_body(_call(("user", "hi"), max_tokens=321, temperature=0.3, tools=tools))
    assert body == {"model": "claude-sonnet-4-5", "max_tokens": 321, "temperature": 0.3,
                    "messages": [{"role": "user", "content": [text("hi")]}],
                    "tools": [{"name": "weather", "description": "Current weather",
                               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                              {"name": "now", "input_schema": {"type": "object"}}]}
    assert anthropic_problems(body, HEADERS) == []
    assert "tools" not in request_body(_call(("user", "hi")))


def test_only_system_messages_is_a_caller_error() -> None:
    with pytest.raises(errors.ValidationFailed):
        request_body(_call(("system", "you are terse")))


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
    (None, "stop"), ("something_new", "stop")])
def test_finish_reason(stop: str | None, finish: str) -> None:
    assert finish_reason(stop) == finish


@st.composite
def conversations(draw: st.DrawFn) -> list[Message]:
    """Conversations the contract accepts: rounds of a user turn, then an assistant turn that may
    call tools, then every call answered in any order, user text anywhere among the answers."""
    messages: list[Message] = []
    if draw(st.booleans()):
        messages.append(Message("system", "be terse"))
    for r in range(draw(st.integers(1, 4))):
        messages.append(Message("user", draw(st.sampled_from(["x", "y z ", "{", "ü"]))))
        n = draw(st.integers(0, 3))
        if n == 0:
            if draw(st.booleans()):
                messages.append(Message("assistant", draw(st.sampled_from(["ok", "sure ", '{"tool_calls": []}']))))
            continue
        ids = [f"toolu_{r}_{i}" for i in range(n)]
        args = draw(st.lists(st.sampled_from(["{}", '{"a":1}', '{"q":"ü","n":[1,2]}']), min_size=n, max_size=n))
        messages.append(calling(draw(st.sampled_from(["", " ", "Let me check."])),
                                *[(i, f"tool{j}", a) for j, (i, a) in enumerate(zip(ids, args, strict=True))]))
        replies: list[Message] = [answer(i, f"result of {i}") for i in draw(st.permutations(ids))]
        if draw(st.booleans()):
            replies.insert(draw(st.integers(0, n)), Message("user", "and also"))
        messages += replies
    if draw(st.booleans()):
        messages.append(Message("assistant", draw(st.sampled_from(["Prefill ", "   "]))))
    return messages


@settings(max_examples=300, deadline=None)
@given(conversations())
def test_translation_of_valid_conversations_is_valid_upstream(messages: list[Message]) -> None:
    check_turns(messages)
    body = request_body(_call(*messages))
    assert anthropic_problems(body, HEADERS) == []  # the SDK's types and the API's tool rules
    turns = body["messages"]
    roles = [t["role"] for t in turns]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # turns alternate
    answered = {b["tool_use_id"]: b["content"] for t in turns for b in t["content"] if b["type"] == "tool_result"}
    assert answered == {m.tool_call_id: m.content for m in messages if m.role == "tool"}  # each to its own call
    used = {b["id"]: b["input"] for t in turns for b in t["content"] if b["type"] == "tool_use"}
    assert used == {c.id: msgspec.json.decode(c.function.arguments)
                    for m in messages for c in m.tool_calls or ()}


# ---- stream folding (pure), over recorded streams ----------------------------------------------

def _fold(events: list[tuple[str, str]], origin: Origin | None = None) -> tuple[list[str], Completion]:
    stream = StreamFold(origin or Origin("claude"))
    deltas = [piece for name, data in events if (piece := stream.feed(data, name))]
    return deltas, stream.result()


def _calls(done: Completion) -> list[tuple[str, str, str]]:
    return [(c.id, c.name, c.arguments) for c in done.tool_calls]


TAX_GUIDE = ('{"filename": "taxes.txt", "lines_of_text": [\n"# COMPREHENSIVE TAX GUIDE FOR INDIVIDUALS WITH '
             'MULTIPLE W-2s",\n"",\n"## INTRODUCTION",\n"",\n"Filing taxes')

# fixture -> deltas, finish, (prompt, completion) tokens, tool calls, refusal
STREAMS: list[tuple[str, list[str], str, tuple[int, int], list[tuple[str, str, str]], str | None]] = [
    ("basic_response.txt", ["Hello", " there", "!"], "stop", (11, 6), [], None),
    ("tool_use_response.txt", ["I", "'ll check the current weather in Paris for you."], "tool_calls", (377, 65),
     [("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", '{"location":"Paris"}')], None),
    ("incomplete_partial_json_response.txt",
     ["I", "'ll create a comprehensive tax guide for", " someone with multiple W2s an",
      "d save it in a file called taxes.txt. Let", " me do that for you now."], "length", (450, 124),
     [("toolu_01EKqbqmZrGRXy18eN7m9kvY", "make_file", TAX_GUIDE)], None),
    ("refusal_response.txt", [], "content_filter", (20, 0), [], "This request was refused due to policy."),
    ("stream-a-refusal.sse", ["Hi"], "content_filter", (28, 106), [], "Hi"),
    ("stream-a-toolrefusal.sse", ["Here's a summary of this year's solar eclipses and how"], "content_filter",
     (28, 106), [], "Here's a summary of this year's solar eclipses and how"),
    ("parallel_tools_thinking.sse", ["I'll look up both."], "tool_calls", (512, 142),
     [("toolu_01WeatherParis", "get_weather", '{"location":"Paris, France","units":"c"}'),
      ("toolu_02TimeParis", "get_time", '{"timezone":"Europe/Paris"}'), ("toolu_03Now", "now", "{}")], None),
    ("unicode_split.sse", ["Cafe\u0301 ", "\U0001F469", "\u200d\U0001F4BB ok, ", "東京", "です"], "tool_calls",
     (30, 40),
     [("toolu_01Unicode", "note", _json({"text": "caf\u00e9 \U0001F600 東京"}))], None),
    ("max_tokens_text.sse", ["Once upon a time, in a land far", " away, there lived a"], "length", (18, 10), [], None),
]


@pytest.mark.parametrize(("fixture", "deltas", "finish", "usage", "calls", "refusal"), STREAMS,
                         ids=[s[0].rsplit(".", 1)[0] for s in STREAMS])
def test_stream_fold_of_recorded_streams(fixture: str, deltas: list[str], finish: str, usage: tuple[int, int],
                                         calls: list[tuple[str, str, str]], refusal: str | None) -> None:
    got, done = _fold(sse_events(fixture))
    assert got == deltas and done.text == "".join(deltas)
    assert done.finish_reason == finish
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == usage
    assert _calls(done) == calls
    assert done.refusal == refusal


def _ev(kind: str, **fields: Any) -> tuple[str, str]:
    return (kind, _json({"type": kind, **fields}))


def _start(input_tokens: int = 25, **extra: int) -> tuple[str, str]:
    return _ev("message_start", message={
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                                                              **extra}})


def _text_delta(index: int, piece: str) -> tuple[str, str]:
    return _ev("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})


def _json_delta(index: int, piece: str) -> tuple[str, str]:
    return _ev("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": piece})


def _tool_start(index: int, id_: str, name: str = "f") -> tuple[str, str]:
    return _ev("content_block_start", index=index, content_block={"type": "tool_use", "id": id_, "name": name,
                                                                  "input": {}})


def _stop(reason: str, output_tokens: int = 5) -> list[tuple[str, str]]:
    return [_ev("message_delta", delta={"stop_reason": reason, "stop_sequence": None},
                usage={"output_tokens": output_tokens}), _ev("message_stop")]


@pytest.mark.parametrize(("events", "finish", "arguments"), [
    ([_start(), _tool_start(0, "toolu_1"), _json_delta(0, '{"path": "a.t'), _ev("content_block_stop", index=0),
      *_stop("max_tokens")], "length", ['{"path": "a.t']),
    ([_start(), _tool_start(0, "toolu_1"), _json_delta(0, '{"a": 1}'), _ev("content_block_stop", index=0),
      _tool_start(1, "toolu_2"), _json_delta(1, '{"b": [tr'), *_stop("max_tokens")], "length",
     ['{"a":1}', '{"b": [tr']),
    ([_start(), _tool_start(0, "toolu_1"), *_stop("max_tokens")], "length", ["{}"]),
    ([_start(), _tool_start(0, "toolu_1"), _json_delta(0, '{"a": 1'), *_stop("model_context_window_exceeded")],
     "length", ['{"a": 1']),
], ids=["closed-block-cut", "second-call-cut", "cut-before-any-input", "context-window-cut"])
def test_cut_tool_input_keeps_the_partial_json(events: list[tuple[str, str]], finish: str,
                                               arguments: list[str]) -> None:
    _, done = _fold(events)
    assert done.finish_reason == finish
    assert [c.arguments for c in done.tool_calls] == arguments


def test_tool_input_that_is_not_json_in_a_finished_reply_is_a_provider_error() -> None:
    events = [_start(), _tool_start(0, "toolu_1", "bad"), _json_delta(0, '{"a": '), _ev("content_block_stop", index=0),
              *_stop("tool_use")]
    with pytest.raises(errors.ProviderError, match="'bad' input is not JSON"):
        _fold(events)


def test_stream_usage_counts_cache_tokens_and_ignores_unknown_blocks() -> None:
    _, done = _fold([_start(10, cache_read_input_tokens=1000, cache_creation_input_tokens=5),
                     _ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
                     _ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hmm"}),
                     _ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "x"}),
                     _ev("content_block_stop", index=0), _ev("brand_new_event", payload=1),
                     _ev("content_block_start", index=1, content_block={"type": "brand_new_block"}),
                     _ev("content_block_delta", index=1, delta={"type": "brand_new_delta", "x": 1}),
                     *_stop("end_turn", 7)])
    assert (done.text, done.finish_reason, done.usage.prompt_tokens, done.usage.completion_tokens) == (
        "", "stop", 1015, 7)


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


def _reply(content: list[dict[str, Any]], stop: str = "end_turn", **extra: Any) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 34}, **extra}


@pytest.mark.parametrize(("reply", "finish", "refusal", "calls"), [
    (msgspec.json.decode((FIXTURES / "refusal_message.json").read_bytes()), "content_filter",
     "I can't help with that request.", []),
    (_reply([], "refusal", stop_details={"type": "refusal", "category": None, "explanation": "Policy."}),
     "content_filter", "Policy.", []),
    (_reply([], "refusal", stop_details=None), "content_filter", None, []),
    (_reply([text("Sure: "), use("toolu_1", "f", path="a.t")], "max_tokens"), "length", None,
     [("toolu_1", "f", '{"path":"a.t"}')]),
    (recorded("runner_round_trip_plain.json")[0]["response"]["body"], "tool_calls", None,
     [("toolu_013DU6hV4C1M8dJ32ybQFAFi", "get_weather", '{"location":"SF","units":"c"}')]),
], ids=["refusal-fixture", "refusal-explanation-only", "refusal-without-text", "max-tokens-with-tool", "recorded"])
def test_plain_reply_parsing(reply: dict[str, Any], finish: str, refusal: str | None,
                             calls: list[tuple[str, str, str]]) -> None:
    done = parse_message(reply)
    assert (done.finish_reason, done.refusal, _calls(done)) == (finish, refusal, calls)


# ---- against a fake Anthropic upstream that validates like the real API ------------------------


async def test_plain_call_wire_shape() -> None:
    reply = _reply([text("I'll look."), use("toolu_9", "weather", city="Oslo")], stop="tool_use")
    upstream = validating("anthropic", lambda r: Json(reply))
    async with FakeUpstream(upstream) as up:
        done = await _provider(up.url).complete(_call(("system", "terse"), ("user", "weather in Oslo?")))
    assert upstream.problems == []
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


def _sdk_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The SDK's recorded turns in llmsrv's spelling: string content as one text block, no ``caller``
    echoed back on ``tool_use`` (optional; it is the server's record of who made the call)."""
    def block(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if k != "caller"}
    return [{"role": m["role"], "content": [text(m["content"])] if isinstance(m["content"], str)
             else [block(b) for b in m["content"]]} for m in messages]


@pytest.mark.parametrize("cassette", ["runner_round_trip_plain.json", "runner_round_trip_stream.json"],
                         ids=["plain", "stream"])
async def test_recorded_tool_round_trip(cassette: str) -> None:
    """The SDK's recorded exchange with the real API, replayed: llmsrv's second turn (the contract's
    ``tool_calls`` + ``tool_call_id``) goes out as the same blocks the SDK sent and the API accepted."""
    first, second = recorded(cassette)
    streamed = cassette.endswith("stream.json")
    replies = iter([ex["response"]["body"] for ex in (first, second)])

    def handler(r: Request) -> Json | Sse:
        body = next(replies)
        return Sse(_parse_sse(body)) if streamed else Json(body)

    upstream = validating("anthropic", handler)
    sent = first["request"]["body"]
    tools = [Tool("function", FunctionDef(t["name"], t["description"] or None, t["input_schema"]))
             for t in sent["tools"]]
    question = Message("user", sent["messages"][0]["content"])
    on_delta = (lambda d: None) if streamed else None
    async with FakeUpstream(upstream) as up:
        provider = _provider(up.url)
        asked = await provider.complete(_call(question, model=sent["model"], max_tokens=1024, tools=tools), on_delta)
        (tc,) = asked.tool_calls
        result_text = second["request"]["body"]["messages"][2]["content"][0]["content"]
        follow_up = [question, calling(asked.text, (tc.id, tc.name, tc.arguments)), answer(tc.id, result_text)]
        done = await provider.complete(_call(*follow_up, model=sent["model"], max_tokens=1024, tools=tools), on_delta)
    assert upstream.problems == []
    assert asked.finish_reason == "tool_calls" and done.finish_reason == "stop"
    assert up.requests[1].json()["messages"] == _sdk_turns(second["request"]["body"]["messages"])
    assert "68°F" in done.text or "20°C" in done.text


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
async def test_parallel_calls_answered_out_of_order_reach_the_api_valid(streamed: bool) -> None:
    upstream = validating("anthropic", lambda r: Sse(sse_events("basic_response.txt")) if streamed
                          else Json(_reply([text("Paris: 18C, 14:05.")])))
    weather = ("toolu_01WeatherParis", "get_weather", '{"location":"Paris"}')
    clock = ("toolu_02TimeParis", "get_time", "{}")
    conversation: list[Turn] = [("user", "weather and time in Paris?"), calling("I'll look up both.", weather, clock),
                    answer(clock[0], "14:05"), answer(weather[0], "18C")]
    async with FakeUpstream(upstream) as up:
        await _provider(up.url).complete(_call(*conversation), (lambda d: None) if streamed else None)
    assert upstream.problems == []
    assert up.requests[0].json()["messages"][2] == {"role": "user", "content": [
        result("toolu_02TimeParis", "14:05"), result("toolu_01WeatherParis", "18C")]}


async def test_a_result_for_a_call_of_an_older_turn_fails_for_the_api_reason() -> None:
    upstream = validating("anthropic", lambda r: Json(_reply([text("never")])))
    conversation: list[Turn] = [("user", "q"), calling("", ("toolu_1", "f", "{}")), answer("toolu_1", "one"),
                    ("assistant", "done"), ("user", "again?"), answer("toolu_1", "stale")]
    async with FakeUpstream(upstream) as up:
        with pytest.raises(errors.ValidationFailed) as info:
            await _provider(up.url).complete(_call(*conversation))
    assert "unexpected `tool_use_id` found in `tool_result` blocks: toolu_1" in info.value.message
    assert len(upstream.problems) == 1


@pytest.mark.parametrize("model", ["claude-opus-4-7", "claude-sonnet-5"])
async def test_no_temperature_for_models_that_refuse_it(model: str) -> None:
    upstream = validating("anthropic", lambda r: Json(_reply([text("hi")])))
    async with FakeUpstream(upstream) as up:
        done = await _provider(up.url).complete(_call(("user", "hi"), model=model, temperature=0.2))
    assert upstream.problems == [] and done.text == "hi"
    assert "temperature" not in up.requests[0].json()


def test_the_validator_refuses_temperature_for_opus_4_7() -> None:  # the 400 the codec keeps away
    body = {**request_body(_call(("user", "hi"))), "model": "claude-opus-4-7"}
    assert anthropic_problems(body, HEADERS) == ["`temperature` is deprecated for this model."]


@pytest.mark.parametrize(("reply", "streamed", "text_", "refusal"), [
    (Json(msgspec.json.decode((FIXTURES / "refusal_message.json").read_bytes())), False,
     "I can't help with that request.", "I can't help with that request."),
    (Sse(sse_events("stream-a-refusal.sse")), True, "Hi", "Hi"),
    (Sse(sse_events("refusal_response.txt")), True, "", "This request was refused due to policy."),
], ids=["plain", "stream-with-text", "stream-explanation-only"])
async def test_refusal_is_content_filter_with_the_refusal_text(reply: Json | Sse, streamed: bool, text_: str,
                                                               refusal: str) -> None:
    upstream = validating("anthropic", lambda r: reply)
    deltas: list[str] = []
    async with FakeUpstream(upstream) as up:
        done = await _provider(up.url).complete(_call(("user", "hi")), deltas.append if streamed else None)
    assert upstream.problems == []
    assert (done.finish_reason, done.text, done.refusal) == ("content_filter", text_, refusal)
    assert "".join(deltas) == (text_ if streamed else "")


@pytest.mark.parametrize(("fixture", "calls"), [
    ("incomplete_partial_json_response.txt", [("toolu_01EKqbqmZrGRXy18eN7m9kvY", "make_file", TAX_GUIDE)]),
    ("max_tokens_text.sse", []),
], ids=["inside-tool-input", "plain-text"])
async def test_stream_cut_by_max_tokens_is_length_not_an_error(fixture: str, calls: list[tuple[str, str, str]]) -> None:
    upstream = validating("anthropic", lambda r: Sse(sse_events(fixture)))
    async with FakeUpstream(upstream) as up:
        done = await _provider(up.url).complete(_call(("user", "write it")), lambda d: None)
    assert upstream.problems == []
    assert done.finish_reason == "length" and _calls(done) == calls and done.text


async def test_streamed_call_reports_deltas_and_assembles_tools() -> None:
    upstream = validating("anthropic", lambda r: Sse(sse_events("parallel_tools_thinking.sse")))
    async with FakeUpstream(upstream) as up:
        deltas: list[str] = []
        done = await _provider(up.url).complete(_call(("user", "weather?")), deltas.append)
    assert upstream.problems == [] and up.requests[0].json()["stream"] is True
    assert deltas == ["I'll look up both."] and done.text == "I'll look up both."
    assert [c.id for c in done.tool_calls] == ["toolu_01WeatherParis", "toolu_02TimeParis", "toolu_03Now"]
    assert (done.finish_reason, done.usage.prompt_tokens, done.usage.completion_tokens) == ("tool_calls", 512, 142)


async def test_utf8_split_across_http_chunks() -> None:
    """The bytes of one character split between two chunks of the HTTP body reach the fold whole."""
    events = b"".join(f"event: {name}\ndata: {data}\n\n".encode() for name, data in sse_events("unicode_split.sse"))
    cut = events.index("東".encode()) + 1  # inside the three bytes of 東
    chunks = [events[:cut], events[cut:]]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    raw = head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    async with FakeUpstream(validating("anthropic", lambda r: Raw(raw))) as up:
        deltas: list[str] = []
        done = await _provider(up.url).complete(_call(("user", "hi")), deltas.append)
    assert done.text == "Cafe\u0301 \U0001F469\u200d\U0001F4BB ok, 東京です" and "東京" in deltas
    assert _calls(done) == [("toolu_01Unicode", "note", _json({"text": "caf\u00e9 \U0001F600 東京"}))]


async def test_error_event_mid_stream() -> None:
    async with FakeUpstream(validating("anthropic", lambda r: Sse(sse_events("error_event.sse")))) as up:
        deltas: list[str] = []
        with pytest.raises(errors.ProviderError) as info:
            await _provider(up.url).complete(_call(("user", "hi")), deltas.append)
    assert deltas == ["Hel"] and type(info.value) is errors.ProviderError and "Overloaded" in info.value.message


async def test_rate_limit_error_event_mid_stream() -> None:
    events = [_start(), _ev("content_block_start", index=0, content_block=text("")), _text_delta(0, "Hel"),
              _ev("error", error={"type": "rate_limit_error", "message": "try later"})]
    async with FakeUpstream(lambda r: Sse(events)) as up:
        with pytest.raises(errors.RateLimited):
            await _provider(up.url).complete(_call(("user", "hi")), lambda d: None)


@pytest.mark.parametrize("cut", ["clean-end", "connection-reset"])
async def test_stream_without_message_stop_is_a_provider_error(cut: str) -> None:
    events = [_start(), _ev("content_block_start", index=0, content_block=text("")), _text_delta(0, "Hel"),
              _text_delta(0, "lo"), _ev("content_block_stop", index=0), _stop("end_turn", 2)[0]]
    reply = Sse(events) if cut == "clean-end" else Sse([*events, _ev("message_stop")], cut_after=4)
    async with FakeUpstream(lambda r: reply) as up:
        with pytest.raises(errors.ProviderError) as info:
            await _provider(up.url).complete(_call(("user", "hi")), lambda d: None)
    assert type(info.value) is errors.ProviderError
    if cut == "clean-end":
        assert "stream cut" in info.value.message


OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


@pytest.mark.parametrize(("reply", "error", "retry_after_ms"), [
    (Json(OVERLOADED, status=529), errors.ProviderError, None),
    (Json(OVERLOADED, status=529, headers={"retry-after": "7"}), errors.ProviderError, 7000),
    (Json({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, status=429,
          headers={"retry-after": "2"}), errors.RateLimited, 2000),
    (Json({"type": "error", "error": {"type": "authentication_error", "message": f"bad key {CANARY}"}},
          status=401), errors.MissingCredentials, None),
    (Json({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too big"}},
          status=400), errors.ValidationFailed, None),
    (Json({"id": "msg_1", "content": "not a list of blocks"}), errors.ProviderError, None),
], ids=["529-overloaded", "529-retry-after", "429", "401", "400", "malformed-200"])
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
async def test_http_errors(reply: Json, error: type[errors.LlmsrvError], retry_after_ms: int | None,
                           streamed: bool) -> None:
    async with FakeUpstream(lambda r: reply) as up:
        with pytest.raises(error) as info:
            await _provider(up.url).complete(_call(("user", "hi")), (lambda d: None) if streamed else None)
    assert type(info.value) is error and CANARY not in info.value.message
    assert info.value.retry_after_ms == retry_after_ms
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
    async with FakeUpstream(lambda r: Json(_reply([text("hi")]))) as up:
        with pytest.raises(errors.MissingCredentials):
            await _provider(up.url, env={}).complete(_call(("user", "hi")))
    assert up.requests == []


def test_registry_builds_the_claude_provider() -> None:
    providers = build_providers(build_config({}, env={}), env={"ANTHROPIC_API_KEY": "k"})
    assert isinstance(providers["claude"], HttpApiProvider) and providers["claude"].row.name == "claude"
    assert providers["claude"].status().available
