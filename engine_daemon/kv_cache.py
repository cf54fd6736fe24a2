"""Paged KV cache: fixed-size blocks handed out from a free list, one block table per sequence.

With prefix caching, a full block whose K/V are computed is registered under a hash of its
contents (``prefix_cache.block_hashes``). A later sequence whose prompt starts with the same
blocks attaches them (one more owner each) instead of computing them again. A cached block that
loses its last owner is not freed but kept, least recently used first, and only reclaimed when
an allocation finds the free list empty: "free" counts those blocks too.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch


class OutOfBlocks(RuntimeError):
    """No free block is left; the scheduler preempts a sequence and tries again."""


class BlockManager:
    """Book-keeping only: which blocks are free, how many owners each has, which are cached."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise the KV memory budget")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks  # a cached block's content hash
        self._cached: dict[bytes, int] = {}  # content hash -> block
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks without an owner, LRU first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, owned or idle."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise OutOfBlocks(f"{count} KV blocks wanted, {self.num_free} free")
        blocks = [self._free.popleft() if self._free else self._reclaim() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def _reclaim(self) -> int:
        """The least recently used idle cached block, forgotten by the cache."""
        block, _ = self._idle.popitem(last=False)
        del self._cached[self._hash_of[block]]
        self._hash_of[block] = None
        return block

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if self._refs[block] <= 0:
                raise RuntimeError(f"KV block {block} freed twice")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._idle[block] = None

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend a sequence's block table in place so that it holds num_tokens tokens."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))

    # ---- prefix cache ------------------------------------------------------------------------

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (not yet attached)."""
        blocks = []
        for digest in hashes:
            block = self._cached.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def attach(self, blocks: list[int]) -> None:
        """One more owner for each of these cached blocks."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1

    def register(self, block: int, digest: bytes) -> None:
        """Cache a full, computed block under its content hash (kept as it is if either is known)."""
        if self._hash_of[block] is None and digest not in self._cached:
            self._hash_of[block] = digest
            self._cached[digest] = block


class KVCache:
    """The K and V tensors of every layer: [num_blocks, block_size, kv_heads, head_dim] views each.

    In memory a block is head-major ([kv_heads, block_size, head_dim]): each head's run of positions
    is contiguous, so the torch attention gathers whole (block, head) rows straight into the
    [seqs, kv_heads, length, head_dim] layout its matmuls read. The Triton kernels take any strides.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [
            (self.storage[i, 0].transpose(1, 2), self.storage[i, 1].transpose(1, 2)) for i in range(num_layers)
        ]
        self.blocks = BlockManager(num_blocks, block_size)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K/V of each (source, destination) block, every layer, in one indexed copy."""
        if pairs:
            sources, destinations = (torch.tensor(column, device=self.storage.device) for column in zip(*pairs, strict=True))
            self.storage[:, :, destinations] = self.storage[:, :, sources]
