"""Operations over real sockets: Prometheus /metrics, /healthz and /readyz on the HTTP port."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from llmsrv.client import ReplyError
from llmsrv.logs import RequestEnd
from llmsrv.natsserver import free_port
from llmsrv.ops import LAG_BUCKETS, LAG_TICK_S, LATENCY_BUCKETS, LoopLag, _Histograms

from .conftest import running, user
from .fakes import wait_for_line

ENC = msgspec.json.encode


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll in-process state (the service has no events for it); ``timeout_s`` is a fail-safe."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_what_happened(nats_url: str) -> None:
    port = free_port()
    async with running(nats_url, server={"http_port": port},
                       providers={"mock": {"rpm": "4/hour", "tokens_per_second": 200}}) as h:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.service.http_port}") as http:
            await h.client.complete({"messages": user("a b c d"), "model": "mock:echo"})
            await h.client.stream({"messages": user("x y"), "model": "mock:echo"}, lambda c: None)
            await h.error_of(ENC({"messages": []}))
            refused = await http.post("/v1/chat/completions", content=b"{not json")  # refused before the backend
            mock = h.service.providers["mock"]
            calls = mock.statistics().calls  # type: ignore[attr-defined]
            with trio.CancelScope() as scope:  # client cancel of a slow lorem stream, once the provider has it
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(h.client.complete,
                                       {"messages": user(), "model": "mock:lorem", "max_tokens": 500})
                    await _until(lambda: mock.statistics().calls > calls)  # type: ignore[attr-defined]
                    scope.cancel()
            err = await h.error_of(ENC({"messages": user(), "model": "mock:lorem", "timeout_ms": 20}))
            assert err["error_code"] in ("TIMEOUT", "RATE_LIMITED")
            await _until(lambda: not h.service.statistics().counters.inflight)
            for _ in range(2):  # the 4/hour budget is spent by now: rate limited (answered at once)
                with pytest.raises(ReplyError) as info:
                    await h.client.complete({"messages": user(), "model": "mock:echo", "timeout_ms": 5000})
                assert info.value.error_code == "RATE_LIMITED"
            metrics = await http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    s = _samples(metrics.text)
    ok = ("llmsrv_requests_total", (("model", "echo"), ("outcome", "ok"), ("provider", "mock")))
    assert s[ok] == 2
    assert s[("llmsrv_requests_total", (("model", ""), ("outcome", "validation_error"), ("provider", "")))] == 1
    assert refused.status_code == 400
    assert s[("llmsrv_requests_total", (("model", ""), ("outcome", "invalid_json"), ("provider", "")))] == 1
    assert s[("llmsrv_cancellations_total", (("reason", "client"),))] == 1
    assert s[("llmsrv_rate_limited_total", (("limit", "rpm"), ("provider", "mock")))] >= 1
    assert s[("llmsrv_time_to_first_chunk_seconds_count", (("provider", "mock"),))] >= 1
    assert s[("llmsrv_tokens_total", (("direction", "input"), ("provider", "mock")))] >= 2
    assert s[("llmsrv_request_duration_seconds_count", ())] >= 5
    assert s[("llmsrv_provider_call_duration_seconds_count", (("provider", "mock"),))] >= 3
    assert s[("llmsrv_inflight_requests", ())] == 0
    assert s[("llmsrv_breaker_state", (("provider", "mock"),))] == 0
    assert not any(name.endswith("_created") for name, _ in s)


@pytest.mark.parametrize("scope", ["provider", "model"])
async def test_breaker_metrics(nats_url: str, scope: str) -> None:
    async with running(nats_url, server={"http_port": free_port()}, routing={"retry": {"max_attempts": 1}},
                       providers={"mock": {"error_rate": 1.0, "breaker_threshold": 1, "breaker_scope": scope}}) as h:
        await h.error_of(ENC({"messages": user(), "model": "mock:echo"}))
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{h.service.http_port}/metrics")).text
    s = _samples(text)
    if scope == "provider":
        assert s[("llmsrv_breaker_state", (("provider", "mock"),))] == 2
    else:
        assert s[("llmsrv_breaker_state", (("provider", "mock"),))] == 0
        assert s[("llmsrv_model_breaker_state", (("model", "echo"), ("provider", "mock")))] == 2
    assert s[("llmsrv_breaker_transitions_total", (("provider", "mock"), ("to", "open")))] == 1
    assert s[("llmsrv_requests_total", (("model", "echo"), ("outcome", "provider_error"), ("provider", "mock")))] == 1


async def test_healthz_and_readyz(nats_url: str) -> None:
    async with running(nats_url, server={"http_port": free_port(), "drain_grace_s": 5},
                       providers={"mock": {"latency_ms": 1000}}) as h:
        base = f"http://127.0.0.1:{h.service.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            health = await http.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert health.json()["providers"]["mock"]["state"] == "available"
            assert (await http.get("/health")).json()["instance_id"] == health.json()["instance_id"]  # predecessor's
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.get("/nope")).status_code == 404
            mock = h.service.providers["mock"]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(h.client.complete, {"messages": user(), "model": "mock:echo"})
                await _until(lambda: mock.statistics().calls == 1)  # type: ignore[attr-defined]
                h.service.shutdown()  # one request in flight (1 s of latency): the drain waits for it
                await _until(lambda: h.service.draining)
                assert h.service.statistics().counters.inflight == 1
                draining = await http.get("/readyz")
                assert draining.status_code == 503 and draining.json() == {"ready": False}
                assert (await http.get("/healthz")).json()["status"] == "draining"


async def test_admin_status_and_breaker_set_reach_every_instance(nats_url: str) -> None:
    import uuid

    fleet = {"subject_prefix": f"f{uuid.uuid4().hex[:8]}"}  # two instances on the same subjects
    async with running(nats_url, nats=fleet) as a, running(nats_url, nats=fleet) as b:
        statuses = await a.client.gather("admin.status", {}, count=2)
        assert sorted(s["instance_id"] for s in statuses) == sorted([a.service.instance_id, b.service.instance_id])
        assert all(s["breakers"]["mock"]["breaker"]["state"] == "closed" for s in statuses)
        done = await a.client.gather("admin.breaker.set", {"provider": "mock", "threshold": 2, "ttl_s": 7.5}, count=2)
        assert len(done) == 2 and all((r["threshold"], r["ttl_s"]) == (2, 7.5) for r in done)
        breaker = b.service.pipeline.guards["mock"].breaker
        assert (breaker.threshold, breaker.ttl_s) == (2, 7.5)
        bad = await a.client.gather("admin.breaker.set", {"provider": "mock", "threshold": 0}, count=2)
        unknown = await a.client.gather("admin.breaker.set", {"provider": "acme"}, count=2)
    assert {r["error_code"] for r in bad} == {"VALIDATION_ERROR"} and "$.threshold" in bad[0]["error"]
    assert {r["error_code"] for r in unknown} == {"PROVIDER_NOT_FOUND"}


def test_cli_status_and_breaker_set(nats_server: object) -> None:
    import os
    import signal
    import subprocess
    import sys
    import uuid

    url = nats_server.url  # type: ignore[attr-defined]
    env = {**os.environ, "LLMSRV__NATS__SUBJECT_PREFIX": f"c{uuid.uuid4().hex[:8]}", "LLMSRV__SERVER__HTTP_PORT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "llmsrv", "serve", "--nats-url", url], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for_line(server, b"ready")  # bounded: a server that never gets ready fails, and is killed below
        status = subprocess.run([sys.executable, "-m", "llmsrv", "status", "--json", "--nats-url", url],
                                env=env, capture_output=True, timeout=30)
        tuned = subprocess.run([sys.executable, "-m", "llmsrv", "breaker", "set", "mock", "--threshold", "3",
                                "--ttl", "9", "--nats-url", url], env=env, capture_output=True, timeout=30)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(5)
    assert status.returncode == 0 and msgspec.json.decode(status.stdout)[0]["status"] == "ok"
    assert tuned.returncode == 0 and msgspec.json.decode(tuned.stdout)[0]["threshold"] == 3


def test_counted_families_scrape_as_prometheus_clients_own() -> None:
    """Metrics counts into plain numbers; at scrape time they must read exactly as prometheus_client's
    own Counter and Histogram would (bucket edges included: a value equal to a bound is in that bucket)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from llmsrv.ops import LATENCY_BUCKETS, Metrics

    values = [0.0, 0.005, 0.0051, 0.3, 1, 2.5, 42.0, 600, 601, 1e9] + [i / 97 for i in range(200)]
    ours = Metrics()
    theirs = CollectorRegistry()
    calls = Histogram("llmsrv_provider_call_duration_seconds", "One provider attempt", ["provider"],
                      buckets=LATENCY_BUCKETS, registry=theirs)
    requests = Counter("llmsrv_requests", "Requests answered, by provider, model and outcome",
                       ["provider", "model", "outcome"], registry=theirs)
    for i, v in enumerate(values):
        provider = ("mock", "claude")[i % 2]
        ours.provider_call(provider, v)
        calls.labels(provider).observe(v)
        ours.count_ends([RequestEnd(f"c{i}", f"{provider}:m", "ok", None, None, 0.0)])
        requests.labels(provider, "m", "ok").inc()

    def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() if m.name == name
                for s in m.samples if not s.name.endswith("_created")}

    for name in ("llmsrv_provider_call_duration_seconds", "llmsrv_requests"):
        mine, reference = samples(ours.registry, name), samples(theirs, name)
        assert mine and mine.keys() == reference.keys()
        assert all(mine[k] == pytest.approx(reference[k]) for k in mine), (mine, reference)


