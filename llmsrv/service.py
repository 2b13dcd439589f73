"""The NATS service: subscriptions -> admission -> one task and one cancel scope per request -> one reply.

Theory of operation
-------------------
Admission happens in the subscription callback, synchronously, before anything is queued: a
draining instance answers ``SHUTTING_DOWN`` and an instance at ``max_inflight`` answers
``OVERLOADED`` at once, so nothing is ever dropped silently. An admitted request goes to the
worker pool (``workers.py``): each in-flight request has a task of its own.

Each request's cancel scope has the request's deadline. ``llm.cancel`` cancels the scope of the
matching correlation id; shutdown cancels all of them after the drain grace. The scope records
why it was cancelled, which decides the error: ``CANCELLED``, ``SHUTTING_DOWN`` or ``TIMEOUT``.
The pipeline (``pipeline.py``: route, guard, attempts) runs inside that scope, so the provider
call is really stopped, not abandoned. ``_serve`` is the one per-request boundary: whatever
happens, the request gets exactly one reply (its error code, else ``INTERNAL_ERROR``).

Replies leave through the bus's publish pump (no asyncio crossing per message).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping

import msgspec
import trio

from . import errors, messages
from .admission import QueueDelay
from .bus import Bus, Handler, Incoming
from .config import Config
from .messages import LLMRequest, LLMResponse, encode
from .ops import (
    InstanceSnapshot,
    Metrics,
    ServiceStats,
    health_document,
    http_answer,
    micro_subscriptions,
    serve_http,
    status_document,
)
from .pipeline import Pipeline
from .providers import Provider
from .providers.registry import build_providers
from .streaming import Streamer
from .workers import WorkerPool

log = logging.getLogger("llmsrv.service")

STREAM_CHUNK = {"Llm-Stream": "chunk"}
STREAM_END = {"Llm-Stream": "end"}
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

    def on_ping(self, msg: Incoming) -> None:
        self.delay.received(trio.current_time())
        self._back.set()

    async def run(self) -> None:
        """One ping out at a time, every ``PING_INTERVAL_S`` once the last is back."""
        while True:
            self._back = trio.Event()
            self.delay.sent(trio.current_time())
            self.bus.publish_nowait(self.subject, b"")
            with trio.move_on_after(PING_RESEND_S):
                await self._back.wait()
                await trio.sleep(PING_INTERVAL_S)


class Service:
    def __init__(self, cfg: Config, bus: Bus, providers: Mapping[str, Provider] | None = None,
                 instance_id: str | None = None) -> None:
        self.cfg = cfg
        self.bus = bus
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        p = cfg.nats.subject_prefix
        self.subject_request, self.subject_cancel = f"{p}.request", f"{p}.cancel"
        self.subject_response, self.subject_error = f"{p}.response", f"{p}.error"
        self.metrics = Metrics()
        self.metrics.watch(self.statistics, lambda: bus.dropped)
        self.pipeline = Pipeline(cfg, providers or build_providers(cfg), self.metrics)
        self.providers = self.pipeline.providers
        server = cfg.server
        self._pool: WorkerPool[tuple[Incoming, float]] = WorkerPool(
            self._work, max_workers=server.max_inflight, idle_s=server.worker_idle_s,
            min_idle=server.min_idle_workers)
        self._live: dict[str, list[_Live]] = {}
        # a subject of its own under the prefix (NATS permissions: docs/nats-permissions.conf)
        self._front = _FrontQueue(bus, f"{p}.ping.{self.instance_id}", server.max_queue_ms / 1000)
        self._inflight = self._requests = self._errors = self._processing_ns = 0
        self._last_error = ""
        self._draining = False
        self._drained = trio.Event()
        self._stop = trio.Event()
        self.stopped = trio.Event()  # set when run() has drained and returned
        self.started_wall = time.time()
        self._started = time.monotonic()
        self.http_port: int | None = None  # the bound port of /metrics, /healthz, /readyz

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown()``; then drain (CONTRACT section 8) and return."""
        try:
            async with trio.open_nursery() as nursery:
                await self._serve_until_stopped(nursery, task_status)
                nursery.cancel_scope.cancel()
        finally:
            self.stopped.set()

    async def _serve_until_stopped(self, nursery: trio.Nursery, task_status: trio.TaskStatus[Service]) -> None:
        bus, queue, p = self.bus, self.cfg.nats.queue, self.cfg.nats.subject_prefix
        await nursery.start(self._pool.run)
        request_sub = await bus.subscribe(self.subject_request, self._guarded(self._on_request), queue,
                                          on_drop=self._on_dropped)
        others: list[tuple[str, Handler, str]] = [
            (self.subject_cancel, self._on_cancel, ""),
            (f"{p}.health", self._answer_with(lambda: health_document(self.statistics())), queue),
            # admin commands reach every instance (no queue group); NATS permissions guard them
            (f"{p}.admin.status", self._answer_with(lambda: status_document(self.statistics())), ""),
            (f"{p}.admin.breaker.set", self._on_breaker_set, ""),
            (self._front.subject, self._front.on_ping, ""),
            *((subject, handler, "") for subject, handler in micro_subscriptions(self.statistics, bus.publish_nowait)),
        ]
        other_subs = [await bus.subscribe(subject, self._guarded(handler), group) for subject, handler, group in others]
        await bus.flush()  # subscriptions are live on the server once this returns
        for name, provider in self.providers.items():
            status = provider.status()
            log.info("provider %s: %s%s", name, status.state, f" ({status.reason})" if status.reason else "")
        nursery.start_soon(self.pipeline.share_breakers)
        nursery.start_soon(self._front.run)
        server = self.cfg.server
        if server.http_port:
            answer = lambda path: http_answer(path, self.statistics, self.metrics)  # noqa: E731
            self.http_port = await nursery.start(serve_http, answer, server.http_host, server.http_port)
            log.info("metrics and health on http://%s:%d/metrics", server.http_host, self.http_port)
        log.info("serving %s (queue %s), instance %s", self.subject_request, queue, self.instance_id)
        task_status.started(self)
        await self._stop.wait()

        log.info("draining: %d in flight, grace %.1fs", self._inflight, server.drain_grace_s)
        self._draining = True
        await bus.unsubscribe(request_sub)
        if self._inflight == 0:
            self._drained.set()
        with trio.move_on_after(server.drain_grace_s):
            await self._drained.wait()
        for lives in list(self._live.values()):
            for live in lives:
                live.cancel("shutdown")
        with trio.move_on_after(5):
            await self._drained.wait()
        for sub in other_subs:
            await bus.unsubscribe(sub)
        await bus.flush()
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
                                round(self._front.delay.delay(trio.current_time()) * 1000, 1))
        return InstanceSnapshot(self.instance_id, self.started_wall, time.monotonic() - self._started,
                                self._draining, self.bus.is_connected, self.subject_request, self.cfg.nats.queue,
                                counters, self.pipeline.statistics())

    # ---- admission (runs in the nats-py callback: synchronous, never blocks) ---------------

    def _guarded(self, handler: Handler) -> Handler:
        """The boundary of a subscription: a handler's failure is logged and answered, never raised."""
        def guarded(msg: Incoming) -> None:
            try:
                handler(msg)
            except Exception:
                log.exception("internal error handling a message on %s", str(msg.subject)[:200])
                if msg.reply:
                    self._reply_error(msg.reply, errors.InternalError("internal error; see server log"),
                                      self._peek(msg), stream=False)

        return guarded

    def _on_request(self, msg: Incoming) -> None:
        if self._draining:
            self._reject(msg, errors.ShuttingDown("instance is draining; retry on another instance"))
        elif self._inflight >= self.cfg.server.max_inflight:
            self._reject(msg, errors.Overloaded(
                f"instance at max_inflight={self.cfg.server.max_inflight}; retry later",
                retry_after_ms=self._overload_retry_ms()))
        elif not self._front.delay.admits(now := trio.current_time()):
            self._reject(msg, errors.Overloaded(
                f"requests wait {round(self._front.delay.delay(now) * 1000)} ms in front of this instance "
                f"(max_queue_ms={self.cfg.server.max_queue_ms}): shedding load; retry later",
                retry_after_ms=self._overload_retry_ms()))
        else:
            self._inflight += 1
            self._pool.submit((msg, trio.current_time()))

    def _reject(self, msg: Incoming, exc: errors.LlmsrvError) -> None:
        self._requests += 1
        self.metrics.request("", "", exc.error_code.lower(), None)
        self._reply_error(msg.reply, exc, self._peek(msg), stream=False)

    def _on_dropped(self, reply: str) -> None:
        """nats-py dropped a request (its pending limit): the body is gone, the reply subject is not."""
        self._requests += 1
        self.metrics.request("", "", "overloaded", None)
        self._reply_error(reply, errors.Overloaded(
            "dropped by the NATS client: more requests waiting than nats.pending_msgs_limit/pending_bytes_limit",
            retry_after_ms=self._overload_retry_ms()), "", stream=False)

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
        for live in self._live.get(cid, ()):
            live.cancel("client")

    def _answer_with(self, document: Callable[[], object]) -> Handler:
        def handler(msg: Incoming) -> None:
            if msg.reply:
                self.bus.publish_nowait(msg.reply, encode(document()))

        return handler

    def _on_breaker_set(self, msg: Incoming) -> None:
        try:
            command = messages.decode_breaker_set(msg.data)
            guard = self.pipeline.tune(command.provider, command.threshold, command.ttl_s)
        except errors.LlmsrvError as exc:
            if msg.reply:
                self.bus.publish_nowait(msg.reply, messages.error_body(exc, ""), messages.error_headers(exc))
            return
        if msg.reply:
            self.bus.publish_nowait(msg.reply, encode({
                "instance_id": self.instance_id, "provider": command.provider,
                "threshold": guard.breaker.threshold, "ttl_s": guard.breaker.ttl_s}))

    # ---- one request -----------------------------------------------------------------------

    async def _work(self, item: tuple[Incoming, float]) -> None:
        started = time.perf_counter_ns()
        try:
            await self._serve(*item)
        except Exception:  # the boundary in _serve failed to answer
            log.exception("could not answer a request")
        finally:
            self._processing_ns += time.perf_counter_ns() - started
            self._inflight -= 1
            if self._draining and self._inflight == 0:
                self._drained.set()

    async def _serve(self, msg: Incoming, admitted: float) -> None:
        """Serve one request to its one reply: the per-request boundary (nothing escapes it)."""
        received = trio.current_time()
        self._requests += 1
        server = self.cfg.server
        cid, stream = "", False
        try:
            if received - admitted > server.max_queue_ms / 1000:
                raise errors.Overloaded(
                    f"waited {round((received - admitted) * 1000)} ms to start, over max_queue_ms="
                    f"{server.max_queue_ms}; retry later", retry_after_ms=self._overload_retry_ms())
            if len(msg.data) > server.max_request_bytes:
                raise errors.PayloadTooLarge(
                    f"body is {len(msg.data)} bytes; the limit is {server.max_request_bytes}")
            request = messages.decode_request(msg.data, server.max_json_depth)
            headers = msg.headers or {}
            timeout_ms = min(request.timeout_ms or messages.header_int(headers, "Llm-Timeout-Ms", 1, 600000)
                             or server.default_timeout_ms, server.max_timeout_ms)
            cid = request.correlation_id or messages.header_correlation_id(headers) or messages.new_correlation_id()
            stream = request.stream and bool(msg.reply)
            live = _Live(received + timeout_ms / 1000)  # llm.cancel, shutdown and the deadline reach it
            lives = self._live.setdefault(cid, [])
            lives.append(live)
            try:
                with live.scope:
                    response = await self._answer(request, cid, msg.reply if stream else None)
                if live.scope.cancelled_caught:
                    self.metrics.cancelled(live.reason or "deadline")
                    raise live.error(timeout_ms)
            finally:
                lives.remove(live)
                if not lives:
                    del self._live[cid]
            end = STREAM_END if stream else None
            self._reply(msg.reply, self.subject_response, self._fit(response, end), end)
            provider, _, model = response.model.partition(":")
            self.metrics.request(provider, model, "ok", trio.current_time() - received)
        except errors.LlmsrvError as exc:
            last = exc.attempts[-1] if exc.attempts else None
            self._fail(msg, exc, cid, stream, received, last.provider if last else "", last.model if last else "")
        except Exception:
            log.exception("internal error serving request %s", cid or "(not decoded)")
            self._fail(msg, errors.InternalError("internal error; see server log"), cid, stream, received)

    async def _answer(self, request: LLMRequest, cid: str, stream_to: str | None) -> LLMResponse:
        if stream_to is None:
            return await self.pipeline.answer(request, cid)

        def publish(chunk: bytes) -> None:
            self.bus.publish_nowait(stream_to, chunk, STREAM_CHUNK)

        streamer = Streamer(publish, cid, self.cfg.server.stream_flush_ms / 1000,
                            # a chunk's fields take < 200 bytes; a character at most 6 (\u00XX)
                            max_chunk_chars=max(1, (self._max_reply_bytes(STREAM_CHUNK) - 200) // 6))
        return await streamer.around(lambda: self.pipeline.answer(request, cid, streamer.on_delta))

    def _fail(self, msg: Incoming, exc: errors.LlmsrvError, cid: str, stream: bool, received: float,
              provider: str = "", model: str = "") -> None:
        self._reply_error(msg.reply, exc, cid or self._peek(msg), stream)
        self.metrics.request(provider, model, exc.error_code.lower(), trio.current_time() - received)

    # ---- replies ---------------------------------------------------------------------------

    def _max_reply_bytes(self, headers: Mapping[str, str] | None) -> int:
        """What a body may take of the server's max_payload beside these headers (NATS/1.0 block)."""
        return self.bus.max_payload - (12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) if headers else 0)

    def _fit(self, response: LLMResponse, stream_end: dict[str, str] | None) -> bytes:
        """The reply's body. Over the server's max_payload, a stream's final leaves out the text its
        chunks carried; anything else is ``RESPONSE_TOO_LARGE``."""
        body = encode(response)
        if len(body) <= self._max_reply_bytes(stream_end):
            return body
        if stream_end is not None:
            body = encode(msgspec.structs.replace(response, text=""))
            if len(body) <= self._max_reply_bytes(stream_end):
                return body
        raise errors.ResponseTooLarge(
            f"the reply would be over the NATS server's max_payload ({self.bus.max_payload} bytes)"
            + ("" if stream_end else "; ask with \"stream\": true to receive the text in chunks"))

    def _peek(self, msg: Incoming) -> str:
        return messages.peek_correlation_id(msg.data, msg.headers, self.cfg.server.max_json_depth)

    def _reply(self, reply: str, fallback: str, body: bytes, headers: dict[str, str] | None) -> None:
        self.bus.publish_nowait(reply or fallback, body, headers)

    def _reply_error(self, reply: str, exc: errors.LlmsrvError, cid: str, stream: bool) -> None:
        self._errors += 1
        self._last_error = exc.error_code
        headers = messages.error_headers(exc)
        if stream:
            headers.update(STREAM_END)
        self._reply(reply, self.subject_error, messages.error_body(exc, cid), headers)
