"""``overload``: open loop at twice llmsrv's sustainable rate: is every request answered, and fast?

First llmsrv's maximum is measured as in ``overhead`` (closed loop, the median of the rounds). Then
llmsrv is loaded in open loop at ``FACTOR`` times that rate, latency from the intended send time.
What a client needs from an overloaded server (issue 11's targets, checked and reported, never
asserted): every request answered within ``TIMEOUT_S`` (no timeouts), the successful replies' p99
at most ``OK_P99_TARGET_MS``, and the excess refused at once with ``OVERLOADED`` (code 503) rather
than queued. Also reported: the share refused, the successful throughput against the maximum, and
the rate of each error code. With ``--nats-url`` it loads llmsrv at that URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.loadgen import merge_histograms, percentiles_ms, spectrum_ms
from bench.report import md_table, progress
from bench.scenario import Options, Result
from bench.scenarios.overhead import LLMSRV, closed_point, fmt, median, stack, timing

NAME = "overload"
SUMMARY = "open loop at 2x llmsrv's max: every request answered within 10 s, OK p99, the excess OVERLOADED"
FACTOR = 2.0
TIMEOUT_S = 10.0
OK_P99_TARGET_MS = 2000.0


def run(opts: Options) -> Result:
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    duration, warmup, _ = timing(opts)
    problems: list[str] = []
    with stack(opts, Path(opts.out_dir) / "logs" / NAME) as st:
        st.gen.timeout_s = TIMEOUT_S
        subject = st.subjects[LLMSRV]
        runs: list[dict[str, Any]] = []
        maxima: list[float] = []
        with progress(opts, 2 * rounds, NAME) as bar:
            for _ in range(rounds):
                maxima.append(closed_point(st, LLMSRV, opts)["rps"])
                bar.update()
                rate = FACTOR * maxima[-1]
                got = st.gen.run(rate=rate, duration_s=duration, warmup_s=warmup, subject=subject)
                runs.append(got)
                bar.set_postfix_str(f"{rate:,.0f}/s: ok p99 {got['p99_ms']:,.0f} ms, {got['error_codes']}")
                bar.update()
    sent = [r["ok"] + r["error_total"] for r in runs]
    point: dict[str, Any] = {
        "max_rps": median(maxima), "rate": median([r["rate"] for r in runs]),
        "ok_rps": median([r["rps"] for r in runs]),
        "ok_share": median([r["ok"] / n if n else None for r, n in zip(runs, sent, strict=True)]),
        "overloaded_share": median([r["error_codes"].get("503", 0) / n if n else None
                                    for r, n in zip(runs, sent, strict=True)]),
        "timeouts": sum(r["errors"]["timeout"] for r in runs),
        "error_codes": {code: sum(r["error_codes"].get(code, 0) for r in runs)
                        for code in sorted({c for r in runs for c in r["error_codes"]})},
        **{f"ok_{k}": median([r[k] for r in runs]) for k in ("p50_ms", "p99_ms", "max_ms")},
    }
    merged = merge_histograms(r["latency_hist"] for r in runs)
    point["ok_merged"] = percentiles_ms(merged)
    point["meets"] = {"all_answered_within_10s": point["timeouts"] == 0,
                      "ok_p99_within_2s": point["ok_p99_ms"] is not None and point["ok_p99_ms"] <= OK_P99_TARGET_MS,
                      "excess_overloaded": point["overloaded_share"] is not None and point["overloaded_share"] > 0}
    for what, ok in point["meets"].items():
        if not ok:
            problems.append(f"target not met: {what.replace('_', ' ')}")
    for r in runs:
        r.pop("latency_hist", None)
        r.pop("service_hist", None)
    figures = {"settings": {"factor": FACTOR, "rounds": rounds, "duration_s": duration, "warmup_s": warmup,
                            "timeout_s": TIMEOUT_S, "nats_url": opts.nats_url},
               "point": point, "rounds": runs, "max_rps_rounds": maxima}
    md = md_table(["max req/s", "offered /s", "ok req/s", "ok share", "OVERLOADED share", "timeouts",
                   "ok p50 ms", "ok p99 ms", "ok max ms", "error codes"],
                  [[point["max_rps"], point["rate"], point["ok_rps"], fmt(point["ok_share"], ".1%"),
                    fmt(point["overloaded_share"], ".1%"), point["timeouts"], fmt(point["ok_p50_ms"], ".1f"),
                    fmt(point["ok_p99_ms"], ".1f"), fmt(point["ok_max_ms"], ".1f"), point["error_codes"] or "-"]])
    md += (f"\nOpen loop at {FACTOR:g}x the closed-loop maximum (c=100), {rounds} round(s) of {duration:g} s "
           f"after {warmup:g} s warm-up; medians; a request unanswered after {TIMEOUT_S:g} s is a timeout.\n")
    series = {"ok_latency_at_2x_max_spectrum": spectrum_ms(merged),
              **{f"llmsrv req/s, round {i + 1}": [(float(s), float(c)) for s, c in enumerate(r["per_second"])]
                 for i, r in enumerate(runs)}}
    return Result(NAME, figures, md, series, problems)
