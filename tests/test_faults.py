"""Fault injection: an OpenAI-compatible fake upstream misbehaves; each request gets the right reply.

Faults: 5xx bursts (then recovery) and persistent 5xx, 429 with and without ``Retry-After``, a hang,
a 1 byte/s drip, a connection reset mid-body, a truncated body / SSE stream, invalid JSON, and a
body over ``[server] max_upstream_bytes``. Each runs as a plain and as a streaming request against
llmsrv in-process on the session nats-server, and must get the code of CONTRACT section 3 within
its deadline (plus ``TOLERANCE_S``), with ``retry_after_ms`` where the contract requires it.

Afterwards nothing is left behind: trio tasks (walked from the root task; parked workers aside, a
pool that is not a leak), open fds (/proc/self/fd), connections the fake still holds open, child
processes (/proc/self/task/*/children), compared with a baseline taken after a warm-up request.
A keep-alive connection left open is not a leak when it is one the provider's connection pool keeps
idle (bounded and expiring by the pool's own rules); one the pool does not account for is. How many
stay pooled depends on how many clean exchanges overlapped, which is the scheduler's business: a
fixed bound on them failed under load (5 idle, with or without the burst pacing).
The comparison waits (bounded) for the drain; it never sleeps a fixed time.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from llmsrv.client import ReplyError
from llmsrv.messages import StreamChunk

from .conftest import Harness, running, user
from .fakes import FakeUpstream, Hang, Json, Raw, Reply, Request, Sse

MODEL = "openai_compat:fault-model"
TIMEOUT_MS = 3000  # each request's deadline
TOLERANCE_S = 2.0  # a reply may come this long after the deadline on a loaded 2-core machine
MAX_UPSTREAM = 3 << 20  # [server] max_upstream_bytes for these tests; the huge body is 4 MiB
DRAIN_S = 10.0  # fail-safe for the leak comparison's wait


# ---- the fake: two more misbehaviours, and a count of the connections it holds open ------------


@dataclass
class Drip:
    """A response head, then its body one byte every ``interval_s`` (never finishing in time)."""

    head: bytes
    body: bytes
    interval_s: float = 1.0


@dataclass
class Reset:
    """Some bytes of a response, then a TCP reset (SO_LINGER 0), mid-body."""

    data: bytes


class FaultUpstream(FakeUpstream):
    def __init__(self, handler: Callable[[Request], Reply | Drip | Reset]) -> None:
        super().__init__(handler)  # type: ignore[arg-type]
        self.open_connections = 0
        self.busy = 0  # connections in the middle of a response: a client that left would have closed them

    async def __aenter__(self) -> FaultUpstream:
        await super().__aenter__()
        return self

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.open_connections += 1
        try:
            await super()._connection(stream)
        finally:
            self.open_connections -= 1
            self._notify()

    async def _respond(self, stream: trio.SocketStream, conn: Any, reply: Any) -> bool:
        self.busy += 1
        try:
            return await super()._respond(stream, conn, reply)
        finally:
            self.busy -= 1
            self._notify()

    async def _send(self, stream: trio.SocketStream, conn: Any, reply: Any) -> bool:
        if isinstance(reply, Drip):
            await stream.send_all(reply.head)
            for i in range(len(reply.body)):
                await trio.sleep(reply.interval_s)
                await stream.send_all(reply.body[i:i + 1])
            await trio.sleep_forever()
        if isinstance(reply, Reset):
            await stream.send_all(reply.data)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            return True
        return await super()._send(stream, conn, reply)


def _completion(text: str = "ok") -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "model": "fault-model", "choices": [{
        "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "model": "fault-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _ok(stream: bool) -> Json | Sse:
    if stream:
        return Sse([_chunk({"role": "assistant", "content": "o"}), _chunk({"content": "k"}), _chunk({}, "stop"),
                    "[DONE]"], interval_s=0.01)
    return Json(_completion())


def _head(length: int, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {length}\r\n\r\n").encode()


BODY = msgspec.json.encode(_completion("a reply that never arrives whole"))
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
BIG_TEXT = "".join(f"{i:07d} " for i in range(2 << 20 >> 3))  # 2 MiB, every piece distinct
ERROR = {"error": {"message": "upstream trouble", "type": "server_error"}}


def _fault(name: str, stream: bool, n: int) -> Reply | Drip | Reset:
    """What the fake answers to the ``n``-th request (from 1) of scenario ``name``."""
    if name == "5xx-burst":
        return Json(ERROR, status=(503, 500)[n % 2]) if n <= 2 else _ok(stream)
    if name == "5xx-always":
        return Json(ERROR, status=502)
    if name == "429-retry-after":
        return Json({"error": {"message": "slow down", "type": "rate_limit"}}, status=429,
                    headers={"retry-after": "1"})
    if name == "429-bare":
        return Json({"error": {"message": "slow down", "type": "rate_limit"}}, status=429)
    if name == "hang":
        return Hang()
    if name == "drip":
        return Drip(SSE_HEAD, b"5\r\ndata:\r\n" * 100) if stream else Drip(_head(len(BODY)), BODY)
    if name == "reset":
        return Reset(SSE_HEAD + b"40\r\ndata: {\"id\":" if stream else _head(len(BODY)) + BODY[:20])
    if name == "truncated":
        if stream:
            return Sse([_chunk({"role": "assistant", "content": "Hel"}), _chunk({"content": "lo"}),
                        _chunk({}, "stop"), "[DONE]"], interval_s=0.05, cut_after=2)
        return Raw(_head(len(BODY)) + BODY[: len(BODY) // 2])
    if name == "invalid-json":
        return Sse(["{this is not json", "[DONE]"]) if stream else Json(b"{this is not json")
    if name == "big-reply":  # under max_upstream_bytes, over the NATS server's max_payload (1 MiB)
        if stream:
            return Sse([_chunk({"role": "assistant", "content": BIG_TEXT}), _chunk({}, "stop"), "[DONE]"])
        return Json(msgspec.json.encode(_completion(BIG_TEXT)))
    if name == "huge":
        if stream:
            return Sse([_chunk({"role": "assistant", "content": "x" * (4 << 20)}), "[DONE]"])
        return Json(msgspec.json.encode(_completion("x" * (4 << 20))))
    raise AssertionError(name)


@dataclass(frozen=True)
class Expect:
    code: str | None  # None: success
    upstream_calls: int | None = None  # how many requests the fake must have seen (None: any)
    retry_after_ms: tuple[int, int] | None = None  # inclusive bounds, when the reply must carry it
    disconnect: bool = False  # the fake must see the client close (the call was cancelled)
    at_deadline: bool = False  # answered at the deadline, not before it


EXPECT = {
    "5xx-burst": Expect(None, upstream_calls=3),
    "5xx-always": Expect("PROVIDER_ERROR", upstream_calls=3),  # [routing.retry] max_attempts = 3
    "429-retry-after": Expect("RATE_LIMITED", retry_after_ms=(1000, 1000)),
    "429-bare": Expect("RATE_LIMITED", retry_after_ms=(1, 5000)),
    "hang": Expect("TIMEOUT", upstream_calls=1, disconnect=True, at_deadline=True),
    "drip": Expect("TIMEOUT", upstream_calls=1, disconnect=True, at_deadline=True),
    "reset": Expect("PROVIDER_ERROR"),
    "truncated": Expect("PROVIDER_ERROR"),
    "invalid-json": Expect("PROVIDER_ERROR"),
    "huge": Expect("PROVIDER_ERROR", upstream_calls=1),  # an oversized body is not read again on retry
}


# ---- what is left behind -----------------------------------------------------------------------


# request workers are a pool (idle ones retire after worker_idle_s); the fake's connection handlers are
# counted as the fake's busy/idle connections
SKIPPED_TASKS = ("._worker", "_highlevel_serve_listeners._run_handler")


def _trio_tasks() -> list[str]:
    """Every live trio task's name, but the pools of SKIPPED_TASKS."""
    names: list[str] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        if not task.name.endswith(SKIPPED_TASKS) and not task.name.startswith("close asyncgen "):  # GC finalizers
            names.append(task.name)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return sorted(names)


