"""The gemini provider against a fake Gemini API on loopback (real HTTP, real SSE), and end to end over NATS.

The fake speaks the documented wire format: generateContent / streamGenerateContent?alt=sse replies
(GenerateContentResponse chunks), models.list, and ``{"error": {"code", "message", "status"}}`` bodies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from llmsrv import errors
from llmsrv.client import ReplyError
from llmsrv.config import ProviderConfig
from llmsrv.messages import FunctionCall, FunctionDef, Message, MessageToolCall, StreamChunk, Tool, check_turns
from llmsrv.providers import Call, Completion
from llmsrv.providers.api import HttpApiProvider
from llmsrv.providers.codecs import Origin
from llmsrv.providers.codecs.gemini import SKIP_SIGNATURE, GeminiFold, finish_reason, request_body
from llmsrv.providers.registry import build_provider

from .conftest import running, user
from .fakes import (
    CANCEL_CLOSE_BOUND_S,
    Deltas,
    FakeUpstream,
    Hang,
    Json,
    Raw,
    Request,
    Sse,
    cancel_when,
    sse_frame,
)
from .upstream_rules import gemini_problems, validating

CANARY = "canary-key-9d41c7e2b0"
MODEL = "gemini-2.5-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent"

WEATHER = Tool(type="function", function=FunctionDef(
    name="get_weather", description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
CLOCK = Tool(type="function", function=FunctionDef(name="get_time"))


def _provider(url: str, key: str = CANARY) -> HttpApiProvider:
    return build_provider("gemini", ProviderConfig(base_url=url), {"GEMINI_API_KEY": key})


def _call(*messages: tuple[str, str] | Message, tools: tuple[Tool, ...] = (), max_tokens: int = 64,
          temperature: float = 0.7) -> Call:
    msgs = [m if isinstance(m, Message) else Message(*m) for m in messages] or [Message("user", "hi")]  # type: ignore[arg-type]
    return Call(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=temperature, tools=tools)


def calls(content: str, *made: tuple[str, str, dict[str, Any]]) -> Message:
    """An assistant turn that made tool calls: (id, function name, arguments)."""
    return Message("assistant", content, tool_calls=[
        MessageToolCall(id=i, function=FunctionCall(name=name, arguments=msgspec.json.encode(args).decode()))
        for i, name, args in made])


def result(call_id: str, content: str) -> Message:
    return Message("tool", content, tool_call_id=call_id)


FIXTURES = Path(__file__).parent / "fixtures" / "gemini"


def fixture(name: str) -> Any:
    """A recorded reply (``.json``) or stream (``.jsonl``: one chunk a line), see fixtures/gemini/SOURCES.md."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        return [msgspec.json.decode(line) for line in text.splitlines() if line.strip()]
    return msgspec.json.decode(text)


def fold(*chunks: Any) -> Completion:
    """Feed chunks (decoded JSON, or raw text) through the codec's fold, as the transport does."""
    folder = GeminiFold(Origin("gemini", (CANARY,)))
    for chunk in chunks:
        folder.feed(chunk if isinstance(chunk, str) else msgspec.json.encode(chunk))
    return folder.result()


