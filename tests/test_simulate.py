"""``llmsrv breaker simulate`` (llmsrv/simulate.py): hand-computed breaker and rate-limit timelines on virtual time."""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import time
from typing import Literal

import pytest

from llmsrv import simulate as sim
from llmsrv.errors import RateLimited
from llmsrv.simulate import Request, SimulateError, Transition

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "breaker-trace.csv"


def _trace(*runs: tuple[str, range]) -> sim.Trace:
    """A trace from runs of one outcome at whole seconds, e.g. ("ok", range(0, 2)), ("error", range(2, 7))."""
    rows = "".join(f"{t},{outcome}\n" for outcome, times in runs for t in times)
    return sim.parse_trace("ts,outcome\n" + rows, "test.csv")


def _summary(trace: sim.Trace, setting: str) -> sim.Summary:
    return sim.simulate(trace, [sim.parse_setting(setting)]).runs[0].summary


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llmsrv breaker simulate")
    sim.add_arguments(parser)
    return sim.run(parser.parse_args(argv))


# --- the breaker, by hand -------------------------------------------------------------------------
# The breaker (llmsrv.resilience.Breaker) opens on the threshold-th consecutive failure, refuses while
# now < opened_at + ttl, and at now >= opened_at + ttl lets the next request through as a half-open
# probe: success closes it, failure opens it again from that moment.

