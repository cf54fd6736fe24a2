"""Triton multi-LoRA kernels (SGMV-style): shrink `x Aᵀ` and expand `base += s · y Bᵀ`.

The grid runs over tiles of at most `TILE_M` tokens that never cross a slot segment
(`LoraMeta.tiles`), so each program loads one adapter's weight tile once for up to 16
tokens: a prefill run of one adapter reads its weights once per 16 tokens, a decode batch
reads each distinct adapter once. Each slot is computed at its own rank (the rank loop and
the rank mask stop at `ranks[slot]`), and rows/columns past the rank are never loaded.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.meta import TILE_M, LoraMeta


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fp32_dot(*dtypes: torch.dtype) -> bool:
    # The interpreter has no bf16 dot, fp32 inputs must not silently drop to tf32, and
    # tensor-core dots need both operands in one half dtype.
    return _interpreting() or len(set(dtypes)) > 1 or dtypes[0] == torch.float32


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, sorted_ids_ptr, tiles_ptr, ranks_ptr,
    in_features,
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_yt, stride_yr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    rank = tl.load(ranks_ptr + slot)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:  # this rank block is past the slot's rank: y stays 0 there
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tokens = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar
    x_base = x_ptr + tokens[:, None] * stride_xt

    k_span = tl.cdiv(in_features, SPLIT_K * BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_span
    k_end = tl.minimum(k_begin + k_span, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        x_tile = tl.load(x_base + ks[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a_tile = tl.load(a_base + ks[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if FP32_DOT:
            acc += tl.dot(x_tile.to(tl.float32), a_tile.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x_tile, a_tile)  # fp16/bf16 tensor cores, fp32 accumulation
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + offs_r[None, :] * stride_yr
    out_mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=out_mask)


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, base_ptr, sorted_ids_ptr, tiles_ptr, ranks_ptr, scalings_ptr,
    out_features,
    stride_yt, stride_yr,
    stride_bs, stride_bn, stride_br,
    stride_ot, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    FP32_DOT: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    rank = tl.load(ranks_ptr + slot)
    scaling = tl.load(scalings_ptr + slot)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    tokens = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn
    y_base = y_ptr + tokens[:, None] * stride_yt

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # stops at this slot's own rank
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        y_tile = tl.load(
            y_base + offs_r[None, :] * stride_yr, mask=m_mask[:, None] & r_mask[None, :], other=0.0
        )
        b_tile = tl.load(
            b_base + offs_r[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :], other=0.0
        )
        if FP32_DOT:
            acc += tl.dot(y_tile.to(tl.float32), b_tile.to(tl.float32), input_precision="ieee")
        else:
            # Tensor cores want both operands in the weight dtype (as punica/vLLM do).
            acc += tl.dot(y_tile.to(b_tile.dtype), b_tile)
    out_ptrs = base_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    # Each (token, column) belongs to exactly one program, so a plain read-modify-write is safe.
    base = tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + acc * scaling).to(base.dtype), mask=out_mask)


def _block_r(max_rank: int) -> int:
    return 16 if max_rank <= 16 else 32


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    meta: LoraMeta,
    *,
    split_k: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Triton twin of `kernels.reference.lora_shrink`; `split_k`/`block_k` are tuning overrides."""
    num_tokens, in_features = x.shape
    max_rank = lora_a.shape[1]
    if meta.max_rank > max_rank:
        raise ValueError(f"lora_shrink: a slot has rank {meta.max_rank} > lora_a's {max_rank} rows")
    y = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if not meta.has_lora:
        return y
    block_r = _block_r(meta.max_rank)
    r_blocks = triton.cdiv(meta.max_rank, block_r)
    block_k = block_k or (64 if _interpreting() else 128)
    if split_k is None:
        # Decode batches have few tiles and a long reduction: split it so every SM has work.
        # Powers of two only, so that a serving run compiles a handful of variants.
        programs = meta.num_tiles * r_blocks
        want = min(2 * _sm_count(x.device) // max(programs, 1), triton.cdiv(in_features, 4 * block_k), 16)
        split_k = 1 << max(want, 1).bit_length() - 1
    grid = (meta.num_tiles, r_blocks, split_k)
    _shrink_kernel[grid](
        x, lora_a, y, meta.sorted_token_ids, meta.tiles, meta.ranks,
        in_features,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=TILE_M, BLOCK_R=block_r, BLOCK_K=block_k,
        SPLIT_K=split_k, FP32_DOT=_fp32_dot(x.dtype, lora_a.dtype),
    )  # fmt: skip
    return y


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraMeta,
    base: torch.Tensor,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton twin of `kernels.reference.lora_expand` (in place on base, returns it)."""
    out_features = lora_b.shape[1]
    if not meta.has_lora:
        return base
    block_n = block_n or 64
    grid = (meta.num_tiles, triton.cdiv(out_features, block_n))
    _expand_kernel[grid](
        y, lora_b, base, meta.sorted_token_ids, meta.tiles, meta.ranks, meta.scalings,
        out_features,
        y.stride(0), y.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        base.stride(0), base.stride(1),
        BLOCK_M=TILE_M, BLOCK_N=block_n, BLOCK_R=16,
        FP32_DOT=_fp32_dot(lora_b.dtype, base.dtype),  # fp32 sums stay fp32 over half weights
    )  # fmt: skip
    return base
