"""``provider``: llmsrv -> a fake OpenAI-compatible upstream vs the same fake called directly.

Processes: a nats-server child; llmsrv as a child process (``python -m llmsrv serve``, the
``openai_compat`` provider pointed at the fake, no inherited ``LLMSRV*`` settings), so its CPU time
is its own; and this process, which runs on one trio loop both the fake upstream
(``tests.fakes.FakeUpstream``, h11 on loopback, a JSON chat completion at once) and the load:

* ``llmsrv``: ``concurrency`` workers, each ``llmsrv.client.Client.complete`` in a closed loop;
* ``direct``: the same number of workers POSTing the same body with one ``httpx2.AsyncClient`` (the
  library llmsrv itself uses: httpx 0.29's pool, the former client here, collapsed at 50 and 200
  connections and made the direct way slower than llmsrv's)
  (a pool of ``concurrency`` connections) to the fake.

Per point (10/50/200; smoke 5/20), interleaved ways and rounds, nothing recorded during the warm-up:
latency p50/p99 of the requests that finished in the window, the *added* latency (llmsrv minus
direct, same round), throughput, and the llmsrv process's CPU per request: user + system time from
``/proc/<pid>/stat`` (10 ms ticks) sampled at the start and the end of the window, divided by the
requests finished in it. The bench process's own CPU per request (``time.process_time``: fake,
client) is reported beside it. The bench process serves the fake and drives the load for both
ways, so at c=200 it may be the bottleneck of both: compare the added latency, not absolute rates.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

import httpx2
import trio

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from bench.processes import cpu_seconds  # noqa: E402
from bench.scenario import Options, Result  # noqa: E402
from bench.scenarios.cancel import fmt, main, pct, progress, spread  # noqa: E402
from llmsrv.client import Client  # noqa: E402
from llmsrv.natsserver import NatsServer  # noqa: E402
from tests.fakes import FakeUpstream, Json, Request  # noqa: E402

NAME = "provider"
SUMMARY = "llmsrv -> fake OpenAI upstream vs the fake direct at concurrency 10/50/200: added latency, CPU/request"

CONTENT = ("The quick brown fox jumps over the lazy dog while the benchmark measures latency. " * 13)[:1000]
MESSAGES = [{"role": "user", "content": CONTENT}]
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 250, "completion_tokens": 1, "total_tokens": 251}}
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 10.0


def _answer(request: Request) -> Json:
    return Json(COMPLETION)


def _echo(request: Request) -> Json:
    """``--fake echo``: the completion's text is the last message's (what ``mock:echo`` answers)."""
    text = request.json()["messages"][-1]["content"]
    return Json({**COMPLETION, "choices": [{**COMPLETION["choices"][0], "message": {"role": "assistant",
                                                                                   "content": text}}]})


class Child:
    """A child process (own session) whose output goes to a temp file; ready once ``needle`` shows in it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], needle: str) -> None:
        self.name, self.needle = name, needle
        self.log: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=ROOT, start_new_session=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:].decode(errors="replace")

    async def wait_ready(self) -> str:
        """The output so far, once it holds the ready ``needle``."""
        with trio.fail_after(READY_TIMEOUT_S):
            while self.needle not in (said := self.output()):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {said}")
                await trio.sleep(0.05)
        return said

    def stop(self) -> str | None:
        """SIGTERM, wait, SIGKILL if need be; a problem to report, or None."""
        problem = None
        try:
            if self.proc.poll() is not None:
                problem = f"{self.name} had exited with {self.proc.returncode}: {self.output()}"
            else:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    problem = f"{self.name} did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM; killed"
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        return problem


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSRV")}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


def llmsrv_child(nats_url: str, upstream_url: str, max_concurrency: int) -> Child:
    env = clean_env(LLMSRV__SERVER__HTTP_PORT="0", LLMSRV__SERVER__LOG_LEVEL="warning",
                    LLMSRV__PROVIDERS__OPENAI_COMPAT__BASE_URL=upstream_url,
                    LLMSRV__PROVIDERS__OPENAI_COMPAT__MAX_CONCURRENCY=str(max_concurrency))
    return Child("llmsrv", [sys.executable, "-m", "llmsrv", "serve", "--nats-url", nats_url], env, ": ready on")