BREAKER_CASES = [
    pytest.param(
        # ok at 0,1; error at 2..6; ok at 7..20 (the fixture file), threshold=3, ttl=10.
        # 2, 3, 4 fail (admitted) -> third consecutive failure at 4: opens at 4, open until 4+10 = 14.
        # 5..13 refused (9 requests; 5, 6 would have failed, 7..13 would have succeeded).
        # 14: 14 >= 14 -> half-open, probe admitted, ok -> closed at 14. 15..20 admitted.
        # admitted = 0..4 (5) + 14..20 (7) = 12: ok 0,1,14..20 = 9, failed 2,3,4 = 3.
        # time to open = 4 - 2 = 2; upstream recovered at 7 (first ok after the last error at 6):
        # time to recover = 14 - 7 = 7, refused after recovery = 7..13 = 7.
        _trace(("ok", range(0, 2)), ("error", range(2, 7)), ("ok", range(7, 21))), "threshold=3,ttl=10",
        dict(admitted=12, ok=9, failed=3, rejected_breaker=9, rejected_rate_limit=0, openings=1,
             time_to_open_s=2.0, time_to_recover_s=7.0, refused_after_recovery=7),
        [(0, "closed"), (4, "open"), (14, "half-open"), (14, "closed")],
        id="opens-then-probe-closes"),
    pytest.param(
        # Same trace, threshold=5: 2..6 fail -> opens at 6 until 16; 7..15 refused (9); 16 probe ok -> closed.
        # admitted = 0..6 (7) + 16..20 (5) = 12: ok 0,1,16..20 = 7, failed 5.
        # time to open = 6 - 2 = 4; time to recover = 16 - 7 = 9; refused after recovery = 7..15 = 9.
        _trace(("ok", range(0, 2)), ("error", range(2, 7)), ("ok", range(7, 21))), "threshold=5,ttl=10",
        dict(admitted=12, ok=7, failed=5, rejected_breaker=9, openings=1,
             time_to_open_s=4.0, time_to_recover_s=9.0, refused_after_recovery=9),
        [(0, "closed"), (6, "open"), (16, "half-open"), (16, "closed")],
        id="higher-threshold-opens-later"),
    pytest.param(
        # error at 0..12, ok at 13..25, threshold=3, ttl=10.
        # 0,1,2 fail -> opens at 2 until 12; 3..11 refused (9). 12: half-open probe, fails -> opens at 12
        # until 22; 13..21 refused (9). 22: probe ok -> closed; 23..25 admitted.
        # admitted 0,1,2,12,22,23,24,25 = 8 (failed 4, ok 4); rejected 18; opened twice.
        # time to open = 2 - 0 = 2; recovered at 13: time to recover = 22 - 13 = 9; refused after = 13..21 = 9.
        _trace(("error", range(0, 13)), ("ok", range(13, 26))), "threshold=3,ttl=10",
        dict(admitted=8, ok=4, failed=4, rejected_breaker=18, openings=2,
             time_to_open_s=2.0, time_to_recover_s=9.0, refused_after_recovery=9),
        [(0, "closed"), (2, "open"), (12, "half-open"), (12, "open"), (22, "half-open"), (22, "closed")],
        id="failed-probe-reopens"),
    pytest.param(
        # error at 0..3, ok at 4..12; threshold=2, ttl=5, each call takes 1.5 s (outcome recorded at ts+1.5).
        # 0 admitted (done 1.5), 1 admitted (done 2.5); 1.5: failure 1; 2 admitted (done 3.5);
        # 2.5: failure 2 -> opens at 2.5 until 7.5. 3..7 refused (3.5's failure was admitted before the
        # opening: ignored). 8: half-open probe (done 9.5); 9: probe slot busy -> refused; 9.5: ok -> closed.
        # 10, 11, 12 admitted. admitted 0,1,2,8,10,11,12 = 7 (failed 3, ok 4); refused 3..7, 9 = 6.
        # time to open = 2.5 - 0; recovered at 4: time to recover = 9.5 - 4 = 5.5; refused after = 4..7, 9 = 5.
        _trace(("error", range(0, 4)), ("ok", range(4, 13))), "threshold=2,ttl=5,latency=1.5",
        dict(admitted=7, ok=4, failed=3, rejected_breaker=6, openings=1,
             time_to_open_s=2.5, time_to_recover_s=5.5, refused_after_recovery=5),
        [(0, "closed"), (2.5, "open"), (8, "half-open"), (9.5, "closed")],
        id="slow-calls-one-probe"),
    pytest.param(
        # As above with probes=2: 9 is the second probe (admitted, done 10.5); 9.5 closes the breaker,
        # 10.5's outcome belongs to the half-open generation and is ignored.
        # admitted 8 (ok 5), refused 3..7 = 5, all of them from 4 on but 3: refused after recovery 4.
        _trace(("error", range(0, 4)), ("ok", range(4, 13))), "threshold=2,ttl=5,latency=1.5,probes=2",
        dict(admitted=8, ok=5, failed=3, rejected_breaker=5, openings=1,
             time_to_open_s=2.5, time_to_recover_s=5.5, refused_after_recovery=4),
        [(0, "closed"), (2.5, "open"), (8, "half-open"), (9.5, "closed")],
        id="slow-calls-two-probes"),
    pytest.param(
        # threshold=1, ttl=0: every failure opens it, the next request is a probe at once.
        # 0 fails -> open at 0; 1: 1 >= 0+0 -> probe, fails -> open at 1; 2 likewise; 3: probe ok -> closed.
        # Nothing refused; recovered at 3 and closed at 3: time to recover 0.
        _trace(("error", range(0, 3)), ("ok", range(3, 4))), "threshold=1,ttl=0",
        dict(admitted=4, ok=1, failed=3, rejected_breaker=0, openings=3,
             time_to_open_s=0.0, time_to_recover_s=0.0, refused_after_recovery=0),
        [(0, "closed"), (0, "open"), (1, "half-open"), (1, "open"), (2, "half-open"), (2, "open"),
         (3, "half-open"), (3, "closed")],
        id="zero-ttl-probes-every-request"),
    pytest.param(
        # err=50% at 1 req/s for 10 s: errors at 1,3,5,7,9 (never two in a row), then ok at 10..14.
        # threshold=2 never trips: no opening, closed when the upstream recovers at 10 -> time to recover 0.
        sim.parse_pattern("err=50%:10s,ok:5s", 1), "threshold=2,ttl=10",
        dict(admitted=15, ok=10, failed=5, rejected_breaker=0, openings=0,
             time_to_open_s=None, time_to_recover_s=0.0, refused_after_recovery=0),
        [(0, "closed")],
        id="spread-errors-never-trip"),
    pytest.param(
        # outage to the end: opens at 2 (threshold 3), probes at 12 and 22 fail; no recovery to measure.
        _trace(("error", range(0, 25))), "threshold=3,ttl=10",
        dict(admitted=5, failed=5, rejected_breaker=20, openings=3,
             time_to_open_s=2.0, time_to_recover_s=None, refused_after_recovery=0),
        [(0, "closed"), (2, "open"), (12, "half-open"), (12, "open"), (22, "half-open"), (22, "open")],
        id="still-failing-at-the-end"),
]


