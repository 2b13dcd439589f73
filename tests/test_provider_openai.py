"""The OpenAI-compatible providers (codex, github, openrouter, openai_compat) against a real fake
upstream speaking Chat Completions and the Responses API: bodies, headers, streaming, tool calls,
error mapping, cancellation, probes; and codex end to end over real NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from llmsrv import errors
from llmsrv.config import ProviderConfig
from llmsrv.messages import FunctionCall, FunctionDef, Message, MessageToolCall, StreamChunk, Tool, ToolCall, Usage
from llmsrv.providers import Call, Completion
from llmsrv.providers.api import HttpApiProvider
from llmsrv.providers.codecs import Origin
from llmsrv.providers.codecs.openai_chat import CODEC as CHAT
from llmsrv.providers.codecs.openai_chat import chat_body
from llmsrv.providers.codecs.openai_responses import CODEC as RESPONSES
from llmsrv.providers.codecs.openai_responses import is_responses_only, responses_body
from llmsrv.providers.registry import build_provider

from .conftest import running, user
from .fakes import CANCEL_CLOSE_BOUND_S, Deltas, FakeUpstream, Hang, Json, Raw, Request, Sse, cancel_when
from .upstream_rules import openai_chat_problems, openai_responses_problems, validating

CANARY = "sk-canary-5d1e0b7a93"
WEATHER = Tool(type="function", function=FunctionDef(
    name="get_weather", description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))


def call_of(model: str = "gpt-4.1", tools: tuple[Tool, ...] = ()) -> Call:
    return Call(model=model, messages=[Message("system", "be brief"), Message("user", "hello")],
                max_tokens=50, temperature=0.3, tools=tools)


def chat_reply(text: str | None = "Hi there", tool_calls: list[dict[str, Any]] | None = None,
               finish: str = "stop", usage: tuple[int, int] = (12, 3), model: str = "gpt-4.1") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4.1",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], "usage": None}


def text_stream(pieces: list[str], usage: tuple[int, int] = (12, 3)) -> list[Any]:
    """What Chat Completions streams with include_usage: role, content pieces, finish, usage, [DONE]."""
    return [chunk({"role": "assistant", "content": ""}), *[chunk({"content": p}) for p in pieces],
            chunk(finish="stop"),
            {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4.1",
             "choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                      "total_tokens": sum(usage)}},
            "[DONE]"]


def codex(url: str, **cfg: Any) -> HttpApiProvider:
    return build_provider("codex", ProviderConfig(base_url=url, **cfg), {"OPENAI_API_KEY": CANARY})


def reply_once(reply: Any) -> Any:
    return lambda request: reply


# ---- Chat Completions ------------------------------------------------------------------------


async def test_chat_text_usage_and_request() -> None:
    async with FakeUpstream(reply_once(Json(chat_reply()))) as up:
        completion = await codex(up.url + "/v1").complete(call_of())
    assert (completion.text, completion.usage, completion.finish_reason) == ("Hi there", Usage(12, 3), "stop")
    assert completion.tool_calls == ()
    request = up.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {CANARY}"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "model": "gpt-4.1", "max_tokens": 50, "temperature": 0.3,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]}


@pytest.mark.parametrize(("model", "reasoning"), [
    ("gpt-4.1", False), ("gpt-4o-mini", False), ("o1", True), ("o3-mini", True), ("o4-mini", True),
    ("gpt-5", True), ("gpt-5-mini", True), ("openai/o3-mini", True), ("openai/gpt-4.1", False),
    ("codex-mini-latest", True), ("llama3:8b", False),
])
def test_max_tokens_and_temperature_rule(model: str, reasoning: bool) -> None:
    body = chat_body(call_of(model), model, stream=False)
    if reasoning:
        assert body["max_completion_tokens"] == 50
        assert "max_tokens" not in body and "temperature" not in body
    else:
        assert (body["max_tokens"], body["temperature"]) == (50, 0.3)
        assert "max_completion_tokens" not in body


@pytest.mark.parametrize(("model", "expected"), [
    ("gpt-5-codex", True), ("codex-mini-latest", True), ("gpt-5.1-codex-max", True), ("o3-pro", True),
    ("o3-deep-research", True), ("gpt-5", False), ("o3-mini", False), ("gpt-4.1", False),
])
def test_responses_only_rule(model: str, expected: bool) -> None:
    assert is_responses_only(model) is expected


async def test_tools_go_out_in_openai_format_and_tool_calls_come_back() -> None:
    reply = chat_reply(text=None, finish="tool_calls", tool_calls=[
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}])
    async with FakeUpstream(reply_once(Json(reply))) as up:
        completion = await codex(up.url).complete(call_of(tools=(WEATHER,)))
    assert completion.finish_reason == "tool_calls" and completion.text == ""
    assert list(completion.tool_calls) == [ToolCall("call_a", "get_weather", '{"city":"Oslo"}'),
                                           ToolCall("call_b", "get_weather", '{"city":"Rome"}')]
    assert up.requests[0].json()["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


async def test_streaming_chunks_in_order() -> None:
    pieces = ["Hel", "lo", ", wor", "ld", "!"]
    async with FakeUpstream(reply_once(Sse(text_stream(pieces, (20, 5)), interval_s=0.03))) as up:
        got: list[tuple[str, float]] = []
        completion = await codex(up.url).complete(call_of(), lambda d: got.append((d, trio.current_time())))
    assert [d for d, _ in got] == pieces
    assert got[-1][1] - got[0][1] > 0.06  # handed on as they arrived (0.03 s apart), not all at the end
    assert completion.text == "".join(pieces) == "Hello, world!"
    assert (completion.usage, completion.finish_reason) == (Usage(20, 5), "stop")
    body = up.requests[0].json()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_streamed_tool_call_fragments_are_assembled_by_index() -> None:
    def frag(index: int, **kw: Any) -> dict[str, Any]:
        return chunk({"tool_calls": [{"index": index, **kw}]})

    events = [
        chunk({"role": "assistant", "content": None}),
        frag(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
        frag(0, function={"arguments": '{"ci'}),
        frag(1, id="call_b", type="function", function={"name": "get_weather", "arguments": '{"city"'}),
        frag(0, function={"arguments": 'ty": "Oslo"}'}),
        frag(1, function={"arguments": ': "Rome"}'}),
        chunk(finish="tool_calls"), "[DONE]",
    ]
    async with FakeUpstream(reply_once(Sse(events))) as up:
        deltas: list[str] = []
        completion = await codex(up.url).complete(call_of(tools=(WEATHER,)), deltas.append)
    assert deltas == [] and completion.text == ""
    assert completion.finish_reason == "tool_calls"
    assert list(completion.tool_calls) == [ToolCall("call_a", "get_weather", '{"city": "Oslo"}'),
                                           ToolCall("call_b", "get_weather", '{"city": "Rome"}')]
    assert completion.usage.prompt_tokens > 0  # no usage chunk: estimated


@pytest.mark.parametrize("reply", [
    Sse(text_stream(["a", "b"])[:-1]),  # everything but [DONE]
    Sse(text_stream(["a", "b", "c"]), cut_after=2),  # connection closed mid-stream
], ids=["no-done", "connection-cut"])
async def test_stream_cut(reply: Sse) -> None:
    async with FakeUpstream(reply_once(reply)) as up:
        with pytest.raises(errors.ProviderError) as info:
            await codex(up.url).complete(call_of(), lambda d: None)
    assert info.value.error_code == "PROVIDER_ERROR"
    if reply.cut_after is None:
        assert "stream cut" in info.value.message


@pytest.mark.parametrize(("error", "expected"), [
    ({"message": f"Rate limit reached for key {CANARY}", "type": "requests", "code": "rate_limit_exceeded"},
     errors.RateLimited),
    ({"message": f"upstream died ({CANARY})", "type": "server_error", "code": None}, errors.ProviderError),
    ({"code": 429, "message": "Provider rate limited"}, errors.RateLimited),  # OpenRouter's numeric codes
], ids=["openai-rate-limit", "server-error", "openrouter-429"])
async def test_error_object_inside_a_stream(error: dict[str, Any], expected: type[Exception]) -> None:
    events = [chunk({"content": "partial"}), {"error": error}, "[DONE]"]
    async with FakeUpstream(reply_once(Sse(events))) as up:
        deltas: list[str] = []
        with pytest.raises(expected) as info:
            await codex(up.url).complete(call_of(), deltas.append)
    assert deltas == ["partial"]
    assert CANARY not in str(info.value) and CANARY not in info.value.message  # type: ignore[attr-defined]


@pytest.mark.parametrize(("reply", "expected", "retry_after_ms"), [
    (Json({"error": {"message": "Invalid 'max_tokens'", "type": "invalid_request_error", "code": None}},
          status=400), errors.ValidationFailed, None),
    (Json({"error": {"message": f"Incorrect API key provided: {CANARY}", "type": "invalid_request_error",
                     "code": "invalid_api_key"}}, status=401), errors.MissingCredentials, None),
    (Json({"error": {"message": "The model `gpt-9` does not exist", "type": "invalid_request_error",
                     "code": "model_not_found"}}, status=404), errors.ProviderNotFound, None),
    (Json({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
          status=429, headers={"retry-after": "3"}), errors.RateLimited, 3000),
    (Json({"error": {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}},
          status=429, headers={"retry-after-ms": "1500", "retry-after": "2"}), errors.RateLimited, 1500),
    (Json({"error": {"message": "The server had an error", "type": "server_error", "code": None}}, status=500),
     errors.ProviderError, None),
    (Json(b"<html>bad gateway</html>"), errors.ProviderError, None),
    (Json({"choices": []}), errors.ProviderError, None),
    (Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{\"choices\": ["), errors.ProviderError, None),
], ids=["400", "401", "404", "429-retry-after", "429-retry-after-ms", "500", "malformed-json",
        "malformed-shape", "truncated"])
async def test_status_and_body_mapping(reply: Any, expected: type[errors.LlmsrvError],
                                       retry_after_ms: int | None) -> None:
    async with FakeUpstream(reply_once(reply)) as up:
        with pytest.raises(expected) as info:
            await codex(up.url).complete(call_of())
    assert CANARY not in str(info.value) and CANARY not in info.value.message
    assert info.value.retry_after_ms == retry_after_ms


async def test_malformed_stream_chunk() -> None:
    async with FakeUpstream(reply_once(Sse([chunk({"content": "a"}), "{not json", "[DONE]"]))) as up:
        with pytest.raises(errors.ProviderError, match="malformed"):
            await codex(up.url).complete(call_of(), lambda d: None)


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
async def test_cancel_closes_the_upstream_connection(streamed: bool) -> None:
    reply = Sse(text_stream(["x"] * 100), interval_s=0.05) if streamed else Hang()
    async with FakeUpstream(reply_once(reply)) as up:
        deltas = Deltas()
        # cancel once the upstream holds the request (streamed: once the first delta arrived)
        cancel = await cancel_when(deltas.wait if streamed else up.wait_request,
                                   lambda: codex(up.url).complete(call_of(), deltas if streamed else None))
        seen = await up.wait_disconnect()  # only a disconnect before the answer was complete counts
    assert cancel.caught
    assert cancel.at <= seen and seen - cancel.at < CANCEL_CLOSE_BOUND_S
    assert len(up.disconnects) == len(up.requests) == 1
    assert not streamed or 0 < len(deltas.items) < 100
    assert streamed or not deltas.items


async def test_probe_lists_models_and_never_spends_tokens() -> None:
    def handler(request: Request) -> Json:
        if request.headers.get("authorization") != f"Bearer {CANARY}":
            return Json({"error": {"message": "Incorrect API key provided: sk-wrong", "code": "invalid_api_key"}},
                        status=401)
        return Json({"object": "list", "data": [{"id": "gpt-4.1", "object": "model"}]})

    async with FakeUpstream(handler) as up:
        assert (await codex(up.url).probe()).available
        wrong = await build_provider("codex", ProviderConfig(base_url=up.url), {"OPENAI_API_KEY": "sk-wrong"}).probe()
        missing = await build_provider("codex", ProviderConfig(base_url=up.url), {}).probe()
    assert (wrong.available, wrong.state) == (False, "invalid") and "sk-wrong" not in (wrong.reason or "")
    assert (missing.available, missing.state) == (False, "missing")
    assert [(r.method, r.path) for r in up.requests] == [("GET", "/models")] * 2  # none for the missing key


async def test_probe_unavailable_on_server_error() -> None:
    async with FakeUpstream(reply_once(Json({"error": {"message": "down"}}, status=503))) as up:
        status = await codex(up.url).probe()
    assert (status.available, status.state) == (False, "available") and "503" in (status.reason or "")


def test_codex_credentials_and_defaults() -> None:
    assert build_provider("codex", ProviderConfig(), {}).base_url == "https://api.openai.com/v1"
    assert build_provider("codex", ProviderConfig(), {"CODEX_API_KEY": "k2"}).key == "k2"
    assert build_provider("codex", ProviderConfig(), {"OPENAI_API_KEY": "k1", "CODEX_API_KEY": "k2"}).key == "k1"
    assert "OPENAI_API_KEY" in (build_provider("codex", ProviderConfig(), {}).status().reason or "")


# ---- Responses API (codex) -------------------------------------------------------------------


def response_object(text: str = "Done.", status: str = "completed", tool: bool = False,
                    usage: tuple[int, int] = (30, 7)) -> dict[str, Any]:
    output: list[dict[str, Any]] = [{"id": "rs_1", "type": "reasoning", "summary": []}]
    if tool:
        output.append({"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_9",
                       "name": "get_weather", "arguments": '{"city":"Oslo"}'})
    else:
        output.append({"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]})
    return {"id": "resp_1", "object": "response", "status": status, "model": "gpt-5-codex", "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": None, "usage": {"input_tokens": usage[0], "output_tokens": usage[1],
                                     "total_tokens": sum(usage)}}


async def test_responses_api_text() -> None:
    async with FakeUpstream(reply_once(Json(response_object()))) as up:
        completion = await codex(up.url + "/v1").complete(call_of("gpt-5-codex"))
    assert (completion.text, completion.usage, completion.finish_reason) == ("Done.", Usage(30, 7), "stop")
    request = up.requests[0]
    assert request.path == "/v1/responses" and request.headers["authorization"] == f"Bearer {CANARY}"
    assert request.json() == {"model": "gpt-5-codex", "instructions": "be brief", "max_output_tokens": 50,
                              "store": False, "input": [{"role": "user", "content": "hello"}]}


async def test_responses_api_tool_call() -> None:
    async with FakeUpstream(reply_once(Json(response_object(tool=True)))) as up:
        completion = await codex(up.url).complete(call_of("codex-mini-latest", tools=(WEATHER,)))
    assert completion.finish_reason == "tool_calls"
    assert list(completion.tool_calls) == [ToolCall("call_9", "get_weather", '{"city":"Oslo"}')]
    assert up.requests[0].json()["tools"] == [{
        "type": "function", "name": "get_weather", "description": "Weather for a city", "strict": False,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def response_events(pieces: list[str], final: dict[str, Any] | None = None) -> list[Any]:
    events: list[Any] = [("response.created", {"type": "response.created", "sequence_number": 0,
                                               "response": {**response_object(), "status": "in_progress"}})]
    for i, piece in enumerate(pieces):
        events.append(("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_1",
                                                      "output_index": 1, "content_index": 0, "delta": piece,
                                                      "sequence_number": i + 1}))
    if final is not None:
        events.append((f"response.{final['status']}", {"type": f"response.{final['status']}", "response": final,
                                                       "sequence_number": len(pieces) + 1}))
    return events


async def test_responses_api_streaming() -> None:
    pieces = ["Do", "ne", "."]
    async with FakeUpstream(reply_once(Sse(response_events(pieces, response_object("Done."))))) as up:
        deltas: list[str] = []
        completion = await codex(up.url).complete(call_of("gpt-5-codex"), deltas.append)
    assert deltas == pieces and completion.text == "Done."
    assert (completion.usage, completion.finish_reason) == (Usage(30, 7), "stop")
    assert up.requests[0].json()["stream"] is True


async def test_responses_api_incomplete_is_length() -> None:
    final = response_object("Do", status="incomplete")
    async with FakeUpstream(reply_once(Sse(response_events(["Do"], final)))) as up:
        completion = await codex(up.url).complete(call_of("gpt-5-codex"), lambda d: None)
    assert (completion.text, completion.finish_reason) == ("Do", "length")


@pytest.mark.parametrize(("tail", "expected", "text"), [
    ([("response.failed", {"type": "response.failed", "response": {
        **response_object(), "status": "failed", "output": [],
        "error": {"code": "server_error", "message": f"boom {CANARY}"}}})], errors.ProviderError, "boom"),
    ([("error", {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "param": None,
                 "sequence_number": 3})], errors.RateLimited, "slow down"),
    ([], errors.ProviderError, "stream cut"),
], ids=["failed", "error-event", "no-terminal-event"])
async def test_responses_api_stream_errors(tail: list[Any], expected: type[errors.LlmsrvError], text: str) -> None:
    async with FakeUpstream(reply_once(Sse(response_events(["a"]) + tail))) as up:
        with pytest.raises(expected) as info:
            await codex(up.url).complete(call_of("gpt-5-codex"), lambda d: None)
    assert text in info.value.message and CANARY not in info.value.message


# ---- github, openrouter, openai_compat -------------------------------------------------------


async def test_github_models() -> None:
    assert build_provider("github", ProviderConfig(), {}).base_url == "https://models.github.ai/inference"
    async with FakeUpstream(lambda r: Json(chat_reply(model="openai/gpt-4.1"))) as up:
        provider = build_provider("github", ProviderConfig(base_url=up.url + "/inference"), {"GH_TOKEN": CANARY})
        completion = await provider.complete(call_of("openai/gpt-4.1"))
        assert (await provider.probe()).available
    assert completion.text == "Hi there"
    chat, catalog = up.requests
    assert chat.path == "/inference/chat/completions" and chat.json()["model"] == "openai/gpt-4.1"
    assert catalog.path == "/catalog/models"
    for request in (chat, catalog):
        assert request.headers["authorization"] == f"Bearer {CANARY}"
        assert request.headers["x-github-api-version"] == "2022-11-28"


async def test_openrouter_auto_model_and_attribution_headers() -> None:
    assert build_provider("openrouter", ProviderConfig(), {}).base_url == "https://openrouter.ai/api/v1"
    async with FakeUpstream(lambda r: Json(chat_reply(model="anthropic/claude-sonnet-4.5"))) as up:
        env = {"OPENROUTER_API_KEY": CANARY}
        await build_provider("openrouter", ProviderConfig(base_url=up.url + "/api/v1"), env).complete(call_of("auto"))
        await build_provider("openrouter", ProviderConfig(base_url=up.url + "/api/v1"),
                                 {**env, "OPENROUTER_HTTP_REFERER": "https://example.org/app"}).complete(
            call_of("anthropic/claude-sonnet-4.5"))
    first, second = up.requests
    assert first.path == "/api/v1/chat/completions" and first.json()["model"] == "openrouter/auto"
    assert first.headers["authorization"] == f"Bearer {CANARY}" and first.headers["x-title"] == "llmsrv"
    assert "http-referer" not in first.headers
    assert second.json()["model"] == "anthropic/claude-sonnet-4.5"
    assert second.headers["http-referer"] == "https://example.org/app" and second.headers["x-title"] == "llmsrv"


async def test_openrouter_stream_with_keepalive_comments_and_midstream_error() -> None:
    # OpenRouter sends ": OPENROUTER PROCESSING" comments; errors mid-generation come as a data chunk.
    body = (b": OPENROUTER PROCESSING\n\n"
            + b"data: " + msgspec.json.encode(chunk({"content": "Hel"})) + b"\n\n"
            + b": OPENROUTER PROCESSING\n\n"
            + b"data: " + msgspec.json.encode(chunk({"content": "lo"})) + b"\n\n"
            + b"data: " + msgspec.json.encode({**chunk(finish="error"), "error": {
                "code": 502, "message": "Provider disconnected"}}) + b"\n\n"
            + b"data: [DONE]\n\n")
    head = f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n".encode()
    async with FakeUpstream(reply_once(Raw(head + body))) as up:
        deltas: list[str] = []
        provider = build_provider("openrouter", ProviderConfig(base_url=up.url), {"OPENROUTER_API_KEY": CANARY})
        with pytest.raises(errors.ProviderError, match="Provider disconnected"):
            await provider.complete(call_of("openrouter/auto"), deltas.append)
    assert deltas == ["Hel", "lo"]


async def test_openai_compat_without_key_or_base_url() -> None:
    missing = build_provider("openai_compat", ProviderConfig(), {})
    assert not missing.status().available and "base_url" in (missing.status().reason or "")
    assert not (await missing.probe()).available
    async with FakeUpstream(lambda r: Json(chat_reply(model="llama3:8b"))) as up:
        keyless = build_provider("openai_compat", ProviderConfig(base_url=up.url + "/v1"), {})
        assert keyless.status().available
        completion = await keyless.complete(call_of("llama3:8b"))
        assert (await keyless.probe()).available
        keyed = build_provider("openai_compat", ProviderConfig(base_url=up.url + "/v1", api_key_env="MY_VLLM_KEY"),
                                     {"MY_VLLM_KEY": CANARY, "OPENAI_COMPAT_API_KEY": "other"})
        await keyed.complete(call_of("llama3:8b"))
        await build_provider("openai_compat", ProviderConfig(base_url=up.url + "/v1"),
                                   {"OPENAI_COMPAT_API_KEY": "compat-key"}).complete(call_of("llama3:8b"))
    assert completion.text == "Hi there"
    chat, models, with_key, with_default_key = up.requests
    assert (chat.path, models.path) == ("/v1/chat/completions", "/v1/models")
    assert "authorization" not in chat.headers and "authorization" not in models.headers
    assert with_key.headers["authorization"] == f"Bearer {CANARY}"
    assert with_default_key.headers["authorization"] == "Bearer compat-key"


# ---- end to end over NATS --------------------------------------------------------------------


async def test_codex_end_to_end_over_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)

    def handler(request: Request) -> Json | Sse:
        body = request.json()
        if request.path == "/v1/responses":
            return Sse(response_events(["co", "dex"], response_object("codex", usage=(9, 2))))
        if body.get("stream"):
            return Sse(text_stream(["str", "eam", "ed"], (8, 3)), interval_s=0.01)
        return Json(chat_reply("plain answer", usage=(11, 4)))

    async with FakeUpstream(handler) as up, \
            running(nats_url, providers={"codex": {"base_url": up.url + "/v1"}}) as h:
        reply = await h.client.complete({"messages": user("hi"), "model": "codex:gpt-4.1"})
        chunks: list[StreamChunk] = []
        streamed = await h.client.stream({"messages": user("hi"), "model": "codex:gpt-4.1"}, chunks.append)
        responses = await h.client.stream({"messages": user("hi"), "model": "codex:gpt-5-codex"}, lambda c: None)
    assert (reply.text, reply.model, reply.usage) == ("plain answer", "codex:gpt-4.1", Usage(11, 4))
    assert reply.tokens_used == 15 and reply.finish_reason == "stop"
    assert streamed.text == "streamed" == "".join(c.delta for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert (streamed.model, streamed.usage) == ("codex:gpt-4.1", Usage(8, 3))
    assert (responses.text, responses.model, responses.usage) == ("codex", "codex:gpt-5-codex", Usage(9, 2))
    assert [r.path for r in up.requests] == ["/v1/chat/completions"] * 2 + ["/v1/responses"]


# ---- recorded fixtures (tests/fixtures/openai/SOURCES.md) ------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "openai"


def recorded(name: str) -> Any:
    """A fixture: a ``.json`` body decoded, or a ``.sse`` stream as ``Sse`` events (``(event, data)`` where
    the stream names its events, else the ``data`` text), each data field as recorded."""
    raw = (FIXTURES / name).read_text()
    if name.endswith(".json"):
        return msgspec.json.decode(raw)
    events: list[Any] = []
    for frame in raw.split("\n\n"):
        lines = [line for line in frame.split("\n") if line]
        if not lines:
            continue
        name_ = next((line[len("event: "):] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[len("data: "):] for line in lines if line.startswith("data: "))
        events.append((name_, data) if name_ else data)
    return events


def fold_all(codec: Any, call: Call, events: list[Any], *, stream: bool) -> tuple[Completion, list[str]]:
    """Feed ``events`` to a fresh fold of ``codec`` as the transport does; the result and the deltas."""
    fold = codec.folder(call, Origin("codex", (CANARY,)), stream=stream)
    deltas = []
    for event in events:
        name, data = event if isinstance(event, tuple) else ("", event)
        if piece := fold.feed(data if isinstance(data, str) else msgspec.json.encode(data), name):
            deltas.append(piece)
        if fold.done:
            break
    return fold.result(), deltas


STOCK = Tool(type="function", function=FunctionDef(name="get_stock_price", parameters={
    "type": "object", "properties": {"ticker": {"type": "string"}, "exchange": {"type": "string"}}}))
WEATHER_ARGS = Tool(type="function", function=FunctionDef(name="GetWeatherArgs", parameters={
    "type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                     "units": {"type": "string"}}}))
REFUSED = "I'm very sorry, but I can't assist with that."
STREAM_REFUSED = "I'm sorry, I can't assist with that request."
RESPONSES_REFUSED = "I'm sorry, but I can't help with that."
EDINBURGH = '{"city": "Edinburgh", "country": "GB", "units": "c"}'
AAPL = '{"ticker": "AAPL", "exchange": "NASDAQ"}'


RECORDED = [
    (CHAT, "chat_text.json", False, "I'm unable to provide real-time weather", "stop", [], None, Usage(14, 37)),
    (CHAT, "chat_stream_text.sse", True, "I'm unable to provide real-time weather", "stop", [], None, Usage(14, 30)),
    (CHAT, "chat_two_tool_calls.json", False, "", "tool_calls",
     [ToolCall("call_fdNz3vOBKYgOIpMdWotB9MjY", "GetWeatherArgs", EDINBURGH),
      ToolCall("call_h1DWI1POMJLb0KwIyQHWXD4p", "get_stock_price", AAPL)], None, Usage(149, 60)),
    (CHAT, "chat_stream_two_tool_calls.sse", True, "", "tool_calls",
     [ToolCall("call_JMW1whyEaYG438VE1OIflxA2", "GetWeatherArgs", EDINBURGH),
      ToolCall("call_DNYTawLBoN8fj3KN6qU9N1Ou", "get_stock_price", AAPL)], None, Usage(149, 60)),
    (CHAT, "chat_stream_tool_call.sse", True, "", "tool_calls",
     [ToolCall("call_4XzlGBLtUe9dy3GVNV4jhq7h", "get_weather", '{"city":"New York City"}')],
     None, Usage(44, 16)),
    (CHAT, "chat_refusal.json", False, "", "content_filter", [], REFUSED, Usage(79, 12)),
    (CHAT, "chat_stream_refusal.sse", True, "", "content_filter", [], STREAM_REFUSED, Usage(79, 11)),
    (CHAT, "chat_length.json", False, '{"', "length", [], None, Usage(79, 1)),
    (CHAT, "chat_stream_length.sse", True, '{"', "length", [], None, Usage(79, 1)),
    (RESPONSES, "responses_text.json", False, "I can't provide real-time updates", "stop", [], None, Usage(14, 50)),
    (RESPONSES, "responses_stream_text.sse", True, "Oslo: 5 °C ❄️, Rome: 25 °C ☀️", "stop", [], None, Usage(120, 14)),
    (RESPONSES, "responses_two_tool_calls.json", False, "", "tool_calls",
     [ToolCall("call_oslo", "get_weather", '{"city":"Oslo"}'), ToolCall("call_rome", "get_weather", '{"city":"Rome"}')],
     None, Usage(58, 36)),
    (RESPONSES, "responses_stream_two_tool_calls.sse", True, "", "tool_calls",
     [ToolCall("call_oslo", "get_weather", '{"city":"Oslo"}'), ToolCall("call_rome", "get_weather", '{"city":"Rome"}')],
     None, Usage(58, 36)),
    (RESPONSES, "responses_refusal.json", False, "", "content_filter", [], RESPONSES_REFUSED, Usage(41, 11)),
    (RESPONSES, "responses_stream_refusal.sse", True, "", "content_filter", [], RESPONSES_REFUSED, Usage(41, 11)),
]


@pytest.mark.parametrize(("codec", "fixture", "stream", "text", "finish", "calls", "refusal", "usage"), RECORDED,
                         ids=[row[1] for row in RECORDED])
def test_recorded_replies_fold(codec: Any, fixture: str, stream: bool, text: str, finish: str,
                               calls: list[ToolCall], refusal: str | None, usage: Usage) -> None:
    data = recorded(fixture)
    completion, deltas = fold_all(codec, call_of(), data if stream else [msgspec.json.encode(data).decode()],
                                  stream=stream)
    assert completion.text.startswith(text) and completion.finish_reason == finish
    assert list(completion.tool_calls) == calls and completion.refusal == refusal
    assert completion.usage == usage
    if stream:
        assert "".join(deltas) == completion.text  # refusal text is never a delta
    if usage.completion_tokens == 50:  # responses_text.json: check the recorded usage really is that
        assert recorded(fixture)["usage"]["output_tokens"] == 50


@pytest.mark.parametrize(("events", "finish", "refusal"), [
    ([chunk({"content": "Some"}), chunk(finish="content_filter"), "[DONE]"], "content_filter", None),
    ([chunk({"refusal": "No."}), chunk(finish="stop"), "[DONE]"], "content_filter", "No."),
    ([chunk({"role": "assistant", "content": None, "refusal": ""}), chunk(finish="stop"), "[DONE]"], "stop", None),
], ids=["content-filter-stop", "refusal-delta", "empty-refusal-is-none"])
def test_chat_stream_refusal_and_filter_table(events: list[Any], finish: str, refusal: str | None) -> None:
    completion, _ = fold_all(CHAT, call_of(), events, stream=True)
    assert (completion.finish_reason, completion.refusal) == (finish, refusal)


@pytest.mark.parametrize(("body", "finish", "refusal"), [
    (chat_reply("partial", finish="content_filter"), "content_filter", None),
    ({**chat_reply(None), "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "Can't."}}]}, "content_filter", "Can't."),
    ({**response_object(status="incomplete"), "incomplete_details": {"reason": "content_filter"}},
     "content_filter", None),
], ids=["chat-content-filter", "chat-refusal", "responses-incomplete-content-filter"])
def test_plain_refusal_and_filter_table(body: dict[str, Any], finish: str, refusal: str | None) -> None:
    codec = RESPONSES if body.get("object") == "response" else CHAT
    completion, _ = fold_all(codec, call_of(), [msgspec.json.encode(body).decode()], stream=False)
    assert (completion.finish_reason, completion.refusal) == (finish, refusal)


# ---- tool round trips through the real provider path ------------------------------------------

def assistant_turn(completion: Completion) -> Message:
    """The assistant turn a client sends back: the text (often "") and the calls, in OpenAI's form."""
    return Message("assistant", completion.text, tool_calls=[
        MessageToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in completion.tool_calls])


