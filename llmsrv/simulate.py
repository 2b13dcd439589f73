"""``llmsrv breaker simulate``: replays a failure trace through the real breaker and rate limiter in virtual time.

Theory of operation
-------------------
The input is a list of requests, each a time (seconds from 0) and what the upstream would answer
(``ok`` or ``error``): a trace file (CSV with the header ``ts,outcome``, or JSONL with those keys)
or a pattern of phases at ``--rate`` requests a second (grammar below). Each ``--setting`` gets a
fresh ``llmsrv.resilience.Breaker`` (and ``RateLimiter`` when it carries ``rpm=``) and sees every
request in order, as ``ProviderGuard.attempt()`` would: the breaker is asked for a ticket (refused:
*rejected by breaker*), then the rate limit is charged (refused: *rejected by rate limit*, and the
ticket goes back as ``neutral``, freeing a half-open probe slot, as the guard does); an admitted
request's outcome is recorded as ``success`` or ``failure``, at once, or ``latency=S`` later when
the setting has one (then half-open probes stay in flight and ``probes=N`` matters). The guard
itself is not used: it is async (a trio bulkhead) and the simulation needs no event loop.

Parsing and the simulation are pure functions returning frozen dataclasses (not msgspec: the CLI
imports this module to build its parser, so the top imports only the standard library; resilience,
and matplotlib for ``--plot``, are imported when a command runs). ``run()`` is the thin shell.

Pattern grammar (``--pattern``)::

    pattern  := phase ("," phase)*
    phase    := "ok:" duration          every request succeeds
              | "outage:" duration      every request fails
              | "err=" percent "%:" duration
    duration := number ("s" | "m")      seconds or minutes, > 0
    percent  := number                  0 to 100

Request ``i`` is sent at ``i / rate`` (one stream across phases, from 0) and belongs to the phase
its time falls in. An ``err=P%`` phase spreads its errors evenly and deterministically (no RNG):
its ``j``-th request (from 0) fails when ``floor((j + 1) * P / 100)`` exceeds ``floor(j * P / 100)``,
so ``err=5%`` fails requests 19, 39, 59, ... of the phase, and below 50% two errors never follow
each other: noise alone does not trip a consecutive-failure breaker. Exact fractions, no float drift.

Reported per setting: admitted (ok / failed), rejected by breaker and by rate limit, how often the
breaker opened, *time to open* (from the first failure of the first outage, the first error followed by another
error, to the breaker's first opening after it),
*time to recover* (from the upstream's recovery, the first ``ok`` after the trace's last ``error``,
to the breaker's last closing; 0 if it was already closed) and the requests the breaker refused
after the upstream had recovered.

Virtual time
------------
``Breaker`` takes a ``clock`` and keeps the open time itself (purgatory's own ``time.time()`` in
``OpenedState`` is never consulted), so a callable returning the trace time is all it needs.

``RateLimiter`` takes a ``wall`` clock, but limits' ``MemoryStorage`` (sliding-window keys, expiry)
and its strategy's ``get_window_stats`` call ``time.time()`` themselves. Rather than patching the
``time`` name in limits' modules for the whole process, ``_read_time_from`` gives the limiter's own
storage and strategy objects a subclass whose methods are limits' unchanged code objects, rebound to
a copy of their module globals in which ``time.time`` is the virtual clock. The library's code runs
as is, other instances are untouched, and this module never imports limits (tests/test_layering.py
keeps it behind ``resilience.limiter``). If a limits release stops reading ``time.time`` this way,
the simulation refuses to run rather than silently mixing clocks.

The limiter's clock is the trace time plus ``LIMITS_EPOCH`` (100 of limits' 360-day years, in
2068): limits names the previous window ``int((now - expiry) / expiry)``, which near 0 truncates to
the current window's name and counts every hit twice. The epoch is a multiple of every unit limits
knows (second to year), so trace time 0 is still a window boundary and the arithmetic stays easy to
check by hand. Reaching the limiter's ``_storage`` and ``_strategy`` is the price of not editing
limiter.py; a ``clock`` argument there would make this unnecessary.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import heapq
import io
import json
import math
import sys
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

CLOSED, HALF_OPEN, OPEN = "closed", "half-open", "open"  # llmsrv.resilience's state names
STATE_LEVEL = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
# what became of one request under one setting
SENT_OK, SENT_ERROR, BY_BREAKER, BY_RATE_LIMIT = "ok", "error", "breaker", "rate-limit"
DEFAULT_RATE = 10.0
SETTING_KEYS = ("threshold", "ttl", "probes", "rpm", "latency")
PLOT_HINT = "pip install 'llmsrv[plot]'"
LIMITS_EPOCH = 100 * 360 * 86400.0  # what the rate limiter's clock reads at trace time 0 (module docstring)


class SimulateError(ValueError):
    """Bad input (trace, pattern, setting, file): the message says where; the command exits 2."""


@dataclass(frozen=True, slots=True)
class Request:
    ts: float
    outcome: Literal["ok", "error"]


@dataclass(frozen=True, slots=True)
class Trace:
    source: str  # what the requests came from, for the report
    requests: tuple[Request, ...]
    duration_s: float  # the pattern's length, or the trace's last ts

    @property
    def outage_start_s(self) -> float | None:
        """The first failure of the first outage: the first error followed by another error (a lone error
        in a noisy phase is no outage), else the first error (None: nothing failed)."""
        errors = [i for i, r in enumerate(self.requests) if r.outcome == "error"]
        start = next((i for i in errors if i + 1 < len(self.requests) and self.requests[i + 1].outcome == "error"),
                     errors[0] if errors else None)
        return None if start is None else self.requests[start].ts

    @property
    def recovered_at_s(self) -> float | None:
        """The first ``ok`` after the last ``error`` (None: never failed, or still failing at the end)."""
        last_error = next((i for i in range(len(self.requests) - 1, -1, -1)
                           if self.requests[i].outcome == "error"), None)
        if last_error is None or last_error + 1 == len(self.requests):
            return None
        return self.requests[last_error + 1].ts


@dataclass(frozen=True, slots=True)
class Phase:
    kind: Literal["ok", "outage", "err"]
    error_fraction: Fraction
    duration_s: Fraction


@dataclass(frozen=True, slots=True)
class Setting:
    label: str  # as given on the command line: the column's title
    threshold: int
    ttl_s: float
    probes: int = 1
    rpm: str | None = None
    latency_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Transition:
    t: float
    state: str


@dataclass(frozen=True, slots=True)
class Summary:
    setting: Setting
    admitted: int
    ok: int
    failed: int
    rejected: int
    rejected_breaker: int
    rejected_rate_limit: int
    openings: int
    time_to_open_s: float | None  # None: it never opened
    time_to_recover_s: float | None  # None: no recovery in the trace, or still not closed at the end
    refused_after_recovery: int
    transitions: tuple[Transition, ...]  # starts with (0, closed)


@dataclass(frozen=True, slots=True)
class Run:
    summary: Summary
    decisions: tuple[str, ...]  # one per request: SENT_OK | SENT_ERROR | BY_BREAKER | BY_RATE_LIMIT


@dataclass(frozen=True, slots=True)
class Simulation:
    trace: Trace
    runs: tuple[Run, ...]


# ---------------------------------------------------------------------------------------------
# Parsing (pure)


def parse_pattern(spec: str, rate: float = DEFAULT_RATE) -> Trace:
    """The requests of a pattern like ``err=5%:60s,outage:30s,ok:60s`` at ``rate`` requests a second."""
    if not math.isfinite(rate) or rate <= 0:
        raise SimulateError(f"--rate must be a positive number of requests a second, got {rate}")
    phases = _parse_phases(spec)
    per_s = Fraction(repr(rate))  # the decimal the user wrote, exactly
    requests: list[Request] = []
    start, i = Fraction(0), 0
    for phase in phases:
        end = start + phase.duration_s
        j = 0
        while (at := i / per_s) < end:
            fails = math.floor((j + 1) * phase.error_fraction) > math.floor(j * phase.error_fraction)
            requests.append(Request(float(at), "error" if fails else "ok"))
            i, j = i + 1, j + 1
        start = end
    return Trace(f"pattern {spec} at {rate:g} req/s", tuple(requests), float(start))


def _parse_phases(spec: str) -> list[Phase]:
    if not spec.strip():
        raise SimulateError("pattern is empty: give phases like ok:60s,outage:30s,err=5%:60s")
    return [_parse_phase(n, text.strip()) for n, text in enumerate(spec.split(","), 1)]


def _parse_phase(n: int, text: str) -> Phase:
    where = f"pattern phase {n} {text!r}"
    kind, sep, duration = text.partition(":")
    if not sep:
        raise SimulateError(f"{where}: expected KIND:DURATION, e.g. ok:60s, outage:30s or err=5%:60s")
    seconds = _parse_duration(where, duration.strip())
    kind = kind.strip()
    if kind == "ok":
        return Phase("ok", Fraction(0), seconds)
    if kind == "outage":
        return Phase("outage", Fraction(1), seconds)
    if kind.startswith("err="):
        value = kind[len("err="):]
        fraction = _fraction(value[:-1]) if value.endswith("%") else None
        if fraction is None or not 0 <= fraction <= 100:
            raise SimulateError(f"{where}: error rate {value!r} is not a percentage from 0% to 100%, e.g. err=5%")
        return Phase("err", fraction / 100, seconds)
    raise SimulateError(f"{where}: unknown phase {kind!r}; use ok, outage or err=P%")


def _parse_duration(where: str, text: str) -> Fraction:
    unit = {"s": 1, "m": 60}.get(text[-1:])
    number = _fraction(text[:-1]) if unit else None
    if unit is None or number is None or number <= 0:
        raise SimulateError(f"{where}: duration {text!r} is not a positive number of seconds or minutes, "
                            "e.g. 30s or 1.5m")
    return number * unit


def _fraction(text: str) -> Fraction | None:
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        return None
    return value if "/" not in text else None


def parse_trace(text: str, name: str) -> Trace:
    """The requests of a trace file's text: JSONL when its first non-blank line is an object, else CSV."""
    first = next((line.lstrip() for line in text.splitlines() if line.strip()), "")
    requests = _parse_jsonl(text, name) if first.startswith("{") else _parse_csv(text, name)
    if not requests:
        raise SimulateError(f"{name}: the trace has no requests")
    return Trace(f"trace {name}", tuple(requests), requests[-1].ts)


