"""Operator control of the breakers and the status table.

``Breaker.force_open`` / ``force_close`` on virtual time, ``ProviderGuard.force`` per scope, the
status table (pure, table-driven), then ``llmsrv breaker open|close|reset`` and ``llmsrv status``
as real CLI processes against a real nats-server and service.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from llmsrv import errors
from llmsrv.client import ReplyError
from llmsrv.config import ProviderConfig
from llmsrv.messages import Usage
from llmsrv.providers import Completion
from llmsrv.resilience import CLOSED, HALF_OPEN, OPEN, Breaker, ProviderGuard, call_guarded
from llmsrv.statusview import _duration, render_breaker_replies, render_status

from .conftest import Harness, running, user
from .test_resilience import Clock

ENC = msgspec.json.encode
OK = Completion(text="ok", usage=Usage(1, 1))


# ---- Breaker: forced states on a virtual clock ------------------------------------------------------

def test_forced_open_refuses_until_closed_and_reports_open() -> None:
    clock, seen = Clock(), []
    b = Breaker("p", threshold=2, ttl_s=10, clock=clock, on_transition=lambda *a: seen.append(a))
    b.force_open()
    assert b.state == OPEN and b.forced and seen == [("p", CLOSED, OPEN)]
    clock.now = 3600  # far past the TTL: no half-open, no probe
    for _ in range(3):
        with pytest.raises(errors.CircuitOpen) as info:
            b.admit()
        assert info.value.retry_after_ms == 10000 and "forced open" in info.value.message
    snap = b.statistics()
    assert (snap.state, snap.forced, snap.retry_after_s) == (OPEN, True, 0.0)
    assert b.blocked_for() == 10 and b.open_until() is None  # not published to a fleet board: no end
    assert not b.is_clean()
    b.force_close()
    assert (b.state, b.forced, seen[-1]) == (CLOSED, False, ("p", OPEN, CLOSED))
    b.record(b.admit(), "success")


def test_forced_open_is_not_closed_by_a_half_open_probe() -> None:
    clock, seen = Clock(), []
    b = Breaker("p", threshold=1, ttl_s=5, clock=clock, on_transition=lambda *a: seen.append(a[1:]))
    b.record(b.admit(), "failure")
    clock.now = 6
    probe = b.admit()
    assert b.state == HALF_OPEN and probe.probe
    b.force_open()  # while the probe is out
    b.record(probe, "success")  # admitted before: decides nothing, but frees its slot
    assert b.state == OPEN and b.forced and b.statistics().probes_in_flight == 0
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_force_open_of_an_open_breaker_reports_no_transition_and_keeps_it_open() -> None:
    clock, seen = Clock(), []
    b = Breaker("p", threshold=1, ttl_s=5, clock=clock, on_transition=lambda *a: seen.append(a[1:]))
    b.record(b.admit(), "failure")
    b.force_open()
    assert seen == [(CLOSED, OPEN)]
    clock.now = 100
    with pytest.raises(errors.CircuitOpen):
        b.admit()
    assert b.state == OPEN


def test_force_close_clears_the_count_and_ignores_calls_admitted_before() -> None:
    clock, seen = Clock(), []
    b = Breaker("p", threshold=2, ttl_s=5, clock=clock, on_transition=lambda *a: seen.append(a[1:]))
    slow = b.admit()
    b.record(b.admit(), "failure")
    b.force_close()
    assert b.statistics().failures == 0 and seen == []  # closed already: only the count was cleared
    b.record(slow, "failure")  # admitted before the close: not counted
    assert b.statistics().failures == 0
    for _ in range(2):  # not forced closed: new failures open it again, on its TTL
        b.record(b.admit(), "failure")
    assert b.state == OPEN and not b.forced and b.blocked_for() == 5


async def test_forced_open_guard_on_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    guard = ProviderGuard("p", ProviderConfig(breaker_threshold=2, breaker_ttl_s=5))
    calls = 0

    async def call() -> Completion:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        return OK

    start = trio.current_time()
    guard.force("open")
    for _ in range(3):
        with pytest.raises(errors.CircuitOpen):
            await call_guarded(guard, 1, 30, call)
        await trio.sleep(60)  # twelve TTLs later: still refused
    assert calls == 0 and trio.current_time() - start == 180
    guard.force("close")
    assert (await call_guarded(guard, 1, 30, call)).text == "ok"
    assert calls == 1 and trio.current_time() - start == 181


def test_guard_force_by_scope() -> None:
    per_model = ProviderGuard("mock", ProviderConfig(breaker_threshold=2, breaker_ttl_s=5), clock=Clock())
    made = per_model.force("open", "echo")  # no breaker yet: one is made
    assert made is per_model.models["echo"] and made.name == "mock:echo" and made.forced
    with pytest.raises(errors.CircuitOpen):
        per_model.models["echo"].admit()
    per_model.breaker.admit()  # the provider and its other models are untouched
    assert per_model.model_breaker("lorem") is not None and per_model.models["lorem"].state == CLOSED
    per_model.force("open")
    assert per_model.breaker.forced
    per_model.force("close")  # the provider's breaker only
    assert not per_model.breaker.forced and per_model.models["echo"].forced
    per_model.force("open")
    per_model.force("reset")  # the provider's and every model's: a fresh start
    assert not per_model.breaker.forced and per_model.models == {}
    per_model.force("open", "echo")
    assert per_model.force("reset", "echo").state == CLOSED

    provider_scope = ProviderGuard("mock", ProviderConfig(breaker_scope="provider"), clock=Clock())
    with pytest.raises(errors.ValidationFailed) as info:
        provider_scope.force("open", "echo")
    assert 'breaker_scope = "provider"' in info.value.message and "$.model" in info.value.message
    with pytest.raises(errors.ValidationFailed, match=r"\$\.action"):
        provider_scope.force("shut")


# ---- the status table (pure) --------------------------------------------------------------------

def _breaker(state: str = "closed", failures: int = 0, retry: float = 0.0, forced: bool = False) -> dict[str, Any]:
    return {"state": state, "failures": failures, "retry_after_s": retry, "probes_in_flight": 0,
            "threshold": 5, "ttl_s": 30.0, "forced": forced}


def _status(instance: str = "a1", **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "status": "ok", "uptime_s": 192.4, "nats": "connected", "instance_id": instance, "version": "0.1.0",
        "inflight": 2, "queue_delay_ms": 1.3,
        "providers": {"mock": {"available": True, "state": "available", "reason": None, "breaker": "closed"},
                      "claude": {"available": False, "state": "missing", "reason": "no key", "breaker": "closed"}},
        "breakers": {
            "mock": {"breaker": _breaker(), "rate": {"limited": None, "retry_after_s": 0.0}, "in_flight": 2,
                     "max_concurrency": 100, "models": {}},
            "claude": {"breaker": _breaker(), "rate": {"limited": None, "retry_after_s": 0.0}, "in_flight": 0,
                       "max_concurrency": 64, "models": {}}},
        "stats": {"inflight": 2, "workers": 3, "idle_workers": 1, "requests": 40, "errors": 3,
                  "processing_ns": 1, "last_error": "PROVIDER_ERROR", "queue_delay_ms": 1.3,
                  "loop_lag_ms": 4.2},
    }
    for path, value in over.items():
        *keys, last = path.split("__")
        target = doc
        for key in keys:
            target = target[key]
        target[last] = value
    return doc


HEADER = ("instance a1  llmsrv 0.1.0  up 3m12s  nats connected  draining no\n"
          "in-flight 2  requests 40  errors 3 (last PROVIDER_ERROR)  queue delay 1.3 ms  loop lag 4.2 ms\n\n")
TABLE = "PROVIDER  STATE      BREAKER  FAILURES  RETRY-AFTER  RATE LIMIT  IN-FLIGHT\n"


@pytest.mark.parametrize(("docs", "expected"), [
    ([_status()],
     HEADER + TABLE
     + "mock      available  closed   0/5       -            ok          2/100\n"
       "claude    missing    closed   0/5       -            ok          0/64"),
    ([_status(breakers__mock__breaker=_breaker("open", 5, 28.14), providers__mock__breaker="open",
              breakers__mock__rate={"limited": "rpm", "retry_after_s": 42.0})],
     HEADER + "PROVIDER  STATE      BREAKER  FAILURES  RETRY-AFTER  RATE LIMIT  IN-FLIGHT\n"
     "mock      available  open     5/5       28.1s        rpm 42s     2/100\n"
     "claude    missing    closed   0/5       -            ok          0/64"),
    ([_status(breakers__mock__models={"fail": _breaker("open", 5, 29.5), "slow": _breaker("closed", 2),
                                      "echo": _breaker("open", forced=True)},
              breakers__claude__breaker=_breaker("half-open", 5))],
     HEADER + "PROVIDER     STATE      BREAKER        FAILURES  RETRY-AFTER   RATE LIMIT  IN-FLIGHT\n"
     "mock         available  closed         0/5       -             ok          2/100\n"
     "  mock:fail             open           5/5       29.5s\n"
     "  mock:echo             open (forced)  0/5       until closed\n"
     "claude       missing    half-open      5/5       -             ok          0/64"),
    ([_status("b2", status="draining", uptime_s=7322.0, nats="disconnected", providers={}, breakers={},
              stats__last_error="", stats__errors=0),
      _status("a1", providers={}, breakers={})],
     HEADER + "PROVIDER  STATE  BREAKER  FAILURES  RETRY-AFTER  RATE LIMIT  IN-FLIGHT\n\n"
     "instance b2  llmsrv 0.1.0  up 2h02m  nats disconnected  draining yes\n"
     "in-flight 2  requests 40  errors 0  queue delay 1.3 ms  loop lag 4.2 ms\n\n"
     "PROVIDER  STATE  BREAKER  FAILURES  RETRY-AFTER  RATE LIMIT  IN-FLIGHT"),
    ([{"error": "no provider 'x'", "error_code": "PROVIDER_NOT_FOUND", "instance_id": "c3"}],
     "instance c3: PROVIDER_NOT_FOUND: no provider 'x'"),
    ([{"instance_id": "old", "providers": {"mock": {"available": True}}}],  # an older instance: little known
     "instance old  llmsrv ?  up ?  nats ?  draining no\n"
     "in-flight ?  requests ?  errors ?  queue delay ?  loop lag ?\n\n"
     "PROVIDER  STATE      BREAKER  FAILURES  RETRY-AFTER  RATE LIMIT  IN-FLIGHT\n"
     "mock      available  ?        ?         -            ?           ?"),
], ids=["healthy", "open-and-rate-limited", "model-rows", "two-instances-sorted", "error-reply", "sparse"])
def test_status_table(docs: list[dict[str, Any]], expected: str) -> None:
    assert render_status(docs) == expected


@pytest.mark.parametrize(("docs", "expected"), [
    ([{"instance_id": "b2", "provider": "mock", "model": "echo", "action": "open",
       "breaker": _breaker("open", forced=True)},
      {"instance_id": "a1", "provider": "mock", "model": "echo", "action": "open",
       "breaker": _breaker("open", forced=True)}],
     "INSTANCE  BREAKER    STATE          FAILURES  RETRY-AFTER\n"
     "a1        mock:echo  open (forced)  0/5       until closed\n"
     "b2        mock:echo  open (forced)  0/5       until closed"),
    ([{"instance_id": "a1", "provider": "mock", "model": None, "action": "close", "breaker": _breaker()},
      {"error": "Invalid enum value 'x' - at `$.action`", "error_code": "VALIDATION_ERROR"}],
     "INSTANCE  BREAKER  STATE   FAILURES  RETRY-AFTER\n"
     "a1        mock     closed  0/5       -\n"
     "VALIDATION_ERROR: Invalid enum value 'x' - at `$.action`"),
], ids=["forced-open-everywhere", "with-an-error"])
def test_breaker_replies_table(docs: list[dict[str, Any]], expected: str) -> None:
    assert render_breaker_replies(docs) == expected


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"), (0.25, "0.25s"), (9.999, "10s"), (12.34, "12.3s"), (59.96, "60s"), (60, "1m00s"),
    (192.4, "3m12s"), (7322, "2h02m"), (3 * 86400 + 4 * 3600 + 59, "3d04h"), (None, "?"), (-1, "?"),
    (True, "?"), ("5", "?"),
])
def test_duration(seconds: object, shown: str) -> None:
    assert _duration(seconds) == shown


# ---- over NATS: the admin subject and the CLI ----------------------------------------------------

async def cli(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    """``llmsrv <args>`` in a process of its own, on the harness's nats-server and subject prefix."""
    env = {**os.environ, "LLMSRV_CONFIG": "", "LLMSRV__NATS__SUBJECT_PREFIX": h.prefix}
    command = [sys.executable, "-m", "llmsrv", *args, "--nats-url", str(h.cfg.nats.url)]
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(command, env=env, capture_output=True, text=True, timeout=60))


