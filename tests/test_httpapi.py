"""The OpenAI-compatible HTTP API (CONTRACT section 9) over real sockets: hypercorn on port 0, the official
``openai`` SDK as the client, the real pipeline and providers (mock, and openai_compat against a fake upstream
that validates what it receives the way the OpenAI API does). Only the service's NATS admission is left out:
``PipelineBackend`` stands in for it, with the request deadline as a cancel scope."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from llmsrv import errors, openai_wire
from llmsrv.config import Config, ConfigError, ServerConfig, build_config
from llmsrv.httpapi import App, http_api_keys, is_loopback, serve
from llmsrv.messages import LLMRequest, LLMResponse
from llmsrv.ops import InstanceSnapshot, ServiceStats, http_answer
from llmsrv.pipeline import Pipeline
from llmsrv.providers import OnDelta
from llmsrv.providers.registry import build_providers

from .fakes import FakeUpstream, Hang, Json, Request, Sse, cancel_when
from .upstream_rules import Validating, validating

MODEL = "openai_compat:m1"
USER = [{"role": "user", "content": "hello there"}]
WEATHER: Any = {"type": "function", "function": {
    "name": "weather", "description": "weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
FAILSAFE_S = 30  # only against hangs: nothing here waits on the wall clock


def reply(text: str | None = "Hi there", tool_calls: list[dict[str, Any]] | None = None,
          finish: str = "stop") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "up-1", "object": "chat.completion", "created": 1, "model": "m1",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m1",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def streamed(*pieces: str) -> list[Any]:
    return [chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in pieces),
            chunk({}, "stop"), {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m1",
                                "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                                         "total_tokens": 10}}, "[DONE]"]


def upstream(request: Request) -> Json | Sse:
    """Text, or a tool call when tools are offered and no tool result has come back yet."""
    body = request.json()
    if body.get("stream"):
        return Sse(streamed("Hel", "lo ", "world"), interval_s=0.005)
    answered = any(m["role"] == "tool" for m in body["messages"])
    if body.get("tools") and not answered:
        return Json(reply(None, [{"id": "call_1", "type": "function",
                                  "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}], "tool_calls"))
    return Json(reply("Sunny in Oslo" if answered else "Hi there"))


class PipelineBackend:
    """The service's part, minus NATS admission: the request deadline as a cancel scope around the pipeline."""

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg, self.pipeline = cfg, pipeline

    async def answer(self, request: LLMRequest, correlation_id: str, on_delta: OnDelta | None,
                     trace: Mapping[str, str] | None = None) -> LLMResponse:
        server = self.cfg.server
        timeout_ms = min(request.timeout_ms or server.default_timeout_ms, server.max_timeout_ms)
        with trio.move_on_after(timeout_ms / 1000):
            return await self.pipeline.answer(request, correlation_id, on_delta, trace)
        raise errors.Timeout(f"no answer within the {timeout_ms} ms deadline; the provider call was cancelled")

    def models(self) -> list[tuple[str, str]]:
        return openai_wire.configured_models(self.cfg)


@dataclass
class Served:
    port: int
    fake: FakeUpstream
    rules: Validating
    pipeline: Pipeline
    rejected: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused", max_retries: int = 0) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=max_retries,
                                  timeout=FAILSAFE_S)


@asynccontextmanager
async def serving(handler: Callable[[Request], Any] = upstream, *, keys: tuple[str, ...] = (),
                  **sections: Any) -> AsyncIterator[Served]:
    rules = validating("openai_chat", handler)
    async with FakeUpstream(rules) as fake:
        data: dict[str, Any] = {"routing": {"retry": {"max_attempts": 1}}, **sections}
        data["providers"] = {"openai_compat": {"base_url": fake.url}, **sections.get("providers", {})}
        cfg = build_config(data, env={})
        pipeline = Pipeline(cfg, build_providers(cfg, env={}))

        def snapshot() -> InstanceSnapshot:
            return InstanceSnapshot("test", time.time(), 1.0, False, True, "llm.request", "llmsrv",
                                    ServiceStats(0, 0, 0, 0, 0, 0, ""), pipeline.statistics())

        rejected: list[str] = []
        app = App(PipelineBackend(cfg, pipeline), documents=lambda path: http_answer(path, snapshot, pipeline.metrics),
                  metrics=pipeline.metrics.asgi_app(), server=cfg.server, api_keys=keys,
                  rejected=lambda outcome, code: rejected.append(outcome))
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, app, "127.0.0.1", 0)
                with trio.fail_after(FAILSAFE_S):
                    yield Served(port, fake, rules, pipeline, rejected)
                nursery.cancel_scope.cancel()
        finally:
            await pipeline.aclose()


