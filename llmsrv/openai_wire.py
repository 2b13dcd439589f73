"""OpenAI Chat Completions JSON <-> llmsrv's ``LLMRequest`` / ``LLMResponse`` (CONTRACT section 9).

Pure: request bytes in, an ``LLMRequest`` out (or a ``RequestError`` naming the field); an
``LLMResponse`` or an ``LlmsrvError`` in, OpenAI's documents out (``chat.completion``, SSE
``chat.completion.chunk`` frames, ``{"error": {...}}``, the model list). ``httpapi.py`` does the I/O.

A request's top-level fields fall in four groups:

* mapped: ``messages`` (``developer`` is a ``system`` turn; text content parts are joined),
  ``model``, ``max_completion_tokens`` (else ``max_tokens``), ``temperature``, ``stream``,
  ``stream_options.include_usage``, ``tools`` (``function.strict`` dropped);
* llmsrv's own (``EXTRAS``), sent as extra body fields (``extra_body=`` in the SDKs);
* ``IGNORED``: accepted and dropped, they do not change the shape or meaning of the answer;
* ``DEFAULT_ONLY``: accepted only at their default value (``n: 1``, ``logprobs: false``...): any
  other value asks for something llmsrv cannot give, so it is refused with a 400 naming the field.

Anything else is refused like the OpenAI API refuses it ("unrecognized request argument"), so a
typo never passes silently. ``null`` means "absent" everywhere, as in the OpenAI API. The result
goes through ``messages.decode_request``: the very validation a NATS request gets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator
from typing import Any

import msgspec

from . import errors, messages
from .config import Config
from .messages import LLMRequest, LLMResponse, Usage
from .routing import family

EXTRAS = ("task_type", "complexity", "capabilities", "provider", "timeout_ms", "correlation_id")
MAPPED = ("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "stream", "stream_options",
          "tools", "tool_choice")
IGNORED = ("user", "metadata", "store", "seed", "service_tier", "parallel_tool_calls", "top_p", "frequency_penalty",
           "presence_penalty", "reasoning_effort", "verbosity", "prompt_cache_key", "prompt_cache_retention",
           "safety_identifier")


def _none_or(*defaults: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == d and type(value) is type(d) for d in defaults)


# field -> (accepts the value, why another value is refused)
DEFAULT_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_none_or(1), "llmsrv returns one choice: leave it out or send 1"),
    "logprobs": (_none_or(False), "llmsrv returns no log probabilities"),
    "top_logprobs": (_none_or(0), "llmsrv returns no log probabilities"),
    "stop": (_none_or("", []), "stop sequences are not supported"),
    "response_format": (_none_or({"type": "text"}), "structured output (json_object, json_schema) is not supported;"
                        " ask for JSON in the prompt or use tools"),
    "logit_bias": (_none_or({}), "logit_bias is not supported"),
    "modalities": (_none_or(["text"]), "text is the only output modality"),
    "audio": (_none_or(), "audio output is not supported"),
    "prediction": (_none_or(), "predicted outputs are not supported"),
    "web_search_options": (_none_or(), "web search is not supported"),
    "functions": (_none_or([]), "the legacy functions field is not supported: use tools"),
    "function_call": (_none_or(), "the legacy function_call field is not supported: use tools and tool_choice"),
}
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal", "annotations", "audio",
                "function_call")
MAX_TOKENS = 128000


class ChatRequest(msgspec.Struct, frozen=True):
    """A decoded ``POST /v1/chat/completions``: the llmsrv request and how to answer it."""

    request: LLMRequest
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    ignored: tuple[str, ...] = ()  # IGNORED fields the request carried (for a debug log)


def _refuse(message: str, path: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(f"{message} - at `$.{path}`")


def decode_chat(body: bytes, *, max_depth: int = messages.DEFAULT_MAX_DEPTH, timeout_ms: int | None = None,
                correlation_id: str | None = None) -> ChatRequest:
    """Decode an OpenAI Chat Completions request; ``timeout_ms`` / ``correlation_id`` (from headers)
    apply when the body has none. Raises only ``errors.RequestError`` subclasses."""
    messages.check_depth(body, max_depth)
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise errors.InvalidJson(f"body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise errors.ValidationFailed("Expected `object`, got `" + type(data).__name__ + "` - at `$`")
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in data.items():
        if key in DEFAULT_ONLY:
            accepts, why = DEFAULT_ONLY[key]
            if not accepts(value):
                raise _refuse(f"`{key}` = {_show(value)} is not supported: {why}", key)
        elif key in IGNORED:
            ignored.append(key)
        elif key in EXTRAS:
            if value is not None:
                out[key] = value
        elif key not in MAPPED:
            raise _refuse(f"unrecognized request argument `{key[:64]}` (an OpenAI Chat Completions field"
                          f" or one of llmsrv's: {', '.join(EXTRAS)})", key[:64])
    turns = data.get("messages")
    if turns is not None:
        out["messages"] = [_message(m, f"messages[{i}]") for i, m in enumerate(turns)] if isinstance(turns, list) \
            else turns
    if data.get("model") is not None:
        out["model"] = data["model"]
    if data.get("temperature") is not None:
        out["temperature"] = data["temperature"]
    stream = data.get("stream")
    if stream is not None:
        out["stream"] = stream
    tokens_field = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    tokens = data.get(tokens_field)
    if tokens is not None:
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_TOKENS:
            raise _refuse(f"Expected `int` in 1..{MAX_TOKENS}, got {_show(tokens)}", tokens_field)
        out["max_tokens"] = tokens
    tools = data.get("tools")
    if tools is not None:
        out["tools"] = [_tool(t) for t in tools] if isinstance(tools, list) else tools
    _check_tool_choice(data.get("tool_choice"), bool(tools))
    include_usage = _include_usage(data.get("stream_options"), stream is True)
    if timeout_ms is not None and "timeout_ms" not in out:
        out["timeout_ms"] = timeout_ms
    if correlation_id is not None and "correlation_id" not in out:
        out["correlation_id"] = correlation_id
    request = messages.decode_request(messages.encode(out), max_depth)
    return ChatRequest(request, include_usage, tuple(ignored))


def _show(value: Any) -> str:
    text = messages.encode(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _check_tool_choice(choice: Any, has_tools: bool) -> None:
    if choice is None or choice == "auto" or (choice == "none" and not has_tools):
        return
    raise _refuse(f"`tool_choice` = {_show(choice)} is not supported: the model decides (\"auto\")", "tool_choice")


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _refuse("Expected `object`", "stream_options")
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise _refuse(f"unrecognized argument `{key[:64]}`", f"stream_options.{key[:64]}")
        if value is not None and not isinstance(value, bool):
            raise _refuse("Expected `bool`", f"stream_options.{key}")
    return stream and options.get("include_usage") is True


def _message(item: Any, at: str) -> Any:
    if not isinstance(item, dict):
        return item  # decode_request names the path and the expected type
    out: dict[str, Any] = {}
    for key, value in item.items():
        if key not in MESSAGE_KEYS:
            raise _refuse(f"unrecognized message field `{key[:64]}`", f"{at}.{key[:64]}")
        if key in ("audio", "function_call") and value is not None:
            raise _refuse(f"`{key}` in a message is not supported", f"{at}.{key}")
    role = item.get("role")
    out["role"] = "system" if role == "developer" else role
    if role == "function":
        raise _refuse("the legacy `function` role is not supported: use tool messages", f"{at}.role")
    content = _content(item.get("content"), f"{at}.content")
    if not content and role == "assistant" and isinstance(item.get("refusal"), str):
        content = item["refusal"]  # an earlier refusal, sent back as the conversation goes on
    if content is not None:
        out["content"] = content
    for key in ("tool_calls", "tool_call_id"):
        if item.get(key) is not None:
            out[key] = item[key]
    return out


def _content(content: Any, at: str) -> Any:
    """A string, or text parts joined by newlines; ``null`` is empty."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif isinstance(kind, str):
            raise _refuse(f"content parts of type `{kind[:64]}` are not supported (text only)", f"{at}[{j}].type")
        else:
            raise _refuse("Expected a content part {\"type\": \"text\", \"text\": \"...\"}", f"{at}[{j}]")
    return "\n".join(texts)


