"""Pure routing, table-driven: matrix, aliases, hints, prefixes, capabilities, complexity, skips."""

from __future__ import annotations

from typing import Any

import pytest

from llmsrv import errors, routing
from llmsrv.config import build_config
from llmsrv.messages import LLMRequest, Message
from llmsrv.routing import ProviderState

CFG = build_config({}, env={})
UP = ProviderState()


def _req(text: str = "x", **kw: Any) -> LLMRequest:
    return LLMRequest(messages=[Message("user", text)], **kw)


def _states(*names: str, **special: ProviderState) -> dict[str, ProviderState]:
    return {**{n: UP for n in names}, "mock": UP, **special}


def _plan(kw: dict[str, Any], states: dict[str, ProviderState]) -> routing.Plan:
    return routing.plan(_req(**kw), CFG.routing, states)


@pytest.mark.parametrize(("kw", "states", "expected"), [
    ({"model": "mock:echo"}, _states(), ["mock:echo"]),
    ({"model": "echo"}, _states(), ["mock:echo"]),
    ({"model": "claude-opus-4-1"}, _states("claude"), ["claude:claude-opus-4-1"]),
    ({"model": "gpt-4o"}, _states("codex"), ["codex:gpt-4o"]),  # copilot first, but without credentials
    ({"model": "grok-code-fast-1"}, _states("copilot"), ["copilot:grok-code-fast-1"]),
    ({"model": "lorem", "provider": "mock"}, _states(), ["mock:lorem"]),
    ({"model": "claude:sonnet"}, _states("claude"), ["claude:claude-sonnet-4-6"]),
    ({}, _states(), ["mock:echo"]),
    ({"task_type": "tester", "complexity": "simple"}, _states(), ["mock:echo"]),
    ({"complexity": "simple"}, _states("gemini", "codex"), ["gemini:gemini-2.5-flash", "codex:o3-mini"]),
    ({"complexity": "complex", "provider": "claude"}, _states("claude", "codex"),
     ["claude:claude-sonnet-4-6", "claude:claude-opus-4-7"]),
    ({"task_type": "developer", "complexity": "simple"}, _states("copilot"),
     ["copilot:gpt-5-mini", "copilot:grok-code-fast-1"]),
    ({"task_type": "planning", "complexity": "medium"}, _states("openrouter", "claude"),
     ["claude:claude-sonnet-4-6", "openrouter:auto"]),
    ({"complexity": "complex", "capabilities": ["code"]}, _states("claude", "codex"),
     ["codex:gpt-5-codex", "claude:claude-sonnet-4-6", "claude:claude-opus-4-7"]),
    ({"complexity": "complex", "capabilities": ["reasoning"]}, _states("claude", "codex"),
     ["claude:claude-opus-4-7", "claude:claude-sonnet-4-6", "codex:gpt-5-codex"]),
    ({"complexity": "simple", "capabilities": ["cost"]}, _states("cursor", "gemini"),
     ["gemini:gemini-2.5-flash", "cursor:auto"]),
], ids=["explicit", "bare-mock", "bare-claude", "bare-gpt", "bare-grok", "bare-hint", "alias",
        "auto-falls-to-mock", "task-alias-mock", "auto-skips-missing", "hint-filters", "coder-alias",
        "architect-alias", "code-ranks", "reasoning-ranks", "unknown-model-neutral"])
def test_plan_candidates(kw: dict[str, Any], states: dict[str, ProviderState], expected: list[str]) -> None:
    assert [t.spec for t in _plan(kw, states).candidates] == expected


