"""The request pipeline: a decoded request in, its ``LLMResponse`` (or the error that ends it) out.

Theory of operation
-------------------
route (memoised on the fields it reads) -> plan (each provider's state now: credentials, breakers,
rate limits) -> ``Router`` (fallback, retries, hedging) -> one guarded attempt per target
(``ProviderGuard``: breakers, bulkhead, limits, the provider's ``timeout_ms``) -> the response
(usage, cost, what was tried). It knows nothing of how the request arrived or how the answer
leaves: the NATS service feeds it, and the bench builds one directly. It runs inside the caller's
per-request cancel scope; the router and the attempts read that deadline from trio.

With ``[routing] resilience = false`` the same path runs with one attempt and no guard (no
breakers, limits, bulkheads or retries), so the bench can measure what the layer costs.

A delta streamed to the caller commits the request to that attempt: from then on a failure ends
the request (no fallback mid-stream).

With tracing on (``tracing``; off by default), the request runs in a span joined to the caller's
``traceparent`` and each attempt in a child span, current while the provider call runs (the HTTP
transport sends it upstream). Off, the only cost is a check of ``tracing.ENABLED`` and a no-op span.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import msgspec
import trio

from . import errors, messages, routing, tracing
from .config import Config, Price, RetryConfig
from .messages import LLMRequest, LLMResponse
from .ops import Metrics, ProviderSnapshot
from .providers import Call, Completion, OnDelta, Provider, estimate_call_tokens
from .providers.registry import build_providers
from .resilience import Breaker, ProviderGuard, RedisBreakerBoard, call_guarded, in_background, sync_breakers
from .router import Router

log = logging.getLogger("llmsrv.pipeline")

UP = routing.ProviderState()  # available, breaker admits, rate limits have room
MAX_ROUTES = 4096  # memoised routes; model names come from requests, so bound them


class _Delivery:
    """The caller's ``on_delta`` for one request: knows whether text went out (no fallback then)."""

    __slots__ = ("_deliver", "_metrics", "started")

    def __init__(self, deliver: OnDelta, metrics: Metrics) -> None:
        self._deliver, self._metrics = deliver, metrics
        self.started = False

    def for_attempt(self, provider: str) -> OnDelta:
        """The attempt's ``on_delta``: also times the attempt's first chunk."""
        begun = trio.current_time()
        first = True

        def on_delta(text: str) -> None:
            nonlocal first
            if not text:
                return
            if first:
                first = False
                self._metrics.first_chunk(provider, trio.current_time() - begun)
            self.started = True
            self._deliver(text)

        return on_delta


