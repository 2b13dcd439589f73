"""The Gemini codec (generateContent, streamGenerateContent): pure, no I/O.

Wire shapes come from the public Gemini API reference:
* https://ai.google.dev/api/generate-content -- ``POST /v1beta/models/{model}:generateContent`` and
  ``:streamGenerateContent?alt=sse`` (each SSE ``data:`` is one GenerateContentResponse chunk),
  ``contents``/``systemInstruction``/``generationConfig``, ``Candidate.finishReason``, ``UsageMetadata``,
  ``PromptFeedback.blockReason``
* https://ai.google.dev/api/caching#FunctionDeclaration -- ``parametersJsonSchema`` (raw JSON Schema,
  "mutually exclusive with ``parameters``"); ``FunctionCall``/``FunctionResponse`` with ``id``, ``name``
* https://ai.google.dev/gemini-api/docs/function-calling -- ``tools[].functionDeclarations``,
  ``functionCall`` parts in replies, ``functionResponse`` parts (role ``user``) in requests
* https://ai.google.dev/gemini-api/docs/thought-signatures -- Gemini 3 refuses (4xx) a function call turn
  sent back without its ``thoughtSignature``
* https://ai.google.dev/api/models -- ``GET /v1beta/models`` (models.list, spends no tokens)
* https://ai.google.dev/gemini-api/docs/troubleshooting -- ``{"error": {"code", "message", "status",
  "details"}}``; a 429 carries ``google.rpc.RetryInfo`` (``retryDelay: "36s"``) in ``details``
* https://ai.google.dev/gemini-api/docs/api-key -- the key goes in the ``x-goog-api-key`` header (never
  ``?key=``, so it cannot leak into a logged URL)

Current API surfaces, chosen deliberately
-----------------------------------------
* ``v1beta``, not ``v1``: the Gemini SDKs default to ``v1beta`` (https://ai.google.dev/gemini-api/docs/
  api-versions; google-genai ``_api_client.py`` sets ``api_version = 'v1beta'`` for the Developer API), the
  REST reference documents ``systemInstruction``, ``tools``, ``FunctionDeclaration.parametersJsonSchema``
  and ``FunctionCall.id``/``FunctionResponse.id`` on ``v1beta``; ``v1`` long lacked ``systemInstruction``
  and ``tools`` and is not where new request fields land first.
* Auth: the ``x-goog-api-key`` header.
* Function call ids: accepted by the Gemini API, not only Vertex. google-genai's Developer-API converter
  (``models.py`` ``_FunctionCall_to_mldev``) passes ``FunctionCall.id`` through (it refuses only
  ``partial_args``/``will_continue`` there), ``FunctionResponse.id`` is "populated by the client to match the
  corresponding function call id" (``types.FunctionResponse``), and Gemini 3 returns an ``id`` on every
  ``functionCall``. So both sides carry the call id: parallel calls of the same function are matched by id,
  answers in any order. Older models (2.5) send none; we then make one up (``call_<hex>``) and send it on
  both the call and its response (the field is optional and client-populated on the response; that the
  live API keeps accepting a made-up id on a ``functionCall`` is the SDK's behaviour, not a documented
  promise).
* Thought signatures: the contract's ``tool_calls`` have no place for Gemini's opaque ``thoughtSignature``,
  so a model turn rebuilt from ``tool_calls`` carries, on its first ``functionCall`` part, the value the
  thought-signatures guide gives for function calls that did not come from this model with their signature
  (``skip_thought_signature_validator``); without it Gemini 3 answers 400 "Function call is missing a
  thought_signature in functionCall parts".

Translation decisions
---------------------
* ``system`` messages -> ``systemInstruction.parts`` (one text part each). ``user`` -> role ``user``,
  ``assistant`` -> role ``model``. Adjacent messages landing on the same role are merged into one turn,
  because the API wants user and model turns to alternate; so every answer to one model turn's calls lands
  in ONE ``user`` turn (the API counts them: as many ``functionResponse`` parts as ``functionCall`` parts).
* An ``assistant`` message with ``tool_calls`` -> a ``model`` turn: its text part (if any), then one
  ``functionCall`` part per call: ``{"id": <call id>, "name", "args": <decoded arguments>}``.
* A ``tool`` message -> a ``functionResponse`` part: ``id`` = its ``tool_call_id``, ``name`` = the name of the
  function that call made (looked up among the earlier assistant ``tool_calls``; the API checks it),
  ``response`` = the content when it is a JSON object, else ``{"output": <the JSON value, or the raw text>}``
  ("output" is the key the API documents).
* Tool parameters (JSON Schema) go out as ``parametersJsonSchema``: ``parameters`` is an OpenAPI subset
  that refuses ``$schema``, ``additionalProperties``, ``const`` and type arrays.
* ``finishReason``: a safety-like stop (``_FILTERED``: SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII,
  IMAGE_SAFETY, IMAGE_PROHIBITED_CONTENT, IMAGE_RECITATION, ...; the FinishReason enum of the reference and
  of ``google.genai.types``) -> ``content_filter`` with whatever text came and no ``refusal`` (Gemini gives
  no refusal text), even when function calls came too; else a reply with ``functionCall`` parts ->
  ``tool_calls`` (the API says STOP there); MAX_TOKENS -> ``length``; STOP, LANGUAGE, OTHER, the
  malformed/unexpected tool call reasons and anything else -> ``stop`` with whatever text came.
* A prompt refused before any candidate (``promptFeedback.blockReason``, no candidates) -> a
  ``content_filter`` finish with empty text and the prompt's usage: a safety stop, per CONTRACT section 3
  (neither retried nor counted against the breaker).
* Usage: ``promptTokenCount``; ``candidatesTokenCount + thoughtsTokenCount`` (thinking is billed as output).
  Every chunk's ``usageMetadata`` is cumulative (the last one wins), including a usage-only last chunk.
* Thought-summary parts (``"thought": true``) are not part of the answer text.
* An error inside a stream (``{"error": {...}}`` as a chunk): RESOURCE_EXHAUSTED/429 -> ``RateLimited`` with
  the ``RetryInfo`` delay as ``retry_after_ms``; anything else -> ``ProviderError``.
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
from ...messages import Message, ToolCall, Usage
from .. import Call, Completion
from . import Fold, HttpRequest, Origin, inband_error, retry_info_ms, said, stream_cut, tool_definition

API = "/v1beta"
# The thought-signatures guide's value for a function call turn that comes back without the signature the
# model gave it (the contract's tool_calls cannot carry one): Gemini 3 refuses such a turn otherwise.
SKIP_SIGNATURE = "skip_thought_signature_validator"
# FinishReason values that mean a filter or policy stopped the answer (the API reference's enum, as in
# google.genai.types.FinishReason): finish "content_filter".
_FILTERED = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION", "MODEL_ARMOR", "ESCALATION", "PUP_LIMITED_DISABLED",
})
_LENGTH = frozenset({"MAX_TOKENS", "CONTINUATION"})

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
    details: list[Any] = []  # google.rpc details: RetryInfo carries the retry delay


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _UsageMetadata | None = None
    prompt_feedback: _PromptFeedback | None = None
    error: _Error | None = None  # only inside a stream; HTTP errors are mapped from the status


_decode_response = msgspec.json.Decoder(_Response).decode

# ---- request translation (pure) -------------------------------------------------------------------


def _decoded(text: str) -> Any:
    """The JSON value of ``text``, or ``text`` itself when it is not JSON."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def _function_calls(message: Message) -> list[dict[str, Any]]:
    """The ``functionCall`` parts of an assistant turn; the first carries the skip signature."""
    parts: list[dict[str, Any]] = []
    for call in message.tool_calls or ():
        args = _decoded(call.function.arguments)
        if not isinstance(args, dict):  # messages.check_turns refuses this at the edge already
            raise errors.ValidationFailed(f"tool call {call.id[:64]!r}: arguments are not the JSON text of an object")
        part: dict[str, Any] = {"functionCall": {"id": call.id, "name": call.function.name, "args": args}}
        if not parts:
            part["thoughtSignature"] = SKIP_SIGNATURE
        parts.append(part)
    return parts