@pytest.mark.parametrize(("trace", "setting", "expected", "transitions"), BREAKER_CASES)
def test_breaker_timeline(trace: sim.Trace, setting: str, expected: dict[str, object],
                          transitions: list[tuple[float, str]]) -> None:
    summary = _summary(trace, setting)
    assert {key: getattr(summary, key) for key in expected} == expected
    assert summary.transitions == tuple(Transition(t, state) for t, state in transitions)
    assert summary.admitted + summary.rejected == len(trace.requests)


def test_a_still_open_breaker_has_not_recovered() -> None:
    # error at 0..2 opens it at 2 until 102 (ttl=100); the upstream recovers at 3 but the trace ends at 10.
    summary = _summary(_trace(("error", range(0, 3)), ("ok", range(3, 11))), "threshold=3,ttl=100")
    assert summary.time_to_recover_s is None
    assert summary.refused_after_recovery == 8  # 3..10


# --- rate limits on virtual time --------------------------------------------------------------------


def test_rate_limit_admits_exactly_what_the_sliding_window_allows() -> None:
    # rpm=5/minute, one ok request a second at 0.5, 1.5, ..., 179.5 (off the window boundaries).
    # limits' sliding window counter admits a hit when floor(prev * (60 - s) / 60 + cur) + 1 <= 5,
    # s = seconds into the current minute window (trace time 0 is a window boundary).
    # Minute 0: no previous window: 0.5 .. 4.5 pass (5), the other 55 are refused.
    # Minute 1: prev = 5, so with cur already admitted it needs 5 * (60 - s) / 60 < 5 - cur, i.e.
    # s > 12 * cur: 60.5 (cur 0), 72.5 (s > 12), 84.5 (s > 24), 96.5 (s > 36), 108.5 (s > 48); then s > 60: none.
    # Minute 2: prev = 5 again: 120.5, 132.5, 144.5, 156.5, 168.5.
    trace = sim.parse_trace("ts,outcome\n" + "".join(f"{i + 0.5},ok\n" for i in range(180)), "steady.csv")
    run = sim.simulate(trace, [sim.parse_setting("threshold=3,ttl=10,rpm=5/minute")]).runs[0]
    admitted = [r.ts for r, d in zip(trace.requests, run.decisions, strict=True) if d == sim.SENT_OK]
    assert admitted == [0.5, 1.5, 2.5, 3.5, 4.5, 60.5, 72.5, 84.5, 96.5, 108.5,
                        120.5, 132.5, 144.5, 156.5, 168.5]
    assert run.summary.rejected_rate_limit == 165
    assert run.summary.rejected_breaker == 0


def test_rate_limited_requests_never_reach_the_breaker() -> None:
    # rpm=2/minute, threshold=3: error at 0..9 (1 a second). Only 0 and 1 are admitted (both fail: count 2);
    # 2..9 are refused by the limiter, so the breaker never sees a third failure and never opens.
    summary = _summary(_trace(("error", range(0, 10))), "threshold=3,ttl=10,rpm=2/minute")
    assert (summary.admitted, summary.failed, summary.rejected_rate_limit, summary.openings) == (2, 2, 8, 0)


