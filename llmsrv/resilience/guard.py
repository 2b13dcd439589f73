"""The one async door to a provider call: breaker(s), bulkhead and rate limits of one provider, in order.

The door's policy is in the package docstring (``llmsrv.resilience``); the outcome of a call is
read from the error classes (``errors.LlmsrvError.counts_for_breaker`` and ``provider_wide``).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

import msgspec
import trio

from .. import errors
from ..config import ProviderConfig
from ..providers import Completion
from .breaker import Breaker, BreakerSnapshot, Clock, OnTransition, Ticket
from .fleet import in_background
from .limiter import RateLimiter, RateLimitSnapshot

MAX_MODEL_BREAKERS = 1024  # model names come from requests: bound what they can make us keep


class GuardSnapshot(msgspec.Struct, frozen=True):
    breaker: BreakerSnapshot
    rate: RateLimitSnapshot
    in_flight: int
    max_concurrency: int
    models: dict[str, BreakerSnapshot] = {}  # per-model breakers that are not closed and clean


class LatencyWindow:
    """The last ``size`` call durations of a provider, for the hedge delay (its p95)."""

    def __init__(self, size: int = 200, min_samples: int = 20) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._min = min_samples

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def p95(self) -> float | None:
        if len(self._samples) < self._min:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


class ProviderGuard:
    """Breaker(s) + rate limits + bulkhead of one provider, as one async door."""

    def __init__(self, name: str, cfg: ProviderConfig, *, clock: Clock = trio.current_time,
                 wall: Callable[[], float] | None = None, on_transition: OnTransition | None = None,
                 storage_uri: str = "memory://", max_probes: int = 1, limit_key: str | None = None) -> None:
        self.name = name
        self._breaker_args = (max_probes, clock, on_transition)
        self.breaker = Breaker(name, cfg.breaker_threshold, cfg.breaker_ttl_s, max_probes, clock,
                               on_transition)
        self.per_model = cfg.breaker_scope == "model"
        self.models: dict[str, Breaker] = {}
        self.limiter = RateLimiter(name, cfg.rpm, cfg.tpm, storage_uri, wall, limit_key)
        # a semaphore, not trio's CapacityLimiter: Admission knows whether it holds a slot, so the
        # limiter's per-task borrower bookkeeping would only cost (0.9 vs 0.2 us a call)
        self.bulkhead = trio.Semaphore(cfg.max_concurrency, max_value=cfg.max_concurrency)
        self.max_concurrency = cfg.max_concurrency
        self.latency = LatencyWindow()

    def model_breaker(self, model: str | None) -> Breaker | None:
        """The breaker of ``provider:model`` (made on first use), or None in provider scope."""
        if not self.per_model or not model:
            return None
        found = self.models.get(model)
        if found is None:
            if len(self.models) >= MAX_MODEL_BREAKERS:
                self._forget_clean_breakers()
                if len(self.models) >= MAX_MODEL_BREAKERS:
                    return None  # still full of failing models: the provider's breaker stands in
            found = self.models[model] = Breaker(f"{self.name}:{model}", self.breaker.threshold,
                                                 self.breaker.ttl_s, *self._breaker_args)
        return found

    def _forget_clean_breakers(self) -> None:
        for model, breaker in list(self.models.items()):
            if breaker.is_clean():
                del self.models[model]

    def breakers(self) -> dict[str, Breaker]:
        """Every breaker of this provider by name (``provider`` and ``provider:model``)."""
        return {self.name: self.breaker, **{b.name: b for b in self.models.values()}}

    def model_blocked_for(self, model: str) -> float | None:
        """Seconds until ``model``'s own breaker admits a call (None: it would now, or has none)."""
        found = self.models.get(model) if self.models else None
        return found.blocked_for() if found is not None else None

    def tune(self, threshold: int | None, ttl_s: float | None) -> None:
        for breaker in self.breakers().values():
            breaker.tune(threshold, ttl_s)

    def force(self, action: str, model: str | None = None) -> Breaker:
        """An operator's ``open`` | ``close`` | ``reset`` of this provider's breaker, or of ``provider:model``'s.

        ``open`` forces the breaker open until closed; ``close`` closes that one breaker and clears
        its count; ``reset`` of the provider also resets every per-model breaker of it and forgets
        them (a fresh start); of ``provider:model``, it is ``close``. A model without a breaker yet
        gets one (per-model scope); in provider scope there is none to name: an error.
        """
        if action not in ("open", "close", "reset"):
            raise errors.ValidationFailed(f"unknown breaker action {action!r}: open, close or reset - at `$.action`")
        breaker = self.breaker
        if model is not None:
            if not self.per_model:
                raise errors.ValidationFailed(
                    f"provider {self.name!r} has breaker_scope = \"provider\": it keeps no breaker for "
                    f"{self.name}:{model}; name the provider alone - at `$.model`")
            found = self.model_breaker(model)
            if found is None:
                raise errors.Overloaded(f"provider {self.name!r} keeps {MAX_MODEL_BREAKERS} model breakers, all "
                                        "failing: name the provider alone", retry_after_ms=1000)
            breaker = found
        if action == "open":
            breaker.force_open()
            return breaker
        breaker.force_close()
        if action == "reset" and model is None:
            for other in self.models.values():
                other.force_close()
            self._forget_clean_breakers()
        return breaker

    def statistics(self) -> GuardSnapshot:
        """A frozen snapshot; no I/O (the rate limit part is what the last refusal taught)."""
        size = self.max_concurrency
        models = {m: b.statistics() for m, b in self.models.items() if not b.is_clean()}
        return GuardSnapshot(self.breaker.statistics(), self.limiter.statistics(), size - self.bulkhead.value, size,
                             models)

    def attempt(self, estimated_tokens: int, model: str | None = None) -> Admission:
        """``async with guard.attempt(tokens, model) as admission:`` admits one call (see the package doc)."""
        return Admission(self, estimated_tokens, self.model_breaker(model))


