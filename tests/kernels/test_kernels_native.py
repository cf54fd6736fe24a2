"""The native CPU kernels: they build here, the native backend really runs them (never the torch
paths), decode attention matches the specification, inputs they cannot take raise naming why,
and a machine without a compiler gets the torch backend from kernels="auto" with a clear reason."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

import kernels
from kernels import reference
from kernels.cpu import attention, build, native
from kernels.cpu.lora_plan import NATIVE_MAX_RUN_TOKENS

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the native kernels cannot build on this machine")


def test_the_library_builds_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path))
    # The build and cache mechanics, at -O0: a -O3 build takes ~40 s here, and the suite's first
    # native call has already built (or found) the real library.
    monkeypatch.setattr(build, "FLAGS", tuple("-O0" if flag == "-O3" else flag for flag in build.FLAGS))
    first = build._build()
    assert first.parent == tmp_path and first.name.startswith("liblorafleet_kernels-")
    stamp = first.stat().st_mtime_ns
    assert build._build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert list(tmp_path.iterdir()) == [first]  # no scratch folder left behind
    assert build.available()


def test_a_failing_compiler_means_unavailable_with_its_message(tmp_path, monkeypatch):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no such compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.NativeUnavailable, match="no such compiler"):
        build._build()


@pytest.fixture
def without_the_library():
    """The library and the backends built anew in the test (its failure is remembered once per
    process), and anew after it, once the environment is back."""
    def clear():
        build._load.cache_clear()
        build._warn_once.cache_clear()
        kernels.backends._cached.cache_clear()

    clear()
    yield
    clear()


def test_without_a_working_compiler_auto_chooses_torch_and_says_why_once(tmp_path, monkeypatch, caplog,
                                                                        without_the_library):
    calls = tmp_path / "calls"
    broken = tmp_path / "cc"
    broken.write_text(f"#!/bin/sh\necho run >> {calls}\necho 'cc: fatal error: no such compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    token_slots, ranks, scalings = torch.tensor([0, -1], dtype=torch.int32), torch.tensor([4]), torch.ones(1)
    x, lora_a = torch.randn(2, 8), torch.randn(1, 4, 8)
    want = reference.lora_shrink(x, lora_a, kernels.LoraMeta.build(token_slots, ranks, scalings))
    with caplog.at_level(logging.WARNING, logger="kernels.cpu.build"):
        for _ in range(3):
            assert not build.available()
            auto = kernels.backend("auto", "cpu", attention=(4, 2, 16, 16))
            assert auto.name == "torch"
            got = auto.lora_shrink(x, lora_a, auto.lora_meta(token_slots, ranks, scalings))
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
            with pytest.raises(ValueError, match="kernels='native': .*no such compiler.*use kernels='torch'"):
                kernels.backend("native", "cpu")
    assert calls.read_text().count("run") == 1  # the failure is remembered, not retried per call
    reasons = [r.getMessage() for r in caplog.records if "no such compiler" in r.getMessage()]
    assert len(reasons) == 1 and "kernels='auto' chooses the torch backend" in reasons[0]
    with pytest.raises(build.NativeUnavailable, match="no such compiler"):
        build.library()


def test_without_any_compiler_native_raises_naming_it(tmp_path, monkeypatch, without_the_library):
    missing = tmp_path / "bin" / "cc"
    monkeypatch.setenv("CC", str(missing))
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"kernels='native': compiling the native kernels failed: .*{missing}"):
        kernels.backend("native", "cpu")
    assert kernels.backend("auto", "cpu").name == "torch"


def native_backend() -> kernels.Backend:
    return kernels.backend("native", "cpu")


def engine_like_lora(tokens_per_slot: list[int], in_features=200, out_features=130, slots=8, max_rank=32):
    """A decode-like batch in the engine's (rank, slot) order over a rank-major B pool, its meta
    built by the native backend."""
    generator = torch.Generator().manual_seed(0)
    ranks = torch.tensor([(4, 8, 16, 32)[s % 4] for s in range(slots)], dtype=torch.int32)
    order = sorted(range(slots), key=lambda s: (int(ranks[s]), s))
    token_slots = torch.tensor([-1, -1] + [s for s in order for _ in range(tokens_per_slot[s])], dtype=torch.int32)
    x = torch.randn(len(token_slots), in_features, generator=generator)
    lora_a = torch.randn(slots, max_rank, in_features, generator=generator) / math.sqrt(in_features)
    lora_b = torch.randn(slots, max_rank, out_features, generator=generator).transpose(1, 2)  # [S, out, R] view
    scalings = torch.rand(slots, generator=generator) + 0.5
    meta = native_backend().lora_meta(token_slots, ranks, scalings)
    return x, lora_a, lora_b, meta


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
def test_fp32_lora_runs_natively_not_through_torch(weights, monkeypatch):
    # Slot 6: a prefill run the native kernels take (many token blocks); slot 7: one past their
    # limit, left to an MKL matmul.
    x, lora_a, lora_b, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 40, NATIVE_MAX_RUN_TOKENS + 1])
    lora_a, lora_b = lora_a.to(weights), lora_b.to(weights)
    want_y = reference.lora_shrink(x, lora_a, meta)
    want = reference.lora_expand(want_y, lora_b, meta, torch.zeros(x.shape[0], lora_b.shape[1]))

    def no_torch(*args, **kwargs):
        raise AssertionError(f"the fast path for {weights} weights fell back to the torch backend")

    monkeypatch.setattr(reference, "lora_shrink", no_torch)
    monkeypatch.setattr(reference, "lora_expand", no_torch)
    plan = meta.plan
    assert [run.slot for run in plan.direct] == [7] and plan.segments.count == 7
    be = native_backend()
    y = be.lora_shrink(x, lora_a, meta)
    got = be.lora_expand(y, lora_b, meta, torch.zeros(x.shape[0], lora_b.shape[1]))
    assert torch.allclose(y, want_y, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[:2] == 0)  # tokens without an adapter are untouched


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
def test_a_projection_group_is_one_native_call(weights, monkeypatch):
    """The native lora_apply: the fused group's shrink and every expand in one native call, not a
    shrink and expands one by one (nor the torch backend's)."""
    x, _, _, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 40, 4])
    generator = torch.Generator().manual_seed(1)
    fused_a = (torch.randn(8, 32, 2, x.shape[1], generator=generator) / 15).to(weights)
    b_views = [torch.randn(8, 32, w, generator=generator).to(weights).transpose(1, 2) for w in (130, 70)]
    want = torch.zeros(x.shape[0], 200)
    for i, columns in enumerate((slice(0, 130), slice(130, 200))):
        y = reference.lora_shrink(x, fused_a[:, :, i], meta)
        reference.lora_expand(y, b_views[i], meta, want[:, columns])

    calls = []
    kernel = native._lora_kernel
    monkeypatch.setattr(native, "_lora_kernel", lambda kind, w: calls.append(kind) or kernel(kind, w))
    for name in ("lora_shrink", "lora_expand"):
        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"lora_apply fell back to {name}")

        for module in (reference, native):
            monkeypatch.setattr(module, name, refuse)
    got = torch.zeros(x.shape[0], 200)
    group = [(b_views[0], got[:, :130]), (b_views[1], got[:, 130:])]
    native_backend().lora_apply(x, fused_a.view(8, 64, x.shape[1]), group, meta)
    assert calls == ["apply"]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tokens_per_slot,by_segment", [
    ([2, 3, 2, 3, 2, 3, 2, 3], True),  # a decode step: whole segments per thread, no barrier
    ([1, 1, 1, 1, 1, 1, 120, 1], False),  # one segment outweighs the rest: the shared item lists
], ids=["balanced", "lopsided"])
def test_apply_schedules_agree_with_the_specification(tokens_per_slot, by_segment, threads):
    """The native apply splits work by segment where that shares out evenly, by items otherwise;
    both give the twin's result, at any thread count."""
    x, _, _, meta = engine_like_lora(tokens_per_slot)
    generator = torch.Generator().manual_seed(3)
    fused_a = torch.randn(8, 32, 2, x.shape[1], generator=generator) / 15
    b_views = [torch.randn(8, 32, w, generator=generator).transpose(1, 2) for w in (130, 300)]
    seg = meta.plan.segments
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        chosen = build.library().lorafleet_lora_apply_by_segment(seg.count, seg.starts.data_ptr(), seg.ranks.data_ptr())
        assert chosen == (by_segment and threads > 1)
        got = torch.zeros(x.shape[0], 430)
        native_backend().lora_apply(x, fused_a.view(8, 64, x.shape[1]),
                                    [(b_views[0], got[:, :130]), (b_views[1], got[:, 130:])], meta)
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
    matmuls beside the native call for the other segments; the sum is the specification's."""
    x, _, _, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 40, NATIVE_MAX_RUN_TOKENS + 1])
    assert meta.plan.direct and meta.plan.segments.count == 7
    generator = torch.Generator().manual_seed(4)
    fused_a = (torch.randn(8, 32, 2, x.shape[1], generator=generator) / 15).to(weights)
    b_views = [torch.randn(8, 32, w, generator=generator).to(weights).transpose(1, 2) for w in (130, 70)]
    got = torch.zeros(x.shape[0], 200)
    group = native_backend().lora_group(fused_a.view(8, 64, x.shape[1]),
                                        [(b_views[0], slice(0, 130)), (b_views[1], slice(130, 200))], 200)
    group.apply(x, got, meta)
    want = torch.zeros(x.shape[0], 200)
    for i, columns in enumerate((slice(0, 130), slice(130, 200))):
        y = reference.lora_shrink(x, fused_a[:, :, i].contiguous(), meta)
        reference.lora_expand(y, b_views[i], meta, want[:, columns])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_prepared_group_in_a_decode_step_is_one_native_call_and_nothing_else(monkeypatch):
    """The engine's decode path: a native group's apply goes straight to the native kernel, without
    the general lora_apply (its per-call checks and part table are what the group exists to skip)."""
    x, lora_a, lora_b, meta = engine_like_lora([1, 3, 2, 5, 1, 2, 4, 4])
    be = native_backend()
    want = torch.zeros(x.shape[0], 140)
    be.lora_apply(x, lora_a, [(lora_b, want[:, 10:])], meta)
    group = be.lora_group(lora_a, [(lora_b, slice(10, 140))], 140)
    assert isinstance(group, native.NativeGroup)
    calls = []
    kernel = group.kernel
    monkeypatch.setattr(group, "kernel", lambda *args: calls.append(len(args)) or kernel(*args))

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step's group use went through the general path")

    for name in ("lora_apply", "lora_shrink", "lora_expand"):
        monkeypatch.setattr(native, name, refuse)
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
    for module in (reference, attention):
        monkeypatch.setattr(module, "paged_attention", lambda *a, **k: pytest.fail("fell back to torch"))
    got = native_backend().paged_attention(*inputs)
    assert not torch.isnan(got).any()
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_attention_outside_the_native_layout_raises():
    """A token-major cache or half precision is the torch backend's: the native attention raises
    naming the reason (no silent fallback), and kernels.backend decides so up front."""
    be = native_backend()
    q = torch.randn(2, 4, 16)
    cache = torch.randn(3, 8, 2, 16)  # contiguous [blocks, block_size, heads, dim]: not head-major
    tables = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 3], dtype=torch.int32)
    start = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="head-major caches"):
        be.paged_attention(q, cache, cache, tables, seq_lens, start, 0.25)
    head_major = cache.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="int32 block tables"):
        be.paged_attention(q, head_major, head_major, tables.long(), seq_lens, start, 0.25)
    want = reference.paged_attention(q, head_major, head_major, tables, seq_lens, start, 0.25)
    got = be.paged_attention(q, head_major, head_major, tables, seq_lens, start, 0.25)
    assert float((got - want).norm() / want.norm()) < 1e-5
    half = [t.bfloat16() for t in (q, head_major)]
    with pytest.raises(ValueError, match="float32, not bfloat16; use kernels='torch'"):
        be.paged_attention(half[0], half[1], half[1], tables, seq_lens, start, 0.25)
    max_q_per_kv, max_head_dim, max_block_size = native._attention_limits()
    for shape, reason in [
        ((2 * (max_q_per_kv + 1), 2, 16, 16), "query heads per KV head"),
        ((4, 2, max_head_dim + 1, 16), "head_dim <="),
        ((4, 2, 16, max_block_size + 1), "block_size <="),
    ]:
        with pytest.raises(ValueError, match=f"kernels='native': .*{reason}"):
            kernels.backend("native", "cpu", attention=shape)
        assert kernels.backend("auto", "cpu", attention=shape).name == "torch"
    assert kernels.backend("auto", "cpu", attention=(4, 2, 16, 16)) is be
    assert kernels.backend("auto", "cpu", dtype=torch.bfloat16, attention=(4, 2, 16, 16)).name == "torch"
    with pytest.raises(ValueError, match="float32 activations"):
        kernels.backend("native", "cpu", dtype=torch.bfloat16)


def test_a_native_group_refuses_what_it_cannot_lay_out():
    """NativeGroup raises at construction (the engine builds its groups once) rather than return
    something that would fall back later."""
    lora_a, b = torch.randn(2, 8, 16), torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="float32 or bfloat16 weights"):
        native.NativeGroup(lora_a.half(), [(b.half(), slice(0, 10))], 10)
    with pytest.raises(ValueError, match="1 to 8 parts"):
        native.NativeGroup(lora_a, [None, None], 10)
    with pytest.raises(ValueError, match="1 to 8 parts"):
        native.NativeGroup(torch.randn(2, 72, 16), [(b, slice(0, 10))] * 9, 10)
    with pytest.raises(ValueError, match="do not fit"):
        native.NativeGroup(lora_a, [(b, slice(5, 15))], 12)
    with pytest.raises(ValueError, match="of A's dtype"):
        native.NativeGroup(lora_a, [(b.bfloat16(), slice(0, 10))], 10)
    with pytest.raises(ValueError, match="unit inner stride"):
        native.NativeGroup(lora_a.transpose(1, 2).contiguous().transpose(1, 2), [(b, slice(0, 10))], 10)