# ---- models, plain, streaming -----------------------------------------------------------------------

async def test_models_list_and_retrieve() -> None:
    async with serving() as s, s.client() as client:
        listed = await client.models.list()
        one = await client.models.retrieve("mock:echo")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("acme:nothing")
    ids = {m.id: m.owned_by for m in listed.data}
    assert listed.data[0].id == "auto" and ids["auto"] == "llmsrv"
    assert ids["mock:echo"] == ids["mock:lorem"] == "mock" and ids["claude:sonnet"] == "claude"
    assert ids["sonnet"] == "claude" and ids["codex:gpt-5-codex"] == "codex"
    assert all(m.object == "model" for m in listed.data) and len(ids) == len(listed.data)
    assert (one.id, one.owned_by) == ("mock:echo", "mock")
    assert missing.value.code == "PROVIDER_NOT_FOUND"


async def test_plain_completion() -> None:
    async with serving() as s, s.client() as client:
        echo = await client.chat.completions.create(model="mock:echo", messages=[
            {"role": "developer", "content": "be brief"}, {"role": "user", "content": [
                {"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}])
        up = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=USER, max_completion_tokens=50, temperature=0.2, user="u-1", seed=7)
        completion = up.parse()
        sent = s.fake.requests[0].json()
    assert echo.choices[0].message.content == "hello\nthere" and echo.model == "mock:echo"
    assert echo.choices[0].finish_reason == "stop" and echo.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hi there" and completion.model == MODEL
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) \
        == (12, 3, 15)
    assert completion.id == f"chatcmpl-{up.headers['x-request-id']}" and completion.object == "chat.completion"
    assert completion.model_extra and completion.model_extra["llmsrv"]["attempts"][0]["outcome"] == "ok"
    assert (sent["model"], sent["temperature"], sent["messages"]) == ("m1", 0.2, USER)
    assert not s.rules.problems


async def test_streaming_deltas_join_to_the_text_and_usage_comes_last() -> None:
    async with serving() as s, s.client() as client:
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        plain = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        plain_chunks = [c async for c in plain]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 10
    assert chunks[-2].model == MODEL and len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in plain_chunks) and plain_chunks[-1].choices[0].finish_reason == "stop"
    assert not s.rules.problems


# ---- tools -------------------------------------------------------------------------------------------

async def test_tool_call_and_the_tool_result_reach_the_upstream_in_openai_form() -> None:
    async with serving() as s, s.client() as client:
        first = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls" and message.content is None
        assert message.tool_calls is not None
        call = message.tool_calls[0]
        assert (call.id, call.function.name, call.function.arguments) == ("call_1", "weather", '{"city": "Oslo"}')
        # the SDK's own message object goes back as the assistant turn, as SDK users write it
        second = await client.chat.completions.create(model=MODEL, tools=[WEATHER], messages=[
            *USER, message, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])  # type: ignore[list-item]
        streamed_call = await client.chat.completions.create(model="mock:echo", messages=USER, stream=True)
        assert [c async for c in streamed_call]
        sent = s.fake.requests[1].json()
    assert second.choices[0].message.content == "Sunny in Oslo"
    assistant, tool = sent["messages"][1], sent["messages"][2]
    assert assistant["role"] == "assistant" and assistant["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
    assert sent["tools"][0]["function"]["name"] == "weather"
    assert not s.rules.problems


async def test_streamed_tool_calls_arrive_as_one_delta() -> None:
    def tool_upstream(request: Request) -> Sse:  # the upstream streams the call in pieces; llmsrv folds them
        call = {"index": 0, "id": "call_9", "type": "function", "function": {"name": "weather", "arguments": ""}}
        return Sse([chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]}),
                    chunk({}, "tool_calls"), "[DONE]"])

    async with serving(tool_upstream) as s, s.client() as client:
        stream = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], stream=True)
        chunks = [c async for c in stream]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.id, d.function.name, d.function.arguments) for d in deltas if d.function] == [
        (0, "call_9", "weather", '{"city": "Rome"}')]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ---- errors ------------------------------------------------------------------------------------------