@pytest.mark.parametrize(("kw", "available", "expected"), [
    # the predecessor's provider hints, normalised
    ({"model": "sonnet", "provider": "claude-code"}, ("claude",), ["claude:claude-sonnet-4-6"]),
    ({"model": "gpt-4o", "provider": "github-copilot"}, ("copilot",), ["copilot:gpt-4o"]),
    ({"model": "grok-code-fast-1", "provider": "grok"}, ("copilot",), ["copilot:grok-code-fast-1"]),
    ({"model": "gemini-2.5-pro", "provider": "gemini-cli"}, ("gemini",), ["gemini:gemini-2.5-pro"]),
    ({"model": "gemini-2.5-pro", "provider": "google"}, ("gemini",), ["gemini:gemini-2.5-pro"]),
    ({"model": "o3-mini", "provider": "openai"}, ("codex",), ["codex:o3-mini"]),
    ({"model": "gpt-5-codex", "provider": "codex-cli"}, ("codex",), ["codex:gpt-5-codex"]),
    ({"provider": "claude-code", "complexity": "complex"}, ("claude", "codex"),
     ["claude:claude-sonnet-4-6", "claude:claude-opus-4-7"]),
    # a bare model: its family's providers, the first with credentials first, the others fallbacks
    ({"model": "gpt-4o"}, ("copilot", "codex", "github", "openrouter"),
     ["copilot:gpt-4o", "codex:gpt-4o", "github:openai/gpt-4o", "openrouter:openai/gpt-4o"]),
    ({"model": "gpt-4o"}, ("codex", "openrouter"), ["codex:gpt-4o", "openrouter:openai/gpt-4o"]),
    ({"model": "gpt-4o"}, ("github",), ["github:openai/gpt-4o"]),
    ({"model": "claude-opus-4-7"}, ("openrouter",), ["openrouter:anthropic/claude-opus-4-7"]),
    ({"model": "sonnet"}, ("claude",), ["claude:claude-sonnet-4-6"]),  # a bare alias, then its family
    ({"model": "opus"}, ("claude", "openrouter"), ["claude:claude-opus-4-7", "openrouter:anthropic/claude-opus-4-7"]),
    # the predecessor's worker tokens
    ({"model": "gpt-5-codex"}, ("copilot", "codex"), ["codex:gpt-5-codex"]),
    ({"model": "o3-mini-codex"}, ("codex",), ["codex:o3-mini"]),
    ({"model": "claude-sonnet-4.5"}, ("claude",), ["claude:claude-sonnet-4-5"]),
], ids=["claude-code", "github-copilot", "grok", "gemini-cli", "google", "openai", "codex-cli", "hint-auto",
        "gpt-family", "gpt-no-copilot", "gpt-github-only", "claude-openrouter", "bare-alias", "bare-alias-family",
        "worker-gpt-5-codex", "worker-o3-mini-codex", "worker-claude-sonnet-4.5"])
def test_predecessor_hints_and_model_families(kw: dict[str, Any], available: tuple[str, ...],
                                             expected: list[str]) -> None:
    plan = _plan(kw, _states(*available))
    assert [t.spec for t in plan.candidates] == expected
    assert all(s.reason == "missing_credentials" for s in plan.skipped)


def test_a_family_none_of_whose_providers_has_credentials_is_missing_credentials() -> None:
    with pytest.raises(errors.MissingCredentials):
        _plan({"model": "gpt-4o"}, _states("claude"))
    with pytest.raises(errors.ProviderNotFound):
        _plan({"model": "x", "provider": "no-such-alias"}, _states())


def test_families_and_hint_aliases_are_config() -> None:
    cfg = build_config({"routing": {"prefixes": {"mistral-": ["openrouter:mistralai/{model}", "openai_compat"]},
                                    "provider_aliases": {"my-vllm": "openai_compat"}}}, env={})
    found = routing.plan(_req(model="mistral-large"), cfg.routing, _states("openrouter", "openai_compat"))
    assert [t.spec for t in found.candidates] == ["openrouter:mistralai/mistral-large", "openai_compat:mistral-large"]
    hinted = routing.plan(_req(model="m", provider="my-vllm"), cfg.routing, _states("openai_compat"))
    assert [t.spec for t in hinted.candidates] == ["openai_compat:m"]
    with pytest.raises(Exception, match="routing"):  # a family that is not a list of providers: a config error
        build_config({"routing": {"prefixes": {"x-": 5}}}, env={})


def test_unknown_model_scores_neutral_not_top() -> None:
    # the predecessor scored unknown models 50 on a 1-10 scale; here cursor:auto gets 5 per capability
    cursor = routing.Target("cursor", "auto")
    flash = routing.Target("gemini", "gemini-2.5-flash")
    assert routing.capability_score(cursor, ["cost", "speed"], CFG.routing) == 10
    assert routing.capability_score(flash, ["cost", "speed"], CFG.routing) == 18


@pytest.mark.parametrize(("kw", "states", "skipped"), [
    ({"complexity": "simple"}, _states("gemini", "codex", codex=ProviderState(circuit_retry_after_s=2.5)),
     [("copilot:gpt-5-mini", "missing_credentials", None), ("copilot:grok-code-fast-1", "missing_credentials", None),
      ("codex:o3-mini", "circuit_open", 2500), ("cursor:auto", "missing_credentials", None)]),
    ({"complexity": "simple"}, _states("gemini", gemini=ProviderState(rate_retry_after_s=0.0101)),
     [("gemini:gemini-2.5-flash", "rate_limited", 11), ("copilot:gpt-5-mini", "missing_credentials", None),
      ("copilot:grok-code-fast-1", "missing_credentials", None), ("codex:o3-mini", "missing_credentials", None),
      ("cursor:auto", "missing_credentials", None)]),
    ({"model": "mock:echo"}, _states(mock=ProviderState(circuit_retry_after_s=1)),
     [("mock:echo", "circuit_open", 1000)]),
], ids=["breaker-and-credentials", "rate-limited", "explicit-open"])
def test_skip_reasons(kw: dict[str, Any], states: dict[str, ProviderState],
                      skipped: list[tuple[str, str, int | None]]) -> None:
    plan = _plan(kw, states)
    assert [(s.target.spec, s.reason, s.retry_after_ms) for s in plan.skipped] == skipped


