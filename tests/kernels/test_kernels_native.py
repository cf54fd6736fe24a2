"""The native CPU kernels: they build here, the fast path really runs them (no silent fallback to
the twins), decode attention matches dense attention, and a machine without a compiler falls
back to the torch twins with a clear reason."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

import kernels
from kernels import cpu, native, reference

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the native kernels cannot build on this machine")


def test_the_library_builds_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path and first.name.startswith("liblorafleet_kernels-")
    stamp = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert list(tmp_path.iterdir()) == [first]  # no scratch folder left behind
    assert kernels.native_available()


def test_a_failing_compiler_means_unavailable_with_its_message(tmp_path, monkeypatch):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no such compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native.NativeUnavailable, match="no such compiler"):
        native._build()


def test_without_a_working_compiler_the_twins_serve_and_say_why_once(tmp_path, monkeypatch, caplog):
    calls = tmp_path / "calls"
    broken = tmp_path / "cc"
    broken.write_text(f"#!/bin/sh\necho run >> {calls}\necho 'cc: fatal error: no such compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    meta = kernels.LoraMeta.build(torch.tensor([0, -1], dtype=torch.int32), torch.tensor([4]), torch.ones(1))
    x, lora_a = torch.randn(2, 8), torch.randn(1, 4, 8)
    native._load.cache_clear()
    native._warn_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kernels.native"):
            for _ in range(3):
                assert not kernels.native_available()
                assert kernels._backend("auto", x) == "torch"
                assert torch.equal(kernels.lora_shrink(x, lora_a, meta), reference.lora_shrink(x, lora_a, meta))
        assert calls.read_text().count("run") == 1  # the failure is remembered, not retried per call
        reasons = [r.getMessage() for r in caplog.records if "no such compiler" in r.getMessage()]
        assert len(reasons) == 1 and "torch twins run instead" in reasons[0]
        with pytest.raises(native.NativeUnavailable, match="no such compiler"):
            kernels.lora_shrink(x, lora_a, meta, impl="native")
    finally:
        native._load.cache_clear()
        native._warn_once.cache_clear()


def engine_like_lora(tokens_per_slot: list[int], in_features=200, out_features=130, slots=8, max_rank=32):
    """A decode-like batch in the engine's (rank, slot) order over a rank-major B pool."""
    generator = torch.Generator().manual_seed(0)
    ranks = torch.tensor([(4, 8, 16, 32)[s % 4] for s in range(slots)], dtype=torch.int32)
    order = sorted(range(slots), key=lambda s: (int(ranks[s]), s))
    token_slots = torch.tensor([-1, -1] + [s for s in order for _ in range(tokens_per_slot[s])], dtype=torch.int32)
    x = torch.randn(len(token_slots), in_features, generator=generator)
    lora_a = torch.randn(slots, max_rank, in_features, generator=generator) / math.sqrt(in_features)
    lora_b = torch.randn(slots, max_rank, out_features, generator=generator).transpose(1, 2)  # [S, out, R] view
    scalings = torch.rand(slots, generator=generator) + 0.5
    meta = kernels.LoraMeta.build(token_slots, ranks, scalings)
    return x, lora_a, lora_b, meta


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
def test_fp32_lora_runs_natively_not_through_the_twin(weights, monkeypatch):
    from kernels.lora_plan import NATIVE_MAX_RUN_TOKENS

    # Slot 6: a prefill run the native kernels take (many token blocks); slot 7: one past their
    # limit, left to an MKL matmul.
    x, lora_a, lora_b, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 40, NATIVE_MAX_RUN_TOKENS + 1])
    lora_a, lora_b = lora_a.to(weights), lora_b.to(weights)
    want_y = reference.lora_shrink(x, lora_a, meta)
    want = reference.lora_expand(want_y, lora_b, meta, torch.zeros(x.shape[0], lora_b.shape[1]))

    def no_twin(*args, **kwargs):
        raise AssertionError(f"the fast path for {weights} weights fell back to the torch twin")

    monkeypatch.setattr(reference, "lora_shrink", no_twin)
    monkeypatch.setattr(reference, "lora_expand", no_twin)
    plan = meta.cpu_plan
    assert [run.slot for run in plan.direct] == [6, 7] and plan.segments.count == 6
    assert [run.slot for run in plan.native_direct] == [7] and plan.native_segments.count == 7
    y = kernels.lora_shrink(x, lora_a, meta)
    got = kernels.lora_expand(y, lora_b, meta, torch.zeros(x.shape[0], lora_b.shape[1]))
    assert torch.allclose(y, want_y, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[:2] == 0)  # tokens without an adapter are untouched


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
def test_a_projection_group_is_one_native_call(weights, monkeypatch):
    """kernels.lora_apply on CPU: the fused group's shrink and every expand in one native call,
    not a shrink and expands one by one (nor the twins)."""
    from kernels import cpu

    x, _, _, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 40, 4])
    generator = torch.Generator().manual_seed(1)
    fused_a = (torch.randn(8, 32, 2, x.shape[1], generator=generator) / 15).to(weights)
    b_views = [torch.randn(8, 32, w, generator=generator).to(weights).transpose(1, 2) for w in (130, 70)]
    want = torch.zeros(x.shape[0], 200)
    for i, columns in enumerate((slice(0, 130), slice(130, 200))):
        y = reference.lora_shrink(x, fused_a[:, :, i], meta)
        reference.lora_expand(y, b_views[i], meta, want[:, columns])

    calls = []
    kernel = cpu._lora_kernel
    monkeypatch.setattr(cpu, "_lora_kernel", lambda kind, w: calls.append(kind) or kernel(kind, w))
    for name in ("lora_shrink", "lora_expand"):
        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"lora_apply fell back to {name}")

        monkeypatch.setattr(reference, name, refuse)
        monkeypatch.setattr(cpu, name, refuse)
    got = torch.zeros(x.shape[0], 200)
    group = [(b_views[0], got[:, :130]), (b_views[1], got[:, 130:])]
    kernels.lora_apply(x, fused_a.view(8, 64, x.shape[1]), group, meta)
    assert calls == ["apply"]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tokens_per_slot,by_segment", [
    ([2, 3, 2, 3, 2, 3, 2, 3], True),  # a decode step: whole segments per thread, no barrier
    ([1, 1, 1, 1, 1, 1, 120, 1], False),  # one segment outweighs the rest: the shared item lists
], ids=["balanced", "lopsided"])
def test_apply_schedules_agree_with_the_twin(tokens_per_slot, by_segment, threads):
    """The native apply splits work by segment where that shares out evenly, by items otherwise;
    both give the twin's result, at any thread count."""
    x, _, _, meta = engine_like_lora(tokens_per_slot)
    generator = torch.Generator().manual_seed(3)
    fused_a = torch.randn(8, 32, 2, x.shape[1], generator=generator) / 15
    b_views = [torch.randn(8, 32, w, generator=generator).transpose(1, 2) for w in (130, 300)]
    seg = meta.cpu_plan.native_segments
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        chosen = native.library().lorafleet_lora_apply_by_segment(seg.count, seg.starts.data_ptr(), seg.ranks.data_ptr())
        assert chosen == (by_segment and threads > 1)
        got = torch.zeros(x.shape[0], 430)
        kernels.lora_apply(x, fused_a.view(8, 64, x.shape[1]), [(b_views[0], got[:, :130]), (b_views[1], got[:, 130:])],
                           meta, impl="native")
    finally:
        torch.set_num_threads(before)
    want = torch.zeros(x.shape[0], 430)
    for i, columns in enumerate((slice(0, 130), slice(130, 430))):
        y = reference.lora_shrink(x, fused_a[:, :, i].contiguous(), meta)
        reference.lora_expand(y, b_views[i], meta, want[:, columns])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
