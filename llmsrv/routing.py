"""Model selection: a request and the providers' state in, an ordered attempt plan out.

Pure (no I/O, no clock: callers pass the state). Rules, in order:

0. A provider hint is first normalised through ``[routing] provider_aliases`` (the predecessor's
   names: ``claude-code`` -> claude, ``github-copilot`` and ``grok`` -> copilot, ...).
1. ``model = "provider:model"``: exactly that provider; the model part goes through the aliases.
2. A bare model name (through the aliases first: ``sonnet`` -> ``claude-sonnet-4-6``): the
   provider hint if given, else the family of the longest matching prefix (``[routing.prefixes]``):
   an ordered list of providers serving it (``gpt-`` -> copilot, codex, github, openrouter), each
   ``provider`` or ``provider:template`` (``{model}`` replaced: ``openrouter:openai/{model}``).
   The first with credentials is tried first, the others are fallbacks.
3. ``model = "auto"``: the cell of the task_type x complexity matrix (task aliases folded;
   a missing complexity is inferred, see ``infer_complexity``), kept to the hinted provider if
   there is a hint, then re-ranked by the capability hints (stable: ties keep matrix order).

Then each candidate is checked against its provider's state and skipped, with the reason
recorded, when it has no credentials, its breaker is open or it has no rate-limit headroom.
When ``auto`` finds no candidate with credentials at all, the mock provider answers (CONTRACT
section 5). An explicit model none of whose providers has credentials is an error
(``MISSING_CREDENTIALS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from . import errors
from .config import ComplexityConfig, RoutingConfig
from .messages import TASK_ALIASES, LLMRequest, Message

PROVIDER_KEYS = ("claude", "gemini", "codex", "copilot", "github", "jules", "cursor",
                 "openrouter", "openai_compat", "mock")
FALLBACK = ("mock", "echo")
NEUTRAL_SCORE = 5


class Target(msgspec.Struct, frozen=True):
    provider: str
    model: str

    @property
    def spec(self) -> str:
        return f"{self.provider}:{self.model}"


class ProviderState(msgspec.Struct, frozen=True):
    """What routing needs to know of a provider right now."""

    available: bool = True  # has usable credentials
    circuit_retry_after_s: float | None = None  # set while the breaker refuses calls
    rate_retry_after_s: float | None = None  # set while a rate limit has no headroom


class Skip(msgspec.Struct, frozen=True):
    target: Target
    reason: str  # missing_credentials | circuit_open | rate_limited
    retry_after_ms: int | None = None


class Plan(msgspec.Struct, frozen=True):
    candidates: list[Target]
    skipped: list[Skip]
    complexity: str | None = None  # the complexity used (given or inferred) for auto routes


# ---- complexity ---------------------------------------------------------------------------------

def complexity_score(messages: Sequence[Message], cfg: ComplexityConfig) -> int:
    """Additive score over the conversation (documented in the README)."""
    text = "\n".join(m.content for m in messages).lower()
    score = sum(1 for limit in cfg.length_chars if len(text) > limit)
    if len(messages) > cfg.many_messages:
        score += 1
    weighted = ((cfg.complex_words, 3), (cfg.medium_words, 1), (cfg.code_markers, 1), (cfg.reasoning_markers, 1),
                (cfg.simple_words, -1))
    score += sum(weight for words, weight in weighted if any(w in text for w in words))
    return score


def infer_complexity(messages: Sequence[Message], cfg: ComplexityConfig) -> str:
    score = complexity_score(messages, cfg)
    return "complex" if score >= cfg.complex_at else "medium" if score >= cfg.medium_at else "simple"


# ---- candidates ---------------------------------------------------------------------------------

def _check_provider(provider: str) -> None:
    if provider not in PROVIDER_KEYS:
        raise errors.ProviderNotFound(
            f"unknown provider {provider!r}; known: {', '.join(PROVIDER_KEYS)}")


def _split(spec: str) -> tuple[str, str]:
    provider, _, model = spec.partition(":")
    return provider, model


def capability_score(target: Target, capabilities: Sequence[str], routing: RoutingConfig) -> int:
    table = routing.capability_scores
    scores = table.get(target.spec) or table.get(target.provider) or {}
    return sum(scores.get(c, NEUTRAL_SCORE) for c in capabilities)  # type: ignore[call-overload]


def provider_hint(request: LLMRequest, routing: RoutingConfig) -> str | None:
    """The request's provider hint, normalised (``claude-code`` -> ``claude``) and checked."""
    if request.provider is None:
        return None
    hint = routing.provider_aliases.get(request.provider, request.provider)
    _check_provider(hint)
    return hint


