"""The baseline: exactly the NATS work of a reply, and nothing else.

One nats-py connection (plain asyncio), one subscription callback on ``<prefix>.request`` in queue
group ``llmsrv`` that publishes a reply body computed once at start-up: llmsrv's ``mock:echo``
success reply for the benchmark request (``bench.loadgen.PAYLOAD``), with the same fields and, with
``--reply-bytes N``, padded with trailing JSON whitespace to exactly N bytes (the size llmsrv's own
reply measured in the same run). No decode, no uuid, no clock, no string work per request: what is
left is what any NATS responder in Python pays, the floor llmsrv's overhead is measured against.

``--stack`` runs the same reply on llmsrv's fixed stack instead, to show what the stack itself costs
before any llmsrv code (issue 11's ratios are against the plain asyncio responder):

* ``trio``: under ``trio.run`` through llmsrv's own NATS bridge (``llmsrv.bus.Bus``: nats-py on
  trio-asyncio's loop, the reply queued to its publish pump from the subscription callback);
* ``trio-task``: the same, and each request in a trio task of its own that awaits its answer under a
  cancel scope with a deadline: the structure every llmsrv request has (its guarantees: cancellable,
  bounded in time) and nothing else. The answer does not block, as ``mock:echo``'s does not: one task
  step per request, as llmsrv's own (a trio instrument counts 1.00 per ``mock:echo`` request).
  Tasks are reused by a pool of workers (``llmsrv.workers.WorkerPool``), as llmsrv's are.

    python -m bench.responder --nats-url nats://127.0.0.1:4222 [--prefix llm] [--reply-bytes 1320]
                              [--stack asyncio|trio|trio-task]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import msgspec

from bench.loadgen import CONTENT

STACKS = ("asyncio", "trio", "trio-task")
DEADLINE_S = 60.0  # each request's deadline under --stack trio-task (never reached: it is the scope that counts)


def reply_body(size: int | None = None) -> bytes:
    """llmsrv's echo reply for the benchmark request (fixed id and time), optionally padded to ``size``."""
    words = len(CONTENT.split())
    body = msgspec.json.encode({
        "text": CONTENT, "model": "mock:echo", "tokens_used": 2 * words, "cost_cents": 0.0,
        "timestamp": "2026-01-01T00:00:00.000Z", "correlation_id": "0" * 32,
        "usage": {"prompt_tokens": words, "completion_tokens": words}, "finish_reason": "stop",
        "tool_calls": [], "attempts": [{"provider": "mock", "model": "echo", "outcome": "ok", "ms": 0}],
    })
    if size is not None:
        if size < len(body):
            raise ValueError(f"reply of {len(body)} bytes cannot be made {size} bytes")
        body += b" " * (size - len(body))
    return body


async def serve(url: str, prefix: str, queue: str, body: bytes) -> None:
    import nats

    nc = await nats.connect(url, name="bench-responder")
    publish = nc.publish

    async def on_request(msg: Any) -> None:
        await publish(msg.reply, body)

    sub = await nc.subscribe(f"{prefix}.request", queue=queue, cb=on_request,
                             pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"bench.responder: ready on {url} subject {prefix}.request queue {queue} reply {len(body)} bytes",
          flush=True)
    await stop.wait()
    await sub.unsubscribe()
    await nc.drain()


async def serve_trio(url: str, prefix: str, queue: str, body: bytes, tasks: bool) -> None:
    import trio

    from llmsrv.bus import Bus
    from llmsrv.config import NatsConfig, ServerConfig
    from llmsrv.workers import WorkerPool

    cfg = NatsConfig(name="bench-responder-trio", pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
    async with Bus.connect(cfg, url) as bus, trio.open_nursery() as nursery:
        publish = bus.publish_nowait

        async def answer(msg: Any) -> None:  # answered without blocking, as llmsrv's mock:echo is
            publish(msg.reply, body)

        async def reply(msg: Any) -> None:
            with trio.move_on_after(DEADLINE_S):
                await answer(msg)

        if tasks:
            server = ServerConfig()
            pool: WorkerPool[Any] = WorkerPool(reply, max_workers=server.max_inflight, idle_s=server.worker_idle_s,
                                               min_idle=server.min_idle_workers)
            await nursery.start(pool.run)
            handler = pool.submit
        else:
            def handler(msg: Any) -> None:
                publish(msg.reply, body)

        await bus.subscribe(f"{prefix}.request", handler, queue=queue)
        await bus.flush()
        print(f"bench.responder: ready on {url} subject {prefix}.request queue {queue} reply {len(body)} bytes "
              f"(trio{', a task per request' if tasks else ''})", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--prefix", default="llm", help="subject prefix: listens on PREFIX.request")
    p.add_argument("--queue", default="llmsrv")
    p.add_argument("--reply-bytes", type=int, default=None, help="pad the reply to exactly this size")
    p.add_argument("--stack", choices=STACKS, default="asyncio", help="see above")
    args = p.parse_args()
    body = reply_body(args.reply_bytes)
    if args.stack == "asyncio":
        asyncio.run(serve(args.nats_url, args.prefix, args.queue, body))
    else:
        import trio

        trio.run(serve_trio, args.nats_url, args.prefix, args.queue, body, args.stack == "trio-task")


if __name__ == "__main__":
    main()
