"""The device adapter pool: every resident adapter's LoRA weights in one buffer, each by its own rank.

An adapter of rank r takes r contiguous *rows* of the pool (S-LoRA's unified pool, with one rank row
as the page): a row holds one rank row of every projection of every layer, A's over the
projection's input and B's over its output. The pool's size is a byte budget, so many small
adapters stay on the device where a few large ones would.

The kernels read a projection's weights as a stack [S, R, in] (A) or [S, out, R] (B) by strides,
and compute slot s at its own rank from its first `rank` rows. Here the stack's slot stride is one
row: *slot s is the adapter that starts at row s*. Slot s's R rows overlap the rows after it, which
the kernels never read past its rank; the buffer ends in R - 1 rows of padding so that the last
row's view stays inside it. The stacks never move, so the kernel groups built over them hold.

Placement (`choose`) is best fit among free runs of rows; when none is long enough, the run whose
evicted adapters were used least recently, among runs of adapters the caller lets go.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch

from engine_daemon.lora import FUSED_PROJECTIONS
from engine_daemon.peft_format import LORA_MODULES, ModelDescriptor

# A host copy: (module, layer) → (A [r, in], B·scaling [out, r]) in the pool's dtype (lora_dtype).
HostWeights = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]

_UNFUSED = tuple(m for m in LORA_MODULES if not any(m in parts for parts in FUSED_PROJECTIONS))


@dataclass(frozen=True)
class Placement:
    start: int  # first row
    victims: tuple[Hashable, ...]  # owners to evict first, whose rows the run covers


class PoolLayout:
    """Where each (module, layer) region lies in the flat buffer, and what a row costs."""

    def __init__(self, descriptor: ModelDescriptor, dtype: torch.dtype) -> None:
        shapes = {m: descriptor.projection_shape(m) for m in LORA_MODULES}
        self.in_features = {m: shape[0] for m, shape in shapes.items()}
        self.out_features = {m: shape[1] for m, shape in shapes.items()}
        self.num_layers = descriptor.num_layers
        self.dtype = dtype
        # Per row, the width (elements) of each region, in buffer order: per layer the fused A
        # stacks ([parts, in] per row), the unfused A ([in]), then every B ([out]).
        self.widths: list[tuple[str, tuple[str, ...] | str, int, int]] = []  # (kind, what, layer, width)
        for layer in range(self.num_layers):
            for parts in FUSED_PROJECTIONS:
                self.widths.append(("fused_a", parts, layer, len(parts) * self.in_features[parts[0]]))
            for module in _UNFUSED:
                self.widths.append(("a", module, layer, self.in_features[module]))
            for module in LORA_MODULES:
                self.widths.append(("b", module, layer, self.out_features[module]))
        self.row_elements = sum(width for *_, width in self.widths)
        self.row_bytes = self.row_elements * dtype.itemsize

    def padding_bytes(self, max_rank: int) -> int:
        """The rows after the last one that its [R, width] view covers (see the module doc)."""
        return (max_rank - 1) * max(width for *_, width in self.widths) * self.dtype.itemsize

    def bytes_for(self, ranks: Iterable[int], max_rank: int) -> int:
        """The budget a pool needs to hold adapters of these ranks at once."""
        return sum(ranks) * self.row_bytes + self.padding_bytes(max_rank)


def pool_bytes_for(descriptor: ModelDescriptor, ranks: Iterable[int], max_lora_rank: int, dtype: torch.dtype) -> int:
    """The `lora_pool_bytes` that holds adapters of these ranks all at once."""
    return PoolLayout(descriptor, dtype).bytes_for(ranks, max_lora_rank)


class AdapterPool:
    """The resident adapters' weights (views a, b, fused_a over one buffer) and which rows each holds."""

    def __init__(self, descriptor: ModelDescriptor, budget_bytes: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        layout = self.layout = PoolLayout(descriptor, dtype)
        self.max_rank = max_rank
        self.row_bytes = layout.row_bytes
        self.capacity = max(0, (budget_bytes - layout.padding_bytes(max_rank)) // layout.row_bytes)  # rows
        if self.capacity < 1:
            raise ValueError(
                f"lora_pool_bytes={budget_bytes} holds no adapter row: one rank row of this model takes "
                f"{layout.row_bytes} bytes and the pool's padding {layout.padding_bytes(max_rank)}")
        rows = self.capacity
        self.nbytes = rows * layout.row_bytes + layout.padding_bytes(max_rank)
        buffer = torch.zeros(self.nbytes // dtype.itemsize, dtype=dtype, device=device)
        self.in_features, self.out_features = layout.in_features, layout.out_features
        self.fused_a: dict[tuple[str, ...], list[torch.Tensor]] = {p: [] for p in FUSED_PROJECTIONS}
        self.a: dict[str, list[torch.Tensor]] = {m: [None] * layout.num_layers for m in LORA_MODULES}
        self.b: dict[str, list[torch.Tensor]] = {m: [None] * layout.num_layers for m in LORA_MODULES}
        offset = 0
        for kind, what, layer, width in layout.widths:
            if kind == "fused_a":  # [rows, R, parts, in], rank-major: a slot's r rows of all parts are contiguous
                n, k = len(what), self.in_features[what[0]]
                fused = buffer.as_strided((rows, max_rank, n, k), (width, width, k, 1), offset)
                self.fused_a[what].append(fused)
                for i, part in enumerate(what):
                    self.a[part][layer] = fused[:, :, i]  # [rows, R, in] views
            elif kind == "a":
                self.a[what][layer] = buffer.as_strided((rows, max_rank, width), (width, width, 1), offset)
            else:  # B rank-major ([rows, R, out] in memory), exposed as the kernels' [rows, out, R]
                self.b[what][layer] = buffer.as_strided((rows, max_rank, width), (width, width, 1), offset).transpose(1, 2)
            offset += rows * width
        self._buffer = buffer
        # Each slot is computed at its adapter's own rank (0: no adapter starts at this row);
        # scaling is folded into B. Kept on the host: LoraMeta.build reads them there.
        self.ranks = torch.zeros(rows, dtype=torch.int32)
        self.scalings = torch.ones(rows, dtype=torch.float32)
        self.targets: dict[int, frozenset[tuple[str, int]]] = {}
        # first row → (owner, rows); the owner is the caller's key of one adapter registration
        self.occupants: dict[int, tuple[Hashable, int]] = {}

    def shrink_weights(self, parts: tuple[str, ...], layer: int) -> torch.Tensor:
        """A of several fused projections as one [S, R * parts, in] stack (rank r → r * parts rows)."""
        fused = self.fused_a[parts][layer]
        rows, rank, n, k = fused.shape
        return fused.as_strided((rows, rank * n, k), (fused.stride(0), k, 1))

    @property
    def used_rows(self) -> int:
        return sum(rows for _owner, rows in self.occupants.values())

    @property
    def used_bytes(self) -> int:
        return self.used_rows * self.row_bytes

    # ---- rows ------------------------------------------------------------------------------

    def choose(self, rows: int, evictable: Callable[[Hashable], bool],
               recency: Callable[[Hashable], int]) -> Placement | None:
        """Where `rows` rows can go: the shortest free run that fits, else the run of free rows and
        evictable adapters whose most recently used victim is the least recent (ties: fewer rows
        evicted); None when no run can be had."""
        if rows > self.capacity:
            return None
        runs = self._runs()
        free = [(length, start) for start, length, owner in runs if owner is None and length >= rows]
        if free:
            return Placement(min(free)[1], ())
        best: tuple[tuple[int, int], Placement] | None = None
        for i, (start, _length, _owner) in enumerate(runs):
            covered, victims, evicted = 0, [], 0
            for _start, length, owner in runs[i:]:
                if owner is not None:
                    if not evictable(owner):
                        break
                    victims.append(owner)
                    evicted += length
                covered += length
                if covered >= rows:
                    break
            if covered < rows or not victims:
                continue
            score = (max(recency(v) for v in victims), evicted)
            if best is None or score < best[0]:
                best = (score, Placement(start, tuple(victims)))
        return best[1] if best else None

    def _runs(self) -> list[tuple[int, int, Hashable | None]]:
        """The pool as (start, rows, owner or None for free rows) runs in row order."""
        runs, at = [], 0
        for start in sorted(self.occupants):
            owner, rows = self.occupants[start]
            if start > at:
                runs.append((at, start - at, None))
            runs.append((start, rows, owner))
            at = start + rows
        if at < self.capacity:
            runs.append((at, self.capacity - at, None))
        return runs

    def occupy(self, start: int, rows: int, owner: Hashable) -> None:
        end = start + rows
        if start < 0 or end > self.capacity:
            raise ValueError(f"rows {start}..{end} lie outside the pool's {self.capacity}")
        for other, (other_owner, other_rows) in self.occupants.items():
            if other < end and start < other + other_rows:
                raise ValueError(f"rows {start}..{end} overlap {other_owner!r}'s {other}..{other + other_rows}")
        self.occupants[start] = (owner, rows)

    def vacate(self, start: int) -> None:
        """Free an adapter's rows: no step reads them again (rank 0), the next one may take them."""
        self.occupants.pop(start, None)
        self.ranks[start] = 0
        self.targets.pop(start, None)

    def activate(self, start: int, rank: int, targets: frozenset[tuple[str, int]]) -> None:
        """The adapter at `start` is filled: steps may now compute it."""
        self.ranks[start] = rank
        self.targets[start] = targets

    def fill(self, start: int, weights: HostWeights, rank: int, non_blocking: bool = False) -> None:
        """Write one adapter into its rows: zeros up to its rank wherever it has no weights."""
        for module in LORA_MODULES:
            for layer, (a_stack, b_stack) in enumerate(zip(self.a[module], self.b[module], strict=True)):
                a_stack[start, :rank].zero_()
                b_stack[start, :, :rank].zero_()
                pair = weights.get((module, layer))
                if pair is not None:
                    a, b = pair
                    r = a.shape[0]
                    a_stack[start, :r].copy_(a, non_blocking=non_blocking)
                    b_stack[start, :, :r].copy_(b, non_blocking=non_blocking)