def _function_response(message: Message, names: dict[str, str]) -> dict[str, Any]:
    call_id = message.tool_call_id
    if call_id is None or call_id not in names:  # messages.check_turns refuses this at the edge already
        raise errors.ValidationFailed(f"tool message answers no earlier tool call (tool_call_id {call_id!r:.70})")
    value = _decoded(message.content)
    response = value if isinstance(value, dict) else {"output": value}
    return {"functionResponse": {"id": call_id, "name": names[call_id], "response": response}}


def _contents(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[str]]:
    """(contents, system texts): our messages as alternating Gemini turns."""
    contents: list[dict[str, Any]] = []
    system: list[str] = []
    names: dict[str, str] = {}  # call id -> the function that call named, from the assistant turns so far
    for message in messages:
        if message.role == "system":
            system.append(message.content)
            continue
        parts: list[dict[str, Any]]
        if message.role == "tool":
            parts = [_function_response(message, names)]
        else:
            parts = [{"text": message.content}] if message.content else []
            if message.role == "assistant" and message.tool_calls:
                parts += _function_calls(message)
                names.update((call.id, call.function.name) for call in message.tool_calls)
        role = "model" if message.role == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return contents, system


def request_body(call: Call) -> dict[str, Any]:
    contents, system = _contents(call.messages)
    if not contents:  # only system messages: the API needs at least one turn
        contents, system = [{"role": "user", "parts": [{"text": text} for text in system]}], []
    body: dict[str, Any] = {
        "contents": contents,
        "generationConfig": {"maxOutputTokens": call.max_tokens, "temperature": call.temperature},
    }
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    if call.tools:
        body["tools"] = [{"functionDeclarations": [tool_definition(tool, schema_key="parametersJsonSchema")
                                                   for tool in call.tools]}]
    return body


# ---- reply accumulation (pure) --------------------------------------------------------------------


def finish_reason(reason: str | None, *, tool_calls: bool, blocked: bool) -> str:
    """Our finish reason for Gemini's ``finishReason`` (``None``: only a ``promptFeedback.blockReason`` came)."""
    if reason in _FILTERED or (reason is None and blocked):
        return "content_filter"
    if tool_calls:
        return "tool_calls"
    return "length" if reason in _LENGTH else "stop"


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
        if self.finish_reason is None and not self.block_reason:
            raise stream_cut(self.origin, "a finishReason")
        finish = finish_reason(self.finish_reason, tool_calls=bool(self.tool_calls), blocked=bool(self.block_reason))
        usage = Usage(prompt_tokens=self.usage.prompt_token_count,
                      completion_tokens=self.usage.candidates_token_count + self.usage.thoughts_token_count)
        return Completion(text="".join(self.text), usage=usage, finish_reason=finish, tool_calls=self.tool_calls)

    def _stream_error(self, error: _Error) -> errors.LlmsrvError:
        limited = error.code == 429 or error.status == "RESOURCE_EXHAUSTED"
        failure = inband_error(self.origin, errors.RateLimited if limited else errors.ProviderError, "stream failed",
                               f"{error.status or error.code}: {error.message}")
        failure.retry_after_ms = retry_info_ms({"details": error.details})  # the hint rides on any failure
        return failure


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