async def _code_of(h: Harness, model: str) -> str:
    try:
        await h.client.complete({"messages": user(), "model": model, "timeout_ms": 5000})
    except ReplyError as exc:
        return exc.error_code
    return "OK"


async def test_cli_open_close_reset_a_provider(nats_url: str) -> None:
    async with running(nats_url, server={"http_port": 0}) as h:
        opened = await cli(h, "breaker", "open", "mock")
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout.splitlines()[1].split() == [h.service.instance_id, "mock", "open", "(forced)", "0/5",
                                                         "until", "closed"]
        err = await h.error_of(ENC({"messages": user(), "model": "mock:echo"}))
        assert err["error_code"] == "CIRCUIT_OPEN" and err["retry_after_ms"] == 30000
        assert h.service.providers["mock"].statistics().calls == 0  # type: ignore[attr-defined]

        table = await cli(h, "status")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].startswith(f"instance {h.service.instance_id}  llmsrv ")
        assert "nats connected  draining no" in lines[0] and "errors 1 (last CIRCUIT_OPEN)" in lines[1]
        assert lines[3].split() == ["PROVIDER", "STATE", "BREAKER", "FAILURES", "RETRY-AFTER", "RATE", "LIMIT",
                                    "IN-FLIGHT"]
        mock = next(line for line in lines if line.startswith("mock "))
        assert mock.split() == ["mock", "available", "open", "(forced)", "0/5", "until", "closed", "ok", "0/100000"]
        raw = await cli(h, "status", "--json")
        doc = msgspec.json.decode(raw.stdout)[0]
        assert doc["breakers"]["mock"]["breaker"]["forced"] is True and doc["providers"]["mock"]["breaker"] == "open"

        closed = await cli(h, "breaker", "close", "mock")
        assert closed.returncode == 0 and " closed " in closed.stdout.splitlines()[1]
        assert await _code_of(h, "mock:echo") == "OK"

        await cli(h, "breaker", "open", "mock")
        reset = await cli(h, "breaker", "reset", "mock", "--json")
        assert reset.returncode == 0
        answer = msgspec.json.decode(reset.stdout)
        assert answer == [{"instance_id": h.service.instance_id, "provider": "mock", "model": None, "action": "reset",
                           "breaker": {"state": "closed", "failures": 0, "retry_after_s": 0.0, "probes_in_flight": 0,
                                       "threshold": 5, "ttl_s": 30.0, "forced": False}}]
        assert await _code_of(h, "mock:echo") == "OK"
        metrics = h.service.metrics.render().decode()
    assert 'llmsrv_breaker_transitions_total{provider="mock",to="open"} 2.0' in metrics
    assert 'llmsrv_breaker_transitions_total{provider="mock",to="closed"} 2.0' in metrics


