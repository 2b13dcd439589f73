"""What ``llmsrv status`` and ``llmsrv breaker open|close|reset`` print: the admin answers as tables for people.

Pure (JSON documents in, text out) and light: the CLI loads it for those commands only, so it
imports nothing but the standard library. The documents are the ones ``llm.admin.status`` and
``llm.admin.breaker.state`` answer (``ops.status_document``); ``--json`` prints them as they are.
A field an older instance does not send shows as ``?``, never as an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Doc = Mapping[str, Any]

PROVIDER_COLUMNS = ("PROVIDER", "STATE", "BREAKER", "FAILURES", "RETRY-AFTER", "RATE LIMIT", "IN-FLIGHT")
BREAKER_COLUMNS = ("INSTANCE", "BREAKER", "STATE", "FAILURES", "RETRY-AFTER")


def render_status(docs: Sequence[Doc]) -> str:
    """One block per instance (sorted by instance id): two summary lines, then a row per provider
    and one more per per-model breaker that is not closed (``provider:model``, indented)."""
    return "\n\n".join(_instance(doc) for doc in sorted(docs, key=lambda d: str(d.get("instance_id", ""))))


def render_breaker_replies(docs: Sequence[Doc]) -> str:
    """A row per instance's answer to ``llm.admin.breaker.state``; an error answer as its code and message."""
    rows: list[Sequence[str]] = []
    errors: list[str] = []
    for doc in sorted(docs, key=lambda d: str(d.get("instance_id", ""))):
        if "error_code" in doc:
            errors.append(_error_line(doc))
            continue
        name = str(doc.get("provider", "?")) + (f":{doc['model']}" if doc.get("model") else "")
        b = doc.get("breaker") or {}
        rows.append((str(doc.get("instance_id", "?")), name, _breaker_state(b), _failures(b), _retry(b)))
    return "\n".join(([_table(BREAKER_COLUMNS, rows)] if rows else []) + errors)


# ---- one instance ------------------------------------------------------------------------------

def _instance(doc: Doc) -> str:
    if "error_code" in doc:
        return _error_line(doc)
    stats = doc.get("stats") or {}
    last = f" (last {stats['last_error']})" if stats.get("last_error") else ""
    delay = doc.get("queue_delay_ms", stats.get("queue_delay_ms"))
    summary = [
        f"instance {doc.get('instance_id', '?')}  llmsrv {doc.get('version', '?')}  up {_duration(doc.get('uptime_s'))}"
        f"  nats {doc.get('nats', '?')}  draining {'yes' if doc.get('status') == 'draining' else 'no'}",
        f"in-flight {doc.get('inflight', stats.get('inflight', '?'))}  requests {stats.get('requests', '?')}"
        f"  errors {stats.get('errors', '?')}{last}  queue delay {_ms(delay)}"
        f"  loop lag {_ms(doc.get('loop_lag_ms', stats.get('loop_lag_ms')))}",
    ]
    rows: list[Sequence[str]] = []
    breakers = doc.get("breakers") or {}
    for name, provider in (doc.get("providers") or {}).items():
        guard = breakers.get(name) or {}
        b = guard.get("breaker") or {}
        rows.append((name, _provider_state(provider), _breaker_state(b, provider.get("breaker")), _failures(b),
                     _retry(b), _rate(guard.get("rate")), _inflight(guard)))
        for model, mb in (guard.get("models") or {}).items():
            if mb.get("state") != "closed":
                rows.append((f"  {name}:{model}", "", _breaker_state(mb), _failures(mb), _retry(mb), "", ""))
    return "\n".join(summary + ["", _table(PROVIDER_COLUMNS, rows)])


def _provider_state(provider: Doc) -> str:
    if provider.get("state"):
        return str(provider["state"])
    available = provider.get("available")
    return "?" if available is None else ("available" if available else "unavailable")


def _breaker_state(b: Doc, fallback: object = None) -> str:
    state = b.get("state", fallback if fallback is not None else "?")
    return f"{state} (forced)" if b.get("forced") else str(state)


def _failures(b: Doc) -> str:
    if "failures" not in b:
        return "?"
    return f"{b['failures']}/{b['threshold']}" if b.get("threshold") else str(b["failures"])


def _retry(b: Doc) -> str:
    if b.get("forced"):
        return "until closed"
    seconds = b.get("retry_after_s")
    return _duration(seconds) if isinstance(seconds, int | float) and seconds > 0 else "-"


def _rate(rate: Doc | None) -> str:
    if rate is None:
        return "?"
    if not rate.get("limited"):
        return "ok"
    return f"{rate['limited']} {_duration(rate.get('retry_after_s'))}"


def _inflight(guard: Doc) -> str:
    if "in_flight" not in guard:
        return "?"
    return f"{guard['in_flight']}/{guard['max_concurrency']}" if "max_concurrency" in guard else str(guard["in_flight"])


def _error_line(doc: Doc) -> str:
    where = f"instance {doc['instance_id']}: " if doc.get("instance_id") else ""
    return f"{where}{doc.get('error_code')}: {doc.get('error', '')}".rstrip()


# ---- formatting --------------------------------------------------------------------------------

def _duration(seconds: object) -> str:
    """``0.25s``, ``12.3s``, ``3m12s``, ``2h05m``, ``3d04h``; ``?`` for anything not a number."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        return "?"
    if seconds < 10:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    if seconds < 60:
        return f"{seconds:.1f}".removesuffix(".0") + "s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size}{unit}{(whole % size) // sub_size:02d}{sub}"
    raise AssertionError("unreachable")  # pragma: no cover


def _ms(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "?"
    return f"{value:g} ms"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in (header, *rows))
