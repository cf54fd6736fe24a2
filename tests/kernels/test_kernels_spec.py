"""Issue #17: every fast path (native, Triton, torch on CPU) agrees with the specification in
`kernels.reference` on the suite's awkward shapes, and the specification itself agrees with the
naive per-token loop (plain Python over tokens, heads and positions).

Awkward here: ragged slot segments with -1 tokens interleaved, rank 1 and rank 0 slots and ranks
that are no power of two, an empty batch and one with no adapter token, strided views of x and
of the output, rank-major B, fused parts with one skipped; for attention decode, chunked prefill
over a paged prefix, GQA, ragged shuffled block tables with garbage past each sequence's end,
block sizes that divide nothing, an empty batch. Shapes stay small: Triton runs interpreted on CPU.
The native and torch backends run on CPU tensors (the CPU fast paths) wherever the suite runs,
Triton on the suite's device.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.cases import BACKENDS, backend, make_paged_batch, relative_error

NUM_SLOTS = 6
MAX_RANK = 16
IN_FEATURES = 37
OUT_FEATURES = 29
RANKS = [1, 8, 16, 0, 3, 1]  # slot 3: rank 0, a slot that adds nothing
PART_WIDTHS = [OUT_FEATURES, 11, 20]  # a projection group's parts side by side in one output
SKIPPED_PART = 1

# The batches' token -> slot maps (-1: no adapter).
LORA_CASES = {
    # decode-like: singleton segments, -1 and the rank-0 slot interleaved, a slot coming back
    "ragged": [2, -1, 0, 4, 2, 3, 1, -1, 5, 2, 0, 4, -1],
    "ragged_strided": [2, -1, 0, 4, 2, 3, 1, -1, 5, 2, 0, 4, -1],  # the same over strided views
    # prefill-like runs: a run past the Triton tile (16), a slot coming back later, -1 runs between
    "runs": [2] * 9 + [-1] * 2 + [4] * 5 + [1] * 18 + [2] * 3 + [0],
    "rank1": [0, 5, 0, 0, 5, -1, 5],  # every adapter token at rank 1
    "empty": [],
    "no_adapter": [-1, 3, -1, 3],  # -1 and the rank-0 slot only: no LoRA work at all
}
# Activations / weights. The native kernels take float32 activations only.
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_weights": (torch.float32, torch.bfloat16),  # the engine's lora_dtype=bfloat16 pool
}
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2, "bf16_weights": 1e-5}


def fast_path(impl: str, device: torch.device) -> tuple[kernels.Backend, torch.device]:
    """The backend under test and the device of its tensors: Triton on the suite's, the others on CPU."""
    device = device if impl == "triton" else torch.device("cpu")
    return backend(impl, device), device


def backend_cases() -> list[tuple[str, str]]:
    """(backend, dtype id) pairs: every backend at every dtype it serves (native: float32 activations)."""
    return [(b, d) for b in BACKENDS for d, (activations, _) in DTYPES.items()
            if b != "native" or activations == torch.float32]


def lora_case(name: str, dtype: str, device: torch.device):
    """One batch: slots, ranks, scalings, x [T, in], A [S, R, in], B [S, out, R], base [T, out],
    fused A [S, R·3, in] over the group's parts and their B. NaN past each slot's rank (never to
    be read) and in the rows of tokens without LoRA work (never to be written)."""
    activations, weights = DTYPES[dtype]
    slots = LORA_CASES[name]
    tokens = len(slots)
    generator = torch.Generator().manual_seed(17 + tokens)
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    scalings = torch.rand(NUM_SLOTS, generator=generator) * 2 + 0.25

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=generator) * std

    x = randn(tokens, IN_FEATURES)
    lora_a = randn(NUM_SLOTS, MAX_RANK, IN_FEATURES, std=IN_FEATURES**-0.5)
    lora_b = randn(NUM_SLOTS, OUT_FEATURES, MAX_RANK, std=MAX_RANK**-0.5)
    fused_a = randn(NUM_SLOTS, MAX_RANK, len(PART_WIDTHS), IN_FEATURES, std=IN_FEATURES**-0.5)
    part_b = [randn(NUM_SLOTS, w, MAX_RANK, std=MAX_RANK**-0.5) for w in PART_WIDTHS]
    base = randn(tokens, sum(PART_WIDTHS))
    for slot, rank in enumerate(RANKS):
        lora_a[slot, rank:] = fused_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
        for b in part_b:
            b[slot, :, rank:] = float("nan")
    idle = torch.tensor([s < 0 or RANKS[s] == 0 for s in slots], dtype=torch.bool)
    base[idle] = float("nan")

    strided = name.endswith("strided")
    x, base = x.to(activations), base.to(activations)
    lora_a, lora_b, fused_a = lora_a.to(weights), lora_b.to(weights), fused_a.to(weights)
    part_b = [b.to(weights) for b in part_b]
    if strided:
        # x a column slice of a wider buffer; B the engine's rank-major pool ([S, R, out] in memory).
        wide = torch.zeros(tokens, IN_FEATURES + 9, dtype=activations)
        wide[:, 4 : 4 + IN_FEATURES] = x
        x = wide[:, 4 : 4 + IN_FEATURES]
        lora_b = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
        part_b = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in part_b]

    def on_device(t):
        return t if t.device == device else t.to(device)

    return dict(
        slots=on_device(torch.tensor(slots, dtype=torch.int32)),
        ranks=ranks,
        scalings=scalings,
        x=on_device(x),
        lora_a=on_device(lora_a),
        lora_b=on_device(lora_b),
        fused_a=on_device(fused_a.view(NUM_SLOTS, MAX_RANK * len(PART_WIDTHS), IN_FEATURES)),
        fused_a_parts=on_device(fused_a),
        part_b=[on_device(b) for b in part_b],
        base=on_device(base),
        idle=idle.to(device),
        strided=strided,
    )


