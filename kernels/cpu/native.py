"""The native backend's kernels: the C library (``c/``, built by ``build``) over the step's plan.

- LoRA: float32 activations and outputs, float32 or bfloat16 weights, unit inner strides. The
  plan's direct runs (past `lora_plan.NATIVE_MAX_RUN_TOKENS`) stay one MKL matmul each; every
  other segment is one native call per projection group (`NativeGroup`: the shrink and every
  part's expand, its part table laid out once).
- Attention: float32 queries over a float32 head-major cache. All decode sequences are one
  native call per layer that reads the paged cache in place; prefill chunks stay fused SDPA.

Each function has `kernels.reference`'s signature and result. Inputs the kernels cannot take
raise `ValueError` naming what is wrong: the backend checks the engine's dtypes and shapes once,
when it is built (`lora_unsupported`, `attention_unsupported`), so serving never meets one.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.cpu import attention, build
from kernels.cpu.attention_plan import is_head_major
from kernels.cpu.lora_plan import DirectRun
from kernels.meta import LoraMeta
from kernels.reference import check_apply, check_expand, check_shrink

_F32 = torch.float32
_F32_BYTES = 4  # outputs are float32: a column offset is 4 bytes a column
# Weight dtype -> suffix of the native LoRA kernels that read it.
_WEIGHT_KERNELS = {torch.float32: "f32", torch.bfloat16: "bf16w"}
_MAX_PARTS = 8  # APPLY_MAX_PARTS in lora.c


class LoraPart(ctypes.Structure):
    """One part of a projection group as the native apply reads it (`lora_part` in lora.c)."""

    _fields_ = [
        ("b", ctypes.c_void_p),
        ("b_slot_stride", ctypes.c_int64),
        ("b_out_stride", ctypes.c_int64),
        ("b_rank_stride", ctypes.c_int64),
        ("out_dim", ctypes.c_int64),
        ("out_offset", ctypes.c_int64),  # bytes from the output base passed with the call
        ("out_stride", ctypes.c_int64),
    ]


def lora_unsupported(activations: torch.dtype, weights: torch.dtype) -> str | None:
    """Why the native LoRA kernels cannot serve these dtypes, or None when they can."""
    if activations != _F32:
        return f"the native LoRA kernels take float32 activations, not {str(activations).removeprefix('torch.')}"
    if weights not in _WEIGHT_KERNELS:
        return f"the native LoRA kernels take float32 or bfloat16 weights, not {str(weights).removeprefix('torch.')}"
    return None


def _require(reason: str | None) -> None:
    if reason is not None:
        raise ValueError(f"{reason}; use kernels='torch'")


def _check_lora_call(what: str, activations: torch.Tensor, weights: torch.Tensor, meta: LoraMeta) -> None:
    _require(lora_unsupported(activations.dtype, weights.dtype))
    if activations.device.type != "cpu" or weights.device.type != "cpu":
        raise ValueError(f"{what}: the native kernels run on CPU tensors only")
    if activations.stride(-1) != 1:
        raise ValueError(f"{what}: the native kernels need rows with a unit inner stride")
    if meta.has_lora and (meta.plan is None or meta.plan.segments is None):
        raise ValueError(f"{what}: the LoraMeta has no native plan; build it with the native backend")


def _lora_kernel(kind: str, weights: torch.Tensor):
    return getattr(build.library(), f"lorafleet_lora_{kind}_{_WEIGHT_KERNELS[weights.dtype]}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """`kernels.reference.lora_shrink`: direct runs as matmuls, the other segments one native call."""
    check_shrink(x, lora_a, meta)
    _check_lora_call("lora_shrink", x, lora_a, meta)
    if lora_a.stride(-1) != 1:
        raise ValueError("lora_shrink: the native kernels need A rows with a unit inner stride")
    y = torch.zeros(meta.num_tokens, lora_a.shape[1], dtype=_F32)
    if not meta.has_lora:
        return y
    plan = meta.plan
    _shrink_direct_runs(x, lora_a, plan.direct, y)
    seg = plan.segments
    if seg.count:
        status = _lora_kernel("shrink", lora_a)(
            x.data_ptr(), x.stride(0), x.shape[1], lora_a.data_ptr(), lora_a.stride(0), lora_a.stride(1),
            y.data_ptr(), y.stride(0), *_segment_args(seg, with_scalings=False),
        )
        if status:
            raise MemoryError("lora_shrink: the native kernel could not allocate its work list")
    return y


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
    """`kernels.reference.lora_expand` in place: direct runs as matmuls, the other segments one
    native call. y may be a strided view (a fused shrink's interleaved part), B any layout."""
    check_expand(y, lora_b, meta, base)
    _check_lora_call("lora_expand", base, lora_b, meta)
    if y.dtype != _F32:
        raise ValueError("lora_expand: the native kernels take a float32 y")
    if not meta.has_lora:
        return base
    plan = meta.plan
    _expand_direct_runs(y, lora_b, plan.direct, base)
    seg = plan.segments
    if seg.count:
        status = _lora_kernel("expand", lora_b)(
            y.data_ptr(), y.stride(0), y.stride(1), lora_b.data_ptr(), *lora_b.stride(), lora_b.shape[1],
            base.data_ptr(), base.stride(0), *_segment_args(seg, with_scalings=True),
        )
        if status:
            raise MemoryError("lora_expand: the native kernel could not allocate its buffers")
    return base


def _segment_args(seg, with_scalings: bool) -> tuple[int, ...]:
    count, *addresses = seg.native_args
    return (count, *(addresses if with_scalings else addresses[:-1]))


def lora_apply(x: torch.Tensor, lora_a: torch.Tensor, parts: list, meta: LoraMeta) -> None:
    """`kernels.reference.lora_apply` for outputs anywhere in memory (the kernel suite's entry
    point; the engine's groups use `NativeGroup`)."""
    check_apply(x, lora_a, parts, meta)
    live = [part for part in parts if part is not None]
    for b, out in live:
        _check_lora_call("lora_apply", out, b, meta)
        if b.dtype != lora_a.dtype:
            raise ValueError("lora_apply: every part's B must have A's dtype")
    _check_lora_call("lora_apply", x, lora_a, meta)
    if not meta.has_lora:  # no plan to run (nor any work)
        return
    table = _part_table([None if part is None else (part[0], part[1].data_ptr(), part[1].stride(0)) for part in parts])
    _apply(_lora_kernel("apply", lora_a), x, lora_a, table, 0, meta)  # outputs at absolute addresses: base 0
    _direct_runs(x, lora_a, parts, meta)


class NativeGroup:
    """One projection group of an adapter pool's layer, laid out once for the native apply: weights
    checked, part table at column offsets into an output of fixed width. Each use is then a few
    comparisons and one native call, as a decode step makes over a hundred of them."""

    def __init__(self, lora_a: torch.Tensor, parts: list[tuple[torch.Tensor, slice] | None], out_width: int) -> None:
        live = [part for part in parts if part is not None]
        _require(lora_unsupported(_F32, lora_a.dtype))
        if not live or len(parts) > _MAX_PARTS:
            raise ValueError(f"a native group has 1 to {_MAX_PARTS} parts, some adapted; got {len(parts)}")
        if lora_a.device.type != "cpu" or lora_a.stride(-1) != 1:
            raise ValueError("a native group's A must be a CPU tensor with a unit inner stride")
        for b, columns in live:
            if b.dtype != lora_a.dtype or b.device.type != "cpu":
                raise ValueError("a native group's B must be CPU tensors of A's dtype")
            if columns.step not in (None, 1) or not 0 <= columns.start < columns.stop == columns.start + b.shape[1] <= out_width:
                raise ValueError(f"a part's columns {columns} do not fit B's {b.shape[1]} outputs in {out_width}")
        self.lora_a, self.parts, self.out_width = lora_a, parts, out_width
        self.kernel = _lora_kernel("apply", lora_a)
        self.in_dim = lora_a.shape[2]
        self.table = _part_table([None if part is None else (part[0], part[1].start * _F32_BYTES, out_width)
                                  for part in parts])

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta) -> None:
        """out [T, out_width] += the group's LoRA term of x [T, in]."""
        tokens = meta.num_tokens
        if x.dtype != _F32 or x.shape != (tokens, self.in_dim) or x.stride(1) != 1:
            raise ValueError(f"native group: x must be float32 [{tokens}, {self.in_dim}] with unit inner stride")
        # (A one-row output's row stride is never used, and torch leaves it arbitrary.)
        rows_laid_out = out.stride(0) == self.out_width or tokens == 1
        if out.dtype != _F32 or out.shape != (tokens, self.out_width) or out.stride(1) != 1 or not rows_laid_out:
            raise ValueError(f"native group: out must be a contiguous float32 [{tokens}, {self.out_width}]")
        if meta.num_slots != self.lora_a.shape[0] or meta.max_rank * len(self.parts) > self.lora_a.shape[1]:
            raise ValueError("native group: the LoraMeta does not fit this pool's slots and ranks")
        if not meta.has_lora:
            return
        _apply(self.kernel, x, self.lora_a, self.table, out.data_ptr(), meta)
        if meta.plan.direct:
            parts = [None if part is None else (part[0], out[:, part[1]]) for part in self.parts]
            _direct_runs(x, self.lora_a, parts, meta)


