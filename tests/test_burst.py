"""Bursts: thousands of requests at once are all admitted and answered exactly once, and the instance stays
responsive meanwhile (the worker pool starts them a few per scheduling round; full garbage collections wait
for a quiet moment).

No wall-clock thresholds: conditions are awaited, bounded by generous ``fail_after``; where a request must
cost CPU to start, a short busy loop stands in for it (its length is never asserted).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict

import msgspec
import pytest
import trio
import trio_asyncio

from llmsrv.bus import Bus, Incoming, _defer_finalizer_calls, _note_collections, _run_queued_callbacks
from llmsrv.config import NatsConfig
from llmsrv.messages import LLMResponse
from llmsrv.workers import FULL_GC_MAX_INTERVAL_S, QUIET_BUSY, FullCollections, WorkerPool

from .conftest import running, user

ENC = msgspec.json.encode
N = 2000


def _spin(seconds: float) -> None:
    """CPU work without a checkpoint, like a request's first steps (decode, route, guard)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_burst_is_answered_once_each_and_health_answers_while_it_is_in_flight(nats_url: str) -> None:
    # shedding is not under test here: a busy machine must not turn the burst into OVERLOADED replies
    async with running(nats_url, server={"max_inflight": 4 * N, "max_queue_ms": 600000},
                       providers={"mock": {"latency_ms": 5000, "max_concurrency": 4 * N}}) as h:
        bus = h.client.bus
        inbox = bus.new_inbox()
        replies: defaultdict[int, list[Incoming]] = defaultdict(list)
        every_one = trio.Event()

        def on_reply(msg: Incoming) -> None:
            replies[int(msg.subject.rpartition(".")[2])].append(msg)
            if len(replies) == N:
                every_one.set()

        sub = await bus.subscribe(f"{inbox}.*", on_reply)
        await bus.flush()
        mock = h.service.providers["mock"]
        for i in range(N):  # all at once, each with a reply subject of its own
            bus.publish_nowait(f"{h.prefix}.request", ENC({"messages": user(f"burst {i}"), "model": "mock:echo",
                                                           "correlation_id": f"b-{i}"}), reply=f"{inbox}.{i}")
        with trio.fail_after(120):
            while mock.statistics().calls < N:  # type: ignore[attr-defined]  # every one reached the provider
                await trio.sleep(0.01)
        health = await h.client.request_json("health", timeout_s=60)
        assert health["inflight"] > 0  # answered while the burst waits on the provider
        assert gc.get_threshold()[2] == FullCollections.UNREACHABLE  # no full collections walk the burst
        with trio.fail_after(120):
            await every_one.wait()
            while h.service.statistics().counters.inflight:
                await trio.sleep(0.01)
        await h.client.request_json("health", timeout_s=60)  # published after every reply: all have arrived
        await bus.unsubscribe(sub)
    assert sorted(replies) == list(range(N))
    for i, msgs in replies.items():
        assert len(msgs) == 1, f"request {i}: {len(msgs)} replies"
        assert "Nats-Service-Error-Code" not in (msgs[0].headers or {}), msgs[0].data
        response = msgspec.json.decode(msgs[0].data, type=LLMResponse)
        assert (response.text, response.correlation_id) == (f"burst {i}", f"b-{i}")


async def test_a_burst_starts_a_few_per_round_so_other_tasks_run_in_between() -> None:
    n = 1000
    started: list[int] = []
    release = trio.Event()

    async def serve(item: int) -> None:
        started.append(item)
        _spin(0.0002)
        await release.wait()

    pool: WorkerPool[int] = WorkerPool(serve, max_workers=n, idle_s=60, min_idle=1)
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for i in range(n):
            pool.submit(i)
        assert pool.waiting > 0  # not all handed out at once
        with trio.fail_after(120):
            while len(started) < n:  # this task runs once per scheduling round: what started in between?
                seen.append(len(started))
                await trio.lowlevel.checkpoint()
        release.set()
        with trio.fail_after(60):
            while pool.idle < n:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sorted(started) == list(range(n))  # each once (in a round, trio runs the started tasks in any order)
    jumps = [b - a for a, b in zip([0, *seen], [*seen, n], strict=True)]
    assert max(jumps) <= n // 4, jumps  # unpaced, all n started in one round, nothing else ran in between
    assert pool.rounds >= 4


