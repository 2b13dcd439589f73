"""Per-request cost of the resilience layer, in microseconds (in-process, no NATS).

Runs the same zero-latency ``mock:echo`` call N times in several ways, each inside a request
cancel scope as in the service, interleaved over several rounds, and prints the median time per
call of each:

* ``bare``:   ``provider.complete(call)`` (what ``[routing] resilience = false`` does)
* ``guard``:  the same inside ``ProviderGuard.attempt`` (breaker ticket, bulkhead slot) and the
              per-attempt timeout scope; ``guard+limits`` also charges rpm and tpm and corrects
              the token charge (limits' memory storage)
* ``routed``: plan filtering (breaker and limiter state) + ``Router.run`` + the guarded attempt

    python bench/resilience_overhead.py [--calls 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from llmsrv import routing
from llmsrv.config import MockConfig, RetryConfig
from llmsrv.messages import Message
from llmsrv.providers import Call, Completion, estimate_call_tokens
from llmsrv.providers.mock import MockProvider
from llmsrv.resilience import ProviderGuard, call_guarded
from llmsrv.router import Router

CALL = Call(model="echo", messages=[Message("user", "x" * 1000)], max_tokens=100, temperature=0.7)
TARGET = routing.Target("mock", "echo")


def build() -> dict[str, Callable[[], Awaitable[object]]]:
    cfg = MockConfig()
    limited = MockConfig(rpm="100000000/minute", tpm="100000000000/minute")
    mock = MockProvider(cfg)
    router = Router(RetryConfig())
    route = routing.Route([TARGET], None, ("mock",))

    async def bare() -> Completion:
        return await mock.complete(CALL)

    def guarded(guard: ProviderGuard) -> Callable[[routing.Target], Awaitable[Completion]]:
        async def attempt(target: routing.Target = TARGET) -> Completion:
            return await call_guarded(guard, estimate_call_tokens(CALL), 60, lambda: mock.complete(CALL))
        return attempt

    def routed(guard: ProviderGuard) -> Callable[[], Awaitable[object]]:
        attempt = guarded(guard)

        def plan() -> routing.Plan:
            state = routing.ProviderState(True, guard.breaker.blocked_for(), guard.limiter.blocked_for())
            return routing.filter_plan(route, {"mock": state}, None)

        async def run() -> object:
            return await router.run(plan, attempt, trio.current_time() + 30)
        return run

    return {"bare": bare, "guard": guarded(ProviderGuard("mock", cfg)),
            "guard+limits": guarded(ProviderGuard("mock", limited)),
            "routed": routed(ProviderGuard("mock", cfg)),
            "routed+limits": routed(ProviderGuard("mock", limited))}


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
    print(f"{'way':<14} {'median us/call':>14}  rounds")
    for name, value in med.items():
        print(f"{name:<14} {value:>14.2f}  {' '.join(f'{v:.1f}' for v in results[name])}")
    print(f"\nresilience layer overhead per request: {med['routed'] - med['bare']:.1f} us without rate "
          f"limits, {med['routed+limits'] - med['bare']:.1f} us with rpm+tpm limits "
          f"(guard alone {med['guard'] - med['bare']:.1f} / {med['guard+limits'] - med['bare']:.1f} us)")


if __name__ == "__main__":
    main()