def output_view(base: torch.Tensor, strided: bool, columns: slice = slice(None)) -> torch.Tensor:
    """A fresh copy of base[:, columns] to add into: a row-strided view of a wider buffer when strided."""
    part = base[:, columns]
    if not strided:
        return part.clone()
    wide = torch.full((part.shape[0], part.shape[1] + 7), 3.0, dtype=part.dtype, device=part.device)
    wide[:, 2 : 2 + part.shape[1]] = part
    return wide[:, 2 : 2 + part.shape[1]]


def poison_past_rank(y: torch.Tensor, slots: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """y as an expand may receive it: NaN past each token's rank and in rows without LoRA work."""
    y = y.clone()
    for t, slot in enumerate(slots.tolist()):
        y[t, RANKS[slot] * scale if slot >= 0 else 0 :] = float("nan")
    return y


def close(actual: torch.Tensor, expected: torch.Tensor, case: dict, tolerance: float, what: str) -> None:
    """Equal to tolerance where there is LoRA work; bit for bit (NaN poison and all) where there is none."""
    busy = ~case["idle"]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    error = relative_error(actual[busy], expected[busy])
    assert error <= tolerance, f"{what}: relative error {error:.2e}"
    assert not torch.isnan(actual[busy].float()).any(), f"{what}: NaN where there is LoRA work"
    idle_rows = actual[case["idle"]]
    assert torch.equal(idle_rows.nan_to_num(1234.5), expected[case["idle"]].nan_to_num(1234.5)), (
        f"{what}: rows without LoRA work were written")


@pytest.mark.parametrize("impl,dtype", backend_cases())
@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_every_backend_agrees_with_the_specification_on_lora(impl, dtype, name, device):
    """Shrink, expand, a projection group's apply and a prepared group, each against
    kernels.reference on the same inputs (its meta built by LoraMeta.build alone: no plan)."""
    be, device = fast_path(impl, device)
    case = lora_case(name, dtype, device)
    tolerance = TOLERANCE[dtype]
    slots, x, strided = case["slots"], case["x"], case["strided"]
    reference_meta = plain_meta(case)
    meta = be.lora_meta(slots, case["ranks"], case["scalings"])
    assert meta.segments == reference_meta.segments and meta.num_tokens == len(slots)

    # shrink: float32 [T, R], exact zeros past each token's rank and in rows without work
    y = be.lora_shrink(x, case["lora_a"], meta)
    want_y = reference.lora_shrink(x, case["lora_a"], reference_meta)
    assert y.dtype == torch.float32 and y.shape == (len(slots), MAX_RANK)
    assert relative_error(y, want_y) <= tolerance
    for t, slot in enumerate(slots.tolist()):
        rank = RANKS[slot] if slot >= 0 else 0
        assert torch.all(y[t, rank:] == 0), f"token {t}: y past rank {rank} is not zero"

    # expand, from a y with NaN wherever it must not be read
    y_in = poison_past_rank(want_y, slots)
    got = be.lora_expand(y_in, case["lora_b"], meta, output_view(case["base"], strided, slice(0, OUT_FEATURES)))
    want = reference.lora_expand(y_in, case["lora_b"], reference_meta, case["base"][:, :OUT_FEATURES].clone())
    close(got, want, case, tolerance, "expand")

    # a projection group's apply: fused A, one part skipped, each part a column range of one output
    columns = [slice(sum(PART_WIDTHS[:i]), sum(PART_WIDTHS[: i + 1])) for i in range(len(PART_WIDTHS))]
    members = [None if i == SKIPPED_PART else (case["part_b"][i], columns[i]) for i in range(len(PART_WIDTHS))]
    want = case["base"].clone()
    reference.lora_apply(x, case["fused_a"], [None if m is None else (m[0], want[:, m[1]]) for m in members],
                         reference_meta)
    out = output_view(case["base"], strided)
    be.lora_apply(x, case["fused_a"], [None if m is None else (m[0], out[:, m[1]]) for m in members], meta)
    close(out, want, case, tolerance, "apply")
    assert torch.equal(out[:, columns[SKIPPED_PART]].nan_to_num(), case["base"][:, columns[SKIPPED_PART]].nan_to_num())

    # the same group prepared once, as the engine holds it (over a contiguous output of its width)
    group = be.lora_group(case["fused_a"], members, sum(PART_WIDTHS))
    out = case["base"].clone()
    group.apply(x, out, meta)
    close(out, want, case, tolerance, "group")


def plain_meta(case: dict) -> kernels.LoraMeta:
    """The specification's meta: segments only, no backend's plan."""
    return kernels.LoraMeta.build(case["slots"], case["ranks"], case["scalings"])


def naive_lora(x, lora_a, lora_b, slots, scalings, base):
    """The per-token loop: y[t] = x[t] A[slot, :rank]ᵀ, out[t] = base[t] + scaling · y[t] B[slot, :, :rank]ᵀ,
    nothing for slot -1 (nor for a rank-0 slot), summed in float32 and rounded once into base's dtype."""
    y = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    out = base.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        rank = RANKS[slot]
        if rank == 0:
            continue
        y[t, :rank] = x[t].float() @ lora_a[slot, :rank].float().T
        delta = (y[t, :rank] @ lora_b[slot, :, :rank].float().T) * float(scalings[slot])
        out[t] = (base[t].float() + delta).to(base.dtype)
    return y, out


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_the_lora_specification_matches_the_per_token_loop(name, dtype):
    case = lora_case(name, dtype, torch.device("cpu"))
    tolerance = TOLERANCE[dtype]
    meta = plain_meta(case)
    x, slots, scalings = case["x"], case["slots"], case["scalings"]
    want_y, want = naive_lora(x, case["lora_a"], case["lora_b"], slots, scalings, case["base"][:, :OUT_FEATURES])
    y = reference.lora_shrink(x, case["lora_a"], meta)
    assert y.dtype == torch.float32 and y.shape == want_y.shape
    assert relative_error(y, want_y) <= tolerance
    for t, slot in enumerate(slots.tolist()):  # exact zeros past the rank
        assert torch.all(y[t, RANKS[slot] if slot >= 0 else 0 :] == 0)
    got = reference.lora_expand(poison_past_rank(want_y, slots), case["lora_b"], meta,
                                case["base"][:, :OUT_FEATURES].clone())
    close(got, want, case, tolerance, "expand")

    # apply: part i reads rows j·parts + i of the fused A; the skipped part's columns stay as they were
    out = case["base"].clone()
    columns = [slice(sum(PART_WIDTHS[:i]), sum(PART_WIDTHS[: i + 1])) for i in range(len(PART_WIDTHS))]
    parts = [None if i == SKIPPED_PART else (case["part_b"][i], out[:, columns[i]]) for i in range(len(PART_WIDTHS))]
    reference.lora_apply(x, case["fused_a"], parts, meta)
    want = case["base"].clone()
    for i, b in enumerate(case["part_b"]):
        if i != SKIPPED_PART:
            a_i = case["fused_a_parts"][:, :, i]
            _, want[:, columns[i]] = naive_lora(x, a_i, b, slots, scalings, case["base"][:, columns[i]])
    close(out, want, case, tolerance, "apply")


# Attention: (context length including this step, query length) per sequence, block size, KV
# heads, query heads per KV head, head_dim.
ATTENTION_CASES = {
    "decode": ([(5, 1), (33, 1), (17, 1), (1, 1), (48, 1)], 16, 2, 1, 16),
    "chunked_prefix": ([(41, 7), (12, 12), (20, 3)], 8, 2, 2, 24),  # a chunk after a paged prefix
    "gqa": ([(37, 1), (23, 23), (9, 4)], 16, 2, 4, 16),
    "ragged_tables": ([(37, 1), (1, 1), (90, 1), (16, 1), (50, 13), (5, 1)], 5, 1, 3, 20),
    "empty": ([], 16, 2, 2, 16),
}
ATTENTION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}


