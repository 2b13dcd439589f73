"""Secrets never leave the process: the redaction rule (table-driven and property-based), the
logging filter, and a canary key run through a real ``llmsrv serve`` subprocess at every log level
whose every output (replies and their headers, logs, metrics, health, admin, CLI) is searched for
any 8-character run of the key."""

from __future__ import annotations

import logging
import os
import secrets
import string
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsrv import redact
from llmsrv.bus import Incoming
from llmsrv.client import Client, NoResponders
from llmsrv.natsserver import free_port
from llmsrv.redact import MASK, RedactingFilter, clip

from .fakes import FakeUpstream, Json, Request, Sse

KEY_CHARS = string.ascii_letters + string.digits + "-_"


def windows(secret: str) -> set[str]:
    return {secret[i:i + 8] for i in range(len(secret) - 7)}


def leaks(text: str, secret: str) -> list[str]:
    """Every 8-character run of ``secret`` found in ``text``."""
    return sorted(w for w in windows(secret) if w in text)


# ---- the rule ---------------------------------------------------------------------------------

S = "sk-canary-0123456789abcdefghijklmnopqrstuvwxyz"  # 46 characters


@pytest.mark.parametrize(("text", "secrets_", "expected"), [
    (f"key {S} end", [S], f"key {MASK} end"),
    (f"{S}{S}", [S], MASK),  # touching spans merge
    (f"a{S[:20]}b{S[-9:]}c", [S], f"a{MASK}b{MASK}c"),  # runs from anywhere in the key
    (f"x{S[10:18]}y", [S], f"x{MASK}y"),  # exactly 8
    (f"x{S[10:17]}y", [S], f"x{S[10:17]}y"),  # 7 are allowed to stay
    (f"{S[:30]}{S[20:]}", [S], MASK),  # overlapping runs
    ("pass word pass", ["pass"], f"{MASK} word {MASK}"),  # short secrets (4..7) whole
    ("abc abc", ["abc"], "abc abc"),  # shorter than 4: ignored
    ("no secret here", [S, None, ""], "no secret here"),
    ("a**b**b**c", ["**b**b**"], f"a{MASK}c"),
    ("x***ZZZZZy", ["***ZZZZZ", "QQQQQQQQ"], f"x{MASK}y"),
    (f"{S} and ghp_{'k' * 36}", [S, "ghp_" + "k" * 36], f"{MASK} and {MASK}"),
], ids=["whole", "twice", "pieces", "exactly-8", "7-stay", "overlap", "short", "too-short", "none",
        "stars", "mask-like", "two-secrets"])
def test_redact_table(text: str, secrets_: list[str | None], expected: str) -> None:
    assert redact.redact(text, secrets_) == expected


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 20, 45, 46, 47, 100, 300])
def test_clip_redacts_before_it_cuts(cut: int) -> None:
    text = "E" * (300 - 20) + S + " after"  # the key straddles character 300
    out = clip(text, cut, [S])
    assert len(out) <= cut and leaks(out, S) == []
    assert clip(text, 300, [S]) == "E" * 280 + MASK + " after"


@settings(max_examples=300, deadline=None)
@given(secret=st.text(KEY_CHARS + "*", min_size=8, max_size=64),
       before=st.text(min_size=0, max_size=80), after=st.text(min_size=0, max_size=80),
       piece=st.tuples(st.integers(0, 63), st.integers(8, 64)))
def test_no_window_survives_any_cut(secret: str, before: str, after: str, piece: tuple[int, int]) -> None:
    start = min(piece[0], len(secret) - 8)
    fragment = secret[start:start + piece[1]]  # a run of 8 or more of the secret's characters
    text = before + secret + after + fragment + before
    assert leaks(redact.redact(text, [secret]), secret) == []
    for cut in range(len(text) + 2):
        assert leaks(clip(text, cut, [secret]), secret) == [], cut


@settings(max_examples=200, deadline=None)
@given(secret=st.text(string.ascii_uppercase, min_size=8, max_size=40), text=st.text(string.ascii_lowercase + " "))
def test_text_without_the_secret_is_unchanged(secret: str, text: str) -> None:
    assert redact.redact(text, [secret]) == text