def answered_in_reverse(call: Call, first: Completion) -> Call:
    """The next turn: the assistant's calls, then one tool message per call, last call first."""
    answers = [Message("tool", f"result of {c.name} #{i}", tool_call_id=c.id)
               for i, c in reversed(list(enumerate(first.tool_calls)))]
    return msgspec.structs.replace(call, messages=[*call.messages, assistant_turn(first), *answers])


ROUND_TRIPS = [  # provider, env, base path, model, api
    ("codex", {"OPENAI_API_KEY": CANARY}, "/v1", "gpt-4.1", "openai_chat"),
    ("codex", {"OPENAI_API_KEY": CANARY}, "/v1", "o4-mini", "openai_chat"),
    ("codex", {"OPENAI_API_KEY": CANARY}, "/v1", "gpt-5-codex", "openai_responses"),
    ("github", {"GITHUB_TOKEN": CANARY}, "/inference", "openai/gpt-4.1", "openai_chat"),
    ("openrouter", {"OPENROUTER_API_KEY": CANARY}, "/api/v1", "anthropic/claude-sonnet-4.5", "openai_chat"),
    ("openai_compat", {}, "/v1", "llama3:8b", "openai_chat"),
]


def round_trip_handler(api: str, stream: bool) -> Any:
    """The first turn answers two tool calls, the next (with tool results) a text: recorded replies."""
    prefix = "chat" if api == "openai_chat" else "responses"

    def handler(request: Request) -> Json | Sse:
        body = request.json()
        answering = any(m.get("role") == "tool" or m.get("type") == "function_call_output"
                        for m in body.get("messages") or body.get("input") or [])
        name = f"{prefix}_{'stream_' if stream else ''}{'text' if answering else 'two_tool_calls'}"
        return Sse(recorded(name + ".sse")) if stream else Json(recorded(name + ".json"))

    return handler


