"""The predecessor's worker shapes (CONTRACT section 10) to llmsrv's and back: pure, table-driven."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from llmsrv import errors, worker_wire
from llmsrv.messages import Attempt, LLMResponse, Usage

MSGS = [{"role": "user", "content": "hi"}]


def body(**kw: Any) -> bytes:
    doc: dict[str, Any] = {"run_id": "run-1", "node_id": "n7", "corr_id": "c-42",
                           "input": {"type": "chat", "messages": MSGS}, "params": {}}
    doc.update(kw)
    return msgspec.json.encode({k: v for k, v in doc.items() if v is not None})


def test_a_worker_request_becomes_an_llm_request() -> None:
    worker, request = worker_wire.decode(body(params={"temperature": 0.2, "max_tokens": 99, "stream": True},
                                              span_ctx={"trace": "x"}), "sonnet", 64)
    assert (worker.run_id, worker.node_id, worker.corr_id) == ("run-1", "n7", "c-42")
    assert request.model == "sonnet" and request.correlation_id == "c-42" and request.stream
    assert request.temperature == 0.2 and request.max_tokens == 99
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]


def test_model_id_overrides_the_subjects_token_and_defaults_apply() -> None:
    _, request = worker_wire.decode(body(model_id="gemini-2.5-pro", params=None), "auto", 64)
    assert request.model == "gemini-2.5-pro" and not request.stream
    assert request.temperature == 0.7 and request.max_tokens == 4000  # llm.request's defaults


@pytest.mark.parametrize(("data", "kind", "where"), [
    (b"{not json", errors.InvalidJson, ""),
    (body(run_id="a.b"), errors.ValidationFailed, "$.run_id"),  # it becomes a subject token
    (body(node_id="x y"), errors.ValidationFailed, "$.node_id"),
    (body(corr_id=""), errors.ValidationFailed, "$.corr_id"),
    (body(input={"type": "completion", "messages": MSGS}), errors.ValidationFailed, "$.input.type"),
    (body(input={"type": "chat", "messages": []}), errors.ValidationFailed, "$.input.messages"),
    (body(input={"type": "chat", "messages": [{"role": "robot", "content": "x"}]}), errors.ValidationFailed,
     "$.input.messages[0].role"),
    (body(input={"type": "chat", "messages": [{"role": "user", "content": ""}]}), errors.ValidationFailed,
     "$.input.messages[0]"),
    (body(params={"temperature": 3}), errors.ValidationFailed, "$.params.temperature"),
    (body(params={"top_k": 3}), errors.ValidationFailed, "$.params"),
    (body(extra=1), errors.ValidationFailed, "extra"),
], ids=["json", "dotted-run", "space-node", "empty-corr", "input-type", "no-messages", "role", "empty-content",
        "temperature", "unknown-param", "unknown-field"])
def test_bad_worker_requests_name_the_field(data: bytes, kind: type[errors.LlmsrvError], where: str) -> None:
    with pytest.raises(kind) as info:
        worker_wire.decode(data, "auto", 64)
    assert where in info.value.message


def test_too_deep_is_refused_before_decoding() -> None:
    deep = body(span_ctx={"a": [[[[[[[[[[1]]]]]]]]]]})
    with pytest.raises(errors.ValidationFailed, match="deeper"):
        worker_wire.decode(deep, "auto", 8)


@pytest.mark.parametrize(("data", "expected"), [
    (body(input="nope"), ("c-42", "run-1", "n7")),
    (body(run_id="a.b"), ("c-42", "", "")),  # not a subject token: no llm.resp subject from it
    (b"[1, 2]", ("", "", "")),
    (b"\xff", ("", "", "")),
    (msgspec.json.encode({"corr_id": 5, "run_id": "r", "node_id": "n"}), ("", "r", "n")),
], ids=["readable", "bad-token", "not-object", "not-utf8", "wrong-types"])
def test_peek_reads_what_it_safely_can(data: bytes, expected: tuple[str, str, str]) -> None:
    assert worker_wire.peek(data) == expected


def test_replies_and_tokens_in_the_predecessors_shapes() -> None:
    response = LLMResponse(text="hello", model="mock:echo", tokens_used=5, cost_cents=0.0, timestamp="t",
                           correlation_id="c-42", usage=Usage(3, 2), finish_reason="stop", tool_calls=[],
                           attempts=[Attempt("mock", "echo", "ok", 1)])
    assert msgspec.json.decode(worker_wire.encode_reply("c-42", response)) == {
        "corr_id": "c-42", "output": "hello", "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    error = msgspec.json.decode(worker_wire.encode_error("c-42", errors.Timeout("no answer within 30000 ms")))
    assert error == {"corr_id": "c-42", "output": "", "finish_reason": "error", "error": "no answer within 30000 ms",
                     "error_code": "TIMEOUT", "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    assert msgspec.json.decode(worker_wire.encode_token("c-42", "he", 0)) == {
        "corr_id": "c-42", "chunk": "he", "seq": 0, "done": False}
    assert worker_wire.reply_subject("llm", "r", "n") == "llm.resp.r.n"
    assert worker_wire.tokens_subject("llm", "r", "n") == "llm.tokens.r.n"


def test_the_heartbeat_has_the_predecessors_fields_and_ours() -> None:
    beat = worker_wire.Heartbeat("llmsrv-abc", "2026-12-03T15:00:00.000Z", "healthy", ["sonnet", "auto"], "abc",
                                 "0.1.0", 3)
    assert msgspec.json.decode(worker_wire.encode_heartbeat(beat)) == {
        "worker_id": "llmsrv-abc", "timestamp": "2026-12-03T15:00:00.000Z", "status": "healthy",
        "models": ["sonnet", "auto"], "instance_id": "abc", "version": "0.1.0", "inflight": 3}
