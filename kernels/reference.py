"""Torch twins of the Triton kernels: same signatures, same semantics.

The CPU engine runs these for real, so they are written for speed in plain torch: one
matmul per adapter segment (from the precomputed `LoraMeta`), one batched attention call
for all decode sequences, no Python loop over tokens or heads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernels.meta import LoraMeta


def _check_lora_shapes(x: torch.Tensor, weight: torch.Tensor, meta: LoraMeta, what: str) -> None:
    if x.shape[0] != meta.num_tokens:
        raise ValueError(
            f"{what}: batch has {x.shape[0]} tokens but LoraMeta was built for {meta.num_tokens}"
        )
    if weight.shape[0] != meta.num_slots:
        raise ValueError(f"{what}: weights have {weight.shape[0]} slots but LoraMeta has {meta.num_slots}")


# Below this many tokens per segment the matmuls are tiny: waking a second CPU thread for each one
# costs several times the arithmetic (measured 7 us on one thread vs 29 us on two for 4x576x64).
_THREADED_TOKENS_PER_SEGMENT = 64


@contextlib.contextmanager
def _cpu_threads_for(meta: LoraMeta, device: torch.device) -> Iterator[None]:
    threads = torch.get_num_threads()
    small = meta.num_lora_tokens < _THREADED_TOKENS_PER_SEGMENT * len(meta.segments)
    if device.type != "cpu" or threads == 1 or not small:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """y[t, :rank] = x[t] @ A[slot]ᵀ[:, :rank] in fp32; other entries of y are 0."""
    _check_lora_shapes(x, lora_a, meta, "lora_shrink")
    max_rank = lora_a.shape[1]
    if meta.max_rank > max_rank:
        raise ValueError(f"lora_shrink: a slot has rank {meta.max_rank} > lora_a's {max_rank} rows")
    y = torch.zeros(meta.num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if not meta.has_lora:
        return y
    if meta.batch_runs is not None:
        with _cpu_threads_for(meta, x.device):
            for start, end, slot, rank, _ in meta.batch_runs:
                torch.matmul(x[start:end].float(), lora_a[slot, :rank].float().t(), out=y[start:end, :rank])
        return y
    # Gather the adapter tokens once; every segment is then a contiguous slice.
    x_sorted = x.index_select(0, meta.sorted_token_ids).float()
    y_sorted = torch.zeros(x_sorted.shape[0], max_rank, dtype=torch.float32, device=x.device)
    with _cpu_threads_for(meta, x.device):
        for start, end, slot, rank, _ in meta.segments:
            y_sorted[start:end, :rank] = x_sorted[start:end] @ lora_a[slot, :rank].float().t()
    y.index_copy_(0, meta.sorted_token_ids, y_sorted)
    return y


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
    """base[t] += scaling[slot] * y[t, :rank] @ B[slot][:, :rank]ᵀ, in place; returns base."""
    _check_lora_shapes(y, lora_b, meta, "lora_expand")
    if base.shape[0] != meta.num_tokens or base.shape[1] != lora_b.shape[1]:
        raise ValueError(
            f"lora_expand: base is {tuple(base.shape)}, expected [{meta.num_tokens}, {lora_b.shape[1]}]"
        )
    if not meta.has_lora:
        return base
    y = y.float()
    if meta.batch_runs is not None and base.dtype == torch.float32:
        with _cpu_threads_for(meta, base.device):
            for start, end, slot, rank, scaling in meta.batch_runs:
                base[start:end].addmm_(y[start:end, :rank], lora_b[slot, :, :rank].float().t(), alpha=scaling)
        return base
    # Accumulate in fp32 on a gathered copy, then write back once: one rounding per element.
    ids = meta.sorted_token_ids
    y_sorted = y.index_select(0, ids)
    acc = base.index_select(0, ids).float()
    with _cpu_threads_for(meta, base.device):
        for start, end, slot, rank, scaling in meta.segments:
            acc[start:end].addmm_(y_sorted[start:end, :rank], lora_b[slot, :, :rank].float().t(), alpha=scaling)
    base.index_copy_(0, ids, acc.to(base.dtype))
    return base


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's K/V rows into the paged cache at flat slot block * block_size + offset.

    Negative slots (padding) are skipped, as in the Triton kernel.
    """
    num_blocks, block_size, n_kv_heads, head_dim = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: the torch path needs contiguous k_cache and v_cache")
    slots = slot_mapping.to(torch.int64)
    if slots.numel() and bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(num_blocks * block_size, n_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, n_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _gather_slots(block_tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Flat cache slots of positions [0, length) for each row of block_tables -> int64 [B, length]."""
    pos = torch.arange(length, device=block_tables.device)
    # Entries past a sequence's end may be -1; clamp so the gather stays in bounds (masked later).
    blocks = block_tables[:, pos // block_size].to(torch.int64).clamp_min(0)
    return blocks * block_size + pos % block_size


def _gather(flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of the flat cache at `slots` (any shape) as a new float32 tensor; index_select is
    about 1.5x faster than advanced indexing for these gathers on CPU."""
    rows = flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat.shape[1:])
    return rows if rows.dtype == torch.float32 else rows.float()


class _AttentionPlan:
    """Index tensors of one step's batch, shared by every layer (the engine passes the same
    block_tables / seq_lens / query_start_loc objects to each layer of a step)."""

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                 block_size: int) -> None:
        self.key = (block_tables, seq_lens, query_start_loc, block_size)
        device = block_tables.device
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=False)]
        decode = [b for b, n in enumerate(q_lens) if n == 1]
        self.decode = bool(decode)
        if decode:
            rows = torch.tensor(decode, device=device)
            length = max(lens[b] for b in decode)
            self.decode_slots = _gather_slots(block_tables[rows], block_size, length)  # [Bd, L]
            self.decode_valid = torch.arange(length, device=device) < seq_lens[rows].unsqueeze(1).to(device)
            self.decode_padded = bool((~self.decode_valid).any())
            self.decode_q_rows = torch.tensor([starts[b] for b in decode], device=device)
        self.prefill = []
        for b, n in enumerate(q_lens):
            if n <= 1:
                continue
            start, end, length = starts[b], starts[b + 1], lens[b]
            slots = _gather_slots(block_tables[b : b + 1], block_size, length)[0]
            prefix = length - (end - start)
            mask = None
            if prefix:
                # Bottom-right aligned causal mask: query i sees the whole prefix plus queries <= i.
                q_pos = prefix + torch.arange(end - start, device=device)
                mask = torch.arange(length, device=device)[None, :] <= q_pos[:, None]
            self.prefill.append((start, end, slots, mask))

    def matches(self, block_tables, seq_lens, query_start_loc, block_size) -> bool:
        key = self.key
        return key[0] is block_tables and key[1] is seq_lens and key[2] is query_start_loc and key[3] == block_size


