"""One request's life inside the engine: its tokens, its KV blocks, its adapter, its output text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine_daemon.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    tenant: str = "default"
    arrival: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)  # with params.top_logprobs
    # n > 1: this sequence is choice `choice` of its request; choice 0 holds the others until its
    # prompt is computed, then they fork from it (its KV blocks shared, Engine._fork_choices).
    choice: int = 0
    forks: list[Sequence] = field(default_factory=list)
    matcher: Any = None  # llguidance.LLMatcher of a guided request (guided.py)
    num_computed: int = 0  # tokens whose K/V sit in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1  # LoRA slot while running; -1 = base model
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    error_code: str | None = None  # with error: e.g. "adapter_unavailable"
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    admission: int | None = None  # this engine's count of admissions when the sequence first ran
    # Times a later request of its tenant was admitted first, while its adapter was not loaded and
    # not loading (Scheduler.max_adapter_passes bounds it).
    adapter_passes: int = 0
    adapter_wait_since: float | None = None  # monotonic time it was first found waiting for its adapter
    # Prefix caching (see prefix_cache.py): the hash chain's root, the hashes of full blocks so far,
    # the prompt tokens found in the cache at the first admission, blocks registered in this run.
    cache_salt: bytes = b""
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_registered_blocks: int = 0
    # Incremental detokenization (see detokenizer.py).
    text: str = ""
    emitted_chars: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed == 1 and bool(self.output_ids)

    def token_at(self, index: int) -> int:
        prompt = len(self.prompt_ids)
        return self.prompt_ids[index] if index < prompt else self.output_ids[index - prompt]

    def tokens(self, start: int, end: int) -> list[int]:
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        if start >= prompt:
            return self.output_ids[start - prompt : end - prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt]
