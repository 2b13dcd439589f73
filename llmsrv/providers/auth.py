"""Credentials: where a key comes from (``read_secret``), and how each upstream wants it (auth strategies).

* **Keys** come from environment variables, first found wins, each also as ``NAME_FILE`` (a path
  whose content is the secret, for Docker/Kubernetes secrets). ``[providers.X] api_key_env`` names
  another variable, tried first. The secret is never logged, put in an error or a reply:
  ``read_secret`` registers it with ``llmsrv.redact`` (the logging filter removes it from every log
  record), and the transports redact every upstream text with it.
* **Other sources** a row may name, tried when no variable holds a key: for GitHub Copilot, as the
  predecessor did, the token file of the copilot-api proxy (``$XDG_DATA_HOME/copilot-api/github_token``,
  else ``~/.local/share/...``) and ``gh auth token`` (the GitHub CLI's login; run once at start-up,
  bounded). They read only the environment they are given (its ``HOME``, ``PATH``).
* **Strategies** turn the key into the headers of one call: an API-key header (``ApiKeyHeader``:
  Anthropic's ``x-api-key`` + ``anthropic-version``, Google's ``x-goog-api-key``; a missing key is
  ``MissingCredentials`` before any request), a bearer token (``Bearer``: no header without a key,
  for servers that need none), and the GitHub Copilot token exchange (``CopilotExchange``). A
  strategy hands out a ``Session`` (headers, and the API base when the exchange names one); a 401/403
  answered to a session is reported back with ``refused(session)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec
import trio

from .. import errors
from ..redact import register
from . import ProviderStatus
from .codecs import HttpRequest
from .http import HttpTransport


def read_secret(env: Mapping[str, str], names: Sequence[str]) -> tuple[str | None, str | None]:
    """(secret, problem): the first of ``names`` (or ``NAME_FILE``) that is set."""
    for name in names:
        if env.get(name):
            value = env[name].strip()
            register(value)
            return value, None
        path = env.get(f"{name}_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    value = fh.read().strip()
            except OSError as exc:
                return None, f"{name}_FILE is set but unreadable ({exc.strerror})"
            if not value:
                return None, f"{name}_FILE points to an empty file"
            register(value)
            return value, None
    return None, None


KeySource = Callable[[Mapping[str, str]], str | None]
GH_TIMEOUT_S = 5.0


def copilot_api_token_file(env: Mapping[str, str]) -> str | None:
    """The GitHub token the copilot-api proxy keeps after its device login, if there is one."""
    data_home = env.get("XDG_DATA_HOME") or (os.path.join(env["HOME"], ".local", "share") if env.get("HOME") else "")
    if not data_home:
        return None
    try:
        with open(os.path.join(data_home, "copilot-api", "github_token"), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def gh_auth_token(env: Mapping[str, str]) -> str | None:
    """``gh auth token``: the GitHub CLI's login, when ``gh`` is on the environment's PATH."""
    gh = shutil.which("gh", path=env.get("PATH", ""))
    if gh is None:
        return None
    try:
        done = subprocess.run([gh, "auth", "token"], capture_output=True, text=True, timeout=GH_TIMEOUT_S,
                              env=dict(env), stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


SOURCE_NAMES: dict[KeySource, str] = {copilot_api_token_file: "~/.local/share/copilot-api/github_token",
                                      gh_auth_token: "`gh auth login`"}


class Key(msgspec.Struct, frozen=True):
    """A provider's key as found (or not) in the environment."""

    value: str | None
    problem: str | None  # a ``NAME_FILE`` that could not be read
    names: tuple[str, ...]  # where it was looked for, in order

    @classmethod
    def lookup(cls, env: Mapping[str, str], names: Sequence[str]) -> Key:
        value, problem = read_secret(env, names) if names else (None, None)
        return cls(value, problem, tuple(names))

    @classmethod
    def configured(cls, env: Mapping[str, str], api_key_env: str | None, names: Sequence[str],
                   sources: Sequence[KeySource] = ()) -> Key:
        """``api_key_env`` (a provider section's own variable) first, then ``names``, then ``sources``."""
        key = cls.lookup(env, ((api_key_env,) if api_key_env else ()) + tuple(names))
        if key.value is None and key.problem is None:
            for source in sources:
                value = source(env)
                if value:
                    register(value)
                    return cls(value, None, key.names)
            key = cls(None, None, key.names + tuple(SOURCE_NAMES.get(s, "") for s in sources))
        return key

    def missing(self) -> str:
        """What to do about a missing key."""
        names = " or ".join(self.names)
        return f"no credentials: set {names} (or {self.names[0]}_FILE)" if self.names else "no credentials"

    def status(self, *, required: bool = True) -> ProviderStatus:
        """``invalid`` for an unreadable ``NAME_FILE``, ``missing`` without a required key, else available."""
        if self.problem:
            return ProviderStatus(False, self.problem, state="invalid")
        if self.value is None and required:
            return ProviderStatus(False, self.missing(), state="missing")
        return ProviderStatus(True)


