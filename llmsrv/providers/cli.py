"""Command-line agents as providers: ``cursor-agent`` by default, any stream-json CLI by config.

Theory of operation
-------------------
* **One call, one process.** ``complete()`` builds one prompt from the messages, substitutes it
  and the model into the command template and starts the CLI with ``trio.lowlevel.open_process``:
  argv only, never a shell (the prompt is one argv element whatever it contains), stdin closed,
  stdout and stderr piped, ``start_new_session=True`` so the CLI leads a process group of its own
  and everything it spawns can be signalled at once. The environment is passed through: the CLI
  finds its credentials there (``CURSOR_API_KEY``) or in its own login state.
* **The prompt.** System messages come first, as plain paragraphs. A conversation of one user
  message follows as is; a longer one is written out with role labels (``User:``,
  ``Assistant:``, ``Tool:``), one paragraph per message. ``max_tokens``, ``temperature`` and
  ``tools`` have no CLI equivalent and are not passed (the agent uses its own tools). A prompt
  that would start with ``-`` gets a leading space so no CLI parses it as an option.
* **Reading.** stdout is read as JSON lines (non-JSON lines are skipped): an ``assistant`` event
  reports its text through ``on_delta``; the ``result`` event is the end of the answer and its
  ``result`` field is the final text (with ``usage`` when present, else ``estimate_tokens``). The
  same decoder understands Claude Code's stream-json (same shape) and Codex CLI's ``exec --json``
  (``item.completed`` agent messages, ``turn.completed`` with usage). stderr is drained
  concurrently, keeping its tail for error messages.
* **Ending.** The CLI exiting 0 after a result is success. A non-zero exit is ``ProviderError``
  with the exit code and the last stderr line (the key redacted, then cut); exit 0 without a
  result is ``ProviderError("... no result")``; a result with ``is_error`` is ``ProviderError``.
  ``cursor-agent -p`` sometimes never exits after its result (cursor/cursor#3588): once the result
  is in, the CLI has ``AFTER_RESULT_S`` to exit before it is stopped, and the answer stands.
* **Stopping, always** (success, error or cancellation), shielded and bounded: if the CLI is
  still running, ``SIGTERM`` to its process group, up to ``kill_grace_s`` for it to exit, then
  ``SIGKILL`` to the group (whatever is left: a CLI ignoring SIGTERM, its children), then reap.
  The leader is reaped only after the group is killed, so the group id cannot have been reused.
  Leftover children of a CLI that exited on its own are killed the same way: nothing outlives the
  call. (Killed grandchildren are orphans reaped by PID 1, as for any daemon's children.)
* **No policy here.** No retry, no timeout: the router cancels the call; ``trio.Cancelled`` is
  re-raised after the cleanup. ``probe()`` (``<binary> --version``) is the one bounded wait.
* **Missing executable.** The binary (the template's first element) is looked up on ``PATH``
  when the provider is built and at every ``status()``: missing, the provider is unavailable with
  reason ``cursor-agent not found on PATH`` (state ``missing``) so routing skips it, and a direct
  ``complete()`` raises ``MissingCredentials`` (the provider cannot be used on this host; the
  router moves on to the next candidate, and the breaker does not count it).

Sources for the default command and the event format: the Cursor CLI docs, "Output format"
(https://cursor.com/docs/cli/reference/output-format: ``--print``, ``--output-format
stream-json``, NDJSON events ``system``/``user``/``assistant``/``tool_call``/``result``, "one line
per assistant message", terminal ``{"type": "result", "subtype": "success", "is_error": false,
"result": "<full text>", ...}``, "on failure, non-zero exit, error on stderr") and "Parameters"
(``--model``, ``--version``, ``--api-key`` or ``CURSOR_API_KEY``). ``--stream-partial-output``
is deliberately not used: it repeats text in consolidated events (forum.cursor.com thread 156289),
which would stream it twice. Model ``auto`` is passed as ``--model auto`` (Cursor's own choice).

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

import logging
import math
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from .. import errors
from ..config import ProviderConfig, ServerConfig
from ..messages import Message, Usage
from ..redact import clip
from . import Call, Completion, OnDelta, ProviderStatus, estimate_tokens
from .http import read_secret, too_large

log = logging.getLogger("llmsrv.providers.cli")

AFTER_RESULT_S = 0.5  # how long a CLI may linger after its result event before it is stopped
DRAIN_S = 0.5  # reading what is left in the pipes once the process group is dead
PROBE_TIMEOUT_S = 5.0
MAX_LINE_BYTES = 16 * 2**20
STDERR_TAIL_BYTES = 8192
DETAIL_CHARS = 300

_PLACEHOLDER = re.compile(r"\{(model|prompt)\}")
_LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


def build_prompt(messages: Sequence[Message]) -> str:
    """One text for a CLI that takes one prompt (see the module docstring)."""
    system = [m.content for m in messages if m.role == "system"]
    conversation = [m for m in messages if m.role != "system"]
    if len(conversation) == 1 and conversation[0].role == "user":
        turns = [conversation[0].content]
    else:
        turns = [f"{_LABELS[m.role]}: {m.content}" for m in conversation]
    prompt = "\n\n".join(system + turns)
    return " " + prompt if prompt.startswith("-") else prompt


def substitute(template: Sequence[str], model: str, prompt: str) -> list[str]:
    """``{model}`` and ``{prompt}`` replaced in one pass (a prompt containing "{model}" stays as is)."""
    values = {"model": model, "prompt": prompt}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], part) for part in template]


def _message_text(message: Any) -> str:
    """The text of an assistant message: a string, or the ``text`` blocks of a content list."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(str(block.get("text") or "") for block in content
                   if isinstance(block, dict) and block.get("type") == "text")