def _tool(tool: Any) -> Any:
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        function = {k: v for k, v in tool["function"].items() if k != "strict"}
        return {**tool, "function": function}
    return tool


# ---- responses -----------------------------------------------------------------------------------

def completion_id(correlation_id: str) -> str:
    return f"chatcmpl-{correlation_id}"


def usage_document(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def tool_calls_document(response: LLMResponse) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in response.tool_calls]


def _refusal(response: LLMResponse) -> str | None:
    return response.refusal if isinstance(response.refusal, str) else None


def _llmsrv(response: LLMResponse) -> dict[str, Any]:
    """What llmsrv adds beside OpenAI's fields (the SDKs keep unknown fields: ``model_extra``)."""
    return {"correlation_id": response.correlation_id, "cost_cents": response.cost_cents,
            "attempts": msgspec.to_builtins(response.attempts)}


def completion_document(response: LLMResponse, created: int) -> dict[str, Any]:
    """``chat.completion`` for a finished request."""
    message: dict[str, Any] = {"role": "assistant",
                               "content": response.text if response.text or not response.tool_calls else None,
                               "refusal": _refusal(response)}
    if response.tool_calls:
        message["tool_calls"] = tool_calls_document(response)
    return {"id": completion_id(response.correlation_id), "object": "chat.completion", "created": created,
            "model": response.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "finish_reason": response.finish_reason, "logprobs": None}],
            "usage": usage_document(response.usage), "llmsrv": _llmsrv(response)}


