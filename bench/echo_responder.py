"""Baseline for the benchmark: a bare plain-asyncio nats-py responder.

It listens where llmsrv listens (``llm.request``, queue group ``llmsrv``) and answers each request
with a reply of the same shape and about the same size as llmsrv's ``mock:echo`` success reply.
It is written the idiomatic fast way for asyncio: a subscription callback that decodes the
request and publishes the reply itself. There is no validation, routing, deadline or
cancellation: it is the floor that llmsrv's own overhead is measured against.

    python bench/echo_responder.py --nats-url nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import uuid
from typing import Any

import msgspec
import nats
from nats.aio.msg import Msg

ERROR_HEADERS = {"Nats-Service-Error": "bad request", "Nats-Service-Error-Code": "400"}


def _timestamp() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def build_reply(request: dict[str, Any]) -> dict[str, Any]:
    """The echo reply: llmsrv's success-reply fields, with the last user message as ``text``."""
    msgs: list[dict[str, Any]] = request["messages"]
    text: str = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), msgs[-1]["content"])
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in msgs)
    completion_tokens = len(text.split(" "))
    model = str(request.get("model", "mock:echo"))
    return {
        "text": text,
        "model": model,
        "tokens_used": prompt_tokens + completion_tokens,
        "cost_cents": 0.0,
        "timestamp": _timestamp(),
        "correlation_id": request.get("correlation_id") or uuid.uuid4().hex,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "finish_reason": "stop",
        "tool_calls": [],
        "attempts": [{"provider": "mock", "model": model.partition(":")[2] or model,
                      "outcome": "ok", "ms": 0}],
    }


async def serve(url: str, subject: str, queue: str) -> None:
    nc = await nats.connect(url, name="bench-echo-responder")

    async def on_request(msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            body = msgspec.json.encode(build_reply(msgspec.json.decode(msg.data)))
        except (msgspec.DecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError):
            await nc.publish(msg.reply, b'{"error":"bad request","error_code":"VALIDATION_FAILED"}',
                             headers=ERROR_HEADERS)
            return
        await nc.publish(msg.reply, body)

    sub = await nc.subscribe(subject, queue=queue, cb=on_request)
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"echo_responder: ready on {url} subject {subject} queue {queue}", flush=True)
    await stop.wait()
    await sub.unsubscribe()
    await nc.drain()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--subject", default="llm.request")
    p.add_argument("--queue", default="llmsrv")
    args = p.parse_args()
    asyncio.run(serve(args.nats_url, args.subject, args.queue))


if __name__ == "__main__":
    main()