class Session(msgspec.Struct, frozen=True):
    headers: dict[str, str]
    base: str | None = None  # the API base the credentials name, else the provider's base URL


class Auth(Protocol):
    def secrets(self) -> tuple[str | None, ...]: ...

    async def session(self, transport: HttpTransport) -> Session: ...

    def refused(self, session: Session) -> None:
        """The upstream answered 401/403 to ``session``."""
        ...


class ApiKeyHeader:
    """The key in one header (plus fixed ones); no request at all without a key."""

    def __init__(self, key: Key, header: str, extra: Mapping[str, str] | None = None, *, provider: str) -> None:
        self.key = key
        self.header = header
        self.extra = dict(extra or {})
        self.provider = provider

    def secrets(self) -> tuple[str | None, ...]:
        return (self.key.value,)

    async def session(self, transport: HttpTransport) -> Session:
        if self.key.value is None:
            raise errors.MissingCredentials(f"{self.provider}: {self.key.problem or self.key.missing()}")
        return Session({self.header: self.key.value, **self.extra})

    def refused(self, session: Session) -> None:
        pass


class Bearer:
    """``Authorization: Bearer <key>``, or no such header without a key; plus fixed headers."""

    def __init__(self, key: Key, extra: Mapping[str, str] | None = None) -> None:
        self.key = key
        self.extra = dict(extra or {})
        auth = {"authorization": f"Bearer {key.value}"} if key.value else {}
        self._session = Session({**auth, **self.extra})

    def secrets(self) -> tuple[str | None, ...]:
        return (self.key.value,)

    async def session(self, transport: HttpTransport) -> Session:
        return self._session

    def refused(self, session: Session) -> None:
        pass


# ---- GitHub Copilot --------------------------------------------------------------------------------
#
# The Copilot API is not publicly documented; the shapes and headers follow what open-source clients
# send and document: LiteLLM (``litellm/llms/github_copilot``: authenticator and ``common_utils``),
# Roo-Code (``packages/types/src/providers/copilot.ts``) and the n8n Copilot node's API notes.
#
# * Exchange: ``GET {base_url}/copilot_internal/v2/token`` with ``Authorization: token <github token>``
#   answers ``{token, expires_at (unix s), refresh_in, endpoints: {api}}``. ``base_url`` is the GitHub
#   API (default ``https://api.github.com``; GitHub Enterprise: ``https://HOST/api/v3``), so a test
#   points ``[providers.copilot] base_url`` at one fake server that also answers the chat calls (the
#   fake sets ``endpoints.api`` to itself).
# * Cache: the Copilot token is reused until ``REFRESH_MARGIN_S`` before ``expires_at``. A
#   ``trio.Lock`` covers check-and-exchange, so any number of concurrent calls cause one exchange. A
#   401/403 from the chat endpoint drops the cached token (revoked or expired early): the next call
#   exchanges again. Neither token appears in an error (``secrets`` holds both).
# * Chat: ``POST {endpoints.api or https://api.githubcopilot.com}/chat/completions`` with
#   ``Authorization: Bearer <copilot token>`` and the editor identity the API checks:
#   ``Copilot-Integration-Id: vscode-chat``, ``Editor-Version``, ``Editor-Plugin-Version``,
#   ``User-Agent`` and ``Openai-Intent: conversation-panel`` (LiteLLM's set, without its
#   ``X-GitHub-Api-Version``, which the n8n notes found to break chat calls). Models: ``GET {api}/models``.

