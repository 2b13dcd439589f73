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

The load generator measures llmsrv, not itself:

* the ``N`` requests leave in one go (``_burst``: bodies encoded before the clock starts, one reply subject each
  on one subscription), not as ``N`` ``Client.complete`` tasks: in this process those cost ~0.1 ms a request
  (a task, a channel, a cancel scope) and sent nothing for the first 1.1 s, so the admission figure was theirs;
* while loaded, ``llm.health`` and the RSS are sampled by a probe process of its own (``PROBE``: plain asyncio
  nats-py, its own connection): this process's trio loop (the client, the fake upstream) stalled too, and a
  first ``llm.health`` reply once waited 1.8 s here although llmsrv had answered it with 0 in flight. The
  probe's answer time is what any client sees of llmsrv: the queue in front of it (the NATS socket, the
  requests ahead of it), its event loop, the nats-server hop;
* this process freezes its objects and defers its own full garbage collections while loaded (``_quiet_gc``).

The admission time begins at the first send. ``--nats-url`` is ignored (the RSS needs our own llmsrv process).
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # tests.fakes, run from anywhere

from bench import processes  # noqa: E402
from bench.report import md_table  # noqa: E402
from bench.scenario import Options, Result  # noqa: E402
from bench.scenarios.cancel import main, pct  # noqa: E402
from llmsrv import messages  # noqa: E402
from llmsrv.bus import Incoming  # noqa: E402
from llmsrv.client import LOCAL_GRACE_S, Client  # noqa: E402
from llmsrv.errors import LlmsrvError  # noqa: E402
from llmsrv.messages import LLMResponse  # noqa: E402
from tests.fakes import FakeUpstream, Json, Request  # noqa: E402

NAME = "scale"
SUMMARY = "10,000 in flight vs a 5 s mock, 1,000 vs a slow fake upstream: all answered, admission, RSS, loop lag"

N_MOCK, N_UPSTREAM, LATENCY_S = 10_000, 1_000, 5.0
SMOKE_N_MOCK, SMOKE_N_UPSTREAM, SMOKE_LATENCY_S = 500, 100, 0.5
POLL_S = 0.05  # health / RSS sampling interval while loaded
_RESPONSE = msgspec.json.Decoder(LLMResponse)
WARMUP = 20  # unmeasured requests before the idle RSS is read
GRACE_S = 30.0  # the client's deadline beyond the provider latency
READY_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 10.0  # an llm.health slower than this counts as a failure (health_failures)
PROBE_READY = b"scale probe ready"
# The loaded-phase sampler, a process of its own: every POLL_S the RSS of llmsrv, then one llm.health on its
# own connection; one JSON line each (monotonic send time, answer ms or null, inflight, RSS KiB). SIGTERM stops it.
PROBE = """
import asyncio, json, signal, sys, time
import nats

URL, SUBJECT, PID = sys.argv[1], sys.argv[2], int(sys.argv[3])
POLL_S, TIMEOUT_S = float(sys.argv[4]), float(sys.argv[5])

def rss_kib():
    try:
        for line in open(f"/proc/{PID}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None

async def main():
    nc = await nats.connect(URL, name="scale-probe")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("scale probe ready", flush=True)
    while not stop.is_set():
        rss, t = rss_kib(), time.monotonic()
        try:
            msg = await nc.request(SUBJECT, b"{}", timeout=TIMEOUT_S)
            doc = json.loads(msg.data)
            line = {"t": t, "ms": (time.monotonic() - t) * 1000, "inflight": doc.get("inflight", 0),
                    "lag": doc.get("loop_lag_ms"), "rss": rss}
        except Exception as exc:
            line = {"t": t, "ms": None, "error": type(exc).__name__, "rss": rss}
        print(json.dumps(line), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), POLL_S)
        except asyncio.TimeoutError:
            pass
    await nc.close()

asyncio.run(main())
"""
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
    loop_lag_ms: list[float] = field(default_factory=list)  # llmsrv's own (health's loop_lag_ms), while loaded
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
            "loop_lag_max_ms": r(max(self.loop_lag_ms)) if self.loop_lag_ms else None,
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


@contextmanager
def _quiet_gc() -> Iterator[None]:
    """This process is the load generator: its objects frozen, its full collections deferred while it sends
    (with ``N`` client tasks alive, each one walked them all and stalled the client for 0.1-0.8 s)."""
    gc.collect()
    gc.freeze()
    saved = gc.get_threshold()
    gc.set_threshold(saved[0], saved[1], 1 << 30)
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


async def _wait_probe(probe: processes.Child) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while PROBE_READY not in probe.log_path.read_bytes():
        probe.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"scale probe: not ready within {READY_TIMEOUT_S:.0f}s; see {probe.log_path}")
        await trio.sleep(0.02)


def _probe_lines(probe: processes.Child, since: float) -> list[dict[str, Any]]:
    lines = []
    for raw in probe.log_path.read_text().splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            if line["t"] >= since:
                lines.append(line)
    return lines


def _bodies(body: dict[str, Any], n: int, wait_s: float) -> list[bytes]:
    """What ``Client.complete`` would send (a correlation id, ``timeout_ms``), encoded before the clock starts."""
    return [messages.encode({**body, "correlation_id": f"scale-{i}-{uuid.uuid4().hex[:8]}",
                             "timeout_ms": round(wait_s * 1000)}) for i in range(n)]