def test_a_probe_refused_by_the_rate_limit_frees_its_slot() -> None:
    # threshold=1, ttl=5, rpm=1/second, calls take 1 s. error at 0 (admitted, fails at 1 -> open until 6).
    # At 20 the breaker is half-open. probes=1: the first request at 20 is the probe (passes the
    # limiter, in flight until 21), the second is refused by the breaker (probe slot busy).
    trace = sim.parse_trace("ts,outcome\n0,error\n20,ok\n20,ok\n", "probe.csv")
    run = sim.simulate(trace, [sim.parse_setting("threshold=1,ttl=5,rpm=1/second,latency=1")]).runs[0]
    assert run.decisions == (sim.SENT_ERROR, sim.SENT_OK, sim.BY_BREAKER)
    # probes=2, three requests at 20: the first is probe 1 (spends second 20's one hit); the second takes
    # probe slot 2 and is refused by the limiter, which gives the slot back (recorded neutral, as the
    # guard does); so the third gets slot 2 again and is refused by the limiter, not by the breaker.
    trace = sim.parse_trace("ts,outcome\n0,error\n20,ok\n20,ok\n20,ok\n", "probe.csv")
    run = sim.simulate(trace, [sim.parse_setting("threshold=1,ttl=5,rpm=1/second,latency=1,probes=2")]).runs[0]
    assert run.decisions == (sim.SENT_ERROR, sim.SENT_OK, sim.BY_RATE_LIMIT, sim.BY_RATE_LIMIT)


def test_virtual_time_leaves_limits_alone() -> None:
    import limits.storage.memory
    import limits.strategies

    from llmsrv.resilience import RateLimiter
    from llmsrv.resilience.limiter import _QuietMemoryStorage

    _summary(_trace(("ok", range(0, 5))), "threshold=3,ttl=10,rpm=2/minute")
    assert vars(limits.storage.memory)["time"] is time and vars(limits.strategies)["time"] is time
    fresh = RateLimiter("other", "2/minute", None)
    assert type(fresh._storage) is _QuietMemoryStorage  # only the simulation's own objects were re-classed
    fresh.acquire(1)
    fresh.acquire(1)
    with pytest.raises(RateLimited):
        fresh.acquire(1)


# --- patterns ---------------------------------------------------------------------------------------


def test_the_contract_pattern() -> None:
    trace = sim.parse_pattern("err=5%:60s,outage:30s,ok:60s", 10)
    assert len(trace.requests) == 1500 and trace.duration_s == 150.0
    errors = [r.ts for r in trace.requests if r.outcome == "error"]
    # err=5%: the 20th, 40th, ... request of the phase (j = 19, 39, ...) at 1.9, 3.9, ..., 59.9; then 60.0..89.9.
    assert errors[:3] == [1.9, 3.9, 5.9] and len(errors) == 30 + 300
    assert errors[29:32] == [59.9, 60.0, 60.1] and errors[-1] == 89.9
    # the err=5% phase's last error (59.9) is followed by the outage's first (60.0): the run starts there
    assert (trace.outage_start_s, trace.recovered_at_s) == (59.9, 90.0)
    assert trace.source == "pattern err=5%:60s,outage:30s,ok:60s at 10 req/s"


