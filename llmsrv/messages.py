"""Wire types of the NATS contract (CONTRACT sections 2-4) and their codecs.

Pure: no I/O. Requests are decoded and validated in one pass by a module-level typed msgspec
decoder; unknown fields are rejected so typos never pass silently. ``decode_request`` raises only
``errors.RequestError`` subclasses, whatever bytes it is given: before any (recursive) decode,
``check_depth`` refuses JSON nested deeper than ``[server] max_json_depth``, naming where.
"""

from __future__ import annotations

import os
import random
import re
import time
from typing import Annotated, Any, Literal

import msgspec

from . import errors

Role = Literal["system", "user", "assistant", "tool"]
Complexity = Literal["simple", "medium", "complex"]
Capability = Literal["code", "reasoning", "creativity", "speed", "cost"]
TASK_ALIASES: dict[str, str] = {
    # the predecessor's task types, folded onto the four rows of the routing matrix
    "classifier": "general", "parser": "general", "simple_chat": "general", "web_search": "general",
    "analysis": "general", "decomposition": "architect", "planning": "architect",
    "planner": "architect", "pseudocode": "architect", "code_analysis": "coder",
    "refactoring": "coder", "pattern_analyzer": "coder", "developer": "coder",
    "implementation": "coder", "tester": "qa", "validation": "qa",
}
TaskType = Literal[
    "general", "architect", "coder", "qa",
    "classifier", "parser", "simple_chat", "decomposition", "planning", "pseudocode",
    "code_analysis", "refactoring", "pattern_analyzer", "web_search", "planner", "analysis",
    "developer", "implementation", "tester", "validation",
]


CallId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: ToolName
    arguments: str  # JSON text of an object (checked by decode_request)