def _parse_csv(text: str, name: str) -> list[Request]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[tuple[int, str, str]] = []  # (line, ts, outcome)
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        line = reader.line_num
        if header is None:
            header = [cell.strip() for cell in row]
            if "ts" not in header or "outcome" not in header:
                if _fraction(header[0]) is not None:
                    raise SimulateError(f"{name} line {line}: no header; the first line must name the "
                                        "columns: ts,outcome")
                raise SimulateError(f"{name} line {line}: the header must name the columns ts and outcome, "
                                    f"got {','.join(header)!r}")
            continue
        if len(row) != len(header):
            raise SimulateError(f"{name} line {line}: expected {len(header)} fields ({','.join(header)}), "
                                f"got {len(row)}")
        rows.append((line, row[header.index("ts")].strip(), row[header.index("outcome")].strip()))
    return _requests(name, rows)


def _parse_jsonl(text: str, name: str) -> list[Request]:
    rows: list[tuple[int, object, object]] = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise SimulateError(f"{name} line {line}: not a JSON object ({exc})") from None
        if not isinstance(doc, dict):
            raise SimulateError(f"{name} line {line}: expected a JSON object with keys ts and outcome")
        for key in ("ts", "outcome"):
            if key not in doc:
                raise SimulateError(f"{name} line {line}: missing field {key!r}")
        rows.append((line, doc["ts"], doc["outcome"]))
    return _requests(name, rows)


