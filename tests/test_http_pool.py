"""The HTTP transport's connections against a real fake upstream: keep-alive reuse, the bounds on
connections in use and idle, what cancellation leaves behind (nothing), environment proxies, decoding,
and the wire loggers (quiet unless asked)."""

from __future__ import annotations

import gzip
import json
import os
import random
import ssl
import subprocess
import sys
from pathlib import Path

import h11
import pytest
import trio
from cryptography.hazmat.primitives import serialization

from llmsrv import errors
from llmsrv.providers.codecs import HttpRequest
from llmsrv.providers.http import HttpTransport
from llmsrv.providers.pool import PoolSnapshot

from .fakes import FakeUpstream, Hang, Json, Raw, Request, cancel_when
from .test_security import issue, make_ca

ROOT = Path(__file__).resolve().parent.parent


def transport(url: str, *, max_concurrency: int = 8, max_idle: int | None = None) -> HttpTransport:
    return HttpTransport("plain", url, max_concurrency=max_concurrency, max_body=1 << 20, max_idle=max_idle)


async def get(t: HttpTransport, path: str = "/ok") -> object:
    return await t.fetch(HttpRequest(method="GET", path=path), lambda data: data, headers={})


def stats(t: HttpTransport) -> PoolSnapshot:
    snapshot = t.statistics()
    assert snapshot is not None
    return snapshot


async def test_sequential_requests_reuse_one_connection() -> None:
    async with FakeUpstream(lambda r: Json({"ok": True})) as up:
        t = transport(up.url)
        for _ in range(20):
            assert await get(t) == {"ok": True}
        assert stats(t) == PoolSnapshot(in_use=0, idle=1, opened=1)
        await t.aclose()
        assert stats(t).idle == 0


async def test_connections_in_use_are_bounded_and_idle_ones_kept_up_to_max_idle() -> None:
    arrived = trio.Event()
    upstream = {"now": 0, "most": 0}

    async def handler(request: Request) -> Json:
        upstream["now"] += 1
        upstream["most"] = max(upstream["most"], upstream["now"])
        if len(up.requests) >= 6:
            arrived.set()
        await arrived.wait()  # the first six wait for one another: six connections at once
        upstream["now"] -= 1
        return Json({"ok": True})

    async with FakeUpstream(handler) as up:
        t = transport(up.url, max_concurrency=6, max_idle=2)
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(get, t)
        assert stats(t) == PoolSnapshot(in_use=0, idle=2, opened=6)  # six opened, only max_idle kept
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(get, t)
        assert upstream["most"] == 6  # never more than max_concurrency upstream at once
        assert stats(t).in_use == 0 and stats(t).idle == 2
        assert t._gate.statistics().borrowed_tokens == 0


async def test_a_connection_the_upstream_closes_is_not_reused() -> None:
    async with FakeUpstream(lambda r: Json({"n": len(up.requests)}, headers={"connection": "close"})) as up:
        t = transport(up.url)
        assert [await get(t) for _ in range(3)] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert stats(t) == PoolSnapshot(in_use=0, idle=0, opened=3)


async def test_a_cancelled_request_closes_its_connection_and_the_next_opens_another() -> None:
    async with FakeUpstream(lambda r: Hang() if r.path == "/hang" else Json({"ok": True})) as up:
        t = transport(up.url)
        assert await get(t) == {"ok": True}  # one idle connection...
        cancel = await cancel_when(lambda: up.wait_request(2), lambda: get(t, "/hang"))  # ...taken, then cut
        await up.wait_disconnect()
        assert cancel.caught and stats(t) == PoolSnapshot(in_use=0, idle=0, opened=1)
        assert await get(t) == {"ok": True}
        assert stats(t) == PoolSnapshot(in_use=0, idle=1, opened=2)


async def test_random_deadlines_on_a_contended_transport_leave_nothing_behind() -> None:
    # httpcore 1.0.9 (#1093) kept orphan CONNECTING entries after such cancellations and then failed
    # every request with PoolTimeout. Here nothing waits in a pool: the gate queues, the stack lends.
    rng = random.Random(7)
    async with FakeUpstream(lambda r: Json({"ok": True}, delay_s=0.005)) as up:
        t = transport(up.url, max_concurrency=4)

        async def worker() -> None:
            for _ in range(10):
                with trio.move_on_after(rng.uniform(0, 0.03)):
                    await get(t)

        async with trio.open_nursery() as nursery:
            for _ in range(60):
                nursery.start_soon(worker)
        after = stats(t)
        assert after.in_use == 0 and after.idle <= 4
        assert t._gate.statistics().borrowed_tokens == 0
        with trio.fail_after(5):
            assert [await get(t) for _ in range(10)] == [{"ok": True}] * 10


