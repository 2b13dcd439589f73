"""Request validators for the fake upstreams: each checks a request body the way the real API does
(the official SDK's own request types, then the semantic rules the API enforces) and answers a
violation with that API's own HTTP 400 body.

* ``openai_chat_problems(body)`` -- ``POST /chat/completions`` (OpenAI, GitHub Models, OpenRouter,
  Copilot, OpenAI-compatible servers).
* ``openai_responses_problems(body)`` -- ``POST /responses``.
* ``anthropic_problems(body, headers)`` -- ``POST /v1/messages``.
* ``gemini_problems(body, path)`` -- ``POST /v1beta/models/{m}:generateContent`` / ``:streamGenerateContent``.
* ``reject(api, problems)`` -- the API's own 400 reply; ``validating(api, handler)`` -- a ``FakeUpstream``
  handler that checks the API's generation POSTs first and keeps every problem it found (``.problems``).

Layer (a), the SDK types: the OpenAI and Anthropic request types are ``TypedDict``s. Pydantic validates them
through a ``TypeAdapter``, but (checked against pydantic 2.14) (1) a TypedDict ignores unknown keys unless the
config says ``extra="forbid"``, and ``TypeAdapter(config=...)`` is refused for a bare TypedDict, so the type is
wrapped in a one-tuple whose config every nested TypedDict inherits; (2) ``Iterable[...]`` fields (``messages``,
``content``, ``tool_calls``, ``input``) are validated lazily, only when iterated, so the validated result is
drained; (3) ``Required``/``total=False`` keys give ``missing``, ``Literal`` fields give ``literal_error``.
Unions of TypedDicts (the message roles, the content block types) report every member's errors; the members
whose ``role``/``type`` literal does not match are pruned so that a problem names the member that was meant.
google-genai has no REST request type: ``contents[]``/``systemInstruction`` go through ``types.Content``,
``generationConfig`` through ``types.GenerationConfig`` and ``tools[]`` through ``types.Tool``. Those pydantic
models are configured ``alias_generator=to_camel, populate_by_name=True, extra="forbid"``: they take the REST
camelCase names (and the proto field names, as the REST API's proto-JSON parser does) and refuse unknown ones.
Function ``parameters`` are not given to ``types.Schema``, which is the union of the Gemini API and Vertex AI
schemas (it takes ``additionalProperties``, ``$ref``-like ``ref``/``defs``): they are checked against the Gemini
API's own Schema subset instead (``_GEMINI_SCHEMA_KEYS``).

Layer (b), the semantic rules, each with its real error text and where it was seen; see the rule functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming as AnthropicNonStreaming,
)
from anthropic.types.message_create_params import (
    MessageCreateParamsStreaming as AnthropicStreaming,
)
from google.genai import types as genai_types
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsNonStreaming as ChatNonStreaming,
)
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsStreaming as ChatStreaming,
)
from openai.types.responses.response_create_params import (
    ResponseCreateParamsNonStreaming as ResponsesNonStreaming,
)
from openai.types.responses.response_create_params import (
    ResponseCreateParamsStreaming as ResponsesStreaming,
)
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .fakes import Json, Reply, Request

APIS = ("openai_chat", "openai_responses", "anthropic", "gemini")

# ---- layer (a): the SDK request types ----------------------------------------------------------------------

_FORBID = ConfigDict(extra="forbid")


def _strict(typed_dict: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tuple[typed_dict], config=_FORBID)  # type: ignore[valid-type]


_ADAPTERS: dict[str, dict[bool, TypeAdapter[Any]]] = {
    "openai_chat": {False: _strict(ChatNonStreaming), True: _strict(ChatStreaming)},
    "openai_responses": {False: _strict(ResponsesNonStreaming), True: _strict(ResponsesStreaming)},
    "anthropic": {False: _strict(AnthropicNonStreaming), True: _strict(AnthropicStreaming)},
}


@dataclass(frozen=True)
class _Err:
    loc: tuple[Any, ...]  # pydantic's loc: keys and indexes of the input, plus union member tags
    type: str
    msg: str
    expected: str = ""


def _errors(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[_Err]:
    return [_Err(prefix + tuple(e["loc"]), e["type"], e["msg"], str((e.get("ctx") or {}).get("expected", "")))
            for e in exc.errors()]


def _drain(value: Any, loc: tuple[Any, ...], found: list[_Err]) -> None:
    """Iterate every lazily validated ``Iterable`` field of a validated TypedDict, collecting its errors."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _drain(item, (*loc, key), found)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _drain(item, (*loc, i), found)
    elif isinstance(value, Iterator):
        i = 0
        while True:
            try:
                item = next(value)
            except StopIteration:
                return
            except ValidationError as exc:  # the failing item's errors, its index first
                found.extend(_errors(exc, loc))
                return
            _drain(item, (*loc, i), found)
            i += 1


