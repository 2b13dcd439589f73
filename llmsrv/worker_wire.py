"""The predecessor's worker subjects (CONTRACT section 10): its message shapes to llmsrv's and back.

The TypeScript llm-server's ``htdag-llm-worker.ts`` took ``llm.req.<model>`` requests from an Elixir
scheduler, replied on the reply subject or else ``llm.resp.<run_id>.<node_id>``, streamed tokens on
``llm.tokens.<run_id>.<node_id>`` and sent a heartbeat on ``llm.health``. Shapes, as it declared them:

* request: ``{run_id, node_id, corr_id, model_id?, input: {type: "chat", messages}, params:
  {temperature?, max_tokens?, stream?}, span_ctx?}``; ``model_id`` overrides the subject's model token;
* reply: ``{corr_id, output, usage: {prompt_tokens, completion_tokens, total_tokens}, finish_reason,
  error?}``; llmsrv adds ``error_code`` beside ``error`` (a string: the message);
* token: ``{corr_id, chunk, seq, done}``, ``seq`` from 0 without gaps, the last one ``done: true``;
* heartbeat (every 30 s on ``llm.health``, no reply subject): ``{worker_id, timestamp, status,
  models}``; llmsrv adds ``instance_id``, ``version`` and ``inflight`` (CONTRACT section 6).

The request becomes an ``LLMRequest`` validated by the same rules as ``llm.request`` (errors name the
field in the worker's own shape, e.g. ``$.input.messages[0].role``); ``corr_id`` is its correlation id,
so ``llm.cancel`` reaches it. ``run_id`` and ``node_id`` become subject tokens, so they may not hold
``.``, ``*``, ``>`` or whitespace. Pure: no I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from . import errors
from .messages import LLMRequest, LLMResponse, Message, check_turns, decode_with

SubjectToken = Annotated[str, msgspec.Meta(pattern=r"^[^.*>\s]{1,128}$")]


class ChatInput(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    type: Literal["chat"]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]


class Params(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=128000)] | None = None
    stream: bool = False


class WorkerRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    run_id: SubjectToken
    node_id: SubjectToken
    corr_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    input: ChatInput
    params: Params = Params()
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    span_ctx: dict[str, Any] | None = None


class WorkerUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class WorkerReply(msgspec.Struct, omit_defaults=True):
    corr_id: str
    output: str
    usage: WorkerUsage
    finish_reason: str
    error: str | None = None
    error_code: str | None = None


class Heartbeat(msgspec.Struct):
    worker_id: str
    timestamp: str
    status: str  # "healthy", "degraded" (not ready: no NATS or no provider), "draining"
    models: list[str]
    instance_id: str
    version: str
    inflight: int


class Token(msgspec.Struct):
    corr_id: str
    chunk: str
    seq: int
    done: bool


_decoder = msgspec.json.Decoder(WorkerRequest)
_encode = msgspec.json.Encoder().encode
NO_USAGE = WorkerUsage(0, 0, 0)


def decode(data: bytes, model_token: str, max_depth: int) -> tuple[WorkerRequest, LLMRequest]:
    """The worker request in ``data`` (sent to ``llm.req.<model_token>``) and the ``LLMRequest`` it asks for."""
    worker: WorkerRequest = decode_with(_decoder, data, max_depth)
    messages = worker.input.messages
    try:
        check_turns(messages)
    except errors.ValidationFailed as exc:  # name the field where the worker put it
        raise errors.ValidationFailed(exc.message.replace("`$.messages", "`$.input.messages")) from None
    params = worker.params
    fields: dict[str, Any] = {"messages": messages, "model": worker.model_id or model_token,
                              "correlation_id": worker.corr_id, "stream": params.stream}
    if params.temperature is not None:
        fields["temperature"] = params.temperature
    if params.max_tokens is not None:
        fields["max_tokens"] = params.max_tokens
    return worker, LLMRequest(**fields)


def peek(data: bytes) -> tuple[str, str, str]:
    """``(corr_id, run_id, node_id)`` of a body that did not decode, as far as they can be read (else "")."""
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return "", "", ""
    if not isinstance(raw, dict):
        return "", "", ""
    found = [raw.get(k) for k in ("corr_id", "run_id", "node_id")]
    corr, run, node = (v if isinstance(v, str) else "" for v in found)
    ok = msgspec.json.Decoder(SubjectToken)
    try:  # only ids that are valid subject tokens may name a subject
        ok.decode(_encode(run))
        ok.decode(_encode(node))
    except msgspec.ValidationError:
        run = node = ""
    return corr[:128], run, node


def reply_subject(prefix: str, run_id: str, node_id: str) -> str:
    return f"{prefix}.resp.{run_id}.{node_id}"


def tokens_subject(prefix: str, run_id: str, node_id: str) -> str:
    return f"{prefix}.tokens.{run_id}.{node_id}"


def encode_reply(corr_id: str, response: LLMResponse) -> bytes:
    usage = response.usage
    return _encode(WorkerReply(corr_id, response.text, WorkerUsage(
        usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens + usage.completion_tokens),
        response.finish_reason))


def encode_error(corr_id: str, exc: errors.LlmsrvError) -> bytes:
    return _encode(WorkerReply(corr_id, "", NO_USAGE, "error", exc.message, exc.error_code))


def encode_token(corr_id: str, chunk: str, seq: int, done: bool = False) -> bytes:
    return _encode(Token(corr_id, chunk, seq, done))


def encode_heartbeat(beat: Heartbeat) -> bytes:
    return _encode(beat)
