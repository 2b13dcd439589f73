"""``cancel``: how fast a cancelled or timed-out request closes its upstream connection.

Everything is real and in one trio process, so every time comes from one clock: a nats-server child
process, an in-process llmsrv ``Service`` with the ``openai_compat`` provider, and a fake
OpenAI-compatible upstream (``tests.fakes.FakeUpstream``, h11 on loopback) that never answers.
Two ways to end a request, interleaved one by one:

* ``llm.cancel``: from publishing the cancel (once the fake has the request) to the fake seeing
  its connection closed;
* ``deadline``: the request carries ``timeout_ms``; from the deadline (client send time +
  ``timeout_ms``; the server's clock starts when it receives the request, a NATS hop later, so
  this slightly overstates) to the fake seeing the close.

This module also holds the in-process harness (``in_process``) and the statistics helpers the
``stream`` scenario uses.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # tests.fakes, run from anywhere

from bench.scenario import Options, Result  # noqa: E402
from llmsrv.bus import Bus  # noqa: E402
from llmsrv.client import Client  # noqa: E402
from llmsrv.config import build_config  # noqa: E402
from llmsrv.errors import ReplyError  # noqa: E402
from llmsrv.natsserver import NatsServer  # noqa: E402
from llmsrv.service import Service  # noqa: E402
from tests.fakes import FakeUpstream, Handler, Hang, Request  # noqa: E402

NAME = "cancel"
SUMMARY = "llm.cancel and request deadlines vs an upstream that never answers: time until it sees the close"

DEADLINE_MS = 50  # the short request deadline of the `deadline` way
FAILSAFE_S = 10.0  # one cancellation taking longer than this is a failure, not a measurement


# ---- statistics --------------------------------------------------------------------------------

def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def spread(per_round: Iterable[float]) -> dict[str, Any]:
    """Median over rounds with the lowest and highest round, and every round's value."""
    values = [round(v, 4) for v in per_round if not math.isnan(v)]
    if not values:
        return {"median": None, "min": None, "max": None, "rounds": []}
    return {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values),
            "rounds": values}


def fmt(figure: dict[str, Any], unit: str = "", digits: int = 2) -> str:
    """``median (min-max)`` of a ``spread`` figure, for the Markdown tables."""
    if figure["median"] is None:
        return "n/a"
    if len(figure["rounds"]) == 1:
        return f"{figure['median']:.{digits}f}{unit}"
    return f"{figure['median']:.{digits}f}{unit} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"


def progress(opts: Options, total: int, desc: str) -> Any:
    """A tqdm bar when asked for (and tqdm is installed), else a no-op with the same ``update``/``close``."""
    if opts.progress and not opts.smoke:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    class _Quiet:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Quiet()


# ---- the in-process harness ----------------------------------------------------------------------

@dataclass
class Harness:
    client: Client
    upstream: FakeUpstream
    cfg: Any
    service: Service


@asynccontextmanager
async def in_process(handler: Handler, max_concurrency: int = 64, *, provider: dict[str, Any] | None = None,
                     routing: dict[str, Any] | None = None, log_level: str = "warning") -> AsyncIterator[Harness]:
    """nats-server child + fake upstream + in-process llmsrv (``openai_compat`` -> the fake) + a client.

    ``provider`` adds keys to ``[providers.openai_compat]``, ``routing`` is the ``[routing]`` section.
    Everything is stopped on the way out, also on cancellation or Ctrl-C (the nats-server in its
    ``with``, the service by ``shutdown()`` or the nursery's cancellation).
    """
    with NatsServer() as nats_server:
        async with FakeUpstream(handler) as up:
            cfg = build_config({"nats": {"url": nats_server.url, "subject_prefix": f"b{uuid.uuid4().hex[:6]}"},
                                "server": {"http_port": 0, "log_level": log_level},
                                "providers": {"openai_compat": {"base_url": up.url, "max_concurrency": max_concurrency,
                                                                **(provider or {})}},
                                "routing": routing or {}},
                               env={})
            async with Bus.connect(cfg.nats, nats_server.url) as bus:
                service = Service(cfg, bus)
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.run)
                    try:
                        async with Client.connect(nats_server.url, cfg.nats.subject_prefix) as client:
                            yield Harness(client, up, cfg, service)
                    finally:
                        service.shutdown()
                        nursery.cancel_scope.deadline = trio.current_time() + 15  # a drain that hangs


# ---- the scenario --------------------------------------------------------------------------------

