"""The bench's PNG plots: which panel each series goes to (a table), one synthetic ``Result`` per scenario's
series shape drawn to valid PNGs, nothing drawn for empty series, and a run without matplotlib."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plots, report
from bench.__main__ import parse
from bench.scenario import Options, Result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


PANELS = [  # (scenario, series name) -> (PNG suffix, kind); None: not plotted
    ("latency", "llmsrv at 50% of llmsrv max (3,514/s)", "spectrum", "spectrum"),
    ("cancel", "deadline_ms_by_quantile", "spectrum", "spectrum"),
    ("scale", "mock_added_ms_by_quantile", "spectrum", "spectrum"),
    ("overhead", "responder req/s, round 2", "throughput", "rate"),
    ("faults", "success_rate", "over_time", "time"),
    ("faults", "served_by_upstream", "over_time", "time"),
    ("scale", "upstream_inflight", "inflight", "time"),
    ("scale", "mock_rss_mib", "rss", "time"),
    ("provider", "added_p99_ms", "ms", "param"),
    ("provider", "llmsrv_cpu_us_per_req", "cpu", "param"),
    ("stream", "direct_chunks_per_s", "rate", "param"),
    ("stream", "ttfc_overhead_p50_ms", "ms", "param"),
    ("decode", "hand_us", "us", "param"),
    ("overload", "ok_latency_at_2x_max_spectrum", "spectrum", "spectrum"),
    ("overload", "llmsrv req/s, round 1", "throughput", "rate"),
    ("scaleout", "c100_req_per_s", "rate", "param"),
    ("peers", "litellm_cpu_us_per_req", "cpu", "param"),
    ("overhead", "something new", None, None),
    ("cancel", "cancel_count", None, None),
]


@pytest.mark.parametrize(("scenario", "name", "suffix", "kind"), PANELS, ids=[f"{s}: {n}" for s, n, _, _ in PANELS])
def test_panel_chosen_by_scenario_and_series_name(scenario: str, name: str, suffix: str | None,
                                                  kind: str | None) -> None:
    p = plots.panel(scenario, name)
    assert (p and p.suffix, p and p.kind) == (suffix, kind)


def test_quantiles_and_percentiles_land_on_the_same_spectrum_axis() -> None:
    from_quantiles = plots.panel("cancel", "cancel_ms_by_quantile")
    from_percentiles = plots.panel("latency", "llmsrv at 25% of llmsrv max (1,757/s)")
    assert from_quantiles and from_percentiles
    points = [(0.5, 1.0), (0.99, 2.0), (1.0, 3.0)]
    assert plots.plottable(points, from_quantiles) == plots.plottable([(50, 1.0), (99, 2.0), (100, 3.0)],
                                                                      from_percentiles)
    assert [x for x, _ in plots.plottable(points, from_quantiles)] == pytest.approx([2, 100, plots.MAX_X])


@pytest.mark.parametrize(("percentile", "x"), [(0, 1), (50, 2), (90, 10), (99, 100), (99.9, 1000), (99.99, 1e4),
                                               (100, plots.MAX_X)])
def test_spectrum_axis(percentile: float, x: float) -> None:
    assert plots.spectrum_x(percentile) == pytest.approx(x)


def test_points_that_cannot_be_drawn_are_left_out() -> None:
    spectrum, param = plots.panel("cancel", "cancel_ms_by_quantile"), plots.panel("stream", "ttfc_overhead_p50_ms")
    assert spectrum and param
    points = [(0.5, -1.0), (0.9, 0.0), (0.99, math.nan), (1.0, 2.0)]
    assert plots.plottable(points, spectrum) == [(plots.MAX_X, 2.0)]  # a log axis has no room for <= 0
    assert plots.plottable([(1, -1.0), (5, None), (10, 2.0)], param) == [(1, -1.0), (10, 2.0)]  # type: ignore[list-item]


@pytest.mark.parametrize(("points", "end", "rates", "edges"), [
    ([(0.0, 700.0)], 0.4, [1750.0], [0.0, 0.4]),  # a smoke run: 0.4 s measured, one partial bucket
    ([(0.0, 10.0), (1.0, 20.0), (2.0, 5.0)], 2.5, [10.0, 20.0, 10.0], [0.0, 1.0, 2.0, 2.5]),
    ([(0.0, 10.0), (1.0, 20.0)], 2.0, [10.0, 20.0], [0.0, 1.0, 2.0]),
    ([(0.0, 10.0), (1.0, 20.0)], None, [10.0, 20.0], [0.0, 1.0, 2.0]),  # no window known: whole seconds
], ids=["partial", "last-partial", "whole", "unknown"])
def test_per_second_counts_become_rates(points: list[tuple[float, float]], end: float | None, rates: list[float],
                                        edges: list[float]) -> None:
    got_rates, got_edges = plots.stairs(points, end)
    assert got_rates == pytest.approx(rates) and got_edges == pytest.approx(edges)


SPECTRUM = (0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0)  # loadgen.SPECTRUM


def spectrum(ms: float) -> list[tuple[float, float]]:
    return [(p, ms * (1 + p / 10)) for p in SPECTRUM]


# one Result per scenario, each series shaped as the scenario makes it -> the PNGs it should give
Series = dict[str, list[tuple[float, float]]]
SHAPES: dict[str, tuple[Series, list[str]]] = {
    "latency": ({f"{t} at 50% of llmsrv max (3,514/s)": spectrum(ms) for t, ms in (("llmsrv", 2), ("responder", 1))},
                ["spectrum"]),
    "cancel": ({"cancel_ms_by_quantile": [(0.5, 1.1), (0.9, 2.0), (0.99, 4.0), (0.999, 5.0), (1.0, 5.5)],
                "deadline_ms_by_quantile": [(0.5, 2.3), (0.9, 3.0), (0.99, 7.0), (0.999, 7.5), (1.0, 8.0)]},
               ["spectrum"]),
    "overhead": ({f"{t} req/s, round {r}": [(float(s), rps + 50 * s) for s in range(5)]
                  for t, rps in (("llmsrv", 6700), ("responder", 29000)) for r in (1, 2)}, ["throughput"]),
    "faults": ({"success_rate": [(-0.5 + b / 4, 1.0) for b in range(12)],
                "served_by_upstream": [(-0.5 + b / 4, 0.0 if 0 <= b - 2 < 4 else 1.0) for b in range(12)]},
               ["over_time"]),
    "scale": ({"mock_inflight": [(t / 4, min(100, 30 * t)) for t in range(12)],
               "mock_rss_mib": [(t / 4, 48 + min(12, 3 * t)) for t in range(12)],
               "mock_added_ms_by_quantile": [(0.5, 1200), (0.9, 1500), (0.99, 1650), (1.0, 1700)],
               "upstream_inflight": [], "upstream_rss_mib": [], "upstream_added_ms_by_quantile": []},
              ["inflight", "rss", "spectrum"]),
    "provider": ({"added_p50_ms": [(10, 13), (50, 39), (200, 95)], "added_p99_ms": [(10, 30), (50, 80), (200, 200)],
                  "llmsrv_cpu_us_per_req": [(10, 1789), (50, 3111), (200, 5674)]}, ["ms", "cpu"]),
    "stream": ({"llmsrv_chunks_per_s": [(1, 9000), (5, 8000)], "direct_chunks_per_s": [(1, 9100), (5, 9500)],
                "ttfc_overhead_p50_ms": [(1, 1.1), (5, -0.2)]}, ["rate", "ms"]),
    "decode": ({"msgspec_us": [(1e3, 2.7), (1e4, 18.2), (1e5, 429), (1e6, 4515)],
                "hand_us": [(1e3, 7.7), (1e4, 35.7), (1e5, 651), (1e6, 6125)]}, ["us"]),
}


@pytest.mark.parametrize("scenario", SHAPES)
def test_each_scenario_shape_draws_valid_pngs(scenario: str, tmp_path: Path) -> None:
    from matplotlib.image import imread

    series, suffixes = SHAPES[scenario]
    result = Result(scenario, {"settings": {"fault_s": 1.0, "duration_s": 4.5}}, "", series)
    paths = plots.write(result, tmp_path, "commit abc1234, 2026-12-02T02:38:00+00:00")
    assert paths == [tmp_path / f"{scenario}_{s}.png" for s in suffixes]
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        height, width, _ = imread(path).shape
        assert height > 100 and width > 100


@pytest.mark.parametrize("series", [{}, {"cancel_ms_by_quantile": []}, {"hand_us": [(1e3, math.nan)]},
                                    {"unknown": [(1.0, 2.0)]}], ids=["none", "empty", "nan", "unplotted"])
def test_nothing_to_draw_writes_nothing(series: Series, tmp_path: Path) -> None:
    assert plots.write(Result("decode", {}, "", series), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_no_plots_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse(["decode", "--no-plots"]).no_plots and not parse(["decode"]).no_plots
    result = Result("decode", {}, "| a |\n|---|\n", SHAPES["decode"][0])
    report.write(result, Options(out_dir=tmp_path, plots=False), dt.datetime.now(dt.UTC))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.json", "decode.md"]
    report.write(result, Options(out_dir=tmp_path), dt.datetime.now(dt.UTC))
    assert (tmp_path / "decode_us.png").exists()
    assert f"{tmp_path / 'decode_us.png'}" in capsys.readouterr().out.splitlines()[-1]


MISSING = """
import datetime as dt, sys
from pathlib import Path
sys.modules["matplotlib"] = None  # import matplotlib -> ImportError
from bench import report
from bench.scenario import Options, Result
result = Result("decode", {}, "| a |\\n|---|\\n", {"hand_us": [(1e3, 7.7), (1e4, 35.7)]})
report.write(result, Options(out_dir=Path(sys.argv[1])), dt.datetime.now(dt.UTC))
"""


def test_without_matplotlib_the_run_goes_on(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", MISSING, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install -e '.[plot]'" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.json", "decode.md"]
