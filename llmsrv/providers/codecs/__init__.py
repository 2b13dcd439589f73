"""The vocabulary every wire codec speaks: a request description, one folder protocol, shared helpers.

Codecs are pure (h11-style): they never do I/O and import no trio, httpx or nats. A codec turns a
``Call`` into an ``HttpRequest`` (or, for a CLI agent, an argv) and hands out a folder per call:
the transport feeds it every received event -- a whole JSON body is one event, each SSE ``data``
field one, each stdout line of a CLI one -- and ``feed`` returns the text delta it carried ("" for
none). ``done`` says the terminal event came (the transport stops reading); ``result()`` is the
``Completion`` (or raises: a stream cut short, an in-band refusal). A malformed event may raise
``KeyError``/``TypeError``/``IndexError``/``msgspec.DecodeError``: the transport maps those, once,
to ``ProviderError("... malformed response ...")``.

::

    request = codec.request(call, stream=True)
    fold = codec.folder(call, origin, stream=True)
    for event in received:          # the transport's loop
        delta = fold.feed(event)
        if fold.done: break
    completion = fold.result()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import msgspec

from ... import errors
from ...messages import Message, Tool
from ...redact import clip
from .. import Call, Completion

DETAIL_CHARS = 300  # of an upstream error text, in our error messages
CAP_KEY = "server.max_upstream_bytes"

Json = dict[str, Any]


class HttpRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What to send: ``path`` is relative to the provider's base URL (or absolute)."""

    method: str
    path: str
    body: Any = None  # encoded as JSON when not None
    params: Mapping[str, str] | None = None
    stream: bool = False  # the reply is a server-sent event stream


class Origin(NamedTuple):
    """Who is speaking, for error messages: the provider's name and the secrets to redact."""

    provider: str
    secrets: Sequence[str | None] = ()


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Fold(Protocol[T_co]):
    """Received events in, text deltas out, then one result (a ``Completion``, for a codec's folds)."""

    @property
    def done(self) -> bool:
        """The terminal event came: nothing after it needs reading."""
        ...

    def feed(self, data: str | bytes, event: str = "") -> str:
        """Fold one event in (``event`` is the SSE event name, if any); return its text piece."""
        ...

    def result(self) -> T_co: ...


# (status, the error's human text, the decoded error object or None) -> the class to raise, or None
StatusHook = Callable[[int, str, Any], "type[errors.LlmsrvError] | None"]


class Codec(Protocol):
    def request(self, call: Call, *, stream: bool) -> HttpRequest: ...

    def folder(self, call: Call, origin: Origin, *, stream: bool) -> Fold[Completion]: ...

    def status_error(self, status: int, detail: str, error: Any) -> type[errors.LlmsrvError] | None:
        """A format's own reading of an HTTP error (status + the body's human part), else None."""
        ...


class StatusDefault:
    """Mixin: no particular status mapping (the transport's table decides)."""

    def status_error(self, status: int, detail: str, error: Any) -> type[errors.LlmsrvError] | None:
        return None


class BodyFold(Generic[T]):
    """A plain (not streamed) reply: the one JSON body, decoded, through ``parse``."""

    def __init__(self, parse: Callable[[Any], T]) -> None:
        self._parse = parse
        self._value: list[T] = []

    @property
    def done(self) -> bool:
        return bool(self._value)

    def feed(self, data: str | bytes, event: str = "") -> str:
        self._value.append(self._parse(msgspec.json.decode(data)))
        return ""

    def result(self) -> T:
        if not self._value:
            raise errors.ProviderError("no reply body")
        return self._value[0]


# ---- shared helpers -----------------------------------------------------------------------------

_LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


def error_object(data: Any) -> Any:
    """The error object of a decoded error body: ``{"error": {...}}`` (also inside Gemini's list), else None."""
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # Gemini wraps errors in a list on some endpoints
    if isinstance(data, dict):
        err = data.get("error")
        return err if isinstance(err, dict) else None
    return None


def retry_info_ms(error: Any) -> int | None:
    """Google's retry hint inside an error object: ``details[] RetryInfo.retryDelay = "36s"``."""
    try:
        for item in error["details"]:
            if str(item.get("@type", "")).endswith("RetryInfo"):
                return max(1, math.ceil(float(str(item["retryDelay"]).rstrip("s")) * 1000))
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    return None


def said(text: list[str], piece: str) -> str:
    """Keep ``piece`` (when there is one) as part of the answer ``text``; return it as the delta."""
    if piece:
        text.append(piece)
    return piece


def conversation_text(messages: Sequence[Message]) -> str:
    """One text for an agent that takes one prompt: the system messages first, then a lone user
    message as is, or every message as ``Role: content``; blank lines between the parts.

    A tool round trip is written out so the agent can pair each result with its call, in whatever
    order the results come: an assistant turn lists its calls below its text, one line each,
    ``Tool call <id>: <name> <arguments JSON>``; a tool turn is ``Tool result for <id> (<name>):
    <content>``, the name looked up from the call it answers (``Tool result for <id>:`` when no
    call has that id, plain ``Tool: <content>`` without an id)."""
    system = [m.content for m in messages if m.role == "system"]
    conversation = [m for m in messages if m.role != "system"]
    if len(conversation) == 1 and conversation[0].role == "user":
        return "\n\n".join([*system, conversation[0].content])
    names = {c.id: c.function.name for m in conversation for c in m.tool_calls or ()}

    def turn(m: Message) -> str:
        if m.role == "tool" and m.tool_call_id is not None:
            name = names.get(m.tool_call_id)
            about = f"{m.tool_call_id} ({name})" if name is not None else m.tool_call_id
            return f"Tool result for {about}: {m.content}"
        head = f"{_LABELS[m.role]}: {m.content}" if m.content else f"{_LABELS[m.role]}:"
        calls = [f"Tool call {c.id}: {c.function.name} {c.function.arguments}" for c in m.tool_calls or ()]
        return "\n".join([head, *calls])

    return "\n\n".join(system + [turn(m) for m in conversation])


def tool_definition(tool: Tool, *, schema_key: str = "parameters",
                    schema: Callable[[Json | None], Json | None] = lambda p: p) -> Json:
    """``{name, description?, <schema_key>?}`` of a function tool; ``schema`` shapes the parameters."""
    fn = tool.function
    out: Json = {"name": fn.name}
    if fn.description:
        out["description"] = fn.description
    if (parameters := schema(fn.parameters)) is not None:
        out[schema_key] = parameters
    return out


def inband_error(origin: Origin, cls: type[errors.LlmsrvError], what: str, detail: str) -> errors.LlmsrvError:
    """An error reported inside a 2xx reply (an error event or chunk): ``<provider> <what>: <detail>``,
    the detail redacted, then cut."""
    return cls(f"{origin.provider} {what}: {clip(detail, DETAIL_CHARS, origin.secrets)}")


def error_class(table: Mapping[str, type[errors.LlmsrvError]], *keys: str) -> type[errors.LlmsrvError]:
    """The class the first of ``keys`` found in ``table`` names; ``ProviderError`` otherwise."""
    for key in keys:
        if key in table:
            return table[key]
    return errors.ProviderError


def stream_cut(origin: Origin, marker: str) -> errors.ProviderError:
    return errors.ProviderError(f"{origin.provider}: stream cut (the event stream ended without {marker})")


def too_large(provider: str, limit: int) -> errors.UpstreamTooLarge:
    return errors.UpstreamTooLarge(f"{provider}: the upstream body is larger than {limit} bytes "
                                   f"({CAP_KEY}); not read further")
