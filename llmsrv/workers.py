"""An elastic pool of trio tasks that serve one item each at a time, started a few per scheduling round.

Theory of operation
-------------------
``submit`` never blocks and never refuses (admission, how many may be in flight, is the caller's).
An item goes to the worker that went idle last (``trio.lowlevel.reschedule``; the most recently used
worker has warm caches: measured 101-123 vs 137-150 us CPU per request with a FIFO memory channel),
else to a new worker, so the pool grows to the peak concurrency (at most ``max_workers``). Reusing
tasks instead of spawning one per item keeps the trio side cheap (LIBRARY-NOTES: 0.47x vs 0.79x of
plain asyncio).

**Paced starts.** trio runs every runnable task once per scheduling batch, and the NATS reader (the
whole asyncio side) is one task among them. Handing a burst of 10,000 items to 10,000 workers at once
made batches of thousands of first steps (decode, route, guard, the provider call up to its first
wait: ~100 us each): the reader, ``llm.health`` and the replies waited 0.1-1 s between turns, so the
requests behind in the socket were not even read. Now at most ``quota`` items start per round; the
rest wait in FIFO order, and a dispatcher task hands them out, one round per batch. The quota
follows the batches' length: it is scaled by ``ROUND_S`` / the last batch's duration (at most doubled,
within ``MIN_QUOTA``..``MAX_QUOTA``), so a round takes a few milliseconds whatever the machine, the
reader gets a turn between rounds and reads (admits) ahead of the starts, and a batch already long
with other work (replies, a slow provider's parsing) starts fewer. A lone request on an idle
instance still goes straight to a parked worker in ``submit`` (no dispatcher round).

Workers idle for ``idle_s`` retire (the least recently idle first), down to ``min_idle`` idle ones,
so a burst does not leave its tasks behind. ``serve`` must not raise; if it does, the failure is
logged and the worker goes on.

**Full garbage collections.** Every in-flight request holds ~80 objects the cyclic collector tracks;
they survive the young generations and reach the oldest. CPython collects the oldest generation
whenever it grew by a quarter, walking *all* of it: during a burst of 10,000 that was 5-8 full
collections of 0.1-0.8 s each, the longest stalls of the whole event loop and twice the CPU of the
admissions. With ``defer_full_gc`` (``FullCollections``) a pool with more than ``QUIET_BUSY``
requests taken puts CPython's full collections off until it has been quiet for two housekeeping
ticks (then CPython's own rule applies again and soon collects what was promoted meanwhile), or
collects once per ``FULL_GC_MAX_INTERVAL_S`` of sustained load (bounds the memory of cyclic garbage
that grew old). The young generations are collected as before, and a quiet instance runs stock
CPython: a full collection forced every second instead cost a request now and then 5 ms
(``cancel``'s p99 2.9 -> 7.3 ms).
"""

from __future__ import annotations

import collections
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import outcome
import trio

log = logging.getLogger("llmsrv.workers")
Item = TypeVar("Item")

ROUND_S = 0.005  # what one dispatcher round (one scheduling batch) should take
MIN_QUOTA, MAX_QUOTA = 4, 4096  # starts per round
HOUSEKEEPING_S = 1.0  # how often idle workers retire and a deferral of full collections is reviewed
QUIET_BUSY = 128  # requests taken (started or waiting) up to which full collections are CPython's
FULL_GC_MAX_INTERVAL_S = 60.0  # a deferral lasting this long collects anyway (and again after as long)


