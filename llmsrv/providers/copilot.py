"""GitHub Copilot chat: a GitHub token exchanged for a short-lived Copilot token, then OpenAI-style
Chat Completions (the translation of ``openai.py``).

The Copilot API is not publicly documented; the shapes and headers follow what open-source clients
send and document: LiteLLM (``litellm/llms/github_copilot``: authenticator and ``common_utils``),
Roo-Code (``packages/types/src/providers/copilot.ts``) and the n8n Copilot node's API notes.

* **Exchange**: ``GET {base_url}/copilot_internal/v2/token`` with ``Authorization: token <github token>``
  answers ``{token, expires_at (unix s), refresh_in, endpoints: {api}}``. ``base_url`` is the GitHub
  API (default ``https://api.github.com``; GitHub Enterprise: ``https://HOST/api/v3``), so a test points
  ``[providers.copilot] base_url`` at one fake server that also answers the chat calls (the fake sets
  ``endpoints.api`` to itself).
* **Cache**: the Copilot token is reused until ``REFRESH_MARGIN_S`` before ``expires_at``. A
  ``trio.Lock`` covers check-and-exchange, so any number of concurrent calls cause one exchange. A
  401/403 from the chat endpoint drops the cached token (revoked or expired early): the next call
  exchanges again. Neither token appears in an error (``secrets`` holds both).
* **Chat**: ``POST {endpoints.api or https://api.githubcopilot.com}/chat/completions`` with
  ``Authorization: Bearer <copilot token>`` and the editor identity the API checks:
  ``Copilot-Integration-Id: vscode-chat``, ``Editor-Version``, ``Editor-Plugin-Version``,
  ``User-Agent`` and ``Openai-Intent: conversation-panel`` (LiteLLM's set, without its
  ``X-GitHub-Api-Version``, which the n8n notes found to break chat calls). Models: ``GET {api}/models``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import msgspec
import trio

from .. import errors
from ..config import ProviderConfig, ServerConfig
from ..redact import register
from . import Call, Completion, OnDelta
from .http import map_transport_errors
from .openai import OpenAIChatProvider

DEFAULT_API = "https://api.githubcopilot.com"
TOKEN_PATH = "/copilot_internal/v2/token"
REFRESH_MARGIN_S = 60.0
_EDITOR = {
    "editor-version": "vscode/1.95.0",
    "editor-plugin-version": "copilot-chat/0.26.7",
    "user-agent": "GitHubCopilotChat/0.26.7",
}
_CHAT_HEADERS = {**_EDITOR, "copilot-integration-id": "vscode-chat", "openai-intent": "conversation-panel"}


class CopilotSession(msgspec.Struct, frozen=True):
    token: str
    api: str  # the chat API base the exchange named
    fresh_until: float  # time.time() after which the token is exchanged again


class CopilotStatistics(msgspec.Struct, frozen=True):
    exchanges: int
    fresh_until: float | None  # of the cached token, if any


class CopilotProvider(OpenAIChatProvider):
    name = "copilot"
    key_env = ("COPILOT_GITHUB_TOKEN", "GITHUB_TOKEN", "GH_TOKEN")
    default_base_url = "https://api.github.com"  # where the token exchange lives

    def __init__(self, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *,
                 server: ServerConfig | None = None) -> None:
        super().__init__(cfg, env, server=server)
        self._session: CopilotSession | None = None
        self._last_token: str | None = None  # kept after a drop: an error could still echo it
        self._lock = trio.Lock()
        self._exchanges = 0

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self.key, self._last_token)

    def statistics(self) -> CopilotStatistics:
        return CopilotStatistics(self._exchanges, self._session.fresh_until if self._session else None)

    async def session(self) -> CopilotSession:
        """The cached Copilot token, exchanged (once, for every waiting caller) when stale."""
        async with self._lock:
            session = self._session
            if session is None or time.time() >= session.fresh_until:
                session = self._session = await self._exchange()
            return session

    async def _exchange(self) -> CopilotSession:
        if not self.key:
            raise errors.MissingCredentials(f"copilot: {self.status().reason}")
        headers = {"authorization": f"token {self.key}", "accept": "application/json", **_EDITOR}
        try:
            data = await self.call_json("GET", self.base_url + TOKEN_PATH, headers=headers)
        except errors.ProviderNotFound:  # GitHub answers 404 to accounts without Copilot
            raise errors.MissingCredentials("copilot: the GitHub token has no Copilot access "
                                            "(the token exchange answered 404)") from None
        with map_transport_errors(self.name, self.secrets):
            token, expires_at = data["token"], data["expires_at"]
            api = (data.get("endpoints") or {}).get("api") or DEFAULT_API
        if not (isinstance(token, str) and token and isinstance(expires_at, int | float) and isinstance(api, str)):
            raise errors.ProviderError("copilot: malformed token exchange reply")
        register(token)  # the logging filter removes it from every record from now on
        self._last_token = token
        self._exchanges += 1
        return CopilotSession(token, api.rstrip("/"), expires_at - REFRESH_MARGIN_S)

    def _headers(self, session: CopilotSession) -> dict[str, str]:
        return {"authorization": f"Bearer {session.token}", **_CHAT_HEADERS}

    @contextmanager
    def _refused_drops(self, session: CopilotSession) -> Iterator[None]:
        """A 401/403 with this token: forget it, so that the next call exchanges again."""
        try:
            yield
        except errors.MissingCredentials:
            if self._session is session:  # not already replaced by a concurrent caller
                self._session = None
            raise

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        session = await self.session()
        with self._refused_drops(session):
            return await self.chat(session.api, self._headers(session), call, on_delta)

    async def list_models(self) -> None:
        session = await self.session()
        with self._refused_drops(session):
            async with self.open("GET", session.api + "/models", headers=self._headers(session)):
                pass