def _part_table(parts: list) -> ctypes.Array:
    """The native apply's part table from (B, output byte offset from the call's base, output row
    stride) per part, or None for a skipped one."""
    table = (LoraPart * len(parts))()
    for entry, part in zip(table, parts, strict=True):
        if part is not None:
            b, offset, stride = part
            entry.b, entry.out_offset, entry.out_stride, entry.out_dim = b.data_ptr(), offset, stride, b.shape[1]
            entry.b_slot_stride, entry.b_out_stride, entry.b_rank_stride = b.stride()
    return table


def _apply(kernel, x: torch.Tensor, lora_a: torch.Tensor, table: ctypes.Array, out_base: int, meta: LoraMeta) -> None:
    """One native apply over the plan's segments; the kernel keeps the shrink's result in a buffer of its own."""
    seg = meta.plan.segments
    if not seg.count:
        return
    status = kernel(x.data_ptr(), x.stride(0), x.shape[1], lora_a.data_ptr(), lora_a.stride(0), lora_a.stride(1),
                    None, lora_a.shape[1], len(table), table, out_base, *seg.native_args)
    if status:
        raise MemoryError("lora_apply: the native kernel could not allocate its work lists")


def _direct_runs(x: torch.Tensor, lora_a: torch.Tensor, parts: list, meta: LoraMeta) -> None:
    """The plan's longest single-slot runs (prefill chunks): MKL matmuls on views."""
    if not meta.plan.direct:
        return
    n = len(parts)
    y = torch.empty(meta.num_tokens, lora_a.shape[1], dtype=_F32)  # only the runs' rows are read
    _shrink_direct_runs(x, lora_a, meta.scaled_ranks(n).plan.direct, y)
    per_part = y.view(y.shape[0], -1, n)
    for i, part in enumerate(parts):
        if part is not None:
            _expand_direct_runs(per_part[:, :, i], part[0], meta.plan.direct, part[1])


