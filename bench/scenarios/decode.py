"""``decode``: ``llmsrv.messages.decode_request`` (msgspec) vs ``json.loads`` + hand validation, per request size.

Pure CPU, in this process, no I/O. The requests are ``llm.request`` bodies of about 1 KB, 10 KB,
100 KB and 1 MB: ``model``, ``max_tokens``, ``temperature``, ``correlation_id`` and alternating
user/assistant turns of about 1000 characters each (so a bigger request has more turns to check,
as a long conversation does). ``hand_decode`` checks the same things ``decode_request`` does, field
by field: JSON object, no unknown fields, every type, range, length and literal of ``LLMRequest``
and ``Message`` (tool calls and tools included), the depth limit, and the turn rules of
``check_turns`` (content empty only with tool_calls, which role carries what, every tool turn
answers an earlier call). Before timing, both must accept every request and reject the same
invalid variants, else the run says so in ``problems``.

Each measurement runs one decoder in a loop for a fixed time budget (calibrated once, unrecorded);
rounds interleave the two decoders and alternate their order. Figures: microseconds per decode
(median and spread over rounds) and hand/msgspec (how many times slower the hand way is). Both
ways start with ``check_depth`` (the nesting-depth guard); its own time is shown beside them,
because past ~60 brackets (about 30 turns) it no longer returns after a bracket count.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench.scenario import Options, Result  # noqa: E402
from bench.scenarios.cancel import fmt, main, progress, spread  # noqa: E402
from llmsrv import errors  # noqa: E402
from llmsrv.messages import DEFAULT_MAX_DEPTH, TaskType, check_depth, decode_request  # noqa: E402

NAME = "decode"
SUMMARY = "llm.request decoding: msgspec decode_request vs json.loads + hand validation, 1 KB to 1 MB"

SIZES = {"1KB": 1_000, "10KB": 10_000, "100KB": 100_000, "1MB": 1_000_000}
WORDS = "The quick brown fox jumps over the lazy dog while the benchmark measures decoding. "

ROLES = frozenset({"system", "user", "assistant", "tool"})
COMPLEXITIES = frozenset({"simple", "medium", "complex"})
CAPABILITIES = frozenset({"code", "reasoning", "creativity", "speed", "cost"})
TASK_TYPES = frozenset(TaskType.__args__)  # type: ignore[attr-defined]
REQUEST_KEYS = frozenset({"messages", "model", "provider", "max_tokens", "temperature", "stream", "correlation_id",
                          "tools", "complexity", "task_type", "capabilities", "timeout_ms"})
MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id"})


class Invalid(ValueError):
    pass


def request_body(size: int) -> bytes:
    """An ``llm.request`` body of about ``size`` bytes (never less)."""
    turn = (WORDS * 13)[:1000]
    body: dict[str, Any] = {"model": "openai_compat:gpt-test", "max_tokens": 1000, "temperature": 0.5,
                            "correlation_id": "bench-decode-0001", "messages": []}
    overhead = len(json.dumps(body))
    per_turn = len(json.dumps({"role": "assistant", "content": turn})) + 2
    turns = max(1, math.ceil((size - overhead) / per_turn))
    first = turn[:max(1, size - overhead - 40)] if turns == 1 else turn  # 1 KB: one shorter turn
    body["messages"] = [{"role": "user" if i % 2 == 0 else "assistant", "content": first if i == 0 else turn}
                        for i in range(turns)]
    short = size - len(json.dumps(body))
    if short > 0:
        body["messages"][0]["content"] += (WORDS * (short // len(WORDS) + 1))[:short]
    return json.dumps(body).encode()


# ---- the hand way ----------------------------------------------------------------------------------

def _str(value: Any, at: str, low: int = 0, high: int | None = None) -> str:
    if not isinstance(value, str):
        raise Invalid(f"Expected `str` - at `{at}`")
    if len(value) < low or (high is not None and len(value) > high):
        raise Invalid(f"Expected `str` of length {low}..{high} - at `{at}`")
    return value


def _int(value: Any, at: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(f"Expected `int` - at `{at}`")
    if not low <= value <= high:
        raise Invalid(f"Expected `int` {low}..{high} - at `{at}`")
    return value


def _object(value: Any, at: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"Expected `object` - at `{at}`")
    unknown = value.keys() - keys
    if unknown:
        raise Invalid(f"Object contains unknown field `{min(unknown)}` - at `{at}`")
    return value


def _tool_name(value: Any, at: str) -> None:
    name = _str(value, at, 1, 64)
    if not all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in name):
        raise Invalid(f"Expected `str` matching ^[A-Za-z0-9_-]{{1,64}}$ - at `{at}`")


def _message(m: Any, at: str, called: set[str]) -> None:
    m = _object(m, at, MESSAGE_KEYS)
    if "role" not in m:
        raise Invalid(f"Object missing required field `role` - at `{at}`")
    role = m["role"]
    if role not in ROLES:
        raise Invalid(f"Invalid enum value {role!r} - at `{at}.role`")
    content = _str(m.get("content", ""), f"{at}.content")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise Invalid(f"Expected `array` - at `{at}.tool_calls`")
        if role != "assistant":
            raise Invalid(f"only an assistant message carries tool_calls - at `{at}.tool_calls`")
        for j, call in enumerate(calls):
            cat = f"{at}.tool_calls[{j}]"
            call = _object(call, cat, frozenset({"id", "function", "type"}))
            _str(call.get("id"), f"{cat}.id", 1, 256)
            if call.get("type", "function") != "function":
                raise Invalid(f"Invalid enum value - at `{cat}.type`")
            fn = _object(call.get("function"), f"{cat}.function", frozenset({"name", "arguments"}))
            _tool_name(fn.get("name"), f"{cat}.function.name")
            try:
                arguments = json.loads(_str(fn.get("arguments"), f"{cat}.function.arguments"))
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise Invalid(f"Expected the JSON text of an object - at `{cat}.function.arguments`")
            called.add(call["id"])
    call_id = m.get("tool_call_id")
    if call_id is not None:
        _str(call_id, f"{at}.tool_call_id", 1, 256)
        if role != "tool":
            raise Invalid(f"only a tool message carries tool_call_id - at `{at}.tool_call_id`")
    if not content and not calls:
        raise Invalid(f"Expected `str` of length >= 1 - at `{at}.content`")
    if role == "tool" and (call_id is None or call_id not in called):
        raise Invalid(f"a tool message must answer an earlier tool call - at `{at}.tool_call_id`")


def _tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise Invalid("Expected `array` - at `$.tools`")
    for i, tool in enumerate(tools):
        at = f"$.tools[{i}]"
        tool = _object(tool, at, frozenset({"type", "function"}))
        if tool.get("type") != "function":
            raise Invalid(f"invalid tool: Invalid enum value - at `{at}.type`")
        fn = _object(tool.get("function"), f"{at}.function", frozenset({"name", "description", "parameters"}))
        _tool_name(fn.get("name"), f"{at}.function.name")
        if fn.get("description") is not None:
            _str(fn["description"], f"{at}.function.description")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise Invalid(f"invalid tool: parameters must be a JSON-Schema object - at `{at}.function.parameters`")


def hand_decode(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """``json.loads`` then every check ``decode_request`` makes, by hand; raises ``Invalid`` (a ValueError)."""
    try:
        check_depth(data, max_depth)  # the same cheap pre-check (a bracket count for normal requests)
    except errors.ValidationFailed as exc:
        raise Invalid(str(exc)) from None
    try:
        req = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"body is not valid UTF-8 JSON: {exc}") from None
    req = _object(req, "$", REQUEST_KEYS)
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Invalid("Expected `array` of length >= 1 - at `$.messages`")
    called: set[str] = set()
    for i, m in enumerate(msgs):
        _message(m, f"$.messages[{i}]", called)
    _str(req.get("model", "auto"), "$.model", 1, 256)
    if req.get("provider") is not None:
        _str(req["provider"], "$.provider", 1, 64)
    _int(req.get("max_tokens", 4000), "$.max_tokens", 1, 128000)
    temperature = req.get("temperature", 0.7)
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0.0 <= temperature <= 2.0:
        raise Invalid("Expected `float` 0.0..2.0 - at `$.temperature`")
    if not isinstance(req.get("stream", False), bool):
        raise Invalid("Expected `bool` - at `$.stream`")
    if req.get("correlation_id") is not None:
        _str(req["correlation_id"], "$.correlation_id", 1, 128)
    if req.get("tools") is not None:
        _tools(req["tools"])
    if req.get("complexity") is not None and req["complexity"] not in COMPLEXITIES:
        raise Invalid("Invalid enum value - at `$.complexity`")
    if req.get("task_type", "general") not in TASK_TYPES:
        raise Invalid("Invalid enum value - at `$.task_type`")
    caps = req.get("capabilities")
    if caps is not None and (not isinstance(caps, list) or any(c not in CAPABILITIES for c in caps)):
        raise Invalid("Invalid enum value - at `$.capabilities`")
    if req.get("timeout_ms") is not None:
        _int(req["timeout_ms"], "$.timeout_ms", 1, 600000)
    return req


# ---- the scenario ----------------------------------------------------------------------------------

INVALID = {
    "unknown field": {"messages": [{"role": "user", "content": "hi"}], "modle": "x"},
    "bad role": {"messages": [{"role": "robot", "content": "hi"}]},
    "temperature 3": {"messages": [{"role": "user", "content": "hi"}], "temperature": 3},
    "max_tokens true": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
    "no messages": {"messages": []},
    "empty content": {"messages": [{"role": "user", "content": ""}]},
    "tool turn unanswered": {"messages": [{"role": "user", "content": "hi"},
                                          {"role": "tool", "content": "42", "tool_call_id": "c1"}]},
    "tool params not object": {"messages": [{"role": "user", "content": "hi"}],
                               "tools": [{"type": "function",
                                          "function": {"name": "f", "parameters": {"type": "array"}}}]},
    "not an object": [1, 2],
    "bad json": "{",
}


def agreement(bodies: dict[str, bytes]) -> list[str]:
    """Both ways accept every benchmark body and reject every invalid variant; what disagrees."""
    problems = []
    for name, data in bodies.items():
        for way, fn in (("msgspec", decode_request), ("hand", hand_decode)):
            try:
                fn(data)
            except (errors.LlmsrvError, ValueError) as exc:
                problems.append(f"{way} rejects the {name} request: {exc}")
    for name, doc in INVALID.items():
        data = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
        for way, fn in (("msgspec", decode_request), ("hand", hand_decode)):
            try:
                fn(data)
            except (errors.LlmsrvError, ValueError):
                continue
            problems.append(f"{way} accepts the invalid request `{name}`")
    return problems


def time_per_call(fn: Callable[[bytes], object], data: bytes, budget_s: float,
                  calls: int | None = None) -> tuple[float, int]:
    """(seconds per ``fn(data)``, calls): over ``calls`` calls, or as many as fit in ``budget_s`` (estimated
    from a tenth of the budget first)."""
    if calls is None:
        start, n = time.perf_counter(), 0
        while (took := time.perf_counter() - start) < budget_s / 10 or n < 2:
            fn(data)
            n += 1
        calls = max(3, round(n * budget_s / took))
    start = time.perf_counter()
    for _ in range(calls):
        fn(data)
    return (time.perf_counter() - start) / calls, calls


def run(opts: Options) -> Result:
    rounds = 2 if opts.smoke else max(1, opts.rounds)
    budget_s = 0.05 if opts.smoke else 0.4
    bodies = {name: request_body(size) for name, size in SIZES.items()}
    ways: dict[str, Callable[[bytes], object]] = {"msgspec": decode_request, "hand": hand_decode,
                                                  "check_depth": check_depth}
    problems = agreement(bodies)
    calls = {(w, s): time_per_call(fn, data, budget_s)[1] for s, data in bodies.items() for w, fn in ways.items()}
    us: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    bar = progress(opts, rounds * len(bodies), "decode")
    try:
        for r in range(rounds):
            for s, data in bodies.items():
                for w in (("msgspec", "hand", "check_depth") if r % 2 == 0 else ("check_depth", "hand", "msgspec")):
                    us[(w, s)].append(time_per_call(ways[w], data, budget_s, calls[(w, s)])[0] * 1e6)
                bar.update()
    finally:
        bar.close()

    figures: dict[str, Any] = {"settings": {"rounds": rounds, "budget_s": budget_s, "smoke": opts.smoke,
                                            "calls": {f"{w}/{s}": n for (w, s), n in calls.items()}}}
    rows = ["| size | bytes | turns | msgspec us | hand us | hand/msgspec | msgspec MB/s | of both: check_depth us "
            "| hand/msgspec without check_depth |", "|---|---|---|---|---|---|---|---|---|"]
    series: dict[str, list[tuple[float, float]]] = {"msgspec_us": [], "hand_us": []}
    for s, data in bodies.items():
        ratio = spread(h / m for h, m in zip(us[("hand", s)], us[("msgspec", s)], strict=True))
        point = {"bytes": len(data), "turns": len(json.loads(data)["messages"]),
                 "msgspec_us": spread(us[("msgspec", s)]), "hand_us": spread(us[("hand", s)]),
                 "check_depth_us": spread(us[("check_depth", s)]),
                 "hand_over_msgspec": ratio,
                 # the same ratio with the shared check_depth taken out of both (same round)
                 "hand_over_msgspec_without_depth": spread(
                     (h - d) / (m - d) for h, m, d in zip(us[("hand", s)], us[("msgspec", s)], us[("check_depth", s)],
                                                          strict=True) if m > d),
                 "msgspec_mb_per_s": round(len(data) / statistics.median(us[("msgspec", s)]), 1)}
        figures[s] = point
        rows.append(f"| {s} | {len(data)} | {point['turns']} | {fmt(point['msgspec_us'], digits=1)} "
                    f"| {fmt(point['hand_us'], digits=1)} | {fmt(ratio, 'x')} | {point['msgspec_mb_per_s']:.0f} "
                    f"| {fmt(point['check_depth_us'], digits=1)} "
                    f"| {fmt(point['hand_over_msgspec_without_depth'], 'x')} |")
        series["msgspec_us"].append((float(len(data)), point["msgspec_us"]["median"]))
        series["hand_us"].append((float(len(data)), point["hand_us"]["median"]))
    summary = ("Decoding and validating one `llm.request`: msgspec `decode_request` vs `json.loads` + hand validation "
               f"of the same fields (median us per decode over {rounds} rounds, min-max in brackets):\n\n"
               + "\n".join(rows) + "\n")
    return Result(NAME, figures, summary, series, problems)


if __name__ == "__main__":
    main(run)
