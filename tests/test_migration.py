"""What a user of the predecessor (the TypeScript llm-server) keeps: its NATS_URL variable, its provider
hints and bare model names (table-tested in test_routing.py), over a real nats-server and a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from typing import Any

import msgspec
import openai
import pytest
import trio

from llmsrv.bus import Incoming
from llmsrv.client import Client, NoResponders, ReplyError
from llmsrv.natsserver import free_port

from .conftest import running, user


def _serve_without_url(**env: str) -> subprocess.Popen[bytes]:
    """``llmsrv serve`` with no NATS URL of llmsrv's own anywhere (no flag, no LLMSRV* variable)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMSRV")}
    return subprocess.Popen([sys.executable, "-m", "llmsrv", "serve"], env={**clean, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_serve_uses_the_predecessors_nats_url_instead_of_embedding(nats_url: str) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    proc = _serve_without_url(NATS_URL=nats_url, LLMSRV__NATS__SUBJECT_PREFIX=prefix, LLMSRV__SERVER__HTTP_PORT="0")
    try:
        async with Client.connect(nats_url, prefix) as client:
            with trio.fail_after(30):  # it serves on the server NATS_URL names
                while True:
                    try:
                        reply = await client.complete({"messages": user("via NATS_URL"), "model": "mock:echo"},
                                                      timeout_s=1)
                        break
                    except (trio.TooSlowError, ReplyError, NoResponders):
                        await trio.sleep(0.1)
            assert reply.text == "via NATS_URL"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await trio.to_thread.run_sync(proc.communicate, None, 30)
    assert proc.returncode == 0
    assert b"embedded" not in out, out.decode(errors="replace")[-2000:]


# ---- the predecessor's worker subjects (CONTRACT section 10) and heartbeat (section 6) ------------------

def worker_body(corr: str, run: str = "run-1", node: str = "n1", **kw: Any) -> bytes:
    doc: dict[str, Any] = {"run_id": run, "node_id": node, "corr_id": corr,
                           "input": {"type": "chat", "messages": user(kw.pop("text", "hi worker"))}, "params": {}}
    doc.update(kw)
    return msgspec.json.encode(doc)


class Inbox:
    """Every message on ``subject`` (a wildcard is fine), in arrival order."""

    def __init__(self) -> None:
        self.got: list[Incoming] = []

    def __call__(self, msg: Incoming) -> None:
        self.got.append(msg)

    async def wait(self, n: int, timeout_s: float = 10.0) -> list[Any]:
        with trio.fail_after(timeout_s):
            while len(self.got) < n:
                await trio.sleep(0.01)
        return [msgspec.json.decode(m.data) for m in self.got]


async def listen(h: Any, subject: str) -> Inbox:
    inbox = Inbox()
    await h.client.bus.subscribe(subject, inbox)
    await h.client.bus.flush()
    return inbox


async def test_a_worker_request_with_a_reply_subject_gets_the_predecessors_reply(nats_url: str) -> None:
    async with running(nats_url) as h:
        msg = await h.client.request_raw(f"{h.prefix}.req.auto", worker_body("c1", model_id="mock:echo"), None, 10)
    reply = msgspec.json.decode(msg.data)
    usage = reply.pop("usage")
    assert reply == {"corr_id": "c1", "output": "hi worker", "finish_reason": "stop"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_without_a_reply_subject_the_reply_goes_to_llm_resp_run_node(nats_url: str) -> None:
    async with running(nats_url) as h:
        replies = await listen(h, f"{h.prefix}.resp.>")
        h.client.bus.publish_nowait(f"{h.prefix}.req.echo", worker_body("c2", run="r9", node="x3", text="to resp"))
        (reply,) = await replies.wait(1)
    assert replies.got[0].subject == f"{h.prefix}.resp.r9.x3"
    assert reply["corr_id"] == "c2" and reply["output"] == "to resp"


async def test_streamed_worker_tokens_then_the_reply(nats_url: str) -> None:
    async with running(nats_url, providers={"mock": {"tokens_per_second": 200}}) as h:
        tokens = await listen(h, f"{h.prefix}.tokens.r1.n1")
        msg = await h.client.request_raw(f"{h.prefix}.req.lorem",
                                         worker_body("c3", run="r1", node="n1", params={"stream": True,
                                                                                          "max_tokens": 12}), None, 10)
        reply = msgspec.json.decode(msg.data)
        chunks = await tokens.wait(2)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))  # from 0, no gaps
    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True] and chunks[-1]["chunk"] == ""
    assert {c["corr_id"] for c in chunks} == {"c3"}
    assert "".join(c["chunk"] for c in chunks) == reply["output"] and len(reply["output"].split()) == 12


