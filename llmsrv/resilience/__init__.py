"""Per-provider protection: circuit breaker (purgatory), rate limits (limits), bulkhead (trio).

    breaker.py   Breaker: purgatory's state machine on trio's clock (CLOSED / HALF_OPEN / OPEN)
    limiter.py   RateLimiter: requests and tokens per window (limits), a quiet memory storage
    guard.py     ProviderGuard: the breakers, bulkhead and limits of one provider as one async door
    fleet.py     RedisBreakerBoard, sync_breakers: openings shared by a fleet; in_background
                 (the only module that imports redis)

Theory of operation
-------------------
``ProviderGuard.attempt()`` is the one door to a provider call. In order it: asks the breaker for
a ticket (open -> ``CircuitOpen`` with ``retry_after_ms``), waits for a bulkhead slot, then
charges the rate limits (requests and an estimate of tokens; no headroom -> ``RateLimited`` with
``retry_after_ms``). When the call ends it records the outcome:

* success -> breaker success; the token estimate is corrected with the real usage;
* an upstream failure (``ProviderError``, an attempt timeout, any unexpected exception) -> breaker
  failure: an ``errors.LlmsrvError`` whose class says ``counts_for_breaker``, or any other
  ``Exception``;
* neutral -> nothing: ``trio.Cancelled`` (client cancel, request deadline, shutdown) and caller
  errors (``RequestError``, ``counts_for_breaker = False``) say nothing about the provider's health.

Breaker scope (``breaker_scope``): with ``"model"`` (the default) each ``provider:model`` has a
breaker of its own beside the provider's, and a call needs both to admit it. A failure of one
model counts on that model's breaker only, so ``mock:fail`` cannot close off ``mock:echo``; a
failure of the provider as a whole (``provider_wide``: no connection, refused credentials) counts
on the provider's breaker, which stops every model. With ``"provider"`` there is one breaker.

Everything is released in ``finally``: a cancelled request leaves no bulkhead slot, no half-open
probe slot and no pending breaker state behind.

``call_guarded`` runs one attempt through the door under the provider's ``timeout_ms``; the
request deadline is the caller's cancel scope, read with ``trio.current_effective_deadline()``.

The breaker uses purgatory's domain state machine (consecutive failures -> open -> half-open ->
closed) for counting and transitions, but keeps time itself (trio's clock, so tests run on
virtual time) and fixes what the notes measured: purgatory counts cancellations as failures,
counts excluded errors as successes, lets every concurrent call through in half-open and re-raises
one exception object whose traceback grows. Here half-open admits ``max_probes`` calls, outcomes
of calls admitted under an earlier state are ignored, and each refusal is a fresh exception.

Every stateful class has ``statistics()``, a frozen snapshot read without I/O (the rate-limit
part is what the last refusal taught); ``RateLimiter.check(tokens)`` is the one that asks the
storage. A fleet sharing a Redis ``storage_uri`` shares its rate limits (the limiter's storage)
and its breaker openings (``RedisBreakerBoard``, adopted by ``sync_breakers``); closing is not
shared.
"""

from __future__ import annotations

from .breaker import CLOSED, HALF_OPEN, HALF_OPEN_RETRY_MS, OPEN, STATE_CODE, Breaker, BreakerSnapshot, Ticket
from .fleet import RedisBreakerBoard, in_background, sync_breakers
from .guard import MAX_MODEL_BREAKERS, Admission, GuardSnapshot, LatencyWindow, ProviderGuard, call_guarded
from .limiter import RateLimiter, RateLimitSnapshot

__all__ = [
    "CLOSED", "HALF_OPEN", "HALF_OPEN_RETRY_MS", "MAX_MODEL_BREAKERS", "OPEN", "STATE_CODE",
    "Admission", "Breaker", "BreakerSnapshot", "GuardSnapshot", "LatencyWindow", "ProviderGuard",
    "RateLimitSnapshot", "RateLimiter", "RedisBreakerBoard", "Ticket",
    "call_guarded", "in_background", "sync_breakers",
]