def _hang(request: Request) -> Hang:
    return Hang()


async def _one(h: Harness, way: str, i: int) -> float:
    """One request to the hanging upstream, ended by ``way``: ms from the cancel/deadline to the close."""
    up, client = h.upstream, h.client
    cid = f"{way}-{i}-{uuid.uuid4().hex[:6]}"
    seen, requests = len(up.disconnects), len(up.requests)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hang"}], "model": "openai_compat:m",
                            "correlation_id": cid}
    if way == "deadline":
        body["timeout_ms"] = DEADLINE_MS

    async def ask() -> None:
        try:
            await client.complete(body)
        except ReplyError:
            pass  # CANCELLED / TIMEOUT: expected

    with trio.fail_after(FAILSAFE_S):
        async with trio.open_nursery() as nursery:
            sent = trio.current_time()
            nursery.start_soon(ask)
            await up.wait_until(lambda: len(up.requests) > requests, FAILSAFE_S)
            if way == "cancel":
                sent = trio.current_time()
                client.bus.publish_nowait(f"{client.prefix}.cancel",
                                          b'{"correlation_id": "%s"}' % cid.encode())
            else:
                sent += DEADLINE_MS / 1000
            closed = await up.wait_disconnect(seen + 1, FAILSAFE_S)
    return (closed - sent) * 1000


async def _measure(opts: Options) -> Result:
    per_round = 5 if opts.smoke else 100
    warmup = 2 if opts.smoke else 10
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    ways = ("cancel", "deadline")
    samples: dict[str, list[list[float]]] = {w: [] for w in ways}
    problems: list[str] = []
    if opts.nats_url:
        problems.append("cancel: --nats-url ignored; the scenario needs its own llmsrv pointed at its fake upstream")
    bar = progress(opts, rounds * per_round * 2, "cancel")
    try:
        async with in_process(_hang) as h:
            for i in range(warmup):  # not recorded: connection set-up, first-call imports and caches
                for way in ways:
                    await _one(h, way, -1 - i)
            for _ in range(rounds):
                got: dict[str, list[float]] = {w: [] for w in ways}
                for i in range(per_round):
                    for way in ways if i % 2 == 0 else ways[::-1]:  # interleaved, order alternating
                        try:
                            got[way].append(await _one(h, way, i))
                        except trio.TooSlowError:
                            problems.append(f"{way}: no close seen within {FAILSAFE_S:.0f} s (request {i})")
                        bar.update()
                for way in ways:
                    samples[way].append(got[way])
    finally:
        bar.close()

    figures: dict[str, Any] = {"settings": {"rounds": rounds, "per_round": per_round, "warmup": warmup,
                                            "deadline_ms": DEADLINE_MS, "smoke": opts.smoke}}
    rows = ["| way | n | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    series: dict[str, list[tuple[float, float]]] = {}
    for way in ways:
        pooled = [v for r in samples[way] for v in r]
        f = {"n": len(pooled),
             "p50_ms": spread(pct(r, 0.5) for r in samples[way]),
             "p99_ms": spread(pct(r, 0.99) for r in samples[way]),
             "max_ms": spread(max(r) if r else math.nan for r in samples[way]),
             "pooled_p50_ms": round(pct(pooled, 0.5), 4) if pooled else None,
             "pooled_p99_ms": round(pct(pooled, 0.99), 4) if pooled else None}
        figures[way] = f
        rows.append(f"| {way} | {f['n']} | {fmt(f['p50_ms'])} | {fmt(f['p99_ms'])} | {fmt(f['max_ms'])} |")
        series[f"{way}_ms_by_quantile"] = [(q, pct(pooled, q)) for q in (0.5, 0.9, 0.99, 0.999, 1.0)] if pooled else []
    summary = ("Time from `llm.cancel` / the request deadline to the upstream seeing its connection closed "
               f"(median over {rounds} round(s), min-max of rounds in brackets):\n\n" + "\n".join(rows) + "\n")
    return Result(NAME, figures, summary, series, problems)


def run(opts: Options) -> Result:
    return trio.run(_measure, opts)


def main(run: Callable[[Options], Result]) -> None:
    """``python bench/scenarios/<name>.py [--smoke]``: one scenario alone, its summary on stdout."""
    result = run(Options(smoke="--smoke" in sys.argv[1:]))
    print(result.summary_md)
    print(json.dumps(result.figures, indent=1))
    for p in result.problems:
        print("problem:", p)


if __name__ == "__main__":
    main(run)
