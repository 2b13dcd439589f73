"""Operations: health, readiness, Prometheus metrics (HTTP), NATS micro-service discovery; renders frozen snapshots.

``$SRV.PING|INFO|STATS`` (and their ``.llmsrv`` / ``.llmsrv.<id>`` forms) are answered here by
hand, in the JSON shapes of the NATS micro spec (v1): nats-py's ``nats.micro`` would serve our
endpoint one request at a time (LIBRARY-NOTES), so it is not used.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter
from typing import Any

import msgspec
import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .bus import Handler, Incoming
from .logs import RequestEnd
from .messages import encode
from .providers import ProviderStatus
from .resilience import STATE_CODE, GuardSnapshot

SERVICE_NAME = "llmsrv"


class ServiceStats(msgspec.Struct, frozen=True):
    """The request counters of one instance."""

    inflight: int
    workers: int
    idle_workers: int
    requests: int
    errors: int
    processing_ns: int
    last_error: str
    queue_delay_ms: float = 0.0  # how long a request arriving now waits before admission (self-ping)
    loop_lag_ms: float = 0.0  # the event loop's longest stall lately (LoopLag)


class ProviderSnapshot(msgspec.Struct, frozen=True):
    status: ProviderStatus
    guard: GuardSnapshot
    model_breakers: dict[str, str]  # model -> state, of every per-model breaker kept


class InstanceSnapshot(msgspec.Struct, frozen=True):
    """Everything the operations endpoints show of one instance, taken at once (no I/O)."""

    instance_id: str
    started_wall: float
    uptime_s: float
    draining: bool
    nats_connected: bool
    subject_request: str
    queue: str
    counters: ServiceStats
    providers: dict[str, ProviderSnapshot]
    http_api: str = ""  # the OpenAI-compatible API's base URL, when served


Snapshot = Callable[[], InstanceSnapshot]


def health_document(snap: InstanceSnapshot) -> dict[str, Any]:
    providers = {name: {"available": p.status.available, "state": p.status.state, "reason": p.status.reason,
                        "breaker": p.guard.breaker.state,
                        # per-model breakers (breaker_scope = "model") that are not closed
                        "models": {m: state for m, state in p.model_breakers.items() if state != "closed"}}
                 for name, p in snap.providers.items()}
    return {
        "status": "draining" if snap.draining else "ok",
        "uptime_s": round(snap.uptime_s, 3),
        "nats": "connected" if snap.nats_connected else "disconnected",
        "providers": providers,
        "instance_id": snap.instance_id,
        "version": __version__,
        "inflight": snap.counters.inflight,
        "queue_delay_ms": snap.counters.queue_delay_ms,
        "loop_lag_ms": snap.counters.loop_lag_ms,
    }


def status_document(snap: InstanceSnapshot) -> dict[str, Any]:
    """``llm.admin.status``: the health document plus breakers, limits and counters."""
    doc = health_document(snap)
    doc["breakers"] = {name: msgspec.to_builtins(p.guard) for name, p in snap.providers.items()}
    doc["stats"] = msgspec.to_builtins(snap.counters)
    return doc


def _identity(snap: InstanceSnapshot, kind: str) -> dict[str, Any]:
    return {"type": f"io.nats.micro.v1.{kind}_response", "name": SERVICE_NAME,
            "id": snap.instance_id, "version": __version__, "metadata": {}}


def _endpoint(snap: InstanceSnapshot) -> dict[str, Any]:
    return {"name": "request", "subject": snap.subject_request, "queue_group": snap.queue, "metadata": {}}


def _ping(snap: InstanceSnapshot) -> dict[str, Any]:
    return _identity(snap, "ping")


def _endpoints(snap: InstanceSnapshot) -> list[dict[str, Any]]:
    """Every subject this instance serves (CONTRACT section 1, 10), with its queue group ("" for none)."""
    p, queue = snap.subject_request.removesuffix(".request"), snap.queue
    rows = [("cancel", f"{p}.cancel", ""), ("health", f"{p}.health", queue),
            ("admin_status", f"{p}.admin.status", ""), ("admin_breaker_set", f"{p}.admin.breaker.set", ""),
            ("admin_breaker_state", f"{p}.admin.breaker.state", ""),
            ("worker", f"{p}.req.>", queue)]  # the predecessor's llm.req.<model>
    return [_endpoint(snap)] + [{"name": name, "subject": subject, "queue_group": group, "metadata": {}}
                                for name, subject, group in rows]


def _info(snap: InstanceSnapshot) -> dict[str, Any]:
    info = {**_identity(snap, "info"), "description": "LLM requests over NATS", "endpoints": _endpoints(snap)}
    if snap.http_api:
        info["metadata"] = {"openai_api": snap.http_api}  # section 9: the OpenAI-compatible HTTP API
    return info


def _stats(snap: InstanceSnapshot) -> dict[str, Any]:
    s = snap.counters
    started = _dt.datetime.fromtimestamp(snap.started_wall, _dt.UTC)
    return {**_identity(snap, "stats"), "started": started.isoformat().replace("+00:00", "Z"),
            "endpoints": [{**_endpoint(snap), "num_requests": s.requests, "num_errors": s.errors,
                           "last_error": s.last_error, "processing_time": s.processing_ns,
                           "average_processing_time": s.processing_ns // max(1, s.requests)}]}


def micro_subscriptions(snapshot: Snapshot, publish: Callable[[str, bytes], None]) -> Iterator[tuple[str, Handler]]:
    instance_id = snapshot().instance_id
    for verb, build in (("PING", _ping), ("INFO", _info), ("STATS", _stats)):
        def handler(msg: Incoming, build: Callable[[InstanceSnapshot], dict[str, Any]] = build) -> None:
            if msg.reply:
                publish(msg.reply, encode(build(snapshot())))

        for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{SERVICE_NAME}", f"$SRV.{verb}.{SERVICE_NAME}.{instance_id}"):
            yield subject, handler


# ---- event-loop lag ------------------------------------------------------------------------------

LAG_TICK_S = 0.02  # the lag monitor's resolution: a stall shorter than this may go unseen
LAG_WINDOW_S = 1.0  # recent_ms() is the longest stall in the current and the previous window
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class LoopLag:
    """How late the event loop runs a task that asked to wake: every ``LAG_TICK_S`` a sleep's overshoot
    (a stall of the whole loop: a long scheduling batch, a garbage collection, blocking code), kept as the
    longest of the last one to two ``LAG_WINDOW_S`` and in a histogram (``llmsrv_event_loop_lag_seconds``).
    ``observe`` is pure (the clock is passed in); ``run`` is the task."""

    def __init__(self) -> None:
        self.histogram = _Histograms("llmsrv_event_loop_lag_seconds", "How late the event loop woke a "
                                     f"{LAG_TICK_S * 1000:g} ms timer (every tick)", [], LAG_BUCKETS)
        self._window_start = 0.0
        self._current = self._previous = 0.0  # the longest stall in this window and the one before

    def observe(self, now: float, lag_s: float) -> None:
        if now - self._window_start >= LAG_WINDOW_S:
            expired = now - self._window_start >= 2 * LAG_WINDOW_S
            self._previous, self._current = (0.0 if expired else self._current), 0.0
            self._window_start = now
        self._current = max(self._current, lag_s)
        self.histogram.observe((), lag_s)

    def recent_ms(self) -> float:
        return round(max(self._current, self._previous) * 1000, 1)

    async def run(self) -> None:
        while True:
            asked = trio.current_time() + LAG_TICK_S
            await trio.sleep_until(asked)
            now = trio.current_time()
            self.observe(now, max(0.0, now - asked))


# ---- metrics -----------------------------------------------------------------------------------

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double the output for nothing
MAX_PENDING = 4096  # provider calls noted and not yet counted: past this, they are counted at once
_SPEC_OUTCOME, _SECONDS = attrgetter("spec", "outcome"), attrgetter("seconds")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Families(Collector):
    """The counted families, as samples, when the registry is collected (a scrape), after ``fold()``."""

    def __init__(self, families: tuple[_Counts | _Histograms, ...], fold: Callable[[], None]) -> None:
        self._families, self._fold = families, fold

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        self._fold()
        for family in self._families:
            yield family.family()


class _Watched(Collector):
    """Series read from the instance at scrape time: breaker states and NATS drops."""

    def __init__(self, snapshot: Snapshot, dropped: Callable[[], Mapping[str, int]]) -> None:
        self._snapshot, self._dropped = snapshot, dropped

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        family = GaugeMetricFamily("llmsrv_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                                   labels=["provider"])
        models = GaugeMetricFamily("llmsrv_model_breaker_state",
                                   "Per-model breaker state (breaker_scope = model): 0 closed, 1 half-open, 2 open",
                                   labels=["provider", "model"])
        for name, p in self._snapshot().providers.items():
            family.add_metric([name], STATE_CODE[p.guard.breaker.state])
            for model, state in p.model_breakers.items():
                models.add_metric([name, model], STATE_CODE[state])
        dropped = CounterMetricFamily("llmsrv_nats_dropped", "Messages the NATS client dropped past a subscription's "
                                      "pending limit (nats.pending_msgs_limit / pending_bytes_limit)",
                                      labels=["subject"])
        for subject, count in self._dropped().items():
            dropped.add_metric([subject], count)
        yield family
        yield models
        yield dropped


class _Counts:
    """A counter family as plain numbers by label values, made into samples at scrape time: an
    ``inc`` is a dict update (~0.2 us), where prometheus_client's takes a lock per call."""

    def __init__(self, name: str, doc: str, labels: list[str]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric(list(key), value)
        return family


class _Histograms:
    """A histogram family the same way: per label values, a count per bucket (``le``) and the sum."""

    def __init__(self, name: str, doc: str, labels: list[str], bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self.values: dict[tuple[str, ...], list[float]] = {}  # counts per bucket (the last: +Inf), then the sum
        if not labels:
            self.values[()] = [0] * (len(bounds) + 2)

    def observe(self, key: tuple[str, ...], seconds: float) -> None:
        found = self._counts(key)
        found[bisect.bisect_left(self.bounds, seconds)] += 1  # the first bucket with seconds <= le
        found[-1] += seconds

    def observe_all(self, key: tuple[str, ...], values: list[float]) -> None:
        """``observe`` each of ``values`` (sorted in place): a bisection per bucket, not per value."""
        if not values:
            return
        found = self._counts(key)
        values.sort()
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect.bisect_right(values, bound, below)  # values <= le
            found[i] += upto - below
            below = upto
        found[-2] += len(values) - below
        found[-1] += math.fsum(values)

    def _counts(self, key: tuple[str, ...]) -> list[float]:
        found = self.values.get(key)
        if found is None:
            found = self.values[key] = [0] * (len(self.bounds) + 2)
        return found

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, counts in list(self.values.items()):
            cumulative = list(itertools.accumulate(counts[:-1]))
            family.add_metric(list(key), list(zip(self._le, cumulative, strict=True)), counts[-1])
        return family


class Metrics:
    """The Prometheus metrics of one instance (CONTRACT section 6), in a registry of its own.

    The pipeline and the service count into plain numbers (``_Counts``, ``_Histograms``) that become
    Prometheus samples when ``/metrics`` is scraped; ``watch`` adds the series read from the instance
    at scrape time (in-flight gauge, breaker states, NATS drops). What every request records is counted
    a batch at a time: its outcome, duration, tokens and cost from the service's noted ends
    (``count_ends``, ``logs.RequestEnds``, handed on before each scrape), its provider calls noted as
    they happen (a list per provider) and counted by ``fold()``: at each scrape, and at once past
    ``MAX_PENDING`` calls.
    """

    counting = True  # whether the per-request series are kept (UncountedMetrics: not)

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.loop_lag = LoopLag()
        # noted, not yet counted (fold): seconds per provider call, by provider (no container per call: each
        # would be walked by the garbage collector until the fold)
        self._noted = 0
        self._calls: dict[str, list[float]] = {}
        self.before_scrape: Callable[[], None] = lambda: None  # hands on what is noted elsewhere (the service's ends)
        self._requests = _Counts("llmsrv_requests", "Requests answered, by provider, model and outcome",
                                 ["provider", "model", "outcome"])
        self._request_duration = _Histograms("llmsrv_request_duration_seconds", "From receipt to final reply", [])
        self._provider_call = _Histograms("llmsrv_provider_call_duration_seconds", "One provider attempt",
                                          ["provider"])
        self._first_chunk = _Histograms("llmsrv_time_to_first_chunk_seconds", "Attempt start to first streamed text",
                                        ["provider"])
        self._transitions = _Counts("llmsrv_breaker_transitions", "Circuit breaker state changes", ["provider", "to"])
        self._rate_limited = _Counts("llmsrv_rate_limited", "Attempts refused by a rate limit (ours or upstream)",
                                     ["provider", "limit"])
        self._tokens = _Counts("llmsrv_tokens", "Tokens used", ["provider", "direction"])
        self._cost = _Counts("llmsrv_cost_cents", "Cost in US cents, from the price table", ["provider"])
        self._cancellations = _Counts("llmsrv_cancellations", "Requests cancelled, by reason", ["reason"])
        families = (self._requests, self._request_duration, self._provider_call, self._first_chunk,
                    self._transitions, self._rate_limited, self._tokens, self._cost, self._cancellations,
                    self.loop_lag.histogram)
        self.registry.register(_Families(families, self._scraped))

    def watch(self, snapshot: Snapshot, dropped: Callable[[], Mapping[str, int]]) -> None:
        Gauge("llmsrv_inflight_requests", "Requests admitted and not yet answered",
              registry=self.registry).set_function(lambda: snapshot().counters.inflight)
        self.registry.register(_Watched(snapshot, dropped))

    def count_ends(self, ends: list[RequestEnd]) -> None:
        """Count a batch of finished requests (a histogram's values sorted and bisected once per bucket; labels
        split once per (spec, outcome): a batch has few)."""
        used: dict[str, list[float]] = {}  # spec -> [prompt tokens, completion tokens, cents]
        for end in ends:
            if end.prompt_tokens or end.completion_tokens or end.cost_cents:
                found = used.get(end.spec)
                if found is None:
                    found = used[end.spec] = [0, 0, 0.0]
                found[0] += end.prompt_tokens
                found[1] += end.completion_tokens
                found[2] += end.cost_cents
        for (spec, outcome), count in Counter(map(_SPEC_OUTCOME, ends)).items():
            provider, _, model = spec.partition(":")
            self._requests.inc((provider, model, outcome), count)
        self._request_duration.observe_all((), [s for s in map(_SECONDS, ends) if s is not None])
        for spec, (prompt_tokens, completion_tokens, cost_cents) in used.items():
            provider = spec.partition(":")[0]
            if prompt_tokens:
                self._tokens.inc((provider, "input"), prompt_tokens)
            if completion_tokens:
                self._tokens.inc((provider, "output"), completion_tokens)
            if cost_cents:
                self._cost.inc((provider,), cost_cents)

    def _scraped(self) -> None:
        self.before_scrape()
        self.fold()

    def fold(self) -> None:
        """Count the provider calls noted since the last time, a batch at a time."""
        calls, self._noted, self._calls = self._calls, 0, {}
        for provider, seconds in calls.items():
            self._provider_call.observe_all((provider,), seconds)

    def cancelled(self, reason: str) -> None:
        self._cancellations.inc((reason,))

    def provider_call(self, provider: str, seconds: float) -> None:
        found = self._calls.get(provider)
        if found is None:
            found = self._calls[provider] = []
        found.append(seconds)
        self._noted += 1
        if self._noted >= MAX_PENDING:
            self.fold()

    def first_chunk(self, provider: str, seconds: float) -> None:
        self._first_chunk.observe((provider,), seconds)

    def rate_limited(self, provider: str, limit: str) -> None:
        self._rate_limited.inc((provider, limit))

    def transition(self, provider: str, to: str) -> None:
        self._transitions.inc((provider, to))

    def render(self) -> bytes:
        return bytes(prometheus_client.generate_latest(self.registry))

    def asgi_app(self) -> Any:
        """``GET /metrics`` as prometheus_client's own ASGI app (content negotiation, gzip)."""
        return prometheus_client.make_asgi_app(self.registry)


class UncountedMetrics(Metrics):
    """``[server] metrics = false``: the per-request series are not kept (the scrape-time ones still are)."""

    counting = False

    def count_ends(self, ends: list[RequestEnd]) -> None:
        pass

    def provider_call(self, provider: str, seconds: float) -> None:
        pass

    def first_chunk(self, provider: str, seconds: float) -> None:
        pass


# ---- HTTP: /metrics, /healthz, /readyz -----------------------------------------------------------

def ready(snap: InstanceSnapshot) -> bool:
    return snap.nats_connected and not snap.draining and any(p.status.available for p in snap.providers.values())


def http_answer(path: str, snapshot: Snapshot, metrics: Metrics) -> tuple[int, str, bytes]:
    if path == "/metrics":
        return 200, prometheus_client.CONTENT_TYPE_LATEST, metrics.render()
    if path in ("/healthz", "/health"):  # /health: the predecessor's path
        return 200, "application/json", encode(health_document(snapshot()))
    if path == "/readyz":
        ok = ready(snapshot())
        return (200 if ok else 503), "application/json", encode({"ready": ok})
    return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"


Answer = Callable[[str], tuple[int, str, bytes]]


async def serve_http(answer: Answer, host: str, port: int,
                     *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """The three operations endpoints alone, on ``httpapi.serve`` (hypercorn).

    For callers without a ``Backend`` for ``/v1/*``; the service builds its own ``httpapi.App``."""
    from .httpapi import App, serve  # here: importing ops must not load the HTTP server

    await serve(App(None, documents=answer), host, port, task_status=task_status)
