"""The Copilot provider against one real fake server that answers both the GitHub token exchange and
the Copilot chat API (every chat request checked like the real chat completions API, ``validating``):
one exchange for many concurrent calls, refresh after expiry, a 401 drops the cached token, no token in
any error, a two-call tool round trip; and end to end over real NATS."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from llmsrv import errors
from llmsrv.config import ProviderConfig
from llmsrv.messages import StreamChunk, ToolCall, Usage
from llmsrv.providers.api import HttpApiProvider
from llmsrv.providers.auth import TOKEN_PATH
from llmsrv.providers.codecs.openai_chat import parse_chat
from llmsrv.providers.registry import build_provider

from .conftest import running, user
from .fakes import CANCEL_CLOSE_BOUND_S, FakeUpstream, Hang, Json, Request, Sse, cancel_when
from .test_provider_openai import (
    QUOTA,
    answered_in_reverse,
    call_of,
    chat_reply,
    round_trip_call,
    round_trip_handler,
    text_stream,
)
from .upstream_rules import Validating, validating

GH_TOKEN = "gho_canaryGitHubToken42"


class FakeCopilot:
    """State behind the fake: every exchange mints a new Copilot token; the chat API checks it."""

    def __init__(self, lifetime_s: float = 1800.0, exchange_delay_s: float = 0.0) -> None:
        self.lifetime_s = lifetime_s
        self.exchange_delay_s = exchange_delay_s
        self.tokens: list[str] = []
        self.refuse: set[str] = set()  # Copilot tokens the chat API answers 401 to
        self.hang_next_exchange = False
        self.chat: Callable[[Request], Json | Sse] | None = None  # the chat API's answer, when not the default
        self.up: FakeUpstream | None = None
        self.validator: Validating = validating("openai_chat", self.handler)

    def handler(self, request: Request) -> Json | Sse | Hang:
        assert self.up is not None
        if request.path == TOKEN_PATH:
            if self.hang_next_exchange:
                self.hang_next_exchange = False
                return Hang()
            if request.headers.get("authorization") != f"token {GH_TOKEN}":
                return Json({"message": f"Bad credentials for {request.headers.get('authorization')}"}, status=401)
            token = f"tid=abc;exp={int(time.time() + self.lifetime_s)};sku=free;8kp=1:copilot{len(self.tokens)}"
            self.tokens.append(token)
            return Json({"token": token, "expires_at": time.time() + self.lifetime_s, "refresh_in": 1500,
                         "endpoints": {"api": self.up.url, "proxy": "https://proxy.example"}},
                        delay_s=self.exchange_delay_s)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in self.tokens or bearer in self.refuse:
            return Json({"error": {"message": f"unauthorized: token {bearer} expired", "code": "unauthorized"}},
                        status=401)
        if request.path == "/models":
            return Json({"data": [{"id": "gpt-4o", "capabilities": {"type": "chat"}}], "object": "list"})
        if self.chat is not None:
            return self.chat(request)
        if request.json().get("stream"):
            return Sse(text_stream(["Co", "pi", "lot"], (6, 3)))
        return Json(chat_reply(f"answer #{len(self.chat_requests())}", usage=(5, 2)))

    def chat_requests(self) -> list[Request]:
        assert self.up is not None
        return [r for r in self.up.requests if r.path == "/chat/completions"]

    def exchanges(self) -> list[Request]:
        assert self.up is not None
        return [r for r in self.up.requests if r.path == TOKEN_PATH]

    async def __aenter__(self) -> FakeCopilot:
        self.up = await FakeUpstream(self.validator).__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.up is not None
        await self.up.__aexit__(*exc)
        assert self.validator.problems == []  # every chat request was one the real API accepts

    def provider(self, env: dict[str, str] | None = None) -> HttpApiProvider:
        assert self.up is not None
        return build_provider("copilot", ProviderConfig(base_url=self.up.url),
                               {"COPILOT_GITHUB_TOKEN": GH_TOKEN} if env is None else env)


async def test_the_exchanged_token_is_what_the_chat_call_sends() -> None:
    async with FakeCopilot() as fake:
        completion = await fake.provider().complete(call_of("gpt-4o"))
    assert (completion.text, completion.usage) == ("answer #1", Usage(5, 2))
    [exchange] = fake.exchanges()
    assert exchange.method == "GET" and exchange.headers["authorization"] == f"token {GH_TOKEN}"
    [chat] = fake.chat_requests()
    assert chat.headers["authorization"] == f"Bearer {fake.tokens[0]}"
    assert chat.headers["copilot-integration-id"] == "vscode-chat"
    assert chat.headers["openai-intent"] == "conversation-panel"
    assert chat.headers["editor-version"].startswith("vscode/")
    assert chat.headers["editor-plugin-version"].startswith("copilot-chat/")
    assert chat.headers["user-agent"].startswith("GitHubCopilotChat/")
    assert chat.json() == {"model": "gpt-4o", "max_tokens": 50, "temperature": 0.3, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]}


async def test_one_exchange_for_many_concurrent_requests() -> None:
    async with FakeCopilot(exchange_delay_s=0.1) as fake:
        provider = fake.provider()
        texts: list[str] = []

        async def one() -> None:
            texts.append((await provider.complete(call_of("gpt-4o"))).text)

        async with trio.open_nursery() as nursery:
            for _ in range(25):
                nursery.start_soon(one)
        await provider.complete(call_of("gpt-4o"))  # and the cached token serves later calls too
    assert len(fake.exchanges()) == 1 == provider.auth.statistics().exchanges
    assert len(texts) == 25 and len(fake.chat_requests()) == 26
    assert {r.headers["authorization"] for r in fake.chat_requests()} == {f"Bearer {fake.tokens[0]}"}


async def test_refresh_after_expiry() -> None:
    # expires_at 61 s ahead: fresh for the 1 s before the 60 s safety margin (room for two calls on a busy machine).
    async with FakeCopilot(lifetime_s=61.0) as fake:
        provider = fake.provider()
        await provider.complete(call_of("gpt-4o"))
        await provider.complete(call_of("gpt-4o"))
        assert len(fake.exchanges()) == 1
        fresh_until = provider.auth.statistics().fresh_until
        assert fresh_until is not None
        await trio.sleep(max(0.0, fresh_until - time.time()) + 0.05)
        await provider.complete(call_of("gpt-4o"))
    assert len(fake.exchanges()) == 2
    assert [r.headers["authorization"] for r in fake.chat_requests()] == \
        [f"Bearer {fake.tokens[0]}"] * 2 + [f"Bearer {fake.tokens[1]}"]


async def test_a_401_drops_the_cached_token_and_no_token_leaks() -> None:
    async with FakeCopilot() as fake:
        provider = fake.provider()
        await provider.complete(call_of("gpt-4o"))
        fake.refuse.add(fake.tokens[0])  # revoked upstream; the body echoes it
        with pytest.raises(errors.MissingCredentials) as info:
            await provider.complete(call_of("gpt-4o"))
        again = await provider.complete(call_of("gpt-4o"))
    assert again.text == "answer #3"
    assert len(fake.exchanges()) == 2
    assert fake.chat_requests()[-1].headers["authorization"] == f"Bearer {fake.tokens[1]}"
    assert fake.tokens[0] not in info.value.message and GH_TOKEN not in info.value.message
    assert "401" in info.value.message


async def test_exchange_refusals_are_credential_errors_without_tokens() -> None:
    async with FakeCopilot() as fake:
        with pytest.raises(errors.MissingCredentials) as refused:
            await fake.provider({"GITHUB_TOKEN": "gho_wrongTokenEchoed"}).complete(call_of("gpt-4o"))
        probe = await fake.provider({"GH_TOKEN": "gho_wrongTokenEchoed"}).probe()
    assert "gho_wrongTokenEchoed" not in refused.value.message
    assert (probe.available, probe.state) == (False, "invalid") and "gho_wrong" not in (probe.reason or "")

    async with FakeUpstream(lambda r: Json({"message": "Not Found"}, status=404)) as up:
        provider = build_provider("copilot", ProviderConfig(base_url=up.url), {"GH_TOKEN": GH_TOKEN})
        with pytest.raises(errors.MissingCredentials, match="no Copilot access"):
            await provider.complete(call_of("gpt-4o"))


async def test_streaming_through_copilot() -> None:
    async with FakeCopilot() as fake:
        deltas: list[str] = []
        completion = await fake.provider().complete(call_of("gpt-4o"), deltas.append)
    assert deltas == ["Co", "pi", "lot"] and completion.text == "Copilot"
    assert completion.usage == Usage(6, 3)
    assert fake.chat_requests()[0].json()["stream_options"] == {"include_usage": True}


async def test_cancelled_exchange_closes_its_connection_and_frees_the_lock() -> None:
    async with FakeCopilot() as fake:
        provider = fake.provider()
        fake.hang_next_exchange = True
        assert fake.up is not None
        # cancel once the token exchange is held by the fake (it never answers)
        cancel = await cancel_when(fake.up.wait_request, lambda: provider.complete(call_of("gpt-4o")))
        seen = await fake.up.wait_disconnect()
        with trio.fail_after(5):  # fail-safe: a lock still held by the cancelled exchange would hang here
            completion = await provider.complete(call_of("gpt-4o"))
    assert cancel.caught and cancel.at <= seen and seen - cancel.at < CANCEL_CLOSE_BOUND_S
    assert [r.path for r in fake.up.requests[:1]] == [TOKEN_PATH] and len(fake.up.disconnects) == 1
    assert completion.text == "answer #1" and len(fake.exchanges()) == 2


async def test_probe_lists_models_with_the_copilot_token() -> None:
    async with FakeCopilot() as fake:
        status = await fake.provider().probe()
        missing = await fake.provider({}).probe()
    assert status.available
    assert (missing.available, missing.state) == (False, "missing")
    with pytest.raises(errors.MissingCredentials, match="COPILOT_GITHUB_TOKEN"):
        await fake.provider({}).complete(call_of("gpt-4o"))
    assert [r.path for r in fake.up.requests] == [TOKEN_PATH, "/models"]  # type: ignore[union-attr]
    assert fake.up.requests[1].headers["authorization"] == f"Bearer {fake.tokens[0]}"  # type: ignore[union-attr]


def test_text_and_tool_calls_split_over_two_choices() -> None:
    # Copilot can answer (n=1) with the text in one choice and the tool calls in another.
    data = chat_reply("Let me check.", usage=(9, 4))
    data["choices"].append({"index": 1, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [
        {"id": "tooluse_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}})
    completion = parse_chat(data, call_of("claude-sonnet-4"))
    assert (completion.text, completion.finish_reason) == ("Let me check.", "tool_calls")
    assert list(completion.tool_calls) == [ToolCall("tooluse_1", "get_weather", '{"city":"Oslo"}')]


def test_token_sources_and_defaults() -> None:
    env = {"COPILOT_GITHUB_TOKEN": "a1234", "GITHUB_TOKEN": "b1234", "GH_TOKEN": "c1234"}
    assert build_provider("copilot", ProviderConfig(), env).key == "a1234"
    assert build_provider("copilot", ProviderConfig(), {"GITHUB_TOKEN": "b1234", "GH_TOKEN": "c1234"}).key == "b1234"
    assert build_provider("copilot", ProviderConfig(), {"GH_TOKEN": "c1234"}).key == "c1234"
    assert build_provider("copilot", ProviderConfig(), {}).base_url == "https://api.github.com"
    assert build_provider("copilot", ProviderConfig(), {}).status().state == "missing"


def test_the_predecessors_copilot_token_sources(tmp_path: Path) -> None:
    """GITHUB_COPILOT_TOKEN, then (no variable set) copilot-api's token file, then `gh auth token`."""
    assert build_provider("copilot", ProviderConfig(), {"GITHUB_COPILOT_TOKEN": "p1234"}).key == "p1234"
    home = tmp_path / "home"
    (home / ".local" / "share" / "copilot-api").mkdir(parents=True)
    (home / ".local" / "share" / "copilot-api" / "github_token").write_text("gho_file1234\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gh = bin_dir / "gh"  # a fake GitHub CLI: a real executable on PATH, as `gh auth token` prints
    gh.write_text("#!/bin/sh\n[ \"$1 $2\" = \"auth token\" ] && echo gho_cli5678 && exit 0\nexit 1\n")
    gh.chmod(0o755)
    assert build_provider("copilot", ProviderConfig(), {"HOME": str(home), "PATH": str(bin_dir)}).key == "gho_file1234"
    assert build_provider("copilot", ProviderConfig(), {"HOME": str(tmp_path), "PATH": str(bin_dir)}).key \
        == "gho_cli5678"
    assert build_provider("copilot", ProviderConfig(), {"GH_TOKEN": "c1234", "HOME": str(home)}).key == "c1234"
    missing = build_provider("copilot", ProviderConfig(), {"HOME": str(tmp_path), "PATH": str(tmp_path)}).status()
    assert missing.state == "missing" and "copilot-api/github_token" in missing.reason and "gh auth login" in \
        missing.reason


async def test_copilot_end_to_end_over_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COPILOT_GITHUB_TOKEN", GH_TOKEN)
    async with FakeCopilot() as fake, \
            running(nats_url, providers={"copilot": {"base_url": fake.up.url}}) as h:  # type: ignore[union-attr]
        reply = await h.client.complete({"messages": user("hi"), "model": "copilot:gpt-4o"})
        chunks: list[StreamChunk] = []
        streamed = await h.client.stream({"messages": user("hi"), "model": "copilot:gpt-4o"}, chunks.append)
    assert (reply.text, reply.model, reply.usage) == ("answer #1", "copilot:gpt-4o", Usage(5, 2))
    assert streamed.text == "Copilot" == "".join(c.delta for c in chunks)
    assert (streamed.model, streamed.usage) == ("copilot:gpt-4o", Usage(6, 3))
    assert len(fake.exchanges()) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_two_call_round_trip_answered_in_reverse(stream: bool) -> None:
    async with FakeCopilot() as fake:
        fake.chat = round_trip_handler("openai_chat", stream)
        provider = fake.provider()
        call = round_trip_call("openai_chat", "gpt-4o")
        on_delta = (lambda d: None) if stream else None
        first = await provider.complete(call, on_delta)
        second = await provider.complete(answered_in_reverse(call, first), on_delta)
    assert first.finish_reason == "tool_calls" and len(first.tool_calls) == 2
    assert second.finish_reason == "stop" and second.text
    assert fake.validator.problems == [] and fake.validator.rejected == []
    [a, b] = first.tool_calls
    sent = fake.chat_requests()[1].json()["messages"]
    assert sent[2]["tool_calls"][0]["id"] == a.id and sent[2]["content"] is None
    assert [(m["role"], m["tool_call_id"]) for m in sent[3:]] == [("tool", b.id), ("tool", a.id)]


async def test_copilot_quota_is_quota_exhausted() -> None:
    async with FakeCopilot() as fake:
        fake.chat = lambda request: Json({"error": QUOTA}, status=429)
        with pytest.raises(errors.QuotaExhausted) as info:
            await fake.provider().complete(call_of("gpt-4o"))
    assert info.value.retry_after_ms is None and "quota" in info.value.message
