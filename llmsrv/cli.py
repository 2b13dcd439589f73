"""Command line: argument parsing and start-up only (CONTRACT section 7).

Start-up is what a person waits for on every call, so this module imports argparse and a little
of the standard library at the top: each command imports what it needs when it runs (``--version``
and ``--help`` nothing more; ``ask``, ``status`` and ``breaker`` the client and the bus, never
providers, metrics or resilience; ``breaker simulate`` its own module and no NATS).
tests/test_startup.py keeps it so.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    import trio

    from .config import Config
    from .messages import StreamChunk
    from .service import Service

DEFAULT_CLIENT_URL = "nats://127.0.0.1:4222"


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command line; ``argv`` only decides whether ``breaker simulate``'s options are loaded."""
    p = argparse.ArgumentParser(prog="llmsrv", description="LLM requests over NATS, answered predictably.")
    p.add_argument("--version", action="version", version=f"llmsrv {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML config file (default: $LLMSRV_CONFIG)")
    serve.add_argument("--nats-url", help="NATS URL (default: $LLMSRV_NATS_URL, $NATS_URL, config, else embedded)")

    ask = sub.add_parser("ask", help="send one request and print the reply")
    ask.add_argument("prompt")
    ask.add_argument("--model", default="auto")
    ask.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    ask.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    ask.add_argument("--nats-url")
    ask.add_argument("--config")
    ask.add_argument("--json", action="store_true", help="print the whole reply as JSON")

    check = sub.add_parser("check", help="validate the config and print provider credential status")
    check.add_argument("--config")
    check.add_argument("--probe", action="store_true",
                       help="also make one authenticated call per available provider (a model list: no tokens spent)")

    status = sub.add_parser("status", help="print every running instance's status (llm.admin.status)")
    status.add_argument("--json", action="store_true", help="print the raw status documents")
    status.add_argument("--nats-url")
    status.add_argument("--config")

    breaker = sub.add_parser("breaker", help="operate circuit breakers (llm.admin.breaker.*)")
    breaker_sub = breaker.add_subparsers(dest="action", required=True)
    breaker_set = breaker_sub.add_parser("set", help="retune a provider's breaker on every instance")
    breaker_set.add_argument("provider")
    breaker_set.add_argument("--threshold", type=int, help="consecutive failures that open it")
    breaker_set.add_argument("--ttl", type=float, metavar="SECONDS", help="how long it stays open")
    breaker_set.add_argument("--nats-url")
    breaker_set.add_argument("--config")
    for verb, text in (
            ("open", "force a breaker open on every instance: it refuses calls until closed or reset"),
            ("close", "close a breaker on every instance (failures cleared; it can open again on new ones)"),
            ("reset", "reset a breaker on every instance: closed, counts and forced state cleared "
                      "(a provider's per-model breakers too)")):
        forced = breaker_sub.add_parser(verb, help=text, description=f"{text} (llm.admin.breaker.state).")
        forced.add_argument("target", metavar="PROVIDER[:MODEL]",
                            help="a provider, or provider:model for a per-model breaker (breaker_scope = \"model\")")
        forced.add_argument("--json", action="store_true", help="print each instance's answer as JSON")
        forced.add_argument("--nats-url")
        forced.add_argument("--config")
    sim = breaker_sub.add_parser("simulate", help="replay a failure trace through the breaker and rate-limit code "
                                 "in virtual time, per setting (no NATS, no config)")
    if _is_simulate(argv):  # its options live with it: loaded for this command only (start-up stays cheap)
        from . import simulate

        simulate.add_arguments(sim)
    return p


def _is_simulate(argv: Sequence[str]) -> bool:
    return [a for a in argv if not a.startswith("-")][:2] == ["breaker", "simulate"]