def test_all_skipped_by_breaker_does_not_fall_back_to_mock() -> None:
    plan = _plan({"complexity": "simple"}, _states("gemini", gemini=ProviderState(circuit_retry_after_s=3)))
    assert plan.candidates == [] and plan.skipped[0].reason == "circuit_open"


@pytest.mark.parametrize(("kw", "error"), [
    ({"model": "acme:x"}, errors.ProviderNotFound),
    ({"model": "mystery-model"}, errors.ProviderNotFound),
    ({"provider": "acme"}, errors.ProviderNotFound),
    ({"model": "claude:sonnet"}, errors.MissingCredentials),
    ({"provider": "gemini"}, errors.MissingCredentials),
    ({"model": "mock:"}, errors.ValidationFailed),
], ids=["unknown-provider", "unknown-bare", "unknown-hint", "no-creds", "hint-no-creds", "empty-model"])
def test_routing_errors(kw: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        _plan(kw, _states())


def test_prefix_rules_are_config_and_longest_wins() -> None:
    cfg = build_config({"routing": {"prefixes": {"gpt-4o": "copilot"}}}, env={})
    assert routing.plan(_req(model="gpt-4o-mini"), cfg.routing, _states("copilot")).candidates[0].spec \
        == "copilot:gpt-4o-mini"
    assert routing.plan(_req(model="gpt-5"), cfg.routing, _states("codex")).candidates[0].spec == "codex:gpt-5"


@pytest.mark.parametrize(("text", "messages", "expected"), [
    ("hello, what is the capital of France?", 1, "simple"),
    ("translate 'good morning' to German", 1, "simple"),
    ("Explain how this function works and fix the bug:\n```\ndef f(x): return x+1\n```", 1, "medium"),
    ("Design a distributed rate limiter architecture; reason about the trade-offs step by step.", 1,
     "complex"),
    ("word " * 400, 1, "medium"),
    ("Review this code: " + "x = compute(y)\n" * 120, 1, "medium"),
    ("Refactor the module for concurrency and security; write tests. " + "context " * 300, 8, "complex"),
], ids=["question", "translate", "debug-code", "architecture", "long-plain", "long-code", "big-context"])
def test_complexity_inference(text: str, messages: int, expected: str) -> None:
    msgs = [Message("user", text)] * messages
    assert routing.infer_complexity(msgs, CFG.routing.complexity) == expected


def test_inferred_complexity_picks_the_matrix_cell() -> None:
    plan = _plan({}, _states())
    assert plan.complexity == "simple"
    complex_req = _req("Design a distributed system architecture and prove it is correct step by step")
    plan = routing.plan(complex_req, CFG.routing, _states("claude"))
    assert plan.complexity == "complex"
    assert [t.spec for t in plan.candidates] == ["claude:claude-sonnet-4-6", "claude:claude-opus-4-7"]


def test_complexity_thresholds_are_config() -> None:
    cfg = build_config({"routing": {"complexity": {"medium_at": 0, "complex_at": 1}}}, env={})
    assert routing.infer_complexity([Message("user", "compute 2+2")], cfg.routing.complexity) == "medium"


@pytest.mark.parametrize("kw", [
    {"model": "mock:echo"}, {"model": "claude-opus-4-1"}, {"model": "gpt-4o"}, {}, {"complexity": "simple"},
    {"complexity": "complex", "provider": "claude"}, {"task_type": "planning", "complexity": "medium"},
    {"complexity": "complex", "capabilities": ["code"]},
])
def test_with_every_provider_up_the_plan_is_the_route(kw: dict[str, Any]) -> None:
    """What ``Pipeline.plan`` answers without ``filter_plan`` when every provider the route reads is up."""
    found = routing.route(_req(**kw), CFG.routing)
    assert found.targets
    plan = routing.filter_plan(found, {name: UP for name in found.providers})
    assert plan == routing.Plan(list(found.targets), [], found.complexity)
