"""The NATS bridge: the only module that touches nats-py and trio-asyncio.

Theory of operation
-------------------
nats-py is asyncio; llmsrv is trio. trio-asyncio runs an asyncio loop inside trio, but every
``aio_as_trio`` crossing costs ~40 us, so the hot path never crosses per message:

* inbound: a subscription callback (asyncio side) calls a plain sync handler and returns at
  once; handlers only do ``trio.MemorySendChannel.send_nowait`` or other non-blocking work
  (same thread, so this is safe). nats-py delivers callback messages in order, one at a time.
* outbound: trio code calls ``publish_nowait`` which is ``asyncio.Queue.put_nowait`` (no
  crossing); one asyncio "pump" task drains the queue into ``nc.publish``, which only appends
  to nats-py's write buffer. ``flush()`` waits until everything queued so far is handed over.
* trio-asyncio runs one asyncio callback per trio scheduling turn; ``_run_queued_callbacks`` makes it
  run all those queued, as asyncio itself does, so a message's five or six asyncio hops do not each
  wait for a trio batch (a health probe during a 10,000-request reply wave: 120-225 ms -> 28-42 ms).
* an asyncio call made by a finalizer the garbage collector runs (``StreamWriter.__del__`` closes its
  transport), in another thread or in the middle of trio's own code, is deferred to the trio thread's
  run loop (``_defer_finalizer_calls``): trio-asyncio would lose its loop's wakeup and the process hang.
* connection events (disconnect, reconnect, errors) are logged; nats-py restores every
  subscription, queue groups included, after a reconnect. An asyncio exception handler is
  installed, because an unretrieved asyncio exception would otherwise crash ``trio.run``.
* slow consumers: every subscription gets ``nats.pending_msgs_limit`` / ``pending_bytes_limit``.
  Past them nats-py drops the message and reports ``SlowConsumerError``; drops are counted per
  subscription subject (``Bus.dropped``, exported as ``llmsrv_nats_dropped_total``) and logged
  at most once a second per subject. The body of a dropped message is gone, but its reply subject
  is known: a subscription's ``on_drop(reply)`` can still answer it (e.g. ``OVERLOADED``), or the
  client's own timeout is all it sees. Keep the limits far above ``server.max_inflight``.
* a connection nats-py gives up on (stale: pings unanswered; or a read error) is closed in at most
  ``CLOSE_WAIT_S``: nats-py waits for the socket to send what it still holds before it reconnects
  (or finishes ``close``), which a peer that stopped reading (a hung server, a partition that
  drops packets) makes forever (nats-io/nats.py#671). ``_Client`` gives it a transport that then
  drops the unsent bytes; ``tests/test_nats_outage.py`` reproduces it with a server that stops reading.
* the first connect waits up to ``nats.initial_connect_timeout_s`` for a server that is not up
  yet (logged once), then fails with a ``BusError`` naming the key.

Secrets (passwords, tokens, credentials in URLs) are never logged.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio
import trio_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport
from nats.errors import SlowConsumerError
from sniffio import thread_local as sniffio_library
from trio_asyncio import aio_as_trio

from .config import NatsConfig

log = logging.getLogger("llmsrv.bus")
DROP_LOG_INTERVAL_S = 1.0  # at most one slow-consumer warning per subject per interval
CLOSE_WAIT_S = 2.0  # a dropped connection's unsent bytes get this long, then are discarded
DRAIN_MAX = 1024  # asyncio callbacks run per trio scheduling turn at most (_run_queued_callbacks)


class Incoming(Protocol):
    """What handlers see of a NATS message (nats-py's ``Msg`` has these attributes)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None


Handler = Callable[[Incoming], None]


class BusError(Exception):
    """The NATS connection could not be made or used (message is safe to log)."""


def bus_error_in(exc: BaseException) -> BusError | None:
    """The ``BusError`` inside (nested, single-leaf) exception groups, if that is all there is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, BusError) else None


def redact_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def _connect_options(cfg: NatsConfig, url: str) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "servers": [url],
        "name": cfg.name,
        "connect_timeout": cfg.connect_timeout_s,
        "reconnect_time_wait": cfg.reconnect_time_wait_s,
        "max_reconnect_attempts": cfg.max_reconnect_attempts,
        "allow_reconnect": True,
        "ping_interval": cfg.ping_interval_s,
        "max_outstanding_pings": cfg.max_outstanding_pings,
    }
    if cfg.user is not None:
        opts["user"] = cfg.user
        opts["password"] = cfg.password or ""
    if cfg.token is not None:
        opts["token"] = cfg.token
    if cfg.creds_file is not None:
        opts["user_credentials"] = cfg.creds_file
    if cfg.nkey_seed_file is not None:
        opts["nkeys_seed"] = cfg.nkey_seed_file
    if cfg.tls_ca_file or cfg.tls_cert_file or url.startswith("tls://"):
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file)
        if cfg.tls_cert_file:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
        opts["tls"] = ctx
    return opts


class Bus:
    def __init__(self, nc: NatsClient, url: str, cfg: NatsConfig | None = None) -> None:
        self._nc = nc
        self.url = url
        self._cfg = cfg or NatsConfig()
        self._dropped: dict[str, int] = {}  # by subscription subject, since start
        self._drops_unlogged: dict[str, int] = {}
        self._drop_logged_at: dict[str, float] = {}
        self._on_drop: dict[int, Callable[[str], None]] = {}  # by subscription id
        self._queue: asyncio.Queue[tuple[str, bytes, str, dict[str, str] | None] | asyncio.Future[None]]
        self._queue = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.disconnects = 0  # tells connections apart: counted before nats-py tries to reconnect
        self.closing = False

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(cls, cfg: NatsConfig, url: str) -> AsyncIterator[Bus]:
        """Connect and yield a ``Bus``; opens a trio-asyncio loop if none is running."""
        if trio_asyncio.current_loop.get() is None:
            try:
                async with trio_asyncio.open_loop() as aio_loop:
                    _defer_finalizer_calls(aio_loop)
                    _run_queued_callbacks(aio_loop)
                    try:
                        async with cls.connect(cfg, url) as bus:
                            yield bus
                    finally:  # the loop's own teardown (stop, drain, cancel) runs the library's step
                        vars(aio_loop).pop("_main_loop_one", None)
            except BaseExceptionGroup as group:
                raise bus_error_in(group) or group from None
            return
        loop = asyncio.get_event_loop()
        loop.set_exception_handler(_asyncio_exception_handler)
        holder: list[Bus] = []
        refused: list[str] = []
        errors: list[str] = []
        with trio.move_on_after(cfg.initial_connect_timeout_s) as connecting:
            # nats-py retries the first connect forever, an authorization failure included: the
            # error callback stops at a refused credential, the timeout at an unreachable server.
            def refuse(why: str) -> None:
                refused.append(why)
                connecting.cancel()

            def failed(why: str) -> None:
                if not errors:
                    log.warning("NATS at %s not reachable yet (%s); retrying for up to %gs "
                                "(nats.initial_connect_timeout_s)", redact_url(url), why,
                                cfg.initial_connect_timeout_s)
                errors.append(why)

            callbacks = _callbacks(holder, f"{redact_url(url)} as {cfg.name!r}", failed, refuse)
            try:
                nc = _Client()
                await aio_as_trio(nc.connect)(**_connect_options(cfg, url), **callbacks)
            except Exception as exc:  # nats raises many kinds (OSError, NoServersError, ...)
                raise BusError(f"cannot connect to NATS at {redact_url(url)}: "
                               f"{type(exc).__name__}: {exc}") from None
        if refused:
            raise BusError(f"NATS at {redact_url(url)} refused the credentials ({refused[0]}); "
                           "check nats.user/password, token, creds_file or nkey_seed_file")
        if connecting.cancelled_caught:
            raise BusError(f"cannot connect to NATS at {redact_url(url)} within "
                           f"{cfg.initial_connect_timeout_s:g}s (nats.initial_connect_timeout_s)"
                           + (f"; last error: {errors[-1]}" if errors else ""))
        bus = cls(nc, url, cfg)
        holder.append(bus)
        bus._pump = loop.create_task(bus._pump_loop())
        log.info("connected to NATS at %s as %r", redact_url(url), cfg.name)
        try:
            yield bus
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await bus._close()

    async def _close(self) -> None:
        self.closing = True
        try:
            await self.flush()
        except Exception as exc:  # closing anyway
            log.warning("flush before close failed: %s", exc)
        if self._pump is not None:
            self._pump.cancel()
        if not self._nc.is_closed:
            try:
                await aio_as_trio(self._nc.drain)()
            except Exception as exc:
                log.warning("NATS drain failed (%s); closing", type(exc).__name__)
                try:  # nats-py writes what it still holds to the old socket first: it may be gone
                    await aio_as_trio(self._nc.close)()
                except Exception as failed:
                    log.warning("NATS close failed (%s: %s); connection dropped", type(failed).__name__, failed)

    # ---- inbound ---------------------------------------------------------------------------

    async def subscribe(self, subject: str, handler: Handler, queue: str = "",
                        on_drop: Callable[[str], None] | None = None) -> Subscription:
        """Deliver ``subject`` to ``handler``; ``on_drop(reply)`` hears of each dropped message that had a
        reply subject (it runs in the nats-py read loop: it must not block)."""
        async def _cb(msg: Any) -> None:
            handler(msg)

        sub: Subscription = await aio_as_trio(self._nc.subscribe)(
            subject, queue=queue, cb=_cb, pending_msgs_limit=self._cfg.pending_msgs_limit,
            pending_bytes_limit=self._cfg.pending_bytes_limit)
        if on_drop is not None:
            self._on_drop[sub._id] = on_drop
        return sub

    def _slow_consumer(self, subject: str, sid: int, reply: str) -> None:
        """nats-py dropped one message of the subscription on ``subject`` (its pending limit)."""
        on_drop = self._on_drop.get(sid)
        if on_drop is not None and reply:
            try:
                on_drop(reply)
            except Exception:
                log.exception("on_drop for %s failed", subject)
        self._dropped[subject] = self._dropped.get(subject, 0) + 1
        self._drops_unlogged[subject] = self._drops_unlogged.get(subject, 0) + 1
        now = time.monotonic()
        if now - self._drop_logged_at.get(subject, -DROP_LOG_INTERVAL_S) >= DROP_LOG_INTERVAL_S:
            self._drop_logged_at[subject] = now
            log.warning("slow consumer: the NATS client dropped %d message(s) on %s (%d in all); "
                        "raise nats.pending_msgs_limit / pending_bytes_limit or add instances",
                        self._drops_unlogged.pop(subject), subject, self._dropped[subject])

    @property
    def dropped(self) -> dict[str, int]:
        """Messages nats-py dropped as a slow consumer, by subscription subject (a snapshot)."""
        return dict(self._dropped)

    async def unsubscribe(self, sub: Subscription) -> None:
        self._on_drop.pop(sub._id, None)
        try:
            await aio_as_trio(sub.unsubscribe)()
        except Exception as exc:  # already closed or connection gone: nothing left to stop
            log.debug("unsubscribe %s: %s", sub.subject, exc)

    # ---- outbound --------------------------------------------------------------------------

    def publish_nowait(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                       reply: str = "") -> None:
        """Queue a message for the pump; never blocks, never crosses into asyncio."""
        self._queue.put_nowait((subject, data, reply, headers))

    async def flush(self) -> None:
        """Wait until everything queued so far is written to the server."""
        marker: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self._queue.put_nowait(marker)
        await aio_as_trio(_wait_future)(marker)
        if self._nc.is_connected:
            await aio_as_trio(self._nc.flush)()

    async def _pump_loop(self) -> None:
        queue, nc = self._queue, self._nc
        while True:
            item = await queue.get()
            while True:
                if isinstance(item, asyncio.Future):
                    if not item.done():
                        item.set_result(None)
                else:
                    subject, data, reply, headers = item
                    try:
                        await nc.publish(subject, data, reply=reply, headers=headers)
                    except Exception as exc:
                        log.error("publish to %s failed: %s: %s", subject, type(exc).__name__, exc)
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break

    # ---- state -----------------------------------------------------------------------------

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (its INFO ``max_payload``)."""
        return int(self._nc.max_payload)

    @property
    def is_connected(self) -> bool:
        return bool(self._nc.is_connected)

    def new_inbox(self) -> str:
        inbox: str = self._nc.new_inbox()
        return inbox


class _ClosingTransport(TcpTransport):
    """nats-py's TCP transport whose ``wait_closed`` returns within ``CLOSE_WAIT_S`` (see the module doc)."""

    async def wait_closed(self) -> None:
        writer = self._io_writer
        if writer is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(writer.wait_closed()), CLOSE_WAIT_S)
        except TimeoutError:
            log.warning("NATS connection not closed within %gs (the server stopped reading); dropping "
                        "%d unsent bytes", CLOSE_WAIT_S, writer.transport.get_write_buffer_size())
            writer.transport.abort()


