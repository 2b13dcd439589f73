"""Per-provider protection: circuit breaker (purgatory), rate limits (limits), bulkhead (trio).

Theory of operation
-------------------
``ProviderGuard.attempt()`` is the one door to a provider call. In order it: asks the breaker for
a ticket (open -> ``CircuitOpen`` with ``retry_after_ms``), waits for a bulkhead slot, then
charges the rate limits (requests and an estimate of tokens; no headroom -> ``RateLimited`` with
``retry_after_ms``). When the call ends it records the outcome:

* success -> breaker success; the token estimate is corrected with the real usage;
* an upstream failure (``ProviderError``, an attempt timeout, any unexpected exception) -> breaker
  failure;
* neutral -> nothing: ``trio.Cancelled`` (client cancel, request deadline, shutdown) and caller
  errors (``RequestError``) say nothing about the provider's health.

Breaker scope (``breaker_scope``): with ``"model"`` (the default) each ``provider:model`` has a
breaker of its own beside the provider's, and a call needs both to admit it. A failure of one
model counts on that model's breaker only, so ``mock:fail`` cannot close off ``mock:echo``; a
failure of the provider as a whole (``provider_wide``: no connection, refused credentials) counts
on the provider's breaker, which stops every model. With ``"provider"`` there is one breaker.

Everything is released in ``finally``: a cancelled request leaves no bulkhead slot, no half-open
probe slot and no pending breaker state behind.

The breaker uses purgatory's domain state machine (consecutive failures -> open -> half-open ->
closed) for counting and transitions, but keeps time itself (trio's clock, so tests run on
virtual time) and fixes what the notes measured: purgatory counts cancellations as failures,
counts excluded errors as successes, lets every concurrent call through in half-open and re-raises
one exception object whose traceback grows. Here half-open admits ``max_probes`` calls, outcomes
of calls admitted under an earlier state are ignored, and each refusal is a fresh exception.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter
from purgatory.domain.messages.events import ContextChanged
from purgatory.domain.model import Context, HalfOpenedState, OpenedState

from . import errors
from .config import ProviderConfig
from .providers import Completion

log = logging.getLogger("llmsrv.resilience")
CLOSED, HALF_OPEN, OPEN = "closed", "half-open", "open"
STATE_CODE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
_PURGATORY_STATE = {"closed": CLOSED, "half-opened": HALF_OPEN, "opened": OPEN}
HALF_OPEN_RETRY_MS = 500  # what a caller refused in half-open (probe busy) is told to wait

Clock = Callable[[], float]
OnTransition = Callable[[str, str, str], None]  # provider, from_state, to_state


class _Failure(Exception):
    """What the breaker is told when a call failed (purgatory wants an exception)."""


class Ticket(msgspec.Struct):
    generation: int
    probe: bool


class BreakerSnapshot(msgspec.Struct, frozen=True):
    state: str
    failures: int
    retry_after_s: float  # 0 unless open
    probes_in_flight: int
    threshold: int = 0
    ttl_s: float = 0.0


class Breaker:
    def __init__(self, name: str, threshold: int, ttl_s: float, max_probes: int = 1,
                 clock: Clock = trio.current_time, on_transition: OnTransition | None = None) -> None:
        self.name = name
        self.max_probes = max_probes
        self._ctx = Context(name, threshold, ttl_s)
        self._clock = clock
        self._on_transition = on_transition
        self._opened_at = -math.inf
        self._probes = 0
        self._generation = 0
        self._last_state = CLOSED

    @property
    def state(self) -> str:
        return self._last_state  # purgatory's state, mirrored by _sync after every change

    @property
    def threshold(self) -> int:
        return int(self._ctx.threshold)

    @property
    def ttl_s(self) -> float:
        return float(self._ctx.ttl)

    def tune(self, threshold: int | None = None, ttl_s: float | None = None) -> None:
        if threshold is not None:
            self._ctx.threshold = threshold
        if ttl_s is not None:
            self._ctx.ttl = ttl_s

    def snapshot(self) -> BreakerSnapshot:
        state = self.state
        retry = max(0.0, self._opened_at + self._ctx.ttl - self._clock()) if state == OPEN else 0.0
        return BreakerSnapshot(state, self._ctx.failure_count or 0, retry, self._probes, self.threshold, self.ttl_s)

    def is_clean(self) -> bool:
        """Closed, with no failure counted and no probe out: nothing worth remembering."""
        return self.state == CLOSED and not self._ctx.failure_count and not self._probes

    def blocked_for(self) -> float | None:
        """Seconds until this breaker admits a call again, or None if it would admit one now."""
        state = self.state
        if state == OPEN:
            remaining = self._opened_at + self._ctx.ttl - self._clock()
            return remaining if remaining > 0 else None
        if state == HALF_OPEN and self._probes >= self.max_probes:
            return HALF_OPEN_RETRY_MS / 1000
        return None

    def adopt_open(self, remaining_s: float) -> None:
        """Open this (closed) breaker for ``remaining_s``, because another instance opened it."""
        if self.state != CLOSED or remaining_s <= 0:
            return
        self._ctx.set_state(OpenedState(self.name))
        self._sync(opened_at=self._clock() - self._ctx.ttl + remaining_s)

    def open_until(self) -> float | None:
        """When an open breaker half-opens, on this breaker's clock; None unless open."""
        return self._opened_at + self._ctx.ttl if self.state == OPEN else None

    def admit(self) -> Ticket:
        """A ticket for one call, or a fresh ``CircuitOpen``."""
        if self.state == OPEN:
            remaining = self._opened_at + self._ctx.ttl - self._clock()
            if remaining > 0:
                raise errors.CircuitOpen(f"circuit breaker of provider {self.name!r} is open",
                                         retry_after_ms=math.ceil(remaining * 1000))
            self._ctx.set_state(HalfOpenedState())
            self._sync()
        if self.state == HALF_OPEN:
            if self._probes >= self.max_probes:
                raise errors.CircuitOpen(
                    f"circuit breaker of provider {self.name!r} is half-open and its probe is in flight",
                    retry_after_ms=HALF_OPEN_RETRY_MS)
            self._probes += 1
            return Ticket(self._generation, probe=True)
        return Ticket(self._generation, probe=False)

    def record(self, ticket: Ticket, outcome: str) -> None:
        """``outcome``: success | failure | neutral. Always releases the ticket's probe slot."""
        if ticket.probe:
            self._probes -= 1
        if outcome == "neutral" or ticket.generation != self._generation:
            return
        if outcome == "success" and self._last_state == CLOSED and not self._ctx.failure_count:
            return  # the common case: nothing to count, nothing to reset
        if outcome == "success":
            self._ctx.handle_end_request()
        else:
            self._ctx.handle_exception(_Failure())
        self._sync()

    def _sync(self, opened_at: float | None = None) -> None:
        for event in self._ctx.messages:
            if isinstance(event, ContextChanged):
                self._generation += 1
                new = _PURGATORY_STATE[event.state]
                old, self._last_state = self._last_state, new
                if new == OPEN:
                    self._opened_at = self._clock() if opened_at is None else opened_at
                if self._on_transition is not None:
                    self._on_transition(self.name, old, new)
        self._ctx.messages.clear()


