"""``stream``: streamed completions through llmsrv vs a direct httpx2 client to the same fake upstream.

Processes (as in ``provider``): a nats-server child, llmsrv as a child process with the
``openai_compat`` provider, and a fake OpenAI-compatible upstream child that streams ``CHUNKS`` SSE
chunks (``"tok "`` each) as fast as it can; this process only runs the two clients, so llmsrv and
the fake do not share its thread. For 1, 10 and 50 concurrent streams (smoke: 1 and 5), each round
runs waves of that many streams through llmsrv (``Client.stream``) and, interleaved, directly
(``httpx2`` and its ``EventSource``, the client llmsrv itself uses, the same request). Per point:

* time to first chunk (TTFC): from starting a stream to its first text; the overhead is llmsrv's
  TTFC minus the direct one (NATS both ways, validation, routing, the guard, SSE parsing, the
  chunk publish; the first chunk is sent at once, not held for coalescing);
* upstream chunks/s: upstream chunks delivered to the callers per second of wave time, all
  streams together. llmsrv coalesces deltas into one NATS message per ``stream_flush_ms``
  (25 ms), so it delivers fewer, larger messages: counted apart as ``nats_msgs_per_stream``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import httpx2
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench.scenario import Options, Result  # noqa: E402
from bench.scenarios.cancel import fmt, main, pct, progress, spread  # noqa: E402
from bench.scenarios.provider import fake_child, llmsrv_child  # noqa: E402
from llmsrv.client import Client  # noqa: E402
from llmsrv.messages import StreamChunk  # noqa: E402
from llmsrv.natsserver import NatsServer  # noqa: E402
from tests.fakes import Request, Sse  # noqa: E402

NAME = "stream"
SUMMARY = "streamed completions via llmsrv vs a direct httpx2 client: chunks/s and time-to-first-chunk overhead"

DELTA = "tok "
CHUNKS = 200  # per stream
FAILSAFE_S = 60.0


def _chunk(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


LAST = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": CHUNKS}}


def streaming_handler(chunks: int) -> Any:
    events = [_chunk(DELTA)] * chunks + [LAST, "[DONE]"]

    def handler(request: Request) -> Sse:
        return Sse(events)
    return handler


async def _via(client: Client, chunks: int) -> tuple[float, int, int]:
    """One stream through llmsrv: (TTFC s, upstream chunks received, NATS chunk messages)."""
    first: list[float] = []
    text: list[str] = []

    def on_chunk(chunk: StreamChunk) -> None:
        if not first:
            first.append(trio.current_time())
        text.append(chunk.delta)

    start = trio.current_time()
    await client.stream({"messages": [{"role": "user", "content": "hi"}], "model": "openai_compat:m"}, on_chunk)
    return first[0] - start, len("".join(text)) // len(DELTA), len(text)


async def _direct(http: httpx2.AsyncClient) -> tuple[float, int, int]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    start, ttfc, got = trio.current_time(), math.nan, 0
    async with http.stream("POST", "/chat/completions", json=body) as response:
        async for event in httpx2.EventSource(response):
            if event.data == "[DONE]":
                break
            delta = event.json()["choices"][0]["delta"].get("content")
            if delta:
                if not got:
                    ttfc = trio.current_time() - start
                got += 1
    return ttfc, got, got


async def _wave(n: int, one: Any) -> tuple[float, list[tuple[float, int, int]]]:
    """``n`` streams at once: (wave seconds, each stream's result)."""
    out: list[tuple[float, int, int]] = []

    async def go() -> None:
        out.append(await one())

    start = trio.current_time()
    with trio.fail_after(FAILSAFE_S):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(go)
    return trio.current_time() - start, out


async def _measure(opts: Options) -> Result:
    concurrencies = (1, 5) if opts.smoke else (1, 10, 50)
    chunks = 20 if opts.smoke else CHUNKS
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    streams_per_point = (lambda c: max(c, 4)) if opts.smoke else (lambda c: max(2 * c, 40))  # noqa: E731
    ways = ("llmsrv", "direct")
    # raw[(way, c)] = per round: (ttfc list s, chunks/s, nats msgs per stream)
    raw: dict[tuple[str, int], list[tuple[list[float], float, float]]] = {(w, c): [] for w in ways
                                                                           for c in concurrencies}
    problems: list[str] = []
    if opts.nats_url:
        problems.append("stream: --nats-url ignored; the scenario needs its own llmsrv pointed at its fake upstream")
    bar = progress(opts, rounds * len(concurrencies) * 2, "stream")
    children = []
    try:
        pool = max(concurrencies) + 8
        with NatsServer() as nats_server:
            fake = fake_child(f"stream:{chunks}")
            children.append(fake)
            upstream_url = (await fake.wait_ready()).split("fake upstream on ", 1)[1].split()[0]
            llmsrv = llmsrv_child(nats_server.url, upstream_url, pool)
            children.append(llmsrv)
            await llmsrv.wait_ready()
            limits = httpx2.Limits(max_connections=pool, max_keepalive_connections=pool)
            async with Client.connect(nats_server.url) as client, \
                    httpx2.AsyncClient(base_url=upstream_url, limits=limits, timeout=FAILSAFE_S) as http:
                calls = {"llmsrv": lambda: _via(client, chunks), "direct": lambda: _direct(http)}
                for way in ways:  # warm-up, not recorded: connections, imports, caches
                    await _wave(max(concurrencies), calls[way])
                for r in range(rounds):
                    for c in concurrencies:
                        for way in ways if r % 2 == 0 else ways[::-1]:
                            ttfc: list[float] = []
                            delivered, busy, msgs = 0, 0.0, 0
                            for _ in range(max(1, streams_per_point(c) // c)):
                                took, results = await _wave(c, calls[way])
                                busy += took
                                for first, got, m in results:
                                    ttfc.append(first)
                                    delivered += got
                                    msgs += m
                                    if got != chunks:
                                        problems.append(f"{way} c={c}: a stream delivered {got} of {chunks} chunks")
                            raw[(way, c)].append((ttfc, delivered / busy, msgs / max(1, len(ttfc))))
                            bar.update()
    finally:
        bar.close()
        for each in reversed(children):
            stopped = each.stop()
            if stopped:
                problems.append(stopped)

    figures: dict[str, Any] = {"settings": {"rounds": rounds, "concurrency": list(concurrencies),
                                            "chunks_per_stream": chunks, "delta": DELTA,
                                            "streams_per_point": {str(c): streams_per_point(c) for c in concurrencies},
                                            "smoke": opts.smoke}}
    rows = ["| streams | llmsrv TTFC p50 ms | direct TTFC p50 ms | TTFC overhead p50 ms | overhead p99 ms "
            "| llmsrv chunks/s | direct chunks/s | llmsrv/direct chunks/s | NATS msgs per stream |",
            "|---|---|---|---|---|---|---|---|---|"]
    series: dict[str, list[tuple[float, float]]] = {"llmsrv_chunks_per_s": [], "direct_chunks_per_s": [],
                                                    "ttfc_overhead_p50_ms": []}
    for c in concurrencies:
        via, direct = raw[("llmsrv", c)], raw[("direct", c)]
        point = {
            "llmsrv_ttfc_p50_ms": spread(pct(t, 0.5) * 1000 for t, _, _ in via),
            "llmsrv_ttfc_p99_ms": spread(pct(t, 0.99) * 1000 for t, _, _ in via),
            "direct_ttfc_p50_ms": spread(pct(t, 0.5) * 1000 for t, _, _ in direct),
            "direct_ttfc_p99_ms": spread(pct(t, 0.99) * 1000 for t, _, _ in direct),
            "ttfc_overhead_p50_ms": spread((pct(a, 0.5) - pct(b, 0.5)) * 1000
                                           for (a, _, _), (b, _, _) in zip(via, direct, strict=True)),
            "ttfc_overhead_p99_ms": spread((pct(a, 0.99) - pct(b, 0.99)) * 1000
                                           for (a, _, _), (b, _, _) in zip(via, direct, strict=True)),
            "llmsrv_chunks_per_s": spread(cps for _, cps, _ in via),
            "direct_chunks_per_s": spread(cps for _, cps, _ in direct),
            "chunks_per_s_ratio": spread(a / b for (_, a, _), (_, b, _) in zip(via, direct, strict=True)),
            "nats_msgs_per_stream": spread(m for _, _, m in via),
        }
        figures[f"c{c}"] = point
        rows.append(f"| {c} | {fmt(point['llmsrv_ttfc_p50_ms'])} | {fmt(point['direct_ttfc_p50_ms'])} "
                    f"| {fmt(point['ttfc_overhead_p50_ms'])} | {fmt(point['ttfc_overhead_p99_ms'])} "
                    f"| {fmt(point['llmsrv_chunks_per_s'], digits=0)} | {fmt(point['direct_chunks_per_s'], digits=0)} "
                    f"| {fmt(point['chunks_per_s_ratio'], 'x')} | {fmt(point['nats_msgs_per_stream'], digits=1)} |")
        for name in series:
            series[name].append((float(c), point[name]["median"]))
    summary = (f"Streams of {chunks} upstream chunks through llmsrv vs direct httpx2, same fake upstream "
               f"(median over {rounds} round(s), min-max of rounds in brackets):\n\n" + "\n".join(rows) + "\n")
    return Result(NAME, figures, summary, series, problems[:20])


def run(opts: Options) -> Result:
    return trio.run(_measure, opts)


if __name__ == "__main__":
    main(run)
