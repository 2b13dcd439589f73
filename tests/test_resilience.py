"""Breaker, rate limits, bulkhead and router on virtual time (autojump clock), with exact timelines.

limits reads the wall clock (``time.time()``) inside its storage; ``virtual_wall`` points that
clock at trio's virtual clock for these tests, so windows advance with ``trio.sleep``.
"""

from __future__ import annotations

import random
import types
from collections.abc import Callable, Iterator

import limits.storage.memory
import limits.strategies
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsrv import errors
from llmsrv.config import ProviderConfig, RetryConfig
from llmsrv.messages import Usage
from llmsrv.providers import Completion
from llmsrv.resilience import CLOSED, HALF_OPEN, OPEN, Breaker, ProviderGuard, RateLimiter
from llmsrv.router import Router
from llmsrv.routing import Plan, Skip, Target

A, B, C = Target("a", "m"), Target("b", "m"), Target("c", "m")
OK = Completion(text="ok", usage=Usage(1, 1))
WALL0 = 1_800_000_000.0


@pytest.fixture
def virtual_wall(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], float]]:
    def wall() -> float:
        return WALL0 + trio.current_time()

    shim = types.SimpleNamespace(time=wall)
    monkeypatch.setattr(limits.storage.memory, "time", shim)
    monkeypatch.setattr(limits.strategies, "time", shim)
    yield wall


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- breaker ------------------------------------------------------------------------------------

def test_breaker_lifecycle_with_one_probe() -> None:
    clock, seen = Clock(), []
    b = Breaker("p", threshold=2, ttl_s=10, clock=clock, on_transition=lambda *a: seen.append(a))
    b.record(b.admit(), "failure")
    assert b.state == CLOSED
    b.record(b.admit(), "failure")
    assert b.state == OPEN
    clock.now = 4
    with pytest.raises(errors.CircuitOpen) as first:
        b.admit()
    with pytest.raises(errors.CircuitOpen) as second:
        b.admit()
    assert first.value is not second.value  # fresh each time: no traceback growth
    assert first.value.retry_after_ms == 6000
    clock.now = 10.5
    probe = b.admit()
    assert b.state == HALF_OPEN and probe.probe
    with pytest.raises(errors.CircuitOpen):
        b.admit()  # a single probe in half-open
    b.record(probe, "success")
    assert b.state == CLOSED
    assert seen == [("p", CLOSED, OPEN), ("p", OPEN, HALF_OPEN), ("p", HALF_OPEN, CLOSED)]


def test_breaker_neutral_outcomes_count_for_nothing() -> None:
    clock = Clock()
    b = Breaker("p", threshold=2, ttl_s=10, clock=clock)
    b.record(b.admit(), "failure")
    for _ in range(10):
        b.record(b.admit(), "neutral")  # cancellations, caller errors
    assert b.snapshot().failures == 1  # not reset (purgatory would count an excluded error as success)
    b.record(b.admit(), "failure")
    assert b.state == OPEN
    clock.now = 11
    probe = b.admit()
    b.record(probe, "neutral")  # a cancelled probe frees its slot and decides nothing
    assert b.state == HALF_OPEN and b.snapshot().probes_in_flight == 0
    b.record(b.admit(), "failure")
    assert b.state == OPEN and b.blocked_for() == pytest.approx(10)


def test_breaker_ignores_outcomes_from_before_a_transition() -> None:
    clock = Clock()
    b = Breaker("p", threshold=1, ttl_s=1, clock=clock)
    slow = b.admit()  # admitted while closed, finishes after the circuit opened and half-opened
    b.record(b.admit(), "failure")
    clock.now = 2
    probe = b.admit()
    b.record(slow, "success")
    assert b.state == HALF_OPEN  # the stale success did not close it
    b.record(probe, "success")
    assert b.state == CLOSED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "success", "failure", "neutral", "tick"]),
                          st.floats(0, 3)), max_size=60),
       st.integers(1, 3), st.integers(1, 3))
