"""Wire types of the NATS contract (CONTRACT sections 2-4) and their codecs.

Pure: no I/O. Requests are decoded and validated in one pass by a module-level typed msgspec
decoder; unknown fields are rejected so typos never pass silently. ``decode_request`` raises only
``errors.RequestError`` subclasses, whatever bytes it is given.
"""

from __future__ import annotations

import os
import random
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


class Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    role: Role
    content: Annotated[str, msgspec.Meta(min_length=1)]
    # extension: on a ``tool`` message, the id of the tool call it answers (OpenAI's field)
    tool_call_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None


class FunctionDef(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
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
    finish_reason: str = "stop"
    tool_calls: list[ToolCall] = []
    attempts: list[Attempt] = []


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


_request_decoder = msgspec.json.Decoder(LLMRequest)
_breaker_set_decoder = msgspec.json.Decoder(BreakerSet)
_cancel_decoder = msgspec.json.Decoder(CancelRequest)

encode = msgspec.json.Encoder().encode


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
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


def decode_request(data: bytes) -> LLMRequest:
    """Decode and validate an ``llm.request`` body, or raise a ``RequestError``."""
    request: LLMRequest = _decode(_request_decoder, data)
    for i, tool in enumerate(request.tools or ()):
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise errors.InvalidTool(
                f"invalid tool: parameters must be a JSON-Schema object (type \"object\")"
                f" - at `$.tools[{i}].function.parameters.type`"
            )
    return request


def decode_cancel(data: bytes) -> CancelRequest:
    result: CancelRequest = _decode(_cancel_decoder, data)
    return result


def decode_breaker_set(data: bytes) -> BreakerSet:
    result: BreakerSet = _decode(_breaker_set_decoder, data)
    return result


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