def fake_child(handler: str = "") -> Child:
    """The fake upstream in its own process: ``handler`` ``""`` answers one JSON completion, ``"echo"`` one
    that repeats the last message, ``"stream:N"`` streams ``N`` chunks (``stream.py``'s handler)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--fake", *([handler] if handler else [])]
    return Child("fake upstream", argv, clean_env(), "fake upstream on ")


async def serve_fake(handler: Callable[[Request], Any] = _answer) -> None:
    """``provider.py --fake [stream:N]``: the fake upstream alone, in its own process, until SIGTERM."""
    async with FakeUpstream(handler) as up:
        up.requests = _Forget()  # type: ignore[assignment]  # keep no log: a long run would grow it without bound
        with trio.open_signal_receiver(signal.SIGTERM) as stop:
            print(f"fake upstream on {up.url}", flush=True)
            async for _ in stop:
                return  # exit 0: a stop asked for


class _Forget(list[Request]):
    """A request log that only counts."""

    def append(self, item: Request) -> None:
        pass


def http_client(base_url: str, pool: int, headers: dict[str, str] | None = None) -> httpx2.AsyncClient:
    """The direct way's client: one ``httpx2.AsyncClient`` with ``pool`` connections."""
    return httpx2.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, headers=headers,
                             limits=httpx2.Limits(max_connections=pool, max_keepalive_connections=pool))


async def post_chat(http: httpx2.AsyncClient) -> None:
    """One chat completion over HTTP (model ``m``), the body read and decoded."""
    response = await http.post("/chat/completions", json={"model": "m", "messages": MESSAGES})
    response.raise_for_status()
    response.json()


async def complete_via(client: Client) -> None:
    """The same chat completion through llmsrv's NATS request path."""
    await client.complete({"messages": MESSAGES, "model": "openai_compat:m"})


