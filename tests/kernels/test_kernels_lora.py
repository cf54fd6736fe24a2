"""Multi-LoRA shrink/expand/apply on every backend (torch, native C, Triton interpreted on CPU or
compiled on CUDA) against a naive per-token loop on awkward batches, the native plan, and how
`kernels.backend` chooses and refuses."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import reference
from kernels.cpu import build, lora_plan
from tests.kernels.cases import backend

NUM_SLOTS = 16
MAX_RANK = 64
IN_FEATURES = 100  # not a multiple of any BLOCK_K
OUT_FEATURES = 70  # not a multiple of BLOCK_N
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def slot_ranks() -> torch.Tensor:
    ranks = torch.tensor([(1, 8, 64)[s % 3] for s in range(NUM_SLOTS)], dtype=torch.int32)
    ranks[7] = 16
    return ranks


def slot_pattern(kind: str, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "mixed":  # decode-like: singleton segments with -1 interleaved
        return torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=generator)
    if kind == "runs":  # prefill-like: long runs, a slot coming back later, -1 runs between
        slots: list[int] = []
        choices = [3, -1, 11, 3, 0, -1, 15]
        while len(slots) < num_tokens:
            slots += [choices[len(slots) % len(choices)]] * (1 + len(slots) % 9)
        return torch.tensor(slots[:num_tokens])
    if kind == "engine":  # the engine's order: -1 first, then by (rank, slot); one long prefill run among decodes
        ranks = slot_ranks()
        # Rank-1 slots: two tokens each (in-place groups); the others 1-3 (padded groups).
        counts = [2 if ranks[s] == 1 else 1 + (s * 7) % 3 for s in range(NUM_SLOTS)]
        counts[5] = 40
        order = sorted(range(NUM_SLOTS), key=lambda s: (int(ranks[s]), s))
        slots = [s for s in order for _ in range(counts[s])]
        return torch.tensor(([-1] * max(3, num_tokens - len(slots)) + slots)[:num_tokens])
    if kind == "one":  # a single adapter for the whole batch
        return torch.full((num_tokens,), 7)
    if kind == "none":
        return torch.full((num_tokens,), -1)
    raise ValueError(kind)


def make_case(num_tokens: int, kind: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed * 1000 + num_tokens)
    token_slots = slot_pattern(kind, num_tokens, generator).to(torch.int32)
    ranks = slot_ranks()
    scalings = torch.rand(NUM_SLOTS, generator=generator) * 2
    x = torch.randn(num_tokens, IN_FEATURES, generator=generator)
    lora_a = torch.randn(NUM_SLOTS, MAX_RANK, IN_FEATURES, generator=generator) / math.sqrt(IN_FEATURES)
    lora_b = torch.randn(NUM_SLOTS, OUT_FEATURES, MAX_RANK, generator=generator) / math.sqrt(MAX_RANK)
    base = torch.randn(num_tokens, OUT_FEATURES, generator=generator)
    # Garbage past each slot's rank must never reach the result.
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    # Rows of tokens without an adapter must be left untouched, NaN included.
    base[token_slots == -1] = float("nan")
    to = dict(device=device, dtype=dtype)
    return (
        token_slots.to(device),
        ranks.to(device),
        scalings.to(device),
        x.to(**to),
        lora_a.to(**to),
        lora_b.to(**to),
        base.to(**to),
    )


def naive_lora(x, lora_a, lora_b, token_slots, ranks, scalings, base):
    """The obviously correct per-token loop nobody optimised."""
    y = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    out = base.clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        rank = int(ranks[slot])
        y[t, :rank] = lora_a[slot, :rank].float() @ x[t].float()
        delta = float(scalings[slot]) * (lora_b[slot, :, :rank].float() @ y[t, :rank])
        out[t] = (base[t].float() + delta).to(base.dtype)
    return y, out


def relative_error(actual: torch.Tensor, expected: torch.Tensor, rows: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over the given rows (NaN-poisoned rows are excluded)."""
    a, e = actual[rows].double(), expected[rows].double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def poisoned_y(y: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """y as expand might receive it from elsewhere: garbage past the rank and in -1 rows."""
    y = y.clone()
    for t, slot in enumerate(token_slots.tolist()):
        y[t, int(ranks[slot]) if slot >= 0 else 0 :] = float("nan")
    return y


def check_lora(impl: str, num_tokens: int, kind: str, dtype: torch.dtype, device: torch.device, **tuning):
    be = backend(impl, device)
    token_slots, ranks, scalings, x, lora_a, lora_b, base = make_case(num_tokens, kind, dtype, device)
    meta = be.lora_meta(token_slots, ranks, scalings)
    want_y, want_out = naive_lora(x, lora_a, lora_b, token_slots, ranks, scalings, base)
    adapter_rows = token_slots >= 0

    if tuning:  # the Triton kernels' own knobs, past the backend's defaults
        from kernels.triton import lora

        y = lora.lora_shrink(x, lora_a, meta, **tuning.get("shrink", {}))
        out = lora.lora_expand(
            poisoned_y(y, token_slots, ranks), lora_b, meta, base.clone(), **tuning.get("expand", {})
        )
    else:
        y = be.lora_shrink(x, lora_a, meta)
        out = be.lora_expand(poisoned_y(y, token_slots, ranks), lora_b, meta, base.clone())

    assert y.dtype == torch.float32 and y.shape == (num_tokens, MAX_RANK)
    assert out.dtype == dtype
    tolerance = TOLERANCE[dtype]
    assert relative_error(y, want_y, adapter_rows) <= tolerance
    assert relative_error(out, want_out, adapter_rows) <= tolerance
    # Exact zeros past each token's rank and in rows without an adapter.
    for t, slot in enumerate(token_slots.tolist()):
        rank = int(ranks[slot]) if slot >= 0 else 0
        assert torch.all(y[t, rank:] == 0), f"token {t}: y past rank {rank} is not zero"
    # -1 rows untouched: still exactly the NaN they were poisoned with.
    assert torch.isnan(out[~adapter_rows].float()).all()
    assert not torch.isnan(out[adapter_rows].float()).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["mixed", "runs", "engine", "one", "none"])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 33, 80])