def _children() -> set[int]:
    found: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                found.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class Footprint:
    tasks: list[str]
    fds: int
    fake_busy: int  # connections the fake holds open mid-response
    fake_idle: int  # connections the fake holds open between requests
    pool_in_use: int  # the client pool's connections lent to a request
    pool_idle: int  # the client pool's keep-alive connections (not a leak)
    children: set[int]

    def holds_no_more_than(self, base: Footprint) -> bool:
        # every connection the fake holds idle is one the pool keeps; both ends live in this process,
        # so each pooled connection accounts for one fd on either side
        return (not Counter(self.tasks) - Counter(base.tasks)
                and self.fake_busy <= base.fake_busy and self.pool_in_use <= base.pool_in_use
                and self.fake_idle <= self.pool_idle
                and self.fds - self.fake_idle - self.pool_idle <= base.fds - base.fake_idle - base.pool_idle
                and self.children <= base.children)


def _diff(base: Footprint, after: Footprint) -> str:
    extra = [t for t in after.tasks if t not in base.tasks]
    gone = [t for t in base.tasks if t not in after.tasks]
    return (f"tasks +{extra} -{gone}; fds {base.fds}->{after.fds}; fake busy {base.fake_busy}->{after.fake_busy}, "
            f"idle {base.fake_idle}->{after.fake_idle}; pool in use {base.pool_in_use}->{after.pool_in_use}, "
            f"idle {base.pool_idle}->{after.pool_idle}; children +{sorted(after.children - base.children)}")


