"""Triton paged attention (decode and chunked prefill in one kernel, GQA) and store_kv.

One program handles a tile of queries of one sequence for one KV head and *all* the query heads
that read it, packed into the rows of the tile: row r is query r // Q_PER_KV of the tile, head
kv_head * Q_PER_KV + r % Q_PER_KV. A decode step therefore reads each KV block once per
KV head, not once per query head. Keys are walked through the block table BLOCK_N positions
at a time, so any block size works; the softmax runs online in fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Not specialized on the batch's sequence count or the block size: Triton would otherwise compile
# a variant for each value that is 1 or a multiple of 16, on the step thread, mid-serving.
@triton.jit(do_not_specialize=["num_seqs", "block_size"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale, num_seqs, block_size,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Sequence b owns programs [qsl[b] // BLOCK_Q + b, qsl[b + 1] // BLOCK_Q + b + 1): always
    # enough for its ceil(q_len / BLOCK_Q) tiles, and computable without a host sync.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q0 = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q0 >= q_len:
        return
    context_len = tl.load(seq_lens_ptr + seq)
    prefix = context_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q0 + rows // Q_PER_KV
    heads = kv_head * Q_PER_KV + rows % Q_PER_KV
    row_mask = (rows < BLOCK_Q * Q_PER_KV) & (q_idx < q_len)
    q_pos = prefix + q_idx
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_tokens = (q_start + q_idx).to(tl.int64)
    q_tile = tl.load(
        q_ptr + q_tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FP32_DOT:
        q_tile = q_tile.to(tl.float32)

    # Keys this tile can see: up to the position of its last query.
    kv_end = prefix + tl.minimum(q0 + BLOCK_Q, q_len)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + offs_n
        pos_mask = pos < kv_end
        blocks = tl.load(table_row + pos // block_size, mask=pos_mask, other=0).to(tl.int64)
        offsets_in_block = pos % block_size
        k_tile = tl.load(
            k_cache_ptr
            + blocks[None, :] * stride_kb
            + offsets_in_block[None, :] * stride_ks
            + kv_head * stride_kh
            + offs_d[:, None] * stride_kd,
            mask=pos_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        v_tile = tl.load(
            v_cache_ptr
            + blocks[:, None] * stride_vb
            + offsets_in_block[:, None] * stride_vs
            + kv_head * stride_vh
            + offs_d[None, :] * stride_vd,
            mask=pos_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if FP32_DOT:
            scores = tl.dot(q_tile, k_tile.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(q_tile, k_tile)
        visible = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v_tile.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton twin of `kernels.reference.paged_attention`; block sizes are tuning overrides."""
    num_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    n_kv_heads = k_cache.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"paged_attention: {n_heads} query heads is not a multiple of {n_kv_heads} kv heads")
    q_per_kv = n_heads // n_kv_heads
    # Decode-only batches need only one query per tile; prefill wants taller tiles.
    decode_only = num_tokens == num_seqs
    if block_m is None:
        block_m = (
            triton.next_power_of_2(max(16, q_per_kv)) if decode_only else max(64, triton.next_power_of_2(q_per_kv))
        )
    block_q = block_m // q_per_kv
    if block_q < 1:
        raise ValueError(f"paged_attention: block_m={block_m} is smaller than the {q_per_kv} query heads per KV head")
    block_n = block_n or (32 if _interpreting() else 64)
    fp32_dot = _interpreting() or q.dtype == torch.float32 or k_cache.dtype != q.dtype
    grid = (num_tokens // block_q + num_seqs, n_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, seq_lens, query_start_loc,
        float(scale), num_seqs, k_cache.shape[1],
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), Q_PER_KV=q_per_kv,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, FP32_DOT=fp32_dot,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["block_size"])
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, block_size,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ckb, stride_cks, stride_ckh, stride_ckd,
    stride_cvb, stride_cvs, stride_cvh, stride_cvd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // block_size
    offset = slot % block_size
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + offs_d * stride_kd, mask=d_mask)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + offs_d * stride_vd, mask=d_mask)
    k_dst = k_cache_ptr + block * stride_ckb + offset * stride_cks + head * stride_ckh + offs_d * stride_ckd
    v_dst = v_cache_ptr + block * stride_cvb + offset * stride_cvs + head * stride_cvh + offs_d * stride_cvd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=d_mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=d_mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of `kernels.reference.store_kv`."""
    num_tokens, n_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, n_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
