"""Continuous batching: which tokens of which sequences run in the next step.

Each step mixes the decode tokens of running sequences with prefill chunks, under
``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences. A running sequence keeps its
adapter in a slot, so a step never holds more than ``max_loras`` distinct adapters. When KV
blocks run out, the newest running sequence is preempted and later recomputed from its tokens.

With prefix caching, a sequence starts from the longest run of its full blocks that the cache
holds (same tenant, same adapter, same tokens before them: ``prefix_cache``), attached rather
than computed; at least its last token is always computed, for the logits. Blocks are cached as
their last token's K/V is written, generated tokens' blocks too, so the next turn of a chat
finds the previous turn's.

Admission is weighted fair share across tenants: the tenant that has been served the fewest
tokens per unit of weight goes first, and a tenant below its share of running sequences may
preempt one from a tenant above its share, so a tenant with 500 queued requests cannot make
another tenant's single request wait for all of them.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from engine_daemon.adapters import AdapterResidency
from engine_daemon.kv_cache import BlockManager
from engine_daemon.peft_format import AdapterError
from engine_daemon.prefix_cache import block_hashes
from engine_daemon.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for it in this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        residency: AdapterResidency,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.blocks = blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.residency = residency
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: dict[str, deque[Sequence]] = defaultdict(deque)  # per tenant, FIFO
        self.running: list[Sequence] = []
        self.tenant_weight: dict[str, float] = defaultdict(lambda: 1.0)
        self.tenant_served: dict[str, float] = {}  # tokens computed / weight
        self.failed: list[Sequence] = []  # sequences that could not be admitted (adapter errors)
        self.num_preemptions = 0
        # (request id, tenant) of every admission, oldest first: the record fairness is checked against.
        self.admitted: deque[tuple[str, str]] = deque(maxlen=10_000)
        self.num_admissions = 0
        # Per tenant, over first admissions: [prompt tokens, of them found in the prefix cache].
        self.prefix_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    # ---- queue ----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.tenant not in self.tenant_served:
            # A tenant that was idle starts level with the least-served active tenant: no saved-up credit.
            active = [self.tenant_served[t] for t in self._tenants_with_work()]
            self.tenant_served[seq.tenant] = min(active, default=0.0)
        self.waiting[seq.tenant].append(seq)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting.values())

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for queue in self.waiting.values():
            for seq in queue:
                if seq.request_id == request_id:
                    return seq
        return None

    def set_tenant_weight(self, tenant: str, weight: float) -> None:
        if weight <= 0:
            raise ValueError("a tenant's weight must be positive")
        self.tenant_weight[tenant] = weight

    def fail_waiting(self, adapter: str, error: str) -> list[Sequence]:
        """Fail the waiting sequences that need ``adapter``, whose load failed; returns them."""
        failed = []
        for queue in self.waiting.values():
            for seq in [s for s in queue if s.adapter == adapter]:
                queue.remove(seq)
                failed.append(_failed(seq, error, AdapterError.code))
        return failed

    def take_failed(self) -> list[Sequence]:
        """The sequences that failed at admission since the last call, handed over once."""
        failed, self.failed = self.failed, []
        return failed

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and free its blocks and adapter hold."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is Status.WAITING:
            self.waiting[seq.tenant].remove(seq)
        seq.status = Status.FINISHED

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        # Running sequences first: decodes (one token each), then unfinished prefills, oldest first.
        for seq in sorted(self.running, key=lambda s: (not s.is_decoding, s.arrival)):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            count = min(seq.num_uncomputed, budget)
            if not self._reserve_blocks(seq, count, batch):
                continue  # seq itself was preempted
            batch.append(ScheduledSeq(seq, count))
            budget -= count
        self._admit(batch, budget)
        for item in batch:
            tenant = item.seq.tenant
            self.tenant_served[tenant] = self.tenant_served.get(tenant, 0.0) + item.num_tokens / self.tenant_weight[tenant]
        return batch

    def _reserve_blocks(self, seq: Sequence, count: int, batch: list[ScheduledSeq]) -> bool:
        """Grow seq's block table for `count` more tokens, preempting newer sequences if needed."""
        needed = self.blocks.blocks_for(seq.num_computed + count) - len(seq.block_table)
        while not self.blocks.can_allocate(needed):
            scheduled = {id(item.seq) for item in batch}
            victims = [s for s in self.running if s is not seq and id(s) not in scheduled]
            victim = max(victims, key=lambda s: s.arrival, default=None)
            if victim is None or victim.arrival < seq.arrival:
                self.preempt(seq)  # seq is the newest: it yields
                return False
            self.preempt(victim)
        self.blocks.grow(seq.block_table, seq.num_computed + count)
        return True

    def _admit(self, batch: list[ScheduledSeq], budget: int) -> None:
        blocked_adapters: set[str] = set()
        while budget > 0:
            candidate = self._next_candidate(blocked_adapters)
            if candidate is None:
                return
            if len(self.running) >= self.max_num_seqs and not self._make_room_for(candidate, batch):
                return
            hits = self._attach_cached_prefix(candidate)
            count = min(candidate.num_tokens - candidate.num_computed, budget)
            needed = self.blocks.blocks_for(candidate.num_computed + count) - len(hits)
            if not self.blocks.can_allocate(needed) and not self._make_room_for(candidate, batch, needed):
                self._detach(candidate)
                return
            self.waiting[candidate.tenant].remove(candidate)
            self.blocks.grow(candidate.block_table, candidate.num_computed + count)
            candidate.status = Status.RUNNING
            if candidate.adapter is not None:
                self.residency.hold(candidate.adapter)
            self.running.append(candidate)
            if candidate.admission is None:
                candidate.admission = self.num_admissions
                self.num_admissions += 1
                candidate.num_cached_tokens = min(candidate.num_computed, len(candidate.prompt_ids))
                counts = self.prefix_tokens[candidate.tenant]
                counts[0] += len(candidate.prompt_ids)
                counts[1] += candidate.num_cached_tokens
            self.admitted.append((candidate.request_id, candidate.tenant))
            batch.append(ScheduledSeq(candidate, count))
            budget -= count

    def _attach_cached_prefix(self, seq: Sequence) -> list[int]:
        """Start a sequence from its longest cached prefix of full blocks (leaving at least one
        token to compute); returns the blocks attached."""
        if not self.enable_prefix_caching:
            return []
        reusable = (seq.num_tokens - 1) // self.blocks.block_size
        hits = self.blocks.cached_prefix(block_hashes(seq, self.blocks.block_size, reusable))
        self.blocks.attach(hits)
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed = len(hits) * self.blocks.block_size
        return hits

    def _detach(self, seq: Sequence) -> None:
        """Undo `_attach_cached_prefix` for a sequence that is not admitted after all."""
        self.blocks.free(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_registered_blocks = [], 0, 0

    def computed(self, batch: list[ScheduledSeq]) -> None:
        """The step's K/V are written: advance each sequence and cache the blocks it filled."""
        size = self.blocks.block_size
        for item in batch:
            seq = item.seq
            seq.num_computed += item.num_tokens
            full = seq.num_computed // size
            if not self.enable_prefix_caching or full <= seq.num_registered_blocks:
                continue
            for i, digest in enumerate(block_hashes(seq, size, full)[seq.num_registered_blocks :], seq.num_registered_blocks):
                self.blocks.register(seq.block_table[i], digest)
            seq.num_registered_blocks = full

    def _next_candidate(self, blocked_adapters: set[str]) -> Sequence | None:
        """The oldest ready request of the least-served tenant; requests whose adapter is still
        loading are stepped over (their load is started), so they hold up nobody, not even their own tenant."""
        for tenant in sorted(self._tenants_with_work(waiting_only=True), key=lambda t: self.tenant_served[t]):
            queue = self.waiting[tenant]
            for seq in list(queue):
                if seq.adapter is None:
                    seq.slot = -1
                    return seq
                if seq.adapter in blocked_adapters:
                    continue
                try:
                    slot = self.residency.acquire(seq.adapter)
                except AdapterError as exc:
                    queue.remove(seq)
                    self.failed.append(_failed(seq, str(exc), exc.code))
                    continue
                if slot is None:
                    blocked_adapters.add(seq.adapter)  # loading, or no slot free yet
                    continue
                seq.slot = slot
                return seq
        return None

    def _make_room_for(self, candidate: Sequence, batch: list[ScheduledSeq], blocks_needed: int = 0) -> bool:
        """Preempt a sequence of an over-served tenant when the candidate's tenant is under its share."""
        tenants = self._tenants_with_work()
        total_weight = sum(self.tenant_weight[t] for t in tenants) or 1.0

        def share(tenant: str) -> float:
            return self.max_num_seqs * self.tenant_weight[tenant] / total_weight

        counts: dict[str, int] = defaultdict(int)
        for seq in self.running:
            counts[seq.tenant] += 1
        if counts[candidate.tenant] + 1 > share(candidate.tenant):
            return False
        while True:
            heaviest = max(counts, key=lambda t: counts[t] / share(t), default=None)
            if heaviest is None or counts[heaviest] <= share(heaviest) or heaviest == candidate.tenant:
                return False
            victim = max((s for s in self.running if s.tenant == heaviest), key=lambda s: s.arrival)
            self._drop_from_batch(victim, batch)
            self.preempt(victim)
            counts[heaviest] -= 1
            if len(self.running) < self.max_num_seqs and self.blocks.can_allocate(blocks_needed):
                return True

    def _drop_from_batch(self, seq: Sequence, batch: list[ScheduledSeq]) -> None:
        batch[:] = [item for item in batch if item.seq is not seq]

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it goes back to the front of its queue and recomputes later."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting[seq.tenant].appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0
        if seq.adapter is not None:
            self.residency.release(seq.adapter)
        seq.slot = -1

    def _tenants_with_work(self, waiting_only: bool = False) -> set[str]:
        tenants = {t for t, q in self.waiting.items() if q}
        if not waiting_only:
            tenants.update(s.tenant for s in self.running)
        return tenants


def _failed(seq: Sequence, error: str, code: str) -> Sequence:
    seq.status, seq.finish_reason, seq.error, seq.error_code = Status.FINISHED, "error", error, code
    return seq
