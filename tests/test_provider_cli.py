"""The cli provider (cursor-agent) against a real fake CLI process: tests/fake_cli.py.

Process checks: our own child (the CLI) must be reaped (``waitpid`` says it is no child of ours
any more); its children must not be running (gone, or a zombie waiting for PID 1 to reap it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from llmsrv import errors, messages
from llmsrv.client import ReplyError
from llmsrv.config import ProviderConfig
from llmsrv.messages import FunctionCall, Message, MessageToolCall, Usage, check_turns
from llmsrv.providers import Call
from llmsrv.providers.cli import CliProvider
from llmsrv.providers.codecs import Origin, conversation_text
from llmsrv.providers.codecs.cli_dialects import AGENTS
from llmsrv.providers.codecs.stream_json import StreamJsonFold, build_prompt, substitute
from llmsrv.providers.process import AFTER_RESULT_S
from llmsrv.providers.registry import build_provider

from .conftest import Harness, running, user

FAKE = Path(__file__).with_name("fake_cli.py")
FIXTURES = Path(__file__).with_name("fixtures") / "cursor"
TEXT = "Hello from the fake cursor-agent"
KEY = "sk-cursor-secret-4242"


def make(tmp_path: Path, *, command: tuple[str, ...] = (), grace: float = 0.5, path: str | None = None,
         api_key_env: str | None = None, **env: str) -> CliProvider:
    """A cursor provider whose ``cursor-agent`` on PATH is the fake."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if not (bindir / "cursor-agent").exists():
        (bindir / "cursor-agent").symlink_to(FAKE)
    (tmp_path / "records").mkdir(exist_ok=True)
    full_env = {"PATH": path if path is not None else f"{bindir}{os.pathsep}{os.environ['PATH']}",
                "FAKE_CLI_RECORD_DIR": str(tmp_path / "records"), **env}
    cfg = ProviderConfig(command=command, kill_grace_s=grace, api_key_env=api_key_env)
    return build_provider("cursor", cfg, full_env)


def call(text: str = "hello", model: str = "auto", messages: list[Message] | None = None) -> Call:
    return Call(model=model, messages=messages or [Message("user", text)], max_tokens=100, temperature=0.7)


def records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "records").glob("*.json"))]


async def cancel_after_first_chunk(h: Harness, model: str, cid: str, within_s: float = 30.0) -> ReplyError:
    """A streamed request to the fake CLI in ``spawn_child`` mode, cancelled with ``llm.cancel`` once its
    first delta arrived (the CLI then sleeps in it, with a child process of its own): the error reply."""
    first_chunk = trio.Event()
    outcome: list[ReplyError] = []

    async def cancelled_request() -> None:
        try:
            await h.client.stream({"messages": user("FAKE_MODE=spawn_child"), "model": model, "correlation_id": cid},
                                  lambda chunk: first_chunk.set())
        except ReplyError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_request)
        with trio.fail_after(within_s):  # fail-safe: the CLI sends its first delta, then sleeps in it
            await first_chunk.wait()
        h.client.bus.publish_nowait(f"{h.prefix}.cancel", messages.encode({"correlation_id": cid}))
    return outcome[0]


def running_(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: it is dead, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def assert_reaped(pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def wait_stopped(pid: int, within_s: float = 30.0) -> None:
    """Return once ``pid`` no longer runs; ``within_s`` is a fail-safe, the kill already happened."""
    with trio.fail_after(within_s):
        while running_(pid):
            await trio.sleep(0.01)


# ---- pure parts -------------------------------------------------------------------------------

@pytest.mark.parametrize(("messages", "prompt"), [
    ([Message("user", "hi there")], "hi there"),
    ([Message("system", "be brief"), Message("user", "hi")], "be brief\n\nhi"),
    ([Message("system", "be brief"), Message("user", "a"), Message("assistant", "b"), Message("user", "c")],
     "be brief\n\nUser: a\n\nAssistant: b\n\nUser: c"),
    ([Message("user", "a"), Message("tool", "42")], "User: a\n\nTool: 42"),
    ([Message("user", "-h --force")], " -h --force"),
    ([Message("user", "update")], "update\n"),
    ([Message("user", "-h")], " -h"),
], ids=["one-user", "system-first", "labelled-conversation", "tool", "no-leading-dash", "one-word-no-subcommand",
        "one-dashed-word"])
def test_build_prompt(messages: list[Message], prompt: str) -> None:
    assert build_prompt(messages) == prompt


def tool_call(call_id: str, name: str, arguments: str = "{}") -> MessageToolCall:
    return MessageToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))


