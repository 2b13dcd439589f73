"""PNG plots of a ``Result``'s series, written next to its JSON as ``<out>/<scenario>_<panel>.png``.

``panel(scenario, name)`` is the pure decision: which picture a series belongs to (series on the same
panel share axes and units) and how that picture reads. Four kinds:

* ``spectrum``: latency against percentile on HdrHistogram's ``1/(1-p)`` axis (50 %, 90 %, 99 %, ...
  equally spaced), both axes log; the max, at 100 %, is drawn one decade past 99.99 %;
* ``rate``: (second, count) buckets drawn as steps of count per second, y from 0; a last bucket cut
  short by the measured window (``settings.duration_s``, smoke runs: 0.4 s) is divided by its length;
* ``time``: a quantity over the seconds of the run, y from 0;
* ``param``: a figure per concurrency or request size, with markers; an axis is log when its values
  span two decades or more, else the y axis shows zero.

``write`` draws them with matplotlib's Agg renderer through ``matplotlib.figure.Figure`` (no pyplot,
no global state). matplotlib is imported only there, so the bench runs without it (``ImportError``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bench.scenario import Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Kind = Literal["spectrum", "rate", "time", "param"]
MAX_X = 1e5  # where the max (100th percentile) sits on the 1/(1-p) axis
SPECTRUM_TICKS = {1.0: "min", 2.0: "50%", 10.0: "90%", 1e2: "99%", 1e3: "99.9%", 1e4: "99.99%", MAX_X: "max"}
PARAM_X = {"decode": "request size (bytes)", "provider": "concurrent requests", "stream": "concurrent streams",
           "scaleout": "llmsrv processes", "peers": "concurrent requests"}
PARAM_UNITS = (("_us_per_req", "cpu", "CPU per request", "CPU µs per request"),  # name suffix -> panel
               ("_per_s", "rate", "throughput", "per second"),
               ("_ms", "ms", "latency", "ms"),
               ("_us", "us", "time per call", "µs"))


@dataclass(frozen=True)
class Panel:
    """One PNG: the file name's suffix, its kind, title and axis labels."""

    suffix: str
    kind: Kind
    title: str
    xlabel: str
    ylabel: str
    x_per_percent: float = 1.0  # spectrum: x values per percent (1 for percentiles, 0.01 for quantiles)
    shade: str = ""  # time: figures["settings"] key of a span [0, value] to shade (the fault)


SPECTRUM = Panel("spectrum", "spectrum", "latency percentile spectrum", "percentile", "latency (ms, log)")


def panel(scenario: str, name: str) -> Panel | None:
    """The panel series ``name`` of ``scenario`` is drawn on, or None if it is not plotted."""
    if name.endswith("_ms_by_quantile"):
        return dataclasses.replace(SPECTRUM, x_per_percent=0.01)  # cancel, scale: (quantile, ms)
    if scenario == "latency" or name.endswith("_spectrum"):
        return SPECTRUM  # loadgen.spectrum_ms: (percentile, ms)
    if " req/s, round " in name:
        return Panel("throughput", "rate", "throughput per second (closed loop)",
                     "seconds into the measured window", "successful replies per second")
    if name in ("success_rate", "served_by_upstream"):
        return Panel("over_time", "time", "success rate and share served by the failing upstream",
                     "seconds from the fault start (bucket start)", "share of the requests sent", shade="fault_s")
    if name.endswith("_inflight"):
        return Panel("inflight", "time", "requests in flight (llm.health)", "seconds since the first send",
                     "requests in flight")
    if name.endswith("_rss_mib"):
        return Panel("rss", "time", "llmsrv resident memory", "seconds since the first send", "RSS (MiB)")
    if scenario in PARAM_X:
        for end, suffix, title, ylabel in PARAM_UNITS:
            if name.endswith(end):
                return Panel(suffix, "param", f"{title} vs {PARAM_X[scenario]}", PARAM_X[scenario], ylabel)
    return None


def spectrum_x(percentile: float) -> float:
    """Where ``percentile`` (0-100) sits on the 1/(1-p) axis: 0 -> 1, 50 -> 2, 99 -> 100, 100 -> MAX_X."""
    return MAX_X if percentile >= 100 else min(MAX_X, 1 / (1 - percentile / 100))