async def test_items_wait_for_a_free_worker_when_every_worker_is_busy() -> None:
    done: list[int] = []
    gates = [trio.Event() for _ in range(10)]

    async def serve(item: int) -> None:
        await gates[item].wait()
        done.append(item)

    pool: WorkerPool[int] = WorkerPool(serve, max_workers=2, idle_s=60, min_idle=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for i in range(10):
            pool.submit(i)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.workers == 2 and pool.waiting == 8
        with trio.fail_after(60):
            for i in range(10):
                gates[i].set()
                while len(done) <= i:
                    await trio.sleep(0.001)
        assert pool.workers == 2
        nursery.cancel_scope.cancel()
    assert done == list(range(10))


async def test_many_parked_workers_stop_when_the_pool_is_cancelled() -> None:
    n = 3000
    release = trio.Event()

    async def serve(item: int) -> None:
        await release.wait()

    pool: WorkerPool[int] = WorkerPool(serve, max_workers=n, idle_s=60, min_idle=1)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            for i in range(n):
                pool.submit(i)
            while pool.workers < n or pool.waiting:
                await trio.sleep(0.01)
            release.set()
            while pool.idle < n:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()  # each parked worker leaves in O(1)
    assert pool.workers == 0 and pool.idle == 0


def test_full_collections_are_deferred_while_busy_and_cpythons_when_quiet() -> None:
    saved = gc.get_threshold()
    with FullCollections() as first, FullCollections() as second:  # several services in one process
        first.defer()
        assert gc.get_threshold() == (saved[0], saved[1], FullCollections.UNREACHABLE)
        second.defer()
        first.allow()
        assert gc.get_threshold()[2] == FullCollections.UNREACHABLE  # while any of them defers
        second.tick(busy=0)  # quiet once: it may be the tail of a burst
        assert second.deferring
        second.tick(busy=0)  # quiet twice in a row: CPython's own rule again
        assert not second.deferring and gc.get_threshold() == saved
        second.defer()
        full = gc.get_stats()[2]["collections"]
        second.tick(busy=QUIET_BUSY + 1)
        assert gc.get_stats()[2]["collections"] == full and second.collections == 0
        second.since -= FULL_GC_MAX_INTERVAL_S  # busy for that long: one full collection anyway
        second.tick(busy=QUIET_BUSY + 1)
        assert gc.get_stats()[2]["collections"] == full + 1 and second.collections == 1
        assert second.deferring
    assert gc.get_threshold() == saved


async def test_a_pool_defers_full_collections_once_busy() -> None:
    saved = gc.get_threshold()
    release = trio.Event()

    async def serve(item: int) -> None:
        await release.wait()

    pool: WorkerPool[int] = WorkerPool(serve, max_workers=1000, idle_s=60, min_idle=1, defer_full_gc=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for i in range(QUIET_BUSY // 2):
            pool.submit(i)
        assert gc.get_threshold() == saved  # a few requests: stock CPython
        for i in range(QUIET_BUSY):
            pool.submit(i)
        assert gc.get_threshold()[2] == FullCollections.UNREACHABLE
        release.set()
        nursery.cancel_scope.cancel()
    assert gc.get_threshold() == saved


@pytest.mark.parametrize("drain", [True, False])
async def test_queued_asyncio_callbacks_run_in_one_trio_turn(drain: bool) -> None:
    """The bridge's loop runs every asyncio callback already queued per trio turn (bus._run_queued_callbacks);
    trio-asyncio's own runs one per turn, so each asyncio hop of a message waited for a whole batch."""
    async with trio_asyncio.open_loop() as loop:
        if drain:
            _run_queued_callbacks(loop)
        ran: list[int] = []
        chained = loop.create_future()  # a callback scheduled by a callback: asyncio's own hop
        chained.add_done_callback(lambda _: ran.append(-1))
        for i in range(50):
            loop.call_soon(ran.append, i)
        loop.call_soon(chained.set_result, None)
        later = trio.Event()
        loop.call_later(0.01, later.set)  # a timer still fires
        turns = 0
        while len(ran) < 51:
            await trio.lowlevel.cancel_shielded_checkpoint()
            turns += 1
        await later.wait()

        async def asyncio_side() -> str:  # asyncio code calling trio code: trio-asyncio's AsyncHandle path
            for i in range(5):
                loop.call_soon(ran.append, 100 + i)  # queued beside the trio task's start
            return await trio_asyncio.trio_as_aio(trio_side)()

        async def trio_side() -> str:
            await trio.lowlevel.checkpoint()
            return "back"

        assert await trio_asyncio.aio_as_trio(asyncio_side)() == "back"
    assert ran == [*range(50), -1, *range(100, 105)]
    if drain:
        assert turns <= 3, turns
    else:
        assert turns >= 50, turns  # what the drain saves: a trio turn per callback


FINALIZERS = {  # an unclosed StreamWriter's finalizer closes its transport (call_soon, remove_reader)...
    "in-another-thread": """
        server = socket.create_server(("127.0.0.1", 0))
        reader, writer = await aio_as_trio(asyncio.open_connection)(*server.getsockname())
        await trio.sleep(0.1)  # the loop idle, its task waiting for a callback
        finalizer = threading.Thread(target=writer.__del__)  # ...in whatever thread the collector runs
        finalizer.start()
        finalizer.join()
        assert await aio_as_trio(reader.read)() == b""  # the transport's close reached the reader (EOF)
        server.close()
    """,
    "as-the-loop-waits": """
        class Finalized:  # garbage in a cycle whose finalizer calls into asyncio
            def __init__(self):
                self.me = self
            def __del__(self):
                loop.call_soon(done.set)

        done, channel, armed = trio.Event(), loop._q_recv, [True]
        empty = channel.receive_nowait
        def receive_nowait():  # ...or in the trio thread, as the loop's task finds no callback and goes to wait
            try:
                return empty()
            except trio.WouldBlock:
                if armed:
                    armed.clear()
                    Finalized()
                    gc.collect()
                raise
        await trio.sleep(0.1)
        channel.receive_nowait = receive_nowait
        loop.call_soon(lambda: None)  # wakes the loop's task: its next wait is the one the collector interrupts
        await done.wait()
    """,
}
FINALIZED = """
import asyncio, gc, socket, sys, threading
import trio, trio_asyncio
from trio_asyncio import aio_as_trio
from llmsrv.bus import _defer_finalizer_calls

async def main(bridged):
    async with trio_asyncio.open_loop() as loop:
        if bridged:
            _defer_finalizer_calls(loop)
{body}
        await aio_as_trio(asyncio.sleep)(0)  # asyncio goes on
    print("went on")

trio.run(main, sys.argv[1] == "bridged")
"""


@pytest.mark.parametrize("bridged", [True, False], ids=["bridged", "trio-asyncio-alone"])
@pytest.mark.parametrize("where", list(FINALIZERS))
def test_an_asyncio_call_from_a_finalizer_does_not_hang_the_loop(where: str, bridged: bool) -> None:
    """A finalizer the garbage collector runs calls into asyncio: trio-asyncio alone then loses its loop's wakeup
    and the whole process hangs (what the kill-and-restart test hit, ~1 CI run in 30); the bridge defers such
    calls to the trio thread's run loop (bus._defer_finalizer_calls). Run in a subprocess: a hang is a timeout
    here, not a hung suite."""
    script = FINALIZED.format(body=textwrap.indent(textwrap.dedent(FINALIZERS[where]), " " * 8))
    try:
        run = subprocess.run([sys.executable, "-c", script, "bridged" if bridged else "alone"],
                             capture_output=True, text=True, timeout=20 if bridged else 5)
    except subprocess.TimeoutExpired:
        hung = True
    else:
        hung = False
        assert run.returncode == 0 and run.stdout == "went on\n", run.stdout + run.stderr
    # if trio-asyncio alone stops hanging here, it made such calls safe itself: _defer_finalizer_calls can go
    assert hung is not bridged


async def test_the_trio_threads_own_asyncio_calls_stay_direct_and_in_order() -> None:
    """Only a collection the trio thread itself runs defers its calls (after the direct ones); one running in
    another thread (an exporter's, a worker's) leaves them direct, so asyncio's callbacks keep their order."""
    ran: list[str] = []
    async with trio_asyncio.open_loop() as loop:
        _defer_finalizer_calls(loop)
        elsewhere = threading.Thread(target=_note_collections, args=("start", {}))  # another thread collects
        elsewhere.start()
        elsewhere.join()
        loop.call_soon(ran.append, "during another thread's collection")
        _note_collections("stop", {})
        loop.call_soon(ran.append, "after it")
        _note_collections("start", {})  # the trio thread's own collection: what its finalizers call
        try:
            loop.call_soon(ran.append, "during this thread's collection")
        finally:
            _note_collections("stop", {})
        loop.call_soon(ran.append, "after that")
        with trio.fail_after(10):  # a hang guard only
            while len(ran) < 4:
                await trio.sleep(0.01)
    assert ran == ["during another thread's collection", "after it", "after that", "during this thread's collection"]


async def test_the_bridge_loop_is_torn_down_by_trio_asyncios_own_step(nats_url: str) -> None:
    """The drain is for the life of the connection: the loop's teardown (stop, the last callbacks, cancelling
    the asyncio tasks) runs the library's own step, the path trio-asyncio itself tests."""

    async with Bus.connect(NatsConfig(), nats_url) as bus:
        loop = trio_asyncio.current_loop.get()
        assert "_main_loop_one" in vars(loop)  # the drain in place
        await bus.flush()
    assert "_main_loop_one" not in vars(loop)
    assert loop.is_closed()


async def test_a_request_that_does_not_block_is_served_in_one_task_step(nats_url: str) -> None:
    """A ``mock:echo`` request takes one trio step of its worker (no needless round trip through the scheduler):
    what ``bench/responder.py --stack trio-task``, the stack's floor in ``bench overhead``, is built to match."""
    class Steps(trio.abc.Instrument):
        def __init__(self) -> None:
            self.by_task: defaultdict[str, int] = defaultdict(int)

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.by_task[task.name.rpartition(".")[2]] += 1

    async with running(nats_url) as h:
        await h.client.complete({"messages": user("x"), "model": "mock:echo"})  # a worker is parked
        steps = Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            for _ in range(20):
                await h.client.complete({"messages": user("x"), "model": "mock:echo"})
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert steps.by_task["_worker"] == 20, dict(steps.by_task)
