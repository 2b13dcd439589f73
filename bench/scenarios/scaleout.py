"""``scaleout``: N llmsrv processes in one queue group on one host: req/s, CPU per request, the spread, speed-up.

One nats-server; for each N in ``PROCESSES`` (smoke: ``SMOKE_PROCESSES``) exactly N ``python -m llmsrv serve``
processes (``mock:echo``), all on ``llm.request`` in the default queue group ``llmsrv``, are started, loaded
and stopped again, so every point has its own fresh set. Each N is loaded in closed loop at every
concurrency in ``CONCURRENCIES`` (more processes need more requests outstanding to be kept busy) by the same
generator (``bench/loadgen.py``) as ``overhead``. The bare responder (``bench/responder.py``, replies padded to
llmsrv's size, on ``bench.request``) gets one point per round at ``overhead.CONCURRENCY``: the same-run
baseline, so ratios can be quoted. Rounds are interleaved: N ascending, then the responder, in even rounds;
the reverse in odd ones (the concurrencies alternate too), so slow drifts of the shared machine hit every N.

Per point: req/s and p50/p99; the user+system CPU of each llmsrv process from ``/proc`` over the run (its share
of a core: is the queue group spreading the load evenly?), their sum per reply (warm-up included, as in
``overhead``), nats-server's and the generator's CPU, and ``machine_cpu_util`` (all of them, in cores).
Medians over rounds with min and max. Speed-up is req/s at N over req/s at N=1 at the same concurrency *in the
same round*, then the median over rounds. The recommendation, on each N's best concurrency's median speed-up,
is the smallest N that no larger N beats by ``GROWTH`` (10 %) or more, stated per core with ``os.cpu_count()``
(and per round alone, to show whether the rounds agree). The whole machine's busy CPU (``/proc/stat``) less
this run's is ``others``: on a shared machine more processes also win a bigger share of it from its other
tenants, which the text then says. ``--nats-url`` is ignored: this scenario needs its own processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import processes
from bench.loadgen import ERROR_KINDS, PAYLOAD, LoadGen
from bench.report import md_table, progress
from bench.scenario import Options, Result
from bench.scenarios.overhead import (
    CONCURRENCY,
    LLMSRV,
    RESPONDER,
    SUBJECTS,
    Stack,
    _util,
    closed_point,
    fmt,
    median,
    ratio,
    summarise_closed,
    timing,
)

NAME = "scaleout"
SUMMARY = "N llmsrv processes in one queue group (N = 1..4): req/s, CPU/req, load spread, speed-up, per-core advice"
PROCESSES = (1, 2, 3, 4)
SMOKE_PROCESSES = (1, 2)
CONCURRENCIES = (CONCURRENCY, 400)
GROWTH = 0.10  # a further process is worth it if req/s grows by at least this much


def start_set(url: str, n: int, log_dir: Path, es: ExitStack) -> tuple[list[processes.Child], int]:
    """Start ``n`` llmsrv processes at once (stopped when ``es`` closes); wait until each is ready; return them
    and the reply size. The probe may be answered by any of them: the ready line comes after the subscription."""
    children = [es.enter_context(processes.llmsrv(url, "llm", log_dir, name=f"llmsrv-{i}")) for i in range(n)]
    sizes = [child.wait_ready(url, SUBJECTS[LLMSRV]) for child in children]
    return children, sizes[0]


def host_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (every process, ours or not: ``/proc/stat``'s user, nice,
    system, irq, softirq), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def with_host(point: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``point(*args)`` (a closed-loop point) and add ``host_cpu_util`` (the whole machine, in cores, over the
    call) and ``other_cpu_util`` (the rest of it beyond ``machine_cpu_util``: other tenants of a shared machine,
    and the little this run spends outside the measured load, such as the generator's arithmetic after it)."""
    before, t0 = host_busy_s(), time.monotonic()
    got = point(*args)
    after, wall = host_busy_s(), time.monotonic() - t0
    got["host_cpu_util"] = _util(before, after, wall)
    ours, host = got["machine_cpu_util"], got["host_cpu_util"]
    got["other_cpu_util"] = None if ours is None or host is None else max(0.0, host - ours)
    return got