def test_apply_with_a_run_past_the_native_limit(weights):
    """A step with a run longer than NATIVE_MAX_RUN_TOKENS: that run's shrink and expands are MKL
    matmuls into a y the native call then shares for the other segments; the sum is the twin's."""
    from kernels.lora_plan import NATIVE_MAX_RUN_TOKENS

    x, _, _, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 40, NATIVE_MAX_RUN_TOKENS + 1])
    assert meta.cpu_plan.native_direct and meta.cpu_plan.native_segments.count == 7
    generator = torch.Generator().manual_seed(4)
    fused_a = (torch.randn(8, 32, 2, x.shape[1], generator=generator) / 15).to(weights)
    b_views = [torch.randn(8, 32, w, generator=generator).to(weights).transpose(1, 2) for w in (130, 70)]
    got = torch.zeros(x.shape[0], 200)
    group = kernels.LoraGroup(fused_a.view(8, 64, x.shape[1]), [(b_views[0], slice(0, 130)), (b_views[1], slice(130, 200))],
                              200, impl="native")
    group.apply(x, got, meta)
    want = torch.zeros(x.shape[0], 200)
    for i, columns in enumerate((slice(0, 130), slice(130, 200))):
        y = reference.lora_shrink(x, fused_a[:, :, i].contiguous(), meta)
        reference.lora_expand(y, b_views[i], meta, want[:, columns])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_prepared_group_in_a_decode_step_is_one_native_call_and_nothing_else(monkeypatch):
    """The engine's decode path: LoraGroup.apply goes straight to the native kernel, without the
    general lora_apply (its per-call checks and part table are what the group exists to skip)."""
    from kernels import cpu

    x, lora_a, lora_b, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 4, 4])
    want = torch.zeros(x.shape[0], 140)
    kernels.lora_apply(x, lora_a, [(lora_b, want[:, 10:])], meta)
    group = kernels.LoraGroup(lora_a, [(lora_b, slice(10, 140))], 140)
    calls = []
    kernel = group._native.kernel
    monkeypatch.setattr(group._native, "kernel", lambda *args: calls.append(len(args)) or kernel(*args))

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step's group use went through the general path")

    monkeypatch.setattr(cpu, "lora_apply", refuse)
    got = torch.zeros(x.shape[0], 140)
    group.apply(x, got, meta)
    assert len(calls) == 1
    assert torch.equal(got, want)  # the same kernel, the same order of sums: bit for bit


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("block_size", [5, 16, 40])  # 40: the vector exp's full and partial 16-lane chunks
def test_decode_attention_reads_the_paged_cache_in_place(group, block_size, monkeypatch):
    """Decode sequences of very different lengths over a shuffled head-major cache that holds NaN
    everywhere outside the contexts; prefill chunks in the same batch still go through SDPA.
    Queries are scaled up so that scores span tens of units: the softmax's exp over a wide range."""
    generator = torch.Generator().manual_seed(group * 100 + block_size)
    kv_heads, head_dim = 2, 40
    spec = [(37, 1), (1, 1), (90, 1), (23, 23), (16, 1), (50, 13), (5, 1)]  # (context, query length)
    needed = [math.ceil(length / block_size) for length, _ in spec]
    num_blocks = 2 * sum(needed) + 3
    physical = torch.randperm(num_blocks, generator=generator)
    storage = torch.full((2, num_blocks, kv_heads, block_size, head_dim), float("nan"))
    tables = torch.full((len(spec), max(needed) + 2), -1, dtype=torch.int32)
    used = 0
    for b, (length, _) in enumerate(spec):
        blocks = physical[used : used + 2 * needed[b] : 2]
        used += 2 * needed[b]
        tables[b, : needed[b]] = blocks.to(torch.int32)
        for p in range(length):
            storage[:, blocks[p // block_size], :, p % block_size] = torch.randn(2, kv_heads, head_dim, generator=generator)
    k_cache, v_cache = (storage[i].transpose(1, 2) for i in range(2))  # head-major [blocks, block_size, heads, dim]
    q_lens = [q_len for _, q_len in spec]
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = 5 * torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=generator)
    seq_lens = torch.tensor([length for length, _ in spec], dtype=torch.int32)
    inputs = (q, k_cache, v_cache, tables, seq_lens, query_start, head_dim**-0.5)

    want = reference.paged_attention(*inputs)
    monkeypatch.setattr(reference, "paged_attention", lambda *a, **k: pytest.fail("fell back to the twin"))
    got = kernels.paged_attention(*inputs, impl="native")
    assert not torch.isnan(got).any()
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_attention_outside_the_native_layout_uses_the_twin():
    """A token-major cache or half precision: kernels.cpu hands the call to the twin unchanged."""
    q = torch.randn(2, 4, 16)
    cache = torch.randn(3, 8, 2, 16)  # contiguous [blocks, block_size, heads, dim]: not head-major
    tables = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 3], dtype=torch.int32)
    start = torch.tensor([0, 1, 2], dtype=torch.int32)
    want = reference.paged_attention(q, cache, cache, tables, seq_lens, start, 0.25)
    assert torch.equal(cpu.paged_attention(q, cache, cache, tables, seq_lens, start, 0.25), want)
    half = [t.bfloat16() for t in (q, cache)]
    want = reference.paged_attention(half[0], half[1], half[1], tables, seq_lens, start, 0.25)
    assert torch.equal(cpu.paged_attention(half[0], half[1], half[1], tables, seq_lens, start, 0.25), want)