async def test_a_gzip_body_is_decoded_and_checked_after_decoding() -> None:
    body = gzip.compress(json.dumps({"text": "a" * 1000}).encode())
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n" \
           f"content-length: {len(body)}\r\n\r\n".encode()
    async with FakeUpstream(lambda r: Raw(head + body)) as up:
        assert await get(transport(up.url)) == {"text": "a" * 1000}
        small = HttpTransport("plain", up.url, max_concurrency=2, max_body=500)
        with pytest.raises(errors.UpstreamTooLarge):  # 1 KB once decoded, over a 500-byte cap
            await get(small)


@pytest.mark.parametrize("url", ["ftp://example.com", "localhost:8080"], ids=["ftp", "no-scheme"])
async def test_a_url_without_http_is_unreachable(url: str) -> None:
    with pytest.raises(errors.ProviderUnreachable):
        await get(transport(url))


async def test_an_environment_proxy_carries_the_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeUpstream(lambda r: Json({"target": r.target})) as proxy:
        for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        t = transport("http://upstream.invalid:8080")
        assert await get(t, "/v1/models") == {"target": "http://upstream.invalid:8080/v1/models"}
        assert t.statistics() is None  # httpcore2's proxy pool, not the stack
        await t.aclose()


async def _https_json(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """A keep-alive HTTPS server that answers every request with ``{"ok": true}``."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.EndOfMessage):
                body = b'{"ok": true}'
                for reply in (h11.Response(status_code=200, headers=[("content-length", str(len(body)))]),
                              h11.Data(data=body), h11.EndOfMessage()):
                    await stream.send_all(conn.send(reply))
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (trio.BrokenResourceError, h11.ProtocolError):
        return


async def test_https_connections_are_verified_and_kept_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = make_ca("llmsrv test CA")
    key, cert = issue(ca, "127.0.0.1", server=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    (tmp_path / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    for name in ("SSL_CERT_DIR", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_ssl_over_tcp, _https_json, 0, server)
        url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # read at the first https connection
        t = transport(url)
        assert [await get(t) for _ in range(3)] == [{"ok": True}] * 3
        assert stats(t) == PoolSnapshot(in_use=0, idle=1, opened=1)  # one handshake, then keep-alive
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # not the CA: the chain does not verify
        with pytest.raises(errors.ProviderUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await get(transport(url))
        await t.aclose()
        nursery.cancel_scope.cancel()


async def test_a_handshake_cancelled_midway_closes_its_socket() -> None:
    hello = trio.Event()
    closed = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:  # takes the ClientHello, never answers it
        await stream.receive_some(65536)
        hello.set()
        while await stream.receive_some(65536):
            pass
        closed.set()  # the client's end was closed

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        t = transport(f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        cancel = await cancel_when(hello.wait, lambda: get(t))
        with trio.fail_after(5):
            await closed.wait()
        assert cancel.caught and stats(t) == PoolSnapshot(in_use=0, idle=0, opened=0)
        nursery.cancel_scope.cancel()


# A fresh interpreter: logging configured at debug first, as an application would, then a request.
LOGGING_PROBE = """
import io, logging, sys
import trio
stream = io.StringIO()
logging.basicConfig(level=logging.DEBUG, stream=stream, format="%(name)s|%(message)s")
if sys.argv[1] == "wire":
    logging.getLogger("httpx2").setLevel(logging.DEBUG)
    logging.getLogger("httpcore2").setLevel(logging.DEBUG)
from llmsrv.providers.codecs import HttpRequest
from llmsrv.providers.http import HttpTransport
from tests.fakes import FakeUpstream, Json

async def main():
    async with FakeUpstream(lambda r: Json({"ok": True})) as up:
        t = HttpTransport("plain", up.url, max_concurrency=2, max_body=1 << 20)
        await t.fetch(HttpRequest(method="POST", path="/v1/x", body={}), lambda d: d, headers={})
        logging.getLogger("llmsrv.probe").debug("request done")

trio.run(main)
print(stream.getvalue())
"""


@pytest.mark.parametrize("mode", ["default", "wire"])
def test_the_wire_loggers_are_quiet_unless_the_application_sets_them(mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", LOGGING_PROBE, mode], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "llmsrv.probe|request done" in lines  # debug records do get through
    wire = [line for line in lines if line.startswith(("httpx2", "httpcore2"))]
    if mode == "default":
        assert wire == []
    else:
        assert any(line.startswith("httpx2|HTTP Request: POST http://127.0.0.1:") and '"HTTP/1.1 200' in line
                   for line in wire), wire
        assert any(line.startswith("httpcore2.http11|send_request_headers") for line in wire), wire
