"""Runs an attempt plan under the request's deadline: fallback, retries, rate-limit waits, hedging.

Theory of operation
-------------------
The caller's cancel scope carries the request deadline (read here with
``trio.current_effective_deadline()``, never passed down); everything here runs inside it, so a
cancelled or expired request stops every attempt at once (and ``ProviderGuard`` releases what
each held). Which errors are worth another attempt is the errors' own policy (``retryable``).
Within it:

* **Fallback**: candidates are tried in plan order; a retryable failure (``ProviderError``
  including attempt timeouts, ``RateLimited``, ``CircuitOpen``, ``MissingCredentials``) moves
  on to the next candidate at once. A caller error (``RequestError``) ends the request.
* **Retries**: when every candidate of a round failed and attempts remain
  (``[routing.retry] max_attempts``), the router sleeps an exponential backoff with full jitter,
  at least the largest ``Retry-After`` seen, then plans again. It never sleeps past the deadline:
  if the wait would end after it, the last error is the answer.
* **Rate limits**: when the plan is empty because every candidate is rate limited, the router
  waits for the earliest headroom if the deadline allows, else answers ``RATE_LIMITED`` with
  ``retry_after_ms``. When every candidate's breaker is open: ``CIRCUIT_OPEN`` at once. A
  ``RATE_LIMITED`` answer always carries ``retry_after_ms``: the upstream's hint, else the limiter's,
  else the backoff the router would have waited next.
* **Not again**: a target that failed in a way another try would repeat (``retry_same_target``
  false: a body over ``max_upstream_bytes``, an exhausted quota) is not tried again in this
  request; other candidates still are.
* **Streaming**: once a chunk went out, a failure ends the request (no fallback mid-stream).
* **Hedging** (off by default): trio's happy-eyeballs shape. The first candidate starts; if it has
  neither succeeded nor failed after the hedge delay, the next starts too, and so on; a failure
  starts the next one at once; the first success wins and the others are cancelled (their
  guards record a neutral outcome, not a failure).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import trio

from . import errors
from .config import RetryConfig
from .messages import Attempt
from .providers import Completion
from .routing import Plan, Target

RunAttempt = Callable[[Target], Awaitable[Completion]]


class Result(msgspec.Struct):
    completion: Completion
    target: Target
    attempts: list[Attempt]


def backoff_s(round_no: int, retry: RetryConfig, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**round)]."""
    cap = min(retry.backoff_max_ms, retry.backoff_base_ms * (2 ** round_no)) / 1000
    return rng.uniform(0, cap)


