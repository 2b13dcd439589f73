"""The Anthropic Messages codec (``POST /v1/messages``, plain and streamed): pure, no I/O.

Theory of operation
-------------------
* **Request translation** (``request_body``). System messages become the top-level
  ``system`` string (several joined by a blank line). User and assistant messages become
  ``messages`` turns; consecutive messages of one role are merged into one turn of several text
  blocks, because the API wants user and assistant turns to alternate.
* **Tool round trips** (CONTRACT section 2), matched by id, never by position: an assistant
  message with ``tool_calls`` becomes its text block (when it has non-blank text) and one
  ``tool_use`` block per call (``id``, ``name``, ``input`` = the decoded ``arguments`` object); a
  ``tool`` message becomes a ``tool_result`` block whose ``tool_use_id`` is its ``tool_call_id``.
  Tool messages and user messages that follow an assistant turn share one user turn, the
  ``tool_result`` blocks first (the API: "tool_result blocks must come FIRST in the content
  array", docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use), so answers
  in any order attach to the call they name. Whether every ``tool_use`` is answered in the very
  next turn is the conversation's business: one that is not gets the API's own 400.
* **Sampling.** ``model`` and ``max_tokens`` go as given (the router has resolved aliases).
  ``temperature`` is clamped to Anthropic's 0..1 (the contract allows up to 2, which the API
  would refuse with a 400 that ends the request instead of falling back), and is *not sent* to the
  models that removed the sampling parameters (``takes_temperature``): Claude Opus 4.7 and later
  Opus models, and every model of the fifth generation and later (Sonnet 5, Opus 5, Fable 5,
  Mythos 5, ...). They answer any non-default ``temperature`` with 400 "`temperature` is
  deprecated for this model." (platform.claude.com/docs/en/about-claude/models/migration-guide,
  sections "Migrating to Claude Opus 4.7" and "Migrating to Claude Sonnet 5"; the live 400 for
  Opus 4.7/4.8, Sonnet 5 and Opus 5 is quoted in github.com/Comfy-Org/ComfyUI/issues/13923,
  github.com/The-PR-Agent/pr-agent/issues/2456, github.com/simstudioai/sim/pull/5328 and
  github.com/earendil-works/pi/pull/7961). Ids without a version (``claude-mythos-preview``) and
  the old ``claude-3-*`` ids keep ``temperature``.
* **The request surface, chosen deliberately** (platform.claude.com/docs/en/api/versioning,
  docs.anthropic.com/en/api/overview): auth is the ``x-api-key`` header, the version header is
  ``anthropic-version: 2023-06-01`` (both set by the claude row of ``registry.py`` from
  ``API_VERSION``), ``content-type: application/json``. The body carries only ``model``,
  ``max_tokens``, ``messages``, ``temperature`` (see above), ``system`` and ``tools`` when there
  are any, and ``stream: true`` when streamed; no ``top_p``/``top_k``/``thinking``/``metadata``.
  ``2023-06-01`` is kept on purpose although ``2026-10-21`` exists (the installed SDK 2.15 sends
  it; the SDK repository's HEAD of Aug 2026, whose fixtures the tests replay, still sends
  ``2023-06-01``): ``2026-10-21`` removes ``temperature``/``top_p``/``top_k`` for every model and
  changes which blocks a turn may hold (platform.claude.com/docs/en/api/migration-2026-10-21),
  so moving to it is its own change (drop ``temperature`` everywhere), not a side effect.
* **Replies.** ``stop_reason`` maps by ``FINISH_REASONS``; ``refusal`` -> ``content_filter`` with
  ``Completion.refusal`` = the reply's text, or, when the refused reply has no text (the SDK's
  recorded ``refusal_response``), ``stop_details.explanation``; ``text`` stays what was said (and
  streamed). ``usage`` counts cache reads and writes as prompt tokens.
* **Streaming** when the caller passes ``on_delta``: ``StreamFold`` folds the SSE events
  (``message_start`` .. ``message_stop``) into the same ``Completion`` the plain call returns,
  returns every ``text_delta`` and joins ``input_json_delta`` pieces of ``tool_use`` blocks into
  tool arguments (those of server tools, ``server_tool_use``, are not ours and are skipped). The
  arguments are read once the stream ended, when ``stop_reason`` is known: a reply cut by
  ``max_tokens`` inside a tool call finishes ``length`` with the call kept and its arguments the
  partial JSON text *as received*. (The SDK's accumulator, ``lib/streaming/_messages.py``, re-parses
  the buffer with jiter's ``from_json(partial_mode=True)`` after every delta and so keeps an object
  with the incomplete member dropped; llmsrv keeps the raw text instead, so a caller never mistakes
  a cut input for a complete one: ``finish_reason`` says it was cut, and nothing is invented or
  lost.) Arguments that are not JSON in a reply that was not cut are a ``ProviderError``. An
  ``error`` event raises the mapped error; a stream that ends before ``message_stop`` is a
  ``ProviderError``. Unknown events and block types (``thinking``, ``signature_delta``,
  citations, ``ping``) are ignored, as Anthropic's versioning policy asks.
* HTTP status errors (529 overloaded included, with its ``retry-after`` hint) are mapped by the
  transport (``http.py``).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ... import errors
from ...messages import Message, Tool, ToolCall, Usage
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

# claude-<family>-<major>[-<minor>][-<date>]: the minor is one or two digits, never a date's first ones
_MODEL_VERSION = re.compile(r"claude-(?P<family>[a-z]+)-(?P<major>\d+)(?:-(?P<minor>\d{1,2})(?!\d))?(?!\d)")
NO_SAMPLING_FROM = (5, 0)  # every model of this generation and later
NO_SAMPLING_FROM_FAMILY = {"opus": (4, 7)}  # and these families from an earlier version

Block = dict[str, Any]


# ---- request translation (pure) -----------------------------------------------------------------

def takes_temperature(model: str) -> bool:
    """Does ``model`` still accept ``temperature``? (Not the models that removed the sampling
    parameters: Opus 4.7 and later, and every model from the fifth generation on.)"""
    m = _MODEL_VERSION.match(model)
    if m is None:
        return True
    version = (int(m["major"]), int(m["minor"] or 0))
    return version < NO_SAMPLING_FROM and version < NO_SAMPLING_FROM_FAMILY.get(m["family"], NO_SAMPLING_FROM)


def _text(text: str) -> Block:
    return {"type": "text", "text": text}


def assistant_blocks(message: Message) -> list[Block]:
    """Its text, then a ``tool_use`` block per tool call (a blank text beside calls is left out:
    the API refuses whitespace-only text blocks)."""
    if not message.tool_calls:
        return [_text(message.content)]
    blocks = [_text(message.content)] if message.content.strip() else []
    for call in message.tool_calls:
        try:
            tool_input = msgspec.json.decode(call.function.arguments)
        except msgspec.DecodeError:
            tool_input = None
        if not isinstance(tool_input, dict):  # decode_request checks this; a Call built in code may not
            raise errors.ValidationFailed(f"tool call {call.id[:64]!r}: arguments are not the JSON text of an object")
        blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name, "input": tool_input})
    return blocks


def tool_block(message: Message) -> Block:
    """The ``tool_result`` answering the call ``message.tool_call_id`` names."""
    if message.tool_call_id is None:  # decode_request checks this; a Call built in code may not
        raise errors.ValidationFailed("a tool message needs the tool_call_id it answers")
    return {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content}


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
    for message in call.messages:
        if message.role == "system":
            system.append(message.content)
        elif message.role == "assistant":
            _add(turns, "assistant", assistant_blocks(message))
        elif message.role == "tool":
            _add(turns, "user", [tool_block(message)])
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
    body: dict[str, Any] = {"model": call.model, "max_tokens": call.max_tokens}
    if takes_temperature(call.model):
        body["temperature"] = min(call.temperature, MAX_TEMPERATURE)
    body["messages"] = turns
    if system:
        body["system"] = "\n\n".join(system)
    if call.tools:
        body["tools"] = [tool_definition(t) for t in call.tools]
    return body


# ---- reply translation (pure) -------------------------------------------------------------------

def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def refusal_text(stop_reason: str | None, text: str, stop_details: Any) -> str | None:
    """With a ``refusal`` stop: the reply's text, else the ``stop_details`` explanation, else None."""
    if stop_reason != "refusal":
        return None
    if text:
        return text
    explanation = stop_details.get("explanation") if isinstance(stop_details, dict) else None
    return explanation if isinstance(explanation, str) and explanation else None


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
    said_text = "".join(text)
    stop = data.get("stop_reason")
    return Completion(text=said_text, finish_reason=finish_reason(stop),
                      usage=Usage(prompt_tokens(usage), int(usage.get("output_tokens") or 0)),
                      tool_calls=tuple(calls), refusal=refusal_text(stop, said_text, data.get("stop_details")))


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
        self._stop_reason: str | None = None
        self._stop_details: Any = None
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
            if delta["type"] == "input_json_delta" and data["index"] in self._tools:  # not a server tool's
                self._tools[data["index"]][2].append(delta["partial_json"])
        elif kind == "content_block_start":
            block = data["content_block"]
            if block["type"] == "tool_use":
                first = block.get("input")
                self._tools[data["index"]] = (block["id"], block["name"], [_arguments(first)] if first else [])
            elif block["type"] == "text":
                return self._say(block.get("text") or "")  # empty in practice; deltas carry the text
        elif kind == "message_start":
            usage = data["message"].get("usage") or {}
            self._input_tokens = prompt_tokens(usage)
            self._output_tokens = int(usage.get("output_tokens") or 0)
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            self._stop_reason = delta.get("stop_reason") or self._stop_reason
            self._stop_details = delta.get("stop_details") or self._stop_details
            usage = data.get("usage") or {}
            if usage.get("output_tokens") is not None:  # cumulative, not an increment
                self._output_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens") is not None:
                self._input_tokens = prompt_tokens(usage)
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            raise stream_error(data, self.origin)
        # content_block_stop, ping and event types added later: nothing to do
        return ""

    def _say(self, piece: str) -> str:
        return said(self._text, piece)

    def _call(self, tool: tuple[str, str, list[str]], cut: bool) -> ToolCall:
        raw = "".join(tool[2]) or "{}"
        try:  # normalised, so streamed and plain calls give the same text
            arguments = _arguments(msgspec.json.decode(raw))
        except msgspec.DecodeError:
            if not cut:
                name = clip(tool[1], 100, self.origin.secrets)
                raise errors.ProviderError(f"{self.origin.provider}: tool {name!r} input is not JSON") from None
            arguments = raw  # cut by max_tokens: the partial input as received
        return ToolCall(id=tool[0], name=tool[1], arguments=arguments)

    def result(self) -> Completion:
        if not self.stopped:
            raise stream_cut(self.origin, "message_stop")
        finish = finish_reason(self._stop_reason)
        text = "".join(self._text)
        return Completion(text=text, finish_reason=finish,
                          usage=Usage(self._input_tokens, self._output_tokens),
                          tool_calls=tuple(self._call(self._tools[i], finish == "length") for i in sorted(self._tools)),
                          refusal=refusal_text(self._stop_reason, text, self._stop_details))


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
