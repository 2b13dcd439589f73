"""The Grafana dashboard and the Prometheus alert rules (docs/) against what llmsrv really exports.

A real llmsrv (real nats-server, the mock provider) serves requests chosen so that every labelled
series exists (ok, errors, OVERLOADED, cancellations, rate limits, an open per-model breaker, NATS
drops); /metrics is scraped over HTTP, and every metric name, label name and enumerated label value
that a dashboard query or an alert expression uses must be in that scrape. The files' structure is
checked too, and, when ``promtool`` is installed, the rules, the dashboard's PromQL and a few alert
expressions on synthetic series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmsrv import errors
from llmsrv.natsserver import NatsServer, free_port

from .conftest import running, user

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "llmsrv-dashboard.json"
RULES = ROOT / "docs" / "prometheus" / "llmsrv-alerts.yml"
ENC = msgspec.json.encode

# Labels Prometheus attaches at scrape time (not in the exposition), and the histogram bucket label.
TARGET_LABELS = frozenset({"job", "instance"})
# Non-llmsrv series the rules may use: Prometheus' own per-target series.
FOREIGN_METRICS = frozenset({"up"})
COUNTER_FUNCTIONS = ("rate", "irate", "increase", "resets")  # meaningful on counters only
SEVERITIES = frozenset({"critical", "warning", "info"})
# Grafana's variables, replaced by something PromQL accepts when promtool parses the dashboard.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*"}


# ---- the scrape ------------------------------------------------------------------------------------

async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll in-process state (no event exists for it); ``timeout_s`` only bounds a failure."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


async def _exercise_and_scrape(nats_url: str) -> str:
    """Serve requests that create every labelled series, then GET /metrics over HTTP."""
    mock: dict[str, Any] = {"rpm": "30/hour", "tokens_per_second": 200, "breaker_threshold": 1,
                            "breaker_scope": "model",
                            "prices": {"echo": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}}}
    async with running(nats_url, server={"http_port": free_port(), "max_inflight": 1, "max_queue_ms": 600000},
                       nats={"pending_msgs_limit": 5}, routing={"retry": {"max_attempts": 1}},
                       providers={"mock": mock}) as h:
        provider = h.service.providers["mock"]

        def calls() -> int:
            return int(provider.statistics().calls)  # type: ignore[attr-defined]

        # llmsrv_nats_dropped_total: a burst of cancels far over the pending limit of 5. A request sent
        # after it on the same connection is answered after every burst message was read.
        cancel = h.service.subject_cancel
        for _ in range(5):
            for i in range(3000):
                h.client.bus.publish_nowait(cancel, ENC({"correlation_id": f"nobody-{i}"}))
            await h.client.bus.flush()
            assert (await h.client.complete({"messages": user("sync"), "model": "mock:echo"}, timeout_s=30)).text
            if h.service.bus.dropped:
                break
        assert h.service.bus.dropped, "no slow-consumer drop in 5 bursts"
        # ok, streamed (time to first chunk), tokens and cost
        await h.client.stream({"messages": user("a b c"), "model": "mock:echo"}, lambda chunk: None)
        # validation_error (no provider); provider_error + an open per-model breaker (threshold 1)
        await h.error_of(ENC({"messages": []}))
        failed = await h.error_of(ENC({"messages": user(), "model": "mock:fail"}))
        assert failed["error_code"] == "PROVIDER_ERROR", failed
        # timeout: a deadline cancellation
        timed_out = await h.error_of(ENC({"messages": user(), "model": "mock:lorem", "timeout_ms": 20}))
        assert timed_out["error_code"] == "TIMEOUT", timed_out
        await _until(lambda: not h.service.statistics().counters.inflight)
        # overloaded (max_inflight = 1, one slow request in flight), then that request cancelled by its client
        before = calls()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(h.client.complete, {"messages": user(), "model": "mock:lorem", "max_tokens": 2000})
                await _until(lambda: calls() > before)
                refused = await h.error_of(ENC({"messages": user(), "model": "mock:echo"}))
                assert refused["error_code"] == "OVERLOADED", refused
                scope.cancel()
        await _until(lambda: not h.service.statistics().counters.inflight)
        # rate_limited: spend the rest of the 30/hour budget (each refusal is answered at once)
        for _ in range(40):
            try:
                await h.client.complete({"messages": user(), "model": "mock:echo"})
            except errors.ReplyError as exc:
                assert exc.error_code == "RATE_LIMITED", exc
                break
        else:
            pytest.fail("never rate limited")
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"http://127.0.0.1:{h.service.http_port}/metrics")
    assert reply.status_code == 200, reply.text
    return reply.text


@pytest.fixture(scope="module")
def scrape(nats_server: NatsServer) -> str:
    """One scrape for the module's tests (a sync fixture: its own trio run, outside any test's)."""
    return trio.run(_exercise_and_scrape, nats_server.url)


@dataclass
class Exported:
    """What one scrape holds: by sample name (``llmsrv_requests_total``, ``..._bucket``)."""

    kind: dict[str, str] = field(default_factory=dict)  # sample name -> family type
    labels: dict[str, set[str]] = field(default_factory=dict)  # sample name -> label names
    values: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # sample name -> label -> values

    @classmethod
    def parse(cls, text: str) -> Exported:
        out = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.kind[sample.name] = family.type
                out.labels.setdefault(sample.name, set()).update(sample.labels)
                values = out.values.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    values.setdefault(label, set()).add(value)
        return out


# ---- PromQL, as far as these files use it ------------------------------------------------------------

_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_BARE_LLMSRV = re.compile(r"\bllmsrv_[a-z0-9_]+\b")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_AGGREGATION = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)\s*")
_IN_COUNTER_FUNCTION = re.compile(r"\b(?:" + "|".join(COUNTER_FUNCTIONS) + r")\s*\(\s*(llmsrv_[a-z0-9_]+)")


@dataclass(frozen=True)
class Matcher:
    metric: str
    label: str
    op: str
    value: str


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Every ``llmsrv_*`` series name in ``expr`` (not inside a string), suffix and all."""
    return set(_BARE_LLMSRV.findall(_strip_strings(expr)))


