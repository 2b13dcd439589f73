"""The stream-JSON codec of command-line agents: the prompt and argv out, stdout lines in. Pure.

* **The prompt.** System messages come first, as plain paragraphs. A conversation of one user
  message follows as is; a longer one is written out with role labels (``User:``,
  ``Assistant:``), one paragraph per message (``codecs.conversation_text``). A CLI agent takes
  one prompt and no tool-call fields, so a tool round trip is written into it: under an
  assistant turn each of its calls as ``Tool call <id>: <name> <arguments JSON>``, and each tool
  turn as ``Tool result for <id> (<name>): <content>``, so the agent pairs every result with its
  call whatever their order. ``max_tokens``, ``temperature`` and ``tools`` have no CLI
  equivalent and are not passed (the agent uses its own tools). A prompt that would start with
  ``-`` gets a leading space so no CLI parses it as an option, and a prompt of one word (no
  whitespace) a trailing newline so no CLI takes it for one of its subcommands (``claude
  update``, ``codex exec review``, ``cursor-agent status``). ``{model}`` and ``{prompt}`` are
  replaced inside each element of the command template, in one pass.
* **Reading.** stdout is read as JSON lines (non-JSON lines and unknown event types are
  skipped). What each event ``type`` means is a *dialect*: a table from the type to a reader,
  which reports text as a delta (``say``), ends the answer (``finish``: the final text and the
  usage, else ``estimate_tokens``) or records a failure (``fail``). Cursor's dialect is below;
  Claude Code's, Codex CLI's and Gemini CLI's are in ``cli_dialects.py``, each traced to its
  vendor's documentation the same way.
* **Outcome** (after the CLI exited): a failure the CLI reported is raised (``ProviderError``, or
  the class the dialect read from the event: ``MissingCredentials``, ``QuotaExhausted``), even
  when it also exited non-zero; no terminal event is ``ProviderError("... no result")``.

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
several undocumented forms that repeat text (forum.cursor.com/t/156289). The ``cursor`` row reads
with ``cli_dialects.AGENTS`` (this dialect plus Claude Code's and Codex CLI's events), so its
``command`` may name those CLIs too. Recorded lines used by the tests: tests/fixtures/cursor/
(SOURCES.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
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
    if prompt.startswith("-"):
        prompt = " " + prompt
    if not any(c.isspace() for c in prompt):
        prompt += "\n"  # one word could name a subcommand of the CLI
    return prompt


def substitute(template: Sequence[str], model: str, prompt: str) -> list[str]:
    """``{model}`` and ``{prompt}`` replaced in one pass (a prompt containing "{model}" stays as is)."""
    values = {"model": model, "prompt": prompt}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], part) for part in template]


def argv(template: Sequence[str], call: Call, provider: str) -> list[str]:
    """The command line for ``call`` after the binary: placeholders substituted."""
    if any(c.isspace() for c in call.model) or call.model.startswith("-") or not call.model:
        raise errors.ProviderNotFound(f"{provider}: invalid model id {call.model!r}")
    return substitute(template, call.model, build_prompt(call.messages))


# ---- reading helpers (the dialects' vocabulary) -------------------------------------------------

def field(event: Any, *path: str) -> Any:
    """``event[path[0]][path[1]]...``, or None where a step is missing or not an object."""
    for key in path:
        if not isinstance(event, dict):
            return None
        event = event.get(key)
    return event


def text_of(value: Any) -> str:
    """A string value as is; anything else (absent, null, a number) is no text."""
    return value if isinstance(value, str) else ""


def message_text(message: Any) -> str:
    """The text of an assistant message: a string, or the ``text`` blocks of a content list."""
    content = field(message, "content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(text_of(block.get("text")) for block in content
                   if isinstance(block, dict) and block.get("type") == "text")


def tokens(raw: Any, prompt_keys: Sequence[str], completion_keys: Sequence[str]) -> Usage | None:
    """A usage object's counts: the sum of the ``prompt_keys`` present, of the ``completion_keys``."""
    if not isinstance(raw, dict):
        return None

    def total(keys: Sequence[str]) -> int | None:
        found = [int(raw[k]) for k in keys if isinstance(raw.get(k), int | float) and not isinstance(raw[k], bool)]
        return sum(found) if found else None

    prompt, completion = total(prompt_keys), total(completion_keys)
    if prompt is None and completion is None:
        return None
    return Usage(prompt_tokens=prompt or 0, completion_tokens=completion or 0)


