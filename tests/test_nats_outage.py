"""NATS outages and slow consumers, against real nats-server processes.

* nats-server SIGKILLed and restarted on its port under load: requests sent after recovery all
  succeed; the recovery time (restart -> first successful reply) is printed (`pytest -s`).
* `llmsrv serve` started before NATS waits `nats.initial_connect_timeout_s` for it, serves once it
  comes up, and exits non-zero naming the key when it never does.
* a server that stops reading (hung, or a partition that drops packets): the connection goes
  stale, is dropped within ``CLOSE_WAIT_S`` although its unsent bytes never leave, and the client
  reconnects (nats-io/nats.py#671: nats-py alone waits for those bytes forever).
* nats-py's slow-consumer limit: messages dropped past a subscription's pending limit are counted
  per subject, logged (at most once a second per subject) and exported as a metric.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from llmsrv.client import Client, NoResponders
from llmsrv.config import NatsConfig
from llmsrv.natsserver import NatsServer, free_port

from .conftest import running, user
from .test_fleet import serve_process, stop_process, wait_for_line, wait_instances

ENC = msgspec.json.encode


# ---- kill and restart nats-server under load ---------------------------------------------------

@pytest.mark.parametrize("reconnect_wait_s", [None, 0.1], ids=["default-wait", "wait-0.1s"])
async def test_sigkill_and_restart_of_nats_server_under_load(tmp_path: Path, reconnect_wait_s: float | None) -> None:
    port = free_port()
    server = NatsServer(port=port).start()
    prefix, log = f"o{uuid.uuid4().hex[:8]}", tmp_path / "llmsrv.log"
    wait = {} if reconnect_wait_s is None else {"reconnect_time_wait_s": reconnect_wait_s}
    proc = serve_process(server.url, prefix, log,  # by default as users run it: nats.reconnect_time_wait_s = 1
                         **{f"LLMSRV__NATS__{k.upper()}": str(v) for k, v in wait.items()})
    sent: list[tuple[float, str]] = []  # (sent at, outcome) of every request of the load
    first_ok: list[float] = []  # when the first reply after the restart arrived
    recovered = trio.Event()

    async def request(client: Client, text: str, timeout_s: float) -> str:
        try:
            msg = await client.request_raw(f"{prefix}.request", ENC({"messages": user(text), "model": "mock:echo"}),
                                           timeout_s=timeout_s)
        except trio.TooSlowError:
            return "timeout"  # in flight when the server died: lost with it
        except NoResponders:
            return "no-responders"  # the client is back before llmsrv is
        reply = msgspec.json.decode(msg.data)
        return "ok" if reply.get("text") == text else reply.get("error_code") or "wrong"

    async def load(client: Client, worker: int) -> None:
        for i in range(1_000_000):
            at = time.monotonic()
            outcome = await request(client, f"w{worker}.{i}", 2)
            sent.append((at, outcome))
            if outcome != "ok":
                await trio.sleep(0.05)  # no hot loop while NATS is down

    async def probe(client: Client, i: int) -> None:
        if await request(client, f"probe{i}", 5) == "ok" and not first_ok:
            first_ok.append(time.monotonic())
            recovered.set()

    def count(since: float) -> int:
        return sum(1 for t, _ in sent if t > since)

    try:
        async with Client.connect(server.url, prefix, NatsConfig(name="outage-test", **wait)) as client:
            await wait_instances(client, 1, procs=[proc])
            async with trio.open_nursery() as nursery:
                for worker in range(8):
                    nursery.start_soon(load, client, worker)
                with trio.fail_after(30):
                    while count(0) < 200:  # the load is flowing
                        await trio.sleep(0.02)
                server.kill()
                killed = time.monotonic()
                with trio.fail_after(30):
                    while client.bus.is_connected:
                        await trio.sleep(0.01)
                server = NatsServer(port=port).start()
                restarted = time.monotonic()
                with trio.fail_after(60):
                    async with trio.open_nursery() as probes:  # a fresh request every 20 ms until one succeeds
                        for i in range(3000):
                            probes.start_soon(probe, client, i)
                            with trio.move_on_after(0.02):
                                await recovered.wait()
                            if recovered.is_set():
                                break
                    while count(first_ok[0]) < 400:  # requests sent after recovery, answered
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            assert proc.poll() is None
        stop_process(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    recovery_s = first_ok[0] - restarted
    after = collections_count([o for t, o in sent if t > first_ok[0]])
    around = collections_count([o for t, o in sent if killed - 2 <= t <= first_ok[0]])
    assert set(after) == {"ok"}, after  # every request sent after recovery succeeded
    assert "reconnected to NATS" in log.read_text()
    assert recovery_s < 20, recovery_s
    print(f"\nnats-server SIGKILL + restart on its port, 8 closed-loop clients, reconnect wait "
          f"{reconnect_wait_s or 'default'}: recovery {recovery_s * 1000:.0f} ms "
          f"(restart -> first reply); server down {(restarted - killed) * 1000:.0f} ms; sent from 2 s before the "
          f"kill to recovery: {around}; after recovery: {after}")


def collections_count(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


# ---- start before NATS -------------------------------------------------------------------------

async def test_serve_waits_for_nats_that_comes_up_late(tmp_path: Path) -> None:
    port = free_port()
    prefix, log = f"o{uuid.uuid4().hex[:8]}", tmp_path / "llmsrv.log"
    proc = serve_process(f"nats://127.0.0.1:{port}", prefix, log, LLMSRV__NATS__INITIAL_CONNECT_TIMEOUT_S="120",
                         LLMSRV__NATS__RECONNECT_TIME_WAIT_S="0.2")
    server = None
    try:
        await wait_for_line(log, "not reachable yet")  # it tried, and is waiting
        assert proc.poll() is None
        server = NatsServer(port=port).start()
        await wait_for_line(log, "llmsrv: ready on")
        async with Client.connect(server.url, prefix) as client:
            reply = await client.complete({"messages": user("late"), "model": "mock:echo"}, timeout_s=10)
        assert reply.text == "late"
        stop_process(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None:
            server.stop()


def test_serve_exits_non_zero_when_nats_never_comes() -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "llmsrv", "serve", "--nats-url", f"nats://127.0.0.1:{port}"],
        env={**os.environ, "LLMSRV__NATS__INITIAL_CONNECT_TIMEOUT_S": "1", "LLMSRV__SERVER__HTTP_PORT": "0"},
        capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert f"cannot connect to NATS at nats://127.0.0.1:{port} within 1s (nats.initial_connect_timeout_s)" in err
    assert "Traceback" not in err


# ---- a server that stops reading -------------------------------------------------------------------

INFO = (b'INFO {"server_id":"stops-reading","version":"2.10.0","proto":1,"max_payload":1048576,'
        b'"headers":true}\r\n')


class StopsReading:
    """A NATS server on loopback (a real socket) whose first connection, after the handshake (INFO,
    then PONG to the client's PING), is never read again and never closed: a hung server. Later
    connections are served as far as the test needs: every PING answered, ``after`` set once a
    message on the subject ``after`` arrives."""

    def __init__(self) -> None:
        self.connections = 0
        self.after = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError):  # a client that resets the connection
            await self._serve(stream, first=self.connections == 1)

    async def _serve(self, stream: trio.SocketStream, first: bool) -> None:
        await stream.send_all(INFO)
        seen = b""
        async for data in stream:
            seen += data
            pings = seen.count(b"PING\r\n")
            if pings:
                await stream.send_all(b"PONG\r\n" * pings)
                if first:
                    await trio.sleep_forever()  # the socket stays open and unread
                if b"PUB after " in seen:
                    self.after.set()
                seen = seen[seen.rindex(b"PING\r\n") + 6:]


async def test_a_server_that_stops_reading_is_left_and_reconnected(caplog: pytest.LogCaptureFixture) -> None:
    from llmsrv.bus import CLOSE_WAIT_S, Bus

    server = StopsReading()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        url = f"nats://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        cfg = NatsConfig(ping_interval_s=0.2, max_outstanding_pings=2, reconnect_time_wait_s=0.1)
        async with Bus.connect(cfg, url) as bus:
            # the bounded close is in place (else nats-py's own waits, and this test with it, forever)
            assert type(bus._nc._transport).__name__ == "_ClosingTransport"
            for _ in range(200):  # 12 MB: more than the sockets and nats-py's own buffer (2 MiB) hold
                bus.publish_nowait("fill", b"x" * 60_000)
            with trio.fail_after(60):  # a hang guard only: it takes a ping or two, then CLOSE_WAIT_S
                while not bus.reconnects:
                    await trio.sleep(0.05)
                bus.publish_nowait("after", b"still here")
                await server.after.wait()
        nursery.cancel_scope.cancel()
    assert server.connections >= 2
    assert f"NATS connection not closed within {CLOSE_WAIT_S:g}s" in caplog.text


async def test_leaving_while_nats_is_down_with_messages_unsent_closes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """nats-py's close writes what it still holds to the dead connection's socket and raises
    ``ConnectionResetError``: leaving ``Bus.connect`` then must not raise (nor hang)."""
    from llmsrv.bus import Bus

    server = NatsServer(port=free_port()).start()
    try:
        with trio.fail_after(60):  # a hang guard only
            async with Bus.connect(NatsConfig(reconnect_time_wait_s=5), server.url) as bus:
                server.kill()
                while bus.is_connected:
                    await trio.sleep(0.01)
                for i in range(20):  # held by nats-py while it reconnects
                    bus.publish_nowait("lost", b"x%d" % i)
                await bus.flush()
    finally:
        server.stop()
    assert "NATS close failed (ConnectionResetError" in caplog.text


# ---- slow consumers ----------------------------------------------------------------------------

@pytest.mark.parametrize("limits", [{"pending_msgs_limit": 5}, {"pending_bytes_limit": 2000}],
                         ids=["msgs", "bytes"])
async def test_slow_consumer_drops_are_counted_logged_and_exported(
        nats_url: str, limits: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llmsrv.bus")
    async with running(nats_url, nats=limits) as h:
        cancel = h.service.subject_cancel
        burst, started = 3000, time.monotonic()
        for i in range(burst):  # one flush: nats-py reads them in large chunks, faster than it hands them on
            h.client.bus.publish_nowait(cancel, ENC({"correlation_id": f"nobody-{i:06d}"}))
        await h.client.bus.flush()
        # published after the burst on the same connection, so answered after every burst message was read
        reply = await h.client.complete({"messages": user("still here"), "model": "mock:echo"}, timeout_s=10)
        assert reply.text == "still here"
        dropped = h.service.bus.dropped
        metrics = h.service.metrics.render().decode()
        elapsed_s = time.monotonic() - started
    assert 0 < dropped.get(cancel, 0) < burst, dropped
    assert set(dropped) == {cancel}, dropped  # counted by the subscription's subject, nothing else lost
    assert f'llmsrv_nats_dropped_total{{subject="{cancel}"}} {float(dropped[cancel])}' in metrics
    warnings = [r.getMessage() for r in caplog.records if "slow consumer" in r.getMessage()]
    assert warnings and cancel in warnings[0] and "message(s)" in warnings[0], warnings
    assert len(warnings) <= 1 + elapsed_s, warnings  # at most once a second per subject, however many drops
    print(f"\nslow consumer ({limits}): {dropped[cancel]} of {burst} dropped, {len(warnings)} warning(s)")


async def test_on_drop_lets_every_dropped_request_be_answered(nats_url: str) -> None:
    """A subscription's ``on_drop`` hears the reply subject of each dropped message: with it, every
    message of a burst far over the pending limit still gets exactly one reply."""
    from llmsrv.bus import Bus

    subject, burst = f"drop.{uuid.uuid4().hex[:8]}", 2000
    async with Bus.connect(NatsConfig(pending_msgs_limit=3), nats_url) as server, \
            Bus.connect(NatsConfig(name="burst-client"), nats_url) as client:
        await server.subscribe(subject, lambda msg: server.publish_nowait(msg.reply, b"handled"),
                               on_drop=lambda reply: server.publish_nowait(reply, b"dropped"))
        await server.flush()
        replies: dict[str, list[bytes]] = {}
        inbox = client.new_inbox()
        await client.subscribe(inbox + ".*", lambda msg: replies.setdefault(msg.subject, []).append(msg.data))
        await client.flush()
        for i in range(burst):
            client.publish_nowait(subject, b"x" * 100, reply=f"{inbox}.{i}")
        await client.flush()
        with trio.fail_after(30):
            while len(replies) < burst:
                await trio.sleep(0.02)
            # published after every reply on the same connection: any second reply arrives before it
            server.publish_nowait(f"{inbox}.end", b"end")
            while f"{inbox}.end" not in replies:
                await trio.sleep(0.02)
        del replies[f"{inbox}.end"]
        dropped = server.dropped.get(subject, 0)
    assert all(len(r) == 1 for r in replies.values()), "a message got two replies"
    outcomes = collections_count([r[0].decode() for r in replies.values()])
    assert 0 < dropped == outcomes.get("dropped", 0), (dropped, outcomes)
    assert outcomes.get("handled", 0) == burst - dropped
