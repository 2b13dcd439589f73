"""Command-line agents as providers: a ``CliRow`` (command template, dialect, key or login) on the
subprocess transport (``process.py``) with the stream-JSON codec (``codecs/stream_json.py``); and
``ApiOrCliProvider``, which gives claude, codex and gemini the vendor's own CLI as a second transport.

* **Rows.** ``cursor`` is a row of its own (``cursor-agent``). Claude Code (``claude``), Codex CLI
  (``codex``) and Gemini CLI (``gemini``) are the CLI rows of the claude, codex and gemini
  providers, whose first transport is the HTTP API. Their commands, event dialects and login
  places are in ``codecs/cli_dialects.py``, each traced to the vendor's documentation.
  ``[providers.X] command`` replaces the row's template; ``{model}`` and ``{prompt}`` are replaced
  inside each element per call (the prompt is one argv element: no shell ever sees it).
* **Transport choice** (claude, codex, gemini: ``[providers.X] transport``, ``choose_transport``, a
  pure function): ``api`` is the HTTP API with a key; ``cli`` the vendor's CLI on the user's own
  login; ``auto`` (default) the API when a key is set (a key file that cannot be read counts: the
  API was meant, and its status says what is wrong), else the CLI when it is on ``PATH`` *and*
  logged in, else unavailable with a reason naming both ways. The reason is what ``status()``
  reports, so ``llmsrv check`` and ``/healthz`` show which transport and why. It is decided again
  at each ``status()`` and call, on facts at most ``LOOK_EVERY_S`` (1 s) old: ``status()`` runs for
  every request, and looking (``PATH``, the login files) costs ~0.1 ms. *Logged in* means one of the row's
  ``Login`` variables is set or one of its files exists (Claude Code: ``CLAUDE_CODE_OAUTH_TOKEN``
  or ``~/.claude/.credentials.json``; Codex: ``~/.codex/auth.json``; Gemini:
  ``~/.gemini/oauth_creds.json``); a login kept in an OS keychain is not seen, so there
  ``transport = "cli"`` is the way: it needs only the binary and lets the CLI use whatever login
  it has.
* **Through a login.** The CLI runs with llmsrv's environment minus the provider's API key
  variables (``api_key_env`` and the row's, also as ``NAME_FILE``), so it cannot bill a key
  instead of the subscription; a completion through it is marked ``subscription``, and its
  ``cost_cents`` is 0 whatever ``prices`` say (``pipeline.py``). Its usage is the CLI's own count
  where it reports one (Claude Code's and Gemini CLI's result, Codex's ``turn.completed``), else
  estimated.
* **Credentials of a plain CLI row** (cursor). The environment is passed through: the CLI finds its
  key there (the row's ``key_env``, e.g. ``CURSOR_API_KEY``) or in its own login state.
  ``api_key_env`` names a variable whose value is handed to the CLI as ``key_env`` (``NAME_FILE``
  works too); status reports whether it is set, never its value.
* **Missing executable.** The binary (the template's first element) is looked up on ``PATH``
  when the provider is built, by ``status()`` (at most every ``LOOK_EVERY_S``) and at every call:
  missing, the provider is unavailable with
  reason ``cursor-agent not found on PATH`` (state ``missing``) so routing skips it, and a direct
  ``complete()`` raises ``MissingCredentials`` (the provider cannot be used on this host; the
  router moves on to the next candidate, and the breaker does not count it).
* ``probe()`` runs ``<binary> --version`` (bounded); through the API, the API's probe.
* **Cancellation and deadlines** are the transport's: the CLI's process group gets SIGTERM, then
  SIGKILL after ``[providers.X] kill_grace_s`` (``process.py``), for every row alike.

Sources for cursor-agent: every flag of the default command (``--print``, ``--output-format
stream-json``, ``--model``, the prompt, ``--version`` for the probe), the key variable and every
event field the fold reads are traced to the Cursor CLI docs, page and section, in the table of
``codecs/stream_json.py`` (``usage`` on the result is not documented there: where it was seen
instead, and that its absence is tolerated, is written there too). ``--stream-partial-output``
is deliberately not used: it repeats text in consolidated events (forum.cursor.com thread
156289), which would stream it twice. Model ``auto`` is passed as ``--model auto`` (Cursor's own
choice).

Configuration::

    [providers.claude]
    transport = "auto"          # "api" | "cli" | "auto"
    kill_grace_s = 2.0
    # command = ["claude", "-p", "--output-format", "stream-json", "--verbose", "--model", "{model}", "{prompt}"]

    [providers.cursor]
    command = ["cursor-agent", "--print", "--output-format", "stream-json", "--trust", "--model", "{model}", "{prompt}"]

Requests keep naming the provider (``claude:sonnet``), whichever transport serves them. The
agents run in llmsrv's working directory and may read it; newer cursor-agent releases can be told
``--trust`` (headless workspace trust) or ``--mode ask`` (read-only) through ``command``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import msgspec

from .. import errors
from ..config import ProviderConfig, ServerConfig
from . import Call, Completion, OnDelta, ProviderStatus
from .api import HttpApiProvider, HttpRow
from .auth import Key
from .codecs import Origin
from .codecs.cli_dialects import AGENTS, Login
from .codecs.stream_json import Dialect, StreamJsonFold, argv
from .process import ProcessTransport


@dataclass(frozen=True, kw_only=True)
class CliRow:
    """One command-line agent: its name, default command template, event dialect, and how it authenticates."""

    name: str
    command: tuple[str, ...] = ()
    dialect: Dialect = field(default_factory=lambda: AGENTS)
    key_env: str | None = None  # the variable it reads a key from (handed ``api_key_env``'s value)
    login: Login | None = None  # where it keeps its own login (the vendors' CLIs)
    drop_env: tuple[str, ...] = ()  # removed from its environment (also as NAME_FILE): the API's key variables
    subscription: bool = False  # its completions are on the user's subscription: cost_cents 0


CUSTOM = CliRow(name="cli")  # a CLI given entirely by configuration (``command``)


class CliFacts(NamedTuple):
    """What ``auto`` needs to know about a CLI on this host (``CliProvider.facts``)."""

    binary: str
    executable: str | None  # its path on PATH; None: not installed
    login: str | None  # what shows a login (a file, a variable); None: none seen
    looked: str  # where a login was looked for
    how: str  # how a person logs in


def find_login(login: Login, env: Mapping[str, str]) -> tuple[str | None, str]:
    """(what shows a login or None, where it was looked for): the login variables, then the files."""
    for name in login.tokens:
        if env.get(name):
            return f"{name} is set", ""
    files = login.files(env)
    for path in files:
        if os.path.isfile(path):
            return path, ""
    looked = ", ".join([*login.tokens, *files]) if files or login.tokens else "nothing (no HOME)"
    return None, looked


class Choice(NamedTuple):
    """Which transport serves a provider now, and why (the reason ``status()`` and ``llmsrv check`` show)."""

    transport: Literal["api", "cli"] | None  # None: neither can be used
    reason: str
    state: str = "available"  # with transport None: "missing"


def choose_transport(setting: str, *, key_set: bool, missing_key: str, cli: CliFacts | None) -> Choice:
    """The ``[providers.X] transport`` decision (see the module docstring); no I/O.

    ``key_set``: an API key (or a key file) is configured; ``missing_key``: what to do without one;
    ``cli``: the CLI's facts, needed only when the key does not decide (``cli`` or ``auto`` without
    a key)."""
    if setting == "api" or (setting == "auto" and key_set):
        return Choice("api", f"transport api ({setting}): " + ("an API key is configured" if key_set else "no API key"))
    if cli is None:
        raise ValueError(f"transport {setting!r} needs the CLI's facts")
    if setting == "cli":
        if cli.executable is None:
            return Choice(None, f"transport cli: {cli.binary} not found on PATH", "missing")
        login = (f"logged in ({cli.login})" if cli.login is not None
                 else f"no login seen ({cli.looked}): the CLI's own login is used")
        return Choice("cli", f"transport cli (cli): {cli.binary} at {cli.executable}, {login}")
    if cli.executable is None:
        return Choice(None, f"{missing_key}; or install the {cli.binary} CLI and log in "
                            f"(transport auto: no API key, {cli.binary} not found on PATH)", "missing")
    if cli.login is None:
        return Choice(None, f"{missing_key}; or log in to the {cli.binary} CLI: {cli.how} "
                            f"(transport auto: no API key, and no {cli.binary} login in {cli.looked})", "missing")
    return Choice("cli", f"transport cli (auto): no API key; {cli.binary} at {cli.executable} is logged in "
                         f"({cli.login})")


class CliProvider:
    """A stream-json CLI as a provider: the row's command, one process per call."""

    LOOK_EVERY_S = 1.0  # status() runs per request: PATH and the login are looked at this often at most

    def __init__(self, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *, row: CliRow = CUSTOM,
                 name: str | None = None, server: ServerConfig | None = None) -> None:
        self.cfg = cfg
        self.row = row
        self.name = name or row.name
        self.key_env = row.key_env
        self._env = os.environ if env is None else env
        self.command = tuple(cfg.command) or row.command
        self._key = Key.lookup(self._env, tuple(n for n in (cfg.api_key_env, row.key_env) if n))
        self.transport = ProcessTransport(self.name, max_output=(server or ServerConfig()).max_upstream_bytes,
                                          kill_grace_s=cfg.kill_grace_s, secrets=lambda: (self._key.value,))
        self.executable = self._which()
        self._looked: tuple[float, CliFacts] | None = None

    # -- status -----------------------------------------------------------------------------

    def _which(self) -> str | None:
        if not self.command:
            return None
        return shutil.which(self.command[0], path=self._env.get("PATH"))

    def facts(self) -> CliFacts:
        """Is the CLI installed (on PATH) and logged in (its row's ``Login``)? Looked at again after
        ``LOOK_EVERY_S``."""
        now = time.monotonic()
        if self._looked is not None and now - self._looked[0] < self.LOOK_EVERY_S:
            return self._looked[1]
        self.executable = self._which()
        binary = os.path.basename(self.command[0]) if self.command else self.name
        if self.row.login is None:
            found = CliFacts(binary, self.executable, None, "nothing (no login places known)", "")
        else:
            login, looked = find_login(self.row.login, self._env)
            found = CliFacts(binary, self.executable, login, looked, self.row.login.how)
        self._looked = (now, found)
        return found

    def status(self) -> ProviderStatus:
        if not self.command:
            return ProviderStatus(False, f"no command configured ([providers.{self.name}] command)", state="invalid")
        if self.facts().executable is None:
            return ProviderStatus(False, f"{self.command[0]} not found on PATH", state="missing")
        if self.key_env is None:
            return ProviderStatus(True)
        if self._key.problem:
            return ProviderStatus(True, f"{self._key.problem}; relying on the CLI's own login")
        if self._key.value:
            return ProviderStatus(True, f"{self.key_env} is set")
        return ProviderStatus(True, f"{self.key_env} is not set; relying on the CLI's own login")

    async def aclose(self) -> None:
        pass  # nothing outlives a call

    # -- calls ------------------------------------------------------------------------------

    def argv(self, call: Call) -> list[str]:
        """The command for ``call``: binary resolved on PATH, placeholders substituted."""
        rest = argv(self.command[1:], call, self.name)
        self.executable = self._which()
        if self.executable is None:
            binary = self.command[0] if self.command else f"[providers.{self.name}] command"
            raise errors.MissingCredentials(f"{self.name} is unavailable: {binary} not found on PATH")
        return [self.executable, *rest]

    def _child_env(self) -> dict[str, str]:
        env = dict(self._env)
        for name in self.row.drop_env:
            env.pop(name, None)
            env.pop(f"{name}_FILE", None)
        if self._key.value and self.key_env:
            env[self.key_env] = self._key.value  # from api_key_env or NAME_FILE; the CLI reads only key_env
        return env

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        command = self.argv(call)
        fold = StreamJsonFold(call, Origin(self.name, (self._key.value,)), os.path.basename(command[0]),
                              self.row.dialect)
        completion = await self.transport.exchange(command, self._child_env(), fold, on_delta)
        return msgspec.structs.replace(completion, subscription=True) if self.row.subscription else completion

    async def probe(self) -> ProviderStatus:
        """``<binary> --version`` within ``PROBE_TIMEOUT_S``: available when it exits 0."""
        status = self.status()
        if not status.available or self.executable is None:
            return status
        return await self.transport.version(self.executable, self._child_env())