class _QuietMemoryStorage(MemoryStorage):
    """limits' memory storage without its expiry timer thread.

    ``MemoryStorage`` starts a ``threading.Timer`` about every 10 ms while in use (a thread start
    per window, 60-100 a second under load). Reads already check expiry themselves, so the timer
    only frees memory; ``RateLimiter`` sweeps at most once a second instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timer.cancel()  # the one-shot timer the constructor starts; sweeps replace it

    def _MemoryStorage__schedule_expiry(self) -> None:  # noqa: N802 (name-mangled override)
        pass

    def sweep(self) -> None:
        self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


class RateLimitSnapshot(msgspec.Struct, frozen=True):
    limited: str | None  # "rpm" | "tpm" | None
    retry_after_s: float


class RateLimiter:
    """Requests-per-window and tokens-per-window limits of one provider (sliding window counter).

    The hot path costs two storage operations per call (tokens, requests) and one to correct the
    token charge afterwards. Routing asks ``blocked_for()``, which reads no storage: it reports the
    wait learned from the last refusal, so a full limit is noticed by the first call it refuses.
    """

    def __init__(self, name: str, rpm: str | None, tpm: str | None, storage_uri: str = "memory://",
                 wall: Callable[[], float] | None = None, key: str | None = None) -> None:
        import time

        self.name = name
        self.key = key or name  # the storage key: fleets sharing one Redis keep apart by it
        self._wall = wall or time.time
        self.remote = not storage_uri.startswith("memory://")  # calls block: run them in a thread
        self._storage: Any = storage_from_string(storage_uri) if self.remote else _QuietMemoryStorage()
        self._strategy = SlidingWindowCounterRateLimiter(self._storage)
        self._rpm: RateLimitItem | None = parse(rpm) if rpm else None
        self._tpm: RateLimitItem | None = parse(tpm) if tpm else None
        self._blocked_until = 0.0
        self._blocked_by: str | None = None  # the limit that refused last
        self._last_sweep = 0.0

    @property
    def enabled(self) -> bool:
        return self._rpm is not None or self._tpm is not None

    def blocked_for(self) -> float | None:
        """Seconds until the limit that last refused a call has room again; None if none did."""
        remaining = self._blocked_until - self._wall()
        return remaining if remaining > 0 else None

    def statistics(self) -> RateLimitSnapshot:
        """What the last refusal taught, without asking the storage (safe on the event loop)."""
        remaining = self.blocked_for()
        return RateLimitSnapshot(self._blocked_by if remaining else None, remaining or 0.0)

    def snapshot(self, tokens: int = 1) -> RateLimitSnapshot:
        """A full check of both limits (for status displays and tests; not on the hot path)."""
        for kind, item, cost in (("rpm", self._rpm, 1), ("tpm", self._tpm, tokens)):
            if item is not None and not self._strategy.test(item, self.key, cost=min(cost, item.amount)):
                return RateLimitSnapshot(kind, self._retry_after(item))
        return RateLimitSnapshot(None, 0.0)

    def acquire(self, tokens: int) -> None:
        """Charge one request and ``tokens`` tokens, or raise ``RateLimited`` charging nothing."""
        self._maybe_sweep()
        rpm, tpm = self._rpm, self._tpm
        if tpm is not None:
            tokens = min(tokens, tpm.amount)  # one huge request may still pass an empty window
            if not self._strategy.hit(tpm, self.key, cost=tokens):
                raise self._limited("tpm", tpm)
        if rpm is not None and not self._strategy.hit(rpm, self.key):
            if tpm is not None:
                self._adjust(tpm, -tokens)
            raise self._limited("rpm", rpm)

    def correct(self, estimated: int, actual: int) -> None:
        """Charge (or refund) the difference between the token estimate and the real usage."""
        if self._tpm is not None:
            self._adjust(self._tpm, actual - min(estimated, self._tpm.amount))

    def _adjust(self, item: RateLimitItem, delta: int) -> None:
        """Add ``delta`` (may be negative) to the current window's counter."""
        if delta == 0:
            return
        expiry, key = item.get_expiry(), item.key_for(self.key)
        if not self.remote:
            _, current = self._storage.sliding_window_keys(key, expiry, self._wall())
            if delta > 0:
                self._storage.incr(current, 2 * expiry, amount=delta)
            else:
                self._storage.decr(current, amount=min(-delta, self._storage.get(current)))
        else:
            # limits' Redis sliding window keeps the current window under this key (its Lua
            # scripts shift windows server-side); INCRBY on it adds or refunds atomically.
            self._storage.incr(self._storage._current_window_key(key), 2 * expiry, amount=delta)

    def _retry_after(self, item: RateLimitItem) -> float:
        reset_at = self._strategy.get_window_stats(item, self.key).reset_time
        return max(0.001, reset_at - self._wall())

    def _limited(self, kind: str, item: RateLimitItem) -> errors.RateLimited:
        retry = self._retry_after(item)
        self._blocked_until = max(self._blocked_until, self._wall() + retry)
        self._blocked_by = kind
        exc = errors.RateLimited(f"provider {self.name!r} is over its {kind} limit ({item})",
                                 retry_after_ms=math.ceil(retry * 1000))
        exc.limit = kind  # type: ignore[attr-defined]
        return exc

    def _maybe_sweep(self) -> None:
        if isinstance(self._storage, _QuietMemoryStorage):
            now = self._wall()
            if now - self._last_sweep >= 1.0:
                self._last_sweep = now
                self._storage.sweep()