def _sdk_errors(api: str, body: dict[str, Any]) -> list[_Err]:
    adapter = _ADAPTERS[api][body.get("stream") is True]
    try:
        (validated,) = adapter.validate_python((body,))
    except ValidationError as exc:
        return [_Err(e.loc[1:], e.type, e.msg, e.expected) for e in _errors(exc)]
    found: list[_Err] = []
    _drain(validated, (), found)
    return found


_DISCRIMINANTS = ("role", "type")


def _prune(errors: list[_Err], body: Any) -> list[_Err]:
    """At every union (deepest first), keep the errors of the members whose ``role``/``type`` matched the
    input; when none matched, one error naming the accepted literals (which the enclosing union then reads
    as that member's refusal)."""
    done: set[tuple[Any, ...]] = set()
    while True:
        pending = {e.loc[:-2] for e in errors if _refuses(e, body)} - done
        if not pending:
            break
        union = max(pending, key=len)
        done.add(union)
        depth = len(union)
        tagged = [e for e in errors if len(e.loc) > depth + 1 and e.loc[:depth] == union]
        refused = [e for e in tagged if len(e.loc) == depth + 2 and _refuses(e, body)]
        members = {e.loc[:depth + 1] for e in tagged}
        wrong = {e.loc[:-1] for e in refused}
        if members - wrong:
            errors = [e for e in errors if e.loc[:depth + 1] not in wrong]
            continue
        literal = [e for e in refused if e.type == "literal_error"]
        if literal:
            field = max(_DISCRIMINANTS, key=lambda f: sum(e.loc[-1] == f for e in literal))
            expected = list(dict.fromkeys(x for e in literal if e.loc[-1] == field
                                          for x in re.split(r", | or ", e.expected)))
            text = ", ".join(expected[:-1]) + " or " + expected[-1] if len(expected) > 1 else expected[0]
            summary = _Err((*union, field), "literal_error", f"Input should be {text}", ", ".join(expected))
        else:
            summary = _Err((*union, refused[0].loc[-1]), "missing", "Field required")
        errors = [e for e in errors if e not in tagged] + [summary]
    longer = [e.loc for e in errors]
    return [e for e in errors if not (e.type.endswith("_type") and any(
        len(loc) > len(e.loc) and loc[:len(e.loc) - 1] == e.loc[:-1] for loc in longer))]


def _refuses(e: _Err, body: Any) -> bool:
    """``e`` is a union member's refusal of the input's ``role``/``type``: a wrong literal, the member's
    required discriminant absent from the input, or the input's discriminant unknown to the member."""
    if e.type not in ("literal_error", "missing", "extra_forbidden") or len(e.loc) < 3:
        return False
    if e.loc[-1] not in _DISCRIMINANTS:
        return False
    node = _node(body, e.loc[:-2])
    tag = e.loc[-2]
    return isinstance(tag, str) and not (isinstance(node, Mapping) and tag in node)


def _node(body: Any, loc: tuple[Any, ...]) -> Any:
    node = body
    for key in loc:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
    return node


def _path(body: Any, loc: tuple[Any, ...], keep_last: bool) -> list[Any]:
    """``loc`` without pydantic's union member tags: only the keys and indexes that exist in ``body``."""
    node, out = body, []
    for i, key in enumerate(loc):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        elif not (keep_last and i == len(loc) - 1):
            continue
        out.append(key)
    return out