class ApiOrCliProvider(HttpApiProvider):
    """claude, codex or gemini: the HTTP API (the row) or the vendor's CLI (``cli_row``), per ``transport``."""

    def __init__(self, row: HttpRow, cli_row: CliRow, cfg: ProviderConfig, env: Mapping[str, str] | None = None,
                 *, server: ServerConfig | None = None) -> None:
        super().__init__(row, cfg, env, server=server)
        self.setting = cfg.transport
        # the CLI runs on its login: the API's key variables are kept from it
        keys = tuple(n for n in (cfg.api_key_env, *row.key_env, *cli_row.drop_env) if n)
        cli_row = dataclasses.replace(cli_row, name=row.name, drop_env=tuple(dict.fromkeys(keys)))
        self.cli = CliProvider(cfg, env, row=cli_row, server=server)

    def choice(self) -> Choice:
        """The transport now (``choose_transport`` on this host's facts; looks at the CLI only when needed)."""
        key_set = self._key.value is not None or self._key.problem is not None
        needs_cli = self.setting == "cli" or (self.setting == "auto" and not key_set)
        return choose_transport(self.setting, key_set=key_set, missing_key=self._key.missing(),
                                cli=self.cli.facts() if needs_cli else None)

    def status(self) -> ProviderStatus:
        choice = self.choice()
        if choice.transport == "api":
            api = super().status()
            return ProviderStatus(api.available, f"{choice.reason}: {api.reason}" if api.reason else choice.reason,
                                  api.state)
        if choice.transport == "cli":
            return ProviderStatus(True, choice.reason)
        return ProviderStatus(False, choice.reason, state=choice.state)

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        choice = self.choice()
        if choice.transport == "cli":
            return await self.cli.complete(call, on_delta)
        if choice.transport == "api":
            return await super().complete(call, on_delta)
        raise errors.MissingCredentials(f"{self.name}: {choice.reason}")

    async def probe(self) -> ProviderStatus:
        """Through the API, its probe; through the CLI, ``<binary> --version``; the reason names the transport."""
        choice = self.choice()
        if choice.transport is None:
            return ProviderStatus(False, choice.reason, state=choice.state)
        found = await (super().probe() if choice.transport == "api" else self.cli.probe())
        return ProviderStatus(found.available, f"{choice.reason}: {found.reason}" if found.reason else choice.reason,
                              found.state)

    async def aclose(self) -> None:
        await super().aclose()
        await self.cli.aclose()
