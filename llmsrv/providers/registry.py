"""The static table of providers: one row per provider key, and ``build_providers`` over it.

An HTTP API is an ``HttpRow`` (``api.py``), a command-line agent a ``CliRow`` (``cli.py``);
claude, codex and gemini have both (the API, or the vendor's CLI on the user's login: ``[providers.X]
transport``, ``ApiOrCliProvider``); ``jules`` (a task API) and ``mock`` are drivers of their own.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from ..config import Config, ProviderConfig, ServerConfig
from . import Provider
from .api import HttpApiProvider, HttpRow
from .auth import ApiKeyHeader, Auth, CopilotExchange, Key, copilot_api_token_file, gh_auth_token
from .cli import ApiOrCliProvider, CliProvider, CliRow
from .codecs import anthropic, cli_dialects, gemini, openai_chat, openai_responses
from .jules import JulesProvider
from .mock import MockProvider


def _anthropic_key(key: Key, provider: str) -> Auth:
    return ApiKeyHeader(key, "x-api-key", {"anthropic-version": anthropic.API_VERSION}, provider=provider)


def _google_key(key: Key, provider: str) -> Auth:
    return ApiKeyHeader(key, "x-goog-api-key", provider=provider)


def _copilot(key: Key, provider: str) -> Auth:
    return CopilotExchange(key, provider=provider)


def _github_catalog(base: str) -> str:
    # the catalog lives beside the inference API: https://models.github.ai/catalog/models
    return base.removesuffix("/inference") + "/catalog/models" if base.endswith("/inference") else base + "/models"


def _openrouter_model(model: str) -> str:
    return "openrouter/auto" if model == "auto" else model  # its Auto Router


HTTP_ROWS: dict[str, HttpRow] = {row.name: row for row in (
    HttpRow(name="claude", codec=anthropic.CODEC, base_url="https://api.anthropic.com",
            key_env=("ANTHROPIC_API_KEY", "CLAUDE_API_KEY"), auth=_anthropic_key,
            models_url=lambda base: base + "/v1/models", models_params={"limit": "1000"},
            models_reason=anthropic.models_listed, probe_raises=True),
    HttpRow(name="gemini", codec=gemini.CODEC, base_url="https://generativelanguage.googleapis.com",
            key_env=("GEMINI_API_KEY", "GOOGLE_API_KEY"), auth=_google_key,
            models_url=lambda base: base + gemini.API + "/models", models_params={"pageSize": "1"}),
    # OpenAI: Chat Completions, or the Responses API for the models only it serves.
    HttpRow(name="codex", codec=openai_chat.CODEC, base_url="https://api.openai.com/v1",
            key_env=("OPENAI_API_KEY", "CODEX_API_KEY"),
            alternate=(openai_responses.is_responses_only, openai_responses.CODEC)),
    # GitHub Models inference; model ids are ``publisher/name`` (``openai/gpt-4.1``).
    HttpRow(name="github", codec=openai_chat.CODEC, base_url="https://models.github.ai/inference",
            key_env=("GITHUB_TOKEN", "GH_TOKEN"), headers={"x-github-api-version": "2022-11-28"},
            models_url=_github_catalog),
    # Attribution: ``X-Title: llmsrv``, and ``HTTP-Referer`` (the app URL it ranks apps by) when set.
    HttpRow(name="openrouter", codec=openai_chat.CODEC, base_url="https://openrouter.ai/api/v1",
            key_env=("OPENROUTER_API_KEY",), headers={"x-title": "llmsrv"},
            env_headers={"http-referer": "OPENROUTER_HTTP_REFERER"}, wire_model=_openrouter_model),
    # Any OpenAI-compatible server (vLLM, llama.cpp, Ollama, LiteLLM...); the key is optional.
    HttpRow(name="openai_compat", codec=openai_chat.CODEC, base_url_hint='e.g. "http://127.0.0.1:8000/v1"',
            key_env=("OPENAI_COMPAT_API_KEY",), key_required=False),
    # GitHub Copilot: base_url is the GitHub API, where the token exchange lives (``auth.py``).
    HttpRow(name="copilot", codec=openai_chat.CODEC, base_url="https://api.github.com",
            key_env=("COPILOT_GITHUB_TOKEN", "GITHUB_COPILOT_TOKEN", "GITHUB_TOKEN", "GH_TOKEN"), auth=_copilot,
            key_sources=(copilot_api_token_file, gh_auth_token)),  # the predecessor's sources too
)}

CLI_ROWS: dict[str, CliRow] = {row.name: row for row in (
    # cursor-agent in print mode with stream-json output (sources in codecs/stream_json.py and cli.py).
    CliRow(name="cursor", key_env="CURSOR_API_KEY",
           command=("cursor-agent", "--print", "--output-format", "stream-json", "--model", "{model}", "{prompt}")),
)}

# The vendors' own CLIs, the second transport of the HTTP rows of the same name, on the user's login
# (commands, dialects and login places traced in codecs/cli_dialects.py).
LOGIN_ROWS: dict[str, CliRow] = {row.name: row for row in (
    CliRow(name="claude", command=cli_dialects.CLAUDE_COMMAND, dialect=cli_dialects.CLAUDE,
           login=cli_dialects.CLAUDE_LOGIN, subscription=True),
    CliRow(name="codex", command=cli_dialects.CODEX_COMMAND, dialect=cli_dialects.CODEX,
           login=cli_dialects.CODEX_LOGIN, subscription=True),
    CliRow(name="gemini", command=cli_dialects.GEMINI_COMMAND, dialect=cli_dialects.GEMINI,
           login=cli_dialects.GEMINI_LOGIN, subscription=True),
)}


def build_provider(key: str, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *,
                   server: ServerConfig | None = None) -> Any:
    """The provider for ``key`` (its concrete class: tests read ``key``, ``auth``...)."""
    if key in LOGIN_ROWS:
        return ApiOrCliProvider(HTTP_ROWS[key], LOGIN_ROWS[key], cfg, env, server=server)
    if key in HTTP_ROWS:
        return HttpApiProvider(HTTP_ROWS[key], cfg, env, server=server)
    if key in CLI_ROWS:
        return CliProvider(cfg, env, row=CLI_ROWS[key], server=server)
    if key == "jules":
        return JulesProvider(cfg, env, server=server)
    raise KeyError(key)


KEYS = (*HTTP_ROWS, "jules", *CLI_ROWS)


def build_providers(cfg: Config, env: Mapping[str, str] | None = None,
                    only: Collection[str] | None = None) -> dict[str, Provider]:
    """Every provider (or those named in ``only``)."""
    env = os.environ if env is None else env
    providers: dict[str, Provider] = {}
    for key in ("mock", *KEYS):
        if only is None or key in only:
            providers[key] = MockProvider(cfg.providers.mock) if key == "mock" else build_provider(
                key, getattr(cfg.providers, key), env, server=cfg.server)
    return providers
