"""The bench scenario ``faults`` in smoke mode: a well-formed result, never its performance numbers.

It runs for real (nats-server, in-process llmsrv, a fake upstream that answers 503 for 1 s, 20 req/s
for 3 s); the test checks the shape of the Result (JSON-able figures, every key with a sane value, a
Markdown table, the per-250 ms series) and that no child process is left behind.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bench.scenario import Options
from bench.scenarios import faults

from .bench_checks import no_leftover_processes  # noqa: F401 (autouse fixture)

SMOKE = Options(smoke=True, progress=False)
SPREADS = ("success_rate", "success_rate_during_fault", "fallback_share_during_fault", "breaker_open_s",
           "dead_requests", "recover_s", "p50_ms_during_fault", "p99_ms_during_fault")


def check_spread(figure: dict[str, Any]) -> None:
    assert set(figure) == {"median", "min", "max", "rounds"}
    assert len(figure["rounds"]) == 1, figure
    assert all(math.isfinite(v) for v in figure["rounds"]), figure
    assert figure["min"] <= figure["median"] <= figure["max"]


def test_faults_smoke() -> None:
    result = faults.run(SMOKE)
    assert result.scenario == "faults"
    assert result.problems == []
    json.dumps(result.figures, allow_nan=False)
    json.dumps(result.series, allow_nan=False)

    lines = [line for line in result.summary_md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 8, result.summary_md
    assert set(lines[1].replace("|", "").replace(" ", "")) <= set("-:"), lines[1]
    assert all(line.count("|") == lines[0].count("|") for line in lines), result.summary_md

    f = result.figures
    settings = f["settings"]
    assert settings["smoke"] is True and settings["rounds"] == 1
    assert settings["candidates"] == [faults.PRIMARY, faults.FALLBACK]
    assert f["requests"] == round(settings["rate_per_s"] * (settings["pre_s"] + settings["fault_s"]
                                                            + settings["post_s"]))
    for key in SPREADS:
        check_spread(f[key])
    for key in ("success_rate", "success_rate_during_fault", "fallback_share_during_fault"):
        assert 0.0 <= f[key]["median"] <= 1.0
    # the breaker opened while the upstream was down, and only after the fault began
    assert 0.0 <= f["breaker_open_s"]["median"] < settings["fault_s"]
    # the dead upstream saw at least the threshold's worth of requests, and not every request of the fault
    assert faults.THRESHOLD <= f["dead_requests"]["median"] < f["requests"]
    assert f["recover_s"]["median"] >= 0.0
    assert 0.0 < f["p50_ms_during_fault"]["median"] <= f["p99_ms_during_fault"]["median"]
    assert isinstance(f["transitions"], list) and len(f["transitions"]) == 1
    assert any(state == "open" for _, state in f["transitions"][0])

    assert set(result.series) == {"success_rate", "served_by_upstream"}
    buckets = math.ceil((settings["pre_s"] + settings["fault_s"] + settings["post_s"]) / settings["bucket_s"])
    for points in result.series.values():
        assert 0 < len(points) <= buckets
        xs = [x for x, _ in points]
        assert xs == sorted(xs) and xs[0] < 0.0 < xs[-1]  # from before the fault to after it
        assert all(math.isfinite(x) and 0.0 <= y <= 1.0 for x, y in points)
