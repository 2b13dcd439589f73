"""The OpenAI Chat Completions codec (``POST /chat/completions``, plain and streamed): pure, no I/O.

Served by ``codex``, ``github``, ``openrouter``, ``openai_compat`` and ``copilot`` (rows in
``registry.py``); the Responses API is ``openai_responses.py``.

Where the wire shapes come from
-------------------------------
* Chat Completions, streaming and errors: the OpenAI API reference (``/chat/completions``; the
  ``chat.completion.chunk`` object; ``stream_options.include_usage``: one last chunk with ``usage`` and
  empty ``choices`` before ``data: [DONE]``; error bodies ``{"error": {"message", "type", "code"}}``).
  Streamed tool calls arrive as ``delta.tool_calls[]`` fragments keyed by ``index``: id and name in
  the first, ``function.arguments`` in pieces to concatenate.
* GitHub Models: docs.github.com/rest/models/inference (``POST /inference/chat/completions``) and
  docs.github.com/rest/models/catalog (``GET /catalog/models``), header ``X-GitHub-Api-Version``.
* OpenRouter: openrouter.ai/docs/api-reference/streaming (keep-alive comments, which the SSE parser
  drops; mid-stream errors as a ``data:`` chunk with an ``error`` object), openrouter.ai/docs/errors,
  openrouter.ai/docs/model-routing (``openrouter/auto``), openrouter.ai/docs/app-attribution
  (``HTTP-Referer``, ``X-Title``).

Rules
-----
* **Reasoning models** (name, after any ``publisher/`` prefix, starting with ``o<digit>``, ``gpt-5`` or
  ``codex``): ``max_completion_tokens`` instead of the deprecated ``max_tokens`` (which they reject:
  "Not supported: o-series reasoning models and GPT-5 series") and no ``temperature`` (they accept only
  the default). Other models get ``max_tokens`` and ``temperature``, which every compatible server reads.
* Messages go as they are; a ``tool`` message carries its ``tool_call_id`` when the request gives one
  (an llmsrv extension of the contract's ``{role, content}``).
* An error object inside a 200 reply or chunk (OpenAI/OpenRouter ``{"error": ...}`` or vLLM's
  ``{"object": "error"}``) raises; rate-limit codes stay ``RateLimited``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ... import errors
from ...messages import Message, Tool, ToolCall, Usage
from .. import Call, Completion, estimate_prompt_tokens, estimate_tokens
from . import BodyFold, Fold, HttpRequest, Json, Origin, StatusDefault, inband_error, said, stream_cut, tool_definition

_REASONING = re.compile(r"o\d|gpt-5|codex")
_RATE_LIMIT_CODES = frozenset({"429", "rate_limit_exceeded", "rate_limit_error", "too_many_requests"})


def bare(model: str) -> str:
    return model.rsplit("/", 1)[-1]


def is_reasoning(model: str) -> bool:
    return _REASONING.match(bare(model)) is not None


# ---- requests ----------------------------------------------------------------------------------

def function(tool: Tool) -> Json:
    """A function tool's ``{name, description?, parameters}`` (an empty object schema when none)."""
    return tool_definition(tool, schema=lambda p: p or {"type": "object", "properties": {}})


def _chat_message(message: Message) -> Json:
    out: Json = {"role": message.role, "content": message.content}
    if message.role == "tool" and message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def chat_body(call: Call, model: str | None = None, *, stream: bool) -> Json:
    model = call.model if model is None else model
    body: Json = {"model": model, "messages": [_chat_message(m) for m in call.messages]}
    if is_reasoning(model):
        body["max_completion_tokens"] = call.max_tokens
    else:
        body["max_tokens"] = call.max_tokens
        body["temperature"] = call.temperature
    if call.tools:
        body["tools"] = [{"type": "function", "function": function(t)} for t in call.tools]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# ---- replies (shared with the Responses codec) -------------------------------------------------

def completion(call: Call, text: str, tool_calls: Sequence[ToolCall], finish: str | None,
               prompt_tokens: int | None, completion_tokens: int | None) -> Completion:
    if finish == "length":
        reason = "length"
    elif tool_calls or finish in ("tool_calls", "function_call"):
        reason = "tool_calls"
    else:
        reason = "stop"
    if prompt_tokens is None:  # servers without usage reporting: the usual estimate
        prompt_tokens = estimate_prompt_tokens(call)
    if completion_tokens is None:
        completion_tokens = estimate_tokens(text)
    return Completion(text=text, usage=Usage(prompt_tokens, completion_tokens), finish_reason=reason,
                      tool_calls=tuple(tool_calls))