def _requests(name: str, rows: Iterable[tuple[int, object, object]]) -> list[Request]:
    requests: list[Request] = []
    previous = 0.0
    for line, raw_ts, raw_outcome in rows:
        where = f"{name} line {line}"
        ts = _seconds(raw_ts)
        if ts is None:
            raise SimulateError(f"{where}, field ts: expected seconds from 0 (a number >= 0), got {raw_ts!r}")
        if ts < previous:
            raise SimulateError(f"{where}, field ts: {ts:g} is before the previous request's {previous:g}; "
                                "the trace must be in time order")
        if raw_outcome not in ("ok", "error"):
            raise SimulateError(f"{where}, field outcome: expected 'ok' or 'error', got {raw_outcome!r}")
        requests.append(Request(ts, "ok" if raw_outcome == "ok" else "error"))
        previous = ts
    return requests


def _seconds(raw: object) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            return None
    if not isinstance(raw, int | float) or not math.isfinite(raw) or raw < 0:
        return None
    return float(raw)


def parse_setting(text: str) -> Setting:
    """``threshold=N,ttl=S[,probes=N][,rpm=RATE][,latency=S]`` (RATE in limits' notation, e.g. 600/minute)."""
    where = f"--setting {text!r}"
    values: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise SimulateError(f"{where}: expected KEY=VALUE pairs separated by commas, got {item.strip()!r}")
        if key not in SETTING_KEYS:
            raise SimulateError(f"{where}: unknown key {key!r}; known: {', '.join(SETTING_KEYS)}")
        if key in values:
            raise SimulateError(f"{where}: {key} given twice")
        values[key] = value
    for key in ("threshold", "ttl"):
        if key not in values:
            raise SimulateError(f"{where}: missing {key}= (every setting needs threshold=N,ttl=SECONDS)")
    rpm = values.get("rpm")
    if rpm is not None:
        _check_rate_limit(where, rpm)
    return Setting(text.strip(), _count(where, "threshold", values["threshold"]),
                   _setting_seconds(where, "ttl", values["ttl"]),
                   _count(where, "probes", values.get("probes", "1")), rpm,
                   _setting_seconds(where, "latency", values.get("latency", "0")))


