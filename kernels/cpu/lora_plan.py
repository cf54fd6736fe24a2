"""How the CPU backends split one step's LoRA work into calls: the step's *plan*.

On a CPU the LoRA term of a decode step is a few tokens per adapter: one matmul per adapter
segment would be hundreds of tiny calls per layer, each paying more in overhead than it reads.
The plan sorts the batch's segments (a slot's tokens) into three kinds of work:

- **Direct runs**: a slot's tokens sit in one contiguous run of the batch (a prefill chunk) and
  there are many of them: one matmul on views, no copies.
- **Rank batches** (torch backend): the other slots, grouped by rank into arithmetic progressions
  of slot index (``first, first + step, ...``). The weights of such a batch are one strided view
  of the pool, ``lora_a[first::step, :rank]``, so the whole batch is one `bmm` at its true rank.
  Tokens are gathered into ``[slots, width, in]`` (padding repeats a real row; its results are
  dropped).
- **Native segments** (native backend): the native kernels take every slot not in a long direct
  run as plain segments (`SlotSegments`), one call per projection group at any width with no
  padding. Direct runs up to `NATIVE_MAX_RUN_TOKENS` are segments there too (one call beats a
  matmul per run); longer ones stay direct runs, where MKL's blocking wins.
  (benchmarks/RESULTS.md, "CPU kernels", has the measurements behind both limits.)

Any batch order works: a slot's rows are found wherever they are, and contiguous ones are used
in place.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, replace

import torch

# A slot with more tokens than this in one contiguous run gets its own matmul.
BATCH_MAX_TOKENS = 16
# Candidate steps tried per progression: bounds the planning work for large pools.
_STEP_CANDIDATES = 8
# A direct run longer than this stays a matmul on the native path too (see the module doc).
NATIVE_MAX_RUN_TOKENS = 512


@dataclass(frozen=True)
class DirectRun:
    start: int
    end: int
    slot: int
    rank: int
    scaling: float


@dataclass(frozen=True, eq=False)
class RankBatch:
    rank: int
    first_slot: int
    slot_step: int
    count: int  # slots in the batch
    width: int  # tokens per slot after padding
    gather_rows: torch.Tensor  # int64 [count * width] batch rows, slot-major
    scalings: torch.Tensor | None  # float32 [count, 1, 1]; None when every scaling is 1
    offset: int  # first row of this batch's [count * width] block in the plan's padded buffer
    # Set when gather_rows is exactly range(row_start, row_start + count * width): the batch reads
    # and writes batch rows in place (views, no gather, no padded buffer).
    row_start: int | None = None

    def slots(self, weights: torch.Tensor) -> torch.Tensor:
        """This batch's slots of a stacked weight tensor [S, ...], as a strided view."""
        last = self.first_slot + self.slot_step * (self.count - 1)
        return weights[self.first_slot : last + 1 : self.slot_step]


@dataclass(frozen=True, eq=False)
class SlotSegments:
    """The batch rows of each slot not in a direct run, as the native kernels read them: segment
    i is rows[starts[i]:starts[i + 1]], all of slot slots[i]."""

    starts: torch.Tensor  # int64 [n + 1]
    rows: torch.Tensor  # int64, batch rows slot by slot
    slots: torch.Tensor  # int64 [n]
    ranks: torch.Tensor  # int64 [n]
    scalings: torch.Tensor  # float32 [n]

    @property
    def count(self) -> int:
        return self.slots.numel()

    @functools.cached_property
    def native_args(self) -> tuple[int, ...]:
        """How the native kernels take these segments: the count, then the five arrays' addresses."""
        return (self.count, *(t.data_ptr() for t in (self.starts, self.rows, self.slots, self.ranks, self.scalings)))


@dataclass(frozen=True, eq=False)
class LoraPlan:
    """One step's LoRA work as the CPU backends run it: direct runs, then rank batches (torch
    planner) or segments (native planner). Rank batches that are not in place compute into one
    padded buffer (batch after batch, ``count * width`` rows each); ``padded_positions[i]`` is
    where batch row ``batched_rows[i]`` lands in it. Padding rows are never read back."""

    direct: tuple[DirectRun, ...]
    batches: tuple[RankBatch, ...] = ()
    padded_rows: int = 0
    batched_rows: torch.Tensor | None = None  # int64 ascending batch rows of every padded batch's tokens
    padded_positions: torch.Tensor | None = None  # int64, aligned with batched_rows
    batches_cover_all_rows: bool = False  # batched_rows == arange(num_tokens): results are added, no scatter
    segments: SlotSegments | None = None

    def scaled_ranks(self, factor: int) -> LoraPlan:
        """This plan over a stack whose slot s holds rank · factor rows: equal ranks stay equal."""
        def scaled(items):
            return tuple(replace(item, rank=item.rank * factor) for item in items)

        segments = self.segments and replace(self.segments, ranks=self.segments.ranks * factor)
        return replace(self, direct=scaled(self.direct), batches=scaled(self.batches), segments=segments)


def _rows_by_slot(slots: list[int], ranks: list[int]) -> dict[int, list[int]]:
    rows_by_slot: dict[int, list[int]] = defaultdict(list)
    for row, slot in enumerate(slots):
        if slot >= 0 and ranks[slot] > 0:
            rows_by_slot[slot].append(row)
    return rows_by_slot