def matchers(expr: str) -> list[Matcher]:
    found = []
    for metric, body in _SELECTOR.findall(expr):
        if not body.strip():
            continue
        consumed = 0
        for m in _MATCHER.finditer(body):
            assert m.start() == consumed, f"cannot parse the selector {metric}{{{body}}}"
            consumed = m.end()
            found.append(Matcher(metric, m.group(1), m.group(2), m.group(3)))
        assert consumed == len(body), f"cannot parse the selector {metric}{{{body}}}"
    return found


def grouping_labels(expr: str) -> set[str]:
    """Label names of ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    return {label.strip() for _, labels in _GROUPING.findall(_strip_strings(expr))
            for label in labels.split(",") if label.strip()}


def _balanced(expr: str, start: int) -> str:
    """The text from ``start`` (just after an opening parenthesis) to its closing one."""
    depth = 1
    for i in range(start, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return expr[start:i]
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def _call_arguments(expr: str, function: str) -> Iterator[str]:
    """The argument text of each call of ``function`` in ``expr``."""
    for m in re.finditer(r"\b" + re.escape(function) + r"\s*\(", expr):
        yield _balanced(expr, m.end())


def aggregations(expr: str) -> Iterator[tuple[set[str], str]]:
    """(labels, argument) of each ``sum by (labels) (argument)`` (the prefix form; the suffix form is refused)."""
    expr = _strip_strings(expr)
    for m in _AGGREGATION.finditer(expr):
        assert expr[m.end():m.end() + 1] == "(", f"write 'sum by (...) (...)', not 'sum(...) by (...)': {expr!r}"
        yield {label.strip() for label in m.group(1).split(",") if label.strip()}, _balanced(expr, m.end() + 1)


# ---- the files ---------------------------------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every PromQL text in the dashboard: panel targets and query variables."""
    d = load_dashboard()
    out = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
           for p in d["panels"] if p.get("type") != "row" for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


def load_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def rule_queries() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in alert_rules()]


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; or the Prometheus release tarball)")
    return found