_last_plan: _AttentionPlan | None = None


def _plan_for(block_tables, seq_lens, query_start_loc, block_size) -> _AttentionPlan:
    global _last_plan
    plan = _last_plan
    if plan is None or not plan.matches(block_tables, seq_lens, query_start_loc, block_size):
        plan = _last_plan = _AttentionPlan(block_tables, seq_lens, query_start_loc, block_size)
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
    """Causal attention of each sequence's queries over its paged context (GQA, fp32 softmax).

    Sequence b's i-th query sits at position seq_lens[b] - q_len_b + i and sees positions <= it.
    """
    num_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    num_blocks, block_size, n_kv_heads, _ = k_cache.shape
    if n_heads % n_kv_heads:
        raise ValueError(f"paged_attention: {n_heads} query heads is not a multiple of {n_kv_heads} kv heads")
    k_flat = k_cache.reshape(num_blocks * block_size, n_kv_heads, head_dim)
    v_flat = v_cache.reshape(num_blocks * block_size, n_kv_heads, head_dim)
    plan = _plan_for(block_tables, seq_lens, query_start_loc, block_size)

    if plan.decode:
        # All single-query sequences in one padded call; the mask hides each one's padding.
        keys = _gather(k_flat, plan.decode_slots)  # [Bd, L, Hkv, D], a fresh tensor
        values = _gather(v_flat, plan.decode_slots)
        if plan.decode_padded:
            # Padding positions read whatever the cache holds there (even NaN): zero them, since
            # a masked score still multiplies its value row (0 * NaN = NaN). In place: the gathered
            # copies are ours, and a second copy of the whole context would double the traffic.
            hide = ~plan.decode_valid[:, :, None, None]
            keys.masked_fill_(hide, 0.0)
            values.masked_fill_(hide, 0.0)
        queries = q[plan.decode_q_rows].float().unsqueeze(2)  # [Bd, H, 1, D]
        o = F.scaled_dot_product_attention(
            queries, keys.permute(0, 2, 1, 3), values.permute(0, 2, 1, 3),
            attn_mask=plan.decode_valid[:, None, None, :], scale=scale, enable_gqa=True,
        )
        out[plan.decode_q_rows] = o.squeeze(2).to(q.dtype)

    for start, end, slots, mask in plan.prefill:
        keys = _gather(k_flat, slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        values = _gather(v_flat, slots).transpose(0, 1).unsqueeze(0)
        queries = q[start:end].transpose(0, 1).float().unsqueeze(0)  # [1, H, q_len, D]
        o = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
        out[start:end] = o[0].transpose(0, 1).to(q.dtype)
    return out