@pytest.mark.parametrize(("subject", "body", "code", "field"), [
    ("req.no-such-model", worker_body("c4"), "PROVIDER_NOT_FOUND", "no-such-model"),
    ("req.auto", worker_body("c5", params={"temperature": 9}), "VALIDATION_ERROR", "$.params.temperature"),
    ("req.auto", b"{broken", "INVALID_JSON", ""),
], ids=["unknown-model", "bad-param", "bad-json"])
async def test_worker_errors_are_strings_with_the_code_beside(nats_url: str, subject: str, body: bytes, code: str,
                                                             field: str) -> None:
    async with running(nats_url) as h:
        msg = await h.client.request_raw(f"{h.prefix}.{subject}", body, None, 10)
    reply = msgspec.json.decode(msg.data)
    assert reply["error_code"] == code and isinstance(reply["error"], str) and field in reply["error"]
    assert reply["finish_reason"] == "error" and reply["output"] == ""
    assert (msg.headers or {}).get("Nats-Service-Error-Code") in {"400", "404"}


async def test_a_worker_request_is_cancelled_by_its_corr_id(nats_url: str) -> None:
    async with running(nats_url, providers={"mock": {"latency_ms": 30000}}) as h:
        replies = await listen(h, f"{h.prefix}.resp.>")
        h.client.bus.publish_nowait(f"{h.prefix}.req.echo", worker_body("cancel-me"))
        with trio.fail_after(10):
            while h.service.statistics().counters.inflight < 1:
                await trio.sleep(0.01)
        h.client.bus.publish_nowait(f"{h.prefix}.cancel", msgspec.json.encode({"correlation_id": "cancel-me"}))
        (reply,) = await replies.wait(1)
    assert reply["error_code"] == "CANCELLED" and reply["corr_id"] == "cancel-me"


async def test_the_heartbeat_reaches_llm_health_and_health_requests_are_still_answered(nats_url: str) -> None:
    async with running(nats_url, server={"heartbeat_s": 0.1}) as h:
        beats = await listen(h, f"{h.prefix}.health")
        got = await beats.wait(2)
        health = await h.client.request_json("health")
    beat = got[0]
    assert set(beat) == {"worker_id", "timestamp", "status", "models", "instance_id", "version", "inflight"}
    assert beat["status"] == "healthy" and beat["instance_id"] == h.service.instance_id and "sonnet" in beat["models"]
    assert health["status"] == "ok" and "providers" in health  # the heartbeat did not stand in for the answer


async def test_the_openai_api_is_served_by_the_service(nats_url: str) -> None:
    port = free_port()
    async with running(nats_url, server={"http_port": port}) as h:
        assert h.service.http_port == port
        # closed here: an unclosed one's finalizer (openai's) creates an asyncio task wherever the garbage collector
        # runs it, in a later test (bus._defer_finalizer_calls)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused-on-loopback") as api:
            done = await api.chat.completions.create(model="mock:echo",
                                                     messages=[{"role": "user", "content": "via http"}])
        stats = h.service.statistics().counters
        info = msgspec.json.decode((await h.client.request_raw(f"$SRV.INFO.llmsrv.{h.service.instance_id}",
                                                               b"")).data)
    assert info["metadata"] == {"openai_api": f"http://127.0.0.1:{port}/v1"}  # discoverable beside the subjects
    assert done.choices[0].message.content == "via http" and done.usage is not None
    assert stats.requests >= 1 and stats.inflight == 0


def test_serve_refuses_a_public_http_bind_without_api_keys() -> None:
    proc = _serve_without_url(LLMSRV__SERVER__HTTP_HOST="0.0.0.0", LLMSRV__SERVER__HTTP_PORT=str(free_port()))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert b"LLMSRV_HTTP_API_KEYS" in out and b"embedded" not in out  # refused before anything started