def _footprint(fake: FaultUpstream, h: Harness | None = None) -> Footprint:
    """What is held now; ``h``: the instance whose openai_compat pool may keep connections to ``fake``."""
    pool = h.service.providers["openai_compat"].transport.statistics() if h else None  # type: ignore[attr-defined]
    return Footprint(_trio_tasks(), len(os.listdir("/proc/self/fd")), fake.busy, fake.open_connections - fake.busy,
                     pool.in_use if pool else 0, pool.idle if pool else 0, _children())


async def _drained(h: Harness, fake: FaultUpstream, base: Footprint) -> Footprint:
    """The footprint once it is back within the baseline, or after the ``DRAIN_S`` fail-safe."""
    with trio.move_on_after(DRAIN_S):
        while not (h.service.statistics().counters.inflight == 0 and _footprint(fake, h).holds_no_more_than(base)):
            await trio.sleep(0.02)  # fds and children have no event to wait on: poll, with a deadline
    return _footprint(fake, h)


# ---- the tests -----------------------------------------------------------------------------------


class Scenario:
    def __init__(self, name: str, stream: bool) -> None:
        self.name, self.stream = name, stream
        self.active = False  # warm-up requests get a plain success
        self.calls = 0

    def __call__(self, request: Request) -> Reply | Drip | Reset:
        stream = bool(request.json().get("stream"))
        if not self.active:
            return _ok(stream)
        self.calls += 1
        return _fault(self.name, stream, self.calls)


async def _ask(h: Harness, stream: bool, text: str) -> tuple[dict[str, Any], list[StreamChunk]]:
    """One request; its reply as a dict (an error reply's body, or the success's fields)."""
    chunks: list[StreamChunk] = []
    request = {"messages": user(text), "model": MODEL, "timeout_ms": TIMEOUT_MS}
    try:
        if stream:
            reply = await h.client.stream(request, chunks.append)
        else:
            reply = await h.client.complete(request)
    except ReplyError as exc:
        return exc.body, chunks
    return msgspec.to_builtins(reply), chunks


