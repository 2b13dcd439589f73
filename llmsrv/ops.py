"""Operations: health, readiness, Prometheus metrics (HTTP), NATS micro-service discovery.

``$SRV.PING|INFO|STATS`` (and their ``.llmsrv`` / ``.llmsrv.<id>`` forms) are answered here by
hand, in the JSON shapes of the NATS micro spec (v1): nats-py's ``nats.micro`` would serve our
endpoint one request at a time (LIBRARY-NOTES), so it is not used.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import h11
import msgspec
import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .bus import Handler, Incoming
from .messages import encode
from .resilience import STATE_CODE

if TYPE_CHECKING:
    from .service import Service

SERVICE_NAME = "llmsrv"


def health_document(service: Service) -> dict[str, Any]:
    providers = {}
    for name, provider in service.providers.items():
        status = provider.status()
        guard = service.guards.get(name)
        providers[name] = {"available": status.available, "state": status.state, "reason": status.reason,
                           "breaker": guard.breaker.state if guard else "closed",
                           # per-model breakers (breaker_scope = "model") that are not closed
                           "models": {m: b.state for m, b in guard.models.items() if b.state != "closed"}
                           if guard else {}}
    stats = service.statistics()
    return {
        "status": "draining" if service.draining else "ok",
        "uptime_s": round(service.uptime_s, 3),
        "nats": "connected" if service.bus.is_connected else "disconnected",
        "providers": providers,
        "instance_id": service.instance_id,
        "version": __version__,
        "inflight": stats.inflight,
    }


def status_document(service: Service) -> dict[str, Any]:
    """``llm.admin.status``: the health document plus breakers, limits and counters."""
    doc = health_document(service)
    doc["breakers"] = {name: msgspec.to_builtins(guard.statistics()) for name, guard in service.guards.items()}
    doc["stats"] = msgspec.to_builtins(service.statistics())
    return doc


def _identity(service: Service, kind: str) -> dict[str, Any]:
    return {"type": f"io.nats.micro.v1.{kind}_response", "name": SERVICE_NAME,
            "id": service.instance_id, "version": __version__, "metadata": {}}


def _endpoint(service: Service) -> dict[str, Any]:
    return {"name": "request", "subject": service.subject_request,
            "queue_group": service.cfg.nats.queue, "metadata": {}}


def _info(service: Service) -> dict[str, Any]:
    return {**_identity(service, "info"), "description": "LLM requests over NATS",
            "endpoints": [_endpoint(service)]}


def _stats(service: Service) -> dict[str, Any]:
    s = service.statistics()
    started = _dt.datetime.fromtimestamp(service.started_wall, _dt.UTC)
    return {**_identity(service, "stats"), "started": started.isoformat().replace("+00:00", "Z"),
            "endpoints": [{**_endpoint(service), "num_requests": s.requests, "num_errors": s.errors,
                           "last_error": s.last_error, "processing_time": s.processing_ns,
                           "average_processing_time": s.processing_ns // max(1, s.requests)}]}


def micro_subscriptions(service: Service) -> Iterator[tuple[str, Handler]]:
    for verb, build in (("PING", lambda: _identity(service, "ping")),
                        ("INFO", lambda: _info(service)), ("STATS", lambda: _stats(service))):
        def handler(msg: Incoming, build: Any = build) -> None:
            if msg.reply:
                service.bus.publish_nowait(msg.reply, encode(build()))

        for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{SERVICE_NAME}",
                        f"$SRV.{verb}.{SERVICE_NAME}.{service.instance_id}"):
            yield subject, handler


# ---- metrics -----------------------------------------------------------------------------------

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double the output for nothing
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _BreakerStates(Collector):
    """``llmsrv_breaker_state{provider}`` read from the breakers at scrape time."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("llmsrv_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                                   labels=["provider"])
        models = GaugeMetricFamily("llmsrv_model_breaker_state",
                                   "Per-model breaker state (breaker_scope = model): 0 closed, 1 half-open, 2 open",
                                   labels=["provider", "model"])
        for name, guard in self._service.guards.items():
            family.add_metric([name], STATE_CODE[guard.breaker.state])
            for model, breaker in guard.models.items():
                models.add_metric([name, model], STATE_CODE[breaker.state])
        yield family
        yield models


