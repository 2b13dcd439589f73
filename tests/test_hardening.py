"""The request boundary (CONTRACT sections 3 and 8): no message stops the process or another request.

Pure checks (depth, headers) are table-driven and property-tested; the rest runs a real llmsrv on
a real nats-server. A provider that raises a plain ``RuntimeError`` stands for a bug in llmsrv
itself (it replaces no server): the boundary must answer it and keep serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel
from hypothesis import given
from hypothesis import strategies as st

from llmsrv import errors, messages
from llmsrv.bus import Bus
from llmsrv.client import Client, ReplyError
from llmsrv.messages import StreamChunk
from llmsrv.natsserver import NatsServer
from llmsrv.providers import Call, Completion, OnDelta, ProviderStatus
from llmsrv.providers.registry import build_providers
from llmsrv.service import Service

from .conftest import Harness, running, test_config, user

ENC = msgspec.json.encode


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def body_with(**extra: Any) -> bytes:
    return ENC({"messages": user(), "model": "mock:echo", **extra})


# ---- depth: pure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, max_depth, where", [
    (nested(64), 64, None),
    (nested(65), 64, "$" + "[0]" * 64),
    (b'{"a": {"b": ' + nested(70) + b"}}", 64, "$.a.b" + "[0]" * 62),
    (b'{"s": "' + b"[" * 5000 + b'"}', 64, None),  # brackets inside a string do not nest
    (b'{"s": "\\"' + b"[" * 500 + b'", "t": 1}', 64, None),  # nor after an escaped quote
    (b'{"s": "\\\\", "t": ' + nested(80) + b"}", 64, "$.t" + "[0]" * 63),  # an escaped backslash ends no string early
    (b"[" * 100_000, 64, "$" + "[0]" * 64),  # unbalanced: still refused before any decode
    (b'{"x": [1, 2, ' + nested(10) + b"]}", 8, "$.x[2]" + "[0]" * 6),
    (b"]" * 200 + b"[" * 10, 64, None),  # not JSON at all: left to the decoder
], ids=["at-limit", "over", "path-of-keys", "string", "escaped-quote", "escaped-backslash", "unbalanced",
        "array-index", "garbage"])
def test_check_depth(data: bytes, max_depth: int, where: str | None) -> None:
    if where is None:
        messages.check_depth(data, max_depth)
    else:
        with pytest.raises(errors.ValidationFailed) as info:
            messages.check_depth(data, max_depth)
        assert info.value.message.endswith(f"at `{where}`")
        assert "server.max_json_depth" in info.value.message


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab[]{}"\\ \n,:'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k[]{"\\'), inner, max_size=3),
    max_leaves=40)


@given(json_values, st.integers(min_value=1, max_value=12))
def test_check_depth_agrees_with_the_real_depth(value: Any, max_depth: int) -> None:
    data = ENC(value)
    if _depth(value) <= max_depth:
        messages.check_depth(data, max_depth)
    else:
        with pytest.raises(errors.ValidationFailed):
            messages.check_depth(data, max_depth)


@pytest.mark.parametrize("raw, expected", [
    ("250", 250), (" 250 ", 250), ("600000", 600000), ("1", 1),
    ("²", None), ("٣", None), ("1" * 5000, None), ("0", None), ("600001", None), ("", None), ("-5", None),
    ("1e3", None), ("0x10", None), ("12 3", None), ("\u0661\u0662", None),
], ids=lambda v: repr(v)[:12])
def test_header_int_takes_ascii_digits_only(raw: str, expected: int | None) -> None:
    headers = {"Llm-Timeout-Ms": raw}
    if expected is not None:
        assert messages.header_int(headers, "Llm-Timeout-Ms", 1, 600000) == expected
    else:
        with pytest.raises(errors.ValidationFailed, match="Llm-Timeout-Ms"):
            messages.header_int(headers, "Llm-Timeout-Ms", 1, 600000)


# ---- the probes that used to stop the process ----------------------------------------------------

KILLERS = [
    ("superscript-two", body_with(), {"Llm-Timeout-Ms": "²"}, "VALIDATION_ERROR", "Llm-Timeout-Ms"),
    ("arabic-three", body_with(), {"Llm-Timeout-Ms": "٣"}, "VALIDATION_ERROR", "Llm-Timeout-Ms"),
    ("5000-digits", body_with(), {"Llm-Timeout-Ms": "9" * 5000}, "VALIDATION_ERROR", "Llm-Timeout-Ms"),
    ("long-correlation-header", body_with(), {"Llm-Correlation-Id": "c" * 5000}, "VALIDATION_ERROR",
     "Llm-Correlation-Id"),
    ("deep-unknown-field", b'{"messages": [{"role": "user", "content": "x"}], "junk": ' + nested(1000) + b"}",
     None, "VALIDATION_ERROR", "$.junk"),
    ("deep-tool-parameters", ENC({"messages": user(), "tools": [{"type": "function", "function": {
        "name": "t", "parameters": {"type": "object", "properties": "@"}}}]}).replace(b'"@"', nested(3000)),
     None, "VALIDATION_ERROR", "$.tools[0].function.parameters.properties"),
    ("deep-content", b'{"messages": [{"role": "user", "content": ' + nested(100_000) + b"}]}", None,
     "VALIDATION_ERROR", "$.messages[0].content"),
    ("unterminated-deep", b'{"messages": ' + b"[" * 200_000, None, "VALIDATION_ERROR", "max_json_depth"),
]


@pytest.mark.parametrize("name, data, headers, code, names", KILLERS, ids=[k[0] for k in KILLERS])
async def test_probes_are_answered_and_the_server_goes_on(nats_url: str, name: str, data: bytes,
                                                          headers: dict[str, str] | None, code: str,
                                                          names: str) -> None:
    async with running(nats_url) as h:
        err = await h.error_of(data, headers)
        assert err["error_code"] == code and names in err["error"], err
        assert err["_headers"]["Nats-Service-Error-Code"] == "400"
        # the same instance still serves, the cancel and health handlers included
        h.client.bus.publish_nowait(f"{h.prefix}.cancel", data)
        assert (await h.client.complete({"messages": user("still here"), "model": "mock:echo"})).text == "still here"
        assert (await h.client.request_json("health"))["status"] == "ok"


async def test_deep_json_on_every_handler_is_refused_quietly(nats_url: str) -> None:
    deep = b'{"correlation_id": ' + nested(5000) + b"}"
    async with running(nats_url) as h:
        for subject in ("cancel", "admin.breaker.set"):
            h.client.bus.publish_nowait(f"{h.prefix}.{subject}", deep)
        err = await h.error_of(deep)
        assert err["error_code"] == "VALIDATION_ERROR"
        refused = await h.raw(deep, subject="admin.breaker.set")
        assert msgspec.json.decode(refused.data)["error_code"] == "VALIDATION_ERROR"
        assert (await h.client.complete({"messages": user(), "model": "mock:echo"})).text == "hello"


# ---- a bug anywhere is answered INTERNAL_ERROR, once, and the worker goes on ---------------------

class BuggyProvider:
    """A provider with a bug in it: ``complete`` raises a plain exception; ``status`` may too."""

    def __init__(self) -> None:
        self.broken_status = False

    def status(self) -> ProviderStatus:
        if self.broken_status:
            raise RuntimeError("status is broken")
        return ProviderStatus(True)

    async def probe(self) -> ProviderStatus:
        return self.status()

    async def aclose(self) -> None:
        pass

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        if on_delta is not None:
            on_delta("partial ")
        raise RuntimeError(f"bug in {call.model}")


@asynccontextmanager
async def with_buggy_provider(nats_url: str) -> AsyncIterator[tuple[Harness, BuggyProvider]]:
    cfg = test_config(nats_url)
    buggy = BuggyProvider()
    providers = {**build_providers(cfg), "openai_compat": buggy}
    async with Bus.connect(cfg.nats, nats_url) as bus:
        service = Service(cfg, bus, providers=providers)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            async with Client.connect(nats_url, cfg.nats.subject_prefix) as client:
                yield Harness(service=service, client=client, cfg=cfg), buggy
            service.shutdown()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_bug_is_answered_internal_error_and_logged_once(nats_url: str, stream: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="llmsrv")
    chunks: list[StreamChunk] = []
    async with with_buggy_provider(nats_url) as (h, _):
        request = {"messages": user(), "model": "openai_compat:m", "correlation_id": "bug-1"}
        with pytest.raises(ReplyError) as info:
            if stream:
                await h.client.stream(request, chunks.append)
            else:
                await h.client.complete(request)
        assert (await h.client.complete({"messages": user("next"), "model": "mock:echo"})).text == "next"
    assert info.value.error_code == "INTERNAL_ERROR" and info.value.correlation_id == "bug-1"
    assert "bug in m" not in str(info.value)  # the reply names no internals
    logged = [r for r in caplog.records if r.exc_info and "bug-1" in r.getMessage()]
    assert len(logged) == 1 and "bug in m" in str(logged[0].exc_info[1])
    assert [c.delta for c in chunks] == (["partial "] if stream else [])


async def test_a_bug_in_a_handler_is_answered_and_the_server_goes_on(nats_url: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="llmsrv")
    async with with_buggy_provider(nats_url) as (h, buggy):
        buggy.broken_status = True
        for subject in ("health", "admin.status"):
            reply = await h.raw(b"{}", subject=subject)
            assert msgspec.json.decode(reply.data)["error_code"] == "INTERNAL_ERROR"
            assert reply.headers and reply.headers["Nats-Service-Error-Code"] == "500"
        buggy.broken_status = False
        assert (await h.client.request_json("health"))["status"] == "ok"
    assert sum("status is broken" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 2


# ---- streaming errors keep their codes -----------------------------------------------------------

@pytest.mark.parametrize("request_, code", [
    ({"model": "mock:fail"}, "PROVIDER_ERROR"),
    ({"model": "mock:nonesuch"}, "PROVIDER_NOT_FOUND"),
    ({"model": "claude:sonnet"}, "MISSING_CREDENTIALS"),
], ids=["upstream-failure", "unknown-model", "no-credentials"])
async def test_streaming_errors_keep_their_codes(nats_url: str, request_: dict[str, Any], code: str) -> None:
    async with running(nats_url, routing={"retry": {"max_attempts": 1}}) as h:
        with pytest.raises(ReplyError) as info:
            await h.client.stream({"messages": user(), **request_}, lambda _: None)
    assert info.value.error_code == code


async def test_streaming_circuit_open_keeps_its_code(nats_url: str) -> None:
    async with running(nats_url, routing={"retry": {"max_attempts": 1}},
                       providers={"mock": {"breaker_threshold": 1, "breaker_ttl_s": 60}}) as h:
        with pytest.raises(ReplyError):
            await h.client.complete({"messages": user(), "model": "mock:fail"})
        with pytest.raises(ReplyError) as info:
            await h.client.stream({"messages": user(), "model": "mock:fail"}, lambda _: None)
    assert info.value.error_code == "CIRCUIT_OPEN" and info.value.retry_after_ms


# ---- sizes: replies over the NATS server's max_payload --------------------------------------------

@pytest.fixture(scope="module")
def small_payload_nats(tmp_path_factory: pytest.TempPathFactory) -> Any:
    conf = tmp_path_factory.mktemp("nats") / "small.conf"
    conf.write_text("max_payload: 65536\n")
    with NatsServer(args=("-c", str(conf))) as server:
        yield server


async def test_a_reply_over_max_payload_is_answered_response_too_large(small_payload_nats: NatsServer) -> None:
    text = "x" * (65536 - 150)  # the request fits in max_payload; its echo, with the reply's fields, does not
    async with running(small_payload_nats.url) as h:
        assert h.service.bus.max_payload == 65536
        err = await h.error_of(body_with(messages=user(text)))
        assert (await h.client.complete({"messages": user("small"), "model": "mock:echo"})).text == "small"
    assert err["error_code"] == "RESPONSE_TOO_LARGE" and "stream" in err["error"]
    assert err["_headers"]["Nats-Service-Error-Code"] == "502"


async def test_a_large_stream_arrives_in_chunks_that_fit(small_payload_nats: NatsServer) -> None:
    text = "a\u0001" * 150_000  # control characters grow sixfold in JSON: the worst case for chunk sizes
    chunks: list[StreamChunk] = []
    async with running(small_payload_nats.url, server={"max_request_bytes": 4 << 20}) as h:
        # the request itself must fit in max_payload to arrive at all: ask for lorem of many tokens
        final = await h.client.stream({"messages": user(text[:1000]), "model": "mock:lorem", "max_tokens": 60000},
                                      chunks.append)
    assert [c.seq for c in chunks] == list(range(len(chunks))) and len(chunks) > 1
    assert all(len(ENC(c)) <= 65536 for c in chunks)
    assert final.text == "" and final.tokens_used > 0  # the text went out in the chunks


# ---- overload and queueing ------------------------------------------------------------------------

async def test_overloaded_carries_retry_after(nats_url: str) -> None:
    async with running(nats_url, server={"max_inflight": 1}, providers={"mock": {"latency_ms": 3000}}) as h:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.client.complete, {"messages": user(), "model": "mock:echo"})
            with trio.fail_after(5):
                while h.service.statistics().counters.inflight < 1:
                    await trio.sleep(0.005)
            err = await h.error_of(body_with())
            nursery.cancel_scope.cancel()
    assert err["error_code"] == "OVERLOADED" and 50 <= err["retry_after_ms"] <= 5000


async def test_requests_are_shed_while_the_queue_in_front_is_over_max_queue_ms(nats_url: str) -> None:
    async with running(nats_url, server={"max_queue_ms": 1000}) as h:
        front = h.service._front
        with trio.fail_after(10):  # the self-ping runs: a round trip was measured
            while front.delay.pings < 2 or front.delay.sent_at is not None:
                await trio.sleep(0.01)
        assert front.delay.rtt_s < 1.0 and front.delay.admits(trio.current_time())
        assert (await h.client.complete({"messages": user("first"), "model": "mock:echo"})).text == "first"
        # as if the ping out now had been waiting 5 s behind other requests (it keeps that time when back)
        front.delay.sent_at = trio.current_time() - 5.0
        err = await h.error_of(body_with())
        assert err["error_code"] == "OVERLOADED" and "max_queue_ms=1000" in err["error"] and err["retry_after_ms"]
        assert (await h.client.request_json("health"))["queue_delay_ms"] >= 1000
        with trio.fail_after(10):  # the next pings come back fast: requests are admitted again
            while not front.delay.admits(trio.current_time()):
                await trio.sleep(0.01)
        assert (await h.client.complete({"messages": user("again"), "model": "mock:echo"})).text == "again"


async def test_a_request_that_waited_past_max_queue_ms_is_overloaded(nats_url: str) -> None:
    async with running(nats_url, server={"max_queue_ms": 100}) as h:
        reply_to = h.client.bus.new_inbox()
        got: list[Any] = []
        sub = await h.client.bus.subscribe(reply_to, got.append)
        await h.client.bus.flush()
        msg = SimpleNamespace(subject=f"{h.prefix}.request", reply=reply_to, data=body_with(), headers=None)
        await h.service._serve(msg, trio.current_time() - 0.2, h.service._request_edge)  # admitted 200 ms ago
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.005)
        await h.client.bus.unsubscribe(sub)
    body = msgspec.json.decode(got[0].data)
    assert body["error_code"] == "OVERLOADED" and "max_queue_ms=100" in body["error"] and body["retry_after_ms"]


async def test_the_wait_in_front_and_the_wait_inside_add_up_to_max_queue_ms(nats_url: str) -> None:
    """A request admitted after 900 ms in front of the instance (the self-ping's measure) has only 100 ms
    of max_queue_ms=1000 left to start; without the wait in front the same 200 ms inside is fine."""
    async with running(nats_url, server={"max_queue_ms": 1000}) as h:
        reply_to = h.client.bus.new_inbox()
        got: list[Any] = []
        sub = await h.client.bus.subscribe(reply_to, got.append)
        await h.client.bus.flush()
        admit = h.service._on_message(h.service._request_edge)
        for in_front in (0.0, 0.9):
            h.service._front.delay.rtt_s, h.service._front.delay.sent_at = in_front, None
            admit(SimpleNamespace(subject=f"{h.prefix}.request", reply=reply_to, data=body_with(), headers=None))
            time.sleep(0.2)  # noqa: ASYNC251 - on purpose: no worker starts before this task yields (200 ms inside)
            with trio.fail_after(5):
                while len(got) < (1 if in_front == 0.0 else 2):
                    await trio.sleep(0.005)
        await h.client.bus.unsubscribe(sub)
    first, second = (msgspec.json.decode(m.data) for m in got)
    assert "error_code" not in first and first["text"]
    assert second["error_code"] == "OVERLOADED" and "max_queue_ms=1000" in second["error"], second
    assert int(second["error"].split("waited ")[1].split(" ms")[0]) >= 1100


async def test_mock_is_not_capped_by_a_bulkhead_under_load(nats_url: str) -> None:
    n = 2000  # well over the 64 of a real provider's default max_concurrency
    # load shedding off (max_queue_ms): this is about bulkheads, and a busy machine may shed the burst
    async with running(nats_url, server={"max_queue_ms": 600000}, providers={"mock": {"latency_ms": 1500}}) as h:
        results: list[str] = []

        async def one(i: int) -> None:
            results.append((await h.client.complete({"messages": user(f"m{i}"), "model": "mock:echo"},
                                                    timeout_s=60)).text)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    assert sorted(results) == sorted(f"m{i}" for i in range(n))


# ---- per-model breakers ---------------------------------------------------------------------------

async def test_one_failing_model_does_not_close_off_the_others(nats_url: str) -> None:
    async with running(nats_url, routing={"retry": {"max_attempts": 1}},
                       providers={"mock": {"breaker_threshold": 2, "breaker_ttl_s": 30}}) as h:
        codes = []
        for _ in range(3):
            with pytest.raises(ReplyError) as info:
                await h.client.complete({"messages": user(), "model": "mock:fail"})
            codes.append(info.value.error_code)
        assert (await h.client.complete({"messages": user("fine"), "model": "mock:echo"})).text == "fine"
        status = (await h.client.gather("admin.status", {}, count=1))[0]
    assert codes == ["PROVIDER_ERROR", "PROVIDER_ERROR", "CIRCUIT_OPEN"]
    assert status["breakers"]["mock"]["breaker"]["state"] == "closed"
    assert status["breakers"]["mock"]["models"]["fail"]["state"] == "open"


async def test_provider_wide_failures_count_for_every_model(autojump_clock: trio.testing.MockClock) -> None:
    from llmsrv.config import ProviderConfig
    from llmsrv.resilience import CLOSED, OPEN, ProviderGuard

    guard = ProviderGuard("p", ProviderConfig(breaker_threshold=2, breaker_ttl_s=5))
    for model, exc in (("a", errors.ProviderUnreachable("refused")), ("b", errors.MissingCredentials("401"))):
        with pytest.raises(errors.LlmsrvError):
            async with guard.attempt(0, model):
                raise exc
    assert guard.breaker.state == OPEN  # two models, one provider-wide count
    with pytest.raises(errors.CircuitOpen):
        async with guard.attempt(0, "c"):
            pass

    guard = ProviderGuard("p", ProviderConfig(breaker_threshold=2, breaker_ttl_s=5))
    for _ in range(2):  # a model's own failures stay with that model
        with pytest.raises(errors.ProviderError):
            async with guard.attempt(0, "x"):
                raise errors.ProviderError("500")
    assert guard.models["x"].state == OPEN and guard.breaker.state == CLOSED
    async with guard.attempt(0, "y"):
        pass
    with pytest.raises(errors.CircuitOpen, match="p:x"):
        async with guard.attempt(0, "x"):
            pass


# ---- admin and health never wait on Redis ---------------------------------------------------------

async def test_admin_status_does_not_wait_on_a_stalled_redis(nats_url: str, redis_url: str) -> None:
    import redis

    async with running(nats_url, routing={"storage_uri": redis_url},
                       providers={"mock": {"rpm": "1000/minute"}}) as h:
        assert (await h.client.complete({"messages": user(), "model": "mock:echo"})).text == "hello"
        client = redis.Redis.from_url(redis_url)
        # Redis answers nobody for 3 s from here: in effect once CLIENT PAUSE has returned (no race)
        await trio.to_thread.run_sync(client.execute_command, "CLIENT", "PAUSE", "3000")
        paused_at = trio.current_time()
        status = await h.client.request_json("admin.status", timeout_s=10)
        health = await h.client.request_json("health", timeout_s=10)
        answered = trio.current_time() - paused_at
        waited = await trio.to_thread.run_sync(client.ping)  # blocks until the pause ends
        client.close()
    assert waited and status["breakers"]["mock"]["rate"]["limited"] is None and health["status"] == "ok"
    assert answered < 2.5  # answered while Redis was still paused (a storage read would have waited 3 s)


# ---- drain under load and an overload burst, on a real process ------------------------------------

async def test_drain_under_load_answers_every_request(nats_url: str) -> None:
    import signal
    import uuid

    from .test_process import _serve, _wait_ready, echo_outcome

    n = 400
    prefix = f"p{uuid.uuid4().hex[:8]}"
    proc = _serve(nats_url, prefix, LLMSRV__PROVIDERS__MOCK__LATENCY_MS="2000",
                  LLMSRV__SERVER__MAX_INFLIGHT="300", LLMSRV__SERVER__DRAIN_GRACE_S="30",
                  LLMSRV__SERVER__MAX_QUEUE_MS="600000",  # only max_inflight refuses here
                  LLMSRV__SERVER__LOG_LEVEL="warning")  # 400 request lines would fill the stderr pipe nobody reads
    outcomes: list[str] = []
    try:
        async with Client.connect(nats_url, prefix) as client:
            await _wait_ready(client)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(echo_outcome, client, i, outcomes, 30)
                with trio.fail_after(20):  # the burst has arrived: 300 in flight, 100 refused
                    while (await client.request_json("health"))["inflight"] < 300 or len(outcomes) < 100:
                        await trio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
        rc = await trio.to_thread.run_sync(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert len(outcomes) == n  # every request answered: none lost in the burst or the drain
    assert outcomes.count("ok") == 300 and outcomes.count("OVERLOADED") == 100, sorted(set(outcomes))


async def test_requests_the_nats_client_drops_are_answered_overloaded(nats_url: str) -> None:
    burst = 2000
    async with running(nats_url, server={"max_queue_ms": 600000}, nats={"pending_msgs_limit": 5}) as h:
        bus = h.client.bus
        replies: dict[str, list[Any]] = {}
        inbox = bus.new_inbox()
        await bus.subscribe(inbox + ".*", lambda msg: replies.setdefault(msg.subject, []).append(msg))
        await bus.flush()
        for i in range(burst):  # one flush: far more than 5 wait in the server's subscription at once
            bus.publish_nowait(f"{h.prefix}.request", body_with(messages=user(f"m{i}")), reply=f"{inbox}.{i}")
        await bus.flush()
        with trio.fail_after(30):
            while len(replies) < burst:
                await trio.sleep(0.02)
        dropped = h.service.bus.dropped.get(f"{h.prefix}.request", 0)
        assert (await h.client.complete({"messages": user("after"), "model": "mock:echo"})).text == "after"
    assert all(len(r) == 1 for r in replies.values())
    codes = [msgspec.json.decode(r[0].data).get("error_code", "ok") for r in replies.values()]
    assert 0 < dropped == codes.count("OVERLOADED") and codes.count("ok") == burst - dropped


def test_a_model_whose_own_breaker_is_open_is_skipped_by_routing() -> None:
    from llmsrv import routing
    from llmsrv.config import build_config

    cfg = build_config({"routing": {"matrix": {"general": {"simple": ["mock:fail", "mock:echo"]}}}}, env={})
    found = routing.route(messages.decode_request(ENC({"messages": user(), "complexity": "simple"})), cfg.routing)
    up = routing.ProviderState()
    plan = routing.filter_plan(found, {"mock": up, "mock:fail": routing.ProviderState(True, 12.5)})
    assert [t.spec for t in plan.candidates] == ["mock:echo"]
    assert [(s.target.spec, s.reason, s.retry_after_ms) for s in plan.skipped] == [("mock:fail", "circuit_open", 12500)]