def attention_case(name: str, dtype: str, layout: str, device: torch.device):
    spec, block_size, kv_heads, group, head_dim = ATTENTION_CASES[name]
    inputs = make_paged_batch(spec, block_size, kv_heads, group, head_dim, ATTENTION_DTYPES[dtype], device,
                              seed=len(spec) * 7 + group, head_major=layout == "head-major")
    return inputs, head_dim**-0.5


def attention_params():
    """The native attention serves float32 over the engine's head-major cache only."""
    return [(impl, dtype, layout) for impl in BACKENDS for dtype in ATTENTION_DTYPES
            for layout in ("contiguous", "head-major")
            if impl != "native" or (dtype == "fp32" and layout == "head-major")]


@pytest.mark.parametrize("impl,dtype,layout", attention_params())
@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_every_backend_agrees_with_the_specification_on_attention(impl, dtype, layout, name, device):
    be, device = fast_path(impl, device)
    inputs, scale = attention_case(name, dtype, layout, device)
    got = be.paged_attention(*inputs, scale)
    want = reference.paged_attention(*inputs, scale)
    assert got.dtype == want.dtype and got.shape == want.shape == inputs[0].shape
    assert not torch.isnan(got).any()
    assert relative_error(got, want) <= ATTENTION_TOLERANCE[dtype]