async def load(call: Callable[[], Awaitable[None]], concurrency: int, warmup_s: float, duration_s: float,
               pids: dict[str, int | None],
               cpu_of: Callable[[int], float | None] = cpu_seconds) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers calling ``call()``; what finished inside the window counts.

    CPU per request: ``cpu_of(pid)`` of each of ``pids`` (and this process's) at the window's edges.
    """
    now = trio.current_time()
    t_measure, t_end = now + warmup_s, now + warmup_s + duration_s
    latencies: list[float] = []
    errors = 0
    marks: dict[str, dict[str, float | None]] = {}

    async def worker() -> None:
        nonlocal errors
        while (t0 := trio.current_time()) < t_end:
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    await call()
            except Exception:
                t1 = trio.current_time()
                if t_measure <= t1 <= t_end:
                    errors += 1
                await trio.sleep(0.01)  # an absent server is not hammered
                continue
            t1 = trio.current_time()
            if t_measure <= t1 <= t_end:
                latencies.append(t1 - t0)

    async def sample(at: float, name: str) -> None:
        await trio.sleep_until(at)
        marks[name] = {"bench": time.process_time(), **{k: cpu_of(p) if p else None for k, p in pids.items()}}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample, t_measure, "start")
        nursery.start_soon(sample, t_end, "end")
        for _ in range(concurrency):
            nursery.start_soon(worker)
    n = len(latencies)
    out = {"ok": n, "errors": errors, "rps": n / duration_s,
           "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000}
    for who in ("bench", *pids):
        t0, t1 = marks["start"][who], marks["end"][who]
        out[f"{who}_cpu_us_per_req"] = (t1 - t0) / n * 1e6 if n and t0 is not None and t1 is not None else math.nan
    return out


async def _measure(opts: Options) -> Result:
    concurrencies = (5, 20) if opts.smoke else (10, 50, 200)
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    duration_s, warmup_s = (0.6, 0.3) if opts.smoke else (opts.duration_s, opts.warmup_s)
    ways = ("llmsrv", "direct")
    raw: dict[tuple[str, int], list[dict[str, Any]]] = {(w, c): [] for w in ways for c in concurrencies}
    problems: list[str] = []
    if opts.nats_url:
        problems.append("provider: --nats-url ignored; the scenario needs its own llmsrv pointed at its fake upstream")
    pool = max(concurrencies) + 8
    bar = progress(opts, rounds * len(concurrencies) * len(ways), "provider")
    children: list[Child] = []
    try:
        with NatsServer() as nats_server:
            fake = fake_child()
            children.append(fake)
            said = await fake.wait_ready()
            upstream_url = said.split("fake upstream on ", 1)[1].split()[0]
            llmsrv = llmsrv_child(nats_server.url, upstream_url, pool)
            children.append(llmsrv)
            await llmsrv.wait_ready()
            async with Client.connect(nats_server.url) as client, http_client(upstream_url, pool) as http:
                calls = {"llmsrv": partial(complete_via, client), "direct": partial(post_chat, http)}
                with trio.fail_after(READY_TIMEOUT_S):
                    await calls["llmsrv"]()  # the whole path answers before anything is timed
                for r in range(rounds):
                    for c in concurrencies:
                        for way in ways if r % 2 == 0 else ways[::-1]:
                            got = await load(calls[way], c, warmup_s, duration_s,
                                             {"llmsrv": llmsrv.proc.pid if way == "llmsrv" else None,
                                              "fake": fake.proc.pid})
                            if got["errors"]:
                                problems.append(f"{way} c={c} round {r + 1}: {got['errors']} failed requests")
                            raw[(way, c)].append(got)
                            bar.update()
    finally:
        bar.close()
        for each in reversed(children):
            stopped = each.stop()
            if stopped:
                problems.append(stopped)

    figures: dict[str, Any] = {"settings": {"rounds": rounds, "concurrency": list(concurrencies),
                                            "duration_s": duration_s, "warmup_s": warmup_s,
                                            "request_bytes": len(CONTENT), "smoke": opts.smoke}}
    rows = ["| conc | direct p50 / p99 ms | llmsrv p50 / p99 ms | added p50 ms | added p99 ms | direct req/s "
            "| llmsrv req/s | llmsrv CPU us/req | client CPU us/req (llmsrv / direct) "
            "| fake CPU us/req (llmsrv / direct) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    series: dict[str, list[tuple[float, float]]] = {"added_p50_ms": [], "added_p99_ms": [], "llmsrv_cpu_us_per_req": []}
    for c in concurrencies:
        via_r, dir_r = raw[("llmsrv", c)], raw[("direct", c)]
        pairs = list(zip(via_r, dir_r, strict=True))
        point = {
            "direct_p50_ms": spread(d["p50_ms"] for d in dir_r),
            "direct_p99_ms": spread(d["p99_ms"] for d in dir_r),
            "llmsrv_p50_ms": spread(v["p50_ms"] for v in via_r),
            "llmsrv_p99_ms": spread(v["p99_ms"] for v in via_r),
            "added_p50_ms": spread(v["p50_ms"] - d["p50_ms"] for v, d in pairs),
            "added_p99_ms": spread(v["p99_ms"] - d["p99_ms"] for v, d in pairs),
            "p50_ratio": spread(v["p50_ms"] / d["p50_ms"] for v, d in pairs),
            "direct_rps": spread(d["rps"] for d in dir_r),
            "llmsrv_rps": spread(v["rps"] for v in via_r),
            "rps_ratio": spread(v["rps"] / d["rps"] if d["rps"] else float("nan") for v, d in pairs),
            "llmsrv_cpu_us_per_req": spread(v["llmsrv_cpu_us_per_req"] for v in via_r),
            "bench_cpu_us_per_req_llmsrv": spread(v["bench_cpu_us_per_req"] for v in via_r),
            "bench_cpu_us_per_req_direct": spread(d["bench_cpu_us_per_req"] for d in dir_r),
            "fake_cpu_us_per_req_llmsrv": spread(v["fake_cpu_us_per_req"] for v in via_r),
            "fake_cpu_us_per_req_direct": spread(d["fake_cpu_us_per_req"] for d in dir_r),
            "ok": sum(v["ok"] + d["ok"] for v, d in pairs),
            "errors": sum(v["errors"] + d["errors"] for v, d in pairs),
        }
        figures[f"c{c}"] = point
        rows.append(f"| {c} | {fmt(point['direct_p50_ms'])} / {fmt(point['direct_p99_ms'])} "
                    f"| {fmt(point['llmsrv_p50_ms'])} / {fmt(point['llmsrv_p99_ms'])} "
                    f"| {fmt(point['added_p50_ms'])} | {fmt(point['added_p99_ms'])} "
                    f"| {fmt(point['direct_rps'], digits=0)} | {fmt(point['llmsrv_rps'], digits=0)} "
                    f"| {fmt(point['llmsrv_cpu_us_per_req'], digits=0)} "
                    f"| {fmt(point['bench_cpu_us_per_req_llmsrv'], digits=0)} / "
                    f"{fmt(point['bench_cpu_us_per_req_direct'], digits=0)} "
                    f"| {fmt(point['fake_cpu_us_per_req_llmsrv'], digits=0)} / "
                    f"{fmt(point['fake_cpu_us_per_req_direct'], digits=0)} |")
        for name in series:
            series[name].append((float(c), point[name]["median"]))
    summary = ("llmsrv (child process) -> fake OpenAI-compatible upstream vs the fake called directly, closed loop "
               f"(median over {rounds} round(s), min-max of rounds in brackets):\n\n" + "\n".join(rows) + "\n")
    return Result(NAME, figures, summary, series, problems[:20])


def run(opts: Options) -> Result:
    return trio.run(_measure, opts)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fake"]:
        if sys.argv[2:3] and sys.argv[2].startswith("stream:"):
            from bench.scenarios.stream import streaming_handler

            trio.run(serve_fake, streaming_handler(int(sys.argv[2].split(":", 1)[1])))
        elif sys.argv[2:3] == ["echo"]:
            trio.run(serve_fake, _echo)
        else:
            trio.run(serve_fake)
    else:
        main(run)
