"""Fleet-wide state through a real redis-server: shared rate limits and shared breaker openings."""

from __future__ import annotations

import logging
import socket
import time
import uuid

import msgspec
import pytest
import trio

from llmsrv import errors
from llmsrv.resilience import CLOSED, OPEN, Breaker, RateLimiter, RedisBreakerBoard, sync_breakers

from .conftest import running, user

ENC = msgspec.json.encode


def _name() -> str:
    return f"p{uuid.uuid4().hex[:8]}"  # a fresh limit key per test on the shared server


def test_two_instances_share_one_rate_limit(redis_url: str) -> None:
    name = _name()
    a = RateLimiter(name, "3/hour", None, redis_url)
    b = RateLimiter(name, "3/hour", None, redis_url)
    a.acquire(1)
    b.acquire(1)
    a.acquire(1)
    for limiter in (a, b):
        with pytest.raises(errors.RateLimited) as info:
            limiter.acquire(1)
        assert 0 < info.value.retry_after_ms <= 3600000


def test_token_charge_is_corrected_in_redis(redis_url: str) -> None:
    name = _name()
    limiter = RateLimiter(name, None, "100/hour", redis_url)
    limiter.acquire(90)
    with pytest.raises(errors.RateLimited):
        limiter.acquire(20)
    limiter.correct(estimated=90, actual=10)
    limiter.acquire(20)
    RateLimiter(name, None, "100/hour", redis_url).acquire(60)  # another instance sees the refund
    with pytest.raises(errors.RateLimited):
        limiter.acquire(20)


async def test_breaker_opening_is_shared_by_the_fleet(nats_url: str, redis_url: str) -> None:
    shared = {"storage_uri": redis_url, "breaker_sync_s": 0.05, "retry": {"max_attempts": 1}}
    fleet = {"queue": f"fleet-{uuid.uuid4().hex[:6]}"}  # both instances serve one queue group
    failing = {"mock": {"error_rate": 1.0, "breaker_threshold": 1, "breaker_ttl_s": 30}}
    healthy = {"mock": {"breaker_threshold": 1, "breaker_ttl_s": 30}}
    async with running(nats_url, nats=fleet, routing=shared, providers=failing) as a, \
            running(nats_url, nats=fleet, routing=shared, providers=healthy) as b:
        assert (await b.client.complete({"messages": user("fine"), "model": "mock:echo"})).text == "fine"
        err = await a.error_of(ENC({"messages": user(), "model": "mock:echo"}))
        assert err["error_code"] == "PROVIDER_ERROR"
        with trio.fail_after(5):
            while b.service.pipeline.guards["mock"].models["echo"].state != "open":  # per-model breakers (default)
                await trio.sleep(0.02)
        refused = await b.error_of(ENC({"messages": user(), "model": "mock:echo"}))
    assert refused["error_code"] == "CIRCUIT_OPEN" and 25000 < refused["retry_after_ms"] <= 30000
    assert b.service.providers["mock"].statistics().calls == 1  # type: ignore[attr-defined]


async def test_redis_calls_do_not_block_the_trio_loop(nats_url: str, redis_url: str) -> None:
    import redis

    async with running(nats_url, routing={"storage_uri": redis_url}, nats={"queue": _name()},
                       providers={"mock": {"rpm": "1000/minute"}}) as h:
        gaps: list[float] = []

        async def ticker() -> None:
            last = trio.current_time()
            while True:
                await trio.sleep(0.01)
                now = trio.current_time()
                gaps.append(now - last)
                last = now

        client = redis.Redis.from_url(redis_url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0.05)
            # Redis answers nobody for 1 s from here: in effect once CLIENT PAUSE has returned (no race)
            await trio.to_thread.run_sync(client.execute_command, "CLIENT", "PAUSE", "1000")
            start = trio.current_time()
            reply = await h.client.complete({"messages": user("waited"), "model": "mock:echo"})
            waited = trio.current_time() - start
            nursery.cancel_scope.cancel()
        client.close()
    assert reply.text == "waited" and waited > 0.5  # the rate-limit charge waited for Redis...
    assert max(gaps) < 0.5  # ...in a worker thread: the trio loop kept ticking (blocked: a ~1 s gap)


async def test_sync_breakers_adopts_what_another_instance_published(redis_url: str) -> None:
    board = RedisBreakerBoard(redis_url, f"{_name()}:breaker:")
    breaker, other = Breaker("mock:echo", threshold=1, ttl_s=30), Breaker("mock:other", threshold=1, ttl_s=30)
    await trio.to_thread.run_sync(board.publish_open, "mock:echo", time.time() + 20, time.time())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync_breakers, board, lambda: {b.name: b for b in (breaker, other)}, 0.01)
        with trio.fail_after(5):
            while breaker.state != OPEN:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    blocked = breaker.blocked_for()
    assert blocked is not None and 15 < blocked <= 20 and other.state == CLOSED


async def test_a_withdrawn_opening_is_not_adopted_again_even_if_the_board_still_holds_it(redis_url: str) -> None:
    """An operator's close withdraws the openings from before it: a round that read the board before the close,
    or a key deleted late, opens nothing again; an opening published after the close still counts."""
    board = RedisBreakerBoard(redis_url, f"{_name()}:breaker:")
    breaker = Breaker("mock:echo", threshold=1, ttl_s=30)
    rounds = trio.Semaphore(0)

    def breakers() -> dict[str, Breaker]:
        rounds.release()
        return {breaker.name: breaker}

    async def publish(opened: float) -> None:
        await trio.to_thread.run_sync(board.publish_open, breaker.name, time.time() + 20, opened)

    opened_before = time.time()
    board.withdraw([breaker.name])  # what `llmsrv breaker close mock:echo` does on this instance
    await publish(opened_before)  # the board still holds the opening (read before the close, or deleted late)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync_breakers, board, breakers, 0.01)
        with trio.fail_after(10):
            for _ in range(3):  # a round that fetched it, and two more
                await rounds.acquire()
            assert breaker.state == CLOSED
            await publish(time.time())  # a new opening, after the close
            while breaker.state != OPEN:
                await rounds.acquire()
        nursery.cancel_scope.cancel()


async def test_sync_breakers_keeps_going_while_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    board = RedisBreakerBoard(f"redis://127.0.0.1:{port}/0", "down:")
    breaker = Breaker("mock", threshold=1, ttl_s=30)
    rounds: list[float] = []

    def breakers() -> dict[str, Breaker]:
        rounds.append(trio.current_time())
        return {"mock": breaker}

    with caplog.at_level(logging.WARNING, logger="llmsrv.resilience"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_breakers, board, breakers, 0.01)
            with trio.fail_after(10):
                while len(rounds) < 3:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    unreachable = [r for r in caplog.records if "breaker board unreachable" in r.getMessage()]
    assert len(unreachable) >= 2 and breaker.state == CLOSED