def error_object(data: Any) -> Any:
    """The error an otherwise successful body or chunk reports, if any (OpenAI/OpenRouter or vLLM shape)."""
    if not isinstance(data, dict):
        return None
    if data.get("error"):
        return data["error"]
    return data if data.get("object") == "error" else None


def upstream_error(origin: Origin, err: Any) -> errors.LlmsrvError:
    """An error object inside a 200 reply (a chunk or an event): rate limits stay rate limits."""
    if isinstance(err, dict):
        message = str(err.get("message") or err.get("type") or err.get("code") or "unknown error")
        code = str(err.get("code") or err.get("type") or "")
    else:
        message, code = str(err), ""
    cls = errors.RateLimited if code in _RATE_LIMIT_CODES else errors.ProviderError
    return inband_error(origin, cls, "reported an error", message)


def parse_chat(data: Any, call: Call) -> Completion:
    choices = data["choices"]
    finish = choices[0].get("finish_reason")  # no choice at all: IndexError, a malformed reply
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for choice in choices:  # one (n=1), but Copilot may put text and tool calls in two
        message = choice["message"]
        texts.append(message.get("content") or "")
        tool_calls += [ToolCall(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}")
                       for c in message.get("tool_calls") or ()]
        finish = choice.get("finish_reason") or finish
    usage = data.get("usage") or {}
    return completion(call, "".join(texts), tool_calls, finish, usage.get("prompt_tokens"),
                      usage.get("completion_tokens"))


def checked(data: Any, origin: Origin) -> Any:
    """``data``, unless it reports an error (raised)."""
    if (err := error_object(data)) is not None:
        raise upstream_error(origin, err)
    return data


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChatStreamFold:
    """Chat Completions chunks, folded into one ``Completion`` (tool-call fragments joined by index)."""

    def __init__(self, call: Call, origin: Origin) -> None:
        self.call, self.origin = call, origin
        self.finished = False  # data: [DONE] came
        self.text: list[str] = []
        self.calls: dict[int, _PartialCall] = {}
        self.finish: str | None = None
        self.usage: Json = {}

    @property
    def done(self) -> bool:
        return self.finished

    def feed(self, data: str | bytes, event: str = "") -> str:
        if not data:
            return ""
        if data == "[DONE]":
            self.finished = True
            return ""
        return self.add(checked(msgspec.json.decode(data), self.origin))

    def add(self, chunk: Any) -> str:
        """Fold one decoded chunk in; return its text piece ("" when it has none)."""
        self.usage = chunk.get("usage") or self.usage
        piece = ""
        for choice in chunk.get("choices") or ():  # one choice (n=1); the usage chunk has none
            delta = choice.get("delta") or {}
            piece += delta.get("content") or ""
            for fragment in delta.get("tool_calls") or ():
                partial = self.calls.setdefault(fragment.get("index") or 0, _PartialCall())
                partial.id = fragment.get("id") or partial.id
                fn = fragment.get("function") or {}
                partial.name = fn.get("name") or partial.name  # some servers repeat it: never append
                partial.arguments.append(fn.get("arguments") or "")
            self.finish = choice.get("finish_reason") or self.finish
        return said(self.text, piece)

    def result(self) -> Completion:
        if not self.finished:
            raise stream_cut(self.origin, "data: [DONE]")
        tool_calls = [ToolCall(p.id or f"call_{i}", p.name, "".join(p.arguments) or "{}")
                      for i, p in sorted(self.calls.items())]
        return completion(self.call, "".join(self.text), tool_calls, self.finish,
                          self.usage.get("prompt_tokens"), self.usage.get("completion_tokens"))


# ---- the codec ---------------------------------------------------------------------------------

class OpenAIChat(StatusDefault):
    def request(self, call: Call, *, stream: bool) -> HttpRequest:
        return HttpRequest(method="POST", path="/chat/completions", body=chat_body(call, stream=stream),
                           stream=stream)

    def folder(self, call: Call, origin: Origin, *, stream: bool) -> Fold[Completion]:
        if stream:
            return ChatStreamFold(call, origin)
        return BodyFold(lambda data: parse_chat(checked(data, origin), call))


CODEC = OpenAIChat()
