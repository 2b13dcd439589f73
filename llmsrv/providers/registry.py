"""Which provider key is served by which class (modules are imported on first use)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from ..config import Config
from . import Provider
from .mock import MockProvider

IMPLEMENTATIONS = {
    "claude": "llmsrv.providers.claude:ClaudeProvider",
    "gemini": "llmsrv.providers.gemini:GeminiProvider",
    "codex": "llmsrv.providers.openai:CodexProvider",
    "github": "llmsrv.providers.openai:GitHubModelsProvider",
    "openrouter": "llmsrv.providers.openai:OpenRouterProvider",
    "openai_compat": "llmsrv.providers.openai:OpenAICompatProvider",
    "copilot": "llmsrv.providers.copilot:CopilotProvider",
    "jules": "llmsrv.providers.jules:JulesProvider",
    "cursor": "llmsrv.providers.cli:CursorProvider",
}


def build_providers(cfg: Config, env: Mapping[str, str] | None = None) -> dict[str, Provider]:
    env = os.environ if env is None else env
    providers: dict[str, Provider] = {"mock": MockProvider(cfg.providers.mock)}
    for key, spec in IMPLEMENTATIONS.items():
        module_name, class_name = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not written yet
                continue
            raise
        providers[key] = getattr(module, class_name)(getattr(cfg.providers, key), env, server=cfg.server)
    return providers