class Admission:
    """One admitted call. The body sets ``tokens`` to the real usage on success."""

    __slots__ = ("_guard", "_estimate", "_ticket", "_model", "_model_ticket", "_holding", "tokens")

    def __init__(self, guard: ProviderGuard, estimated_tokens: int, model_breaker: Breaker | None) -> None:
        self._guard = guard
        self._estimate = estimated_tokens
        self._ticket: Ticket | None = None
        self._model = model_breaker
        self._model_ticket: Ticket | None = None
        self._holding = False
        self.tokens: int | None = None

    async def __aenter__(self) -> Admission:
        guard = self._guard
        self._ticket = guard.breaker.admit()
        try:
            if self._model is not None:
                self._model_ticket = self._model.admit()
            try:
                guard.bulkhead.acquire_nowait()  # a free slot costs no trip through the scheduler
            except trio.WouldBlock:
                await guard.bulkhead.acquire()
            self._holding = True
            # Charged only once a slot is held: a request cancelled while queued costs nothing.
            # Once sent, its charge stands even if it is cancelled (the upstream counted it).
            limiter = guard.limiter
            if limiter.enabled and limiter.remote:
                await trio.to_thread.run_sync(limiter.acquire, self._estimate, abandon_on_cancel=True)
            elif limiter.enabled:
                limiter.acquire(self._estimate)
        except BaseException:
            self._release("neutral")
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        if exc is None:
            outcome = "success"
            limiter = self._guard.limiter
            if self.tokens is not None and limiter.enabled:
                if limiter.remote:  # not awaited: the reply must not wait for the bookkeeping
                    in_background(limiter.correct, self._estimate, self.tokens)
                else:
                    limiter.correct(self._estimate, self.tokens)
        elif not isinstance(exc, Exception):
            outcome = "neutral"  # trio.Cancelled / KeyboardInterrupt: nothing about the provider
        elif isinstance(exc, errors.LlmsrvError):
            outcome = "failure" if exc.counts_for_breaker else "neutral"  # neutral: the caller's fault
        else:
            outcome = "failure"  # anything unexpected from a provider call
        if outcome == "failure" and self._model is not None and not (
                isinstance(exc, errors.LlmsrvError) and exc.provider_wide):
            self._release("neutral", "failure")  # this model's failure: the provider's other models are fine
        elif outcome == "failure":
            self._release("failure", "neutral")
        else:
            self._release(outcome, outcome)

    def _release(self, provider_outcome: str, model_outcome: str = "neutral") -> None:
        if self._holding:
            self._holding = False
            self._guard.bulkhead.release()
        if self._ticket is not None:
            self._guard.breaker.record(self._ticket, provider_outcome)
            self._ticket = None
        if self._model_ticket is not None and self._model is not None:
            self._model.record(self._model_ticket, model_outcome)
            self._model_ticket = None


async def call_guarded(guard: ProviderGuard, estimated_tokens: int, timeout_s: float,
                       call: Callable[[], Awaitable[Completion]], model: str | None = None,
                       deadline: float | None = None) -> Completion:
    """One provider call through its guard, under its per-attempt timeout (``timeout_ms``).

    The request's deadline is the caller's cancel scope (``deadline`` when the caller knows it, else
    ``trio.current_effective_deadline()``): when the attempt's own limit is not earlier, no second cancel
    scope is needed.
    """
    started = trio.current_time()
    async with guard.attempt(estimated_tokens, model) as admission:
        limit = started + timeout_s
        if limit >= (trio.current_effective_deadline() if deadline is None else deadline):
            completion = await call()
        else:
            with trio.move_on_at(limit) as scope:
                completion = await call()
            if scope.cancelled_caught:
                raise errors.ProviderTimeout(
                    f"provider {guard.name!r} gave no answer within its timeout_ms={round(timeout_s * 1000)}")
        admission.tokens = completion.usage.prompt_tokens + completion.usage.completion_tokens
    guard.latency.add(trio.current_time() - started)
    return completion
