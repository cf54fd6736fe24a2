"""Paged KV cache: fixed-size blocks handed out from a free list, one block table per sequence."""

from __future__ import annotations

from collections import deque

import torch


class OutOfBlocks(RuntimeError):
    """No free block is left; the scheduler preempts a sequence and tries again."""


class BlockManager:
    """Book-keeping only: which blocks are free and how many owners each has."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise the KV memory budget")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} KV blocks wanted, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if self._refs[block] <= 0:
                raise RuntimeError(f"KV block {block} freed twice")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend a sequence's block table in place so that it holds num_tokens tokens."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))


class KVCache:
    """The K and V tensors of every layer: [num_blocks, block_size, kv_heads, head_dim] views each.

    In memory a block is head-major ([kv_heads, block_size, head_dim]): each head's run of positions
    is contiguous, so the torch attention twin gathers whole (block, head) rows straight into the
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