def _count(where: str, key: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise SimulateError(f"{where}: {key} must be a whole number >= 1, got {value!r}")
    return int(value)


def _setting_seconds(where: str, key: str, value: str) -> float:
    seconds = _seconds(value.removesuffix("s"))
    if seconds is None:
        raise SimulateError(f"{where}: {key} must be seconds >= 0, got {value!r}")
    return seconds


def _check_rate_limit(where: str, rpm: str) -> None:
    from .resilience import RateLimiter

    try:
        RateLimiter("check", rpm, None, wall=lambda: 0.0)
    except ValueError as exc:
        raise SimulateError(f"{where}: rpm {rpm!r} is not a rate limit like 600/minute ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Simulation (pure: virtual time, no I/O)


class _VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(trace: Trace, settings: Sequence[Setting]) -> Simulation:
    return Simulation(trace, tuple(_simulate_one(trace, setting) for setting in settings))


def _simulate_one(trace: Trace, setting: Setting) -> Run:
    from . import errors
    from .resilience import Breaker, RateLimiter, Ticket

    clock = _VirtualClock()
    transitions = [Transition(0.0, CLOSED)]
    breaker = Breaker("simulated", setting.threshold, setting.ttl_s, setting.probes, clock,
                      on_transition=lambda _name, _old, new: transitions.append(Transition(clock.now, new)))
    limiter = None
    if setting.rpm is not None:
        def wall() -> float:
            return LIMITS_EPOCH + clock.now

        limiter = RateLimiter("simulated", setting.rpm, None, wall=wall)
        _run_limiter_on(limiter, wall)
    pending: list[tuple[float, int, Ticket, str]] = []  # (done at, sequence, ticket, outcome)

    def finish(until: float) -> None:
        while pending and pending[0][0] <= until:
            done_at, _, ticket, outcome = heapq.heappop(pending)
            clock.now = done_at
            breaker.record(ticket, outcome)

    decisions: list[str] = []
    for n, request in enumerate(trace.requests):
        finish(request.ts)
        clock.now = request.ts
        try:
            ticket = breaker.admit()
        except errors.CircuitOpen:
            decisions.append(BY_BREAKER)
            continue
        if limiter is not None:
            try:
                limiter.acquire(1)
            except errors.RateLimited:
                breaker.record(ticket, "neutral")  # as the guard does: the probe slot is free again
                decisions.append(BY_RATE_LIMIT)
                continue
        outcome = "success" if request.outcome == "ok" else "failure"
        if setting.latency_s > 0:
            heapq.heappush(pending, (request.ts + setting.latency_s, n, ticket, outcome))
        else:
            breaker.record(ticket, outcome)
        decisions.append(SENT_OK if request.outcome == "ok" else SENT_ERROR)
    finish(math.inf)
    return Run(_summarize(trace, setting, tuple(decisions), tuple(transitions)), tuple(decisions))


def _summarize(trace: Trace, setting: Setting, decisions: tuple[str, ...],
               transitions: tuple[Transition, ...]) -> Summary:
    count = {kind: decisions.count(kind) for kind in (SENT_OK, SENT_ERROR, BY_BREAKER, BY_RATE_LIMIT)}
    opened_at = [t.t for t in transitions if t.state == OPEN]
    outage_start, recovered = trace.outage_start_s, trace.recovered_at_s
    time_to_open = None
    opened_after = [t for t in opened_at if outage_start is not None and t >= outage_start]
    if opened_after and outage_start is not None:
        time_to_open = _round(opened_after[0] - outage_start)
    time_to_recover, refused_after = None, 0
    if recovered is not None:
        refused_after = sum(1 for r, d in zip(trace.requests, decisions, strict=True)
                            if d == BY_BREAKER and r.ts >= recovered)
        if transitions[-1].state == CLOSED:
            last_close = max(t.t for t in transitions if t.state == CLOSED)
            time_to_recover = _round(max(0.0, last_close - recovered))
    return Summary(setting, count[SENT_OK] + count[SENT_ERROR], count[SENT_OK], count[SENT_ERROR],
                   count[BY_BREAKER] + count[BY_RATE_LIMIT], count[BY_BREAKER], count[BY_RATE_LIMIT],
                   len(opened_at), time_to_open, time_to_recover, refused_after, transitions)


def _round(seconds: float) -> float:
    return round(seconds, 6)  # i / rate differences carry float noise (60.3 - 1.9 = 58.39999...)


def _run_limiter_on(limiter: Any, clock: Callable[[], float]) -> None:
    """Make the limiter's limits storage and strategy read ``clock`` where they read ``time.time()``."""
    if not _read_time_from(limiter._storage, clock):
        raise RuntimeError("limits' memory storage no longer reads time.time(): the simulation cannot put "
                           "its rate limits on virtual time (see llmsrv/simulate.py)")
    _read_time_from(limiter._strategy, clock)


def _read_time_from(obj: object, clock: Callable[[], float]) -> int:
    """Re-class ``obj`` so its methods that read ``time.time()`` read ``clock``; how many were rebound.

    The methods keep the library's code objects; only the globals they run with differ (a copy of
    their module's, with ``time`` replaced), so nothing outside this one object changes. limits
    wraps some storage methods in an error mapper from ``Storage.__init_subclass__``: the code
    rebound is the wrapped original (``__wrapped__``), and making the subclass runs that hook again,
    which wraps the copies the same way. The subclass sets no ``STORAGE_SCHEME``, so limits'
    registry of storages is untouched.
    """
    cls = type(obj)
    newest: dict[str, object] = {}
    for klass in reversed(cls.__mro__):  # a subclass's definition wins
        newest.update(vars(klass))
    fake_time = types.SimpleNamespace(time=clock)
    module_copies: dict[int, dict[str, Any]] = {}
    rebound: dict[str, object] = {"__module__": __name__}
    for name, attr in newest.items():
        wrapper = type(attr) if isinstance(attr, staticmethod | classmethod) else None
        fn = attr.__func__ if isinstance(attr, staticmethod | classmethod) else attr
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        if not isinstance(fn, types.FunctionType) or fn.__globals__.get("time") is not time \
                or not _reads_name(fn.__code__, "time"):
            continue
        module = module_copies.setdefault(id(fn.__globals__), {**fn.__globals__, "time": fake_time})
        copy = types.FunctionType(fn.__code__, module, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
        rebound[name] = wrapper(copy) if wrapper is not None else copy
    if len(rebound) > 1:
        metaclass: Any = type(cls)  # limits' classes have their own (ABCMeta, a storage registry)
        obj.__class__ = metaclass(f"{cls.__name__}OnVirtualTime", (cls,), rebound)
    return len(rebound) - 1


def _reads_name(code: types.CodeType, name: str) -> bool:
    return name in code.co_names or any(
        _reads_name(const, name) for const in code.co_consts if isinstance(const, types.CodeType))


# ---------------------------------------------------------------------------------------------
# Reports (pure: text in, text out)


def format_table(sim: Simulation) -> str:
    trace = sim.trace
    lines = [f"{trace.source}: {len(trace.requests)} requests over {_s(trace.duration_s)}"]
    if trace.outage_start_s is None:
        lines.append("upstream: no failures")
    else:
        recovered = trace.recovered_at_s
        lines.append(f"upstream: outage from {_s(trace.outage_start_s)}, "
                     + (f"recovered at {_s(recovered)}" if recovered is not None else "still failing at the end"))
    rows: list[tuple[str, Callable[[Summary], str]]] = [
        ("admitted", lambda s: str(s.admitted)),
        ("  ok", lambda s: str(s.ok)),
        ("  failed", lambda s: str(s.failed)),
        ("rejected by breaker", lambda s: str(s.rejected_breaker)),
        ("rejected by rate limit", lambda s: str(s.rejected_rate_limit)),
        ("times opened", lambda s: str(s.openings)),
        ("time to open", lambda s: _s(s.time_to_open_s) if s.time_to_open_s is not None
         else "-" if trace.outage_start_s is None else "never"),
        ("time to recover", lambda s: _s(s.time_to_recover_s) if s.time_to_recover_s is not None
         else "-" if trace.recovered_at_s is None else "not by end"),
        ("refused after recovery", lambda s: str(s.refused_after_recovery) if trace.recovered_at_s is not None
         else "-"),
    ]
    summaries = [run.summary for run in sim.runs]
    cells = [[""] + [s.setting.label for s in summaries]]
    cells += [[label] + [show(s) for s in summaries] for label, show in rows]
    widths = [max(len(row[col]) for row in cells) for col in range(len(cells[0]))]
    lines.append("")
    for row in cells:
        text = row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:],
                                                                                       strict=True))
        lines.append(text.rstrip())
    return "\n".join(lines)


