"""What a user of the predecessor (the TypeScript llm-server) keeps: its NATS_URL variable, its provider
hints and bare model names (table-tested in test_routing.py), over a real nats-server and a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import trio

from llmsrv.client import Client, NoResponders, ReplyError

from .conftest import user


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