def _dotted(path: list[Any]) -> str:  # Anthropic's form: messages.1.content.0
    return ".".join(str(p) for p in path)


def _bracketed(path: list[Any]) -> str:  # OpenAI's and Google's form: messages[1].content[0]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _render(errors: list[_Err], body: Any, fmt: Callable[[list[Any]], str]) -> list[tuple[list[Any], _Err]]:
    seen: dict[str, tuple[list[Any], _Err]] = {}
    for e in _prune(errors, body):
        path = _path(body, e.loc, keep_last=e.type in ("missing", "extra_forbidden", "literal_error"))
        key = fmt(path) + "\0" + e.msg
        seen.setdefault(key, (path, e))
    return list(seen.values())


def _openai_sdk(api: str, body: dict[str, Any]) -> list[str]:
    problems = []
    for path, e in _render(_sdk_errors(api, body), body, _bracketed):
        if e.type == "extra_forbidden" and len(path) == 1:  # the API's own text for an unknown argument
            problems.append(f"Unrecognized request argument supplied: {path[0]}")
        elif e.type == "missing":
            problems.append(f"Missing required parameter: '{_bracketed(path)}'.")
        else:
            problems.append(f"Invalid value for '{_bracketed(path)}': {e.msg}.")
    return problems


# ---- OpenAI chat completions -------------------------------------------------------------------------------

# Reasoning models: o1, o3, o4 and gpt-5 families, after an optional "publisher/" prefix (GitHub Models,
# OpenRouter). They refuse max_tokens and a temperature other than 1; texts from the API's 400s quoted in
# github.com/griptape-ai/ComfyUI-Griptape/issues/312 and github.com/gabrii/Cursor-Azure-GPT-5/issues/33.
REASONING_MODEL = re.compile(r"^(?:[^/]+/)?(?:o[134](?![0-9])|gpt-5)")


def is_reasoning_model(model: str) -> bool:
    return bool(REASONING_MODEL.match(model))


def openai_chat_problems(body: dict[str, Any]) -> list[str]:
    """What ``POST /chat/completions`` would refuse in ``body`` (empty when it is accepted)."""
    if not isinstance(body, dict):
        return ["We could not parse the JSON body of your request."]
    problems = _openai_sdk("openai_chat", body)
    messages = body.get("messages")
    if isinstance(messages, list):
        problems += _chat_tool_rules([m for m in messages if isinstance(m, dict)])
    model = body.get("model")
    if isinstance(model, str) and is_reasoning_model(model):
        if "max_tokens" in body:
            problems.append("Unsupported parameter: 'max_tokens' is not supported with this model. "
                            "Use 'max_completion_tokens' instead.")
        temperature = body.get("temperature")
        if temperature is not None and temperature != 1:
            problems.append(f"Unsupported value: 'temperature' does not support {temperature} with this model. "
                            "Only the default (1) value is supported.")
    return problems


