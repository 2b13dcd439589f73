"""The load generator: callback-driven NATS request/reply load, closed or open loop, in its own process.

No task per request. One subscription on an inbox wildcard (``<inbox>.*``) takes every reply in a
callback; each request is one ``nc.publish(subject, payload, reply=<inbox>.<token>)`` and its reply is
matched to its timings by the token. Two modes:

* **closed loop** (``concurrency=N``): N requests outstanding; the reply callback sends the next at
  once. The offered load adapts to the target, so its throughput is the target's maximum for N
  outstanding (and its latency hides queueing: coordinated omission).
* **open loop** (``rate=R``): request *i* is due at ``start + i / R`` whatever the replies do; a pacer
  sends every request that is due, then sleeps until the next. Latency is measured from the
  **intended** send time, as wrk2 does, so a stall in the target (or in the generator) counts for
  every request that should have gone out during it.

The first ``warmup_s`` seconds are sent but not recorded. A request counts in the window if its
intended send time is inside it; its latency goes to an HDR histogram (1 us .. 60 s, 3 digits);
throughput is the successful replies *received* inside the window per second. Failures never enter
the histogram: ``error_reply`` (``Nats-Service-Error-Code`` header), ``no_responders`` (a 503 status),
``timeout`` (no reply within ``timeout_s`` of the intended time; a late reply is then ignored).

The arithmetic (due counts, intended times, latencies, windows, percentiles, rates) is the pure
``Recorder``/functions below, tested on synthetic timings. ``Generator`` is the asyncio shell.
``LoadGen`` runs ``python -m bench.loadgen --serve`` as ``GENERATORS`` child processes and sends each
its share of every run as one JSON command, so the generator never shares an interpreter (or a GIL)
with what it measures, and no generator process is busier than the target it loads: a Python
nats-py client costs about as much per request as the bare responder, and a process saturates at
one core, so one process would reach its limit before the responder does. The hot path only notes
times; the histograms are filled after the run, outside the CPU the generator reports. On uvloop
when installed.

    python -m bench.loadgen --nats-url nats://127.0.0.1:4222 --concurrency 100 --duration 5
    python -m bench.loadgen --nats-url nats://127.0.0.1:4222 --rate 2000 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import selectors
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
ERROR_HEADER = "Nats-Service-Error-Code"
ERROR_KINDS = ("error_reply", "no_responders", "timeout")
CONTENT = ("The quick brown fox jumps over the lazy dog while the benchmark measures latency. " * 13)[:1000]
MODEL = "mock:echo"


def payload(model: str = MODEL) -> bytes:
    """The benchmark request for ``model`` (a reply that echoes it carries ``CONTENT`` back)."""
    return json.dumps({"messages": [{"role": "user", "content": CONTENT}], "model": model}).encode()


PAYLOAD = payload()
HIST_MIN_US, HIST_MAX_US, HIST_DIGITS = 1, 60_000_000, 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
SPECTRUM = (0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0)  # for plots
ERROR_BACKOFF_S = 0.01  # closed loop: after a failure, so an absent target is not hammered
SWEEP_S = 0.05  # how often outstanding requests are checked for timeouts


async def _quiet(exc: Exception) -> None:
    pass


# fail fast: nats-py otherwise retries an unreachable server for minutes (max_reconnect_attempts=0
# means "forever"), and a dropped connection must end the run, not be papered over
CONNECT: dict[str, Any] = {"allow_reconnect": False, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.1,
                           "connect_timeout": 5, "error_cb": _quiet}


# ---------------------------------------------------------------------------------------------- pure


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_MIN_US, HIST_MAX_US, HIST_DIGITS)


def intended_time(start: float, rate: float, i: int) -> float:
    """When request ``i`` (from 0) is due in an open loop at ``rate`` per second from ``start``."""
    return start + i / rate


def due_count(start: float, rate: float, now: float, total: int) -> int:
    """How many requests (of ``total``) are due by ``now``: those with ``intended_time <= now``."""
    if now < start:
        return 0
    return min(total, math.floor((now - start) * rate + 1e-9) + 1)


def request_count(rate: float, seconds: float) -> int:
    """Requests an open loop sends in ``seconds``: the ones due in ``[0, seconds)``."""
    return max(0, math.ceil(rate * seconds - 1e-9))


def latency_us(intended: float, received: float) -> int:
    """Latency from the intended send time, in whole microseconds (at least 1: the histogram's floor)."""
    return max(HIST_MIN_US, min(HIST_MAX_US, round((received - intended) * 1e6)))


def percentiles_ms(hist: HdrHistogram) -> dict[str, float]:
    """p50/p90/p99/p99.9, max and mean in milliseconds (zeros for an empty histogram)."""
    out = {f"p{p:g}_ms": hist.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
    out["max_ms"] = hist.get_max_value() / 1000.0 if hist.get_total_count() else 0.0
    out["mean_ms"] = hist.get_mean_value() / 1000.0 if hist.get_total_count() else 0.0
    return out


def spectrum_ms(hist: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile, ms) points of the latency percentile spectrum, for a log-scale plot."""
    if not hist.get_total_count():
        return []
    return [(p, hist.get_value_at_percentile(p) / 1000.0) for p in SPECTRUM]


def encode_histogram(hist: HdrHistogram) -> str:
    return base64.b64encode(hist.encode()).decode() if hist.get_total_count() else ""


def decode_histogram(text: str) -> HdrHistogram:
    return HdrHistogram.decode(base64.b64decode(text)) if text else new_histogram()


def merge_histograms(texts: Iterable[str]) -> HdrHistogram:
    merged = new_histogram()
    for text in texts:
        if text:
            merged.add(decode_histogram(text))
    return merged


@dataclass
class Recorder:
    """Turns each request's (intended, sent, received) times into counts and histograms.

    ``latency`` is measured from the intended send time, ``service`` from the actual send (they
    differ only when the generator sends late). A request belongs to the window when its intended
    time is in ``[t_measure, t_end)``; ``completed`` counts successes *received* in that interval.
    """

    t_measure: float
    t_end: float
    latency: HdrHistogram = field(default_factory=new_histogram)
    service: HdrHistogram = field(default_factory=new_histogram)
    ok: int = 0
    completed: int = 0
    errors: Counter[str] = field(default_factory=lambda: Counter({k: 0 for k in ERROR_KINDS}))
    error_codes: Counter[str] = field(default_factory=Counter)  # error replies by Nats-Service-Error-Code
    answered: int = 0  # every reply or failure, warm-up included (the CPU-per-request divisor)
    per_second: Counter[int] = field(default_factory=Counter)  # whole seconds since t_measure -> successes

    def in_window(self, t: float) -> bool:
        return self.t_measure <= t < self.t_end

    def success(self, intended: float, sent: float, received: float) -> None:
        self.answered += 1
        t_measure, t_end = self.t_measure, self.t_end
        if t_measure <= received < t_end:
            self.completed += 1
            self.per_second[int(received - t_measure)] += 1
        if t_measure <= intended < t_end:
            self.ok += 1
            self.latency.record_value(latency_us(intended, received))
            if sent != intended:  # closed loop sends when it intends: service time is the latency
                self.service.record_value(latency_us(sent, received))

    def failure(self, kind: str, intended: float, code: str | None = None) -> None:
        self.answered += 1
        if self.in_window(intended):
            self.errors[kind] += 1
            if code is not None:
                self.error_codes[code] += 1

    def result(self, *, mode: str, concurrency: int, rate: float, sent: int, late_sends: int,
               cpu_s: float, wall_s: float) -> dict[str, Any]:
        duration = self.t_end - self.t_measure
        span = max(0, math.ceil(duration - 1e-9))
        return {
            "mode": mode, "concurrency": concurrency, "rate": rate, "duration_s": duration,
            "sent": sent, "ok": self.ok, "completed": self.completed, "answered": self.answered,
            "rps": self.completed / duration if duration > 0 else 0.0,
            "errors": dict(self.errors), "error_total": sum(self.errors.values()),
            "error_codes": dict(self.error_codes),
            "late_sends": late_sends,  # open loop: sends more than 1 ms after their intended time
            **percentiles_ms(self.latency),
            "service": percentiles_ms(self.service if self.service.get_total_count() else self.latency),
            "latency_hist": encode_histogram(self.latency),
            "service_hist": encode_histogram(self.service if self.service.get_total_count() else self.latency),
            "per_second": [self.per_second.get(s, 0) for s in range(span)],
            "generator_cpu_s": cpu_s, "generator_wall_s": wall_s,
            "generator_processes": 1, "generator_cpu_util_max": cpu_s / wall_s if wall_s > 0 else 0.0,
        }


SUMMED = ("sent", "ok", "completed", "answered", "rps", "error_total", "late_sends", "generator_cpu_s")


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the results of generator processes that loaded the same target at the same time.

    Counts and rates add up, histograms merge (so percentiles are those of every request), the
    per-second series add up element by element; ``generator_cpu_util_max`` is the busiest process's
    share of a core (a process saturates at one core: that is the figure to compare with a target's).
    """
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    out: dict[str, Any] = {k: first[k] for k in ("mode", "duration_s")}
    out["concurrency"] = sum(p["concurrency"] for p in parts)
    out["rate"] = sum(p["rate"] for p in parts)
    for key in SUMMED:
        out[key] = sum(p[key] for p in parts)
    out["errors"] = {k: sum(p["errors"].get(k, 0) for p in parts) for k in ERROR_KINDS}
    out["error_codes"] = dict(sum((Counter(p["error_codes"]) for p in parts), Counter()))
    latency = merge_histograms(p["latency_hist"] for p in parts)
    service = merge_histograms(p["service_hist"] for p in parts)
    out.update(percentiles_ms(latency))
    out["service"] = percentiles_ms(service)
    out["latency_hist"], out["service_hist"] = encode_histogram(latency), encode_histogram(service)
    span = max(len(p["per_second"]) for p in parts)
    out["per_second"] = [sum(p["per_second"][i] for p in parts if i < len(p["per_second"])) for i in range(span)]
    out["generator_wall_s"] = max(p["generator_wall_s"] for p in parts)
    out["generator_processes"] = sum(p["generator_processes"] for p in parts)
    out["generator_cpu_util_max"] = max(p["generator_cpu_util_max"] for p in parts)
    return out


def split(total: float, n: int) -> list[float]:
    """``total`` (a concurrency or a rate) shared among ``n`` generators; integers stay integers."""
    if isinstance(total, int):
        q, r = divmod(total, n)
        return [q + (i < r) for i in range(n)]
    return [total / n] * n


# ---------------------------------------------------------------------------------------------- asyncio shell


class Generator:
    """One nats-py connection, one reply subscription, many runs (one at a time)."""

    def __init__(self, nc: Any, subject: str, payload: bytes, timeout_s: float) -> None:
        self.nc, self.subject, self.payload, self.timeout_s = nc, subject, payload, timeout_s
        self.inbox = nc.new_inbox()
        self.prefix_len = len(self.inbox) + 1
        self.pending: dict[int, tuple[float, float]] = {}  # token -> (intended, sent); oldest first
        self.next_token = 0
        self.rec = Recorder(0.0, 0.0)
        self.done: list[tuple[float, float, float]] = []  # (intended, sent, received) of each success
        self.closed_loop = False
        self.sending = False
        self.retries: set[asyncio.Task[None]] = set()
        self.sub: Any = None
        self.drained = asyncio.Event()

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.inbox + ".*", cb=self._on_reply,
                                           pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
        await self.nc.flush()

    async def _send(self, intended: float) -> None:  # intended 0.0: now (closed loop)
        token = self.next_token
        self.next_token += 1
        sent = time.perf_counter()
        self.pending[token] = (intended or sent, sent)
        await self.nc.publish(self.subject, self.payload, reply=f"{self.inbox}.{token}")

    async def _on_reply(self, msg: Any) -> None:
        # the hot path: match, note the time, send the next; the histograms are filled after the run
        received = time.perf_counter()
        entry = self.pending.pop(int(msg.subject[self.prefix_len:]), None)
        if entry is None:
            return  # already counted as a timeout
        if not self.pending and not self.sending:
            self.drained.set()
        headers = msg.headers
        if headers and (ERROR_HEADER in headers or headers.get("Status") == "503"):
            code = headers.get(ERROR_HEADER)
            self._failed("error_reply" if code else "no_responders", entry[0], code)
            return
        self.done.append((entry[0], entry[1], received))
        if self.closed_loop and self.sending:
            await self._send(0.0)

    def _failed(self, kind: str, intended: float, code: str | None = None) -> None:
        self.rec.failure(kind, intended, code)
        if self.closed_loop and self.sending:
            task = asyncio.get_running_loop().create_task(self._send_later())
            self.retries.add(task)
            task.add_done_callback(self.retries.discard)

    async def _send_later(self) -> None:
        await asyncio.sleep(ERROR_BACKOFF_S)
        if self.sending:
            await self._send(0.0)

    def _sweep(self, now: float) -> None:
        limit = now - self.timeout_s
        while self.pending:
            token = next(iter(self.pending))
            intended = self.pending[token][0]
            if intended > limit:
                break
            del self.pending[token]
            self._failed("timeout", intended)
        if not self.pending and not self.sending:
            self.drained.set()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self._sweep(time.perf_counter())

    async def _pace(self, rate: float, start: float, total: int) -> int:
        """Open loop: send each request when due; return how many went out more than 1 ms late."""
        late = 0
        i = 0
        while i < total:
            now = time.perf_counter()
            due = due_count(start, rate, now, total)
            while i < due:
                intended = intended_time(start, rate, i)
                if now - intended > 0.001:
                    late += 1
                await self._send(intended)
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, intended_time(start, rate, i) - time.perf_counter()))
        return late

    async def run(self, *, concurrency: int = 0, rate: float = 0.0, duration_s: float,
                  warmup_s: float) -> dict[str, Any]:
        if (concurrency > 0) == (rate > 0):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        self.pending.clear()
        self.done = []
        start = time.perf_counter() + 0.01
        self.rec = Recorder(start + warmup_s, start + warmup_s + duration_s)
        self.closed_loop, self.sending = concurrency > 0, True
        sweeper = asyncio.get_running_loop().create_task(self._sweeper())
        cpu0, wall0 = time.process_time(), time.perf_counter()
        late = 0
        try:
            if self.closed_loop:
                await asyncio.sleep(max(0.0, start - time.perf_counter()))
                for _ in range(concurrency):
                    await self._send(0.0)
                await asyncio.sleep(max(0.0, self.rec.t_end - time.perf_counter()))
            else:
                late = await self._pace(rate, start, request_count(rate, warmup_s + duration_s))
            self.sending = False
            self.drained = asyncio.Event()
            if self.pending:  # the sweeper times out the rest, so this ends within timeout_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.drained.wait(), self.timeout_s + 2 * SWEEP_S)
            self._sweep(math.inf)  # whatever is still out has timed out
        finally:
            self.sending = False
            sweeper.cancel()
            for task in list(self.retries):
                task.cancel()
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0  # the load, not the arithmetic
        for intended, sent, received in self.done:
            self.rec.success(intended, sent, received)
        return self.rec.result(mode="closed" if self.closed_loop else "open", concurrency=concurrency,
                               rate=rate, sent=self.next_token, late_sends=late, cpu_s=cpu_s, wall_s=wall_s)


