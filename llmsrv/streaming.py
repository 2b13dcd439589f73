"""Streamed replies: text deltas coalesced into chunk messages (``StreamChunk`` unless the edge encodes its
own), each small enough for NATS."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .messages import StreamChunk, encode

T = TypeVar("T")


class Streamer:
    """Coalesces deltas into chunks: the first at once, then at most one per ``interval``."""

    def __init__(self, publish: Callable[[bytes], None], correlation_id: str, interval: float,
                 max_chunk_chars: int = 1 << 30, encode_chunk: Callable[[int, str], bytes] | None = None) -> None:
        self._publish, self._cid, self._interval = publish, correlation_id, interval
        self._encode = encode_chunk or self._stream_chunk
        self._max_chars = max_chunk_chars  # a chunk must fit in one NATS message
        self._buf: list[str] = []
        self._last = -math.inf
        self._wakeup = trio.Event()
        self.seq = 0

    def on_delta(self, text: str) -> None:
        if not text:
            return
        self._buf.append(text)
        if trio.current_time() - self._last >= self._interval:
            self.flush()
        else:
            self._wakeup.set()

    def flush(self) -> None:
        if not self._buf:
            return
        text = "".join(self._buf)
        self._buf.clear()
        for at in range(0, len(text), self._max_chars):
            self._publish(self._encode(self.seq, text[at:at + self._max_chars]))
            self.seq += 1
        self._last = trio.current_time()

    def _stream_chunk(self, seq: int, text: str) -> bytes:
        return encode(StreamChunk(correlation_id=self._cid, seq=seq, delta=text))

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep_until(self._last + self._interval)
            self.flush()

    async def around(self, answer: Callable[[], Awaitable[T]]) -> T:
        """Run ``answer()`` with the coalescing timer beside it; what is buffered goes out before it returns
        or raises (its own exception, never wrapped in a group)."""
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run)
            try:
                result = await answer()
            except Exception as exc:  # raised out of the nursery it would come wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        self.flush()
        if failure is not None:
            raise failure
        return result