def assistant_calls(*calls: MessageToolCall, content: str = "") -> Message:
    return Message("assistant", content, tool_calls=list(calls))


def tool_result(call_id: str, content: str) -> Message:
    return Message("tool", content, tool_call_id=call_id)


WEATHER = tool_call("call_w", "get_weather", '{"city": "Paris"}')
CLOCK = tool_call("call_t", "get_time", '{"tz": "Europe/Paris"}')
ASK = Message("user", "Weather and time in Paris?")


@pytest.mark.parametrize(("messages", "text"), [
    ([ASK, assistant_calls(WEATHER), tool_result("call_w", "18C, sunny")],
     'User: Weather and time in Paris?\n\n'
     'Assistant:\nTool call call_w: get_weather {"city": "Paris"}\n\n'
     'Tool result for call_w (get_weather): 18C, sunny'),
    ([ASK, assistant_calls(WEATHER, CLOCK, content="Looking both up."),
      tool_result("call_t", "14:05"), tool_result("call_w", "18C, sunny"), Message("assistant", "18C at 14:05.")],
     'User: Weather and time in Paris?\n\n'
     'Assistant: Looking both up.\n'
     'Tool call call_w: get_weather {"city": "Paris"}\n'
     'Tool call call_t: get_time {"tz": "Europe/Paris"}\n\n'
     'Tool result for call_t (get_time): 14:05\n\n'
     'Tool result for call_w (get_weather): 18C, sunny\n\n'
     'Assistant: 18C at 14:05.'),
    ([Message("system", "use the tools"), ASK, assistant_calls(WEATHER), tool_result("call_w", "18C"),
      Message("user", "And tomorrow?"), assistant_calls(tool_call("call_w2", "get_weather", '{"day": 1}')),
      tool_result("call_w2", "20C")],
     'use the tools\n\nUser: Weather and time in Paris?\n\n'
     'Assistant:\nTool call call_w: get_weather {"city": "Paris"}\n\n'
     'Tool result for call_w (get_weather): 18C\n\nUser: And tomorrow?\n\n'
     'Assistant:\nTool call call_w2: get_weather {"day": 1}\n\n'
     'Tool result for call_w2 (get_weather): 20C'),
    ([ASK, tool_result("call_x", "orphan")],
     "User: Weather and time in Paris?\n\nTool result for call_x: orphan"),
    ([ASK, Message("tool", "42")], "User: Weather and time in Paris?\n\nTool: 42"),
    ([ASK], "Weather and time in Paris?"),
], ids=["one-call", "two-calls-answered-out-of-order", "two-rounds-system-first", "unknown-call-id",
        "no-call-id", "lone-user-as-is"])
def test_conversation_text_pairs_each_result_with_its_call(messages: list[Message], text: str) -> None:
    assert conversation_text(messages) == text


def test_conversation_text_names_every_result_in_any_order() -> None:
    calls = [tool_call(f"c{i}", f"tool_{i}", f'{{"n": {i}}}') for i in range(4)]
    for order in ([3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 1, 0]):
        messages = [ASK, assistant_calls(*calls), *(tool_result(f"c{i}", f"r{i}") for i in order)]
        check_turns(messages)  # a conversation the contract accepts
        paragraphs = conversation_text(messages).split("\n\n")
        assert paragraphs[2:] == [f"Tool result for c{i} (tool_{i}): r{i}" for i in order]
        assert paragraphs[1].splitlines()[1:] == [f'Tool call c{i}: tool_{i} {{"n": {i}}}' for i in range(4)]


