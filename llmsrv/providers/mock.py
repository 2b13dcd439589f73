"""The mock provider: ``mock:echo`` and ``mock:lorem``, always available, no credentials.

Latency, token rate and error rate come from ``[providers.mock]``. Every wait is a trio
checkpoint, so a call is cancellable at any point; ``statistics()`` records what happened,
including when the mock last saw itself cancelled (tests use it to time cancellation).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgspec
import trio

from ..config import MockConfig
from ..errors import ProviderError, ProviderNotFound
from ..messages import Usage
from . import Call, Completion, OnDelta, ProviderStatus, estimate_prompt_tokens, estimate_tokens

_LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
          "incididunt ut labore et dolore magna aliqua").split()


AVAILABLE = ProviderStatus(available=True)


class MockStatistics(msgspec.Struct, frozen=True):
    calls: int
    completed: int
    failed: int
    cancelled: int
    last_cancelled_at: float | None  # trio.current_time() when the last cancellation was seen


@dataclass
class _Counters:
    calls: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    last_cancelled_at: float | None = None


def reply_text(call: Call) -> str:
    if call.model == "echo":
        for message in reversed(call.messages):
            if message.role == "user":
                return message.content
        return call.messages[-1].content
    n = len(_LOREM)
    return " ".join(_LOREM * (call.max_tokens // n) + _LOREM[: call.max_tokens % n])


def split_tokens(text: str) -> list[str]:
    """Streaming units: words, each after the first with its leading space."""
    words = text.split(" ")
    return words[:1] + [" " + w for w in words[1:]]


class MockProvider:
    name = "mock"
    models = ("echo", "lorem", "fail")

    def __init__(self, cfg: MockConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self._rng = rng or random.Random()
        self._n = _Counters()

    def status(self) -> ProviderStatus:
        return AVAILABLE

    async def probe(self) -> ProviderStatus:
        return self.status()

    async def aclose(self) -> None:
        pass

    def statistics(self) -> MockStatistics:
        n = self._n
        return MockStatistics(n.calls, n.completed, n.failed, n.cancelled, n.last_cancelled_at)

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        if call.model not in self.models:
            raise ProviderNotFound(f"unknown mock model {call.model!r}; known: {', '.join(self.models)}")
        self._n.calls += 1
        try:
            completion = await self._run(call, on_delta)
        except trio.Cancelled:
            self._n.cancelled += 1
            self._n.last_cancelled_at = trio.current_time()
            raise
        except ProviderError:
            self._n.failed += 1
            raise
        self._n.completed += 1
        return completion

    async def _run(self, call: Call, on_delta: OnDelta | None) -> Completion:
        cfg = self.cfg
        if cfg.latency_ms:
            await trio.sleep(cfg.latency_ms / 1000)
        if call.model == "fail":
            raise ProviderError("mock:fail always fails like an upstream 5xx")
        if cfg.error_rate and self._rng.random() < cfg.error_rate:
            raise ProviderError("mock: injected upstream failure (providers.mock.error_rate)")
        text = reply_text(call)
        if cfg.tokens_per_second > 0:
            interval = 1.0 / cfg.tokens_per_second
            start = trio.current_time()
            for i, word in enumerate(split_tokens(text)):
                # Sleep to an absolute schedule so the rate holds however slow the consumer is.
                await trio.sleep_until(start + (i + 1) * interval)
                if on_delta is not None:
                    on_delta(word)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()  # nothing to wait for: no reschedule
            if on_delta is not None:
                on_delta(text)
        lorem = call.model == "lorem"
        usage = Usage(prompt_tokens=estimate_prompt_tokens(call),
                      completion_tokens=call.max_tokens if lorem else estimate_tokens(text))
        return Completion(text=text, usage=usage, finish_reason="length" if lorem else "stop")
