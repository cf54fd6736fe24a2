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

from kernels.attention_plan import AttentionPlan, is_head_major
from kernels.lora_plan import DirectRun, LoraCpuPlan
from kernels.meta import LoraMeta


def _check_lora_shapes(x: torch.Tensor, weight: torch.Tensor, meta: LoraMeta, what: str) -> None:
    if x.shape[0] != meta.num_tokens:
        raise ValueError(
            f"{what}: batch has {x.shape[0]} tokens but LoraMeta was built for {meta.num_tokens}"
        )
    if weight.shape[0] != meta.num_slots:
        raise ValueError(f"{what}: weights have {weight.shape[0]} slots but LoraMeta has {meta.num_slots}")


def check_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> None:
    """The shrink contract every implementation enforces: one row per token, one stack per slot,
    every slot's rank within the stack."""
    _check_lora_shapes(x, lora_a, meta, "lora_shrink")
    if meta.max_rank > lora_a.shape[1]:
        raise ValueError(f"lora_shrink: a slot has rank {meta.max_rank} > lora_a's {lora_a.shape[1]} rows")


def check_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> None:
    """The expand contract: y and base have one row per token, base one column per B output."""
    _check_lora_shapes(y, lora_b, meta, "lora_expand")
    if base.shape[0] != meta.num_tokens or base.shape[1] != lora_b.shape[1]:
        raise ValueError(
            f"lora_expand: base is {tuple(base.shape)}, expected [{meta.num_tokens}, {lora_b.shape[1]}]"
        )


def check_apply(x: torch.Tensor, lora_a: torch.Tensor, parts: list, meta: LoraMeta) -> None:
    """A projection group's contract, all of it before any output changes: the stacked shrink
    (rank r → r · parts rows) and every part's expand."""
    check_shrink(x, lora_a, meta.scaled_ranks(len(parts)) if len(parts) > 1 else meta)
    for part in parts:
        if part is not None:
            check_expand(x, part[0], meta, part[1])


# Below this many tokens a matmul is tiny: waking a second CPU thread for it costs several times
# the arithmetic (measured 7 us on one thread vs 29 us on two for 4x576x64).
_THREADED_TOKENS = 64


