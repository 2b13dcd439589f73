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
* **Recorded now, handed over later.** A sampled span is only recorded while it runs (``_Recorded``):
  its ids are drawn at once (the SDK's ``RandomIdGenerator``), its context is current as a
  ``NonRecordingSpan``, and its times, attributes and status are kept. The service hands what was
  recorded to the provider's span processors every ``FLUSH_S`` (``hand_over``, 64 spans per trio turn)
  as the SDK's finished spans (``ReadableSpan``: the ids sent upstream, the recorded times, status and,
  for a bug, the ``exception`` event ``record_exception`` makes), without building the SDK's live
  ``Span`` first: 0.5 us a request and its attempt in a tight loop instead of 6-9 (those took 33 us a
  span in the loaded server). A sampled request pays ~11 us (the SDK's own spans ~55 us). Span processors see
  each span once it has ended (``on_end``, 0.2 s late at most), never its start (``on_start``).
* **Sampling.** A request with a ``traceparent`` follows its parent's decision (an unsampled caller's
  context is made current as it came, so it goes on upstream unchanged, and nothing is recorded);
  one that starts a trace is kept with probability ``sample_ratio``, decided in ``request_span``.
  An unsampled request gets no attempt spans. With ``OTEL_TRACES_SAMPLER`` set, that sampler decides
  each request span instead (asked in ``request_span``; its attempt spans follow it).
* **Export.** ``setup`` builds a ``TracerProvider`` (``service.name``) with a ``BatchSpanProcessor``
  (a thread of its own: no I/O in a trio task; its queue room for two hand-overs, unless
  ``OTEL_BSP_MAX_QUEUE_SIZE`` says) and the OTLP/HTTP exporter (``OTEL_EXPORTER_OTLP_*`` honoured).
  It returns the shutdown function, which flushes: call it after ``trio.run`` returns (or in a
  thread), since it blocks. ``OTEL_SDK_DISABLED=true`` and ``OTEL_TRACES_EXPORTER=none`` turn
  tracing off whatever the config says.
