"""Closed-loop NATS request load generator (plain asyncio + nats-py), one process of its own.

``concurrency`` workers share one NATS connection; each sends a request with ``nc.request``,
waits for the reply, and sends the next at once (closed loop: the offered load adapts to the
server, so throughput and latency are measured at saturation for that concurrency). The first
``warmup`` seconds are not recorded. Then, for ``duration`` seconds, each successful reply that
arrives adds its latency (microseconds) to an HDR histogram. Failures are counted by kind and
never enter the histogram: ``error_reply`` (a reply carrying ``Nats-Service-Error-Code``),
``timeout``, ``no_responders`` and ``other``.

CLI (prints one JSON object on stdout)::

    python bench/loadgen.py --nats-url nats://127.0.0.1:4222 --concurrency 10 --duration 8

From Python, ``measure(...)`` runs that CLI in a subprocess and returns a ``LoadResult``, so the
load generator never shares an interpreter (or a GIL) with the code under test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import nats
import nats.errors
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

ERROR_HEADER = "Nats-Service-Error-Code"
ERROR_KINDS = ("error_reply", "timeout", "no_responders", "other")
CONTENT = ("The quick brown fox jumps over the lazy dog while the benchmark measures latency. " * 13)[:1000]
PAYLOAD = json.dumps({"messages": [{"role": "user", "content": CONTENT}], "model": "mock:echo"}).encode()
ERROR_BACKOFF_S = 0.01  # after a failure, so an absent server is not hammered in a tight loop
HIST_MAX_US = 60_000_000


@dataclasses.dataclass(frozen=True)
class LoadResult:
    concurrency: int
    duration_s: float
    ok: int
    replies: int  # every request that came back or failed, warm-up included (for CPU per request)
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


async def run_load(url: str, concurrency: int, duration_s: float, warmup_s: float,
                   timeout_s: float = 10.0, subject: str = "llm.request",
                   payload: bytes = PAYLOAD) -> LoadResult:
    """Drive the closed loop in this process (the CLI calls this; use ``measure`` from elsewhere)."""
    nc = await nats.connect(url, name="bench-loadgen", max_reconnect_attempts=0)
    hist = HdrHistogram(1, HIST_MAX_US, 3)
    errors: Counter[str] = Counter({kind: 0 for kind in ERROR_KINDS})
    ok = replies = 0
    t_measure = time.perf_counter() + warmup_s
    t_end = t_measure + duration_s

    async def worker() -> None:
        nonlocal ok, replies
        while (t0 := time.perf_counter()) < t_end:
            kind = ""
            try:
                reply = await nc.request(subject, payload, timeout=timeout_s)
                if reply.headers and ERROR_HEADER in reply.headers:
                    kind = "error_reply"
            except nats.errors.NoRespondersError:
                kind = "no_responders"
            except nats.errors.TimeoutError:
                kind = "timeout"
            except Exception:
                kind = "other"
            t1 = time.perf_counter()
            replies += 1
            if kind:
                if t1 >= t_measure:  # failures count until the last request is back
                    errors[kind] += 1
                await asyncio.sleep(ERROR_BACKOFF_S)
            elif t_measure <= t1 <= t_end:
                ok += 1
                hist.record_value(max(1, round((t1 - t0) * 1e6)))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await nc.close()
    ms = 1000.0
    return LoadResult(
        concurrency=concurrency, duration_s=duration_s, ok=ok, replies=replies, rps=ok / duration_s,
        p50_ms=hist.get_value_at_percentile(50) / ms, p99_ms=hist.get_value_at_percentile(99) / ms,
        p999_ms=hist.get_value_at_percentile(99.9) / ms, max_ms=hist.get_max_value() / ms,
        mean_ms=hist.get_mean_value() / ms, errors=dict(errors))


async def probe(url: str, subject: str = "llm.request", within_s: float = 20.0) -> None:
    """Return once a correct echo reply comes back; raise ``RuntimeError`` after ``within_s``."""
    nc = await nats.connect(url, name="bench-probe")
    last = "no attempt"
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            try:
                reply = await nc.request(subject, PAYLOAD, timeout=1.0)
                if reply.headers and ERROR_HEADER in reply.headers:
                    last = f"error reply {reply.headers}: {reply.data[:200]!r}"
                elif msgspec.json.decode(reply.data).get("text") == CONTENT:
                    return
                else:
                    last = f"unexpected reply {reply.data[:200]!r}"
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    raise RuntimeError(f"no correct reply on {subject} within {within_s}s (last: {last})")


def measure(url: str, concurrency: int, duration_s: float, warmup_s: float,
            timeout_s: float = 10.0, subject: str = "llm.request") -> LoadResult:
    """Run the load generator in its own Python process and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--nats-url", url,
           "--concurrency", str(concurrency), "--duration", str(duration_s),
           "--warmup", str(warmup_s), "--timeout", str(timeout_s), "--subject", subject]
    limit = warmup_s + duration_s + timeout_s + 30  # bounded even if the target hangs
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return LoadResult(**data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.5, help="unrecorded seconds before measuring")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    p.add_argument("--subject", default="llm.request")
    args = p.parse_args()
    result = asyncio.run(run_load(args.nats_url, args.concurrency, args.duration, args.warmup,
                                  args.timeout, args.subject))
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
