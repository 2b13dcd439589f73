"""``observability``: what logs, metrics and tracing cost: llmsrv with each on and all off, same run.

One nats-server, one fake OTLP/HTTP collector (``_Collector``: accepts every export with 200, counts
them) and one ``llmsrv serve`` per configuration, all up for the whole run:

* ``off``: ``log_level = "warning"`` (no per-request line), ``metrics = false``, no tracing; ``off, again``
  is the same in a second process: how far two identical processes differ is the noise floor;
* ``logs``: JSON lines at info (one per finished request, to the process's log file);
* ``metrics``: the per-request Prometheus series counted (the default; the bench serves no HTTP port,
  so what is measured is the counting, not scrapes);
* ``tracing``: OpenTelemetry spans (a request span and an attempt span) exported over OTLP to the
  collector, every request sampled; ``tracing 1%`` keeps one new trace in a hundred (``sample_ratio``);
* ``all``: logs, metrics and tracing (every request sampled) together; ``all, tracing 1%`` as a busy
  deployment would run it.

Each round loads each configuration in closed loop (``overhead.closed_point``: the same generator,
``CONCURRENCY`` outstanding, CPU from /proc), the order reversed every other round. Reported per
configuration: req/s and CPU per request (medians over rounds) and both as ratios to ``off``.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import processes
from bench.loadgen import LoadGen
from bench.report import md_table, progress
from bench.scenario import Options, Result
from bench.scenarios.overhead import Stack, closed_point, fmt, ratio, summarise_closed, timing
from llmsrv.config import OTEL_MODULES

NAME = "observability"
SUMMARY = "what logs, metrics and tracing cost: llmsrv with each on vs all off (closed loop, ratios)"
CONCURRENCY = 100
OFF = "off"


def configurations(collector: str) -> dict[str, dict[str, str]]:
    """Name -> the ``llmsrv serve`` environment of that configuration (on top of the bench's own)."""
    quiet = {"LLMSRV__SERVER__LOG_LEVEL": "warning", "LLMSRV__SERVER__METRICS": "false"}
    logs = {"LLMSRV__SERVER__LOG_LEVEL": "info", "LLMSRV__SERVER__LOG_FORMAT": "json"}
    metrics = {"LLMSRV__SERVER__METRICS": "true"}
    tracing = {"LLMSRV__TRACING__ENABLED": "true", "LLMSRV__TRACING__ENDPOINT": collector}
    found: dict[str, dict[str, str]] = {OFF: quiet, "off, again": quiet, "logs": {**quiet, **logs},
                                        "metrics": {**quiet, **metrics}, "logs + metrics": {**quiet, **logs, **metrics}}
    if tracing_installed():
        sampled = {**tracing, "LLMSRV__TRACING__SAMPLE_RATIO": "0.01"}
        found.update({"tracing": {**quiet, **tracing}, "tracing 1%": {**quiet, **sampled},
                      "all": {**quiet, **logs, **metrics, **tracing}, "all, tracing 1%": {**quiet, **logs, **metrics,
                                                                                          **sampled}})
    return found


def tracing_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in OTEL_MODULES)


class _Collector:
    """An OTLP/HTTP trace sink on loopback (the standard library's HTTP server, a thread of its own)."""

    def __init__(self) -> None:
        counts = self.counts = {"exports": 0, "bytes": 0}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                counts["exports"] += 1
                counts["bytes"] += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> _Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def stack(opts: Options, log_dir: Path) -> Iterator[tuple[Stack, _Collector]]:
    _, _, timeout_s = timing(opts)
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as es:
        collector = es.enter_context(_Collector())
        nats = es.enter_context(processes.NatsServer())
        assert nats.proc is not None
        children: dict[str, processes.Child | None] = {}
        subjects, sizes = {}, {}
        for i, (name, env) in enumerate(configurations(collector.url).items()):
            prefix = f"obs{i}"
            child = es.enter_context(processes.llmsrv(nats.url, prefix, log_dir, env=env,
                                                      name=f"llmsrv-{name.replace(' ', '').replace('%', 'pct')}"))
            subjects[name] = f"{prefix}.request"
            children[name] = child
        for name, child in children.items():
            assert child is not None
            sizes[name] = child.wait_ready(nats.url, subjects[name])
        gen = es.enter_context(LoadGen(nats.url, subjects[OFF], timeout_s, log_dir / "loadgen.log"))
        yield Stack(nats.url, gen, subjects, children, nats.proc.pid, sizes), collector


def run(opts: Options) -> Result:
    if opts.nats_url:
        return Result(NAME, {}, "", problems=["observability starts llmsrv in each configuration itself: "
                                              "--nats-url does not apply"])
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    log_dir = Path(opts.out_dir) / "logs" / NAME
    problems: list[str] = []
    with stack(opts, log_dir) as (st, collector):
        names = list(st.subjects)
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        with progress(opts, rounds * len(names), NAME) as bar:
            for rnd in range(rounds):
                for name in names if rnd % 2 == 0 else names[::-1]:
                    point = closed_point(st, name, opts, CONCURRENCY)
                    point["round"] = rnd + 1
                    runs[name].append(point)
                    bar.set_postfix_str(f"{name} {point['rps']:,.0f} req/s")
                    bar.update()
        reply_bytes = st.reply_bytes
    exports = dict(collector.counts)  # after the stack: each llmsrv exports what it still holds as it stops
    targets = {n: summarise_closed(pts, reply_bytes.get(n)) for n, pts in runs.items()}
    base = targets[OFF]
    vs_off = {n: {"rps": ratio(t["rps"], base["rps"]),
                  "cpu_us_per_req": ratio(t["target_cpu_us_per_req"], base["target_cpu_us_per_req"])}
              for n, t in targets.items()}
    for n, t in targets.items():
        if t["errors"]:
            problems.append(f"{n}: {t['errors']} failed requests")
    if not tracing_installed():
        problems.append("tracing not measured: pip install 'llmsrv[otel]' (OpenTelemetry is not installed)")
    elif not exports["exports"]:
        problems.append("the OTLP collector received no export: tracing did not run")
    figures: dict[str, Any] = {
        "settings": {"concurrency": CONCURRENCY, "rounds": rounds, "duration_s": timing(opts)[0],
                     "configurations": list(targets)},
        "targets": targets, "vs_off": vs_off, "collector": exports, "rounds": runs,
    }
    rows = [[n, t["rps"], fmt(vs_off[n]["rps"], ".2f", "x"), fmt(t["target_cpu_us_per_req"], ".1f"),
             fmt(vs_off[n]["cpu_us_per_req"], ".2f", "x"), fmt(t["target_cpu_util"], ".0%"), t["p50_ms"],
             t["p99_ms"], t["errors"]] for n, t in targets.items()]
    md = md_table(["configuration", "req/s (median)", "req/s vs off", "CPU us/req", "CPU/req vs off",
                   "llmsrv CPU", "p50 ms", "p99 ms", "errors"], rows)
    md += (f"\nClosed loop, {CONCURRENCY} outstanding, {rounds} interleaved round(s); the collector took "
           f"{exports['exports']} OTLP exports ({exports['bytes']:,} bytes).\n")
    series = {f"{n} req/s, round {p['round']}": [(float(s), float(c)) for s, c in enumerate(p["per_second"])]
              for n, pts in runs.items() for p in pts}
    return Result(NAME, figures, md, series, problems)