def answer(*parts: dict[str, Any], finish: str | None = "STOP", prompt: int = 7, out: int = 3,
           thoughts: int | None = None) -> dict[str, Any]:
    """A GenerateContentResponse as the API sends it (also one SSE chunk)."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    usage: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": out,
                             "totalTokenCount": prompt + out + (thoughts or 0)}
    if thoughts is not None:
        usage["thoughtsTokenCount"] = thoughts
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": MODEL, "responseId": "r-1"}


def text(t: str) -> dict[str, Any]:
    return {"text": t}


def gerror(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


# ---- plain answers and request shape ------------------------------------------------------------------


async def test_text_answer_usage_and_request_shape() -> None:
    checked = validating("gemini", lambda r: Json(answer(text("Hello"), text(" there"), thoughts=5)))
    async with FakeUpstream(checked) as up:
        provider = _provider(up.url)
        completion = await provider.complete(_call(
            ("system", "be brief"), ("system", "be kind"), ("user", "hi"), ("assistant", "hello"),
            ("user", "weather?"), tools=(WEATHER, CLOCK), max_tokens=123, temperature=0.25))
    assert completion.text == "Hello there"
    assert completion.finish_reason == "stop" and not completion.tool_calls
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 3 + 5)  # thinking billed
    (request,) = up.requests
    assert (request.method, request.path, request.query) == ("POST", GENERATE, "")
    assert request.headers["x-goog-api-key"] == CANARY
    assert CANARY not in request.target
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "contents": [
            {"role": "user", "parts": [{"text": "hi"}]},
            {"role": "model", "parts": [{"text": "hello"}]},
            {"role": "user", "parts": [{"text": "weather?"}]},
        ],
        "systemInstruction": {"parts": [{"text": "be brief"}, {"text": "be kind"}]},
        "generationConfig": {"maxOutputTokens": 123, "temperature": 0.25},
        "tools": [{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather for a city",
             "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]}},
            {"name": "get_time"},
        ]}],
    }
    assert checked.problems == []


# ---- tool round trips (CONTRACT section 2) -------------------------------------------------------------
# Each conversation passes messages.check_turns (the edge) and the request it makes passes the Gemini API's
# rules (tests/upstream_rules.py): functionResponse names the called function, ids match, one user turn
# answers all the calls of one model turn.


def _fc(call_id: str, name: str, args: dict[str, Any], *, first: bool = True) -> dict[str, Any]:
    part: dict[str, Any] = {"functionCall": {"id": call_id, "name": name, "args": args}}
    if first:
        part["thoughtSignature"] = SKIP_SIGNATURE
    return part


def _fr(call_id: str, name: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"functionResponse": {"id": call_id, "name": name, "response": response}}


ROUND_TRIPS = [
    pytest.param(
        [("user", "weather in Paris?"), calls("", ("c1", "get_weather", {"city": "Paris"})),
         result("c1", '{"temp_c": 21}')],
        [{"role": "user", "parts": [{"text": "weather in Paris?"}]},
         {"role": "model", "parts": [_fc("c1", "get_weather", {"city": "Paris"})]},
         {"role": "user", "parts": [_fr("c1", "get_weather", {"temp_c": 21})]}],
        id="one-call-object-result"),
    pytest.param(
        [("user", "Paris, Oslo and the time?"),
         calls("Checking.", ("w1", "get_weather", {"city": "Paris"}), ("w2", "get_weather", {"city": "Oslo"}),
               ("t1", "get_time", {})),
         result("t1", "12:00"), result("w2", "[1, 2]"), result("w1", '"sunny"'), ("user", "and tomorrow?")],
        [{"role": "user", "parts": [{"text": "Paris, Oslo and the time?"}]},
         {"role": "model", "parts": [{"text": "Checking."}, _fc("w1", "get_weather", {"city": "Paris"}),
                                     _fc("w2", "get_weather", {"city": "Oslo"}, first=False),
                                     _fc("t1", "get_time", {}, first=False)]},
         {"role": "user", "parts": [_fr("t1", "get_time", {"output": "12:00"}),  # not JSON: the raw text
                                    _fr("w2", "get_weather", {"output": [1, 2]}),  # JSON, not an object
                                    _fr("w1", "get_weather", {"output": "sunny"}),
                                    {"text": "and tomorrow?"}]}],
        id="parallel-calls-same-function-answered-in-reverse-with-text"),
    pytest.param(
        [("system", "be brief"), ("user", "weather?"), calls("", ("a", "get_weather", {"city": "Rome"})),
         result("a", '{"sky": "clear"}'), calls("One more.", ("b", "get_time", {})), result("b", "null"),
         ("assistant", "Clear, and it is noon.")],
        [{"role": "user", "parts": [{"text": "weather?"}]},
         {"role": "model", "parts": [_fc("a", "get_weather", {"city": "Rome"})]},
         {"role": "user", "parts": [_fr("a", "get_weather", {"sky": "clear"})]},
         {"role": "model", "parts": [{"text": "One more."}, _fc("b", "get_time", {})]},
         {"role": "user", "parts": [_fr("b", "get_time", {"output": None})]},
         {"role": "model", "parts": [{"text": "Clear, and it is noon."}]}],
        id="two-rounds"),
]


@pytest.mark.parametrize(("messages", "contents"), ROUND_TRIPS)
def test_round_trip_contents(messages: list[tuple[str, str] | Message], contents: list[dict[str, Any]]) -> None:
    call = _call(*messages, tools=(WEATHER, CLOCK))
    check_turns(list(call.messages))  # the contract's edge accepts the conversation
    body = request_body(call)
    assert body["contents"] == contents
    assert gemini_problems(body, GENERATE) == []  # and so does the Gemini API


@pytest.mark.parametrize("messages", [
    pytest.param([("user", "q"), result("nope", "x")], id="answers-no-call"),
    pytest.param([("user", "q"), Message("tool", "x")], id="no-tool-call-id"),
    pytest.param([("user", "q"), Message("assistant", "", tool_calls=[MessageToolCall(
        id="c", function=FunctionCall(name="get_time", arguments="[1]"))])], id="arguments-not-an-object"),
])
def test_codec_refuses_what_the_edge_refuses(messages: list[tuple[str, str] | Message]) -> None:
    """A Call built past messages.check_turns: the codec names the problem instead of guessing."""
    with pytest.raises(errors.ValidationFailed):
        request_body(_call(*messages, tools=(CLOCK,)))


PARTY = tuple(Tool(type="function", function=FunctionDef(name=name, parameters={
    "type": "object", "properties": {key: {"type": kind} for key, kind in props.items()}, "required": list(props)}))
    for name, props in [("power_disco_ball", {"power": "boolean"}),
                        ("start_music", {"energetic": "boolean", "loud": "boolean"}),
                        ("dim_lights", {"brightness": "number"})])


def _without_ids(reply: dict[str, Any]) -> dict[str, Any]:
    """The same reply as Gemini 2.5 gives it: no call ids, no signature."""
    parts = reply["candidates"][0]["content"]["parts"]
    bare = [{"functionCall": {k: v for k, v in p["functionCall"].items() if k != "id"}} for p in parts]
    return {**reply, "candidates": [{**reply["candidates"][0], "content": {"role": "model", "parts": bare}}]}


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("ids", [True, False], ids=["gemini-3-ids", "gemini-2.5-no-ids"])
async def test_agent_loop_answers_parallel_calls_in_any_order(ids: bool, stream: bool) -> None:
    first = fixture("parallel_calls.json") if ids else _without_ids(fixture("parallel_calls.json"))
    replies = iter([first, answer(text("Party on!"))])
    checked = validating("gemini", lambda r: Sse([next(replies)]) if stream else Json(next(replies)))
    on_delta = (lambda piece: None) if stream else None
    async with FakeUpstream(checked) as up:
        provider = _provider(up.url)
        ask = Message("user", "Turn this place into a party!")
        made = await provider.complete(_call(ask, tools=PARTY), on_delta=on_delta)
        assert made.finish_reason == "tool_calls"
        assert [(c.name, msgspec.json.decode(c.arguments)) for c in made.tool_calls] == [
            ("power_disco_ball", {"power": True}), ("start_music", {"energetic": True, "loud": True}),
            ("dim_lights", {"brightness": 0.5})]
        if ids:
            assert [c.id for c in made.tool_calls] == ["fc-a1", "fc-b2", "fc-c3"]
        assistant = Message("assistant", "", tool_calls=[
            MessageToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in made.tool_calls])
        answers = [result(c.id, '{"ok": true}') for c in reversed(made.tool_calls)]
        second = _call(ask, assistant, *answers, tools=PARTY)
        if ids:  # Gemini 3 (which gives call ids) also checks each model turn's thought signature
            second = msgspec.structs.replace(second, model="gemini-3-flash-preview")
        done = await provider.complete(second, on_delta=on_delta)
    assert (done.text, done.finish_reason) == ("Party on!", "stop")
    assert checked.problems == []
    model_turn, answer_turn = up.requests[1].json()["contents"][1:]
    assert [p["functionCall"]["id"] for p in model_turn["parts"]] == [c.id for c in made.tool_calls]
    assert [(p["functionResponse"]["id"], p["functionResponse"]["name"]) for p in answer_turn["parts"]] == [
        (c.id, c.name) for c in reversed(made.tool_calls)]


async def test_unanswered_call_is_refused_for_the_apis_reason() -> None:
    """The edge lets a call go unanswered; the Gemini API does not, and says why (400 -> VALIDATION_ERROR)."""
    checked = validating("gemini", lambda r: Json(answer(text("never"))))
    async with FakeUpstream(checked) as up:
        with pytest.raises(errors.ValidationFailed) as info:
            await _provider(up.url).complete(_call(
                ("user", "two cities"), calls("", ("p", "get_weather", {"city": "Paris"}),
                                            ("o", "get_weather", {"city": "Oslo"})),
                result("o", "cold"), tools=(WEATHER,)))
    assert "number of function response parts is equal to the number of function call parts" in info.value.message
    assert len(checked.rejected) == 1


STRICT = Tool(type="function", function=FunctionDef(name="set_mode", description="Sets the mode.", parameters={
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
    "properties": {"mode": {"const": "fast"}, "note": {"type": ["string", "null"]}}, "required": ["mode"]}))


async def test_json_schema_parameters_go_as_parameters_json_schema() -> None:
    checked = validating("gemini", lambda r: Json(answer(text("ok"))))
    async with FakeUpstream(checked) as up:
        await _provider(up.url).complete(_call(("user", "fast please"), tools=(STRICT,)))
    body = up.requests[0].json()
    assert body["tools"] == [{"functionDeclarations": [
        {"name": "set_mode", "description": "Sets the mode.", "parametersJsonSchema": STRICT.function.parameters}]}]
    assert checked.problems == []
    # the old form: the API's OpenAPI-subset Schema refuses $schema, additionalProperties, const, type arrays
    old = {**body, "tools": [{"functionDeclarations": [
        {"name": "set_mode", "description": "Sets the mode.", "parameters": STRICT.function.parameters}]}]}
    refused = "\n".join(gemini_problems(old, GENERATE))
    for name in ('"$schema"', '"additionalProperties"', '"const"', "cannot start list"):
        assert name in refused


async def test_only_system_messages_still_send_a_turn() -> None:
    async with FakeUpstream(lambda r: Json(answer(text("ok")))) as up:
        await _provider(up.url).complete(_call(("system", "say ok")))
    body = up.requests[0].json()
    assert body["contents"] == [{"role": "user", "parts": [{"text": "say ok"}]}]
    assert "systemInstruction" not in body


async def test_function_calls_come_back_as_tool_calls() -> None:
    reply = answer(text("Let me check."),
                   {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                   {"functionCall": {"id": "fc-7", "name": "get_time"}},
                   finish="STOP")  # the API says STOP for a function call
    async with FakeUpstream(lambda r: Json(reply)) as up:
        completion = await _provider(up.url).complete(_call(("user", "weather?"), tools=(WEATHER, CLOCK)))
    assert completion.finish_reason == "tool_calls"
    assert completion.text == "Let me check."
    first, second = completion.tool_calls
    assert (first.name, msgspec.json.decode(first.arguments), first.type) == ("get_weather", {"city": "Paris"},
                                                                              "function")
    assert first.id.startswith("call_") and len(first.id) > 10  # generated: the API gave none
    assert (second.id, second.name, second.arguments) == ("fc-7", "get_time", "{}")


@pytest.mark.parametrize(("reason", "tool_calls", "blocked", "expected"), [
    ("STOP", False, False, "stop"), ("MAX_TOKENS", False, False, "length"), ("CONTINUATION", False, False, "length"),
    ("SAFETY", False, False, "content_filter"), ("RECITATION", False, False, "content_filter"),
    ("BLOCKLIST", False, False, "content_filter"), ("PROHIBITED_CONTENT", False, False, "content_filter"),
    ("SPII", False, False, "content_filter"), ("IMAGE_SAFETY", False, False, "content_filter"),
    ("IMAGE_PROHIBITED_CONTENT", False, False, "content_filter"), ("IMAGE_RECITATION", False, False, "content_filter"),
    ("OTHER", False, False, "stop"), ("LANGUAGE", False, False, "stop"),
    ("MALFORMED_FUNCTION_CALL", False, False, "stop"),
    ("STOP", True, False, "tool_calls"), ("MAX_TOKENS", True, False, "tool_calls"),
    ("SAFETY", True, False, "content_filter"), (None, False, True, "content_filter"),
], ids=lambda v: str(v))
def test_finish_reason_table(reason: str | None, tool_calls: bool, blocked: bool, expected: str) -> None:
    assert finish_reason(reason, tool_calls=tool_calls, blocked=blocked) == expected


def test_every_sdk_finish_reason_is_decided() -> None:
    """google-genai's FinishReason enum (the API's): a value added upstream fails here until it is placed."""
    from google.genai.types import FinishReason

    from llmsrv.providers.codecs.gemini import _FILTERED, _LENGTH
    stop = {"FINISH_REASON_UNSPECIFIED", "STOP", "LANGUAGE", "OTHER", "MALFORMED_FUNCTION_CALL", "NO_IMAGE",
            "IMAGE_OTHER", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS", "MISSING_THOUGHT_SIGNATURE",
            "MALFORMED_RESPONSE"}
    assert {r.value for r in FinishReason} - _FILTERED - _LENGTH - stop == set()


@pytest.mark.parametrize("finish", ["SAFETY", "RECITATION", "PROHIBITED_CONTENT", "SPII"])
async def test_filtered_answer_keeps_the_text_without_refusal(finish: str) -> None:
    async with FakeUpstream(lambda r: Json(answer(text("partial"), finish=finish))) as up:
        completion = await _provider(up.url).complete(_call())
    assert (completion.text, completion.finish_reason, completion.refusal) == ("partial", "content_filter", None)


async def test_safety_stop_in_a_stream() -> None:
    async with FakeUpstream(lambda r: Sse(fixture("safety_stream.jsonl"))) as up:
        deltas: list[str] = []
        completion = await _provider(up.url).complete(_call(), on_delta=deltas.append)
    assert deltas == ["Here is how you"]
    assert (completion.text, completion.finish_reason, completion.refusal) == ("Here is how you", "content_filter",
                                                                              None)


async def test_thought_parts_are_not_answer_text() -> None:
    reply = answer({"text": "thinking about it", "thought": True}, text("42"))
    async with FakeUpstream(lambda r: Json(reply)) as up:
        completion = await _provider(up.url).complete(_call())
    assert completion.text == "42"


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
async def test_blocked_prompt_is_a_content_filter_finish(stream: bool) -> None:
    blocked = fixture("prompt_blocked.json")
    async with FakeUpstream(lambda r: Sse([blocked]) if stream else Json(blocked)) as up:
        completion = await _provider(up.url).complete(_call(), on_delta=(lambda piece: None) if stream else None)
    assert (completion.text, completion.finish_reason, completion.refusal) == ("", "content_filter", None)
    assert not completion.tool_calls
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12559, 0)


# ---- recorded replies, folded by the codec alone (no event loop) ---------------------------------------

FOLDS = [
    pytest.param(["sdk_batch_response.json"], "This recipe makes a moist and delicious banana bread!", "stop", 0,
                 (0, 0), id="sdk-batch-response"),
    pytest.param(["prompt_blocked.json"], "", "content_filter", 0, (12559, 0), id="prompt-blocked"),
    pytest.param(["safety_stream.jsonl"], "Here is how you", "content_filter", 0, (9, 4), id="safety-stream"),
    pytest.param(["parallel_calls.json"], "", "tool_calls", 3, (120, 30 + 44), id="parallel-calls"),
    pytest.param(["thinking_stream.jsonl"], "The answer is 42.", "stop", 0, (12, 7 + 40),
                 id="thinking-then-usage-only-chunk"),
    pytest.param(["unicode_stream.jsonl"], "Grüße aus 東京 🌸👩‍💻 — ok", "stop", 0, (5, 8), id="unicode"),
    pytest.param(["sdk_thought_signature_150k.jsonl", "unicode_stream.jsonl"], "Grüße aus 東京 🌸👩‍💻 — ok", "stop", 0,
                 (5, 8), id="sdk-150k-thought-signature-chunk"),
]


@pytest.mark.parametrize(("names", "text_", "finish", "tool_calls", "usage"), FOLDS)
def test_recorded_replies_fold(names: list[str], text_: str, finish: str, tool_calls: int,
                               usage: tuple[int, int]) -> None:
    chunks: list[Any] = []
    for name in names:
        loaded = fixture(name)
        chunks += loaded if isinstance(loaded, list) else [loaded]
    completion = fold(*chunks)
    assert (completion.text, completion.finish_reason, len(completion.tool_calls), completion.refusal) == (
        text_, finish, tool_calls, None)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == usage


@pytest.mark.parametrize(("name", "error", "retry_ms"), [
    pytest.param("sdk_stream_error.jsonl", errors.ProviderError, None, id="sdk-500-in-stream"),
    pytest.param("stream_rate_limited.jsonl", errors.RateLimited, 36000, id="429-retry-info-in-stream"),
])
def test_recorded_stream_errors_fold(name: str, error: type[errors.LlmsrvError], retry_ms: int | None) -> None:
    with pytest.raises(error) as info:
        fold(*fixture(name))
    assert type(info.value) is error
    assert info.value.retry_after_ms == retry_ms


# ---- streaming ----------------------------------------------------------------------------------------

STREAM_CHUNKS = [
    answer(text("The "), finish=None, out=1),
    answer(text("quick "), finish=None, out=2),
    answer({"text": "hmm", "thought": True}, finish=None, out=2),
    answer(text("brown fox"), finish=None, out=4),
    answer(text("."), finish="STOP", prompt=11, out=5),
]


async def test_streaming_deltas_in_order() -> None:
    async with FakeUpstream(lambda r: Sse(STREAM_CHUNKS, interval_s=0.01)) as up:
        deltas: list[str] = []
        completion = await _provider(up.url).complete(_call(("user", "fox?")), on_delta=deltas.append)
    assert deltas == ["The ", "quick ", "brown fox", "."]
    assert completion.text == "".join(deltas) == "The quick brown fox."
    assert completion.finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 5)
    (request,) = up.requests
    assert (request.path, request.query) == (STREAM, "alt=sse")
    assert request.headers["x-goog-api-key"] == CANARY and CANARY not in request.target
    assert request.json()["contents"] == [{"role": "user", "parts": [{"text": "fox?"}]}]


async def test_streamed_function_call() -> None:
    chunks = [answer(text("Checking"), finish=None),
              answer({"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}, finish="STOP")]
    async with FakeUpstream(lambda r: Sse(chunks)) as up:
        deltas: list[str] = []
        completion = await _provider(up.url).complete(_call(tools=(WEATHER,)), on_delta=deltas.append)
    assert deltas == ["Checking"]
    assert completion.finish_reason == "tool_calls"
    assert [(c.name, msgspec.json.decode(c.arguments)) for c in completion.tool_calls] == [
        ("get_weather", {"city": "Oslo"})]


async def test_thinking_stream_and_a_usage_only_last_chunk() -> None:
    async with FakeUpstream(lambda r: Sse(fixture("thinking_stream.jsonl"))) as up:
        deltas: list[str] = []
        completion = await _provider(up.url).complete(_call(), on_delta=deltas.append)
    assert deltas == ["The answer", " is 42."]  # the thought summary is not answer text
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 7 + 40)


def _chunked_sse(chunks: list[Any], cut: int) -> Raw:
    """The stream as HTTP/1.1 chunks of ``cut`` bytes: the cuts fall inside multi-byte characters."""
    body = b"".join(sse_frame(chunk) for chunk in chunks)
    pieces = [body[i:i + cut] for i in range(0, len(body), cut)]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return Raw(head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")


@pytest.mark.parametrize("cut", [1, 3, 5])
async def test_unicode_cut_across_network_chunks(cut: int) -> None:
    chunks = fixture("unicode_stream.jsonl")
    async with FakeUpstream(lambda r: _chunked_sse(chunks, cut)) as up:
        deltas: list[str] = []
        completion = await _provider(up.url).complete(_call(), on_delta=deltas.append)
    assert deltas == ["Grüße aus ", "東京 🌸👩‍💻", " — ok"]
    assert completion.text == "Grüße aus 東京 🌸👩‍💻 — ok"


async def test_a_150k_thought_signature_line() -> None:
    """google-genai's own regression (aiohttp LineTooLong): one SSE line larger than 128 KiB."""
    chunks = [*fixture("sdk_thought_signature_150k.jsonl"), answer(text("ok"))]
    async with FakeUpstream(lambda r: Sse(chunks)) as up:
        completion = await _provider(up.url).complete(_call(), on_delta=lambda piece: None)
    assert (completion.text, completion.finish_reason) == ("ok", "stop")