def _burst(client: Client, bodies: list[bytes], inbox: str) -> list[float]:
    """Send every body at once, each with its own reply subject ``<inbox>.<i>``; return their send times.

    Not ``N`` ``Client.complete`` tasks: in this one process they cost ~0.1 ms a request (a task, a channel, a
    cancel scope) and sent nothing for the first 1.1 s, so the admission figure was the client's own.
    """
    subject, sent = f"{client.prefix}.request", []
    for i, data in enumerate(bodies):
        sent.append(trio.current_time())
        client.bus.publish_nowait(subject, data, reply=f"{inbox}.{i}")
    return sent


def _tally(phase: Phase, sent: list[float], replies: dict[int, tuple[float, Incoming]]) -> None:
    """ok / errors by code / lost, and the time each reply added to the provider latency."""
    for i, at in enumerate(sent):
        if i not in replies:
            phase.lost += 1
            continue
        received, msg = replies[i]
        headers = msg.headers or {}
        if "Nats-Service-Error-Code" in headers:
            phase.errors[str(messages.decode_reply(msg.data).get("error_code", "?"))] += 1
            continue
        _RESPONSE.decode(msg.data)  # a well-formed LLMResponse, or the run fails
        phase.ok += 1
        phase.added_ms.append((received - at - phase.latency_s) * 1000)


async def _load(phase: Phase, client: Client, pid: int, url: str, log_dir: Path) -> None:
    model = MODELS[phase.name]
    wait_s = phase.latency_s + GRACE_S
    body = {"messages": [{"role": "user", "content": CONTENT}], "model": model}

    replies: dict[int, tuple[float, Incoming]] = {}
    everything = trio.Event()

    def on_reply(msg: Incoming) -> None:  # in the NATS callback: record, decode later
        token = int(msg.subject.rpartition(".")[2])
        if token not in replies:
            replies[token] = (trio.current_time(), msg)
            if len(replies) == phase.n:
                everything.set()

    # warm-up (unmeasured), then the idle figures
    async with trio.open_nursery() as nursery:
        for i in range(WARMUP):
            nursery.start_soon(client.complete, {**body, "correlation_id": f"warm-{i}-{uuid.uuid4().hex[:8]}"})
    for _ in range(10):
        phase.health_idle_ms.append((await _health(client))[0])
    phase.idle_rss_kib = rss_kib(pid)

    inbox = client.bus.new_inbox()
    sub = await client.bus.subscribe(f"{inbox}.*", on_reply)
    await client.bus.flush()
    cmd = [sys.executable, "-c", PROBE, url, f"{client.prefix}.health", str(pid), str(POLL_S), str(HEALTH_TIMEOUT_S)]
    with processes.Child(f"probe-{phase.name}", cmd, log_dir / f"probe-{phase.name}.log", ready=PROBE_READY) as probe:
        await _wait_probe(probe)
        bodies = _bodies(body, phase.n, wait_s)
        with _quiet_gc():
            cpu0, bench0 = processes.cpu_seconds(pid), time.process_time()
            start, t0 = time.monotonic(), trio.current_time()
            sent = _burst(client, bodies, inbox)
            with trio.move_on_after(wait_s + LOCAL_GRACE_S):
                await everything.wait()
            phase.wall_s = trio.current_time() - t0
            cpu1 = processes.cpu_seconds(pid)
            phase.bench_cpu_s = time.process_time() - bench0
        probe.stop()
    await client.bus.unsubscribe(sub)
    _tally(phase, sent, replies)
    phase.llmsrv_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    phase.hwm_kib = rss_kib(pid, "VmHWM")
    for line in _probe_lines(probe, start):
        t = line["t"] - start
        if line["rss"] is not None:
            phase.peak_rss_kib = max(phase.peak_rss_kib or 0, line["rss"])
            phase.rss_seen.append((round(t, 3), round(line["rss"] / 1024, 2)))
        if line["ms"] is None:
            phase.health_failures += 1
            if phase.health_failures == 1:
                phase.problems.append(f"{phase.name}: llm.health unanswered within {HEALTH_TIMEOUT_S:g} s "
                                      f"while loaded ({line.get('error')}) at {t:.1f} s")
            continue
        answered = t + line["ms"] / 1000
        phase.health_loaded_ms.append(line["ms"])
        if line.get("lag") is not None:
            phase.loop_lag_ms.append(line["lag"])
        phase.inflight_seen.append((round(answered, 3), line["inflight"]))
        phase.peak_inflight = max(phase.peak_inflight, line["inflight"])
        if line["inflight"] >= phase.n and phase.all_admitted_s is None:
            phase.all_admitted_s = answered
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
                await _load(phase, client, child.pid, nats.url, log_dir)
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
                     _ms(f["health_loaded_ms"]["max"]), _ms(f["loop_lag_max_ms"])])
    summary = ("Requests sent at once to one llmsrv process; added = time to reply - provider latency; "
               "admitted = first send until `llm.health` shows all in flight; RSS per request = "
               "(peak - idle VmRSS) / in flight; health = `llm.health` answer time seen by a probe process (llmsrv's "
               "loop, nats-server, the machine); loop lag = llmsrv's own (the health document's `loop_lag_ms`, "
               "its longest event-loop stall in the last 1-2 s):\n\n"
               + md_table(["phase", "requests", "latency", "ok", "errors", "lost", "added p50", "added p99",
                           "added max", "all admitted", "RSS KiB/req", "health idle p50", "health loaded p50",
                           "health loaded max", "loop lag max"], rows))
    return Result(NAME, figures, summary, series, problems)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def run(opts: Options) -> Result:
    return trio.run(_measure, opts)


if __name__ == "__main__":
    main(run)
