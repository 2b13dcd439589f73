"""Configuration: frozen msgspec structs, loaded once from TOML + environment.

Order of precedence (last wins): built-in defaults < TOML file (``--config`` / ``LLMSRV_CONFIG``)
< ``NATS_URL`` (the predecessor's variable: nats.url only) < ``LLMSRV__SECTION__KEY=value``
environment overrides < ``LLMSRV_NATS_URL`` < CLI flags. Only when no NATS URL comes from any of
them does ``llmsrv serve`` embed a nats-server.
Tables merge key by key, so ``[routing.matrix.general] simple = [...]`` replaces one cell of the
default matrix, not the whole matrix. An invalid config raises ``ConfigError`` naming the key path.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tomllib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class ConfigError(Exception):
    """Invalid configuration; the message names the key path."""


class _Frozen(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NatsConfig(_Frozen, frozen=True):
    url: str | None = None  # None everywhere -> embedded nats-server
    queue: Annotated[str, msgspec.Meta(min_length=1)] = "llmsrv"
    subject_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")] = "llm"
    name: str = "llmsrv"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    initial_connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # then start-up fails
    reconnect_time_wait_s: NonNegFloat = 1.0
    max_reconnect_attempts: int = -1  # -1: forever
    # a connection is stale (then dropped and reconnected) after max_outstanding_pings unanswered
    # pings sent every ping_interval_s (nats-py's defaults: a dead server is noticed in 4-6 minutes)
    ping_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    max_outstanding_pings: PositiveInt = 2
    # nats-py drops a subscription's messages once this many (or bytes) wait unprocessed
    # (a "slow consumer"); drops are counted in llmsrv_nats_dropped_total and logged.
    pending_msgs_limit: PositiveInt = 524288
    pending_bytes_limit: PositiveInt = 134217728
    # health, admin and $SRV discovery on a second connection (named "<name>-control"), so they are not
    # read behind every request already waiting on the first (measured: 0.3 s behind a 10,000-request burst)
    control_connection: bool = True


class ServerConfig(_Frozen, frozen=True):
    max_inflight: PositiveInt = 10000
    default_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600000)] = 30000
    max_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600000)] = 600000
    max_request_bytes: PositiveInt = 1048576
    max_json_depth: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 64  # deeper: VALIDATION_ERROR
    max_upstream_bytes: PositiveInt = 16777216  # a larger upstream body is cut off: PROVIDER_ERROR
    # admitted but not started within this, or arriving while requests wait this long in front of
    # the instance (admission.py: a self-ping's round trip): OVERLOADED at once
    max_queue_ms: PositiveInt = 1000
    heartbeat_s: NonNegFloat = 30.0  # the predecessor's heartbeat on <prefix>.health; 0 disables
    # the predecessor's worker model tokens (llm.req.<model>, CONTRACT section 10): named in the
    # heartbeat and in $SRV.INFO; any other token on llm.req.> is served too, routed like a model name
    worker_models: tuple[str, ...] = ("sonnet", "opus", "gemini-2.5-pro", "gemini-2.5-flash", "gpt-4o",
                                      "gpt-5-codex", "o3-mini-codex", "auto")
    drain_grace_s: NonNegFloat = 10.0
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464
    http_host: str = "127.0.0.1"
    # the variable holding the comma-separated keys of the OpenAI-compatible API (/v1/*); without
    # keys /v1/* is served only on a loopback http_host (httpapi.http_api_keys)
    http_api_keys_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "LLMSRV_HTTP_API_KEYS"
    stream_flush_ms: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 25
    worker_idle_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0  # then an idle worker task retires...
    min_idle_workers: Annotated[int, msgspec.Meta(ge=1)] = 8  # ...unless only this many are idle
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # false: no request, latency, token or cost series are counted (what they cost: python -m bench observability)
    metrics: bool = True
    # JSON lines; "text" for people; "auto": text when stderr is a terminal (logs.py)
    log_format: Literal["auto", "json", "text"] = "auto"
    # httpx/httpcore loggers stay at warning (they log upstream headers); true lets them log at
    # log_level, still through the redacting filter
    wire_debug: bool = False


class Price(_Frozen, frozen=True):
    """USD per million tokens (what provider price pages list)."""

    input_per_mtok: NonNegFloat = 0.0
    output_per_mtok: NonNegFloat = 0.0


class ProviderConfig(_Frozen, frozen=True):
    """Keys every provider takes (CONTRACT section 7)."""

    base_url: str | None = None
    api_key_env: str | None = None
    rpm: str | None = None
    tpm: str | None = None
    max_concurrency: PositiveInt = 64
    breaker_threshold: PositiveInt = 5
    breaker_ttl_s: NonNegFloat = 30.0
    timeout_ms: PositiveInt = 60000
    prices: dict[str, Price] = {}  # model id -> price; cost_cents in replies comes from here
    # subprocess providers (cursor): the command and its arguments; "{model}" and "{prompt}" are
    # replaced per call. Empty: the provider's default command.
    command: tuple[str, ...] = ()
    kill_grace_s: NonNegFloat = 2.0  # after SIGTERM to the process group, SIGKILL
    # claude, codex, gemini: "api" (the HTTP API, a key), "cli" (the vendor's CLI on its own login),
    # "auto" (the API when a key is set, else the CLI when installed and logged in); others ignore it
    transport: Literal["auto", "api", "cli"] = "auto"
    # "model": one breaker per provider:model (failures of the whole provider count for all of
    # its models); "provider": one breaker for the provider
    breaker_scope: Literal["model", "provider"] = "model"


class MockConfig(ProviderConfig, frozen=True):
    max_concurrency: PositiveInt = 100000  # the mock is for load tests: its bulkhead must not be the cap
    latency_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    tokens_per_second: NonNegFloat = 0.0  # 0: the whole text at once
    error_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0


class ProvidersConfig(_Frozen, frozen=True):
    mock: MockConfig = MockConfig()
    claude: ProviderConfig = ProviderConfig()
    gemini: ProviderConfig = ProviderConfig()
    codex: ProviderConfig = ProviderConfig()
    copilot: ProviderConfig = ProviderConfig()
    github: ProviderConfig = ProviderConfig()
    jules: ProviderConfig = ProviderConfig()
    cursor: ProviderConfig = ProviderConfig()
    openrouter: ProviderConfig = ProviderConfig()
    openai_compat: ProviderConfig = ProviderConfig()


Cell = list[Annotated[str, msgspec.Meta(pattern=r"^[a-z_]+:.+$")]]


class MatrixRow(_Frozen, frozen=True):
    simple: Cell
    medium: Cell
    complex: Cell


class Matrix(_Frozen, frozen=True):
    general: MatrixRow
    architect: MatrixRow
    coder: MatrixRow
    qa: MatrixRow


Score = Annotated[int, msgspec.Meta(ge=1, le=10)]
CapabilityName = Literal["code", "reasoning", "creativity", "speed", "cost"]


class ComplexityConfig(_Frozen, frozen=True):
    """The additive score that infers a missing ``complexity`` (README: "Complexity inference")."""

    medium_at: int = 2
    complex_at: int = 4
    length_chars: tuple[PositiveInt, ...] = (400, 1500, 4000)  # +1 for each one the text is longer than
    many_messages: PositiveInt = 6  # +1 when the conversation has more messages than this
    complex_words: tuple[str, ...] = (
        "architecture", "architect", "design a", "distributed", "scalab", "concurren", "migrat",
        "optimi", "security", "threat model", "refactor", "prove", "formal", "trade-off", "tradeoff",
        "end-to-end", "system design", "algorithm")
    medium_words: tuple[str, ...] = (
        "implement", "write a", "debug", "explain", "compare", "analy", "review", "test", "convert",
        "function", "class", "query", "fix")
    simple_words: tuple[str, ...] = (
        "what is", "define", "translate", "summari", "classify", "yes or no", "list ", "spell",
        "capital of", "hello", "hi ")
    code_markers: tuple[str, ...] = ("```", "def ", "class ", "function ", "=>", "#include", "import ",
                               "select ", "{", "};")
    reasoning_markers: tuple[str, ...] = ("step by step", "why ", "reason", "justify", "derive", "proof")


class RetryConfig(_Frozen, frozen=True):
    max_attempts: PositiveInt = 3  # attempts per request, over all candidates
    backoff_base_ms: Annotated[int, msgspec.Meta(ge=0)] = 100
    backoff_max_ms: Annotated[int, msgspec.Meta(ge=0)] = 5000


class HedgeConfig(_Frozen, frozen=True):
    enabled: bool = False
    delay_ms: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: the candidate's observed p95 latency
    default_delay_ms: PositiveInt = 2000  # used while a provider has too few samples for a p95
    tasks: tuple[str, ...] = ()  # task types (after aliases) to hedge; empty: all


class RoutingConfig(_Frozen, frozen=True, kw_only=True):
    matrix: Matrix
    aliases: dict[str, str] = {}
    # bare model name prefix -> the providers serving that family, in order ("provider" or
    # "provider:template" with {model}); longest prefix wins
    prefixes: dict[str, str | list[str]] = {}
    provider_aliases: dict[str, str] = {}  # provider hint -> provider key (the predecessor's names)
    capability_scores: dict[str, dict[CapabilityName, Score]] = {}  # "provider:model" or "provider"
    complexity: ComplexityConfig = ComplexityConfig()
    retry: RetryConfig = RetryConfig()
    hedge: HedgeConfig = HedgeConfig()
    resilience: bool = True  # false: no breakers, limits, bulkheads, retries (for benchmarks)
    # memory:// (per instance) or redis://host:port/db: rate limits and breaker openings shared
    # by every instance using the same Redis
    storage_uri: Annotated[str, msgspec.Meta(pattern=r"^(memory://.*|rediss?://.+)$")] = "memory://"
    breaker_sync_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0


class TracingConfig(_Frozen, frozen=True):
    """OpenTelemetry traces (``llmsrv.tracing``; needs ``pip install 'llmsrv[otel]'``). Also turned on by the
    standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_EXPORTER=otlp``) and off by
    ``OTEL_SDK_DISABLED=true``."""

    enabled: bool = False
    # the OTLP/HTTP collector: a base URL ("http://collector:4318") gets /v1/traces; None: the
    # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables, else http://localhost:4318/v1/traces
    endpoint: Annotated[str, msgspec.Meta(pattern=r"^https?://.+$")] | None = None
    service_name: Annotated[str, msgspec.Meta(min_length=1)] = "llmsrv"  # OTEL_SERVICE_NAME wins over the default
    # share of new traces recorded; a request joining a trace follows the caller's sampled flag
    sample_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0


class Config(_Frozen, frozen=True, kw_only=True):
    nats: NatsConfig = NatsConfig()
    server: ServerConfig = ServerConfig()
    providers: ProvidersConfig = ProvidersConfig()
    routing: RoutingConfig
    tracing: TracingConfig = TracingConfig()


_G, _A, _C, _Q = "general", "architect", "coder", "qa"


def _prices(table: dict[str, tuple[float, float]]) -> dict[str, Any]:
    return {"prices": {m: {"input_per_mtok": i, "output_per_mtok": o} for m, (i, o) in table.items()}}


DEFAULTS: dict[str, Any] = {
    # Public list prices, USD per million tokens (input, output), as of 2026-12 (Anthropic's models
    # overview and pricing pages, OpenAI's and Google's pricing pages; README "Providers" says how they were
    # checked). Override or extend per model in config: [providers.X.prices."model-id"].
    "providers": {
        "claude": _prices({"claude-opus-4-7": (5.0, 25.0), "claude-opus-4-6": (5.0, 25.0),
                           "claude-opus-4-5": (5.0, 25.0), "claude-opus-4-1": (15.0, 75.0),
                           "claude-sonnet-4-6": (3.0, 15.0), "claude-sonnet-4-5": (3.0, 15.0),
                           "claude-haiku-4-5": (1.0, 5.0)}),
        "codex": _prices({"gpt-5.2": (1.75, 14.0), "gpt-5.2-codex": (1.75, 14.0), "gpt-5.3-codex": (1.75, 14.0),
                          "gpt-5.1": (1.25, 10.0), "gpt-5.1-codex": (1.25, 10.0), "gpt-5-codex": (1.25, 10.0),
                          "gpt-5": (1.25, 10.0), "gpt-5-mini": (0.25, 2.0), "gpt-4.1": (2.0, 8.0),
                          "gpt-4o": (2.5, 10.0), "o3-mini": (1.1, 4.4)}),
        "gemini": _prices({"gemini-3.1-pro-preview": (2.0, 12.0), "gemini-3-flash-preview": (0.5, 3.0),
                           "gemini-2.5-pro": (1.25, 10.0), "gemini-2.5-flash": (0.3, 2.5),
                           "gemini-2.5-flash-lite": (0.1, 0.4)}),
        "jules": {"timeout_ms": 600000},  # agent tasks take minutes; the request deadline still applies
    },
    "routing": {
        # CONTRACT section 5, as data.
        "matrix": {
            _G: {
                "simple": ["gemini:gemini-2.5-flash", "copilot:gpt-5-mini", "copilot:grok-code-fast-1",
                           "codex:o3-mini", "cursor:auto"],
                "medium": ["copilot:gpt-4o", "claude:sonnet", "gemini:gemini-2.5-pro", "codex:gpt-5-codex",
                           "copilot:gpt-4.1", "cursor:auto"],
                "complex": ["claude:sonnet", "codex:gpt-5-codex", "claude:opus", "copilot:gpt-4o",
                            "gemini:gemini-2.5-pro", "copilot:gpt-4.1", "cursor:auto"],
            },
            _A: {
                "simple": ["copilot:gpt-4o", "claude:sonnet", "openrouter:auto", "gemini:gemini-2.5-flash",
                           "cursor:auto"],
                "medium": ["copilot:gpt-4o", "claude:sonnet", "openrouter:auto", "codex:gpt-5-codex",
                           "gemini:gemini-2.5-pro", "copilot:gpt-4.1", "cursor:auto"],
                "complex": ["claude:opus", "openrouter:auto", "codex:gpt-5-codex", "claude:sonnet",
                            "copilot:gpt-4o", "copilot:gpt-4.1", "cursor:auto"],
            },
            _C: {
                "simple": ["copilot:gpt-5-mini", "copilot:grok-code-fast-1", "openrouter:auto",
                           "gemini:gemini-2.5-flash", "codex:o3-mini", "cursor:auto"],
                "medium": ["copilot:gpt-4o", "codex:gpt-5-codex", "openrouter:auto", "copilot:gpt-4.1",
                           "claude:sonnet", "cursor:auto"],
                "complex": ["codex:gpt-5-codex", "claude:opus", "copilot:gpt-4o", "openrouter:auto",
                            "claude:sonnet", "cursor:auto"],
            },
            _Q: {
                "simple": ["copilot:gpt-4o", "gemini:gemini-2.5-flash", "claude:sonnet", "cursor:auto"],
                "medium": ["copilot:gpt-4o", "claude:sonnet", "gemini:gemini-2.5-pro", "copilot:gpt-4.1",
                           "cursor:auto"],
                "complex": ["claude:sonnet", "codex:gpt-5-codex", "copilot:gpt-4o", "claude:opus",
                            "copilot:gpt-4.1", "cursor:auto"],
            },
        },
        # the current model of each Claude tier (Anthropic's models overview, 2026-12)
        "aliases": {"sonnet": "claude-sonnet-4-6", "opus": "claude-opus-4-7", "haiku": "claude-haiku-4-5",
                    # the predecessor's worker model tokens
                    "o3-mini-codex": "o3-mini", "claude-sonnet-4.5": "claude-sonnet-4-5"},
        # bare model names: the providers of each family, first with credentials first (the
        # predecessor sent bare gpt-* to Copilot); GitHub Models and OpenRouter name models publisher/model
        "prefixes": {
            "claude-": ["claude", "openrouter:anthropic/{model}"],
            "gemini-": ["gemini", "openrouter:google/{model}"],
            "gpt-": ["copilot", "codex", "github:openai/{model}", "openrouter:openai/{model}"],
            "o1": ["codex", "github:openai/{model}", "openrouter:openai/{model}"],
            "o3": ["codex", "copilot", "github:openai/{model}", "openrouter:openai/{model}"],
            "o4": ["codex", "github:openai/{model}", "openrouter:openai/{model}"],
            "codex-": ["codex"], "gpt-5-codex": ["codex", "openrouter:openai/{model}"],
            "grok-": ["copilot", "openrouter:x-ai/{model}"],
            "echo": ["mock"], "lorem": ["mock"],
        },
        # provider hints as the predecessor (and its clients) wrote them
        "provider_aliases": {
            "claude-code": "claude", "anthropic": "claude", "github-copilot": "copilot", "grok": "copilot",
            "google": "gemini", "gemini-cli": "gemini", "openai": "codex", "codex-cli": "codex",
        },
        # 1-10; a missing model or capability scores a neutral 5.
        "capability_scores": {
            "claude:claude-opus-4-7": {"code": 9, "reasoning": 10, "creativity": 9, "speed": 3, "cost": 4},
            "claude:claude-sonnet-4-6": {"code": 9, "reasoning": 8, "creativity": 8, "speed": 6, "cost": 5},
            "codex:gpt-5-codex": {"code": 10, "reasoning": 8, "creativity": 5, "speed": 5, "cost": 5},
            "codex:o3-mini": {"code": 7, "reasoning": 8, "creativity": 4, "speed": 7, "cost": 8},
            "gemini:gemini-2.5-pro": {"code": 8, "reasoning": 8, "creativity": 7, "speed": 5, "cost": 5},
            "gemini:gemini-2.5-flash": {"code": 6, "reasoning": 6, "creativity": 6, "speed": 9, "cost": 9},
            "copilot:gpt-4o": {"code": 7, "reasoning": 6, "creativity": 7, "speed": 7, "cost": 7},
            "copilot:gpt-4.1": {"code": 8, "reasoning": 7, "creativity": 6, "speed": 7, "cost": 7},
            "copilot:gpt-5-mini": {"code": 7, "reasoning": 7, "creativity": 5, "speed": 8, "cost": 9},
            "copilot:grok-code-fast-1": {"code": 8, "reasoning": 5, "creativity": 4, "speed": 10, "cost": 9},
            "mock": {"speed": 10, "cost": 10},
        },
    },
}


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``LLMSRV__SERVER__MAX_INFLIGHT=50`` -> ``{"server": {"max_inflight": 50}}``.

    The value is read as a TOML value when it parses as one (numbers, booleans, arrays), else as
    a plain string.
    """
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith("LLMSRV__"):
            continue
        path = [p.lower() for p in name[len("LLMSRV__"):].split("__") if p]
        if not path:
            continue
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    head, sep, where = text.rpartition(" - at `$")
    if not sep:
        return f"invalid config: {text}"
    key = where.rstrip("`").lstrip(".")
    return f"invalid config at `{key or '(top level)'}`: {head}"


OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")  # [tracing] needs them


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def build_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Validate ``data`` (as read from TOML) on top of the defaults and env overrides."""
    env = os.environ if env is None else env
    merged = _merge(copy.deepcopy(DEFAULTS), data)
    if env.get("NATS_URL"):
        merged = _merge(merged, {"nats": {"url": env["NATS_URL"]}})
    merged = _merge(merged, _env_overrides(env))
    if env.get("LLMSRV_NATS_URL"):
        merged = _merge(merged, {"nats": {"url": env["LLMSRV_NATS_URL"]}})
    try:
        cfg = msgspec.convert(merged, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if cfg.routing.storage_uri.startswith("redis") and importlib.util.find_spec("redis") is None:
        raise ConfigError("invalid config at `routing.storage_uri`: redis storage needs the redis "
                          "client: pip install 'llmsrv[redis]'")
    if cfg.tracing.enabled and not all(map(_importable, OTEL_MODULES)):
        raise ConfigError("invalid config at `tracing.enabled`: tracing needs OpenTelemetry: "
                          "pip install 'llmsrv[otel]'")
    if cfg.server.default_timeout_ms > cfg.server.max_timeout_ms:
        raise ConfigError("invalid config at `server.default_timeout_ms`: must not exceed "
                          f"server.max_timeout_ms ({cfg.server.max_timeout_ms})")
    return cfg


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    path = path or env.get("LLMSRV_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return build_config(data, env)


def differences(old: Config, new: Config) -> list[str]:
    """The dotted key paths whose values differ between two configs (a SIGHUP reload's log line)."""
    changed: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys()):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            changed.append(path)

    walk(msgspec.to_builtins(old), msgspec.to_builtins(new), "")
    return changed


RESTART_ONLY = ("nats", "server", "tracing", "routing.storage_uri")  # what shapes the running process


def reloadable(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a live reload (SIGHUP) applies: ``new`` with the ``RESTART_ONLY`` keys kept at their old
    values, the changed keys it applies and the changed keys that wait for a restart."""
    changed = differences(old, new)
    kept = [k for k in changed if any(k == p or k.startswith(p + ".") for p in RESTART_ONLY)]
    applied = msgspec.structs.replace(new, nats=old.nats, server=old.server, tracing=old.tracing,
                                      routing=msgspec.structs.replace(new.routing,
                                                                      storage_uri=old.routing.storage_uri))
    return applied, [k for k in changed if k not in kept], kept


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with some keys replaced, validated again (used by CLI flags and tests)."""
    data = msgspec.to_builtins(cfg)
    return build_config(_merge(data, sections), env={})
