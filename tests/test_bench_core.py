"""The bench's core: the load generator's arithmetic on synthetic timings, the baseline's reply, the
entry point, and the ``overhead`` and ``latency`` scenarios in smoke mode (well-formed results only:
no assertion on how fast anything is, except one CPU-per-request comparison with a wide margin)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bench import loadgen, report
from bench.__main__ import main
from bench.loadgen import Recorder, due_count, intended_time, latency_us, request_count
from bench.responder import reply_body
from bench.scenario import Options, Result
from bench.scenarios import SCENARIOS, latency, overhead
from llmsrv.natsserver import free_port

# ---------------------------------------------------------------------------------------------- pure arithmetic


def test_open_loop_schedule() -> None:
    assert intended_time(10.0, 1000.0, 0) == 10.0
    assert intended_time(10.0, 1000.0, 250) == pytest.approx(10.25)
    assert due_count(10.0, 1000.0, 9.999, 5000) == 0
    assert due_count(10.0, 1000.0, 10.0, 5000) == 1  # request 0 is due at the start
    assert due_count(10.0, 1000.0, 10.0009, 5000) == 1
    assert due_count(10.0, 1000.0, 10.001, 5000) == 2
    assert due_count(10.0, 1000.0, 11.0, 5000) == 1001
    assert due_count(10.0, 1000.0, 99.0, 5000) == 5000  # never more than the run sends
    assert request_count(1000.0, 1.5) == 1500
    assert request_count(3.0, 1.0) == 3
    assert request_count(2.5, 1.0) == 3  # due at 0, 0.4, 0.8


def test_latency_runs_from_the_intended_time() -> None:
    assert latency_us(1.0, 1.0025) == 2500
    assert latency_us(1.0, 1.0) == 1  # the histogram's floor
    assert latency_us(0.0, 1e9) == loadgen.HIST_MAX_US


def synthetic_open_loop(stall_s: float) -> Recorder:
    """1000 req/s for 2 s after 1 s of warm-up; the target answers in 1 ms, except that it is stalled
    (answers nothing) during the first ``stall_s`` of the window and then answers the backlog at once."""
    rate, start = 1000.0, 100.0
    rec = Recorder(start + 1.0, start + 3.0)
    stall_end = rec.t_measure + stall_s
    for i in range(request_count(rate, 3.0)):
        due = intended_time(start, rate, i)
        sent = due  # a generator that keeps its schedule
        received = max(sent + 0.001, stall_end) if rec.t_measure <= sent < stall_end else sent + 0.001
        rec.success(due, sent, received)
    return rec


def test_recorder_window_rates_and_percentiles() -> None:
    rec = synthetic_open_loop(stall_s=0.0)
    got = rec.result(mode="open", concurrency=0, rate=1000.0, sent=3000, late_sends=0, cpu_s=0.5, wall_s=3.0)
    assert got["answered"] == 3000  # warm-up included
    assert got["ok"] == 2000  # intended inside the 2 s window
    assert got["rps"] == pytest.approx(1000.0, rel=0.01)
    assert got["p50_ms"] == pytest.approx(1.0, rel=0.01) and got["max_ms"] == pytest.approx(1.0, rel=0.01)
    assert got["per_second"] == [pytest.approx(1000, abs=1), pytest.approx(1000, abs=1)]
    assert got["error_total"] == 0
    json.dumps(got)


def test_a_stall_counts_for_every_request_due_during_it() -> None:
    """A 200 ms stall: 200 of 2000 requests wait, on average 100 ms, up to 200 ms: p90 stays at 1 ms,
    p99 is ~180 ms, max ~200 ms; a closed loop would have recorded a single slow request."""
    got = synthetic_open_loop(stall_s=0.2).result(mode="open", concurrency=0, rate=1000.0, sent=3000,
                                                  late_sends=0, cpu_s=0.5, wall_s=3.0)
    assert got["p90_ms"] == pytest.approx(1.0, rel=0.01)
    assert got["p99_ms"] == pytest.approx(180.0, rel=0.02)
    assert got["max_ms"] == pytest.approx(200.0, rel=0.01)
    assert got["p50_ms"] == pytest.approx(1.0, rel=0.01)


def test_late_sends_show_in_latency_not_in_service_time() -> None:
    rec = Recorder(0.0, 1.0)
    for i in range(100):  # the generator sends each request 50 ms late; the target answers in 1 ms
        due = i / 100
        rec.success(due, due + 0.05, due + 0.051)
    got = rec.result(mode="open", concurrency=0, rate=100.0, sent=100, late_sends=100, cpu_s=0.1, wall_s=1.0)
    assert got["p50_ms"] == pytest.approx(51.0, rel=0.01)
    assert got["service"]["p50_ms"] == pytest.approx(1.0, rel=0.01)


def test_failures_are_counted_apart() -> None:
    rec = Recorder(1.0, 2.0)
    rec.failure("timeout", 0.5)  # warm-up: not counted
    rec.failure("timeout", 1.5)
    rec.failure("error_reply", 1.6, "503")
    rec.failure("no_responders", 2.5)  # after the window
    got = rec.result(mode="closed", concurrency=1, rate=0.0, sent=4, late_sends=0, cpu_s=0.0, wall_s=1.0)
    assert got["errors"] == {"error_reply": 1, "no_responders": 0, "timeout": 1}
    assert got["error_codes"] == {"503": 1}
    assert got["answered"] == 4 and got["ok"] == 0 and got["latency_hist"] == ""
    assert got["p99_ms"] == 0.0 and got["max_ms"] == 0.0


def test_percentiles_of_a_known_distribution_and_merged_histograms() -> None:
    halves = [loadgen.new_histogram(), loadgen.new_histogram()]
    for ms in range(1, 1001):
        halves[ms % 2].record_value(ms * 1000)
    merged = loadgen.merge_histograms(loadgen.encode_histogram(h) for h in halves)
    assert merged.get_total_count() == 1000
    p = loadgen.percentiles_ms(merged)
    for key, want in (("p50_ms", 500), ("p90_ms", 900), ("p99_ms", 990), ("p99.9_ms", 999), ("max_ms", 1000)):
        assert p[key] == pytest.approx(want, rel=0.002), key  # 3 significant digits
    spectrum = loadgen.spectrum_ms(merged)
    assert [x for x, _ in spectrum] == list(loadgen.SPECTRUM)
    assert all(a[1] <= b[1] for a, b in zip(spectrum, spectrum[1:], strict=False))


def synthetic_part(latencies_ms: list[float], per_second: list[int], cpu_s: float) -> dict[str, Any]:
    rec = Recorder(0.0, 10.0)
    for i, ms in enumerate(latencies_ms):
        rec.success(i * 0.01, i * 0.01, i * 0.01 + ms / 1000)
    rec.failure("timeout", 1.0)
    rec.failure("error_reply", 2.0, "503")
    got = rec.result(mode="closed", concurrency=50, rate=0.0, sent=len(latencies_ms) + 2, late_sends=0,
                     cpu_s=cpu_s, wall_s=2.0)
    got["per_second"] = per_second
    return got


def test_results_of_generator_processes_merge_into_one() -> None:
    a = synthetic_part([1.0] * 90, [30, 30, 30], cpu_s=0.5)
    b = synthetic_part([100.0] * 10, [5, 5], cpu_s=1.0)
    got = loadgen.merge_results([a, b])
    assert got["concurrency"] == 100 and got["ok"] == 100 and got["sent"] == 104
    assert got["errors"] == {"error_reply": 2, "no_responders": 0, "timeout": 2} and got["error_total"] == 4
    assert got["error_codes"] == {"503": 2}
    assert got["per_second"] == [35, 35, 30]
    assert got["p50_ms"] == pytest.approx(1.0, rel=0.01)  # percentiles of every request, not of the parts
    assert got["p99_ms"] == pytest.approx(100.0, rel=0.01) and got["max_ms"] == pytest.approx(100.0, rel=0.01)
    assert loadgen.decode_histogram(got["latency_hist"]).get_total_count() == 100
    assert got["generator_processes"] == 2 and got["generator_cpu_s"] == 1.5
    assert got["generator_cpu_util_max"] == 0.5  # the busiest process: 1.0 s of CPU in 2.0 s
    assert loadgen.merge_results([a]) is a


@pytest.mark.parametrize(("total", "n", "want"), [
    (100, 2, [50, 50]), (101, 2, [51, 50]), (1, 1, [1]), (0, 2, [0, 0]), (2000.0, 2, [1000.0, 1000.0]),
    (0.0, 3, [0.0, 0.0, 0.0]),
], ids=["even", "odd", "one", "zero", "rate", "no-rate"])
def test_load_is_split_among_generators(total: float, n: int, want: list[float]) -> None:
    got = loadgen.split(total, n)
    assert got == want and sum(got) == total and all(type(g) is type(total) for g in got)


def test_the_generator_saturates_the_responder_before_itself(tmp_path: Path) -> None:
    """Each process saturates at one core; a closed loop measures the responder only if no generator process
    is busier than it. A ratio of CPU costs (not a speed), so it holds on a loaded machine too."""
    from bench import processes

    with processes.NatsServer() as nats, processes.responder(nats.url, "bench", tmp_path) as resp:
        resp.wait_ready(nats.url, "bench.request")
        with loadgen.LoadGen(nats.url, "bench.request", 5.0) as gen:
            assert len(gen.pids) == loadgen.GENERATORS >= 2
            before = resp.cpu_seconds()
            got = gen.run(concurrency=100, duration_s=2.0, warmup_s=0.3)
            after = resp.cpu_seconds()
    assert before is not None and after is not None and got["error_total"] == 0 and got["ok"] > 1000
    responder_util = (after - before) / got["generator_wall_s"]
    assert got["generator_processes"] == loadgen.GENERATORS
    assert got["generator_cpu_util_max"] < responder_util, (got["generator_cpu_util_max"], responder_util)


# ---------------------------------------------------------------------------------------------- the baseline


def test_the_baseline_reply_is_llmsrvs_echo_padded_to_size() -> None:
    plain = reply_body()
    reply = msgspec.json.decode(plain)
    assert reply["text"] == loadgen.CONTENT and reply["finish_reason"] == "stop"
    padded = reply_body(len(plain) + 7)
    assert len(padded) == len(plain) + 7 and msgspec.json.decode(padded) == reply
    with pytest.raises(ValueError):
        reply_body(len(plain) - 1)


# ---------------------------------------------------------------------------------------------- entry point


def test_list_names_every_registered_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"overhead", "latency"} <= set(SCENARIOS)
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, mod in SCENARIOS.items():
        assert name in out and mod.SUMMARY in out
        assert mod.NAME == name and callable(mod.run)
    assert main(["no-such-scenario"]) == 2


def test_exit_1_when_it_cannot_run(tmp_path: Path) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["overhead", "--smoke", "--nats-url", dead, "--out", str(tmp_path), "--no-progress"]) == 1
    assert not list(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------------------------- smoke runs


def is_markdown_table(md: str) -> bool:
    lines = md.splitlines()
    return any(a.startswith("|") and b.startswith("|---") for a, b in zip(lines, lines[1:], strict=False))


def sane(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_written(result: Result, tmp_path: Path) -> dict[str, Any]:
    import datetime as dt

    json_path, md_path = report.write(result, Options(smoke=True, out_dir=tmp_path), dt.datetime.now(dt.UTC))
    data: dict[str, Any] = json.loads(json_path.read_text())
    assert data["scenario"] == result.scenario and data["git"]["commit"]
    assert is_markdown_table(md_path.read_text())
    return data


def test_overhead_smoke(tmp_path: Path) -> None:
    result = overhead.run(Options(smoke=True, out_dir=tmp_path, progress=False))
    assert result.scenario == "overhead" and result.problems == [p for p in result.problems if "generator" in p]
    json.dumps(result.figures)
    assert is_markdown_table(result.summary_md)
    targets = result.figures["targets"]
    assert set(targets) == {"llmsrv", "responder", *overhead.FLOORS}  # the responder on llmsrv's stack too
    for name, t in targets.items():
        for key in ("rps", "p50_ms", "p99_ms", "target_cpu_us_per_req", "generator_cpu_us_per_req",
                    "target_cpu_util", "generator_cpu_util", "nats_cpu_us_per_req"):
            assert sane(t[key]), (name, key, t[key])
        assert t["errors"] == 0 and t["rounds"] == 1 and isinstance(t["generator_bound"], bool)
        assert t["rps_min"] <= t["rps"] <= t["rps_max"]
    assert len({t["reply_bytes"] for t in targets.values()}) == 1 and targets["llmsrv"]["reply_bytes"] > 1000
    for ratios in (result.figures["ratios"], *result.figures["floor_ratios"].values()):
        for key in ("rps", "p99", "cpu_us_per_req"):
            assert sane(ratios[key])
    # the generator is not what limits llmsrv: it spends far less CPU per request than llmsrv does
    # (about 25 vs 100 us here; a ratio of CPU costs, not a speed, so it holds on a loaded machine)
    llm = targets["llmsrv"]
    assert llm["generator_cpu_us_per_req"] < llm["target_cpu_us_per_req"]
    assert result.series and all(pts for pts in result.series.values())
    check_written(result, tmp_path)


def test_latency_smoke(tmp_path: Path) -> None:
    result = latency.run(Options(smoke=True, out_dir=tmp_path, progress=False))
    assert result.scenario == "latency"
    json.dumps(result.figures)
    assert is_markdown_table(result.summary_md)
    max_rps = result.figures["max_rps"]
    assert set(max_rps) == {"llmsrv", "responder"} and all(sane(v) for v in max_rps.values())
    points = result.figures["points"]
    assert {p["target"] for p in points} == {"llmsrv", "responder"}
    # the responder is also measured at llmsrv's rate: the same-rate comparison
    assert {p["target"] for p in points if p["base"] == "llmsrv"} == {"llmsrv", "responder"}
    for p in points:
        assert sane(p["rate"]) and p["rate"] <= max_rps[p["target"]]
        values = [p[k] for k in latency.KEYS]
        assert all(sane(v) for v in values) and values == sorted(values), p
        assert sane(p["cpu_us_per_req"]), p  # the target's CPU from /proc, per request
    same_rate = result.figures["same_rate"]  # llmsrv / responder where both ran at one rate
    assert [r["of"] for r in same_rate] == ["50% llmsrv max"] and sane(same_rate[0]["cpu"]), same_rate
    assert result.series and all(len(v) == len(loadgen.SPECTRUM) for v in result.series.values())
    check_written(result, tmp_path)


def test_overhead_against_a_running_deployment(tmp_path: Path) -> None:
    from bench import processes

    with processes.NatsServer() as nats, processes.llmsrv(nats.url, "llm", tmp_path / "deployment") as llm:
        llm.wait_ready(nats.url, "llm.request")
        result = overhead.run(Options(smoke=True, out_dir=tmp_path, progress=False, nats_url=nats.url))
    json.dumps(result.figures)
    assert set(result.figures["targets"]) == {"llmsrv"} and sane(result.figures["targets"]["llmsrv"]["rps"])
    assert result.figures["targets"]["llmsrv"]["target_cpu_us_per_req"] is None  # not our process
    assert any("--nats-url" in p and "only llmsrv" in p for p in result.problems)
    assert is_markdown_table(result.summary_md)


def test_overload_smoke(tmp_path: Path) -> None:
    from bench.scenarios import overload

    result = overload.run(Options(smoke=True, out_dir=tmp_path, progress=False))
    assert result.scenario == "overload"
    json.dumps(result.figures)
    assert is_markdown_table(result.summary_md)
    point = result.figures["point"]
    assert sane(point["max_rps"]) and point["rate"] == pytest.approx(overload.FACTOR * point["max_rps"], rel=0.01)
    shares = [point[k] for k in ("ok_share", "overloaded_share")]
    assert all(0 <= s <= 1 for s in shares) and sum(shares) <= 1.0 + 1e-9
    assert set(point["meets"]) == {"all_answered_within_10s", "ok_p99_within_2s", "excess_overloaded"}
    # what was not met is said, not hidden (a smoke run is too short to assert the targets themselves)
    assert {p for p in result.problems if p.startswith("target not met")} == {
        f"target not met: {k.replace('_', ' ')}" for k, ok in point["meets"].items() if not ok}
    check_written(result, tmp_path)


def test_overhead_compares_with_a_base_tree(tmp_path: Path) -> None:
    """``--base-tree``: llmsrv from another checkout (here this one) as a third target in the same rounds."""
    root = Path(__file__).resolve().parent.parent
    result = overhead.run(Options(smoke=True, out_dir=tmp_path, progress=False, base_tree=root))
    targets = result.figures["targets"]
    assert set(targets) == {"llmsrv", "responder", *overhead.FLOORS, "llmsrv@base"}
    assert targets["llmsrv@base"]["errors"] == 0
    assert all(sane(result.figures["vs_base"][k]) for k in ("rps", "p99", "cpu_us_per_req"))
    assert "llmsrv / llmsrv@base" in result.summary_md