class MessageToolCall(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A tool call an assistant made, as the conversation sends it back (OpenAI's form)."""

    id: CallId
    function: FunctionCall
    type: Literal["function"] = "function"


class Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One turn. ``content`` may be empty only on an assistant turn that carries ``tool_calls``;
    a ``tool`` turn answers one call of an earlier assistant turn, named by ``tool_call_id``."""

    role: Role
    content: str = ""
    tool_calls: list[MessageToolCall] | None = None  # assistant only
    tool_call_id: CallId | None = None  # tool only, required there


class FunctionDef(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    type: Literal["function"]
    function: FunctionDef


class LLMRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] = "auto"
    provider: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=128000)] = 4000
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.7
    stream: bool = False
    correlation_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    tools: list[Tool] | None = None
    complexity: Complexity | None = None
    task_type: TaskType = "general"
    capabilities: list[Capability] | None = None
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600000)] | None = None


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    type: str = "function"


class Attempt(msgspec.Struct, frozen=True):
    provider: str
    model: str
    outcome: str  # ok | error code in lower case
    ms: int


class LLMResponse(msgspec.Struct, kw_only=True):
    text: str
    model: str
    tokens_used: int
    cost_cents: float
    timestamp: str
    correlation_id: str
    usage: Usage
    finish_reason: str = "stop"  # stop | length | tool_calls | content_filter
    tool_calls: list[ToolCall] = []
    attempts: list[Attempt] = []
    refusal: str | msgspec.UnsetType = msgspec.UNSET  # with content_filter: the provider's refusal text


class LLMError(msgspec.Struct, kw_only=True, omit_defaults=True):
    error: str
    error_code: str
    correlation_id: str
    timestamp: str
    retry_after_ms: int | None = None
    attempts: list[Attempt] | None = None  # what was tried, when routing got that far


class StreamChunk(msgspec.Struct, kw_only=True):
    correlation_id: str
    seq: int
    delta: str
    type: str = "chunk"


class CancelRequest(msgspec.Struct, frozen=True):
    correlation_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class BreakerSet(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``llm.admin.breaker.set``: retune one provider's breaker on every instance."""

    provider: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    threshold: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    ttl_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] | None = None


class BreakerCommand(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``llm.admin.breaker.state``: force one breaker open, closed, or back to a fresh start, on every instance."""

    provider: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    action: Literal["open", "close", "reset"]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None  # per-model scope only


_request_decoder = msgspec.json.Decoder(LLMRequest)
_breaker_set_decoder = msgspec.json.Decoder(BreakerSet)
_breaker_command_decoder = msgspec.json.Decoder(BreakerCommand)
_cancel_decoder = msgspec.json.Decoder(CancelRequest)

encode = msgspec.json.Encoder().encode


DEFAULT_MAX_DEPTH = 64
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]', re.DOTALL)
_SKELETON_DELETE = bytes(range(256)).translate(None, b'[]{}"')  # every byte but brackets and quotes
_TO_SQUARE = bytes.maketrans(b"{}", b"[]")


def check_depth(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise ``ValidationFailed`` naming the path when ``data`` nests deeper than ``max_depth``.

    Iterative, C-speed in the common case: fewer brackets than the limit cannot nest deeper; else
    strings are blanked out and matched bracket pairs peeled off one level per pass. Only input
    that is not fully peeled within ``max_depth`` passes (too deep, or unbalanced) is walked
    token by token, to find out and to name where it goes too deep.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return
    # Drop escaped backslashes, then escaped quotes: every quote left delimits a string. Keep only
    # quotes and brackets; strings without brackets become "" and vanish in one pass.
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = unescaped.translate(_TO_SQUARE, _SKELETON_DELETE).replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = b"".join(skeleton.split(b'"')[::2])
    for _ in range(max_depth):
        skeleton = skeleton.replace(b"[]", b"")
        if not skeleton:
            return
    where = _path_at_depth(data, max_depth)
    if where is not None:
        raise errors.ValidationFailed(
            f"JSON nested deeper than {max_depth} levels (server.max_json_depth) - at `{where}`")


def _path_at_depth(data: bytes, max_depth: int) -> str | None:
    """The JSON path of the first container that opens past ``max_depth`` levels."""
    stack: list[list[Any]] = []  # [kind, key or index, expecting a key]
    last_string = b""
    for match in _TOKEN.finditer(data):
        token = match.group()
        if token in (b"{", b"["):
            if len(stack) >= max_depth:
                return _render_path(stack)
            stack.append([token, 0 if token == b"[" else "", token == b"{"])
        elif token in (b"}", b"]"):
            if stack:
                stack.pop()
        elif token == b":":
            if stack and stack[-1][0] == b"{":
                stack[-1][1] = last_string[1:-1].decode("utf-8", "replace")[:40]
        elif token == b",":
            if stack and stack[-1][0] == b"[":
                stack[-1][1] += 1
        else:
            last_string = token
    return None


def _render_path(stack: list[list[Any]]) -> str:
    return "$" + "".join(f"[{key}]" if kind == b"[" else f".{key}" for kind, key, _ in stack)


def decode_with(decoder: msgspec.json.Decoder[Any], data: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode ``data`` with ``decoder`` under the depth limit; schema errors name the field (``RequestError``)."""
    check_depth(data, max_depth)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if " - at `" not in message:
            message += " - at `$`"
        if "at `$.tools" in message:
            raise errors.InvalidTool(f"invalid tool: {message}") from None
        raise errors.ValidationFailed(message) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise errors.InvalidJson(f"body is not valid UTF-8 JSON: {exc}") from None


def decode_request(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> LLMRequest:
    """Decode and validate an ``llm.request`` body, or raise a ``RequestError``."""
    request: LLMRequest = decode_with(_request_decoder, data, max_depth)
    check_turns(request.messages)
    for i, tool in enumerate(request.tools or ()):
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise errors.InvalidTool(
                f"invalid tool: parameters must be a JSON-Schema object (type \"object\")"
                f" - at `$.tools[{i}].function.parameters.type`"
            )
    return request


def check_turns(messages: list[Message]) -> None:
    """The rules of CONTRACT section 2 a schema cannot say: where content may be empty, which role
    carries ``tool_calls`` / ``tool_call_id``, and that every tool turn answers a call made before it."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        at = f"$.messages[{i}]"
        if m.tool_calls is not None and m.role != "assistant":
            raise errors.ValidationFailed(f"only an assistant message carries tool_calls - at `{at}.tool_calls`")
        if m.tool_call_id is not None and m.role != "tool":
            raise errors.ValidationFailed(f"only a tool message carries tool_call_id - at `{at}.tool_call_id`")
        if not m.content and not m.tool_calls:
            raise errors.ValidationFailed("Expected `str` of length >= 1 (empty only on an assistant message"
                                          f" with tool_calls) - at `{at}.content`")
        for j, call in enumerate(m.tool_calls or ()):
            try:
                arguments = msgspec.json.decode(call.function.arguments)
            except msgspec.DecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                raise errors.ValidationFailed(
                    f"Expected the JSON text of an object - at `{at}.tool_calls[{j}].function.arguments`")
            called.add(call.id)
        if m.role == "tool":
            if m.tool_call_id is None:
                raise errors.ValidationFailed(
                    f"a tool message needs the tool_call_id it answers - at `{at}.tool_call_id`")
            if m.tool_call_id not in called:
                raise errors.ValidationFailed(
                    f"tool_call_id {m.tool_call_id[:64]!r} names no tool call of an earlier assistant message"
                    f" - at `{at}.tool_call_id`")


def decode_cancel(data: bytes) -> CancelRequest:
    result: CancelRequest = decode_with(_cancel_decoder, data)
    return result


def decode_breaker_set(data: bytes) -> BreakerSet:
    result: BreakerSet = decode_with(_breaker_set_decoder, data)
    return result


def decode_breaker_command(data: bytes) -> BreakerCommand:
    result: BreakerCommand = decode_with(_breaker_command_decoder, data)
    return result


def header_int(headers: Any, name: str, low: int, high: int) -> int | None:
    """A header holding a whole number: ASCII digits only, ``low..high``; absent -> None."""
    raw = headers.get(name) if headers else None
    if raw is None:
        return None
    text = raw.strip() if isinstance(raw, str) else ""
    if not (0 < len(text) <= len(str(high)) and text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        shown = raw[:32] if isinstance(raw, str) else type(raw).__name__
        raise errors.ValidationFailed(f"header {name} must be ASCII digits, an integer {low}..{high}; got {shown!r}")
    return int(text)


def header_correlation_id(headers: Any) -> str | None:
    """``Llm-Correlation-Id``: used when the body has none; 1..128 characters."""
    raw = headers.get("Llm-Correlation-Id") if headers else None
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > 128:
        raise errors.ValidationFailed("header Llm-Correlation-Id must be 1..128 characters")
    return raw


class _Peek(msgspec.Struct):
    correlation_id: str | None = None


_peek_decoder = msgspec.json.Decoder(_Peek)


def peek_correlation_id(data: bytes, headers: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> str:
    """Best-effort correlation id of a request we will not fully decode (never raises)."""
    try:
        cid = header_correlation_id(headers)
        if cid:
            return cid
        check_depth(data, max_depth)
        found = _peek_decoder.decode(data).correlation_id
    except (errors.LlmsrvError, msgspec.DecodeError, UnicodeDecodeError):
        found = None
    return found if isinstance(found, str) and 0 < len(found) <= 128 else new_correlation_id()


def decode_reply(data: bytes) -> dict[str, Any]:
    """Untyped decode for clients: any reply, chunk or final."""
    result: dict[str, Any] = msgspec.json.decode(data)
    return result


def new_correlation_id() -> str:
    # 128 random bits without a syscall per id; ids need to be unique, not secret.
    return f"{_ids.getrandbits(128):032x}"


_ids = random.Random(os.urandom(32))


_second_cache: list[Any] = [-1, ""]


def timestamp() -> str:
    """UTC now as ``2026-11-25T19:00:00.000Z`` (the seconds part is formatted once a second)."""
    now = time.time()
    second = int(now)
    if second != _second_cache[0]:
        _second_cache[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second_cache[1]}.{int((now - second) * 1000):03d}Z"


def error_body(exc: errors.LlmsrvError, correlation_id: str) -> bytes:
    return encode(LLMError(error=exc.message, error_code=exc.error_code,
                           correlation_id=correlation_id, timestamp=timestamp(),
                           retry_after_ms=exc.retry_after_ms, attempts=exc.attempts or None))


def error_headers(exc: errors.LlmsrvError) -> dict[str, str]:
    # Header values must stay on one line; never a Status header (see LIBRARY-NOTES).
    return {"Nats-Service-Error": exc.message.replace("\r", " ").replace("\n", " ")[:1024],
            "Nats-Service-Error-Code": str(exc.status)}