def test_noted_calls_are_counted_at_a_scrape_and_never_pile_up() -> None:
    """A provider call is noted (its seconds appended) and counted into the families later: every one shows
    at the next scrape, and those waiting for a scrape are counted once ``MAX_PENDING`` of them are noted
    (memory stays bounded); requests' ends come in batches (``count_ends``), and what is noted elsewhere is
    handed on before the scrape."""
    from llmsrv.logs import RequestEnds
    from llmsrv.ops import MAX_PENDING, Metrics

    metrics = Metrics()
    ends = RequestEnds(logging.getLogger("test.ends"), metrics.count_ends)
    metrics.before_scrape = ends.hand_on
    n = 2 * MAX_PENDING + 3
    for i in range(n):
        metrics.provider_call("mock", 0.001)
        ends.note(f"c{i}", "mock:echo", "ok", None, 0.001, 3, 4, 0.5)
        waiting = (metrics._noted, sum(map(len, metrics._calls.values())))
        assert max(waiting) <= MAX_PENDING, (i, waiting)
    text = metrics.render().decode()
    assert not (metrics._noted or metrics._calls or ends._pending)
    assert f'llmsrv_requests_total{{model="echo",outcome="ok",provider="mock"}} {float(n)}' in text
    assert f'llmsrv_provider_call_duration_seconds_count{{provider="mock"}} {float(n)}' in text
    assert f'llmsrv_request_duration_seconds_count {float(n)}' in text
    assert f'llmsrv_tokens_total{{direction="output",provider="mock"}} {float(4 * n)}' in text
    assert f'llmsrv_cost_cents_total{{provider="mock"}} {0.5 * n}' in text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(LATENCY_BUCKETS),  # exactly on a bound: counted in that bucket (le)
                          st.floats(min_value=0, max_value=1000, allow_nan=False)), max_size=60))