# ---- the logging filter -------------------------------------------------------------------------


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(message)s %(extra_field)s"))
        self.addFilter(RedactingFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_the_log_filter_redacts_message_args_traceback_and_extras() -> None:
    secret = "sk-filter-" + secrets.token_hex(18)
    redact.register(secret)
    handler = _Keep()
    logger = logging.getLogger(f"test.secrets.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        half = len(secret) // 2
        logger.debug("split %s|%s", secret[:half], secret[half:], extra={"extra_field": secret})
        logger.info("whole %s and a dict %r", secret, {"authorization": f"Bearer {secret}"},
                    extra={"extra_field": "-"})
        try:
            raise RuntimeError(f"upstream said {secret}")
        except RuntimeError:
            logger.exception("failed", extra={"extra_field": "-"})
    finally:
        logger.removeHandler(handler)
    out = "\n".join(handler.lines)
    assert "split " in out and "RuntimeError: upstream said ***" in out and "Bearer ***" in out
    assert leaks(out, secret) == []


# ---- the canary through a real server -----------------------------------------------------------

CANARY = "sk-canary-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(36))
OFFSETS = (0, 100, 250, 270, 280, 290, 295, 299, 300, 301, 320, 990, 1000, 1010, 1020, 1023, 1024, 1030)
ECHO_HEADERS = {"x-echo-key": CANARY, "www-authenticate": f'Bearer realm="{CANARY}"', "x-request-id": CANARY[4:40]}


def leaky_message(offset: int) -> str:
    """The upstream's error text: a marker, the key at ``offset``, a fragment of the key later on."""
    marker = f"MARK{offset}:"
    return marker + "E" * max(0, offset - len(marker)) + CANARY + " then " + CANARY[3:31] + " and " + CANARY[-12:]


def upstream(request: Request) -> Json | Sse:
    if request.path.endswith("/models"):
        return Json({"error": {"message": leaky_message(280)}}, status=401, headers=ECHO_HEADERS)
    model = request.json()["model"]
    kind, _, arg = model.partition("-")
    if kind == "ok":
        return Json({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, headers=ECHO_HEADERS)
    if kind == "json":
        return Json({"error": {"message": leaky_message(int(arg))}}, status=500, headers=ECHO_HEADERS)
    if kind == "text":
        return Json(leaky_message(int(arg)).encode(), status=502, headers=ECHO_HEADERS)
    if kind == "dict":  # an error object without a message: shown as a whole
        return Json({"error": {"code": "x", "detail": leaky_message(int(arg))}}, status=500, headers=ECHO_HEADERS)
    if kind == "status":  # 401, 400, 429, 404 echoing the key
        return Json({"error": {"message": leaky_message(290)}}, status=int(arg),
                    headers={**ECHO_HEADERS, "retry-after": "1"})
    if kind == "sse":  # a streamed reply whose error chunk echoes the key
        return Sse([{"choices": [{"delta": {"content": "partial "}}]},
                    {"error": {"message": leaky_message(int(arg)), "code": "server_error"}}])
    return Json({"error": {"message": "unknown test model"}}, status=400)


def _config(path: Path, prefix: str, http_port: int, level: str, wire_debug: bool, base_url: str) -> Path:
    path.write_text(f"""
[nats]
subject_prefix = "{prefix}"
[server]
http_port = {http_port}
log_level = "{level}"
wire_debug = {str(wire_debug).lower()}
[providers.openai_compat]
base_url = "{base_url}/v1"
breaker_threshold = 100000
[routing.retry]
max_attempts = 1
""")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSRV")}
    env["OPENAI_COMPAT_API_KEY"] = CANARY
    return env


def _serve(config: Path, nats_url: str, env: dict[str, str], stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    """``llmsrv serve`` with its output in files (nothing to drain, no pipe to fill)."""
    with open(stderr, "wb") as err, open(stdout, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "llmsrv", "serve", "--config", str(config),
                                 "--nats-url", nats_url], env=env, stdout=out, stderr=err)


def _show(msg: Incoming) -> str:
    headers = "".join(f"{k}: {v}\n" for k, v in (msg.headers or {}).items())
    return headers + msg.data.decode("utf-8", "replace")


async def _stream_messages(client: Client, body: dict[str, Any]) -> list[Incoming]:
    """Every message a streaming request is answered with, up to and including the final one."""
    send, recv = trio.open_memory_channel[Incoming](1000)
    inbox = client.bus.new_inbox()
    sub = await client.bus.subscribe(inbox, send.send_nowait)
    await client.bus.flush()
    got: list[Incoming] = []
    try:
        client.bus.publish_nowait(f"{client.prefix}.request", msgspec.json.encode({**body, "stream": True}),
                                  reply=inbox)
        with trio.fail_after(20):
            while not got or (got[-1].headers or {}).get("Llm-Stream") != "end":
                got.append(await recv.receive())
    finally:
        await client.bus.unsubscribe(sub)
    return got


async def _wait_ready(client: Client, http: httpx.AsyncClient, port: int, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(40):
        while True:
            assert proc.poll() is None, "llmsrv serve exited early"
            try:
                await client.request_json("health", timeout_s=1)
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            except (NoResponders, trio.TooSlowError, httpx.TransportError):
                pass
            await trio.sleep(0.1)


async def _cli(*args: str, env: dict[str, str]) -> str:
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-m", "llmsrv", *args], capture_stdout=True,
                                      capture_stderr=True, check=False, env=env)
    return f"[{' '.join(args[:1])} rc={done.returncode}]\n" + done.stdout.decode() + done.stderr.decode()


@pytest.mark.parametrize("wire_debug", [False, True], ids=["wire-off", "wire-on"])
@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
async def test_the_canary_key_appears_nowhere(nats_url: str, tmp_path: Path, level: str, wire_debug: bool) -> None:
    prefix = f"s{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = _env()
    async with FakeUpstream(upstream) as up, httpx.AsyncClient(timeout=10) as http:
        config = _config(tmp_path / "llmsrv.toml", prefix, port, level, wire_debug, up.url)
        stderr_path, stdout_path = tmp_path / "stderr.log", tmp_path / "stdout.log"
        proc = _serve(config, nats_url, env, stdout_path, stderr_path)
        outputs: list[str] = []
        replies: dict[str, dict[str, Any]] = {}
        try:
            async with Client.connect(nats_url, prefix) as client:
                await _wait_ready(client, http, port, proc)
                models = ["ok", *(f"json-{o}" for o in OFFSETS), *(f"text-{o}" for o in OFFSETS), "dict-280"]
                statuses = ["status-400", "status-404", "status-429", "status-401", "status-403"]  # refusals last
                for offset in (0, 280, 299, 1000):
                    body = {"messages": [{"role": "user", "content": "hi"}], "model": f"openai_compat:sse-{offset}"}
                    streamed = await _stream_messages(client, body)
                    outputs += [_show(m) for m in streamed]
                    replies[f"sse-{offset}"] = {**msgspec.json.decode(streamed[-1].data),
                                                "_headers": dict(streamed[-1].headers or {})}
                for model in models + statuses:
                    body = {"messages": [{"role": "user", "content": "hi"}], "model": f"openai_compat:{model}"}
                    msg = await client.request_raw(f"{prefix}.request", msgspec.json.encode(body), timeout_s=20)
                    outputs.append(_show(msg))
                    replies[model] = {**msgspec.json.decode(msg.data), "_headers": dict(msg.headers or {})}
                outputs.append(_show(await client.request_raw(f"{prefix}.admin.status", b"{}", timeout_s=10)))
                outputs.append(_show(await client.request_raw(f"{prefix}.health", b"{}", timeout_s=10)))
                for path in ("/metrics", "/healthz", "/readyz"):
                    answer = await http.get(f"http://127.0.0.1:{port}{path}")
                    outputs.append(str(answer.headers) + answer.text)
                if level == "debug":  # the CLI commands log at warning whatever the level: run them once per wire mode
                    for form in ((), ("--json",)):  # the table and the raw documents
                        outputs.append(await _cli("status", *form, "--config", str(config), "--nats-url", nats_url,
                                                  env=env))
                    outputs.append(await _cli("check", "--config", str(config), "--probe", env=env))
        finally:
            proc.terminate()
            with trio.fail_after(20):
                await trio.to_thread.run_sync(proc.wait)
        assert len(up.requests) >= len(replies)
        assert all(r.headers.get("authorization") == f"Bearer {CANARY}" for r in up.requests
                   if r.path.endswith("/chat/completions"))  # the key was really used
    stderr = stderr_path.read_text(errors="replace")
    everything = "\n".join(outputs) + stdout_path.read_text(errors="replace") + stderr

    assert leaks(everything, CANARY) == [], [line for line in everything.splitlines() if leaks(line, CANARY)][:5]

    # the paths were exercised: the upstream's text, minus the key, reached the reply and its header
    assert replies["ok"]["text"] == "fine"
    for offset in OFFSETS:
        for kind in ("json", "text"):
            reply = replies[f"{kind}-{offset}"]
            assert reply["error_code"] == "PROVIDER_ERROR", reply
            assert f"MARK{offset}:" in reply["error"] and f"MARK{offset}:" in reply["_headers"]["Nats-Service-Error"]
            if offset < 250:
                assert MASK in reply["error"], reply
    assert replies["status-401"]["error_code"] == replies["status-403"]["error_code"] == "MISSING_CREDENTIALS"
    assert replies["status-429"]["error_code"] == "RATE_LIMITED"
    assert replies["status-404"]["error_code"] == "PROVIDER_NOT_FOUND"
    assert replies["status-400"]["error_code"] == "VALIDATION_ERROR"
    assert "MARK290:" in replies["status-401"]["error"]
    for offset in (0, 280, 299, 1000):
        assert replies[f"sse-{offset}"]["error_code"] == "PROVIDER_ERROR"
        assert f"MARK{offset}:" in replies[f"sse-{offset}"]["error"]
    if level == "debug":  # status and check --probe ran and said something about openai_compat
        assert "[status rc=0]" in everything and '"openai_compat"' in everything
        assert "[check rc=0]" in everything and "credentials refused: openai_compat answered HTTP 401" in everything
    # wire logging: pinned at warning unless wire_debug, and then redacted
    wire_lines = [line for line in stderr.splitlines() if '"logger":"httpcore' in line or '"logger":"httpx' in line]
    if wire_debug and level == "debug":
        assert any("receive_response_headers" in line and MASK in line for line in wire_lines), stderr[-2000:]
    elif wire_debug and level == "info":
        assert any("HTTP Request" in line for line in wire_lines)
    else:
        assert wire_lines == []
