"""Logs (CONTRACT section 6): JSON lines, one per finished request, the correlation id on every line a
request causes, text for a terminal, secrets redacted in every field.

In process, the root handler ``logs.setup`` installs writes into a buffer while a real service
(real nats-server) answers; one test runs ``llmsrv serve`` as users do, its stderr in a file."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from llmsrv import logs, redact
from llmsrv.client import Client
from llmsrv.errors import LlmsrvError
from llmsrv.natsserver import NatsServer, free_port

from .conftest import running, test_config, user
from .test_fleet import serve_process, stop_process, wait_for_line, wait_instances


@pytest.fixture
def captured(nats_url: str) -> Iterator[io.StringIO]:
    """The root logger as ``llmsrv serve`` sets it up (JSON), writing into a buffer; restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    handler = logs.setup(test_config(nats_url), "info", buffer)
    try:
        yield buffer
    finally:
        logs.detach(handler)
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


async def test_one_json_line_per_finished_request_with_its_fields(nats_url: str, captured: io.StringIO) -> None:
    async with running(nats_url) as h:
        ok = await h.client.complete({"messages": user("hi"), "model": "mock:echo", "correlation_id": "c-ok"})
        with pytest.raises(LlmsrvError):
            await h.client.complete({"messages": user("x"), "model": "mock:echo", "tempreature": 1,
                                     "correlation_id": "c-bad"})
    assert ok.text == "hi"
    records = lines(captured)
    finished = {r["correlation_id"]: r for r in records if r["event"].startswith("request finished")}
    assert set(finished) == {"c-ok", "c-bad"}, records
    good, bad = finished["c-ok"], finished["c-bad"]
    assert good["level"] == "INFO" and good["logger"] == "llmsrv.service"
    assert (good["provider"], good["model"], good["outcome"], good["error_code"]) == ("mock", "echo", "ok", None)
    assert isinstance(good["duration_ms"], float) and good["duration_ms"] >= 0
    assert good["ts"].endswith("Z")  # ISO 8601, UTC
    assert (bad["outcome"], bad["error_code"]) == ("validation_error", "VALIDATION_ERROR")
    assert "hi" not in json.dumps(good) and "tempreature" not in json.dumps(bad)  # no request bodies


async def test_lines_a_request_causes_carry_its_correlation_id(nats_url: str, captured: io.StringIO) -> None:
    # mock:fail fails every call: at the threshold its breaker opens, logged while that request runs
    async with running(nats_url, providers={"mock": {"breaker_threshold": 1}}) as h:
        with pytest.raises(LlmsrvError):
            await h.client.complete({"messages": user(), "model": "mock:fail", "correlation_id": "c-breaker"})
        await h.client.complete({"messages": user(), "model": "mock:echo", "correlation_id": "c-after"})
    records = lines(captured)
    opened = [r for r in records if "circuit breaker of mock:fail" in r["event"]]
    assert opened and all(r.get("correlation_id") == "c-breaker" for r in opened), records
    served = [r for r in records if r["event"].startswith("serving ")]  # start-up: no request
    assert served and "correlation_id" not in served[0]
    assert not [r for r in records if r.get("correlation_id") == "c-after" and r["level"] != "INFO"]


async def test_secrets_are_redacted_in_every_field(nats_url: str, captured: io.StringIO) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    redact.register(canary)
    log = logging.getLogger("llmsrv.test")
    log.warning("key %s in the message", canary, extra={"provider": f"p-{canary}"})
    try:
        raise RuntimeError(f"failed with {canary}")
    except RuntimeError:
        log.exception("with a traceback")
    text = captured.getvalue()
    assert canary not in text, text
    warning, error = lines(captured)
    assert canary not in warning["event"] and warning["provider"].startswith("p-"), warning
    assert "RuntimeError: failed with" in error["exc_info"], error


