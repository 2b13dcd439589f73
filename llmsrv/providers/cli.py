"""Command-line agents as providers: a ``CliRow`` (binary and command template, key variable, name)
on the subprocess transport (``process.py``) with the stream-JSON codec (``codecs/stream_json.py``).

* **Rows.** ``cursor`` is the row in ``registry.py`` today; a CLI speaking stream-JSON is another
  row (Claude Code, Codex CLI ``exec --json``, ...). ``[providers.X] command`` replaces the row's
  template; ``{model}`` and ``{prompt}`` are replaced inside each element per call.
* **Credentials.** The environment is passed through: the CLI finds its key there (the row's
  ``key_env``, e.g. ``CURSOR_API_KEY``) or in its own login state. ``api_key_env`` names a variable
  whose value is handed to the CLI as ``key_env`` (``NAME_FILE`` works too); status reports whether
  it is set, never its value.
* **Missing executable.** The binary (the template's first element) is looked up on ``PATH``
  when the provider is built and at every ``status()``: missing, the provider is unavailable with
  reason ``cursor-agent not found on PATH`` (state ``missing``) so routing skips it, and a direct
  ``complete()`` raises ``MissingCredentials`` (the provider cannot be used on this host; the
  router moves on to the next candidate, and the breaker does not count it).
* ``probe()`` runs ``<binary> --version`` (bounded).

Sources: every flag of the default command (``--print``, ``--output-format stream-json``,
``--model``, the prompt, ``--version`` for the probe), the key variable and every event field
the fold reads are traced to the Cursor CLI docs, page and section, in the table of
``codecs/stream_json.py`` (``usage`` on the result is not documented there: where it was seen
instead, and that its absence is tolerated, is written there too). ``--stream-partial-output``
is deliberately not used: it repeats text in consolidated events (forum.cursor.com thread
156289), which would stream it twice. Model ``auto`` is passed as ``--model auto`` (Cursor's own
choice).

Configuration (``[providers.cursor]``): ``command`` replaces the template; ``{model}`` and
``{prompt}`` are replaced inside each element per call. Newer cursor-agent releases can be told
``--trust`` (headless workspace trust) or ``--mode ask`` (read-only) the same way. The agent runs
in llmsrv's working directory and may read it. Other CLIs, for instance Claude Code (which needs
``--verbose`` with stream-json in print mode) or Codex CLI::

    [providers.cursor]
    command = ["claude", "-p", "--output-format", "stream-json", "--verbose", "--model", "{model}", "{prompt}"]
    # command = ["codex", "exec", "--json", "--skip-git-repo-check", "--model", "{model}", "{prompt}"]
    kill_grace_s = 2.0

Requests then use ``cursor:<model>`` (for example ``cursor:sonnet``). ``api_key_env`` names a
variable whose value is handed to the CLI as ``CURSOR_API_KEY`` (``NAME_FILE`` works too).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from .. import errors
from ..config import ProviderConfig, ServerConfig
from . import Call, Completion, OnDelta, ProviderStatus
from .auth import Key
from .codecs import Origin
from .codecs.stream_json import StreamJsonFold, argv
from .process import ProcessTransport


@dataclass(frozen=True, kw_only=True)
class CliRow:
    """One command-line agent: its name, default command template and the variable it reads its key from."""

    name: str
    command: tuple[str, ...] = ()
    key_env: str | None = None


CUSTOM = CliRow(name="cli")  # a CLI given entirely by configuration (``command``)


class CliProvider:
    """A stream-json CLI as a provider: the row's command, one process per call."""

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

    # -- status -----------------------------------------------------------------------------

    def _which(self) -> str | None:
        if not self.command:
            return None
        return shutil.which(self.command[0], path=self._env.get("PATH"))

    def status(self) -> ProviderStatus:
        if not self.command:
            return ProviderStatus(False, f"no command configured ([providers.{self.name}] command)", state="invalid")
        self.executable = self._which()
        if self.executable is None:
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
        if self._key.value and self.key_env:
            env[self.key_env] = self._key.value  # from api_key_env or NAME_FILE; the CLI reads only key_env
        return env

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        command = self.argv(call)
        fold = StreamJsonFold(call, Origin(self.name, (self._key.value,)), os.path.basename(command[0]))
        return await self.transport.exchange(command, self._child_env(), fold, on_delta)

    async def probe(self) -> ProviderStatus:
        """``<binary> --version`` within ``PROBE_TIMEOUT_S``: available when it exits 0."""
        status = self.status()
        if not status.available or self.executable is None:
            return status
        return await self.transport.version(self.executable, self._child_env())