async def test_cli_model_scope_affects_only_that_model_and_falls_back(nats_url: str) -> None:
    matrix = {"general": {"simple": ["mock:echo", "mock:lorem"]}}
    async with running(nats_url, routing={"matrix": matrix}) as h:
        opened = await cli(h, "breaker", "open", "mock:echo")
        assert opened.returncode == 0 and "mock:echo  open (forced)" in opened.stdout
        assert await _code_of(h, "mock:echo") == "CIRCUIT_OPEN"
        assert await _code_of(h, "mock:lorem") == "OK"  # the provider's other models are served
        fell_back = await h.client.complete({"messages": user("route me"), "complexity": "simple"})
        assert fell_back.model == "mock:lorem" and [a.model for a in fell_back.attempts] == ["lorem"]
        health = await h.client.request_json("health")
        assert health["providers"]["mock"]["breaker"] == "closed" and health["providers"]["mock"]["models"] == {
            "echo": "open"}
        table = (await cli(h, "status")).stdout
        assert any(line.split() == ["mock:echo", "open", "(forced)", "0/5", "until", "closed"]
                   for line in table.splitlines())
        assert (await cli(h, "breaker", "close", "mock")).returncode == 0  # the provider's breaker: not echo's
        assert await _code_of(h, "mock:echo") == "CIRCUIT_OPEN"
        assert (await cli(h, "breaker", "reset", "mock")).returncode == 0  # every breaker of mock
        assert await _code_of(h, "mock:echo") == "OK"
        assert h.service.pipeline.guards["mock"].models.keys() <= {"echo", "lorem"}
        reply = await h.client.complete({"messages": user("back"), "complexity": "simple"})
    assert reply.model == "mock:echo"


