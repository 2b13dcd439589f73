"""The rate limits of one provider: requests and tokens per window (limits' sliding window counter).

``statistics()`` and ``blocked_for()`` never touch the storage: they report what the last refusal
taught. ``check(tokens)`` asks the storage (for tests and displays, never the hot path). With a
Redis ``storage_uri`` every storage call blocks, so the guard runs them in a worker thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import msgspec
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from .. import errors


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
        """A frozen snapshot of what the last refusal taught, without asking the storage (no I/O)."""
        remaining = self.blocked_for()
        return RateLimitSnapshot(self._blocked_by if remaining else None, remaining or 0.0)

    def check(self, tokens: int = 1) -> RateLimitSnapshot:
        """Ask the storage whether a call of ``tokens`` would pass both limits now, charging nothing.

        Storage I/O (blocking with Redis): for tests and status-less paths, never the hot path.
        """
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
        return errors.RateLimited(f"provider {self.name!r} is over its {kind} limit ({item})",
                                  retry_after_ms=math.ceil(retry * 1000), limit=kind)

    def _maybe_sweep(self) -> None:
        if isinstance(self._storage, _QuietMemoryStorage):
            now = self._wall()
            if now - self._last_sweep >= 1.0:
                self._last_sweep = now
                self._storage.sweep()
