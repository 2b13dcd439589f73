"""``latency``: open loop at 25/50/75% of each target's measured maximum, latency from the intended send time.

First each target's maximum is measured as in ``overhead`` (closed loop, interleaved rounds,
median). Then every target is loaded in open loop at each rate ``level x max(base)`` for each base
target and level, provided the rate is at most its own maximum (past it the queue only grows, and
the figure would be the run's length): so the responder is measured at llmsrv's rates too, the
same-rate comparison. Latency runs from when each request was *due* (wrk2's rule), so a stall counts
for every request that should have gone out during it; p50/p90/p99/p99.9/max are medians over rounds,
the percentile spectrum (for plots) is from all rounds' histograms merged. Each point also has the
target's CPU per request (from /proc, warm-up included, as in ``overhead``): at a steady rate every
request pays for its own wake-ups, which a closed loop's batches spread over many, so the same-rate
ratio to the responder is the one real traffic sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.loadgen import merge_histograms, percentiles_ms, spectrum_ms
from bench.report import md_table, progress
from bench.scenario import Options, Result
from bench.scenarios.overhead import LLMSRV, RESPONDER, closed_point, cpu_of, fmt, median, per_req, ratio, stack, timing

NAME = "latency"
SUMMARY = "open loop at 25/50/75% of each target's max: p50/p90/p99/p99.9/max from the intended send time"
LEVELS = (0.25, 0.5, 0.75)
SMOKE_LEVELS = (0.5,)
KEYS = ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")


def plan(max_rps: dict[str, float], levels: tuple[float, ...]) -> list[tuple[str, float, float]]:
    """(base target, level, rate) for every base and level, llmsrv's first."""
    bases = sorted(max_rps, key=lambda n: n != LLMSRV)
    return [(base, level, level * max_rps[base]) for base in bases for level in levels if max_rps[base] > 0]


def same_rate_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """llmsrv / responder at each rate both were loaded at: CPU per request and p99."""
    at = {(r["base"], r["level"], r["target"]): r for r in rows}
    out = []
    for (base, level, target), mine in at.items():
        other = at.get((base, level, RESPONDER))
        if target == LLMSRV and other is not None:
            out.append({"rate": mine["rate"], "of": f"{level:.0%} {base} max",
                        "cpu": ratio(mine["cpu_us_per_req"], other["cpu_us_per_req"]),
                        "p99": ratio(mine["p99_ms"], other["p99_ms"])})
    return out


def run(opts: Options) -> Result:
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    levels = SMOKE_LEVELS if opts.smoke else LEVELS
    duration, warmup, _ = timing(opts)
    problems: list[str] = []
    with stack(opts, Path(opts.out_dir) / "logs" / NAME) as st:
        names = list(st.subjects)
        maxima: dict[str, list[float]] = {n: [] for n in names}
        with progress(opts, rounds * len(names), f"{NAME}: maxima") as bar:
            for rnd in range(rounds):
                for name in names if rnd % 2 == 0 else names[::-1]:
                    maxima[name].append(closed_point(st, name, opts)["rps"])
                    bar.update()
        max_rps = {n: median(v) or 0.0 for n, v in maxima.items()}
        steps = plan(max_rps, levels)
        points: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
        todo = [(b, lv, rate, n) for b, lv, rate in steps for n in names if rate <= max_rps[n]]
        with progress(opts, rounds * len(todo), f"{NAME}: open loop") as bar:
            for rnd in range(rounds):
                for base, level, rate, name in todo if rnd % 2 == 0 else todo[::-1]:
                    child = st.children[name]
                    before = cpu_of(child.pid if child else None)
                    got = st.gen.run(rate=rate, duration_s=duration, warmup_s=warmup, subject=st.subjects[name])
                    got["cpu_us_per_req"] = per_req(before, cpu_of(child.pid if child else None), got["answered"])
                    points.setdefault((base, level, name), []).append(got)
                    bar.set_postfix_str(f"{name} @ {rate:,.0f}/s p99 {got['p99_ms']:.1f} ms")
                    bar.update()
        remote = st.remote
    if remote:
        problems.append(f"--nats-url {opts.nats_url}: only llmsrv was loaded (no bare responder)")
    rows: list[dict[str, Any]] = []
    series: dict[str, list[tuple[float, float]]] = {}
    for (base, level, name), got in points.items():
        row: dict[str, Any] = {"base": base, "level": level, "rate": got[0]["rate"], "target": name,
                               "rounds": len(got), "errors": sum(g["error_total"] for g in got),
                               "late_sends": sum(g["late_sends"] for g in got),
                               "achieved_rps": median([g["rps"] for g in got]),
                               "cpu_us_per_req": median([g["cpu_us_per_req"] for g in got])}
        row.update({k: median([g[k] for g in got]) for k in KEYS})
        merged = merge_histograms(g["latency_hist"] for g in got)
        row["merged"] = percentiles_ms(merged)
        rows.append(row)
        series[f"{name} at {level:.0%} of {base} max ({row['rate']:,.0f}/s)"] = spectrum_ms(merged)
        if row["errors"]:
            problems.append(f"{name} at {row['rate']:,.0f}/s: {row['errors']} failed requests")
    skipped = [f"{n} at {rate:,.0f}/s ({lv:.0%} of {b} max)" for b, lv, rate in steps for n in names
               if rate > max_rps[n]]
    figures = {"settings": {"rounds": rounds, "levels": list(levels), "duration_s": duration, "warmup_s": warmup,
                            "nats_url": opts.nats_url},
               "max_rps": max_rps, "max_rps_rounds": maxima, "points": rows, "skipped_over_max": skipped}
    md = md_table(["target", "max req/s (closed loop)"], [[n, v] for n, v in max_rps.items()]) + "\n"
    md += md_table(["rate /s", "of", "target", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "CPU us/req",
                    "errors"],
                   [[r["rate"], f"{r['level']:.0%} {r['base']} max", r["target"], *(fmt(r[k], ".2f") for k in KEYS),
                     fmt(r["cpu_us_per_req"], ".1f"), r["errors"]] for r in rows])
    same_rate = same_rate_ratios(rows)
    figures["same_rate"] = same_rate
    if same_rate:
        md += "\n" + md_table(["rate /s", "of", "CPU per request llmsrv / responder", "p99 llmsrv / responder"],
                              [[r["rate"], r["of"], fmt(r["cpu"], ".2f", "x"), fmt(r["p99"], ".2f", "x")]
                               for r in same_rate])
    md += (f"\nOpen loop, latency from the intended send time, medians over {rounds} round(s) of "
           f"{duration:g} s (after {warmup:g} s warm-up).")
    if skipped:
        md += " Not run (rate above that target's max): " + "; ".join(skipped) + "."
    return Result(NAME, figures, md + "\n", series, problems)