@contextlib.contextmanager
def _one_thread_if(small: bool) -> Iterator[None]:
    threads = torch.get_num_threads()
    if not small or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """y[t, :rank] = x[t] @ A[slot]ᵀ[:, :rank] in fp32; other entries of y are 0."""
    check_shrink(x, lora_a, meta)
    max_rank = lora_a.shape[1]
    y = torch.zeros(meta.num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if not meta.has_lora:
        return y
    plan = meta.cpu_plan
    if plan is not None:
        padded = torch.zeros(plan.padded_rows, max_rank, dtype=torch.float32, device=x.device)
        for group in plan.groups:
            count, width, rank = group.count, group.width, group.rank
            if group.row_start is not None:
                rows = slice(group.row_start, group.row_start + count * width)
                xs, dest = x[rows], y[rows, :rank]
            else:
                rows = slice(group.offset, group.offset + count * width)
                xs, dest = x.index_select(0, group.gather_rows), padded[rows, :rank]
            ys = torch.bmm(xs.float().view(count, width, -1), group.slots(lora_a)[:, :rank].float().transpose(1, 2))
            dest.copy_(ys.view(-1, rank))
        if plan.padded_rows:
            _gather_back(padded, plan, y)
        shrink_direct_runs(x, lora_a, plan.direct, y)
        return y
    # Gather the adapter tokens once; every segment is then a contiguous slice.
    x_sorted = x.index_select(0, meta.sorted_token_ids).float()
    y_sorted = torch.zeros(x_sorted.shape[0], max_rank, dtype=torch.float32, device=x.device)
    for start, end, slot, rank, _ in meta.segments:
        y_sorted[start:end, :rank] = x_sorted[start:end] @ lora_a[slot, :rank].float().t()
    y.index_copy_(0, meta.sorted_token_ids, y_sorted)
    return y


def shrink_direct_runs(x: torch.Tensor, lora_a: torch.Tensor, runs: tuple[DirectRun, ...], y: torch.Tensor) -> None:
    """Long single-slot runs of a plan (prefill chunks): one matmul each, on views of x and y."""
    for run in runs:
        with _one_thread_if(run.end - run.start < _THREADED_TOKENS):
            torch.matmul(x[run.start : run.end].float(), lora_a[run.slot, : run.rank].float().t(),
                         out=y[run.start : run.end, : run.rank])


def expand_direct_runs(y: torch.Tensor, lora_b: torch.Tensor, runs: tuple[DirectRun, ...], base: torch.Tensor) -> None:
    """Long single-slot runs of a plan: base rows += scaling · y B, one addmm each."""
    for run in runs:
        rows, ys, weight = base[run.start : run.end], y[run.start : run.end, : run.rank], lora_b[run.slot, :, : run.rank]
        with _one_thread_if(run.end - run.start < _THREADED_TOKENS):
            if base.dtype == torch.float32:
                rows.addmm_(ys, weight.float().t(), alpha=run.scaling)
            else:  # accumulate in fp32, round once into the half-precision base
                rows.copy_(torch.addmm(rows.float(), ys, weight.float().t(), alpha=run.scaling))


def _gather_back(padded: torch.Tensor, plan: LoraCpuPlan, dest: torch.Tensor, add: bool = False) -> None:
    """Bring the groups' rows of `padded` back to batch order in `dest` (adding to it when `add`)."""
    rows = padded.index_select(0, plan.padded_positions)
    if plan.groups_cover_batch:  # the usual decode step: one dense op, no scatter
        if not add:
            dest.copy_(rows)
        elif dest.dtype == torch.float32:
            dest.add_(rows)
        else:  # accumulate in fp32, round once into the half-precision base
            dest.copy_(dest.float() + rows)
        return
    if add:
        rows = dest.index_select(0, plan.group_rows).float() + rows
    dest.index_copy_(0, plan.group_rows, rows.to(dest.dtype))


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
    """base[t] += scaling[slot] * y[t, :rank] @ B[slot][:, :rank]ᵀ, in place; returns base."""
    check_expand(y, lora_b, meta, base)
    if not meta.has_lora:
        return base
    y = y.float()
    plan = meta.cpu_plan
    if plan is not None:
        exact = base.dtype == torch.float32
        expand_direct_runs(y, lora_b, plan.direct, base)
        if not plan.groups:
            return base
        padded = torch.empty(plan.padded_rows, base.shape[1], dtype=torch.float32, device=base.device)
        for group in plan.groups:
            rank, count, width = group.rank, group.count, group.width
            in_place = group.row_start is not None
            if in_place:
                rows = slice(group.row_start, group.row_start + count * width)
                # Contiguous: bmm on a strided batch falls back to one matmul per slot.
                ys = y[rows, :rank].contiguous().view(count, width, rank)
            else:
                ys = y[:, :rank].index_select(0, group.gather_rows).view(count, width, rank)
            if group.scalings is not None:
                ys = ys * group.scalings
            weights = group.slots(lora_b)[:, :, :rank].float().transpose(1, 2)
            if in_place:
                delta = torch.bmm(ys, weights).view(count * width, -1)
                if exact:
                    base[rows].add_(delta)
                else:
                    base[rows] = base[rows].float() + delta
            else:
                torch.bmm(ys, weights, out=padded[group.offset : group.offset + count * width].view(count, width, -1))
        if plan.padded_rows:
            _gather_back(padded, plan, base, add=True)
        return base
    # Accumulate in fp32 on a gathered copy, then write back once: one rounding per element.
    ids = meta.sorted_token_ids
    y_sorted = y.index_select(0, ids)
    acc = base.index_select(0, ids).float()
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
    """Causal attention of each sequence's queries over its paged context (GQA, fp32 softmax).

    Sequence b's i-th query sits at position seq_lens[b] - q_len_b + i and sees positions <= it.
    """
    num_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    _, block_size, kv_heads, _ = k_cache.shape
    if n_heads % kv_heads:
        raise ValueError(f"paged_attention: {n_heads} query heads is not a multiple of {kv_heads} kv heads")
    group = n_heads // kv_heads
    head_major = is_head_major(k_cache) and is_head_major(v_cache)
    plan = plan_for(block_tables, seq_lens, query_start_loc, block_size, kv_heads, head_major)

    for bucket in plan.decode:
        n, length = bucket.count, bucket.length
        keys = _context(k_cache, bucket.gather_rows, bucket.slots, n, length)  # [n, Hkv, L, D]
        values = _context(v_cache, bucket.gather_rows, bucket.slots, n, length)
        if bucket.invalid_rows is not None:  # past a sequence's end: anything, even NaN (NaN - inf = NaN)
            keys.view(-1, head_dim).index_fill_(0, bucket.invalid_rows, 0.0)
            values.view(-1, head_dim).index_fill_(0, bucket.invalid_rows, 0.0)
        # Query head h reads kv head h // group (HF's repeat_kv order): each kv head's G query heads
        # form its "query length", so one fused SDPA call (12% faster than matmul-softmax-matmul
        # here) serves the whole bucket.
        queries = q.index_select(0, bucket.q_rows).float().view(n, kv_heads, group, head_dim)
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
