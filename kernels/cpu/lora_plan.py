"""The native backend's *plan* of one step's LoRA work: which tokens go to which kind of call.

On a CPU the LoRA term of a decode step is a few tokens per adapter: one matmul per adapter
segment would be hundreds of tiny calls per layer, each paying more in overhead than it reads.
The plan sorts the batch's segments (a slot's tokens) into two kinds of work:

- **Segments**: every slot's rows, wherever they sit in the batch, go to the native kernels
  as plain segments (`SlotSegments`): one call per projection group at any width, no padding.
- **Direct runs**: a slot whose rows are one contiguous run of more than
  `NATIVE_MAX_RUN_TOKENS` (a long prefill chunk) stays one MKL matmul on views, where MKL's
  blocking beats the kernels (benchmarks/RESULTS.md, "CPU kernels", has the measurements).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

# A contiguous run longer than this is one matmul rather than a native segment (see the module doc).
NATIVE_MAX_RUN_TOKENS = 512


@dataclass(frozen=True)
class DirectRun:
    start: int
    end: int
    slot: int
    rank: int
    scaling: float


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
    direct: tuple[DirectRun, ...]
    segments: SlotSegments

    def scaled_ranks(self, factor: int) -> LoraPlan:
        """This plan over a stack whose slot s holds rank · factor rows (a fused group's A)."""
        return LoraPlan(
            direct=tuple(replace(run, rank=run.rank * factor) for run in self.direct),
            segments=replace(self.segments, ranks=self.segments.ranks * factor),
        )


def build_native_plan(slots: list[int], ranks: Mapping[int, int], scalings: Mapping[int, float]) -> LoraPlan:
    """Plan a batch from host values: each token's slot (-1: none); the rank and scaling of each
    slot present (a list over all slots serves as well)."""
    rows_by_slot: dict[int, list[int]] = defaultdict(list)
    for row, slot in enumerate(slots):
        if slot >= 0 and ranks[slot] > 0:
            rows_by_slot[slot].append(row)
    direct, rest = [], []
    for slot, rows in rows_by_slot.items():
        if rows[-1] - rows[0] + 1 == len(rows) and len(rows) > NATIVE_MAX_RUN_TOKENS:
            direct.append(DirectRun(rows[0], rows[-1] + 1, slot, ranks[slot], scalings[slot]))
        else:
            rest.append(slot)
    starts = [0]
    for slot in rest:
        starts.append(starts[-1] + len(rows_by_slot[slot]))
    segments = SlotSegments(
        starts=torch.tensor(starts, dtype=torch.int64),
        rows=torch.tensor([row for slot in rest for row in rows_by_slot[slot]], dtype=torch.int64),
        slots=torch.tensor(rest, dtype=torch.int64),
        ranks=torch.tensor([ranks[slot] for slot in rest], dtype=torch.int64),
        scalings=torch.tensor([scalings[slot] for slot in rest], dtype=torch.float32),
    )
    return LoraPlan(direct=tuple(direct), segments=segments)
