"""The gemini provider against a fake Gemini API on loopback (real HTTP, real SSE), and end to end over NATS.

The fake speaks the documented wire format: generateContent / streamGenerateContent?alt=sse replies
(GenerateContentResponse chunks), models.list, and ``{"error": {"code", "message", "status"}}`` bodies.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from llmsrv import errors
from llmsrv.client import ReplyError
from llmsrv.config import ProviderConfig
from llmsrv.messages import FunctionDef, Message, StreamChunk, Tool
from llmsrv.providers import Call
from llmsrv.providers.api import HttpApiProvider
from llmsrv.providers.registry import build_provider

from .conftest import running, user
from .fakes import CANCEL_CLOSE_BOUND_S, Deltas, FakeUpstream, Hang, Json, Raw, Request, Sse, cancel_when

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


def _call(*messages: tuple[str, str], tools: tuple[Tool, ...] = (), max_tokens: int = 64,
          temperature: float = 0.7) -> Call:
    msgs = [Message(role, content) for role, content in messages] or [Message("user", "hi")]  # type: ignore[arg-type]
    return Call(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=temperature, tools=tools)


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
    async with FakeUpstream(lambda r: Json(answer(text("Hello"), text(" there"), thoughts=5))) as up:
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
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            {"name": "get_time"},
        ]}],
    }


async def test_tool_results_become_function_responses() -> None:
    async with FakeUpstream(lambda r: Json(answer(text("It is sunny.")))) as up:
        provider = _provider(up.url)
        await provider.complete(_call(
            ("user", "weather in Paris?"), ("assistant", "calling get_weather"),
            ("tool", '{"temp_c": 21}'), ("tool", "plain words"), ("user", "and?"), tools=(WEATHER,)))
        await provider.complete(_call(
            ("user", "q"), ("tool", '{"name": "get_time", "response": {"now": "12:00"}}'), ("tool", "[1, 2]"),
            tools=(WEATHER, CLOCK)))
    first, second = (r.json()["contents"] for r in up.requests)
    assert first == [
        {"role": "user", "parts": [{"text": "weather in Paris?"}]},
        {"role": "model", "parts": [{"text": "calling get_weather"}]},
        {"role": "user", "parts": [  # consecutive user-side messages merge into one turn
            {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
            {"functionResponse": {"name": "get_weather", "response": {"output": "plain words"}}},
            {"text": "and?"},
        ]},
    ]
    assert second[0]["parts"] == [
        {"text": "q"},
        {"functionResponse": {"name": "get_time", "response": {"now": "12:00"}}},
        {"functionResponse": {"name": "tool", "response": {"output": [1, 2]}}},  # several tools: no name to pick
    ]


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


@pytest.mark.parametrize(("finish", "expected"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "stop"), ("RECITATION", "stop"), ("OTHER", "stop"),
    ("BLOCKLIST", "stop"),
])
async def test_finish_reasons_keep_the_text(finish: str, expected: str) -> None:
    async with FakeUpstream(lambda r: Json(answer(text("partial"), finish=finish))) as up:
        completion = await _provider(up.url).complete(_call())
    assert (completion.text, completion.finish_reason) == ("partial", expected)


async def test_thought_parts_are_not_answer_text() -> None:
    reply = answer({"text": "thinking about it", "thought": True}, text("42"))
    async with FakeUpstream(lambda r: Json(reply)) as up:
        completion = await _provider(up.url).complete(_call())
    assert completion.text == "42"


async def test_blocked_prompt_is_a_request_error() -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
               "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}}
    async with FakeUpstream(lambda r: Json(blocked) if r.path == GENERATE else Sse([blocked])) as up:
        provider = _provider(up.url)
        with pytest.raises(errors.ValidationFailed, match="SAFETY"):
            await provider.complete(_call())
        with pytest.raises(errors.ValidationFailed, match="SAFETY"):
            await provider.complete(_call(), on_delta=lambda piece: None)


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
