"""The service: NATS subscriptions -> one task and one cancel scope per request -> one reply.

Theory of operation
-------------------
Admission happens in the subscription callback, synchronously, before anything is queued: a
draining instance answers ``SHUTTING_DOWN`` and an instance at ``max_inflight`` answers
``OVERLOADED`` at once, so nothing is ever dropped silently.

Workers are an elastic pool of trio tasks: a worker takes one message and serves it to the end,
so each in-flight request has a task of its own and a cancel scope of its own. An admitted
message is handed straight to the worker that went idle last (``trio.lowlevel.reschedule``; the
most recently used worker has warm caches: measured 101-123 vs 137-150 us CPU per request with a
FIFO memory channel); with no idle worker it waits in a backlog and a new worker is started, so
the pool grows to the peak concurrency (at most ``max_inflight``) and a new request never waits
for an old one. Workers idle for ``worker_idle_s`` retire (the least recently used first), down to
``min_idle_workers`` idle ones, so a burst does not leave its tasks behind. Reusing tasks instead
of spawning one per message keeps the trio side cheap (LIBRARY-NOTES: 0.47x vs 0.79x of plain
asyncio).

Each request's cancel scope has the request's deadline. ``llm.cancel`` cancels the scope of the
matching correlation id; shutdown cancels all of them after the drain grace. The scope records
why it was cancelled, which decides the error: ``CANCELLED``, ``SHUTTING_DOWN`` or ``TIMEOUT``.
The provider call runs inside that scope, so it is really stopped, not abandoned.

Replies leave through the bus's publish pump (no asyncio crossing per message).
"""

from __future__ import annotations

import collections
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping

import msgspec
import outcome
import trio

from . import errors, messages, routing
from .bus import Bus, Handler, Incoming
from .config import Config, Price
from .messages import LLMRequest, LLMResponse, StreamChunk, encode
from .ops import Metrics, health_document, micro_subscriptions, serve_http, status_document
from .providers import Call, Completion, OnDelta, Provider, estimate_call_tokens
from .providers.registry import build_providers
from .resilience import ProviderGuard, RedisBreakerBoard, call_guarded, in_background
from .router import Router

log = logging.getLogger("llmsrv.service")

UP = routing.ProviderState()  # available, breaker admits, rate limits have room
STREAM_CHUNK = {"Llm-Stream": "chunk"}
STREAM_END = {"Llm-Stream": "end"}


class _Peek(msgspec.Struct):
    correlation_id: str | None = None


_peek_decoder = msgspec.json.Decoder(_Peek)


def _peek_correlation_id(msg: Incoming, max_depth: int) -> str:
    """Best-effort correlation id of a request we will not fully decode (never raises)."""
    try:
        cid = messages.header_correlation_id(msg.headers)
        if cid:
            return cid
        messages.check_depth(msg.data, max_depth)
        found = _peek_decoder.decode(msg.data).correlation_id
    except (errors.LlmsrvError, msgspec.DecodeError, UnicodeDecodeError):
        found = None
    return found if isinstance(found, str) and 0 < len(found) <= 128 else messages.new_correlation_id()


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


class Streamer:
    """Coalesces deltas into chunks: the first at once, then at most one per ``interval``."""

    def __init__(self, publish: Callable[[bytes], None], correlation_id: str, interval: float,
                 max_chunk_chars: int = 1 << 30) -> None:
        self._publish, self._cid, self._interval = publish, correlation_id, interval
        self._max_chars = max_chunk_chars  # a chunk must fit in one NATS message
        self._buf: list[str] = []
        self._last = -math.inf
        self._wakeup = trio.Event()
        self.seq = 0
        self.started = False  # a delta arrived: from here on, no fallback to another provider

    def on_delta(self, text: str) -> None:
        if not text:
            return
        self.started = True
        self._buf.append(text)
        if trio.current_time() - self._last >= self._interval:
            self.flush()
        else:
            self._wakeup.set()

    def flush(self) -> None:
        if not self._buf:
            return
        text = "".join(self._buf)
        self._buf.clear()
        for at in range(0, len(text), self._max_chars):
            self._publish(encode(StreamChunk(correlation_id=self._cid, seq=self.seq,
                                             delta=text[at:at + self._max_chars])))
            self.seq += 1
        self._last = trio.current_time()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep_until(self._last + self._interval)
            self.flush()


