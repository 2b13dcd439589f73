"""Live reload (CONTRACT section 6): SIGHUP re-reads the config file; routing, providers, breakers and
limits change for new requests, in-flight requests finish on what they hold, a provider whose settings
did not change keeps its breaker state, an invalid file is refused and the old config stays.

``Service.reload`` in process against a real nats-server and real fake upstreams; then ``llmsrv serve``
as users run it, with a config file rewritten and a real SIGHUP."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
import trio

from llmsrv import errors
from llmsrv.client import Client
from llmsrv.config import differences, with_overrides
from llmsrv.errors import LlmsrvError
from llmsrv.natsserver import NatsServer

from .conftest import running, user
from .fakes import FakeUpstream, Json, Request
from .test_fleet import serve_process, stop_process, wait_for_line, wait_instances


def _chat(text: str) -> Json:
    return Json({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def test_differences_name_the_changed_key_paths(nats_url: str) -> None:
    from .conftest import test_config

    cfg = test_config(nats_url)
    new = with_overrides(cfg, providers={"mock": {"latency_ms": 5}}, server={"max_inflight": 7})
    assert differences(cfg, new) == ["providers.mock.latency_ms", "server.max_inflight"]
    assert differences(cfg, cfg) == []


async def test_in_flight_requests_finish_on_the_old_provider_new_ones_use_the_new(nats_url: str) -> None:
    release = trio.Event()

    async def slow(request: Request) -> Json:
        await release.wait()
        return _chat("old upstream")

    async with FakeUpstream(slow) as old_up, FakeUpstream(lambda r: _chat("new upstream")) as new_up, \
            running(nats_url, providers={"openai_compat": {"base_url": old_up.url}}) as h:
        old_provider = h.service.providers["openai_compat"]
        mock_provider = h.service.providers["mock"]
        replies: list[str] = []
        async with trio.open_nursery() as nursery:
            async def in_flight() -> None:
                reply = await h.client.complete({"messages": user(), "model": "openai_compat:m"})
                replies.append(reply.text)

            nursery.start_soon(in_flight)
            await old_up.wait_request()
            applied = h.service.reload(with_overrides(h.cfg, providers={"openai_compat": {"base_url": new_up.url}}))
            assert applied == ["providers.openai_compat.base_url"]
            fresh = await h.client.complete({"messages": user(), "model": "openai_compat:m"})
            assert fresh.text == "new upstream" and len(new_up.requests) == 1
            assert h.service.providers["mock"] is mock_provider  # unchanged: kept, connections and all
            release.set()
        assert replies == ["old upstream"]  # the request in flight during the reload was not touched
        pool = old_provider.transport._pool  # type: ignore[attr-defined]
        with trio.fail_after(10):  # the replaced provider is closed once nothing started before the reload runs
            while not pool._closed or pool.statistics().idle:
                await trio.sleep(0.01)


async def test_breaker_state_is_kept_where_the_provider_did_not_change(nats_url: str) -> None:
    async with running(nats_url, providers={"mock": {"breaker_threshold": 1, "breaker_ttl_s": 600}}) as h:
        with pytest.raises(LlmsrvError):
            await h.client.complete({"messages": user(), "model": "mock:fail"})
        assert h.service.pipeline.breakers()["mock:fail"].state == "open"

        h.service.reload(with_overrides(h.cfg, providers={"openai_compat": {"base_url": "http://127.0.0.1:9"}}))
        with pytest.raises(LlmsrvError) as refused:
            await h.client.complete({"messages": user(), "model": "mock:fail"})
        assert refused.value.error_code == errors.CircuitOpen.error_code  # still open: mock's settings unchanged

        h.service.reload(with_overrides(h.cfg, providers={"mock": {"breaker_threshold": 3, "breaker_ttl_s": 600}}))
        assert "mock:fail" not in h.service.pipeline.breakers()  # new settings, fresh breakers
        with pytest.raises(LlmsrvError) as failed:
            await h.client.complete({"messages": user(), "model": "mock:fail"})
        assert failed.value.error_code == errors.ProviderError.error_code  # called again, not refused


async def test_routing_and_restart_only_sections(nats_url: str) -> None:
    async with running(nats_url) as h:
        changed = with_overrides(h.cfg, routing={"aliases": {"quick": "lorem"}}, server={"max_inflight": 3},
                                 nats={"queue": "elsewhere"})
        applied = h.service.reload(changed)
        assert applied == ["routing.aliases.quick"]
        reply = await h.client.complete({"messages": user(), "model": "mock:quick", "max_tokens": 3})
        assert reply.model == "mock:lorem"
        assert h.service.cfg.server.max_inflight == h.cfg.server.max_inflight  # kept until a restart
        assert h.service.cfg.nats.queue == h.cfg.nats.queue


# ---- llmsrv serve and a real SIGHUP -------------------------------------------------------------

async def test_sighup_applies_a_valid_file_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    server = NatsServer().start()
    prefix, log, conf = f"r{uuid.uuid4().hex[:8]}", tmp_path / "llmsrv.log", tmp_path / "llmsrv.toml"
    conf.write_text("[providers.mock]\nerror_rate = 0.0\n")
    proc = serve_process(server.url, prefix, log, LLMSRV_CONFIG=str(conf))
    ask = {"messages": user("x"), "model": "mock:echo"}
    try:
        async with Client.connect(server.url, prefix) as client:
            await wait_instances(client, 1, procs=[proc])
            assert (await client.complete(ask)).text == "x"

            conf.write_text("[providers.mock]\nerror_rate = 1.0\n")  # every mock call fails from now on
            proc.send_signal(signal.SIGHUP)
            await wait_for_line(log, "config reloaded: providers.mock.error_rate")
            with pytest.raises(LlmsrvError):
                await client.complete(ask)

            conf.write_text("[providers.mock]\nerror_rate = 0.0\nlatency_ms = 'soon'\n")  # invalid
            proc.send_signal(signal.SIGHUP)
            await wait_for_line(log, "config reload refused")
            assert "providers.mock.latency_ms" in log.read_text()  # the reason names the key
            with pytest.raises(LlmsrvError):  # the old config (error_rate = 1.0) stays
                await client.complete(ask)

            conf.write_text("[providers.mock]\nerror_rate = 0.0\n")
            proc.send_signal(signal.SIGHUP)
            with trio.fail_after(30):
                while log.read_text().count("config reloaded:") < 2:
                    await trio.sleep(0.05)
            assert (await client.complete(ask)).text == "x"
            assert proc.poll() is None
        stop_process(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def test_the_example_config_loads_and_reloading_it_onto_itself_changes_nothing() -> None:
    from llmsrv.config import load_config, reloadable

    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    cfg = load_config(str(example), env={})
    assert reloadable(cfg, load_config(str(example), env={}))[1:] == ([], [])
