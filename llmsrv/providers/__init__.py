"""The ``Provider`` interface the rest of llmsrv uses, and the call/completion types it speaks.

A provider translates a ``Call`` into its upstream's protocol and back. It has no retry or
timeout policy of its own: the caller owns the deadline through trio cancel scopes, and a
provider call must stop (connection closed, subprocess gone) as soon as it is cancelled.

Read in this order: ``codecs/`` (pure: one codec per wire format, the request it sends and the
fold of what comes back), then the transports (``http.py``: httpx2, status mapping, SSE, body caps,
its keep-alive connections in ``pool.py``; ``process.py``: one CLI process and its process group),
then the drivers that put a codec, a transport and an auth strategy (``auth.py``) together
(``api.py`` for the HTTP APIs, ``cli.py`` for command-line agents, ``jules.py`` for the Jules task
API, ``mock.py``), and ``registry.py``: the static table of rows (one per provider key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from ..messages import Message, Tool, ToolCall, Usage


class Call(msgspec.Struct, frozen=True, kw_only=True):
    model: str  # the provider's own model id, without the "provider:" prefix
    messages: Sequence[Message]
    max_tokens: int
    temperature: float
    tools: Sequence[Tool] = ()


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    usage: Usage
    finish_reason: str = "stop"  # stop | length | tool_calls | content_filter
    tool_calls: Sequence[ToolCall] = ()
    refusal: str | None = None  # with content_filter: the provider's refusal text, when it gave one
    subscription: bool = False  # served on the user's own login (a vendor CLI): no per-token price applies


class ProviderStatus(msgspec.Struct, frozen=True):
    available: bool
    reason: str | None = None
    state: str = "available"  # available | missing | invalid


OnDelta = Callable[[str], None]


class Provider(Protocol):
    name: str

    def status(self) -> ProviderStatus: ...

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        """Run one call. With ``on_delta`` the text is also reported piece by piece as it arrives."""
        ...

    async def probe(self) -> ProviderStatus:
        """One cheap authenticated call that spends no tokens (a model list): do the credentials work?"""
        ...

    async def aclose(self) -> None:
        """Release pooled connections (a no-op for providers that hold none)."""
        ...


def estimate_tokens(text: str) -> int:
    """The usual ~4 characters a token: for rate-limit charges and tokenizer-less providers."""
    return (len(text) + 3) // 4


def estimate_prompt_tokens(call: Call) -> int:
    """The prompt of a call, for upstreams that report no usage."""
    return sum(estimate_tokens(m.content) for m in call.messages)


def estimate_call_tokens(call: Call) -> int:
    """What a call may cost before it is made: its prompt and all of ``max_tokens``."""
    return estimate_prompt_tokens(call) + call.max_tokens