@pytest.mark.parametrize(("spec", "rate", "expected"), [
    pytest.param("ok:1s", 2.5, [(0.0, "ok"), (0.4, "ok"), (0.8, "ok")], id="fractional-rate"),
    pytest.param("outage:1s,ok:1s", 3, [(0.0, "error"), (1 / 3, "error"), (2 / 3, "error"),
                                        (1.0, "ok"), (4 / 3, "ok"), (5 / 3, "ok")], id="exact-boundaries"),
    pytest.param("err=25%:2s", 4, [(i / 4, "error" if i in (3, 7) else "ok") for i in range(8)], id="spread"),
    pytest.param("err=100%:0.5s, err=0%:0.5s", 4, [(0.0, "error"), (0.25, "error"), (0.5, "ok"), (0.75, "ok")],
                 id="percent-bounds-and-spaces"),
    pytest.param("ok:0.05m", 20, [(i / 20, "ok") for i in range(60)], id="minutes"),
])
def test_pattern_phases(spec: str, rate: float, expected: list[tuple[float, Literal["ok", "error"]]]) -> None:
    assert sim.parse_pattern(spec, rate).requests == tuple(Request(ts, outcome) for ts, outcome in expected)


@pytest.mark.parametrize(("spec", "message"), [
    pytest.param("", "pattern is empty: give phases like ok:60s,outage:30s,err=5%:60s", id="empty"),
    pytest.param("ok60s", "pattern phase 1 'ok60s': expected KIND:DURATION, e.g. ok:60s, outage:30s or "
                          "err=5%:60s", id="no-colon"),
    pytest.param("ok:10s,fail:30s", "pattern phase 2 'fail:30s': unknown phase 'fail'; use ok, outage or err=P%",
                 id="unknown-kind"),
    pytest.param("err=5:60s", "pattern phase 1 'err=5:60s': error rate '5' is not a percentage from 0% to 100%, "
                              "e.g. err=5%", id="no-percent-sign"),
    pytest.param("err=150%:60s", "error rate '150%' is not a percentage", id="over-100"),
    pytest.param("err=x%:60s", "error rate 'x%' is not a percentage", id="not-a-number"),
    pytest.param("ok:60", "pattern phase 1 'ok:60': duration '60' is not a positive number of seconds or minutes, "
                          "e.g. 30s or 1.5m", id="no-unit"),
    pytest.param("ok:0s", "duration '0s' is not a positive number", id="zero"),
    pytest.param("ok:-5s", "duration '-5s' is not a positive number", id="negative"),
    pytest.param("ok:1h", "duration '1h' is not a positive number", id="unknown-unit"),
    pytest.param("ok:10s,,ok:5s", "pattern phase 2 '': expected KIND:DURATION", id="empty-phase"),
])
def test_bad_patterns(spec: str, message: str) -> None:
    with pytest.raises(SimulateError) as caught:
        sim.parse_pattern(spec, 10)
    assert message in str(caught.value)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_rates(rate: float) -> None:
    with pytest.raises(SimulateError, match="--rate must be a positive number"):
        sim.parse_pattern("ok:10s", rate)


def test_a_pattern_and_the_same_trace_give_the_same_report() -> None:
    pattern = sim.parse_pattern("err=10%:20s,outage:15s,ok:30s", 4)
    rows = "".join(f"{r.ts!r},{r.outcome}\n" for r in pattern.requests)
    trace = sim.parse_trace("ts,outcome\n" + rows, "same.csv")
    settings = [sim.parse_setting(s) for s in ("threshold=3,ttl=5", "threshold=5,ttl=10,rpm=120/minute")]
    from_pattern = [run.summary for run in sim.simulate(pattern, settings).runs]
    from_trace = [run.summary for run in sim.simulate(trace, settings).runs]
    assert from_pattern == from_trace
    assert from_pattern[0].openings >= 1  # the outage trips it: the comparison compares something


# --- traces ---------------------------------------------------------------------------------------


def test_csv_trace() -> None:
    text = "outcome, ts ,note\nok,0,first\n\nerror,1.5,\"a, b\"\nerror,1.5,same instant\nok,2e1,\n"
    trace = sim.parse_trace(text, "t.csv")
    assert trace.requests == (Request(0.0, "ok"), Request(1.5, "error"), Request(1.5, "error"), Request(20.0, "ok"))
    assert (trace.source, trace.duration_s, trace.outage_start_s, trace.recovered_at_s) == ("trace t.csv", 20.0,
                                                                                             1.5, 20.0)