def _s(seconds: float) -> str:
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text} s"


def to_json(sim: Simulation) -> str:
    trace = sim.trace
    doc = {
        "source": trace.source,
        "requests": len(trace.requests),
        "duration_s": trace.duration_s,
        "outage_start_s": trace.outage_start_s,
        "recovered_at_s": trace.recovered_at_s,
        "settings": [dataclasses.asdict(run.summary) for run in sim.runs],
    }
    return json.dumps(doc, indent=2)


# ---------------------------------------------------------------------------------------------
# Plot (matplotlib, optional)


def _load_matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SimulateError(f"--plot needs matplotlib: {PLOT_HINT}") from None
    return Figure


def plot(sim: Simulation, path: str, figure_class: Any = None) -> None:
    """Per setting (one column each): the breaker's state as a step line above the outcome stream."""
    figure = (figure_class or _load_matplotlib())(figsize=(max(6.0, 5.0 * len(sim.runs)), 6.0),
                                                  layout="constrained")
    axes = figure.subplots(2, len(sim.runs), sharex=True, squeeze=False, height_ratios=[1, 2])
    trace = sim.trace
    end = max(trace.duration_s, max((t.t for run in sim.runs for t in run.summary.transitions), default=0.0))
    width = _bin_width(end)
    bins = max(1, math.ceil(end / width))
    colors = {SENT_OK: "tab:green", SENT_ERROR: "tab:red", BY_BREAKER: "tab:gray", BY_RATE_LIMIT: "tab:orange"}
    names = {SENT_OK: "ok", SENT_ERROR: "failed", BY_BREAKER: "rejected by breaker",
             BY_RATE_LIMIT: "rejected by rate limit"}
    for col, run in enumerate(sim.runs):
        top, bottom = axes[0][col], axes[1][col]
        times = [t.t for t in run.summary.transitions] + [end]
        levels = [STATE_LEVEL[t.state] for t in run.summary.transitions]
        top.step(times, levels + levels[-1:], where="post", color="tab:blue")
        top.set_yticks([0, 1, 2], [CLOSED, HALF_OPEN, OPEN])
        top.set_ylim(-0.3, 2.3)
        top.set_title(run.summary.setting.label, fontsize="medium")
        counts = {kind: [0] * bins for kind in colors}
        for request, decision in zip(trace.requests, run.decisions, strict=True):
            counts[decision][min(bins - 1, int(request.ts / width))] += 1
        stacked = [0.0] * bins
        edges = [i * width for i in range(bins + 1)]
        for kind, color in colors.items():
            rates = [c / width for c in counts[kind]]
            if any(rates):  # one filled step patch per kind, stacked on the ones below
                top_edge = [a + b for a, b in zip(stacked, rates, strict=True)]
                bottom.stairs(top_edge, edges, baseline=stacked, fill=True, color=color, label=names[kind])
                stacked = top_edge
        for ax in (top, bottom):
            for at, style in ((trace.outage_start_s, ":"), (trace.recovered_at_s, "--")):
                if at is not None:
                    ax.axvline(at, color="black", linestyle=style, linewidth=0.8)
        bottom.set_xlabel("seconds (dotted: outage starts, dashed: upstream recovered)")
        bottom.set_xlim(0, end)
        bottom.legend(loc="upper right", fontsize="small")
        if col == 0:
            top.set_ylabel("breaker")
            bottom.set_ylabel(f"requests/s ({_s(width)} bins)")
    figure.savefig(path, format="png", dpi=100)


