"""Builders shared by the kernel suite: a backend by name, and paged attention batches."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.cpu import build

BACKENDS = ["native", "triton", "torch"]  # every fast path; kernels.reference is the specification


def backend(name: str, device: torch.device) -> kernels.Backend:
    """The backend `name` for tensors on `device` (the suite's device for Triton and torch); skips
    the test where the native kernels cannot run (CUDA tensors, no C compiler)."""
    if name == "native":
        if device.type != "cpu":
            pytest.skip("the native kernels run on CPU tensors")
        if not build.available():
            pytest.skip("no C compiler: the native kernels cannot build on this machine")
    return kernels.backend(name, device)


def make_paged_batch(spec, block_size, n_kv_heads, group, head_dim, dtype, device, seed=0, head_major=False):
    """Sequences (context length including this step, query length) over a shuffled paged cache:
    blocks in random order with holes between them, every position outside a context NaN, unused
    block-table entries -1 or 0. `head_major`: the engine's layout ([blocks, kv_heads, block_size,
    head_dim] in memory, seen as [blocks, block_size, kv_heads, head_dim])."""
    generator = torch.Generator().manual_seed(seed)
    needed = [math.ceil(length / block_size) for length, _ in spec]
    num_blocks = sum(needed) * 2 + 3  # unused blocks are holes between the used ones
    physical = torch.randperm(num_blocks, generator=generator)  # shuffled block order
    max_blocks = max(needed, default=0) + 2
    block_tables = torch.empty(len(spec), max_blocks, dtype=torch.int32)
    for b in range(len(spec)):
        block_tables[b] = -1 if b % 2 else 0  # unused entries hold anything
    shape = (num_blocks, block_size, n_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))  # everything not part of a context is poison
    v_cache = torch.full(shape, float("nan"))
    used = 0
    for b, (length, _) in enumerate(spec):
        blocks = physical[used : used + 2 * needed[b] : 2]  # every other block: holes
        used += 2 * needed[b]
        block_tables[b, : needed[b]] = blocks.to(torch.int32)
        for p in range(length):
            block, offset = int(blocks[p // block_size]), p % block_size
            k_cache[block, offset] = torch.randn(n_kv_heads, head_dim, generator=generator)
            v_cache[block, offset] = torch.randn(n_kv_heads, head_dim, generator=generator)
    q_lens = [q_len for _, q_len in spec]
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), n_kv_heads * group, head_dim, generator=generator)
    seq_lens = torch.tensor([length for length, _ in spec], dtype=torch.int32)
    to = dict(device=device, dtype=dtype)
    if head_major:
        k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
    return (
        q.to(**to),
        k_cache.to(**to),
        v_cache.to(**to),
        block_tables.to(device),
        seq_lens.to(device),
        query_start_loc.to(device),
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double().cpu(), expected.double().cpu()
    if e.numel() == 0:
        return 0.0
    return float((a - e).norm() / e.norm().clamp_min(1e-30))