async def test_request_lines_are_batched_written_while_serving_and_redacted(nats_url: str,
                                                                            captured: io.StringIO) -> None:
    canary = f"tok-{uuid.uuid4().hex}"
    redact.register(canary)
    async with running(nats_url) as h:
        for i in range(3):
            await h.client.complete({"messages": user(), "model": "mock:echo", "correlation_id": f"c{i}-{canary}"})
        with trio.fail_after(10):  # written by the service's flush, every logs.FLUSH_S, not only at its stop
            while captured.getvalue().count("request finished") < 3:
                await trio.sleep(0.05)
        assert h.service.statistics().counters.requests == 3  # still serving
    finished = [r for r in lines(captured) if r["event"] == "request finished: ok"]
    assert [r["correlation_id"].split("-")[0] for r in finished] == ["c0", "c1", "c2"]
    assert canary not in captured.getvalue() and all(r["correlation_id"].endswith("***") for r in finished)


async def test_an_http_request_refused_before_the_backend_writes_its_line(nats_url: str,
                                                                         captured: io.StringIO) -> None:
    async with running(nats_url, server={"http_port": free_port()}) as h:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.service.http_port}") as http:
            refused = await http.post("/v1/chat/completions", content=b"{not json")
        with trio.fail_after(10):
            while "request finished: invalid_json" not in captured.getvalue():
                await trio.sleep(0.05)
    line, = [r for r in lines(captured) if r["event"] == "request finished: invalid_json"]
    assert refused.status_code == 400 and line["error_code"] == refused.json()["error"]["code"], (line, refused.text)


def test_text_for_a_terminal_json_otherwise() -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        assert tty.isatty()
        assert logs.wants_text("auto", tty) and logs.wants_text("text", tty) and not logs.wants_text("json", tty)
    os.close(leader)
    assert not logs.wants_text("auto", io.StringIO()) and logs.wants_text("text", io.StringIO())


def test_text_lines_carry_the_request_fields() -> None:
    record = logging.makeLogRecord({"msg": "request finished: ok", "levelname": "INFO", "name": "llmsrv.service",
                                    "correlation_id": "c1", "provider": "mock", "model": "echo", "outcome": "ok",
                                    "error_code": None, "duration_ms": 1.5})
    line = logs.TextFormatter().format(record)
    assert line.endswith("llmsrv.service: request finished: ok correlation_id=c1 provider=mock model=echo "
                         "outcome=ok duration_ms=1.5"), line


def test_text_request_lines_go_through_logging_as_they_are_handed_on(nats_url: str) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    cfg = test_config(nats_url)
    handler = logs.setup(msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, log_format="text")),
                         "info", buffer)
    try:
        ends = logs.RequestEnds(logging.getLogger("llmsrv.service"), None)
        ends.note("c1", "mock:echo", "ok", None, 0.0015)
        assert buffer.getvalue() == ""  # noted, not yet written
        ends.hand_on()
    finally:
        logs.detach(handler)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert buffer.getvalue().rstrip().endswith("llmsrv.service: request finished: ok correlation_id=c1 provider=mock "
                                               "model=echo outcome=ok duration_ms=1.5"), buffer.getvalue()