COPILOT_API = "https://api.githubcopilot.com"
TOKEN_PATH = "/copilot_internal/v2/token"
REFRESH_MARGIN_S = 60.0
_EDITOR = {
    "editor-version": "vscode/1.95.0",
    "editor-plugin-version": "copilot-chat/0.26.7",
    "user-agent": "GitHubCopilotChat/0.26.7",
}
_CHAT_HEADERS = {**_EDITOR, "copilot-integration-id": "vscode-chat", "openai-intent": "conversation-panel"}


class CopilotStatistics(msgspec.Struct, frozen=True):
    exchanges: int
    fresh_until: float | None  # of the cached token, if any


class _Grant(msgspec.Struct, frozen=True):
    session: Session
    fresh_until: float  # time.time() after which the token is exchanged again


def _token_reply(data: Any) -> tuple[Any, Any, Any]:
    """(token, expires_at, api) of an exchange reply (a KeyError/TypeError here: malformed)."""
    api = (data.get("endpoints") or {}).get("api") or COPILOT_API
    return data["token"], data["expires_at"], api


class CopilotExchange:
    """A GitHub token exchanged for a short-lived Copilot token, cached, one exchange at a time."""

    def __init__(self, key: Key, *, provider: str = "copilot") -> None:
        self.key = key
        self.provider = provider
        self._grant: _Grant | None = None
        self._last_token: str | None = None  # kept after a drop: an error could still echo it
        self._lock = trio.Lock()
        self._exchanges = 0

    def secrets(self) -> tuple[str | None, ...]:
        return (self.key.value, self._last_token)

    def statistics(self) -> CopilotStatistics:
        return CopilotStatistics(self._exchanges, self._grant.fresh_until if self._grant else None)

    async def session(self, transport: HttpTransport) -> Session:
        """The cached Copilot token, exchanged (once, for every waiting caller) when stale."""
        async with self._lock:
            grant = self._grant
            if grant is None or time.time() >= grant.fresh_until:
                grant = self._grant = await self._exchange(transport)
            return grant.session

    def refused(self, session: Session) -> None:
        """A 401/403 with this token: forget it, so that the next call exchanges again."""
        if self._grant is not None and self._grant.session is session:  # not already replaced
            self._grant = None

    async def _exchange(self, transport: HttpTransport) -> _Grant:
        if not self.key.value:
            raise errors.MissingCredentials(f"{self.provider}: {self.key.problem or self.key.missing()}")
        headers = {"authorization": f"token {self.key.value}", "accept": "application/json", **_EDITOR}
        try:
            token, expires_at, api = await transport.fetch(HttpRequest(method="GET", path=TOKEN_PATH), _token_reply,
                                                           headers=headers)
        except errors.ProviderNotFound:  # GitHub answers 404 to accounts without Copilot
            raise errors.MissingCredentials(f"{self.provider}: the GitHub token has no Copilot access "
                                            "(the token exchange answered 404)") from None
        if not (isinstance(token, str) and token and isinstance(expires_at, int | float) and isinstance(api, str)):
            raise errors.ProviderError(f"{self.provider}: malformed token exchange reply")
        register(token)  # the logging filter removes it from every record from now on
        self._last_token = token
        self._exchanges += 1
        session = Session({"authorization": f"Bearer {token}", **_CHAT_HEADERS}, base=api.rstrip("/"))
        return _Grant(session, expires_at - REFRESH_MARGIN_S)
