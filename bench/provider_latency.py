"""Cancellation latency and streaming overhead of an HTTP provider call through llmsrv.

Everything is real: a nats-server child process, an in-process llmsrv service with the
``openai_compat`` provider, and a fake OpenAI-compatible upstream (the tests' h11 server on
loopback) speaking chat-completions SSE. Client, service and fake share one trio loop, so the
times below come from one clock.

* cancellation latency: from publishing ``llm.cancel`` for an in-flight request whose upstream
  never answers, to the fake upstream seeing its connection closed;
* streaming overhead: time to first chunk seen by an llmsrv client, minus the fake upstream's own
  time to first chunk as a direct httpx client sees it (same request, measured in the same run,
  interleaved). The difference is what llmsrv adds: NATS both ways, validation, routing, the
  guard, SSE parsing and the chunk publish (the first chunk is not held for coalescing).

    python bench/provider_latency.py [--runs 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmsrv.bus import Bus  # noqa: E402
from llmsrv.client import Client, ReplyError  # noqa: E402
from llmsrv.config import build_config  # noqa: E402
from llmsrv.natsserver import NatsServer  # noqa: E402
from llmsrv.service import Service  # noqa: E402
from tests.fakes import FakeUpstream, Hang, Request, Sse  # noqa: E402

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}]}
LAST = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(name: str, values_ms: list[float]) -> str:
    return (f"{name:<22} n={len(values_ms):<4} p50 {statistics.median(values_ms):7.2f} ms   "
            f"p99 {pct(values_ms, 0.99):7.2f} ms   max {max(values_ms):7.2f} ms")


async def main(runs: int) -> None:
    def handler(request: Request) -> Any:
        return Hang() if b"hang" in request.body else Sse([CHUNK, LAST, "[DONE]"])

    with NatsServer() as nats_server:
        async with FakeUpstream(handler) as up:
            cfg = build_config({"nats": {"url": nats_server.url, "subject_prefix": f"b{uuid.uuid4().hex[:6]}"},
                                "server": {"http_port": 0},
                                "providers": {"openai_compat": {"base_url": up.url, "max_concurrency": 8}}},
                               env={})
            async with Bus.connect(cfg.nats, nats_server.url) as bus:
                service = Service(cfg, bus)
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.run)
                    async with Client.connect(nats_server.url, cfg.nats.subject_prefix) as client:
                        cancel_ms = await cancellation(client, up, runs)
                        through, direct = await first_chunk(client, up.url, runs)
                    service.shutdown()
    print(line("cancel -> upstream closed", cancel_ms))
    print(line("first chunk via llmsrv", through))
    print(line("first chunk direct", direct))
    print(line("streaming overhead", [a - b for a, b in zip(through, direct, strict=True)]))


async def cancellation(client: Client, up: FakeUpstream, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        cid = f"cancel-{i}"
        seen = len(up.disconnects)
        requests = len(up.requests)

        async def ask(cid: str = cid) -> None:
            try:
                await client.complete({"messages": [{"role": "user", "content": "hang"}],
                                       "model": "openai_compat:m", "correlation_id": cid})
            except ReplyError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            with trio.fail_after(5):
                while len(up.requests) == requests:  # noqa: ASYNC110 (polling the fake's log)
                    await trio.sleep(0.0005)
            sent = trio.current_time()
            client.bus.publish_nowait(f"{client.prefix}.cancel", b'{"correlation_id": "%s"}' % cid.encode())
            closed = await up.wait_disconnect(seen + 1)
        out.append((closed - sent) * 1000)
    return out


async def first_chunk(client: Client, url: str, runs: int) -> tuple[list[float], list[float]]:
    through, direct = [], []
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(runs):
            first: list[float] = []

            def on_chunk(chunk: object, first: list[float] = first) -> None:
                if not first:
                    first.append(trio.current_time())

            start = trio.current_time()
            await client.stream({"messages": [{"role": "user", "content": "hi"}], "model": "openai_compat:m"},
                                on_chunk)
            through.append((first[0] - start) * 1000)

            start = trio.current_time()
            async with http.stream("POST", "/chat/completions", json=body) as response:
                async for _ in httpx_sse.EventSource(response).aiter_sse():
                    direct.append((trio.current_time() - start) * 1000)
                    break
    return through, direct


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    trio.run(main, parser.parse_args().runs)
