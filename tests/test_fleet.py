"""Multi-instance: two `llmsrv serve` processes in one queue group on one real nats-server.

They share the load, an `llm.cancel` reaches the instance holding the request, and a Redis-backed
rate limit (real redis-server) admits N requests a minute for the whole fleet, not N per instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from llmsrv.client import Client
from llmsrv.config import NatsConfig
from llmsrv.natsserver import NatsServer, free_port

from .conftest import user

ENC = msgspec.json.encode


def serve_process(nats_url: str, prefix: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`llmsrv serve` with its output in a file: a full pipe nobody reads would block its logging."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "llmsrv", "serve", "--nats-url", nats_url],
            env={**os.environ, "LLMSRV__NATS__SUBJECT_PREFIX": prefix, "LLMSRV__SERVER__HTTP_PORT": "0",
                 **env},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM and a clean exit (rc 0) within 30 s; a process that hangs is killed and fails the test."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"llmsrv serve did not stop on SIGTERM:\n{log.read_text()[-3000:]}") from None
    assert rc == 0, log.read_text()[-3000:]


async def wait_for_line(log: Path, text: str, timeout_s: float = 30) -> None:
    with trio.fail_after(timeout_s):
        while text not in await trio.Path(log).read_text(errors="replace"):
            await trio.sleep(0.05)


async def wait_instances(client: Client, n: int, timeout_s: float = 30,
                         procs: Sequence[subprocess.Popen[bytes]] = ()) -> list[dict[str, Any]]:
    """Until ``n`` instances answer ``llm.admin.status``; their documents."""
    with trio.fail_after(timeout_s):
        while True:
            docs = await client.gather("admin.status", {}, wait_s=0.3)
            if len(docs) >= n:
                return docs
            assert all(p.poll() is None for p in procs), "an llmsrv serve process exited"


@contextmanager
def fleet(nats_url: str, tmp_path: Path, n: int, **env: str) -> Iterator[Fleet]:
    prefix = f"f{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / f"llmsrv-{i}.log" for i in range(n)]
    procs = [serve_process(nats_url, prefix, log, **env) for log in logs]
    try:
        yield Fleet(prefix, procs, logs)
    finally:
        for proc, log in zip(procs, logs, strict=True):
            stop_process(proc, log)


@dataclass
class Fleet:
    prefix: str
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]


@asynccontextmanager
async def fleet_client(nats_url: str, f: Fleet) -> AsyncIterator[Client]:
    async with Client.connect(nats_url, f.prefix, NatsConfig(name="fleet-test")) as client:
        await wait_instances(client, len(f.procs), procs=f.procs)
        yield client


def by_instance(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["instance_id"]: doc["stats"] for doc in docs}


async def test_two_instances_share_the_load(nats_server: NatsServer, tmp_path: Path) -> None:
    with fleet(nats_server.url, tmp_path, 2) as f:
        async with fleet_client(nats_server.url, f) as client:
            before = by_instance(await wait_instances(client, 2))
            n = 60
            texts: list[str] = []

            async def one(i: int) -> None:
                texts.append((await client.complete({"messages": user(f"m{i}"), "model": "mock:echo"})).text)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            after = by_instance(await wait_instances(client, 2))
    assert sorted(texts) == sorted(f"m{i}" for i in range(n))
    served = {iid: after[iid]["requests"] - before[iid]["requests"] for iid in after}
    assert len(served) == 2 and sum(served.values()) == n, served
    # the queue group picks at random: one instance taking all 60 has probability 2**-59
    assert all(count > 0 for count in served.values()), served


async def test_cancel_reaches_the_instance_holding_the_request(nats_server: NatsServer, tmp_path: Path) -> None:
    with fleet(nats_server.url, tmp_path, 2, LLMSRV__PROVIDERS__MOCK__LATENCY_MS="60000") as f:
        prefix = f.prefix
        async with fleet_client(nats_server.url, f) as client:
            cid = f"long-{uuid.uuid4().hex[:8]}"
            replies: list[dict[str, Any]] = []

            async def long_request() -> None:
                msg = await client.request_raw(f"{prefix}.request", ENC(
                    {"messages": user(), "model": "mock:echo", "correlation_id": cid}), timeout_s=30)
                replies.append(msgspec.json.decode(msg.data))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_request)
                with trio.fail_after(20):  # until one instance holds it
                    while not any(s["inflight"] for s in by_instance(await wait_instances(client, 2)).values()):
                        await trio.sleep(0.05)
                holders = [iid for iid, s in by_instance(await wait_instances(client, 2)).items() if s["inflight"]]
                sent = time.monotonic()
                client.bus.publish_nowait(f"{prefix}.cancel", ENC({"correlation_id": cid}))
            answered_s = time.monotonic() - sent
            after = by_instance(await wait_instances(client, 2))
    assert replies[0]["error_code"] == "CANCELLED" and replies[0]["correlation_id"] == cid, replies
    assert answered_s < 5, answered_s  # not the 60 s of the mock's latency
    assert len(holders) == 1 and after[holders[0]]["last_error"] == "CANCELLED"
    assert all(s["inflight"] == 0 for s in after.values())
    print(f"\ncancel across the fleet answered in {answered_s * 1000:.0f} ms")


async def test_redis_rate_limit_holds_fleet_wide(nats_server: NatsServer, redis_url: str, tmp_path: Path) -> None:
    import redis

    url = redis_url.rpartition("/")[0] + "/9"  # a database of this test's own, emptied first
    redis.Redis.from_url(url).flushdb()
    rpm = 6
    env = {"LLMSRV__ROUTING__STORAGE_URI": url, "LLMSRV__PROVIDERS__MOCK__RPM": f"{rpm}/hour",
           "LLMSRV__ROUTING__RETRY__MAX_ATTEMPTS": "1"}
    with fleet(nats_server.url, tmp_path, 2, **env) as f:
        prefix = f.prefix
        async with fleet_client(nats_server.url, f) as client:
            before = by_instance(await wait_instances(client, 2))
            outcomes: list[str] = []

            async def one(i: int) -> None:
                msg = await client.request_raw(f"{prefix}.request", ENC(
                    {"messages": user(f"r{i}"), "model": "mock:echo"}), timeout_s=20)
                outcomes.append(msgspec.json.decode(msg.data).get("error_code", "ok"))

            async with trio.open_nursery() as nursery:
                for i in range(4 * rpm):
                    nursery.start_soon(one, i)
            after = by_instance(await wait_instances(client, 2))
    served = {iid: after[iid]["requests"] - before[iid]["requests"] for iid in after}
    assert outcomes.count("ok") == rpm, outcomes  # N for the fleet, not N per instance
    assert outcomes.count("RATE_LIMITED") == 3 * rpm, outcomes
    assert all(count > 0 for count in served.values()), served  # both instances took part



@pytest.mark.parametrize("control", ["true", "false"])
async def test_health_and_admin_are_read_on_a_connection_of_their_own(tmp_path: Path, control: str) -> None:
    """What nats-server itself reports (its monitoring endpoint, ``/connz?subs=1``): requests and cancels on
    one connection, health, admin and ``$SRV`` discovery on ``<name>-control``, so they are never read behind
    the requests waiting on the first; with ``nats.control_connection = false``, one connection for all."""
    monitor = free_port()
    with NatsServer(args=("-m", str(monitor))) as server, \
            fleet(server.url, tmp_path, 1, LLMSRV__NATS__CONTROL_CONNECTION=control) as f:
        async with fleet_client(server.url, f) as client:
            health = await client.request_json("health")
            async with httpx.AsyncClient() as http:
                connz = (await http.get(f"http://127.0.0.1:{monitor}/connz?subs=1")).json()
    subjects = {c.get("name", ""): set(c.get("subscriptions_list", [])) for c in connz["connections"]}
    p = f.prefix
    requests = {f"{p}.request", f"{p}.req.>", f"{p}.cancel", f"{p}.ping.{health['instance_id']}"}
    controls = {f"{p}.health", f"{p}.admin.status", f"{p}.admin.breaker.set", f"{p}.admin.breaker.state",
                "$SRV.INFO", "$SRV.PING.llmsrv", f"$SRV.STATS.llmsrv.{health['instance_id']}"}
    assert health["nats"] == "connected"
    if control == "true":
        assert requests <= subjects["llmsrv"] and not controls & subjects["llmsrv"], subjects
        assert controls <= subjects["llmsrv-control"] and not requests & subjects["llmsrv-control"], subjects
    else:
        assert "llmsrv-control" not in subjects and requests | controls <= subjects["llmsrv"], subjects
