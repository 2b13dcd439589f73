"""The NATS service: subscriptions -> admission -> one task and one cancel scope per request -> one reply.

Theory of operation
-------------------
Admission happens in the subscription callback, synchronously, before anything is queued: a
draining instance answers ``SHUTTING_DOWN`` and an instance at ``max_inflight`` answers
``OVERLOADED`` at once, so nothing is ever dropped silently. An admitted request goes to the
worker pool (``workers.py``): each in-flight request has a task of its own. A burst is started a
few requests per scheduling round (the reader keeps admitting meanwhile); one that waited longer
than ``max_queue_ms`` to start, in front of the instance (``admission.py``) and inside it together,
is answered ``OVERLOADED``. While many are in flight the pool defers
CPython's full garbage collections (each would walk every request).

Each request's cancel scope has the request's deadline. ``llm.cancel`` cancels the scope of the
matching correlation id; shutdown cancels all of them after the drain grace. The scope records
why it was cancelled, which decides the error: ``CANCELLED``, ``SHUTTING_DOWN`` or ``TIMEOUT``.
The pipeline (``pipeline.py``: route, guard, attempts) runs inside that scope, so the provider
call is really stopped, not abandoned. ``_serve`` is the one per-request boundary: whatever
happens, the request gets exactly one reply (its error code, else ``INTERNAL_ERROR``).

Replies leave through the bus's publish pump (no asyncio crossing per message). Health, admin and
``$SRV`` discovery are served on a second connection (``control``; ``nats.control_connection``), so a
probe is not read behind thousands of requests waiting on the first; ``llm.cancel`` and the self-ping stay
on the request connection (a cancel must not overtake its request; the ping measures that queue).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import trio

from . import __version__, config, errors, httpapi, messages, openai_wire, tracing, worker_wire
from .admission import QueueDelay
from .bus import Bus, Handler, Incoming
from .config import Config, ServerConfig
from .edges import Decoded, Edge, RequestEdge, WorkerEdge
from .logs import CORRELATION_ID, FLUSH_S, RequestEnds
from .messages import LLMRequest, LLMResponse, encode
from .ops import (
    InstanceSnapshot,
    Metrics,
    ServiceStats,
    UncountedMetrics,
    health_document,
    http_answer,
    micro_subscriptions,
    ready,
    status_document,
)
from .pipeline import Pipeline
from .providers import OnDelta, Provider
from .providers.registry import build_providers
from .streaming import Streamer
from .workers import WorkerPool

__all__ = ["Service"]

log = logging.getLogger("llmsrv.service")

PING_INTERVAL_S = 0.05  # how often the queue in front of the instance is measured (admission.py)
PING_RESEND_S = 2.0  # a ping not back by then may be lost (a reconnect): another goes out


class _Live:
    """One in-flight request: its cancel scope and why it was cancelled, if it was."""

    __slots__ = ("scope", "reason")

    def __init__(self, deadline: float) -> None:
        self.scope = trio.CancelScope(deadline=deadline)
        self.reason: str | None = None  # "client" | "shutdown"; None + cancelled = deadline

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()

    def error(self, timeout_ms: int) -> errors.LlmsrvError:
        if self.reason == "client":
            return errors.Cancelled("cancelled by the client (llm.cancel); the provider call was stopped")
        if self.reason == "shutdown":
            return errors.ShuttingDown("instance shut down before the request finished; retry")
        return errors.Timeout(f"no answer within the {timeout_ms} ms deadline; the provider call was cancelled")


class _FrontQueue:
    """The self-ping that measures how long requests wait in front of the instance (admission.py)."""

    def __init__(self, bus: Bus, subject: str, max_queue_s: float) -> None:
        self.bus, self.subject = bus, subject
        self.delay = QueueDelay(max_queue_s)
        self._back = trio.Event()
        self._seq = b""

    def on_ping(self, msg: Incoming) -> None:
        if msg.data == self._seq:  # an older ping (one that waited out a reconnect) measures nothing now
            self.delay.received(trio.current_time())
            self._back.set()

    def waited(self, now: float) -> float:
        return self.delay.delay(now, self.bus.disconnects)

    async def run(self) -> None:
        """One ping out at a time, every ``PING_INTERVAL_S`` once the last is back. While NATS is down no
        request can arrive; once it is back, a new ping goes out on the new connection at once."""
        seq = 0
        while True:
            if not self.bus.is_connected:
                await trio.sleep(PING_INTERVAL_S)
                continue
            seq += 1
            self._seq, self._back, epoch = str(seq).encode(), trio.Event(), self.bus.disconnects
            self.delay.sent(trio.current_time(), epoch)
            self.bus.publish_nowait(self.subject, self._seq)
            resend_at = trio.current_time() + PING_RESEND_S
            while not self._back.is_set() and self.bus.disconnects == epoch and trio.current_time() < resend_at:
                with trio.move_on_after(PING_INTERVAL_S):
                    await self._back.wait()
            if self._back.is_set():
                await trio.sleep(PING_INTERVAL_S)


class _Generations:
    """Requests in flight by the config generation they started under: what a reload replaced is closed
    once no request that may hold it is left."""

    def __init__(self) -> None:
        self.current = 0
        self._running: dict[int, int] = {}
        self._settled = trio.Event()  # set (and replaced) whenever a retired generation's last request ends

    def enter(self) -> int:
        """A request starts: the generation it runs under (give it back to ``leave``)."""
        generation = self.current
        self._running[generation] = self._running.get(generation, 0) + 1
        return generation

    def leave(self, generation: int) -> None:
        left = self._running[generation] - 1
        if left:
            self._running[generation] = left
            return
        del self._running[generation]
        if generation < self.current:  # a retired generation's last request: retire() may go on
            self._settled.set()
            self._settled = trio.Event()

    async def retire(self, providers: list[Provider]) -> None:
        """Start a new generation; close ``providers`` once the older ones have finished."""
        self.current += 1
        generation = self.current
        while any(g < generation for g in self._running):
            await self._settled.wait()
        for provider in providers:
            with trio.move_on_after(2):
                await provider.aclose()


class _Running:
    """The requests being served, by correlation id, each in its own cancel scope: its deadline,
    ``llm.cancel`` and shutdown reach it through here."""

    def __init__(self, metrics: Metrics) -> None:
        self._live: dict[str, list[_Live]] = {}
        self._metrics = metrics
        self.generations = _Generations()

    async def run(self, cid: str, timeout_ms: int, received: float,
                  answer: Callable[[float], Awaitable[LLMResponse]]) -> LLMResponse:
        """``answer(deadline)`` in the request's cancel scope (whose deadline it is told: trio's effective
        deadline walks every enclosing scope, ~3 us a look)."""
        live = _Live(received + timeout_ms / 1000)
        lives = self._live.setdefault(cid, [])
        lives.append(live)
        generation = self.generations.enter()
        try:
            with live.scope:
                response = await answer(live.scope.deadline)
            if live.scope.cancelled_caught:
                self._metrics.cancelled(live.reason or "deadline")
                raise live.error(timeout_ms)
            return response
        finally:
            self.generations.leave(generation)
            lives.remove(live)
            if not lives:
                del self._live[cid]

    def cancel(self, reason: str, cid: str | None = None) -> None:
        """Cancel the request(s) with correlation id ``cid``, or every one."""
        for lives in [self._live.get(cid, [])] if cid is not None else list(self._live.values()):
            for live in lives:
                live.cancel(reason)


def answer_with(bus: Bus, document: Callable[[], object]) -> Handler:
    """A handler answering requests (those with a reply subject) with ``document()``; others are ignored."""
    def handler(msg: Incoming) -> None:
        if msg.reply:
            bus.publish_nowait(msg.reply, encode(document()))

    return handler


AdminAct = Callable[[Pipeline, str, bytes], Mapping[str, object]]


def admin_command(bus: Bus, pipeline: Pipeline, instance_id: str, act: AdminAct) -> Handler:
    """A handler for an admin command: the answer is ``act(pipeline, instance_id, body)``, or the
    ``LlmsrvError`` it raised. The pipeline is the same object for the process's life (a reload
    reconfigures it in place)."""
    def handler(msg: Incoming) -> None:
        try:
            answer = act(pipeline, instance_id, msg.data)
        except errors.LlmsrvError as exc:
            if msg.reply:
                bus.publish_nowait(msg.reply, messages.error_body(exc, ""), messages.error_headers(exc))
            return
        if msg.reply:
            bus.publish_nowait(msg.reply, encode(answer))

    return handler


def tune_breaker(pipeline: Pipeline, instance_id: str, data: bytes) -> dict[str, object]:
    """``llm.admin.breaker.set``: retune a provider's breakers; the answer is the values now in force."""
    command = messages.decode_breaker_set(data)
    guard = pipeline.tune(command.provider, command.threshold, command.ttl_s)
    return {"instance_id": instance_id, "provider": command.provider,
            "threshold": guard.breaker.threshold, "ttl_s": guard.breaker.ttl_s}


