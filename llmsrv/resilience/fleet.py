"""What a fleet shares through Redis (breaker openings), and the worker threads its blocking calls use.

This is the only module that imports redis (lazily: it is an optional dependency). The Redis
client is synchronous, so every call goes through a worker thread: awaited with
``trio.to_thread`` where the caller needs the answer, ``in_background`` where nobody should wait
(publishing an opening, correcting a remote rate-limit charge).
"""

from __future__ import annotations

import logging
import math
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

    An instance whose breaker opens writes ``<prefix><provider>`` = the wall-clock time until
    which it is open and the time it opened (``"<until> <opened>"``; the key expires at the end).
    Every instance reads the board every ``[routing] breaker_sync_s`` (``sync_breakers``) and opens
    its own closed breaker until that time. Closing is not shared: after the TTL each instance
    probes the provider itself (one probe each). An operator's close (``llm.admin.breaker.state``,
    which reaches every instance) withdraws the opening: each instance it reaches adopts no opening
    of that breaker from before the close again (whether a round read it before the close, or the
    board's key is deleted late), and the key is deleted. The Redis client is synchronous and always
    called from a worker thread.
    """

    def __init__(self, uri: str, prefix: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(uri, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        self._prefix = prefix
        self._withdrawn: dict[str, float] = {}  # breaker name -> when an operator closed it here (wall clock)

    def publish_open(self, provider: str, until_wall: float, opened_wall: float) -> None:
        ttl_ms = int((until_wall - time.time()) * 1000)
        if ttl_ms > 0:
            self._redis.set(self._prefix + provider, f"{until_wall!r} {opened_wall!r}", px=ttl_ms)

    def withdraw(self, names: list[str]) -> None:
        """An operator closed ``names`` here: their openings from before now are not adopted again, and are
        deleted from the board (in a worker thread)."""
        now = time.time()
        for name in names:
            self._withdrawn[name] = now
        if names:
            in_background(self._delete, names)

    def _delete(self, names: list[str]) -> None:
        self._redis.delete(*(self._prefix + name for name in names))

    def fetch(self, providers: list[str]) -> dict[str, tuple[float, float]]:
        """The openings on the board: breaker name -> (open until, opened at), wall clock."""
        found = {}
        for name, value in zip(providers, self._redis.mget([self._prefix + p for p in providers]), strict=True):
            if value is not None:
                until, _, opened = str(value).partition(" ")
                found[name] = (float(until), float(opened or 0))  # an older llmsrv wrote the end alone
        return found

    def adoptable(self, name: str, opened_wall: float) -> bool:
        """Whether an opening of ``name`` from ``opened_wall`` still counts here (no operator closed it since)."""
        return opened_wall > self._withdrawn.get(name, -math.inf)


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
        for name, (until, opened_at) in opened.items():
            if board.adoptable(name, opened_at):  # checked now: an operator's close during the fetch counts
                current[name].adopt_open(until - now)
        await trio.sleep(interval_s)
