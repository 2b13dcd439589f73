"""The bench scenario ``scale`` in smoke mode (500 / 100 in flight, 0.5 s): a well-formed result.

It runs for real (nats-server, llmsrv children, a fake upstream on loopback) for a few seconds; the test
checks the shape of what comes back (JSON-able figures, every expected key with a sane value, a Markdown
table, every request answered, no process left behind), never the timings themselves.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bench.scenario import Options
from bench.scenarios import scale

from .bench_checks import no_leftover_processes  # noqa: F401 (autouse fixture)


def test_rss_kib_reads_proc() -> None:
    assert (scale.rss_kib(os.getpid()) or 0) > 0
    assert scale.rss_kib(os.getpid(), "NoSuchKey") is None


def test_scale_smoke(tmp_path: Path) -> None:
    result = scale.run(Options(smoke=True, progress=False, out_dir=tmp_path))
    assert result.scenario == "scale"
    assert result.problems == []
    json.dumps(result.figures, allow_nan=False)
    json.dumps(result.series, allow_nan=False)
    for points in result.series.values():
        assert all(len(p) == 2 and all(math.isfinite(v) for v in p) for p in points)

    lines = [line for line in result.summary_md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2, result.summary_md  # header, rule, one row per phase
    assert set(lines[1].replace("|", "").replace(" ", "")) <= set("-:"), lines[1]
    assert all(line.count("|") == lines[0].count("|") for line in lines)

    assert result.figures["settings"]["smoke"] is True
    for name, n in (("mock", scale.SMOKE_N_MOCK), ("upstream", scale.SMOKE_N_UPSTREAM)):
        f = result.figures[name]
        assert f["requests"] == n and f["provider_latency_s"] == scale.SMOKE_LATENCY_S
        assert (f["ok"], f["errors"], f["lost"], f["all_answered"]) == (n, 0, 0, True), f
        assert f["errors_by_code"] == {}
        added = f["added_ms"]
        assert added["p50"] is not None and added["p50"] <= added["p99"] <= added["max"]
        assert added["p50"] > -50  # a reply cannot come much before the provider latency
        assert f["all_admitted_s"] is not None and f["all_admitted_s"] > 0
        assert f["peak_inflight_health"] >= n
        assert 0 < f["rss_idle_mib"] <= f["rss_peak_mib"] <= f["vm_hwm_mib"]
        assert f["rss_per_inflight_kib"] is not None and f["rss_per_inflight_kib"] >= 0
        for key in ("health_idle_ms", "health_loaded_ms"):
            assert 0 < f[key]["p50"] <= f[key]["max"]
        assert f["health_loaded_ms"]["n"] >= 1
        assert f["loop_lag_max_ms"] is not None and f["loop_lag_max_ms"] >= 0  # llmsrv's own, from health
        assert f["wall_s"] >= scale.SMOKE_LATENCY_S
        assert result.series[f"{name}_inflight"] and result.series[f"{name}_rss_mib"]
