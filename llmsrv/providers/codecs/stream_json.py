"""The stream-JSON codec of command-line agents: the prompt and argv out, stdout lines in. Pure.

* **The prompt.** System messages come first, as plain paragraphs. A conversation of one user
  message follows as is; a longer one is written out with role labels (``User:``,
  ``Assistant:``), one paragraph per message (``codecs.conversation_text``). A CLI agent takes
  one prompt and no tool-call fields, so a tool round trip is written into it: under an
  assistant turn each of its calls as ``Tool call <id>: <name> <arguments JSON>``, and each tool
  turn as ``Tool result for <id> (<name>): <content>``, so the agent pairs every result with its
  call whatever their order. ``max_tokens``, ``temperature`` and ``tools`` have no CLI
  equivalent and are not passed (the agent uses its own tools). A prompt that would start with
  ``-`` gets a leading space so no CLI parses it as an option. ``{model}`` and ``{prompt}`` are
  replaced inside each element of the command template, in one pass.
* **Reading.** stdout is read as JSON lines (non-JSON lines are skipped): an ``assistant`` event
  reports its text as a delta; the ``result`` event is the end of the answer and its ``result``
  field is the final text (with ``usage`` when present, else ``estimate_tokens``). The same fold
  understands Claude Code's stream-json (same shape) and Codex CLI's ``exec --json``
  (``item.completed`` agent messages, ``turn.completed`` with usage).
* **Outcome** (after a clean exit): a result with ``is_error`` (or a Codex ``turn.failed``) is
  ``ProviderError("... reported an error ...")``; no terminal event is ``ProviderError("... no result")``.

cursor-agent: every flag we pass and every field we read, and where it is defined (``P`` =
https://cursor.com/docs/cli/reference/parameters, ``O`` =
https://cursor.com/docs/cli/reference/output-format):

=========================================  ======================================================================
flag / field                               documented at
=========================================  ======================================================================
``--print``                                P (``-p, --print``: responses to the console, for scripts)
``--output-format stream-json``            P; O "Stream JSON format" (NDJSON, one object a line)
``--model {model}``                        P (``--model <model>``)
``{prompt}`` (last argument)               P (the positional ``[prompt]``, as in ``agent -p "..."``)
``--version`` (the probe)                  P (``-v, --version``)
env ``CURSOR_API_KEY``                     P (``--api-key <key>``, or the variable instead);
                                           https://cursor.com/docs/cli/reference/authentication
``type``                                   O "Event types"
``system`` / ``user`` / ``tool_call``      O "System initialization", "User message", "Tool call events": read and
                                           ignored (no text of the answer in them)
``assistant`` ``message.content[]``        O "Assistant message" ("one line per assistant message", "concatenate
  ``.type == "text"``, ``.text``           all message.content[].text values")
``message.content`` as a string            NOT documented (a Claude-style shortcut); tolerated
``result`` ``subtype``, ``is_error``       O "Terminal result" (``subtype: "success"``, ``is_error: false``)
``result`` ``result``                      O "Terminal result" ("complete assistant response text")
``result`` ``usage.inputTokens``,          NOT documented in O. Seen in cursor-agent 2026.09.02 output quoted in
  ``usage.outputTokens``                   github.com/chenhg5/cc-connect issue #1810 and paperclipai/paperclip
                                           issue #12908 (camelCase; ``cacheReadTokens``/``cacheWriteTokens`` are
                                           added to the prompt, inputTokens leaves cache reads out); absent (O's
                                           own example has none): estimated
failure: non-zero exit, error on stderr    O ("On failure, the process exits with a non-zero code ... error
                                           message is written to stderr"): ``process.py``
=========================================  ======================================================================

``--stream-partial-output`` (P) is deliberately not passed: its ``assistant`` events come in
several undocumented forms that repeat text (forum.cursor.com/t/156289). Claude Code's and Codex
CLI's event shapes are understood as well but are not traced here (cursor-agent is the row this
project ships). Recorded lines used by the tests: tests/fixtures/cursor/ (SOURCES.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from ... import errors
from ...messages import Message, Usage
from ...redact import clip
from .. import Call, Completion, estimate_prompt_tokens, estimate_tokens
from . import DETAIL_CHARS, Origin, conversation_text, said

_PLACEHOLDER = re.compile(r"\{(model|prompt)\}")


def build_prompt(messages: Sequence[Message]) -> str:
    """One text for a CLI that takes one prompt (see the module docstring)."""
    prompt = conversation_text(messages)
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

    prompt = total("input_tokens", "inputTokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                   "cacheReadTokens", "cacheWriteTokens")  # cursor-agent reports cache reads apart from inputTokens
    completion = total("output_tokens", "outputTokens")
    if prompt is None and completion is None:
        return None
    return Usage(prompt_tokens=prompt or 0, completion_tokens=completion or 0)


class StreamJsonFold:
    """stream-json lines in, deltas out; after the terminal event, ``done`` and the outcome."""

    def __init__(self, call: Call, origin: Origin, binary: str) -> None:
        self.call, self.origin, self.binary = call, origin, binary
        self.parts: list[str] = []
        self.done = False
        self.text: str | None = None  # the final text, once a successful terminal event came
        self.usage: Usage | None = None
        self.error: str | None = None  # what the CLI reported as its failure, if it did

    def feed(self, data: str | bytes, event: str = "") -> str:
        """Decode one line; return the text to report as a delta ("" for none)."""
        try:
            decoded = msgspec.json.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return ""  # banners, warnings, anything not JSON
        if not isinstance(decoded, dict) or self.done:
            return ""
        return self._event(decoded)

    def _event(self, event: dict[str, Any]) -> str:
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
        return said(self.parts, text)

    def result(self) -> Completion:
        """The answer, once the CLI exited cleanly (the transport checks the exit status first)."""
        where = f"{self.origin.provider}: {self.binary}"
        if self.error is not None:
            raise errors.ProviderError(f"{where} reported an error: "
                                       f"{clip(self.error, DETAIL_CHARS, self.origin.secrets)}")
        if self.text is None:
            raise errors.ProviderError(f"{self.origin.provider}: no result: {self.binary} exited 0 "
                                       f"without a result event")
        usage = self.usage or Usage(prompt_tokens=estimate_prompt_tokens(self.call),
                                    completion_tokens=estimate_tokens(self.text))
        return Completion(text=self.text, usage=usage)


def argv(template: Sequence[str], call: Call, provider: str) -> list[str]:
    """The command line for ``call`` after the binary: placeholders substituted."""
    if any(c.isspace() for c in call.model) or call.model.startswith("-") or not call.model:
        raise errors.ProviderNotFound(f"{provider}: invalid model id {call.model!r}")
    return substitute(template, call.model, build_prompt(call.messages))
