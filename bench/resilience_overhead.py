"""Per-request cost of the pipeline and its resilience layer, in microseconds (in-process, no NATS).

Runs the same zero-latency ``mock:echo`` request N times in several ways, each inside a request
cancel scope as the service does, interleaved over several rounds, and prints the median time per
request of each:

* ``provider``:      ``provider.complete(call)`` alone (the floor)
* ``guard``:         the same through ``call_guarded`` (breaker ticket, bulkhead slot, the attempt's
                     timeout scope); ``guard+limits`` also charges rpm and tpm and corrects the token
                     charge (limits' memory storage)
* ``pipeline-bare``: ``Pipeline.answer`` with ``[routing] resilience = false`` (route, plan, one
                     direct attempt, the response)
* ``pipeline``:      ``Pipeline.answer`` as the service runs it (plan filtering, ``Router.run``, the
                     guarded attempt, metrics); ``pipeline+limits`` with rpm and tpm limits

The pipelines are built exactly as the service builds its own (``Pipeline(cfg, providers)``).

    python bench/resilience_overhead.py [--calls 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from llmsrv.config import MockConfig, build_config
from llmsrv.messages import LLMRequest, Message
from llmsrv.pipeline import Pipeline
from llmsrv.providers import Call, estimate_call_tokens
from llmsrv.providers.mock import MockProvider
from llmsrv.resilience import ProviderGuard, call_guarded

TEXT = "x" * 1000
CALL = Call(model="echo", messages=[Message("user", TEXT)], max_tokens=100, temperature=0.7)
REQUEST = LLMRequest(messages=[Message("user", TEXT)], model="mock:echo", max_tokens=100)
LIMITS = {"rpm": "100000000/minute", "tpm": "100000000000/minute"}


def _pipeline(resilience: bool = True, **mock: object) -> Callable[[], Awaitable[object]]:
    cfg = build_config({"routing": {"resilience": resilience}, "providers": {"mock": mock}})
    pipeline = Pipeline(cfg, {"mock": MockProvider(cfg.providers.mock)})
    return lambda: pipeline.answer(REQUEST, "bench")


def _guarded(cfg: MockConfig) -> Callable[[], Awaitable[object]]:
    guard, mock = ProviderGuard("mock", cfg), MockProvider(cfg)
    return lambda: call_guarded(guard, estimate_call_tokens(CALL), 60, lambda: mock.complete(CALL))


def build() -> dict[str, Callable[[], Awaitable[object]]]:
    mock = MockProvider(MockConfig())
    return {"provider": lambda: mock.complete(CALL),
            "guard": _guarded(MockConfig()), "guard+limits": _guarded(MockConfig(**LIMITS)),  # type: ignore[arg-type]
            "pipeline-bare": _pipeline(resilience=False), "pipeline": _pipeline(),
            "pipeline+limits": _pipeline(**LIMITS)}


async def measure(calls: int, rounds: int) -> dict[str, list[float]]:
    ways = build()
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            start = time.perf_counter()
            for _ in range(calls):
                with trio.move_on_after(30):  # the request's own scope, as in the service
                    await fn()
            results[name].append((time.perf_counter() - start) / calls * 1e6)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    results = trio.run(measure, args.calls, args.rounds)
    med = {name: statistics.median(v) for name, v in results.items()}
    print(f"{'way':<16} {'median us/call':>14}  rounds")
    for name, value in med.items():
        print(f"{name:<16} {value:>14.2f}  {' '.join(f'{v:.1f}' for v in results[name])}")
    print(f"\nresilience layer overhead per request: {med['pipeline'] - med['pipeline-bare']:.1f} us without rate "
          f"limits, {med['pipeline+limits'] - med['pipeline-bare']:.1f} us with rpm+tpm limits "
          f"(guard alone {med['guard'] - med['provider']:.1f} / {med['guard+limits'] - med['provider']:.1f} us); "
          f"the pipeline without it costs {med['pipeline-bare'] - med['provider']:.1f} us over the provider call")


if __name__ == "__main__":
    main()