async def test_errors_carry_the_contract_status_and_openai_shape() -> None:
    async with serving(providers={"mock": {"rpm": "1/hour"}}) as s, s.client() as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nonsense-model", messages=USER)
        with pytest.raises(openai.NotFoundError):  # a stream's error before any text keeps its status
            await client.chat.completions.create(model="nonsense-model", messages=USER, stream=True)
        with pytest.raises(openai.BadRequestError) as n:
            await client.chat.completions.create(model=MODEL, messages=USER, n=2)
        with pytest.raises(openai.BadRequestError) as typo:
            await client.chat.completions.create(model=MODEL, messages=USER, extra_body={"tempreature": 1})
        with pytest.raises(openai.BadRequestError) as role:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])  # type: ignore[list-item,misc]
        with pytest.raises(openai.AuthenticationError) as creds:  # openrouter without a key
            await client.chat.completions.create(model="openrouter:x", messages=USER)
        await client.chat.completions.create(model="mock:echo", messages=USER)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="mock:echo", messages=USER)
    assert unknown.value.code == "PROVIDER_NOT_FOUND" and unknown.value.type == "not_found_error"
    assert n.value.param == "n" and "`n` = 2 is not supported" in n.value.message
    assert typo.value.param == "tempreature" and "tempreature" in typo.value.message
    assert role.value.code == "VALIDATION_ERROR" and role.value.param == "messages[0].role"
    assert creds.value.code == "MISSING_CREDENTIALS"
    headers = limited.value.response.headers
    assert limited.value.code == "RATE_LIMITED" and int(headers["retry-after"]) >= 1
    assert int(headers["retry-after-ms"]) > 0 and headers["x-should-retry"] == "true"
    assert s.rejected == ["validation_error", "validation_error", "validation_error"]
    assert not s.fake.requests  # nothing refused here reached the upstream


async def test_timeout_is_504_and_not_retried_by_the_sdk() -> None:
    async with serving(lambda request: Hang()) as s, s.client(max_retries=2) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model=MODEL, messages=USER, extra_body={"timeout_ms": 200})
        await s.fake.wait_disconnect()  # the deadline closed the upstream connection
    assert info.value.status_code == 504 and info.value.code == "TIMEOUT"
    assert len(s.fake.requests) == 1  # x-should-retry: false kept the SDK from trying twice more


async def test_an_upstream_failure_mid_stream_is_an_sse_error_the_sdk_raises() -> None:
    async with serving(lambda request: Sse(streamed("Hel", "lo"), cut_after=3)) as s, s.client() as client:
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        seen: list[str] = []
        with pytest.raises(openai.APIError) as info:
            async for c in stream:
                seen.append(c.choices[0].delta.content or "")
        async with httpx.AsyncClient() as raw:
            body = (await raw.post(s.url + "/v1/chat/completions",
                                   json={"model": MODEL, "messages": USER, "stream": True})).text
    assert "".join(seen) == "Hello"
    assert info.value.body["code"] == "PROVIDER_ERROR"  # type: ignore[index]
    frames = [line for line in body.split("\n\n") if line]
    assert msgspec.json.decode(frames[-2].removeprefix("data: "))["error"]["code"] == "PROVIDER_ERROR"
    assert frames[-1] == "data: [DONE]"


