"""How a request arrives over NATS and how its answer leaves: one class per message protocol.

The service runs every request the same way (admission, one task, one cancel scope, the pipeline,
exactly one final reply); an edge only knows its protocol's shapes and subjects:

* ``RequestEdge``: ``llm.request`` (CONTRACT sections 2-4): ``LLMRequest`` in, ``LLMResponse`` or
  ``LLMError`` out on the reply subject (else ``llm.response`` / ``llm.error``), stream chunks with
  ``Llm-Stream`` headers;
* ``WorkerEdge``: the predecessor's ``llm.req.<model>`` (section 10, shapes in ``worker_wire.py``):
  replies on the reply subject, else ``llm.resp.<run_id>.<node_id>``; tokens on
  ``llm.tokens.<run_id>.<node_id>``, the last one ``done: true`` before the reply.

Every error reply carries the NATS micro headers (``Nats-Service-Error``, ``-Code``). A body over the
server's ``max_payload`` is fitted (a streamed final leaves out the text its chunks carried) or
becomes ``RESPONSE_TOO_LARGE``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from . import errors, messages, worker_wire
from .bus import Bus, Incoming
from .config import Config
from .messages import LLMRequest, LLMResponse, encode
from .streaming import Streamer

log = logging.getLogger("llmsrv.edges")
STREAM_CHUNK = {"Llm-Stream": "chunk"}
STREAM_END = {"Llm-Stream": "end"}
CHUNK_FIELDS_BYTES = 200  # what a chunk's fields other than its text take, at most


class Decoded(msgspec.Struct, frozen=True):
    request: LLMRequest
    correlation_id: str
    timeout_ms: int
    stream: bool
    context: Any = None  # the edge's own (the worker request)


class Edge(Protocol):
    def decode(self, msg: Incoming) -> Decoded: ...
    def peek(self, msg: Incoming) -> str: ...
    def streamer(self, msg: Incoming, decoded: Decoded) -> Streamer: ...
    def reply(self, msg: Incoming, decoded: Decoded, response: LLMResponse, streamer: Streamer | None) -> None: ...
    def error(self, msg: Incoming, decoded: Decoded | None, exc: errors.LlmsrvError, cid: str,
              streamer: Streamer | None) -> None: ...


class _Nats:
    """What both edges share: the bus, the limits, fitting a body into one NATS message."""

    def __init__(self, bus: Bus, cfg: Config) -> None:
        self.bus, self.server, self.prefix = bus, cfg.server, cfg.nats.subject_prefix
        self.interval_s = cfg.server.stream_flush_ms / 1000

    def check_size(self, msg: Incoming) -> None:
        if len(msg.data) > self.server.max_request_bytes:
            raise errors.PayloadTooLarge(f"body is {len(msg.data)} bytes; the limit is {self.server.max_request_bytes}")

    def timeout_ms(self, request: LLMRequest, headers: Mapping[str, str]) -> int:
        server = self.server
        return min(request.timeout_ms or messages.header_int(headers, "Llm-Timeout-Ms", 1, 600000)
                   or server.default_timeout_ms, server.max_timeout_ms)

    def room(self, headers: Mapping[str, str] | None) -> int:
        """What a body may take of the server's max_payload beside these headers (NATS/1.0 block)."""
        return self.bus.max_payload - (12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) if headers else 0)

    def max_chunk_chars(self, headers: Mapping[str, str] | None) -> int:
        return max(1, (self.room(headers) - CHUNK_FIELDS_BYTES) // 6)  # a character takes at most 6 (\u00XX)

    def fit(self, body: bytes, without_text: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        """``body``, else ``without_text`` (a streamed final: its chunks carried the text), else
        ``RESPONSE_TOO_LARGE``."""
        if len(body) <= self.room(headers):
            return body
        if without_text is not None and len(without_text) <= self.room(headers):
            return without_text
        raise errors.ResponseTooLarge(
            f"the reply would be over the NATS server's max_payload ({self.bus.max_payload} bytes)"
            + ("" if without_text is not None else "; ask with \"stream\": true to receive the text in chunks"))


class RequestEdge(_Nats):
    """``<prefix>.request``: llmsrv's own protocol."""

    def decode(self, msg: Incoming) -> Decoded:
        self.check_size(msg)
        request = messages.decode_request(msg.data, self.server.max_json_depth)
        headers = msg.headers or {}
        cid = request.correlation_id or messages.header_correlation_id(headers) or messages.new_correlation_id()
        return Decoded(request, cid, self.timeout_ms(request, headers), request.stream and bool(msg.reply))

    def peek(self, msg: Incoming) -> str:
        return messages.peek_correlation_id(msg.data, msg.headers, self.server.max_json_depth)

    def streamer(self, msg: Incoming, decoded: Decoded) -> Streamer:
        reply = msg.reply

        def publish(chunk: bytes) -> None:
            self.bus.publish_nowait(reply, chunk, STREAM_CHUNK)

        return Streamer(publish, decoded.correlation_id, self.interval_s, self.max_chunk_chars(STREAM_CHUNK))

    def reply(self, msg: Incoming, decoded: Decoded, response: LLMResponse, streamer: Streamer | None) -> None:
        end = STREAM_END if streamer is not None else None
        lean = encode(msgspec.structs.replace(response, text="")) if streamer is not None else None
        self.bus.publish_nowait(msg.reply or f"{self.prefix}.response", self.fit(encode(response), lean, end), end)

    def error(self, msg: Incoming, decoded: Decoded | None, exc: errors.LlmsrvError, cid: str,
              streamer: Streamer | None) -> None:
        headers = messages.error_headers(exc)
        if streamer is not None:
            headers.update(STREAM_END)
        self.bus.publish_nowait(msg.reply or f"{self.prefix}.error", messages.error_body(exc, cid), headers)


class WorkerEdge(_Nats):
    """``<prefix>.req.<model>``: the predecessor's worker protocol."""

    def decode(self, msg: Incoming) -> Decoded:
        self.check_size(msg)
        token = msg.subject[len(self.prefix) + len(".req."):]
        worker, request = worker_wire.decode(msg.data, token, self.server.max_json_depth)
        return Decoded(request, worker.corr_id, self.timeout_ms(request, msg.headers or {}), request.stream, worker)

    def peek(self, msg: Incoming) -> str:
        return worker_wire.peek(msg.data)[0]

    def streamer(self, msg: Incoming, decoded: Decoded) -> Streamer:
        worker: worker_wire.WorkerRequest = decoded.context
        subject = worker_wire.tokens_subject(self.prefix, worker.run_id, worker.node_id)
        cid = decoded.correlation_id

        def publish(chunk: bytes) -> None:
            self.bus.publish_nowait(subject, chunk)

        def encode_chunk(seq: int, text: str) -> bytes:
            return worker_wire.encode_token(cid, text, seq)

        return Streamer(publish, cid, self.interval_s, self.max_chunk_chars(None), encode_chunk)

    def _done(self, decoded: Decoded | None, streamer: Streamer | None) -> None:
        if decoded is not None and streamer is not None:  # the last token says so, before the reply
            worker: worker_wire.WorkerRequest = decoded.context
            self.bus.publish_nowait(worker_wire.tokens_subject(self.prefix, worker.run_id, worker.node_id),
                                    worker_wire.encode_token(decoded.correlation_id, "", streamer.seq, done=True))

    def _where(self, msg: Incoming, run_id: str, node_id: str) -> str:
        return msg.reply or (worker_wire.reply_subject(self.prefix, run_id, node_id) if run_id and node_id else "")

    def reply(self, msg: Incoming, decoded: Decoded, response: LLMResponse, streamer: Streamer | None) -> None:
        worker: worker_wire.WorkerRequest = decoded.context
        cid = decoded.correlation_id
        lean = worker_wire.encode_reply(cid, msgspec.structs.replace(response, text="")) if streamer else None
        body = self.fit(worker_wire.encode_reply(cid, response), lean, None)
        self._done(decoded, streamer)
        self.bus.publish_nowait(self._where(msg, worker.run_id, worker.node_id), body)

    def error(self, msg: Incoming, decoded: Decoded | None, exc: errors.LlmsrvError, cid: str,
              streamer: Streamer | None) -> None:
        if decoded is not None:
            run_id, node_id = decoded.context.run_id, decoded.context.node_id
        else:
            _, run_id, node_id = worker_wire.peek(msg.data)
        where = self._where(msg, run_id, node_id)
        if not where:
            log.warning("a worker request on %s had no reply subject and no usable run_id/node_id: its %s "
                        "could not be sent", str(msg.subject)[:200], exc.error_code)
            return
        self._done(decoded, streamer)
        self.bus.publish_nowait(where, worker_wire.encode_error(cid, exc), messages.error_headers(exc))