def force_breaker(pipeline: Pipeline, instance_id: str, data: bytes) -> dict[str, object]:
    """``llm.admin.breaker.state``: force a breaker open, closed or reset; the answer is its state now."""
    command = messages.decode_breaker_command(data)
    breaker = pipeline.force(command.provider, command.model, command.action)
    return {"instance_id": instance_id, "provider": command.provider, "model": command.model,
            "action": command.action, "breaker": breaker.statistics()}


def control_subscriptions(control: Bus, p: str, queue: str, snapshot: Callable[[], InstanceSnapshot],
                          pipeline: Pipeline) -> list[tuple[str, Handler, str]]:
    """(subject, handler, queue group) of health, admin and ``$SRV`` discovery, served on ``control``."""
    instance_id = snapshot().instance_id
    return [
        (f"{p}.health", answer_with(control, lambda: health_document(snapshot())), queue),
        # admin commands reach every instance (no queue group); NATS permissions guard them
        (f"{p}.admin.status", answer_with(control, lambda: status_document(snapshot())), ""),
        (f"{p}.admin.breaker.set", admin_command(control, pipeline, instance_id, tune_breaker), ""),
        (f"{p}.admin.breaker.state", admin_command(control, pipeline, instance_id, force_breaker), ""),
        *((subject, handler, "") for subject, handler in micro_subscriptions(snapshot, control.publish_nowait)),
    ]


