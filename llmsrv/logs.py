"""Logs (CONTRACT section 6): JSON lines on stderr, text for a person, every record redacted.

One handler on the root logger, so the records of every library (httpx, nats, hypercorn) take the
same way: the request's correlation id is added from a context variable (``CORRELATION_ID``, set by
the service for the life of each request: trio gives every task its own copy of the context), then
the ``RedactingFilter`` removes every registered secret from the message and every string field,
then a formatter writes the line.

JSON is python-json-logger's ``MsgspecFormatter``: a ``logging.Formatter``, so the standard library's
loggers, levels and filters stay as they are (structlog would have asked every module to log
through it), and its encoder is msgspec, the JSON codec llmsrv already uses. A line carries ``ts``
(ISO 8601, UTC), ``level``, ``logger``, ``event`` and whichever of ``REQUEST_FIELDS`` apply.
Text (``[server] log_format = "text"``, or ``"auto"`` with a terminal on stderr) writes the same
fields as ``key=value`` after the message.

The one line per finished request (the access log) is the only line written per request, and through
``logging`` it cost about 80 us of CPU per request in ``llmsrv serve`` (a ``LogRecord``, the formatter, a
write per line): a third of a whole ``mock:echo`` request. So a request's end is only noted as it
finishes (``RequestEnds.note``: one ``RequestEnd`` struct appended, what the metrics need too), and the
ends are handed on in batches, at least every ``FLUSH_S`` and at once past ``MAX_PENDING``: counted
into the metrics, and, as JSON, made lines in the formatter's shape (same fields, ``ts`` the request's
end, the caller's fields redacted), encoded and written under the handler's lock (Envoy's access log is
buffered the same way). As text (a person at a terminal) or under a logging set-up of someone else's, the lines
go through ``logging`` as they are handed on (``ts`` then up to ``FLUSH_S`` after the end).
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import IO, Any
from urllib.parse import urlsplit

import msgspec

from . import redact
from .config import Config

CORRELATION_ID: ContextVar[str | None] = ContextVar("llmsrv_correlation_id", default=None)
REQUEST_FIELDS = ("correlation_id", "provider", "model", "outcome", "error_code", "duration_ms")

# Libraries that log the wire (httpcore: every response's headers at debug; httpx: each request at info;
# httpx2 and httpcore2, their successors, the same).
WIRE_LOGGERS = ("httpx", "httpcore", "httpx2", "httpcore2", "h11", "h2", "hpack")


class _RequestContext(logging.Filter):
    """Adds the correlation id of the request being served, if any, to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "correlation_id" not in record.__dict__:
            cid = CORRELATION_ID.get()
            if cid is not None:
                record.correlation_id = cid
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={v}" for k in REQUEST_FIELDS if (v := record.__dict__.get(k)) not in (None, "")]
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {' '.join(fields)}{newline}{rest}"


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.msgspec import MsgspecFormatter

    return MsgspecFormatter("{levelname}{name}{message}", style="{", timestamp="ts",
                            rename_fields={"levelname": "level", "name": "logger", "message": "event"})


class RequestLine(msgspec.Struct, gc=False):
    """One finished request's line, in the fields and order the JSON formatter writes."""

    level: str
    logger: str
    event: str
    correlation_id: str
    provider: str
    model: str
    outcome: str
    error_code: str | None
    duration_ms: float | None
    ts: _dt.datetime


class RequestEnd(msgspec.Struct, gc=False):
    """A request as it ended, noted for its metrics and its line (``RequestEnds``): what the caller knew then, nothing
    derived (kept out of the garbage collector too)."""

    correlation_id: str
    spec: str  # provider:model of the attempt that answered or failed last ("" if none)
    outcome: str
    error_code: str | None
    seconds: float | None  # since it was received, if it was
    wall: float  # time.time() as it ended
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_cents: float = 0.0


FLUSH_S = 0.2  # ends wait at most about this long to be counted and written
MAX_PENDING = 1000
_encode_lines = msgspec.json.Encoder().encode_lines
_json_handler: logging.StreamHandler[Any] | None = None  # set by setup() when the lines are JSON