def test_torch_backend_matches_naive_loop(num_tokens, kind, dtype):
    check_lora("torch", num_tokens, kind, dtype, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["mixed", "runs", "engine", "one", "none"])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 33, 80])
def test_native_matches_naive_loop(num_tokens, kind):
    check_lora("native", num_tokens, kind, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_refuses_half_precision_activations(dtype):
    """Half-precision activations are the torch backend's: the native kernels raise naming the
    reason (no silent fallback), and kernels.backend decides so up front."""
    be = backend("native", torch.device("cpu"))
    token_slots, ranks, scalings, x, lora_a, lora_b, base = make_case(7, "mixed", dtype, torch.device("cpu"))
    meta = be.lora_meta(token_slots, ranks, scalings)
    reason = "float32 activations.*use kernels='torch'"
    with pytest.raises(ValueError, match=reason):
        be.lora_shrink(x, lora_a, meta)
    y = torch.zeros(7, MAX_RANK)
    with pytest.raises(ValueError, match=reason):
        be.lora_expand(y, lora_b, meta, base.clone())
    with pytest.raises(ValueError, match=reason):
        be.lora_apply(x, lora_a, [(lora_b, base.clone())], meta)
    with pytest.raises(ValueError, match="float32 or bfloat16 weights"):  # half weights: not even in a group
        be.lora_group(lora_a.half(), [(lora_b.half(), slice(0, OUT_FEATURES))], OUT_FEATURES)
    assert kernels.backend("auto", "cpu", dtype=dtype).name == "torch"
    assert kernels.backend("auto", "cpu", lora_dtype=torch.float16).name == "torch"
    with pytest.raises(ValueError, match=f"kernels='native': .*not {str(dtype).removeprefix('torch.')}"):
        kernels.backend("native", "cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["mixed", "runs", "one", "none"])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 33])
def test_triton_matches_the_torch_backend(num_tokens, kind, dtype, device):
    check_lora("triton", num_tokens, kind, dtype, device)


@pytest.mark.parametrize(
    "tuning",
    [
        {"shrink": {"split_k": 3, "block_k": 16}, "expand": {"block_n": 16}},  # atomics + many K/N tiles
        {"shrink": {"split_k": 1, "block_k": 128}, "expand": {"block_n": 128}},  # one tile covers it all
    ],
    ids=["split_k", "single_tile"],
)
def test_triton_tuning_knobs_do_not_change_results(tuning, device):
    check_lora("triton", 33, "mixed", torch.float32, device, **tuning)
    check_lora("triton", 33, "runs", torch.float16, device, **tuning)


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
def test_strided_inputs(impl, device):
    """Activations are often views (a slice of a fused projection): strides must be honoured.
    Outputs with a column stride are the torch and Triton backends' only: native raises."""
    be = backend(impl, device)
    token_slots, ranks, scalings, x, lora_a, lora_b, base = make_case(7, "mixed", torch.float32, device)
    wide = torch.randn(7, IN_FEATURES + 13, device=device)
    wide[:, 5 : 5 + IN_FEATURES] = x
    meta = be.lora_meta(token_slots, ranks, scalings)
    spec = kernels.LoraMeta.build(token_slots, ranks, scalings)
    view = wide[:, 5 : 5 + IN_FEATURES]
    y = be.lora_shrink(view, lora_a, meta)
    want = reference.lora_shrink(x.contiguous(), lora_a, spec)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-6)
    wide_base = torch.randn(7, OUT_FEATURES * 2, device=device)
    rows_view = wide_base[:, 3 : 3 + OUT_FEATURES]  # a row stride of its own: every backend
    expected = reference.lora_expand(y, lora_b, spec, rows_view.clone())
    be.lora_expand(y, lora_b, meta, rows_view)
    assert torch.allclose(wide_base[:, 3 : 3 + OUT_FEATURES], expected, rtol=1e-5, atol=1e-6)
    out_view = wide_base[:, ::2]
    expected = reference.lora_expand(y, lora_b, spec, out_view.clone())
    if impl == "native":
        before = wide_base.clone()
        with pytest.raises(ValueError, match="unit inner stride"):
            be.lora_expand(y, lora_b, meta, out_view)
        assert torch.equal(wide_base, before)
        return
    be.lora_expand(y, lora_b, meta, out_view)
    assert torch.allclose(wide_base[:, ::2], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
@pytest.mark.parametrize("kind", ["mixed", "runs", "engine"])
@pytest.mark.parametrize("b_layout", ["plain", "rank_major"])
def test_bfloat16_weights_over_float32_activations(impl, kind, b_layout, device):
    """The engine's lora_dtype=bfloat16 pool: weights stored in bf16, activations and sums in
    fp32. Widening a bf16 weight is exact, so the result must be the fp32 loop's over the same
    (rounded) weights, to fp32 accuracy, not bf16's."""
    be = backend(impl, device)
    token_slots, ranks, scalings, x, lora_a, lora_b, base = make_case(33, kind, torch.float32, device)
    lora_a = lora_a.to(torch.bfloat16)
    lora_b = lora_b.to(torch.bfloat16)
    if b_layout == "rank_major":  # the engine's pool: [S, R, out] in memory, seen as [S, out, R]
        lora_b = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    meta = be.lora_meta(token_slots, ranks, scalings)
    want_y, want_out = naive_lora(x, lora_a, lora_b, token_slots, ranks, scalings, base)
    y = be.lora_shrink(x, lora_a, meta)
    out = be.lora_expand(poisoned_y(y, token_slots, ranks), lora_b, meta, base.clone())
    rows = token_slots >= 0
    assert out.dtype == torch.float32
    assert relative_error(y, want_y, rows) <= 1e-5
    assert relative_error(out, want_out, rows) <= 1e-5
    assert torch.isnan(out[~rows]).all()


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
def test_fused_projections_in_the_engine_layout(impl, device):
    """The engine shrinks q/k/v in one call over A rows interleaved as [S, R, parts, in] (rank r
    reads r * parts rows), then expands each part from a strided column of y into a rank-major B
    view. Both must equal one plain shrink/expand per part."""
    be = backend(impl, device)
    parts, tokens = 3, 33
    token_slots, ranks, scalings, x, _, _, base = make_case(tokens, "mixed", torch.float32, device)
    generator = torch.Generator().manual_seed(5)
    fused_a = torch.randn(NUM_SLOTS, MAX_RANK, parts, IN_FEATURES, generator=generator) / math.sqrt(IN_FEATURES)
    b_stacks = [torch.randn(NUM_SLOTS, MAX_RANK, OUT_FEATURES, generator=generator) for _ in range(parts)]
    fused_a, b_views = fused_a.to(device), [b.to(device).transpose(1, 2) for b in b_stacks]  # [S, out, R] views
    meta = be.lora_meta(token_slots, ranks, scalings)
    fused_meta = meta.scaled_ranks(parts)  # what the engine uses: no second sort
    built = be.lora_meta(token_slots, ranks * parts, scalings)
    assert fused_meta.segments == built.segments and fused_meta.max_rank == built.max_rank
    assert torch.equal(fused_meta.ranks, built.ranks)
    assert plan_summary(fused_meta.plan) == plan_summary(built.plan)
    y = be.lora_shrink(x, fused_a.view(NUM_SLOTS, MAX_RANK * parts, IN_FEATURES), fused_meta)
    per_part = y.view(tokens, MAX_RANK, parts)
    for i in range(parts):
        got = be.lora_expand(per_part[:, :, i], b_views[i], meta, base.clone())
        y_i = reference.lora_shrink(x, fused_a[:, :, i].contiguous(), meta)
        want = reference.lora_expand(y_i, b_views[i].contiguous(), meta, base.clone())
        assert torch.allclose(per_part[:, :, i], y_i, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def plan_summary(plan: lora_plan.LoraPlan | None):
    """What a plan does, comparable across two builds: direct runs and segments."""
    if plan is None:
        return None
    seg = plan.segments
    return ([(r.start, r.end, r.slot, r.rank) for r in plan.direct],
            [t.tolist() for t in (seg.starts, seg.rows, seg.slots, seg.ranks)])


def fused_group_case(kind: str, parts: int, weights: torch.dtype, device: torch.device, tokens: int = 33):
    """One projection group in the engine's layout: A interleaved [S, R, parts, in], rank-major B
    views, and the parts' outputs side by side in one wide output (NaN in rows without an adapter)."""
    token_slots, ranks, scalings, x, _, _, _ = make_case(tokens, kind, torch.float32, device)
    generator = torch.Generator().manual_seed(7)
    fused_a = (torch.randn(NUM_SLOTS, MAX_RANK, parts, IN_FEATURES, generator=generator) / math.sqrt(IN_FEATURES)).to(weights)
    widths = [OUT_FEATURES, 24, 40][:parts]
    b_views = [torch.randn(NUM_SLOTS, MAX_RANK, w, generator=generator).to(weights).transpose(1, 2) for w in widths]
    out = torch.randn(tokens, sum(widths), generator=generator)
    out[token_slots == -1] = float("nan")
    columns = [slice(sum(widths[:i]), sum(widths[: i + 1])) for i in range(parts)]
    return (token_slots, ranks, scalings, x.to(device), fused_a.to(device), [b.to(device) for b in b_views],
            out.to(device), columns)


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
@pytest.mark.parametrize("kind", ["mixed", "runs", "engine"])
@pytest.mark.parametrize("parts,skipped", [(1, None), (2, None), (3, None), (3, 1)], ids=["1", "2", "3", "3-skip"])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
def test_apply_equals_one_shrink_and_expand_per_part(impl, kind, parts, skipped, weights, device):
    """Backend.lora_apply (natively one call for the group) against the naive loop per part;
    a skipped part's columns stay exactly as they were."""
    be = backend(impl, device)
    token_slots, ranks, scalings, x, fused_a, b_views, out, columns = fused_group_case(kind, parts, weights, device)
    meta = be.lora_meta(token_slots, ranks, scalings)
    before = out.clone()
    group = [None if i == skipped else (b_views[i], out[:, columns[i]]) for i in range(parts)]
    be.lora_apply(x, fused_a.view(NUM_SLOTS, MAX_RANK * parts, IN_FEATURES), group, meta)
    rows = token_slots >= 0
    for i in range(parts):
        if i == skipped:
            assert torch.equal(out[rows][:, columns[i]], before[rows][:, columns[i]])
            continue
        _, want = naive_lora(x, fused_a[:, :, i], b_views[i], token_slots, ranks, scalings, before[:, columns[i]])
        assert relative_error(out[:, columns[i]], want, rows) <= 1e-5, f"part {i}"
    assert torch.isnan(out[~rows]).all()


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
def test_apply_checks_every_part_before_writing_any(impl, device):
    be = backend(impl, device)
    token_slots, ranks, scalings, x, fused_a, b_views, out, columns = fused_group_case("mixed", 2, torch.float32,
                                                                                       device)
    meta = be.lora_meta(token_slots, ranks, scalings)
    before = out.clone()
    wrong = out[:, columns[1]][:, :-1]  # one column short of B's outputs
    group = [(b_views[0], out[:, columns[0]]), (b_views[1], wrong)]
    with pytest.raises(ValueError, match="base is"):
        be.lora_apply(x, fused_a.view(NUM_SLOTS, MAX_RANK * 2, IN_FEATURES), group, meta)
    assert torch.equal(out.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
@pytest.mark.parametrize("kind", ["mixed", "runs", "engine"])
@pytest.mark.parametrize("layout", ["fused", "skip", "single", "strided_out"])
def test_a_prepared_group_equals_apply_on_views(impl, kind, layout, device):
    """Backend.lora_group (the engine's per-layer handle; natively one call with its part table
    laid out once) against lora_apply on the same views: same sums, every layout and batch kind.
    An output it was not laid out for (a wider row stride) is the split groups' only: native raises."""
    be = backend(impl, device)
    token_slots, ranks, scalings, x, fused_a, b_views, out, columns = fused_group_case(kind, 3, torch.float32, device)
    meta = be.lora_meta(token_slots, ranks, scalings)
    lora_a = fused_a.view(NUM_SLOTS, MAX_RANK * 3, IN_FEATURES)
    members = [(b_views[i], columns[i]) for i in range(3)]
    if layout == "skip":
        members[1] = None
    if layout == "single":  # one part's own A rows out of the interleaved stack
        lora_a, members = fused_a[:, :, 2], [members[2]]
    want = out.clone()
    be.lora_apply(x, lora_a, [None if m is None else (m[0], want[:, m[1]]) for m in members], meta)
    group = be.lora_group(lora_a, members, out.shape[1])
    if layout == "strided_out":  # the same numbers in a wider buffer: not the layout it was laid out for
        wide = torch.full((out.shape[0], out.shape[1] + 5), 7.0, device=device)
        wide[:, : out.shape[1]] = out
        out = wide[:, : out.shape[1]]
        if impl == "native":
            before = wide.clone()
            with pytest.raises(ValueError, match="out must be a contiguous float32"):
                group.apply(x, out, meta)
            assert torch.equal(wide.nan_to_num(), before.nan_to_num())
            return
    group.apply(x, out, meta)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
def test_a_prepared_group_still_checks_its_batch(impl, device):
    be = backend(impl, device)
    token_slots, ranks, scalings, x, fused_a, b_views, out, columns = fused_group_case("mixed", 2, torch.float32,
                                                                                       device)
    group = be.lora_group(fused_a.view(NUM_SLOTS, MAX_RANK * 2, IN_FEATURES),
                          [(b_views[0], columns[0]), (b_views[1], columns[1])], out.shape[1])
    before = out.clone()
    other = be.lora_meta(token_slots[:-1], ranks, scalings)  # built for one token fewer
    with pytest.raises(ValueError, match="LoraMeta was built for|x must be float32 \\[32, "):
        group.apply(x, out, other)
    too_many_slots = be.lora_meta(token_slots, torch.cat([ranks, ranks]), torch.cat([scalings, scalings]))
    with pytest.raises(ValueError, match="slots"):
        group.apply(x, out, too_many_slots)
    assert torch.equal(out.nan_to_num(), before.nan_to_num())


def test_the_native_backend_needs_a_meta_with_its_plan():
    """The native backend runs a step by the plan its own lora_meta made: a meta without one
    (LoraMeta.build alone, as Triton and torch use) raises rather than drop the LoRA term."""
    if not build.available():
        pytest.skip("no C compiler here")
    cpu = torch.device("cpu")
    token_slots, ranks, scalings, x, lora_a, lora_b, base = make_case(7, "mixed", torch.float32, cpu)
    plain = kernels.LoraMeta.build(token_slots, ranks, scalings)
    planned = kernels.LoraMeta.build(token_slots, ranks, scalings, planner=lora_plan.build_native_plan)
    assert plain.plan is None and planned.plan.segments is not None
    assert kernels.backend("torch", cpu).lora_meta(token_slots, ranks, scalings).plan is None
    be = kernels.backend("native", cpu)
    assert plan_summary(be.lora_meta(token_slots, ranks, scalings).plan) == plan_summary(planned.plan)
    with pytest.raises(ValueError, match="no native plan; build it with the native backend"):
        be.lora_shrink(x, lora_a, plain)
    with pytest.raises(ValueError, match="no native plan"):
        be.lora_expand(torch.zeros(7, MAX_RANK), lora_b, plain, base.clone())


def test_meta_groups_tokens_by_slot_stably():
    token_slots = torch.tensor([2, -1, 0, 2, 2, -1, 0, 5], dtype=torch.int32)
    ranks = torch.tensor([4, 8, 2, 8, 8, 0], dtype=torch.int32)  # slot 5 has rank 0: no work
    scalings = torch.tensor([0.5, 1.0, 2.0, 1.0, 1.0, 1.0])
    meta = kernels.LoraMeta.build(token_slots, ranks, scalings)
    assert meta.has_lora and meta.num_tokens == 8 and meta.num_lora_tokens == 5
    assert meta.active_slots == (0, 2)
    assert meta.segments == ((0, 2, 0, 4, 0.5), (2, 5, 2, 2, 2.0))
    assert meta.sorted_token_ids[:5].tolist() == [2, 6, 0, 3, 4]
    assert meta.max_rank == 4
    assert meta.tiles.tolist() == [[0, 0, 2], [2, 2, 5]]


def native_plan(slots: list[int], ranks: torch.Tensor, scalings: torch.Tensor) -> lora_plan.LoraPlan:
    # The planner alone: it needs no compiler.
    return kernels.LoraMeta.build(torch.tensor(slots, dtype=torch.int32), ranks, scalings,
                                  planner=lora_plan.build_native_plan).plan


def test_native_plan_gives_the_native_kernels_every_run_up_to_their_limit():
    """The native plan: runs up to NATIVE_MAX_RUN_TOKENS are segments, wherever their rows are,
    longer ones stay matmuls; each adapter token is in exactly one of them, and scaled ranks
    scale both."""
    from kernels.cpu.lora_plan import NATIVE_MAX_RUN_TOKENS

    ranks = torch.tensor([8, 16, 4], dtype=torch.int32)
    slots = [0, -1] + [1] * 17 + [2] * (NATIVE_MAX_RUN_TOKENS + 1) + [0]
    plan = native_plan(slots, ranks, torch.ones(3))
    assert [run.slot for run in plan.direct] == [2]
    seg = plan.segments
    assert sorted(seg.slots.tolist()) == [0, 1]
    covered = seg.rows.tolist() + [t for run in plan.direct for t in range(run.start, run.end)]
    assert sorted(covered) == [t for t, s in enumerate(slots) if s >= 0]
    for i, slot in enumerate(seg.slots.tolist()):
        rows = seg.rows[seg.starts[i] : seg.starts[i + 1]].tolist()
        assert all(slots[r] == slot for r in rows) and seg.ranks[i] == ranks[slot]
    tripled = plan.scaled_ranks(3)
    assert tripled.segments.ranks.tolist() == [3 * r for r in seg.ranks.tolist()]
    assert [run.rank for run in tripled.direct] == [12]
    # A decode step has no direct runs: every slot is a segment.
    decode = native_plan([0, 1, 2], ranks, torch.ones(3))
    assert not decode.direct and decode.segments.slots.tolist() == [0, 1, 2]
    assert decode.scaled_ranks(2).segments.ranks.tolist() == [16, 32, 8]


def test_meta_splits_long_segments_into_tiles():
    meta = kernels.LoraMeta.build(
        torch.full((40,), 1, dtype=torch.int32), torch.tensor([8, 8]), torch.ones(2)
    )
    assert meta.tiles.tolist() == [[1, 0, 16], [1, 16, 32], [1, 32, 40]]


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
@pytest.mark.parametrize("slots", [[], [-1, -1, -1]], ids=["empty", "no_adapter"])
def test_meta_without_adapter_tokens(slots, impl, device):
    be = backend(impl, device)
    meta = be.lora_meta(torch.tensor(slots, dtype=torch.int32, device=device), torch.tensor([8]), torch.ones(1))
    assert not meta.has_lora and meta.num_lora_tokens == 0 and meta.segments == () and meta.plan is None
    x = torch.randn(len(slots), 12, device=device)
    y = be.lora_shrink(x, torch.randn(1, 8, 12, device=device), meta)
    assert y.shape == (len(slots), 8) and not y.any()
    base = torch.randn(len(slots), 5, device=device)
    assert torch.equal(be.lora_expand(y, torch.randn(1, 5, 8, device=device), meta, base.clone()), base)


def test_meta_rejects_bad_slots():
    with pytest.raises(ValueError, match="only 2 slots"):
        kernels.LoraMeta.build(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([8, 8]), torch.ones(2))
    with pytest.raises(ValueError, match="-1"):
        kernels.LoraMeta.build(torch.tensor([0, -3], dtype=torch.int32), torch.tensor([8, 8]), torch.ones(2))


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
def test_rank_above_stacked_rank_is_rejected(impl, device):
    be = backend(impl, device)
    meta = be.lora_meta(torch.tensor([0], dtype=torch.int32, device=device), torch.tensor([32]), torch.ones(1))
    with pytest.raises(ValueError, match="rank 32"):
        be.lora_shrink(torch.randn(1, 8, device=device), torch.randn(1, 16, 8, device=device), meta)


@pytest.fixture
def fresh_backends():
    """Backends built anew in the test (kernels.backend caches one per kind and device), and the
    library loaded anew after it."""
    kernels.backends._cached.cache_clear()
    yield
    kernels.backends._cached.cache_clear()
    build._load.cache_clear()


def test_backend_choice_on_cpu_and_unknown_kinds(monkeypatch, fresh_backends):
    """auto on CPU: native where the C kernels build and the model suits them, else torch; each
    kind is decided once (one object per kind and device); a kind that cannot serve raises."""
    plain = kernels.backend("torch", "cpu")
    assert plain is kernels.backend("torch", torch.device("cpu")) and plain.name == "torch"
    meta = plain.lora_meta(torch.tensor([0], dtype=torch.int32), torch.tensor([4]), torch.ones(1))
    x, lora_a = torch.randn(1, 8), torch.randn(1, 4, 8)
    want = reference.lora_shrink(x, lora_a, meta)
    assert torch.allclose(plain.lora_shrink(x, lora_a, meta), want, rtol=1e-6, atol=1e-7)
    auto = kernels.backend("auto", "cpu")
    if build.available():
        assert auto is kernels.backend("native", "cpu")
        auto_meta = auto.lora_meta(torch.tensor([0], dtype=torch.int32), torch.tensor([4]), torch.ones(1))
        assert torch.allclose(auto.lora_shrink(x, lora_a, auto_meta), want, rtol=1e-6, atol=1e-7)
    else:
        assert auto is plain
    assert kernels.backend("auto", "cpu", lora_dtype=torch.float16) is plain  # half weights: not native
    assert kernels.backend("auto", "meta").name == "torch"  # neither CPU nor CUDA
    with pytest.raises(ValueError, match="kernels must be one of auto, triton, native, torch; got 'cuda'"):
        kernels.backend("cuda", "cpu")
    with pytest.raises(ValueError, match="CPU only, not cuda"):
        kernels.backend("native", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.backend("triton", "cpu")


def test_without_a_compiler_native_raises_naming_it_and_auto_chooses_torch(tmp_path, monkeypatch, fresh_backends):
    missing = tmp_path / "no-such-cc"
    monkeypatch.setenv("CC", str(missing))
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    build._load.cache_clear()
    assert not build.available()
    with pytest.raises(ValueError, match=f"kernels='native': .*{missing}.*use kernels='torch'"):
        kernels.backend("native", "cpu")
    assert kernels.backend("auto", "cpu").name == "torch"
    assert kernels.backend("auto", "cpu", attention=(4, 2, 16, 16)).name == "torch"


def test_torch_path_works_without_triton():
    """Importing kernels and running the torch backend must not need a working triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.triton_available()\n"
        "be = kernels.backend('torch', 'cpu')\n"
        "m = be.lora_meta(torch.tensor([0, -1], dtype=torch.int32), torch.tensor([2]), torch.ones(1))\n"
        "y = be.lora_shrink(torch.randn(2, 4), torch.randn(1, 2, 4), m)\n"
        "be.lora_expand(y, torch.randn(1, 3, 2), m, torch.zeros(2, 3))\n"
        "assert kernels.backend('auto', 'cuda').name == 'torch'\n"
        "try:\n"
        "    kernels.backend('triton', 'cuda')\n"
        "except ValueError as error:\n"
        "    assert 'cannot be imported' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('triton without triton')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)
