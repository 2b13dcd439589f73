"""The router on virtual time (autojump clock): fallback, retries, rate-limit waits, hedging, exact timelines."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from llmsrv import errors
from llmsrv.config import ProviderConfig, RetryConfig
from llmsrv.messages import Usage
from llmsrv.providers import Completion
from llmsrv.resilience import ProviderGuard
from llmsrv.router import Router
from llmsrv.routing import Plan, Skip, Target

A, B, C = Target("a", "m"), Target("b", "m"), Target("c", "m")
OK = Completion(text="ok", usage=Usage(1, 1))


def _guard(**kw: object) -> ProviderGuard:
    cfg = ProviderConfig(**{"breaker_threshold": 2, "breaker_ttl_s": 5, "max_concurrency": 1,
                            "rpm": "10/minute", "tpm": "1000/minute", **kw})  # type: ignore[arg-type]
    return ProviderGuard("p", cfg)


# ---- router timelines ------------------------------------------------------------------------------

def _script(behaviour: dict[Target, list[tuple[float, BaseException | None]]], log: list[tuple[float, str]]):
    calls = {t: iter(v) for t, v in behaviour.items()}

    async def attempt(target: Target) -> Completion:
        delay, exc = next(calls[target])
        log.append((trio.current_time(), f"start {target.provider}"))
        try:
            await trio.sleep(delay)
        except trio.Cancelled:
            log.append((trio.current_time(), f"cancelled {target.provider}"))
            raise
        if exc is not None:
            raise exc
        return Completion(text=target.provider, usage=Usage(1, 1))

    return attempt


def _fixed(*targets: Target) -> Callable[[], Plan]:
    return lambda: Plan(list(targets), [])


async def run(router: Router, plan: Callable[[], Plan], attempt: Callable[[Target], Awaitable[Completion]], *,
              deadline: float, **kw: Any) -> Any:
    """``router.run`` under a request cancel scope with ``deadline`` (the router reads it from trio)."""
    with trio.CancelScope(deadline=deadline):
        return await router.run(plan, attempt, **kw)
    raise AssertionError("the request's cancel scope expired: the router should have answered before")


ROUTER = Router(RetryConfig(max_attempts=3, backoff_base_ms=0, backoff_max_ms=0), random.Random(1))


async def test_fallback_after_failure(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.1, errors.ProviderError("502"))], B: [(0.2, None)]}, log)
    result = await run(ROUTER, _fixed(A, B), attempt, deadline=10)
    assert result.target == B and trio.current_time() == pytest.approx(0.3)
    assert [(a.provider, a.outcome, a.ms) for a in result.attempts] == [("a", "provider_error", 100), ("b", "ok", 200)]
    assert log == [(0, "start a"), (pytest.approx(0.1), "start b")]


async def test_caller_error_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.1, errors.ValidationFailed("bad tool"))], B: [(0.1, None)]}, log)
    with pytest.raises(errors.ValidationFailed):
        await run(ROUTER, _fixed(A, B), attempt, deadline=10)
    assert log == [(0, "start a")]


async def test_backoff_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.0, errors.RateLimited("429", retry_after_ms=1500)), (0.1, None)]}, log)
    result = await run(ROUTER, _fixed(A), attempt, deadline=10)
    assert [t for t, _ in log] == [0, pytest.approx(1.5)]
    assert [a.outcome for a in result.attempts] == ["rate_limited", "ok"]


async def test_backoff_is_exponential_with_full_jitter(autojump_clock: trio.testing.MockClock) -> None:
    router = Router(RetryConfig(max_attempts=4, backoff_base_ms=100, backoff_max_ms=10000), random.Random(7))
    log: list[tuple[float, str]] = []
    fail = (0.0, errors.ProviderError("x"))
    attempt = _script({A: [fail, fail, fail, (0, None)]}, log)
    await run(router, _fixed(A), attempt, deadline=100)
    gaps = [b - a for (a, _), (b, _) in zip(log, log[1:], strict=False)]
    rng = random.Random(7)
    assert gaps == [pytest.approx(rng.uniform(0, 0.1 * 2 ** i)) for i in range(3)]


async def test_never_sleeps_past_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.0, errors.RateLimited("429", retry_after_ms=5000))]}, log)
    with pytest.raises(errors.RateLimited) as info:
        await run(ROUTER, _fixed(A), attempt, deadline=2)
    assert trio.current_time() == 0 and info.value.attempts[0].outcome == "rate_limited"


async def test_max_attempts_bounds_the_work(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    fail = (0.01, errors.ProviderError("502"))
    attempt = _script({A: [fail] * 5, B: [fail] * 5}, log)
    with pytest.raises(errors.ProviderError) as info:
        await run(ROUTER, _fixed(A, B), attempt, deadline=60)
    assert [name for _, name in log] == ["start a", "start b", "start a"]
    assert len(info.value.attempts) == 3


@pytest.mark.parametrize(("deadline", "expect"), [(5, "wait"), (0.3, "reject")])
async def test_rate_limit_wait_vs_reject(deadline: float, expect: str,
                                         autojump_clock: trio.testing.MockClock) -> None:
    plans = iter([Plan([], [Skip(A, "rate_limited", 500), Skip(B, "circuit_open", 9000)]), Plan([A], [])])
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.0, None)]}, log)
    if expect == "wait":
        result = await run(ROUTER, lambda: next(plans), attempt, deadline=deadline)
        assert result.target == A and log == [(pytest.approx(0.5), "start a")]
    else:
        with pytest.raises(errors.RateLimited) as info:
            await run(ROUTER, lambda: next(plans), attempt, deadline=deadline)
        assert info.value.retry_after_ms == 500 and trio.current_time() == 0


async def test_all_breakers_open_answers_circuit_open(autojump_clock: trio.testing.MockClock) -> None:
    plan = Plan([], [Skip(A, "circuit_open", 3000), Skip(B, "circuit_open", 1200)])
    with pytest.raises(errors.CircuitOpen) as info:
        await run(ROUTER, lambda: plan, _script({}, []), deadline=60)
    assert info.value.retry_after_ms == 1200


async def test_hedge_starts_the_next_and_cancels_the_loser(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(1.0, None)], B: [(0.2, None)], C: [(0.1, None)]}, log)
    result = await run(ROUTER, _fixed(A, B, C), attempt, deadline=10, hedge_delay=lambda t: 0.3)
    assert result.target == B and trio.current_time() == pytest.approx(0.5)
    assert log == [(0, "start a"), (pytest.approx(0.3), "start b"), (pytest.approx(0.5), "cancelled a")]
    assert sorted((a.provider, a.outcome) for a in result.attempts) == [("a", "cancelled"), ("b", "ok")]


async def test_hedge_failure_starts_the_next_at_once(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.1, errors.ProviderError("x"))], B: [(0.1, None)]}, log)
    result = await run(ROUTER, _fixed(A, B), attempt, deadline=10, hedge_delay=lambda t: 5)
    assert result.target == B and log == [(0, "start a"), (pytest.approx(0.1), "start b")]


async def test_no_fallback_once_streaming_started(autojump_clock: trio.testing.MockClock) -> None:
    attempt = _script({A: [(0.1, errors.ProviderError("cut"))], B: [(0.1, None)]}, [])
    with pytest.raises(errors.ProviderError):
        await run(ROUTER, _fixed(A, B), attempt, deadline=10, streamed=lambda: True)


async def test_request_cancel_stops_every_attempt(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(5, None)], B: [(5, None)]}, log)
    with trio.move_on_after(1):
        await run(ROUTER, _fixed(A, B), attempt, deadline=10, hedge_delay=lambda t: 0.5)
    assert sorted(log) == [(0, "start a"), (0.5, "start b"), (1, "cancelled a"), (1, "cancelled b")]


async def test_cancel_during_backoff_leaves_guard_clean(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard(rpm=None, tpm=None, breaker_threshold=10, max_concurrency=1)
    router = Router(RetryConfig(max_attempts=3, backoff_base_ms=10000, backoff_max_ms=10000), random.Random(3))

    async def attempt(target: Target) -> Completion:
        async with guard.attempt(1):
            raise errors.ProviderError("502")

    request = trio.CancelScope()  # cancelled like llm.cancel does (a deadline would shorten the backoff instead)

    async def serve() -> None:
        with request:
            await run(router, _fixed(A), attempt, deadline=100)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await trio.sleep(0.001)  # the backoff after the first failure is under way: cancel it
        request.cancel()
    assert request.cancelled_caught
    snap = guard.breaker.statistics()
    assert guard.statistics().in_flight == 0 and snap.probes_in_flight == 0 and snap.failures == 1


async def test_own_failure_beats_the_breaker_it_opened(autojump_clock: trio.testing.MockClock) -> None:
    plans = iter([Plan([A], []), Plan([], [Skip(A, "circuit_open", 30000)])])
    attempt = _script({A: [(0.1, errors.ProviderError("502"))]}, [])
    with pytest.raises(errors.ProviderError) as info:
        await run(ROUTER, lambda: next(plans), attempt, deadline=10)
    assert [a.outcome for a in info.value.attempts] == ["provider_error"]


async def test_a_breaker_that_opened_meanwhile_is_answered_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """The attempt's breaker opened while the plan was made (a concurrent request's failure): with nothing
    left to try, CIRCUIT_OPEN now, not after sleeping out its TTL inside the deadline."""
    target = Target("mock", "fail")
    plans = iter([Plan([target], []), Plan([], [Skip(target, "circuit_open", 30000)]),
                  Plan([], [Skip(target, "circuit_open", 30000)])])

    async def attempt(_: Target) -> Completion:
        raise errors.CircuitOpen("opened meanwhile", retry_after_ms=30000)

    router = Router(RetryConfig(max_attempts=3, backoff_base_ms=100, backoff_max_ms=5000))
    with pytest.raises(errors.CircuitOpen) as info:
        await run(router, lambda: next(plans), attempt, deadline=60)
    assert trio.current_time() == 0 and info.value.retry_after_ms == 30000