def llmsrv_point(st: Stack, children: list[processes.Child], opts: Options, concurrency: int) -> dict[str, Any]:
    """``overhead.closed_point`` on ``llm.request`` with the CPU of every process of the set: each one's share
    of a core (``llmsrv_cpu_util``, a list), their sum per reply and in cores (``target_*``)."""
    before = [c.cpu_seconds() for c in children]
    got = with_host(closed_point, st, LLMSRV, opts, concurrency)
    after = [c.cpu_seconds() for c in children]
    for child in children:
        child.check_alive()
    wall = got["generator_wall_s"]
    utils = [_util(b, a, wall) for b, a in zip(before, after, strict=True)]
    spent = [None if b is None or a is None else a - b for b, a in zip(before, after, strict=True)]
    known = None if None in spent else sum(s for s in spent if s is not None)
    got["processes"] = len(children)
    got["llmsrv_cpu_util"] = utils
    got["target_cpu_us_per_req"] = known * 1e6 / got["answered"] if known is not None and got["answered"] else None
    got["target_cpu_util"] = known / wall if known is not None and wall > 0 else None
    parts = [got["target_cpu_util"], got["nats_cpu_util"], got["generator_cpu_s"] / wall if wall > 0 else None]
    got["machine_cpu_util"] = None if None in parts else sum(p for p in parts if p is not None)
    ours, host = got["machine_cpu_util"], got["host_cpu_util"]
    got["other_cpu_util"] = None if ours is None or host is None else max(0.0, host - ours)
    return got


def balance(utils: list[float | None]) -> float | None:
    """The least busy process's CPU over the busiest's (1.0: an even spread); None if unknown."""
    vals = [u for u in utils if u is not None]
    return min(vals) / max(vals) if len(vals) == len(utils) and vals and max(vals) > 0 else None