class GuardSnapshot(msgspec.Struct, frozen=True):
    breaker: BreakerSnapshot
    rate: RateLimitSnapshot
    in_flight: int
    max_concurrency: int
    models: dict[str, BreakerSnapshot] = {}  # per-model breakers that are not closed and clean


MAX_MODEL_BREAKERS = 1024  # model names come from requests: bound what they can make us keep


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
        self.bulkhead = trio.CapacityLimiter(cfg.max_concurrency)
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

    def statistics(self) -> GuardSnapshot:
        """A frozen snapshot; no I/O (the rate limit part is what the last refusal taught)."""
        stats = self.bulkhead.statistics()
        models = {m: b.snapshot() for m, b in self.models.items() if not b.is_clean()}
        return GuardSnapshot(self.breaker.snapshot(), self.limiter.statistics(),
                             stats.borrowed_tokens, int(stats.total_tokens), models)

    def attempt(self, estimated_tokens: int, model: str | None = None) -> Admission:
        """``async with guard.attempt(tokens, model) as admission:`` admits one call (see module doc)."""
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
        elif isinstance(exc, errors.RequestError) or not isinstance(exc, Exception):
            outcome = "neutral"  # the caller's fault, or trio.Cancelled / KeyboardInterrupt
        else:
            outcome = "failure"
        if outcome == "failure" and self._model is not None and not getattr(exc, "provider_wide", False):
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
                       call: Callable[[], Awaitable[Completion]], deadline: float = math.inf,
                       model: str | None = None) -> Completion:
    """One provider call through its guard, under its per-attempt timeout (``timeout_ms``).

    ``deadline`` is the request's (its cancel scope already enforces it): when the attempt's own
    limit is not earlier, no second cancel scope is needed.
    """
    started = trio.current_time()
    async with guard.attempt(estimated_tokens, model) as admission:
        limit = started + timeout_s
        if limit >= deadline:
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