@pytest.mark.parametrize(("name", "error", "retry_ms"), [
    pytest.param("sdk_stream_error.jsonl", errors.ProviderError, None, id="sdk-500-in-stream"),
    pytest.param("stream_rate_limited.jsonl", errors.RateLimited, 36000, id="429-retry-info-in-stream"),
])
async def test_recorded_errors_inside_a_stream(name: str, error: type[errors.LlmsrvError],
                                               retry_ms: int | None) -> None:
    async with FakeUpstream(lambda r: Sse(fixture(name))) as up:
        deltas: list[str] = []
        with pytest.raises(error) as info:
            await _provider(up.url).complete(_call(), on_delta=deltas.append)
    assert len(deltas) == 1  # the text before the error was passed on
    assert type(info.value) is error and info.value.retry_after_ms == retry_ms


@pytest.mark.parametrize("reply", [
    Sse(STREAM_CHUNKS, cut_after=2),  # connection closed mid-stream
    Sse(STREAM_CHUNKS[:3]),  # a clean end of stream, but no chunk ever carried a finishReason
], ids=["connection-cut", "no-finish-reason"])
async def test_stream_cut(reply: Sse) -> None:
    async with FakeUpstream(lambda r: reply) as up:
        deltas: list[str] = []
        with pytest.raises(errors.ProviderError) as info:
            await _provider(up.url).complete(_call(), on_delta=deltas.append)
    assert deltas == ["The ", "quick "]
    assert info.value.error_code == "PROVIDER_ERROR"
    if reply.cut_after is None:
        assert "stream cut" in info.value.message


