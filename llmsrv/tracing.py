"""OpenTelemetry tracing (optional): a span per request, a child per provider attempt, W3C context in and out.

Theory of operation
-------------------
* **Off costs nothing.** Nothing here imports OpenTelemetry until ``setup`` finds tracing wanted
  (``[tracing] enabled = true``, or the standard ``OTEL_*`` variables) or a test calls ``install``.
  Until then ``ENABLED`` is false and every hook returns at once (``NOOP``, a shared do-nothing
  span handle); the hot paths read ``tracing.ENABLED`` before doing anything else.
* **Spans.** ``request_span`` (``llm.request``, kind SERVER) wraps one ``Pipeline.answer``: its parent
  is the caller's ``traceparent``/``tracestate`` (W3C TraceContext), else it starts a trace.
  ``attempt_span`` (``llm.provider_call``, kind CLIENT) wraps one provider attempt. Attributes use
  the OpenTelemetry GenAI names where they fit (``gen_ai.*``, ``error.type``), ``llmsrv.*`` otherwise.
  Each costs a sampled request ~3 us (the SDK's checks, then OTLP encoding): what the answering
  attempt's span says (tokens, finish reasons) is not repeated on the request's, and request fields
  at their defaults (max tokens, temperature, stream, task type) are left out (12 attributes on a
  plain request, 23 before).
  A failure sets status ERROR; a ``trio.Cancelled`` (hedging loser, client cancel, deadline) ends the
  span with ``llmsrv.cancelled = true`` and ``llmsrv.cancel_source`` instead: a cancellation is not a
  failure (a request cut by its deadline is answered ``TIMEOUT``, so its span says so).
* **Context under trio.** OpenTelemetry keeps the current span in a contextvar. A span handle makes
  its span current from ``__enter__`` to ``__exit__``, both in the same trio task; tasks the router
  starts for attempts (hedging) copy the context of the task that starts them, so attempt spans
  are children of the request span, and ``inject`` (the HTTP transport: ``traceparent`` on every
  upstream request; the subprocess transport: ``TRACEPARENT`` in the child's environment) sees the
  attempt's span.
* **Sampling.** A request with a ``traceparent`` follows its parent's decision; one that starts a
  trace is kept with probability ``sample_ratio``, decided in ``request_span`` before the SDK is
  asked (an unsampled SDK span still costs about 35 us; a sampled request and its attempt about
  55 us to build and 55 us to encode in a tight loop, 170-300 us in the loaded server). An unsampled
  request gets no attempt spans. ``OTEL_TRACES_SAMPLER`` replaces all of this.
* **Export.** ``setup`` builds a ``TracerProvider`` (``service.name``) with a ``BatchSpanProcessor``
  (a thread of its own: no I/O in a trio task) and the OTLP/HTTP exporter (``OTEL_EXPORTER_OTLP_*``
  honoured). It returns the shutdown function, which flushes: call it after ``trio.run`` returns (or
  in a thread), since it blocks. ``OTEL_SDK_DISABLED=true`` and ``OTEL_TRACES_EXPORTER=none`` turn
  tracing off whatever the config says.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING

import msgspec
import trio

from . import __version__, errors
from .config import ConfigError, TracingConfig
from .messages import LLMRequest

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from .messages import LLMResponse
    from .providers import Completion

log = logging.getLogger("llmsrv.tracing")

ENABLED = False  # read by the hot paths before anything else: False means every hook is a no-op
EXPORTERS = ("otlp", "console")  # OTEL_TRACES_EXPORTER values understood (and "none")
REQUEST_SPAN = "llm.request"
ATTEMPT_SPAN = "llm.provider_call"
TRACES_PATH = "/v1/traces"
INSTALL_HINT = "pip install 'llmsrv[otel]'"
_CARRIER_KEYS = ("traceparent", "tracestate")


class SpanHandle:
    """A span made current for a ``with`` block; this base is the no-op used while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> SpanHandle:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    @property
    def recording(self) -> bool:
        """Whether this span is sampled (kept): an unsampled request gets no attempt spans."""
        return False

    def answered(self, response: LLMResponse) -> None:
        """The request's answer (a request span)."""

    def completed(self, completion: Completion) -> None:
        """The attempt's completion (an attempt span)."""


NOOP = SpanHandle()


# ---- hooks (the hot paths) ---------------------------------------------------------------------------

def request_span(correlation_id: str, request: LLMRequest, carrier: Mapping[str, str] | None = None) -> SpanHandle:
    """The span of one request, child of the ``traceparent`` in ``carrier`` (header name -> value, any case)."""
    rt = _runtime
    if not ENABLED or rt is None:
        return NOOP
    if rt.root_ratio < 1.0 and random.random() >= rt.root_ratio and not (
            carrier and any(key.lower() == "traceparent" for key in carrier)):
        return NOOP  # a new trace, sampled out here: asking the SDK for an unsampled span costs ~35 us
    return _RequestSpan(rt, correlation_id, request, carrier)


