"""``scale``: many requests in flight at once against one llmsrv process: all answered, admission, memory, lag.

Two phases, each with its own nats-server and llmsrv child (``python -m llmsrv serve``, so its RSS is its own),
``[server] max_inflight`` and the provider's ``max_concurrency`` raised above the load so all of it is admitted:

* ``mock``: ``N_MOCK`` requests (smoke: 500) sent at once to ``mock:echo`` with ``[providers.mock] latency_ms``
  = ``LATENCY_S`` (smoke: 0.5 s);
* ``upstream``: ``N_UPSTREAM`` requests (smoke: 100) to ``openai_compat`` pointed at a fake OpenAI-compatible
  upstream (``tests.fakes.FakeUpstream``, in this process) that answers each after ``LATENCY_S``.

Figures per phase:

* ``ok`` / ``errors`` (by error code) / ``lost`` (no reply within the client's deadline): all must be ``ok``;
* admission, two ways: (a) per request, the time to its reply minus the provider latency (what llmsrv added:
  queueing, decoding, the NATS hops, the reply), p50/p99/max; (b) from the first send until ``llm.health``
  reports every request in flight (polled every ``POLL_S``; the resolution is that of the poll);
* RSS per in-flight request: (peak VmRSS of the llmsrv process while loaded - its VmRSS idle after a warm-up)
  / in-flight, from ``/proc/<pid>/status``, sampled every ``POLL_S``;
* event-loop lag: the time ``llm.health`` takes to answer while loaded (p50/max) vs idle.

The client and the fake upstream share this process (one trio loop), so the admission figures include its own
cost of sending ``N`` requests at once. ``--nats-url`` is ignored (the RSS needs our own llmsrv process).
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # tests.fakes, run from anywhere

from bench import processes  # noqa: E402
from bench.report import md_table  # noqa: E402
from bench.scenario import Options, Result  # noqa: E402
from bench.scenarios.cancel import main, pct  # noqa: E402
from llmsrv.client import Client  # noqa: E402
from llmsrv.errors import LlmsrvError, ReplyError  # noqa: E402
from tests.fakes import FakeUpstream, Json, Request  # noqa: E402

NAME = "scale"
SUMMARY = "10,000 in flight vs a 5 s mock, 1,000 vs a slow fake upstream: all answered, admission, RSS, loop lag"

N_MOCK, N_UPSTREAM, LATENCY_S = 10_000, 1_000, 5.0
SMOKE_N_MOCK, SMOKE_N_UPSTREAM, SMOKE_LATENCY_S = 500, 100, 0.5
POLL_S = 0.05  # health / RSS sampling interval while loaded
WARMUP = 20  # unmeasured requests before the idle RSS is read
GRACE_S = 30.0  # the client's deadline beyond the provider latency
READY_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 10.0  # an llm.health slower than this counts as a failure (health_failures)
MODELS = {"mock": "mock:echo", "upstream": "openai_compat:m"}
CONTENT = "scale " * 40
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 60, "completion_tokens": 1, "total_tokens": 61}}


def rss_kib(pid: int, key: str = "VmRSS") -> int | None:
    """A ``/proc/<pid>/status`` memory line (``VmRSS``, ``VmHWM``) in KiB, or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Phase:
    name: str
    n: int
    latency_s: float
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    added_ms: list[float] = field(default_factory=list)  # reply time - send time - provider latency
    health_loaded_ms: list[float] = field(default_factory=list)
    health_idle_ms: list[float] = field(default_factory=list)
    inflight_seen: list[tuple[float, float]] = field(default_factory=list)  # (s since first send, inflight)
    rss_seen: list[tuple[float, float]] = field(default_factory=list)  # (s since first send, MiB)
    all_admitted_s: float | None = None
    peak_inflight: int = 0
    health_failures: int = 0
    idle_rss_kib: int | None = None
    peak_rss_kib: int | None = None
    hwm_kib: int | None = None
    wall_s: float = 0.0
    llmsrv_cpu_s: float | None = None  # user+system CPU of the llmsrv child during the load
    bench_cpu_s: float | None = None  # of this process (client + fake upstream) during the load
    problems: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        def r(v: float) -> float | None:
            return None if v is None or math.isnan(v) else round(v, 3)
        per_req = None
        if self.idle_rss_kib is not None and self.peak_rss_kib is not None and self.peak_inflight:
            per_req = round((self.peak_rss_kib - self.idle_rss_kib) / self.peak_inflight, 2)
        return {
            "requests": self.n, "provider_latency_s": self.latency_s,
            "ok": self.ok, "errors": sum(self.errors.values()), "errors_by_code": dict(self.errors),
            "lost": self.lost, "all_answered": self.ok == self.n,
            "added_ms": {"p50": r(pct(self.added_ms, 0.5)), "p99": r(pct(self.added_ms, 0.99)),
                         "max": r(max(self.added_ms)) if self.added_ms else None},
            "all_admitted_s": r(self.all_admitted_s) if self.all_admitted_s is not None else None,
            "peak_inflight_health": self.peak_inflight,
            "rss_idle_mib": r(self.idle_rss_kib / 1024) if self.idle_rss_kib else None,
            "rss_peak_mib": r(self.peak_rss_kib / 1024) if self.peak_rss_kib else None,
            "vm_hwm_mib": r(self.hwm_kib / 1024) if self.hwm_kib else None,
            "rss_per_inflight_kib": per_req,
            "health_idle_ms": {"p50": r(pct(self.health_idle_ms, 0.5)),
                               "max": r(max(self.health_idle_ms)) if self.health_idle_ms else None},
            "health_loaded_ms": {"p50": r(pct(self.health_loaded_ms, 0.5)),
                                 "max": r(max(self.health_loaded_ms)) if self.health_loaded_ms else None,
                                 "n": len(self.health_loaded_ms), "failures": self.health_failures},
            "wall_s": round(self.wall_s, 2),
            "llmsrv_cpu_s": r(self.llmsrv_cpu_s) if self.llmsrv_cpu_s is not None else None,
            "bench_cpu_s": r(self.bench_cpu_s) if self.bench_cpu_s is not None else None,
        }