def test_substitute_is_literal_and_single_pass() -> None:
    prompt = "say {model} and {prompt}; $(rm -rf /) `id` 'q' \"dq\""
    argv = substitute(["--model", "{model}", "--x={model}", "{prompt}", "plain"], "gpt-5", prompt)
    assert argv == ["--model", "gpt-5", "--x=gpt-5", prompt, "plain"]


@pytest.mark.parametrize(("lines", "deltas", "text", "usage", "error"), [
    ([b'{"type":"assistant","message":{"content":[{"type":"text","text":"a"},{"type":"tool_use"}]}}',
      b"not json", b"[1, 2]",
      b'{"type":"result","subtype":"success","is_error":false,"result":"a","usage":'
      b'{"input_tokens":3,"cache_read_input_tokens":4,"output_tokens":5}}'],
     ["a"], "a", Usage(7, 5), None),
    ([b'{"type":"assistant","message":{"content":"x"}}', b'{"type":"result","subtype":"success","result":"x"}',
      b'{"type":"assistant","message":{"content":"late"}}'],
     ["x"], "x", None, None),
    ([b'{"type":"result","subtype":"error_max_turns","is_error":true}'], [], None, None, "error_max_turns"),
    ([b'{"type":"thread.started","thread_id":"t"}', b'{"type":"error","message":"Reconnecting... 1/5"}',
      b'{"type":"item.completed","item":{"id":"i0","type":"reasoning","text":"hmm"}}',
      b'{"type":"item.completed","item":{"id":"i1","type":"agent_message","text":"hi"}}',
      b'{"type":"turn.completed","usage":{"input_tokens":9,"cached_input_tokens":2,"output_tokens":1}}'],
     ["hi"], "hi", Usage(9, 1), None),
    ([b'{"type":"turn.failed","error":{"message":"quota exceeded"}}'], [], None, None, "quota exceeded"),
], ids=["cursor-claude", "string-content-and-after-result", "error-result", "codex", "codex-failed"])
def test_event_decoder(lines: list[bytes], deltas: list[str], text: str | None, usage: Usage | None,
                       error: str | None) -> None:
    decoder = StreamJsonFold(call(), Origin("cursor"), "cursor-agent", AGENTS)  # the cursor row's dialect
    got = [d for line in lines if (d := decoder.feed(line))]
    assert (got, decoder.text, decoder.usage, decoder.error) == (deltas, text, usage, error)
    assert decoder.done


def fixture_lines(name: str) -> list[bytes]:
    return (FIXTURES / name).read_bytes().splitlines()


