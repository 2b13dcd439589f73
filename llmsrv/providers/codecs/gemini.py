"""The Gemini codec (generateContent, streamGenerateContent): pure, no I/O.

Wire shapes come from the public Gemini API reference:
* https://ai.google.dev/api/generate-content -- ``POST /v1beta/models/{model}:generateContent`` and
  ``:streamGenerateContent?alt=sse`` (each SSE ``data:`` is one GenerateContentResponse chunk),
  ``contents``/``systemInstruction``/``generationConfig``, ``Candidate.finishReason``, ``UsageMetadata``
* https://ai.google.dev/gemini-api/docs/function-calling -- ``tools[].functionDeclarations``,
  ``functionCall`` parts in replies, ``functionResponse`` parts in requests
* https://ai.google.dev/api/models -- ``GET /v1beta/models`` (models.list, spends no tokens)
* https://ai.google.dev/gemini-api/docs/troubleshooting -- ``{"error": {"code", "message", "status"}}``
* https://ai.google.dev/gemini-api/docs/api-key -- the key goes in the ``x-goog-api-key`` header (never
  ``?key=``, so it cannot leak into a logged URL)

Translation decisions
---------------------
* ``system`` messages -> ``systemInstruction.parts`` (one text part each). ``user`` -> role ``user``,
  ``assistant`` -> role ``model``. Adjacent messages landing on the same role are merged into one turn,
  because the API wants user and model turns to alternate.
* ``tool`` messages -> a ``user`` turn with one ``functionResponse`` part. Our messages carry no call id
  or function name, so: content that is a JSON object ``{"name": str, "response": {...}}`` is sent as the
  functionResponse itself; otherwise ``name`` is the only declared tool's name (``"tool"`` when there
  are several or none) and ``response`` is the content's JSON object, or ``{"output": value}`` where
  value is the content parsed as JSON, else the raw text ("output" is the key the API documents).
* ``finishReason``: a reply with ``functionCall`` parts -> ``tool_calls`` (the API says STOP there);
  MAX_TOKENS -> ``length``; STOP, SAFETY, RECITATION and anything else -> ``stop`` with whatever text
  came: a filtered answer is a short answer, not an upstream failure (no breaker trip, no fallback).
* A prompt refused before any candidate (``promptFeedback.blockReason``) -> ``ValidationFailed``: the
  caller's content, so neither retried nor counted against the breaker.
* Usage: ``promptTokenCount``; ``candidatesTokenCount + thoughtsTokenCount`` (thinking is billed as output).
* Thought-summary parts (``"thought": true``) are not part of the answer text.
* Gemini answers a bad key with 400 INVALID_ARGUMENT ("API key not valid"), not 401: such a 400 is
  mapped to ``MissingCredentials`` (``status_error``, decided once from the status and the body's
  message by the transport) so the router falls back and ``probe()`` reports ``invalid``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import msgspec

from ... import errors
from ...messages import Message, Tool, ToolCall, Usage
from ...redact import clip
from .. import Call, Completion
from . import Fold, HttpRequest, Origin, inband_error, said, stream_cut, tool_definition

API = "/v1beta"

# ---- the parts of a GenerateContentResponse we read (unknown fields are ignored) -------------------


class _FunctionCall(msgspec.Struct):
    name: str
    args: dict[str, Any] = {}
    id: str | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Error(msgspec.Struct):
    code: int = 0
    message: str = ""
    status: str = ""


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _UsageMetadata | None = None
    prompt_feedback: _PromptFeedback | None = None
    error: _Error | None = None  # only inside a stream; HTTP errors are mapped from the status


_decode_response = msgspec.json.Decoder(_Response).decode

# ---- request translation (pure) -------------------------------------------------------------------


def _tool_response(content: str, tools: Sequence[Tool]) -> dict[str, Any]:
    try:
        value: Any = msgspec.json.decode(content)
    except msgspec.DecodeError:
        value = content
    if (isinstance(value, dict) and isinstance(value.get("name"), str)
            and isinstance(value.get("response"), dict) and len(value) == 2):
        return value
    name = tools[0].function.name if len(tools) == 1 else "tool"
    return {"name": name, "response": value if isinstance(value, dict) else {"output": value}}


def _contents(messages: Sequence[Message], tools: Sequence[Tool]) -> tuple[list[dict[str, Any]], list[str]]:
    """(contents, system texts): our messages as alternating Gemini turns."""
    contents: list[dict[str, Any]] = []
    system: list[str] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content)
            continue
        role = "model" if message.role == "assistant" else "user"
        part = ({"functionResponse": _tool_response(message.content, tools)} if message.role == "tool"
                else {"text": message.content})
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].append(part)
        else:
            contents.append({"role": role, "parts": [part]})
    return contents, system


def request_body(call: Call) -> dict[str, Any]:
    contents, system = _contents(call.messages, call.tools)
    if not contents:  # only system messages: the API needs at least one turn
        contents, system = [{"role": "user", "parts": [{"text": text} for text in system]}], []
    body: dict[str, Any] = {
        "contents": contents,
        "generationConfig": {"maxOutputTokens": call.max_tokens, "temperature": call.temperature},
    }
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    if call.tools:
        body["tools"] = [{"functionDeclarations": [tool_definition(tool) for tool in call.tools]}]
    return body


# ---- reply accumulation (pure) --------------------------------------------------------------------


class GeminiFold:
    """Folds one GenerateContentResponse (or every chunk of a stream, in order) into a Completion."""

    done = False  # a stream ends when the upstream closes it (the last chunk has the finishReason)

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.text: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.finish_reason: str | None = None
        self.usage = _UsageMetadata()
        self.block_reason: str | None = None

    def feed(self, data: str | bytes, event: str = "") -> str:
        if isinstance(data, str) and not data.strip():
            return ""
        return self.add(_decode_response(data))

    def add(self, chunk: _Response) -> str:
        """Take one chunk in; return its answer text."""
        if chunk.error is not None:
            raise self._stream_error(chunk.error)
        if chunk.usage_metadata is not None:  # cumulative: the last one is the total
            self.usage = chunk.usage_metadata
        if chunk.prompt_feedback is not None and chunk.prompt_feedback.block_reason:
            self.block_reason = chunk.prompt_feedback.block_reason
        if not chunk.candidates:
            return ""
        candidate = chunk.candidates[0]
        if candidate.finish_reason:
            self.finish_reason = candidate.finish_reason
        pieces: list[str] = []
        for part in candidate.content.parts if candidate.content else ():
            if part.function_call is not None:
                fc = part.function_call
                self.tool_calls.append(ToolCall(id=fc.id or f"call_{uuid.uuid4().hex[:24]}", name=fc.name,
                                                arguments=msgspec.json.encode(fc.args).decode()))
            elif part.text and not part.thought:
                pieces.append(part.text)
        piece = "".join(pieces)
        return said(self.text, piece)

    def result(self) -> Completion:
        if self.finish_reason is None:
            if self.block_reason:
                reason = clip(self.block_reason, 100, self.origin.secrets)
                raise errors.ValidationFailed(f"{self.origin.provider} refused the prompt (blockReason {reason})")
            raise stream_cut(self.origin, "a finishReason")
        if self.tool_calls:
            finish = "tool_calls"
        elif self.finish_reason == "MAX_TOKENS":
            finish = "length"
        else:
            finish = "stop"  # STOP, SAFETY, RECITATION, OTHER...: keep the text we got
        usage = Usage(prompt_tokens=self.usage.prompt_token_count,
                      completion_tokens=self.usage.candidates_token_count + self.usage.thoughts_token_count)
        return Completion(text="".join(self.text), usage=usage, finish_reason=finish, tool_calls=self.tool_calls)

    def _stream_error(self, error: _Error) -> errors.LlmsrvError:
        limited = error.code == 429 or error.status == "RESOURCE_EXHAUSTED"
        return inband_error(self.origin, errors.RateLimited if limited else errors.ProviderError, "stream failed",
                            f"{error.status or error.code}: {error.message}")


# ---- the codec ------------------------------------------------------------------------------------

class GeminiGenerate:
    def request(self, call: Call, *, stream: bool) -> HttpRequest:
        model = quote(call.model.removeprefix("models/"), safe="")
        if stream:
            return HttpRequest(method="POST", path=f"{API}/models/{model}:streamGenerateContent",
                               body=request_body(call), params={"alt": "sse"}, stream=True)
        return HttpRequest(method="POST", path=f"{API}/models/{model}:generateContent", body=request_body(call))

    def folder(self, call: Call, origin: Origin, *, stream: bool) -> Fold[Completion]:
        return GeminiFold(origin)

    def status_error(self, status: int, detail: str, error: Any) -> type[errors.LlmsrvError] | None:
        """Gemini rejects an invalid or expired key with 400 INVALID_ARGUMENT: a credentials error."""
        return errors.MissingCredentials if status == 400 and "api key" in detail.lower() else None


CODEC = GeminiGenerate()
PROBE = HttpRequest(method="GET", path=f"{API}/models", params={"pageSize": "1"})