class FullCollections:
    """Defers CPython's full (oldest-generation) collections while a pool is busy; stock policy otherwise.

    ``defer()`` raises the oldest generation's threshold out of reach, ``allow()`` restores it: CPython then
    decides as usual (and soon collects what was promoted meanwhile). Process-wide: the threshold is raised
    while any user defers (several services may share a test process).
    """

    _deferring = 0  # users deferring now
    _saved: tuple[int, int, int] = (700, 10, 10)
    UNREACHABLE = 1 << 30  # gen-1 collections before CPython would start a full one by itself

    def __init__(self) -> None:
        self.deferring = False
        self.since = time.monotonic()  # of the deferral, or of the last full collection made during it
        self.collections = 0  # full collections made because a deferral lasted FULL_GC_MAX_INTERVAL_S
        self._was_quiet = False

    def __enter__(self) -> FullCollections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.allow()

    def defer(self) -> None:
        if self.deferring:
            return
        self.deferring, self.since = True, time.monotonic()
        cls = FullCollections
        if cls._deferring == 0:
            cls._saved = gc.get_threshold()
            gc.set_threshold(cls._saved[0], cls._saved[1], cls.UNREACHABLE)
        cls._deferring += 1

    def allow(self) -> None:
        if not self.deferring:
            return
        self.deferring = False
        cls = FullCollections
        cls._deferring -= 1
        if cls._deferring == 0:
            gc.set_threshold(*cls._saved)

    def tick(self, busy: int) -> None:
        """Once a ``HOUSEKEEPING_S``: ``busy`` (requests taken and not done) small now and at the last tick
        ends a deferral (not at the tail of a burst); one lasting ``FULL_GC_MAX_INTERVAL_S`` collects
        anyway (bounds the memory of cyclic garbage that grew old meanwhile)."""
        quiet = busy <= QUIET_BUSY and self._was_quiet
        self._was_quiet = busy <= QUIET_BUSY
        if not self.deferring:
            return
        if quiet:
            self.allow()
            return
        now = time.monotonic()
        if now - self.since >= FULL_GC_MAX_INTERVAL_S:
            gc.collect()
            self.since = time.monotonic()
            self.collections += 1
            log.debug("full GC after %.0f s of deferral: %.1f ms with %d busy", FULL_GC_MAX_INTERVAL_S,
                      (self.since - now) * 1000, busy)


class _Parked:
    """An idle worker; ``task`` is None once it left (retired or cancelled) while still queued."""

    __slots__ = ("task", "since")

    def __init__(self, task: trio.lowlevel.Task, since: float) -> None:
        self.task: trio.lowlevel.Task | None = task
        self.since = since