async def test_cli_bad_input(nats_url: str) -> None:
    async with running(nats_url, providers={"mock": {"breaker_scope": "provider"}}) as h:
        unknown = await cli(h, "breaker", "open", "acme")
        scoped = await cli(h, "breaker", "open", "mock:echo")
        empty = await cli(h, "breaker", "close", "mock:")
        usage = await cli(h, "breaker", "shut", "mock")
        bad_action = await h.client.gather("admin.breaker.state", {"provider": "mock", "action": "shut"}, count=1)
        no_action = await h.client.gather("admin.breaker.state", {"provider": "mock"}, count=1)
        extra = await h.client.gather("admin.breaker.state", {"provider": "mock", "action": "open", "x": 1}, count=1)
        assert h.service.pipeline.guards["mock"].breaker.state == CLOSED  # nothing was forced
        assert await _code_of(h, "mock:echo") == "OK"
    assert unknown.returncode == 1
    assert unknown.stdout.strip() == "PROVIDER_NOT_FOUND: no provider 'acme' on this instance"
    assert scoped.returncode == 1 and scoped.stdout.startswith("VALIDATION_ERROR: provider 'mock' has breaker_scope")
    assert "$.model" in scoped.stdout
    assert empty.returncode == 1 and "VALIDATION_ERROR" in empty.stdout and "$.model" in empty.stdout
    assert usage.returncode == 2 and "invalid choice: 'shut'" in usage.stderr
    assert bad_action[0]["error_code"] == "VALIDATION_ERROR" and "$.action" in bad_action[0]["error"]
    assert no_action[0]["error_code"] == "VALIDATION_ERROR" and "`action`" in no_action[0]["error"]
    assert extra[0]["error_code"] == "VALIDATION_ERROR" and "unknown field `x`" in extra[0]["error"]


