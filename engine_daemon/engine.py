"""``Engine``: the step loop (schedule → forward → sample → postprocess) and the offline API."""

from __future__ import annotations

import hashlib
import itertools
import time
import uuid
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

import kernels
from engine_daemon import detokenizer, tool_calls
from engine_daemon.adapter_pool import pool_bytes_for
from engine_daemon.adapters import AdapterResidency
from engine_daemon.config import EngineConfig
from engine_daemon.grammars import GrammarError
from engine_daemon.guided import GuidedTokenizer, advance, allowed_tokens
from engine_daemon.kv_cache import KVCache
from engine_daemon.loader import load_weights
from engine_daemon.lora import LoraBatch, PoolGroups
from engine_daemon.model import AttentionMetadata, LlamaModel, ModelConfig
from engine_daemon.model_source import SUPPORTED_ARCHITECTURES, resolve_model
from engine_daemon.peft_format import AdapterError, descriptor_from_config
from engine_daemon.prefix_cache import cache_salt
from engine_daemon.protocol import EngineSnapshot
from engine_daemon.sampling import Sampler, SamplingParams, make_generator
from engine_daemon.scheduler import ScheduledSeq, Scheduler
from engine_daemon.sequence import Sequence, Status
from engine_daemon.tokenizer import load_tokenizer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RequestError(ValueError):
    """A request the engine cannot take (prompt too long, unknown adapter, no tokenizer for text)."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class StepOutput:
    """What one step produced for one choice of one request (the daemon streams these).

    ``finished``: the request has ended (all its choices); ``choice_finished``: this choice has,
    with ``finish_reason``. ``completion_tokens`` counts every choice's tokens so far."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: str | None = None  # with error: the code the client's error event carries
    cached_tokens: int = 0  # of the prompt tokens, those found in the prefix cache
    index: int = 0  # the choice
    # With params.logprobs: per new token, OpenAI's {"token", "bytes", "logprob", "top_logprobs"}.
    logprob_content: list[dict[str, Any]] | None = None
    finish_reasons: list[str] = field(default_factory=list)  # with finished: every choice's, by index

    @property
    def choice_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Choice:
    """One of a request's n outputs."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None  # per token: the most likely token ids → logprob


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None
    error: str | None = None
    time_to_first_token: float | None = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    top_logprobs: list[dict[int, float]] | None = None  # choice 0's (params.top_logprobs)
    choices: list[Choice] = field(default_factory=list)  # all n, choice 0 first (the fields above)


@dataclass
class StepRecord:
    at: float  # wall-clock time
    seconds: float
    num_tokens: int
    num_seqs: int
    num_adapters: int
    num_sampled: int
    lora_seconds: float | None = None  # time in the LoRA kernels, on the steps that measured it


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    max_adapters_in_step: int = 0
    multi_adapter_steps: int = 0
    recent: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=2048))


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton launches on the current device, not its tensors' device
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.lora_dtype = (
            self.dtype if config.lora_dtype == "auto" else _resolve_dtype(config.lora_dtype, self.device, "lora_dtype")
        )
        source = resolve_model(config.model)
        architecture = (source.config.get("architectures") or ["LlamaForCausalLM"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {architecture} is not served; supported: {SUPPORTED_ARCHITECTURES}")
        self.model_name = source.name
        self.model_config = ModelConfig.from_hf(source.config)
        self.descriptor = descriptor_from_config(source.name, source.config)
        self.tokenizer = load_tokenizer(source)
        # The kernels are decided here, once: every layer and step then runs this backend.
        cfg = self.model_config
        self.kernels = kernels.backend(
            config.kernels, self.device, dtype=self.dtype, lora_dtype=self.lora_dtype,
            attention=(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, config.block_size),
        )
        torch.manual_seed(config.seed)
        weights = load_weights(source, self.model_config, self.device, self.dtype)
        self.model = LlamaModel(self.model_config, weights, self.device, self.kernels)
        # Full attention equals sliding-window attention while the context fits in the window.
        self.max_model_len = min(
            config.max_model_len or 10**9,
            self.model_config.max_position_embeddings,
            self.model_config.sliding_window or 10**9,
        )
        self.residency = AdapterResidency(
            self.descriptor,
            pool_bytes=self._lora_pool_bytes(),
            max_cpu_loras=config.max_cpu_loras,
            max_lora_rank=config.max_lora_rank,
            dtype=self.lora_dtype,
            device=self.device,
        )
        self.lora_groups = PoolGroups(self.residency.pool, self.kernels)
        self.kv = self._allocate_kv_cache()
        self.scheduler = Scheduler(
            self.kv.blocks,
            self.residency,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_loras=config.max_loras,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.sampler = Sampler(self.device)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids)
        # Whether the chat template renders tools itself (else tool_calls' generic block does): read once.
        self.template_knows_tools = bool(self.tokenizer) and tool_calls.template_supports_tools(
            self.tokenizer.chat_template)
        self._guided_tokenizer: GuidedTokenizer | None = None  # built for the first guided request
        self.tokenizer_unguidable = ""  # why it could not be built, if it could not
        self.sequences: dict[str, Sequence] = {}  # by request id: choice 0 of each request
        self.choices: dict[str, list[Sequence]] = {}  # every choice of the requests with n > 1
        self.stats = EngineStats()
        self.started = time.time()
        self._last_lora: LoraBatch | None = None

    # ---- set-up ---------------------------------------------------------------------------

    def _lora_pool_bytes(self) -> int:
        """`lora_pool_bytes`, else what max_loras adapters of max_lora_rank take; on CUDA at least a
        tenth of the memory left after the weights (the KV cache takes what the pool leaves)."""
        config = self.config
        if config.lora_pool_bytes is not None:
            return config.lora_pool_bytes
        budget = pool_bytes_for(self.descriptor, [config.max_lora_rank] * config.max_loras, config.max_lora_rank,
                                self.lora_dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = max(budget, free // 10)
        return budget

    def _allocate_kv_cache(self) -> KVCache:
        cfg = self.model_config
        per_block = KVCache.bytes_per_block(cfg.num_layers, self.config.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the weight loader's freed temporaries would count as used
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.config.gpu_memory_utilization) - (total - free)
            budget -= self._step_activation_bytes()
        else:
            wanted = self.config.max_num_seqs * min(self.max_model_len, 4096) * per_block // self.config.block_size
            budget = self.config.kv_cache_bytes or min(wanted, 2 * 1024**3)
        num_blocks = max(0, budget // per_block)
        if num_blocks < 1:
            raise RuntimeError(
                "no memory is left for the KV cache; lower lora_pool_bytes or raise gpu_memory_utilization"
            )
        return KVCache(cfg.num_layers, num_blocks, self.config.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)

    def _step_activation_bytes(self) -> int:
        """Headroom for the largest step's activations: a few live [tokens, width] tensors of the
        widest projections, float32 logits of the sampled rows, and the allocator's slack."""
        cfg, tokens = self.model_config, self.config.max_num_batched_tokens
        width = 6 * cfg.intermediate_size + 8 * cfg.hidden_size
        logits = 4 * self.config.max_num_seqs * cfg.vocab_size * 3
        return tokens * width * self.dtype.itemsize + logits + 256 * 1024 * 1024

    # ---- adapters --------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str) -> None:
        """Register a PEFT LoRA folder under `name`; AdapterError names what is wrong with it."""
        self.residency.add(name, path)

    def remove_adapter(self, name: str) -> None:
        self.residency.remove(name)

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """A pinned adapter is never evicted from the device; pinning starts its load there."""
        self.residency.set_pinned(name, pinned)
        if pinned:
            self.prefetch_adapter(name)

    def prefetch_adapter(self, name: str, to_device: bool = True) -> None:
        """Start loading an adapter in the background: onto the device if it has room for it without
        evicting an adapter that queued requests wait for, else into host RAM."""
        if to_device:
            self.residency.prefetch(name, keep=self.scheduler.queued_adapters())
        else:
            self.residency.prefetch_to_host(name)

    def wait_for_adapters(self, timeout: float = 60.0) -> None:
        """Block until background adapter loads finish (warm-up and tests; the step loop never waits)."""
        self.residency.wait_idle(timeout)

    def has_adapter(self, name: str) -> bool:
        return name in self.residency.records

    # ---- requests --------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        adapter: str | None = None,
        tenant: str = "default",
        messages: list[dict[str, Any]] | None = None,
        resume_token_ids: list[int] | None = None,
        resume_text: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        resume_choices: list[tuple[list[int], str, str | None]] | None = None,
    ) -> str:
        """Queue one request; raises RequestError or AdapterError for this request alone.

        ``resume_token_ids`` continues a request that another engine had started: those tokens were
        already delivered, so they count as output and are recomputed, not sent again.
        ``resume_text`` is the text the client already has (default: all of those tokens' text).
        ``resume_choices`` does the same for each choice of a request with n > 1: (tokens delivered,
        their text, the finish reason if the choice had ended).
        ``tools`` (OpenAI's definitions) are rendered into a chat prompt (``tool_calls``).
        """
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.encode(prompt, messages, tools)
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must lie in [0, {self.model_config.vocab_size})")
        outside = sorted(t for t in params.logit_bias if t >= self.model_config.vocab_size)
        if outside:
            raise RequestError(f"logit_bias names token ids {outside[:5]} outside this model's vocabulary "
                               f"[0, {self.model_config.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} tokens, "
                "including at least one generated token; shorten the prompt",
                code="context_length_exceeded",
            )
        if self.kv.blocks.blocks_for(len(prompt_ids) + 1) > self.kv.blocks.num_blocks:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens, more than this engine's KV cache can hold; shorten it",
                code="context_length_exceeded",
            )
        if adapter is not None:
            self.residency.check_loadable(adapter)
        matcher = self._matcher(params)
        salt = cache_salt(tenant, self.residency.identity(adapter) if adapter is not None else "")
        choices = [
            Sequence(request_id, prompt_ids, params, adapter=adapter, tenant=tenant,
                     generator=make_generator(_choice_seed(params.seed, choice), self.device), cache_salt=salt,
                     choice=choice, matcher=matcher.deep_copy() if matcher is not None and choice else matcher)
            for choice in range(params.n)
        ]
        seq = choices[0]
        if resume_token_ids:
            resume_choices = [(resume_token_ids, resume_text, None)]
        if resume_choices:
            if len(resume_choices) != params.n:
                raise RequestError(f"{len(resume_choices)} choices to resume, for n={params.n}")
            for choice, (token_ids, text, reason) in zip(choices, resume_choices, strict=True):
                self._resume(choice, token_ids, text, reason)
        else:
            seq.forks = choices[1:]  # they start from its computed prompt (_fork_choices)
        self.sequences[request_id] = seq
        if params.n > 1:
            self.choices[request_id] = choices
        for choice in [seq] if seq.forks else choices:
            if choice.status is not Status.FINISHED:
                self.scheduler.add(choice)
        return request_id

    def _resume(self, seq: Sequence, token_ids: list[int], text: str | None, finish_reason: str | None) -> None:
        """Continue one choice after the tokens another engine delivered (each resumed choice
        computes its own tokens; the prefix cache shares the prompt's blocks)."""
        if token_ids:
            detokenizer.resume(seq, [int(t) for t in token_ids], text, self.tokenizer)
            if seq.matcher is not None and (error := _consume_all(seq.matcher, seq.output_ids)) is not None:
                raise RequestError(f"the tokens already sent do not fit the grammar: {error}")
        if finish_reason is not None:
            seq.finish_reason, seq.status = finish_reason, Status.FINISHED

    def _matcher(self, params: SamplingParams) -> Any:
        """The grammar state of a guided request (None for others); RequestError names what is wrong."""
        if params.guided_json is None:
            return None
        if self.tokenizer is None:
            raise RequestError(f"{self.model_name} ships no tokenizer, so its output cannot follow a schema")
        if self._guided_tokenizer is None:
            try:
                self._guided_tokenizer = GuidedTokenizer(self.tokenizer, self.model_config.vocab_size)
            except ValueError as exc:  # e.g. a tokenizer with more tokens than the model has logits
                self.tokenizer_unguidable = f"this model's tokenizer cannot drive constrained decoding: {exc}"
        if self.tokenizer_unguidable:
            raise RequestError(self.tokenizer_unguidable)
        try:
            return self._guided_tokenizer.matcher(params.guided_json)
        except GrammarError as exc:
            raise RequestError(f"the JSON schema cannot be enforced: {exc}", code="invalid_schema") from None

    def encode(self, prompt: str | list[int] | None, messages: list[dict[str, Any]] | None,
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt token ids of a request: text, token ids, or chat messages through the template
        (with tools: the template's own rendering where it has one, else tool_calls' generic block)."""
        if messages is not None:
            if self.tokenizer is None:
                raise RequestError(f"{self.model_name} ships no tokenizer; send token ids")
            try:
                if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
                    messages = tool_calls.messages_for_template(messages, tools or [], self.template_knows_tools)
                return self.tokenizer.encode_chat(messages, tools if tools and self.template_knows_tools else None)
            except Exception as exc:  # a template error is the caller's bad messages
                raise RequestError(f"the messages do not fit the model's chat template: {exc}") from None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.model_name} ships no tokenizer; send token ids")
            return self.tokenizer.encode(prompt)
        if prompt is None:
            raise RequestError("give a prompt or messages")
        return [int(t) for t in prompt]

    def set_tenant_weight(self, tenant: str, weight: float) -> None:
        """A tenant of weight 2 gets twice the share of sequences and tokens of a tenant of weight 1."""
        self.scheduler.set_tenant_weight(tenant, weight)

    def abort(self, request_id: str) -> bool:
        """Cancel a request at once: its KV blocks and adapter hold are freed before this returns."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self._end_choices(seq, "abort")
        self.choices.pop(request_id, None)
        return True

    def _end_choices(self, seq: Sequence, reason: str) -> None:
        """End every unfinished choice of seq's request, those not yet forked included."""
        for choice in self._choices_of(seq):
            if choice.status is not Status.FINISHED:
                if choice in seq.forks:
                    choice.status = Status.FINISHED
                else:
                    self.scheduler.remove(choice)
            choice.finish_reason = choice.finish_reason or reason
        seq.forks = []

    def _choices_of(self, seq: Sequence) -> list[Sequence]:
        return self.choices.get(seq.request_id, [seq])

    def prompt_tokens_computed(self, request_id: str) -> int:
        """Prompt tokens computed for a request so far: what one that ends early is billed for."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return 0
        if seq.output_ids:
            return len(seq.prompt_ids)
        return min(seq.num_computed, len(seq.prompt_ids))

    def prompt_tokens_cached(self, request_id: str) -> int:
        """Of ``prompt_tokens_computed``, those its first admission found in the prefix cache."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return 0
        return min(seq.num_cached_tokens, self.prompt_tokens_computed(request_id))

    def admission_of(self, request_id: str) -> int | None:
        """Where this engine first admitted the request (any of its choices: a resumed one may have run
        only some); None if it never ran here."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        return next((c.admission for c in self._choices_of(seq) if c.admission is not None), None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        outputs = self._fail_adapter_errors()
        batch = self.scheduler.schedule()
        outputs += self._collect_failed()
        batch = [item for item in batch if item.seq.status is Status.RUNNING]  # a failed choice ends its siblings
        if not batch:
            return outputs
        sampled = [item for item in batch if item.samples]
        logits = self._forward(batch, sampled)
        self.scheduler.computed(batch)
        drawn = self._sample([item.seq for item in sampled], logits) if sampled else []
        lora_seconds = self._last_lora.seconds if self._last_lora is not None else None
        self._record_step(batch, len(drawn), time.perf_counter() - started, lora_seconds)
        return outputs + drawn

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """One token for each sequence whose last token this step computed; a request's other
        choices fork from choice 0 here, and draw their first tokens from its logits."""
        rows = list(range(len(seqs)))
        for row, seq in enumerate(list(seqs)):
            if seq.forks and not seq.output_ids:
                forked = self._fork_choices(seq)
                seqs += forked
                rows += [row] * len(forked)
        if len(rows) > len(logits):
            logits = logits[torch.tensor(rows, device=logits.device)]
        allowed, broken = allowed_tokens([seq.matcher for seq in seqs], logits.shape[-1], self.device)
        drawn = self.sampler.sample(logits, [seq.params for seq in seqs], [seq.generator for seq in seqs],
                                    [seq.output_ids for seq in seqs], allowed)
        tops: list[Any] = [None] * len(seqs)
        if drawn.top_tokens is not None:
            tops = list(zip(drawn.top_tokens.tolist(), drawn.top_logprobs.tolist(), strict=True))
        outputs = []
        for row, (seq, token, logprob, top) in enumerate(zip(seqs, drawn.tokens.tolist(), drawn.logprobs.tolist(),
                                                             tops, strict=True)):
            if seq.status is not Status.FINISHED:  # else a sibling's error ended it earlier in this step
                outputs.append(self._append_token(seq, token, logprob, top, broken.get(row)))
        return outputs

    def _fork_choices(self, seq: Sequence) -> list[Sequence]:
        """Start a request's other choices from its computed prompt (Scheduler.fork); returns those
        running now (the others wait in line and compute it when admitted)."""
        forked, copies = [], []
        for child in seq.forks:
            pair = self.scheduler.fork(seq, child)
            if pair is not None:
                forked.append(child)
                if pair != (-1, -1):
                    copies.append(pair)
        seq.forks = []
        self.kv.copy_blocks(copies)
        return forked

    def _forward(self, batch: list[ScheduledSeq], sampled: list[ScheduledSeq]) -> torch.Tensor:
        block_size = self.config.block_size
        ids: list[int] = []
        positions: list[int] = []
        lengths: list[int] = []
        seq_lens: list[int] = []
        token_slots: list[int] = []
        logits_rows: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_tokens
            ids += seq.tokens(start, end)
            positions += range(start, end)
            lengths.append(item.num_tokens)
            seq_lens.append(end)
            token_slots += [seq.slot] * item.num_tokens
            if item.samples:
                logits_rows.append(len(ids) - 1)
        device = self.device
        widest = max(len(item.seq.block_table) for item in batch)
        tables = torch.tensor(
            [item.seq.block_table + [0] * (widest - len(item.seq.block_table)) for item in batch], dtype=torch.int32
        )
        pos = torch.tensor(positions, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(lengths))
        slot_mapping = tables[owner, pos // block_size].to(torch.int64) * block_size + pos % block_size
        query_start = torch.zeros(len(batch) + 1, dtype=torch.int32)
        query_start[1:] = torch.tensor(lengths).cumsum(0)
        attn = AttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            block_tables=tables.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=query_start.to(device),
        )
        lora = self._lora_batch(batch, token_slots)
        self._last_lora = lora
        return self.model.forward(
            torch.tensor(ids, dtype=torch.int64, device=device),
            pos.to(device),
            attn,
            self.kv.layers,
            lora,
            torch.tensor(logits_rows, dtype=torch.int64, device=device),
        )

    def _lora_batch(self, batch: list[ScheduledSeq], token_slots: list[int]) -> LoraBatch | None:
        slots = {item.seq.slot for item in batch if item.seq.slot >= 0}
        if not slots:
            return None
        pool = self.residency.pool
        meta = self.kernels.lora_meta(
            torch.tensor(token_slots, dtype=torch.int32, device=self.device), pool.ranks, pool.scalings
        )
        # Timing the LoRA kernels costs two device syncs per call on CUDA (a slow step, which would
        # show in the latency tail): there only one step in 256.
        timed = self.device.type == "cpu" or self.stats.steps % 256 == 0
        return LoraBatch(meta, self.lora_groups, frozenset().union(*(pool.targets[s] for s in slots)), timed=timed)

    def _append_token(self, seq: Sequence, token: int, logprob: float,
                      top: tuple[list[int], list[float]] | None = None, grammar_error: str | None = None) -> StepOutput:
        now = time.monotonic()
        if grammar_error is None and seq.matcher is not None:
            grammar_error = advance(seq.matcher, token)
        if grammar_error is not None:  # the token is not the schema's: it is not sent, and the request ends
            seq.finish_reason, seq.finish_time = "error", now
            seq.error, seq.error_code = f"constrained decoding failed: {grammar_error}", "engine_error"
            self.scheduler.finish(seq)
            return self._error_output(seq)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(token)
        seq.output_logprobs.append(logprob)
        params = seq.params
        alternatives = dict(zip(top[0][: params.top_logprobs], top[1][: params.top_logprobs], strict=True)) if top else {}
        if params.top_logprobs:
            seq.output_top_logprobs.append(alternatives)
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif detokenizer.append_token_text(seq, self.tokenizer):
            reason = "stop"
        elif seq.matcher is not None and seq.matcher.is_stopped():  # the grammar admits nothing more
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            seq.finish_time = now
            self.scheduler.finish(seq)
        choices = self._choices_of(seq)
        request_done = reason is not None and not choices[0].forks and all(c.finish_reason for c in choices)
        out = StepOutput(
            seq.request_id,
            [token],
            [logprob],
            detokenizer.take_new_text(seq, finished=reason is not None),
            finished=request_done,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            cached_tokens=choices[0].num_cached_tokens,
            completion_tokens=sum(len(c.output_ids) for c in choices),
            index=seq.choice,
            finish_reasons=[c.finish_reason or "" for c in choices] if request_done else [],
        )
        if params.logprobs:
            out.logprob_content = [self._logprob_entry(token, logprob, alternatives)]
        return out

    def _logprob_entry(self, token: int, logprob: float, alternatives: dict[int, float]) -> dict[str, Any]:
        """OpenAI's logprobs entry of one generated token and its most likely alternatives."""
        return {**self._token_entry(token, logprob),
                "top_logprobs": [self._token_entry(t, lp) for t, lp in alternatives.items()]}

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        if self.tokenizer is None:
            return {"token": f"token_id:{token}", "bytes": [], "logprob": logprob}
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob}

    def _fail_adapter_errors(self) -> list[StepOutput]:
        """Adapters whose load failed (e.g. NaN weights) fail the requests waiting for them."""
        outputs = []
        for name, error in self.residency.poll():
            outputs += [self._error_output(seq) for seq in self.scheduler.fail_waiting(name, error)]
        return outputs

    def _collect_failed(self) -> list[StepOutput]:
        return [self._error_output(seq) for seq in self.scheduler.take_failed()]

    def _error_output(self, seq: Sequence) -> StepOutput:
        """A request's error end, whichever of its choices failed: the others end with it."""
        choices = self._choices_of(seq)
        self._end_choices(choices[0], "error")
        return StepOutput(
            seq.request_id, [], [], "", True, "error", seq.error, len(seq.prompt_ids),
            sum(len(c.output_ids) for c in choices), error_code=seq.error_code, index=seq.choice,
        )

    def _record_step(
        self, batch: list[ScheduledSeq], num_sampled: int, seconds: float, lora_seconds: float | None
    ) -> None:
        stats = self.stats
        adapters = {item.seq.adapter for item in batch if item.seq.adapter is not None}
        num_tokens = sum(item.num_tokens for item in batch)
        stats.steps += 1
        stats.generated_tokens += num_sampled
        stats.prompt_tokens += num_tokens - sum(1 for item in batch if item.seq.is_decoding)
        stats.max_adapters_in_step = max(stats.max_adapters_in_step, len(adapters))
        stats.multi_adapter_steps += len(adapters) > 1
        stats.recent.append(
            StepRecord(time.time(), seconds, num_tokens, len(batch), len(adapters), num_sampled, lora_seconds)
        )

    # ---- offline API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[str | None] | None = None,
        tenants: Seq[str] | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run prompts to completion in shared batches; one output per prompt, in order."""
        return self._run_offline([{"prompt": p} for p in prompts], params, adapters, tenants, progress)

    def chat(
        self,
        conversations: Seq[list[dict[str, Any]]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[str | None] | None = None,
        tenants: Seq[str] | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        return self._run_offline([{"messages": m} for m in conversations], params, adapters, tenants, progress)

    def _run_offline(self, inputs, params, adapters, tenants, progress) -> list[RequestOutput]:
        count = len(inputs)
        params_list = _per_prompt(params or SamplingParams(), count, "params")
        adapters_list = _per_prompt(adapters, count, "adapters")
        tenants_list = _per_prompt(tenants or "default", count, "tenants")
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        for i, request in enumerate(inputs):
            request_id = f"offline-{uuid.uuid4().hex[:12]}-{i}"
            ids.append(request_id)
            try:
                self.add_request(
                    request.get("prompt"),
                    params_list[i],
                    request_id=request_id,
                    adapter=adapters_list[i],
                    tenant=tenants_list[i],
                    messages=request.get("messages"),
                )
            except (RequestError, AdapterError) as exc:
                results[request_id] = RequestOutput(request_id, [], [], "", "error", error=str(exc),
                                                    choices=[Choice(0, [], "", "error")])
        bar = _progress_bar(count, progress)
        bar.update(len(results))
        while len(results) < count:
            outputs = self.step()
            for out in outputs:
                if out.finished and out.request_id in self.sequences:
                    results[out.request_id] = self._request_output(self.sequences.pop(out.request_id))
                    bar.update(1)
            if not outputs and not self.scheduler.running:
                time.sleep(0.002)  # only adapter loads are pending: let the loader thread run
        bar.close()
        return [results[i] for i in ids]

    def _request_output(self, seq: Sequence) -> RequestOutput:
        """A finished request's output; forgets its choices."""
        ttft = seq.first_token_time - seq.arrival if seq.first_token_time is not None else None
        wants, sequences = seq.params, self.choices.pop(seq.request_id, [seq])
        choices = [
            Choice(c.choice, list(c.output_ids), c.text, c.finish_reason,
                   list(c.output_logprobs) if wants.logprobs else None,
                   list(c.output_top_logprobs) if wants.top_logprobs else None)
            for c in sequences
        ]
        first = choices[0]
        error = next((c.error for c in sequences if c.error), None)
        return RequestOutput(seq.request_id, seq.prompt_ids, first.token_ids, first.text, first.finish_reason,
                             first.logprobs, error, ttft, seq.num_cached_tokens, first.top_logprobs, choices)

    def pop_finished(self, request_id: str) -> RequestOutput | None:
        """The whole output of a finished request, forgetting it (the incremental API's last call)."""
        seq = self.sequences.get(request_id)
        if seq is None or any(c.status is not Status.FINISHED for c in self._choices_of(seq)):
            return None
        return self._request_output(self.sequences.pop(request_id))

    # ---- introspection --------------------------------------------------------------------

    def memory_breakdown(self) -> dict[str, int]:
        weights, kv, pool = self.model.weight_bytes(), self.kv.nbytes, self.residency.pool.nbytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            total = weights + kv + pool
            free = 0
        return {"total": total, "weights": weights, "kv_cache": kv, "adapter_pool": pool, "free": free}

    def snapshot(self, window_seconds: float = 5.0) -> EngineSnapshot:
        """The engine state the heartbeat publishes (DESIGN.md, "Engine state").

        Rates are over the last `window_seconds` of wall-clock time, so they fall to 0 when idle.
        """
        now = time.time()
        recent = [r for r in itertools.takewhile(lambda r: now - r.at <= window_seconds, reversed(self.stats.recent))]
        busy = sum(r.seconds for r in recent)
        timed = [r for r in recent if r.lora_seconds is not None]
        blocks = self.kv.blocks
        prefix = self.scheduler.prefix_tokens
        return EngineSnapshot(
            base_model=self.model_name,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            lora_dtype=str(self.lora_dtype).removeprefix("torch."),
            kernels=self.kernels.name,
            started=self.started,
            memory=self.memory_breakdown(),
            kv_blocks_total=blocks.num_blocks,
            kv_blocks_used=blocks.num_used,
            adapter_pool_rows=self.residency.pool.capacity,
            adapter_pool_rows_used=self.residency.pool.used_rows,
            adapter_bytes=self.residency.tier_bytes(),
            adapter_loads_per_second=self.residency.loads_per_second(),
            max_loras=self.config.max_loras,
            running=len(self.scheduler.running),
            waiting=self.scheduler.num_waiting,
            steps=self.stats.steps,
            generated_tokens=self.stats.generated_tokens,
            prompt_tokens=self.stats.prompt_tokens,
            preemptions=self.scheduler.num_preemptions,
            max_adapters_in_step=self.stats.max_adapters_in_step,
            multi_adapter_steps=self.stats.multi_adapter_steps,
            tokens_per_second=sum(r.num_sampled for r in recent) / window_seconds,
            step_seconds=busy / len(recent) if recent else 0.0,
            # Share of step time spent in the LoRA shrink/expand, from the steps that were timed.
            lora_share=(sum(r.lora_seconds for r in timed) / sum(r.seconds for r in timed)) if timed else None,
            adapters=self.residency.snapshot(),
            prefix_caching=self.config.enable_prefix_caching,
            prefix_cache_blocks=blocks.num_cached,
            prefix_prompt_tokens=sum(prompt for prompt, _cached in prefix.values()),
            prefix_cached_tokens=sum(cached for _prompt, cached in prefix.values()),
            prefix_tenants={tenant: list(counts) for tenant, counts in prefix.items()},
        )

    def close(self) -> None:
        self.residency.close()


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded request draws from its own stream: the n choices differ, and repeat.
    Choice 0 keeps the seed (n=1 as before); the others hash it, so no other seed's stream is theirs."""
    if seed is None or choice == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"lorafleet-choice\0{seed}\0{choice}".encode()).digest()[:8], "big")


def _consume_all(matcher: Any, tokens: list[int]) -> str | None:
    for token in tokens:
        if (error := advance(matcher, token)) is not None:
            return error
    return None


def _per_prompt(value: Any, count: int, what: str) -> list[Any]:
    if value is None or isinstance(value, str | SamplingParams):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} entries for {count} prompts")
    return values


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="generate", unit="req")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def _resolve_dtype(name: str, device: torch.device, setting: str = "dtype") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"{setting} must be one of {sorted(_DTYPES)} or 'auto', got {name!r}")
    return _DTYPES[name]
