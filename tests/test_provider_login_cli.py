"""claude, codex and gemini through the vendors' own CLIs (subscription logins): the transport choice
table, the three dialects over documented or vendor-recorded lines (tests/fixtures/cli, SOURCES.md),
then each vendor as a real fake process (tests/fake_cli.py) on PATH, with a login in a fake HOME:
answers, streams, usage, errors, cancellation and deadlines (the process group gets SIGTERM, then
SIGKILL after the grace), ``cost_cents`` 0 through the pipeline and over NATS, and ``llmsrv check``.

No wall-clock thresholds: the waits below are fail-safes that a passing run never reaches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from llmsrv import errors
from llmsrv.config import ProviderConfig, build_config
from llmsrv.messages import Message, Usage, decode_request
from llmsrv.pipeline import Pipeline
from llmsrv.providers import Call
from llmsrv.providers.cli import ApiOrCliProvider, Choice, CliFacts, CliProvider, choose_transport, find_login
from llmsrv.providers.codecs import Origin
from llmsrv.providers.codecs.cli_dialects import (
    CLAUDE,
    CLAUDE_LOGIN,
    CODEX,
    CODEX_LOGIN,
    GEMINI,
    GEMINI_LOGIN,
    Login,
)
from llmsrv.providers.codecs.stream_json import Dialect, StreamJsonFold
from llmsrv.providers.mock import MockProvider
from llmsrv.providers.registry import build_provider

from .conftest import running, user
from .fakes import FakeUpstream, Json
from .test_provider_cli import assert_reaped, cancel_after_first_chunk, records, wait_stopped

FAKE = Path(__file__).with_name("fake_cli.py")
FIXTURES = Path(__file__).with_name("fixtures") / "cli"
VENDORS = ("claude", "codex", "gemini")
API_KEY = {"claude": "ANTHROPIC_API_KEY", "codex": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}
LOGIN_FILE = {"claude": (".claude", ".credentials.json"), "codex": (".codex", "auth.json"),
              "gemini": (".gemini", "oauth_creds.json")}
USAGE = {"claude": Usage(11 + 2 + 3, 7), "codex": Usage(24, 7), "gemini": Usage(24, 7)}  # fake_cli.USAGE, read
MODEL = {"claude": "claude-sonnet-4-6", "codex": "gpt-5-codex", "gemini": "gemini-2.5-flash"}


def text_of(vendor: str) -> str:
    return f"Hello from the fake {vendor}"


# ---- a host: the fake CLIs on PATH, a HOME with logins ------------------------------------------

@pytest.fixture(autouse=True)
def look_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CliProvider, "LOOK_EVERY_S", 0.0)  # status() sees each change to the host at once


def host(tmp_path: Path, *, installed: tuple[str, ...] = VENDORS, logged_in: tuple[str, ...] = VENDORS,
         **env: str) -> dict[str, str]:
    """The environment of a host where ``installed`` CLIs are on PATH and ``logged_in`` ones have a login."""
    bindir, home, records = tmp_path / "bin", tmp_path / "home", tmp_path / "records"
    for folder in (bindir, home, records):
        folder.mkdir(parents=True, exist_ok=True)
    for vendor in installed:
        if not (bindir / vendor).exists():
            (bindir / vendor).symlink_to(FAKE)
    for vendor in logged_in:
        folder, name = LOGIN_FILE[vendor]
        (home / folder).mkdir(exist_ok=True)
        (home / folder / name).write_text("{}")
    return {"PATH": f"{bindir}{os.pathsep}{Path(sys.executable).parent}", "HOME": str(home),
            "FAKE_CLI_RECORD_DIR": str(records), **env}


def provider(vendor: str, env: dict[str, str], *, grace: float = 5.0, transport: str = "auto",
             **cfg: Any) -> ApiOrCliProvider:
    built = build_provider(vendor, ProviderConfig(kill_grace_s=grace, transport=transport, **cfg), env)
    assert isinstance(built, ApiOrCliProvider)
    return built


def call(text: str = "hello there", model: str | None = None, vendor: str = "claude") -> Call:
    return Call(model=model or MODEL[vendor], messages=[Message("user", text)], max_tokens=100, temperature=0.7)


# ---- the transport choice (pure) ------------------------------------------------------------------

INSTALLED = "/usr/bin/claude"
NO_KEY = "no credentials: set ANTHROPIC_API_KEY or CLAUDE_API_KEY (or ANTHROPIC_API_KEY_FILE)"


def facts(executable: str | None = INSTALLED, login: str | None = "/h/.claude/.credentials.json") -> CliFacts:
    return CliFacts("claude", executable, login, "CLAUDE_CODE_OAUTH_TOKEN, /h/.claude/.credentials.json",
                    "run `claude` and /login")


@pytest.mark.parametrize(("setting", "key_set", "cli", "transport", "state", "words"), [
    ("auto", True, facts(), "api", "available", "transport api (auto): an API key is configured"),
    ("auto", True, None, "api", "available", "transport api (auto): an API key is configured"),
    ("auto", False, facts(), "cli", "available",
     "transport cli (auto): no API key; claude at /usr/bin/claude is logged in (/h/.claude/.credentials.json)"),
    ("auto", False, facts(login=None), None, "missing",
     f"{NO_KEY}; or log in to the claude CLI: run `claude` and /login (transport auto: no API key, and no "
     "claude login in CLAUDE_CODE_OAUTH_TOKEN, /h/.claude/.credentials.json)"),
    ("auto", False, facts(executable=None), None, "missing",
     f"{NO_KEY}; or install the claude CLI and log in (transport auto: no API key, claude not found on PATH)"),
    ("api", False, facts(), "api", "available", "transport api (api): no API key"),
    ("api", True, facts(), "api", "available", "transport api (api): an API key is configured"),
    ("cli", True, facts(), "cli", "available",
     "transport cli (cli): claude at /usr/bin/claude, logged in (/h/.claude/.credentials.json)"),
    ("cli", False, facts(login=None), "cli", "available",
     "transport cli (cli): claude at /usr/bin/claude, no login seen (CLAUDE_CODE_OAUTH_TOKEN, "
     "/h/.claude/.credentials.json): the CLI's own login is used"),
    ("cli", True, facts(executable=None), None, "missing", "transport cli: claude not found on PATH"),
], ids=["auto-key", "auto-key-cli-not-looked-at", "auto-login", "auto-installed-no-login", "auto-nothing",
        "api-no-key", "api-key", "cli-despite-key", "cli-login-unseen", "cli-not-installed"])
def test_choose_transport(setting: str, key_set: bool, cli: CliFacts | None, transport: str | None, state: str,
                          words: str) -> None:
    choice = choose_transport(setting, key_set=key_set, missing_key=NO_KEY, cli=cli)
    assert choice == Choice(transport, words, state)


def test_choose_transport_needs_the_cli_facts_when_the_key_does_not_decide() -> None:
    with pytest.raises(ValueError, match="CLI's facts"):
        choose_transport("auto", key_set=False, missing_key=NO_KEY, cli=None)


@pytest.mark.parametrize(("login", "env", "files", "found"), [
    (CLAUDE_LOGIN, {"HOME": "{h}", "CLAUDE_CODE_OAUTH_TOKEN": "t"}, [], "CLAUDE_CODE_OAUTH_TOKEN is set"),
    (CLAUDE_LOGIN, {"HOME": "{h}"}, [".claude/.credentials.json"], "{h}/.claude/.credentials.json"),
    (CLAUDE_LOGIN, {"HOME": "{h}", "CLAUDE_CONFIG_DIR": "{h}/cfg"}, ["cfg/.credentials.json"],
     "{h}/cfg/.credentials.json"),
    (CLAUDE_LOGIN, {"HOME": "{h}", "CLAUDE_CONFIG_DIR": "{h}/cfg"}, [".claude/.credentials.json"], None),
    (CODEX_LOGIN, {"HOME": "{h}"}, [".codex/auth.json"], "{h}/.codex/auth.json"),
    (CODEX_LOGIN, {"HOME": "{h}", "CODEX_HOME": "{h}/ch"}, ["ch/auth.json"], "{h}/ch/auth.json"),
    (GEMINI_LOGIN, {"HOME": "{h}"}, [".gemini/oauth_creds.json"], "{h}/.gemini/oauth_creds.json"),
    (GEMINI_LOGIN, {"HOME": "{h}", "GEMINI_CLI_HOME": "{h}/g"}, ["g/.gemini/oauth_creds.json"],
     "{h}/g/.gemini/oauth_creds.json"),
    (GEMINI_LOGIN, {"HOME": "{h}"}, [".gemini/settings.json"], None),
    (CODEX_LOGIN, {}, [], None),
], ids=["claude-token", "claude-file", "claude-config-dir", "claude-config-dir-wins", "codex-file", "codex-home",
        "gemini-file", "gemini-cli-home", "gemini-settings-are-no-login", "no-home"])
def test_find_login(tmp_path: Path, login: Login, env: dict[str, str], files: list[str], found: str | None) -> None:
    env = {k: v.format(h=tmp_path) for k, v in env.items()}
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    where, looked = find_login(login, env)
    assert where == (found.format(h=tmp_path) if found else None)
    if found is None:
        assert looked and (str(tmp_path) in looked or looked == "nothing (no HOME)")


# ---- the dialects -----------------------------------------------------------------------------------

def fold_lines(dialect: Dialect, lines: list[bytes]) -> tuple[StreamJsonFold, list[str]]:
    fold = StreamJsonFold(call(), Origin("p", ("sekrit-123456789",)), "cli", dialect)
    return fold, [d for line in lines if (d := fold.feed(line))]


@pytest.mark.parametrize(("dialect", "fixture", "deltas", "text", "usage"), [
    (CLAUDE, "claude_stream_json.jsonl", ["Paris is", " the capital."], "Paris is the capital.",
     Usage(3 + 1200 + 14000, 9)),
    (CODEX, "codex_exec_json_docs.jsonl", ["Yep — there’s a `README.md` in the repository root."],
     "Yep — there’s a `README.md` in the repository root.", Usage(24763, 122)),
    (GEMINI, "gemini_stream_json_source.jsonl", ["Thinking...", "Final answer"], "Final answer", Usage(0, 0)),
], ids=["claude", "codex-docs-sample", "gemini-own-snapshot"])
def test_documented_streams_fold(dialect: Dialect, fixture: str, deltas: list[str], text: str, usage: Usage) -> None:
    fold, got = fold_lines(dialect, (FIXTURES / fixture).read_bytes().splitlines())
    assert got == deltas and fold.done
    completion = fold.result()
    assert (completion.text, completion.usage, completion.subscription) == (text, usage, False)  # the row marks it


def _j(**event: Any) -> bytes:
    return msgspec.json.encode(event)


@pytest.mark.parametrize(("dialect", "lines", "text", "error", "cls"), [
    (CLAUDE, [_j(type="assistant", message={"content": [{"type": "text", "text": "Invalid API key"}]},
                 error="authentication_failed", parent_tool_use_id=None),
              _j(type="result", subtype="success", is_error=True, result="Invalid API key · run /login")],
     None, "Invalid API key · run /login", errors.MissingCredentials),
    (CLAUDE, [_j(type="assistant", message={"content": "x"}, error="rate_limit", parent_tool_use_id=None),
              _j(type="result", subtype="success", is_error=True, result="Claude AI usage limit reached")],
     None, "Claude AI usage limit reached", errors.QuotaExhausted),
    (CLAUDE, [_j(type="result", subtype="error_max_turns", is_error=True)], None, "error_max_turns",
     errors.ProviderError),
    (CLAUDE, [_j(type="assistant", message={"content": [{"type": "text", "text": "a"}]}, parent_tool_use_id=None),
              _j(type="result", subtype="success", is_error=False, result="a")], "a", None, None),
    (CODEX, [_j(type="error", message="Reconnecting... 1/5"),
             _j(type="item.completed", item={"id": "i", "type": "agent_message", "text": "ok"}),
             _j(type="turn.completed", usage={"input_tokens": 5, "cached_input_tokens": 4, "output_tokens": 1})],
     "ok", None, None),
    (CODEX, [_j(type="turn.failed", error={"message": "You've hit your usage limit"})], None,
     "You've hit your usage limit", errors.ProviderError),
    (GEMINI, [_j(type="error", severity="warning", message="Loop detected"),
              _j(type="message", role="assistant", content="fine", delta=True),
              _j(type="result", status="success", stats={"input_tokens": 3, "output_tokens": 1})], "fine", None, None),
    (GEMINI, [_j(type="error", severity="error", message="Maximum session turns exceeded"),
              _j(type="result", status="success", stats={})], "", None, None),
    (GEMINI, [_j(type="error", severity="error", message="The response was blocked (SAFETY)."),
              _j(type="result", status="error", stats={})], None, "The response was blocked (SAFETY).",
     errors.ProviderError),
    (GEMINI, [_j(type="result", status="error", error={"type": "FatalAuthenticationError",
                                                        "message": "login needed; key sekrit-123456789"})],
     None, "login needed; key ***", errors.ProviderError),
], ids=["claude-auth", "claude-usage-limit", "claude-max-turns", "claude-ok", "codex-notice-then-ok",
        "codex-failed", "gemini-warning-ignored", "gemini-max-turns-then-success", "gemini-blocked",
        "gemini-error-result-redacted"])
def test_dialect_outcomes(dialect: Dialect, lines: list[bytes], text: str | None, error: str | None,
                          cls: type[errors.LlmsrvError] | None) -> None:
    fold, _ = fold_lines(dialect, lines)
    assert fold.done
    if error is None:
        assert fold.failure() is None and fold.result().text == text
        return
    with pytest.raises(errors.LlmsrvError) as info:
        fold.result()
    assert type(info.value) is cls and info.value.message.endswith(f"reported an error: {error}")


# ---- each vendor as a real process ---------------------------------------------------------------------

EXPECTED_ARGV = {
    "claude": ["--output-format", "stream-json", "--verbose", "--include-partial-messages", "--model",
               "claude-sonnet-4-6", "--print", "--", "{prompt}"],
    "codex": ["exec", "--json", "--skip-git-repo-check", "--model", "gpt-5-codex", "--", "{prompt}"],
    "gemini": ["--output-format", "stream-json", "--model", "gemini-2.5-flash", "-p", "{prompt}"],
}
DELTAS = {"claude": ["Hello", " from", " the", " fake", " claude"], "codex": ["Hello from the fake codex"],
          "gemini": ["Hello", " from", " the", " fake", " gemini"]}


@pytest.mark.parametrize("vendor", VENDORS)
async def test_plain_answer_through_the_login(tmp_path: Path, vendor: str) -> None:
    prompt = f"it's $(touch {tmp_path}/pwned) `id`; {{model}} \"q\"\nline 2"
    prov = provider(vendor, host(tmp_path))
    assert prov.choice().transport == "cli"
    completion = await prov.complete(call(prompt, vendor=vendor))
    assert (completion.text, completion.usage, completion.subscription) == (text_of(vendor), USAGE[vendor], True)
    [rec] = records(tmp_path)
    assert rec["argv"] == [prompt if a == "{prompt}" else a for a in EXPECTED_ARGV[vendor]]  # no shell, one element
    assert not (tmp_path / "pwned").exists()
    assert rec["pgid"] == rec["pid"] and rec["vendor"] == vendor
    assert_reaped(rec["pid"])


@pytest.mark.parametrize("vendor", VENDORS)
async def test_streamed_answer_through_the_login(tmp_path: Path, vendor: str) -> None:
    deltas: list[str] = []
    completion = await provider(vendor, host(tmp_path)).complete(call(vendor=vendor), deltas.append)
    assert deltas == DELTAS[vendor] and "".join(deltas) == completion.text == text_of(vendor)
    assert completion.usage == USAGE[vendor] and completion.subscription


@pytest.mark.parametrize("vendor", ["codex", "gemini"])
async def test_the_last_turn_is_the_answer(tmp_path: Path, vendor: str) -> None:
    deltas: list[str] = []
    completion = await provider(vendor, host(tmp_path)).complete(call("FAKE_MODE=tools", vendor=vendor), deltas.append)
    assert completion.text == text_of(vendor)
    assert deltas[0] in ("Let me look.", "Thinking...")  # the first turn was streamed, and is not the answer


@pytest.mark.parametrize("vendor", VENDORS)
async def test_the_cli_runs_on_its_login_not_on_a_key(tmp_path: Path, vendor: str) -> None:
    secret = tmp_path / "key"
    secret.write_text("k-from-file")
    env = host(tmp_path, **{API_KEY[vendor]: "k1", f"{API_KEY[vendor]}_FILE": str(secret), "MY_VENDOR_API_KEY": "k2",
                            "OPENROUTER_API_KEY": "other"})
    prov = provider(vendor, env, transport="cli", api_key_env="MY_VENDOR_API_KEY")
    assert prov.status().reason == (f"transport cli (cli): {vendor} at {tmp_path}/bin/{vendor}, logged in "
                                    f"({tmp_path}/home/{'/'.join(LOGIN_FILE[vendor])})")
    await prov.complete(call(vendor=vendor))
    assert records(tmp_path)[0]["key_variables"] == ["OPENROUTER_API_KEY"]  # another provider's key stays


@pytest.mark.parametrize(("vendor", "cls", "words"), [
    ("claude", errors.MissingCredentials, "claude: claude reported an error: Invalid API key · Please run /login"),
    ("codex", errors.ProviderError, "codex: codex reported an error: You've hit your usage limit. Try again later."),
    ("gemini", errors.ProviderError, "gemini: gemini reported an error: Interactive consent could not be obtained."),
])
async def test_the_cli_reports_its_failure(tmp_path: Path, vendor: str, cls: type[errors.LlmsrvError],
                                           words: str) -> None:
    with pytest.raises(errors.LlmsrvError) as info:
        await provider(vendor, host(tmp_path, FAKE_CLI_MODE="error_result")).complete(call(vendor=vendor))
    assert type(info.value) is cls and info.value.message == words  # the report, not "exit code 1"
    assert_reaped(records(tmp_path)[0]["pid"])


@pytest.mark.parametrize("vendor", VENDORS)
async def test_no_terminal_event_is_no_answer(tmp_path: Path, vendor: str) -> None:
    with pytest.raises(errors.ProviderError, match=f"{vendor}: no result: {vendor} exited 0 without a result event"):
        await provider(vendor, host(tmp_path, FAKE_CLI_MODE="no_result")).complete(call(vendor=vendor))


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_failing_cli_without_a_report(tmp_path: Path, vendor: str) -> None:
    with pytest.raises(errors.ProviderError, match=f"{vendor} failed with exit code 3: Error: authentication failed"):
        await provider(vendor, host(tmp_path, FAKE_CLI_MODE="fail")).complete(call(vendor=vendor))


# ---- cancellation and deadlines: the process group goes ----------------------------------------------

@pytest.mark.parametrize("how", ["cancel", "deadline"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_cancel_and_deadline_stop_the_process_group(tmp_path: Path, vendor: str, how: str) -> None:
    prov = provider(vendor, host(tmp_path, FAKE_CLI_MODE="spawn_child"), grace=60.0)  # SIGTERM must suffice
    deltas: list[str] = []
    with trio.CancelScope() as scope:
        def on_delta(text: str) -> None:
            deltas.append(text)
            if how == "cancel":
                scope.cancel()
            else:
                scope.deadline = trio.current_time()  # the request's deadline, passed at the first delta
        try:
            await prov.complete(call(vendor=vendor), on_delta)
        except BaseException as exc:
            assert type(exc) is trio.Cancelled  # bare, never in a group: the router catches it by class
            raise
        pytest.fail("not cancelled")
    assert scope.cancelled_caught and deltas == DELTAS[vendor][:1]
    [rec] = records(tmp_path)
    assert_reaped(rec["pid"])  # complete() returned only after reaping its CLI
    await wait_stopped(rec["child_pid"])
    assert (tmp_path / "records" / f"child-{rec['pid']}.term").read_text() == "TERM"  # the group got SIGTERM


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_cli_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path, vendor: str) -> None:
    prov = provider(vendor, host(tmp_path, FAKE_CLI_MODE="ignore_sigterm"), grace=0.2)
    with trio.CancelScope() as scope:
        await prov.complete(call(vendor=vendor), lambda _text: scope.cancel())
    [rec] = records(tmp_path)
    assert_reaped(rec["pid"])
    await wait_stopped(rec["child_pid"])  # SIGKILL: nothing records it
    assert not (tmp_path / "records" / f"child-{rec['pid']}.term").exists()


# ---- auto, status and probe on a host ----------------------------------------------------------------

@pytest.mark.parametrize("vendor", VENDORS)
async def test_auto_on_a_host(tmp_path: Path, vendor: str) -> None:
    keyed = provider(vendor, host(tmp_path, **{API_KEY[vendor]: "k"}))
    assert keyed.choice().transport == "api" and keyed.status().available
    assert keyed.status().reason == "transport api (auto): an API key is configured"

    nothing = provider(vendor, host(tmp_path / "n", installed=(), logged_in=()))
    status = nothing.status()
    assert (status.available, status.state) == (False, "missing")
    assert API_KEY[vendor] in (status.reason or "") and f"install the {vendor} CLI" in (status.reason or "")
    with pytest.raises(errors.MissingCredentials, match=f"{vendor}: no credentials"):
        await nothing.complete(call(vendor=vendor))
    assert (await nothing.probe()) == status

    env = host(tmp_path / "l", logged_in=())
    later = provider(vendor, env)
    assert not later.status().available and f"or log in to the {vendor} CLI" in (later.status().reason or "")
    folder, name = LOGIN_FILE[vendor]
    (Path(env["HOME"]) / folder).mkdir()
    (Path(env["HOME"]) / folder / name).write_text("{}")  # logged in since: seen at the next look
    assert later.status().available and (later.status().reason or "").startswith("transport cli (auto)")

    probed = await later.probe()
    assert probed.available and (probed.reason or "").endswith(f": {vendor} 2026.01.01-fake")


async def test_status_looks_at_the_host_at_most_every_look_every_s(tmp_path: Path) -> None:
    env = host(tmp_path, logged_in=())
    prov = provider("claude", env)
    prov.cli.LOOK_EVERY_S = 3600.0
    assert not prov.status().available
    (Path(env["HOME"]) / ".claude").mkdir()
    (Path(env["HOME"]) / ".claude" / ".credentials.json").write_text("{}")
    assert not prov.status().available  # the last look stands for LOOK_EVERY_S
    prov.cli.LOOK_EVERY_S = 0.0
    assert prov.status().available


async def test_api_is_the_api_even_with_a_login(tmp_path: Path) -> None:
    forced = provider("claude", host(tmp_path), transport="api")
    assert forced.choice().transport == "api"
    assert forced.status().state == "missing" and "transport api (api): no API key: no credentials" in (
        forced.status().reason or "")


# ---- cost: the prices do not apply through a subscription -----------------------------------------------

async def test_cost_is_zero_through_the_login_and_priced_through_the_api(tmp_path: Path) -> None:
    prices = {"prices": {"claude-sonnet-4-6": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}}
    reply = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
             "content": [{"type": "text", "text": "from the API"}], "stop_reason": "end_turn", "stop_sequence": None,
             "usage": {"input_tokens": 1000, "output_tokens": 1000}}
    request = decode_request(b'{"messages": [{"role": "user", "content": "hi there"}], "model": "claude:sonnet"}')
    async with FakeUpstream(lambda r: Json(reply)) as up:
        cfg = build_config({"providers": {"claude": {**prices, "base_url": up.url}}}, env={})
        answers = {}
        for name, env in (("cli", host(tmp_path)), ("api", {"ANTHROPIC_API_KEY": "k"})):
            claude = build_provider("claude", cfg.providers.claude, env)
            pipeline = Pipeline(cfg, {"mock": MockProvider(cfg.providers.mock), "claude": claude})
            answers[name] = await pipeline.answer(request, f"c-{name}")
    assert (answers["cli"].text, answers["cli"].model, answers["cli"].cost_cents) == (
        text_of("claude"), "claude:claude-sonnet-4-6", 0.0)
    assert answers["cli"].usage == USAGE["claude"]
    assert answers["api"].text == "from the API" and answers["api"].cost_cents == pytest.approx(1.8)  # $0.003+$0.015


async def test_end_to_end_over_nats(nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in host(tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in ("ANTHROPIC_API_KEY", "CLAUDE_API_KEY", "OPENAI_API_KEY", "CODEX_API_KEY", "GEMINI_API_KEY",
                 "GOOGLE_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    priced = {"prices": {"claude-sonnet-4-6": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}}
    async with running(nats_url, providers={"claude": {**priced, "kill_grace_s": 5.0},
                                            "gemini": {"kill_grace_s": 5.0}}) as h:
        reply = await h.client.complete({"messages": user("hello there"), "model": "claude:sonnet"})
        assert (reply.text, reply.model, reply.cost_cents) == (text_of("claude"), "claude:claude-sonnet-4-6", 0.0)
        assert reply.usage.prompt_tokens == 16 and [a.provider for a in reply.attempts] == ["claude"]

        chunks: list[Any] = []
        streamed = await h.client.stream({"messages": user("hello there"), "model": "codex:gpt-5-codex"},
                                         chunks.append)
        assert streamed.text == text_of("codex") and "".join(c.delta for c in chunks) == text_of("codex")

        assert (await cancel_after_first_chunk(h, "gemini:gemini-2.5-flash", "gem-1")).error_code == "CANCELLED"
        [busy] = [r for r in records(tmp_path) if r["mode"] == "spawn_child"]
        assert_reaped(busy["pid"])
        await wait_stopped(busy["child_pid"])
        assert (tmp_path / "records" / f"child-{busy['pid']}.term").read_text() == "TERM"


# ---- llmsrv check ----------------------------------------------------------------------------------------

def test_check_says_which_transport_and_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_KEY_FILE"))
           and k not in ("CLAUDE_CODE_OAUTH_TOKEN", "GH_TOKEN", "GITHUB_TOKEN")}
    env.update(host(tmp_path, logged_in=("claude",)), GEMINI_API_KEY="g-test", LLMSRV_CONFIG="")
    env["PATH"] = f"{env['PATH']}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run([sys.executable, "-m", "llmsrv", "check"], capture_output=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.decode().splitlines()}
    home = env["HOME"]
    assert lines["claude"] == (f"claude         available transport cli (auto): no API key; claude at "
                               f"{tmp_path}/bin/claude is logged in ({home}/.claude/.credentials.json)")
    assert lines["codex"].startswith("codex          missing   no credentials: set OPENAI_API_KEY or CODEX_API_KEY")
    assert lines["codex"].endswith(f"or log in to the codex CLI: run `codex login` (transport auto: no API key, "
                                   f"and no codex login in {home}/.codex/auth.json)")
    assert lines["gemini"] == "gemini         available transport api (auto): an API key is configured"