def _usage(raw: Any) -> Usage | None:
    """Claude/Codex ``input_tokens``/``output_tokens`` (Claude's cache counts added) or camelCase."""
    if not isinstance(raw, dict):
        return None

    def total(*keys: str) -> int | None:
        found = [int(raw[k]) for k in keys if isinstance(raw.get(k), int | float) and not isinstance(raw[k], bool)]
        return sum(found) if found else None

    prompt = total("input_tokens", "inputTokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    completion = total("output_tokens", "outputTokens")
    if prompt is None and completion is None:
        return None
    return Usage(prompt_tokens=prompt or 0, completion_tokens=completion or 0)


class EventDecoder:
    """Pure: stream-json lines in, deltas out; after the terminal event, ``done`` and the outcome."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.done = False
        self.text: str | None = None  # the final text, once a successful terminal event came
        self.usage: Usage | None = None
        self.error: str | None = None  # what the CLI reported as its failure, if it did

    def feed(self, line: bytes) -> str | None:
        """Decode one line; return the text to report as a delta, if any."""
        try:
            event = msgspec.json.decode(line)
        except msgspec.DecodeError:
            return None  # banners, warnings, anything not JSON
        if not isinstance(event, dict) or self.done:
            return None
        kind = event.get("type")
        text = ""
        if kind == "assistant":
            text = _message_text(event.get("message"))
        elif kind == "item.completed":  # Codex CLI
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "agent_message":
                text = str(item.get("text") or "")
        elif kind == "result":
            self.done = True
            self.usage = _usage(event.get("usage"))
            result = event.get("result")
            if event.get("is_error") or event.get("subtype") not in (None, "success"):
                self.error = str(result or event.get("subtype") or "error")
            else:
                self.text = result if isinstance(result, str) else "".join(self.parts)
                self.error = None
        elif kind == "turn.completed":  # Codex CLI
            self.done = True
            self.usage = _usage(event.get("usage"))
            self.text = "".join(self.parts)
            self.error = None  # an earlier "error" event was a notice the CLI recovered from
        elif kind in ("turn.failed", "error"):  # Codex CLI
            detail = event.get("error")
            self.error = str(detail.get("message") if isinstance(detail, dict) else event.get("message") or kind)
            self.done = kind == "turn.failed"
        if text:
            self.parts.append(text)
            return text
        return None


class _Tail:
    """The last bytes of a stream (stderr), read until EOF so the child never blocks writing."""

    def __init__(self, limit: int = STDERR_TAIL_BYTES) -> None:
        self.data = bytearray()
        self.limit = limit

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(65536):
            self.data += chunk
            del self.data[:-self.limit]

    def last_line(self, secrets: Sequence[str | None]) -> str:
        """The last non-blank line, redacted, then cut to ``DETAIL_CHARS``."""
        lines = [ln.strip() for ln in self.data.decode("utf-8", "replace").splitlines()]
        lines = [ln for ln in lines if ln]
        return clip(lines[-1], DETAIL_CHARS, secrets) if lines else ""


async def _lines(stream: trio.abc.ReceiveStream, on_line: Callable[[bytes], None], max_bytes: int,
                 provider: str) -> None:
    """Call ``on_line(bytes)`` for each line of ``stream`` until EOF (the last one may lack "\\n");
    more than ``max_bytes`` in all raises ``UpstreamTooLarge``."""
    buffer = bytearray()
    seen = 0
    while chunk := await stream.receive_some(65536):
        seen += len(chunk)
        if seen > max_bytes:
            raise too_large(provider, max_bytes)
        buffer += chunk
        *complete, rest = buffer.split(b"\n")
        buffer = bytearray(rest)
        for line in complete:
            on_line(bytes(line))
        if len(buffer) > MAX_LINE_BYTES:
            raise errors.ProviderError(f"an output line is longer than {MAX_LINE_BYTES} bytes")
    if buffer:
        on_line(bytes(buffer))


@asynccontextmanager
async def _collapsing_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure leaves as one plain exception, never an exception group.

    The router catches ``trio.Cancelled`` and ``ProviderError`` by class: a group of them would
    read as a bug. An error beats a cancellation (it is why the others were cancelled).
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        failures = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        raise (failures or leaves)[0] from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class _Child:
    """One CLI process leading its own process group, and the one way it is stopped."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the leader's pid is the group id
        self.exited = False  # the leader has exited (not yet reaped: the pgid stays reserved)
        self.signalled = False  # we had to signal a running leader
        self.reaped = False

    async def wait_exited(self) -> None:
        """Until the leader exits, without reaping it where a pidfd allows (Linux)."""
        try:
            fd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            fd = None
        if fd is None:  # reaps: the group is signalled by id right after, a negligible reuse window
            await self.proc.wait()
        else:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        self.exited = True

    def signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    async def stop(self, grace_s: float) -> None:
        """SIGTERM (if running), up to ``grace_s``, SIGKILL to the group, reap. Idempotent."""
        if self.reaped:
            return
        with trio.CancelScope(shield=True):
            if not self.exited:
                self.signalled = True
                self.signal_group(signal.SIGTERM)
                with trio.move_on_after(grace_s):
                    await self.wait_exited()
            self.signal_group(signal.SIGKILL)
            await self.proc.wait()
            self.reaped = True

    async def aclose(self, grace_s: float) -> None:
        """``stop``, then close our ends of the pipes (once no task reads them any more)."""
        await self.stop(grace_s)
        with trio.CancelScope(shield=True):
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    await stream.aclose()


class CliProvider:
    """A stream-json CLI as a provider; subclasses set ``name``, ``default_command``, ``key_env``."""

    name = "cli"
    default_command: tuple[str, ...] = ()
    key_env: str | None = None  # the variable the CLI reads its key from (reported, never shown)

    def __init__(self, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *,
                 name: str | None = None, server: ServerConfig | None = None) -> None:
        self.cfg = cfg
        self.max_output = (server or ServerConfig()).max_upstream_bytes  # stdout bytes per call
        self.name = name or self.name
        self._env = os.environ if env is None else env
        self.command = tuple(cfg.command) or self.default_command
        names = tuple(n for n in (cfg.api_key_env, self.key_env) if n)
        self._key, self._key_problem = read_secret(self._env, names) if names else (None, None)
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
        if self._key_problem:
            return ProviderStatus(True, f"{self._key_problem}; relying on the CLI's own login")
        if self._key:
            return ProviderStatus(True, f"{self.key_env} is set")
        return ProviderStatus(True, f"{self.key_env} is not set; relying on the CLI's own login")

    def has_model(self, model: str) -> bool:
        return True  # the CLI knows its models; an unknown one fails the call

    # -- calls ------------------------------------------------------------------------------

    def argv(self, call: Call) -> list[str]:
        """The command for ``call``: binary resolved on PATH, placeholders substituted."""
        if any(c.isspace() for c in call.model) or call.model.startswith("-") or not call.model:
            raise errors.ProviderNotFound(f"{self.name}: invalid model id {call.model!r}")
        self.executable = self._which()
        if self.executable is None:
            binary = self.command[0] if self.command else f"[providers.{self.name}] command"
            raise errors.MissingCredentials(f"{self.name} is unavailable: {binary} not found on PATH")
        return [self.executable, *substitute(self.command[1:], call.model, build_prompt(call.messages))]

    def _child_env(self) -> dict[str, str]:
        env = dict(self._env)
        if self._key and self.key_env:
            env[self.key_env] = self._key  # from api_key_env or NAME_FILE; the CLI reads only key_env
        return env

    async def _start(self, argv: list[str]) -> _Child:
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, env=self._child_env())
        except OSError as exc:
            raise errors.ProviderError(f"{self.name}: cannot start {os.path.basename(argv[0])} "
                                       f"({exc.strerror or type(exc).__name__})") from None
        log.debug("%s: started %s as pid %d", self.name, os.path.basename(argv[0]), proc.pid)
        return _Child(proc)

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        argv = self.argv(call)
        decoder = EventDecoder()
        stderr = _Tail()
        answered = trio.Event()  # the terminal event came, stdout ended, or the leader exited
        leader_gone = trio.Event()

        def on_line(line: bytes) -> None:
            delta = decoder.feed(line)
            if delta and on_delta is not None:
                on_delta(delta)
            if decoder.done:
                answered.set()

        child = await self._start(argv)
        assert child.proc.stdout is not None and child.proc.stderr is not None
        stdout_stream, stderr_stream = child.proc.stdout, child.proc.stderr

        async def read_stdout() -> None:
            await _lines(stdout_stream, on_line, self.max_output, self.name)
            answered.set()

        async def watch_leader() -> None:
            await child.wait_exited()
            leader_gone.set()
            answered.set()

        try:
            async with _collapsing_nursery() as nursery:
                nursery.start_soon(read_stdout)
                nursery.start_soon(stderr.collect, stderr_stream)
                nursery.start_soon(watch_leader)
                await answered.wait()
                # After a result the CLI gets AFTER_RESULT_S to exit by itself; without one (stdout
                # closed early) it runs until it exits or the caller's deadline cancels the call.
                with trio.move_on_after(AFTER_RESULT_S if decoder.done else math.inf):
                    await leader_gone.wait()
                await child.stop(self.cfg.kill_grace_s)
                # The whole group is dead: what is left in the pipes is read, then EOF.
                nursery.cancel_scope.deadline = trio.current_time() + DRAIN_S
        finally:
            await child.aclose(self.cfg.kill_grace_s)
        return self._outcome(call, child, decoder, stderr, os.path.basename(argv[0]))

    def _outcome(self, call: Call, child: _Child, decoder: EventDecoder, stderr: _Tail, binary: str) -> Completion:
        code = child.proc.returncode
        assert code is not None
        if not child.signalled and code != 0:
            how = f"exit code {code}" if code > 0 else f"signal {-code}"
            detail = stderr.last_line([self._key])
            raise errors.ProviderError(f"{self.name}: {binary} failed with {how}" + (f": {detail}" if detail else ""))
        if decoder.error is not None:
            detail = clip(decoder.error, DETAIL_CHARS, [self._key])
            raise errors.ProviderError(f"{self.name}: {binary} reported an error: {detail}")
        if decoder.text is None:
            raise errors.ProviderError(f"{self.name}: no result: {binary} exited 0 without a result event")
        usage = decoder.usage or Usage(prompt_tokens=sum(estimate_tokens(m.content) for m in call.messages),
                                       completion_tokens=estimate_tokens(decoder.text))
        return Completion(text=decoder.text, usage=usage)

    # -- probe ------------------------------------------------------------------------------

    async def probe(self) -> ProviderStatus:
        """``<binary> --version`` within ``PROBE_TIMEOUT_S``: available when it exits 0."""
        status = self.status()
        if not status.available or self.executable is None:
            return status
        out, err = _Tail(1024), _Tail()
        child = await self._start([self.executable, "--version"])
        try:
            with trio.move_on_after(PROBE_TIMEOUT_S) as bound:
                async with _collapsing_nursery() as nursery:
                    assert child.proc.stdout is not None and child.proc.stderr is not None
                    nursery.start_soon(out.collect, child.proc.stdout)
                    nursery.start_soon(err.collect, child.proc.stderr)
                    await child.wait_exited()
                    await child.stop(self.cfg.kill_grace_s)
                    nursery.cancel_scope.deadline = trio.current_time() + DRAIN_S
        finally:
            await child.aclose(self.cfg.kill_grace_s)
        binary = os.path.basename(self.executable)
        if bound.cancelled_caught:
            return ProviderStatus(False, f"{binary} --version did not answer within {PROBE_TIMEOUT_S:g}s",
                                  state="invalid")
        if child.proc.returncode != 0:
            detail = err.last_line([self._key]) or out.last_line([self._key])
            return ProviderStatus(False, f"{binary} --version exited {child.proc.returncode}: {detail}".rstrip(": "),
                                  state="invalid")
        version = out.last_line([self._key])
        return ProviderStatus(True, f"{binary} {version}".strip())


class CursorProvider(CliProvider):
    """``cursor-agent`` in print mode with stream-json output (sources in the module docstring)."""

    name = "cursor"
    default_command = ("cursor-agent", "--print", "--output-format", "stream-json", "--model", "{model}", "{prompt}")
    key_env = "CURSOR_API_KEY"