def test_breaker_properties(ops: list[tuple[str, float]], threshold: int, probes: int) -> None:
    clock = Clock()
    b = Breaker("p", threshold=threshold, ttl_s=2, max_probes=probes, clock=clock)
    held = []
    for op, value in ops:
        if op == "tick":
            clock.now += value
        elif op == "admit":
            try:
                held.append(b.admit())
            except errors.CircuitOpen as exc:
                assert exc.retry_after_ms and exc.retry_after_ms > 0
        elif held:
            before = (b.state, b.snapshot().failures)
            b.record(held.pop(0), op)
            if op == "neutral":
                assert (b.state, b.snapshot().failures) == before  # a cancellation is never counted
        snap = b.snapshot()
        assert snap.probes_in_flight <= probes
        assert snap.probes_in_flight == sum(t.probe for t in held)


# ---- rate limits ----------------------------------------------------------------------------------

async def test_rate_limits_requests_and_tokens(virtual_wall: Callable[[], float],
                                                autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("p", "2/minute", "100/minute", wall=virtual_wall)
    limiter.acquire(30)
    limiter.acquire(30)
    with pytest.raises(errors.RateLimited) as rpm:
        limiter.acquire(1)
    assert rpm.value.limit == "rpm" and 0 < rpm.value.retry_after_ms <= 60000  # type: ignore[attr-defined]
    await trio.sleep(120)
    limiter.acquire(90)
    with pytest.raises(errors.RateLimited) as tpm:
        limiter.acquire(20)
    assert tpm.value.limit == "tpm"  # type: ignore[attr-defined]
    limiter.correct(estimated=90, actual=10)  # the real usage was smaller: 80 tokens come back
    limiter.acquire(20)


def test_memory_storage_starts_no_timer_threads() -> None:
    import threading

    limiter = RateLimiter("p", "1000/second", "100000/second")
    timer = limiter._storage.timer
    for _ in range(200):
        limiter.acquire(10)
    # stock MemoryStorage replaces its timer with a newly started Timer thread on every hit
    assert limiter._storage.timer is timer and isinstance(timer, threading.Timer)


# ---- guard: cancellation consistency -------------------------------------------------------------

def _guard(**kw: object) -> ProviderGuard:
    cfg = ProviderConfig(**{"breaker_threshold": 2, "breaker_ttl_s": 5, "max_concurrency": 1,
                            "rpm": "10/minute", "tpm": "1000/minute", **kw})  # type: ignore[arg-type]
    return ProviderGuard("p", cfg)


async def test_guard_records_outcomes(virtual_wall: Callable[[], float],
                                      autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard()
    with pytest.raises(errors.ValidationFailed):  # the caller's fault says nothing of the provider
        async with guard.attempt(10):
            raise errors.ValidationFailed("bad")
    assert guard.breaker.snapshot().failures == 0
    with pytest.raises(errors.MissingCredentials):  # refused credentials: the provider as a whole fails
        async with guard.attempt(10):
            raise errors.MissingCredentials("no key")
    assert guard.breaker.snapshot().failures == 1
    async with guard.attempt(10):
        pass
    assert guard.breaker.snapshot().failures == 0
    for _ in range(2):
        with pytest.raises(errors.ProviderError):
            async with guard.attempt(10):
                raise errors.ProviderError("502")
    assert guard.breaker.state == OPEN
    with pytest.raises(errors.CircuitOpen):
        async with guard.attempt(10):
            pass


@pytest.mark.parametrize("stage", ["queued", "calling", "probe"])
async def test_cancel_at_every_stage_leaks_nothing(stage: str, virtual_wall: Callable[[], float],
                                                    autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard()
    if stage == "probe":
        for _ in range(2):
            with pytest.raises(errors.ProviderError):
                async with guard.attempt(10):
                    raise errors.ProviderError("x")
        await trio.sleep(6)
    before = (guard.breaker.snapshot().failures, guard.limiter.snapshot(1000), guard.bulkhead.borrowed_tokens)
    blocker_done = trio.Event()

    async def blocker() -> None:
        async with guard.attempt(0):
            await blocker_done.wait()

    async with trio.open_nursery() as nursery:
        if stage == "queued":
            nursery.start_soon(blocker)
            await trio.sleep(1)
        with trio.move_on_after(2):
            async with guard.attempt(500):
                await trio.sleep(100)
        blocker_done.set()
    snap = guard.breaker.snapshot()
    assert snap.probes_in_flight == 0 and guard.bulkhead.borrowed_tokens == 0
    assert snap.failures == before[0]
    if stage == "queued":  # never sent: no rate-limit budget spent by the cancelled attempt
        assert guard.limiter.snapshot(1000) == before[1]
    if stage == "probe":
        assert guard.breaker.state == HALF_OPEN  # the cancelled probe decided nothing
        async with guard.attempt(1):
            pass
        assert guard.breaker.state == CLOSED


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


ROUTER = Router(RetryConfig(max_attempts=3, backoff_base_ms=0, backoff_max_ms=0), random.Random(1))


async def test_fallback_after_failure(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.1, errors.ProviderError("502"))], B: [(0.2, None)]}, log)
    result = await ROUTER.run(_fixed(A, B), attempt, deadline=10)
    assert result.target == B and trio.current_time() == pytest.approx(0.3)
    assert [(a.provider, a.outcome, a.ms) for a in result.attempts] == [("a", "provider_error", 100), ("b", "ok", 200)]
    assert log == [(0, "start a"), (pytest.approx(0.1), "start b")]


