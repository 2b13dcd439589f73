"""A hung test's diagnosis: every trio task's await stack, printed before pytest-timeout ends the run.

pytest-timeout (``timeout`` in pyproject) stops a test that runs too long, dumping each thread's stack
and exiting: CI then fails in minutes, not at its own limit. A thread's stack only shows trio's run
loop, so ``DUMP_BEFORE_S`` earlier (half-way, for a short timeout) a timer sends the process SIGUSR1,
whose handler (run by the main thread, between two bytecodes of whatever trio is doing) prints the
tree of trio tasks, each with the frames it waits in, the suspended async generators (an ``async with``
exit hides its generator from the task's chain), the asyncio tasks not done (trio-asyncio's side) and
the last warnings logged to stderr, where pytest-timeout's report shows it.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import signal
import sys
import threading
from collections import deque
from typing import Any

import trio

DUMP_BEFORE_S = 10.0
RECENT_RECORDS = 50


class _Recent(logging.Handler):
    """The last log records at WARNING and above (pytest's report of a test killed by the timeout has none)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=RECENT_RECORDS)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


_recent = _Recent()


def _frames(awaitable: Any) -> list[str]:
    lines = []
    while awaitable is not None:
        frame = next((f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(awaitable, a, None))), None)
        if frame is not None:
            lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaitable = next((n for a in ("cr_await", "gi_yieldfrom", "ag_await") if (n := getattr(awaitable, a, None))),
                         None)
    return lines


def trio_tasks() -> str:
    """This thread's trio tasks (a tree), the suspended async generators, the asyncio tasks not done, the
    trio-asyncio loops and the last warnings logged, as text."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append(f"{'  ' * depth}task {task.name}")
        lines.extend("  " * depth + line for line in _frames(task.coro))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        root = None
    if root is None:
        lines.append("(no trio run in progress)")
    else:
        walk(root, 0)
    for obj in gc.get_objects():
        if inspect.isasyncgen(obj) and obj.ag_frame is not None and obj.ag_await is not None:
            lines.append(f"async generator {obj.ag_frame.f_code.co_name}")
            lines.extend(_frames(obj))
        elif isinstance(obj, asyncio.Task) and not obj.done():  # trio-asyncio's side: what nats-py waits in
            lines.append(f"asyncio task {obj.get_name()} {getattr(obj.get_coro(), '__qualname__', '?')}"
                         f"{' (cancelling)' if obj.cancelling() else ''}")
            lines.extend(f"    {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in obj.get_stack())
        elif type(obj).__name__ == "TrioEventLoop":
            lines.append(f"trio-asyncio loop: closed {obj.is_closed()}, running {obj.is_running()}, "
                         f"{obj._q_recv.statistics().current_buffer_used} callbacks queued, {len(obj._timers)} timers")
            for fd, key in obj._selector.get_map().items():  # which fds asyncio waits on, and with which handles
                lines.append(f"    fd {fd}: reader {key.data[0]!r}, writer {key.data[1]!r}")
    lines.extend(_io_state())
    lines.append(f"last {RECENT_RECORDS} log records at WARNING and above:")
    lines.extend(f"    {line}" for line in _recent.lines)
    return "\n".join(lines)


def _io_state() -> list[str]:
    """trio's epoll registrations (fd: the tasks waiting, the flags armed) and this process's TCP sockets (fd:
    ports, state, bytes queued to send and unread): a reader that stopped shows as unread bytes on a socket
    nobody waits on."""
    lines = ["trio epoll registrations:"]
    try:
        registered = trio._core._run.GLOBAL_RUN_CONTEXT.runner.io_manager._registered
        for fd, waiters in registered.items():
            lines.append(f"    fd {fd}: read {getattr(waiters.read_task, 'name', None)}, "
                         f"write {getattr(waiters.write_task, 'name', None)}, armed {waiters.current_flags}")
    except AttributeError as exc:
        lines.append(f"    (not readable: {exc})")
    sockets: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                for row in list(rows)[1:]:
                    f = row.split()
                    sockets[f[9]] = (f"{int(f[1].rsplit(':', 1)[1], 16)} -> {int(f[2].rsplit(':', 1)[1], 16)} "
                                     f"state {f[3]}, send/unread {f[4]}")
        except OSError:
            pass
    lines.append("TCP sockets (local -> remote port, state 01 = established, queues in hex):")
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        inode = target[8:-1] if target.startswith("socket:[") else ""
        if inode in sockets:
            lines.append(f"    fd {name}: {sockets[inode]}")
    return lines


def _on_signal(signum: int, frame: Any) -> None:
    print(f"\n==== trio tasks, the test's timeout near ====\n{trio_tasks()}\n", file=sys.stderr,
          flush=True)


def arm(timeout_s: float) -> threading.Timer:
    """Print the trio tasks ``DUMP_BEFORE_S`` before ``timeout_s`` from now (half-way, for a short one)."""
    signal.signal(signal.SIGUSR1, _on_signal)
    root = logging.getLogger()
    if _recent not in root.handlers:  # pytest's logging plugin may have replaced the handlers
        root.addHandler(_recent)
    timer = threading.Timer(max(timeout_s - DUMP_BEFORE_S, timeout_s / 2), os.kill, (os.getpid(), signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    return timer