async def test_every_instance_answers_with_its_breaker(nats_url: str) -> None:
    fleet = {"subject_prefix": f"f{uuid.uuid4().hex[:8]}"}
    async with running(nats_url, nats=fleet) as a, running(nats_url, nats=fleet) as b:
        done = await a.client.gather("admin.breaker.state", {"provider": "mock", "model": "echo", "action": "open"},
                                     count=2)
        assert sorted(r["instance_id"] for r in done) == sorted([a.service.instance_id, b.service.instance_id])
        assert all(r["breaker"]["state"] == "open" and r["breaker"]["forced"] for r in done)
        for h in (a, b):
            assert h.service.pipeline.guards["mock"].models["echo"].forced
        text = await cli(a, "breaker", "reset", "mock:echo")
        assert text.returncode == 0 and len(text.stdout.splitlines()) == 3  # header + one row per instance
        assert not any(h.service.pipeline.guards["mock"].models["echo"].forced for h in (a, b))
        tuned = await a.client.gather("admin.breaker.set", {"provider": "mock", "threshold": 3}, count=2)
        assert [r["threshold"] for r in tuned] == [3, 3]  # breaker set: as before


async def test_close_withdraws_a_shared_opening(nats_url: str, redis_url: str) -> None:
    shared = {"storage_uri": redis_url, "breaker_sync_s": 0.05, "retry": {"max_attempts": 1}}
    fleet = {"queue": f"fleet-{uuid.uuid4().hex[:6]}"}  # one queue group shares one board (prefixes differ)
    failing = {"mock": {"error_rate": 1.0, "breaker_threshold": 1, "breaker_ttl_s": 30}}
    async with running(nats_url, nats=fleet, routing=shared, providers=failing) as a, \
            running(nats_url, nats=fleet, routing=shared) as b:
        assert (await b.client.complete({"messages": user("fine"), "model": "mock:echo"})).text == "fine"
        assert (await a.error_of(ENC({"messages": user(), "model": "mock:echo"})))["error_code"] == "PROVIDER_ERROR"
        echo = b.service.pipeline.guards["mock"].models["echo"]
        with trio.fail_after(5):  # a's opening reached b through Redis
            while echo.state != OPEN:
                await trio.sleep(0.02)
        for h in (a, b):  # what `llmsrv breaker close mock:echo` sends; each fleet member gets it
            closed = await h.client.gather("admin.breaker.state", {"provider": "mock", "model": "echo",
                                                                   "action": "close"}, count=1)
            assert closed[0]["breaker"]["state"] == "closed"
        await trio.sleep(0.5)  # ten board rounds: the withdrawn opening is not adopted again
        assert echo.state == CLOSED
        assert (await b.client.complete({"messages": user("again"), "model": "mock:echo"})).text == "again"


async def test_status_loads_the_table_module_not_the_server_side(nats_url: str) -> None:
    from .test_startup import SERVER_SIDE, _loaded, _run

    async with running(nats_url) as h:
        code, modules, output = await trio.to_thread.run_sync(
            lambda: _run("status", "--nats-url", nats_url, env={"LLMSRV__NATS__SUBJECT_PREFIX": h.prefix}))
    assert code == 0 and output.startswith(f"instance {h.service.instance_id}")
    assert "llmsrv.statusview" in modules and "llmsrv.client" in modules
    assert not _loaded(modules, SERVER_SIDE | {"llmsrv.providers"})


def test_breaker_simulate_is_wired_and_loaded_only_when_asked() -> None:
    from .test_startup import _run

    code, modules, output = _run("breaker", "simulate", "--help")
    assert code == 0 and "usage: llmsrv breaker simulate" in output and "--setting" in output
    assert "llmsrv.simulate" in modules
    code, modules, output = _run("breaker", "--help")
    assert code == 0 and "simulate" in output and "llmsrv.simulate" not in modules
