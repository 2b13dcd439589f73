"""``faults``: an upstream that fails outright for a while, under constant load, with a fallback configured.

Everything is real and in one trio process (one clock): a nats-server child process, an in-process
llmsrv ``Service`` whose routing cell (``general``/``simple``) is ``openai_compat:m`` then ``mock:echo``,
and a fake OpenAI-compatible upstream (``tests.fakes.FakeUpstream``) that answers 200, then HTTP 503
to everything for ``fault_s`` (10 s; smoke 1 s), then 200 again. A paced open-loop client sends
requests at a constant rate (100/s; smoke 20/s) on a fixed schedule, whatever the replies do.

Per round it measures:

* the success rate over time (any provider: the fallback counts), per 250 ms of send time;
* the time from the fault start until the breaker of ``openai_compat`` is open (polled every 5 ms);
* how many requests reached the dead upstream (the fake counts the 503s it sent);
* the time to recover: from the fault end to the first reply served by the recovered upstream.

The breaker is set so that recovery happens within the run: ``breaker_threshold`` 5,
``breaker_ttl_s`` 1 s (smoke 0.3 s), ``breaker_scope`` provider; retries: one attempt per candidate.
"""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # tests.fakes, run from anywhere

from bench.scenario import Options, Result  # noqa: E402
from bench.scenarios import cancel  # noqa: E402
from bench.scenarios.cancel import fmt, main, pct, progress, spread  # noqa: E402
from llmsrv.client import Client  # noqa: E402
from llmsrv.errors import ReplyError  # noqa: E402
from llmsrv.service import Service  # noqa: E402
from tests.fakes import Json, Request  # noqa: E402

NAME = "faults"
SUMMARY = "upstream 503s for 10 s under constant load, with fallback: success rate, breaker opening, recovery"

