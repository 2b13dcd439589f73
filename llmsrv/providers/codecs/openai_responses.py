"""The OpenAI Responses API codec (``POST /responses``, plain and streamed): pure, no I/O.

Where the wire shapes come from: developers.openai.com/docs/guides/streaming-responses and the
streaming-events reference: ``input`` items, ``instructions``, ``max_output_tokens``, function tools
``{type, name, description, parameters, strict}``, ``output`` items ``message``/``output_text`` and
``function_call`` (``call_id``, ``arguments``), usage ``input_tokens``/``output_tokens``; events
``response.output_text.delta`` and the terminal ``response.completed`` / ``response.incomplete`` /
``response.failed``, or ``error``. There is no ``[DONE]``.

Rules
-----
* **Responses-only models** (the ``codex`` row): ``codex`` in the name (``gpt-5-codex``,
  ``codex-mini-latest``...), ``o<n>-pro`` and ``*-deep-research`` are served only by ``/responses``.
* ``/responses`` has no ``tool`` role: a tool message with a call id becomes a ``function_call_output``
  item, without one a ``user`` message.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ...messages import Message, ToolCall
from .. import Call, Completion
from . import BodyFold, Fold, HttpRequest, Json, Origin, StatusDefault, stream_cut
from .openai_chat import bare, completion, function, is_reasoning, upstream_error

_RESPONSES_ONLY = re.compile(r".*codex|o\d+-pro|.*deep-research")
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def is_responses_only(model: str) -> bool:
    return _RESPONSES_ONLY.match(bare(model)) is not None


def _input_item(message: Message) -> Json:
    if message.role == "tool":
        if call_id := message.tool_call_id:
            return {"type": "function_call_output", "call_id": call_id, "output": message.content}
        return {"role": "user", "content": message.content}
    return {"role": message.role, "content": message.content}


def responses_body(call: Call, *, stream: bool) -> Json:
    system = [m.content for m in call.messages if m.role == "system"]
    body: Json = {
        "model": call.model, "input": [_input_item(m) for m in call.messages if m.role != "system"],
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


def parse_response(data: Any, call: Call, streamed_text: str = "") -> Completion:
    """A Responses API ``response`` object (``status`` completed or incomplete)."""
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for item in data.get("output") or ():
        if item["type"] == "message":
            texts += [part.get("text") or "" for part in item.get("content") or () if part["type"] == "output_text"]
        elif item["type"] == "function_call":
            tool_calls.append(ToolCall(item.get("call_id") or item["id"], item["name"], item.get("arguments") or "{}"))
    cut = data.get("status") == "incomplete" and (data.get("incomplete_details") or {}).get("reason") == \
        "max_output_tokens"
    usage = data.get("usage") or {}
    return completion(call, "".join(texts) or streamed_text, tool_calls, "length" if cut else None,
                      usage.get("input_tokens"), usage.get("output_tokens"))


def finished(data: Any, call: Call, origin: Origin, streamed_text: str = "") -> Completion:
    """The answer a terminal ``response`` object carries (a failed one raises)."""
    if data.get("status") == "failed" or data.get("error"):
        raise upstream_error(origin, data.get("error") or "the response failed")
    return parse_response(data, call, streamed_text)


class ResponseStreamFold:
    """The event stream whose terminal event carries the ``response``."""

    def __init__(self, call: Call, origin: Origin) -> None:
        self.call, self.origin = call, origin
        self.pieces: list[str] = []
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
        if kind in TERMINAL:
            self._completion = finished(decoded["response"], self.call, self.origin, "".join(self.pieces))
        elif kind == "error":
            raise upstream_error(self.origin, decoded)
        return ""

    def result(self) -> Completion:
        if self._completion is None:
            raise stream_cut(self.origin, "response.completed")
        return self._completion


class OpenAIResponses(StatusDefault):
    def request(self, call: Call, *, stream: bool) -> HttpRequest:
        return HttpRequest(method="POST", path="/responses", body=responses_body(call, stream=stream), stream=stream)

    def folder(self, call: Call, origin: Origin, *, stream: bool) -> Fold[Completion]:
        if stream:
            return ResponseStreamFold(call, origin)
        return BodyFold(lambda data: finished(data, call, origin))


CODEC = OpenAIResponses()