async def test_caller_error_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.1, errors.ValidationFailed("bad tool"))], B: [(0.1, None)]}, log)
    with pytest.raises(errors.ValidationFailed):
        await ROUTER.run(_fixed(A, B), attempt, deadline=10)
    assert log == [(0, "start a")]


async def test_backoff_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.0, errors.RateLimited("429", retry_after_ms=1500)), (0.1, None)]}, log)
    result = await ROUTER.run(_fixed(A), attempt, deadline=10)
    assert [t for t, _ in log] == [0, pytest.approx(1.5)]
    assert [a.outcome for a in result.attempts] == ["rate_limited", "ok"]


async def test_backoff_is_exponential_with_full_jitter(autojump_clock: trio.testing.MockClock) -> None:
    router = Router(RetryConfig(max_attempts=4, backoff_base_ms=100, backoff_max_ms=10000), random.Random(7))
    log: list[tuple[float, str]] = []
    fail = (0.0, errors.ProviderError("x"))
    attempt = _script({A: [fail, fail, fail, (0, None)]}, log)
    await router.run(_fixed(A), attempt, deadline=100)
    gaps = [b - a for (a, _), (b, _) in zip(log, log[1:], strict=False)]
    rng = random.Random(7)
    assert gaps == [pytest.approx(rng.uniform(0, 0.1 * 2 ** i)) for i in range(3)]


async def test_never_sleeps_past_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.0, errors.RateLimited("429", retry_after_ms=5000))]}, log)
    with pytest.raises(errors.RateLimited) as info:
        await ROUTER.run(_fixed(A), attempt, deadline=2)
    assert trio.current_time() == 0 and info.value.attempts[0].outcome == "rate_limited"


async def test_max_attempts_bounds_the_work(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    fail = (0.01, errors.ProviderError("502"))
    attempt = _script({A: [fail] * 5, B: [fail] * 5}, log)
    with pytest.raises(errors.ProviderError) as info:
        await ROUTER.run(_fixed(A, B), attempt, deadline=60)
    assert [name for _, name in log] == ["start a", "start b", "start a"]
    assert len(info.value.attempts) == 3


@pytest.mark.parametrize(("deadline", "expect"), [(5, "wait"), (0.3, "reject")])
async def test_rate_limit_wait_vs_reject(deadline: float, expect: str,
                                         autojump_clock: trio.testing.MockClock) -> None:
    plans = iter([Plan([], [Skip(A, "rate_limited", 500), Skip(B, "circuit_open", 9000)]), Plan([A], [])])
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.0, None)]}, log)
    if expect == "wait":
        result = await ROUTER.run(lambda: next(plans), attempt, deadline=deadline)
        assert result.target == A and log == [(pytest.approx(0.5), "start a")]
    else:
        with pytest.raises(errors.RateLimited) as info:
            await ROUTER.run(lambda: next(plans), attempt, deadline=deadline)
        assert info.value.retry_after_ms == 500 and trio.current_time() == 0


async def test_all_breakers_open_answers_circuit_open(autojump_clock: trio.testing.MockClock) -> None:
    plan = Plan([], [Skip(A, "circuit_open", 3000), Skip(B, "circuit_open", 1200)])
    with pytest.raises(errors.CircuitOpen) as info:
        await ROUTER.run(lambda: plan, _script({}, []), deadline=60)
    assert info.value.retry_after_ms == 1200


