"""The circuit breaker of one provider (or one ``provider:model``): purgatory's state machine on trio's clock.

purgatory counts consecutive failures and makes the transitions; this module keeps the time
itself (trio's clock, so tests run on virtual time) and fixes what the notes measured: purgatory
counts cancellations as failures, counts excluded errors as successes, lets every concurrent call
through in half-open and re-raises one exception object whose traceback grows. Here half-open
admits ``max_probes`` calls, outcomes of calls admitted under an earlier state are ignored, and
each refusal is a fresh exception.

An operator can force a breaker (``llmsrv breaker open|close|reset``), as resilience4j's
``transitionToForcedOpenState`` / ``transitionToClosedState`` / ``reset`` do: forced open, it
refuses every call until an operator closes it (no TTL, no half-open probe, reported as ``open``
with ``forced``); closing clears the failure count and any forced state, and counting starts afresh
(it can open again on failures). Either way, outcomes of calls admitted before are ignored. The
forced state lives in this process only (not shared through the fleet board, not kept across a
restart): the admin command reaches every instance itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec
import trio
from purgatory.domain.messages.events import ContextChanged
from purgatory.domain.model import ClosedState, Context, HalfOpenedState, OpenedState

from .. import errors

CLOSED, HALF_OPEN, OPEN = "closed", "half-open", "open"
STATE_CODE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
_PURGATORY_STATE = {"closed": CLOSED, "half-opened": HALF_OPEN, "opened": OPEN}
HALF_OPEN_RETRY_MS = 500  # what a caller refused in half-open (probe busy) is told to wait

Clock = Callable[[], float]
OnTransition = Callable[[str, str, str], None]  # breaker name, from_state, to_state


class _Failure(Exception):
    """What the breaker is told when a call failed (purgatory wants an exception)."""


class Ticket(msgspec.Struct):
    generation: int
    probe: bool


class BreakerSnapshot(msgspec.Struct, frozen=True):
    state: str
    failures: int
    retry_after_s: float  # 0 unless open on its own (forced open has no end)
    probes_in_flight: int
    threshold: int = 0
    ttl_s: float = 0.0
    forced: bool = False  # forced open by an operator: stays open until closed (llmsrv breaker close|reset)


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
        self._forced = False

    @property
    def state(self) -> str:
        return self._last_state  # purgatory's state, mirrored by _sync after every change

    @property
    def threshold(self) -> int:
        return int(self._ctx.threshold)

    @property
    def ttl_s(self) -> float:
        return float(self._ctx.ttl)

    @property
    def forced(self) -> bool:
        return self._forced

    def tune(self, threshold: int | None = None, ttl_s: float | None = None) -> None:
        if threshold is not None:
            self._ctx.threshold = threshold
        if ttl_s is not None:
            self._ctx.ttl = ttl_s

    def statistics(self) -> BreakerSnapshot:
        """A frozen snapshot (no I/O)."""
        state = self.state
        retry = max(0.0, self._opened_at + self._ctx.ttl - self._clock()) if state == OPEN and not self._forced else 0.0
        return BreakerSnapshot(state, self._ctx.failure_count or 0, retry, self._probes, self.threshold, self.ttl_s,
                               self._forced)

    def is_clean(self) -> bool:
        """Closed, with no failure counted and no probe out: nothing worth remembering."""
        return self.state == CLOSED and not self._ctx.failure_count and not self._probes

    def blocked_for(self) -> float | None:
        """Seconds until this breaker admits a call again, or None if it would admit one now."""
        state = self.state
        if state == OPEN:
            if self._forced:
                return self._forced_retry_s()
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
        """When an open breaker half-opens, on this breaker's clock; None unless open (or forced: no end)."""
        return self._opened_at + self._ctx.ttl if self.state == OPEN and not self._forced else None

    def force_open(self) -> None:
        """Open until ``force_close()``: no TTL, no half-open probe (an operator's ``breaker open``)."""
        self._forced = True
        self._generation += 1  # calls admitted before decide nothing
        if self._last_state != OPEN:
            self._ctx.set_state(OpenedState(self.name))
            self._sync()

    def force_close(self) -> None:
        """Closed, no failure counted, no forced state; counting starts afresh (``breaker close|reset``)."""
        self._forced = False
        self._generation += 1  # a failure admitted before the close does not count after it
        was = self._last_state
        self._ctx.set_state(ClosedState())
        if was == CLOSED:
            self._ctx.messages.clear()  # only the count was cleared: no transition to report
        else:
            self._sync()

    def _forced_retry_s(self) -> float:
        """What a caller refused by a forced-open breaker is told to wait: it has no end, so its TTL."""
        return max(1.0, float(self._ctx.ttl))

    def admit(self) -> Ticket:
        """A ticket for one call, or a fresh ``CircuitOpen``."""
        if self.state == OPEN:
            if self._forced:
                raise errors.CircuitOpen(f"circuit breaker of provider {self.name!r} is forced open by an operator",
                                         retry_after_ms=math.ceil(self._forced_retry_s() * 1000))
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