def agent_usage(raw: Any) -> Usage | None:
    """Claude's ``input_tokens`` + cache counts / ``output_tokens``, or cursor-agent's camelCase."""
    return tokens(raw, ("input_tokens", "inputTokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                        "cacheReadTokens", "cacheWriteTokens"),  # cursor-agent: cache reads apart from inputTokens
                  ("output_tokens", "outputTokens"))


# ---- the fold ----------------------------------------------------------------------------------

Reader = Callable[["StreamJsonFold", dict[str, Any]], str]
Dialect = Mapping[str, Reader]  # an event's "type" -> its reader (the text it reports, "" for none)


class StreamJsonFold:
    """stream-json lines in, deltas out (read through a dialect); after the terminal event, ``done``
    and the outcome."""

    def __init__(self, call: Call, origin: Origin, binary: str, dialect: Dialect | None = None) -> None:
        self.call, self.origin, self.binary = call, origin, binary
        self.dialect = CURSOR if dialect is None else dialect
        self.parts: list[str] = []  # every piece reported as a delta
        self.turn: list[str] = []  # the text of the latest turn, for dialects without a final text
        self.streamed = False  # the text came as partial deltas: whole messages repeat it
        self.done = False
        self.text: str | None = None  # the final text, once a successful terminal event came
        self.usage: Usage | None = None
        self.error: str | None = None  # what the CLI reported as its failure, if it did
        self.error_class: type[errors.LlmsrvError] = errors.ProviderError

    def feed(self, data: str | bytes, event: str = "") -> str:
        """Decode one line; return the text to report as a delta ("" for none)."""
        try:
            decoded = msgspec.json.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return ""  # banners, warnings, anything not JSON
        if not isinstance(decoded, dict) or self.done:
            return ""
        kind = decoded.get("type")
        reader = self.dialect.get(kind) if isinstance(kind, str) else None
        return reader(self, decoded) if reader is not None else ""

    # -- what readers do -------------------------------------------------------------------------

    def say(self, piece: str) -> str:
        """Report ``piece`` as a delta (and keep it as part of the latest turn)."""
        if piece:
            self.turn.append(piece)
        return said(self.parts, piece)

    def finish(self, text: str | None, usage: Usage | None) -> None:
        """The terminal event of a success: ``text`` (else the latest turn) is the answer."""
        self.done = True
        self.text = text if text is not None else "".join(self.turn)
        self.usage = usage
        self.error = None  # an earlier notice was something the CLI recovered from

    def fail(self, message: str, *, final: bool = True, cls: type[errors.LlmsrvError] | None = None) -> None:
        """The CLI reported a failure (``final``: its terminal event; else a notice it may recover from)."""
        self.error = message
        if cls is not None:
            self.error_class = cls
        self.done = self.done or final

    # -- the outcome -----------------------------------------------------------------------------

    def failure(self) -> errors.LlmsrvError | None:
        """The failure the CLI reported, as the error to raise (None when it reported none)."""
        if self.error is None:
            return None
        return self.error_class(f"{self.origin.provider}: {self.binary} reported an error: "
                                f"{clip(self.error, DETAIL_CHARS, self.origin.secrets)}")

    def result(self) -> Completion:
        """The answer, once the CLI exited cleanly (the transport checks the exit status first)."""
        if (failure := self.failure()) is not None:
            raise failure
        if self.text is None:
            raise errors.ProviderError(f"{self.origin.provider}: no result: {self.binary} exited 0 "
                                       f"without a result event")
        usage = self.usage or Usage(prompt_tokens=estimate_prompt_tokens(self.call),
                                    completion_tokens=estimate_tokens(self.text))
        return Completion(text=self.text, usage=usage)


# ---- cursor-agent (the table above) -----------------------------------------------------------

def read_assistant(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    """``assistant``: its message's text blocks are a delta (unless partial deltas brought them)."""
    return "" if fold.streamed else fold.say(message_text(event.get("message")))


def read_result(fold: StreamJsonFold, event: dict[str, Any]) -> str:
    """``result``: the end; ``result`` is the final text, unless ``is_error`` or an error ``subtype``."""
    result = event.get("result")
    if event.get("is_error") or event.get("subtype") not in (None, "success"):
        fold.fail(text_of(result) or str(event.get("subtype") or "error"))
    else:
        fold.finish(result if isinstance(result, str) else "".join(fold.parts), agent_usage(event.get("usage")))
    return ""


CURSOR: Dialect = {"assistant": read_assistant, "result": read_result}