async def _health(client: Client) -> tuple[float, int]:
    """(ms to answer, inflight) of one ``llm.health``."""
    t0 = trio.current_time()
    doc = await client.request_json("health", timeout_s=HEALTH_TIMEOUT_S)
    return (trio.current_time() - t0) * 1000, int(doc.get("inflight", 0))


async def _wait_ready(child: processes.Child, client: Client) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while child.ready not in child.log_path.read_bytes():
        child.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: no ready line within {READY_TIMEOUT_S:.0f}s; see {child.log_path}")
        await trio.sleep(0.05)
    while True:
        try:
            await _health(client)
            return
        except LlmsrvError:
            child.check_alive()
            if time.monotonic() > deadline:
                raise
            await trio.sleep(0.1)


async def _load(phase: Phase, client: Client, pid: int) -> None:
    model = MODELS[phase.name]
    wait_s = phase.latency_s + GRACE_S
    body = {"messages": [{"role": "user", "content": CONTENT}], "model": model}

    async def one(i: int) -> None:
        sent = trio.current_time()
        try:
            await client.complete({**body, "correlation_id": f"scale-{i}-{uuid.uuid4().hex[:8]}"},
                                  timeout_s=wait_s)
        except ReplyError as exc:
            phase.errors[exc.error_code] += 1
            return
        except LlmsrvError as exc:  # the client's own deadline: no reply at all
            if "no reply" in str(exc):
                phase.lost += 1
            else:
                phase.errors[type(exc).__name__] += 1
            return
        phase.ok += 1
        phase.added_ms.append((trio.current_time() - sent - phase.latency_s) * 1000)

    # warm-up (unmeasured), then the idle figures
    async with trio.open_nursery() as nursery:
        for i in range(WARMUP):
            nursery.start_soon(client.complete, {**body, "correlation_id": f"warm-{i}-{uuid.uuid4().hex[:8]}"})
    for _ in range(10):
        phase.health_idle_ms.append((await _health(client))[0])
    phase.idle_rss_kib = rss_kib(pid)

    done = trio.Event()
    cpu0, bench0 = processes.cpu_seconds(pid), time.process_time()
    start = trio.current_time()

    async def watch() -> None:
        while not done.is_set():
            t = trio.current_time() - start
            rss = rss_kib(pid)
            if rss is not None:
                phase.peak_rss_kib = max(phase.peak_rss_kib or 0, rss)
                phase.rss_seen.append((round(t, 3), round(rss / 1024, 2)))
            try:
                ms, inflight = await _health(client)
            except (LlmsrvError, trio.TooSlowError) as exc:
                phase.health_failures += 1
                if phase.health_failures == 1:
                    phase.problems.append(f"{phase.name}: llm.health unanswered within {HEALTH_TIMEOUT_S:g} s "
                                          f"while loaded ({type(exc).__name__}) at {t:.1f} s")
            else:
                phase.health_loaded_ms.append(ms)
                phase.inflight_seen.append((round(trio.current_time() - start, 3), inflight))
                phase.peak_inflight = max(phase.peak_inflight, inflight)
                if inflight >= phase.n and phase.all_admitted_s is None:
                    phase.all_admitted_s = trio.current_time() - start
            await trio.sleep(POLL_S)

    async with trio.open_nursery() as outer:
        outer.start_soon(watch)
        async with trio.open_nursery() as nursery:
            for i in range(phase.n):
                nursery.start_soon(one, i)
        done.set()
    phase.wall_s = trio.current_time() - start
    cpu1 = processes.cpu_seconds(pid)
    phase.llmsrv_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    phase.bench_cpu_s = time.process_time() - bench0
    phase.hwm_kib = rss_kib(pid, "VmHWM")
    if phase.ok != phase.n:
        phase.problems.append(f"{phase.name}: {phase.ok} of {phase.n} answered ok; errors {dict(phase.errors)}, "
                              f"lost {phase.lost}")
    if phase.all_admitted_s is None:
        phase.problems.append(f"{phase.name}: llm.health never showed all {phase.n} in flight "
                              f"(peak {phase.peak_inflight})")


