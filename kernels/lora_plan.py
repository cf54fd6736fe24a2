"""How the torch LoRA twins split one CPU step into matmul calls.

On a CPU the LoRA term of a decode step is a few tokens per adapter, so one matmul per adapter
segment is hundreds of tiny calls per layer, each paying ~10 us of overhead to read a few
kilobytes of weights. Two shapes of work are distinguished:

- **Direct runs**: a slot's tokens sit in one contiguous run of the batch (the engine orders its
  batch by slot) and there are many of them (a prefill chunk): one matmul on views, no copies.
- **Slot groups**: the other slots, grouped by rank into arithmetic progressions of slot index
  (``first, first + step, ...``). The weights of such a group are one strided view of the pool,
  ``lora_a[first::step, :rank]``, so the whole group is one `bmm` at its true rank. Tokens are
  gathered into ``[slots, width, in]`` (padding repeats a real row; padded results are dropped).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import torch

# A slot with more tokens than this in one contiguous run gets its own matmul.
GROUP_MAX_TOKENS = 16
# Candidate steps tried per progression: bounds the planning work for large pools.
_STEP_CANDIDATES = 8


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
    valid: torch.Tensor | None  # int64 positions of real tokens in gather_rows; None: all are real
    token_rows: torch.Tensor  # int64 batch rows of the real tokens, in the order of `valid`
    scalings: torch.Tensor | None  # float32 [count, 1, 1]; None when every scaling is 1

    def slots(self, weights: torch.Tensor) -> torch.Tensor:
        """This group's slots of a stacked weight tensor [S, ...], as a strided view."""
        last = self.first_slot + self.slot_step * (self.count - 1)
        return weights[self.first_slot : last + 1 : self.slot_step]


@dataclass(frozen=True, eq=False)
class LoraCpuPlan:
    direct: tuple[DirectRun, ...]
    groups: tuple[SlotGroup, ...]
    group_rows: torch.Tensor  # int64: every group's token_rows, concatenated in group order

    def scaled_ranks(self, factor: int) -> LoraCpuPlan:
        """This plan over a stack whose slot s holds rank · factor rows: equal ranks stay equal."""
        return replace(
            self,
            direct=tuple(replace(run, rank=run.rank * factor) for run in self.direct),
            groups=tuple(replace(group, rank=group.rank * factor) for group in self.groups),
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
    groups = [
        _slot_group(rank, run, rows_by_slot, scalings)
        for rank, members in grouped.items()
        for run in _progressions(sorted(members))
    ]
    rows = [g.token_rows for g in groups]
    group_rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)
    return LoraCpuPlan(tuple(direct), tuple(groups), group_rows)


def _slot_group(rank: int, run: list[int], rows_by_slot: dict[int, list[int]], scalings: list[float]) -> SlotGroup:
    width = max(len(rows_by_slot[s]) for s in run)
    gather, valid, token_rows = [], [], []
    for slot in run:
        rows = rows_by_slot[slot]
        valid += range(len(gather), len(gather) + len(rows))
        token_rows += rows
        gather += rows + [rows[-1]] * (width - len(rows))
    scale = [scalings[s] for s in run]
    return SlotGroup(
        rank=rank,
        first_slot=run[0],
        slot_step=run[1] - run[0] if len(run) > 1 else 1,
        count=len(run),
        width=width,
        gather_rows=torch.tensor(gather, dtype=torch.int64),
        valid=None if len(valid) == len(gather) else torch.tensor(valid, dtype=torch.int64),
        token_rows=torch.tensor(token_rows, dtype=torch.int64),
        scalings=None if all(s == 1.0 for s in scale) else torch.tensor(scale, dtype=torch.float32).view(-1, 1, 1),
    )


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
