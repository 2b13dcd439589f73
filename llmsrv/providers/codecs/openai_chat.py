"""The OpenAI Chat Completions codec (``POST /chat/completions``, plain and streamed): pure, no I/O.

Served by ``codex``, ``github``, ``openrouter``, ``openai_compat`` and ``copilot`` (rows in
``registry.py``); the Responses API is ``openai_responses.py``.

Where the wire shapes come from
-------------------------------
* Chat Completions, streaming and errors: the OpenAI API reference
  (platform.openai.com/docs/api-reference/chat/create; the ``chat.completion.chunk`` object;
  ``stream_options.include_usage``: one last chunk with ``usage`` and empty ``choices`` before
  ``data: [DONE]``; error bodies ``{"error": {"message", "type", "param", "code"}}``), and the request
  types of the official SDK (``openai.types.chat.CompletionCreateParams``), which the tests' fake
  upstream validates every request against. Streamed tool calls arrive as ``delta.tool_calls[]``
  fragments keyed by ``index``: id and name in the first, ``function.arguments`` in pieces to
  concatenate (recorded streams in ``tests/fixtures/openai/``, from openai-python's own tests).
* Tool round trips (platform.openai.com/docs/guides/function-calling): the assistant message that
  made the calls goes back with its ``tool_calls`` (``content`` null when it said nothing), then one
  ``{"role": "tool", "tool_call_id", "content"}`` message per call, in any order.
* Refusals (platform.openai.com/docs/guides/structured-outputs#refusals): ``message.refusal`` (streamed:
  ``delta.refusal`` pieces) holds the refusal text, and ``finish_reason`` is then still ``stop``;
  ``finish_reason: "content_filter"`` is the content filter's stop (Azure-hosted models such as
  GitHub Models', and OpenRouter's ``native_finish_reason`` normalisation).
* Quota (platform.openai.com/docs/guides/error-codes/api-errors, "429 - You exceeded your current
  quota"): ``{"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}``, and the finer
  billing codes ``credit_balance_exhausted``, ``organization_spend_limit_exceeded``,
  ``project_spend_limit_exceeded``, ``organization_usage_limit_exceeded`` listed in
  learn.microsoft.com/microsoft-cloud/dev/dev-proxy/concepts/openai-insufficient-quota (type still
  ``insufficient_quota``). OpenRouter answers 402 for an account without credits
  (openrouter.ai/docs/api-reference/errors). Both are a billing failure, not a rate limit.
* GitHub Models: docs.github.com/rest/models/inference (``POST /inference/chat/completions``) and
  docs.github.com/rest/models/catalog (``GET /catalog/models``), header ``X-GitHub-Api-Version``.
* OpenRouter: openrouter.ai/docs/api-reference/streaming (keep-alive comments, which the SSE parser
  drops; mid-stream errors as a ``data:`` chunk with an ``error`` object), openrouter.ai/docs/errors,
  openrouter.ai/docs/model-routing (``openrouter/auto``), openrouter.ai/docs/app-attribution
  (``HTTP-Referer``, ``X-Title``).

Rules (the current API surface, chosen deliberately)
----------------------------------------------------
* **Reasoning models** (name, after any ``publisher/`` prefix, starting with ``o<digit>``, ``gpt-5`` or
  ``codex``: o1, o3, o3-mini, o4-mini, gpt-5, gpt-5-mini, gpt-5-nano, gpt-5.x, codex-mini-latest...):
  ``max_completion_tokens`` instead of ``max_tokens``, which the SDK documents as "deprecated in favor
  of ``max_completion_tokens``, and is not compatible with o-series models"
  (``openai.types.chat.completion_create_params``, developers.openai.com/api/docs/guides/reasoning;
  the API's 400: "Unsupported parameter: 'max_tokens' is not supported with this model. Use
  'max_completion_tokens' instead."), and no ``temperature`` (they accept only the default: "Only the
  default (1) value is supported."). ``gpt-5-chat-latest`` would take both, but omitting them is
  accepted too. Other models get ``max_tokens`` and ``temperature``, which every compatible server
  (vLLM, llama.cpp, Ollama, GitHub Models, OpenRouter) reads; ``max_completion_tokens`` is not read by
  all of them.
* An assistant turn with ``tool_calls`` carries them in OpenAI's form (``id``, ``type: function``,
  ``function.name``, ``function.arguments`` as JSON text) and ``content: null`` when it said nothing;
  a ``tool`` turn carries its ``tool_call_id``.
* A refusal (``refusal`` text) or a ``content_filter`` stop is ``finish_reason`` ``content_filter``
  with ``Completion.refusal`` the refusal text (None for a filter stop without one); the refusal text
  is not part of ``text`` and not streamed as a delta.
* ``insufficient_quota`` (and the billing codes above), by HTTP status (429) through
  ``status_error`` or in-band (an error object inside a 200 body or chunk), and HTTP 402, are
  ``QuotaExhausted``: the next candidate at once, no wait, not a rate limit. Other rate-limit codes
  stay ``RateLimited``; any other in-band error object (OpenAI/OpenRouter ``{"error": ...}`` or vLLM's
  ``{"object": "error"}``) is a ``ProviderError``.
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
from . import BodyFold, Fold, HttpRequest, Json, Origin, inband_error, said, stream_cut, tool_definition

_REASONING = re.compile(r"o\d|gpt-5|codex")
_RATE_LIMIT_CODES = frozenset({"429", "rate_limit_exceeded", "rate_limit_error", "too_many_requests"})
QUOTA_CODES = frozenset({"insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
                         "project_spend_limit_exceeded", "organization_usage_limit_exceeded", "402"})


def bare(model: str) -> str:
    return model.rsplit("/", 1)[-1]


def is_reasoning(model: str) -> bool:
    return _REASONING.match(bare(model)) is not None


# ---- requests ----------------------------------------------------------------------------------

def function(tool: Tool) -> Json:
    """A function tool's ``{name, description?, parameters}`` (an empty object schema when none)."""
    return tool_definition(tool, schema=lambda p: p or {"type": "object", "properties": {}})