def _bin_width(duration: float) -> float:
    for width in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600):
        if duration / width <= 150:
            return float(width)
    return duration / 150


# ---------------------------------------------------------------------------------------------
# Command line (the thin shell)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``llmsrv breaker simulate``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE",
                        help="CSV with header ts,outcome (or JSONL with those keys); ts in seconds from 0, "
                             "outcome ok|error; - reads stdin")
    source.add_argument("--pattern", metavar="SPEC",
                        help="comma-separated phases: ok:60s, outage:30s, err=5%%:60s (durations in s or m)")
    parser.add_argument("--rate", type=float, metavar="RPS",
                        help=f"requests a second for --pattern (default {DEFAULT_RATE:g})")
    parser.add_argument("--setting", action="append", required=True, metavar="threshold=N,ttl=S[,...]",
                        help="breaker (and rate limit) setting to compare, one column each; keys: threshold, "
                             "ttl (seconds), probes (half-open probes, default 1), rpm (e.g. 600/minute), "
                             "latency (seconds per call, default 0)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help=f"draw breaker state and outcomes over time (needs matplotlib: {PLOT_HINT})")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of the table")


def run(args: argparse.Namespace) -> int:
    """Run ``llmsrv breaker simulate``; bad input prints one line to stderr and returns 2."""
    try:
        figure_class = _load_matplotlib() if args.plot else None
        settings = [parse_setting(text) for text in args.setting]
        trace = _load_trace(args)
        sim = simulate(trace, settings)
        if args.plot:
            try:
                plot(sim, args.plot, figure_class)
            except OSError as exc:
                raise SimulateError(f"cannot write the plot {args.plot}: {exc.strerror or exc}") from None
    except SimulateError as exc:
        print(f"llmsrv breaker simulate: {exc}", file=sys.stderr)
        return 2
    print(to_json(sim) if args.json else format_table(sim))
    if args.plot and not args.json:
        print(f"\nplot: {args.plot}")
    return 0


def _load_trace(args: argparse.Namespace) -> Trace:
    if args.pattern is not None:
        return parse_pattern(args.pattern, DEFAULT_RATE if args.rate is None else args.rate)
    if args.rate is not None:
        raise SimulateError("--rate applies to --pattern only (a trace carries its own times)")
    path: str = args.trace
    try:
        if path == "-":
            return parse_trace(sys.stdin.read(), "stdin")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise SimulateError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise SimulateError(f"cannot read the trace {path}: {exc.strerror or exc}") from None
    return parse_trace(text, path)