class Router:
    def __init__(self, retry: RetryConfig, rng: random.Random | None = None) -> None:
        self.retry = retry
        self.rng = rng or random.Random()

    async def run(self, plan: Callable[[], Plan], attempt: RunAttempt, *,
                  hedge_delay: Callable[[Target], float] | None = None,
                  streamed: Callable[[], bool] = lambda: False) -> Result:
        """Answer with the first successful attempt, or raise the error that ends the request."""
        attempts: list[Attempt] = []
        spent: set[Target] = set()  # failed in a way that trying them again would repeat
        last: errors.LlmsrvError | None = None
        used = 0
        round_no = 0
        while True:
            current = plan()
            if not current.candidates:
                await self._wait_or_raise(current, trio.current_effective_deadline(), last, attempts)
                continue
            todo = [t for t in current.candidates if t not in spent]
            if not todo:
                assert last is not None
                raise self._final(last, attempts)
            todo = todo[: self.retry.max_attempts - used]
            used += len(todo)
            if hedge_delay is not None and len(todo) > 1:
                result, last = await self._hedged(todo, attempt, attempts, spent, hedge_delay, last)
            else:
                result, last = await self._in_turn(todo, attempt, attempts, spent, streamed, last)
            if result is not None:
                return result
            assert last is not None
            if used >= self.retry.max_attempts:
                raise self._final(last, attempts)
            if isinstance(last, errors.CircuitOpen) and not plan().candidates:
                continue  # a breaker that opened meanwhile refused: nothing left to try, answer now
            wait = max(backoff_s(round_no, self.retry, self.rng), (last.retry_after_ms or 0) / 1000)
            if trio.current_time() + wait >= trio.current_effective_deadline():  # looked up only after a failure
                raise self._final(last, attempts)
            round_no += 1
            await trio.sleep(wait)

    def _final(self, exc: errors.LlmsrvError, attempts: list[Attempt]) -> errors.LlmsrvError:
        """``exc`` as the request's answer: with what was tried, and a ``RATE_LIMITED`` always with a
        retry hint (when the upstream gave none, the backoff the router would have waited next)."""
        exc.attempts = list(attempts)
        if isinstance(exc, errors.RateLimited) and exc.retry_after_ms is None:
            exc.retry_after_ms = max(1, min(self.retry.backoff_max_ms, self.retry.backoff_base_ms << len(attempts)))
        return exc

    async def _in_turn(self, todo: Sequence[Target], attempt: RunAttempt, attempts: list[Attempt],
                       spent: set[Target], streamed: Callable[[], bool], last: errors.LlmsrvError | None,
                       ) -> tuple[Result | None, errors.LlmsrvError | None]:
        for target in todo:
            started = trio.current_time()
            try:
                completion = await attempt(target)
            except errors.LlmsrvError as exc:
                if not exc.retryable:
                    raise
                _failed(target, exc, started, attempts, spent)
                if streamed():
                    raise self._final(exc, attempts) from None
                last = exc
                continue
            attempts.append(_attempt(target, "ok", started))
            return Result(completion, target, attempts), last
        return None, last

    async def _hedged(self, todo: Sequence[Target], attempt: RunAttempt, attempts: list[Attempt],
                      spent: set[Target], hedge_delay: Callable[[Target], float], last: errors.LlmsrvError | None,
                      ) -> tuple[Result | None, errors.LlmsrvError | None]:
        winner: list[Result] = []
        fatal: list[BaseException] = []
        failures: list[errors.LlmsrvError] = []

        async def one(target: Target, failed: trio.Event) -> None:
            started = trio.current_time()
            try:
                completion = await attempt(target)
            except trio.Cancelled:
                attempts.append(_attempt(target, "cancelled", started))
                raise
            except errors.LlmsrvError as exc:
                if not exc.retryable:
                    fatal.append(exc)
                    nursery.cancel_scope.cancel()
                    return
                _failed(target, exc, started, attempts, spent)
                failures.append(exc)
                failed.set()
                return
            except BaseException as exc:  # a caller error or a bug ends the whole request
                fatal.append(exc)
                nursery.cancel_scope.cancel()
                return
            attempts.append(_attempt(target, "ok", started))
            winner.append(Result(completion, target, attempts))
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for i, target in enumerate(todo):
                failed = trio.Event()
                nursery.start_soon(one, target, failed)
                if i + 1 < len(todo):
                    with trio.move_on_after(hedge_delay(target)):
                        await failed.wait()
        if fatal:
            raise fatal[0]
        if winner:
            return winner[0], last
        return None, failures[-1] if failures else last

    async def _wait_or_raise(self, current: Plan, deadline: float, last: errors.LlmsrvError | None,
                             attempts: list[Attempt]) -> None:
        """Nothing can be tried now: wait for rate-limit headroom if the deadline allows, else end.

        When this request already failed somewhere (e.g. its failures just opened the breaker),
        that failure is the answer, with the attempts that led to it.
        """
        limited = [s.retry_after_ms or 1 for s in current.skipped if s.reason == "rate_limited"]
        opened = [s.retry_after_ms or 1 for s in current.skipped if s.reason == "circuit_open"]
        if limited and trio.current_time() + min(limited) / 1000 < deadline:
            await trio.sleep(min(limited) / 1000)
            return
        if last is not None:
            raise self._final(last, attempts)
        if limited:
            raise errors.RateLimited("every candidate provider is rate limited", retry_after_ms=min(limited))
        if opened:
            raise errors.CircuitOpen("every candidate provider's circuit breaker is open",
                                     retry_after_ms=min(opened))
        raise errors.MissingCredentials("no candidate provider has usable credentials")


def _failed(target: Target, exc: errors.LlmsrvError, started: float, attempts: list[Attempt],
            spent: set[Target]) -> None:
    attempts.append(_attempt(target, exc.outcome, started))
    if not exc.retry_same_target:
        spent.add(target)


def _attempt(target: Target, outcome: str, started: float) -> Attempt:
    return Attempt(target.provider, target.model, outcome, round((trio.current_time() - started) * 1000))
