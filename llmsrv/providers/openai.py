"""OpenAI-compatible providers: ``codex`` (OpenAI), ``github`` (GitHub Models), ``openrouter`` and
``openai_compat`` (vLLM, llama.cpp, Ollama, LiteLLM...). One Chat Completions translation serves them
all, and ``copilot`` (``copilot.py``) too.

Where the wire shapes come from
-------------------------------
* Chat Completions, streaming and errors: the OpenAI API reference (``/chat/completions``; the
  ``chat.completion.chunk`` object; ``stream_options.include_usage``: one last chunk with ``usage`` and
  empty ``choices`` before ``data: [DONE]``; error bodies ``{"error": {"message", "type", "code"}}``).
  Streamed tool calls arrive as ``delta.tool_calls[]`` fragments keyed by ``index``: id and name in
  the first, ``function.arguments`` in pieces to concatenate.
* Responses API (``POST /responses``): developers.openai.com/docs/guides/streaming-responses and the
  streaming-events reference: ``input`` items, ``instructions``, ``max_output_tokens``, function tools
  ``{type, name, description, parameters, strict}``, ``output`` items ``message``/``output_text`` and
  ``function_call`` (``call_id``, ``arguments``), usage ``input_tokens``/``output_tokens``; events
  ``response.output_text.delta`` and the terminal ``response.completed`` / ``response.incomplete`` /
  ``response.failed``, or ``error``. There is no ``[DONE]``.
* GitHub Models: docs.github.com/rest/models/inference (``POST /inference/chat/completions``) and
  docs.github.com/rest/models/catalog (``GET /catalog/models``), header ``X-GitHub-Api-Version``.
* OpenRouter: openrouter.ai/docs/api-reference/streaming (keep-alive comments, which the SSE parser
  drops; mid-stream errors as a ``data:`` chunk with an ``error`` object), openrouter.ai/docs/errors,
  openrouter.ai/docs/model-routing (``openrouter/auto``), openrouter.ai/docs/app-attribution
  (``HTTP-Referer``, ``X-Title``).

Rules
-----
* **Reasoning models** (name, after any ``publisher/`` prefix, starting with ``o<digit>``, ``gpt-5`` or
  ``codex``): ``max_completion_tokens`` instead of the deprecated ``max_tokens`` (which they reject:
  "Not supported: o-series reasoning models and GPT-5 series") and no ``temperature`` (they accept only
  the default). Other models get ``max_tokens`` and ``temperature``, which every compatible server reads.
* **Responses-only models** (``codex`` provider): ``codex`` in the name (``gpt-5-codex``,
  ``codex-mini-latest``...), ``o<n>-pro`` and ``*-deep-research`` are served only by ``/responses``.
* Messages go as they are; a ``tool`` message carries its ``tool_call_id`` when the request gives one
  (an llmsrv extension of the contract's ``{role, content}``). ``/responses`` has no ``tool`` role:
  with a call id it becomes a ``function_call_output`` item, without one a ``user`` message.
* ``probe()`` only lists models (``GET {base}/models``; GitHub: the catalog): it never spends tokens.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import httpx_sse
import msgspec

from .. import errors
from ..config import ProviderConfig, ServerConfig
from ..messages import Message, Tool, ToolCall, Usage
from ..redact import clip
from . import Call, Completion, OnDelta, ProviderStatus, estimate_tokens
from .http import DETAIL_CHARS, HttpProvider, map_transport_errors

_REASONING = re.compile(r"o\d|gpt-5|codex")
_RESPONSES_ONLY = re.compile(r".*codex|o\d+-pro|.*deep-research")
_RATE_LIMIT_CODES = ("429", "rate_limit_exceeded", "rate_limit_error", "too_many_requests")


def _bare(model: str) -> str:
    return model.rsplit("/", 1)[-1]


def is_reasoning(model: str) -> bool:
    return _REASONING.match(_bare(model)) is not None


def is_responses_only(model: str) -> bool:
    return _RESPONSES_ONLY.match(_bare(model)) is not None


# ---- requests ----------------------------------------------------------------------------------


def _function(tool: Tool) -> dict[str, Any]:
    fn = tool.function
    out: dict[str, Any] = {"name": fn.name, "parameters": fn.parameters or {"type": "object", "properties": {}}}
    if fn.description:
        out["description"] = fn.description
    return out


def _chat_message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.role == "tool" and message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def chat_body(call: Call, model: str, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [_chat_message(m) for m in call.messages]}
    if is_reasoning(model):
        body["max_completion_tokens"] = call.max_tokens
    else:
        body["max_tokens"] = call.max_tokens
        body["temperature"] = call.temperature
    if call.tools:
        body["tools"] = [{"type": "function", "function": _function(t)} for t in call.tools]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _input_item(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        if call_id := message.tool_call_id:
            return {"type": "function_call_output", "call_id": call_id, "output": message.content}
        return {"role": "user", "content": message.content}
    return {"role": message.role, "content": message.content}


def responses_body(call: Call, *, stream: bool) -> dict[str, Any]:
    system = [m.content for m in call.messages if m.role == "system"]
    body: dict[str, Any] = {
        "model": call.model, "input": [_input_item(m) for m in call.messages if m.role != "system"],
        "max_output_tokens": call.max_tokens, "store": False,
    }
    if system:
        body["instructions"] = "\n\n".join(system)
    if not is_reasoning(call.model):
        body["temperature"] = call.temperature
    if call.tools:
        # strict defaults to true here, which would reject any schema not written for it
        body["tools"] = [{"type": "function", **_function(t), "strict": False} for t in call.tools]
    if stream:
        body["stream"] = True
    return body


# ---- replies -----------------------------------------------------------------------------------


def _completion(call: Call, text: str, tool_calls: Sequence[ToolCall], finish: str | None,
                prompt_tokens: int | None, completion_tokens: int | None) -> Completion:
    if finish == "length":
        reason = "length"
    elif tool_calls or finish in ("tool_calls", "function_call"):
        reason = "tool_calls"
    else:
        reason = "stop"
    if prompt_tokens is None:  # servers without usage reporting: the usual estimate
        prompt_tokens = sum(estimate_tokens(m.content) for m in call.messages)
    if completion_tokens is None:
        completion_tokens = estimate_tokens(text)
    return Completion(text=text, usage=Usage(prompt_tokens, completion_tokens), finish_reason=reason,
                      tool_calls=tuple(tool_calls))


def parse_chat(data: Any, call: Call) -> Completion:
    choices = data["choices"]
    finish = choices[0].get("finish_reason")  # no choice at all: IndexError, a malformed reply
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for choice in choices:  # one (n=1), but Copilot may put text and tool calls in two
        message = choice["message"]
        texts.append(message.get("content") or "")
        tool_calls += [ToolCall(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}")
                       for c in message.get("tool_calls") or ()]
        finish = choice.get("finish_reason") or finish
    usage = data.get("usage") or {}
    return _completion(call, "".join(texts), tool_calls, finish, usage.get("prompt_tokens"),
                       usage.get("completion_tokens"))


def parse_response(data: Any, call: Call, streamed_text: str = "") -> Completion:
    """A Responses API ``response`` object (``status`` completed or incomplete)."""
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for item in data.get("output") or ():
        if item["type"] == "message":
            texts += [part.get("text") or "" for part in item.get("content") or () if part["type"] == "output_text"]
        elif item["type"] == "function_call":
            tool_calls.append(ToolCall(item.get("call_id") or item["id"], item["name"], item.get("arguments") or "{}"))
    cut = data.get("status") == "incomplete" and (data.get("incomplete_details") or {}).get("reason") == \
        "max_output_tokens"
    usage = data.get("usage") or {}
    return _completion(call, "".join(texts) or streamed_text, tool_calls, "length" if cut else None,
                       usage.get("input_tokens"), usage.get("output_tokens"))


def error_object(data: Any) -> Any:
    """The error an otherwise successful body or chunk reports, if any (OpenAI/OpenRouter or vLLM shape)."""
    if not isinstance(data, dict):
        return None
    if data.get("error"):
        return data["error"]
    return data if data.get("object") == "error" else None


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChatStream:
    """Chat Completions chunks, folded into one ``Completion`` (tool-call fragments joined by index)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, _PartialCall] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}

    def add(self, chunk: Any) -> str:
        """Fold one chunk in; return its text piece ("" when it has none)."""
        self.usage = chunk.get("usage") or self.usage
        piece = ""
        for choice in chunk.get("choices") or ():  # one choice (n=1); the usage chunk has none
            delta = choice.get("delta") or {}
            piece += delta.get("content") or ""
            for fragment in delta.get("tool_calls") or ():
                partial = self.calls.setdefault(fragment.get("index") or 0, _PartialCall())
                partial.id = fragment.get("id") or partial.id
                function = fragment.get("function") or {}
                partial.name = function.get("name") or partial.name  # some servers repeat it: never append
                partial.arguments.append(function.get("arguments") or "")
            self.finish = choice.get("finish_reason") or self.finish
        if piece:
            self.text.append(piece)
        return piece

    def result(self, call: Call) -> Completion:
        tool_calls = [ToolCall(p.id or f"call_{i}", p.name, "".join(p.arguments) or "{}")
                      for i, p in sorted(self.calls.items())]
        return _completion(call, "".join(self.text), tool_calls, self.finish,
                           self.usage.get("prompt_tokens"), self.usage.get("completion_tokens"))


