"""How the torch LoRA twins split one CPU step into matmul calls.

On a CPU the LoRA term of a decode step is a few tokens per adapter, so one matmul per adapter
segment is hundreds of tiny calls per layer, each paying ~10 us of overhead to read a few
kilobytes of weights. Two shapes of work are distinguished:

- **Direct runs**: a slot's tokens sit in one contiguous run of the batch (the engine orders its
  batch by adapter rank, then slot) and there are many of them (a prefill chunk): one matmul on
  views, no copies.
- **Slot groups**: the other slots, grouped by rank into arithmetic progressions of slot index
  (``first, first + step, ...``). The weights of such a group are one strided view of the pool,
  ``lora_a[first::step, :rank]``, so the whole group is one `bmm` at its true rank. Tokens are
  gathered into ``[slots, width, in]`` (padding repeats a real row; padded results are dropped).

The native kernels (``kernels.native``) take the same slots as plain segments instead
(`SlotSegments`): one call per projection covers them all, at any width, with no padding. They
also take the direct runs up to `NATIVE_MAX_RUN_TOKENS` (`native_segments`): as one call they beat
a matmul per run (8 prefill runs of 256 tokens, ranks 8-64: 9.3 against 15.3 ms a layer; 4 runs
of 512: 10.3 against 13.2). MKL keeps longer ones (`native_direct`), where its blocking wins
(one rank-64 run of 1024 tokens: 8.3 against the kernels' 10.3 ms).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, replace

import torch

# A slot with more tokens than this in one contiguous run gets its own matmul.
GROUP_MAX_TOKENS = 16
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
class SlotGroup:
    rank: int
    first_slot: int
    slot_step: int
    count: int  # slots in the group
    width: int  # tokens per slot after padding
    gather_rows: torch.Tensor  # int64 [count * width] batch rows, slot-major
    scalings: torch.Tensor | None  # float32 [count, 1, 1]; None when every scaling is 1
    offset: int  # first row of this group's [count * width] block in the plan's padded buffer
    # Set when gather_rows is exactly range(row_start, row_start + count * width): the group reads
    # and writes batch rows in place (views, no gather, no padded buffer).
    row_start: int | None = None

    def slots(self, weights: torch.Tensor) -> torch.Tensor:
        """This group's slots of a stacked weight tensor [S, ...], as a strided view."""
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
class LoraCpuPlan:
    """Groups that are not in place compute into one padded buffer (group after group, ``count *
    width`` rows each); ``padded_positions[i]`` is where batch row ``group_rows[i]`` lands in it.
    Padding rows are never read back."""

    direct: tuple[DirectRun, ...]
    groups: tuple[SlotGroup, ...]
    padded_rows: int
    group_rows: torch.Tensor  # int64 ascending batch rows of every padded group's tokens
    padded_positions: torch.Tensor  # int64, aligned with group_rows
    groups_cover_batch: bool  # group_rows == arange(num_tokens): results are added with no scatter
    segments: SlotSegments  # the grouped slots again, as segments
    # The native kernels' split: runs past NATIVE_MAX_RUN_TOKENS, and every other slot as segments.
    native_direct: tuple[DirectRun, ...]
    native_segments: SlotSegments

    def scaled_ranks(self, factor: int) -> LoraCpuPlan:
        """This plan over a stack whose slot s holds rank · factor rows: equal ranks stay equal."""
        def scaled(items):
            return tuple(replace(item, rank=item.rank * factor) for item in items)

        segments = replace(self.segments, ranks=self.segments.ranks * factor)
        return replace(
            self,
            direct=scaled(self.direct),
            groups=scaled(self.groups),
            segments=segments,
            native_direct=scaled(self.native_direct),
            native_segments=(segments if self.native_segments is self.segments
                             else replace(self.native_segments, ranks=self.native_segments.ranks * factor)),
        )


def build_cpu_plan(slots: list[int], ranks: list[int], scalings: list[float]) -> LoraCpuPlan:
    """Plan a batch from host lists: each token's slot (-1: none), each slot's rank and scaling."""
    rows_by_slot: dict[int, list[int]] = defaultdict(list)
    for row, slot in enumerate(slots):
        if slot >= 0 and ranks[slot] > 0:
            rows_by_slot[slot].append(row)
    direct = []
    grouped: dict[int, list[int]] = defaultdict(list)
    for slot, rows in rows_by_slot.items():
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        if contiguous and len(rows) > GROUP_MAX_TOKENS:
            direct.append(DirectRun(rows[0], rows[-1] + 1, slot, ranks[slot], scalings[slot]))
        else:
            grouped[ranks[slot]].append(slot)
    groups: list[SlotGroup] = []
    position_of_row: dict[int, int] = {}
    offset = 0
    for rank, members in grouped.items():
        for run in _progressions(sorted(members)):
            group, token_rows = _slot_group(rank, run, rows_by_slot, scalings, offset)
            groups.append(group)
            if group.row_start is None:
                position_of_row.update(token_rows)
                offset += group.count * group.width
    rows = sorted(position_of_row)
    segment_slots = [slot for members in grouped.values() for slot in members]
    segments = _segments(segment_slots, rows_by_slot, ranks, scalings)
    native_direct = tuple(run for run in direct if run.end - run.start > NATIVE_MAX_RUN_TOKENS)
    native_segments = segments
    if len(native_direct) < len(direct):
        native_slots = segment_slots + [run.slot for run in direct if run not in native_direct]
        native_segments = _segments(native_slots, rows_by_slot, ranks, scalings)
    return LoraCpuPlan(
        direct=tuple(direct),
        groups=tuple(groups),
        padded_rows=offset,
        group_rows=torch.tensor(rows, dtype=torch.int64),
        padded_positions=torch.tensor([position_of_row[r] for r in rows], dtype=torch.int64),
        groups_cover_batch=len(rows) == len(slots),
        segments=segments,
        native_direct=native_direct,
        native_segments=native_segments,
    )


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


def _slot_group(
    rank: int, run: list[int], rows_by_slot: dict[int, list[int]], scalings: list[float], offset: int
) -> tuple[SlotGroup, dict[int, int]]:
    """One group, and where each of its batch rows lands in the padded buffer."""
    width = max(len(rows_by_slot[s]) for s in run)
    gather: list[int] = []
    position_of_row = {}
    for slot in run:
        rows = rows_by_slot[slot]
        position_of_row.update((row, offset + len(gather) + i) for i, row in enumerate(rows))
        gather += rows + [rows[-1]] * (width - len(rows))
    scale = [scalings[s] for s in run]
    in_place = gather == list(range(gather[0], gather[0] + len(gather)))
    group = SlotGroup(
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
    return group, position_of_row


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