STORE_DTYPES = {  # (k and v, cache); fp32 -> bf16 is left out: the interpreter truncates where CUDA rounds
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32_into_fp16": (torch.float32, torch.float16),
}


def store_case(dtype: str, layout: str, device: torch.device):
    """k, v as views of one fused projection output; slots scattered over the blocks, padding -1s."""
    values, cache_dtype = STORE_DTYPES[dtype]
    generator = torch.Generator().manual_seed(3)
    num_blocks, block_size, kv_heads, head_dim = 5, 3, 2, 12
    fused = torch.randn(8, 3, kv_heads, head_dim, generator=generator).to(device=device, dtype=values)
    k, v = fused[:, 1], fused[:, 2]
    slot_mapping = torch.tensor([4 * 3 + 1, 2 * 3 + 2, -1, 0, 4 * 3 + 2, 3 * 3, -1, 1 * 3 + 1], device=device)
    cache = torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0, dtype=cache_dtype, device=device)
    if layout == "head-major":
        cache = cache.transpose(1, 2).contiguous().transpose(1, 2)
    return k, v, cache, slot_mapping


@pytest.mark.parametrize("layout", ["contiguous", "head-major"])
@pytest.mark.parametrize("dtype", sorted(STORE_DTYPES))
@pytest.mark.parametrize("impl", BACKENDS)
def test_every_backend_stores_kv_as_the_specification(impl, dtype, layout, device):
    be, device = fast_path(impl, device)
    k, v, cache, slot_mapping = store_case(dtype, layout, device)
    caches = [cache.clone() for _ in range(4)]  # clone keeps the layout
    be.store_kv(k, v, caches[0], caches[1], slot_mapping)
    reference.store_kv(k, v, caches[2], caches[3], slot_mapping)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].stride() == cache.stride()  # written in place, in its own layout


def naive_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """Per query token and head: the softmax over the positions it sees, each key and value read
    through the block table by hand."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        table = block_tables[b].tolist()
        q_len = starts[b + 1] - starts[b]
        for i in range(q_len):
            token = starts[b] + i
            position = length - q_len + i  # sees positions 0 ..= position
            for h in range(q.shape[1]):
                kv = h // group
                keys = [k_cache[table[p // block_size], p % block_size, kv].float() for p in range(position + 1)]
                values = [v_cache[table[p // block_size], p % block_size, kv].float() for p in range(position + 1)]
                scores = [float(q[token, h].float() @ key) * scale for key in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[token, h] = sum(w / total * value for w, value in zip(weights, values, strict=True))
    return out


@pytest.mark.parametrize("layout", ["contiguous", "head-major"])
@pytest.mark.parametrize("dtype", sorted(ATTENTION_DTYPES))
@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_the_attention_specification_matches_the_per_token_loop(name, dtype, layout):
    inputs, scale = attention_case(name, dtype, layout, torch.device("cpu"))
    got = reference.paged_attention(*inputs, scale)
    want = naive_attention(*inputs, scale)
    assert got.dtype == inputs[0].dtype and got.shape == inputs[0].shape
    assert not torch.isnan(got).any()
    assert relative_error(got, want) <= ATTENTION_TOLERANCE[dtype]


@pytest.mark.parametrize("layout", ["contiguous", "head-major"])
@pytest.mark.parametrize("dtype", sorted(STORE_DTYPES))
def test_the_store_kv_specification_matches_the_per_token_loop(dtype, layout):
    k, v, cache, slot_mapping = store_case(dtype, layout, torch.device("cpu"))
    k_cache, v_cache = cache.clone(), cache.clone()
    reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    want_k, want_v = cache.clone(), cache.clone()
    block_size = cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue  # padding
        for h in range(cache.shape[2]):
            for d in range(cache.shape[3]):
                want_k[slot // block_size, slot % block_size, h, d] = k[t, h, d]
                want_v[slot // block_size, slot % block_size, h, d] = v[t, h, d]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