@pytest.mark.parametrize(("event", "error", "code"), [
    (gerror(429, "RESOURCE_EXHAUSTED", f"quota for {CANARY} exceeded"), errors.RateLimited, "RATE_LIMITED"),
    (gerror(500, "INTERNAL", f"boom {CANARY}"), errors.ProviderError, "PROVIDER_ERROR"),
    ("{not json", errors.ProviderError, "PROVIDER_ERROR"),
    ({"candidates": "not a list"}, errors.ProviderError, "PROVIDER_ERROR"),
], ids=["429-event", "500-event", "malformed-json", "wrong-shape"])
async def test_errors_inside_a_stream(event: object, error: type[errors.LlmsrvError], code: str) -> None:
    async with FakeUpstream(lambda r: Sse([STREAM_CHUNKS[0], event])) as up:  # type: ignore[list-item]
        with pytest.raises(error) as info:
            await _provider(up.url).complete(_call(), on_delta=lambda piece: None)
    assert info.value.error_code == code
    assert CANARY not in info.value.message


# ---- HTTP errors ----------------------------------------------------------------------------------------

STATUS_ERRORS = [
    (Json(gerror(400, "INVALID_ARGUMENT", "Invalid value at 'generation_config.temperature'"), status=400),
     errors.ValidationFailed, "VALIDATION_ERROR", None),
    (Json([{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                      "status": "INVALID_ARGUMENT",
                      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"},
                                  {"@type": "type.googleapis.com/google.rpc.DebugInfo",
                                   "detail": f"Invalid API key: {CANARY}"}]}}], status=400),
     errors.MissingCredentials, "MISSING_CREDENTIALS", None),
    (Json(gerror(401, "UNAUTHENTICATED", f"bad key {CANARY}"), status=401),
     errors.MissingCredentials, "MISSING_CREDENTIALS", None),
    (Json(gerror(403, "PERMISSION_DENIED", f"key {CANARY} lacks permission"), status=403),
     errors.MissingCredentials, "MISSING_CREDENTIALS", None),
    (Json(gerror(404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta"), status=404),
     errors.ProviderNotFound, "PROVIDER_NOT_FOUND", None),
    (Json(gerror(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota"), status=429,
          headers={"retry-after": "7"}), errors.RateLimited, "RATE_LIMITED", 7000),
    (Json(gerror(500, "INTERNAL", "An internal error has occurred."), status=500),
     errors.ProviderError, "PROVIDER_ERROR", None),
    (Json(gerror(503, "UNAVAILABLE", "The model is overloaded."), status=503),
     errors.ProviderError, "PROVIDER_ERROR", None),
]
STATUS_IDS = ["400", "400-bad-key", "401", "403", "404", "429", "500", "503"]


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize(("reply", "error", "code", "retry_ms"), STATUS_ERRORS, ids=STATUS_IDS)
async def test_http_status_errors(reply: Json, error: type[errors.LlmsrvError], code: str, retry_ms: int | None,
                                  stream: bool) -> None:
    async with FakeUpstream(lambda r: reply) as up:
        with pytest.raises(error) as info:
            await _provider(up.url).complete(_call(), on_delta=(lambda piece: None) if stream else None)
    assert info.value.error_code == code
    assert CANARY not in info.value.message and CANARY not in str(info.value)
    assert info.value.retry_after_ms == retry_ms


@pytest.mark.parametrize("reply", [
    Json(b"<html>not json</html>"),
    Json({"candidates": [{"content": {"parts": "nope"}}]}),
    Raw(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"candid"),
    Raw(b""),
], ids=["not-json", "wrong-shape", "truncated", "reset"])
async def test_malformed_answers(reply: Json | Raw) -> None:
    async with FakeUpstream(lambda r: reply) as up:
        with pytest.raises(errors.ProviderError) as info:
            await _provider(up.url).complete(_call())
    assert info.value.error_code == "PROVIDER_ERROR"


# ---- cancellation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["generate-hang", "stream-hang", "stream-mid"])
async def test_cancel_closes_the_upstream_connection(mode: str) -> None:
    def handler(request: Request) -> Hang | Sse:
        if mode == "stream-mid":
            return Sse([answer(text("first "), finish=None)] + [answer(text("x"), finish=None)] * 5, interval_s=10)
        return Hang()

    async with FakeUpstream(handler) as up:
        provider = _provider(up.url)
        deltas = Deltas()
        # cancel once the upstream is mid-answer: it holds the request (and, mid-stream, sent the first event)
        ready = deltas.wait if mode == "stream-mid" else up.wait_request
        cancel = await cancel_when(ready, lambda: provider.complete(
            _call(), on_delta=None if mode == "generate-hang" else deltas))
        seen = await up.wait_disconnect()  # only a disconnect before the answer was complete counts
    assert cancel.caught  # complete() was still running: the cancellation ended it
    assert cancel.at <= seen and seen - cancel.at < CANCEL_CLOSE_BOUND_S
    assert len(up.disconnects) == len(up.requests) == 1
    assert deltas.items == (["first "] if mode == "stream-mid" else [])


# ---- probe and credentials ------------------------------------------------------------------------------

MODEL_LIST = {"models": [{"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash",
                          "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                          "supportedGenerationMethods": ["generateContent", "countTokens"]}],
              "nextPageToken": "abc"}


@pytest.mark.parametrize(("reply", "available", "state"), [
    (Json(MODEL_LIST), True, "available"),
    (Json(gerror(400, "INVALID_ARGUMENT", f"API key not valid. ({CANARY})"), status=400), False, "invalid"),
    (Json(gerror(403, "PERMISSION_DENIED", "denied"), status=403), False, "invalid"),
    (Json(gerror(503, "UNAVAILABLE", "overloaded"), status=503), False, "available"),
], ids=["ok", "bad-key", "403", "503"])
async def test_probe_lists_models(reply: Json, available: bool, state: str) -> None:
    async with FakeUpstream(lambda r: reply) as up:
        status = await _provider(up.url).probe()
    (request,) = up.requests
    assert (request.method, request.path) == ("GET", "/v1beta/models")
    assert request.headers["x-goog-api-key"] == CANARY and CANARY not in request.target
    assert not request.body  # nothing generated, no tokens spent
    assert (status.available, status.state) == (available, state)
    assert CANARY not in (status.reason or "")


async def test_credentials_env_names() -> None:
    cfg = ProviderConfig()
    assert build_provider("gemini", cfg, {"GOOGLE_API_KEY": "g-key"}).key == "g-key"
    assert build_provider("gemini", cfg, {"GEMINI_API_KEY": "a", "GOOGLE_API_KEY": "b"}).key == "a"
    missing = build_provider("gemini", cfg, {})
    assert missing.status().state == "missing" and "GEMINI_API_KEY" in (missing.status().reason or "")
    assert (await missing.probe()).state == "missing"  # no request without a key
    assert build_provider("gemini", cfg, {"GEMINI_API_KEY": "k"}).base_url == "https://generativelanguage.googleapis.com"


# ---- end to end over NATS -------------------------------------------------------------------------------


async def test_end_to_end_over_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", CANARY)
    chunks = [answer(text("Bonjour"), finish=None, out=1), answer(text(", le"), finish=None, out=2),
              answer(text(" monde"), finish="STOP", prompt=9, out=3)]

    def handler(request: Request) -> Json | Sse:
        if request.path == STREAM:
            return Sse(chunks, interval_s=0.08)
        return Json(answer(text("Salut"), prompt=4, out=2))

    async with FakeUpstream(handler) as up, running(nats_url, providers={"gemini": {"base_url": up.url}}) as h:
        reply = await h.client.complete({"messages": user("dis bonjour"), "model": f"gemini:{MODEL}",
                                         "max_tokens": 50, "temperature": 0.1}, timeout_s=5)
        got: list[StreamChunk] = []
        streamed = await h.client.stream({"messages": user("encore"), "model": f"gemini:{MODEL}"}, got.append,
                                         timeout_s=5)
        with pytest.raises(ReplyError) as info:  # a refused key: the error reply names no secret
            up.handler = lambda r: Json(gerror(403, "PERMISSION_DENIED", f"key {CANARY} refused"), status=403)
            await h.client.complete({"messages": user(), "model": f"gemini:{MODEL}"}, timeout_s=5)
    assert (reply.text, reply.model, reply.finish_reason) == ("Salut", f"gemini:{MODEL}", "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.tokens_used) == (4, 2, 6)
    assert up.requests[0].json()["generationConfig"] == {"maxOutputTokens": 50, "temperature": 0.1}
    assert up.requests[0].headers["x-goog-api-key"] == CANARY
    assert streamed.text == "Bonjour, le monde" == "".join(c.delta for c in got)
    assert [c.seq for c in got] == list(range(len(got))) and len(got) >= 2
    assert (streamed.usage.prompt_tokens, streamed.usage.completion_tokens) == (9, 3)
    assert info.value.error_code == "MISSING_CREDENTIALS"
    assert CANARY not in str(info.value) and CANARY not in msgspec.json.encode(info.value.body).decode()