PRIMARY, FALLBACK = "openai_compat:m", "mock:echo"
BUCKET_S = 0.25  # the success-rate series' resolution
POLL_S = 0.005  # how often the breaker state is looked at
THRESHOLD = 5
REQUEST_TIMEOUT_S = 5.0  # one request's fail-safe; a reply later than this counts as a failure
_OK = {"id": "c", "object": "chat.completion", "model": "m", "choices": [{
    "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
_DOWN = {"error": {"message": "service unavailable (bench fault)", "type": "server_error"}}


@dataclass(frozen=True)
class Plan:
    rate: float  # requests per second
    pre_s: float  # healthy before the fault
    fault_s: float
    post_s: float  # healthy after the fault
    ttl_s: float  # breaker_ttl_s
    warmup: int  # unmeasured requests before each round

    @property
    def total_s(self) -> float:
        return self.pre_s + self.fault_s + self.post_s


def plan_for(opts: Options) -> Plan:
    if opts.smoke:
        return Plan(rate=20, pre_s=0.5, fault_s=1.0, post_s=1.5, ttl_s=0.3, warmup=5)
    return Plan(rate=100, pre_s=2.0, fault_s=10.0, post_s=4.0, ttl_s=1.0, warmup=50)


class Upstream:
    """The fake's handler: 503 while ``failing``; counts what it answered each way."""

    def __init__(self) -> None:
        self.failing = False
        self.failed = 0  # 503s sent
        self.served = 0  # 200s sent

    def __call__(self, request: Request) -> Json:
        if self.failing:
            self.failed += 1
            return Json(_DOWN, status=503)
        self.served += 1
        return Json(_OK)


@dataclass
class Sample:
    sent: float  # trio time
    done: float
    ok: bool
    model: str  # who served it ("" on error)
    error: str = ""


@dataclass
class Harness:
    client: Client
    service: Service
    upstream: Upstream


@asynccontextmanager
async def in_process(ttl_s: float) -> AsyncIterator[Harness]:
    """``cancel.in_process`` with the fallback cell and a breaker that opens and recovers within the run."""
    handler = Upstream()
    async with cancel.in_process(
            handler, 256, log_level="error",
            provider={"breaker_threshold": THRESHOLD, "breaker_ttl_s": ttl_s, "breaker_scope": "provider",
                      "timeout_ms": 4000},
            routing={"matrix": {"general": {"simple": [PRIMARY, FALLBACK]}},
                     "retry": {"max_attempts": 2, "backoff_base_ms": 0}}) as h:
        yield Harness(h.client, h.service, handler)


async def _one(h: Harness, out: list[Sample]) -> None:
    sent = trio.current_time()
    try:
        reply = await h.client.complete({"messages": [{"role": "user", "content": "hello"}], "complexity": "simple"},
                                        timeout_s=REQUEST_TIMEOUT_S)
    except ReplyError as exc:
        out.append(Sample(sent, trio.current_time(), False, "", exc.error_code))
    except trio.TooSlowError:
        out.append(Sample(sent, trio.current_time(), False, "", "client timeout"))
    else:
        out.append(Sample(sent, trio.current_time(), True, reply.model))


async def _paced(h: Harness, rate: float, count: int, out: list[Sample], bar: Any = None) -> None:
    """``count`` requests at ``rate``/s on a fixed schedule (open loop), then wait for every reply."""
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(count):
            await trio.sleep_until(start + i / rate)
            nursery.start_soon(_one, h, out)
            if bar is not None:
                bar.update()


@dataclass
class Round:
    samples: list[Sample] = field(default_factory=list)
    fault_at: float = 0.0
    healed_at: float = 0.0
    opened_at: float | None = None  # first time the breaker was seen open after the fault start
    transitions: list[tuple[float, str]] = field(default_factory=list)  # (s from fault start, state)
    dead_requests: int = 0
    upstream_during_open: int = 0


async def _round(h: Harness, p: Plan, bar: Any) -> Round:
    r = Round()
    up = h.upstream
    breaker = h.service.pipeline.guards["openai_compat"].breaker
    warm: list[Sample] = []
    await _paced(h, p.rate, p.warmup, warm)  # not recorded: connections, caches, a closed breaker
    start = trio.current_time()
    r.fault_at, r.healed_at = start + p.pre_s, start + p.pre_s + p.fault_s

    async def faults() -> None:
        await trio.sleep_until(r.fault_at)
        before = up.failed
        up.failing = True
        await trio.sleep_until(r.healed_at)
        up.failing = False
        r.dead_requests = up.failed - before

    async def watch(done: trio.Event) -> None:
        last = breaker.state
        while not done.is_set():
            now = trio.current_time()
            state = breaker.state
            if state != last:
                r.transitions.append((round(now - r.fault_at, 4), state))
                last = state
            if state == "open" and r.opened_at is None and now >= r.fault_at:
                r.opened_at = now
            with trio.move_on_after(POLL_S):
                await done.wait()

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(faults)
        nursery.start_soon(watch, done)
        await _paced(h, p.rate, round(p.rate * p.total_s), r.samples, bar)
        done.set()
    return r


def _round_figures(r: Round) -> dict[str, Any]:
    ok = [s for s in r.samples if s.ok]
    during = [s for s in r.samples if r.fault_at <= s.sent < r.healed_at]
    recovered = [s.done for s in r.samples if s.ok and s.model == PRIMARY and s.done >= r.healed_at]
    latencies = [(s.done - s.sent) * 1000 for s in during if s.ok]
    return {
        "requests": len(r.samples),
        "success_rate": len(ok) / len(r.samples) if r.samples else math.nan,
        "success_rate_during_fault": sum(s.ok for s in during) / len(during) if during else math.nan,
        "fallback_share_during_fault": sum(s.model == FALLBACK for s in during) / len(during) if during else math.nan,
        "breaker_open_s": r.opened_at - r.fault_at if r.opened_at is not None else math.nan,
        "dead_requests": r.dead_requests,
        "recover_s": min(recovered) - r.healed_at if recovered else math.nan,
        "p50_ms_during_fault": pct(latencies, 0.5),
        "p99_ms_during_fault": pct(latencies, 0.99),
        "errors": sorted({s.error for s in r.samples if not s.ok})[:5],
    }


def _series(rounds: list[Round], p: Plan) -> dict[str, list[tuple[float, float]]]:
    """Per 250 ms of send time (x: seconds from the fault start, bucket start), pooled over rounds."""
    n = math.ceil(p.total_s / BUCKET_S)
    ok, primary, total = [0] * n, [0] * n, [0] * n
    for r in rounds:
        start = r.fault_at - p.pre_s
        for s in r.samples:
            b = min(n - 1, max(0, int((s.sent - start) / BUCKET_S)))
            total[b] += 1
            ok[b] += s.ok
            primary[b] += s.ok and s.model == PRIMARY
    xs = [round(b * BUCKET_S - p.pre_s, 4) for b in range(n)]
    return {"success_rate": [(x, ok[b] / total[b]) for b, x in enumerate(xs) if total[b]],
            "served_by_upstream": [(x, primary[b] / total[b]) for b, x in enumerate(xs) if total[b]]}


async def _measure(opts: Options) -> Result:
    p = plan_for(opts)
    rounds_n = 1 if opts.smoke else max(1, opts.rounds)
    problems: list[str] = []
    if opts.nats_url:
        problems.append("faults: --nats-url ignored; the scenario needs its own llmsrv pointed at its fake upstream")
    bar = progress(opts, rounds_n * round(p.rate * p.total_s), "faults")
    rounds: list[Round] = []
    try:
        async with in_process(p.ttl_s) as h:
            for _ in range(rounds_n):
                rounds.append(await _round(h, p, bar))
                await trio.sleep(p.ttl_s)  # let the breaker settle back to closed between rounds
    finally:
        bar.close()

    per = [_round_figures(r) for r in rounds]
    for i, f in enumerate(per):
        if math.isnan(f["breaker_open_s"]):
            problems.append(f"round {i}: the breaker was never seen open")
        if math.isnan(f["recover_s"]):
            problems.append(f"round {i}: no reply from the recovered upstream after the fault")
    keys = ("success_rate", "success_rate_during_fault", "fallback_share_during_fault", "breaker_open_s",
            "dead_requests", "recover_s", "p50_ms_during_fault", "p99_ms_during_fault")
    figures: dict[str, Any] = {
        "settings": {"rounds": rounds_n, "rate_per_s": p.rate, "pre_s": p.pre_s, "fault_s": p.fault_s,
                     "post_s": p.post_s, "breaker_threshold": THRESHOLD, "breaker_ttl_s": p.ttl_s,
                     "bucket_s": BUCKET_S, "candidates": [PRIMARY, FALLBACK], "smoke": opts.smoke},
        **{k: spread(f[k] for f in per) for k in keys},
        "requests": sum(f["requests"] for f in per),
        "transitions": [r.transitions[:20] for r in rounds],
        "errors": sorted({e for f in per for e in f["errors"]}),
    }
    labels = [("success rate, whole run", "success_rate", "", 3),
              ("success rate, during the fault", "success_rate_during_fault", "", 3),
              ("served by the fallback, during the fault", "fallback_share_during_fault", "", 3),
              ("breaker open after (from fault start)", "breaker_open_s", " s", 3),
              ("requests sent to the dead upstream", "dead_requests", "", 0),
              ("recovery (fault end to first upstream reply)", "recover_s", " s", 3),
              ("latency p50 during the fault", "p50_ms_during_fault", " ms", 1),
              ("latency p99 during the fault", "p99_ms_during_fault", " ms", 1)]
    rows = ["| figure | value |", "|---|---|"]
    rows += [f"| {label} | {fmt(figures[k], unit, digits)} |" for label, k, unit, digits in labels]
    summary = (f"`{PRIMARY}` answers HTTP 503 for {p.fault_s:g} s under {p.rate:g} req/s, fallback `{FALLBACK}`, "
               f"breaker threshold {THRESHOLD}, ttl {p.ttl_s:g} s (median over {rounds_n} round(s), "
               "min-max of rounds in brackets):\n\n" + "\n".join(rows) + "\n")
    return Result(NAME, figures, summary, _series(rounds, p), problems)


def run(opts: Options) -> Result:
    return trio.run(_measure, opts)


if __name__ == "__main__":
    main(run)