async def test_hedge_starts_the_next_and_cancels_the_loser(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(1.0, None)], B: [(0.2, None)], C: [(0.1, None)]}, log)
    result = await ROUTER.run(_fixed(A, B, C), attempt, deadline=10, hedge_delay=lambda t: 0.3)
    assert result.target == B and trio.current_time() == pytest.approx(0.5)
    assert log == [(0, "start a"), (pytest.approx(0.3), "start b"), (pytest.approx(0.5), "cancelled a")]
    assert sorted((a.provider, a.outcome) for a in result.attempts) == [("a", "cancelled"), ("b", "ok")]


async def test_hedge_failure_starts_the_next_at_once(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(0.1, errors.ProviderError("x"))], B: [(0.1, None)]}, log)
    result = await ROUTER.run(_fixed(A, B), attempt, deadline=10, hedge_delay=lambda t: 5)
    assert result.target == B and log == [(0, "start a"), (pytest.approx(0.1), "start b")]


async def test_no_fallback_once_streaming_started(autojump_clock: trio.testing.MockClock) -> None:
    attempt = _script({A: [(0.1, errors.ProviderError("cut"))], B: [(0.1, None)]}, [])
    with pytest.raises(errors.ProviderError):
        await ROUTER.run(_fixed(A, B), attempt, deadline=10, streamed=lambda: True)


async def test_request_cancel_stops_every_attempt(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[float, str]] = []
    attempt = _script({A: [(5, None)], B: [(5, None)]}, log)
    with trio.move_on_after(1):
        await ROUTER.run(_fixed(A, B), attempt, deadline=10, hedge_delay=lambda t: 0.5)
    assert sorted(log) == [(0, "start a"), (0.5, "start b"), (1, "cancelled a"), (1, "cancelled b")]


async def test_guard_breaker_timeline(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard(rpm=None, tpm=None, breaker_ttl_s=5, max_concurrency=4)
    for _ in range(2):
        with pytest.raises(errors.ProviderError):
            async with guard.attempt(1):
                await trio.sleep(0.5)
                raise errors.ProviderError("503")
    assert guard.breaker.state == OPEN and trio.current_time() == 1.0
    await trio.sleep(3.5)
    with pytest.raises(errors.CircuitOpen) as info:
        async with guard.attempt(1):
            pass
    assert info.value.retry_after_ms == 1500
    await trio.sleep(1.5)  # t = 6.0: the TTL is over
    seen: list[tuple[float, str]] = []

    async def probe() -> None:
        async with guard.attempt(1):
            seen.append((trio.current_time(), "probe admitted"))
            await trio.sleep(1)

    async def second() -> None:
        await trio.sleep(0.1)
        try:
            async with guard.attempt(1):
                seen.append((trio.current_time(), "second admitted"))
        except errors.CircuitOpen:
            seen.append((trio.current_time(), "second refused"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        nursery.start_soon(second)
    assert seen == [(6.0, "probe admitted"), (pytest.approx(6.1), "second refused")]
    assert guard.breaker.state == CLOSED and trio.current_time() == 7.0


async def test_cancel_during_backoff_leaves_guard_clean(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard(rpm=None, tpm=None, breaker_threshold=10, max_concurrency=1)
    router = Router(RetryConfig(max_attempts=3, backoff_base_ms=10000, backoff_max_ms=10000), random.Random(3))

    async def attempt(target: Target) -> Completion:
        async with guard.attempt(1):
            raise errors.ProviderError("502")

    with trio.move_on_after(0.001):  # the backoff after the first failure is cancelled
        await router.run(_fixed(A), attempt, deadline=100)
    snap = guard.breaker.snapshot()
    assert guard.bulkhead.borrowed_tokens == 0 and snap.probes_in_flight == 0 and snap.failures == 1


async def test_own_failure_beats_the_breaker_it_opened(autojump_clock: trio.testing.MockClock) -> None:
    plans = iter([Plan([A], []), Plan([], [Skip(A, "circuit_open", 30000)])])
    attempt = _script({A: [(0.1, errors.ProviderError("502"))]}, [])
    with pytest.raises(errors.ProviderError) as info:
        await ROUTER.run(lambda: next(plans), attempt, deadline=10)
    assert [a.outcome for a in info.value.attempts] == ["provider_error"]