def _split_direct(rows_by_slot: dict[int, list[int]], ranks: list[int], scalings: list[float],
                  longer_than: int) -> tuple[list[DirectRun], list[int]]:
    """Slots whose rows are one contiguous run of more than `longer_than` tokens, and the rest."""
    direct, rest = [], []
    for slot, rows in rows_by_slot.items():
        if rows[-1] - rows[0] + 1 == len(rows) and len(rows) > longer_than:
            direct.append(DirectRun(rows[0], rows[-1] + 1, slot, ranks[slot], scalings[slot]))
        else:
            rest.append(slot)
    return direct, rest


def build_torch_plan(slots: list[int], ranks: list[int], scalings: list[float]) -> LoraPlan:
    """The torch backend's plan from host lists: each token's slot (-1: none), each slot's rank and
    scaling. Long runs are direct; the other slots form rank batches."""
    rows_by_slot = _rows_by_slot(slots, ranks)
    direct, rest = _split_direct(rows_by_slot, ranks, scalings, BATCH_MAX_TOKENS)
    by_rank: dict[int, list[int]] = defaultdict(list)
    for slot in rest:
        by_rank[ranks[slot]].append(slot)
    batches: list[RankBatch] = []
    position_of_row: dict[int, int] = {}
    offset = 0
    for rank, members in by_rank.items():
        for run in _progressions(sorted(members)):
            batch, token_rows = _rank_batch(rank, run, rows_by_slot, scalings, offset)
            batches.append(batch)
            if batch.row_start is None:
                position_of_row.update(token_rows)
                offset += batch.count * batch.width
    rows = sorted(position_of_row)
    return LoraPlan(
        direct=tuple(direct),
        batches=tuple(batches),
        padded_rows=offset,
        batched_rows=torch.tensor(rows, dtype=torch.int64),
        padded_positions=torch.tensor([position_of_row[r] for r in rows], dtype=torch.int64),
        batches_cover_all_rows=len(rows) == len(slots),
    )


def build_native_plan(slots: list[int], ranks: list[int], scalings: list[float]) -> LoraPlan:
    """The native backend's plan: runs past NATIVE_MAX_RUN_TOKENS direct, every other slot a segment."""
    rows_by_slot = _rows_by_slot(slots, ranks)
    direct, rest = _split_direct(rows_by_slot, ranks, scalings, NATIVE_MAX_RUN_TOKENS)
    return LoraPlan(direct=tuple(direct), segments=_segments(rest, rows_by_slot, ranks, scalings))


def _segments(slots: list[int], rows_by_slot: dict[int, list[int]], ranks: list[int],
              scalings: list[float]) -> SlotSegments:
    starts = [0]
    for slot in slots:
        starts.append(starts[-1] + len(rows_by_slot[slot]))
    return SlotSegments(
        starts=torch.tensor(starts, dtype=torch.int64),
        rows=torch.tensor([row for slot in slots for row in rows_by_slot[slot]], dtype=torch.int64),
        slots=torch.tensor(slots, dtype=torch.int64),
        ranks=torch.tensor([ranks[slot] for slot in slots], dtype=torch.int64),
        scalings=torch.tensor([scalings[slot] for slot in slots], dtype=torch.float32),
    )


def _rank_batch(
    rank: int, run: list[int], rows_by_slot: dict[int, list[int]], scalings: list[float], offset: int
) -> tuple[RankBatch, dict[int, int]]:
    """One batch, and where each of its batch rows lands in the padded buffer."""
    width = max(len(rows_by_slot[s]) for s in run)
    gather: list[int] = []
    position_of_row = {}
    for slot in run:
        rows = rows_by_slot[slot]
        position_of_row.update((row, offset + len(gather) + i) for i, row in enumerate(rows))
        gather += rows + [rows[-1]] * (width - len(rows))
    scale = [scalings[s] for s in run]
    in_place = gather == list(range(gather[0], gather[0] + len(gather)))
    batch = RankBatch(
        rank=rank,
        first_slot=run[0],
        slot_step=run[1] - run[0] if len(run) > 1 else 1,
        count=len(run),
        width=width,
        gather_rows=torch.tensor(gather, dtype=torch.int64),
        offset=offset,
        row_start=gather[0] if in_place else None,
        scalings=None if all(s == 1.0 for s in scale) else torch.tensor(scale, dtype=torch.float32).view(-1, 1, 1),
    )
    return batch, position_of_row


def _progressions(slots: list[int]) -> list[list[int]]:
    """Cover sorted distinct slot indices with arithmetic progressions: greedily, the longest one
    that starts at the lowest slot left."""
    remaining = slots
    runs = []
    while remaining:
        members = set(remaining)
        first = remaining[0]
        best = [first]
        for second in remaining[1 : 1 + _STEP_CANDIDATES]:
            step, run = second - first, [first]
            while run[-1] + step in members:
                run.append(run[-1] + step)
            if len(run) > len(best):
                best = run
        runs.append(best)
        taken = set(best)
        remaining = [s for s in remaining if s not in taken]
    return runs