# ---- providers ---------------------------------------------------------------------------------


class OpenAIChatProvider(HttpProvider):
    """Chat Completions at ``{base_url}/chat/completions`` with a bearer key (no header without one)."""

    extra_headers: Mapping[str, str] = {}

    def headers(self) -> dict[str, str]:
        auth = {"authorization": f"Bearer {self.key}"} if self.key else {}
        return {**auth, **self.extra_headers}

    def wire_model(self, model: str) -> str:
        return model

    def models_url(self) -> str:
        return self.base_url + "/models"

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        return await self.chat(self.base_url, self.headers(), call, on_delta)

    async def probe(self) -> ProviderStatus:
        """One authenticated model listing: available on 2xx, ``invalid`` on 401/403."""
        status = self.status()
        if not status.available:
            return status
        try:
            await self.list_models()
        except errors.MissingCredentials as exc:
            return ProviderStatus(False, exc.message, state="invalid")
        except errors.LlmsrvError as exc:
            return ProviderStatus(False, exc.message)
        return ProviderStatus(True)

    async def list_models(self) -> None:
        async with self.open("GET", self.models_url(), headers=self.headers()):
            pass  # the status is the answer; the (large) list itself is not needed

    # ---- shared by the subclasses ------------------------------------------------------------

    def upstream_error(self, err: Any) -> errors.LlmsrvError:
        """An error object inside a 200 reply (a stream chunk or event): rate limits stay rate limits."""
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("type") or err.get("code") or "unknown error")
            code = str(err.get("code") or err.get("type") or "")
        else:
            message, code = str(err), ""
        text = f"{self.name} reported an error: {clip(message, DETAIL_CHARS, self.secrets)}"
        if code in _RATE_LIMIT_CODES:
            return errors.RateLimited(text)
        return errors.ProviderError(text)

    def stream_cut(self, marker: str) -> errors.ProviderError:
        return errors.ProviderError(f"{self.name}: stream cut (the event stream ended without {marker})")

    async def decoded_events(self, response: httpx.Response) -> AsyncGenerator[tuple[str, Any], None]:
        """(event name, decoded JSON data) per server-sent event; ``[DONE]`` comes through as data None."""
        source = cast(AsyncGenerator[httpx_sse.ServerSentEvent, None], self.events(response))
        async with aclosing(source) as events:
            async for event in events:
                if not event.data:
                    continue
                if event.data == "[DONE]":
                    yield event.event, None
                    continue
                with map_transport_errors(self.name, self.secrets):
                    data = msgspec.json.decode(event.data)
                yield event.event, data

    async def chat(self, base: str, headers: Mapping[str, str], call: Call, on_delta: OnDelta | None) -> Completion:
        body = chat_body(call, self.wire_model(call.model), stream=on_delta is not None)
        url = base + "/chat/completions"
        if on_delta is None:
            data = await self.call_json("POST", url, headers=headers, json=body)
            if (err := error_object(data)) is not None:
                raise self.upstream_error(err)
            with map_transport_errors(self.name, self.secrets):
                return parse_chat(data, call)
        stream = ChatStream()
        async with self.open("POST", url, headers=headers, json=body) as response, \
                aclosing(self.decoded_events(response)) as events:
            async for _, chunk in events:
                if chunk is None:
                    return stream.result(call)
                if (err := error_object(chunk)) is not None:
                    raise self.upstream_error(err)
                with map_transport_errors(self.name, self.secrets):
                    piece = stream.add(chunk)
                if piece:
                    on_delta(piece)
        raise self.stream_cut("data: [DONE]")