def attempt_span(provider: str, model: str) -> SpanHandle:
    """The span of one provider attempt, child of the current (request) span."""
    if not ENABLED or _runtime is None:
        return NOOP
    return _AttemptSpan(_runtime, provider, model)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``) of the current span to outgoing HTTP ``headers``."""
    if ENABLED and _runtime is not None:
        _runtime.propagator.inject(headers)


def inject_env(env: MutableMapping[str, str]) -> None:
    """Add ``TRACEPARENT`` (and ``TRACESTATE``) of the current span to a child process's environment."""
    if ENABLED and _runtime is not None:
        carrier: dict[str, str] = {}
        _runtime.propagator.inject(carrier)
        for key, value in carrier.items():
            env[key.upper()] = value


# ---- configuration ------------------------------------------------------------------------------------

def exporters_for(cfg: TracingConfig, env: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters wanted (empty: tracing off), from the config and the ``OTEL_*`` variables."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = tuple(dict.fromkeys(e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")
                                if e.strip()))
    if "none" in named:
        return ()
    unknown = [e for e in named if e not in EXPORTERS]
    if unknown:
        raise ConfigError(f"invalid OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r}: llmsrv exports "
                          f"traces with {', '.join(EXPORTERS)} or none")
    if named:
        return named
    if cfg.enabled or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ("otlp",)
    return ()


def traces_url(endpoint: str) -> str:
    """``[tracing] endpoint`` as the exporter's URL: a bare base URL gets ``/v1/traces``."""
    scheme, sep, rest = endpoint.partition("://")
    host, slash, path = rest.partition("/")
    if not sep or (slash and path.strip("/")):
        return endpoint
    return f"{scheme}://{host}{TRACES_PATH}"


def setup(cfg: TracingConfig, env: Mapping[str, str] | None = None) -> Callable[[], None]:
    """Turn tracing on if configured (``cfg`` or ``OTEL_*``); return the function that flushes and stops it.

    Raises ``ConfigError`` when tracing is wanted but OpenTelemetry is not installed.
    """
    env = os.environ if env is None else env
    if cfg.enabled and env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("tracing: off (OTEL_SDK_DISABLED=true overrides [tracing] enabled)")
    wanted = exporters_for(cfg, env)
    if not wanted:
        return _nothing
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        if "otlp" in wanted:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(f"tracing is enabled ([tracing] enabled or OTEL_* variables) but OpenTelemetry is not "
                          f"installed ({exc.name or exc}): {INSTALL_HINT}") from None
    name = env.get("OTEL_SERVICE_NAME") if cfg.service_name == TracingConfig().service_name else None
    resource = Resource.create({"service.name": name or cfg.service_name, "service.version": __version__})
    # A new trace is sampled by request_span (root_ratio, before any SDK call); a request with a
    # traceparent follows its parent's decision (ParentBased), as OpenTelemetry's default does.
    # OTEL_TRACES_SAMPLER, when set, decides everything instead.
    own = not env.get("OTEL_TRACES_SAMPLER")
    provider = SdkTracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON) if own else None)
    for kind in wanted:
        exporter: SpanExporter = (ConsoleSpanExporter() if kind == "console" else
                                  OTLPSpanExporter(endpoint=traces_url(cfg.endpoint) if cfg.endpoint else None))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    uninstall = install(provider, cfg.sample_ratio if own else 1.0)
    where = cfg.endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    log.info("tracing: on, service %s, exporting with %s%s", name or cfg.service_name, ", ".join(wanted),
             f" to {where}" if where and "otlp" in wanted else "")

    def shutdown() -> None:
        """Stop tracing, export what is buffered (blocks: not from a trio task)."""
        uninstall()
        provider.shutdown()

    return shutdown


def install(provider: TracerProvider, root_ratio: float = 1.0) -> Callable[[], None]:
    """Trace through ``provider`` from now on (``setup`` uses it; tests pass an in-memory one), keeping
    ``root_ratio`` of the requests that start a trace. Returns the function that turns tracing off
    again (it does not shut ``provider`` down)."""
    global ENABLED, _runtime
    runtime = _Runtime(provider.get_tracer("llmsrv", __version__), root_ratio)
    _runtime, ENABLED = runtime, True

    def uninstall() -> None:
        global ENABLED, _runtime
        if _runtime is runtime:
            _runtime, ENABLED = None, False

    return uninstall


def _nothing() -> None:
    return None


# ---- the OpenTelemetry side (only reached once installed) ------------------------------------------