def test_jsonl_trace() -> None:
    text = '{"ts": 0, "outcome": "ok"}\n\n{"ts": 0.25, "outcome": "error", "status": 503}\n{"outcome":"ok","ts":3}\n'
    trace = sim.parse_trace(text, "t.jsonl")
    assert trace.requests == (Request(0.0, "ok"), Request(0.25, "error"), Request(3.0, "ok"))


def test_the_fixture_trace() -> None:
    trace = sim.parse_trace(FIXTURE.read_text(), "breaker-trace.csv")
    assert len(trace.requests) == 21
    assert (trace.outage_start_s, trace.recovered_at_s) == (2.0, 7.0)


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("0,ok\n1,error\n", "t line 1: no header; the first line must name the columns: ts,outcome",
                 id="csv-no-header"),
    pytest.param("time,result\n0,ok\n", "t line 1: the header must name the columns ts and outcome, got "
                                         "'time,result'", id="csv-wrong-header"),
    pytest.param("ts,outcome\n0,ok\n1,fail\n", "t line 3, field outcome: expected 'ok' or 'error', got 'fail'",
                 id="csv-bad-outcome"),
    pytest.param("ts,outcome\n0,OK\n", "t line 2, field outcome: expected 'ok' or 'error', got 'OK'",
                 id="csv-outcome-is-case-sensitive"),
    pytest.param("ts,outcome\n0,ok\n\n1x,ok\n", "t line 4, field ts: expected seconds from 0 (a number >= 0), "
                                                "got '1x'", id="csv-bad-number"),
    pytest.param("ts,outcome\n-1,ok\n", "t line 2, field ts: expected seconds from 0", id="csv-negative"),
    pytest.param("ts,outcome\nnan,ok\n", "t line 2, field ts: expected seconds from 0", id="csv-nan"),
    pytest.param("ts,outcome\n0,ok\n5,ok\n4,error\n", "t line 4, field ts: 4 is before the previous request's 5; "
                                                      "the trace must be in time order", id="csv-not-in-order"),
    pytest.param("ts,outcome\n0,ok,extra\n", "t line 2: expected 2 fields (ts,outcome), got 3",
                 id="csv-field-count"),
    pytest.param("ts,outcome\n", "t: the trace has no requests", id="csv-header-only"),
    pytest.param("", "t: the trace has no requests", id="empty"),
    pytest.param('{"ts": 0, "outcome": "ok"}\n{"ts": 1, "outcome": "ok"\n', "t line 2: not a JSON object",
                 id="jsonl-bad-json"),
    pytest.param('{"ts": 0, "outcome": "ok"}\n[1, "ok"]\n', "t line 2: expected a JSON object with keys ts "
                                                            "and outcome", id="jsonl-not-an-object"),
    pytest.param('{"ts": 0}\n', "t line 1: missing field 'outcome'", id="jsonl-missing-field"),
    pytest.param('{"ts": true, "outcome": "ok"}\n', "t line 1, field ts: expected seconds from 0 (a number >= 0), "
                                                    "got True", id="jsonl-bool-ts"),
    pytest.param('{"ts": 1, "outcome": "ok"}\n{"ts": 0.5, "outcome": "ok"}\n', "t line 2, field ts: 0.5 is "
                 "before the previous request's 1", id="jsonl-not-in-order"),
    pytest.param('{"ts": 1, "outcome": 0}\n', "t line 1, field outcome: expected 'ok' or 'error', got 0",
                 id="jsonl-bad-outcome"),
])
def test_bad_traces(text: str, message: str) -> None:
    with pytest.raises(SimulateError) as caught:
        sim.parse_trace(text, "t")
    assert message in str(caught.value)


# --- settings -------------------------------------------------------------------------------------


