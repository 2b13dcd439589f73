"""A small trio client for llmsrv, used by ``llmsrv ask`` and the tests.

Cancellation is predictable end to end: when the caller's cancel scope cancels ``complete()`` or
``stream()`` (a timeout, Ctrl-C, a sibling failing), the client publishes ``llm.cancel`` for the
request before re-raising, so the server stops the provider call too.

Replies arrive on one wildcard inbox subscription per client and are dispatched to the waiting
call by token, so a call costs no subscription of its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import msgspec
import trio

from . import errors, messages
from .bus import Bus, Incoming
from .config import NatsConfig
from .errors import NoResponders, ReplyError
from .messages import LLMResponse, StreamChunk

_response_decoder = msgspec.json.Decoder(LLMResponse)
_chunk_decoder = msgspec.json.Decoder(StreamChunk)
LOCAL_GRACE_S = 5.0  # how long past the request deadline we wait for the server's own TIMEOUT


class Client:
    def __init__(self, bus: Bus, subject_prefix: str = "llm") -> None:
        self.bus = bus
        self.prefix = subject_prefix
        self._inbox = ""
        self._tokens = itertools.count()
        self._waiters: dict[str, trio.MemorySendChannel[Incoming]] = {}

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, subject_prefix: str = "llm",
                      nats: NatsConfig | None = None) -> AsyncIterator[Client]:
        async with Bus.connect(nats or NatsConfig(name="llmsrv-client"), url) as bus:
            client = cls(bus, subject_prefix)
            client._inbox = bus.new_inbox()
            await bus.subscribe(client._inbox + ".*", client._dispatch)
            await bus.flush()
            yield client

    def _dispatch(self, msg: Incoming) -> None:
        waiter = self._waiters.get(msg.subject.rpartition(".")[2])
        if waiter is not None:
            waiter.send_nowait(msg)

    async def complete(self, request: Mapping[str, Any], *, timeout_s: float | None = None) -> LLMResponse:
        """Send one request and return its reply; an error reply raises ``ReplyError``."""
        return await self._exchange(request, timeout_s, None)

    async def stream(self, request: Mapping[str, Any], on_chunk: Callable[[StreamChunk], None],
                     *, timeout_s: float | None = None) -> LLMResponse:
        """Like ``complete`` with ``stream: true``; ``on_chunk`` sees every chunk in order."""
        return await self._exchange({**request, "stream": True}, timeout_s, on_chunk)

    async def _exchange(self, request: Mapping[str, Any], timeout_s: float | None,
                        on_chunk: Callable[[StreamChunk], None] | None) -> LLMResponse:
        body = dict(request)
        cid = body.setdefault("correlation_id", messages.new_correlation_id())
        if timeout_s is not None:
            body.setdefault("timeout_ms", max(1, round(timeout_s * 1000)))
        wait_s = body.get("timeout_ms", 30000) / 1000 + LOCAL_GRACE_S
        subject = f"{self.prefix}.request"
        with self._one_reply() as (reply_to, replies):
            try:
                self.bus.publish_nowait(subject, messages.encode(body), reply=reply_to)
                with trio.fail_after(wait_s):
                    while True:
                        msg = _check_responders(await replies.receive(), subject)
                        headers = msg.headers or {}
                        if headers.get("Llm-Stream") == "chunk":
                            if on_chunk is not None:
                                on_chunk(_chunk_decoder.decode(msg.data))
                            continue
                        if "Nats-Service-Error-Code" in headers:
                            raise ReplyError(dict(messages.decode_reply(msg.data)))
                        return _response_decoder.decode(msg.data)
            except trio.TooSlowError:
                self._cancel(cid)
                raise errors.Timeout(f"no reply from llmsrv within {wait_s:.1f}s") from None
            except trio.Cancelled:
                self._cancel(cid)
                raise

    def _cancel(self, cid: str) -> None:
        self.bus.publish_nowait(f"{self.prefix}.cancel", messages.encode({"correlation_id": cid}))

    async def request_raw(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                          timeout_s: float = 5.0) -> Incoming:
        """One raw request/reply on the full ``subject``: the reply message as it arrived."""
        with self._one_reply() as (reply_to, replies):
            self.bus.publish_nowait(subject, data, headers, reply=reply_to)
            with trio.fail_after(timeout_s):
                return _check_responders(await replies.receive(), subject)

    @contextmanager
    def _one_reply(self) -> Iterator[tuple[str, trio.MemoryReceiveChannel[Incoming]]]:
        token = str(next(self._tokens))
        send, recv = trio.open_memory_channel[Incoming](math.inf)
        self._waiters[token] = send
        try:
            yield f"{self._inbox}.{token}", recv
        finally:
            del self._waiters[token]

    async def gather(self, subject: str, body: Mapping[str, Any], wait_s: float = 5.0, *,
                     count: int | None = None, quiet_s: float = 0.3) -> list[dict[str, Any]]:
        """Publish to ``<prefix>.<subject>`` and collect every instance's reply.

        Returns once ``count`` replies arrived; without ``count``, once ``quiet_s`` passed with no
        new reply after the first (instances answer together); in any case after ``wait_s``.
        """
        replies: list[dict[str, Any]] = []
        with self._one_reply() as (reply_to, inbox):
            self.bus.publish_nowait(f"{self.prefix}.{subject}", messages.encode(body), reply=reply_to)
            with trio.move_on_after(wait_s):
                while count is None or len(replies) < count:
                    with trio.move_on_after(quiet_s if replies and count is None else math.inf) as quiet:
                        msg = await inbox.receive()
                    if quiet.cancelled_caught:
                        break
                    if (msg.headers or {}).get("Status") != "503":
                        replies.append(messages.decode_reply(msg.data))
        return replies

    async def request_json(self, subject: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """A plain request/reply on ``<prefix>.<subject>`` (health, admin)."""
        msg = await self.request_raw(f"{self.prefix}.{subject}", b"{}", timeout_s=timeout_s)
        return messages.decode_reply(msg.data)


def _check_responders(msg: Incoming, subject: str) -> Incoming:
    # nats-server answers a request nobody listens to with a bare "503" status message.
    if (msg.headers or {}).get("Status") == "503":
        raise NoResponders(f"no llmsrv instance listens on {subject}")
    return msg