def spread(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    return {"median": median(vals), "min": min(vals) if vals else None, "max": max(vals) if vals else None,
            "rounds": len(vals)}


def summarise_set(points: list[dict[str, Any]], reply_bytes: int | None) -> dict[str, Any]:
    """``overhead.summarise_closed`` plus the per-process CPU (median over rounds, by process index) and the
    balance; ``generator_bound`` compares the busiest generator process with the busiest llmsrv process."""
    out = summarise_host(points, summarise_closed(points, reply_bytes))
    n = points[0]["processes"]
    out["processes"] = n
    out["llmsrv_cpu_util_per_process"] = [median([p["llmsrv_cpu_util"][i] for p in points]) for i in range(n)]
    out["balance"] = median([balance(p["llmsrv_cpu_util"]) for p in points])
    busiest = median([max((u for u in p["llmsrv_cpu_util"] if u is not None), default=None) for p in points])
    g = out["generator_cpu_util"]
    out["llmsrv_cpu_util_busiest"] = busiest
    out["generator_bound"] = None if g is None or busiest is None else g > busiest
    return out


def summarise_host(points: list[dict[str, Any]], out: dict[str, Any]) -> dict[str, Any]:
    out["host_cpu_util"] = median([p.get("host_cpu_util") for p in points])
    out["other_cpu_util"] = median([p.get("other_cpu_util") for p in points])
    return out


def speedups(runs: dict[int, dict[int, list[dict[str, Any]]]]) -> dict[int, dict[int, dict[str, Any]]]:
    """concurrency -> N -> req/s(N) / req/s(1) of the same round: median, min, max over rounds."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for c, by_n in runs.items():
        base = {p["round"]: p["rps"] for p in by_n.get(1, [])}
        out[c] = {n: spread([ratio(p["rps"], base.get(p["round"])) for p in pts]) for n, pts in by_n.items()}
    return out


def best_by_round(runs: dict[int, dict[int, list[dict[str, Any]]]]) -> dict[int, dict[int, float | None]]:
    """N -> round -> the same-round speed-up of N's best concurrency (its highest req/s in that round) over N=1's
    best."""
    best: dict[int, dict[int, float]] = {}  # N -> round -> best req/s
    for by_n in runs.values():
        for n, pts in by_n.items():
            for p in pts:
                best.setdefault(n, {})[p["round"]] = max(best.get(n, {}).get(p["round"], 0.0), p["rps"])
    base = best.get(1, {})
    return {n: {rnd: ratio(r, base.get(rnd)) for rnd, r in by_round.items()} for n, by_round in best.items()}


def recommend(speedup: dict[int, float | None], growth: float = GROWTH) -> int | None:
    """The N beyond which req/s no longer grows by ``growth``: the smallest N that no larger N measured beats by
    ``1 + growth`` times its speed-up (so one noisy dip, at N=2 say, does not hide a gain at N=4). None without a
    speed-up for N=1."""
    known = {n: s for n, s in speedup.items() if s is not None}
    if 1 not in known:
        return None
    ns = sorted(known)
    for i, n in enumerate(ns):
        if all(known[m] < (1 + growth) * known[n] - 1e-9 for m in ns[i + 1:]):  # 1e-9: float rounding
            return n
    return ns[-1]  # not reached: the largest N has none beyond it


def advice(chosen: int | None, measured: tuple[int, ...], cores: int) -> str:
    if chosen is None:
        return "No recommendation: N=1 has no req/s to compare with."
    per_core = chosen / cores
    if chosen == max(measured):
        head = (f"req/s still grew by at least {GROWTH:.0%} at N={chosen}, the largest measured: run at least "
                f"{chosen} processes on this {cores}-core machine (more may help; not measured)")
    else:
        head = (f"no N beyond {chosen} gave {GROWTH:.0%} more req/s than N={chosen}: run {chosen} llmsrv process"
                f"{'es' if chosen > 1 else ''} on this {cores}-core machine")
    return f"{head}, that is {per_core:.2g} per core (os.cpu_count() = {cores})."


def failures(where: str, points: list[dict[str, Any]]) -> str:
    """A problem line for failed requests, by kind; ``503`` error replies are llmsrv shedding load (OVERLOADED:
    the queue in front of a process grew past its target) and the req/s counts successes only."""
    kinds = {k: sum(p["errors"].get(k, 0) for p in points) for k in ERROR_KINDS}
    codes: dict[str, int] = {}
    for p in points:
        for code, count in p["error_codes"].items():
            codes[code] = codes.get(code, 0) + count
    shed = codes.pop("503", 0)
    parts = [f"{shed} refused with 503 (OVERLOADED: load shedding; req/s counts successes only)"] if shed else []
    parts += [f"{count} error replies {code}" for code, count in codes.items()]
    parts += [f"{kinds[k]} {k}" for k in ("no_responders", "timeout") if kinds[k]]
    return f"{where}: " + ", ".join(parts)


def cores_used(s: dict[str, Any]) -> str:
    return f"{fmt(s['machine_cpu_util'], '.2f')} / {fmt(s['other_cpu_util'], '.2f')}"


def run(opts: Options) -> Result:
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    ns = SMOKE_PROCESSES if opts.smoke else PROCESSES
    duration, warmup, timeout_s = timing(opts)
    log_dir = Path(opts.out_dir) / "logs" / NAME
    log_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    if opts.nats_url:
        problems.append(f"--nats-url {opts.nats_url} ignored: scaleout starts and stops its own llmsrv processes "
                        "(N of them per point) and reads their CPU from /proc")
    runs: dict[int, dict[int, list[dict[str, Any]]]] = {c: {n: [] for n in ns} for c in CONCURRENCIES}
    base_runs: list[dict[str, Any]] = []
    reply_bytes: dict[str, int] = {}
    with ExitStack() as outer:
        nats = outer.enter_context(processes.NatsServer())
        assert nats.proc is not None
        gen = outer.enter_context(LoadGen(nats.url, SUBJECTS[LLMSRV], timeout_s, log_dir / "loadgen.log"))
        resp: processes.Child | None = None
        with progress(opts, rounds * (len(ns) * len(CONCURRENCIES) + 1), NAME) as bar:
            for rnd in range(rounds):
                order: list[int | None] = [*ns, None] if rnd % 2 == 0 else [None, *ns[::-1]]  # None: responder
                for n in order:
                    if n is None:
                        if resp is None:  # started once llmsrv's reply size is known (round 1 ends with it)
                            resp = outer.enter_context(processes.responder(
                                nats.url, "bench", log_dir, reply_bytes=reply_bytes[LLMSRV]))
                            reply_bytes[RESPONDER] = resp.wait_ready(nats.url, SUBJECTS[RESPONDER])
                        st = Stack(nats.url, gen, dict(SUBJECTS), {RESPONDER: resp}, nats.proc.pid)
                        point = with_host(closed_point, st, RESPONDER, opts)
                        point["round"] = rnd + 1
                        base_runs.append(point)
                        bar.set_postfix_str(f"responder {point['rps']:,.0f} req/s")
                        bar.update()
                        continue
                    with ExitStack() as es:
                        children, reply_bytes[LLMSRV] = start_set(nats.url, n, log_dir, es)
                        st = Stack(nats.url, gen, {LLMSRV: SUBJECTS[LLMSRV]}, {LLMSRV: None}, nats.proc.pid)
                        for c in CONCURRENCIES if (rnd + n) % 2 == 0 else CONCURRENCIES[::-1]:
                            point = llmsrv_point(st, children, opts, c)
                            point["round"] = rnd + 1
                            runs[c][n].append(point)
                            bar.set_postfix_str(f"N={n} c={c} {point['rps']:,.0f} req/s")
                            bar.update()

    cores = os.cpu_count() or 1
    sets = {c: {n: summarise_set(pts, reply_bytes.get(LLMSRV)) for n, pts in by_n.items()}
            for c, by_n in runs.items()}
    baseline = summarise_host(base_runs, summarise_closed(base_runs, reply_bytes.get(RESPONDER)))
    speed = speedups(runs)
    per_round = best_by_round(runs)
    best = {n: spread(list(by_round.values())) for n, by_round in per_round.items()}
    chosen = recommend({n: s["median"] for n, s in best.items()})
    each = [recommend({n: per_round[n].get(rnd + 1) for n in ns}) for rnd in range(rounds)]
    text = advice(chosen, ns, cores)
    others = [s["other_cpu_util"] for by_n in sets.values() for s in by_n.values()] + [baseline["other_cpu_util"]]
    busiest_other = max((o for o in others if o is not None), default=None)
    if busiest_other is not None and busiest_other > 0.25 and chosen is not None and chosen > 1:
        text += (f" Other processes used up to {busiest_other:.2f} cores meanwhile: more llmsrv processes also take "
                 "a bigger share of a contended machine from them, so on a dedicated one fewer may do as well.")
    if rounds > 1:
        text += (" Every round alone gives the same N." if len(set(each)) == 1 else
                 f" The rounds alone disagree (N = {', '.join(str(e) for e in each)}): the machine was noisy.")
    figures: dict[str, Any] = {
        "settings": {"processes": list(ns), "concurrencies": list(CONCURRENCIES), "rounds": rounds,
                     "duration_s": duration, "warmup_s": warmup, "request_bytes": len(PAYLOAD),
                     "responder_concurrency": CONCURRENCY, "growth": GROWTH, "cpus": cores,
                     "queue_group": "llmsrv (default)", "nats_url": None},
        "sets": {f"c{c}": {f"n{n}": s for n, s in by_n.items()} for c, by_n in sets.items()},
        "speedup": {f"c{c}": {f"n{n}": s for n, s in by_n.items()} for c, by_n in speed.items()},
        "speedup_best": {f"n{n}": s for n, s in best.items()},
        "responder": baseline,
        "vs_responder": {f"c{c}": {f"n{n}": ratio(s["rps"], baseline["rps"]) for n, s in by_n.items()}
                         for c, by_n in sets.items()},
        "recommendation": {"processes": chosen, "per_core": None if chosen is None else chosen / cores,
                           "per_round": each, "text": text},
        "rounds": {"responder": base_runs,
                   **{f"c{c}": {f"n{n}": pts for n, pts in by_n.items()} for c, by_n in runs.items()}},
    }

    for c, by_n in sets.items():
        for n, s in by_n.items():
            where = f"N={n}, c={c}"
            if s["errors"]:
                problems.append(failures(where, runs[c][n]))
            if s["generator_bound"]:
                problems.append(f"{where}: a generator process was busier than the busiest llmsrv process "
                                f"({fmt(s['generator_cpu_util'], '.0%')} vs {fmt(s['llmsrv_cpu_util_busiest'], '.0%')}"
                                " of a core): its req/s is a lower bound")
            if s["machine_cpu_util"] is not None and s["machine_cpu_util"] > 0.85 * cores:
                problems.append(f"{where}: llmsrv, generator and nats-server used {s['machine_cpu_util']:.2f} of "
                                f"{cores} cores: the machine, not llmsrv, set this maximum")
    if busiest_other is not None and busiest_other > 0.25:
        problems.append(f"other processes (not this run's) used up to {busiest_other:.2f} of {cores} cores during "
                        "a point (median over rounds; /proc/stat): the machine was shared, the figures are noisy")
    if baseline["errors"]:
        problems.append(failures("responder", base_runs))

    rows = []
    for c, by_n in sets.items():
        for n, s in by_n.items():
            sp = speed[c][n]
            rows.append([
                n, c, s["rps"], f"{s['rps_min']:,.0f}-{s['rps_max']:,.0f}",
                fmt(sp["median"], ".2f", "x")
                + ("" if n == 1 else f" ({fmt(sp['min'], '.2f')}-{fmt(sp['max'], '.2f')})"),
                fmt(ratio(s["rps"], baseline["rps"]), ".2f", "x"), fmt(s["target_cpu_us_per_req"], ".1f"),
                " / ".join(fmt(u, ".0%") for u in s["llmsrv_cpu_util_per_process"]), fmt(s["balance"], ".2f"),
                fmt(s["nats_cpu_us_per_req"], ".1f"), fmt(s["generator_cpu_util"], ".0%"),
                cores_used(s), s["p50_ms"], s["p99_ms"], s["errors"]])
    rows.append(["responder", CONCURRENCY, baseline["rps"], f"{baseline['rps_min']:,.0f}-{baseline['rps_max']:,.0f}",
                 "", "1.00x", fmt(baseline["target_cpu_us_per_req"], ".1f"), fmt(baseline["target_cpu_util"], ".0%"),
                 "", fmt(baseline["nats_cpu_us_per_req"], ".1f"), fmt(baseline["generator_cpu_util"], ".0%"),
                 cores_used(baseline), baseline["p50_ms"], baseline["p99_ms"], baseline["errors"]])
    md = md_table(["llmsrv processes", "outstanding", "req/s (median)", "req/s min-max",
                   "speed-up vs N=1 (same round)", "vs responder", "llmsrv CPU us/req (all)",
                   "CPU per process", "balance (min/max)", "nats us/req", "busiest generator CPU",
                   "cores: ours / others", "p50 ms", "p99 ms", "errors"], rows)
    md += ("\n" + md_table(["N", *[f"n={n}" for n in ns]],
                           [["best speed-up (median)", *[fmt(best[n]["median"], ".2f", "x") for n in ns]]]))
    md += (f"\n**Recommendation** ({cores} CPUs): {text}\n\n"
           f"Closed loop, {rounds} interleaved round(s) of {duration:g} s (+{warmup:g} s warm-up) per point, "
           f"{reply_bytes.get(LLMSRV)}-byte replies; exactly N llmsrv processes (`mock:echo`, queue group "
           f"`llmsrv`) run per point; CPU from /proc over each run / replies (warm-up included); balance = least "
           "over most busy process; speed-up = req/s over N=1's at the same concurrency in the same round; the "
           f"responder is one point per round at {CONCURRENCY} outstanding. Generator, nats-server and llmsrv "
           "share this machine's cores: on a small machine the speed-up is bounded by the machine. Cores \"others\": "
           "the rest of the machine's busy CPU (/proc/stat), from processes not of this run.\n")
    series: dict[str, list[tuple[float, float]]] = {}
    for c, by_n in sets.items():
        series[f"c{c}_req_per_s"] = [(float(n), float(s["rps"])) for n, s in by_n.items() if s["rps"] is not None]
        series[f"c{c}_cpu_us_per_req"] = [(float(n), float(s["target_cpu_us_per_req"])) for n, s in by_n.items()
                                          if s["target_cpu_us_per_req"] is not None]
    return Result(NAME, figures, md, series, problems)