"""

from __future__ import annotations

import logging
import os
import random
import time
import traceback
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
    from opentelemetry.sdk.trace import Event
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import SpanContext, SpanKind, TracerProvider
    from opentelemetry.util.types import AttributeValue

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
HAND_OVER_CHUNK = 64  # recorded spans handed to the span processors per trio turn
MAX_RECORDED = 4096  # recorded spans waiting at most: past it, the request that ends one hands them over


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
    caller = rt.parent(carrier) if carrier else None
    parent = None if caller is None else rt.span_context(caller)
    if rt.sampler is None:  # a caller's decision followed, a new trace kept by chance
        if parent is None and rt.root_ratio < 1.0 and random.random() >= rt.root_ratio:
            return NOOP
        if caller is not None and parent is not None and not parent.trace_flags.sampled:
            return _Current(rt, caller)  # an unsampled caller's context goes on upstream as it came
    attributes: dict[str, AttributeValue] = {"llmsrv.correlation_id": correlation_id,
                                             "gen_ai.request.model": request.model}
    for name, field in _UNLESS_DEFAULT:
        value = getattr(request, field)
        if value != _DEFAULTS[field]:
            attributes[name] = value
    trace_id = rt.new_trace_id() if parent is None else parent.trace_id
    if rt.sampler is not None and not rt.sampler_keeps(caller, trace_id, attributes):
        return NOOP if caller is None else _Current(rt, caller)
    return _RequestSpan(rt, parent, trace_id, attributes)


def attempt_span(provider: str, model: str) -> SpanHandle:
    """The span of one provider attempt, child of the current (request) span."""
    rt = _runtime
    if not ENABLED or rt is None:
        return NOOP
    parent = rt.span_context(None)  # the current span's
    return _AttemptSpan(rt, parent, rt.new_trace_id() if parent is None else parent.trace_id, {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model})


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


async def hand_over() -> None:
    """Hand the spans recorded so far to the span processors (the service calls it every ``FLUSH_S``),
    ``HAND_OVER_CHUNK`` at a time with a trio checkpoint between: no long stall of the loop."""
    rt = _runtime
    while rt is not None and rt.recorded:
        rt.hand_over(HAND_OVER_CHUNK)
        await trio.lowlevel.checkpoint()


def flush() -> None:
    """Hand every span recorded so far to the span processors now (tests; ``uninstall`` does it too)."""
    if _runtime is not None:
        _runtime.hand_over()


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

        if "otlp" in wanted:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(f"tracing is enabled ([tracing] enabled or OTEL_* variables) but OpenTelemetry is not "
                          f"installed ({exc.name or exc}): {INSTALL_HINT}") from None
    name = env.get("OTEL_SERVICE_NAME") if cfg.service_name == TracingConfig().service_name else None
    resource = Resource.create({"service.name": name or cfg.service_name, "service.version": __version__})
    # A new trace is sampled by request_span (root_ratio, before any SDK call); a request with a
    # traceparent follows its parent's decision, as OpenTelemetry's default sampler (ParentBased) does.
    # OTEL_TRACES_SAMPLER, when set, decides each request instead (the provider builds that sampler).
    own = not env.get("OTEL_TRACES_SAMPLER")
    provider = SdkTracerProvider(resource=resource)
    for kind in wanted:
        exporter: SpanExporter = (ConsoleSpanExporter() if kind == "console" else
                                  OTLPSpanExporter(endpoint=traces_url(cfg.endpoint) if cfg.endpoint else None))
        # spans come a hand-over (up to MAX_RECORDED) at a time: room for two, unless OTEL_BSP_MAX_QUEUE_SIZE says
        queued = None if env.get("OTEL_BSP_MAX_QUEUE_SIZE") else 2 * MAX_RECORDED
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=queued))
    uninstall = install(provider, cfg.sample_ratio if own else 1.0, None if own else provider.sampler)
    where = cfg.endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    log.info("tracing: on, service %s, exporting with %s%s", name or cfg.service_name, ", ".join(wanted),
             f" to {where}" if where and "otlp" in wanted else "")

    def shutdown() -> None:
        """Stop tracing, export what is buffered (blocks: not from a trio task)."""
        uninstall()
        provider.shutdown()

    return shutdown


def install(provider: TracerProvider, root_ratio: float = 1.0, sampler: Sampler | None = None) -> Callable[[], None]:
    """Trace through ``provider`` (OpenTelemetry's SDK) from now on (``setup`` uses it; tests pass an in-memory
    one), keeping ``root_ratio`` of the requests that start a trace and following a caller's decision; or
    asking ``sampler`` (``OTEL_TRACES_SAMPLER``'s) for each request. Returns the function that turns tracing
    off again: it hands over the spans recorded, and does not shut ``provider`` down."""
    global ENABLED, _runtime
    runtime = _Runtime(provider, root_ratio, sampler)
    _runtime, ENABLED = runtime, True

    def uninstall() -> None:
        global ENABLED, _runtime
        runtime.hand_over()
        if _runtime is runtime:
            _runtime, ENABLED = None, False

    return uninstall


def _nothing() -> None:
    return None


# ---- the OpenTelemetry side (only reached once installed) ------------------------------------------

class _Runtime:
    """What the span handles use, imported once, when tracing is turned on; and the spans recorded, until
    they are handed over to the SDK."""

    def __init__(self, provider: TracerProvider, root_ratio: float, sampler: Sampler | None) -> None:
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.trace import Tracer as SdkTracer
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import Decision
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        tracer = provider.get_tracer("llmsrv", __version__)
        if not isinstance(tracer, SdkTracer):
            raise TypeError(f"tracing needs OpenTelemetry's SDK TracerProvider, not {type(provider).__name__}")
        hashed = hash(tracer.resource)

        class HashedOnce(Resource):
            """The provider's resource, hashed once: OTLP's encoder groups spans by resource, and the SDK's
            ``Resource.__hash__`` JSON-encodes the attributes on every call (~5 us a span; see
            open-telemetry/opentelemetry-python#5577)."""

            def __hash__(self) -> int:
                return hashed

        self.processor = tracer.span_processor  # the provider's, as its own spans use
        self.resource = HashedOnce(tracer.resource.attributes, tracer.resource.schema_url)
        self.scope = InstrumentationScope("llmsrv", __version__)
        self.ReadableSpan, self.Event, self.Status = ReadableSpan, Event, trace.Status
        ids = RandomIdGenerator()  # the ids a recorded span draws as it starts, as the SDK's own
        self.new_trace_id, self.new_span_id = ids.generate_trace_id, ids.generate_span_id
        self.root_ratio, self.sampler = root_ratio, sampler
        self.recorded: list[_Recorded] = []
        self.propagator = TraceContextTextMapPropagator()
        self.attach, self.detach = context.attach, context.detach
        self.current, self.current_span = trace.set_span_in_context, trace.get_current_span
        self.span_of, self.SpanContext, self.TraceFlags = trace.NonRecordingSpan, trace.SpanContext, trace.TraceFlags
        self.server, self.client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self.ok, self.error = trace.Status(trace.StatusCode.UNSET), trace.StatusCode.ERROR
        self.sampled_decisions = (Decision.RECORD_AND_SAMPLE,)

    def parent(self, carrier: Mapping[str, str]) -> Context | None:
        """The context a ``traceparent``/``tracestate`` carrier names (None: none, or unreadable)."""
        found = {}
        for key, value in carrier.items():
            low = key.lower()
            if low in _CARRIER_KEYS and isinstance(value, str):
                found[low] = value
        if "traceparent" not in found:
            return None
        try:
            extracted = self.propagator.extract(found)
        except Exception:  # whatever a caller sends, the request is served (in a trace of its own)
            log.debug("ignoring an unreadable trace context", exc_info=True)
            return None
        return extracted if self.span_context(extracted) is not None else None

    def span_context(self, ctx: Context | None) -> SpanContext | None:
        found = self.current_span(ctx).get_span_context()
        return found if found.is_valid else None

    def sampler_keeps(self, caller: Context | None, trace_id: int, attributes: Mapping[str, AttributeValue]) -> bool:
        """``OTEL_TRACES_SAMPLER``'s decision for a request span."""
        assert self.sampler is not None
        decision = self.sampler.should_sample(caller, trace_id, REQUEST_SPAN, self.server, attributes).decision
        return decision in self.sampled_decisions

    def ended(self, span: _Recorded) -> None:
        self.recorded.append(span)
        if len(self.recorded) >= MAX_RECORDED:  # nobody hands them over (no service running): do it here
            self.hand_over()

    def hand_over(self, most: int | None = None) -> None:
        """Hand (at most ``most`` of) the recorded spans to the provider's span processors, as the finished
        spans the SDK would have made of them: same ids, times, attributes, status, exception event."""
        spans = self.recorded
        if most is not None and len(spans) > most:
            spans, self.recorded = spans[:most], spans[most:]
        else:
            self.recorded = []
        lost = 0
        for span in spans:
            try:
                self.processor.on_end(self.ReadableSpan(
                    span.name, span.context, span.parent, self.resource, span.attributes,
                    () if span.exception is None else (self.exception_event(span.exception, span.end),), (),
                    span.kind, None, self.ok if span.error is None else self.Status(self.error, span.error),
                    span.start, span.end, self.scope))
            except Exception:  # a tracing fault never reaches a request: the span is lost, and said so
                lost += 1
                if lost == 1:
                    log.exception("tracing: a recorded span could not be handed to OpenTelemetry")
        if lost > 1:
            log.error("tracing: %d of %d recorded spans could not be handed to OpenTelemetry", lost, len(spans))

    def exception_event(self, exc: BaseException, at: int) -> Event:
        """The ``exception`` event OpenTelemetry's ``record_exception`` adds (semantic conventions' names)."""
        module, name = type(exc).__module__, type(exc).__qualname__
        return self.Event("exception", {
            "exception.type": name if module == "builtins" else f"{module}.{name}",
            "exception.message": str(exc), "exception.stacktrace": "".join(traceback.format_exception(exc)),
            "exception.escaped": "False"}, at)


_runtime: _Runtime | None = None


class _Current(SpanHandle):
    """A context made current for a ``with`` block (``inject`` sends it upstream), nothing recorded."""

    __slots__ = ("_rt", "_context", "_token")

    def __init__(self, rt: _Runtime, ctx: Context) -> None:
        self._rt, self._context = rt, ctx
        self._token: object = None

    def __enter__(self) -> SpanHandle:
        self._token = self._rt.attach(self._context)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._rt.detach(self._token)  # type: ignore[arg-type]  # the token attach() returned


class _Recorded(_Current):
    """A sampled span, recorded here and handed over later (``_Runtime.hand_over``, from the service's
    flush task) as the SDK's finished span with the same ids, start and end times, attributes and status:
    its ids are drawn now, so while it runs its context is current, and children and ``inject`` see it."""

    __slots__ = ("name", "kind", "parent", "context", "attributes", "start", "end", "error", "exception")

    def __init__(self, rt: _Runtime, name: str, kind: SpanKind, parent: SpanContext | None, trace_id: int,
                 attributes: dict[str, AttributeValue]) -> None:
        if parent is None:
            flags, state = _SAMPLED_RANDOM, None
        else:  # as the SDK sets them: sampled, the parent's random-trace-id flag, the parent's tracestate
            flags, state = _SAMPLED | (parent.trace_flags & _RANDOM), parent.trace_state
        self.context = rt.SpanContext(trace_id, rt.new_span_id(), False, rt.TraceFlags(flags), state)
        super().__init__(rt, rt.current(rt.span_of(self.context)))
        self.name, self.kind, self.parent, self.attributes = name, kind, parent, attributes
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.end = 0
        self.start = time.time_ns()

    @property
    def recording(self) -> bool:
        return True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None:
                self._ended_by(exc)
        finally:
            self.end = time.time_ns()
            super().__exit__(kind, exc, tb)
            self._rt.ended(self)

    def _ended_by(self, exc: BaseException) -> None:
        cancelled = _cancelled(exc)
        if cancelled is not None:
            self.attributes.update({"llmsrv.cancelled": True, "llmsrv.cancel_source": cancelled.source,
                                    "llmsrv.outcome": "cancelled"})
        elif isinstance(exc, errors.LlmsrvError):
            self._failed(exc.error_code, exc.outcome, exc.message)
            if exc.attempts:
                self.attributes["llmsrv.attempts"] = len(exc.attempts)
        elif isinstance(exc, Exception):  # a bug: answered INTERNAL_ERROR
            self.exception = exc
            self._failed("INTERNAL_ERROR", "internal_error", f"{type(exc).__name__}: {exc}")

    def _failed(self, error_code: str, outcome: str, message: str) -> None:
        self.attributes.update({"error.type": error_code, "llmsrv.outcome": outcome})
        self.error = message


# request fields that become attributes only when they are not the default (each costs a sampled request ~3 us)
_UNLESS_DEFAULT = (("gen_ai.request.max_tokens", "max_tokens"), ("gen_ai.request.temperature", "temperature"),
                   ("llmsrv.stream", "stream"), ("llmsrv.task_type", "task_type"))
_DEFAULTS = {f.name: f.default for f in msgspec.structs.fields(LLMRequest)}
_SAMPLED, _RANDOM = 0x01, 0x02  # W3C trace flags (the SDK's TraceFlags.SAMPLED, TraceFlags.RANDOM_TRACE_ID)
_SAMPLED_RANDOM = _SAMPLED | _RANDOM  # a trace started here: the SDK's random ids


class _RequestSpan(_Recorded):
    __slots__ = ()

    def __init__(self, rt: _Runtime, parent: SpanContext | None, trace_id: int,
                 attributes: dict[str, AttributeValue]) -> None:
        super().__init__(rt, REQUEST_SPAN, rt.server, parent, trace_id, attributes)

    def answered(self, response: LLMResponse) -> None:
        self.attributes.update({"llmsrv.outcome": "ok", "gen_ai.response.model": response.model,
                                "llmsrv.attempts": len(response.attempts), "llmsrv.cost_cents": response.cost_cents})

    def _ended_by(self, exc: BaseException) -> None:
        cancelled = _cancelled(exc)
        super()._ended_by(exc)
        if cancelled is not None and cancelled.source == "deadline":  # the request is answered TIMEOUT
            self._failed("TIMEOUT", "timeout", "the request deadline passed")


class _AttemptSpan(_Recorded):
    __slots__ = ()

    def __init__(self, rt: _Runtime, parent: SpanContext | None, trace_id: int,
                 attributes: dict[str, AttributeValue]) -> None:
        super().__init__(rt, ATTEMPT_SPAN, rt.client, parent, trace_id, attributes)

    def completed(self, completion: Completion) -> None:
        self.attributes.update({
            "llmsrv.outcome": "ok", "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
            "gen_ai.response.finish_reasons": (completion.finish_reason,)})
        if completion.subscription:
            self.attributes["llmsrv.subscription"] = True


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