# ---- every name used is exported ------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_and_label_used_is_exported(scrape: str, source: str) -> None:
    exported = Exported.parse(scrape)
    outcomes = {"ok"} | {cls.error_code.lower() for cls in _subclasses(errors.LlmsrvError)
                         if isinstance(getattr(cls, "error_code", None), str)}
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    used: set[str] = set()
    problems = []
    for where, expr in queries:
        names = metric_names(expr)
        used |= names
        for name in sorted(names - exported.kind.keys()):
            problems.append(f"{where}: {name} is not exported")
        known = [n for n in names if n in exported.kind]
        for metric in {metric for metric, _ in _SELECTOR.findall(expr)}:
            if not metric.startswith("llmsrv_") and metric not in FOREIGN_METRICS:
                problems.append(f"{where}: unexpected series {metric}")
        # counters and histogram parts go through rate()/increase(); a gauge never does
        in_counter_function = set(_IN_COUNTER_FUNCTION.findall(_strip_strings(expr)))
        for name in known:
            counted = exported.kind[name] in ("counter", "histogram")
            if counted and name not in in_counter_function:
                problems.append(f"{where}: {exported.kind[name]} {name} used without rate()/increase()")
            if not counted and name in in_counter_function:
                problems.append(f"{where}: {name} is a {exported.kind[name]}: rate()/increase() mean nothing")
        # histogram_quantile over a rate of _bucket, grouped by le
        for argument in _call_arguments(expr, "histogram_quantile"):
            if not any(n.endswith("_bucket") for n in metric_names(argument)):
                problems.append(f"{where}: histogram_quantile without a _bucket series")
            if "le" not in grouping_labels(argument):
                problems.append(f"{where}: histogram_quantile does not keep le")
        # an aggregation's labels are on every llmsrv series it aggregates (or are target labels)
        for labels, argument in aggregations(expr):
            inside = [n for n in metric_names(argument) if n in exported.kind]
            common = set.intersection(*(exported.labels[n] for n in inside)) if inside else set()
            for label in sorted(labels - common - TARGET_LABELS):
                problems.append(f"{where}: aggregation label {label!r} is not on {sorted(inside)}")
        # vector matching (on, ignoring, group_*): labels every llmsrv series of the expression has
        shared = set.intersection(*(exported.labels[n] for n in known)) if known else set()
        for label in sorted(grouping_labels(_AGGREGATION.sub("", _strip_strings(expr))) - shared - TARGET_LABELS):
            problems.append(f"{where}: vector matching on {label!r}, not on all of {sorted(known)}")
        for m in matchers(expr):
            if m.metric in FOREIGN_METRICS:
                continue
            if m.label not in exported.labels.get(m.metric, set()) | TARGET_LABELS:
                problems.append(f"{where}: {m.metric} has no label {m.label!r}")
                continue
            if m.label in TARGET_LABELS or "$" in m.value:
                continue
            # enumerated values: outcome from the error codes, any other from what was exported
            allowed = outcomes if m.label == "outcome" else exported.values[m.metric].get(m.label, set())
            values = m.value.split("|") if m.op in ("=~", "!~") else [m.value]
            if m.op in ("=~", "!~"):
                assert all(re.fullmatch(r"[a-z_-]+", v) for v in values), f"{where}: regex too clever: {m.value}"
            for v in values:
                if v not in allowed:
                    problems.append(f"{where}: {m.metric}{{{m.label}}} never has the value {v!r}")
    assert not problems, "\n".join(problems)
    assert used, f"no llmsrv metric found in the {source}"


def _subclasses(cls: type[errors.LlmsrvError]) -> Iterator[type[errors.LlmsrvError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_the_dashboard_shows_every_exported_metric(scrape: str) -> None:
    exported = Exported.parse(scrape).kind
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in exported if name.startswith("llmsrv_")}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", name) for _, expr in dashboard_queries()
             for name in metric_names(expr)}
    assert families - shown == set(), f"exported but on no panel: {sorted(families - shown)}"


def test_promtool_lints_the_exposition(scrape: str) -> None:
    result = subprocess.run([_promtool(), "check", "metrics"], input=scrape, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the files' structure ---------------------------------------------------------------------------------

def test_dashboard_structure() -> None:
    d = load_dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    assert d.get("id") is None  # no database id: importable into any Grafana
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert re.fullmatch(r"label_values\(llmsrv_[a-z_]+,\s*instance\)", instance["query"]["query"])
    ids: set[int] = set()
    titles: set[str] = set()
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    for p in d["panels"]:
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert isinstance(p["id"], int) and p["id"] not in ids, f"{where}: id missing or not unique"
        ids.add(p["id"])
        assert p["title"] and p["title"] not in titles, f"{where}: title missing or not unique"
        titles.add(p["title"])
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["h"] > 0 and g["w"] > 0, where
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{where}: wider than the grid"
        for other, (ox, oy, ow, oh) in boxes:
            assert (g["x"] >= ox + ow or ox >= g["x"] + g["w"] or g["y"] >= oy + oh or oy >= g["y"] + g["h"]), \
                f"{where} overlaps {other}"
        boxes.append((where, (g["x"], g["y"], g["w"], g["h"])))
        if p["type"] == "row":
            assert not p.get("targets") and not p.get("collapsed"), where
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["targets"], f"{where}: no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), f"{where}: refIds not unique"
        for t in p["targets"]:
            assert t["expr"].strip(), f"{where}: empty expr"
            assert t.get("datasource", p["datasource"]) == p["datasource"], where
            for metric, body in _SELECTOR.findall(t["expr"]):  # every series is filtered by the instance variable
                assert 'instance=~"$instance"' in body, f"{where}: {metric} not filtered by $instance"
            assert not _BARE_LLMSRV.search(_SELECTOR.sub("", t["expr"])), f"{where}: a series without {{...}}"


def test_rules_structure() -> None:
    text = RULES.read_text()
    rules = load_rules()
    groups = rules["groups"]
    assert len({g["name"] for g in groups}) == len(groups) and all(g["rules"] for g in groups)
    names = [rule["alert"] for rule in alert_rules()]
    assert len(set(names)) == len(names), "alert names not unique"
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Llmsrv[A-Z][A-Za-z]+", name), name
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, f"{name}: {sorted(rule)}"
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smhdwy]", rule["for"]), f"{name}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), name
    # every alert explained: a comment right above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*- alert:", line):
            assert lines[i - 1].lstrip().startswith("#"), f"line {i + 1}: {line.strip()} has no comment above it"