def family(model: str, routing: RoutingConfig) -> list[Target]:
    """The providers serving a bare model name: its longest matching prefix's family, in order."""
    rule = max((prefix for prefix in routing.prefixes if model.startswith(prefix)), key=len, default=None)
    if rule is None:
        raise errors.ProviderNotFound(f"cannot tell the provider of model {model!r}: write it as provider:model")
    entries = routing.prefixes[rule]
    targets = []
    for entry in [entries] if isinstance(entries, str) else entries:
        provider, _, template = entry.partition(":")
        _check_provider(provider)
        targets.append(Target(provider, template.replace("{model}", model) if template else model))
    return targets


def explicit_targets(request: LLMRequest, routing: RoutingConfig, hint: str | None) -> list[Target] | None:
    """The targets a request names (one, or a model family's), or None for ``auto``."""
    if request.model == "auto":
        return None
    if ":" in request.model:
        provider, model = _split(request.model)
        _check_provider(provider)
        if not model:
            raise errors.ValidationFailed("model must be provider:model with a model part - at `$.model`")
        return [Target(provider, routing.aliases.get(model, model))]
    model = routing.aliases.get(request.model, request.model)
    return [Target(hint, model)] if hint is not None else family(model, routing)


def candidates(request: LLMRequest, routing: RoutingConfig, complexity: str, hint: str | None) -> list[Target]:
    """The ordered candidates of an ``auto`` request, before any provider state is looked at."""
    alias = routing.aliases.get
    task = TASK_ALIASES.get(request.task_type, request.task_type)
    cell: list[str] = getattr(getattr(routing.matrix, task), complexity)
    found = [Target(p, alias(m, m)) for p, m in map(_split, cell) if hint in (None, p)]
    if request.capabilities:
        caps = request.capabilities
        found.sort(key=lambda t: -capability_score(t, caps, routing))
    return found


class Route(msgspec.Struct, frozen=True):
    """The candidates a request names, before provider state is looked at (memoisable)."""

    targets: list[Target]
    complexity: str | None  # None: an explicit model; else the complexity of the auto route
    providers: tuple[str, ...] = ()  # whose state the plan reads (targets', and mock for auto)
    hint: str | None = None  # the provider hint, normalised


def _route(targets: list[Target], complexity: str | None, hint: str | None) -> Route:
    names = [t.provider for t in targets] + ([FALLBACK[0]] if complexity is not None else [])
    return Route(targets, complexity, tuple(dict.fromkeys(names)), hint)


def route(request: LLMRequest, routing: RoutingConfig) -> Route:
    hint = provider_hint(request, routing)
    targets = explicit_targets(request, routing, hint)
    if targets is not None:
        return _route(targets, None, hint)
    complexity = request.complexity or infer_complexity(request.messages, routing.complexity)
    return _route(candidates(request, routing, complexity, hint), complexity, hint)


def plan(request: LLMRequest, routing: RoutingConfig, states: Mapping[str, ProviderState]) -> Plan:
    """Ordered candidates for ``request``; ``states`` maps provider key -> its state now."""
    return filter_plan(route(request, routing), states)


def filter_plan(found: Route, states: Mapping[str, ProviderState]) -> Plan:
    """Skip candidates that cannot be tried now, recording why. ``states`` is keyed by provider,
    and by ``provider:model`` where a model's state differs (its own breaker is open)."""
    missing = ProviderState(available=False)
    hint = found.hint
    if found.complexity is None and not any(states.get(t.provider, missing).available for t in found.targets):
        raise errors.MissingCredentials(f"provider {found.targets[0].provider!r} has no usable credentials")
    keep: list[Target] = []
    skipped: list[Skip] = []
    for target in found.targets:
        state = states.get(target.spec) or states.get(target.provider, missing)  # a model's own state first
        if not state.available:
            skipped.append(Skip(target, "missing_credentials"))
        elif state.circuit_retry_after_s is not None:
            skipped.append(Skip(target, "circuit_open", _ms(state.circuit_retry_after_s)))
        elif state.rate_retry_after_s is not None:
            skipped.append(Skip(target, "rate_limited", _ms(state.rate_retry_after_s)))
        else:
            keep.append(target)
    if found.complexity is not None and not keep and all(s.reason == "missing_credentials" for s in skipped):
        if hint not in (None, "mock"):
            raise errors.MissingCredentials(f"provider {hint!r} has no usable credentials")
        return filter_plan(_route([Target(*FALLBACK)], found.complexity, hint), states)
    return Plan(keep, skipped, found.complexity)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000 + 0.999))