def stairs(points: Sequence[tuple[float, float]], end: float | None) -> tuple[list[float], list[float]]:
    """(count per second, bucket edges) of contiguous 1 s buckets (start, count); the last ends at ``end`` if sooner."""
    last = points[-1][0]
    edges = [x for x, _ in points] + [min(last + 1, end) if end and end > last else last + 1]
    return [y / (b - x) for (x, y), b in zip(points, edges[1:], strict=True)], edges


def spans_decades(values: Sequence[float]) -> bool:
    """Whether a log axis suits ``values``: all positive, the largest at least 100 times the smallest."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def plottable(points: Sequence[tuple[float, float]], p: Panel) -> list[tuple[float, float]]:
    """The finite points of a series, in plot coordinates (spectrum: x moved to the 1/(1-p) axis, y > 0)."""
    good = [(x, y) for x, y in points  # a median over no rounds is None
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if p.kind == "spectrum":
        return [(spectrum_x(x / p.x_per_percent), y) for x, y in good if y > 0]
    return good


def panels(result: Result) -> dict[Panel, dict[str, list[tuple[float, float]]]]:
    """Panel -> its series (name -> plottable points), leaving out series with nothing to draw."""
    out: dict[Panel, dict[str, list[tuple[float, float]]]] = {}
    for name, points in result.series.items():
        p = panel(result.scenario, name)
        if p is not None and (pts := plottable(points, p)):
            out.setdefault(p, {})[name] = pts
    return out


def write(result: Result, out_dir: Path, note: str = "") -> list[Path]:
    """Draw every panel of ``result`` to ``<out_dir>/<scenario>_<suffix>.png``; return the paths.

    ``note`` (commit, date) goes under each title. Raises ImportError when matplotlib is missing,
    unless there is nothing to draw.
    """
    todo = panels(result)
    if not todo:
        return []
    from matplotlib.figure import Figure

    paths = []
    for p, series in todo.items():
        many = len(series) > 4  # the legend goes under the plot, where it hides no line
        fig = Figure(figsize=(8, 5 + 0.2 * len(series) * many), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        _draw(ax, p, series, result.figures.get("settings") or {})
        ax.set_title(f"{result.scenario}: {p.title}" + (f"\n{note}" if note else ""), fontsize="medium")
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(True, which="major", alpha=0.3)
        if many:
            fig.legend(loc="outside lower center", ncols=2, fontsize="small")
        else:
            ax.legend(fontsize="small")
        path = out_dir / f"{result.scenario}_{p.suffix}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def _draw(ax: Axes, p: Panel, series: dict[str, list[tuple[float, float]]], settings: dict[str, Any]) -> None:
    """The lines, the axes' scales and their tick labels."""
    from matplotlib.ticker import LogFormatter, StrMethodFormatter

    class Plain(LogFormatter):  # LogFormatter's choice of ticks to label, as 0.4, 6, 30,000 (not 4e-01, 6x10^0)
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:,.10g}" if super().__call__(x, pos) else ""

    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    for name, pts in series.items():
        label = name.removesuffix("_by_quantile").replace("_", " ")
        if p.kind == "rate":
            ax.stairs(*stairs(pts, settings.get("duration_s")), label=label, linewidth=1.5, baseline=None)
        else:
            few = p.kind != "time" or len(pts) <= 30
            ax.plot(*zip(*pts, strict=True), marker="o" if few else None, markersize=4, label=label)
    if p.kind in ("rate", "time"):
        ax.set_ylim(bottom=0)
        if p.shade and settings.get(p.shade):
            ax.axvspan(0, settings[p.shade], color="tab:red", alpha=0.1, label="fault")
    if p.kind == "spectrum" or (p.kind == "param" and spans_decades(xs)):
        ax.set_xscale("log")
    if p.kind == "spectrum" or (p.kind == "param" and spans_decades(ys)):
        ax.set_yscale("log")
    elif p.kind == "param":
        ax.axhline(0, color="grey", linewidth=0.8)  # a linear axis starts at (or shows) zero: no zoomed-in drama
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(Plain())
            axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        else:
            axis.set_major_formatter(StrMethodFormatter("{x:,g}"))
    if p.kind == "param":
        ax.set_xticks(sorted(set(xs)))  # the concurrencies or sizes measured, not 2.5 streams
        ax.set_xticks([], minor=True)
    if p.kind == "spectrum":
        ax.set_xticks(list(SPECTRUM_TICKS), list(SPECTRUM_TICKS.values()))
        ax.set_xticks([], minor=True)
        ax.set_xlim(min(xs) / 1.2, MAX_X * 1.2)
