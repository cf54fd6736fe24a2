"""The torch backend's attention plan: index tensors for one step, built once and shared by all layers.

The twin's cost on CPU is memory traffic: every decode step reads each sequence's whole context
in every layer. Two choices here keep that traffic near its minimum:

- **Whole-block gathers, head-major.** With the cache laid out head-major inside a block
  (``[num_blocks, kv_heads, block_size, head_dim]`` in memory, what `KVCache` allocates), one
  `index_select` of (block, head) rows of ``block_size · head_dim`` elements yields the context
  directly as ``[seqs, kv_heads, length, head_dim]``: the layout the matmuls want, with no
  permuting copy. Any other cache strides take a slower generic path with the same results.
- **Length buckets for decode.** Decode sequences are padded to a common length per bucket, not
  to the longest one in the batch: sorted by length and split where the padding would cost more
  than another round of kernel calls.
"""

from __future__ import annotations

import functools

import torch

# A decode bucket's fixed cost (about ten small tensor ops per layer), in padded positions of one
# sequence: the ratio of a bucket's cost to a position's (benchmarks/RESULTS.md, "CPU kernels").
_BUCKET_COST_POSITIONS = 256


def is_head_major(cache: torch.Tensor) -> bool:
    """Whether a [num_blocks, block_size, kv_heads, head_dim] view is head-major in memory."""
    num_blocks, block_size, kv_heads, head_dim = cache.shape
    want = (kv_heads * block_size * head_dim, head_dim, block_size * head_dim, 1)
    return all(size == 1 or stride == w for size, stride, w in zip(cache.shape, cache.stride(), want, strict=True))


class DecodeBucket:
    """Single-query sequences padded to one length: where to gather their context from."""

    def __init__(self, rows: list[int], lens: list[int], tables: torch.Tensor, block_size: int,
                 kv_heads: int, q_rows: list[int], head_major: bool) -> None:
        device = tables.device
        self.count = len(rows)
        blocks = -(-max(lens) // block_size)
        self.length = blocks * block_size
        self.q_rows = torch.tensor(q_rows, device=device)
        seq_lens = torch.tensor(lens, device=device)
        positions = torch.arange(self.length, device=device)
        self.valid = positions[None, :] < seq_lens[:, None]  # [n, length]
        table = _own_blocks_only(tables[rows, :blocks].to(torch.int64), seq_lens, block_size)
        if head_major:
            # Row (block * kv_heads + head) of the cache viewed as [num_blocks * kv_heads, block_size * head_dim].
            heads = torch.arange(kv_heads, device=device)
            self.gather_rows = (table[:, None, :] * kv_heads + heads[None, :, None]).reshape(-1)
            self.slots = None
        else:
            self.gather_rows = None
            self.slots = (table[:, positions // block_size] * block_size + positions % block_size)  # [n, length]
        # Rows of the gathered [n * kv_heads * length, head_dim] K and V past each sequence's end: they
        # may hold anything (even NaN: 0 · NaN and NaN - inf are NaN), so K and V there are zeroed.
        invalid = (~self.valid)[:, None, :].expand(-1, kv_heads, -1).reshape(-1)
        self.invalid_rows = invalid.nonzero().squeeze(1) if bool(invalid.any()) else None


class PrefillSeq:
    """One sequence's chunk of queries over its paged context (prefix plus the chunk itself)."""

    def __init__(self, start: int, end: int, length: int, table: torch.Tensor, block_size: int,
                 kv_heads: int, head_major: bool) -> None:
        device = table.device
        self.start, self.end, self.length = start, end, length
        blocks = -(-length // block_size)
        table = table[:blocks].to(torch.int64)
        if head_major:
            heads = torch.arange(kv_heads, device=device)
            self.gather_rows = (heads[:, None] + table[None, :] * kv_heads).reshape(-1)  # [kv_heads * blocks]
            self.slots = None
        else:
            positions = torch.arange(length, device=device)
            self.gather_rows = None
            self.slots = table[positions // block_size] * block_size + positions % block_size
        prefix = length - (end - start)
        self.mask = None
        if prefix:
            # Bottom-right aligned causal mask: query i sees the whole prefix plus queries <= i.
            q_pos = prefix + torch.arange(end - start, device=device)
            self.mask = torch.arange(length, device=device)[None, :] <= q_pos[:, None]


class AttentionPlan:
    """Decode buckets and prefill sequences of one step's batch."""

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                 block_size: int, kv_heads: int, head_major: bool) -> None:
        self.key = (block_tables, seq_lens, query_start_loc, block_size, kv_heads, head_major)
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        decode: list[int] = []
        self.prefill: list[PrefillSeq] = []
        for b, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            if end - start == 1:
                decode.append(b)
            elif end > start:
                self.prefill.append(PrefillSeq(start, end, lens[b], block_tables[b], block_size, kv_heads, head_major))
        # All decode sequences, unpadded, for the native kernel: batch entries and their query rows.
        self.decode_seqs = torch.tensor(decode, dtype=torch.int64)
        self.decode_q_rows = torch.tensor([starts[b] for b in decode], dtype=torch.int64)
        self._lens, self._starts = lens, starts

    @functools.cached_property
    def decode(self) -> list[DecodeBucket]:
        """Length buckets of the decode sequences, for the torch twin (built on first use)."""
        block_tables, _, _, block_size, kv_heads, head_major = self.key
        lens, starts = self._lens, self._starts
        decode = sorted(self.decode_seqs.tolist(), key=lambda b: -lens[b])
        return [
            DecodeBucket(group, [lens[b] for b in group], block_tables, block_size, kv_heads,
                         [starts[b] for b in group], head_major)
            for group in _buckets(decode, [-(-lens[b] // block_size) * block_size for b in decode])
        ]

    def matches(self, *key) -> bool:
        mine = self.key
        return all(a is b for a, b in zip(mine[:3], key[:3], strict=True)) and mine[3:] == key[3:]


def _own_blocks_only(table: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Entries past a sequence's last block may hold anything (-1, stale ids): point them at its
    first block so the gather stays in bounds; those positions are masked."""
    used = -(-seq_lens // block_size)
    inside = torch.arange(table.shape[1], device=table.device)[None, :] < used[:, None]
    return torch.where(inside, table, table[:, :1])


def _buckets(order: list[int], padded: list[int]) -> list[list[int]]:
    """Split sequences sorted by descending padded length into runs that minimise
    Σ (bucket cost + run size · the run's first (longest) length)."""
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + _BUCKET_COST_POSITIONS + (end - start) * padded[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs = []
    end = n
    while end:
        runs.append(order[cut[end] : end])
        end = cut[end]
    return runs[::-1]
