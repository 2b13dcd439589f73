"""openai_wire, the pure translation between OpenAI Chat Completions JSON and llmsrv's types: tables of
request bodies (accepted, ignored, refused with the field named), and the documents it builds, checked
against the official SDK's own response types."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmsrv import errors, openai_wire
from llmsrv.config import build_config
from llmsrv.messages import Attempt, LLMRequest, LLMResponse, Message, ToolCall, Usage

ENC = msgspec.json.encode
USER = [{"role": "user", "content": "hi"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}


def decode(body: dict[str, Any], **headers: Any) -> openai_wire.ChatRequest:
    return openai_wire.decode_chat(ENC(body), **headers)


# ---- requests: accepted ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "expected"), [
    ({"messages": USER}, {"model": "auto", "max_tokens": 4000, "temperature": 0.7, "stream": False}),
    ({"model": "mock:echo", "messages": USER, "temperature": None, "max_tokens": None, "stream": None},
     {"model": "mock:echo", "temperature": 0.7, "max_tokens": 4000}),
    ({"messages": USER, "max_tokens": 10, "max_completion_tokens": 20}, {"max_tokens": 20}),
    ({"messages": USER, "max_tokens": 10}, {"max_tokens": 10}),
    ({"messages": USER, "temperature": 0, "stream": True}, {"temperature": 0.0, "stream": True}),
    ({"messages": USER, "task_type": "coder", "complexity": "complex", "capabilities": ["code"], "provider": "claude",
      "timeout_ms": 900, "correlation_id": "c-1"},
     {"task_type": "coder", "complexity": "complex", "capabilities": ["code"], "provider": "claude",
      "timeout_ms": 900, "correlation_id": "c-1"}),
    ({"messages": USER, "n": 1, "logprobs": False, "top_logprobs": None, "stop": None, "response_format":
      {"type": "text"}, "tool_choice": "auto", "logit_bias": {}, "modalities": ["text"], "audio": None,
      "functions": [], "function_call": None}, {}),
], ids=["minimal", "nulls-are-absent", "max_completion_tokens-wins", "max_tokens", "temperature-0-stream",
        "llmsrv-extras", "semantic-fields-at-their-defaults"])
def test_accepted_fields(body: dict[str, Any], expected: dict[str, Any]) -> None:
    request = decode(body).request
    for key, value in expected.items():
        assert msgspec.to_builtins(getattr(request, key)) == value, key


@pytest.mark.parametrize(("messages", "expected"), [
    ([{"role": "developer", "content": "be brief"}, *USER], [Message("system", "be brief"), Message("user", "hi")]),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"}],
     [Message("user", "a\nb")]),
    ([*USER, {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None, "annotations": [],
              "audio": None, "function_call": None},
      {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}],
     None),
    ([*USER, {"role": "assistant", "content": None, "refusal": "I can't help with that"}, *USER],
     [Message("user", "hi"), Message("assistant", "I can't help with that"), Message("user", "hi")]),
], ids=["developer-is-system", "text-parts-joined", "tool-round-trip-as-the-sdk-sends-it", "refusal-kept-as-text"])
def test_messages(messages: list[dict[str, Any]], expected: list[Message] | None) -> None:
    got = decode({"messages": messages}).request.messages
    if expected is not None:
        assert got == expected
    else:
        assert got[1].tool_calls is not None and got[1].tool_calls[0].id == "call_1" and got[1].content == ""
        assert (got[2].role, got[2].tool_call_id, got[2].content) == ("tool", "call_1", "sunny")


def test_tools_lose_strict_and_stream_options_count_only_when_streaming() -> None:
    tool = {"type": "function", "function": {"name": "weather", "strict": True, "parameters": {"type": "object"}}}
    chat = decode({"messages": USER, "tools": [tool], "stream": True, "stream_options": {"include_usage": True}})
    assert chat.request.tools is not None and chat.request.tools[0].function.name == "weather"
    assert chat.include_usage
    assert not decode({"messages": USER, "stream_options": {"include_usage": True}}).include_usage


def test_ignored_fields_are_listed() -> None:
    chat = decode({"messages": USER, "user": "u", "seed": 3, "top_p": 0.5, "metadata": {"a": "b"},
                   "parallel_tool_calls": False})
    assert sorted(chat.ignored) == ["metadata", "parallel_tool_calls", "seed", "top_p", "user"]


def test_headers_fill_in_what_the_body_leaves_out() -> None:
    from_headers = decode({"messages": USER}, timeout_ms=250, correlation_id="h-1").request
    body_wins = decode({"messages": USER, "timeout_ms": 900, "correlation_id": "b-1"},
                       timeout_ms=250, correlation_id="h-1").request
    assert (from_headers.timeout_ms, from_headers.correlation_id) == (250, "h-1")
    assert (body_wins.timeout_ms, body_wins.correlation_id) == (900, "b-1")


# ---- requests: refused ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "error", "param"), [
    ({"messages": USER, "n": 2}, errors.ValidationFailed, "n"),
    ({"messages": USER, "n": True}, errors.ValidationFailed, "n"),
    ({"messages": USER, "logprobs": True}, errors.ValidationFailed, "logprobs"),
    ({"messages": USER, "top_logprobs": 3}, errors.ValidationFailed, "top_logprobs"),
    ({"messages": USER, "stop": ["\n"]}, errors.ValidationFailed, "stop"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, errors.ValidationFailed, "response_format"),
    ({"messages": USER, "tool_choice": "required"}, errors.ValidationFailed, "tool_choice"),
    ({"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}}, errors.ValidationFailed,
     "tool_choice"),
    ({"messages": USER, "functions": [{"name": "f"}]}, errors.ValidationFailed, "functions"),
    ({"messages": USER, "modalities": ["text", "audio"]}, errors.ValidationFailed, "modalities"),
    ({"messages": USER, "tempreature": 1}, errors.ValidationFailed, "tempreature"),
    ({"messages": USER, "max_tokens": 0}, errors.ValidationFailed, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 200000}, errors.ValidationFailed, "max_completion_tokens"),
    ({"messages": USER, "temperature": 3}, errors.ValidationFailed, "temperature"),
    ({"messages": USER, "stream": True, "stream_options": {"include_usage": True, "extra": 1}},
     errors.ValidationFailed, "stream_options.extra"),
    ({"messages": USER, "task_type": "poet"}, errors.ValidationFailed, "task_type"),
    ({"messages": []}, errors.ValidationFailed, "messages"),
    ({"messages": "hi"}, errors.ValidationFailed, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, errors.ValidationFailed,
     "messages[0].colour"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]},
     errors.ValidationFailed, "messages[0].content[1].type"),
    ({"messages": [{"role": "user", "content": ["bare string part"]}]}, errors.ValidationFailed,
     "messages[0].content[0]"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, errors.ValidationFailed,
     "messages[0].role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, errors.ValidationFailed, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]}, errors.ValidationFailed,
     "messages[0].audio"),
    ({"messages": [*USER, {"role": "tool", "tool_call_id": "nope", "content": "x"}]}, errors.ValidationFailed,
     "messages[1].tool_call_id"),
    ({"messages": USER, "tools": [{"type": "custom", "custom": {"name": "x"}}]}, errors.InvalidTool, "tools[0].type"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, errors.InvalidTool,
     "tools[0].function.name"),
])
def test_refused_with_the_field_named(body: dict[str, Any], error: type[errors.LlmsrvError], param: str) -> None:
    with pytest.raises(error) as info:
        decode(body)
    assert openai_wire.error_param(info.value) == param, info.value.message


@pytest.mark.parametrize(("raw", "code"), [
    (b"{nope", "INVALID_JSON"),
    (b"\xff\xfe", "INVALID_JSON"),
    (b"[1, 2]", "VALIDATION_ERROR"),
    (b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", "VALIDATION_ERROR"),
], ids=["not-json", "not-utf8", "not-an-object", "too-deep"])
def test_bodies_that_are_not_a_request(raw: bytes, code: str) -> None:
    with pytest.raises(errors.RequestError) as info:
        openai_wire.decode_chat(raw)
    assert info.value.error_code == code


# ---- responses ----------------------------------------------------------------------------------------------

def response(**changes: Any) -> LLMResponse:
    base = LLMResponse(text="Hi there", model="openai_compat:m1", tokens_used=15, cost_cents=0.01,
                       timestamp="2026-01-01T00:00:00.000Z", correlation_id="cid", usage=Usage(12, 3),
                       attempts=[Attempt("openai_compat", "m1", "ok", 5)])
    return msgspec.structs.replace(base, **changes)


WEATHER_CALL = ToolCall(id="call_1", name="weather", arguments='{"city": "Oslo"}')


@pytest.mark.parametrize(("resp", "message", "finish"), [
    (response(), {"role": "assistant", "content": "Hi there", "refusal": None}, "stop"),
    (response(text="", tool_calls=[WEATHER_CALL], finish_reason="tool_calls"),
     {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
         {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
     "tool_calls"),
    (response(text="", finish_reason="content_filter", refusal="no"),
     {"role": "assistant", "content": "", "refusal": "no"}, "content_filter"),
], ids=["text", "tool-calls", "refusal"])
def test_completion_document(resp: LLMResponse, message: dict[str, Any], finish: str) -> None:
    doc = openai_wire.completion_document(resp, created=1700000000)
    assert doc["choices"] == [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]
    assert doc["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert (doc["id"], doc["object"], doc["model"]) == ("chatcmpl-cid", "chat.completion", "openai_compat:m1")
    parsed = ChatCompletion.model_validate(doc)  # what the official SDK builds from it
    assert parsed.choices[0].finish_reason == finish and parsed.model_extra == {"llmsrv": doc["llmsrv"]}


def frames(data: bytes) -> list[Any]:
    out = []
    for frame in data.decode().split("\n\n"):
        if frame:
            assert frame.startswith("data: ")
            body = frame.removeprefix("data: ")
            out.append(body if body == "[DONE]" else msgspec.json.decode(body))
    return out


@pytest.mark.parametrize(("streamed", "resp", "include_usage", "deltas", "last_delta", "finish"), [
    (["Hi", " there"], response(), False, ["", "Hi", " there"], None, "stop"),
    (["Hi"], response(), True, ["", "Hi", " there"], None, "stop"),  # the rest the provider did not stream
    ([], response(), False, ["", "Hi there"], None, "stop"),
    ([], response(text="", tool_calls=[WEATHER_CALL, ToolCall("call_2", "weather", "{}")],
                  finish_reason="tool_calls"), False, [""],
     {"tool_calls": [
         {"index": 0, "id": "call_1", "type": "function",
          "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
         {"index": 1, "id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
     "tool_calls"),
    ([], response(text="", finish_reason="content_filter", refusal="no"), False, [""], {"refusal": "no"},
     "content_filter"),
], ids=["streamed", "rest-and-usage", "not-streamed", "tool-calls", "refusal"])
def test_chunk_stream(streamed: list[str], resp: LLMResponse, include_usage: bool, deltas: list[str],
                      last_delta: dict[str, Any] | None, finish: str) -> None:
    stream = openai_wire.ChunkStream("cid", "auto", 1700000000, include_usage)
    data = stream.start() + b"".join(stream.delta(t) for t in streamed) + stream.end(resp)
    docs = frames(data)
    assert docs[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(d) for d in docs[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content is not None] \
        == deltas
    with_choices = [d for d in docs[:-1] if d["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] == finish
    if last_delta is not None:
        assert with_choices[-2]["choices"][0]["delta"] == last_delta
    if include_usage:
        assert docs[-2]["choices"] == [] and docs[-2]["usage"]["total_tokens"] == 15
        assert all(d["usage"] is None for d in with_choices)
    else:
        assert all("usage" not in d for d in docs[:-1])
    assert {c.id for c in chunks} == {"chatcmpl-cid"}


def test_an_error_mid_stream_is_one_error_frame_then_done() -> None:
    exc = errors.ProviderError("openai_compat: connection lost")
    docs = frames(openai_wire.ChunkStream.error(exc, "cid"))
    assert docs == [{"error": {"message": "openai_compat: connection lost", "type": "upstream_error",
                               "code": "PROVIDER_ERROR", "param": None, "correlation_id": "cid"}}, "[DONE]"]


@pytest.mark.parametrize(("exc", "kind", "headers"), [
    (errors.ValidationFailed("bad - at `$.n`"), "invalid_request_error", [("x-should-retry", "false")]),
    (errors.PayloadTooLarge("big"), "invalid_request_error", [("x-should-retry", "false")]),
    (errors.MissingCredentials("no key"), "authentication_error", [("x-should-retry", "false")]),
    (errors.ProviderNotFound("who"), "not_found_error", [("x-should-retry", "false")]),
    (errors.RateLimited("slow down", retry_after_ms=1500), "rate_limit_error",
     [("retry-after", "2"), ("retry-after-ms", "1500"), ("x-should-retry", "true")]),
    (errors.Overloaded("busy", retry_after_ms=50), "service_unavailable",
     [("retry-after", "1"), ("retry-after-ms", "50"), ("x-should-retry", "true")]),
    (errors.CircuitOpen("open", retry_after_ms=30000), "service_unavailable",
     [("retry-after", "30"), ("retry-after-ms", "30000"), ("x-should-retry", "true")]),
    (errors.ShuttingDown("draining"), "service_unavailable", [("x-should-retry", "true")]),
    (errors.ProviderError("down"), "upstream_error", [("x-should-retry", "false")]),
    (errors.Timeout("late"), "timeout", [("x-should-retry", "false")]),
    (errors.InternalError("bug"), "server_error", [("x-should-retry", "false")]),
], ids=lambda v: v.error_code if isinstance(v, errors.LlmsrvError) else None)
def test_error_documents(exc: errors.LlmsrvError, kind: str, headers: list[tuple[str, str]]) -> None:
    doc = openai_wire.error_document(exc)["error"]
    assert (doc["type"], doc["code"], doc["message"]) == (kind, exc.error_code, exc.message)
    assert doc.get("retry_after_ms") == exc.retry_after_ms
    assert openai_wire.error_headers(exc) == headers


# ---- models -------------------------------------------------------------------------------------------------

def test_configured_models() -> None:
    cfg = build_config({"routing": {"matrix": {"general": {"simple": ["openai_compat:llama", "mock:echo"]}},
                                    "aliases": {"fast": "gemini-2.5-flash", "odd": "unknown-family"}},
                        "providers": {"mock": {"prices": {"echo": {"input_per_mtok": 1}}}}}, env={})
    models = openai_wire.configured_models(cfg)
    owners = dict(models)
    assert models[0] == ("auto", "llmsrv") and len(owners) == len(models)
    assert owners["openai_compat:llama"] == "openai_compat" and owners["claude:sonnet"] == "claude"
    assert owners["codex:gpt-4o"] == "codex"  # from the price table
    assert owners["fast"] == "gemini" and "odd" not in owners  # an alias with no family is left out
    assert {"mock:echo", "mock:lorem"} <= owners.keys()
    only = openai_wire.configured_models(cfg, providers={"mock"})
    assert [m for m, _ in only] == ["auto", "mock:echo", "mock:lorem"]
    doc = openai_wire.models_document(only, created=5)
    assert doc["object"] == "list" and [Model.model_validate(d).owned_by for d in doc["data"]] == \
        ["llmsrv", "mock", "mock"]


def test_the_request_is_an_llmrequest() -> None:
    assert isinstance(decode({"messages": USER}).request, LLMRequest)