def test_the_documented_stream_folds_to_the_result_text_and_an_estimate() -> None:
    """tests/fixtures/cursor/stream_json_docs.ndjson: the Output format page's events, which carry no
    ``usage`` (it is not documented): the result text stands, usage is estimated."""
    fold = StreamJsonFold(call("Read README.md and create a summary"), Origin("cursor"), "cursor-agent")
    deltas = [d for line in fixture_lines("stream_json_docs.ndjson") if (d := fold.feed(line))]
    assert deltas == ["I'll read the README.md file", " Based on the README, here's a summary: it is a sample project."]
    assert fold.done and fold.usage is None
    completion = fold.result()
    assert completion.text == "".join(deltas)  # "concatenation of all text deltas", as the page defines result
    assert completion.usage == Usage(prompt_tokens=9, completion_tokens=(len(completion.text) + 3) // 4)


def test_usage_seen_from_the_real_cli_is_read() -> None:
    """tests/fixtures/cursor/result_usage_seen.ndjson: the undocumented camelCase ``usage`` of a real
    cursor-agent result; input and output tokens are read (the cache counts are not)."""
    fold = StreamJsonFold(call(), Origin("cursor"), "cursor-agent")
    for line in fixture_lines("result_usage_seen.ndjson"):
        fold.feed(line)
    assert fold.done and fold.usage == Usage(prompt_tokens=229382 + 2158080, completion_tokens=10147)
    assert fold.result().text == ""


# ---- a real process -----------------------------------------------------------------------------

async def test_text_answer_with_and_without_usage(tmp_path: Path) -> None:
    reported = await make(tmp_path, FAKE_CLI_USAGE="1").complete(call())
    estimated = await make(tmp_path).complete(call())
    assert reported.text == estimated.text == TEXT
    assert reported.usage == Usage(prompt_tokens=11, completion_tokens=7)
    assert estimated.usage == Usage(prompt_tokens=2, completion_tokens=(len(TEXT) + 3) // 4)
    assert reported.finish_reason == "stop"


async def test_deltas_arrive_in_order_and_make_the_text(tmp_path: Path) -> None:
    deltas: list[str] = []
    completion = await make(tmp_path).complete(call(), deltas.append)
    assert deltas == ["Hello", " from", " the", " fake", " cursor-agent"]
    assert "".join(deltas) == completion.text


async def test_default_command_argv_without_a_shell(tmp_path: Path) -> None:
    prompt = f"it's $(touch {tmp_path}/pwned) `touch {tmp_path}/pwned2`; {{model}} \"q\"\nline 2"
    provider = make(tmp_path)
    assert provider.executable == str(tmp_path / "bin" / "cursor-agent")
    await provider.complete(call(prompt, model="gpt-5"))
    [rec] = records(tmp_path)
    assert rec["argv"] == ["--print", "--output-format", "stream-json", "--model", "gpt-5", prompt]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    assert rec["pgid"] == rec["pid"]  # its own process group
    assert_reaped(rec["pid"])


async def test_configured_command_replaces_the_template(tmp_path: Path) -> None:
    command = (sys.executable, str(FAKE), "-p", "--model", "{model}", "--", "{prompt}")
    provider = make(tmp_path, command=command)
    messages = [Message("system", "be brief"), Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    completion = await provider.complete(call(model="auto", messages=messages))
    [rec] = records(tmp_path)
    assert rec["argv"] == ["-p", "--model", "auto", "--", "be brief\n\nUser: a\n\nAssistant: b\n\nUser: c"]
    assert completion.text == TEXT


async def test_a_tool_round_trip_reaches_the_cli_as_one_prompt(tmp_path: Path) -> None:
    messages = [Message("system", "use the tools"), ASK, assistant_calls(WEATHER, CLOCK),
                tool_result("call_t", "14:05"), tool_result("call_w", "18C")]
    completion = await make(tmp_path).complete(call(messages=messages))
    [rec] = records(tmp_path)
    assert rec["argv"][-1] == conversation_text(messages)
    assert rec["argv"][-1].endswith("Tool result for call_t (get_time): 14:05\n\n"
                                    "Tool result for call_w (get_weather): 18C")
    assert completion.text == TEXT


async def test_nonzero_exit_is_a_provider_error_without_the_key(tmp_path: Path) -> None:
    with pytest.raises(errors.ProviderError) as info:
        await make(tmp_path, FAKE_CLI_MODE="fail", CURSOR_API_KEY=KEY).complete(call())
    message = info.value.message
    assert "exit code 3" in message and "authentication failed for key ***" in message
    assert KEY not in message
    assert_reaped(records(tmp_path)[0]["pid"])


@pytest.mark.parametrize(("mode", "words"), [("no_result", "no result"), ("error_result", "model refused")])
async def test_missing_or_failed_result_is_a_provider_error(tmp_path: Path, mode: str, words: str) -> None:
    deltas: list[str] = []
    with pytest.raises(errors.ProviderError, match=words):
        await make(tmp_path, FAKE_CLI_MODE=mode).complete(call(), deltas.append)
    assert deltas == ([] if mode == "error_result" else ["Hello", " from", " the", " fake", " cursor-agent"])


async def test_missing_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CliProvider, "LOOK_EVERY_S", 0.0)  # status() looks at PATH every time
    empty = tmp_path / "empty"
    empty.mkdir()
    provider = make(tmp_path, path=f"{empty}{os.pathsep}{Path(sys.executable).parent}")  # python3, no cursor-agent
    status = provider.status()
    assert (status.available, status.reason, status.state) == (False, "cursor-agent not found on PATH", "missing")
    assert await provider.probe() == status
    with pytest.raises(errors.MissingCredentials, match="cursor-agent not found on PATH"):
        await provider.complete(call())
    (empty / "cursor-agent").symlink_to(FAKE)  # installed later: status looks again
    assert provider.status().available
    assert (await provider.complete(call())).text == TEXT


async def test_status_says_whether_the_key_is_set_never_what_it_is(tmp_path: Path) -> None:
    with_key = make(tmp_path, CURSOR_API_KEY=KEY).status()
    without = make(tmp_path).status()
    assert with_key.available and with_key.reason == "CURSOR_API_KEY is set"
    assert without.available and without.reason is not None and "CURSOR_API_KEY is not set" in without.reason
    # no model list of our own: the CLI knows its models (has_model, removed, said True for any)
    assert all(model in make(tmp_path).argv(call(model=model)) for model in ("auto", "anything"))


async def test_api_key_env_is_handed_over_as_cursor_api_key(tmp_path: Path) -> None:
    provider = make(tmp_path, api_key_env="MY_CURSOR_KEY", MY_CURSOR_KEY=KEY)
    assert provider.status().reason == "CURSOR_API_KEY is set"
    await provider.complete(call())
    assert records(tmp_path)[0]["key_set"] is True


async def test_invalid_model_id_is_refused_before_starting(tmp_path: Path) -> None:
    with pytest.raises(errors.ProviderNotFound):
        await make(tmp_path).complete(call(model="--force"))
    assert records(tmp_path) == []


# ---- cancellation and cleanup ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["slow", "spawn_child"])
async def test_cancel_mid_stream_kills_the_process_group(tmp_path: Path, mode: str) -> None:
    grace = 5.0  # far above what SIGTERM takes even on a busy machine: spending it would show
    provider = make(tmp_path, FAKE_CLI_MODE=mode, grace=grace)
    deltas: list[str] = []
    marks: list[float] = []
    with trio.CancelScope() as scope:
        def on_delta(text: str) -> None:
            deltas.append(text)
            marks.append(trio.current_time())
            scope.cancel()
        try:
            await provider.complete(call(), on_delta)
        except BaseException as exc:
            assert type(exc) is trio.Cancelled  # bare, never in a group: the router catches it by class
            raise
        pytest.fail("not cancelled")
    assert trio.current_time() - marks[0] < grace / 2  # SIGTERM was enough: the grace was not spent
    assert scope.cancelled_caught and deltas == ["Hello"]
    [rec] = records(tmp_path)
    assert_reaped(rec["pid"])  # complete() returned only after reaping its child
    if rec["child_pid"]:
        await wait_stopped(rec["child_pid"])


async def test_cancel_of_a_cli_ignoring_sigterm_kills_it_after_the_grace(tmp_path: Path) -> None:
    grace = 0.3
    provider = make(tmp_path, FAKE_CLI_MODE="ignore_sigterm", grace=grace)
    marks: list[float] = []
    with trio.CancelScope() as scope:
        def on_delta(_text: str) -> None:
            marks.append(trio.current_time())
            scope.cancel()
        await provider.complete(call(), on_delta)
    took = trio.current_time() - marks[0]
    assert grace <= took < grace + 2.0  # SIGTERM ignored, the grace spent, then SIGKILL (slack: a busy machine)
    [rec] = records(tmp_path)
    assert_reaped(rec["pid"])
    await wait_stopped(rec["child_pid"])


async def test_a_cli_lingering_after_its_result_is_stopped_and_the_answer_stands(tmp_path: Path) -> None:
    provider = make(tmp_path, FAKE_CLI_MODE="linger", grace=0.5)
    last_delta: list[float] = []  # the result line follows the last delta at once
    completion = await provider.complete(call(), lambda d: last_delta.append(trio.current_time()))
    assert completion.text == TEXT
    took = trio.current_time() - last_delta[-1]  # from the result, not from the (slow, when busy) process start
    assert AFTER_RESULT_S <= took < AFTER_RESULT_S + 0.5 + 1.0  # its time to exit, then stopped within the grace
    assert_reaped(records(tmp_path)[0]["pid"])


async def test_children_left_behind_by_a_finished_cli_are_killed(tmp_path: Path) -> None:
    provider = make(tmp_path, FAKE_CLI_MODE="orphan")
    with trio.fail_after(10):  # the child holds stdout open for 600 s: no waiting for its EOF
        completion = await provider.complete(call())
    assert completion.text == TEXT
    [rec] = records(tmp_path)
    assert_reaped(rec["pid"])
    await wait_stopped(rec["child_pid"], within_s=0.5)


# ---- probe -------------------------------------------------------------------------------------------

async def test_probe(tmp_path: Path) -> None:
    ok = await make(tmp_path).probe()
    assert ok.available and ok.reason == "cursor-agent 2026.01.01-fake"
    broken = await make(tmp_path, FAKE_CLI_VERSION_EXIT="2").probe()
    assert not broken.available and broken.state == "invalid"
    assert broken.reason == "cursor-agent --version exited 2: version check failed"


# ---- end to end over NATS -------------------------------------------------------------------------------

async def test_end_to_end_over_nats(nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "records").mkdir()
    monkeypatch.setenv("FAKE_CLI_RECORD_DIR", str(tmp_path / "records"))
    command = [sys.executable, str(FAKE), "--print", "--output-format", "stream-json", "--model", "{model}",
               "{prompt}"]
    async with running(nats_url, providers={"cursor": {"command": command, "kill_grace_s": 0.5}}) as h:
        reply = await h.client.complete({"messages": user("hello"), "model": "cursor:auto"})
        assert (reply.text, reply.model) == (TEXT, "cursor:auto")
        assert [(a.provider, a.model, a.outcome) for a in reply.attempts] == [("cursor", "auto", "ok")]

        chunks: list[Any] = []
        streamed = await h.client.stream({"messages": user("hello"), "model": "cursor:auto"}, chunks.append)
        assert streamed.text == TEXT and "".join(c.delta for c in chunks) == TEXT
        assert [c.seq for c in chunks] == list(range(len(chunks)))

        round_trip = [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_w", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"P"}'}},
                {"id": "call_t", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_t", "content": "14:05"},
            {"role": "tool", "tool_call_id": "call_w", "content": "18C"}]
        answered = await h.client.complete({"messages": round_trip, "model": "cursor:auto"})
        assert answered.text == TEXT
        [prompt] = [r["argv"][-1] for r in records(tmp_path) if "call_w" in r["argv"][-1]]
        assert prompt == ('User: Weather in Paris?\n\nAssistant:\nTool call call_w: get_weather {"city":"P"}\n'
                          'Tool call call_t: get_time {}\n\nTool result for call_t (get_time): 14:05\n\n'
                          'Tool result for call_w (get_weather): 18C')

        assert (await cancel_after_first_chunk(h, "cursor:auto", "cur-1")).error_code == "CANCELLED"
        [busy] = [r for r in records(tmp_path) if r["mode"] == "spawn_child"]
        assert_reaped(busy["pid"])
        await wait_stopped(busy["child_pid"])

        # 1.5 s: room for the fake CLI to start and record itself on a busy machine before the deadline
        timed_out = await h.error_of(
            json.dumps({"messages": user("FAKE_MODE=slow"), "model": "cursor:auto", "timeout_ms": 1500}).encode())
        assert timed_out["error_code"] == "TIMEOUT"
        [slow] = [r for r in records(tmp_path) if r["mode"] == "slow"]
        assert_reaped(slow["pid"])
