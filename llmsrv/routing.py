"""Model selection: a request and the providers' availability in, an ordered candidate list out.

Pure (no I/O, no clock). Rules, in order:
1. ``model = "provider:model"``: exactly that provider; the model part goes through the aliases.
2. A bare model name: the provider hint if given, else the first matching prefix rule.
3. ``model = "auto"``: the cell of the task_type x complexity matrix (task aliases folded, a
   missing complexity read as ``medium``), filtered by the provider hint.
Unavailable candidates (no credentials) are dropped; when ``auto`` leaves nothing, the mock
provider answers (CONTRACT section 5: with no real provider configured, ``auto`` routes to mock).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from . import errors
from .config import RoutingConfig
from .messages import TASK_ALIASES, LLMRequest
from .providers import PROVIDER_KEYS

MODEL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("claude-", "claude"), ("gemini-", "gemini"), ("gpt-", "codex"), ("o1", "codex"),
    ("o3", "codex"), ("o4", "codex"), ("codex-", "codex"), ("echo", "mock"), ("lorem", "mock"),
)
FALLBACK = ("mock", "echo")


class Target(msgspec.Struct, frozen=True):
    provider: str
    model: str

    @property
    def spec(self) -> str:
        return f"{self.provider}:{self.model}"


def _split(spec: str) -> tuple[str, str]:
    provider, _, model = spec.partition(":")
    return provider, model


def _check_provider(provider: str) -> None:
    if provider not in PROVIDER_KEYS:
        raise errors.ProviderNotFound(
            f"unknown provider {provider!r}; known: {', '.join(PROVIDER_KEYS)}")


def plan(request: LLMRequest, routing: RoutingConfig, available: Mapping[str, bool]) -> list[Target]:
    """Ordered candidates for ``request``. ``available`` maps provider key -> usable now."""
    alias = routing.aliases.get
    hint = request.provider
    if hint is not None:
        _check_provider(hint)

    if request.model != "auto":
        if ":" in request.model:
            provider, model = _split(request.model)
            _check_provider(provider)
        elif hint is not None:
            provider, model = hint, request.model
        else:
            provider = next((p for prefix, p in MODEL_PREFIXES if request.model.startswith(prefix)), "")
            model = request.model
            if not provider:
                raise errors.ProviderNotFound(
                    f"cannot tell the provider of model {request.model!r}: write it as provider:model")
        if not model:
            raise errors.ValidationFailed("model must be provider:model with a model part - at `$.model`")
        if not available.get(provider, False):
            raise errors.MissingCredentials(f"provider {provider!r} has no usable credentials")
        return [Target(provider, alias(model, model))]

    task = TASK_ALIASES.get(request.task_type, request.task_type)
    row = getattr(routing.matrix, task)
    cell: list[str] = getattr(row, request.complexity or "medium")
    candidates = [Target(p, alias(m, m)) for p, m in map(_split, cell) if hint in (None, p)]
    usable = [t for t in candidates if available.get(t.provider, False)]
    if usable:
        return usable
    if hint not in (None, "mock"):
        raise errors.MissingCredentials(f"provider {hint!r} has no usable credentials")
    return [Target(*FALLBACK)]