class _Client(NatsClient):
    async def _connect_to_server(self, s: Any) -> None:
        await super()._connect_to_server(s)  # nats-py 2.x makes (or reuses) its TcpTransport here
        if type(self._transport) is TcpTransport:
            self._transport.__class__ = _ClosingTransport  # same object and state, bounded wait_closed


def _run_queued_callbacks(loop: Any) -> None:
    """Make trio-asyncio's loop run every asyncio callback already queued in one trio turn, as asyncio's own
    loop does in one iteration. trio-asyncio 0.16 runs one callback per turn (its queue is a trio memory
    channel, and each ``receive`` is a checkpoint), so every asyncio hop of a message (socket callback,
    nats-py's reader, the subscription's task, the publish pump, the flusher) waited for a whole trio
    scheduling batch. After the library's own step (timers, one callback, the checkpoint), the callbacks
    queued meanwhile run too, up to ``DRAIN_MAX``; a timer goes to the library's heap, and a trio task to
    start from asyncio (``trio_as_aio``) ends the turn through the library's own path. A trio-asyncio
    without these internals runs unchanged. For the life of the connection only: ``Bus.connect`` takes it
    away before the loop's teardown, which then runs the library's own step."""
    try:
        from trio_asyncio._handles import AsyncHandle
        one, queue, timers = loop._main_loop_one, loop._q_recv, loop._timers
    except (ImportError, AttributeError):
        log.info("trio-asyncio internals changed: asyncio callbacks run one per trio turn")
        return

    async def main_loop_one(no_wait: bool = False) -> None:
        await one(no_wait)
        previous, sniffio_library.name = sniffio_library.name, "asyncio"
        try:
            for _ in range(DRAIN_MAX):
                try:
                    handle = queue.receive_nowait()
                except trio.WouldBlock:
                    return
                if isinstance(handle, asyncio.TimerHandle):
                    heapq.heappush(timers, handle)
                elif isinstance(handle, AsyncHandle):
                    sniffio_library.name = previous
                    handle._context.run(loop._nursery.start_soon, handle._run, name=handle._callback)
                    await handle._started.wait()
                    return
                elif not handle._cancelled:
                    handle._run()
        finally:
            sniffio_library.name = previous

    loop._main_loop_one = main_loop_one


