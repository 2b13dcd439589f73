"""Upstream bodies are capped at ``[server] max_upstream_bytes`` (16 MiB): a fake upstream streams
200 MB (generated on the fly) as an error body, a JSON reply and an event stream to a real
``llmsrv serve`` subprocess, whose peak RSS must stay bounded and which must not read the body
again on retry; and a CLI provider whose stdout floods."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from llmsrv import errors
from llmsrv.client import Client, NoResponders, ReplyError
from llmsrv.config import ProviderConfig, ServerConfig
from llmsrv.messages import Message, StreamChunk
from llmsrv.providers import Call
from llmsrv.providers.cli import CliProvider

from .fakes import FakeUpstream, Json, Request

TOTAL = 200 * 10**6  # what the fake offers
CAP = 16 * 2**20  # the default server.max_upstream_bytes
RSS_MARGIN = 150 * 2**20  # allowed growth of the peak RSS over the idle RSS
PIECE = 65536


@dataclass
class Big:
    """A body of about ``TOTAL`` bytes, sent in pieces as it is generated: ``head``, filler, ``tail``."""

    status: int
    content_type: str
    head: bytes
    filler: bytes  # repeated
    tail: bytes
    length: bool = False  # send a content-length (else chunked)


def big_reply(kind: str) -> Big:
    x = b"x" * PIECE
    if kind == "error-500":
        return Big(500, "application/json", b'{"error": {"message": "', x, b'"}}')
    if kind == "error-500-length":
        return Big(500, "application/json", b'{"error": {"message": "', x, b'"}}', length=True)
    if kind == "json-200":
        return Big(200, "application/json", b'{"choices": [{"message": {"content": "', x,
                   b'"}, "finish_reason": "stop"}]}')
    event = b'data: {"choices": [{"delta": {"content": "' + b"y" * (PIECE - 60) + b'"}}]}\n\n'
    return Big(200, "text/event-stream", b"", event, b"data: [DONE]\n\n")


class BigUpstream(FakeUpstream):
    """``FakeUpstream`` plus ``Big`` replies; ``sent[path]`` counts the body bytes that went out."""

    def __init__(self) -> None:
        super().__init__(self.route)
        self.sent: dict[str, int] = {}

    def route(self, request: Request) -> Any:
        model = request.json()["model"]
        if model == "small":
            return Json({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})
        return big_reply(model)

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, reply: Any) -> bool:
        if not isinstance(reply, Big):
            return await super()._send(stream, conn, reply)
        n = (TOTAL - len(reply.head) - len(reply.tail)) // len(reply.filler)
        size = len(reply.head) + n * len(reply.filler) + len(reply.tail)
        framing = [("content-length", str(size))] if reply.length else [("transfer-encoding", "chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=reply.status,
                                                     headers=[("content-type", reply.content_type), *framing])))
        key = f"{len(self.requests)}"
        self.sent[key] = 0
        for i in range(n + 2):
            data = reply.head if i == 0 else reply.tail if i == n + 1 else reply.filler
            await stream.send_all(conn.send(h11.Data(data=data)))
            self.sent[key] += len(data)
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return False


def _rss(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:  # "5": reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")


def _serve(tmp_path: Path, nats_url: str, prefix: str, base_url: str) -> subprocess.Popen[bytes]:
    config = tmp_path / "llmsrv.toml"
    config.write_text(f"""
[nats]
subject_prefix = "{prefix}"
[server]
http_port = 0
[providers.openai_compat]
base_url = "{base_url}/v1"
[routing.retry]
max_attempts = 3
backoff_base_ms = 10
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSRV")}
    with open(tmp_path / "stderr.log", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "llmsrv", "serve", "--config", str(config),
                                 "--nats-url", nats_url], env=env, stdout=subprocess.DEVNULL, stderr=err)


async def _ready(client: Client, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(40):
        while True:
            assert proc.poll() is None, "llmsrv serve exited early"
            try:
                await client.request_json("health", timeout_s=1)
                return
            except (NoResponders, trio.TooSlowError):
                await trio.sleep(0.1)


def user() -> list[dict[str, str]]:
    return [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kind", ["error-500", "error-500-length", "json-200", "sse-200"])
async def test_a_200_mb_upstream_body_is_cut_at_the_cap(nats_url: str, tmp_path: Path, kind: str) -> None:
    prefix = f"u{uuid.uuid4().hex[:10]}"
    async with BigUpstream() as up:
        proc = _serve(tmp_path, nats_url, prefix, up.url)
        try:
            async with Client.connect(nats_url, prefix) as client:
                await _ready(client, proc)
                warm = await client.complete({"messages": user(), "model": "openai_compat:small"}, timeout_s=20)
                assert warm.text == "ok"
                idle = _rss(proc.pid)["VmRSS"]
                _reset_peak(proc.pid)
                chunks: list[int] = []

                def on_chunk(chunk: StreamChunk) -> None:
                    chunks.append(len(chunk.delta))

                request = {"messages": user(), "model": f"openai_compat:{kind}"}
                with pytest.raises(ReplyError) as info:
                    if kind.startswith("sse"):
                        await client.stream(request, on_chunk, timeout_s=60)
                    else:
                        await client.complete(request, timeout_s=60)
                peak = _rss(proc.pid)["VmHWM"]
        finally:
            proc.terminate()
            with trio.fail_after(20):
                await trio.to_thread.run_sync(proc.wait)
    assert info.value.error_code == "PROVIDER_ERROR", info.value.body
    assert "server.max_upstream_bytes" in info.value.message and str(CAP) in info.value.message
    # requested once: the oversized target is not read again on retry (max_attempts = 3)
    big_requests = [r for r in up.requests if r.json()["model"] == kind]
    assert len(big_requests) == 1, f"{len(big_requests)} requests for the oversized body"
    assert peak - idle < RSS_MARGIN, f"peak RSS {peak / 2**20:.0f} MiB, idle {idle / 2**20:.0f} MiB"
    sent = sum(up.sent.values())
    assert sent < TOTAL / 2, f"the fake sent {sent} bytes: the body was read far past the cap"
    if kind.startswith("sse"):
        assert CAP / 2 < sum(chunks) <= CAP  # the stream flowed up to the cap, then ended
    print(f"{kind}: idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, fake sent {sent / 2**20:.0f} MiB")


# ---- a CLI provider's stdout -------------------------------------------------------------------

# 200 MB of output lines, after writing its pid where the test can read it
FLOOD = """import os, sys
open(sys.argv[1], "w").write(str(os.getpid()))
line = b"x" * 65535 + b"\\n"
for _ in range(3200):
    sys.stdout.buffer.write(line)
"""


async def test_cli_stdout_over_the_cap_is_upstream_too_large_and_the_process_is_stopped(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    cfg = ProviderConfig(command=(sys.executable, "-c", FLOOD, str(pidfile), "{model}"), kill_grace_s=1.0)
    provider = CliProvider(cfg, name="flood", server=ServerConfig(max_upstream_bytes=2**20))
    call = Call(model="m", messages=[Message(role="user", content="hi")], max_tokens=10, temperature=0.0)
    with trio.fail_after(30), pytest.raises(errors.UpstreamTooLarge) as info:
        await provider.complete(call)
    assert info.value.error_code == "PROVIDER_ERROR"
    assert "server.max_upstream_bytes" in info.value.message and str(2**20) in info.value.message
    with pytest.raises(ProcessLookupError):  # stopped and reaped when the call ended
        os.kill(int(pidfile.read_text()), 0)