class _NatsDropped(Collector):
    """``llmsrv_nats_dropped_total{subject}``: messages nats-py dropped as a slow consumer."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("llmsrv_nats_dropped", "Messages the NATS client dropped past a subscription's "
                                     "pending limit (nats.pending_msgs_limit / pending_bytes_limit)",
                                     labels=["subject"])
        for subject, count in self._service.bus.dropped.items():
            family.add_metric([subject], count)
        yield family


class Metrics:
    """The Prometheus metrics of one service (CONTRACT section 6), in a registry of its own."""

    def __init__(self, service: Service) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmsrv_requests", "Requests answered, by provider, model and outcome",
                                ["provider", "model", "outcome"], registry=r)
        self.request_duration = Histogram("llmsrv_request_duration_seconds", "From receipt to final reply",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.provider_call = Histogram("llmsrv_provider_call_duration_seconds", "One provider attempt",
                                       ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_chunk = Histogram("llmsrv_time_to_first_chunk_seconds", "Attempt start to first streamed text",
                                     ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("llmsrv_inflight_requests", "Requests admitted and not yet answered",
              registry=r).set_function(lambda: service.statistics().inflight)
        self.transitions = Counter("llmsrv_breaker_transitions", "Circuit breaker state changes",
                                   ["provider", "to"], registry=r)
        self.rate_limited = Counter("llmsrv_rate_limited", "Attempts refused by a rate limit (ours or upstream)",
                                    ["provider", "limit"], registry=r)
        self.tokens = Counter("llmsrv_tokens", "Tokens used", ["provider", "direction"], registry=r)
        self.cost = Counter("llmsrv_cost_cents", "Cost in US cents, from the price table", ["provider"], registry=r)
        self.cancellations = Counter("llmsrv_cancellations", "Requests cancelled, by reason", ["reason"], registry=r)
        r.register(_BreakerStates(service))
        r.register(_NatsDropped(service))
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: ``labels()`` costs ~3.5 us, a cached child's ``inc`` ~0.6."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def request(self, provider: str, model: str, outcome: str, seconds: float | None) -> None:
        self.child(self.requests, provider, model, outcome).inc()
        if seconds is not None:
            self.request_duration.observe(seconds)

    def usage(self, provider: str, prompt_tokens: int, completion_tokens: int, cost_cents: float) -> None:
        if prompt_tokens:
            self.child(self.tokens, provider, "input").inc(prompt_tokens)
        if completion_tokens:
            self.child(self.tokens, provider, "output").inc(completion_tokens)
        if cost_cents:
            self.child(self.cost, provider).inc(cost_cents)

    def render(self) -> bytes:
        return bytes(prometheus_client.generate_latest(self.registry))


# ---- HTTP: /metrics, /healthz, /readyz -----------------------------------------------------------

def ready(service: Service) -> bool:
    return (service.bus.is_connected and not service.draining
            and any(p.status().available for p in service.providers.values()))


def http_answer(service: Service, path: str) -> tuple[int, str, bytes]:
    if path == "/metrics":
        return 200, prometheus_client.CONTENT_TYPE_LATEST, service.metrics.render()
    if path == "/healthz":
        return 200, "application/json", encode(health_document(service))
    if path == "/readyz":
        ok = ready(service)
        return (200 if ok else 503), "application/json", encode({"ready": ok})
    return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"


async def serve_http(service: Service, host: str, port: int,
                     *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A small HTTP/1.1 responder (h11 on trio sockets) for the three operations endpoints."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(functools.partial(_http_connection, service), listeners)


async def _http_connection(service: Service, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(10):  # one request per connection, read within 10 s
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(16384)))
                    continue
                if not isinstance(event, h11.Request):
                    return
                method, target = event.method.decode(), event.target.decode().partition("?")[0]
                status, ctype, body = (http_answer(service, target) if method in ("GET", "HEAD")
                                       else (405, "text/plain", b"only GET\n"))
                headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=body if method == "GET" else b"")))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return
    finally:
        await stream.aclose()
