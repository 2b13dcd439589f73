"""The one subprocess transport: a CLI agent as one process group, its stdout folded line by line.

Theory of operation
-------------------
* **One call, one process.** ``exchange()`` starts the argv (never a shell: the prompt is one
  argv element whatever it contains) with ``trio.lowlevel.open_process``: stdin closed, stdout and
  stderr piped, ``start_new_session=True`` so the CLI leads a process group of its own and
  everything it spawns can be signalled at once. The environment is the caller's.
* **Reading.** Each stdout line is one event for the fold (``codecs/stream_json.py``), its text
  pieces go to ``on_delta``; more than ``[server] max_upstream_bytes`` of stdout is
  ``UpstreamTooLarge``. stderr is drained concurrently, keeping its tail for error messages.
* **Ending.** The CLI exiting 0 after a result is success. A non-zero exit raises the failure the
  CLI reported on stdout, if it did (Gemini CLI exits non-zero after its error ``result``); else
  ``ProviderError`` with the exit code and the last stderr line (the key redacted, then cut).
  After exit 0 the fold's ``result()`` decides (no result, an error result).
  ``cursor-agent -p`` sometimes never exits after its result (cursor/cursor#3588): once the fold
  is ``done``, the CLI has ``AFTER_RESULT_S`` to exit before it is stopped, and the answer stands.
* **Stopping, always** (success, error or cancellation), shielded and bounded: if the CLI is
  still running, ``SIGTERM`` to its process group, up to ``kill_grace_s`` for it to exit, then
  ``SIGKILL`` to the group (whatever is left: a CLI ignoring SIGTERM, its children), then reap.
  The leader is reaped only after the group is killed, so the group id cannot have been reused.
  Leftover children of a CLI that exited on its own are killed the same way: nothing outlives the
  call. (Killed grandchildren are orphans reaped by PID 1, as for any daemon's children.)
* **No policy here.** No retry, no timeout: the router cancels the call; ``trio.Cancelled`` is
  re-raised after the cleanup. ``version()`` (``<binary> --version``, for probes) is the one
  bounded wait (``PROBE_TIMEOUT_S``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from .. import errors, tracing
from ..redact import clip
from . import Completion, OnDelta, ProviderStatus
from .codecs import DETAIL_CHARS, Fold, too_large

log = logging.getLogger("llmsrv.providers.process")

AFTER_RESULT_S = 0.5  # how long a CLI may linger after its result event before it is stopped
DRAIN_S = 0.5  # reading what is left in the pipes once the process group is dead
PROBE_TIMEOUT_S = 5.0
MAX_LINE_BYTES = 16 * 2**20
STDERR_TAIL_BYTES = 8192


class CliFold(Fold[Completion], Protocol):
    """A fold of a CLI's stdout that can tell what failure the CLI reported (``codecs/stream_json.py``)."""

    def failure(self) -> errors.LlmsrvError | None: ...


class _Tail:
    """The last bytes of a stream (stderr), read until EOF so the child never blocks writing."""

    def __init__(self, limit: int = STDERR_TAIL_BYTES) -> None:
        self.data = bytearray()
        self.limit = limit

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(65536):
            self.data += chunk
            del self.data[:-self.limit]

    def last_line(self, secrets: Sequence[str | None]) -> str:
        """The last non-blank line, redacted, then cut to ``DETAIL_CHARS``."""
        lines = [ln.strip() for ln in self.data.decode("utf-8", "replace").splitlines()]
        lines = [ln for ln in lines if ln]
        return clip(lines[-1], DETAIL_CHARS, secrets) if lines else ""


async def _lines(stream: trio.abc.ReceiveStream, on_line: Callable[[bytes], None], max_bytes: int,
                 provider: str) -> None:
    """Call ``on_line(bytes)`` for each line of ``stream`` until EOF (the last one may lack "\\n");
    more than ``max_bytes`` in all raises ``UpstreamTooLarge``."""
    buffer = bytearray()
    seen = 0
    while chunk := await stream.receive_some(65536):
        seen += len(chunk)
        if seen > max_bytes:
            raise too_large(provider, max_bytes)
        buffer += chunk
        *complete, rest = buffer.split(b"\n")
        buffer = bytearray(rest)
        for line in complete:
            on_line(bytes(line))
        if len(buffer) > MAX_LINE_BYTES:
            raise errors.ProviderError(f"an output line is longer than {MAX_LINE_BYTES} bytes")
    if buffer:
        on_line(bytes(buffer))


