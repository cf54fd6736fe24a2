"""The torch backend's attention: decode sequences by length bucket, prefill chunks one fused SDPA
call each, over the step's `attention_plan` (`kernels.reference.paged_attention`'s signature and
result); and the KV store of both CPU backends. The native backend reuses the prefill half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu.attention_plan import AttentionPlan, is_head_major


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`kernels.reference.store_kv` as one index_copy_ per cache."""
    num_blocks, block_size, n_kv_heads, head_dim = k_cache.shape
    slots = slot_mapping.to(torch.int64)
    if slots.numel() and bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    if k_cache.is_contiguous() and v_cache.is_contiguous():
        k_cache.view(num_blocks * block_size, n_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(num_blocks * block_size, n_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))
        return
    # Any other layout (the engine's head-major cache): index the (block, offset) pairs of the view.
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


def _context(cache: torch.Tensor, gather_rows: torch.Tensor | None, slots: torch.Tensor | None,
             count: int, length: int) -> torch.Tensor:
    """Gathered context of `count` sequences as a contiguous float32 [count, kv_heads, length, head_dim]."""
    num_blocks, block_size, kv_heads, head_dim = cache.shape
    if gather_rows is not None:  # head-major cache: whole (block, head) rows, already in the right order
        rows = cache.permute(0, 2, 1, 3).reshape(num_blocks * kv_heads, block_size * head_dim)
        context = rows.index_select(0, gather_rows).view(count, kv_heads, -1, head_dim)[:, :, :length]
    else:
        flat = cache.reshape(num_blocks * block_size, kv_heads, head_dim)
        context = flat.index_select(0, slots.reshape(-1)).view(count, -1, kv_heads, head_dim).transpose(1, 2)
    return context.contiguous().float()  # no copy for a float32 head-major decode bucket


_last_plan: AttentionPlan | None = None


def plan_for(block_tables, seq_lens, query_start_loc, block_size, kv_heads, head_major) -> AttentionPlan:
    """The step's attention plan: built by the first layer, reused by the others (same tensors)."""
    global _last_plan
    key = (block_tables, seq_lens, query_start_loc, block_size, kv_heads, head_major)
    plan = _last_plan
    if plan is None or not plan.matches(*key):
        plan = _last_plan = AttentionPlan(*key)
    return plan


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`kernels.reference.paged_attention`: decode sequences by length bucket, prefill chunks
    one fused SDPA call each."""
    num_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    _, block_size, kv_heads, _ = k_cache.shape
    if n_heads % kv_heads:
        raise ValueError(f"paged_attention: {n_heads} query heads is not a multiple of {kv_heads} kv heads")
    q_per_kv = n_heads // kv_heads
    head_major = is_head_major(k_cache) and is_head_major(v_cache)
    plan = plan_for(block_tables, seq_lens, query_start_loc, block_size, kv_heads, head_major)

    for bucket in plan.decode:
        n, length = bucket.count, bucket.length
        keys = _context(k_cache, bucket.gather_rows, bucket.slots, n, length)  # [n, Hkv, L, D]
        values = _context(v_cache, bucket.gather_rows, bucket.slots, n, length)
        if bucket.invalid_rows is not None:  # past a sequence's end: anything, even NaN (NaN - inf = NaN)
            keys.view(-1, head_dim).index_fill_(0, bucket.invalid_rows, 0.0)
            values.view(-1, head_dim).index_fill_(0, bucket.invalid_rows, 0.0)
        # Query head h reads kv head h // q_per_kv (HF's repeat_kv order): those q_per_kv query heads
        # form its "query length", so one fused SDPA call serves the whole bucket.
        queries = q.index_select(0, bucket.q_rows).float().view(n, kv_heads, q_per_kv, head_dim)
        o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bucket.valid[:, None, None, :], scale=scale)
        out.index_copy_(0, bucket.q_rows, o.reshape(n, n_heads, head_dim).to(q.dtype))

    prefill_attention(q, k_cache, v_cache, plan, scale, out)
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                      scale: float, out: torch.Tensor) -> None:
    """The plan's prefill chunks: one fused SDPA call per sequence over its gathered context."""
    for seq in plan.prefill:
        keys = _context(k_cache, seq.gather_rows, seq.slots, 1, seq.length)  # [1, Hkv, L, D]
        values = _context(v_cache, seq.gather_rows, seq.slots, 1, seq.length)
        queries = q[seq.start : seq.end].transpose(0, 1).float().unsqueeze(0)  # [1, H, q_len, D]
        o = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=seq.mask, is_causal=seq.mask is None, scale=scale, enable_gqa=True
        )
        out[seq.start : seq.end] = o[0].transpose(0, 1).to(q.dtype)