def test_a_histogram_counts_a_batch_as_it_counts_each_value(values: list[float]) -> None:
    one_by_one = _Histograms("h", "", [])
    for value in values:
        one_by_one.observe((), value)
    batch = _Histograms("h", "", [])
    batch.observe_all((), list(values))
    assert batch.values[()][:-1] == one_by_one.values[()][:-1]
    assert batch.values[()][-1] == pytest.approx(one_by_one.values[()][-1])


# ---- event-loop lag ---------------------------------------------------------------------------------

def test_loop_lag_keeps_the_longest_stall_of_the_current_and_the_previous_window() -> None:
    lag = LoopLag()  # windows of LAG_WINDOW_S = 1 s, the first starting at 0
    assert lag.recent_ms() == 0.0
    lag.observe(0.5, 0.030)
    lag.observe(0.7, 0.002)
    assert lag.recent_ms() == 30.0
    lag.observe(1.1, 0.004)  # a new window: the previous one's 30 ms still counts
    assert lag.recent_ms() == 30.0
    lag.observe(2.2, 0.001)  # the window with 30 ms is two back now
    assert lag.recent_ms() == 4.0
    lag.observe(5.0, 0.003)  # after a gap of more than a window, nothing older counts
    assert lag.recent_ms() == 3.0
    counts = lag.histogram.values[()]
    assert sum(counts[:-1]) == 5 and counts[-1] == pytest.approx(0.040)
    assert counts[LAG_BUCKETS.index(0.05)] == 1  # 30 ms: the first bucket with le >= 0.03 is 0.05


async def test_a_blocked_event_loop_shows_in_health_and_metrics(nats_url: str) -> None:
    port = free_port()
    async with running(nats_url, server={"http_port": port}) as h:
        await trio.sleep(2 * LAG_TICK_S)  # the monitor has ticked
        time.sleep(0.25)  # noqa: ASYNC251  # the stall to be seen: the whole loop blocked
        health = await h.client.request_json("health")
        assert health["loop_lag_ms"] >= 200, health
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    samples = _samples(text)
    bucket = {le: samples[("llmsrv_event_loop_lag_seconds_bucket", (("le", le),))] for le in ("0.1", "+Inf")}
    assert bucket["+Inf"] - bucket["0.1"] >= 1  # the stall's tick woke at least 0.23 s late
    assert samples[("llmsrv_event_loop_lag_seconds_sum", ())] >= 0.2
