"""Real processes: a `llmsrv serve` subprocess drained by SIGTERM, reconnect across a
nats-server restart, and the CLI's config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest
import trio

from llmsrv.client import Client, NoResponders, ReplyError
from llmsrv.natsserver import NatsServer, free_port

from .conftest import running, user
from .fakes import wait_for_line


def _serve(nats_url: str, prefix: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmsrv", "serve", "--nats-url", nats_url],
        env={**os.environ, "LLMSRV__NATS__SUBJECT_PREFIX": prefix, "LLMSRV__SERVER__HTTP_PORT": "0",
             **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def _wait_ready(client: Client) -> None:
    with trio.fail_after(20):
        while True:
            try:
                await client.request_json("health", timeout_s=0.5)
                return
            except (trio.TooSlowError, ReplyError, Exception):
                await trio.sleep(0.1)


async def echo_outcome(client: Client, i: int, outcomes: list[str], timeout_s: float | None = None) -> None:
    """One mock:echo request; its outcome ("ok", "wrong" or the error code) appended to ``outcomes``."""
    try:
        reply = await client.complete({"messages": user(f"m{i}"), "model": "mock:echo"}, timeout_s=timeout_s)
        outcomes.append("ok" if reply.text == f"m{i}" else "wrong")
    except ReplyError as exc:
        outcomes.append(exc.error_code)


async def _drain_run(nats_url: str, n: int, **env: str) -> tuple[list[str], int, bytes]:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    proc = _serve(nats_url, prefix, **env)
    outcomes: list[str] = []
    late_outcome: list[str] = []
    try:
        async with Client.connect(nats_url, prefix) as client:
            await _wait_ready(client)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(echo_outcome, client, i, outcomes)
                with trio.fail_after(10):  # fail-safe; wait until all n are in flight at the server
                    while (await client.request_json("health"))["inflight"] < n:
                        await trio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(5):
                    while (await client.request_json("health"))["status"] != "draining":
                        await trio.sleep(0.05)
                # a request after the unsubscribe must not be lost either
                try:
                    late = await client.request_raw(f"{prefix}.request", msgspec.json.encode(
                        {"messages": user()}))
                    late_outcome.append("late:" + msgspec.json.decode(late.data).get("error_code", "ok"))
                except NoResponders:
                    late_outcome.append("late:NO_RESPONDERS")
        rc = await trio.to_thread.run_sync(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return outcomes + late_outcome, rc, proc.stderr.read() if proc.stderr else b""


async def test_sigterm_drains_in_flight_requests(nats_url: str) -> None:
    outcomes, rc, stderr = await _drain_run(nats_url, 10, LLMSRV__PROVIDERS__MOCK__LATENCY_MS="1500")
    assert rc == 0, stderr
    assert outcomes[:-1].count("ok") == 10, outcomes
    # the late request reached nobody (unsubscribed) or got SHUTTING_DOWN: never silence
    assert outcomes[-1] in ("late:SHUTTING_DOWN", "late:NO_RESPONDERS"), outcomes
    assert b"drained" in stderr


async def test_sigterm_after_grace_answers_shutting_down(nats_url: str) -> None:
    outcomes, rc, stderr = await _drain_run(nats_url, 5, LLMSRV__PROVIDERS__MOCK__LATENCY_MS="30000",
                                            LLMSRV__SERVER__DRAIN_GRACE_S="0.5")
    assert rc == 0, stderr
    assert outcomes[:-1] == ["SHUTTING_DOWN"] * 5, outcomes


async def test_reconnect_after_nats_server_restart() -> None:
    port = free_port()
    server = NatsServer(port=port).start()
    try:
        async with running(server.url, nats={"reconnect_time_wait_s": 0.1}) as h:
            before = await h.client.complete({"messages": user("before"), "model": "mock:echo"})
            assert before.text == "before"
            server.stop()
            await trio.sleep(0.3)
            server = NatsServer(port=port).start()
            with trio.fail_after(15):
                while not (h.service.bus.reconnects and h.client.bus.reconnects):
                    await trio.sleep(0.05)
            await h.client.bus.flush()
            reply = await h.client.complete({"messages": user("after"), "model": "mock:echo"}, timeout_s=5)
            assert reply.text == "after"
            assert h.service.statistics().counters.requests >= 2
    finally:
        server.stop()


@pytest.mark.parametrize(("toml", "key"), [
    ("[server]\nmax_inflight = \"many\"\n", "server.max_inflight"),
    ("[server]\nmax_inflite = 3\n", "max_inflite"),
    ("[providers.mock]\nerror_rate = 1.5\n", "providers.mock.error_rate"),
    ("[nats\n", "not valid TOML"),
], ids=["type", "unknown-key", "range", "syntax"])
def test_cli_config_error_exits_2_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    for command in (["check"], ["serve"]):
        proc = subprocess.run([sys.executable, "-m", "llmsrv", *command, "--config", str(path)],
                              capture_output=True, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert key in proc.stderr.decode()


def test_cli_check_lists_providers(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "llmsrv", "check"], capture_output=True, timeout=30,
                          env={**os.environ, "LLMSRV_CONFIG": ""})
    out = proc.stdout.decode()
    assert proc.returncode == 0
    assert "mock" in out and "available" in out and "claude" in out


def test_cli_ask_against_a_served_instance(nats_server: NatsServer) -> None:
    prefix = f"a{uuid.uuid4().hex[:8]}"
    proc = _serve(nats_server.url, prefix)
    env = {**os.environ, "LLMSRV__NATS__SUBJECT_PREFIX": prefix}
    try:
        wait_for_line(proc, b"ready")  # bounded (30 s fail-safe): subscribed and serving from here on
        ask = subprocess.run([sys.executable, "-m", "llmsrv", "ask", "--nats-url", nats_server.url,
                              "--model", "mock:echo", "--timeout", "10", "hi there"],
                             capture_output=True, timeout=30, env=env)
        assert ask.returncode == 0, ask.stderr
        assert ask.stdout.decode().strip() == "hi there", ask.stderr
        stream = subprocess.run([sys.executable, "-m", "llmsrv", "ask", "--nats-url", nats_server.url,
                                 "--model", "mock:echo", "--stream", "a b c"],
                                capture_output=True, timeout=30, env=env)
        assert stream.returncode == 0 and stream.stdout.decode().strip() == "a b c"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


async def test_connection_options_user_password_and_token() -> None:
    from llmsrv.bus import Bus, BusError
    from llmsrv.config import NatsConfig

    with NatsServer(args=("--user", "svc", "--pass", "s3cret-pw")) as server:
        async with Bus.connect(NatsConfig(user="svc", password="s3cret-pw"), server.url) as bus:
            assert bus.is_connected
        with pytest.raises(BusError) as info:
            async with Bus.connect(NatsConfig(user="svc", password="wrong-pw", max_reconnect_attempts=0),
                                   server.url):
                pass
        assert "wrong-pw" not in str(info.value) and "s3cret" not in str(info.value)
    with NatsServer(args=("--auth", "tok-123")) as server:
        async with Bus.connect(NatsConfig(token="tok-123"), server.url) as bus:
            assert bus.is_connected
    start = trio.current_time()
    with pytest.raises(BusError, match="cannot connect to NATS.*within 0.5s"):
        async with Bus.connect(NatsConfig(initial_connect_timeout_s=0.5), f"nats://127.0.0.1:{free_port()}"):
            pass
    assert trio.current_time() - start < 3


async def test_ask_ctrl_c_sends_llm_cancel(nats_url: str) -> None:
    async with running(nats_url, providers={"mock": {"latency_ms": 30000}}) as h:
        mock = h.service.providers["mock"]
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "llmsrv", "ask", "--nats-url", nats_url, "--model", "mock:echo", "hello"],
            env={**os.environ, "LLMSRV__NATS__SUBJECT_PREFIX": h.prefix}, stderr=subprocess.PIPE)
        with trio.fail_after(20):
            while mock.statistics().calls == 0:  # type: ignore[attr-defined]
                await trio.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            rc = await proc.wait()
            while mock.statistics().cancelled == 0:  # type: ignore[attr-defined]
                await trio.sleep(0.01)
        assert rc == 130
        assert h.service.statistics().counters.last_error == "CANCELLED"
