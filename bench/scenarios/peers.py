"""``peers``: llmsrv and a LiteLLM proxy side by side in front of one fake OpenAI-compatible upstream.

Processes: a nats-server child; the ``provider`` scenario's fake upstream in its own process; llmsrv
with ``openai_compat`` pointed at the fake (``provider.llmsrv_child``); and, when installed, a LiteLLM
proxy (``litellm --config``, the ``litellm[proxy]`` package in its own venv, ``bench/.peers-venv``)
with one model, ``openai/m`` at the fake. This process drives all three ways with the ``provider``
scenario's closed loop (``provider.load``): the fake direct and LiteLLM with the same httpx2 client
and body (``provider.post_chat``; LiteLLM's master key as a bearer token), llmsrv through its NATS
request path (``provider.complete_via``).

Per concurrency (10/50/200; smoke: 10), interleaved rounds (the order of the ways rotates each
round), nothing recorded during the warm-up: req/s, p50/p99, the latency added over the direct way
in the same round, errors, and the peer's CPU per request: user + system time from ``/proc`` of every
process in its session (LiteLLM forks a worker per core; llmsrv is one process), sampled at the
window's edges, over the requests finished in it. Ratios llmsrv / LiteLLM are taken per round.
LiteLLM runs as its production docs advise for throughput (``LITELLM_*`` below, said in the result).

The venv is made only with ``--peers`` (``Options.peers``), the user's consent to a ~750 MB download;
without it, and without the venv, direct and llmsrv are still measured and ``problems`` says how to
add LiteLLM. The install and LiteLLM's log go to ``<out>/logs/peers/``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.processes import ROOT, Child, cpu_seconds
from bench.report import md_table
from bench.scenario import Options, Result
from bench.scenarios import provider
from bench.scenarios.cancel import fmt, main, progress, spread
from llmsrv.client import Client
from llmsrv.natsserver import NatsServer, free_port

NAME = "peers"
SUMMARY = "llmsrv vs a LiteLLM proxy (--peers) vs the fake direct at concurrency 10/50/200: req/s, latency, CPU/req"

# The newest release whose [proxy] extra resolves from PyPI here: 1.108 and later pin
# litellm-proxy-extras / litellm-enterprise / litellm-proxy builds that the registry does not have.
LITELLM_VERSION = "1.106.12"
VENV = ROOT / "bench" / ".peers-venv"
INSTALL_TIMEOUT_S = 900.0
LITELLM_READY_TIMEOUT_S = 180.0  # a worker imports for 15-30 s on a busy 2-core machine
NOT_INSTALLED = "LiteLLM not installed: run with --peers to install it into bench/.peers-venv"
WAYS = ("direct", "llmsrv", "litellm")
WORKERS = os.cpu_count() or 1
# docs.litellm.ai/docs/proxy/prod (and server_tuning, benchmarks): one worker per vCPU, no debug
# logging, spend and error logs off (no database at all here), production mode, a master key. The
# health-check timeout is ours: uvicorn's default kills a worker still importing on a busy machine.
LITELLM_ENV = {"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION",
               "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no network here: do not retry a download at start
LITELLM_SETTINGS = {"general_settings": {"disable_spend_logs": True, "disable_error_logs": True},
                    "litellm_settings": {"set_verbose": False, "request_timeout": provider.REQUEST_TIMEOUT_S}}
LITELLM_ARGS = ["--num_workers", str(WORKERS), "--timeout_worker_healthcheck", "120"]


# ---- the venv -----------------------------------------------------------------------------------

def installed(venv: Path) -> str | None:
    """The LiteLLM version a finished install left in ``venv``, or None."""
    marker = venv / "installed-version"
    return marker.read_text().strip() if marker.is_file() and (venv / "bin" / "litellm").is_file() else None


def _step(cmd: list[str], log: Any, deadline: float) -> None:
    """Run ``cmd`` into ``log``, echoing pip's milestones; killed at ``deadline`` (monotonic)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, cwd=ROOT)
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("Collecting", "Installing", "Successfully")):
                print(f"  {line.rstrip()[:110]}", file=sys.stderr, flush=True)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if time.monotonic() >= deadline:
        raise RuntimeError(f"not finished within {INSTALL_TIMEOUT_S:.0f} s")
    if code != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} {cmd[2]} exited with {code}")