def _defer_finalizer_calls(loop: Any) -> None:
    """Make an asyncio call made by a finalizer, or from another thread, reach trio-asyncio's loop later, from
    the trio thread's own run loop (``TrioToken.run_sync_soon``, safe from anywhere).

    An unclosed ``StreamWriter`` the garbage collector finalizes closes its transport (``call_soon``,
    ``remove_reader``), an unclosed ``openai.AsyncOpenAI`` creates a task (what hung the suite: one left
    by an earlier test, collected in the next one as its client connected), wherever the collection
    runs: in another thread, or in the trio thread in the middle of any code, trio's own included, such
    as the loop's task entering its wait for a callback (between finding the channel empty and
    registering as its receiver). trio-asyncio's ``call_soon``
    goes straight to a trio memory channel, so the loop's task is then never woken (the callback left in
    the channel, or the task taken off it by a thread that cannot wake it): asyncio stops, and the process
    hangs, ``move_on_after`` included (``tests/test_burst.py``). Calls made by a collection the trio thread
    runs (``gc.callbacks``), or from another thread, are deferred; the trio thread's others go on directly,
    in order (another thread's collection defers none of them)."""
    try:
        queue, cancel, token = loop._queue_handle, loop._trio_io_cancel, loop._token
    except AttributeError:
        log.info("trio-asyncio internals changed: asyncio calls from finalizers are not deferred")
        return
    if _note_collections not in gc.callbacks:
        gc.callbacks.append(_note_collections)
    trio_thread = threading.get_ident()

    def unsafe() -> bool:  # called by a finalizer, or from another thread
        caller = threading.get_ident()
        return caller != trio_thread or caller == _collector

    def queue_handle(handle: asyncio.Handle) -> asyncio.Handle:
        if unsafe():
            token.run_sync_soon(queue, handle)
            return handle
        return queue(handle)  # type: ignore[no-any-return]

    def trio_io_cancel(scope: trio.CancelScope) -> None:
        if unsafe():
            token.run_sync_soon(cancel, scope)
        else:
            cancel(scope)

    loop._queue_handle, loop._trio_io_cancel = queue_handle, trio_io_cancel


