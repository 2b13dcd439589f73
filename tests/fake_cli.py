#!/usr/bin/env python3
"""Fake agent CLIs for the cli provider tests: real processes printing each vendor's documented format.

The name it is run as (a symlink on PATH) picks the vendor, or ``FAKE_CLI_VENDOR``:

    cursor-agent  ``--print --output-format stream-json --model M PROMPT``: Cursor's stream-json
    claude        ``-p --output-format stream-json --verbose [--include-partial-messages] --model M PROMPT``:
                  Claude Code's (``system`` init, ``stream_event`` text deltas with partial messages,
                  ``assistant`` messages, ``result`` with ``usage`` and ``total_cost_usd``)
    codex         ``exec --json --skip-git-repo-check --model M PROMPT``: Codex CLI's JSONL
                  (``thread.started``, ``turn.started``, ``item.completed``, ``turn.completed`` with usage)
    gemini        ``--output-format stream-json --model M -p PROMPT``: Gemini CLI's stream-json
                  (``init``, ``message`` deltas, ``tool_use``/``tool_result``, ``result`` with ``stats``)

The shapes are those traced in ``llmsrv/providers/codecs/stream_json.py`` (cursor) and
``cli_dialects.py`` (the others). Each also answers ``--version``. Behaviour comes from the
environment, or from ``FAKE_MODE=<mode>`` written in the prompt:

    ok              the reply as the vendor streams it, then its terminal event (exit 0)
    slow            the first piece of the reply, then sleeps (for cancellation)
    spawn_child     like slow, after starting a child process (sharing stdout/stderr) that records
                    the SIGTERM it gets (``child-<our pid>.term`` in the record folder); on SIGTERM we
                    wait for that child before exiting, so its record is written before any SIGKILL
    ignore_sigterm  like spawn_child, both ignoring SIGTERM (only SIGKILL ends them)
    orphan          like ok, but leaves a child running behind it
    linger          like ok, then never exits (cursor-agent -p sometimes does that)
    fail            prints to stderr (the key included, to test redaction) and exits 3
    no_result       the reply, then exit 0 without a terminal event
    error_result    the vendor's own failure report (Claude: an authentication error; Codex: a failed
                    turn; Gemini: an error result, exit 41; cursor: a result with is_error)
    tools           (codex, gemini) a first message, a tool call and its result, then the answer

Other variables: FAKE_CLI_TEXT (the reply; default "Hello from the fake <vendor>"), FAKE_CLI_USAGE=1
(usage in cursor's result; the other vendors always report theirs), FAKE_CLI_DELAY_S (between
events, default 0.01), FAKE_CLI_VERSION_EXIT (exit code of --version), FAKE_CLI_RECORD_DIR (each run
writes ``<pid>.json`` there: argv, pid, pgid, child pid, which key variables it was given).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

USAGE = {"claude": {"input_tokens": 11, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3,
                    "output_tokens": 7},
         "codex": {"input_tokens": 24, "cached_input_tokens": 20, "output_tokens": 7},
         "gemini": {"total_tokens": 31, "input_tokens": 24, "output_tokens": 7, "cached": 20, "input": 4,
                    "duration_ms": 12, "tool_calls": 0,
                    "models": {"gemini-2.5-flash": {"total_tokens": 31, "input_tokens": 24, "output_tokens": 7,
                                                    "cached": 20, "input": 4}}}}
CHILD = """
import os, signal, sys, time
marker, ignore = sys.argv[1], sys.argv[2] == "1"
def term(*_):
    with open(marker, "w") as fh:
        fh.write("TERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else term)
with open(marker + ".ready", "w") as fh:
    fh.write("ready")
time.sleep(600)
"""


def emit(event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def record(data: dict[str, object]) -> None:
    folder = os.environ.get("FAKE_CLI_RECORD_DIR")
    if not folder:
        return
    path = os.path.join(folder, f"{os.getpid()}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(path + ".tmp", path)  # readers never see half a file


def spawn_child(ignore_sigterm: bool) -> subprocess.Popen[bytes]:
    """A child in our process group that says when it got SIGTERM; returns once it is listening."""
    folder = os.environ.get("FAKE_CLI_RECORD_DIR") or "/tmp"
    marker = os.path.join(folder, f"child-{os.getpid()}.term")
    child = subprocess.Popen([sys.executable, "-c", CHILD, marker, "1" if ignore_sigterm else "0"])
    deadline = time.monotonic() + 60  # fail-safe: the child is a python start-up away
    while not os.path.exists(marker + ".ready") and time.monotonic() < deadline:
        time.sleep(0.005)
    return child


def option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in names:
            return argv[i + 1]
    return None


def pieces(text: str) -> list[str]:
    words = text.split(" ")
    return words[:1] + [" " + w for w in words[1:]]


# ---- one emitter per vendor: (mode, text, model, argv, wait) -> exit code ----------------------------

def cursor(mode: str, text: str, model: str, prompt: str, argv: list[str], wait: Callable[[int], None]) -> int:
    emit({"type": "system", "subtype": "init", "session_id": "s-1", "model": model, "cwd": os.getcwd(),
          "apiKeySource": "env", "permissionMode": "default"})
    print("a banner line that is not JSON", flush=True)
    emit({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": prompt}]},
          "session_id": "s-1"})
    if mode == "error_result":
        emit({"type": "result", "subtype": "error", "is_error": True, "result": "model refused", "session_id": "s-1"})
        return 0
    for i, chunk in enumerate(pieces(text)):
        emit({"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": chunk}]},
              "session_id": "s-1"})
        wait(i)
    if mode == "no_result":
        return 0
    result: dict[str, object] = {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 12,
                                 "duration_api_ms": 12, "result": text, "session_id": "s-1"}
    if os.environ.get("FAKE_CLI_USAGE") == "1":
        result["usage"] = {"input_tokens": 11, "output_tokens": 7}
    emit(result)
    return 0


def claude(mode: str, text: str, model: str, prompt: str, argv: list[str], wait: Callable[[int], None]) -> int:
    if "--verbose" not in argv:  # what the real CLI says (github.com/anthropics/claude-code issue 733)
        print("Error: When using --print, --output-format=stream-json requires --verbose", file=sys.stderr)
        return 1
    partial = "--include-partial-messages" in argv
    base = {"session_id": "s-1", "parent_tool_use_id": None}
    emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "session_id": "s-1", "tools": ["Read"],
          "mcp_servers": [], "model": model, "permissionMode": "default", "apiKeySource": "none"})
    if mode == "error_result":
        message = "Invalid API key · Please run /login"
        emit({"type": "assistant", "message": {"id": "m0", "type": "message", "role": "assistant", "model": model,
              "content": [{"type": "text", "text": message}]}, "error": "authentication_failed", **base})
        emit({"type": "result", "subtype": "success", "is_error": True, "duration_ms": 5, "duration_api_ms": 0,
              "num_turns": 1, "result": message, "total_cost_usd": 0, "usage": USAGE["claude"], **base})
        return 1
    if partial:
        emit({"type": "stream_event", "event": {"type": "message_start", "message": {"id": "m1", "role": "assistant"}},
              **base})
        emit({"type": "stream_event", "event": {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}}, **base})
        for i, chunk in enumerate(pieces(text)):
            emit({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": chunk}}, **base})
            wait(i)
        emit({"type": "stream_event", "event": {"type": "content_block_stop", "index": 0}, **base})
    # a subagent's message (parent_tool_use_id set) is not part of the answer
    emit({"type": "assistant", "message": {"id": "m0", "type": "message", "role": "assistant", "model": model,
          "content": [{"type": "text", "text": "subagent notes"}]}, "session_id": "s-1", "parent_tool_use_id": "t1"})
    emit({"type": "assistant", "message": {"id": "m1", "type": "message", "role": "assistant", "model": model,
          "content": [{"type": "text", "text": text}], "stop_reason": None, "usage": USAGE["claude"]}, **base})
    if not partial:
        wait(0)
    if mode == "no_result":
        return 0
    emit({"type": "result", "subtype": "success", "is_error": False, "duration_ms": 12, "duration_api_ms": 10,
          "num_turns": 1, "result": text, "total_cost_usd": 0.0123, "usage": USAGE["claude"], **base})
    return 0


def codex(mode: str, text: str, model: str, prompt: str, argv: list[str], wait: Callable[[int], None]) -> int:
    if argv[:1] != ["exec"] or "--json" not in argv:
        print("error: unexpected arguments", file=sys.stderr)
        return 2
    emit({"type": "thread.started", "thread_id": "0199a213-81c0-7800-8aa1-bbab2a035a53"})
    emit({"type": "turn.started"})
    emit({"type": "item.completed", "item": {"id": "item_0", "type": "reasoning", "text": "**Thinking**"}})
    if mode == "error_result":
        emit({"type": "error", "message": "Reconnecting... 1/5"})
        emit({"type": "turn.failed", "error": {"message": "You've hit your usage limit. Try again later."}})
        return 1
    if mode == "tools":
        emit({"type": "item.completed", "item": {"id": "item_1", "type": "agent_message", "text": "Let me look."}})
        emit({"type": "item.started", "item": {"id": "item_2", "type": "command_execution", "command": "bash -lc ls",
                                               "aggregated_output": "", "status": "in_progress"}})
        emit({"type": "item.completed", "item": {"id": "item_2", "type": "command_execution", "command": "bash -lc ls",
                                                 "aggregated_output": "README.md\n", "exit_code": 0,
                                                 "status": "completed"}})
    emit({"type": "item.completed", "item": {"id": "item_3", "type": "agent_message", "text": text}})
    wait(0)
    if mode == "no_result":
        return 0
    emit({"type": "turn.completed", "usage": USAGE["codex"]})
    return 0


def gemini(mode: str, text: str, model: str, prompt: str, argv: list[str], wait: Callable[[int], None]) -> int:
    stamp = "2026-11-25T19:00:00.000Z"
    emit({"type": "init", "timestamp": stamp, "session_id": "s-1", "model": model})
    emit({"type": "message", "timestamp": stamp, "role": "user", "content": prompt})
    if mode == "error_result":
        emit({"type": "result", "timestamp": stamp, "status": "error",
              "error": {"type": "FatalAuthenticationError", "message": "Interactive consent could not be obtained."},
              "stats": USAGE["gemini"]})
        return 41
    if mode == "tools":
        emit({"type": "message", "timestamp": stamp, "role": "assistant", "content": "Thinking...", "delta": True})
        emit({"type": "tool_use", "timestamp": stamp, "tool_name": "list_directory", "tool_id": "tool-1",
              "parameters": {"path": "."}})
        emit({"type": "tool_result", "timestamp": stamp, "tool_id": "tool-1", "status": "success",
              "output": "README.md"})
    for i, chunk in enumerate(pieces(text)):
        emit({"type": "message", "timestamp": stamp, "role": "assistant", "content": chunk, "delta": True})
        wait(i)
    if mode == "no_result":
        return 0
    emit({"type": "result", "timestamp": stamp, "status": "success", "stats": USAGE["gemini"]})
    return 0


VENDORS = {"cursor-agent": cursor, "claude": claude, "codex": codex, "gemini": gemini}
KEY_NAMES = re.compile(r"_API_KEY(_FILE)?$|^CLAUDE_CODE_OAUTH_TOKEN$")


def main(argv: list[str]) -> int:
    vendor = os.environ.get("FAKE_CLI_VENDOR") or os.path.basename(sys.argv[0])
    vendor = vendor if vendor in VENDORS else "cursor-agent"
    if "--version" in argv:
        code = int(os.environ.get("FAKE_CLI_VERSION_EXIT", "0"))
        print("2026.01.01-fake" if code == 0 else "", flush=True)
        if code:
            print("version check failed", file=sys.stderr)
        return code
    model = option(argv, "--model", "-m") or "default"
    prompt = (option(argv, "-p", "--prompt") if vendor == "gemini" else None) or (argv[-1] if argv else "")
    found = re.search(r"FAKE_MODE=(\w+)", prompt)
    mode = found.group(1) if found else os.environ.get("FAKE_CLI_MODE", "ok")
    delay = float(os.environ.get("FAKE_CLI_DELAY_S", "0.01"))
    text = os.environ.get("FAKE_CLI_TEXT", f"Hello from the fake {vendor}")

    if mode == "ignore_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = spawn_child(mode == "ignore_sigterm") if mode in ("spawn_child", "ignore_sigterm", "orphan") else None
    if child is not None and mode == "spawn_child":
        def on_term(*_: object) -> None:  # the whole group got it: let the child say so before we go
            child.wait()
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
    record({"argv": argv, "pid": os.getpid(), "pgid": os.getpgid(0), "child_pid": child and child.pid, "mode": mode,
            "vendor": vendor, "key_set": bool(os.environ.get("CURSOR_API_KEY")),
            "key_variables": sorted(name for name in os.environ if KEY_NAMES.search(name))})

    if mode == "fail":
        key = os.environ.get("CURSOR_API_KEY", "")
        print("starting", file=sys.stderr, flush=True)
        print(f"Error: authentication failed for key {key}", file=sys.stderr, flush=True)
        return 3

    def wait(i: int) -> None:
        """After piece ``i`` of the reply went out."""
        time.sleep(delay)
        if i == 0 and mode in ("slow", "spawn_child", "ignore_sigterm"):
            time.sleep(600)

    code = VENDORS[vendor](mode, text, model, prompt, argv, wait)
    if mode == "linger" and code == 0:
        time.sleep(600)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
