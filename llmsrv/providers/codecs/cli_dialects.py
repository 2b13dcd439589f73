"""The vendors' own CLIs as stream-JSON dialects: Claude Code, Codex CLI and Gemini CLI. Pure.

Each vendor here is three things, all data: the default command (``{model}`` and ``{prompt}``
substituted by ``stream_json.argv``; the prompt is always one argv element, never through a
shell), the dialect (event ``type`` -> reader, for ``stream_json.StreamJsonFold``), and where
the CLI keeps its login (``Login``: the variables and files that show one; ``cli.py`` looks).
Every flag we pass and every field we read is traced below to the vendor's documentation; where
the documentation names a field without its shape, the vendor's published source is cited.

Claude Code (``CL`` = https://code.claude.com/docs/en/cli-reference, ``CH`` =
https://code.claude.com/docs/en/headless, ``CS`` = the Agent SDK reference,
https://docs.claude.com/en/docs/agent-sdk/typescript "Message types", whose messages are the lines
of ``--output-format stream-json``, ``CA`` = https://code.claude.com/docs/en/authentication)

=============================================  ==================================================================
flag / field                                   documented at
=============================================  ==================================================================
``--print``                                    CL (``-p, --print``: print the response without the interactive mode)
``--output-format stream-json``                CL, CH "Stream responses" (one JSON object a line)
``--verbose``                                  CL; CH's stream-json examples pass it (print mode refuses
                                               stream-json without it: github.com/anthropics/claude-code issue 733)
``--include-partial-messages``                 CL, CH "Stream responses" (text as ``stream_event`` deltas)
``--model {model}``                            CL (an alias, ``sonnet``/``opus``, or a full model name)
``-- {prompt}`` (last argument)                CL (``claude -p "query"``); ``--print -- <prompt>`` is how the Agent
                                               SDK runs it (claude-agent-sdk-python, subprocess_cli.py)
``--version`` (the probe)                      CL (``-v, --version``)
``type``                                       CS ``SDKMessage``: ``system`` (``subtype: "init"``), ``user``: read
                                               and ignored
``stream_event`` ``event``                     CS ``SDKPartialAssistantMessage`` (a raw Messages API stream event);
  ``.type == "content_block_delta"``,          CH's filter ``select(.type == "stream_event" and .event.delta.type?
  ``.delta.type == "text_delta"``, ``.text``   == "text_delta") | .event.delta.text``
``assistant`` ``message.content[]``            CS ``SDKAssistantMessage.message`` (a Messages API message: ``text``
  ``.type == "text"``, ``.text``               blocks); its text is a delta only without partial messages
``parent_tool_use_id``                         CS (set on a subagent's messages: not the answer, skipped)
``assistant`` ``error``                        CS ``SDKAssistantMessage.error``: ``authentication_failed`` ->
                                               MissingCredentials, ``billing_error``/``rate_limit`` (a plan's
                                               usage limit) -> QuotaExhausted, others ProviderError
``result`` ``subtype``, ``is_error``,          CS ``SDKResultMessage`` (``success`` or ``error_*``; ``is_error``
  ``result``                                   also on a ``success`` that failed; ``result``: the final text)
``result`` ``usage.input_tokens``,             CS ``SDKResultMessage.usage`` (the Messages API usage:
  ``cache_creation_input_tokens``,             https://docs.claude.com/en/api/messages; the cache counts are
  ``cache_read_input_tokens``,                 not in ``input_tokens``, so they are added to the prompt)
  ``output_tokens``
``result`` ``total_cost_usd``                  CS; NOT read: what the call would cost on the API, not what a
                                               subscriber pays (``cost_cents`` is 0 through a login)
login: ``~/.claude/.credentials.json``         CA "Credential management": Linux and Windows keep the login there,
  (``$CLAUDE_CONFIG_DIR/.credentials.json``)   in ``$CLAUDE_CONFIG_DIR`` when set; macOS in the Keychain, which
                                               ``auto`` cannot see (set ``transport = "cli"`` there)
login: ``CLAUDE_CODE_OAUTH_TOKEN``             CA (the long-lived subscription token of ``claude setup-token``)
key variables removed from its environment     CA "Authentication precedence": ``ANTHROPIC_API_KEY`` wins over the
                                               subscription login, so the CLI would bill the key
=============================================  ==================================================================

Codex CLI (``CE`` = https://developers.openai.com/codex/noninteractive, the same text as
github.com/openai/codex docs/exec.md; ``CX`` = its source, codex-rs/exec/src/exec_events.rs (the
event types) and cli.rs (the flags); ``CU`` = github.com/openai/codex docs/authentication.md)

=============================================  ==================================================================
``exec``                                       CE (non-interactive mode)
``--json``                                     CE "JSON output mode" (JSONL events on stdout)
``--skip-git-repo-check``                      CE "Git repository requirement" (llmsrv's directory need not be one)
``--model {model}``                            CE's example ``codex exec --model gpt-5-codex --json ...``; CX
``-- {prompt}`` (last argument)                CE (``codex exec "..."``); CX (``[PROMPT]``; after ``--`` never the
                                               ``resume``/``review`` subcommand)
``--version`` (the probe)                      CX (clap's ``version``)
``type``: ``thread.started``,                 CE "Supported event types": read and ignored
  ``turn.started``, ``item.started``,
  ``item.updated``
``item.completed`` ``item.type ==              CE "Supported item types" (``agent_message``: "assistant
  "agent_message"``, ``item.text``             message"; "typically ... added at the end of the turn"); CX
                                               ``AgentMessageItem.text``. Each is a delta; the last is the answer
                                               (as ``--output-last-message`` writes it)
``turn.completed`` ``usage.input_tokens``,     CE ("includes token usage"; the sample); CX ``Usage``.
  ``output_tokens``                            ``cached_input_tokens`` is part of ``input_tokens`` (the sample:
                                               24448 of 24763), so it is not added
``turn.failed`` ``error.message``              CE ("includes error details"); CX ``TurnFailedEvent``
``error`` ``message``                          CX ``ThreadErrorEvent``; kept as the failure unless a
                                               ``turn.completed`` follows (the CLI prints reconnect notices so)
login: ``$CODEX_HOME/auth.json``               CU (``CODEX_HOME`` defaults to ``~/.codex``; ``codex login`` writes
  (``~/.codex/auth.json``)                     it, a ChatGPT login or a stored API key). A login kept in the OS
                                               keyring is not seen by ``auto``
key variables removed from its environment     CE "Authentication": ``CODEX_API_KEY`` overrides the login in exec
=============================================  ==================================================================

Gemini CLI (``GH`` = https://geminicli.com/docs/cli/headless (github.com/google-gemini/gemini-cli
docs/cli/headless.md), ``GR`` = docs/cli/cli-reference.md, ``GT`` = its source
packages/core/src/output/types.ts (the event shapes), ``GN`` = packages/cli/src/nonInteractiveCli.ts
(when each is emitted), ``GA`` = docs/get-started/authentication.mdx)

=============================================  ==================================================================
``--output-format stream-json``                GR (``-o``: ``text``, ``json``, ``stream-json``); GH "Streaming JSON"
``--model {model}``                            GR (``-m, --model``; aliases ``auto``, ``pro``, ``flash``)
``-p {prompt}``                                GR (``-p, --prompt``: "Forces non-interactive mode")
``--version`` (the probe)                      GR (``-v, --version``)
``type``: ``init``, ``tool_use``,             GH "Event types"; GT. A tool event ends a turn (GN: the model
  ``tool_result``                              answers the tool results in a new turn)
``message`` ``role == "assistant"``,           GH ("user and assistant message chunks"); GT ``MessageEvent``; GN
  ``content`` (``delta: true``)                (one per streamed chunk). The last turn's text is the answer
                                               (what ``--output-format json`` reports as ``response``)
``error`` ``severity``, ``message``            GH ("non-fatal warnings and system errors"); GT ``ErrorEvent``; an
                                               ``error``-severity message explains a following failed result
``result`` ``status``, ``error.message``       GH ("final outcome"); GT ``ResultEvent`` (``success``/``error``)
``result`` ``stats.input_tokens``,             GH ("aggregated statistics and per-model token usage"); GT
  ``stats.output_tokens``                      ``StreamStats`` (``cached`` and ``input`` break ``input_tokens`` down)
exit codes 1, 42, 53                           GH "Exit codes": ``process.py`` raises the reported failure, else
                                               the code with stderr's last line
login: ``~/.gemini/oauth_creds.json``          GA "Sign in with Google" (credentials "cached locally"), "Running
  (``$GEMINI_CLI_HOME/.gemini/...``)           in headless mode" (the cached credential is used); the file name
                                               and ``GEMINI_CLI_HOME`` from the source (core/src/config/storage.ts,
                                               utils/paths.ts). Encrypted storage
                                               (``GEMINI_FORCE_ENCRYPTED_FILE_STORAGE``) is not seen by ``auto``
key variables removed from its environment     GA: ``GEMINI_API_KEY`` selects the API-key method
=============================================  ==================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ... import errors
from .stream_json import CURSOR, Dialect, StreamJsonFold, field, read_assistant, read_result, text_of, tokens


class Login(NamedTuple):
    """Where a CLI keeps its login: variables that are one by themselves, files that show one."""

    tokens: tuple[str, ...]
    files: Callable[[Mapping[str, str]], tuple[str, ...]]  # the candidate paths (none without HOME)
    how: str  # how a person logs in


def _under(env: Mapping[str, str], own_dir: str, default: str, *rest: str) -> tuple[str, ...]:
    """``$own_dir/rest`` when that variable is set, else ``$HOME/default/rest``; nothing without either."""
    if env.get(own_dir):
        return (os.path.join(env[own_dir], *rest),)
    if env.get("HOME"):
        return (os.path.join(env["HOME"], default, *rest),)
    return ()


def _gemini_home(env: Mapping[str, str]) -> tuple[str, ...]:
    home = env.get("GEMINI_CLI_HOME") or env.get("HOME")
    return (os.path.join(home, ".gemini", "oauth_creds.json"),) if home else ()


# ---- Claude Code ---------------------------------------------------------------------------------

CLAUDE_COMMAND = ("claude", "--output-format", "stream-json", "--verbose", "--include-partial-messages",
                  "--model", "{model}", "--print", "--", "{prompt}")
CLAUDE_LOGIN = Login(tokens=("CLAUDE_CODE_OAUTH_TOKEN",),
                     files=lambda env: _under(env, "CLAUDE_CONFIG_DIR", ".claude", ".credentials.json"),
                     how="run `claude` and /login, or set CLAUDE_CODE_OAUTH_TOKEN (claude setup-token)")
_CLAUDE_ERRORS: dict[str, type[errors.LlmsrvError]] = {
    "authentication_failed": errors.MissingCredentials,
    "billing_error": errors.QuotaExhausted,
    "rate_limit": errors.QuotaExhausted,  # a subscription's usage limit: no short wait helps
}


def _main_thread(event: dict[str, Any]) -> bool:
    return event.get("parent_tool_use_id") is None  # a subagent's messages are not the answer


def _claude_stream_event(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    if not _main_thread(event) or field(event, "event", "type") != "content_block_delta" \
            or field(event, "event", "delta", "type") != "text_delta":
        return ""
    fold.streamed = True
    return fold.say(text_of(field(event, "event", "delta", "text")))


def _claude_assistant(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    if not _main_thread(event):
        return ""
    if isinstance(event.get("error"), str):
        fold.error_class = _CLAUDE_ERRORS.get(event["error"], errors.ProviderError)
    return read_assistant(fold, event)


CLAUDE: Dialect = {"stream_event": _claude_stream_event, "assistant": _claude_assistant, "result": read_result}


# ---- Codex CLI -------------------------------------------------------------------------------------

CODEX_COMMAND = ("codex", "exec", "--json", "--skip-git-repo-check", "--model", "{model}", "--", "{prompt}")
CODEX_LOGIN = Login(tokens=(), files=lambda env: _under(env, "CODEX_HOME", ".codex", "auth.json"),
                    how="run `codex login`")


def _codex_item(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    if field(event, "item", "type") != "agent_message":
        return ""
    fold.turn = []  # the last agent message is the answer
    return fold.say(text_of(field(event, "item", "text")))


def _codex_completed(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    fold.finish(None, tokens(event.get("usage"), ("input_tokens",), ("output_tokens",)))
    return ""


def _codex_failed(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    fold.fail(text_of(field(event, "error", "message")) or "turn failed")
    return ""


def _codex_error(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    fold.fail(text_of(event.get("message")) or "error", final=False)
    return ""


CODEX: Dialect = {"item.completed": _codex_item, "turn.completed": _codex_completed,
                  "turn.failed": _codex_failed, "error": _codex_error}


# ---- Gemini CLI ------------------------------------------------------------------------------------

GEMINI_COMMAND = ("gemini", "--output-format", "stream-json", "--model", "{model}", "-p", "{prompt}")
GEMINI_LOGIN = Login(tokens=(), files=_gemini_home, how="run `gemini` and choose Sign in with Google")


def _gemini_message(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    return fold.say(text_of(event.get("content"))) if event.get("role") == "assistant" else ""


def _gemini_tool(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    fold.turn = []  # the model answers the tool's result in a new turn
    return ""


def _gemini_error(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    if event.get("severity") == "error":
        fold.fail(text_of(event.get("message")) or "error", final=False)
    return ""


def _gemini_result(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    if event.get("status") == "success":
        fold.finish(None, tokens(event.get("stats"), ("input_tokens",), ("output_tokens",)))
    else:
        fold.fail(text_of(field(event, "error", "message")) or fold.error or str(event.get("status") or "error"))
    return ""


GEMINI: Dialect = {"message": _gemini_message, "tool_use": _gemini_tool, "tool_result": _gemini_tool,
                   "error": _gemini_error, "result": _gemini_result}


# cursor-agent's events plus Claude Code's and Codex CLI's (none of their types collide): the ``cursor``
# row's dialect, so its ``command`` may run any of those CLIs.
AGENTS: Dialect = {**CURSOR, **CLAUDE, **CODEX}