_collector: int | None = None  # the thread the garbage collector runs in (its finalizers with it), if it runs


def _note_collections(phase: str, info: dict[str, int]) -> None:
    global _collector
    _collector = threading.get_ident() if phase == "start" else None


async def _wait_future(fut: asyncio.Future[None]) -> None:
    await fut


def _asyncio_exception_handler(loop: Any, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    log.error("asyncio: %s%s", context.get("message", "unhandled error"),
              f" ({type(exc).__name__}: {exc})" if exc else "")


def _callbacks(holder: list[Bus], where: str, failed: Callable[[str], object],
               refused: Callable[[str], object]) -> dict[str, Any]:
    """nats-py's callbacks for one connection; ``where`` names it in log lines (URL redacted, name)."""

    async def error_cb(exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):  # once per dropped message: keep it cheap
            if holder:
                holder[0]._slow_consumer(exc.sub.subject if exc.sub is not None else exc.subject, exc.sid, exc.reply)
            return
        if not holder:  # still connecting for the first time: the caller reports it
            text = f"{type(exc).__name__}: {exc}".strip()
            (refused if "authorization" in text.lower() else failed)(text)
            return
        log.warning("NATS error: %s: %s", type(exc).__name__, exc)

    async def disconnected_cb() -> None:
        if holder and holder[0].closing:
            return
        if holder:
            holder[0].disconnects += 1
        log.warning("disconnected from NATS at %s; reconnecting", where)

    async def reconnected_cb() -> None:
        if holder:
            holder[0].reconnects += 1
        log.warning("reconnected to NATS at %s; subscriptions restored", where)

    async def closed_cb() -> None:
        log.info("NATS connection to %s closed", where)

    return {"error_cb": error_cb, "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb, "closed_cb": closed_cb}