def _setup_logging(cfg: Config, level: str, serve: bool) -> None:
    from . import logs

    logs.setup(cfg, level)
    if serve:
        logs.lean_records()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv).parse_args(argv)  # --version and --help exit here, having imported nothing more
    if args.command == "breaker" and args.action == "simulate":  # virtual time: no config, no NATS
        from . import simulate

        return simulate.run(args)
    from .config import ConfigError, load_config, with_overrides

    def configure() -> Config:  # at start, and again on SIGHUP (serve)
        cfg = load_config(getattr(args, "config", None))
        if getattr(args, "nats_url", None):
            cfg = with_overrides(cfg, nats={"url": args.nats_url})
        return cfg

    try:
        cfg = configure()
        if args.command == "serve" and cfg.server.http_port:
            from .httpapi import http_api_keys

            http_api_keys(cfg.server)  # a non-loopback HTTP bind without API keys: refused before anything starts
    except ConfigError as exc:
        print(f"llmsrv: {exc}", file=sys.stderr)
        return 2
    serve = args.command == "serve"
    _setup_logging(cfg, cfg.server.log_level if serve else "warning", serve)
    import trio

    if args.command == "check":  # no NATS: the providers only
        return trio.run(_check, cfg, args.probe)
    from .bus import BusError, bus_error_in

    try:
        if args.command == "serve":
            return _serve(cfg, configure)
        url = cfg.nats.url or DEFAULT_CLIENT_URL
        if args.command == "ask":
            return trio.run(_ask, cfg, url, args)
        if args.command == "breaker" and args.action == "set":
            command = {"provider": args.provider, "threshold": args.threshold, "ttl_s": args.ttl}
            return trio.run(_admin, cfg, url, "admin.breaker.set", {k: v for k, v in command.items() if v is not None})
        from .statusview import render_breaker_replies, render_status

        if args.command == "breaker":  # open | close | reset PROVIDER[:MODEL]
            provider, colon, model = args.target.partition(":")
            body: dict[str, object] = {"provider": provider, "action": args.action}
            if colon:
                body["model"] = model  # "mock:" too: the instances answer what is wrong with it
            render = None if args.json else render_breaker_replies
            return trio.run(_admin, cfg, url, "admin.breaker.state", body, render)
        return trio.run(_admin, cfg, url, "admin.status", {}, None if args.json else render_status)
    except (BusError, BaseExceptionGroup) as exc:
        error = bus_error_in(exc)
        if error is None:
            raise
        print(f"llmsrv: {error}", file=sys.stderr)
        return 1


# ---- serve ---------------------------------------------------------------------------------

def _serve(cfg: Config, configure: Callable[[], Config]) -> int:
    import trio

    from . import tracing
    from .config import ConfigError
    from .natsserver import NatsServer, free_port

    try:
        shutdown_tracing = tracing.setup(cfg.tracing)
    except ConfigError as exc:  # on (config or OTEL_* variables) without its packages
        print(f"llmsrv: {exc}", file=sys.stderr)
        return 2
    embedded = None
    url = cfg.nats.url
    if url is None:
        embedded = NatsServer(port=free_port(preferred=4222)).start()
        url = embedded.url
        print(f"llmsrv: embedded nats-server listening on {url}", flush=True)
    try:
        trio.run(_serve_async, cfg, url, configure)
    finally:
        shutdown_tracing()  # flushes the spans still batched (blocks: outside trio)
        if embedded is not None:
            embedded.stop()
    return 0


async def _serve_async(cfg: Config, url: str, configure: Callable[[], Config]) -> None:
    import contextlib

    import msgspec
    import trio

    from .bus import Bus, redact_url
    from .service import Service

    async with contextlib.AsyncExitStack() as stack:
        bus = await stack.enter_async_context(Bus.connect(cfg.nats, url))
        control = bus
        if cfg.nats.control_connection:  # health and admin are not read behind a flood of requests
            control_cfg = msgspec.structs.replace(cfg.nats, name=f"{cfg.nats.name}-control")
            control = await stack.enter_async_context(Bus.connect(control_cfg, url))
        service = Service(cfg, bus, control=control)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, service, nursery.cancel_scope, configure)
            await nursery.start(service.run)
            # Everything built at start-up lives until exit: keep it out of the garbage
            # collector's scans, which otherwise walk it again and again under load.
            gc.freeze()
            print(f"llmsrv: ready on {redact_url(url)} subject {service.subject_request}", flush=True)
            await service.stopped.wait()
            nursery.cancel_scope.cancel()


