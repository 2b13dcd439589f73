"""The Anthropic Messages codec (``POST /v1/messages``, plain and streamed): pure, no I/O.

Theory of operation
-------------------
* **Request translation** (``request_body``). System messages become the top-level
  ``system`` string (several joined by a blank line). User and assistant messages become
  ``messages`` turns; consecutive messages of one role are merged into one turn of several text
  blocks, because the API wants user and assistant turns to alternate.
* **Tool results.** Our wire ``Message`` is only ``{role, content}``, so the ids that tie a
  ``tool_result`` to its ``tool_use`` have to come from the content:

  - an assistant message whose content is a JSON object with a ``tool_calls`` list (OpenAI's
    assistant-message shape ``{"content", "tool_calls": [{"id", "function": {"name",
    "arguments"}}]}`` or llmsrv's own reply ``{"text", "tool_calls": [{"id", "name",
    "arguments"}]}``) becomes its text plus ``tool_use`` blocks; any other content is plain text;
  - a ``tool`` message answers the first still-unanswered ``tool_use`` of the latest assistant
    turn, or the one it names when its content is JSON ``{"tool_call_id": ..., "content": ...}``;
  - when there is no such ``tool_use`` the API would reject a ``tool_result`` (HTTP 400), so the
    result goes in as a user text block ``"Tool result:\\n..."`` instead.

  ``tool_result`` blocks sit before any text in their user turn, as the API requires.
* **Sampling.** ``model`` and ``max_tokens`` go as given (the router has resolved aliases);
  ``temperature`` is clamped to Anthropic's 0..1 (the contract allows up to 2, which the API
  would refuse with a 400 that ends the request instead of falling back).
* **Streaming** when the caller passes ``on_delta``: ``StreamFold`` folds the SSE events
  (``message_start`` .. ``message_stop``) into the same ``Completion`` the plain call returns,
  returns every ``text_delta`` and joins ``input_json_delta`` pieces into tool arguments. An
  ``error`` event raises the mapped error; a stream that ends before ``message_stop`` is a
  ``ProviderError``. Unknown events and block types (thinking, citations) are ignored, as
  Anthropic's versioning policy asks.
* HTTP status errors (529 overloaded included) are mapped by the transport (``http.py``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ... import errors
from ...messages import Tool, ToolCall, Usage
from ...redact import clip
from .. import Call, Completion
from . import BodyFold, Fold, HttpRequest, Origin, StatusDefault, error_class, inband_error, said, stream_cut
from . import tool_definition as shared_tool

API_VERSION = "2023-06-01"
CLAUDE = Origin("claude")
MAX_TEMPERATURE = 1.0

FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}

# ``error`` events of a stream: ``{"type": "error", "error": {"type": ..., "message": ...}}``.
STREAM_ERRORS: dict[str, type[errors.LlmsrvError]] = {
    "rate_limit_error": errors.RateLimited,
    "overloaded_error": errors.ProviderError,
    "api_error": errors.ProviderError,
    "timeout_error": errors.ProviderTimeout,
    "invalid_request_error": errors.ValidationFailed,
    "request_too_large": errors.ValidationFailed,
    "authentication_error": errors.MissingCredentials,
    "permission_error": errors.MissingCredentials,
    "not_found_error": errors.ProviderNotFound,
}

Block = dict[str, Any]


# ---- request translation (pure) -----------------------------------------------------------------

class _Function(msgspec.Struct):
    name: str
    arguments: str | dict[str, Any] = "{}"


class _ToolCallIn(msgspec.Struct):
    id: str
    name: str | None = None
    arguments: str | dict[str, Any] = "{}"
    function: _Function | None = None


class _AssistantTurn(msgspec.Struct):
    tool_calls: list[_ToolCallIn]
    content: str | None = None
    text: str | None = None


class _ToolOutput(msgspec.Struct):
    content: Any = ""
    tool_call_id: str | None = None
    tool_use_id: str | None = None


_assistant_turn = msgspec.json.Decoder(_AssistantTurn)
_tool_output = msgspec.json.Decoder(_ToolOutput)


def _text(text: str) -> Block:
    return {"type": "text", "text": text}


def assistant_blocks(content: str) -> list[Block]:
    """Plain text, or text + ``tool_use`` blocks for a JSON assistant turn carrying ``tool_calls``."""
    if not content.startswith("{") or '"tool_calls"' not in content:
        return [_text(content)]
    try:
        turn = _assistant_turn.decode(content)
        uses: list[Block] = []
        for tc in turn.tool_calls:
            name, args = (tc.function.name, tc.function.arguments) if tc.function else (tc.name, tc.arguments)
            tool_input = msgspec.json.decode(args) if isinstance(args, str) else args
            if not name or not isinstance(tool_input, dict):
                return [_text(content)]
            uses.append({"type": "tool_use", "id": tc.id, "name": name, "input": tool_input})
    except (msgspec.DecodeError, UnicodeDecodeError):
        return [_text(content)]
    if not uses:
        return [_text(content)]
    said = turn.content or turn.text
    return ([_text(said)] if said and said.strip() else []) + uses


def tool_block(content: str, open_ids: list[str]) -> Block:
    """A ``tool_result`` for one of ``open_ids`` (consumed), else the result as user text."""
    wanted: str | None = None
    if content.startswith("{") and ('"tool_call_id"' in content or '"tool_use_id"' in content):
        try:
            out = _tool_output.decode(content)
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass
        else:
            wanted = out.tool_call_id or out.tool_use_id
            content = out.content if isinstance(out.content, str) else msgspec.json.encode(out.content).decode()
    if wanted is None and open_ids:
        wanted = open_ids[0]
    if wanted is not None and wanted in open_ids:
        open_ids.remove(wanted)
        return {"type": "tool_result", "tool_use_id": wanted, "content": content}
    return _text(f"Tool result ({wanted}):\n{content}" if wanted else f"Tool result:\n{content}")


def _add(turns: list[Block], role: str, blocks: list[Block]) -> None:
    if turns and turns[-1]["role"] == role:
        content: list[Block] = turns[-1]["content"]
    else:
        content = []
        turns.append({"role": role, "content": content})
    for block in blocks:
        if block["type"] == "tool_result":  # results first, before any text of the turn
            i = 0
            while i < len(content) and content[i]["type"] == "tool_result":
                i += 1
            content.insert(i, block)
        else:
            content.append(block)


def tool_definition(tool: Tool) -> Block:
    return shared_tool(tool, schema_key="input_schema", schema=lambda p: {"type": "object", **(p or {})})


def request_body(call: Call) -> dict[str, Any]:
    """The ``/v1/messages`` body for ``call`` (without ``stream``)."""
    system: list[str] = []
    turns: list[Block] = []
    open_ids: list[str] = []  # tool_use ids of the latest assistant turn not answered yet
    for message in call.messages:
        if message.role == "system":
            system.append(message.content)
        elif message.role == "assistant":
            if not turns or turns[-1]["role"] != "assistant":
                open_ids = []
            blocks = assistant_blocks(message.content)
            open_ids += [b["id"] for b in blocks if b["type"] == "tool_use" and b["id"] not in open_ids]
            _add(turns, "assistant", blocks)
        elif message.role == "tool":
            _add(turns, "user", [tool_block(message.content, open_ids)])
        else:
            _add(turns, "user", [_text(message.content)])
    if turns and turns[-1]["role"] == "assistant":
        # A final assistant turn is a prefill, which the API refuses with trailing whitespace.
        last = turns[-1]["content"]
        if last[-1]["type"] == "text":
            last[-1]["text"] = last[-1]["text"].rstrip()
            if not last[-1]["text"]:
                last.pop()
                if not last:
                    turns.pop()
    if not turns:
        raise errors.ValidationFailed("claude needs at least one user or assistant message besides system ones")
    body: dict[str, Any] = {
        "model": call.model,
        "max_tokens": call.max_tokens,
        "temperature": min(call.temperature, MAX_TEMPERATURE),
        "messages": turns,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if call.tools:
        body["tools"] = [tool_definition(t) for t in call.tools]
    return body


# ---- reply translation (pure) -------------------------------------------------------------------

def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def prompt_tokens(usage: dict[str, Any]) -> int:
    """Every input token: uncached plus written to and read from the prompt cache."""
    return sum(int(usage.get(k) or 0)
               for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))


def _arguments(tool_input: Any) -> str:
    return msgspec.json.encode(tool_input if tool_input is not None else {}).decode()


def parse_message(data: dict[str, Any]) -> Completion:
    """A non-streamed ``message`` object -> ``Completion`` (malformed input raises KeyError/TypeError)."""
    text: list[str] = []
    calls: list[ToolCall] = []
    for block in data["content"]:
        if block["type"] == "text":
            text.append(block["text"])
        elif block["type"] == "tool_use":
            calls.append(ToolCall(id=block["id"], name=block["name"], arguments=_arguments(block.get("input"))))
    usage = data.get("usage") or {}
    return Completion(text="".join(text), finish_reason=finish_reason(data.get("stop_reason")),
                      usage=Usage(prompt_tokens(usage), int(usage.get("output_tokens") or 0)),
                      tool_calls=tuple(calls))


def stream_error(data: Any, origin: Origin = CLAUDE) -> errors.LlmsrvError:
    """The exception for an ``error`` event of a stream (or an error body in a 200)."""
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        err = {}
    kind, detail = str(err.get("type") or ""), str(err.get("message") or "")
    what = f"stream error {clip(kind, 40, origin.secrets) or 'unknown'}"
    return inband_error(origin, error_class(STREAM_ERRORS, kind), what, detail)


def _object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise TypeError("an event is not an object")
    return payload


class StreamFold:
    """Folds the Messages API stream events into a ``Completion``, one event at a time."""

    def __init__(self, origin: Origin = CLAUDE) -> None:
        self.origin = origin
        self.stopped = False
        self._text: list[str] = []
        self._tools: dict[int, tuple[str, str, list[str]]] = {}  # block index -> id, name, json pieces
        self._calls: dict[int, ToolCall] = {}
        self._stop_reason: str | None = None
        self._input_tokens = 0
        self._output_tokens = 0

    @property
    def done(self) -> bool:
        return self.stopped

    def feed(self, data: str | bytes, event: str = "") -> str:
        if not data:
            return ""
        return self.add(_object(msgspec.json.decode(data)))

    def add(self, data: dict[str, Any]) -> str:
        """Fold one decoded event in; return its text piece."""
        kind = data.get("type")
        if kind == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta":
                return self._say(delta["text"])
            if delta["type"] == "input_json_delta":
                self._tools[data["index"]][2].append(delta["partial_json"])
        elif kind == "content_block_start":
            block = data["content_block"]
            if block["type"] == "tool_use":
                first = block.get("input")
                self._tools[data["index"]] = (block["id"], block["name"], [_arguments(first)] if first else [])
            elif block["type"] == "text":
                return self._say(block.get("text") or "")  # empty in practice; deltas carry the text
        elif kind == "content_block_stop":
            self._close_tool(data["index"])
        elif kind == "message_start":
            usage = data["message"].get("usage") or {}
            self._input_tokens = prompt_tokens(usage)
            self._output_tokens = int(usage.get("output_tokens") or 0)
        elif kind == "message_delta":
            self._stop_reason = (data.get("delta") or {}).get("stop_reason") or self._stop_reason
            usage = data.get("usage") or {}
            if usage.get("output_tokens") is not None:  # cumulative, not an increment
                self._output_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens") is not None:
                self._input_tokens = prompt_tokens(usage)
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            raise stream_error(data, self.origin)
        # ping and event types added later: nothing to do
        return ""

    def _say(self, piece: str) -> str:
        return said(self._text, piece)

    def _close_tool(self, index: int) -> None:
        tool = self._tools.pop(index, None)
        if tool is None:
            return
        raw = "".join(tool[2]) or "{}"
        try:  # normalised, so streamed and plain calls give the same text
            arguments = _arguments(msgspec.json.decode(raw))
        except msgspec.DecodeError:
            name = clip(tool[1], 100, self.origin.secrets)
            raise errors.ProviderError(f"{self.origin.provider}: tool {name!r} input is not JSON") from None
        self._calls[index] = ToolCall(id=tool[0], name=tool[1], arguments=arguments)

    def result(self) -> Completion:
        if not self.stopped:
            raise stream_cut(self.origin, "message_stop")
        for index in list(self._tools):
            self._close_tool(index)
        return Completion(text="".join(self._text), finish_reason=finish_reason(self._stop_reason),
                          usage=Usage(self._input_tokens, self._output_tokens),
                          tool_calls=tuple(self._calls[i] for i in sorted(self._calls)))


# ---- the codec ----------------------------------------------------------------------------------

class AnthropicMessages(StatusDefault):
    def request(self, call: Call, *, stream: bool) -> HttpRequest:
        body = request_body(call)
        if stream:
            body["stream"] = True
        return HttpRequest(method="POST", path="/v1/messages", body=body, stream=stream)

    def folder(self, call: Call, origin: Origin, *, stream: bool) -> Fold[Completion]:
        return StreamFold(origin) if stream else BodyFold(lambda data: parse_message(_object(data)))


CODEC = AnthropicMessages()


def models_listed(data: Any) -> str:
    """The probe's reason, from a ``GET /v1/models`` page."""
    models = [str(model["id"]) for model in data["data"]]
    return f"key accepted; {len(models)} models listed"