def round_trip_call(api: str, model: str) -> Call:
    tools = (WEATHER_ARGS, STOCK) if api == "openai_chat" else (WEATHER,)
    return Call(model=model, max_tokens=50, temperature=0.3, tools=tools, messages=[
        Message("system", "be brief"), Message("user", "Weather in Edinburgh, and the AAPL price?")])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("key", "env", "base", "model", "api"), ROUND_TRIPS,
                         ids=[f"{r[0]}-{r[3]}" for r in ROUND_TRIPS])
async def test_two_call_round_trip_answered_in_reverse(key: str, env: dict[str, str], base: str, model: str,
                                                       api: str, stream: bool) -> None:
    wrapped = validating(api, round_trip_handler(api, stream))
    async with FakeUpstream(wrapped) as up:
        provider = build_provider(key, ProviderConfig(base_url=up.url + base), env)
        on_delta = (lambda d: None) if stream else None
        call = round_trip_call(api, model)
        first = await provider.complete(call, on_delta)
        assert first.finish_reason == "tool_calls" and len(first.tool_calls) == 2
        second = await provider.complete(answered_in_reverse(call, first), on_delta)
    assert wrapped.problems == [] and wrapped.rejected == []
    assert second.finish_reason == "stop" and second.text
    [a, b] = first.tool_calls
    sent = up.requests[1].json()
    if api == "openai_chat":
        assert sent["messages"][2:] == [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in (a, b)]},
            {"role": "tool", "tool_call_id": b.id, "content": f"result of {b.name} #1"},
            {"role": "tool", "tool_call_id": a.id, "content": f"result of {a.name} #0"}]
    else:
        assert sent["input"][1:] == [
            {"type": "function_call", "call_id": a.id, "name": a.name, "arguments": a.arguments},
            {"type": "function_call", "call_id": b.id, "name": b.name, "arguments": b.arguments},
            {"type": "function_call_output", "call_id": b.id, "output": f"result of {b.name} #1"},
            {"type": "function_call_output", "call_id": a.id, "output": f"result of {a.name} #0"}]
        assert sent["instructions"] == "be brief"