class Pipeline:
    def __init__(self, cfg: Config, providers: Mapping[str, Provider], metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.providers = providers
        self.metrics = metrics or Metrics()
        self.guarded = cfg.routing.resilience
        self.router = Router(cfg.routing.retry if self.guarded else RetryConfig(max_attempts=1))
        storage, fleet = cfg.routing.storage_uri, f"llmsrv:{cfg.nats.queue}:"
        self.guards = {name: self._guard(cfg, name) for name in providers}
        self.board = RedisBreakerBoard(storage, f"{fleet}breaker:") if storage.startswith("redis") else None
        self._routes: dict[tuple[object, ...], routing.Route] = {}
        self._unsettled_models: set[str] = set()  # provider:model whose own breaker is not closed

    # ---- one request -------------------------------------------------------------------------

    async def answer(self, request: LLMRequest, correlation_id: str, on_delta: OnDelta | None = None,
                     trace: Mapping[str, str] | None = None, deadline: float | None = None) -> LLMResponse:
        """``trace``: the caller's W3C ``traceparent``/``tracestate`` (header name -> value, any case);
        ``deadline``: the request's, when the caller knows it (else trio's effective deadline, looked up)."""
        if deadline is None:
            deadline = trio.current_effective_deadline()
        call = Call(model="", messages=request.messages, max_tokens=request.max_tokens,
                    temperature=request.temperature, tools=request.tools or ())
        delivery = _Delivery(on_delta, self.metrics) if on_delta is not None else None
        with tracing.request_span(correlation_id, request, trace) as span:
            attempt = self._traced_attempt if span.recording else self._attempt
            result = await self.router.run(
                lambda: self.plan(request), lambda target: attempt(target, call, delivery, deadline),
                hedge_delay=self._hedge_delay(request) if delivery is None else None,
                streamed=(lambda: delivery.started) if delivery is not None else (lambda: False))
            done, target = result.completion, result.target
            cost = self._cost_cents(target, done)
            response = LLMResponse(
                text=done.text, model=target.spec, tokens_used=done.usage.prompt_tokens + done.usage.completion_tokens,
                cost_cents=cost, timestamp=messages.timestamp(), correlation_id=correlation_id, usage=done.usage,
                finish_reason=done.finish_reason, tool_calls=list(done.tool_calls), attempts=result.attempts,
                refusal=msgspec.UNSET if done.refusal is None else done.refusal)
            span.answered(response)
            return response

    def plan(self, request: LLMRequest) -> routing.Plan:
        found = self._route(request)
        states = {name: self._state(name) for name in found.providers if name in self.providers}
        if found.targets and not self._unsettled_models and len(states) == len(found.providers) and all(
                state is UP for state in states.values()):
            return routing.Plan(list(found.targets), [], found.complexity)  # what filter_plan finds: every one
        if self._unsettled_models:  # a model whose own breaker is not closed may have to be skipped
            for target in found.targets:
                if target.spec in self._unsettled_models and target.provider in states:
                    blocked = self.guards[target.provider].model_blocked_for(target.model)
                    if blocked is not None:
                        states[target.spec] = msgspec.structs.replace(states[target.provider],
                                                                      circuit_retry_after_s=blocked)
        return routing.filter_plan(found, states)

    def _route(self, request: LLMRequest) -> routing.Route:
        """``routing.route`` memoised on what it reads; an inferred complexity reads the text."""
        if request.model == "auto" and request.complexity is None:
            return routing.route(request, self.cfg.routing)
        key = (request.model, request.provider, request.task_type, request.complexity,
               tuple(request.capabilities or ()))
        found = self._routes.get(key)
        if found is None:
            found = routing.route(request, self.cfg.routing)
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            self._routes[key] = found
        return found

    def _state(self, name: str) -> routing.ProviderState:
        available = self.providers[name].status().available
        if not self.guarded or not available:
            return routing.ProviderState(available)
        guard = self.guards[name]
        circuit, rate = guard.breaker.blocked_for(), guard.limiter.blocked_for()
        return UP if circuit is None and rate is None else routing.ProviderState(True, circuit, rate)

    async def _traced_attempt(self, target: routing.Target, call: Call, delivery: _Delivery | None,
                              deadline: float) -> Completion:
        """``_attempt`` in a span of its own (current while the provider call runs: it carries ``traceparent``)."""
        with tracing.attempt_span(target.provider, target.model) as span:
            done = await self._attempt(target, call, delivery, deadline)
            span.completed(done)
            return done

    async def _attempt(self, target: routing.Target, call: Call, delivery: _Delivery | None,
                       deadline: float) -> Completion:
        provider = self.providers[target.provider]
        call = msgspec.structs.replace(call, model=target.model)
        on_delta = delivery.for_attempt(target.provider) if delivery is not None else None
        if not self.guarded:
            return await provider.complete(call, on_delta)
        guard = self.guards[target.provider]
        timeout_s = getattr(self.cfg.providers, target.provider).timeout_ms / 1000
        tokens = estimate_call_tokens(call) if guard.limiter.enabled else 0
        started = trio.current_time()
        called = True
        try:
            return await call_guarded(guard, tokens, timeout_s, lambda: provider.complete(call, on_delta),
                                      target.model, deadline)
        except errors.CircuitOpen:
            called = False  # refused before any call: no duration to record
            raise
        except errors.RateLimited as exc:
            self.metrics.rate_limited(target.provider, exc.limit)
            raise
        finally:
            if called:
                self.metrics.provider_call(target.provider, trio.current_time() - started)

    def _cost_cents(self, target: routing.Target, completion: Completion) -> float:
        if completion.subscription:  # through the user's subscription (a vendor CLI): the prices do not apply
            return 0.0
        price: Price | None = getattr(self.cfg.providers, target.provider).prices.get(target.model)
        if price is None:
            return 0.0
        usd = (completion.usage.prompt_tokens * price.input_per_mtok
               + completion.usage.completion_tokens * price.output_per_mtok) / 1e6
        return round(usd * 100, 6)

    def _hedge_delay(self, request: LLMRequest) -> Callable[[routing.Target], float] | None:
        hedge = self.cfg.routing.hedge
        task = messages.TASK_ALIASES.get(request.task_type, request.task_type)
        if not self.guarded or not hedge.enabled or (hedge.tasks and task not in hedge.tasks):
            return None

        def delay(target: routing.Target) -> float:
            if hedge.delay_ms:
                return hedge.delay_ms / 1000
            p95 = self.guards[target.provider].latency.p95()
            return p95 if p95 is not None else hedge.default_delay_ms / 1000

        return delay

    # ---- breakers ----------------------------------------------------------------------------

    def breakers(self) -> dict[str, Breaker]:
        """Every breaker by name (``provider`` and ``provider:model``)."""
        return {name: b for guard in self.guards.values() for name, b in guard.breakers().items()}

    def tune(self, provider: str, threshold: int | None, ttl_s: float | None) -> ProviderGuard:
        """Retune the breakers of ``provider`` (``llm.admin.breaker.set``)."""
        guard = self.guards.get(provider)
        if guard is None:
            raise errors.ProviderNotFound(f"no provider {provider!r} on this instance")
        guard.tune(threshold, ttl_s)
        log.warning("breakers of provider %s retuned by admin: threshold=%s ttl_s=%s",
                    provider, guard.breaker.threshold, guard.breaker.ttl_s)
        return guard

    def force(self, provider: str, model: str | None, action: str) -> Breaker:
        """Force a breaker open, closed, or back to a fresh start (``llm.admin.breaker.state``)."""
        guard = self.guards.get(provider)
        if guard is None:
            raise errors.ProviderNotFound(f"no provider {provider!r} on this instance")
        before = set(guard.breakers()) if action == "reset" else set()
        breaker = guard.force(action, model)
        log.warning("circuit breaker of %s: %s by admin, now %s", breaker.name, action,
                    "open (forced)" if breaker.forced else breaker.state)
        if action != "open" and self.board is not None:  # a published opening would be adopted again
            self.board.withdraw(sorted(before | {breaker.name}))
        return breaker

    def _on_transition(self, name: str, old: str, new: str) -> None:
        """``name`` is ``provider`` or, for a per-model breaker, ``provider:model``."""
        provider, _, model = name.partition(":")
        if model:
            (self._unsettled_models.discard if new == "closed" else self._unsettled_models.add)(name)
        self.metrics.transition(provider, new)
        log.warning("circuit breaker of %s: %s -> %s", name, old, new)
        breaker = self.guards[provider].breakers().get(name) if provider in self.guards else None
        until = breaker.open_until() if breaker is not None else None
        if self.board is not None and until is not None:
            now = time.time()
            in_background(self.board.publish_open, name, now + until - trio.current_time(), now)

    async def share_breakers(self) -> None:
        """With a Redis ``storage_uri``: adopt the openings other instances publish (runs until cancelled)."""
        if self.board is not None:
            await sync_breakers(self.board, self.breakers, self.cfg.routing.breaker_sync_s)

    # ---- state and lifecycle -------------------------------------------------------------------

    def _guard(self, cfg: Config, name: str) -> ProviderGuard:
        fleet = f"llmsrv:{cfg.nats.queue}:"  # every instance of one queue group shares limits and openings
        return ProviderGuard(name, getattr(cfg.providers, name), storage_uri=cfg.routing.storage_uri,
                             on_transition=self._on_transition, limit_key=f"{fleet}limit:{name}")

    def reconfigure(self, cfg: Config) -> list[Provider]:
        """A reloaded config (SIGHUP) for the requests that start from now on. A provider whose settings
        changed is built anew (those in flight keep the object they hold: returned, for the caller to
        close once they are done); the others keep their object and guard (connections, breaker state,
        rate-limit counts, bulkhead)."""
        old, guards = self.cfg, self.guards
        changed = {name for name in self.providers if getattr(old.providers, name) != getattr(cfg.providers, name)}
        retired = [self.providers[name] for name in changed]
        self.providers = {**self.providers, **build_providers(cfg, only=changed)}
        self.guards = {name: self._guard(cfg, name) if name in changed else guards[name] for name in self.providers}
        self.cfg, self.guarded = cfg, cfg.routing.resilience
        self.router = Router(cfg.routing.retry if self.guarded else RetryConfig(max_attempts=1))
        self._routes = {}
        self._unsettled_models = {b.name for guard in self.guards.values() for b in guard.models.values()
                                  if b.state != "closed"}
        return retired

    def statistics(self) -> dict[str, ProviderSnapshot]:
        """Each provider's status and guard, frozen (no I/O)."""
        return {name: ProviderSnapshot(provider.status(), self.guards[name].statistics(),
                                       {m: b.state for m, b in self.guards[name].models.items()})
                for name, provider in self.providers.items()}

    async def aclose(self) -> None:
        for provider in self.providers.values():
            with trio.move_on_after(2):
                await provider.aclose()