async def test_llmsrv_serve_writes_json_lines_on_stderr(tmp_path: Path) -> None:
    server = NatsServer().start()
    prefix, log = f"l{uuid.uuid4().hex[:8]}", tmp_path / "llmsrv.log"
    proc = serve_process(server.url, prefix, log)
    try:
        async with Client.connect(server.url, prefix) as client:
            await wait_instances(client, 1, procs=[proc])
            await client.complete({"messages": user(), "model": "mock:echo", "correlation_id": "c-serve"})
            await wait_for_line(log, "c-serve")
        stop_process(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    stderr = [line for line in log.read_text().splitlines() if not line.startswith("llmsrv: ")]  # stdout's
    records = [msgspec.json.decode(line) for line in stderr]  # every stderr line is one JSON object
    assert any(r.get("correlation_id") == "c-serve" and r.get("outcome") == "ok" for r in records), stderr
    assert {"ts", "level", "logger", "event"} <= set(records[0])


def test_the_cli_keeps_logs_for_serve_only() -> None:
    # other commands log at warning only: `llmsrv check` prints its table, no info lines
    proc = subprocess.run([sys.executable, "-m", "llmsrv", "check"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LLMSRV_CONFIG": ""})
    assert proc.returncode == 0 and "config: ok" in proc.stdout and proc.stderr == "", proc.stderr


def test_a_noted_request_keeps_nothing_the_garbage_collector_walks(captured: io.StringIO) -> None:
    """Until they are written and counted, a finished request's end (and its provider call) are kept in forms
    the collector does not track: a young collection would otherwise come every few hundred requests and
    walk them (the loaded server's GC time: 0.29 -> 0.13 s per ~150k requests)."""
    import gc

    from llmsrv.ops import Metrics

    metrics = Metrics()
    ends = logs.RequestEnds(logging.getLogger("llmsrv.service"), metrics.count_ends)
    n = 500
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(n):
            metrics.provider_call("mock", 0.001)
            ends.note(f"cid-{i}", "mock:echo", "ok", None, 0.0015, 3, 4, 0.5)
        kept = gc.get_count()[0] - before  # containers allocated and still alive (none are freed by a collection)
    finally:
        gc.enable()
    assert kept < n // 10, f"{kept} tracked objects kept for {n} requests"
    ends.hand_on()
    assert captured.getvalue().count('"event":"request finished: ok"') == n
    assert f'llmsrv_tokens_total{{direction="output",provider="mock"}} {float(4 * n)}' in metrics.render().decode()


def test_request_lines_redact_the_callers_fields(captured: io.StringIO) -> None:
    """The caller's words in a request line (its correlation id, the model it named) lose a registered secret,
    whole or in part; llmsrv's own fields stay as they are."""
    canary = f"tok-{uuid.uuid4().hex}"
    redact.register(canary)
    ends = logs.RequestEnds(logging.getLogger("llmsrv.service"), None)
    ends.note(f"c-{canary[:20]}", f"mock:m_{canary[4:]}", "provider_error", "PROVIDER_ERROR", 0.25)
    ends.note("c-plain", "mock:echo", "ok", None, 0.001)
    ends.hand_on()
    first, second = lines(captured)
    assert canary[:8] not in captured.getvalue() and canary[-8:] not in captured.getvalue()
    assert first["correlation_id"] == "c-***" and first["model"] == "m_***", first
    assert (first["provider"], first["outcome"], first["error_code"], first["duration_ms"]) == (
        "mock", "provider_error", "PROVIDER_ERROR", 250.0)
    assert (second["correlation_id"], second["model"]) == ("c-plain", "echo")


def test_request_lines_that_cannot_be_written_fail_no_request(captured: io.StringIO,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A full or closed stderr loses the lines (said on stderr as logging says it) and raises nothing: the hand-on
    runs inside a request's task or the service's flush task."""
    ends = logs.RequestEnds(logging.getLogger("llmsrv.service"), None)
    ends.note("c-lost", "mock:echo", "ok", None, 0.001)
    captured.close()  # write -> ValueError: I/O operation on closed file
    ends.hand_on()
    assert "1 request lines lost" in capsys.readouterr().err


def test_ends_are_noted_only_while_something_wants_them(captured: io.StringIO) -> None:
    """Metrics off and the logger above info: nothing is noted (after the first hand-on finds it so); info
    again: noted again from the next hand-on."""
    logger = logging.getLogger("llmsrv.service")
    ends = logs.RequestEnds(logger, None)
    logger.setLevel(logging.WARNING)
    try:
        ends.hand_on()
        ends.note("c-quiet", "mock:echo", "ok", None, 0.001)
        assert ends._pending == []
        logger.setLevel(logging.INFO)
        ends.hand_on()
        ends.note("c-loud", "mock:echo", "ok", None, 0.001)
        ends.hand_on()
    finally:
        logger.setLevel(logging.NOTSET)
    line, = lines(captured)
    assert line["correlation_id"] == "c-loud" and line["duration_ms"] == 1.0, line