class ServiceStats(msgspec.Struct, frozen=True):
    inflight: int
    workers: int
    idle_workers: int
    requests: int
    errors: int
    processing_ns: int
    last_error: str


class Service:
    def __init__(self, cfg: Config, bus: Bus, providers: Mapping[str, Provider] | None = None,
                 instance_id: str | None = None) -> None:
        self.cfg = cfg
        self.bus = bus
        self.providers: Mapping[str, Provider] = providers or build_providers(cfg)
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        p = cfg.nats.subject_prefix
        self.subject_request, self.subject_cancel = f"{p}.request", f"{p}.cancel"
        self.subject_health = f"{p}.health"
        self.subject_admin = f"{p}.admin"
        self.subject_response, self.subject_error = f"{p}.response", f"{p}.error"
        # idle workers and since when, the most recently idle last (handed work first)
        self._parked: collections.deque[tuple[trio.lowlevel.Task, float]] = collections.deque()
        self._backlog: collections.deque[tuple[Incoming, float]] = collections.deque()  # and when admitted
        self._live: dict[str, list[_Live]] = {}
        self._inflight = 0
        self._workers = 0
        self._requests = 0
        self._errors = 0
        self._processing_ns = 0
        self._last_error = ""
        self._draining = False
        self._drained = trio.Event()
        self._stop = trio.Event()
        self.stopped = trio.Event()  # set when run() has drained and returned
        self.started_wall = time.time()
        self._started = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._routes: dict[tuple[object, ...], routing.Route] = {}
        self._unsettled_models: set[str] = set()  # provider:model whose own breaker is not closed
        self.router = Router(cfg.routing.retry)
        storage = cfg.routing.storage_uri
        # the fleet (every instance of one queue group) shares limits and breaker openings in Redis
        fleet = f"llmsrv:{cfg.nats.queue}:"
        self.guards = {name: ProviderGuard(name, getattr(cfg.providers, name), storage_uri=storage,
                                           on_transition=self._on_transition, limit_key=f"{fleet}limit:{name}")
                       for name in self.providers}
        self.board = (RedisBreakerBoard(storage, f"{fleet}breaker:")
                      if storage.startswith("redis") else None)
        self.transitions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.metrics = Metrics(self)
        self.http_port: int | None = None  # the bound port of /metrics, /healthz, /readyz

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown()``; then drain (CONTRACT section 8) and return."""
        try:
            await self._run(task_status)
        finally:
            self.stopped.set()

    async def _run(self, task_status: trio.TaskStatus[Service]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            bus, queue = self.bus, self.cfg.nats.queue
            request_sub = await bus.subscribe(self.subject_request, self._guarded(self._on_request), queue,
                                              on_drop=self._on_dropped)
            others: list[tuple[str, Handler, str]] = [
                (self.subject_cancel, self._on_cancel, ""),
                (self.subject_health, self._on_health, queue),
                # admin commands reach every instance (no queue group); NATS permissions guard them
                (f"{self.subject_admin}.status", self._on_admin_status, ""),
                (f"{self.subject_admin}.breaker.set", self._on_breaker_set, ""),
                *((subject, handler, "") for subject, handler in micro_subscriptions(self)),
            ]
            other_subs = [await bus.subscribe(subject, self._guarded(handler), group)
                          for subject, handler, group in others]
            await bus.flush()  # subscriptions are live on the server once this returns
            self._spawn_worker()
            nursery.start_soon(self._retire_idle_workers)
            for name, provider in self.providers.items():
                status = provider.status()
                log.info("provider %s: %s%s", name, status.state, f" ({status.reason})" if status.reason else "")
            if self.board is not None:
                nursery.start_soon(self._sync_breakers, self.board)
            server = self.cfg.server
            if server.http_port:
                self.http_port = await nursery.start(serve_http, self, server.http_host, server.http_port)
                log.info("metrics and health on http://%s:%d/metrics", server.http_host, self.http_port)
            log.info("serving %s (queue %s), instance %s", self.subject_request, queue, self.instance_id)
            task_status.started(self)
            await self._stop.wait()

            log.info("draining: %d in flight, grace %.1fs", self._inflight, self.cfg.server.drain_grace_s)
            self._draining = True
            await bus.unsubscribe(request_sub)
            if self._inflight == 0:
                self._drained.set()
            with trio.move_on_after(self.cfg.server.drain_grace_s):
                await self._drained.wait()
            for lives in list(self._live.values()):
                for live in lives:
                    live.cancel("shutdown")
            with trio.move_on_after(5):
                await self._drained.wait()
            for sub in other_subs:
                await bus.unsubscribe(sub)
            await bus.flush()
            for provider in self.providers.values():
                closer = getattr(provider, "aclose", None)
                if closer is not None:
                    with trio.move_on_after(2):
                        await closer()
            log.info("drained")
            nursery.cancel_scope.cancel()

    def shutdown(self) -> None:
        """Begin the graceful drain (idempotent; safe to call from a signal-handling task)."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    def statistics(self) -> ServiceStats:
        return ServiceStats(self._inflight, self._workers, len(self._parked), self._requests, self._errors,
                            self._processing_ns, self._last_error)

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
                                      _peek_correlation_id(msg, self.cfg.server.max_json_depth), stream=False)

        return guarded

    def _on_request(self, msg: Incoming) -> None:
        if self._draining:
            self._reject(msg, errors.ShuttingDown("instance is draining; retry on another instance"))
        elif self._inflight >= self.cfg.server.max_inflight:
            self._reject(msg, errors.Overloaded(
                f"instance at max_inflight={self.cfg.server.max_inflight}; retry later",
                retry_after_ms=self._overload_retry_ms()))
        else:
            self._inflight += 1
            item = (msg, trio.current_time())
            if self._parked:  # hand it straight to the worker that went idle last (warm caches)
                trio.lowlevel.reschedule(self._parked.pop()[0], outcome.Value(item))
            else:
                self._backlog.append(item)
                if self._workers < self.cfg.server.max_inflight:
                    self._spawn_worker()

    def _reject(self, msg: Incoming, exc: errors.LlmsrvError) -> None:
        self._requests += 1
        self._record(exc.error_code.lower(), "", "", None)
        self._reply_error(msg.reply, exc, _peek_correlation_id(msg, self.cfg.server.max_json_depth), stream=False)

    def _on_dropped(self, reply: str) -> None:
        """nats-py dropped a request (its pending limit): the body is gone, the reply subject is not."""
        self._requests += 1
        self._record("overloaded", "", "", None)
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

    def _on_health(self, msg: Incoming) -> None:
        if msg.reply:
            self.bus.publish_nowait(msg.reply, encode(health_document(self)))

    def _on_admin_status(self, msg: Incoming) -> None:
        if msg.reply:
            self.bus.publish_nowait(msg.reply, encode(status_document(self)))

    def _on_breaker_set(self, msg: Incoming) -> None:
        try:
            command = messages.decode_breaker_set(msg.data)
            guard = self.guards.get(command.provider)
            if guard is None:
                raise errors.ProviderNotFound(f"no provider {command.provider!r} on this instance")
        except errors.LlmsrvError as exc:
            if msg.reply:
                self.bus.publish_nowait(msg.reply, messages.error_body(exc, ""), messages.error_headers(exc))
            return
        guard.tune(command.threshold, command.ttl_s)
        log.warning("breakers of provider %s retuned by admin: threshold=%s ttl_s=%s",
                    command.provider, guard.breaker.threshold, guard.breaker.ttl_s)
        if msg.reply:
            self.bus.publish_nowait(msg.reply, encode({
                "instance_id": self.instance_id, "provider": command.provider,
                "threshold": guard.breaker.threshold, "ttl_s": guard.breaker.ttl_s}))

    # ---- workers ---------------------------------------------------------------------------

    async def _retire_idle_workers(self) -> None:
        """After a burst, let the workers that stayed idle for ``worker_idle_s`` go (keeping a few)."""
        idle_s, keep = self.cfg.server.worker_idle_s, self.cfg.server.min_idle_workers
        while True:
            await trio.sleep(idle_s / 2)
            now = trio.current_time()
            while len(self._parked) > keep and now - self._parked[0][1] >= idle_s:
                self._workers -= 1
                trio.lowlevel.reschedule(self._parked.popleft()[0], outcome.Value(None))

    def _spawn_worker(self) -> None:
        assert self._nursery is not None
        self._workers += 1
        self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        task = trio.lowlevel.current_task()
        entry = (task, 0.0)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            if self._backlog:
                item = self._backlog.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()  # let others run; never lose msg
            else:
                entry = (task, trio.current_time())
                self._parked.append(entry)
                item = await trio.lowlevel.wait_task_rescheduled(abort)
                if item is None:  # retired by _retire_idle_workers
                    return
            started = time.perf_counter_ns()
            try:
                await self._serve(*item)
            except Exception:  # the boundary in _serve failed to answer: keep the worker anyway
                log.exception("could not answer a request")
            finally:
                self._processing_ns += time.perf_counter_ns() - started
                self._inflight -= 1
                if self._draining and self._inflight == 0:
                    self._drained.set()

    # ---- one request -----------------------------------------------------------------------

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
                    response = await self._execute(request, cid, live.scope.deadline, msg.reply if stream else None)
                if live.scope.cancelled_caught:
                    raise self._cancellation_error(live.reason, timeout_ms)
            finally:
                lives.remove(live)
                if not lives:
                    del self._live[cid]
            body = encode(response)
            end = STREAM_END if stream else None
            if len(body) > self._max_reply_bytes(end):
                body = self._fit(response, end)
            self._reply(msg.reply, self.subject_response, body, end)
            provider, _, model = response.model.partition(":")
            self._record("ok", provider, model, received)
            self._record_usage(provider, response)
        except errors.LlmsrvError as exc:
            last = exc.attempts[-1] if exc.attempts else None
            self._fail(msg, exc, cid, stream, received, last.provider if last else "", last.model if last else "")
        except Exception:
            log.exception("internal error serving request %s", cid or "(not decoded)")
            self._fail(msg, errors.InternalError("internal error; see server log"), cid, stream, received)

    def _fail(self, msg: Incoming, exc: errors.LlmsrvError, cid: str, stream: bool, received: float,
              provider: str = "", model: str = "") -> None:
        self._reply_error(msg.reply, exc, cid or _peek_correlation_id(msg, self.cfg.server.max_json_depth), stream)
        self._record(exc.error_code.lower(), provider, model, received)

    def _max_reply_bytes(self, headers: Mapping[str, str] | None) -> int:
        """What a body may take of the server's max_payload beside these headers (NATS/1.0 block)."""
        return self.bus.max_payload - (12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) if headers else 0)

    def _fit(self, response: LLMResponse, stream_end: dict[str, str] | None) -> bytes:
        """A reply over the server's max_payload: a stream's final leaves out the text its chunks
        carried; anything else is ``RESPONSE_TOO_LARGE``."""
        if stream_end is not None:
            body = encode(msgspec.structs.replace(response, text=""))
            if len(body) <= self._max_reply_bytes(stream_end):
                return body
        raise errors.ResponseTooLarge(
            f"the reply would be over the NATS server's max_payload ({self.bus.max_payload} bytes)"
            + ("" if stream_end else "; ask with \"stream\": true to receive the text in chunks"))

    def _record(self, outcome: str, provider: str, model: str, received: float | None) -> None:
        self.metrics.request(provider, model, outcome, None if received is None else trio.current_time() - received)

    def _record_usage(self, provider: str, response: LLMResponse) -> None:
        self.metrics.usage(provider, response.usage.prompt_tokens, response.usage.completion_tokens,
                           response.cost_cents)

    def _cancellation_error(self, reason: str | None, timeout_ms: int) -> errors.LlmsrvError:
        self.metrics.child(self.metrics.cancellations, reason or "deadline").inc()
        if reason == "client":
            return errors.Cancelled("cancelled by the client (llm.cancel); the provider call was stopped")
        if reason == "shutdown":
            return errors.ShuttingDown("instance shut down before the request finished; retry")
        return errors.Timeout(
            f"no answer within the {timeout_ms} ms deadline; the provider call was cancelled")

    def _route(self, request: LLMRequest) -> routing.Route:
        """``routing.route`` memoised on what it reads; an inferred complexity reads the text."""
        if request.model == "auto" and request.complexity is None:
            return routing.route(request, self.cfg.routing)
        key = (request.model, request.provider, request.task_type, request.complexity,
               tuple(request.capabilities or ()))
        found = self._routes.get(key)
        if found is None:
            found = routing.route(request, self.cfg.routing)
            if len(self._routes) >= 4096:
                self._routes.clear()
            self._routes[key] = found
        return found

    def _plan(self, request: LLMRequest) -> routing.Plan:
        found = self._route(request)
        states = {name: self._state(name) for name in found.providers if name in self.providers}
        if self._unsettled_models:  # a model whose own breaker is not closed may have to be skipped
            for target in found.targets:
                if target.spec in self._unsettled_models and target.provider in states:
                    blocked = self.guards[target.provider].model_blocked_for(target.model)
                    if blocked is not None:
                        states[target.spec] = msgspec.structs.replace(states[target.provider],
                                                                      circuit_retry_after_s=blocked)
        return routing.filter_plan(found, states, request.provider)

    def _state(self, name: str) -> routing.ProviderState:
        available = self.providers[name].status().available
        guard = self.guards.get(name)
        if guard is None or not available:
            return routing.ProviderState(available)
        circuit, rate = guard.breaker.blocked_for(), guard.limiter.blocked_for()
        return UP if circuit is None and rate is None else routing.ProviderState(True, circuit, rate)

    async def _execute(self, request: LLMRequest, cid: str, deadline: float,
                       stream_to: str | None) -> LLMResponse:
        call = Call(model="", messages=request.messages, max_tokens=request.max_tokens,
                    temperature=request.temperature, tools=request.tools or ())
        if stream_to is None:
            return await self._dispatch(request, call, cid, deadline, None)

        def publish(chunk: bytes) -> None:
            self.bus.publish_nowait(stream_to, chunk, STREAM_CHUNK)

        streamer = Streamer(publish, cid, self.cfg.server.stream_flush_ms / 1000,
                            # a chunk's fields take < 200 bytes; a character at most 6 (\u00XX)
                            max_chunk_chars=max(1, (self._max_reply_bytes(STREAM_CHUNK) - 200) // 6))
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(streamer.run)
            try:
                response = await self._dispatch(request, call, cid, deadline, streamer)
            except Exception as exc:  # raised out of the nursery it would come wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        streamer.flush()
        if failure is not None:
            raise failure
        return response

    async def _dispatch(self, request: LLMRequest, call: Call, cid: str, deadline: float,
                        streamer: Streamer | None) -> LLMResponse:
        on_delta = streamer.on_delta if streamer is not None else None
        if not self.cfg.routing.resilience:  # the bare path: first candidate, no guard, no retry
            candidates = self._plan(request).candidates
            if not candidates:
                raise errors.MissingCredentials("no candidate provider can be used now")
            target = candidates[0]
            started = trio.current_time()
            completion = await self.providers[target.provider].complete(
                msgspec.structs.replace(call, model=target.model), on_delta)
            ms = round((trio.current_time() - started) * 1000)
            return _response(completion, target.spec, cid, [messages.Attempt(
                target.provider, target.model, "ok", ms)], self._cost_cents(target, completion))

        async def attempt(target: routing.Target) -> Completion:
            return await self._attempt(target, call, on_delta, deadline)

        result = await self.router.run(
            lambda: self._plan(request), attempt, deadline,
            hedge_delay=self._hedge_delay(request) if streamer is None else None,
            streamed=(lambda: streamer.started) if streamer is not None else (lambda: False))
        return _response(result.completion, result.target.spec, cid, result.attempts,
                         self._cost_cents(result.target, result.completion))

    async def _attempt(self, target: routing.Target, call: Call, on_delta: OnDelta | None,
                       deadline: float) -> Completion:
        provider = self.providers[target.provider]
        call = msgspec.structs.replace(call, model=target.model)
        timeout_s = getattr(self.cfg.providers, target.provider).timeout_ms / 1000
        started = trio.current_time()
        if on_delta is not None:
            on_delta = self._timing_first_chunk(target.provider, started, on_delta)
        called = True
        try:
            guard = self.guards[target.provider]
            tokens = estimate_call_tokens(call) if guard.limiter.enabled else 0
            return await call_guarded(guard, tokens, timeout_s, lambda: provider.complete(call, on_delta), deadline,
                                      target.model)
        except errors.CircuitOpen:
            called = False  # refused before any call: no duration to record
            raise
        except errors.RateLimited as exc:
            self.metrics.child(self.metrics.rate_limited, target.provider, getattr(exc, "limit", "upstream")).inc()
            raise
        finally:
            if called:
                self.metrics.child(self.metrics.provider_call, target.provider).observe(trio.current_time() - started)

    def _timing_first_chunk(self, provider: str, started: float, on_delta: OnDelta) -> OnDelta:
        histogram = self.metrics.child(self.metrics.first_chunk, provider)
        seen = False

        def timed(text: str) -> None:
            nonlocal seen
            if not seen:
                seen = True
                histogram.observe(trio.current_time() - started)
            on_delta(text)

        return timed

    def _cost_cents(self, target: routing.Target, completion: Completion) -> float:
        price: Price | None = getattr(self.cfg.providers, target.provider).prices.get(target.model)
        if price is None:
            return 0.0
        usd = (completion.usage.prompt_tokens * price.input_per_mtok
               + completion.usage.completion_tokens * price.output_per_mtok) / 1e6
        return round(usd * 100, 6)

    def _hedge_delay(self, request: LLMRequest) -> Callable[[routing.Target], float] | None:
        hedge = self.cfg.routing.hedge
        task = messages.TASK_ALIASES.get(request.task_type, request.task_type)
        if not hedge.enabled or (hedge.tasks and task not in hedge.tasks):
            return None

        def delay(target: routing.Target) -> float:
            if hedge.delay_ms:
                return hedge.delay_ms / 1000
            p95 = self.guards[target.provider].latency.p95()
            return p95 if p95 is not None else hedge.default_delay_ms / 1000

        return delay

    def _on_transition(self, name: str, old: str, new: str) -> None:
        """``name`` is ``provider`` or, for a per-model breaker, ``provider:model``."""
        provider, _, model = name.partition(":")
        if model:
            (self._unsettled_models.discard if new == "closed" else self._unsettled_models.add)(name)
        self.transitions[(provider, new)] += 1
        self.metrics.child(self.metrics.transitions, provider, new).inc()
        log.warning("circuit breaker of %s: %s -> %s", name, old, new)
        breaker = self.guards[provider].breakers().get(name) if provider in self.guards else None
        until = breaker.open_until() if breaker is not None else None
        if self.board is not None and until is not None:
            in_background(self.board.publish_open, name, time.time() + until - trio.current_time())

    async def _sync_breakers(self, board: RedisBreakerBoard) -> None:
        """Adopt the openings other instances published (see ``RedisBreakerBoard``)."""
        while True:
            breakers = {name: b for guard in self.guards.values() for name, b in guard.breakers().items()}
            try:
                opened = await trio.to_thread.run_sync(board.fetch, list(breakers), abandon_on_cancel=True)
            except Exception as exc:  # Redis down: keep the local breakers, try again later
                log.warning("breaker board unreachable: %s: %s", type(exc).__name__, exc)
                opened = {}
            now = time.time()
            for name, until in opened.items():
                breakers[name].adopt_open(until - now)
            await trio.sleep(self.cfg.routing.breaker_sync_s)

    # ---- replies ---------------------------------------------------------------------------

    def _reply(self, reply: str, fallback: str, body: bytes, headers: dict[str, str] | None) -> None:
        self.bus.publish_nowait(reply or fallback, body, headers)

    def _reply_error(self, reply: str, exc: errors.LlmsrvError, cid: str, stream: bool) -> None:
        self._errors += 1
        self._last_error = exc.error_code
        headers = messages.error_headers(exc)
        if stream:
            headers.update(STREAM_END)
        self._reply(reply, self.subject_error, messages.error_body(exc, cid), headers)


def _response(c: Completion, model: str, cid: str, attempts: list[messages.Attempt],
              cost_cents: float) -> LLMResponse:
    return LLMResponse(
        text=c.text, model=model, tokens_used=c.usage.prompt_tokens + c.usage.completion_tokens,
        cost_cents=cost_cents, timestamp=messages.timestamp(), correlation_id=cid, usage=c.usage,
        finish_reason=c.finish_reason, tool_calls=list(c.tool_calls), attempts=attempts)