def in_background(fn: Callable[..., object], *args: object) -> None:
    """Run blocking ``fn(*args)`` in a worker thread without waiting for it (errors are logged)."""
    trio.lowlevel.spawn_system_task(_in_thread, fn, *args)


async def _in_thread(fn: Callable[..., object], *args: object) -> None:
    try:
        await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except Exception as exc:  # a system task must never raise
        log.warning("background %s failed: %s: %s", getattr(fn, "__name__", fn), type(exc).__name__, exc)


class RedisBreakerBoard:
    """Shares breaker openings through Redis, so a fleet stays away from a failing provider.

    An instance whose breaker opens writes ``<prefix><provider>`` = the wall-clock time
    until which it is open (the key expires then). Every instance reads the board every
    ``[routing] breaker_sync_s`` and opens its own closed breaker until that time. Closing is
    not shared: after the TTL each instance probes the provider itself (one probe each).
    The Redis client is synchronous and always called from a worker thread.
    """

    def __init__(self, uri: str, prefix: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(uri, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix

    def publish_open(self, provider: str, until_wall: float) -> None:
        import time

        ttl_ms = int((until_wall - time.time()) * 1000)
        if ttl_ms > 0:
            self._redis.set(self._prefix + provider, repr(until_wall), px=ttl_ms)

    def fetch(self, providers: list[str]) -> dict[str, float]:
        values = self._redis.mget([self._prefix + p for p in providers])
        return {p: float(v) for p, v in zip(providers, values, strict=True) if v is not None}
