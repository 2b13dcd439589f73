"""The HTTP API provider: one row (codec, base URL, key, auth strategy, headers, probe) on the HTTP transport.

Every chat-style upstream (claude, gemini, codex, github, openrouter, openai_compat, copilot) is an
``HttpApiProvider`` built from an ``HttpRow`` of ``registry.py``; what differs between them is data
in the row, and the wire format is the row's codec (``codecs/``).

* ``complete``: the row's codec for the model (``alternate``: codex's Responses-only models), the
  wire model name (``wire_model``: OpenRouter's ``auto``), the auth strategy's session, then one
  exchange on the transport. A ``MissingCredentials`` (401/403) is reported to the strategy, which
  drops a derived token (Copilot).
* ``probe()`` lists models (``GET`` the row's models URL): it never spends tokens. 2xx: available;
  401/403: ``invalid``; anything else: unavailable with the reason. A row with
  ``probe_raises`` raises the mapped error instead (claude: ``llmsrv check`` prints it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import errors
from ..config import ProviderConfig, ServerConfig
from . import Call, Completion, OnDelta, ProviderStatus
from .auth import Auth, Bearer, Key, KeySource, Session
from .codecs import Codec, HttpRequest, Origin
from .http import HttpTransport


def _same(model: str) -> str:
    return model


def _bearer(key: Key, provider: str) -> Auth:
    return Bearer(key)


@dataclass(frozen=True, kw_only=True)
class HttpRow:
    """What makes one HTTP provider: everything here is data (functions included, none with I/O)."""

    name: str
    codec: Codec
    base_url: str = ""  # the default; ``[providers.X] base_url`` replaces it
    base_url_hint: str = ""  # an example for the "no base_url" reason
    key_env: tuple[str, ...] = ()  # environment variables holding the key, first found wins
    key_sources: tuple[KeySource, ...] = ()  # then these (files, commands: auth.py)
    key_required: bool = True
    auth: Callable[[Key, str], Auth] = _bearer
    headers: Mapping[str, str] = field(default_factory=dict)  # fixed, on every request
    env_headers: Mapping[str, str] = field(default_factory=dict)  # header -> variable, sent when set
    wire_model: Callable[[str], str] = _same
    alternate: tuple[Callable[[str], bool], Codec] | None = None  # (models it serves, codec)
    models_url: Callable[[str], str] = lambda base: base + "/models"  # of the effective base URL
    models_params: Mapping[str, str] | None = None
    models_reason: Callable[[Any], str] | None = None  # read the listing (else the body is not read)
    probe_raises: bool = False

    def codec_for(self, model: str) -> Codec:
        if self.alternate is not None and self.alternate[0](model):
            return self.alternate[1]
        return self.codec


class HttpApiProvider:
    """A chat API as a provider: the row's codec on one ``HttpTransport``, authenticated by the row's strategy."""

    def __init__(self, row: HttpRow, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *,
                 server: ServerConfig | None = None) -> None:
        env = os.environ if env is None else env
        self.row = row
        self.name = row.name
        self.cfg = cfg
        self.base_url = (cfg.base_url or row.base_url).rstrip("/")
        self._key = Key.configured(env, cfg.api_key_env, row.key_env, row.key_sources)
        self.key = self._key.value
        self.auth = row.auth(self._key, row.name)
        self.headers = {**row.headers, **{h: env[v] for h, v in row.env_headers.items() if env.get(v)}}
        self.transport = HttpTransport.configured(row.name, self.base_url, cfg, server, self.auth.secrets)

    def status(self) -> ProviderStatus:
        if not self.base_url:
            if self.row.base_url_hint:
                return ProviderStatus(False, f"no base_url: set [providers.{self.name}] base_url "
                                      f"({self.row.base_url_hint})", state="missing")
            return ProviderStatus(False, "no base_url configured", state="missing")
        return self._key.status(required=self.row.key_required)

    async def aclose(self) -> None:
        await self.transport.aclose()

    def _headers(self, session: Session) -> dict[str, str]:
        return {**session.headers, **self.headers}

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        codec = self.row.codec_for(call.model)
        if (wire := self.row.wire_model(call.model)) != call.model:
            call = msgspec.structs.replace(call, model=wire)
        stream = on_delta is not None
        request = codec.request(call, stream=stream)
        session = await self.auth.session(self.transport)
        fold = codec.folder(call, Origin(self.name, self.auth.secrets()), stream=stream)
        try:
            return await self.transport.exchange(request, fold, on_delta, headers=self._headers(session),
                                                 base=session.base, status_error=codec.status_error)
        except errors.MissingCredentials:
            self.auth.refused(session)
            raise

    async def probe(self) -> ProviderStatus:
        """One authenticated model listing (see the module docstring)."""
        status = self.status()
        if not status.available:
            return status
        try:
            reason = await self._list_models()
        except errors.MissingCredentials as exc:
            if self.row.probe_raises:
                raise
            return ProviderStatus(False, exc.message, state="invalid")
        except errors.LlmsrvError as exc:
            if self.row.probe_raises:
                raise
            return ProviderStatus(False, exc.message)
        return ProviderStatus(True, reason)

    async def _list_models(self) -> str | None:
        session = await self.auth.session(self.transport)
        row = self.row
        request = HttpRequest(method="GET", path=row.models_url(session.base or self.base_url),
                              params=row.models_params)
        headers = self._headers(session)
        try:
            if row.models_reason is None:
                await self.transport.check(request, headers=headers, status_error=row.codec.status_error)
                return None
            return await self.transport.fetch(request, row.models_reason, headers=headers,
                                              status_error=row.codec.status_error)
        except errors.MissingCredentials:
            self.auth.refused(session)
            raise