def install(venv: Path, log_path: Path) -> None:
    """A fresh ``venv`` with ``litellm[proxy]==LITELLM_VERSION``; nothing half-made is left on failure."""
    print(f"peers: installing litellm[proxy]=={LITELLM_VERSION} into {venv} (a few minutes, ~750 MB; "
          f"log {log_path})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    done = False
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log_path.open("w") as log:
            _step([sys.executable, "-m", "venv", "--clear", str(venv)], log, deadline)
            _step([str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off",
                   f"litellm[proxy]=={LITELLM_VERSION}"], log, deadline)
        (venv / "installed-version").write_text(LITELLM_VERSION + "\n")
        done = True
        print("peers: LiteLLM installed", file=sys.stderr, flush=True)
    finally:
        if not done:
            shutil.rmtree(venv, ignore_errors=True)


def litellm_venv(opts: Options, log_dir: Path, problems: list[str]) -> Path | None:
    """The venv to run LiteLLM from (installed first if ``--peers`` asks), or None with the reason in ``problems``."""
    have = installed(VENV)
    if opts.peers and have != LITELLM_VERSION:
        try:
            install(VENV, log_dir / "install.log")
        except RuntimeError as exc:
            problems.append(f"LiteLLM install failed ({exc}): see {log_dir / 'install.log'}")
            return None
        have = LITELLM_VERSION
    if have is None:
        problems.append(NOT_INSTALLED)
        return None
    if have != LITELLM_VERSION:
        problems.append(f"bench/.peers-venv holds LiteLLM {have}, not the pinned {LITELLM_VERSION}: "
                        "--peers reinstalls it")
    return VENV


# ---- the LiteLLM process --------------------------------------------------------------------------

def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``: a child started in its own session and all it forked."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def session_cpu_seconds(sid: int) -> float | None:
    """User + system CPU seconds of the live processes of session ``sid``, or None if there are none."""
    times = [t for t in map(cpu_seconds, session_pids(sid)) if t is not None]
    return sum(times) if times else None


def start_litellm(venv: Path, upstream_url: str, log_dir: Path) -> tuple[Child, str, dict[str, str]]:
    """LiteLLM's proxy on a free loopback port, one model ``m`` routed to the fake: (child, URL, auth header)."""
    config = {"model_list": [{"model_name": "m", "litellm_params": {
        "model": "openai/m", "api_base": f"{upstream_url}/v1", "api_key": "dummy"}}], **LITELLM_SETTINGS}
    config_path = log_dir / "litellm.yaml"
    config_path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    key = "sk-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSRV", "LITELLM", "DATABASE_URL"))}
    env.update(LITELLM_ENV, LITELLM_MASTER_KEY=key)
    port = free_port()
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config_path), "--host", "127.0.0.1",
           "--port", str(port), *LITELLM_ARGS]
    return Child("litellm", cmd, log_dir / "litellm.log", env), f"http://127.0.0.1:{port}", \
        {"Authorization": f"Bearer {key}"}


async def wait_answering(child: Child, call: Callable[[], Awaitable[None]]) -> None:
    """Return once ``2 * WORKERS`` concurrent calls all succeed (so the workers have warmed up)."""
    last = "no attempt"
    with trio.move_on_after(LITELLM_READY_TIMEOUT_S):
        while True:
            child.check_alive()
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(2 * WORKERS):
                        nursery.start_soon(call)
                return
            except Exception as exc:  # not up yet: connection refused, 5xx while starting
                last = repr(exc)[:300]
            await trio.sleep(0.5)
    raise RuntimeError(f"litellm: no answer within {LITELLM_READY_TIMEOUT_S:.0f} s (last: {last}); "
                       f"see {child.log_path}")


