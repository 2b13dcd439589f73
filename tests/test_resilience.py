"""Breaker, rate limits and bulkhead on virtual time (autojump clock), with exact timelines.

limits reads the wall clock (``time.time()``) inside its storage; ``virtual_wall`` points that
clock at trio's virtual clock for these tests, so windows advance with ``trio.sleep``.
"""

from __future__ import annotations

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
from llmsrv.config import ProviderConfig
from llmsrv.messages import Usage
from llmsrv.providers import Completion
from llmsrv.resilience import CLOSED, HALF_OPEN, OPEN, Breaker, ProviderGuard, RateLimiter, call_guarded
from llmsrv.resilience.limiter import RateLimitSnapshot

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
    assert b.statistics().failures == 1  # not reset (purgatory would count an excluded error as success)
    b.record(b.admit(), "failure")
    assert b.state == OPEN
    clock.now = 11
    probe = b.admit()
    b.record(probe, "neutral")  # a cancelled probe frees its slot and decides nothing
    assert b.state == HALF_OPEN and b.statistics().probes_in_flight == 0
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
            before = (b.state, b.statistics().failures)
            b.record(held.pop(0), op)
            if op == "neutral":
                assert (b.state, b.statistics().failures) == before  # a cancellation is never counted
        snap = b.statistics()
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
    assert rpm.value.limit == "rpm" and 0 < rpm.value.retry_after_ms <= 60000  # type: ignore[operator]
    await trio.sleep(120)
    limiter.acquire(90)
    with pytest.raises(errors.RateLimited) as tpm:
        limiter.acquire(20)
    assert tpm.value.limit == "tpm"
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
    assert guard.breaker.statistics().failures == 0
    with pytest.raises(errors.MissingCredentials):  # refused credentials: the provider as a whole fails
        async with guard.attempt(10):
            raise errors.MissingCredentials("no key")
    assert guard.breaker.statistics().failures == 1
    async with guard.attempt(10):
        pass
    assert guard.breaker.statistics().failures == 0
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
    before = (guard.breaker.statistics().failures, guard.limiter.check(1000), guard.statistics().in_flight)
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
    snap = guard.breaker.statistics()
    assert snap.probes_in_flight == 0 and guard.statistics().in_flight == 0
    assert snap.failures == before[0]
    if stage == "queued":  # never sent: no rate-limit budget spent by the cancelled attempt
        assert guard.limiter.check(1000) == before[1]
    if stage == "probe":
        assert guard.breaker.state == HALF_OPEN  # the cancelled probe decided nothing
        async with guard.attempt(1):
            pass
        assert guard.breaker.state == CLOSED


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


async def test_an_unexpected_exception_is_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard(rpm=None, tpm=None)
    with pytest.raises(ValueError):  # not an LlmsrvError: a provider bug, counted
        async with guard.attempt(1):
            raise ValueError("bug")
    assert guard.breaker.statistics().failures == 1


# ---- statistics() never asks the storage; check() does ------------------------------------------

def test_statistics_do_no_io() -> None:
    redis = pytest.importorskip("redis")
    cfg = ProviderConfig(rpm="10/minute", tpm="1000/minute", max_concurrency=3)
    guard = ProviderGuard("p", cfg, storage_uri="redis://127.0.0.1:1/0")  # nothing listens there
    snap = guard.statistics()  # answered from memory at once
    assert snap.rate == RateLimitSnapshot(None, 0.0) == guard.limiter.statistics()
    assert (snap.breaker.state, snap.in_flight, snap.max_concurrency, snap.models) == (CLOSED, 0, 3, {})
    with pytest.raises(redis.exceptions.ConnectionError):  # check() is the one that asks the storage
        guard.limiter.check(1)


# ---- call_guarded: the attempt's timeout inside the request's cancel scope ------------------------

async def _slow() -> Completion:
    await trio.sleep(10)
    return OK


@pytest.mark.parametrize("told", [False, True], ids=["looked-up", "told"])  # the request's deadline passed in
async def test_call_guarded_attempt_timeout_before_the_deadline(told: bool,
                                                                autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard(rpm=None, tpm=None)
    with trio.fail_after(30) as request, pytest.raises(errors.ProviderTimeout):
        await call_guarded(guard, 1, 2, _slow, deadline=request.deadline if told else None)
    assert trio.current_time() == 2 and guard.breaker.statistics().failures == 1


@pytest.mark.parametrize("told", [False, True], ids=["looked-up", "told"])
@pytest.mark.parametrize("deadline_s", [1, 2], ids=["deadline-first", "deadline-equal"])
async def test_call_guarded_request_deadline_is_no_failure(deadline_s: float, told: bool,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard(rpm=None, tpm=None)
    with trio.move_on_after(deadline_s) as request:  # the request's deadline, not the attempt's timeout
        await call_guarded(guard, 1, 2, _slow, deadline=request.deadline if told else None)
    assert request.cancelled_caught and trio.current_time() == deadline_s
    assert guard.breaker.statistics().failures == 0 and guard.statistics().in_flight == 0


async def test_call_guarded_without_deadline_records_latency(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard(rpm=None, tpm=None)

    async def quick() -> Completion:
        await trio.sleep(0.25)
        return OK

    assert await call_guarded(guard, 1, 2, quick) == OK
    assert list(guard.latency._samples) == [0.25]