async def _watch_signals(service: Service, scope: trio.CancelScope, configure: Callable[[], Config]) -> None:
    import logging

    import trio

    from .config import ConfigError

    log = logging.getLogger("llmsrv")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    service.reload(configure())
                except ConfigError as exc:
                    log.error("SIGHUP: config reload refused, the running config stays: %s", exc)
            elif not service.draining:
                log.info("%s: draining (again to stop at once)", signal.Signals(signum).name)
                service.shutdown()
            else:
                log.warning("%s again: stopping now", signal.Signals(signum).name)
                scope.cancel()


# ---- clients -------------------------------------------------------------------------------

async def _ask(cfg: Config, url: str, args: argparse.Namespace) -> int:
    import trio

    from .client import Client
    from .errors import LlmsrvError, ReplyError

    request = {"messages": [{"role": "user", "content": args.prompt}], "model": args.model}

    def on_chunk(chunk: StreamChunk) -> None:
        print(chunk.delta, end="", flush=True)

    async with Client.connect(url, cfg.nats.subject_prefix, cfg.nats) as client:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_sigint, scope)
                try:
                    if args.stream:
                        reply = await client.stream(request, on_chunk, timeout_s=args.timeout)
                        print()
                    else:
                        reply = await client.complete(request, timeout_s=args.timeout)
                except (ReplyError, LlmsrvError) as exc:
                    print(f"llmsrv: {exc.error_code}: {exc.message}", file=sys.stderr)
                    return 1
                finally:
                    nursery.cancel_scope.cancel()
            if args.json:
                print(json.dumps({f: getattr(reply, f) for f in ("text", "model", "tokens_used",
                                  "correlation_id", "finish_reason")}))
            elif not args.stream:
                print(reply.text)
            return 0
    print("llmsrv: cancelled (llm.cancel sent)", file=sys.stderr)
    return 130


async def _cancel_on_sigint(scope: trio.CancelScope) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _admin(cfg: Config, url: str, subject: str, body: dict[str, object],
                 render: Callable[[list[dict[str, Any]]], str] | None = None) -> int:
    """Send an admin command to every instance and print each one's answer (as JSON without ``render``)."""
    from .client import Client

    async with Client.connect(url, cfg.nats.subject_prefix, cfg.nats) as client:
        replies = await client.gather(subject, body)
    if render is None:
        print(json.dumps(replies, indent=2))
    elif replies:
        print(render(replies))
    if not replies:
        print(f"llmsrv: no instance answered on {cfg.nats.subject_prefix}.{subject}", file=sys.stderr)
        return 1
    return 1 if any("error_code" in r for r in replies) else 0


# ---- check ---------------------------------------------------------------------------------

async def _check(cfg: Config, probe: bool) -> int:
    import trio

    from .errors import LlmsrvError
    from .providers import ProviderStatus
    from .providers.registry import build_providers
    from .routing import PROVIDER_KEYS

    providers = build_providers(cfg)
    print("config: ok")
    for key in PROVIDER_KEYS:
        provider = providers[key]
        status = provider.status()
        if probe and status.available:
            with trio.move_on_after(15) as scope:
                try:
                    status = await provider.probe()
                except LlmsrvError as exc:
                    status = ProviderStatus(False, f"probe failed: {exc.error_code}: {exc.message}", state="invalid")
            if scope.cancelled_caught:
                status = ProviderStatus(False, "probe got no answer within 15 s", state="invalid")
        print(f"{key:14} {status.state:9} {status.reason or ''}".rstrip())
    return 0