class _Runtime:
    """What the span handles use, imported once, when tracing is turned on."""

    def __init__(self, tracer: Tracer, root_ratio: float) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer, self.root_ratio = tracer, root_ratio
        self.propagator = TraceContextTextMapPropagator()
        self.attach, self.detach = context.attach, context.detach
        self.current = trace.set_span_in_context
        self.server, self.client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self.error = trace.StatusCode.ERROR

    def parent(self, carrier: Mapping[str, str] | None) -> Context | None:
        """The context a ``traceparent``/``tracestate`` carrier names (None: the current one)."""
        if not carrier:
            return None
        found = {}
        for key, value in carrier.items():
            low = key.lower()
            if low in _CARRIER_KEYS and isinstance(value, str):
                found[low] = value
        if not found:
            return None
        try:
            return self.propagator.extract(found)
        except Exception:  # whatever a caller sends, the request is served (in a trace of its own)
            log.debug("ignoring an unreadable trace context", exc_info=True)
            return None


_runtime: _Runtime | None = None


class _Span(SpanHandle):
    __slots__ = ("_rt", "_span", "_token")

    def __init__(self, rt: _Runtime, span: Span) -> None:
        self._rt, self._span = rt, span
        self._token: object = None

    def __enter__(self) -> SpanHandle:
        self._token = self._rt.attach(self._rt.current(self._span))
        return self

    @property
    def recording(self) -> bool:
        return bool(self._span.is_recording())

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None:
                self._ended_by(exc)
        finally:
            self._rt.detach(self._token)  # type: ignore[arg-type]  # the token attach() returned
            self._span.end()

    def _ended_by(self, exc: BaseException) -> None:
        span = self._span
        cancelled = _cancelled(exc)
        if cancelled is not None:
            span.set_attributes({"llmsrv.cancelled": True, "llmsrv.cancel_source": cancelled.source,
                                 "llmsrv.outcome": "cancelled"})
        elif isinstance(exc, errors.LlmsrvError):
            self._failed(exc.error_code, exc.outcome, exc.message)
            if exc.attempts:
                span.set_attribute("llmsrv.attempts", len(exc.attempts))
        elif isinstance(exc, Exception):  # a bug: answered INTERNAL_ERROR
            span.record_exception(exc)
            self._failed("INTERNAL_ERROR", "internal_error", f"{type(exc).__name__}: {exc}")

    def _failed(self, error_code: str, outcome: str, message: str) -> None:
        self._span.set_attributes({"error.type": error_code, "llmsrv.outcome": outcome})
        self._span.set_status(self._rt.error, message)


# request fields that become attributes only when they are not the default (each costs a sampled request ~3 us)
_UNLESS_DEFAULT = (("gen_ai.request.max_tokens", "max_tokens"), ("gen_ai.request.temperature", "temperature"),
                   ("llmsrv.stream", "stream"), ("llmsrv.task_type", "task_type"))
_DEFAULTS = {f.name: f.default for f in msgspec.structs.fields(LLMRequest)}


class _RequestSpan(_Span):
    __slots__ = ()

    def __init__(self, rt: _Runtime, correlation_id: str, request: LLMRequest,
                 carrier: Mapping[str, str] | None) -> None:
        attributes: dict[str, str | bool | int | float] = {"llmsrv.correlation_id": correlation_id,
                                                           "gen_ai.request.model": request.model}
        for name, field in _UNLESS_DEFAULT:
            value = getattr(request, field)
            if value != _DEFAULTS[field]:
                attributes[name] = value
        super().__init__(rt, rt.tracer.start_span(REQUEST_SPAN, rt.parent(carrier), rt.server, attributes))

    def answered(self, response: LLMResponse) -> None:
        self._span.set_attributes({"llmsrv.outcome": "ok", "gen_ai.response.model": response.model,
                                   "llmsrv.attempts": len(response.attempts), "llmsrv.cost_cents": response.cost_cents})

    def _ended_by(self, exc: BaseException) -> None:
        cancelled = _cancelled(exc)
        super()._ended_by(exc)
        if cancelled is not None and cancelled.source == "deadline":  # the request is answered TIMEOUT
            self._failed("TIMEOUT", "timeout", "the request deadline passed")


class _AttemptSpan(_Span):
    __slots__ = ()

    def __init__(self, rt: _Runtime, provider: str, model: str) -> None:
        super().__init__(rt, rt.tracer.start_span(ATTEMPT_SPAN, None, rt.client, {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model}))

    def completed(self, completion: Completion) -> None:
        attributes: dict[str, str | int | bool | tuple[str, ...]] = {
            "llmsrv.outcome": "ok", "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
            "gen_ai.response.finish_reasons": (completion.finish_reason,)}
        if completion.subscription:
            attributes["llmsrv.subscription"] = True
        self._span.set_attributes(attributes)


def _cancelled(exc: BaseException) -> trio.Cancelled | None:
    """The ``trio.Cancelled`` that ``exc`` is, or that is all a group of them holds (None: not a cancellation)."""
    if isinstance(exc, trio.Cancelled):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(trio.Cancelled)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, trio.Cancelled) else None
    return None
