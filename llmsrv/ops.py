"""Operations: the health document and the NATS micro-service discovery answers.

``$SRV.PING|INFO|STATS`` (and their ``.llmsrv`` / ``.llmsrv.<id>`` forms) are answered here by
hand, in the JSON shapes of the NATS micro spec (v1): nats-py's ``nats.micro`` would serve our
endpoint one request at a time (LIBRARY-NOTES), so it is not used.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import __version__
from .bus import Handler, Incoming
from .messages import encode

if TYPE_CHECKING:
    from .service import Service

SERVICE_NAME = "llmsrv"


def health_document(service: Service) -> dict[str, Any]:
    providers = {}
    for name, provider in service.providers.items():
        status = provider.status()
        guard = service.guards.get(name)
        providers[name] = {"available": status.available, "state": status.state, "reason": status.reason,
                           "breaker": guard.breaker.state if guard else "closed"}
    stats = service.statistics()
    return {
        "status": "draining" if service.draining else "ok",
        "uptime_s": round(service.uptime_s, 3),
        "nats": "connected" if service.bus.is_connected else "disconnected",
        "providers": providers,
        "instance_id": service.instance_id,
        "version": __version__,
        "inflight": stats.inflight,
    }


def _identity(service: Service, kind: str) -> dict[str, Any]:
    return {"type": f"io.nats.micro.v1.{kind}_response", "name": SERVICE_NAME,
            "id": service.instance_id, "version": __version__, "metadata": {}}


def _endpoint(service: Service) -> dict[str, Any]:
    return {"name": "request", "subject": service.subject_request,
            "queue_group": service.cfg.nats.queue, "metadata": {}}


def _info(service: Service) -> dict[str, Any]:
    return {**_identity(service, "info"), "description": "LLM requests over NATS",
            "endpoints": [_endpoint(service)]}


def _stats(service: Service) -> dict[str, Any]:
    s = service.statistics()
    started = _dt.datetime.fromtimestamp(service.started_wall, _dt.UTC)
    return {**_identity(service, "stats"), "started": started.isoformat().replace("+00:00", "Z"),
            "endpoints": [{**_endpoint(service), "num_requests": s.requests, "num_errors": s.errors,
                           "last_error": s.last_error, "processing_time": s.processing_ns,
                           "average_processing_time": s.processing_ns // max(1, s.requests)}]}


def micro_subscriptions(service: Service) -> Iterator[tuple[str, Handler]]:
    for verb, build in (("PING", lambda: _identity(service, "ping")),
                        ("INFO", lambda: _info(service)), ("STATS", lambda: _stats(service))):
        def handler(msg: Incoming, build: Any = build) -> None:
            if msg.reply:
                service.bus.publish_nowait(msg.reply, encode(build()))

        for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{SERVICE_NAME}",
                        f"$SRV.{verb}.{SERVICE_NAME}.{service.instance_id}"):
            yield subject, handler
