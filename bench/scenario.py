"""The shape of every bench scenario: ``Options`` in, a ``Result`` (figures, a Markdown summary, series to plot) out.

A scenario is a module of ``bench/scenarios/`` with ``NAME``, ``SUMMARY`` (one line for ``--list``) and
``run(opts: Options) -> Result``. It starts and stops its own processes (nats-server, llmsrv, responders, fake
upstreams), also when interrupted, unless ``opts.nats_url`` points it at a running deployment (then it only sends
load to that URL, where that makes sense for the scenario, and says in ``Result.problems`` what it could not do).
Warm-up is never measured; repetitions are interleaved and reported as median and spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Options:
    smoke: bool = False  # seconds, not minutes: the test suite runs every scenario this way
    rounds: int = 3  # interleaved repetitions
    duration_s: float = 8.0  # measured seconds per point
    warmup_s: float = 1.5  # unmeasured seconds before each point
    nats_url: str | None = None  # target a running deployment instead of starting our own
    out_dir: Path = Path("bench/results")
    progress: bool = True  # a progress bar on anything longer than a few seconds
    peers: bool = False  # consent to install the peers scenario's LiteLLM into bench/.peers-venv
    plots: bool = True  # PNGs next to the JSON (bench/plots.py), when matplotlib is installed
    base_tree: Path | None = None  # overhead/latency/observability: also load llmsrv from this checkout (before/after)


@dataclass
class Result:
    scenario: str
    figures: dict[str, Any]  # JSON-able: settings, medians, spreads, ratios
    summary_md: str  # a Markdown table (or a few) for people
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> (x, y) points, for plots
    problems: list[str] = field(default_factory=list)  # what went wrong or could not be measured
