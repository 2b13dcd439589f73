"""The OpenAI Responses API codec (``POST /responses``, plain and streamed): pure, no I/O.

Where the wire shapes come from: the API reference (platform.openai.com/docs/api-reference/responses/create,
the streaming-events reference platform.openai.com/docs/api-reference/responses-streaming, and
developers.openai.com/docs/guides/streaming-responses) and the official SDK's types
(``openai.types.responses.ResponseCreateParams``, which the tests' fake upstream validates every request
against; ``ResponseStreamEvent`` for the events): ``input`` items, ``instructions``, ``max_output_tokens``,
function tools ``{type, name, description, parameters, strict}``, ``output`` items ``message`` (content
parts ``output_text`` / ``refusal``) and ``function_call`` (``call_id``, ``arguments``), usage
``input_tokens``/``output_tokens``; events ``response.output_text.delta``, ``response.refusal.delta`` /
``.done``, and the terminal ``response.completed`` / ``response.incomplete`` / ``response.failed``, or
``error``. There is no ``[DONE]``.

Rules (the current API surface, chosen deliberately)
----------------------------------------------------
* **Responses-only models** (the ``codex`` row): ``codex`` in the name (``gpt-5-codex``,
  ``codex-mini-latest``...), ``o<n>-pro`` and ``*-deep-research`` are served only by ``/responses``.
* Reasoning models (the chat codec's rule) get no ``temperature``; every model gets ``max_output_tokens``
  (the only length field of this API). ``store: false``: nothing is kept upstream, so every turn goes
  in ``input`` again (no ``previous_response_id``).
* Tool round trips (platform.openai.com/docs/guides/function-calling, "function_call_output"): the
  system turns become ``instructions``; an assistant turn becomes its message item (when it has text)
  followed by one ``{"type": "function_call", "call_id", "name", "arguments"}`` item per call, and a
  ``tool`` turn a ``{"type": "function_call_output", "call_id", "output"}`` item, in any order. Reasoning
  items of earlier turns are not sent back (``store: false`` without ``include:
  ["reasoning.encrypted_content"]``): the API accepts that, a reasoning model reasons afresh.
* A ``refusal`` content part (streamed: ``response.refusal.delta``/``.done``), or a response
  ``incomplete`` for ``content_filter``, is ``finish_reason`` ``content_filter`` with
  ``Completion.refusal`` the refusal text; ``incomplete`` for ``max_output_tokens`` is ``length``.
* Errors as in the chat codec: ``insufficient_quota`` (by status through ``status_error`` or in-band in
  an ``error`` event or a failed response) is ``QuotaExhausted``, rate-limit codes ``RateLimited``.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ... import errors
from ...messages import Message, ToolCall
from .. import Call, Completion
from . import BodyFold, Fold, HttpRequest, Json, Origin, stream_cut
from .openai_chat import bare, completion, function, is_reasoning, status_error, upstream_error

_RESPONSES_ONLY = re.compile(r".*codex|o\d+-pro|.*deep-research")
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def is_responses_only(model: str) -> bool:
    return _RESPONSES_ONLY.match(bare(model)) is not None


def _input_items(message: Message) -> list[Json]:
    """The ``input`` items of one (non-system) turn."""
    if message.role == "tool":
        if call_id := message.tool_call_id:
            return [{"type": "function_call_output", "call_id": call_id, "output": message.content}]
        return [{"role": "user", "content": message.content}]  # no call to answer (checked turns never)
    items: list[Json] = [{"role": message.role, "content": message.content}] if message.content else []
    for c in message.tool_calls or ():
        items.append({"type": "function_call", "call_id": c.id, "name": c.function.name,
                      "arguments": c.function.arguments})
    return items


def responses_body(call: Call, *, stream: bool) -> Json:
    system = [m.content for m in call.messages if m.role == "system"]
    body: Json = {
        "model": call.model, "input": [item for m in call.messages if m.role != "system" for item in _input_items(m)],
        "max_output_tokens": call.max_tokens, "store": False,
    }
    if system:
        body["instructions"] = "\n\n".join(system)
    if not is_reasoning(call.model):
        body["temperature"] = call.temperature
    if call.tools:
        # strict defaults to true here, which would reject any schema not written for it
        body["tools"] = [{"type": "function", **function(t), "strict": False} for t in call.tools]
    if stream:
        body["stream"] = True
    return body


_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def parse_response(data: Any, call: Call, streamed_text: str = "", streamed_refusal: str = "") -> Completion:
    """A Responses API ``response`` object (``status`` completed or incomplete). What was streamed stands in
    for an ``output`` that does not carry it (compatible servers that send an empty terminal response)."""
    texts: list[str] = []
    refusals: list[str] = []
    tool_calls: list[ToolCall] = []
    for item in data.get("output") or ():
        if item["type"] == "message":
            for part in item.get("content") or ():
                if part["type"] == "output_text":
                    texts.append(part.get("text") or "")
                elif part["type"] == "refusal":
                    refusals.append(part.get("refusal") or "")
        elif item["type"] == "function_call":
            tool_calls.append(ToolCall(item.get("call_id") or item["id"], item["name"], item.get("arguments") or "{}"))
    finish = None
    if data.get("status") == "incomplete":
        finish = _INCOMPLETE.get(str((data.get("incomplete_details") or {}).get("reason")))
    usage = data.get("usage") or {}
    return completion(call, "".join(texts) or streamed_text, tool_calls, finish,
                      usage.get("input_tokens"), usage.get("output_tokens"), "".join(refusals) or streamed_refusal)


def _error_of(data: Any) -> Any:
    """The error object of an ``error`` event: the SDK's flat ``{"type": "error", "code", "message"}``, or
    the nested ``{"type": "error", "error": {...}}`` some streams send."""
    nested = data.get("error") if isinstance(data, dict) else None
    return nested if isinstance(nested, dict) else data


def finished(data: Any, call: Call, origin: Origin, streamed_text: str = "", streamed_refusal: str = "") -> Completion:
    """The answer a terminal ``response`` object carries (a failed one raises)."""
    if data.get("status") == "failed" or data.get("error"):
        raise upstream_error(origin, data.get("error") or "the response failed")
    return parse_response(data, call, streamed_text, streamed_refusal)


class ResponseStreamFold:
    """The event stream whose terminal event carries the ``response``."""

    def __init__(self, call: Call, origin: Origin) -> None:
        self.call, self.origin = call, origin
        self.pieces: list[str] = []
        self.refusal: list[str] = []  # response.refusal.delta pieces (the terminal response repeats them)
        self._completion: Completion | None = None

    @property
    def done(self) -> bool:
        return self._completion is not None

    def feed(self, data: str | bytes, event: str = "") -> str:
        if not data or data == "[DONE]":  # not part of this API, but some compatible servers send it
            return ""
        decoded = msgspec.json.decode(data)
        kind = (decoded.get("type") or event) if isinstance(decoded, dict) else event
        if kind == "response.output_text.delta":
            if piece := decoded.get("delta") or "":
                self.pieces.append(piece)
            return piece
        if kind == "response.refusal.delta":
            self.refusal.append(decoded.get("delta") or "")
        elif kind == "response.refusal.done":
            self.refusal = [decoded.get("refusal") or "".join(self.refusal)]
        elif kind in TERMINAL:
            self._completion = finished(decoded["response"], self.call, self.origin, "".join(self.pieces),
                                        "".join(self.refusal))
        elif kind == "error":
            raise upstream_error(self.origin, _error_of(decoded))
        return ""

    def result(self) -> Completion:
        if self._completion is None:
            raise stream_cut(self.origin, "response.completed")
        return self._completion


class OpenAIResponses:
    def status_error(self, status: int, detail: str, error: Any) -> type[errors.LlmsrvError] | None:
        return status_error(status, detail, error)

    def request(self, call: Call, *, stream: bool) -> HttpRequest:
        return HttpRequest(method="POST", path="/responses", body=responses_body(call, stream=stream), stream=stream)

    def folder(self, call: Call, origin: Origin, *, stream: bool) -> Fold[Completion]:
        if stream:
            return ResponseStreamFold(call, origin)
        return BodyFold(lambda data: finished(data, call, origin))


CODEC = OpenAIResponses()