@pytest.mark.parametrize("api", ["openai_chat", "openai_responses"])
def test_assistant_text_beside_tool_calls(api: str) -> None:
    call = round_trip_call(api, "gpt-4.1")
    turn = Message("assistant", "Let me check.", tool_calls=[
        MessageToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}'))])
    call = msgspec.structs.replace(call, messages=[*call.messages, turn, Message("tool", "5 C", tool_call_id="call_1")])
    if api == "openai_chat":
        body = chat_body(call, stream=False)
        assert body["messages"][2]["content"] == "Let me check." and openai_chat_problems(body) == []
    else:
        body = responses_body(call, stream=True)
        assert body["input"][1:3] == [
            {"role": "assistant", "content": "Let me check."},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'}]
        assert openai_responses_problems(body) == []


@pytest.mark.parametrize("api", ["openai_chat", "openai_responses"])
async def test_an_unanswered_call_fails_upstream_for_the_apis_reason(api: str) -> None:
    # check_turns lets a conversation leave a call unanswered (it checks only that answers name calls):
    # the real API refuses it, and so does the validating fake, with the API's own text -> VALIDATION_ERROR.
    first = Completion(text="", usage=Usage(1, 1), finish_reason="tool_calls", tool_calls=(
        ToolCall("call_a", "get_weather", '{"city":"Oslo"}'), ToolCall("call_b", "get_weather", '{"city":"Rome"}')))
    call = round_trip_call(api, "gpt-5-codex" if api == "openai_responses" else "gpt-4.1")
    call = msgspec.structs.replace(call, messages=[*call.messages, assistant_turn(first),
                                                   Message("tool", "5 C", tool_call_id="call_a")])
    wrapped = validating(api, round_trip_handler(api, False))
    async with FakeUpstream(wrapped) as up:
        with pytest.raises(errors.ValidationFailed) as info:
            await codex(up.url).complete(call)
    reason = "call_b" if api == "openai_chat" else "No tool output found for function call call_b"
    assert reason in info.value.message and len(wrapped.rejected) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", ["gpt-4.1", "o3-mini", "gpt-5", "openai/o4-mini", "codex-mini-latest", "llama3:8b"])
def test_reasoning_parameters_are_what_the_api_accepts(model: str, stream: bool) -> None:
    call = round_trip_call("openai_chat", model)
    assert openai_chat_problems(chat_body(call, stream=stream)) == []
    assert openai_responses_problems(responses_body(call, stream=stream)) == []


# ---- refusals through the provider --------------------------------------------------------------

@pytest.mark.parametrize(("model", "reply", "refusal"), [
    ("gpt-4.1", Json(recorded("chat_refusal.json")), REFUSED),
    ("gpt-4.1", Sse(recorded("chat_stream_refusal.sse")), STREAM_REFUSED),
    ("gpt-5-codex", Json(recorded("responses_refusal.json")), RESPONSES_REFUSED),
    ("gpt-5-codex", Sse(recorded("responses_stream_refusal.sse")), RESPONSES_REFUSED),
], ids=["chat-plain", "chat-streamed", "responses-plain", "responses-streamed"])
async def test_refusal_is_content_filter_with_the_text(model: str, reply: Json | Sse, refusal: str) -> None:
    api = "openai_responses" if model == "gpt-5-codex" else "openai_chat"
    wrapped = validating(api, reply_once(reply))
    async with FakeUpstream(wrapped) as up:
        deltas: list[str] = []
        completion = await codex(up.url).complete(call_of(model), deltas.append if isinstance(reply, Sse) else None)
    assert (completion.finish_reason, completion.refusal, completion.text) == ("content_filter", refusal, "")
    assert deltas == [] and wrapped.problems == []


# ---- insufficient_quota -------------------------------------------------------------------------

QUOTA = {"message": f"You exceeded your current quota, please check your plan and billing details. ({CANARY})",
         "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}


@pytest.mark.parametrize(("key", "model", "reply"), [
    ("codex", "gpt-4.1", Json({"error": QUOTA}, status=429, headers={"retry-after": "20"})),
    ("codex", "gpt-4.1", Json({"error": {**QUOTA, "code": None}}, status=429)),  # the older form: type only
    ("codex", "gpt-4.1", Json({"error": {**QUOTA, "code": "credit_balance_exhausted"}}, status=429)),
    ("codex", "gpt-5-codex", Json({"error": QUOTA}, status=429)),
    ("codex", "gpt-4.1", Sse([chunk({"content": "a"}), {"error": QUOTA}, "[DONE]"])),
    ("codex", "gpt-5-codex", Sse([("error", {"type": "error", "sequence_number": 1, **{
        k: QUOTA[k] for k in ("code", "message", "param")}})])),
    ("codex", "gpt-5-codex", Sse([("error", {"type": "error", "sequence_number": 1, "error": QUOTA})])),
    ("codex", "gpt-5-codex", Sse([("response.failed", {"type": "response.failed", "sequence_number": 1, "response": {
        **response_object(), "status": "failed", "output": [], "error": QUOTA}})])),
    ("openrouter", "openai/gpt-4.1", Json({"error": {"code": 402, "message": "Insufficient credits"}}, status=402)),
    ("openrouter", "openai/gpt-4.1", Sse([{"error": {"code": 402, "message": "Insufficient credits"}}, "[DONE]"])),
], ids=["chat-429", "chat-429-type-only", "chat-429-credit-balance", "responses-429", "chat-in-stream",
        "responses-error-event", "responses-error-event-nested", "responses-failed", "openrouter-402",
        "openrouter-in-stream-402"])
async def test_insufficient_quota_is_quota_exhausted(key: str, model: str, reply: Json | Sse) -> None:
    env = {"OPENAI_API_KEY": CANARY, "OPENROUTER_API_KEY": CANARY}
    async with FakeUpstream(reply_once(reply)) as up:
        provider = build_provider(key, ProviderConfig(base_url=up.url), env)
        with pytest.raises(errors.QuotaExhausted) as info:
            await provider.complete(call_of(model), (lambda d: None) if isinstance(reply, Sse) else None)
    exc = info.value
    assert not isinstance(exc, errors.RateLimited) and exc.retry_after_ms is None  # no wait helps
    assert exc.retryable and not exc.retry_same_target and CANARY not in exc.message


@pytest.mark.parametrize(("status", "error", "expected"), [
    (429, QUOTA, errors.QuotaExhausted),
    (429, {"type": "requests", "code": "rate_limit_exceeded", "message": "slow"}, None),
    (402, None, errors.QuotaExhausted),
    (500, None, None),
    (400, {"type": "invalid_request_error", "code": None, "message": "bad"}, None),
], ids=["quota", "rate-limit", "402", "500", "400"])
def test_status_hook_table(status: int, error: Any, expected: type[errors.LlmsrvError] | None) -> None:
    assert CHAT.status_error(status, "", error) is expected
    assert RESPONSES.status_error(status, "", error) is expected


# ---- unicode split across HTTP chunks -----------------------------------------------------------

@asynccontextmanager
async def chunked_server(pieces: list[bytes]) -> AsyncIterator[str]:
    """A loopback HTTP server that answers one event stream in ``pieces``, each its own HTTP chunk and its own
    write (10 ms apart), so a piece may end inside a UTF-8 character."""

    async def serve(stream: trio.SocketStream) -> None:
        seen = b""
        while b"\r\n\r\n" not in seen:
            seen += await stream.receive_some(65536)
        head, _, body = seen.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length")))
        while len(body) < length:
            body += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"transfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
            await trio.sleep(0.01)
        await stream.send_all(b"0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def test_unicode_split_across_http_chunks() -> None:
    text = "Grüße, 世界 👋🏽"
    frames = b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" if isinstance(e, dict) else b"data: [DONE]\n\n"
                      for e in text_stream([text[:3], text[3:]]))
    cut = [i for i in range(1, len(frames)) if frames[i] & 0xC0 == 0x80][::3]  # inside multi-byte characters
    pieces = [frames[a:b] for a, b in zip([0, *cut], [*cut, len(frames)], strict=True)]
    assert any(p and p[-1] >= 0x80 for p in pieces)
    async with chunked_server(pieces) as url:
        deltas: list[str] = []
        completion = await codex(url).complete(call_of(), deltas.append)
    assert completion.text == text == "".join(deltas) and deltas == [text[:3], text[3:]]
