#!/usr/bin/env python3
"""A fake ``cursor-agent`` for the cli provider tests: a real process speaking stream-json.

Invoked like ``cursor-agent --print --output-format stream-json --model M PROMPT`` (or with
``--version``). Behaviour comes from the environment, or from ``FAKE_MODE=<mode>`` written in the
prompt (so one server can be asked for several behaviours):

    ok              init, a non-JSON line, the reply in assistant events, a result (exit 0)
    slow            the first assistant event, then sleeps (for cancellation)
    spawn_child     like slow, after starting a child process (sharing stdout/stderr)
    ignore_sigterm  like spawn_child, both ignoring SIGTERM (only SIGKILL ends them)
    orphan          like ok, but leaves a child running behind it
    linger          like ok, then never exits (cursor-agent -p sometimes does that)
    fail            prints to stderr (the key included, to test redaction) and exits 3
    no_result       assistant events, then exit 0 without a result
    error_result    a result event with is_error true

Other variables: FAKE_CLI_TEXT (the reply; default "Hello from the fake cursor-agent"),
FAKE_CLI_USAGE=1 (usage in the result), FAKE_CLI_DELAY_S (between events, default 0.01),
FAKE_CLI_VERSION_EXIT (exit code of --version), FAKE_CLI_RECORD_DIR (each run writes
``<pid>.json`` there: argv, pid, pgid, child pid, whether CURSOR_API_KEY was set).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time


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


def spawn_child() -> int:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return child.pid


def main(argv: list[str]) -> int:
    if "--version" in argv:
        code = int(os.environ.get("FAKE_CLI_VERSION_EXIT", "0"))
        print("2026.01.01-fake" if code == 0 else "", flush=True)
        if code:
            print("version check failed", file=sys.stderr)
        return code
    model = argv[argv.index("--model") + 1] if "--model" in argv else "default"
    prompt = argv[-1] if argv else ""
    found = re.search(r"FAKE_MODE=(\w+)", prompt)
    mode = found.group(1) if found else os.environ.get("FAKE_CLI_MODE", "ok")
    delay = float(os.environ.get("FAKE_CLI_DELAY_S", "0.01"))
    text = os.environ.get("FAKE_CLI_TEXT", "Hello from the fake cursor-agent")
    words = text.split(" ")
    chunks = words[:1] + [" " + w for w in words[1:]]

    if mode == "ignore_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child through exec
    child_pid = spawn_child() if mode in ("spawn_child", "ignore_sigterm", "orphan") else None
    record({"argv": argv, "pid": os.getpid(), "pgid": os.getpgid(0), "child_pid": child_pid,
            "mode": mode, "key_set": bool(os.environ.get("CURSOR_API_KEY"))})

    emit({"type": "system", "subtype": "init", "session_id": "s-1", "model": model, "cwd": os.getcwd(),
          "apiKeySource": "env", "permissionMode": "default"})
    print("a banner line that is not JSON", flush=True)
    emit({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": prompt}]},
          "session_id": "s-1"})
    if mode == "fail":
        key = os.environ.get("CURSOR_API_KEY", "")
        print("starting", file=sys.stderr, flush=True)
        print(f"Error: authentication failed for key {key}", file=sys.stderr, flush=True)
        return 3
    if mode == "error_result":
        emit({"type": "result", "subtype": "error", "is_error": True, "result": "model refused", "session_id": "s-1"})
        return 0
    for i, chunk in enumerate(chunks):
        time.sleep(delay)
        emit({"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": chunk}]},
              "session_id": "s-1"})
        if i == 0 and mode in ("slow", "spawn_child", "ignore_sigterm"):
            time.sleep(600)
    if mode == "no_result":
        return 0
    result: dict[str, object] = {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 12,
                                 "duration_api_ms": 12, "result": text, "session_id": "s-1"}
    if os.environ.get("FAKE_CLI_USAGE") == "1":
        result["usage"] = {"input_tokens": 11, "output_tokens": 7}
    emit(result)
    if mode == "linger":
        time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