def _chat_tool_rules(messages: list[dict[str, Any]]) -> list[str]:
    """The tool round trip rules of chat completions, texts as the API answers them (quoted in
    github.com/dimagi/open-chat-studio/issues/1659, github.com/smarter-sh/smarter/issues/264 and
    github.com/aliasrobotics/cai/issues/111; "preceeding" is the API's own spelling):

    * a ``tool`` message comes right after the assistant message that holds its ``tool_call_id`` in
      ``tool_calls``, or after other tool messages answering that same assistant message;
    * every ``tool_calls[].id`` of an assistant message is answered before the next non-tool message;
    * an assistant message's ``content`` may be null or absent only when it carries ``tool_calls``.
    """
    problems: list[str] = []
    open_ids: list[str] = []  # the calls of the assistant message the current tool run answers
    in_run = False
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not in_run or call_id not in open_ids:
                problems.append(f"Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                                f"message with 'tool_calls'. (messages[{i}].tool_call_id = {call_id!r})")
            else:
                open_ids.remove(call_id)
            continue
        problems += _unanswered(open_ids)
        calls = message.get("tool_calls") if role == "assistant" else None
        open_ids = [c.get("id") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
        in_run = bool(open_ids)
        if role == "assistant" and not calls and message.get("content") is None:
            if "content" in message:
                problems.append(f"Invalid value for 'messages[{i}].content': expected a string, got null.")
            else:
                problems.append(f"Missing required parameter: 'messages[{i}].content'.")
    return problems + _unanswered(open_ids)


def _unanswered(open_ids: list[str]) -> list[str]:
    if not open_ids:
        return []
    return ["An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(open_ids)}"]


# ---- OpenAI Responses --------------------------------------------------------------------------------------

def openai_responses_problems(body: dict[str, Any]) -> list[str]:
    """What ``POST /responses`` would refuse in ``body``.

    The SDK type holds the tool shape: a function tool is flat, ``{"type": "function", "name", "parameters",
    "strict", "description"?}``; the chat form nested under ``"function"`` is refused (missing ``name``,
    unknown ``function``). The semantic rules, texts as the API answers them (quoted in
    github.com/continuedev/continue/issues/10092 and github.com/tjardoo/openai-client/pull/124):

    * a ``function_call_output`` item's ``call_id`` names a ``function_call`` item earlier in ``input``;
    * every ``function_call`` item of ``input`` has its ``function_call_output``.
    """
    if not isinstance(body, dict):
        return ["We could not parse the JSON body of your request."]
    problems = _openai_sdk("openai_responses", body)
    items = body.get("input")
    if isinstance(items, list):
        calls: list[str] = []
        answered: set[str] = set()
        for item in items:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "function_call":
                calls.append(item.get("call_id", ""))
            elif item.get("type") == "function_call_output":
                call_id = item.get("call_id")
                if call_id not in calls:
                    problems.append(f"No tool call found for function call output with call_id {call_id}.")
                answered.add(call_id)
        problems += [f"No tool output found for function call {c}." for c in calls if c not in answered]
    return problems


# ---- Anthropic messages ------------------------------------------------------------------------------------

# Models that refuse ``temperature`` ("`temperature` is deprecated for this model.", 400 invalid_request_error).
# From the issue text ("newer Claude models (Opus 4.7 and later) answer 400 to it"); the 4.8 row from the same
# 400 quoted in github.com/The-PR-Agent/pr-agent/issues/2456; the fifth generation from the live 400s quoted in
# simstudioai/sim#5328, earendil-works/pi#7961 (Sonnet 5, Opus 5) and pr-agent#2456 (Fable 5). Written out here,
# not taken from llmsrv's codec, so that the codec's own rule is checked against an independent list.
NO_TEMPERATURE_MODELS = ("claude-opus-4-7", "claude-opus-4-8", "claude-sonnet-5", "claude-opus-5", "claude-fable-5")
# The sampling fields of POST /v1/messages (docs.anthropic.com/en/api/messages). The installed SDK's
# MessageCreateParams (anthropic 2.15) no longer declares them, so they are taken out before the SDK check and
# checked here: a number each, temperature 0..1 and refused by NO_TEMPERATURE_MODELS.
_SAMPLING: dict[str, tuple[type, ...]] = {"temperature": (int, float), "top_p": (int, float), "top_k": (int,)}


def anthropic_problems(body: dict[str, Any], headers: Mapping[str, str]) -> list[str]:
    """What ``POST /v1/messages`` would refuse (``headers`` with lower-case names, as ``Request`` has them).

    The SDK type holds: ``max_tokens`` required ("max_tokens: Field required"), the role literal, block
    types, unknown keys ("X: Extra inputs are not permitted"). The installed SDK (anthropic 2.15) also types
    a ``{"role": "system"}`` message (``SystemMessageParam``); this validator refuses it anyway, as the brief
    and the SDK's own ``messages`` docstring say ("if you want to include a system prompt, you can use the
    top-level ``system`` parameter"): the top-level form works on every API version. The rules on top,
    texts as the API answers them (quoted in
    github.com/PipedreamHQ/pipedream/issues/9697, github.com/continuedev/continue/issues/4751,
    github.com/anthropics/claude-code/issues/1237, github.com/RooCodeInc/Roo-Code/issues/12162):

    * headers ``anthropic-version`` and ``x-api-key`` present;
    * roles ``user``/``assistant`` only in ``messages`` (see above);
    * ``temperature`` within 0..1, and absent for the models of ``NO_TEMPERATURE_MODELS``;
    * in a user turn the ``tool_result`` blocks come first (docs.anthropic.com/en/docs/agents-and-tools/tool-use/
      implement-tool-use: "tool_result blocks must come FIRST in the content array");
    * each ``tool_result.tool_use_id`` names a ``tool_use`` of the immediately previous assistant turn;
    * every ``tool_use`` of an assistant turn is answered by a ``tool_result`` in the next (user) turn.
    """
    problems = []
    if not headers.get("anthropic-version"):
        problems.append("anthropic-version: header is required")
    if not headers.get("x-api-key"):
        problems.append("x-api-key header is required")
    if not isinstance(body, dict):
        return [*problems, "The request body is not valid JSON."]
    typed = {k: v for k, v in body.items() if k not in _SAMPLING}
    for path, e in _render(_sdk_errors("anthropic", typed), typed, _dotted):
        problems.append(f"{_dotted(path)}: {e.msg}")
    for key in _SAMPLING:
        value = body.get(key)
        if key in body and (isinstance(value, bool) or not isinstance(value, _SAMPLING[key])):
            problems.append(f"{key}: Input should be a valid {_SAMPLING[key][-1].__name__}")
    temperature = body.get("temperature")
    model = body.get("model")
    if isinstance(temperature, int | float) and not 0 <= temperature <= 1:
        problems.append("temperature: Input should be less than or equal to 1" if temperature > 1
                        else "temperature: Input should be greater than or equal to 0")
    if "temperature" in body and isinstance(model, str) and model.startswith(NO_TEMPERATURE_MODELS):
        problems.append("`temperature` is deprecated for this model.")
    messages = body.get("messages")
    if isinstance(messages, list):
        problems += [f"messages.{i}.role: Input should be 'user' or 'assistant'" for i, m in enumerate(messages)
                     if isinstance(m, dict) and m.get("role") == "system"]
        problems += _anthropic_tool_rules(messages)
    return problems


def _blocks(message: Any) -> list[dict[str, Any]]:
    content = message.get("content") if isinstance(message, dict) else None
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _anthropic_tool_rules(messages: list[Any]) -> list[str]:
    problems = []
    for i, message in enumerate(messages):
        blocks = _blocks(message)
        previous = _blocks(messages[i - 1]) if i else []
        offered = {b.get("id") for b in previous if b.get("type") == "tool_use"}
        seen_other = False
        for j, block in enumerate(blocks):
            if block.get("type") != "tool_result":
                seen_other = True
                continue
            if seen_other:
                problems.append(f"messages.{i}.content.{j}: `tool_result` blocks must come first in the user "
                                "message, before any other content.")
            if block.get("tool_use_id") not in offered:
                problems.append(f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                                f"blocks: {block.get('tool_use_id')}. Each `tool_result` block must have a "
                                "corresponding `tool_use` block in the previous message.")
        uses = [b.get("id") for b in blocks if b.get("type") == "tool_use"]
        following = _blocks(messages[i + 1]) if i + 1 < len(messages) else []
        answered = {b.get("tool_use_id") for b in following if b.get("type") == "tool_result"}
        missing = [u for u in uses if u not in answered]
        if missing:
            problems.append(f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                            f"after: {', '.join(map(str, missing))}. Each `tool_use` block must have a "
                            "corresponding `tool_result` block in the next message.")
    return problems


# ---- Gemini generateContent --------------------------------------------------------------------------------

GEMINI_PATH = re.compile(r"^/v1(?:beta)?/models/[^/:]+:(?:generateContent|streamGenerateContent)$")
# GenerateContentRequest's fields (ai.google.dev/api/generate-content#request-body), camelCase and proto names
_GEMINI_TOP = {"contents", "tools", "toolConfig", "tool_config", "safetySettings", "safety_settings",
               "systemInstruction", "system_instruction", "generationConfig", "generation_config",
               "cachedContent", "cached_content", "model"}
# The Gemini API's Schema (ai.google.dev/api/caching#Schema): "a select subset of an OpenAPI 3.0 schema object".
# Anything else is refused; $schema, additionalProperties and const are the refusals quoted in
# github.com/zuisong/gemini-openai-proxy/issues/67 and github.com/openswarm-ai/openswarm/issues/24.
_GEMINI_SCHEMA_KEYS = {"type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
                       "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
                       "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum",
                       "max_items", "min_items", "min_properties", "max_properties", "min_length", "max_length",
                       "any_of", "property_ordering"}
_GEMINI_TYPES = {"TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}
_GEMINI_ROLES = ("user", "model")


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _field(obj: Any, camel: str) -> Any:
    """A REST field by its camelCase name or its proto name (the REST API takes both)."""
    if not isinstance(obj, dict):
        return None
    return obj.get(camel, obj.get(_snake(camel)))


def _unknown(name: Any, where: str) -> str:
    at = f" at '{where}'" if where else ""
    return f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.'


def _gemini_model(model: type[BaseModel], value: Any, where: str) -> list[str]:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            path = [p for p in e["loc"] if isinstance(p, str | int)]
            if e["type"] == "extra_forbidden":
                problems.append(_unknown(path[-1], _bracketed([where, *path[:-1]]) if where else ""))
            else:
                problems.append(f"{_bracketed([where, *path])}: {e['msg']}")
        return problems
    return []


def gemini_problems(body: dict[str, Any], path: str) -> list[str]:
    """What ``POST {path}`` (``/v1beta/models/{m}:generateContent`` or ``:streamGenerateContent``) would refuse.

    SDK models check each part's shape and refuse unknown names. The rules on top, texts as the API answers
    them where they were found (github.com/google-gemini/gemini-cli/issues/4217, github.com/langflow-ai/
    langflow/issues/9437, github.com/tumf/mcp-text-editor/issues/11):

    * ``contents[].role`` is ``user`` or ``model`` ("Please use a valid role: user, model.");
    * the turn after a ``model`` turn with ``functionCall`` parts answers each call with a ``functionResponse``
      of the same ``name`` (and the same ``id`` when the call had one): as many responses as calls;
    * a ``functionResponse`` answers a ``functionCall`` of the immediately previous ``model`` turn;
    * a function declaration carries at most one of ``parameters`` / ``parametersJsonSchema`` (documented as
      "mutually exclusive", ai.google.dev/api/caching#FunctionDeclaration);
    * ``parameters`` is the Gemini Schema subset: keys outside ``_GEMINI_SCHEMA_KEYS`` are unknown names, a
      ``type`` is one enum value, never a list; ``parametersJsonSchema`` takes raw JSON Schema unchecked.
    """
    problems = []
    if not GEMINI_PATH.match(path):
        problems.append(f"Invalid path {path!r}: expected /v1beta/models/{{model}}:generateContent "
                        "or :streamGenerateContent.")
    if not isinstance(body, dict):
        return [*problems, "Invalid JSON payload received."]
    problems += [_unknown(k, "") for k in body if k not in _GEMINI_TOP]
    contents = _field(body, "contents")
    if not isinstance(contents, list) or not contents:
        problems.append("* GenerateContentRequest.contents: contents is not specified")
        contents = []
    for i, content in enumerate(contents):
        problems += _gemini_model(genai_types.Content, content, f"contents[{i}]")
        role = _field(content, "role")
        if role is not None and role not in _GEMINI_ROLES:
            problems.append(f"Please use a valid role: user, model. (contents[{i}].role = {role!r})")
    system = _field(body, "systemInstruction")
    if system is not None:
        problems += _gemini_model(genai_types.Content, system, "systemInstruction")
    config = _field(body, "generationConfig")
    if config is not None:
        problems += _gemini_model(genai_types.GenerationConfig, config, "generationConfig")
    tools = _field(body, "tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        problems += _gemini_tool(tool, i)
    if "/models/gemini-3" in path:
        problems += _gemini_signatures(contents)
    return problems + _gemini_call_rules(contents)


def _gemini_signatures(contents: list[Any]) -> list[str]:
    """Gemini 3: the first ``functionCall`` part of every model turn must carry its ``thoughtSignature``
    (ai.google.dev/gemini-api/docs/thought-signatures: "When using Gemini 3 models, you must pass back thought
    signatures during function calling, otherwise you will get a validation error"; the text as quoted in
    block/goose#5792 and microsoft/semantic-kernel#13417)."""
    problems = []
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or _field(content, "role") != "model":
            continue
        calls = [p for p in _field(content, "parts") or () if isinstance(p, dict) and _field(p, "functionCall")]
        if calls and not _field(calls[0], "thoughtSignature"):
            problems.append(f"Function call is missing a thought_signature in functionCall parts. (contents[{i}])")
    return problems


def _gemini_tool(tool: Any, i: int) -> list[str]:
    if not isinstance(tool, dict):
        return [f"tools[{i}]: expected an object"]
    declarations = _field(tool, "functionDeclarations")
    declarations = declarations if isinstance(declarations, list) else []
    problems = []
    stripped = [{k: v for k, v in d.items() if k != "parameters"} if isinstance(d, dict) else d
                for d in declarations]  # parameters: the Gemini API's Schema subset, checked below
    key = "functionDeclarations" if "functionDeclarations" in tool else "function_declarations"
    problems += _gemini_model(genai_types.Tool, {**tool, key: stripped} if declarations else tool, f"tools[{i}]")
    for j, declaration in enumerate(declarations):
        if not isinstance(declaration, dict):
            continue
        where = f"tools[{i}].function_declarations[{j}]"
        if "parameters" in declaration and _field(declaration, "parametersJsonSchema") is not None:
            problems.append(f"{where}: parameters and parameters_json_schema are mutually exclusive; "
                            "set only one of them.")
        if "parameters" in declaration:
            problems += _gemini_schema(declaration["parameters"], f"{where}.parameters")
    return problems


def _gemini_schema(schema: Any, where: str) -> list[str]:
    if not isinstance(schema, dict):
        return [f"Invalid value at '{where}': expected a Schema object"]
    problems = [_unknown(k, where) for k in schema if k not in _GEMINI_SCHEMA_KEYS]
    kind = schema.get("type")
    if isinstance(kind, list):
        problems.append(f"Invalid JSON payload received. Unknown name \"type\" at '{where}': "
                        "Proto field is not repeating, cannot start list.")
    elif kind is not None and (not isinstance(kind, str) or kind.upper() not in _GEMINI_TYPES):
        problems.append(f"Invalid value at '{where}.type' (type.googleapis.com/google.ai.generativelanguage."
                        f"v1beta.Type), {kind!r}")
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for index, sub in enumerate(properties.values()):  # the API names a property by its position
            problems += _gemini_schema(sub, f"{where}.properties[{index}].value")
    items = schema.get("items")
    if items is not None:
        problems += _gemini_schema(items, f"{where}.items")
    for key in ("anyOf", "any_of"):
        for index, sub in enumerate(schema.get(key) or []):
            problems += _gemini_schema(sub, f"{where}.any_of[{index}]")
    return problems


def _parts(content: Any, kind: str) -> list[tuple[int, dict[str, Any]]]:
    parts = _field(content, "parts")
    found = []
    for j, part in enumerate(parts if isinstance(parts, list) else []):
        value = _field(part, kind)
        if isinstance(value, dict):
            found.append((j, value))
    return found


def _gemini_call_rules(contents: list[Any]) -> list[str]:
    problems = []
    for i, content in enumerate(contents):
        responses = _parts(content, "functionResponse")
        previous = contents[i - 1] if i else None
        calls = _parts(previous, "functionCall") if _field(previous, "role") == "model" else []
        pending = [call for _, call in calls]
        for j, response in responses:
            name = response.get("name")
            if not name:
                problems.append(f"* GenerateContentRequest.contents[{i}].parts[{j}].function_response.name: "
                                "Name cannot be empty.")
                continue
            match = next((c for c in pending if c.get("name") == name
                          and (not c.get("id") or c.get("id") == response.get("id"))), None)
            if match is None:
                names = ", ".join(f"{c.get('name')}" + (f" (id {c.get('id')})" if c.get("id") else "")
                                  for _, c in calls) or "none"
                problems.append(f"contents[{i}].parts[{j}].functionResponse: name {name!r}"
                                + (f" id {response.get('id')!r}" if response.get("id") else "")
                                + f" answers no functionCall of the previous model turn (its calls: {names}).")
            else:
                pending.remove(match)
        own_calls = _parts(content, "functionCall") if _field(content, "role") == "model" else []
        if own_calls:
            following = contents[i + 1] if i + 1 < len(contents) else None
            if len(_parts(following, "functionResponse")) != len(own_calls):
                problems.append("Please ensure that the number of function response parts is equal to the number "
                                f"of function call parts of the function call turn. (contents[{i}] has "
                                f"{len(own_calls)} functionCall parts, the next turn "
                                f"{len(_parts(following, 'functionResponse'))} functionResponse parts)")
    return problems


# ---- replies -------------------------------------------------------------------------------------------------

def reject(api: str, problems: list[str]) -> Json:
    """The API's own HTTP 400 body for ``problems``: OpenAI (chat and Responses)
    ``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``; Anthropic
    ``{"type": "error", "error": {"type": "invalid_request_error", "message"}}``; Gemini
    ``{"error": {"code": 400, "message", "status": "INVALID_ARGUMENT"}}``."""
    message = "\n".join(problems)
    if api in ("openai_chat", "openai_responses"):
        return Json({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}},
                    status=400)
    if api == "anthropic":
        return Json({"type": "error", "error": {"type": "invalid_request_error", "message": message}}, status=400)
    if api == "gemini":
        return Json({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}, status=400)
    raise ValueError(f"unknown api {api!r}; one of {APIS}")


_GENERATION_PATHS: dict[str, Callable[[str], bool]] = {
    "openai_chat": lambda path: path.endswith("/chat/completions"),
    "openai_responses": lambda path: path.endswith("/responses"),
    "anthropic": lambda path: path.endswith("/v1/messages"),
    "gemini": lambda path: ":generateContent" in path or ":streamGenerateContent" in path,
}


def problems_of(api: str, request: Request) -> list[str]:
    """The problems of one request to ``api``'s generation path (``[]`` for any other request)."""
    if request.method != "POST" or not _GENERATION_PATHS[api](request.path):
        return []
    try:
        body = request.json()
    except msgspec.DecodeError:
        return ["We could not parse the JSON body of your request."]
    if api == "openai_chat":
        return openai_chat_problems(body)
    if api == "openai_responses":
        return openai_responses_problems(body)
    if api == "anthropic":
        return anthropic_problems(body, request.headers)
    return gemini_problems(body, request.path)


class Validating:
    """A ``FakeUpstream`` handler: a generation POST with problems is answered ``reject(api, ...)``, anything
    else goes to the wrapped handler. ``problems`` keeps every problem found, ``rejected`` the refused requests."""

    def __init__(self, api: str, handler: Callable[[Request], Any]) -> None:
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; one of {APIS}")
        self.api = api
        self.handler = handler
        self.problems: list[str] = []
        self.rejected: list[Request] = []

    def __call__(self, request: Request) -> Reply | Any:
        found = problems_of(self.api, request)
        if found:
            self.problems.extend(found)
            self.rejected.append(request)
            return reject(self.api, found)
        return self.handler(request)


def validating(api: str, handler: Callable[[Request], Any]) -> Validating:
    return Validating(api, handler)