def test_settings() -> None:
    assert sim.parse_setting("threshold=5,ttl=30") == sim.Setting("threshold=5,ttl=30", 5, 30.0)
    assert sim.parse_setting(" threshold=2, ttl=7.5s, probes=3, rpm=600/minute, latency=0.2 ") == sim.Setting(
        "threshold=2, ttl=7.5s, probes=3, rpm=600/minute, latency=0.2", 2, 7.5, 3, "600/minute", 0.2)


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("threshold=5", "--setting 'threshold=5': missing ttl= (every setting needs threshold=N,"
                                "ttl=SECONDS)", id="missing-ttl"),
    pytest.param("threshold=5,ttl=30,burst=2", "unknown key 'burst'; known: threshold, ttl, probes, rpm, latency",
                 id="unknown-key"),
    pytest.param("threshold=5,ttl=30,ttl=10", "ttl given twice", id="duplicate"),
    pytest.param("threshold=0,ttl=30", "threshold must be a whole number >= 1, got '0'", id="zero-threshold"),
    pytest.param("threshold=2.5,ttl=30", "threshold must be a whole number >= 1, got '2.5'", id="fractional"),
    pytest.param("threshold=5,ttl=-1", "ttl must be seconds >= 0, got '-1'", id="negative-ttl"),
    pytest.param("threshold=5,ttl=30,probes=0", "probes must be a whole number >= 1", id="zero-probes"),
    pytest.param("threshold=5,ttl=30,rpm=lots", "rpm 'lots' is not a rate limit like 600/minute", id="bad-rpm"),
    pytest.param("threshold=5,ttl", "expected KEY=VALUE pairs separated by commas, got 'ttl'", id="no-value"),
])
def test_bad_settings(text: str, message: str) -> None:
    with pytest.raises(SimulateError) as caught:
        sim.parse_setting(text)
    assert message in str(caught.value)


# --- the command ----------------------------------------------------------------------------------


def test_two_settings_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    # The columns are the first two breaker cases above (same fixture trace).
    assert _cli("--trace", str(FIXTURE), "--setting", "threshold=3,ttl=10", "--setting", "threshold=5,ttl=10") == 0
    out = capsys.readouterr().out
    assert out == (
        f"trace {FIXTURE}: 21 requests over 20 s\n"
        "upstream: outage from 2 s, recovered at 7 s\n"
        "\n"
        "                        threshold=3,ttl=10  threshold=5,ttl=10\n"
        "admitted                                12                  12\n"
        "  ok                                     9                   7\n"
        "  failed                                 3                   5\n"
        "rejected by breaker                      9                   9\n"
        "rejected by rate limit                   0                   0\n"
        "times opened                             1                   1\n"
        "time to open                           2 s                 4 s\n"
        "time to recover                        7 s                 9 s\n"
        "refused after recovery                   7                   9\n")


def test_never_and_not_by_end(capsys: pytest.CaptureFixture[str]) -> None:
    # outage:3s,ok:5s at 1 req/s: threshold=5 never opens; threshold=1,ttl=100 opens at 0 and stays open.
    assert _cli("--pattern", "outage:3s,ok:5s", "--rate", "1", "--setting", "threshold=5,ttl=1",
                "--setting", "threshold=1,ttl=100") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pattern outage:3s,ok:5s at 1 req/s: 8 requests over 8 s"
    assert lines[1] == "upstream: outage from 0 s, recovered at 3 s"
    rows = {line[:22].strip(): line[22:].split() for line in lines[3:]}
    assert rows["time to open"] == ["never", "0", "s"]
    assert rows["time to recover"] == ["0", "s", "not", "by", "end"]
    assert rows["refused after recovery"] == ["0", "5"]


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--trace", str(FIXTURE), "--setting", "threshold=3,ttl=10", "--setting",
                "threshold=3,ttl=10,rpm=10/minute", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert {k: doc[k] for k in ("requests", "duration_s", "outage_start_s", "recovered_at_s")} == {
        "requests": 21, "duration_s": 20.0, "outage_start_s": 2.0, "recovered_at_s": 7.0}
    first, second = doc["settings"]
    assert first["setting"] == {"label": "threshold=3,ttl=10", "threshold": 3, "ttl_s": 10.0, "probes": 1,
                                "rpm": None, "latency_s": 0.0}
    assert (first["admitted"], first["rejected_breaker"], first["time_to_open_s"], first["time_to_recover_s"],
            first["refused_after_recovery"]) == (12, 9, 2.0, 7.0, 7)
    assert first["transitions"] == [{"t": 0.0, "state": "closed"}, {"t": 4.0, "state": "open"},
                                    {"t": 14.0, "state": "half-open"}, {"t": 14.0, "state": "closed"}]
    # 10/minute: 0..4 admitted (as before), then 5..13 refused by the open breaker (charging nothing),
    # 14..18 admitted (10 hits in minute 0), 19 and 20 refused by the rate limit.
    assert (second["admitted"], second["rejected_breaker"], second["rejected_rate_limit"]) == (10, 9, 2)


