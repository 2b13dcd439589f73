"""Secret redaction: no run of ``WINDOW`` (8) or more characters of a secret leaves the process.

Theory of operation
-------------------
* ``redact(text, secrets)`` finds every substring of ``text`` that is also an 8-character
  substring (a *window*) of one of the secrets, merges the overlapping or touching spans and
  replaces each merged span with ``***``. A secret echoed whole, cut at either end, or split
  over two messages therefore loses every run of 8 or more of its characters; at most 7 can
  remain next to a cut. Secrets of 4 to 7 characters are replaced whole; shorter ones are
  ignored (they would match everywhere). Replacing repeats until nothing matches, so a mask
  next to a secret containing ``*`` cannot form a new match.
* The scan is linear: the text is sampled every 5 characters against the set of the secrets'
  4-character pieces (an 8-character window holds five, at five starts in a row: one is a multiple
  of 5), and only around a hit are the windows checked. A text without any secret costs
  ``len(text) / 5`` set lookups.
* **Redact, then cut**: ``clip(text, limit, secrets)`` is the one way to shorten text that may
  hold a secret. It redacts a generous prefix (``SCAN_CHARS``, far more than any limit used)
  and cuts the result, never the other way round.
* **The registry**: ``register(secret)`` adds a secret to the process-wide set the logging
  filter (``RedactingFilter``) removes from every record (message, arguments, traceback, string
  extras), at every level. Providers register their keys when they read them
  (``providers.http.read_secret``), the command line registers the NATS password and token.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

WINDOW = 8
SHORT_MIN = 4  # shorter secrets are not redacted at all
MASK = "***"
SCAN_CHARS = 65536  # what ``clip`` redacts before it cuts (bounds the work on a huge text)
_PIECE = WINDOW // 2  # the length of the pieces sampled
_STRIDE = WINDOW - _PIECE + 1  # a WINDOW-long match holds a piece starting at a multiple of this


class Redactor:
    """The precomputed windows of some secrets; call it on a text."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        unique = {s for s in secrets if s and len(s) >= SHORT_MIN}
        self.windows = frozenset(s[i:i + WINDOW] for s in unique for i in range(len(s) - WINDOW + 1))
        self.pieces = frozenset(w[i:i + _PIECE] for w in self.windows for i in range(WINDOW - _PIECE + 1))
        self.short = tuple(sorted((s for s in unique if len(s) < WINDOW), key=len, reverse=True))
        self.empty = not self.windows and not self.short

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where secrets occur in ``text`` (unsorted, may overlap)."""
        found: list[tuple[int, int]] = []
        if self.windows:
            windows, pieces = self.windows, self.pieces
            checked = -1  # the last start position already tested
            for j in range(0, len(text) - _PIECE + 1, _STRIDE):
                if text[j:j + _PIECE] in pieces:
                    for p in range(max(j + _PIECE - WINDOW, checked + 1, 0), j + 1):
                        if text[p:p + WINDOW] in windows:
                            found.append((p, p + WINDOW))
                    checked = j
        for secret in self.short:
            i = text.find(secret)
            while i >= 0:
                found.append((i, i + len(secret)))
                i = text.find(secret, i + 1)
        return found

    def __call__(self, text: str) -> str:
        if self.empty:
            return text
        while spans := self.spans(text):  # each round makes the text shorter: it ends
            text = _mask(text, spans)
        return text


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    out: list[str] = []
    pos = 0
    start, end = -1, -1
    for a, b in sorted(spans):
        if a <= end:  # overlaps or touches the current span
            end = max(end, b)
            continue
        if end >= 0:
            out += [text[pos:start], MASK]
            pos = end
        start, end = a, b
    out += [text[pos:start], MASK, text[end:]]
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _redactor(secrets: tuple[str | None, ...]) -> Redactor:
    return Redactor(secrets)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` without any run of 8 or more characters of any of ``secrets`` (see the module doc)."""
    return _redactor(tuple(secrets))(text)


def clip(text: str, limit: int, secrets: Iterable[str | None]) -> str:
    """Redacted first, then cut to ``limit`` characters."""
    return redact(text[:max(SCAN_CHARS, limit)], secrets)[:limit]


# ---- the process-wide registry and the logging filter -------------------------------------------

_registered: frozenset[str] = frozenset()
_known = Redactor(())


def register(*secrets: str | None) -> None:
    """Add secrets to those removed from every log record (and by ``redact_known``)."""
    global _registered, _known
    new = {s for s in secrets if s and len(s) >= SHORT_MIN} - _registered
    if new:
        _registered = _registered | new
        _known = Redactor(_registered)


def registered() -> frozenset[str]:
    return _registered


def redact_known(text: str) -> str:
    """``text`` without any registered secret."""
    return _known(text)


def known() -> Redactor:
    """The redactor of the secrets registered now (``register`` replaces it: take it again for each use)."""
    return _known


_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    """Removes every registered secret from a record before any handler formats it.

    Installed on the root handler, so it sees the records of every logger (httpx and httpcore
    included) at every level. The message is formatted here (``msg % args``) and redacted as a
    whole, so a secret split over several arguments is caught as well.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        known = _known
        if known.empty:
            return True
        record.msg, record.args = known(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # formatters that format exc_info themselves (python-json-logger's) would bring the secret
            # back: without exc_info every formatter writes the redacted exc_text
            record.exc_text, record.exc_info = known(record.exc_text), None
        if record.stack_info:
            record.stack_info = known(record.stack_info)
        for name, value in vars(record).items():
            if isinstance(value, str) and name not in _RECORD_FIELDS:
                setattr(record, name, known(value))
        return True
