"""LoRA in the engine: which projections share a shrink, the adapter pool's kernel groups, and one step's adapters.

The model asks `LoraBatch.apply` for the LoRA term of each projection group of each layer. The
groups are the kernel backend's objects (``kernels.LoraGroup``) over the adapter pool's stacked
weights: built once per (layer, projection group, adapted parts), since the stacks never move,
and looked up through a table per set of adapted (module, layer) pairs, since a decode step makes
over a hundred lookups and each must cost one dict read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

import kernels

if TYPE_CHECKING:
    from engine_daemon.adapter_pool import AdapterPool

# Projections that read the same input, in the order the fused base weights hold them: their
# LoRA A matrices are stored (and shrunk) together.
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSED_PROJECTIONS = (QKV, GATE_UP)
# Distinct target sets (unions over a step's adapters) whose group tables are kept.
_TARGET_TABLES = 64

Targets = frozenset[tuple[str, int]]
GroupTable = dict[tuple[tuple[str, ...], int], "kernels.LoraGroup | None"]


class PoolGroups:
    """The kernel groups of one adapter pool under one kernel backend."""

    def __init__(self, pool: AdapterPool, backend: kernels.Backend) -> None:
        self.pool, self.backend = pool, backend
        self._groups: dict[tuple, kernels.LoraGroup] = {}
        self._tables: OrderedDict[Targets, GroupTable] = OrderedDict()

    def table(self, targets: Targets) -> GroupTable:
        """The table a step whose adapters adapt `targets` reads its groups from: (parts, layer) →
        the group of the adapted parts, or None where none is; filled on first use (`fill`) and
        shared by every step with the same targets."""
        table = self._tables.get(targets)
        if table is None:
            table = self._tables[targets] = {}
            if len(self._tables) > _TARGET_TABLES:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(targets)
        return table

    def fill(self, table: GroupTable, targets: Targets, parts: tuple[str, ...], layer: int) -> kernels.LoraGroup | None:
        """`table`'s entry for (parts, layer)."""
        adapted = tuple(part for part in parts if (part, layer) in targets)
        group = table[parts, layer] = self._group(parts, layer, adapted) if adapted else None
        return group

    def _group(self, parts: tuple[str, ...], layer: int, adapted: tuple[str, ...]) -> kernels.LoraGroup:
        key = (parts, layer, adapted)
        group = self._groups.get(key)
        if group is None:
            pool = self.pool
            columns, start = {}, 0
            for part in parts:  # the parts' outputs lie side by side in the fused projection's output
                columns[part] = slice(start, start + pool.out_features[part])
                start = columns[part].stop
            if len(adapted) > 1:  # one shrink over the fused A stack of all parts
                lora_a = pool.shrink_weights(parts, layer)
                members = [(pool.b[p][layer], columns[p]) if p in adapted else None for p in parts]
            else:  # one part: its own A rows only
                lora_a = pool.a[adapted[0]][layer]
                members = [(pool.b[adapted[0]][layer], columns[adapted[0]])]
            group = self._groups[key] = self.backend.lora_group(lora_a, members, start)
        return group


class LoraBatch:
    """The adapters of one step: its token → slot map (``kernels.LoraMeta``) and the group table of
    the (module, layer) pairs its adapters adapt."""

    def __init__(self, meta: kernels.LoraMeta, groups: PoolGroups, targets: Targets, timed: bool = False) -> None:
        self.meta = meta
        self.groups, self.targets = groups, targets
        self.table = groups.table(targets)
        self.timed = timed
        self.seconds: float | None = 0.0 if timed else None  # time spent in apply(), when timed

    def apply(self, x: torch.Tensor, out: torch.Tensor, layer: int, parts: tuple[str, ...]) -> None:
        """out += scaling · (x Aᵀ) Bᵀ for each token's adapter, for the projections `parts` whose
        outputs lie side by side in `out` (scaling is folded into B at load)."""
        key = (parts, layer)
        table = self.table
        group = table[key] if key in table else self.groups.fill(table, self.targets, parts, layer)
        if group is None:
            return
        if self.timed:
            _sync(x)
            started = time.perf_counter()
        group.apply(x, out, self.meta)
        if self.timed:
            _sync(x)
            self.seconds += time.perf_counter() - started


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:  # (not tensor.device: building a device object per call shows in a CPU step)
        torch.cuda.synchronize(tensor.device)
