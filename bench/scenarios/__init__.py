"""The scenarios ``python -m bench`` knows: name -> module (each with ``NAME``, ``SUMMARY``, ``run``)."""

from __future__ import annotations

from types import ModuleType

from bench.scenarios import (
    cancel,
    decode,
    faults,
    latency,
    observability,
    overhead,
    overload,
    peers,
    provider,
    scale,
    scaleout,
    stream,
)

SCENARIOS: dict[str, ModuleType] = {
    m.NAME: m for m in (overhead, latency, overload, cancel, stream, provider, peers, decode, scale, faults, scaleout,
                                           observability)}
