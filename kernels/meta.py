"""Per-step bookkeeping for the multi-LoRA kernels.

`LoraMeta.build` runs once per engine step; every layer and projection then reuses it,
so all sorting, segmenting and the single host sync happen here and nowhere else.

A *segment* is the tokens of one adapter slot in a batch; a *plan* is how a backend splits a
step into kernel calls (the native backend's ``kernels.cpu.lora_plan.LoraPlan``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# Tokens per Triton tile. A tile never crosses a segment boundary, so a weight tile is
# loaded once per (segment, 16 tokens) instead of once per token.
TILE_M = 16


@dataclass(frozen=True, eq=False)
class LoraMeta:
    """Token -> adapter-slot mapping of one batch, grouped into per-slot segments.

    Tokens with an adapter are sorted by slot (stably); `sorted_token_ids[start:end]` of a
    segment are the batch rows of one slot. Tokens with slot -1 appear in no segment.
    """

    num_tokens: int
    # Host side, read without any sync: (start, end, slot, rank, scaling).
    segments: tuple[tuple[int, int, int, int, float], ...]
    active_slots: tuple[int, ...]
    max_rank: int
    num_slots: int
    # Device side, used by the Triton kernels.
    sorted_token_ids: torch.Tensor  # int64 [N], N = tokens that use an adapter
    tiles: torch.Tensor  # int32 [num_tiles, 3]: (slot, start, end) into sorted_token_ids
    ranks: torch.Tensor  # int32 [S] on the compute device
    scalings: torch.Tensor  # float32 [S] on the compute device
    num_lora_tokens: int = 0
    # The backend's plan of this batch (native: kernels.cpu.lora_plan.LoraPlan), or None.
    plan: Any = None
    # scaled_ranks results by factor: every layer asks for the same ones (not copied by replace()).
    _scaled: dict[int, LoraMeta] = field(default_factory=dict, init=False, repr=False)

    @property
    def has_lora(self) -> bool:
        """False when no token of the batch uses an adapter: callers skip LoRA work."""
        return bool(self.segments)

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    def scaled_ranks(self, factor: int) -> LoraMeta:
        """The same batch over a stack whose slot s holds rank · factor rows (fused projections that
        interleave their A rows): derived from this one, with no second sort or host sync."""
        if factor == 1:
            return self
        scaled = self._scaled.get(factor)
        if scaled is None:
            scaled = self._scaled[factor] = self._with_ranks_times(factor)
        return scaled

    def _with_ranks_times(self, factor: int) -> LoraMeta:
        return dataclasses.replace(
            self,
            segments=tuple((start, end, slot, rank * factor, scaling) for start, end, slot, rank, scaling in self.segments),
            max_rank=self.max_rank * factor,
            ranks=self.ranks * factor,
            plan=None if self.plan is None else self.plan.scaled_ranks(factor),
        )

    @classmethod
    def build(
        cls,
        token_slots: torch.Tensor,
        ranks: torch.Tensor,
        scalings: torch.Tensor,
        planner: Callable[[list[int], Mapping[int, int], Mapping[int, float]], Any] | None = None,
    ) -> LoraMeta:
        """Sort tokens by slot and segment them; one host sync (for the segment sizes).

        token_slots lives on the compute device; ranks and scalings may live on the host
        (free) or on the device (one more small copy back). `planner` (the token slots as a host
        list; the ranks and scalings of the slots present, by slot) makes the backend's plan, for a
        batch that uses an adapter.
        """
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
        if ranks.dim() != 1 or scalings.shape != ranks.shape:
            raise ValueError(
                f"ranks and scalings must both be [S]; got {tuple(ranks.shape)} and {tuple(scalings.shape)}"
            )
        device = token_slots.device
        num_tokens = token_slots.numel()
        num_slots = ranks.numel()
        slots = token_slots.to(torch.int64)

        # Stable sort puts the -1 tokens first, then each slot's tokens in batch order.
        _, order = torch.sort(slots, stable=True)
        # The slots present and their token counts, in one host sync. (Not a bincount over all
        # slots: a rank-packed pool has a slot per row, thousands, of which a step uses a few.)
        present, counts = torch.unique(slots, sorted=True, return_counts=True)
        host = torch.cat([present, counts]).tolist()
        present_host, counts_host = host[: len(host) // 2], host[len(host) // 2 :]
        if present_host and present_host[0] < -1:
            raise ValueError("token_slots entries must be -1 (no adapter) or a slot index >= 0")
        if present_host and present_host[-1] >= num_slots:
            raise ValueError(f"token_slots refers to slot {present_host[-1]} but only {num_slots} slots exist")

        used = [slot for slot in present_host if slot >= 0]
        picked = torch.tensor(used, dtype=torch.int64, device=ranks.device)
        ranks_host = dict(zip(used, (int(r) for r in ranks[picked].tolist()), strict=True))
        scalings_host = dict(zip(used, (float(x) for x in scalings[picked.to(scalings.device)].tolist()), strict=True))
        segments: list[tuple[int, int, int, int, float]] = []
        tiles: list[tuple[int, int, int]] = []
        start = 0
        for slot, count in zip(present_host, counts_host, strict=True):
            if slot < 0:
                continue
            end = start + count
            rank = ranks_host[slot]
            # A rank-0 slot contributes nothing; leaving it out keeps both paths trivially equal.
            if rank > 0:
                segments.append((start, end, slot, rank, scalings_host[slot]))
                tiles.extend((slot, t, min(t + TILE_M, end)) for t in range(start, end, TILE_M))
            start = end
        # Keep positions in sorted_token_ids consistent with the segments above (rank-0
        # segments keep their place; they are simply never read).
        num_skipped = counts_host[0] if present_host and present_host[0] == -1 else 0
        sorted_token_ids = order[num_skipped:]
        plan = planner(token_slots.tolist(), ranks_host, scalings_host) if planner and segments else None
        return cls(
            num_tokens=num_tokens,
            segments=tuple(segments),
            active_slots=tuple(s[2] for s in segments),
            max_rank=max((s[3] for s in segments), default=0),
            num_slots=num_slots,
            sorted_token_ids=sorted_token_ids,
            tiles=torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(device),
            ranks=ranks.to(device=device, dtype=torch.int32),
            scalings=scalings.to(device=device, dtype=torch.float32),
            plan=plan,
            num_lora_tokens=sum(s[1] - s[0] for s in segments),
        )