@asynccontextmanager
async def _collapsing_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure leaves as one plain exception, never an exception group.

    The router catches ``trio.Cancelled`` and ``ProviderError`` by class: a group of them would
    read as a bug. An error beats a cancellation (it is why the others were cancelled).
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        failures = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        raise (failures or leaves)[0] from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class _Child:
    """One CLI process leading its own process group, and the one way it is stopped."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the leader's pid is the group id
        self.exited = False  # the leader has exited (not yet reaped: the pgid stays reserved)
        self.signalled = False  # we had to signal a running leader
        self.reaped = False

    async def wait_exited(self) -> None:
        """Until the leader exits, without reaping it where a pidfd allows (Linux)."""
        try:
            fd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            fd = None
        if fd is None:  # reaps: the group is signalled by id right after, a negligible reuse window
            await self.proc.wait()
        else:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        self.exited = True

    def signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    async def stop(self, grace_s: float) -> None:
        """SIGTERM (if running), up to ``grace_s``, SIGKILL to the group, reap. Idempotent."""
        if self.reaped:
            return
        with trio.CancelScope(shield=True):
            if not self.exited:
                self.signalled = True
                self.signal_group(signal.SIGTERM)
                with trio.move_on_after(grace_s):
                    await self.wait_exited()
            self.signal_group(signal.SIGKILL)
            await self.proc.wait()
            self.reaped = True

    async def aclose(self, grace_s: float) -> None:
        """``stop``, then close our ends of the pipes (once no task reads them any more)."""
        await self.stop(grace_s)
        with trio.CancelScope(shield=True):
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    await stream.aclose()


class ProcessTransport:
    """Runs one CLI process per exchange, for one provider (its name, output cap, kill grace, secrets)."""

    def __init__(self, name: str, *, max_output: int, kill_grace_s: float,
                 secrets: Callable[[], Sequence[str | None]] = tuple) -> None:
        self.name = name
        self.max_output = max_output  # stdout bytes per call
        self.kill_grace_s = kill_grace_s
        self._secrets = secrets

    async def _start(self, argv: Sequence[str], env: Mapping[str, str]) -> _Child:
        child_env = dict(env)
        if tracing.ENABLED:  # the attempt's span, for a CLI that reads TRACEPARENT (OTel's env carrier)
            tracing.inject_env(child_env)
        try:
            proc = await trio.lowlevel.open_process(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, env=child_env)
        except OSError as exc:
            raise errors.ProviderError(f"{self.name}: cannot start {os.path.basename(argv[0])} "
                                       f"({exc.strerror or type(exc).__name__})") from None
        log.debug("%s: started %s as pid %d", self.name, os.path.basename(argv[0]), proc.pid)
        return _Child(proc)

    async def _stop_then_drain(self, child: _Child, nursery: trio.Nursery) -> None:
        """Stop the process group; the readers get ``DRAIN_S`` for what is left in the pipes, then EOF."""
        await child.stop(self.kill_grace_s)
        nursery.cancel_scope.deadline = trio.current_time() + DRAIN_S

    async def exchange(self, argv: Sequence[str], env: Mapping[str, str], fold: CliFold,
                       on_delta: OnDelta | None = None) -> Completion:
        """Run ``argv``, feed each stdout line to ``fold``; the exit status, then the fold, decide."""
        answered = trio.Event()  # the terminal event came, stdout ended, or the leader exited
        leader_gone = trio.Event()
        stderr = _Tail()

        def on_line(line: bytes) -> None:
            delta = fold.feed(line)
            if delta and on_delta is not None:
                on_delta(delta)
            if fold.done:
                answered.set()

        child = await self._start(argv, env)
        assert child.proc.stdout is not None and child.proc.stderr is not None
        stdout_stream, stderr_stream = child.proc.stdout, child.proc.stderr

        async def read_stdout() -> None:
            await _lines(stdout_stream, on_line, self.max_output, self.name)
            answered.set()

        async def watch_leader() -> None:
            await child.wait_exited()
            leader_gone.set()
            answered.set()

        try:
            async with _collapsing_nursery() as nursery:
                nursery.start_soon(read_stdout)
                nursery.start_soon(stderr.collect, stderr_stream)
                nursery.start_soon(watch_leader)
                await answered.wait()
                # After a result the CLI gets AFTER_RESULT_S to exit by itself; without one (stdout
                # closed early) it runs until it exits or the caller's deadline cancels the call.
                with trio.move_on_after(AFTER_RESULT_S if fold.done else math.inf):
                    await leader_gone.wait()
                await self._stop_then_drain(child, nursery)
        finally:
            await child.aclose(self.kill_grace_s)
        code = child.proc.returncode
        assert code is not None
        if not child.signalled and code != 0:
            if (reported := fold.failure()) is not None:
                raise reported
            how = f"exit code {code}" if code > 0 else f"signal {-code}"
            detail = stderr.last_line(self._secrets())
            binary = os.path.basename(argv[0])
            raise errors.ProviderError(f"{self.name}: {binary} failed with {how}" + (f": {detail}" if detail else ""))
        return fold.result()

    async def version(self, executable: str, env: Mapping[str, str]) -> ProviderStatus:
        """``<executable> --version`` within ``PROBE_TIMEOUT_S``: available when it exits 0."""
        out, err = _Tail(1024), _Tail()
        child = await self._start([executable, "--version"], env)
        try:
            with trio.move_on_after(PROBE_TIMEOUT_S) as bound:
                async with _collapsing_nursery() as nursery:
                    assert child.proc.stdout is not None and child.proc.stderr is not None
                    nursery.start_soon(out.collect, child.proc.stdout)
                    nursery.start_soon(err.collect, child.proc.stderr)
                    await child.wait_exited()
                    await self._stop_then_drain(child, nursery)
        finally:
            await child.aclose(self.kill_grace_s)
        binary = os.path.basename(executable)
        secrets = self._secrets()
        if bound.cancelled_caught:
            return ProviderStatus(False, f"{binary} --version did not answer within {PROBE_TIMEOUT_S:g}s",
                                  state="invalid")
        if child.proc.returncode != 0:
            detail = err.last_line(secrets) or out.last_line(secrets)
            return ProviderStatus(False, f"{binary} --version exited {child.proc.returncode}: {detail}".rstrip(": "),
                                  state="invalid")
        version = out.last_line(secrets)
        return ProviderStatus(True, f"{binary} {version}".strip())