async def flush_every(interval_s: float, ends: RequestEnds) -> None:
    """The requests ended are counted and their lines written (logs.RequestEnds), and the spans recorded handed to
    OpenTelemetry (tracing.hand_over), every ``interval_s``."""
    while True:
        await trio.sleep(interval_s)
        ends.hand_on()
        await tracing.hand_over()


async def heartbeat(bus: Bus, subject: str, server: ServerConfig, snapshot: Callable[[], InstanceSnapshot]) -> None:
    """The predecessor's heartbeat every ``heartbeat_s`` on ``<prefix>.health`` (no reply subject: instances
    ignore it, monitoring listens)."""
    while True:
        snap = snapshot()
        status = "draining" if snap.draining else "healthy" if ready(snap) else "degraded"
        beat = worker_wire.Heartbeat(f"llmsrv-{snap.instance_id}", messages.timestamp(), status,
                                     list(server.worker_models), snap.instance_id, __version__, snap.counters.inflight)
        bus.publish_nowait(subject, worker_wire.encode_heartbeat(beat))
        await trio.sleep(server.heartbeat_s)


class Service:
    def __init__(self, cfg: Config, bus: Bus, providers: Mapping[str, Provider] | None = None,
                 instance_id: str | None = None, control: Bus | None = None) -> None:
        self.cfg = cfg
        self.bus = bus
        self.control = control = control or bus  # health, admin, $SRV: not queued behind requests (bus.py)
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        p = cfg.nats.subject_prefix
        self.subject_request, self.subject_cancel = f"{p}.request", f"{p}.cancel"
        self.subject_response, self.subject_error = f"{p}.response", f"{p}.error"
        self.metrics = Metrics() if cfg.server.metrics else UncountedMetrics()
        self._ends = RequestEnds(log, self.metrics.count_ends if self.metrics.counting else None)
        self.metrics.watch(self.statistics, lambda: {**control.dropped, **bus.dropped})
        self.metrics.before_scrape = self._ends.hand_on
        self.pipeline = Pipeline(cfg, providers or build_providers(cfg), self.metrics)
        self.providers = self.pipeline.providers
        server = cfg.server
        self._request_edge, self._worker_edge = RequestEdge(bus, cfg), WorkerEdge(bus, cfg)
        self._pool: WorkerPool[tuple[Incoming, float, Edge]] = WorkerPool(
            self._work, max_workers=server.max_inflight, idle_s=server.worker_idle_s,
            min_idle=server.min_idle_workers, defer_full_gc=True)
        self._running = _Running(self.metrics)
        # a subject of its own under the prefix (NATS permissions: docs/nats-permissions.conf)
        self._front = _FrontQueue(bus, f"{p}.ping.{self.instance_id}", server.max_queue_ms / 1000)
        self._inflight = self._requests = self._errors = self._processing_ns = 0
        self._tasks: trio.Nursery | None = None
        self._last_error = ""
        self._draining = False
        self._drained = trio.Event()
        self._stop = trio.Event()
        self.stopped = trio.Event()  # set when run() has drained and returned
        self.started_wall = time.time()
        self._started = time.monotonic()
        self.http_port: int | None = None  # the bound port of /v1, /metrics, /healthz, /readyz
        self._http_api = ""

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown()``; then drain (CONTRACT section 8) and return."""
        try:
            async with trio.open_nursery() as nursery:
                await self._serve_until_stopped(nursery, task_status)
                nursery.cancel_scope.cancel()
        finally:
            self._ends.hand_on()
            self.stopped.set()

    async def _serve_until_stopped(self, nursery: trio.Nursery, task_status: trio.TaskStatus[Service]) -> None:
        bus, control, queue, p = self.bus, self.control, self.cfg.nats.queue, self.cfg.nats.subject_prefix
        self._tasks = nursery
        await nursery.start(self._pool.run)
        request_sub = await bus.subscribe(self.subject_request, self._guarded(self._on_message(self._request_edge)),
                                          queue, on_drop=self._on_dropped)
        worker_sub = await bus.subscribe(f"{p}.req.>", self._guarded(self._on_message(self._worker_edge),
                                                                     self._worker_edge), queue)
        # a cancel travels behind the request it cancels (one connection keeps their order), the ping measures it
        others = [(bus, self.subject_cancel, self._on_cancel, ""), (bus, self._front.subject, self._front.on_ping, ""),
                  *((control, *on) for on in control_subscriptions(control, p, queue, self.statistics, self.pipeline))]
        other_subs = [(b, await b.subscribe(subject, self._guarded(handler), group))
                      for b, subject, handler, group in others]
        await bus.flush()  # subscriptions are live on the server once this returns
        await control.flush()
        for name, provider in self.providers.items():
            status = provider.status()
            log.info("provider %s: %s%s", name, status.state, f" ({status.reason})" if status.reason else "")
        nursery.start_soon(self.pipeline.share_breakers)
        nursery.start_soon(self._front.run)
        nursery.start_soon(flush_every, FLUSH_S, self._ends)
        nursery.start_soon(self.metrics.loop_lag.run)
        server = self.cfg.server
        if server.heartbeat_s:
            nursery.start_soon(heartbeat, control, f"{p}.health", server, self.statistics)
        if server.http_port:
            app = httpapi.App(self, documents=lambda path: http_answer(path, self.statistics, self.metrics),
                              metrics=self.metrics.asgi_app(), server=server, api_keys=httpapi.http_api_keys(server),
                              rejected=lambda outcome, code: self._ends.note("", "", outcome, code, None))
            self.http_port = await nursery.start(httpapi.serve, app, server.http_host, server.http_port)
            self._http_api = f"http://{server.http_host}:{self.http_port}/v1"
            log.info("OpenAI-compatible API, metrics and health on http://%s:%d (/v1, /metrics, /healthz)",
                     server.http_host, self.http_port)
        log.info("serving %s (queue %s), instance %s", self.subject_request, queue, self.instance_id)
        task_status.started(self)
        await self._stop.wait()

        log.info("draining: %d in flight, grace %.1fs", self._inflight, server.drain_grace_s)
        self._draining = True
        await bus.unsubscribe(request_sub)
        await bus.unsubscribe(worker_sub)
        if self._inflight == 0:
            self._drained.set()
        with trio.move_on_after(server.drain_grace_s):
            await self._drained.wait()
        self._running.cancel("shutdown")
        with trio.move_on_after(5):
            await self._drained.wait()
        for b, sub in other_subs:
            await b.unsubscribe(sub)
        await bus.flush()
        await control.flush()
        await self.pipeline.aclose()
        log.info("drained")

    def shutdown(self) -> None:
        """Begin the graceful drain (idempotent; safe to call from a signal-handling task)."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def statistics(self) -> InstanceSnapshot:
        """This instance, its counters and its providers, frozen (no I/O)."""
        counters = ServiceStats(self._inflight, self._pool.workers, self._pool.idle, self._requests, self._errors,
                                self._processing_ns, self._last_error,
                                round(self._front.waited(trio.current_time()) * 1000, 1),
                                self.metrics.loop_lag.recent_ms())
        connected = self.bus.is_connected and self.control.is_connected
        return InstanceSnapshot(self.instance_id, self.started_wall, time.monotonic() - self._started, self._draining,
                                connected, self.subject_request, self.cfg.nats.queue,
                                counters, self.pipeline.statistics(), self._http_api)

    # ---- live reload (SIGHUP) -----------------------------------------------------------------

    def reload(self, new: Config) -> list[str]:
        """Apply a re-read config to the requests that start from now on (CONTRACT section 6, and
        ``Pipeline.reconfigure``); ``config.RESTART_ONLY`` keys wait for a restart. Returns the keys applied."""
        new, applied, kept = config.reloadable(self.cfg, new)
        if kept:
            log.warning("config reload: %s changed; these take effect at the next restart", ", ".join(kept))
        self.cfg = new
        retired = self.pipeline.reconfigure(new)
        self.providers = self.pipeline.providers
        assert self._tasks is not None, "reload() of a service that is not running"
        self._tasks.start_soon(self._running.generations.retire, retired)
        log.warning("config reloaded: %s", ", ".join(applied) if applied else "nothing changed that applies live")
        return applied

    # ---- admission (runs in the nats-py callback: synchronous, never blocks) ---------------

    def _guarded(self, handler: Handler, edge: Edge | None = None) -> Handler:
        """The boundary of a subscription: a handler's failure is logged and answered, never raised."""
        def guarded(msg: Incoming) -> None:
            try:
                handler(msg)
            except Exception:
                log.exception("internal error handling a message on %s", str(msg.subject)[:200])
                if msg.reply or edge is not None:
                    self._fail(edge or self._request_edge, msg, None, errors.InternalError(
                        "internal error; see server log"), None)

        return guarded

    def _refusal(self, waited: float) -> errors.LlmsrvError | None:
        """Why a request that waited ``waited`` s in front of the instance is refused (CONTRACT 3), or None."""
        server = self.cfg.server
        if self._draining:
            return errors.ShuttingDown("instance is draining; retry on another instance")
        if self._inflight >= server.max_inflight:
            return errors.Overloaded(f"instance at max_inflight={server.max_inflight}; retry later",
                                     retry_after_ms=self._overload_retry_ms())
        if waited > self._front.delay.limit_s:
            return errors.Overloaded(
                f"requests wait {round(waited * 1000)} ms in front of this instance "
                f"(max_queue_ms={server.max_queue_ms}): shedding load; retry later",
                retry_after_ms=self._overload_retry_ms())
        return None

    def _on_message(self, edge: Edge) -> Handler:
        def admit(msg: Incoming) -> None:
            if (refusal := self._refusal(waited := self._front.waited(now := trio.current_time()))) is not None:
                self._requests += 1
                self._fail(edge, msg, None, refusal, None)
            else:
                self._inflight += 1
                self._pool.submit((msg, now - waited, edge))

        return admit

    def _on_dropped(self, reply: str) -> None:
        """nats-py dropped a request (its pending limit): the body is gone, the reply subject is not."""
        self._requests += 1
        self._fail(self._request_edge, _Reply(reply), None, errors.Overloaded(
            "dropped by the NATS client: more requests waiting than nats.pending_msgs_limit/pending_bytes_limit",
            retry_after_ms=self._overload_retry_ms()), None)

    def _overload_retry_ms(self) -> int:
        """What an ``OVERLOADED`` caller is told to wait: about one mean request time (50 ms..5 s)."""
        mean_ms = self._processing_ns / max(1, self._requests) / 1e6
        return int(min(5000, max(50, mean_ms)))

    def _on_cancel(self, msg: Incoming) -> None:
        try:
            cid = messages.decode_cancel(msg.data).correlation_id
        except errors.RequestError as exc:
            log.info("ignored malformed cancel: %s", exc.message)
            return
        self._running.cancel("client", cid)

    # ---- one request -----------------------------------------------------------------------

    async def _work(self, item: tuple[Incoming, float, Edge]) -> None:
        started = time.perf_counter_ns()
        try:
            await self._serve(*item)
        except Exception:  # the boundary in _serve failed to answer
            log.exception("could not answer a request")
        finally:
            self._processing_ns += time.perf_counter_ns() - started
            self._done()

    def _done(self) -> None:
        self._inflight -= 1
        if self._draining and self._inflight == 0:
            self._drained.set()

    async def _serve(self, msg: Incoming, arrived: float, edge: Edge) -> None:
        """One request to its one reply: the per-request boundary. ``arrived``: when it reached nats-server."""
        received = trio.current_time()
        self._requests += 1
        decoded: Decoded | None = None
        streamer: Streamer | None = None
        try:
            if received - arrived > self.cfg.server.max_queue_ms / 1000:
                raise errors.Overloaded(
                    f"waited {round((received - arrived) * 1000)} ms to start (in front and inside), over max_queue_ms="
                    f"{self.cfg.server.max_queue_ms}; retry later", retry_after_ms=self._overload_retry_ms())
            decoded = edge.decode(msg)
            request, cid, trace = decoded.request, decoded.correlation_id, msg.headers
            CORRELATION_ID.set(cid)  # this task's context: its log lines carry it (logs.py)
            if decoded.stream:
                streamer = edge.streamer(msg, decoded)
                sink = streamer
                response = await self._running.run(cid, decoded.timeout_ms, received, lambda deadline: sink.around(
                    lambda: self.pipeline.answer(request, cid, sink.on_delta, trace, deadline)))
            else:
                response = await self._running.run(cid, decoded.timeout_ms, received,
                                           lambda deadline: self.pipeline.answer(request, cid, None, trace, deadline))
            edge.reply(msg, decoded, response, streamer)
            self._answered(cid, response, received)
        except errors.LlmsrvError as exc:
            self._fail(edge, msg, decoded, exc, streamer, received)
        except Exception:
            log.exception("internal error serving request %s", decoded.correlation_id if decoded else "(not decoded)")
            self._fail(edge, msg, decoded, errors.InternalError("internal error; see server log"), streamer, received)
        finally:
            CORRELATION_ID.set(None)

    def _answered(self, cid: str, response: LLMResponse, received: float) -> None:
        """A request's answer noted for the metrics and its one info line (CONTRACT section 6)."""
        usage = response.usage
        self._ends.note(cid, response.model, "ok", None, trio.current_time() - received,
                        usage.prompt_tokens, usage.completion_tokens, response.cost_cents)

    def _fail(self, edge: Edge, msg: Incoming, decoded: Decoded | None, exc: errors.LlmsrvError,
              streamer: Streamer | None, received: float | None = None) -> None:
        cid = decoded.correlation_id if decoded is not None else edge.peek(msg)
        edge.error(msg, decoded, exc, cid, streamer)
        self._failed(cid, exc, received)

    def _failed(self, cid: str, exc: errors.LlmsrvError, received: float | None) -> None:
        self._errors += 1
        self._last_error = exc.error_code
        last = exc.attempts[-1] if exc.attempts else None
        self._ends.note(cid, f"{last.provider}:{last.model}" if last else "", exc.error_code.lower(), exc.error_code,
                        None if received is None else trio.current_time() - received)

    # ---- the OpenAI-compatible HTTP API (httpapi.Backend) ----------------------------------

    async def answer(self, request: LLMRequest, correlation_id: str, on_delta: OnDelta | None,
                     trace: Mapping[str, str] | None = None) -> LLMResponse:
        """One HTTP request, admitted, counted and cancellable like a NATS one (its errors raised)."""
        received = trio.current_time()
        refusal = self._refusal(self._front.waited(received))
        self._requests += 1
        CORRELATION_ID.set(correlation_id)  # the HTTP request's own task
        try:
            if refusal is not None:
                raise refusal
            self._inflight += 1
            try:
                server = self.cfg.server
                timeout_ms = min(request.timeout_ms or server.default_timeout_ms, server.max_timeout_ms)
                response = await self._running.run(correlation_id, timeout_ms, received, lambda deadline:
                                                   self.pipeline.answer(request, correlation_id, on_delta, trace,
                                                                        deadline))
            finally:
                self._done()
        except errors.LlmsrvError as exc:
            self._failed(correlation_id, exc, received)
            raise
        except trio.Cancelled:
            self.metrics.cancelled("client")  # the HTTP client went away
            raise
        self._answered(correlation_id, response, received)
        return response

    def models(self) -> list[tuple[str, str]]:
        return openai_wire.configured_models(self.cfg)


class _Reply:
    """A message of which only the reply subject is left (nats-py dropped the rest)."""

    def __init__(self, reply: str) -> None:
        self.subject, self.reply, self.data = "", reply, b""
        self.headers: dict[str, str] | None = None