def sse(document: Any) -> bytes:
    return b"data: " + messages.encode(document) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class ChunkStream:
    """The SSE frames of one streamed answer, in order: a role chunk, content deltas, then at the end
    the text not yet sent (a provider that did not stream), tool calls and refusal as one chunk, the
    finish reason, the usage chunk when asked for, and ``[DONE]``; or an error frame and ``[DONE]``."""

    def __init__(self, correlation_id: str, model: str, created: int, include_usage: bool) -> None:
        self.id, self.model, self.created = completion_id(correlation_id), model, created
        self.include_usage = include_usage
        self.sent_chars = 0

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None, model: str | None = None) -> bytes:
        doc: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": model or self.model, "system_fingerprint": None,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                            "logprobs": None}]}
        if self.include_usage:
            doc["usage"] = None
        return sse(doc)

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, text: str) -> bytes:
        self.sent_chars += len(text)
        return self._chunk({"content": text})

    def end(self, response: LLMResponse) -> bytes:
        frames = []
        rest = response.text[self.sent_chars:]
        if rest:
            frames.append(self.delta(rest))
        last: dict[str, Any] = {}
        if response.tool_calls:
            last["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls_document(response))]
        if (refusal := _refusal(response)) is not None:
            last["refusal"] = refusal
        if last:
            frames.append(self._chunk(last, model=response.model))
        frames.append(self._chunk({}, response.finish_reason, model=response.model))
        if self.include_usage:
            frames.append(sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": response.model, "system_fingerprint": None, "choices": [],
                               "usage": usage_document(response.usage), "llmsrv": _llmsrv(response)}))
        return b"".join(frames) + DONE

    @staticmethod
    def error(exc: errors.LlmsrvError, correlation_id: str) -> bytes:
        """An error after the stream began (no status code left to set): the OpenAI SDKs raise
        ``APIError`` with this message on reading it."""
        return sse(error_document(exc, correlation_id)) + DONE


# ---- errors --------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled", 500: "server_error",
               502: "upstream_error", 503: "service_unavailable", 504: "timeout"}
_AT = re.compile(r" - at `\$\.?([^`]*)`")


def error_param(exc: errors.LlmsrvError) -> str | None:
    """The field a request error names (``$.messages[0].content`` -> ``messages[0].content``)."""
    found = _AT.search(exc.message)
    return found.group(1) or None if found else None


def error_document(exc: errors.LlmsrvError, correlation_id: str = "") -> dict[str, Any]:
    error: dict[str, Any] = {"message": exc.message, "type": ERROR_TYPES.get(exc.status, "server_error"),
                             "code": exc.error_code, "param": error_param(exc)}
    if exc.retry_after_ms is not None:
        error["retry_after_ms"] = exc.retry_after_ms
    if correlation_id:
        error["correlation_id"] = correlation_id
    return {"error": error}


def error_headers(exc: errors.LlmsrvError) -> list[tuple[str, str]]:
    """``Retry-After`` (seconds) and ``retry-after-ms`` when the error says when to come back; and
    ``x-should-retry``, which the OpenAI SDKs obey: only errors with a retry time, or a 503 (another
    instance may answer), are worth an automatic retry; llmsrv already tried every fallback before a
    PROVIDER_ERROR, and a TIMEOUT spent the whole deadline."""
    retry = [("x-should-retry", "true" if exc.retry_after_ms is not None or exc.status == 503 else "false")]
    if exc.retry_after_ms is None:
        return retry
    return [("retry-after", str(max(1, -(-exc.retry_after_ms // 1000)))),
            ("retry-after-ms", str(exc.retry_after_ms)), *retry]


# ---- models --------------------------------------------------------------------------------------

MOCK_MODELS = ("mock:echo", "mock:lorem")


def configured_models(cfg: Config, providers: Collection[str] | None = None) -> list[tuple[str, str]]:
    """``(model id, provider)`` of every model the config names, as a client may send them: ``auto``,
    the matrix cells and price-table models as ``provider:model``, the mock's models, and the bare
    aliases (``sonnet``) with the first provider of their family. ``providers``: keep only these."""
    found: dict[str, str] = {"auto": "llmsrv"}
    routing = cfg.routing
    specs = [spec for row in msgspec.structs.astuple(routing.matrix) for cell in msgspec.structs.astuple(row)
             for spec in cell]
    specs += [f"{name}:{model}" for name, provider in _provider_configs(cfg) for model in provider.prices]
    specs += MOCK_MODELS
    for spec in specs:
        found.setdefault(spec, spec.partition(":")[0])
    for alias, model in routing.aliases.items():
        try:
            targets = family(model, routing)
        except errors.LlmsrvError:
            continue
        if targets:
            found.setdefault(alias, targets[0].provider)
    return sorted(((m, p) for m, p in found.items() if providers is None or p == "llmsrv" or p in providers),
                  key=lambda item: (item[0] != "auto", item[0]))


def _provider_configs(cfg: Config) -> Iterator[tuple[str, Any]]:
    for name in cfg.providers.__struct_fields__:
        yield name, getattr(cfg.providers, name)


def model_document(model_id: str, owner: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner}


def models_document(models: Collection[tuple[str, str]], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_document(m, owner, created) for m, owner in models]}

