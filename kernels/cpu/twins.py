"""The torch backend's fast paths on CPU: LoRA by the step's plan (``lora_plan``), attention by
length buckets (``attention_plan``), with `kernels.reference`'s signatures and results.

They serve where the native kernels cannot (no C compiler, half-precision activations), and the
native backend reuses their direct runs and prefill attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernels.cpu.attention_plan import AttentionPlan, is_head_major
from kernels.cpu.lora_plan import DirectRun, LoraPlan
from kernels.meta import LoraMeta
from kernels.reference import check_expand, check_shrink

# Below this many tokens a matmul is tiny: waking a second CPU thread for it costs several times
# the arithmetic.
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


def _torch_plan(what: str, meta: LoraMeta) -> LoraPlan:
    """The meta's torch plan; a meta without one (a plain `LoraMeta.build`, or the native backend's,
    whose segments these functions would not read) must not silently drop the LoRA term."""
    plan = meta.plan
    if plan is None or plan.segments is not None:
        raise ValueError(f"{what}: the LoraMeta has no torch plan; build it with the torch backend")
    return plan


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """`kernels.reference.lora_shrink` by the step's plan (`lora_plan.build_torch_plan`)."""
    check_shrink(x, lora_a, meta)
    max_rank = lora_a.shape[1]
    y = torch.zeros(meta.num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if not meta.has_lora:
        return y
    plan = _torch_plan("lora_shrink", meta)
    padded = torch.zeros(plan.padded_rows, max_rank, dtype=torch.float32, device=x.device)
    for batch in plan.batches:
        count, width, rank = batch.count, batch.width, batch.rank
        if batch.row_start is not None:
            rows = slice(batch.row_start, batch.row_start + count * width)
            xs, dest = x[rows], y[rows, :rank]
        else:
            rows = slice(batch.offset, batch.offset + count * width)
            xs, dest = x.index_select(0, batch.gather_rows), padded[rows, :rank]
        ys = torch.bmm(xs.float().view(count, width, -1), batch.slots(lora_a)[:, :rank].float().transpose(1, 2))
        dest.copy_(ys.view(-1, rank))
    if plan.padded_rows:
        _gather_back(padded, plan, y)
    shrink_direct_runs(x, lora_a, plan.direct, y)
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


def _gather_back(padded: torch.Tensor, plan: LoraPlan, dest: torch.Tensor, add: bool = False) -> None:
    """Bring the rank batches' rows of `padded` back to batch order in `dest` (adding when `add`)."""
    rows = padded.index_select(0, plan.padded_positions)
    if plan.batches_cover_all_rows:  # the usual decode step: one dense op, no scatter
        if not add:
            dest.copy_(rows)
        elif dest.dtype == torch.float32:
            dest.add_(rows)
        else:  # accumulate in fp32, round once into the half-precision base
            dest.copy_(dest.float() + rows)
        return
    if add:
        rows = dest.index_select(0, plan.batched_rows).float() + rows
    dest.index_copy_(0, plan.batched_rows, rows.to(dest.dtype))


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
    """`kernels.reference.lora_expand` by the step's plan, in place; returns base."""
    check_expand(y, lora_b, meta, base)
    if not meta.has_lora:
        return base
    y = y.float()
    plan = _torch_plan("lora_expand", meta)
    exact = base.dtype == torch.float32
    expand_direct_runs(y, lora_b, plan.direct, base)
    if not plan.batches:
        return base
    padded = torch.empty(plan.padded_rows, base.shape[1], dtype=torch.float32, device=base.device)
    for batch in plan.batches:
        rank, count, width = batch.rank, batch.count, batch.width
        in_place = batch.row_start is not None
        if in_place:
            rows = slice(batch.row_start, batch.row_start + count * width)
            # Contiguous: bmm on a strided batch falls back to one matmul per slot.
            ys = y[rows, :rank].contiguous().view(count, width, rank)
        else:
            ys = y[:, :rank].index_select(0, batch.gather_rows).view(count, width, rank)
        if batch.scalings is not None:
            ys = ys * batch.scalings
        weights = batch.slots(lora_b)[:, :, :rank].float().transpose(1, 2)
        if in_place:
            delta = torch.bmm(ys, weights).view(count * width, -1)
            if exact:
                base[rows].add_(delta)
            else:
                base[rows] = base[rows].float() + delta
        else:
            torch.bmm(ys, weights, out=padded[batch.offset : batch.offset + count * width].view(count, width, -1))
    if plan.padded_rows:
        _gather_back(padded, plan, base, add=True)
    return base


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
