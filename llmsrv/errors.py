"""One exception tree for everything llmsrv answers with an error.

    LlmsrvError                     error_code          Nats-Service-Error-Code
    +-- RequestError                (the caller's fault, never retried, never a provider failure)
    |   +-- InvalidJson             INVALID_JSON        400
    |   +-- ValidationFailed        VALIDATION_ERROR    400
    |   +-- InvalidTool             INVALID_TOOL        400
    |   +-- PayloadTooLarge         PAYLOAD_TOO_LARGE   413
    |   +-- ProviderNotFound        PROVIDER_NOT_FOUND  404
    +-- MissingCredentials          MISSING_CREDENTIALS 401
    +-- Cancelled                   CANCELLED           499
    +-- RateLimited                 RATE_LIMITED        429
    +-- CircuitOpen                 CIRCUIT_OPEN        503
    +-- Overloaded                  OVERLOADED          503
    +-- ShuttingDown                SHUTTING_DOWN       503
    +-- ProviderError               PROVIDER_ERROR      502  (retryable upstream failure)
    |   +-- ProviderTimeout         PROVIDER_ERROR      502  (one attempt ran out of time)
    |   +-- ProviderUnreachable     PROVIDER_ERROR      502  (no connection to the upstream at all)
    |   +-- UpstreamTooLarge        PROVIDER_ERROR      502  (over max_upstream_bytes; that target is not retried)
    |   +-- QuotaExhausted          PROVIDER_ERROR      502  (billing/quota: next candidate, that provider not retried)
    +-- ResponseTooLarge            RESPONSE_TOO_LARGE  502  (the reply would exceed NATS max_payload)
    +-- Timeout                     TIMEOUT             504
    +-- InternalError               INTERNAL_ERROR      500
    +-- NoResponders                NO_RESPONDERS       503  (client: no instance listens)
    +-- ReplyError                  (the server's code) (client: an error reply)

Each class carries a stable ``error_code`` and ``status``; the message is for humans and must
never contain a secret. ``retry_after_ms`` is set where the contract asks for it.
Policy lives on the classes, so the router and the guard read it instead of listing classes:

* ``retryable``: the router may try the next candidate or retry after a backoff (upstream
  failures, rate limits, open breakers, missing credentials); anything else ends the request.
* ``counts_for_breaker``: raised by a provider call, it is a failure for the circuit breaker
  (everything but the caller's own errors; ``trio.Cancelled`` is never an ``Exception`` here).
* ``provider_wide``: a failure of the provider as a whole (no connection, refused credentials):
  with per-model breakers it counts against every model of the provider.
* ``retry_same_target``: worth trying the same provider:model again later in the request (after a
  backoff); not for an oversized body or an exhausted quota, which would fail the same way.
* ``outcome``: the name of an attempt that ended with it (``attempts[].outcome``, metrics).

The client's errors (``llmsrv.client``) are part of the tree: ``NoResponders`` and
``ReplyError`` (an error reply, carrying the server's ``error_code``).
"""

from __future__ import annotations

from typing import Any


class LlmsrvError(Exception):
    error_code = "INTERNAL_ERROR"
    status = 500
    retryable = False
    retry_same_target = True
    counts_for_breaker = True
    provider_wide = False

    @property
    def outcome(self) -> str:
        return self.error_code.lower()

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.attempts: list[Any] = []  # what the router tried before giving up, if anything


class RequestError(LlmsrvError):
    """The request itself is wrong; answering it again will not help."""

    status = 400
    counts_for_breaker = False


class InvalidJson(RequestError):
    error_code = "INVALID_JSON"


class ValidationFailed(RequestError):
    error_code = "VALIDATION_ERROR"


class InvalidTool(RequestError):
    error_code = "INVALID_TOOL"


class PayloadTooLarge(RequestError):
    error_code = "PAYLOAD_TOO_LARGE"
    status = 413


class ProviderNotFound(RequestError):
    error_code = "PROVIDER_NOT_FOUND"
    status = 404


class MissingCredentials(LlmsrvError):
    error_code = "MISSING_CREDENTIALS"
    status = 401
    retryable = True
    provider_wide = True


class Cancelled(LlmsrvError):
    error_code = "CANCELLED"
    status = 499


class RateLimited(LlmsrvError):
    """``limit`` says whose: ``rpm`` / ``tpm`` (our limiter) or ``upstream`` (a 429 or in-band error)."""

    error_code = "RATE_LIMITED"
    status = 429
    retryable = True

    def __init__(self, message: str, *, retry_after_ms: int | None = None, limit: str = "upstream") -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.limit = limit


class CircuitOpen(LlmsrvError):
    error_code = "CIRCUIT_OPEN"
    status = 503
    retryable = True


class Overloaded(LlmsrvError):
    error_code = "OVERLOADED"
    status = 503


class ShuttingDown(LlmsrvError):
    error_code = "SHUTTING_DOWN"
    status = 503


class ProviderError(LlmsrvError):
    error_code = "PROVIDER_ERROR"
    status = 502
    retryable = True


class ProviderTimeout(ProviderError):
    """One attempt took longer than its provider's ``timeout_ms`` (the request may go on)."""

    outcome = "timeout"


class ProviderUnreachable(ProviderError):
    """The upstream could not be reached (connection refused, DNS, TLS): every model is affected."""

    provider_wide = True


class UpstreamTooLarge(ProviderError):
    """An upstream body passed ``[server] max_upstream_bytes``; reading it again would not help:
    the router does not try that target again in the request."""

    outcome = "too_large"
    retry_same_target = False


class QuotaExhausted(ProviderError):
    """The account's quota or credit is used up (OpenAI ``insufficient_quota``): not a rate limit, so no
    wait helps; the next candidate is tried at once and this provider not again in the request."""

    outcome = "quota_exhausted"
    retry_same_target = False
    provider_wide = True


class ResponseTooLarge(LlmsrvError):
    error_code = "RESPONSE_TOO_LARGE"
    status = 502


class Timeout(LlmsrvError):
    error_code = "TIMEOUT"
    status = 504


class InternalError(LlmsrvError):
    error_code = "INTERNAL_ERROR"
    status = 500


class NoResponders(LlmsrvError):
    """Client side: no llmsrv instance listens on the subject."""

    error_code = "NO_RESPONDERS"
    status = 503


class ReplyError(LlmsrvError):
    """Client side: an error reply; ``error_code`` is the server's, ``body`` the whole reply."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("error", "")), retry_after_ms=body.get("retry_after_ms"))
        self.error_code = str(body.get("error_code", "INTERNAL_ERROR"))
        self.correlation_id = str(body.get("correlation_id", ""))
        self.body = body