class CodexProvider(OpenAIChatProvider):
    """OpenAI: Chat Completions, or the Responses API for the models only it serves."""

    name = "codex"
    key_env = ("OPENAI_API_KEY", "CODEX_API_KEY")
    default_base_url = "https://api.openai.com/v1"

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        if is_responses_only(call.model):
            return await self.respond(call, on_delta)
        return await super().complete(call, on_delta)

    def _finished(self, data: Any, call: Call, streamed_text: str = "") -> Completion:
        if data.get("status") == "failed" or data.get("error"):
            raise self.upstream_error(data.get("error") or "the response failed")
        with map_transport_errors(self.name, self.secrets):
            return parse_response(data, call, streamed_text)

    async def respond(self, call: Call, on_delta: OnDelta | None) -> Completion:
        body = responses_body(call, stream=on_delta is not None)
        url = self.base_url + "/responses"
        if on_delta is None:
            return self._finished(await self.call_json("POST", url, headers=self.headers(), json=body), call)
        pieces: list[str] = []
        async with self.open("POST", url, headers=self.headers(), json=body) as response, \
                aclosing(self.decoded_events(response)) as events:
            async for name, data in events:
                kind = (data.get("type") or name) if isinstance(data, dict) else name
                if kind == "response.output_text.delta":
                    if piece := data.get("delta") or "":
                        pieces.append(piece)
                        on_delta(piece)
                elif kind in ("response.completed", "response.incomplete", "response.failed"):
                    return self._finished(data["response"], call, "".join(pieces))
                elif kind == "error":
                    raise self.upstream_error(data)
        raise self.stream_cut("response.completed")