def _chat_message(message: Message) -> Json:
    if message.role == "assistant" and message.tool_calls:
        return {"role": "assistant", "content": message.content or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls]}
    if message.role == "tool" and message.tool_call_id:
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    return {"role": message.role, "content": message.content}


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
               prompt_tokens: int | None, completion_tokens: int | None, refusal: str | None = None) -> Completion:
    """The ``Completion`` of a folded reply: a refusal or a content-filter stop first, then a cut
    (``length``), then tool calls."""
    refusal = refusal or None
    if refusal is not None or finish == "content_filter":
        reason = "content_filter"
    elif finish == "length":
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
                      tool_calls=tuple(tool_calls), refusal=refusal)


def error_object(data: Any) -> Any:
    """The error an otherwise successful body or chunk reports, if any (OpenAI/OpenRouter or vLLM shape)."""
    if not isinstance(data, dict):
        return None
    if data.get("error"):
        return data["error"]
    return data if data.get("object") == "error" else None


def _codes(err: Any) -> set[str]:
    if not isinstance(err, dict):
        return set()
    return {str(err[key]) for key in ("code", "type") if err.get(key) is not None}


def quota_exhausted(err: Any) -> bool:
    """The error object (``code`` or ``type``) says the account's quota or credit is used up."""
    return bool(_codes(err) & QUOTA_CODES)


def upstream_error(origin: Origin, err: Any) -> errors.LlmsrvError:
    """An error object inside a 200 reply (a chunk or an event): an exhausted quota is ``QuotaExhausted``,
    rate limits stay rate limits, anything else is a ``ProviderError``."""
    if isinstance(err, dict):
        message = str(err.get("message") or err.get("type") or err.get("code") or "unknown error")
    else:
        message = str(err)
    codes = _codes(err)
    if codes & QUOTA_CODES:
        cls: type[errors.LlmsrvError] = errors.QuotaExhausted
    elif codes & _RATE_LIMIT_CODES:
        cls = errors.RateLimited
    else:
        cls = errors.ProviderError
    return inband_error(origin, cls, "reported an error", message)


def status_error(status: int, detail: str, error: Any) -> type[errors.LlmsrvError] | None:
    """``insufficient_quota`` (OpenAI's 429 for a billing failure) and HTTP 402 (OpenRouter: no credits)
    are ``QuotaExhausted``; every other status goes by the transport's table."""
    if status == 402 or quota_exhausted(error):
        return errors.QuotaExhausted
    return None


def parse_chat(data: Any, call: Call) -> Completion:
    choices = data["choices"]
    finish = choices[0].get("finish_reason")  # no choice at all: IndexError, a malformed reply
    texts: list[str] = []
    refusals: list[str] = []
    tool_calls: list[ToolCall] = []
    for choice in choices:  # one (n=1), but Copilot may put text and tool calls in two
        message = choice["message"]
        texts.append(message.get("content") or "")
        refusals.append(message.get("refusal") or "")
        tool_calls += [ToolCall(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}")
                       for c in message.get("tool_calls") or ()]
        finish = choice.get("finish_reason") or finish
    usage = data.get("usage") or {}
    return completion(call, "".join(texts), tool_calls, finish, usage.get("prompt_tokens"),
                      usage.get("completion_tokens"), "".join(refusals))


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
        self.refusal: list[str] = []  # delta.refusal pieces: not answer text, never a delta
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
            if refused := delta.get("refusal"):
                self.refusal.append(refused)
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
                          self.usage.get("prompt_tokens"), self.usage.get("completion_tokens"), "".join(self.refusal))


# ---- the codec ---------------------------------------------------------------------------------

class OpenAIChat:
    def status_error(self, status: int, detail: str, error: Any) -> type[errors.LlmsrvError] | None:
        return status_error(status, detail, error)

    def request(self, call: Call, *, stream: bool) -> HttpRequest:
        return HttpRequest(method="POST", path="/chat/completions", body=chat_body(call, stream=stream),
                           stream=stream)

    def folder(self, call: Call, origin: Origin, *, stream: bool) -> Fold[Completion]:
        if stream:
            return ChatStreamFold(call, origin)
        return BodyFold(lambda data: parse_chat(checked(data, origin), call))


CODEC = OpenAIChat()
