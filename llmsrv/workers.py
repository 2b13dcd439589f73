"""An elastic pool of trio tasks that serve one item each at a time, handed over without a queue.

Theory of operation
-------------------
A submitted item goes straight to the worker that went idle last (``trio.lowlevel.reschedule``;
the most recently used worker has warm caches: measured 101-123 vs 137-150 us CPU per request
with a FIFO memory channel); with no idle worker it waits in a backlog and a new worker is
started, so the pool grows to the peak concurrency (at most ``max_workers``) and a new item never
waits for an old one. Workers idle for ``idle_s`` retire (the least recently used first), down to
``min_idle`` idle ones, so a burst does not leave its tasks behind. Reusing tasks instead of
spawning one per item keeps the trio side cheap (LIBRARY-NOTES: 0.47x vs 0.79x of plain asyncio).

``submit`` never blocks and never refuses: admission (how many may be in flight) is the caller's.
``serve`` must not raise; if it does, the failure is logged and the worker goes on.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import outcome
import trio

log = logging.getLogger("llmsrv.workers")
Item = TypeVar("Item")


class WorkerPool(Generic[Item]):
    def __init__(self, serve: Callable[[Item], Awaitable[None]], *, max_workers: int, idle_s: float,
                 min_idle: int) -> None:
        self._serve = serve
        self._max, self._idle_s, self._min_idle = max_workers, idle_s, min_idle
        # idle workers and since when, the most recently idle last (handed work first)
        self._parked: collections.deque[tuple[trio.lowlevel.Task, float]] = collections.deque()
        self._backlog: collections.deque[Item] = collections.deque()
        self._nursery: trio.Nursery | None = None
        self.workers = 0

    @property
    def idle(self) -> int:
        return len(self._parked)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled (``submit`` works once this has started)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._spawn()
            task_status.started()
            while True:  # retire the workers that stayed idle for idle_s (keeping min_idle)
                await trio.sleep(self._idle_s / 2)
                now = trio.current_time()
                while len(self._parked) > self._min_idle and now - self._parked[0][1] >= self._idle_s:
                    self.workers -= 1
                    trio.lowlevel.reschedule(self._parked.popleft()[0], outcome.Value(None))

    def submit(self, item: Item) -> None:
        """Hand ``item`` to a worker now (synchronous; safe from a non-async callback)."""
        if self._parked:  # the worker that went idle last (warm caches)
            trio.lowlevel.reschedule(self._parked.pop()[0], outcome.Value(item))
            return
        self._backlog.append(item)
        if self.workers < self._max:
            self._spawn()

    def _spawn(self) -> None:
        assert self._nursery is not None, "submit before run() started"
        self.workers += 1
        self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        task = trio.lowlevel.current_task()
        entry = (task, 0.0)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            if self._backlog:
                item = self._backlog.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()  # let others run; never lose the item
            else:
                entry = (task, trio.current_time())
                self._parked.append(entry)
                item = await trio.lowlevel.wait_task_rescheduled(abort)
                if item is None:  # retired
                    return
            try:
                await self._serve(item)
            except Exception:  # serve's own boundary failed: keep the worker anyway
                log.exception("a worker's item failed")