def test_plot_writes_a_png(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "breaker.png"
    assert _cli("--pattern", "err=5%:60s,outage:30s,ok:60s", "--setting", "threshold=5,ttl=30",
                "--setting", "threshold=3,ttl=10,rpm=300/minute", "--plot", str(out)) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.endswith(f"\nplot: {out}\n")


def test_plot_without_matplotlib(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "breaker.png"
    assert _cli("--trace", str(FIXTURE), "--setting", "threshold=3,ttl=10", "--plot", str(out)) == 2
    captured = capsys.readouterr()
    assert captured.err == "llmsrv breaker simulate: --plot needs matplotlib: pip install 'llmsrv[plot]'\n"
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--trace", "/nonexistent/trace.csv", "--setting", "threshold=3,ttl=10"],
                 "cannot read the trace /nonexistent/trace.csv: No such file or directory", id="missing-file"),
    pytest.param(["--pattern", "ok:10", "--setting", "threshold=3,ttl=10"], "duration '10' is not a positive",
                 id="bad-pattern"),
    pytest.param(["--trace", str(FIXTURE), "--rate", "5", "--setting", "threshold=3,ttl=10"],
                 "--rate applies to --pattern only", id="rate-with-trace"),
    pytest.param(["--pattern", "ok:10s", "--setting", "threshold=3"], "missing ttl=", id="bad-setting"),
    pytest.param(["--pattern", "ok:10s", "--rate", "0", "--setting", "threshold=3,ttl=1"],
                 "--rate must be a positive number", id="zero-rate"),
])
def test_bad_input_exits_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("llmsrv breaker simulate: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_bad_trace_file_exits_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("ts,outcome\n0,ok\n1,boom\n")
    assert _cli("--trace", str(path), "--setting", "threshold=3,ttl=10") == 2
    assert capsys.readouterr().err == (f"llmsrv breaker simulate: {path} line 3, field outcome: "
                                       "expected 'ok' or 'error', got 'boom'\n")
    path.write_bytes(b"ts,outcome\n0,\xff\n")
    assert _cli("--trace", str(path), "--setting", "threshold=3,ttl=10") == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_trace_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(FIXTURE.read_text()))
    assert _cli("--trace", "-", "--setting", "threshold=3,ttl=10", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "trace stdin" and doc["settings"][0]["admitted"] == 12


@pytest.mark.parametrize("argv", [
    pytest.param(["--setting", "threshold=3,ttl=10"], id="no-source"),
    pytest.param(["--trace", "x.csv", "--pattern", "ok:1s", "--setting", "threshold=3,ttl=10"], id="both-sources"),
    pytest.param(["--pattern", "ok:1s"], id="no-setting"),
])
def test_argument_errors_are_argparse_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        _cli(*argv)
    assert caught.value.code == 2
    assert "usage: llmsrv breaker simulate" in capsys.readouterr().err
