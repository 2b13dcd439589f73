"""Bench scenarios in smoke mode (cancel, stream, provider, decode, observability): well-formed results.

Each runs for real (nats-server, llmsrv, fake upstreams on loopback) but for seconds; the test checks
the shape of what comes back (JSON-able figures, every expected key with a sane value, a Markdown
table, no problems, no process left behind), never the performance numbers themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.scenario import Options, Result
from bench.scenarios import cancel, decode, observability, peers, provider, stream

from .bench_checks import no_leftover_processes  # noqa: F401 (autouse fixture)

SMOKE = Options(smoke=True, progress=False)


def check_result(result: Result, name: str) -> None:
    assert result.scenario == name
    assert result.problems == []
    json.dumps(result.figures, allow_nan=False)
    json.dumps(result.series, allow_nan=False)
    lines = [line for line in result.summary_md.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, result.summary_md
    assert set(lines[1].replace("|", "").replace(" ", "")) <= set("-:"), lines[1]
    columns = lines[0].count("|")
    assert all(line.count("|") == columns for line in lines), result.summary_md
    for points in result.series.values():
        assert all(len(p) == 2 and all(math.isfinite(v) for v in p) for p in points)


def check_spread(figure: dict[str, Any], low: float = 0.0, signed: bool = False) -> None:
    """A median-and-spread figure: median within min..max, all finite, positive unless ``signed``."""
    assert set(figure) == {"median", "min", "max", "rounds"}
    assert figure["rounds"], figure
    assert figure["min"] <= figure["median"] <= figure["max"]
    if not signed:
        assert figure["min"] > low, figure


def test_cancel_smoke() -> None:
    result = cancel.run(SMOKE)
    check_result(result, "cancel")
    for way in ("cancel", "deadline"):
        f = result.figures[way]
        assert f["n"] == result.figures["settings"]["per_round"] * result.figures["settings"]["rounds"]
        for key in ("p50_ms", "p99_ms", "max_ms"):
            check_spread(f[key])
        assert f["p50_ms"]["median"] <= f["p99_ms"]["median"] <= f["max_ms"]["median"]
        assert f["p99_ms"]["median"] < cancel.FAILSAFE_S * 1000


def test_stream_smoke() -> None:
    result = stream.run(SMOKE)
    check_result(result, "stream")
    concurrency = result.figures["settings"]["concurrency"]
    assert concurrency == [1, 5]
    for c in concurrency:
        point = result.figures[f"c{c}"]
        for key in ("llmsrv_ttfc_p50_ms", "llmsrv_ttfc_p99_ms", "direct_ttfc_p50_ms", "direct_ttfc_p99_ms",
                    "llmsrv_chunks_per_s", "direct_chunks_per_s", "chunks_per_s_ratio", "nats_msgs_per_stream"):
            check_spread(point[key])
        for key in ("ttfc_overhead_p50_ms", "ttfc_overhead_p99_ms"):
            check_spread(point[key], signed=True)
        # every upstream chunk arrived, in at most as many NATS messages
        assert point["nats_msgs_per_stream"]["max"] <= result.figures["settings"]["chunks_per_stream"]
    assert [x for x, _ in result.series["llmsrv_chunks_per_s"]] == [1.0, 5.0]


def test_provider_smoke() -> None:
    result = provider.run(SMOKE)
    check_result(result, "provider")
    concurrency = result.figures["settings"]["concurrency"]
    assert concurrency == [5, 20]
    for c in concurrency:
        point = result.figures[f"c{c}"]
        assert point["ok"] > 0 and point["errors"] == 0
        for key in ("direct_p50_ms", "direct_p99_ms", "llmsrv_p50_ms", "llmsrv_p99_ms", "p50_ratio", "direct_rps",
                    "llmsrv_rps", "rps_ratio", "llmsrv_cpu_us_per_req", "bench_cpu_us_per_req_llmsrv",
                    "bench_cpu_us_per_req_direct", "fake_cpu_us_per_req_direct"):
            check_spread(point[key])
        for key in ("added_p50_ms", "added_p99_ms"):
            check_spread(point[key], signed=True)
        assert point["fake_cpu_us_per_req_llmsrv"]["median"] is not None  # 10 ms ticks: may be 0 in a short window


def test_observability_smoke() -> None:
    # --base-tree: this checkout again (a before/after run loads the older one the same way)
    result = observability.run(dataclasses.replace(SMOKE, base_tree=Path(__file__).resolve().parents[1]))
    check_result(result, "observability")  # problems == []: no failed request, spans reached the collector
    names = result.figures["settings"]["configurations"]
    assert names == ["off", "off, again", "logs", "metrics", "logs + metrics", "tracing", "tracing 1%", "all",
                     "all, tracing 1%", "upstream: off", "upstream: all", "upstream: all, tracing 1%",
                     "off @base", "all, tracing 1% @base"]  # OTel: in dev
    vs_off = result.figures["vs_off"]
    for base in ("off", "upstream: off"):
        assert vs_off[base]["rps"]["median"] == vs_off[base]["target_cpu_us_per_req"]["median"] == 1.0
    for name in set(names) - {"off", "upstream: off"}:  # measured beside its off: ratios of positive figures
        for key, figure in vs_off[name].items():
            if key == "target_cpu_us_per_req" and not figure["rounds"]:
                continue  # no 10 ms CPU tick in the smoke's window (a busy machine): not measured, never 0
            assert figure["rounds"] and figure["min"] <= figure["median"] <= figure["max"], (name, figure)
            assert figure["min"] > 0, (name, figure)
    for name in names:
        target = result.figures["targets"][name]
        assert target["rps"] > 0 and target["errors"] == 0
    assert result.figures["collector"]["exports"] > 0 and result.figures["collector"]["bytes"] > 0


def test_decode_smoke() -> None:
    result = decode.run(SMOKE)
    check_result(result, "decode")  # problems == []: both ways accept the bodies and reject the invalid ones
    for size, nbytes in decode.SIZES.items():
        point = result.figures[size]
        assert nbytes <= point["bytes"] < nbytes * 1.1
        assert point["turns"] >= 1
        for key in ("msgspec_us", "hand_us", "hand_over_msgspec", "check_depth_us"):
            check_spread(point[key])
        # a difference of noisy timings: under load a round may even come out negative, or be left out
        if point["hand_over_msgspec_without_depth"]["rounds"]:
            check_spread(point["hand_over_msgspec_without_depth"], signed=True)
        assert point["msgspec_mb_per_s"] > 0


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "stream": True, "capabilities": ["code"], "task_type": "coder", "timeout_ms": 5},
], ids=["tool-round-trip", "tools-and-options"])
def test_hand_decode_accepts_what_decode_request_accepts(body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    decode.decode_request(data)
    assert decode.hand_decode(data) == body


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
    {"messages": [{"role": "user", "content": "hi"}], "timeout_ms": 0},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
    {"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"name": "f", "arguments": "[1]"}}]}]},
    {"messages": [{"role": "user", "content": "hi", "tool_call_id": "c1"}]},
], ids=["tool-calls-on-user", "timeout-zero", "bad-tool-name", "arguments-not-object", "call-id-on-user"])
def test_hand_decode_rejects_what_decode_request_rejects(body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    with pytest.raises(decode.errors.RequestError):
        decode.decode_request(data)
    with pytest.raises(decode.Invalid):
        decode.hand_decode(data)


def test_peers_smoke_without_litellm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(peers, "VENV", tmp_path / "peers-venv")  # whatever bench/.peers-venv holds
    result = peers.run(dataclasses.replace(SMOKE, out_dir=tmp_path))
    assert result.problems == [peers.NOT_INSTALLED]
    assert not (tmp_path / "peers-venv").exists()  # nothing is installed without --peers
    check_result(dataclasses.replace(result, problems=[]), "peers")
    assert result.figures["settings"]["concurrency"] == [10]
    assert result.figures["settings"]["litellm"] is None
    point = result.figures["c10"]
    assert set(point) == {"direct", "llmsrv"}
    for way in ("direct", "llmsrv"):
        figure = point[way]
        assert figure["ok"] > 0 and figure["errors"] == 0
        for key in ("rps", "p50_ms", "p99_ms", "client_cpu_us_per_req"):
            check_spread(figure[key])
    check_spread(point["llmsrv"]["cpu_us_per_req"])
    for key in ("added_p50_ms", "added_p99_ms"):
        check_spread(point["llmsrv"][key], signed=True)
    assert point["direct"]["cpu_us_per_req"]["median"] is None  # no peer process on the direct way
