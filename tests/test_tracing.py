"""Tracing: a request span joined to the caller's traceparent, a child per provider attempt, traceparent
sent upstream; cancellations are not errors; with tracing off, no span, no header, no OpenTelemetry import.

Spans go to the SDK's ``InMemorySpanExporter`` through a ``SimpleSpanProcessor`` (exported as each ends).
Tests with real sockets (fake upstreams, the HTTP API, an OTLP collector) wait on what was received,
never on the wall clock; the rest run on virtual time (``autojump_clock``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import msgspec
import pytest
import trio

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from llmsrv import errors, tracing  # noqa: E402
from llmsrv.config import Config, ConfigError, TracingConfig, build_config  # noqa: E402
from llmsrv.httpapi import App, serve  # noqa: E402
from llmsrv.messages import LLMRequest, LLMResponse  # noqa: E402
from llmsrv.pipeline import Pipeline  # noqa: E402
from llmsrv.providers import OnDelta  # noqa: E402
from llmsrv.providers.registry import build_providers  # noqa: E402

from .conftest import running, user  # noqa: E402
from .fakes import FakeUpstream, Json, Request  # noqa: E402
from .test_hardening import BuggyProvider  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
INCOMING = f"00-{TRACE_ID}-{PARENT_ID}-01"
FAILSAFE_S = 30  # only against hangs


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for one test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    uninstall = tracing.install(provider)
    try:
        yield exporter
    finally:
        uninstall()
        provider.shutdown()


def ask(model: str = "auto", **fields: Any) -> LLMRequest:
    return msgspec.convert({"messages": [{"role": "user", "content": "hello"}], "model": model, **fields}, LLMRequest)


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    tracing.flush()  # the spans recorded so far, made SDK spans (the service does it every FLUSH_S)
    return [s for s in exporter.get_finished_spans() if s.name == name]


def attrs(span: ReadableSpan) -> Mapping[str, Any]:
    assert span.attributes is not None
    return span.attributes


def traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


# ---- a fallback over a real upstream: bad model fails, good model answers ------------------------------

def upstream(request: Request) -> Json:
    if request.json()["model"] == "bad":
        return Json({"error": {"message": "overloaded", "type": "server_error"}}, status=500)
    return Json({"id": "up-1", "object": "chat.completion", "created": 1, "model": "good",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})


def fallback_config(url: str) -> Config:
    return build_config({"providers": {"openai_compat": {"base_url": url}},
                         "routing": {"matrix": {"general": {"simple": ["openai_compat:bad", "openai_compat:good"]}}}},
                        env={})


async def test_request_span_joins_the_caller_and_each_attempt_is_a_child(spans: InMemorySpanExporter) -> None:
    with trio.fail_after(FAILSAFE_S):
        async with FakeUpstream(upstream) as fake:
            cfg = fallback_config(fake.url)
            pipeline = Pipeline(cfg, build_providers(cfg, env={}))
            try:
                response = await pipeline.answer(ask(complexity="simple"), "cid-1",
                                                 trace={"TraceParent": INCOMING, "tracestate": "vendor=x"})
            finally:
                await pipeline.aclose()
    assert response.model == "openai_compat:good" and [a.outcome for a in response.attempts] == ["provider_error", "ok"]

    [request] = named(spans, tracing.REQUEST_SPAN)
    first, second = sorted(named(spans, tracing.ATTEMPT_SPAN), key=lambda s: s.start_time or 0)
    assert request.kind is SpanKind.SERVER and first.kind is second.kind is SpanKind.CLIENT
    # joined to the caller's trace: same trace id, the caller's span as parent
    assert request.context is not None and request.parent is not None
    assert f"{request.context.trace_id:032x}" == TRACE_ID and f"{request.parent.span_id:016x}" == PARENT_ID
    for attempt in (first, second):
        assert attempt.parent is not None and attempt.parent.span_id == request.context.span_id
        assert attempt.context is not None and attempt.context.trace_id == request.context.trace_id
    # what the answering attempt says (tokens, finish reasons) is on that attempt's span, not repeated here
    assert attrs(request) == {
        "llmsrv.correlation_id": "cid-1", "gen_ai.request.model": "auto", "llmsrv.outcome": "ok",
        "gen_ai.response.model": "openai_compat:good", "llmsrv.attempts": 2, "llmsrv.cost_cents": 0.0}
    assert request.status.status_code is StatusCode.UNSET

    assert first.status.status_code is StatusCode.ERROR and "HTTP 500" in (first.status.description or "")
    assert attrs(first)["error.type"] == "PROVIDER_ERROR" and attrs(first)["llmsrv.outcome"] == "provider_error"
    assert attrs(first) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai_compat", "gen_ai.request.model": "bad",
        "error.type": "PROVIDER_ERROR", "llmsrv.outcome": "provider_error"}
    assert second.status.status_code is StatusCode.UNSET
    assert attrs(second) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai_compat", "gen_ai.request.model": "good",
        "llmsrv.outcome": "ok", "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ("stop",)}

    # each upstream request carried its own attempt's span, and the caller's tracestate
    sent = [(r.json()["model"], r.headers.get("traceparent"), r.headers.get("tracestate")) for r in fake.requests]
    assert sent == [("bad", traceparent(first), "vendor=x"), ("good", traceparent(second), "vendor=x")]


async def test_tracing_off_no_spans_and_no_header() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # built, never installed
    assert not tracing.ENABLED
    with trio.fail_after(FAILSAFE_S):
        async with FakeUpstream(upstream) as fake:
            cfg = fallback_config(fake.url)
            pipeline = Pipeline(cfg, build_providers(cfg, env={}))
            try:
                await pipeline.answer(ask(complexity="simple"), "cid-off", trace={"traceparent": INCOMING})
            finally:
                await pipeline.aclose()
    assert len(fake.requests) == 2
    assert not any(k in r.headers for r in fake.requests for k in ("traceparent", "tracestate"))
    assert exporter.get_finished_spans() == ()
    assert tracing.request_span("c", ask(), {"traceparent": INCOMING}) is tracing.NOOP
    assert tracing.attempt_span("mock", "echo") is tracing.NOOP


async def test_sample_ratio_keeps_new_traces_by_chance_and_follows_a_callers_decision() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))  # as setup() builds it
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = build_config({}, {})
    pipeline = Pipeline(cfg, build_providers(cfg, env={}))
    for ratio, expected in ((0.0, 0), (1.0, 20)):
        uninstall = tracing.install(provider, root_ratio=ratio)
        try:
            for i in range(20):
                await pipeline.answer(ask("mock:echo"), f"r{i}")
            # a caller's sampled traceparent is followed whatever the ratio; an unsampled one is not kept
            await pipeline.answer(ask("mock:echo"), "sampled", trace={"traceparent": INCOMING})
            await pipeline.answer(ask("mock:echo"), "unsampled", trace={"traceparent": INCOMING[:-2] + "00"})
        finally:
            uninstall()
        kept = [attrs(s)["llmsrv.correlation_id"] for s in named(exporter, tracing.REQUEST_SPAN)]
        assert len(kept) == expected + 1 and "sampled" in kept and "unsampled" not in kept, (ratio, kept)
        assert len(named(exporter, tracing.ATTEMPT_SPAN)) == expected + 1  # none under an unsampled request
        exporter.clear()
    provider.shutdown()


def test_importing_and_serving_with_tracing_off_never_imports_opentelemetry() -> None:
    """In a fresh interpreter every import of opentelemetry fails (as if it were not installed), and any
    attempt is noted with the module that made it: third parties (redis probes for it) may try, llmsrv not."""
    script = textwrap.dedent("""
        import importlib.abc, json, sys
        tried = []

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.partition(".")[0] != "opentelemetry":
                    return None
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
                    frame = frame.f_back
                tried.append([name, frame.f_globals.get("__name__", "") if frame else ""])
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Absent())
        import trio
        import llmsrv.pipeline, llmsrv.providers.http, llmsrv.providers.process, llmsrv.httpapi, llmsrv.service
        from llmsrv import tracing
        from llmsrv.config import build_config
        import msgspec
        from llmsrv.messages import LLMRequest
        from llmsrv.pipeline import Pipeline
        from llmsrv.providers.registry import build_providers

        cfg = build_config({}, env={})
        tracing.setup(cfg.tracing, env={})()
        pipeline = Pipeline(cfg, build_providers(cfg, env={}))
        request = msgspec.convert({"messages": [{"role": "user", "content": "hi"}], "model": "mock:echo"}, LLMRequest)

        async def main():
            return await pipeline.answer(request, "cid", trace={"traceparent": "00-%s-%s-01" % ("1" * 32, "2" * 16)})

        reply = trio.run(main)
        print(json.dumps({"text": reply.text, "enabled": tracing.ENABLED, "tried": tried,
                          "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True,
                         env={"PATH": "/usr/bin:/bin"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"] == "hi" and result["enabled"] is False
    assert [t for t in result["tried"] if t[1].startswith("llmsrv")] == []
    assert result["loaded"] == []


# ---- cancellation: ended, not an error (virtual time) --------------------------------------------------

@pytest.mark.parametrize("how", ["deadline", "client"])
async def test_cancelled_attempt_ends_its_span_without_error(spans: InMemorySpanExporter, how: str,
                                                             autojump_clock: trio.abc.Clock) -> None:
    cfg = build_config({"providers": {"mock": {"latency_ms": 10_000}}}, env={})
    pipeline = Pipeline(cfg, build_providers(cfg, env={}, only={"mock"}))
    with trio.move_on_after(1) as scope:
        async with trio.open_nursery() as nursery:
            if how == "client":
                nursery.start_soon(_cancel_after, 0.5, scope)
            await pipeline.answer(ask("mock:echo"), "cid-cut", trace={"traceparent": INCOMING})
    assert scope.cancelled_caught
    [attempt] = named(spans, tracing.ATTEMPT_SPAN)
    [request] = named(spans, tracing.REQUEST_SPAN)
    source = "deadline" if how == "deadline" else "explicit"
    assert attempt.status.status_code is StatusCode.UNSET and attempt.end_time is not None
    assert attrs(attempt)["llmsrv.cancelled"] is True and attrs(attempt)["llmsrv.cancel_source"] == source
    assert attrs(attempt)["llmsrv.outcome"] == "cancelled" and "error.type" not in attrs(attempt)
    assert attrs(request)["llmsrv.cancelled"] is True
    if how == "deadline":  # the request itself is answered TIMEOUT
        assert request.status.status_code is StatusCode.ERROR and attrs(request)["error.type"] == "TIMEOUT"
    else:  # llm.cancel or a client gone: not a failure
        assert request.status.status_code is StatusCode.UNSET and attrs(request)["llmsrv.outcome"] == "cancelled"


async def _cancel_after(seconds: float, scope: trio.CancelScope) -> None:
    await trio.sleep(seconds)
    scope.cancel()


async def test_hedging_loser_is_cancelled_not_failed(spans: InMemorySpanExporter,
                                                      autojump_clock: trio.abc.Clock) -> None:
    cfg = build_config({"providers": {"mock": {"latency_ms": 500}},
                        "routing": {"hedge": {"enabled": True, "delay_ms": 100},
                                    "matrix": {"general": {"simple": ["mock:echo", "mock:lorem"]}}}}, env={})
    pipeline = Pipeline(cfg, build_providers(cfg, env={}, only={"mock"}))
    start = trio.current_time()
    response = await pipeline.answer(ask(complexity="simple", max_tokens=5), "cid-hedge")
    assert response.model == "mock:echo" and trio.current_time() - start == pytest.approx(0.5)
    [request] = named(spans, tracing.REQUEST_SPAN)
    winner, loser = sorted(named(spans, tracing.ATTEMPT_SPAN), key=lambda s: s.start_time or 0)
    assert request.context is not None
    assert winner.parent is not None and loser.parent is not None  # both children of the request span
    assert winner.parent.span_id == loser.parent.span_id == request.context.span_id
    assert (attrs(winner)["gen_ai.request.model"], attrs(winner)["llmsrv.outcome"]) == ("echo", "ok")
    assert (attrs(loser)["gen_ai.request.model"], attrs(loser)["llmsrv.cancelled"]) == ("lorem", True)
    assert loser.status.status_code is StatusCode.UNSET and winner.status.status_code is StatusCode.UNSET
    assert request.parent is None  # no caller trace: the request starts one


async def test_request_attributes_say_what_differs_from_the_defaults(spans: InMemorySpanExporter) -> None:
    """A sampled request costs ~3 us per attribute (build and OTLP encoding): defaults are left out."""
    cfg = build_config({}, env={})
    pipeline = Pipeline(cfg, build_providers(cfg, env={}, only={"mock"}))
    await pipeline.answer(ask("mock:echo", task_type="coder", max_tokens=50, temperature=0.0), "cid-coder")
    await pipeline.answer(ask("mock:echo", max_tokens=4000, temperature=0.7), "cid-plain")  # the defaults, sent
    coder, plain = sorted(named(spans, tracing.REQUEST_SPAN), key=lambda s: s.start_time or 0)
    assert {key: attrs(coder).get(key) for key in ("llmsrv.correlation_id", "llmsrv.task_type",
                                                   "gen_ai.request.max_tokens", "gen_ai.request.temperature")} == {
        "llmsrv.correlation_id": "cid-coder", "llmsrv.task_type": "coder", "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.0}
    assert attrs(plain) == {"llmsrv.correlation_id": "cid-plain", "gen_ai.request.model": "mock:echo",
                            "llmsrv.outcome": "ok", "gen_ai.response.model": "mock:echo", "llmsrv.attempts": 1,
                            "llmsrv.cost_cents": 0.0}
    assert all("llmsrv.subscription" not in attrs(s) for s in named(spans, tracing.ATTEMPT_SPAN))


async def test_a_failed_request_is_an_error_span(spans: InMemorySpanExporter, autojump_clock: trio.abc.Clock) -> None:
    cfg = build_config({"routing": {"retry": {"max_attempts": 1}}}, env={})
    pipeline = Pipeline(cfg, build_providers(cfg, env={}, only={"mock"}))
    with pytest.raises(errors.ProviderError):
        await pipeline.answer(ask("mock:fail"), "cid-fail")
    [request] = named(spans, tracing.REQUEST_SPAN)
    [attempt] = named(spans, tracing.ATTEMPT_SPAN)
    for span in (request, attempt):
        assert span.status.status_code is StatusCode.ERROR and attrs(span)["error.type"] == "PROVIDER_ERROR"
    assert attrs(request)["llmsrv.attempts"] == 1


async def test_a_bug_is_an_error_span_with_the_exception_event_the_sdk_records(
        spans: InMemorySpanExporter, autojump_clock: trio.abc.Clock) -> None:
    cfg = build_config({"routing": {"retry": {"max_attempts": 1}}}, env={})
    pipeline = Pipeline(cfg, {**build_providers(cfg, env={}, only={"mock"}), "openai_compat": BuggyProvider()})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError) as raised:
        await pipeline.answer(ask("openai_compat:m"), "cid-bug")
    reference = TracerProvider().get_tracer("reference").start_span("reference")
    reference.record_exception(raised.value)  # what OpenTelemetry's own span records for it
    [expected] = reference.events
    [request] = named(spans, tracing.REQUEST_SPAN)
    [attempt] = named(spans, tracing.ATTEMPT_SPAN)
    for span in (request, attempt):
        assert span.status.status_code is StatusCode.ERROR and attrs(span)["error.type"] == "INTERNAL_ERROR"
        assert span.status.description == "RuntimeError: bug in m"
        [event] = span.events
        assert event.name == "exception" and event.timestamp == span.end_time
        assert event.attributes is not None and expected.attributes is not None
        assert {k: v for k, v in event.attributes.items() if k != "exception.stacktrace"} == {
            k: v for k, v in expected.attributes.items() if k != "exception.stacktrace"}
        stacktrace = event.attributes["exception.stacktrace"]
        assert isinstance(stacktrace, str) and stacktrace.startswith("Traceback") and stacktrace.endswith(
            "RuntimeError: bug in m\n")


@pytest.mark.parametrize("carrier", [
    {"traceparent": "garbage"}, {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
    {"traceparent": INCOMING.replace("-01", "-01-extra").upper(), "tracestate": "=,=;" * 5000},
    {"tracestate": "a=1"}, {}], ids=["garbage", "zero-ids", "odd", "state-only", "empty"])
async def test_an_unreadable_trace_context_starts_a_trace(spans: InMemorySpanExporter, carrier: dict[str, str],
                                                          autojump_clock: trio.abc.Clock) -> None:
    cfg = build_config({}, env={})
    pipeline = Pipeline(cfg, build_providers(cfg, env={}, only={"mock"}))
    assert (await pipeline.answer(ask("mock:echo"), "cid-odd", trace=carrier)).text == "hello"
    [request] = named(spans, tracing.REQUEST_SPAN)
    assert request.parent is None and request.status.status_code is StatusCode.UNSET


async def test_subprocess_env_carries_the_attempt_span(spans: InMemorySpanExporter) -> None:
    env: dict[str, str] = {}
    tracing.inject_env(env)
    assert env == {}  # no current span: nothing to carry
    with tracing.attempt_span("cursor", "auto"):
        tracing.inject_env(env)
    [attempt] = named(spans, tracing.ATTEMPT_SPAN)
    assert env == {"TRACEPARENT": traceparent(attempt)}


# ---- the HTTP API passes traceparent on ----------------------------------------------------------------

class TracedBackend:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.traces: list[Mapping[str, str] | None] = []

    async def answer(self, request: LLMRequest, correlation_id: str, on_delta: OnDelta | None,
                     trace: Mapping[str, str] | None = None) -> LLMResponse:
        self.traces.append(trace)
        return await self.pipeline.answer(request, correlation_id, on_delta, trace)

    def models(self) -> list[tuple[str, str]]:
        return []


async def test_http_api_request_joins_the_callers_trace(spans: InMemorySpanExporter) -> None:
    cfg = build_config({}, env={})
    backend = TracedBackend(Pipeline(cfg, build_providers(cfg, env={}, only={"mock"})))
    app = App(backend, documents=lambda path: (404, "text/plain", b""), server=cfg.server)
    with trio.fail_after(FAILSAFE_S):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, app, "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                body = {"model": "mock:echo", "messages": [{"role": "user", "content": "hi"}]}
                traced = await client.post("/v1/chat/completions", json=body,
                                           headers={"Traceparent": INCOMING, "tracestate": "a=1"})
                plain = await client.post("/v1/chat/completions", json={**body, "stream": True})
            nursery.cancel_scope.cancel()
    assert traced.status_code == 200 and plain.status_code == 200
    assert backend.traces == [{"traceparent": INCOMING, "tracestate": "a=1"}, None]
    joined, alone = sorted(named(spans, tracing.REQUEST_SPAN), key=lambda s: s.start_time or 0)
    assert joined.parent is not None and f"{joined.parent.span_id:016x}" == PARENT_ID
    assert alone.parent is None and attrs(alone)["llmsrv.stream"] is True and "llmsrv.stream" not in attrs(joined)


# ---- recorded now, handed to the SDK later --------------------------------------------------------------

async def test_the_service_hands_recorded_spans_over_by_itself(spans: InMemorySpanExporter, nats_url: str) -> None:
    """No ``tracing.flush`` here: the service's flush task makes the SDK spans (every FLUSH_S)."""
    async with running(nats_url) as h:
        reply = await h.client.complete({"messages": user("hi"), "model": "mock:echo"}, timeout_s=FAILSAFE_S)
        assert reply.text == "hi"
        with trio.fail_after(FAILSAFE_S):
            while len(spans.get_finished_spans()) < 2:  # waits for the flush task, whenever it runs
                await trio.sleep(0.02)
    assert sorted(s.name for s in spans.get_finished_spans()) == sorted([tracing.REQUEST_SPAN, tracing.ATTEMPT_SPAN])


async def test_hand_over_in_chunks_and_past_the_cap(spans: InMemorySpanExporter,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    count = 2 * tracing.HAND_OVER_CHUNK + 5
    for _ in range(count):
        with tracing.attempt_span("mock", "echo"):
            pass
    assert spans.get_finished_spans() == ()  # recorded, not yet made
    await tracing.hand_over()  # a trio checkpoint between chunks: the loop is never held long
    made = spans.get_finished_spans()
    assert len(made) == count and len({s.context.span_id for s in made if s.context}) == count
    for span in made:  # the recorded times, in order
        assert span.start_time is not None and span.end_time is not None and span.start_time <= span.end_time
    spans.clear()
    monkeypatch.setattr(tracing, "MAX_RECORDED", 3)  # nobody hands them over: the third one to end does
    for _ in range(3):
        with tracing.attempt_span("mock", "echo"):
            pass
    assert len(spans.get_finished_spans()) == 3


def test_a_span_the_sdk_fails_on_is_lost_alone_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    class FailsOnce(SpanProcessor):
        failed = False

        def on_end(self, span: ReadableSpan) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("exporter bug")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(FailsOnce())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    uninstall = tracing.install(provider)
    try:
        for model in ("a", "b", "c"):
            with tracing.attempt_span("mock", model):
                pass
    finally:
        uninstall()
        provider.shutdown()
    assert sorted(attrs(s)["gen_ai.request.model"] for s in exporter.get_finished_spans()) == ["b", "c"]
    assert "a recorded span could not be handed to OpenTelemetry" in caplog.text


async def test_an_unsampled_callers_context_goes_upstream_as_it_came(spans: InMemorySpanExporter) -> None:
    unsampled = INCOMING[:-2] + "00"
    with trio.fail_after(FAILSAFE_S):
        async with FakeUpstream(upstream) as fake:
            cfg = build_config({"providers": {"openai_compat": {"base_url": fake.url}}}, env={})
            pipeline = Pipeline(cfg, build_providers(cfg, env={}))
            try:
                await pipeline.answer(ask("openai_compat:good"), "cid-u",
                                      trace={"traceparent": unsampled, "tracestate": "vendor=x"})
            finally:
                await pipeline.aclose()
    assert [(r.headers.get("traceparent"), r.headers.get("tracestate")) for r in fake.requests] == [
        (unsampled, "vendor=x")]
    assert named(spans, tracing.REQUEST_SPAN) == named(spans, tracing.ATTEMPT_SPAN) == []


@pytest.mark.parametrize("sampler_name", ["always_off", "always_on"])
async def test_otel_traces_samplers_sampler_decides(sampler_name: str) -> None:
    """With ``OTEL_TRACES_SAMPLER`` set, its sampler decides each request, the caller's flag included."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    sampler = ALWAYS_ON if sampler_name == "always_on" else ALWAYS_OFF
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    uninstall = tracing.install(provider, 1.0, sampler)
    try:
        cfg = build_config({}, env={})
        pipeline = Pipeline(cfg, build_providers(cfg, env={}, only={"mock"}))
        await pipeline.answer(ask("mock:echo"), "cid-new")
        await pipeline.answer(ask("mock:echo"), "cid-unsampled-caller", trace={"traceparent": INCOMING[:-2] + "00"})
    finally:
        uninstall()  # hands the recorded spans over
        provider.shutdown()
    kept = sorted(attrs(s)["llmsrv.correlation_id"] for s in named(exporter, tracing.REQUEST_SPAN))
    assert kept == ([] if sampler_name == "always_off" else ["cid-new", "cid-unsampled-caller"])


# ---- setup: when tracing is on, and the real exporter --------------------------------------------------

ON = TracingConfig(enabled=True)
OFF = TracingConfig()


@pytest.mark.parametrize(("cfg", "env", "wanted"), [
    (OFF, {}, ()),
    (ON, {}, ("otlp",)),
    (OFF, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
    (OFF, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ("otlp",)),
    (OFF, {"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
    (OFF, {"OTEL_TRACES_EXPORTER": "console, otlp"}, ("console", "otlp")),
    (ON, {"OTEL_TRACES_EXPORTER": "none"}, ()),
    (ON, {"OTEL_SDK_DISABLED": "true"}, ()),
    (OFF, {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, ()),
    (ON, {"OTEL_SDK_DISABLED": "false"}, ("otlp",)),
], ids=["default-off", "config", "endpoint-env", "traces-endpoint-env", "exporter-env", "two-exporters",
        "exporter-none", "sdk-disabled", "sdk-disabled-wins", "sdk-not-disabled"])
def test_when_tracing_is_on(cfg: TracingConfig, env: dict[str, str], wanted: tuple[str, ...]) -> None:
    assert tracing.exporters_for(cfg, env) == wanted


def test_unknown_exporter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        tracing.exporters_for(OFF, {"OTEL_TRACES_EXPORTER": "zipkin"})


@pytest.mark.parametrize(("endpoint", "url"), [
    ("http://collector:4318", "http://collector:4318/v1/traces"),
    ("http://collector:4318/", "http://collector:4318/v1/traces"),
    ("https://otel.example/custom/path", "https://otel.example/custom/path"),
    ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
])
def test_traces_url(endpoint: str, url: str) -> None:
    assert tracing.traces_url(endpoint) == url


def test_config_section() -> None:
    cfg = build_config({"tracing": {"enabled": True, "endpoint": "http://c:4318", "service_name": "llm-a",
                                    "sample_ratio": 0.25}}, env={})
    assert cfg.tracing == TracingConfig(enabled=True, endpoint="http://c:4318", service_name="llm-a", sample_ratio=0.25)
    assert build_config({}, env={}).tracing == OFF
    for bad, key in [({"sample_ratio": 2}, "tracing.sample_ratio"), ({"enable": True}, "tracing"),
                     ({"endpoint": "collector:4318"}, "tracing.endpoint")]:
        with pytest.raises(ConfigError, match=f"`{key}`"):
            build_config({"tracing": bad}, env={})


def test_off_or_disabled_setup_does_nothing() -> None:
    for cfg, env in [(OFF, {}), (ON, {"OTEL_SDK_DISABLED": "true"})]:
        shutdown = tracing.setup(cfg, env)
        assert not tracing.ENABLED
        shutdown()


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'llmsrv\[otel\]'"):
        tracing.setup(ON, {})
    with pytest.raises(ConfigError, match=r"`tracing.enabled`.*pip install 'llmsrv\[otel\]'"):
        build_config({"tracing": {"enabled": True}}, env={})
    assert not tracing.ENABLED


async def test_setup_exports_over_otlp_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path: ``setup`` -> batch processor -> OTLP/HTTP exporter -> a collector (a fake on loopback)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    for name in ("OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    with trio.fail_after(FAILSAFE_S):
        async with FakeUpstream(lambda request: Json({})) as collector:
            cfg = build_config({"tracing": {"enabled": True, "endpoint": collector.url, "service_name": "llm-t"}},
                               env={})
            shutdown = tracing.setup(cfg.tracing, env={})
            try:
                assert tracing.ENABLED
                pipeline = Pipeline(cfg, build_providers(cfg, env={}, only={"mock"}))
                await pipeline.answer(ask("mock:echo"), "cid-otlp", trace={"traceparent": INCOMING})
            finally:
                await trio.to_thread.run_sync(shutdown)  # flushes: blocks, so not in the trio thread
            assert not tracing.ENABLED
            sent = await collector.wait_request()
    assert (sent.method, sent.path, sent.headers["content-type"]) == ("POST", "/v1/traces", "application/x-protobuf")
    export = ExportTraceServiceRequest.FromString(sent.body)
    [resource] = export.resource_spans
    service = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert service["service.name"] == "llm-t"
    names = {s.name: s for scope in resource.scope_spans for s in scope.spans}
    assert set(names) == {tracing.REQUEST_SPAN, tracing.ATTEMPT_SPAN}
    assert names[tracing.REQUEST_SPAN].trace_id.hex() == TRACE_ID
    assert names[tracing.REQUEST_SPAN].parent_span_id.hex() == PARENT_ID


async def test_a_whole_hand_over_reaches_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans reach the batch processor a hand-over at a time (up to ``MAX_RECORDED``): its queue takes one whole,
    where OpenTelemetry's default (2,048) dropped the rest."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    monkeypatch.delenv("OTEL_BSP_MAX_QUEUE_SIZE", raising=False)
    recorded = tracing.MAX_RECORDED - 1  # one short of the cap: handed over by the flush below, all at once
    with trio.fail_after(FAILSAFE_S):
        async with FakeUpstream(lambda request: Json({})) as collector:
            cfg = build_config({"tracing": {"enabled": True, "endpoint": collector.url}}, env={})
            shutdown = tracing.setup(cfg.tracing, env={})
            try:
                for i in range(recorded):
                    with tracing.request_span(f"cid-{i}", ask("mock:echo")):
                        pass
                tracing.flush()
            finally:
                await trio.to_thread.run_sync(shutdown)
    exported = [ExportTraceServiceRequest.FromString(r.body) for r in collector.requests]
    assert sum(len(s.spans) for e in exported for r in e.resource_spans for s in r.scope_spans) == recorded