class GitHubModelsProvider(OpenAIChatProvider):
    """GitHub Models inference; model ids are ``publisher/name`` (``openai/gpt-4.1``)."""

    name = "github"
    key_env = ("GITHUB_TOKEN", "GH_TOKEN")
    default_base_url = "https://models.github.ai/inference"
    extra_headers = {"x-github-api-version": "2022-11-28"}

    def models_url(self) -> str:
        # the catalog lives beside the inference API: https://models.github.ai/catalog/models
        if self.base_url.endswith("/inference"):
            return self.base_url.removesuffix("/inference") + "/catalog/models"
        return super().models_url()


class OpenRouterProvider(OpenAIChatProvider):
    """OpenRouter; ``auto`` is its Auto Router ``openrouter/auto``. Attribution: ``X-Title: llmsrv``, and
    ``HTTP-Referer`` from ``OPENROUTER_HTTP_REFERER`` when set (the app URL it ranks apps by)."""

    name = "openrouter"
    key_env = ("OPENROUTER_API_KEY",)
    default_base_url = "https://openrouter.ai/api/v1"

    def __init__(self, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *,
                 server: ServerConfig | None = None) -> None:
        env = os.environ if env is None else env
        super().__init__(cfg, env, server=server)
        referer = env.get("OPENROUTER_HTTP_REFERER")
        self.extra_headers = {"x-title": "llmsrv", **({"http-referer": referer} if referer else {})}

    def wire_model(self, model: str) -> str:
        return "openrouter/auto" if model == "auto" else model


class OpenAICompatProvider(OpenAIChatProvider):
    """Any OpenAI-compatible server at the configured ``base_url``; the key is optional."""

    name = "openai_compat"
    key_env = ("OPENAI_COMPAT_API_KEY",)
    key_required = False

    def status(self) -> ProviderStatus:
        if not self.base_url:
            return ProviderStatus(False, "no base_url: set [providers.openai_compat] base_url "
                                  "(e.g. \"http://127.0.0.1:8000/v1\")", state="missing")
        return super().status()
