"""``observability``: what logs, metrics and tracing cost: llmsrv with each on and all off, same run.

One nats-server, one fake OTLP/HTTP collector (``_Collector``: accepts every export with 200, counts
them) and one ``llmsrv serve`` per configuration, all up for the whole run:

* every configuration has a provider key set (``OPENAI_API_KEY``, never used), as a deployment does: the logs
  redact the registered secrets, and without one that costs nothing;
* ``off``: ``log_level = "warning"`` (no per-request line), ``metrics = false``, no tracing; ``off, again``
  is the same in a second process: how far two identical processes differ is the noise floor;
* ``logs``: JSON lines at info (one per finished request, to the process's log file);
* ``metrics``: the per-request Prometheus series counted (the default; the bench serves no HTTP port,
  so what is measured is the counting, not scrapes);
* ``tracing``: OpenTelemetry spans (a request span and an attempt span) exported over OTLP to the
  collector, every request sampled; ``tracing 1%`` keeps one new trace in a hundred (``sample_ratio``);
* ``all``: logs, metrics and tracing (every request sampled) together; ``all, tracing 1%`` as a busy
  deployment would run it;
* with ``--base-tree DIR``, ``off @base`` and ``all, tracing 1% @base`` are the same from that checkout:
  the before of a change and its after in the same rounds (``off @base`` beside ``off`` shows whether the
  request itself changed too).

These answer ``mock:echo``: no provider work to hide behind, the worst case. ``upstream: ...`` are the
real-provider path: ``openai_compat`` over HTTP to a fake OpenAI upstream (``provider.py --fake echo``, a
process of its own), off and all on, the all-on ones measured beside ``upstream: off``.

Each configuration is measured **beside** ``off``: both loaded at once in closed loop (two generators,
``CONCURRENCY`` outstanding each, CPU from /proc over the same seconds), so the shared machine's drifts
(measured: the same process's req/s moving by 20-40 % from one point to the next) hit both sides of each
ratio alike; the two processes split the cores between them, so the cheaper one answers more. A round
pairs every configuration with ``off`` once (the order reversed every other round). Reported per
configuration: the median over rounds of its req/s and CPU per request as ratios to ``off`` in the same
seconds (with min and max), and its own figures; ``off, again`` beside ``off`` is the floor (two identical
processes).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import processes
from bench.loadgen import MODEL, LoadGen
from bench.report import md_table, progress
from bench.scenario import Options, Result
from bench.scenarios import provider
from bench.scenarios.cancel import fmt as spread_fmt
from bench.scenarios.cancel import spread
from bench.scenarios.overhead import Stack, fmt, median, per_req, ratio, timing
from llmsrv.config import OTEL_MODULES

NAME = "observability"
SUMMARY = "what logs, metrics and tracing cost: llmsrv with each on vs all off (closed loop, ratios)"
CONCURRENCY = 100
OFF = "off"
UPSTREAM = "upstream: "  # the names of the real-provider path's configurations start with it
UPSTREAM_OFF = UPSTREAM + OFF
UPSTREAM_MODEL = "openai_compat:m"
# every configuration has a provider key, as a deployment does: the logs redact what is registered (never used:
# the requests go to mock:echo or the fake upstream)
BENCH_KEY = "sk-bench-" + "0123456789abcdefABCDEF" * 2
AT_BASE = " @base"  # configurations run from the --base-tree checkout: a before/after in the same rounds


def baseline(name: str) -> str:
    return UPSTREAM_OFF if name.startswith(UPSTREAM) else OFF


def model(name: str) -> str:
    return UPSTREAM_MODEL if name.startswith(UPSTREAM) else MODEL


def configurations(collector: str, upstream: str, base: bool = False) -> dict[str, dict[str, str]]:
    """Name -> the ``llmsrv serve`` environment of that configuration (on top of the bench's own); with
    ``base``, ``off`` and ``all, tracing 1%`` again from the ``--base-tree`` checkout (names ending ``@base``)."""
    quiet = {"LLMSRV__SERVER__LOG_LEVEL": "warning", "LLMSRV__SERVER__METRICS": "false", "OPENAI_API_KEY": BENCH_KEY}
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
    up = {"LLMSRV__PROVIDERS__OPENAI_COMPAT__BASE_URL": upstream,
          "LLMSRV__PROVIDERS__OPENAI_COMPAT__MAX_CONCURRENCY": str(2 * CONCURRENCY)}
    found[UPSTREAM_OFF] = {**quiet, **up}
    for name in ("all", "all, tracing 1%"):
        if name in found:
            found[UPSTREAM + name] = {**found[name], **up}
    if base:
        found.update({name + AT_BASE: found[name] for name in (OFF, "all, tracing 1%") if name in found})
    return found


def tracing_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in OTEL_MODULES)


class _Collector:
    """An OTLP/HTTP trace sink on loopback (the standard library's HTTP server, a thread of its own), keeping
    connections alive as a collector does (HTTP/1.1): the exporter does not reconnect for every export."""

    def __init__(self) -> None:
        counts = self.counts = {"exports": 0, "bytes": 0}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

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
        fake = es.enter_context(processes.Child("fake upstream", [sys.executable, provider.__file__, "--fake", "echo"],
                                                log_dir / "fake-upstream.log", ready=b"fake upstream on "))
        upstream = re.search(rb"fake upstream on (\S+)", fake.wait_line())
        assert upstream is not None
        children: dict[str, processes.Child | None] = {}
        subjects, sizes = {}, {}
        found = configurations(collector.url, upstream[1].decode(), base=opts.base_tree is not None)
        for i, (name, env) in enumerate(found.items()):
            prefix = f"obs{i}"
            tree = opts.base_tree.resolve() if opts.base_tree and name.endswith(AT_BASE) else None
            child = es.enter_context(processes.llmsrv(nats.url, prefix, log_dir, env=env, tree=tree,
                                                      name=f"llmsrv-{name.replace(' ', '').replace('%', 'pct')}"))
            subjects[name] = f"{prefix}.request"
            children[name] = child
        for name, child in children.items():
            assert child is not None
            sizes[name] = child.wait_ready(nats.url, subjects[name], model=model(name))
        gen = es.enter_context(LoadGen(nats.url, subjects[OFF], timeout_s, log_dir / "loadgen.log"))
        yield Stack(nats.url, gen, subjects, children, nats.proc.pid, sizes), collector


def paired_point(st: Stack, beside: LoadGen, name: str, opts: Options) -> dict[str, dict[str, Any]]:
    """``name``'s baseline (on ``st.gen``) and ``name`` (on ``beside``) loaded at once in closed loop; per side
    the generator's result and the target's CPU per request."""
    duration, warmup, _ = timing(opts)
    gens = {baseline(name): st.gen, name: beside}
    pids = {n: st.children[n].pid for n in gens}  # type: ignore[union-attr]  # this scenario starts its own
    before = {n: processes.cpu_seconds(pid) for n, pid in pids.items()}
    started = {n: gen.start(concurrency=CONCURRENCY, duration_s=duration, warmup_s=warmup,
                            subject=st.subjects[n], model=model(n)) for n, gen in gens.items()}
    got = {n: gens[n].collect(run) for n, run in started.items()}
    for n, point in got.items():
        st.children[n].check_alive()  # type: ignore[union-attr]
        point.pop("latency_hist", None)
        point.pop("service_hist", None)
        # None, not 0, when no 10 ms CPU tick fell in the window (a short one, under load): not measured
        point["target_cpu_us_per_req"] = per_req(before[n], processes.cpu_seconds(pids[n]), point["answered"]) or None
    return got


def run(opts: Options) -> Result:
    if opts.nats_url:
        return Result(NAME, {}, "", problems=["observability starts llmsrv in each configuration itself: "
                                              "--nats-url does not apply"])
    rounds = 1 if opts.smoke else max(1, opts.rounds)
    log_dir = Path(opts.out_dir) / "logs" / NAME
    problems: list[str] = []
    with stack(opts, log_dir) as (st, collector):
        others = [n for n in st.subjects if n not in (OFF, UPSTREAM_OFF)]
        beside = LoadGen(st.url, st.subjects[OFF], timing(opts)[2], log_dir / "loadgen-beside.log")
        pairs: dict[str, list[dict[str, dict[str, Any]]]] = {n: [] for n in others}
        with beside, progress(opts, rounds * len(others), NAME) as bar:
            for rnd in range(rounds):
                for name in others if rnd % 2 == 0 else others[::-1]:
                    pair = paired_point(st, beside, name, opts)
                    for point in pair.values():
                        point["round"] = rnd + 1
                    pairs[name].append(pair)
                    bar.set_postfix_str(f"{name} {pair[name]['rps']:,.0f} vs {pair[baseline(name)]['rps']:,.0f} req/s")
                    bar.update()
        reply_bytes = st.reply_bytes
    exports = dict(collector.counts)  # after the stack: each llmsrv exports what it still holds as it stops
    runs = {n: [pair[n] for ps in pairs.values() for pair in ps if n in pair] if n in (OFF, UPSTREAM_OFF)
            else [pair[n] for pair in pairs[n]] for n in st.subjects}
    keys = ("rps", "target_cpu_us_per_req", "p50_ms", "p99_ms")
    targets = {n: {"reply_bytes": reply_bytes.get(n), "errors": sum(p["error_total"] for p in pts),
                   **{key: median([p[key] for p in pts]) for key in keys}} for n, pts in runs.items()}
    vs_off: dict[str, dict[str, Any]] = {n: {"rps": spread([1.0]), "target_cpu_us_per_req": spread([1.0])}
                                         for n in (OFF, UPSTREAM_OFF)}
    for n, ps in pairs.items():
        vs_off[n] = {key: spread(r for p in ps if (r := ratio(p[n][key], p[baseline(n)][key])) is not None)
                     for key in ("rps", "target_cpu_us_per_req")}
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
        "targets": targets, "vs_off": vs_off, "collector": exports, "pairs": pairs,
    }
    rows = [[n, t["rps"], spread_fmt(vs_off[n]["rps"], "x"), fmt(t["target_cpu_us_per_req"], ".1f"),
             spread_fmt(vs_off[n]["target_cpu_us_per_req"], "x"), t["p50_ms"], t["p99_ms"], t["errors"]]
            for n, t in targets.items()]
    md = md_table(["configuration", "req/s (median)", "req/s vs off beside it", "CPU us/req",
                   "CPU/req vs off beside it", "p50 ms", "p99 ms", "errors"], rows)
    md += (f"\nEach configuration loaded at the same time as `off` (`upstream: off` for the `upstream: ` ones: "
           f"`{UPSTREAM_MODEL}` over HTTP to a fake upstream; the others `{MODEL}`; {CONCURRENCY} outstanding each, "
           "closed loop), "
           f"{rounds} round(s); ratios: median (min-max) over rounds of the pair's ratio. The collector took "
           f"{exports['exports']} OTLP exports ({exports['bytes']:,} bytes).\n")
    series = {f"{n} req/s, round {p['round']}": [(float(s), float(c)) for s, c in enumerate(p["per_second"])]
              for n, pts in runs.items() if n not in (OFF, UPSTREAM_OFF) for p in pts}
    return Result(NAME, figures, md, series, problems)