# ---- promtool --------------------------------------------------------------------------------------------

def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout, result.stdout


def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    """Each dashboard expression (Grafana's variables replaced) as a recording rule: promtool parses it."""
    promtool = _promtool()
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries()):
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _expr(alert: str) -> str:
    expr: str = next(rule["expr"] for rule in alert_rules() if rule["alert"] == alert)
    return expr


def test_promtool_evaluates_alert_expressions(tmp_path: Path) -> None:
    """Some alert expressions on synthetic series (promtool's rule unit tests, 1 minute steps)."""
    promtool = _promtool()
    target = 'job="llmsrv",instance="a:9464"'

    def requests(outcome: str, per_minute: int) -> dict[str, str]:
        return {"series": f'llmsrv_requests_total{{{target},provider="mock",model="echo",outcome="{outcome}"}}',
                "values": f"0+{per_minute}x30"}

    cases = [
        # 0.5/s provider_error, 0.5/s ok, 1/s validation_error (the caller's: not counted) -> 25 % server side
        ([requests("ok", 30), requests("provider_error", 30), requests("validation_error", 60)],
         _expr("LlmsrvErrorRatioHigh"), [{"labels": '{job="llmsrv"}', "value": 0.25}]),
        # only the caller's errors: no alert
        ([requests("ok", 30), requests("validation_error", 600)], _expr("LlmsrvErrorRatioHigh"), []),
        # 1 of 4 requests OVERLOADED
        ([requests("ok", 45), requests("overloaded", 15)], _expr("LlmsrvOverloaded"),
         [{"labels": '{job="llmsrv"}', "value": 0.25}]),
        # 3 in flight and nothing finished for 15 minutes: stuck; on another instance requests finish
        ([{"series": f"llmsrv_inflight_requests{{{target}}}", "values": "3x30"},
          {"series": f"llmsrv_request_duration_seconds_count{{{target}}}", "values": "7x30"},
          {"series": 'llmsrv_inflight_requests{job="llmsrv",instance="b:9464"}', "values": "3x30"},
          {"series": 'llmsrv_request_duration_seconds_count{job="llmsrv",instance="b:9464"}', "values": "0+1x30"}],
         _expr("LlmsrvRequestsStuck"), [{"labels": f"llmsrv_inflight_requests{{{target}}}", "value": 3}]),
        # open and half-open in turn (failing probes): not recovering; a breaker that closed once: fine
        ([{"series": f'llmsrv_breaker_state{{{target},provider="claude"}}', "values": "2 1 2 1 2 1 2 1 2 1 " * 3},
          {"series": f'llmsrv_breaker_state{{{target},provider="gemini"}}', "values": "2 2 2 2 2 2 2 2 0 2 " * 3}],
         _expr("LlmsrvBreakerNotRecovering"), [{"labels": f'{{{target},provider="claude"}}', "value": 1}]),
        # every provider open on one instance
        ([{"series": f'llmsrv_breaker_state{{{target},provider="claude"}}', "values": "2x30"},
          {"series": f'llmsrv_breaker_state{{{target},provider="mock"}}', "values": "2x30"},
          {"series": 'llmsrv_breaker_state{job="llmsrv",instance="b:9464",provider="mock"}', "values": "0x30"}],
         _expr("LlmsrvAllProvidersOpen"), [{"labels": f"{{{target}}}", "value": 2}]),
    ]
    tests = [{"interval": "1m", "input_series": series,
              "promql_expr_test": [{"expr": expr, "eval_time": "20m", "exp_samples": samples}]}
             for series, expr, samples in cases]
    path = tmp_path / "alerts-test.yml"
    path.write_text(json.dumps({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