SECTIONS: dict[str, Any] = {
    "server": {"max_upstream_bytes": MAX_UPSTREAM},
    "routing": {"retry": {"max_attempts": 3, "backoff_base_ms": 50, "backoff_max_ms": 200}},
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("name", list(EXPECT))
async def test_fault(nats_url: str, monkeypatch: pytest.MonkeyPatch, name: str, stream: bool) -> None:
    monkeypatch.delenv("OPENAI_COMPAT_API_KEY", raising=False)
    expect = EXPECT[name]
    scenario = Scenario(name, stream)
    async with FaultUpstream(scenario) as fake, running(nats_url, providers={"openai_compat": {
            "base_url": fake.url + "/v1", "breaker_threshold": 100}}, **SECTIONS) as h:
        warm, _ = await _ask(h, stream, "warm up")
        assert warm.get("text") == "ok", warm
        base = _footprint(fake, h)

        scenario.active = True
        started = trio.current_time()
        reply, chunks = await _ask(h, stream, "the faulty one")
        took = trio.current_time() - started

        assert reply.get("error_code") == expect.code, reply
        assert took <= TIMEOUT_MS / 1000 + TOLERANCE_S, f"answered after {took:.2f} s"
        if expect.at_deadline:
            assert took >= TIMEOUT_MS / 1000 * 0.9, f"TIMEOUT after only {took:.2f} s"
        if expect.code is None:
            assert reply["text"] == "ok" and [a["outcome"] for a in reply["attempts"]][-1] == "ok", reply
            if stream:
                assert "".join(c.delta for c in chunks) == "ok"
        else:
            assert reply["correlation_id"] and reply["error"], reply
        if expect.retry_after_ms is not None:
            low, high = expect.retry_after_ms
            assert isinstance(reply.get("retry_after_ms"), int) and low <= reply["retry_after_ms"] <= high, reply
        if expect.upstream_calls is not None:
            assert scenario.calls == expect.upstream_calls, f"{scenario.calls} upstream calls"
        if expect.disconnect:
            await fake.wait_disconnect(1, timeout_s=TOLERANCE_S)
        if name == "truncated" and stream:
            # what came before the cut was streamed; the error ends it (no fallback after the first chunk)
            assert "".join(c.delta for c in chunks) == "Hello" and scenario.calls == 1, chunks

        after = await _drained(h, fake, base)
        assert after.holds_no_more_than(base), _diff(base, after)
        # and the instance still serves
        scenario.active = False
        again, _ = await _ask(h, stream, "after the fault")
        assert again.get("text") == "ok", again


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_reply_over_max_payload(nats_url: str, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """A 2 MiB answer: RESPONSE_TOO_LARGE when plain; streamed, every byte arrives in chunks that fit."""
    monkeypatch.delenv("OPENAI_COMPAT_API_KEY", raising=False)
    scenario = Scenario("big-reply", stream)
    async with FaultUpstream(scenario) as fake, running(nats_url, providers={"openai_compat": {
            "base_url": fake.url + "/v1"}}, **SECTIONS) as h:
        await _ask(h, stream, "warm up")
        base = _footprint(fake, h)
        scenario.active = True
        reply, chunks = await _ask(h, stream, "a big one")
        if stream:
            assert "error_code" not in reply, reply
            assert "".join(c.delta for c in chunks) == BIG_TEXT and [c.seq for c in chunks] == list(range(len(chunks)))
        else:
            assert reply["error_code"] == "RESPONSE_TOO_LARGE" and "stream" in reply["error"], reply
        after = await _drained(h, fake, base)
        assert after.holds_no_more_than(base), _diff(base, after)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_5xx_opens_the_breaker(nats_url: str, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """After a 5xx burst the breaker is open: CIRCUIT_OPEN at once, with retry_after_ms, no upstream call."""
    monkeypatch.delenv("OPENAI_COMPAT_API_KEY", raising=False)
    scenario = Scenario("5xx-always", stream)
    async with FaultUpstream(scenario) as fake, running(nats_url, providers={"openai_compat": {
            "base_url": fake.url + "/v1", "breaker_threshold": 2, "breaker_ttl_s": 30}}, **SECTIONS) as h:
        await _ask(h, stream, "warm up")
        base = _footprint(fake, h)
        scenario.active = True
        first, _ = await _ask(h, stream, "fails")
        calls = scenario.calls
        started = trio.current_time()
        second, _ = await _ask(h, stream, "refused")
        took = trio.current_time() - started
        assert first["error_code"] in ("PROVIDER_ERROR", "CIRCUIT_OPEN") and calls == 2, (first, calls)
        assert second["error_code"] == "CIRCUIT_OPEN" and scenario.calls == calls, second
        assert isinstance(second.get("retry_after_ms"), int) and 0 < second["retry_after_ms"] <= 30000, second
        assert took < TOLERANCE_S, f"CIRCUIT_OPEN took {took:.2f} s"
        after = await _drained(h, fake, base)
        assert after.holds_no_more_than(base), _diff(base, after)


async def test_open_breaker_is_answered_at_once_even_with_time_left(nats_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """CONTRACT section 3 / router: every candidate's breaker open -> CIRCUIT_OPEN at once, whatever the deadline."""
    monkeypatch.delenv("OPENAI_COMPAT_API_KEY", raising=False)
    scenario = Scenario("5xx-always", False)
    async with FaultUpstream(scenario) as fake, running(nats_url, providers={"openai_compat": {
            "base_url": fake.url + "/v1", "breaker_threshold": 2, "breaker_ttl_s": 4}}, **SECTIONS) as h:
        scenario.active = True
        await _ask(h, False, "opens it")
        calls = scenario.calls
        started = trio.current_time()
        request = {"messages": user("refused"), "model": MODEL, "timeout_ms": 8000}  # longer than the TTL
        with pytest.raises(ReplyError) as refused:
            await h.client.complete(request)
        took = trio.current_time() - started
        assert refused.value.error_code == "CIRCUIT_OPEN" and scenario.calls == calls, refused.value.body
        assert took < TOLERANCE_S, f"CIRCUIT_OPEN only after {took:.2f} s"
        assert fake.busy == 0


async def test_concurrent_faults_leave_nothing(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fault at once, plain and streaming, on one instance: each reply right, nothing left after."""
    monkeypatch.delenv("OPENAI_COMPAT_API_KEY", raising=False)
    counts: dict[str, int] = {}

    def handler(request: Request) -> Reply | Drip | Reset:
        body = request.json()
        text = body["messages"][-1]["content"]
        if text == "warm up":
            return _ok(bool(body.get("stream")))
        counts[text] = counts.get(text, 0) + 1
        return _fault(text.split("/")[0], bool(body.get("stream")), counts[text])

    async with FaultUpstream(handler) as fake, running(nats_url, providers={"openai_compat": {
            "base_url": fake.url + "/v1", "breaker_threshold": 1000}}, **SECTIONS) as h:
        await _ask(h, False, "warm up")
        base = _footprint(fake, h)
        got: dict[str, str | None] = {}

        async def one(name: str, stream: bool) -> None:
            reply, _ = await _ask(h, stream, f"{name}/{'stream' if stream else 'plain'}")
            got[f"{name}/{'stream' if stream else 'plain'}"] = reply.get("error_code")

        with trio.fail_after(TIMEOUT_MS / 1000 + TOLERANCE_S + 5):
            async with trio.open_nursery() as nursery:
                for name in EXPECT:
                    for stream in (False, True):
                        nursery.start_soon(one, name, stream)
        assert got == {f"{n}/{m}": EXPECT[n].code for n in EXPECT for m in ("plain", "stream")}
        after = await _drained(h, fake, base)
        assert after.holds_no_more_than(base), _diff(base, after)


async def test_footprint_sees_what_is_left(nats_url: str) -> None:
    """The leak check itself can fail: a stray task, a socket, an idle connection no pool keeps, a fake
    connection stuck mid-response."""
    async with FaultUpstream(lambda request: Hang()) as fake:
        await trio.testing.wait_all_tasks_blocked()  # the fake's listener tasks have started
        base = _footprint(fake)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            assert not _footprint(fake).holds_no_more_than(base)
            nursery.cancel_scope.cancel()
        with socket.socket() as stray:
            assert stray.fileno() >= 0 and not _footprint(fake).holds_no_more_than(base)
        stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
        await trio.testing.wait_all_tasks_blocked()  # the fake holds it open, idle
        assert fake.open_connections == 1 and not _footprint(fake).holds_no_more_than(base)
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await fake.wait_until(lambda: fake.busy == 1)
        assert not _footprint(fake).holds_no_more_than(base)
        await stream.aclose()
        await fake.wait_until(lambda: fake.open_connections == 0)
        assert _footprint(fake).holds_no_more_than(base), _diff(base, _footprint(fake))
