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
    +-- ResponseTooLarge            RESPONSE_TOO_LARGE  502  (the reply would exceed NATS max_payload)
    +-- Timeout                     TIMEOUT             504
    +-- InternalError               INTERNAL_ERROR      500

Each class carries a stable ``error_code`` and ``status``; the message is for humans and must
never contain a secret. ``retry_after_ms`` is set where the contract asks for it.
``provider_wide`` marks failures of a provider as a whole (no connection, refused credentials):
with per-model breakers they count against every model of the provider.
"""

from __future__ import annotations

from typing import Any


class LlmsrvError(Exception):
    error_code = "INTERNAL_ERROR"
    status = 500
    provider_wide = False

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.attempts: list[Any] = []  # what the router tried before giving up, if anything


class RequestError(LlmsrvError):
    """The request itself is wrong; answering it again will not help."""

    status = 400


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
    provider_wide = True


class Cancelled(LlmsrvError):
    error_code = "CANCELLED"
    status = 499


class RateLimited(LlmsrvError):
    error_code = "RATE_LIMITED"
    status = 429


class CircuitOpen(LlmsrvError):
    error_code = "CIRCUIT_OPEN"
    status = 503


class Overloaded(LlmsrvError):
    error_code = "OVERLOADED"
    status = 503


class ShuttingDown(LlmsrvError):
    error_code = "SHUTTING_DOWN"
    status = 503


class ProviderError(LlmsrvError):
    error_code = "PROVIDER_ERROR"
    status = 502


class ProviderTimeout(ProviderError):
    """One attempt took longer than its provider's ``timeout_ms`` (the request may go on)."""


class ProviderUnreachable(ProviderError):
    """The upstream could not be reached (connection refused, DNS, TLS): every model is affected."""

    provider_wide = True


class UpstreamTooLarge(ProviderError):
    """An upstream body passed ``[server] max_upstream_bytes``; reading it again would not help."""


class ResponseTooLarge(LlmsrvError):
    error_code = "RESPONSE_TOO_LARGE"
    status = 502


class Timeout(LlmsrvError):
    error_code = "TIMEOUT"
    status = 504


class InternalError(LlmsrvError):
    error_code = "INTERNAL_ERROR"
    status = 500