def stop_litellm(child: Child, problems: list[str]) -> None:
    """SIGTERM (uvicorn stops its workers), then SIGKILL whatever is left of its session."""
    try:
        child.stop()
    except RuntimeError as exc:
        if child.proc.returncode != -signal.SIGTERM:  # one worker: uvicorn runs in the main process and dies of it
            problems.append(str(exc))
    finally:
        for pid in session_pids(child.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- the run ------------------------------------------------------------------------------------

def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def summarise(runs: list[dict[str, Any]], direct: list[dict[str, Any]]) -> dict[str, Any]:
    """One way at one concurrency over the rounds; ``direct`` is the same rounds' direct way."""
    pairs = list(zip(runs, direct, strict=True))
    return {
        "rps": spread(r["rps"] for r in runs),
        "p50_ms": spread(r["p50_ms"] for r in runs),
        "p99_ms": spread(r["p99_ms"] for r in runs),
        "added_p50_ms": spread(r["p50_ms"] - d["p50_ms"] for r, d in pairs),
        "added_p99_ms": spread(r["p99_ms"] - d["p99_ms"] for r, d in pairs),
        "cpu_us_per_req": spread(r["peer_cpu_us_per_req"] for r in runs),  # no rounds for direct
        "client_cpu_us_per_req": spread(r["bench_cpu_us_per_req"] for r in runs),
        "fake_cpu_us_per_req": spread(r["fake_cpu_us_per_req"] for r in runs),
        "ok": sum(r["ok"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }


async def _measure(opts: Options, venv: Path | None, problems: list[str]) -> Result:
    concurrencies = (10,) if opts.smoke else (10, 50, 200)
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    duration_s, warmup_s = (0.6, 0.3) if opts.smoke else (opts.duration_s, opts.warmup_s)
    log_dir = Path(opts.out_dir) / "logs" / NAME
    log_dir.mkdir(parents=True, exist_ok=True)
    if opts.nats_url:
        problems.append("peers: --nats-url ignored; the scenario needs its own llmsrv pointed at its fake upstream")
    pool = max(concurrencies) + 8
    ways = ["direct", "llmsrv"]
    raw: dict[tuple[str, int], list[dict[str, Any]]] = {(w, c): [] for w in WAYS for c in concurrencies}
    children: list[provider.Child] = []
    litellm: Child | None = None
    bar: Any = None
    try:
        with NatsServer() as nats_server:
            fake = provider.fake_child()
            children.append(fake)
            upstream_url = (await fake.wait_ready()).split("fake upstream on ", 1)[1].split()[0]
            llmsrv = provider.llmsrv_child(nats_server.url, upstream_url, pool)
            children.append(llmsrv)
            if venv:
                litellm, litellm_url, auth = start_litellm(venv, upstream_url, log_dir)
            await llmsrv.wait_ready()
            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(Client.connect(nats_server.url))
                direct = await stack.enter_async_context(provider.http_client(upstream_url, pool))
                calls = {"direct": partial(provider.post_chat, direct),
                         "llmsrv": partial(provider.complete_via, client)}
                pids: dict[str, int | None] = {"direct": None, "llmsrv": llmsrv.proc.pid}
                with trio.fail_after(provider.READY_TIMEOUT_S):
                    await calls["llmsrv"]()  # the whole path answers before anything is timed
                if litellm:
                    proxy = await stack.enter_async_context(provider.http_client(litellm_url, pool, auth))
                    calls["litellm"], pids["litellm"] = partial(provider.post_chat, proxy), litellm.pid
                    try:
                        await wait_answering(litellm, calls["litellm"])
                        ways.append("litellm")
                    except RuntimeError as exc:
                        problems.append(f"LiteLLM could not run here: {exc}")
                        stop_litellm(litellm, problems)
                bar = progress(opts, rounds * len(concurrencies) * len(ways), NAME)
                for r in range(rounds):
                    for c in concurrencies:
                        for way in ways[r % len(ways):] + ways[:r % len(ways)]:
                            got = await provider.load(calls[way], c, warmup_s, duration_s,
                                                      {"peer": pids[way], "fake": fake.proc.pid},
                                                      cpu_of=session_cpu_seconds)
                            if litellm and way == "litellm":
                                litellm.check_alive()
                            if got["errors"]:
                                problems.append(f"{way} c={c} round {r + 1}: {got['errors']} failed requests")
                            raw[(way, c)].append(got)
                            bar.update()
    finally:
        if bar:
            bar.close()
        if litellm:
            stop_litellm(litellm, problems)
        for each in reversed(children):
            if stopped := each.stop():
                problems.append(stopped)

    settings: dict[str, Any] = {
        "rounds": rounds, "concurrency": list(concurrencies), "duration_s": duration_s, "warmup_s": warmup_s,
        "litellm": None if venv is None else {
            "version": installed(venv), "venv": "bench/.peers-venv", "args": LITELLM_ARGS, "env": LITELLM_ENV,
            "config": LITELLM_SETTINGS, "master_key": True, "database": None},
        "smoke": opts.smoke}
    figures: dict[str, Any] = {"settings": settings}
    series: dict[str, list[tuple[float, float]]] = {}
    rows, ratio_rows = [], []
    for c in concurrencies:
        point = {w: summarise(raw[(w, c)], raw[("direct", c)]) for w in ways}
        for w in ways:
            for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req"):
                if (median := point[w][key]["median"]) is not None:
                    name = {"rps": "req_per_s"}.get(key, key)
                    series.setdefault(f"{w}_{name}", []).append((float(c), median))
        for w in ways:
            p = point[w]
            peer = w != "direct"
            rows.append([c, w, fmt(p["rps"], digits=0), fmt(p["p50_ms"]), fmt(p["p99_ms"]),
                         fmt(p["added_p50_ms"]) if peer else "-", fmt(p["added_p99_ms"]) if peer else "-",
                         fmt(p["cpu_us_per_req"], digits=0) if peer else "-",
                         fmt(p["client_cpu_us_per_req"], digits=0), p["errors"]])
        if "litellm" in ways:
            pairs = list(zip(raw[("llmsrv", c)], raw[("litellm", c)], strict=True))
            point["llmsrv_over_litellm"] = ratios = {
                key: spread(_ratio(a[k], b[k]) for a, b in pairs)
                for key, k in (("rps", "rps"), ("p50", "p50_ms"), ("p99", "p99_ms"),
                               ("cpu_us_per_req", "peer_cpu_us_per_req"))}
            ratio_rows.append([c, *(fmt(ratios[k], "x") for k in ("rps", "p50", "p99", "cpu_us_per_req"))])
        figures[f"c{c}"] = point

    summary = ("The fake OpenAI-compatible upstream called directly, through llmsrv (NATS)"
               f"{' and through LiteLLM (HTTP)' if 'litellm' in ways else ''}, closed loop, median over {rounds} "
               "interleaved round(s), min-max in brackets; CPU per request from /proc of the peer's processes and of "
               "the bench process, the client of every way (from c=50 on it may bound the HTTP ways):\n\n"
               + md_table(["conc", "way", "req/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms",
                           "CPU us/req", "client CPU us/req", "errors"], rows))
    if ratio_rows:
        summary += "\nllmsrv / LiteLLM (per round, median):\n\n" + md_table(
            ["conc", "req/s", "p50", "p99", "CPU per request"], ratio_rows)
        summary += (f"\nLiteLLM {installed(venv) if venv else ''}: `litellm --config litellm.yaml "
                    f"{' '.join(LITELLM_ARGS)}`, {', '.join(f'{k}={v}' for k, v in LITELLM_ENV.items())}, "
                    "a master key, no database, spend and error logs off, set_verbose off "
                    f"(config in {log_dir / 'litellm.yaml'}).\n")
    return Result(NAME, figures, summary, series, problems[:20])


def run(opts: Options) -> Result:
    problems: list[str] = []
    venv = litellm_venv(opts, Path(opts.out_dir) / "logs" / NAME, problems)
    return trio.run(_measure, opts, venv, problems)


if __name__ == "__main__":
    main(run)
