"""What a fleet shares through Redis (breaker openings), and the worker threads its blocking calls use.

This is the only module that imports redis (lazily: it is an optional dependency). The Redis
client is synchronous, so every call goes through a worker thread: awaited with
``trio.to_thread`` where the caller needs the answer, ``in_background`` where nobody should wait
(publishing an opening, correcting a remote rate-limit charge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from .breaker import Breaker

log = logging.getLogger("llmsrv.resilience")


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
    ``[routing] breaker_sync_s`` (``sync_breakers``) and opens its own closed breaker until that
    time. Closing is not shared: after the TTL each instance probes the provider itself (one probe
    each). An operator's close (``llm.admin.breaker.state``, which reaches every instance) withdraws
    the opening, so it is not adopted again. The Redis client is synchronous and always called
    from a worker thread.
    """

    def __init__(self, uri: str, prefix: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(uri, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix

    def publish_open(self, provider: str, until_wall: float) -> None:
        ttl_ms = int((until_wall - time.time()) * 1000)
        if ttl_ms > 0:
            self._redis.set(self._prefix + provider, repr(until_wall), px=ttl_ms)

    def clear(self, names: list[str]) -> None:
        """Withdraw the openings of ``names`` (an operator closed them): not adopted again."""
        if names:
            self._redis.delete(*(self._prefix + name for name in names))

    def fetch(self, providers: list[str]) -> dict[str, float]:
        values = self._redis.mget([self._prefix + p for p in providers])
        return {p: float(v) for p, v in zip(providers, values, strict=True) if v is not None}


async def sync_breakers(board: RedisBreakerBoard, breakers: Callable[[], dict[str, Breaker]],
                        interval_s: float) -> None:
    """Forever: adopt the openings other instances published on ``board``, every ``interval_s``.

    ``breakers()`` gives every local breaker by name (asked afresh each round: per-model breakers
    come and go). Redis down: log a warning, keep the local breakers, try again next round.
    """
    while True:
        current = breakers()
        try:
            opened = await trio.to_thread.run_sync(board.fetch, list(current), abandon_on_cancel=True)
        except Exception as exc:  # Redis down: keep the local breakers, try again later
            log.warning("breaker board unreachable: %s: %s", type(exc).__name__, exc)
            opened = {}
        now = time.time()
        for name, until in opened.items():
            current[name].adopt_open(until - now)
        await trio.sleep(interval_s)