class WorkerPool(Generic[Item]):
    def __init__(self, serve: Callable[[Item], Awaitable[None]], *, max_workers: int, idle_s: float,
                 min_idle: int, defer_full_gc: bool = False) -> None:
        self._serve = serve
        self._max, self._idle_s, self._min_idle = max_workers, idle_s, min_idle
        # idle workers, the most recently idle last (handed work first); left ones are skipped
        self._parked: collections.deque[_Parked] = collections.deque()
        self._idle = 0
        self._backlog: collections.deque[Item] = collections.deque()  # waiting for a round
        self._round_quota = 64  # starts per round, adapted to the rounds' length
        self._quota = self._round_quota  # starts left in this round
        self._dispatcher: trio.lowlevel.Task | None = None  # set while it waits for work
        self._nursery: trio.Nursery | None = None
        self.workers = 0
        self.rounds = 0  # dispatcher rounds that started items (statistics, tests)
        self._gc = FullCollections() if defer_full_gc else None

    @property
    def idle(self) -> int:
        return self._idle

    @property
    def waiting(self) -> int:
        """Items submitted and not started yet (they start in the next rounds)."""
        return len(self._backlog)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled (``submit`` works once this has started)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._dispatch)
                self._spawn(None)
                task_status.started()
                await self._housekeeping()
        finally:
            if self._gc is not None:
                self._gc.allow()

    @property
    def full_collections(self) -> FullCollections | None:
        return self._gc

    def submit(self, item: Item) -> None:
        """Hand ``item`` to a worker, now or in one of the next rounds (synchronous; safe from a
        non-async callback). Items start in the order submitted."""
        if self._gc is not None and not self._gc.deferring \
                and self.workers - self._idle + len(self._backlog) > QUIET_BUSY:
            self._gc.defer()  # a burst: CPython's full collections would walk it again and again
        if not self._backlog and self._quota > 0:
            entry = self._pop_parked()
            if entry is not None:
                self._quota -= 1
                trio.lowlevel.reschedule(entry, outcome.Value(item))
                if self._quota == 0:
                    self._wake_dispatcher()  # it grants the next round's quota
                return
        self._backlog.append(item)
        self._wake_dispatcher()

    # ---- internals ---------------------------------------------------------------------------

    def _wake_dispatcher(self) -> None:
        if self._dispatcher is not None:
            trio.lowlevel.reschedule(self._dispatcher)
            self._dispatcher = None

    def _pop_parked(self) -> trio.lowlevel.Task | None:
        while self._parked:
            task = self._parked.pop().task
            if task is not None:
                self._idle -= 1
                return task
        return None

    def _spawn(self, item: Item | None) -> None:
        assert self._nursery is not None, "submit before run() started"
        self.workers += 1
        self._nursery.start_soon(self._worker, item)

    async def _dispatch(self) -> None:
        """One round per scheduling batch while items wait: start up to the round's quota of them."""
        def abort(_: object) -> trio.lowlevel.Abort:
            self._dispatcher = None
            return trio.lowlevel.Abort.SUCCEEDED

        last = trio.current_time()
        while True:
            # nothing started last round, or every worker busy: wait to be woken
            done = not self._backlog and self._quota >= self._round_quota
            stuck = self._backlog and not self._idle and self.workers >= self._max
            now = trio.current_time()
            if done or stuck:
                self._dispatcher = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(abort)
                now = trio.current_time()
            else:  # the batch since the last round: scale the quota to make the next one ROUND_S
                scaled = int(self._round_quota * ROUND_S / max(now - last, 1e-4))
                self._round_quota = max(MIN_QUOTA, min(MAX_QUOTA, 2 * self._round_quota, scaled))
            last = now
            self._quota = self._round_quota
            if self._backlog:
                self.rounds += 1
            while self._backlog and self._quota > 0:
                entry = self._pop_parked()
                if entry is not None:
                    trio.lowlevel.reschedule(entry, outcome.Value(self._backlog.popleft()))
                elif self.workers < self._max:
                    self._spawn(self._backlog.popleft())
                else:
                    break  # every worker busy: the next one to park wakes this task
                self._quota -= 1
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _housekeeping(self) -> None:
        """Retire the workers that stayed idle for idle_s (keeping min_idle); deferred full GCs."""
        while True:
            await trio.sleep(min(HOUSEKEEPING_S, self._idle_s / 2))
            now = trio.current_time()
            while self._idle > self._min_idle and self._parked:
                entry = self._parked[0]
                if entry.task is None:
                    self._parked.popleft()
                    continue
                if now - entry.since < self._idle_s:
                    break
                self._parked.popleft()
                self._idle -= 1
                trio.lowlevel.reschedule(entry.task, outcome.Value(None))
            if self._gc is not None:
                self._gc.tick(self.workers - self._idle + len(self._backlog))

    async def _worker(self, item: Item | None) -> None:
        try:
            while True:
                if item is not None:
                    try:
                        await self._serve(item)
                    except Exception:  # serve's own boundary failed: keep the worker anyway
                        log.exception("a worker's item failed")
                entry = _Parked(trio.lowlevel.current_task(), trio.current_time())

                def abort(_: object, entry: _Parked = entry) -> trio.lowlevel.Abort:
                    entry.task = None  # skipped when popped: O(1), not a deque.remove per cancelled worker
                    self._idle -= 1
                    return trio.lowlevel.Abort.SUCCEEDED

                self._parked.append(entry)
                self._idle += 1
                if self._backlog:
                    self._wake_dispatcher()  # a worker is free: the dispatcher may have been waiting for one
                item = await trio.lowlevel.wait_task_rescheduled(abort)
                if item is None:  # retired
                    return
        finally:
            self.workers -= 1
