"""Continuous batching: which tokens of which sequences run in the next step.

Each step mixes the decode tokens of running sequences with prefill chunks, under
``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences. A running sequence keeps its
adapter on the device, and a step never holds more than ``max_loras`` distinct adapters. When KV
blocks run out, the newest running sequence is preempted and later recomputed from its tokens.

Adapters: the load of a cold adapter that one of the next requests in line needs starts at once,
where that evicts no adapter a running or next-in-line request needs. Otherwise, within a tenant's queue, the
oldest request whose adapter is on the device goes first, so that a step's adapters change little
when there are more hot adapters than the device holds; a request whose adapter is cold is passed
over at most ``max_adapter_passes`` times, then its load starts (evicting if it must). Where its
adapter cannot come in, because running requests hold the rows it needs or the step already has
``max_loras`` adapters, the adapters in its way *drain*: they take no new requests until it is in
(and places under ``max_loras`` go to the adapters waiting for one, first come first served). The adapters of the next
requests in line are prefetched (disk → host RAM → device) while the batch runs.

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

import itertools
import time
from collections import Counter, defaultdict, deque
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
        max_loras: int = 8,
        enable_prefix_caching: bool = True,
        max_adapter_passes: int = 16,
        prefetch_lookahead: int = 16,
        admission_scan: int = 256,
    ) -> None:
        self.blocks = blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.residency = residency
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.max_adapter_passes = max_adapter_passes
        self.prefetch_lookahead = prefetch_lookahead  # queued requests whose adapters are prefetched
        self.admission_scan = admission_scan  # requests of one tenant's queue looked at per admission
        # Seconds each admitted request waited for its adapter (those that did), drained by the metrics.
        self.adapter_waits: deque[float] = deque(maxlen=4096)
        # Adapters requests wait for → the adapters that take no new requests until they are in:
        # `cap_drains` when the step already has max_loras adapters (its order is the order in
        # which waiting adapters get the places that free up; None: no adapter left to drain),
        # `row_drains` when running requests hold the rows the adapter needs.
        self.cap_drains: dict[str, str | None] = {}
        self.row_drains: dict[str, set[str]] = {}
        self._passed: list[Sequence] = []  # the cold requests the last candidate would pass
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
        self._end_drains()
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
        self._prefetch_queued()
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
        # The adapters of the next requests in line (whose loads may start at once), what such a
        # load may not evict, and those that found no room without it.
        self._next_in_line = set(self.queued_adapters())
        self._keep = self._next_in_line | self.running_adapters()
        self._no_room: set[str] = set()
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
            for seq in self._passed:
                seq.adapter_passes += 1
            if candidate.adapter_wait_since is not None:  # until its adapter was in, not until admitted
                ready_at = self.residency.get(candidate.adapter).ready_at
                self.adapter_waits.append(max(0.0, ready_at - candidate.adapter_wait_since))
                candidate.adapter_wait_since = None
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

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Start `child` (another choice of the same request) running from `parent`'s computed
        prompt: the full blocks gain an owner, the partial last block is copied, which the caller
        does on the device from the (source, copy) pair returned; (-1, -1) when there is none.
        Without a block or a place for it, the child waits in line (None) and, like a preempted
        sequence, computes its prompt when admitted (the prefix cache then holds the full blocks)."""
        size = self.blocks.block_size
        full, partial = divmod(parent.num_computed, size)
        child.num_cached_tokens, child.admission = parent.num_cached_tokens, parent.admission  # one request
        if len(self.running) >= self.max_num_seqs or not self.blocks.can_allocate(1 if partial else 0):
            self.waiting[child.tenant].appendleft(child)
            return None
        shared = parent.block_table[:full]
        self.blocks.attach(shared)
        child.block_table = shared + self.blocks.allocate(1 if partial else 0)
        child.num_computed = parent.num_computed
        child.block_hashes = list(parent.block_hashes[:full])
        child.num_registered_blocks = min(parent.num_registered_blocks, full)
        child.status, child.slot = Status.RUNNING, parent.slot
        if child.adapter is not None:
            self.residency.hold(child.adapter)
        self.running.append(child)
        return (parent.block_table[full], child.block_table[full]) if partial else (-1, -1)

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

    @property
    def draining(self) -> dict[str, set[str]]:
        """Every drain: the adapter waited for → the adapters draining for it."""
        drains = {adapter: {victim} if victim else set() for adapter, victim in self.cap_drains.items()}
        for adapter, holders in self.row_drains.items():
            drains.setdefault(adapter, set()).update(holders)
        return drains

    def _next_candidate(self, blocked_adapters: set[str]) -> Sequence | None:
        """The next request to admit, from the least-served tenant that has one ready (`_pick`).
        Requests whose adapter is still loading are stepped over, so they hold up nobody, not even
        their own tenant; `blocked_adapters` collects the adapters that cannot run in this step."""
        active = self.running_adapters()
        blocked_adapters.update(victim for victim in self.cap_drains.values() if victim)
        blocked_adapters.update(*self.row_drains.values())
        for tenant in sorted(self._tenants_with_work(waiting_only=True), key=lambda t: self.tenant_served[t]):
            seq = self._pick(self.waiting[tenant], blocked_adapters, active)
            if seq is not None:
                return seq
        return None

    def _pick(self, queue: deque[Sequence], blocked: set[str], active: set[str]) -> Sequence | None:
        """One tenant's next request: its oldest whose adapter is ready (or none is needed). A
        cold request ahead of it counts a pass; one passed `max_adapter_passes` times has its load
        started instead. With nothing ready, the oldest cold request's load starts."""
        cold: list[Sequence] = []
        self._passed = []
        for seq in list(itertools.islice(queue, self.admission_scan)):
            adapter = seq.adapter
            if adapter is None:
                seq.slot = -1
                return self._passing(seq, cold)
            if adapter in blocked:
                continue
            fits = adapter in active or self._place_for(adapter, active)  # else: one adapter too many in this step
            if fits and self.residency.ready(adapter):
                seq.slot = self.residency.acquire(adapter)
                return self._passing(seq, cold)
            if seq.adapter_wait_since is None:
                seq.adapter_wait_since = time.monotonic()
            if self.residency.loading(adapter) or self._load_if_room(seq, queue):
                blocked.add(adapter)
            elif seq.adapter_passes >= self.max_adapter_passes:
                self._make_way(seq, queue, blocked, active)  # passed over enough: its turn
            else:
                cold.append(seq)
        if cold:
            self._make_way(cold[0], queue, blocked, active)
        return None

    def _place_for(self, adapter: str, active: set[str]) -> bool:
        """Whether an adapter not in the step may join it: a place under max_loras that no adapter
        waiting longer for one (`cap_drains`, in order) has claimed."""
        claims = list(self.cap_drains)
        ahead = claims.index(adapter) if adapter in claims else len(claims)
        return len(active) + ahead < self.max_loras

    def _load_if_room(self, seq: Sequence, queue: deque[Sequence]) -> bool:
        """Start the load of a next-in-line request's adapter if rows can be had without evicting
        one that running or next-in-line requests need; whether the request is dealt with (loading
        now, or failed: an adapter that cannot load). Requests further back wait for their turn:
        loading theirs would evict adapters used again sooner."""
        adapter = seq.adapter
        if adapter in self._no_room or adapter not in self._next_in_line:
            return False
        try:
            self.residency.acquire(adapter, keep=self._keep)
        except AdapterError as exc:
            self._fail(seq, queue, exc)
            return True
        if self.residency.loading(adapter):
            return True
        self._no_room.add(adapter)
        return False

    def _fail(self, seq: Sequence, queue: deque[Sequence], error: AdapterError) -> None:
        queue.remove(seq)
        self.failed.append(_failed(seq, str(error), error.code))

    def _passing(self, chosen: Sequence, cold: list[Sequence]) -> Sequence:
        self._passed = cold  # each counts a pass if `chosen` is admitted
        return chosen

    def _make_way(self, seq: Sequence, queue: deque[Sequence], blocked: set[str], active: set[str]) -> None:
        """Bring the request's adapter in: start its load, and where it cannot come in, drain the
        adapters in its way (the least busy one when the step is at max_loras, claiming the next
        free place; those on the rows it needs when running requests hold them). An adapter that
        cannot load, or that pinned adapters leave no room for, fails the request."""
        adapter = seq.adapter
        blocked.add(adapter)
        try:
            self.residency.acquire(adapter)  # its load starts if rows can be had
        except AdapterError as exc:
            self._fail(seq, queue, exc)
            return
        if adapter not in active and not self._place_for(adapter, active):
            if adapter not in self.cap_drains:
                candidates = active - set(self.cap_drains.values())
                busy = Counter(running.adapter for running in self.running)
                self.cap_drains[adapter] = min(candidates, key=lambda name: (busy[name], name)) if candidates else None
            blocked.update(victim for victim in self.cap_drains.values() if victim)
        if self.residency.ready(adapter) or self.residency.loading(adapter) or adapter in self.row_drains:
            return
        holders = self.residency.holders(adapter)
        if holders is None:
            rank = self.residency.get(adapter).manifest.rank
            self._fail(seq, queue, AdapterError(
                f"adapter {adapter!r} needs {rank} rows of the device's adapter pool and pinned adapters leave no "
                "such run free; unpin one or raise lora_pool_bytes"))
        elif holders:
            self.row_drains[adapter] = holders
            blocked.update(holders)

    def _end_drains(self) -> None:
        """Drains end once their adapter is in (admitted, for a place under max_loras; loading,
        for rows) or no waiting request needs it. Rows whose holders have all let go are taken
        for the waiting adapter at once, before another load can take them."""
        if not self.cap_drains and not self.row_drains:
            return
        wanted = {seq.adapter for queue in self.waiting.values() for seq in queue}
        active = self.running_adapters()
        for adapter in list(self.cap_drains):
            if adapter not in wanted or adapter in active:
                del self.cap_drains[adapter]
        for adapter, holders in list(self.row_drains.items()):
            if adapter in wanted and not self.residency.loading(adapter) and not self.residency.ready(adapter):
                if any(self.residency.in_use(holder) for holder in holders):
                    continue
                try:
                    self.residency.acquire(adapter)
                except AdapterError:
                    pass  # its requests fail when next picked
                if not self.residency.loading(adapter):
                    continue  # still no run of rows: _make_way looks again
            del self.row_drains[adapter]

    def running_adapters(self) -> set[str]:
        return {seq.adapter for seq in self.running if seq.adapter is not None}

    def queued_adapters(self) -> list[str]:
        """The adapters of the next `prefetch_lookahead` waiting requests: each tenant's first in
        line (least served tenant first), then each one's second, and so on."""
        wanted: dict[str, None] = {}
        tenants = sorted(self._tenants_with_work(waiting_only=True), key=lambda t: self.tenant_served[t])
        heads = [itertools.islice(self.waiting[tenant], self.prefetch_lookahead) for tenant in tenants]
        for row in itertools.zip_longest(*heads):  # each tenant's first request, then each one's second ...
            for seq in row:
                if seq is not None and seq.adapter is not None:
                    wanted[seq.adapter] = None
                    if len(wanted) >= self.prefetch_lookahead:
                        return list(wanted)
        return list(wanted)

    def _prefetch_queued(self) -> None:
        """Start the loads of the adapters the next requests in line need, so that they overlap the
        running batch: onto the device where that evicts no adapter a queued or running request
        needs, else into host RAM."""
        wanted = self.queued_adapters()
        if not wanted:
            return
        keep = set(wanted) | self.running_adapters()
        for name in wanted:
            if not self.residency.ready(name) and not self.residency.loading(name):
                self.residency.prefetch(name, keep=keep)

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
