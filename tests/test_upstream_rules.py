"""The fake upstreams' request validators (tests/upstream_rules.py): each accepts multi-turn tool conversations
written as the providers' docs show them and refuses each rule's violation with a problem naming it."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest

from .fakes import FakeUpstream, Json, Request
from .upstream_rules import (
    anthropic_problems,
    gemini_problems,
    is_reasoning_model,
    openai_chat_problems,
    openai_responses_problems,
    reject,
    validating,
)

# ---- OpenAI chat completions ------------------------------------------------------------------------------
# https://platform.openai.com/docs/guides/function-calling?api-mode=chat (get_weather, one call, then the
# parallel form with one call per city)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get current temperature for provided coordinates in celsius.",
    "parameters": {"type": "object", "properties": {"latitude": {"type": "number"}, "longitude": {"type": "number"}},
                   "required": ["latitude", "longitude"], "additionalProperties": False},
    "strict": True}}


def _chat_call(call_id: str, lat: float, lon: float) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"latitude": lat, "longitude": lon})}}


CHAT_ONE = {"model": "gpt-4.1", "tools": [WEATHER_TOOL], "messages": [
    {"role": "user", "content": "What's the weather like in Paris today?"},
    {"role": "assistant", "content": None, "tool_calls": [_chat_call("call_12345xyz", 48.8566, 2.3522)]},
    {"role": "tool", "tool_call_id": "call_12345xyz", "content": "14"},
]}
CHAT_TWO_REVERSED = {"model": "gpt-4.1", "tools": [WEATHER_TOOL], "messages": [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "What's the weather like in Paris and Bogotá today?"},
    {"role": "assistant", "tool_calls": [_chat_call("call_paris", 48.8566, 2.3522),
                                         _chat_call("call_bogota", 4.711, -74.0721)]},
    {"role": "tool", "tool_call_id": "call_bogota", "content": "18"},  # answered in reverse order
    {"role": "tool", "tool_call_id": "call_paris", "content": "14"},
    {"role": "assistant", "content": "Paris 14°C, Bogotá 18°C."},
    {"role": "user", "content": "Thanks"},
]}


def _with(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _messages(body: dict[str, Any], messages: list[Any]) -> dict[str, Any]:
    return _with(body, messages=messages)


ONE = CHAT_ONE["messages"]
TWO = CHAT_TWO_REVERSED["messages"]


@pytest.mark.parametrize("body", [
    pytest.param(CHAT_ONE, id="docs-one-call"),
    pytest.param(CHAT_TWO_REVERSED, id="docs-two-calls-answered-in-reverse"),
    pytest.param(_with(CHAT_ONE, stream=True, stream_options={"include_usage": True}), id="streaming"),
    pytest.param(_with(CHAT_ONE, model="o3-mini", max_completion_tokens=500, temperature=1), id="reasoning-defaults"),
    pytest.param(_with(CHAT_ONE, model="gpt-4o", max_tokens=500, temperature=0.7), id="gpt-4o-max-tokens"),
    pytest.param(_with(CHAT_ONE, model="openai/gpt-4.1", temperature=0.2), id="github-models-publisher-prefix"),
])
def test_openai_chat_accepts(body: dict[str, Any]) -> None:
    assert openai_chat_problems(body) == []


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(_with(CHAT_ONE, bogus=1), "Unrecognized request argument supplied: bogus", id="sdk-unknown-argument"),
    pytest.param(_messages(CHAT_ONE, [{"role": "user", "content": "hi", "name_": "x"}]), "messages[0].name_",
                 id="sdk-unknown-message-key"),
    pytest.param(_messages(CHAT_ONE, [{"role": "wizard", "content": "hi"}]), "messages[0].role",
                 id="sdk-wrong-role"),
    pytest.param(_with(CHAT_ONE, model=None), "Missing required parameter: 'model'", id="sdk-missing-model"),
    pytest.param(_with(CHAT_ONE, messages=None), "Missing required parameter: 'messages'", id="sdk-missing-messages"),
    pytest.param(_messages(CHAT_ONE, [{"role": "user", "content": 5}]), "messages[0].content",
                 id="sdk-content-wrong-type"),
    pytest.param(_messages(CHAT_ONE, [{"role": "user", "content": [{"type": "txt", "text": "hi"}]}]),
                 "messages[0].content[0].type", id="sdk-unknown-part-type"),
    pytest.param(_messages(CHAT_ONE, [ONE[0], {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"latitude": 1}}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"}]),
        "messages[1].tool_calls[0].function.arguments", id="sdk-arguments-not-a-string"),
    pytest.param(_messages(CHAT_ONE, [ONE[0], ONE[2]]),
                 "messages with role 'tool' must be a response to a preceeding message with 'tool_calls'",
                 id="tool-without-assistant-tool-calls"),
    pytest.param(_messages(CHAT_ONE, [ONE[0], ONE[1], {"role": "user", "content": "and?"}, ONE[2]]),
                 "messages with role 'tool' must be a response to a preceeding message with 'tool_calls'",
                 id="tool-after-an-intervening-user-message"),
    pytest.param(_messages(CHAT_ONE, [ONE[0], ONE[1], {"role": "tool", "tool_call_id": "call_other", "content": "1"}]),
                 "(messages[2].tool_call_id = 'call_other')", id="tool-call-id-not-in-tool-calls"),
    pytest.param(_messages(CHAT_TWO_REVERSED, [*TWO[:4], *TWO[5:]]),
                 "The following tool_call_ids did not have response messages: call_paris",
                 id="call-unanswered-before-next-message"),
    pytest.param(_messages(CHAT_ONE, ONE[:2]),
                 "The following tool_call_ids did not have response messages: call_12345xyz",
                 id="call-unanswered-at-end"),
    pytest.param(_messages(CHAT_ONE, [ONE[0], {"role": "assistant", "content": None}, ONE[0]]),
                 "Invalid value for 'messages[1].content': expected a string, got null.",
                 id="assistant-null-content-without-tool-calls"),
    pytest.param(_messages(CHAT_ONE, [ONE[0], {"role": "assistant"}, ONE[0]]),
                 "Missing required parameter: 'messages[1].content'.", id="assistant-no-content-without-tool-calls"),
    pytest.param(_with(CHAT_ONE, model="o3-mini", max_tokens=500),
                 "Unsupported parameter: 'max_tokens' is not supported with this model. "
                 "Use 'max_completion_tokens' instead.", id="reasoning-max-tokens"),
    pytest.param(_with(CHAT_ONE, model="openai/gpt-5-mini", max_tokens=500), "Use 'max_completion_tokens' instead",
                 id="reasoning-max-tokens-publisher-prefix"),
    pytest.param(_with(CHAT_ONE, model="o1", temperature=0.7),
                 "Unsupported value: 'temperature' does not support 0.7 with this model. "
                 "Only the default (1) value is supported.", id="reasoning-temperature"),
])
def test_openai_chat_refuses(body: dict[str, Any], expected: str) -> None:
    problems = openai_chat_problems(body)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(("model", "reasoning"), [
    ("o1", True), ("o1-mini", True), ("o3", True), ("o3-mini", True), ("o4-mini", True), ("gpt-5", True),
    ("gpt-5.1-codex", True), ("openai/o4-mini", True), ("openai/gpt-5", True),
    ("gpt-4o", False), ("gpt-4.1-mini", False), ("openai/gpt-4.1", False), ("o10-fake", False),
])
def test_reasoning_models(model: str, reasoning: bool) -> None:
    assert is_reasoning_model(model) is reasoning


# ---- OpenAI Responses -------------------------------------------------------------------------------------
# https://platform.openai.com/docs/guides/function-calling?api-mode=responses (the model's output items are
# appended to the input, then one function_call_output per call)

RESPONSES_TOOL = {"type": "function", "name": "get_weather",
                  "description": "Get current temperature for provided coordinates in celsius.",
                  "parameters": WEATHER_TOOL["function"]["parameters"], "strict": True}


def _fc(call_id: str, lat: float, lon: float) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": "get_weather",
            "arguments": json.dumps({"latitude": lat, "longitude": lon}), "status": "completed"}


def _fco(call_id: str, output: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


USER_ITEM = {"role": "user", "content": "What's the weather like in Paris today?"}
RESPONSES_ONE = {"model": "gpt-4.1", "tools": [RESPONSES_TOOL],
                 "input": [USER_ITEM, _fc("call_12345xyz", 48.8566, 2.3522), _fco("call_12345xyz", "14")]}
RESPONSES_TWO_REVERSED = {"model": "gpt-5", "instructions": "You are a weather bot.", "tools": [RESPONSES_TOOL],
                          "max_output_tokens": 800, "input": [
                              {"type": "message", "role": "user", "content": [
                                  {"type": "input_text", "text": "Weather in Paris and Bogotá?"}]},
                              _fc("call_paris", 48.8566, 2.3522), _fc("call_bogota", 4.711, -74.0721),
                              _fco("call_bogota", "18"), _fco("call_paris", "14")]}


@pytest.mark.parametrize("body", [
    pytest.param(RESPONSES_ONE, id="docs-one-call"),
    pytest.param(RESPONSES_TWO_REVERSED, id="docs-two-calls-answered-in-reverse"),
    pytest.param(_with(RESPONSES_ONE, stream=True), id="streaming"),
    pytest.param({"model": "gpt-4.1", "input": "Tell me a joke"}, id="string-input"),
])
def test_openai_responses_accepts(body: dict[str, Any]) -> None:
    assert openai_responses_problems(body) == []


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(_with(RESPONSES_ONE, messages=[]), "Unrecognized request argument supplied: messages",
                 id="sdk-unknown-argument"),
    pytest.param(_with(RESPONSES_ONE, input=[{"role": "wizard", "content": "hi"}]), "input[0].role",
                 id="sdk-wrong-role"),
    pytest.param(_with(RESPONSES_ONE, input=[USER_ITEM, {"type": "function_call_output", "output": "1"}]),
                 "No tool call found for function call output with call_id None.", id="output-without-call-id"),
    pytest.param(_with(RESPONSES_ONE, input=[USER_ITEM, {"type": "function_call_output", "call_id": "c"}]),
                 "Missing required parameter: 'input[1].output'", id="sdk-output-without-output"),
    pytest.param(_with(RESPONSES_ONE, tools=[WEATHER_TOOL]), "Missing required parameter: 'tools[0].name'",
                 id="sdk-chat-form-tool-refused"),
    pytest.param(_with(RESPONSES_ONE, tools=[WEATHER_TOOL]), "'tools[0].function'", id="sdk-nested-function-key"),
    pytest.param(_with(RESPONSES_ONE, stream="yes"), "stream", id="sdk-stream-not-bool"),
    pytest.param(_with(RESPONSES_ONE, input=[USER_ITEM, _fco("call_x", "1")]),
                 "No tool call found for function call output with call_id call_x.", id="output-without-call"),
    pytest.param(_with(RESPONSES_ONE, input=[USER_ITEM, _fco("call_a", "1"), _fc("call_a", 1, 2)]),
                 "No tool call found for function call output with call_id call_a.", id="output-before-its-call"),
    pytest.param(_with(RESPONSES_TWO_REVERSED, input=RESPONSES_TWO_REVERSED["input"][:4]),
                 "No tool output found for function call call_paris.", id="call-without-output"),
])
def test_openai_responses_refuses(body: dict[str, Any], expected: str) -> None:
    problems = openai_responses_problems(body)
    assert any(expected in p for p in problems), problems


# ---- Anthropic messages -----------------------------------------------------------------------------------
# https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use (get_weather; parallel tool
# use: several tool_use blocks in one assistant turn, all tool_result blocks in the next user turn)

HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}
CLAUDE_TOOL = {"name": "get_weather", "description": "Get the current weather in a given location",
               "input_schema": {"type": "object", "properties": {"location": {
                   "type": "string", "description": "The city and state, e.g. San Francisco, CA"}},
                   "required": ["location"]}}


def _use(use_id: str, location: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": use_id, "name": "get_weather", "input": {"location": location}}


def _result(use_id: str, content: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": use_id, "content": content}


CLAUDE_ONE = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "tools": [CLAUDE_TOOL], "messages": [
    {"role": "user", "content": "What's the weather like in San Francisco?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
        _use("toolu_01A09q90qw90lq917835lq9", "San Francisco, CA")]},
    {"role": "user", "content": [_result("toolu_01A09q90qw90lq917835lq9", "15 degrees")]},
]}
C1 = CLAUDE_ONE["messages"]
CLAUDE_TWO_REVERSED = {"model": "claude-opus-4-7", "max_tokens": 1024, "system": "You are a weather bot.",
                       "stream": True, "tools": [CLAUDE_TOOL], "messages": [
                           {"role": "user", "content": "What's the weather in SF and NYC?"},
                           {"role": "assistant", "content": [_use("toolu_sf", "San Francisco, CA"),
                                                             _use("toolu_ny", "New York, NY")]},
                           {"role": "user", "content": [
                               _result("toolu_ny", [{"type": "text", "text": "8 degrees"}]),  # reverse order
                               _result("toolu_sf", "15 degrees"),
                               {"type": "text", "text": "Which is warmer?"}]}]}
C2 = CLAUDE_TWO_REVERSED["messages"]


@pytest.mark.parametrize("body", [
    pytest.param(CLAUDE_ONE, id="docs-one-call"),
    pytest.param(CLAUDE_TWO_REVERSED, id="docs-parallel-calls-answered-in-reverse-then-text"),
    pytest.param(_with(CLAUDE_ONE, temperature=1, top_p=0.9, top_k=40), id="sampling-fields"),
    pytest.param(_with(CLAUDE_ONE, model="claude-opus-4-6", temperature=0.0), id="opus-4-6-takes-temperature"),
    pytest.param(_with(CLAUDE_ONE, system=[{"type": "text", "text": "Be brief."}]), id="system-blocks"),
])
def test_anthropic_accepts(body: dict[str, Any]) -> None:
    assert anthropic_problems(body, HEADERS) == []


@pytest.mark.parametrize(("body", "headers", "expected"), [
    pytest.param(CLAUDE_ONE, {"x-api-key": "k"}, "anthropic-version: header is required", id="no-version-header"),
    pytest.param(CLAUDE_ONE, {"anthropic-version": "2023-06-01", "authorization": "Bearer k"},
                 "x-api-key header is required", id="no-api-key-header"),
    pytest.param(_with(CLAUDE_ONE, max_tokens=None), HEADERS, "max_tokens: Field required", id="sdk-no-max-tokens"),
    pytest.param(_with(CLAUDE_ONE, bogus=1), HEADERS, "bogus: Extra inputs are not permitted",
                 id="sdk-unknown-argument"),
    pytest.param(_messages(CLAUDE_ONE, [{"role": "system", "content": "Be brief."}, *C1]), HEADERS,
                 "messages.0.role: Input should be 'user' or 'assistant'", id="system-role-message"),
    pytest.param(_messages(CLAUDE_ONE, [{"role": "human", "content": "hi"}]), HEADERS,
                 "messages.0.role: Input should be", id="sdk-wrong-role"),
    pytest.param(_messages(CLAUDE_ONE, [{"role": "user", "content": 5}]), HEADERS, "messages.0.content",
                 id="sdk-content-wrong-type"),
    pytest.param(_messages(CLAUDE_ONE, [{"role": "user", "content": [{"type": "txt", "text": "hi"}]}]), HEADERS,
                 "messages.0.content.0.type: Input should be", id="sdk-unknown-block-type"),
    pytest.param(_messages(CLAUDE_ONE, [C1[0], C1[1], {"role": "user", "content": [
        {"type": "tool_result", "content": "15"}]}]), HEADERS, "messages.2.content.0.tool_use_id: Field required",
        id="sdk-tool-result-without-id"),
    pytest.param(_messages(CLAUDE_ONE, [C1[0], C1[1], {"role": "user", "content": [
        {"type": "text", "text": "here:"}, C1[2]["content"][0]]}]), HEADERS,
        "messages.2.content.1: `tool_result` blocks must come first", id="tool-result-not-first"),
    pytest.param(_messages(CLAUDE_ONE, [C1[0], C1[1], {"role": "user", "content": [_result("toolu_other", "1")]}]),
                 HEADERS, "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_other",
                 id="tool-result-id-unknown"),
    pytest.param(_messages(CLAUDE_ONE, [*C1, {"role": "assistant", "content": "ok"},
                                        {"role": "user", "content": [C1[2]["content"][0]]}]), HEADERS,
                 "messages.4.content.0: unexpected `tool_use_id`", id="tool-result-answers-an-older-turn"),
    pytest.param(_messages(CLAUDE_TWO_REVERSED, [C2[0], C2[1], {"role": "user", "content": [C2[2]["content"][1]]}]),
                 HEADERS, "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: "
                 "toolu_ny", id="tool-use-unanswered"),
    pytest.param(_messages(CLAUDE_ONE, [C1[0], C1[1], {"role": "user", "content": "never mind"}]), HEADERS,
                 "messages.1: `tool_use` ids were found without `tool_result` blocks", id="tool-use-answered-by-text"),
    pytest.param(_with(CLAUDE_ONE, temperature="0.5"), HEADERS, "temperature: Input should be a valid float",
                 id="temperature-not-a-number"),
    pytest.param(_with(CLAUDE_ONE, top_k=0.5), HEADERS, "top_k: Input should be a valid int", id="top-k-not-an-int"),
    pytest.param(_with(CLAUDE_ONE, temperature=1.5), HEADERS, "temperature: Input should be less than or equal to 1",
                 id="temperature-above-1"),
    pytest.param(_with(CLAUDE_ONE, temperature=-0.1), HEADERS, "temperature: Input should be greater than or equal",
                 id="temperature-below-0"),
    pytest.param(_with(CLAUDE_TWO_REVERSED, temperature=0.7), HEADERS, "`temperature` is deprecated for this model.",
                 id="opus-4-7-refuses-temperature"),
    pytest.param(_with(CLAUDE_ONE, model="claude-opus-4-8-20260601", temperature=1), HEADERS,
                 "`temperature` is deprecated", id="opus-4-8-refuses-temperature"),
    pytest.param(_with(CLAUDE_ONE, model="claude-sonnet-5", temperature=0.5), HEADERS,
                 "`temperature` is deprecated", id="sonnet-5-refuses-temperature"),
])
def test_anthropic_refuses(body: dict[str, Any], headers: dict[str, str], expected: str) -> None:
    problems = anthropic_problems(body, headers)
    assert any(expected in p for p in problems), problems


# ---- Gemini generateContent -------------------------------------------------------------------------------
# https://ai.google.dev/gemini-api/docs/function-calling (REST: set_light_values; parallel function calling with
# power_disco_ball / start_music / dim_lights; the functionResponse turn has role "user")

GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
LIGHTS = {"name": "set_light_values", "description": "Sets the brightness and color temperature of a light.",
          "parameters": {"type": "object", "properties": {
              "brightness": {"type": "integer",
                             "description": "Light level from 0 to 100. Zero is off and 100 is full brightness"},
              "color_temp": {"type": "string", "enum": ["daylight", "cool", "warm"],
                             "description": "Color temperature of the light fixture."}},
              "required": ["brightness", "color_temp"]}}
PARTY = [{"name": "power_disco_ball", "description": "Powers the spinning disco ball.",
          "parameters": {"type": "object", "properties": {"power": {"type": "boolean"}}, "required": ["power"]}},
         {"name": "start_music", "description": "Play some music matching the specified parameters.",
          "parameters": {"type": "object", "properties": {"energetic": {"type": "boolean"},
                                                          "loud": {"type": "boolean"}},
                         "required": ["energetic", "loud"]}},
         {"name": "dim_lights", "description": "Dim the lights.",
          "parameters": {"type": "object", "properties": {"brightness": {"type": "number"}},
                         "required": ["brightness"]}}]


def _call(name: str, args: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"name": name, "args": args}
    if call_id:
        call["id"] = call_id
    return {"functionCall": call}


def _response(name: str, result: Any, call_id: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"name": name, "response": {"result": result}}
    if call_id:
        response["id"] = call_id
    return {"functionResponse": response}


GEMINI_ONE = {"tools": [{"functionDeclarations": [LIGHTS]}], "contents": [
    {"role": "user", "parts": [{"text": "Turn the lights down to a romantic level"}]},
    {"role": "model", "parts": [_call("set_light_values", {"brightness": 25, "color_temp": "warm"})]},
    {"role": "user", "parts": [_response("set_light_values", {"brightness": 25, "colorTemperature": "warm"})]},
]}
G1 = GEMINI_ONE["contents"]
GEMINI_THREE_REVERSED = {
    "systemInstruction": {"parts": [{"text": "You are a party planner."}]},
    "generationConfig": {"temperature": 0.7, "maxOutputTokens": 800, "thinkingConfig": {"thinkingBudget": 0}},
    "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
    "tools": [{"functionDeclarations": PARTY}], "contents": [
        {"role": "user", "parts": [{"text": "Turn this place into a party!"}]},
        {"role": "model", "parts": [
            {**_call("power_disco_ball", {"power": True}, "c1"), "thoughtSignature": "c2lnbmF0dXJl"},
            _call("start_music", {"energetic": True, "loud": True}, "c2"),
            _call("dim_lights", {"brightness": 0.5}, "c3")]},
        {"role": "user", "parts": [_response("dim_lights", True, "c3"), _response("start_music", True, "c2"),
                                   _response("power_disco_ball", True, "c1")]},  # reverse order
        {"role": "model", "parts": [{"text": "Party on!"}]},
        {"role": "user", "parts": [{"text": "Thanks"}]}]}
G3 = GEMINI_THREE_REVERSED["contents"]
JSON_SCHEMA_DECLARATION = {"name": "set_mode", "description": "Sets the mode.", "parametersJsonSchema": {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
    "properties": {"mode": {"const": "fast"}, "note": {"type": ["string", "null"]}}, "required": ["mode"]}}


def _declarations(*declarations: dict[str, Any]) -> dict[str, Any]:
    return _with(GEMINI_ONE, tools=[{"functionDeclarations": list(declarations)}])


def _lights_parameters(**changes: Any) -> dict[str, Any]:
    return _declarations({**LIGHTS, "parameters": {**LIGHTS["parameters"], **changes}})


@pytest.mark.parametrize(("body", "path"), [
    pytest.param(GEMINI_ONE, GEN, id="docs-one-call"),
    pytest.param(GEMINI_THREE_REVERSED, STREAM, id="docs-parallel-calls-with-ids-answered-in-reverse"),
    pytest.param(GEMINI_THREE_REVERSED, "/v1beta/models/gemini-3-pro-preview:streamGenerateContent",
                 id="gemini-3-first-call-carries-its-signature"),
    pytest.param(_declarations(JSON_SCHEMA_DECLARATION), GEN, id="parameters-json-schema-takes-raw-json-schema"),
    pytest.param(_with(GEMINI_ONE, tools=[{"function_declarations": [LIGHTS]}],
                       generation_config={"max_output_tokens": 10}), GEN, id="proto-field-names"),
    pytest.param(_lights_parameters(type="OBJECT", nullable=True, propertyOrdering=["brightness", "color_temp"]),
                 GEN, id="schema-subset-keys"),
])
def test_gemini_accepts(body: dict[str, Any], path: str) -> None:
    assert gemini_problems(body, path) == []


@pytest.mark.parametrize(("body", "path", "expected"), [
    pytest.param(GEMINI_ONE, "/v1beta/models/gemini-2.5-flash:chat", "Invalid path", id="wrong-path"),
    pytest.param(_with(GEMINI_ONE, messages=[]), GEN, 'Unknown name "messages": Cannot find field.',
                 id="unknown-top-level-field"),
    pytest.param(_with(GEMINI_ONE, contents=[{"role": "user", "parts": [{"text": "hi", "mime": "x"}]}]), GEN,
                 'Unknown name "mime" at \'contents[0].parts[0]\': Cannot find field.', id="sdk-unknown-part-field"),
    pytest.param(_with(GEMINI_ONE, contents=[{"role": "user", "parts": "hi"}]), GEN, "contents[0].parts",
                 id="sdk-parts-not-a-list"),
    pytest.param(_with(GEMINI_ONE, generationConfig={"max_tokens": 5}), GEN,
                 'Unknown name "max_tokens" at \'generationConfig\'', id="sdk-unknown-generation-config-field"),
    pytest.param(_with(GEMINI_ONE, systemInstruction={"text": "x"}), GEN,
                 'Unknown name "text" at \'systemInstruction\'', id="sdk-system-instruction-not-content"),
    pytest.param(_with(GEMINI_ONE, tools=[{"functionDeclarations": [LIGHTS], "function": {}}]), GEN,
                 'Unknown name "function" at \'tools[0]\'', id="sdk-unknown-tool-field"),
    pytest.param(_with(GEMINI_ONE, contents=[]), GEN, "contents is not specified", id="no-contents"),
    pytest.param(_with(GEMINI_ONE, contents=[{"role": "assistant", "parts": [{"text": "hi"}]}]), GEN,
                 "Please use a valid role: user, model.", id="role-assistant"),
    pytest.param(_with(GEMINI_ONE, contents=[G1[0], {**G1[1], "role": "user"}, G1[2]]), GEN,
                 "answers no functionCall of the previous model turn", id="call-in-a-user-turn-is-no-call"),
    pytest.param(_with(GEMINI_ONE, contents=[G1[0], G1[1], {"role": "user", "parts": [
        _response("tool", {"ok": True})]}]), GEN, "name 'tool' answers no functionCall", id="response-wrong-name"),
    pytest.param(_with(GEMINI_ONE, contents=[G1[0], G1[1], {"role": "user", "parts": [
        {"functionResponse": {"name": "", "response": {}}}]}]), GEN, "function_response.name: Name cannot be empty.",
        id="response-empty-name"),
    pytest.param(_with(GEMINI_THREE_REVERSED, contents=[G3[0], G3[1], {"role": "user", "parts": [
        _response("dim_lights", True, "c9"), _response("start_music", True, "c2"),
        _response("power_disco_ball", True, "c1")]}]), STREAM, "id 'c9' answers no functionCall",
        id="response-wrong-id"),
    pytest.param(_with(GEMINI_ONE, contents=[G1[0], G1[2]]), GEN, "answers no functionCall of the previous model turn",
                 id="response-without-call"),
    pytest.param(_with(GEMINI_ONE, contents=[*G1, {"role": "model", "parts": [{"text": "done"}]},
                                             {"role": "user", "parts": G1[2]["parts"]}]), GEN,
                 "answers no functionCall of the previous model turn", id="response-to-an-older-turn"),
    pytest.param(_with(GEMINI_THREE_REVERSED, contents=[G3[0], G3[1], {"role": "user", "parts": G3[2]["parts"][:2]}]),
                 STREAM, "the number of function response parts is equal to the number of function call parts",
                 id="call-unanswered"),
    pytest.param(_with(GEMINI_ONE, contents=G1[:2]), GEN, "the number of function response parts is equal",
                 id="call-unanswered-at-end"),
    pytest.param(_declarations({**LIGHTS, "parametersJsonSchema": LIGHTS["parameters"]}), GEN,
                 "parameters and parameters_json_schema are mutually exclusive", id="parameters-and-json-schema"),
    pytest.param(_lights_parameters(**{"$schema": "https://json-schema.org/draft/2020-12/schema"}), GEN,
                 'Unknown name "$schema" at \'tools[0].function_declarations[0].parameters\': Cannot find field.',
                 id="schema-dollar-schema"),
    pytest.param(_lights_parameters(additionalProperties=False), GEN,
                 'Unknown name "additionalProperties" at \'tools[0].function_declarations[0].parameters\'',
                 id="schema-additional-properties"),
    pytest.param(_lights_parameters(properties={"mode": {"type": "string", "const": "fast"}}), GEN,
                 'Unknown name "const" at \'tools[0].function_declarations[0].parameters.properties[0].value\'',
                 id="schema-const"),
    pytest.param(_lights_parameters(properties={"note": {"type": ["string", "null"]}}), GEN,
                 "Proto field is not repeating, cannot start list.", id="schema-type-list"),
    pytest.param(_lights_parameters(items={"type": "string", "$ref": "#/defs/x"}), GEN, 'Unknown name "$ref"',
                 id="schema-ref-nested-in-items"),
    pytest.param(_lights_parameters(type="dict"), GEN, "v1beta.Type), 'dict'", id="schema-unknown-type"),
    pytest.param(GEMINI_ONE, "/v1beta/models/gemini-3-flash-preview:generateContent",
                 "Function call is missing a thought_signature", id="gemini-3-call-without-signature"),
])
def test_gemini_refuses(body: dict[str, Any], path: str, expected: str) -> None:
    problems = gemini_problems(body, path)
    assert any(expected in p for p in problems), problems


# ---- replies and the handler wrapper ----------------------------------------------------------------------

@pytest.mark.parametrize(("api", "shape"), [
    pytest.param("openai_chat", {"error": {"message": "a\nb", "type": "invalid_request_error", "param": None,
                                           "code": None}}, id="openai-chat"),
    pytest.param("openai_responses", {"error": {"message": "a\nb", "type": "invalid_request_error", "param": None,
                                                "code": None}}, id="openai-responses"),
    pytest.param("anthropic", {"type": "error", "error": {"type": "invalid_request_error", "message": "a\nb"}},
                 id="anthropic"),
    pytest.param("gemini", {"error": {"code": 400, "message": "a\nb", "status": "INVALID_ARGUMENT"}}, id="gemini"),
])
def test_reject_shapes(api: str, shape: dict[str, Any]) -> None:
    reply = reject(api, ["a", "b"])
    assert (reply.status, reply.body) == (400, shape)


def _request(path: str, body: Any, headers: dict[str, str] | None = None, method: str = "POST") -> Request:
    return Request(method, path, headers or {}, json.dumps(body).encode())


def test_validating_passes_good_requests_and_other_paths_to_the_handler() -> None:
    ok = Json({"ok": True})
    handler = validating("openai_chat", lambda request: ok)
    assert handler(_request("/v1/chat/completions", CHAT_TWO_REVERSED)) is ok
    assert handler(_request("/v1/models", {"not": "checked"}, method="GET")) is ok
    assert handler(_request("/v1/embeddings", {"not": "checked"})) is ok
    assert handler.problems == [] and handler.rejected == []


@pytest.mark.parametrize(("api", "path", "body", "headers"), [
    pytest.param("openai_chat", "/chat/completions", _messages(CHAT_ONE, ONE[:2]), {}, id="openai-chat"),
    pytest.param("openai_responses", "/v1/responses", _with(RESPONSES_ONE, input=[_fco("x", "1")]), {},
                 id="openai-responses"),
    pytest.param("anthropic", "/v1/messages", CLAUDE_ONE, {"x-api-key": "k"}, id="anthropic"),
    pytest.param("gemini", GEN + "?alt=sse", _with(GEMINI_ONE, contents=G1[:2]), {}, id="gemini"),
])
def test_validating_rejects_and_records(api: str, path: str, body: Any, headers: dict[str, str]) -> None:
    handler = validating(api, lambda request: Json({"ok": True}))
    reply = handler(_request(path, body, headers))
    assert isinstance(reply, Json) and reply.status == 400
    assert handler.problems and handler.rejected[0].target == path
    assert reply.body == reject(api, handler.problems).body


def test_validating_refuses_a_body_that_is_not_json() -> None:
    handler = validating("anthropic", lambda request: Json({"ok": True}))
    reply = handler(Request("POST", "/v1/messages", HEADERS, b"{not json"))
    assert isinstance(reply, Json) and reply.status == 400
    assert handler.problems == ["We could not parse the JSON body of your request."]


async def test_validating_fake_upstream_answers_the_api_400_over_a_socket() -> None:
    handler = validating("anthropic", lambda request: Json({"id": "msg_1", "type": "message"}))
    bad = _messages(CLAUDE_ONE, [C1[0], C1[1], {"role": "user", "content": [_result("toolu_other", "1")]}])
    async with FakeUpstream(handler) as fake, httpx.AsyncClient(base_url=fake.url) as client:
        refused = await client.post("/v1/messages", json=bad, headers=HEADERS)
        accepted = await client.post("/v1/messages", json=CLAUDE_ONE, headers=HEADERS)
    assert refused.status_code == 400
    body = refused.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "unexpected `tool_use_id` found in `tool_result` blocks: toolu_other" in body["error"]["message"]
    assert (accepted.status_code, accepted.json()["id"]) == (200, "msg_1")
    assert len(fake.requests) == 2 and len(handler.rejected) == 1


@pytest.mark.parametrize(("check", "expected"), [
    pytest.param(lambda: openai_chat_problems(_messages(CHAT_ONE, [{"role": "wizard", "content": "hi"}])),
                 ["Invalid value for 'messages[0].role': Input should be 'developer', 'system', 'user', 'assistant', "
                  "'tool' or 'function'."], id="openai-chat-role"),
    pytest.param(lambda: openai_responses_problems(_with(RESPONSES_ONE, input=[{"role": "wizard", "content": "x"}])),
                 ["Invalid value for 'input[0].role': Input should be 'user', 'assistant', 'system' or 'developer'."],
                 id="openai-responses-role"),
    pytest.param(lambda: anthropic_problems(_messages(CLAUDE_ONE, [{"role": "user", "content": [
        {"type": "tool_result", "content": "1"}]}]), HEADERS),
        ["messages.0.content.0.tool_use_id: Field required",
         "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: None. Each `tool_result` "
         "block must have a corresponding `tool_use` block in the previous message."], id="anthropic-tool-result"),
])
def test_sdk_problems_name_the_union_member_that_was_meant(check: Any, expected: list[str]) -> None:
    """A union of TypedDicts reports every member's errors; only the member whose role/type matched is kept."""
    assert check() == expected