async def _serve_commands(url: str, subject: str, timeout_s: float) -> None:
    """``--serve``: one JSON command per stdin line -> one JSON result per stdout line."""
    import nats

    nc = await nats.connect(url, name="bench-loadgen", **CONNECT)
    try:
        gen = Generator(nc, subject, PAYLOAD, timeout_s)
        await gen.start()
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            gen.subject = cmd.get("subject", gen.subject)
            gen.payload = payload(cmd.get("model", MODEL))
            gen.timeout_s = cmd.get("timeout_s", gen.timeout_s)
            gen.next_token = 0
            result = await gen.run(concurrency=cmd.get("concurrency", 0), rate=cmd.get("rate", 0.0),
                                   duration_s=cmd["duration_s"], warmup_s=cmd["warmup_s"])
            print(json.dumps(result), flush=True)
    finally:
        await nc.close()


async def _run_once(url: str, subject: str, timeout_s: float, **run: Any) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url, name="bench-loadgen", **CONNECT)
    try:
        gen = Generator(nc, subject, PAYLOAD, timeout_s)
        await gen.start()
        return await gen.run(**run)
    finally:
        await nc.close()


def _run(main: Any) -> Any:
    """Run the generator on uvloop when it is installed (the bench extra): the instrument must cost less per
    request than the cheapest target it loads, and uvloop's event loop is the cheaper one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# ---------------------------------------------------------------------------------------------- parent side


GENERATORS = 2  # processes: each is single-threaded, so split the load until each is less busy than a target


class LoadGen:
    """The generator as ``processes`` child processes (``--serve``) loading together; ``run(...)`` splits the
    concurrency or rate among them, sends each its command and returns their merged result."""

    def __init__(self, url: str, subject: str, timeout_s: float = 10.0, log_path: Path | None = None,
                 processes: int = GENERATORS) -> None:
        self.timeout_s = timeout_s
        self._log = log_path.open("ab") if log_path else subprocess.DEVNULL
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(processes):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.loadgen", "--serve", "--nats-url", url, "--subject", subject,
                     "--timeout", str(timeout_s)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True))
            for proc in self.procs:
                self._read(proc, 30.0)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], within_s: float) -> dict[str, Any]:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(within_s):
                raise RuntimeError(f"load generator: no answer within {within_s:.0f}s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited with {proc.wait()}")
        data: dict[str, Any] = json.loads(line)
        return data

    def run(self, *, concurrency: int = 0, rate: float = 0.0, duration_s: float, warmup_s: float,
            subject: str | None = None) -> dict[str, Any]:
        return self.collect(self.start(concurrency=concurrency, rate=rate, duration_s=duration_s,
                                       warmup_s=warmup_s, subject=subject))

    def start(self, *, concurrency: int = 0, rate: float = 0.0, duration_s: float, warmup_s: float,
              subject: str | None = None, model: str = MODEL) -> tuple[int, float]:
        """Send a run's commands and return at once (for loads that run side by side); ``collect`` its result."""
        n = max(1, min(len(self.procs), concurrency or len(self.procs)))  # never a generator with nothing to do
        shares = zip(split(concurrency, n), split(float(rate), n), strict=True)
        for proc, (c, r) in zip(self.procs, shares, strict=False):
            assert proc.stdin is not None
            cmd: dict[str, Any] = {"concurrency": c, "rate": r, "duration_s": duration_s, "warmup_s": warmup_s,
                                   "model": model}
            if subject:
                cmd["subject"] = subject
            proc.stdin.write((json.dumps(cmd) + "\n").encode())
            proc.stdin.flush()
        return n, warmup_s + duration_s + self.timeout_s + 30.0  # bounded even if the target hangs

    def collect(self, started: tuple[int, float]) -> dict[str, Any]:
        """The merged result of the run ``start`` returned ``started`` for (blocks until it ends)."""
        n, within = started
        return merge_results([self._read(proc, within) for proc in self.procs[:n]])

    def close(self) -> None:
        for proc in self.procs:
            try:
                if proc.stdin:
                    proc.stdin.close()  # end of commands: it closes its connection and exits
                proc.wait(1)
            except (subprocess.TimeoutExpired, OSError):  # interrupted mid-run: it is only a client
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout:
                    proc.stdout.close()
        if not isinstance(self._log, int):
            self._log.close()

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--subject", default="llm.request")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    p.add_argument("--serve", action="store_true", help="read JSON commands on stdin (used by LoadGen)")
    p.add_argument("--concurrency", type=int, default=0, help="closed loop with N outstanding")
    p.add_argument("--rate", type=float, default=0.0, help="open loop at R requests per second")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds before measuring")
    args = p.parse_args()
    try:
        if args.serve:
            _run(_serve_commands(args.nats_url, args.subject, args.timeout))
            return
        concurrency = args.concurrency if args.concurrency or args.rate else 10
        result = _run(_run_once(args.nats_url, args.subject, args.timeout, concurrency=concurrency,
                                       rate=args.rate, duration_s=args.duration, warmup_s=args.warmup))
    except KeyboardInterrupt:
        return
    result.pop("latency_hist")
    result.pop("service_hist")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
