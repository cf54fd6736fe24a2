"""The specification of every kernel: plain torch, read top to bottom, slow on purpose.

Each fast path (``kernels.cpu``, ``kernels.triton``) is tested against these functions, and these
against a per-token loop (tests/kernels). They are also the contracts: ``check_*`` are the shape
rules every path enforces before it changes any output.

- LoRA works on the *segments* of a ``LoraMeta``: the tokens of one adapter slot, in the order
  ``sorted_token_ids`` lists them. Each segment is one matmul at the slot's own rank; tokens with
  no adapter (slot -1) are in no segment and get nothing.
- Attention gathers each sequence's context through its block table and attends causally, the
  softmax in float32.
"""

from __future__ import annotations

import torch

from kernels.meta import LoraMeta


def _check_lora_shapes(x: torch.Tensor, weight: torch.Tensor, meta: LoraMeta, what: str) -> None:
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"{what}: batch has {x.shape[0]} tokens but LoraMeta was built for {meta.num_tokens}")
    if weight.shape[0] != meta.num_slots:
        raise ValueError(f"{what}: weights have {weight.shape[0]} slots but LoraMeta has {meta.num_slots}")


def check_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> None:
    """One row of x per token, one A stack per slot, every slot's rank within the stack."""
    _check_lora_shapes(x, lora_a, meta, "lora_shrink")
    if meta.max_rank > lora_a.shape[1]:
        raise ValueError(f"lora_shrink: a slot has rank {meta.max_rank} > lora_a's {lora_a.shape[1]} rows")


def check_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> None:
    """y and base have one row per token, base one column per output of B."""
    _check_lora_shapes(y, lora_b, meta, "lora_expand")
    if base.shape[0] != meta.num_tokens or base.shape[1] != lora_b.shape[1]:
        raise ValueError(f"lora_expand: base is {tuple(base.shape)}, expected [{meta.num_tokens}, {lora_b.shape[1]}]")


def check_apply(x: torch.Tensor, lora_a: torch.Tensor, parts: list, meta: LoraMeta) -> None:
    """A projection group: the stacked shrink (rank r is r · len(parts) rows) and every part's expand."""
    check_shrink(x, lora_a, meta.scaled_ranks(len(parts)))
    for part in parts:
        if part is not None:
            check_expand(x, part[0], meta, part[1])


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """x [T, in], lora_a [S, R, in] -> y float32 [T, R]: y[t, :rank] = x[t] A[slot]ᵀ, the rest 0."""
    check_shrink(x, lora_a, meta)
    y = torch.zeros(meta.num_tokens, lora_a.shape[1], dtype=torch.float32, device=x.device)
    for start, end, slot, rank, _ in meta.segments:
        rows = meta.sorted_token_ids[start:end]
        y[rows, :rank] = x[rows].float() @ lora_a[slot, :rank].float().t()
    return y


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
    """base [T, out] += scaling[slot] · y[t, :rank] B[slot][:, :rank]ᵀ in place (summed in float32,
    rounded once into base's dtype); returns base."""
    check_expand(y, lora_b, meta, base)
    for start, end, slot, rank, scaling in meta.segments:
        rows = meta.sorted_token_ids[start:end]
        delta = y[rows, :rank].float() @ lora_b[slot, :, :rank].float().t()
        base[rows] = (base[rows].float() + scaling * delta).to(base.dtype)
    return base


def lora_apply(x: torch.Tensor, lora_a: torch.Tensor, parts: list, meta: LoraMeta) -> None:
    """The LoRA term of one projection group, in place: out_i += scaling · (x A_iᵀ) B_iᵀ.

    lora_a [S, R·n, in] stacks the A of the group's n parts interleaved (a slot's row j·n + i is
    part i's rank row j; n = 1 is a plain A). parts[i] is (lora_b [S, out_i, R], out_i [T, out_i])
    or None for a part no adapter of this step adapts (its output is left alone)."""
    check_apply(x, lora_a, parts, meta)
    n = len(parts)
    y = lora_shrink(x, lora_a, meta.scaled_ranks(n))
    per_part = y.view(y.shape[0], y.shape[1] // n, n)  # not -1: a batch may have no tokens
    for i, part in enumerate(parts):
        if part is not None:
            lora_expand(per_part[:, :, i], part[0], meta, part[1])


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, kv_heads, head_dim] into the paged caches [blocks, block_size, kv_heads,
    head_dim] at flat slot block · block_size + offset; negative slots (padding) are skipped."""
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = k[token].to(k_cache.dtype)
            v_cache[slot // block_size, slot % block_size] = v[token].to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence's paged cache, as [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    positions = torch.arange(length, device=cache.device)
    blocks = block_table[positions // block_size].to(torch.int64)
    return cache[blocks, positions % block_size]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged cache -> [T, H, D] in q's dtype.

    Sequence b's queries are rows query_start_loc[b] .. [b + 1]; its context is seq_lens[b] long and
    ends with them, so its i-th query sits at position seq_lens[b] - q_len + i and sees positions <= it.
    Query head h reads KV head h // (H / kv_heads), as HF's repeat_kv does."""
    n_heads, kv_heads = q.shape[1], k_cache.shape[2]
    if n_heads % kv_heads:
        raise ValueError(f"paged_attention: {n_heads} query heads is not a multiple of {kv_heads} kv heads")
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        keys = gather_context(k_cache, block_tables[b], length).float().repeat_interleave(n_heads // kv_heads, dim=1)
        values = gather_context(v_cache, block_tables[b], length).float().repeat_interleave(n_heads // kv_heads, dim=1)
        queries = q[start:end].float()
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        q_positions = torch.arange(length - (end - start), length, device=q.device)
        visible = torch.arange(length, device=q.device)[None, :] <= q_positions[:, None]
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", weights, values).to(q.dtype)
    return out
