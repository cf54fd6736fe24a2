"""Paged attention and store_kv: the specification, the torch backend (length buckets, SDPA) and
the Triton kernels against dense causal attention on K/V gathered position by position."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.cpu import attention, attention_plan
from tests.kernels.cases import backend, make_paged_batch, relative_error

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (context length including this step, query length): decode has q_len 1, a fresh prefill
# has q_len == context, a chunked prefill attends to a paged prefix as well.
BATCHES = {
    "mixed": [(37, 1), (23, 23), (50, 13), (1, 1), (16, 1), (9, 4)],
    "decode": [(5, 1), (33, 1), (17, 1), (1, 1), (48, 1)],
    "prefill": [(29, 29)],
    "chunked": [(41, 7), (12, 12)],
}


def dense_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """Gather each sequence's K/V one position at a time, then plain causal softmax attention."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        rows = [(int(block_tables[b, p // block_size]), p % block_size) for p in range(length)]
        keys = torch.stack([k_cache[blk, off] for blk, off in rows]).float().repeat_interleave(group, dim=1)
        values = torch.stack([v_cache[blk, off] for blk, off in rows]).float().repeat_interleave(group, dim=1)
        queries = q[starts[b] : starts[b + 1]].float()
        q_len = queries.shape[0]
        scores = torch.einsum("qhd,khd->hqk", queries.cpu(), keys.cpu()) * scale
        q_pos = torch.arange(q_len) + length - q_len
        scores = scores.masked_fill(torch.arange(length)[None, :] > q_pos[:, None], float("-inf"))
        out[starts[b] : starts[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.cpu())
    return out


@pytest.mark.parametrize("layout", ["contiguous", "head-major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_paged_attention(batch, group, dtype, layout, device):
    block_size, n_kv_heads, head_dim = 16 if group == 3 else 5, 2, 24
    inputs = make_paged_batch(BATCHES[batch], block_size, n_kv_heads, group, head_dim, dtype, device,
                              head_major=layout == "head-major")
    assert attention_plan.is_head_major(inputs[1]) == (layout == "head-major")
    scale = head_dim**-0.5
    want = dense_attention(*inputs, scale)
    spec = reference.paged_attention(*inputs, scale)
    twin = backend("torch", device).paged_attention(*inputs, scale)
    fast = backend("triton", device).paged_attention(*inputs, scale)
    for out in (spec, twin, fast):
        assert out.dtype == dtype and out.shape == inputs[0].shape
        assert not torch.isnan(out).any()
    tolerance = TOLERANCE[dtype]
    assert relative_error(spec, want) <= tolerance
    assert relative_error(twin, want) <= tolerance
    assert relative_error(fast, twin) <= tolerance
    assert relative_error(fast, want) <= tolerance


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64)])
def test_paged_attention_tile_sizes(block_m, block_n, device):
    inputs = make_paged_batch(BATCHES["mixed"], 8, 2, 3, 20, torch.float32, device, seed=1)
    backend("triton", device)  # Triton importable here
    from kernels.triton import attention

    fast = attention.paged_attention(*inputs, 0.3, block_m=block_m, block_n=block_n)
    assert relative_error(fast, dense_attention(*inputs, 0.3)) <= 1e-5


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
def test_paged_attention_empty_batch(impl, device):
    be = backend(impl, device)
    q = torch.empty(0, 4, 16, device=device)
    cache = torch.zeros(3, 2, 16, 16, device=device).transpose(1, 2)  # head-major: the native layout
    empty = torch.empty(0, 4, dtype=torch.int32, device=device)
    no_seqs = torch.empty(0, dtype=torch.int32, device=device)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    out = be.paged_attention(q, cache, cache, empty, no_seqs, zero, 0.25)
    assert out.shape == (0, 4, 16)


def test_decode_lengths_far_apart_form_buckets(device):
    """Decode sequences of very different lengths are padded per bucket, not to the longest one;
    the result must not depend on how they were split."""
    lengths = [3, 290, 41, 7, 260, 130, 1, 77, 300, 12, 150, 33, 200, 5, 64, 280]
    inputs = make_paged_batch([(n, 1) for n in lengths], 16, 2, 3, 16, torch.float32, device, seed=2,
                              head_major=True)
    want = dense_attention(*inputs, 0.2)
    out = attention.paged_attention(*inputs, 0.2)
    buckets = attention._last_plan.decode
    assert len(buckets) > 1
    assert sorted(r for b in buckets for r in b.q_rows.tolist()) == list(range(len(lengths)))
    padded = sum(b.count * b.length for b in buckets)
    assert padded < len(lengths) * 304  # less padding than one bucket of the longest length
    assert not torch.isnan(out).any() and relative_error(out, want) <= 1e-5
    assert attention_plan.is_head_major(inputs[1])


@pytest.mark.parametrize("layout", ["contiguous", "head-major"])
@pytest.mark.parametrize("impl", ["reference", "torch", "triton", "native"])
def test_store_kv_then_attend(impl, layout, device):
    """store_kv writes where the block table says; padding slots (-1) are skipped."""
    store = reference.store_kv if impl == "reference" else backend(impl, device).store_kv
    num_blocks, block_size, n_kv_heads, head_dim = 6, 4, 2, 12
    k_cache = torch.zeros(num_blocks, block_size, n_kv_heads, head_dim, device=device)
    if layout == "head-major":
        k_cache = k_cache.transpose(1, 2).contiguous().transpose(1, 2)
    v_cache = torch.zeros_like(k_cache)
    # k and v as views of one fused projection output, as the model produces them.
    fused = torch.randn(7, 3, n_kv_heads, head_dim, device=device)
    k, v = fused[:, 1], fused[:, 2]
    slot_mapping = torch.tensor([5 * 4 + 1, 2 * 4 + 3, -1, 0, 5 * 4 + 2, 3 * 4 + 0, -1], device=device)
    store(k, v, k_cache, v_cache, slot_mapping)
    want_k = torch.zeros_like(k_cache)
    want_v = torch.zeros_like(v_cache)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            want_k[slot // block_size, slot % block_size] = k[t]
            want_v[slot // block_size, slot % block_size] = v[t]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)],
    ids=str,
)
def test_store_kv_half_cache(dtype, cache_dtype, device):
    # (fp32 -> bf16 is left out: the interpreter truncates where CUDA rounds to nearest.)
    k = torch.randn(5, 2, 16, device=device).to(dtype)
    cache = [torch.zeros(4, 8, 2, 16, dtype=cache_dtype, device=device) for _ in range(6)]
    slots = torch.tensor([3, 9, 17, 30, 31], device=device)
    reference.store_kv(k, -k, cache[0], cache[1], slots)
    backend("triton", device).store_kv(k, -k, cache[2], cache[3], slots)
    backend("torch", device).store_kv(k, -k, cache[4], cache[5], slots)
    assert torch.equal(cache[0], cache[2]) and torch.equal(cache[1], cache[3])
    assert torch.equal(cache[0], cache[4]) and torch.equal(cache[1], cache[5])
    assert torch.equal(cache[0].view(-1, 2, 16)[slots], k.to(cache_dtype))