def _shrink_direct_runs(x: torch.Tensor, lora_a: torch.Tensor, runs: tuple[DirectRun, ...], y: torch.Tensor) -> None:
    for run in runs:
        torch.matmul(x[run.start : run.end], lora_a[run.slot, : run.rank].float().t(),
                     out=y[run.start : run.end, : run.rank])


def _expand_direct_runs(y: torch.Tensor, lora_b: torch.Tensor, runs: tuple[DirectRun, ...], base: torch.Tensor) -> None:
    for run in runs:
        base[run.start : run.end].addmm_(y[run.start : run.end, : run.rank], lora_b[run.slot, :, : run.rank].float().t(),
                                         alpha=run.scaling)


@functools.cache
def _attention_limits() -> tuple[int, int, int]:
    """The native decode kernel's largest GQA ratio, head_dim and block_size (fixed-size buffers)."""
    limit = build.library().lorafleet_attention_limits
    return limit(0), limit(1), limit(2)


def attention_unsupported(dtype: torch.dtype, n_heads: int, kv_heads: int, head_dim: int, block_size: int) -> str | None:
    """Why the native decode attention cannot serve a model of these shapes, or None when it can."""
    max_q_per_kv, max_head_dim, max_block_size = _attention_limits()
    if dtype != _F32:
        return f"the native attention takes float32, not {str(dtype).removeprefix('torch.')}"
    if n_heads % kv_heads or n_heads // kv_heads > max_q_per_kv:
        return f"the native attention serves up to {max_q_per_kv} query heads per KV head"
    if head_dim > max_head_dim or block_size > max_block_size:
        return f"the native attention serves head_dim <= {max_head_dim} and block_size <= {max_block_size}"
    return None


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """`kernels.reference.paged_attention`: decode sequences natively, prefill chunks by the torch backend's SDPA."""
    num_tokens, n_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    _require(attention_unsupported(q.dtype, n_heads, kv_heads, head_dim, block_size))
    if not (
        k_cache.dtype == v_cache.dtype == _F32 and q.stride(2) == 1 and q.stride(1) == head_dim
        and is_head_major(k_cache) and is_head_major(v_cache) and k_cache.stride() == v_cache.stride()
        and block_tables.dtype == seq_lens.dtype == torch.int32
        and block_tables.stride(-1) == 1 and seq_lens.is_contiguous()
    ):
        raise ValueError("paged_attention: the native kernel reads float32 head-major caches (KVCache's layout), "
                         "int32 block tables and queries with contiguous heads")
    out = torch.empty(q.shape, dtype=q.dtype)  # contiguous: the kernel writes head h at h * head_dim
    if num_tokens == 0:
        return out
    plan = attention.plan_for(block_tables, seq_lens, query_start_loc, block_size, kv_heads, True)
    if plan.decode_seqs.numel():
        status = build.library().lorafleet_paged_decode_attention_f32(
            q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.stride(0), k_cache.stride(2), block_size, head_dim, n_heads, kv_heads,
            block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
            plan.decode_seqs.data_ptr(), plan.decode_q_rows.data_ptr(), plan.decode_seqs.numel(), scale,
        )
        if status:
            raise ValueError("paged_attention: shapes past the native kernel's limits")
    attention.prefill_attention(q, k_cache, v_cache, plan, scale, out)
    return out