async def _phase(name: str, n: int, latency_s: float, log_dir: Path) -> Phase:
    phase = Phase(name, n, latency_s)
    prefix = f"s{uuid.uuid4().hex[:6]}"
    env = {"LLMSRV__SERVER__MAX_INFLIGHT": str(2 * n + 1000),
           "LLMSRV__SERVER__MAX_QUEUE_MS": "60000",
           "LLMSRV__SERVER__DEFAULT_TIMEOUT_MS": str(int((latency_s + GRACE_S) * 1000))}

    async def answer(request: Request) -> Json:
        return Json(COMPLETION, delay_s=latency_s)

    with ExitStack() as es:
        nats = es.enter_context(processes.NatsServer())
        async with FakeUpstream(answer) as up:
            if name == "mock":
                env["LLMSRV__PROVIDERS__MOCK__LATENCY_MS"] = str(int(latency_s * 1000))
                env["LLMSRV__PROVIDERS__MOCK__MAX_CONCURRENCY"] = str(2 * n + 1000)
            else:
                env["LLMSRV__PROVIDERS__OPENAI_COMPAT__BASE_URL"] = up.url
                env["LLMSRV__PROVIDERS__OPENAI_COMPAT__MAX_CONCURRENCY"] = str(2 * n + 100)
                env["LLMSRV__PROVIDERS__OPENAI_COMPAT__TIMEOUT_MS"] = str(int((latency_s + GRACE_S) * 1000))
            child = es.enter_context(processes.llmsrv(nats.url, prefix, log_dir, env, name=f"llmsrv-{name}"))
            async with Client.connect(nats.url, prefix) as client:
                with trio.fail_after(READY_TIMEOUT_S):
                    await _wait_ready(child, client)
                await _load(phase, client, child.pid)
            child.check_alive()
    return phase


async def _measure(opts: Options) -> Result:
    if opts.smoke:
        plan = [("mock", SMOKE_N_MOCK, SMOKE_LATENCY_S), ("upstream", SMOKE_N_UPSTREAM, SMOKE_LATENCY_S)]
    else:
        plan = [("mock", N_MOCK, LATENCY_S), ("upstream", N_UPSTREAM, LATENCY_S)]
    log_dir = Path(opts.out_dir) / "logs" / NAME
    log_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    if opts.nats_url:
        problems.append("scale: --nats-url ignored; RSS per request needs the scenario's own llmsrv process")
    phases = [await _phase(name, n, lat, log_dir) for name, n, lat in plan]

    figures: dict[str, Any] = {"settings": {"smoke": opts.smoke, "poll_s": POLL_S, "warmup": WARMUP,
                                            "admission": "reply time - send time - provider latency; and first "
                                                         "send until llm.health inflight == requests"}}
    series: dict[str, list[tuple[float, float]]] = {}
    rows = []
    for p in phases:
        f = figures[p.name] = p.figures()
        problems += p.problems
        series[f"{p.name}_inflight"] = p.inflight_seen
        series[f"{p.name}_rss_mib"] = p.rss_seen
        series[f"{p.name}_added_ms_by_quantile"] = [(q, pct(p.added_ms, q)) for q in (0.5, 0.9, 0.99, 1.0)] \
            if p.added_ms else []
        rows.append([p.name, p.n, f"{p.latency_s:g} s", p.ok, f["errors"], p.lost,
                     _ms(f["added_ms"]["p50"]), _ms(f["added_ms"]["p99"]), _ms(f["added_ms"]["max"]),
                     "n/a" if f["all_admitted_s"] is None else f"{f['all_admitted_s']:.2f} s",
                     "n/a" if f["rss_per_inflight_kib"] is None else f"{f['rss_per_inflight_kib']:.1f}",
                     _ms(f["health_idle_ms"]["p50"]), _ms(f["health_loaded_ms"]["p50"]),
                     _ms(f["health_loaded_ms"]["max"])])
    summary = ("Requests sent at once to one llmsrv process; added = time to reply - provider latency; "
               "admitted = first send until `llm.health` shows all in flight; RSS per request = "
               "(peak - idle VmRSS) / in flight; loop lag = `llm.health` answer time:\n\n"
               + md_table(["phase", "requests", "latency", "ok", "errors", "lost", "added p50", "added p99",
                           "added max", "all admitted", "RSS KiB/req", "health idle p50", "health loaded p50",
                           "health loaded max"], rows))
    return Result(NAME, figures, summary, series, problems)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def run(opts: Options) -> Result:
    return trio.run(_measure, opts)


if __name__ == "__main__":
    main(run)