# ---- a disconnect cancels the request --------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
async def test_a_client_that_disconnects_before_any_text_cancels_the_upstream_call(stream: bool) -> None:
    async with serving(lambda request: Hang()) as s, s.client() as client:
        async def call() -> None:
            await client.chat.completions.create(model=MODEL, messages=USER, stream=stream)

        cancelled = await cancel_when(s.fake.wait_request, call, timeout_s=FAILSAFE_S)
        closed = await s.fake.wait_disconnect(timeout_s=FAILSAFE_S)
        while (guard := s.pipeline.statistics()["openai_compat"].guard).in_flight:  # the attempt unwinds
            await trio.sleep(0.001)
    assert cancelled.caught
    assert closed - cancelled.at < 0.1  # the issue's bound: the client's close to the upstream's close
    # nothing leaked, and a client leaving is no provider failure
    assert (guard.in_flight, guard.breaker.state, guard.breaker.failures, guard.models) == (0, "closed", 0, {})


async def test_a_client_that_closes_its_stream_cancels_the_upstream_call() -> None:
    first_then_hang = Sse([chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"})], interval_s=3600)
    async with serving(lambda request: first_then_hang) as s, s.client() as client:
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        async for c in stream:
            if c.choices[0].delta.content:
                break
        at = trio.current_time()
        await stream.close()
        closed = await s.fake.wait_disconnect(timeout_s=FAILSAFE_S)
    assert closed - at < 0.1


# ---- auth --------------------------------------------------------------------------------------------------

async def test_bearer_keys_guard_v1_but_not_the_operations_endpoints() -> None:
    async with serving(keys=("sk-one-1234567890", "sk-two-0987654321")) as s:
        async with s.client("sk-wrong-000000000") as wrong, s.client("sk-two-0987654321") as right:
            with pytest.raises(openai.AuthenticationError) as refused:
                await wrong.chat.completions.create(model="mock:echo", messages=USER)
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            ok = await right.chat.completions.create(model="mock:echo", messages=USER)
        async with httpx.AsyncClient(base_url=s.url) as raw:
            bare = await raw.get("/v1/models")
            basic = await raw.get("/v1/models", headers={"authorization": "Basic sk-one-1234567890"})
            ops = [(await raw.get(path)).status_code for path in ("/metrics", "/healthz", "/readyz")]
    assert refused.value.code == "INVALID_API_KEY" and "sk-wrong" not in refused.value.message
    assert ok.choices[0].message.content == "hello there"
    assert bare.status_code == basic.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert ops == [200, 200, 200]


@pytest.mark.parametrize(("host", "env", "port", "refused"), [
    ("127.0.0.1", {}, 9464, False),
    ("::1", {}, 9464, False),
    ("localhost", {}, 9464, False),
    ("0.0.0.0", {}, 9464, True),
    ("10.1.2.3", {"LLMSRV_HTTP_API_KEYS": " , "}, 9464, True),
    ("0.0.0.0", {"LLMSRV_HTTP_API_KEYS": "k1-abcdefgh, k2-abcdefgh"}, 9464, False),
    ("0.0.0.0", {}, 0, False),  # no HTTP port at all
], ids=["loopback", "ipv6-loopback", "localhost", "open-without-keys", "blank-keys", "open-with-keys", "no-port"])
def test_a_non_loopback_bind_without_keys_refuses_to_start(host: str, env: dict[str, str], port: int,
                                                           refused: bool) -> None:
    server = ServerConfig(http_host=host, http_port=port)
    if refused:
        with pytest.raises(ConfigError, match="LLMSRV_HTTP_API_KEYS"):
            http_api_keys(server, env)
    else:
        keys = http_api_keys(server, env)
        assert keys == (("k1-abcdefgh", "k2-abcdefgh") if env else ())


def test_the_keys_variable_is_configurable() -> None:
    cfg = build_config({"server": {"http_host": "0.0.0.0", "http_api_keys_env": "MY_KEYS"}}, env={})
    assert http_api_keys(cfg.server, {"MY_KEYS": "abc-12345678"}) == ("abc-12345678",)
    with pytest.raises(ConfigError, match=r"\$MY_KEYS"):
        http_api_keys(cfg.server, {"LLMSRV_HTTP_API_KEYS": "abc-12345678"})
    assert is_loopback("127.8.0.1") and not is_loopback("") and not is_loopback("example.org")


async def test_serve_refuses_v1_without_keys_off_loopback() -> None:
    cfg = build_config({}, env={})
    app = App(PipelineBackend(cfg, Pipeline(cfg, {})), documents=lambda path: (404, "text/plain", b""))
    with pytest.raises(ConfigError, match="loopback"):
        await serve(app, "0.0.0.0", 0)  # refused before binding


# ---- the rest of the port ------------------------------------------------------------------------------------

async def test_operations_endpoints_and_raw_request_errors() -> None:
    async with serving(server={"max_request_bytes": 4096}) as s, s.client() as client:
        await client.chat.completions.create(model="mock:echo", messages=USER)
        async with httpx.AsyncClient(base_url=s.url) as raw:
            metrics = await raw.get("/metrics")
            health = await raw.get("/healthz")
            ready = await raw.get("/readyz")
            nope, post = await raw.get("/nope"), await raw.post("/healthz")
            big = await raw.post("/v1/chat/completions", content=b"{" + b" " * 5000 + b"}",
                                 headers={"content-type": "application/json"})
            async def pieces() -> AsyncIterator[bytes]:  # no content-length: refused once it is over
                for _ in range(5):
                    yield b" " * 1000

            streamed_big = await raw.post("/v1/chat/completions", content=pieces())
            bad = await raw.post("/v1/chat/completions", content=b"{not json")
            wrong = await raw.get("/v1/chat/completions")
            missing = await raw.get("/v1/completions")
            timed = await raw.post("/v1/chat/completions", json={"model": MODEL, "messages": USER},
                                   headers={"Llm-Timeout-Ms": "abc", "Llm-Correlation-Id": "cid-7"})
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(metrics.text)}
    assert {"llmsrv_tokens", "llmsrv_provider_call_duration_seconds"} <= names
    assert health.json()["status"] == "ok" and health.json()["providers"]["mock"]["available"]
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert (nope.status_code, post.status_code) == (404, 405)
    assert big.status_code == streamed_big.status_code == 413
    assert big.json()["error"]["code"] == streamed_big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_JSON"
    assert (wrong.status_code, missing.status_code) == (405, 404)
    assert timed.status_code == 400 and "Llm-Timeout-Ms" in timed.json()["error"]["message"]
    assert timed.json()["error"]["correlation_id"] == "cid-7" == timed.headers["llm-correlation-id"]


async def test_cancelling_serve_lets_a_response_in_flight_finish() -> None:
    cfg = build_config({"providers": {"mock": {"latency_ms": 200}}}, env={})
    pipeline = Pipeline(cfg, build_providers(cfg, env={}))
    app = App(PipelineBackend(cfg, pipeline), documents=lambda path: (404, "text/plain", b""), server=cfg.server)
    got: list[int] = []
    with trio.fail_after(FAILSAFE_S):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[int]) -> None:
                with server_scope:
                    await serve(app, "127.0.0.1", 0, grace_s=5, task_status=task_status)

            port = await outer.start(run)
            async with httpx.AsyncClient() as raw, trio.open_nursery() as inner:
                async def ask() -> None:
                    got.append((await raw.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                               json={"model": "mock:echo", "messages": USER})).status_code)

                inner.start_soon(ask)
                while not pipeline.providers["mock"].statistics().calls:  # type: ignore[attr-defined]
                    await trio.sleep(0.005)
                server_scope.cancel()  # stop accepting; the request in flight still gets its answer
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as late:
            await late.get(f"http://127.0.0.1:{port}/healthz")
    await pipeline.aclose()
    assert got == [200]
