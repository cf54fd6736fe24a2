"""The wire protocol between the portal and the engine daemons, over Redis.

Pure Python: both sides import this module and nothing else to talk. Every message carries
``v`` (the protocol version); a reader refuses a version it does not know rather than guess.

Keys:

- ``lf:req:<base model>:<tenant>``   one tenant's stream of requests, read by the engines in one consumer
                                     group; an entry is deleted once its request has ended (XACK + XDEL)
- ``lf:tenants:<base model>``        hash tenant id → fair-share weight: the tenants that have a request
                                     stream, which the engines read in weighted round robin
- ``lf:dead:<base model>``           dead-letter stream: requests that failed too many deliveries, kept for
                                     the engines' retention period
- ``lf:resp:<request id>``           stream of one request's response events, expires after a while
- ``lf:control``                     stream of control events (adapter staged / deleted / pinned / unpinned, cancel)
- ``lf:pinned``                      set of the adapter sha256s staff pinned: an engine keeps each on its device
                                     once loaded (read at start; the pin events tell running engines)
- ``lf:usage``                       stream of usage events, one per request that ended on an engine; the
                                     portal's usage writers read it in one consumer group and delete what they wrote
- ``lf:engine:<engine id>``          heartbeat hash of one live engine, with a TTL
- ``lf:engines``                     sorted set engine id → last heartbeat time, for discovery
- ``lf:series:<engine id>``          stream of per-second samples (tokens/s, step time, queues), ~15 minutes
- ``lf:base-models``                 hash base model name → descriptor JSON, written by each daemon at start
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

PROTOCOL_VERSION = 1
CONSUMER_GROUP = "lf:engines"
CONTROL_STREAM = "lf:control"
PINNED_ADAPTERS_KEY = "lf:pinned"
ENGINES_KEY = "lf:engines"
RESPONSE_TTL_SECONDS = 600
HEARTBEAT_TTL_SECONDS = 5
SERIES_MAXLEN = 900  # one sample a second: the last 15 minutes
BASE_MODELS_KEY = "lf:base-models"
USAGE_STREAM = "lf:usage"
USAGE_GROUP = "lf:usage-writers"


def request_stream(base_model: str, tenant_id: str) -> str:
    return f"lf:req:{base_model}:{tenant_id}"


def tenant_index(base_model: str) -> str:
    return f"lf:tenants:{base_model}"


def enqueue_request(pipe: Any, request: InferenceRequest, *, weight: float = 1.0) -> None:
    """Queue ``request`` on its tenant's stream, listing the tenant and its weight for the engines.

    ``pipe`` is a Redis pipeline (sync or asyncio, made with ``transaction=True`` so that both
    commands land together); the caller executes it.
    """
    pipe.hset(tenant_index(request.base_model), request.tenant_id, repr(float(weight)))
    pipe.xadd(request_stream(request.base_model, request.tenant_id), request.to_redis())


def dead_letter_stream(base_model: str) -> str:
    return f"lf:dead:{base_model}"


def response_stream(request_id: str) -> str:
    return f"lf:resp:{request_id}"


def heartbeat_key(engine_id: str) -> str:
    return f"lf:engine:{engine_id}"


def series_stream(engine_id: str) -> str:
    return f"lf:series:{engine_id}"


class ProtocolError(ValueError):
    """A message that does not follow this protocol (wrong version, missing field, bad JSON)."""


def text_of(value: Any) -> str:
    """A Redis reply field (bytes) or a str, as str."""
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _decode_fields(raw: dict[Any, Any]) -> dict[str, str]:
    return {text_of(k): text_of(v) for k, v in raw.items()}


class _Message:
    """Messages travel as one stream entry: {"v": version, "type": kind, "body": JSON}."""

    kind: ClassVar[str]

    def to_redis(self) -> dict[str, str]:
        return {"v": str(PROTOCOL_VERSION), "type": self.kind, "body": json.dumps(asdict(self))}

    @classmethod
    def _from_body(cls, body: dict[str, Any]) -> Any:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        missing = [f.name for f in fields(cls) if f.name not in body and _required(f)]  # type: ignore[arg-type]
        if missing:
            raise ProtocolError(f"{cls.kind} message lacks {missing}")
        return cls(**{k: v for k, v in body.items() if k in names})


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _parse(raw: dict[Any, Any], registry: dict[str, type[_Message]]) -> Any:
    entry = _decode_fields(raw)
    version = entry.get("v")
    if version != str(PROTOCOL_VERSION):
        raise ProtocolError(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    kind = entry.get("type", "")
    if kind not in registry:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        body = json.loads(entry.get("body", ""))
    except ValueError as exc:
        raise ProtocolError(f"{kind} message body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind} message body must be an object")
    return registry[kind]._from_body(body)


@dataclass
class SamplingParams:
    """How a request picks its tokens and when it stops: the one schema of the portal, the wire and the engine.

    Checked here and nowhere else: a wrong type raises TypeError, a value out of range ValueError.
    On the wire it travels as a dict (``InferenceRequest.sampling``), read back by ``from_wire``.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: the engine's shared generator
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # report each generated token's log-probability under the model (an int k: and top k)
    top_logprobs: int = 0  # and this many most likely tokens at each position (needs logprobs)
    n: int = 1  # choices: the prompt is computed once and its KV blocks shared by the n sequences
    # A JSON schema the output must follow (constrained decoding, engine_daemon/guided.py): {"type":
    # "object"} for any JSON object. Checked by engine_daemon.grammars, which names what it cannot do.
    guided_json: dict[str, Any] | None = None
    # OpenAI's: logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty, over the
    # tokens generated so far; logit_bias adds to a token's logit (JSON keys are strings of token ids).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool):
            # vLLM's spelling, logprobs=k: the sampled token's and the k most likely.
            self.logprobs, self.top_logprobs = True, self.logprobs
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_token_id_key(key): value for key, value in self.logit_bias.items()}
        for name, hint in _type_hints(SamplingParams).items():
            value = getattr(self, name)
            if not _fits(value, hint):
                raise TypeError(f"{name} must be {_type_name(hint)}, got {value!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias.items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias maps token ids >= 0 to biases in [-100, 100], got {token}: {bias}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        if not 1 <= self.n <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}], got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change this request's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, body: Any) -> SamplingParams:
        """The parameters a request message carries; ProtocolError names the one that is wrong."""
        if not isinstance(body, dict):
            raise ProtocolError(f"sampling must be an object, got {body!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ProtocolError(f"unknown sampling parameters {unknown}; the known ones are {sorted(known)}")
        try:
            return cls(**body)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad sampling parameters: {exc}") from None


MAX_LOGIT_BIAS = 300  # tokens one request may bias, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # alternatives per position, as OpenAI allows
MAX_CHOICES = 16  # n: choices of one request (each a running sequence)


def _token_id_key(key: Any) -> Any:
    """A logit_bias key as JSON brings it ("123") or Python does (123); anything else is left for the type check."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value decoded from JSON has the annotated type (a bool is no number here)."""
    if isinstance(hint, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if typing.get_origin(hint) is dict:
        key_hint, value_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key_hint) and _fits(v, value_hint) for k, v in value.items())
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


@dataclass
class InferenceRequest(_Message):
    """One completion request, as the portal enqueues it on the base model's request stream."""

    kind: ClassVar[str] = "request"
    request_id: str
    tenant_id: str
    base_model: str
    # Exactly one of messages (chat) or prompt (plain completion); the engine owns tokenization.
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    adapter: str | None = None  # display name, e.g. "support-bot@3"
    adapter_sha256: str | None = None  # the staged version in the adapter cache; None = base model
    # OpenAI's tool definitions, for chat: the engine renders them into the prompt (engine_daemon/tool_calls.py).
    tools: list[dict[str, Any]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams.to_wire(); read by sampling_params()
    deadline: float | None = None  # unix time after which the client no longer waits
    created: float = 0.0
    key_id: str | None = None

    def sampling_params(self) -> SamplingParams:
        """Read apart from the message, so that bad parameters fail this request with a reason, not the entry."""
        return SamplingParams.from_wire(self.sampling)

    @classmethod
    def from_redis(cls, raw: dict[Any, Any]) -> InferenceRequest:
        return _parse(raw, {cls.kind: cls})


@dataclass
class DeltaEvent(_Message):
    """New text for one choice of one request from one engine step.

    ``logprob_content`` (when the request asked for logprobs) holds one entry per token of
    ``token_ids``, in OpenAI's chat shape: {"token": str, "bytes": [int], "logprob": float,
    "top_logprobs": [{"token", "bytes", "logprob"}, ...]}. A choice's last delta carries its
    ``finish_reason`` (its text may be empty); the request's ``done`` event follows its last choice's.
    """

    kind: ClassVar[str] = "delta"
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    index: int = 0  # the choice (0 .. n - 1)
    logprob_content: list[dict[str, Any]] | None = None
    finish_reason: str | None = None  # set on the choice's last delta: "stop" | "length"


@dataclass
class DoneEvent(_Message):
    kind: ClassVar[str] = "done"
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None = None
    engine_id: str | None = None
    cached_tokens: int = 0  # of the prompt tokens, those whose K/V came from the prefix cache
    # Every choice's finish reason, by index ([] from engines before n: then [finish_reason]);
    # completion_tokens counts the tokens of all choices, prompt_tokens the prompt once.
    finish_reasons: list[str] = field(default_factory=list)


@dataclass
class ErrorEvent(_Message):
    kind: ClassVar[str] = "error"
    code: str  # e.g. "prompt_too_long", "adapter_unavailable", "deadline_exceeded", "too_many_deliveries"
    message: str


@dataclass
class UsageEvent(_Message):
    """What one request cost, written by the engine at its end, whatever the end: done, cancelled, deadline, error.

    ``prompt_tokens`` counts the prompt tokens the engine computed (a request cancelled after its
    prefill pays for it); ``cached_tokens`` those of them served from a prefix cache.
    """

    kind: ClassVar[str] = "usage"
    request_id: str
    tenant_id: str
    base_model: str
    end: str  # one of USAGE_ENDS
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    key_id: str | None = None
    adapter: str | None = None  # display name, e.g. "support-bot@3"
    adapter_sha256: str | None = None
    error_code: str = ""
    created: float = 0.0  # when the request arrived at the portal
    engine_id: str | None = None
    admission: int | None = None  # where the engine admitted it in its order of admissions (None: never ran)

    DONE: ClassVar[str] = "done"
    CANCELLED: ClassVar[str] = "cancelled"
    DEADLINE: ClassVar[str] = "deadline"
    ERROR: ClassVar[str] = "error"

    def __post_init__(self) -> None:
        if self.end not in USAGE_ENDS:
            raise ProtocolError(f"unknown usage end {self.end!r}")

    @classmethod
    def for_request(cls, request: InferenceRequest, *, end: str, prompt_tokens: int, completion_tokens: int,
                    engine_id: str, error_code: str = "", cached_tokens: int = 0,
                    admission: int | None = None) -> UsageEvent:
        return cls(
            request_id=request.request_id, tenant_id=request.tenant_id, base_model=request.base_model, end=end,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_tokens=cached_tokens,
            key_id=request.key_id, adapter=request.adapter, adapter_sha256=request.adapter_sha256,
            error_code=error_code, created=request.created, engine_id=engine_id, admission=admission,
        )

    @classmethod
    def from_redis(cls, raw: dict[Any, Any]) -> UsageEvent:
        return _parse(raw, {cls.kind: cls})


USAGE_ENDS = (UsageEvent.DONE, UsageEvent.CANCELLED, UsageEvent.DEADLINE, UsageEvent.ERROR)


RESPONSE_EVENTS: dict[str, type[_Message]] = {c.kind: c for c in (DeltaEvent, DoneEvent, ErrorEvent)}


def response_event_from_redis(raw: dict[Any, Any]) -> DeltaEvent | DoneEvent | ErrorEvent:
    return _parse(raw, RESPONSE_EVENTS)


@dataclass
class ControlEvent(_Message):
    """Fan-out notices to every engine: an adapter version was staged, deleted, pinned or unpinned; a request
    was cancelled."""

    kind: ClassVar[str] = "control"
    action: str  # one of CONTROL_ACTIONS
    sha256: str | None = None
    adapter: str | None = None
    tenant_id: str | None = None
    base_model: str | None = None
    request_id: str | None = None

    ADAPTER_STAGED: ClassVar[str] = "adapter-staged"
    ADAPTER_DELETED: ClassVar[str] = "adapter-deleted"
    ADAPTER_PINNED: ClassVar[str] = "adapter-pinned"
    ADAPTER_UNPINNED: ClassVar[str] = "adapter-unpinned"
    CANCEL: ClassVar[str] = "cancel"

    def __post_init__(self) -> None:
        if self.action not in CONTROL_ACTIONS:
            raise ProtocolError(f"unknown control action {self.action!r}")

    @classmethod
    def from_redis(cls, raw: dict[Any, Any]) -> ControlEvent:
        return _parse(raw, {cls.kind: cls})


CONTROL_ACTIONS = (
    ControlEvent.ADAPTER_STAGED, ControlEvent.ADAPTER_DELETED, ControlEvent.ADAPTER_PINNED,
    ControlEvent.ADAPTER_UNPINNED, ControlEvent.CANCEL,
)


@dataclass(kw_only=True)
class EngineSnapshot:
    """One engine's state at one moment (``Engine.snapshot()``), torch-free so that the heartbeat can carry it.

    ``memory`` holds bytes: total / weights / kv_cache / adapter_pool / free. ``adapters`` holds one
    row per adapter the engine knows (its name is the content sha256 of the staged version): tier
    ("gpu" | "host" | "disk" | "loading" | "failed"), slot, requests, gpu_hits, host_hits, disk_loads,
    slot_loads, evictions, mean_load_seconds, last_used, error. The rates (tokens_per_second,
    step_seconds, lora_share) cover the last few seconds, so they fall to 0 when the engine idles.

    The prefix cache's figures count requests once, at their first admission, since the engine
    started: ``prefix_prompt_tokens`` their prompt tokens, ``prefix_cached_tokens`` those of them
    found in the cache; ``prefix_tenants`` the same per tenant id, as [prompt, cached].
    """

    base_model: str
    device: str
    dtype: str
    started: float
    lora_dtype: str = ""  # adapter weights in slots and host RAM ("" from engines before the field)
    kernels: str = ""  # the kernel backend the engine chose: "triton" | "native" | "torch"
    memory: dict[str, int] = field(default_factory=dict)
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    # The device adapter pool: its rows (one rank row of every projection each) and those taken;
    # bytes of adapter weights per tier ("gpu" pool rows taken, "host" copies, "disk" files), and
    # device loads per second over the last 10 s.
    adapter_pool_rows: int = 0
    adapter_pool_rows_used: int = 0
    adapter_bytes: dict[str, int] = field(default_factory=dict)
    adapter_loads_per_second: float = 0.0
    max_loras: int = 0  # distinct adapters in one step
    running: int = 0
    waiting: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    tokens_per_second: float = 0.0
    step_seconds: float = 0.0
    lora_share: float | None = None  # share of step time in the LoRA kernels (None: not measured)
    max_adapters_in_step: int = 0
    multi_adapter_steps: int = 0
    adapters: list[dict[str, Any]] = field(default_factory=list)
    prefix_caching: bool = False  # whether the engine reuses cached KV blocks (False from engines before the field)
    prefix_cache_blocks: int = 0  # KV blocks registered in the prefix cache, in use or idle
    prefix_prompt_tokens: int = 0
    prefix_cached_tokens: int = 0
    prefix_tenants: dict[str, list[int]] = field(default_factory=dict)  # tenant id -> [prompt, cached]

    @property
    def prefix_hit_rate(self) -> float | None:
        """Share of prompt tokens found in the prefix cache (None before the first request)."""
        return prefix_hit_rate(self.prefix_prompt_tokens, self.prefix_cached_tokens)


def prefix_hit_rate(prompt_tokens: int, cached_tokens: int) -> float | None:
    """Cached tokens / prompt tokens, the one definition of the prefix cache's hit rate (None: no prompt yet)."""
    return cached_tokens / prompt_tokens if prompt_tokens else None


@dataclass(kw_only=True)
class Heartbeat(EngineSnapshot):
    """An engine's snapshot as its daemon publishes it, rewritten every second as a hash with a TTL.

    The ops dashboard reads only this. To the snapshot the daemon adds who it is, when it wrote and
    what only it knows: requests in flight (read but not yet ended), whether it drains, its /metrics.
    """

    engine_id: str
    updated: float
    in_flight: int = 0
    draining: bool = False
    metrics_url: str | None = None

    @classmethod
    def of(cls, snapshot: EngineSnapshot, **daemon: Any) -> Heartbeat:
        """The heartbeat of ``snapshot``; ``daemon`` gives the fields this class adds."""
        return cls(**vars(snapshot), **daemon)

    def to_redis(self) -> dict[str, str]:
        return {"v": str(PROTOCOL_VERSION), **{k: json.dumps(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_redis(cls, raw: dict[Any, Any]) -> Heartbeat:
        entry = _decode_fields(raw)
        if entry.get("v") != str(PROTOCOL_VERSION):
            raise ProtocolError(f"heartbeat version {entry.get('v')!r} is not {PROTOCOL_VERSION}")
        names = {f.name for f in fields(cls)}
        try:
            values = {k: json.loads(v) for k, v in entry.items() if k in names}
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed heartbeat: {exc}") from None
