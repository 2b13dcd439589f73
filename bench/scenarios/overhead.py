"""``overhead``: llmsrv (+ ``mock:echo``) vs the bare responder, same payload, same generator, same run.

One nats-server; llmsrv on ``llm.request`` and the bare responder (``bench/responder.py``, its reply
padded to the size of llmsrv's, measured first) on ``bench.request``, and the same responder on llmsrv's
fixed stack (``--stack trio``: trio, trio-asyncio and llmsrv's NATS bridge; ``--stack trio-task``: and
a trio task per request under a cancel scope with a deadline, the structure of every llmsrv request)
on ``floor.request`` and ``floortask.request``: what the stack costs before any llmsrv code. All are up
for the whole run;
the load generator (``bench/loadgen.py``, ``GENERATORS`` processes sharing the load). Each round
loads each target in closed loop with ``CONCURRENCY`` outstanding requests (the order alternates
between rounds), so slow drifts of the shared machine hit both. Per point: throughput, latency,
and the user+system CPU seconds of the target and nats-server from ``/proc`` over the generator's
run, divided by every reply of that run (warm-up included), and the generator's own CPU for the load.
Medians over rounds, with min and max.

The generator check: a closed loop measures the target only if the target, not the generator,
is the bottleneck. Every process here is single-threaded, so each saturates at one core: the
figures say, per target, the target's CPU utilisation and the busiest generator process's, and
CPU per request of both; ``generator_bound`` is true when a generator process was busier than the
target. ``machine_cpu_util`` adds up target, generator and nats-server: near the machine's core
count, the machine, not the target, set the maximum (said in ``problems``).
With ``--nats-url`` only llmsrv at that URL is loaded (no responder, no CPU figures).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import processes
from bench.loadgen import PAYLOAD, LoadGen
from bench.report import md_table, progress
from bench.scenario import Options, Result

NAME = "overhead"
SUMMARY = "llmsrv + mock:echo vs the bare responder: max throughput, CPU per request, ratios (closed loop)"
CONCURRENCY = 100
LLMSRV, RESPONDER, BASE = "llmsrv", "responder", "llmsrv@base"
FLOORS = {"floor: trio": "trio", "floor: trio task": "trio-task"}  # target -> bench.responder --stack
TASK_FLOOR = "floor: trio task"
SUBJECTS = {LLMSRV: "llm.request", RESPONDER: "bench.request", BASE: "base.request",
            "floor: trio": "floor.request", TASK_FLOOR: "floortask.request"}


@dataclass
class Stack:
    """The running targets (name -> subject, process or None if remote), nats-server and the generator."""

    url: str
    gen: LoadGen
    subjects: dict[str, str]
    children: dict[str, processes.Child | None]
    nats_pid: int | None
    reply_bytes: dict[str, int] = field(default_factory=dict)
    remote: bool = False


def timing(opts: Options) -> tuple[float, float, float]:
    """(duration, warm-up, per-request timeout) in seconds; smoke runs are short."""
    if opts.smoke:
        return 0.4, 0.15, 2.0
    return opts.duration_s, opts.warmup_s, 10.0


@contextmanager
def stack(opts: Options, log_dir: Path, floors: bool = False) -> Iterator[Stack]:
    """Start (or, with ``--nats-url``, reach) everything a scenario loads (``floors``: the responder on
    llmsrv's stack too); stop it all on the way out."""
    _, _, timeout_s = timing(opts)
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as es:
        if opts.nats_url:
            size = processes.probe(opts.nats_url, SUBJECTS[LLMSRV])
            gen = es.enter_context(LoadGen(opts.nats_url, SUBJECTS[LLMSRV], timeout_s, log_dir / "loadgen.log"))
            yield Stack(opts.nats_url, gen, {LLMSRV: SUBJECTS[LLMSRV]}, {LLMSRV: None}, None,
                        {LLMSRV: size}, remote=True)
            return
        nats = es.enter_context(processes.NatsServer())
        assert nats.proc is not None
        llm = es.enter_context(processes.llmsrv(nats.url, "llm", log_dir))
        size = llm.wait_ready(nats.url, SUBJECTS[LLMSRV])
        resp = es.enter_context(processes.responder(nats.url, "bench", log_dir, reply_bytes=size))
        resp_size = resp.wait_ready(nats.url, SUBJECTS[RESPONDER])
        children: dict[str, processes.Child | None] = {LLMSRV: llm, RESPONDER: resp}
        sizes = {LLMSRV: size, RESPONDER: resp_size}
        for name, kind in FLOORS.items() if floors else ():
            prefix = SUBJECTS[name].partition(".")[0]
            children[name] = es.enter_context(processes.responder(nats.url, prefix, log_dir, reply_bytes=size,
                                                                   name=f"responder-{kind}", stack=kind))
            sizes[name] = children[name].wait_ready(nats.url, SUBJECTS[name])
        if opts.base_tree:  # the same llmsrv code path from another checkout: a before/after in the same rounds
            base = es.enter_context(processes.llmsrv(nats.url, "base", log_dir, name="llmsrv-base",
                                                     tree=opts.base_tree.resolve()))
            sizes[BASE] = base.wait_ready(nats.url, SUBJECTS[BASE])
            children[BASE] = base
        gen = es.enter_context(LoadGen(nats.url, SUBJECTS[LLMSRV], timeout_s, log_dir / "loadgen.log"))
        yield Stack(nats.url, gen, {n: SUBJECTS[n] for n in children}, children, nats.proc.pid, sizes)


def cpu_of(pid: int | None) -> float | None:
    return processes.cpu_seconds(pid) if pid else None


def per_req(before: float | None, after: float | None, n: int) -> float | None:
    return None if before is None or after is None or not n else (after - before) * 1e6 / n


def _util(before: float | None, after: float | None, wall_s: float) -> float | None:
    return None if before is None or after is None or wall_s <= 0 else (after - before) / wall_s


def closed_point(st: Stack, target: str, opts: Options, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """One closed-loop run against ``target`` with CPU from /proc; the histograms dropped.

    The generator's CPU is what its processes report for the load itself (not the arithmetic after it);
    ``generator_cpu_util`` is its busiest process's share of a core.
    """
    duration, warmup, _ = timing(opts)
    child = st.children[target]
    pids = {"target": child.pid if child else None, "nats": st.nats_pid}
    before = {k: cpu_of(p) for k, p in pids.items()}
    got = st.gen.run(concurrency=concurrency, duration_s=duration, warmup_s=warmup, subject=st.subjects[target])
    after = {k: cpu_of(p) for k, p in pids.items()}
    if child:
        child.check_alive()
    got.pop("latency_hist", None)
    got.pop("service_hist", None)
    wall = got["generator_wall_s"]
    for k in pids:
        got[f"{k}_cpu_us_per_req"] = per_req(before[k], after[k], got["answered"])
        got[f"{k}_cpu_util"] = _util(before[k], after[k], wall)
    got["generator_cpu_us_per_req"] = per_req(0.0, got["generator_cpu_s"], got["answered"])
    got["generator_cpu_util"] = got["generator_cpu_util_max"]
    parts = [got["target_cpu_util"], got["nats_cpu_util"], got["generator_cpu_s"] / wall if wall > 0 else None]
    got["machine_cpu_util"] = None if None in parts else sum(parts)
    return got


def median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise_closed(points: list[dict[str, Any]], reply_bytes: int | None) -> dict[str, Any]:
    rps = [p["rps"] for p in points]
    out: dict[str, Any] = {"rounds": len(points), "reply_bytes": reply_bytes,
                           "rps": median(rps), "rps_min": min(rps), "rps_max": max(rps),
                           "errors": sum(p["error_total"] for p in points)}
    for key in ("p50_ms", "p99_ms", "p99.9_ms", "max_ms", "target_cpu_us_per_req", "target_cpu_util",
                "generator_cpu_us_per_req", "generator_cpu_util", "nats_cpu_us_per_req", "machine_cpu_util"):
        out[key] = median([p[key] for p in points])
    cpus = [p["target_cpu_us_per_req"] for p in points if p["target_cpu_us_per_req"] is not None]
    out["target_cpu_us_per_req_min"] = min(cpus) if cpus else None
    out["target_cpu_us_per_req_max"] = max(cpus) if cpus else None
    g, t = out["generator_cpu_util"], out["target_cpu_util"]
    out["generator_bound"] = None if g is None or t is None else g > t
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    return {"rps": ratio(a["rps"], b["rps"]), "p99": ratio(a["p99_ms"], b["p99_ms"]),
            "cpu_us_per_req": ratio(a["target_cpu_us_per_req"], b["target_cpu_us_per_req"])}


def fmt(v: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def run(opts: Options) -> Result:
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    log_dir = Path(opts.out_dir) / "logs" / NAME
    runs: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    with stack(opts, log_dir, floors=True) as st:
        names = list(st.subjects)
        runs = {n: [] for n in names}
        with progress(opts, rounds * len(names), NAME) as bar:
            for rnd in range(rounds):
                for name in names if rnd % 2 == 0 else names[::-1]:
                    point = closed_point(st, name, opts)
                    point["round"] = rnd + 1
                    runs[name].append(point)
                    bar.set_postfix_str(f"{name} {point['rps']:,.0f} req/s")
                    bar.update()
        reply_bytes = st.reply_bytes
        remote = st.remote
    if remote:
        problems.append(f"--nats-url {opts.nats_url}: only llmsrv was loaded (no bare responder, no CPU figures "
                        "from /proc: the deployment's processes are not ours)")
    targets = {n: summarise_closed(pts, reply_bytes.get(n)) for n, pts in runs.items()}
    figures: dict[str, Any] = {
        "settings": {"concurrency": CONCURRENCY, "rounds": rounds, "duration_s": timing(opts)[0],
                     "warmup_s": timing(opts)[1], "request_bytes": len(PAYLOAD),
                     "nats_url": opts.nats_url},
        "targets": targets, "rounds": runs,
    }
    if LLMSRV in targets and RESPONDER in targets:
        figures["ratios"] = _ratios(targets[LLMSRV], targets[RESPONDER])
    if TASK_FLOOR in targets and RESPONDER in targets:
        figures["floor_ratios"] = {k: _ratios(targets[a], targets[b]) for k, (a, b) in {
            "floor / responder": (TASK_FLOOR, RESPONDER), "llmsrv / floor": (LLMSRV, TASK_FLOOR)}.items()}
    if BASE in targets:
        figures["vs_base"] = {"tree": str(opts.base_tree), **_ratios(targets[LLMSRV], targets[BASE])}
    for n, t in targets.items():
        if t["errors"]:
            problems.append(f"{n}: {t['errors']} failed requests")
        if t["generator_bound"]:
            problems.append(f"{n}: a generator process was busier than the target "
                            f"({fmt(t['generator_cpu_util'], '.0%')} vs {fmt(t['target_cpu_util'], '.0%')} "
                            "of a core): its req/s is a lower bound")
        cores = os.cpu_count() or 1
        if t["machine_cpu_util"] is not None and t["machine_cpu_util"] > 0.85 * cores:
            problems.append(f"{n}: target, generator and nats-server used {t['machine_cpu_util']:.2f} of {cores} "
                            "cores: the machine, not the target, set this maximum (compare CPU per request)")
    rows = [[n, t["rps"], f"{t['rps_min']:,.0f}-{t['rps_max']:,.0f}", fmt(t["target_cpu_us_per_req"], ".1f"),
             fmt(t["target_cpu_util"], ".0%"), fmt(t["generator_cpu_us_per_req"], ".1f"),
             fmt(t["generator_cpu_util"], ".0%"), fmt(t["machine_cpu_util"], ".2f"), t["p50_ms"], t["p99_ms"],
             t["errors"]]
            for n, t in targets.items()]
    md = md_table(["target", "req/s (median)", "req/s min-max", "CPU us/req", "target CPU", "generator us/req",
                   "busiest generator CPU", "cores used", "p50 ms", "p99 ms", "errors"], rows)
    ratio_rows = [[label, fmt(r["rps"], ".2f", "x"), fmt(r["p99"], ".2f", "x"), fmt(r["cpu_us_per_req"], ".2f", "x")]
                  for label, r in (("llmsrv / responder", figures.get("ratios")),
                                   *((f"{k} (trio task)", r) for k, r in figures.get("floor_ratios", {}).items()),
                                   (f"llmsrv / llmsrv@base ({opts.base_tree})", figures.get("vs_base"))) if r]
    if ratio_rows:
        md += "\n" + md_table(["ratio", "req/s", "p99", "CPU per request"], ratio_rows)
    md += (f"\nClosed loop, {CONCURRENCY} outstanding, {rounds} interleaved round(s), "
           f"{reply_bytes.get(LLMSRV)}-byte replies; CPU from /proc over each run / replies.\n")
    series = {f"{n} req/s, round {p['round']}": [(float(s), float(c)) for s, c in enumerate(p["per_second"])]
              for n, pts in runs.items() for p in pts}
    return Result(NAME, figures, md, series, problems)