class RequestEnds:
    """Every finished request, noted as it ends (``note``: one struct appended) and handed on a batch at a time
    (``hand_on``: every ``FLUSH_S``, at once past ``MAX_PENDING``, before a scrape and at the end) to the metrics
    (``count``) and to the one info line per request (see the module doc). While neither wants them (metrics off,
    the logger above info) nothing is noted; that is looked at again at each hand-on."""

    def __init__(self, logger: logging.Logger, count: Callable[[list[RequestEnd]], None] | None) -> None:
        self._log, self._count = logger, count
        self._pending: list[RequestEnd] = []
        self._noting = True

    def note(self, cid: str, spec: str, outcome: str, error_code: str | None, seconds: float | None,
             prompt_tokens: int = 0, completion_tokens: int = 0, cost_cents: float = 0.0) -> None:
        if self._noting:
            pending = self._pending
            pending.append(RequestEnd(cid, spec, outcome, error_code, seconds, time.time(), prompt_tokens,
                                      completion_tokens, cost_cents))
            if len(pending) >= MAX_PENDING:
                self.hand_on()

    def hand_on(self) -> None:
        ends, self._pending = self._pending, []
        lines = self._log.isEnabledFor(logging.INFO)
        self._noting = lines or self._count is not None
        if not ends:
            return
        if self._count is not None:
            self._count(ends)
        if lines:
            self._write(ends)

    def _write(self, ends: list[RequestEnd]) -> None:
        handler = _json_handler
        if handler is None:  # text, or someone else's logging: through logging (timed as written)
            for end in ends:
                provider, _, model = end.spec.partition(":")
                self._log.info("request finished: %s", end.outcome, extra={
                    "correlation_id": end.correlation_id, "provider": provider, "model": model, "outcome": end.outcome,
                    "error_code": end.error_code, "duration_ms": _ms(end.seconds)})
            return
        # redacted field by field, before encoding: the correlation id and the model are the caller's words (a batch
        # has few models), the rest is llmsrv's own; the whole text would cost ~5.6 us a line with one key registered
        known = redact.known()
        name, utc, at = self._log.name, _dt.UTC, _dt.datetime.fromtimestamp
        split: dict[str, tuple[str, str]] = {}  # spec -> (provider, model), and outcome -> event: a batch has few
        events: dict[str, str] = {}
        lines = []
        for end in ends:
            spec, outcome, seconds, cid = end.spec, end.outcome, end.seconds, end.correlation_id
            if (parts := split.get(spec)) is None:
                provider, _, model = spec.partition(":")
                parts = split[spec] = (provider, known(model))
            if (event := events.get(outcome)) is None:
                event = events[outcome] = f"request finished: {outcome}"
            provider, model = parts
            lines.append(RequestLine("INFO", name, event, cid if known.empty else known(cid), provider, model, outcome,
                                     end.error_code, None if seconds is None else int(seconds * 100000 + 0.5) / 100,
                                     at(end.wall, utc)))  # _ms, inline: a call per line is measurable here
        text = _encode_lines(lines).decode()
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except (OSError, ValueError):  # stderr full or gone: said as logging says it, never a request's failure
            handler.handleError(logging.makeLogRecord({"msg": f"{len(lines)} request lines lost"}))
        finally:
            handler.release()


def _ms(seconds: float | None) -> float | None:
    """Milliseconds to two decimals (``round(x, 2)`` formats a string underneath: twice the cost)."""
    return None if seconds is None else int(seconds * 100000 + 0.5) / 100


def wants_text(log_format: str, stream: IO[Any]) -> bool:
    return log_format == "text" or (log_format == "auto" and stream.isatty())


def setup(cfg: Config, level: str, stream: IO[Any] | None = None) -> logging.Handler:
    """The root logger at ``level`` writing to ``stream`` (stderr); the wire loggers at warning unless
    ``[server] wire_debug`` (then at ``level``, still redacted). Returns the handler."""
    global _json_handler
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    text = wants_text(cfg.server.log_format, stream)
    handler.setFormatter(TextFormatter() if text else json_formatter())
    handler.addFilter(_RequestContext())
    handler.addFilter(redact.RedactingFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    _json_handler = None if text else handler
    root.setLevel(level.upper())
    register_nats_secrets(cfg)  # provider keys register themselves when they are read
    wire = root.level if cfg.server.wire_debug else max(logging.WARNING, root.level)
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(wire)
    return handler


def detach(handler: logging.Handler) -> None:
    """Undo ``setup``'s handler (tests that set logging up for a while)."""
    global _json_handler
    logging.getLogger().removeHandler(handler)
    if _json_handler is handler:
        _json_handler = None


def lean_records() -> None:
    """Records without what no llmsrv line shows (the logging HOWTO's "Optimization"): the caller's
    file and line (a stack walk per record), thread, process and multiprocessing names. About 8 of
    the ~45 us a request's line costs; for ``llmsrv serve`` only (the process's whole logging)."""
    logging._srcfile = None  # the documented switch
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def register_nats_secrets(cfg: Config) -> None:
    redact.register(cfg.nats.password, cfg.nats.token)
    for url in (cfg.nats.url or "").split(","):
        try:
            parts = urlsplit(url.strip())
            redact.register(parts.password if parts.password is not None else parts.username)  # or a token
        except ValueError:
            pass
