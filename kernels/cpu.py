"""The CPU fast path: the native kernels (``kernels.native``) where they apply, the torch twins
for the rest, with the twins' exact signatures and semantics.

- LoRA: float32 activations, float32 or bfloat16 weights, unit inner strides. A plan's single-
  slot runs past `lora_plan.NATIVE_MAX_RUN_TOKENS` stay one MKL matmul each; every other slot
  (decode tokens and most prefill chunks) is one native call per projection group
  (`lora_apply`: the shrink and every part's expand; `NativeGroup` lays a slot pool layer's
  group out once so a decode step's use skips the per-call checks).
- Attention: float32 queries over a float32 head-major cache. All decode sequences are one
  native call per layer that reads the paged cache in place; prefill chunks stay fused SDPA.

Anything else (half precision, other layouts, shapes past the kernels' limits) goes to the
torch twin unchanged, so callers never need to know which ran.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import native, reference
from kernels.attention_plan import is_head_major
from kernels.meta import LoraMeta

_F32 = torch.float32
_F32_BYTES = 4  # outputs are float32: a column offset is 4 bytes a column
# Weight dtype -> suffix of the native LoRA kernels that read it.
_WEIGHT_KERNELS = {torch.float32: "f32", torch.bfloat16: "bf16w"}


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _lora_native_ok(activations: torch.Tensor, weights: torch.Tensor) -> bool:
    """Dtypes and devices the native kernels read; the callers add their layout needs."""
    return (
        activations.dtype == _F32 and weights.dtype in _WEIGHT_KERNELS
        and activations.device.type == weights.device.type == "cpu"
        and activations.stride(-1) == 1
    )


def _lora_kernel(kind: str, weights: torch.Tensor):
    return getattr(native.library(), f"lorafleet_lora_{kind}_{_WEIGHT_KERNELS[weights.dtype]}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """y[t, :rank] = x[t] A[slot]ᵀ (float32 [T, R]; other entries 0), as `reference.lora_shrink`."""
    plan = meta.cpu_plan
    if plan is None or not _lora_native_ok(x, lora_a) or lora_a.stride(-1) != 1:
        return reference.lora_shrink(x, lora_a, meta)
    reference.check_shrink(x, lora_a, meta)
    y = torch.zeros(meta.num_tokens, lora_a.shape[1], dtype=_F32)
    reference.shrink_direct_runs(x, lora_a, plan.native_direct, y)
    seg = plan.native_segments
    if seg.count:
        status = _lora_kernel("shrink", lora_a)(
            _ptr(x), x.stride(0), x.shape[1], _ptr(lora_a), lora_a.stride(0), lora_a.stride(1),
            _ptr(y), y.stride(0), seg.count, _ptr(seg.starts), _ptr(seg.rows), _ptr(seg.slots), _ptr(seg.ranks),
        )
        if status:
            raise MemoryError("lora_shrink: the native kernel could not allocate its work list")
    return y


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
    """base[t] += scaling · y[t, :rank] B[slot][:, :rank]ᵀ in place, as `reference.lora_expand`."""
    plan = meta.cpu_plan
    # y may be a strided view (a fused shrink's interleaved part) and B any layout: only base needs
    # a unit inner stride.
    if plan is None or y.dtype != _F32 or not _lora_native_ok(base, lora_b):
        return reference.lora_expand(y, lora_b, meta, base)
    reference.check_expand(y, lora_b, meta, base)
    reference.expand_direct_runs(y, lora_b, plan.native_direct, base)
    seg = plan.native_segments
    if seg.count:
        status = _lora_kernel("expand", lora_b)(
            _ptr(y), y.stride(0), y.stride(1), _ptr(lora_b), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
            lora_b.shape[1], _ptr(base), base.stride(0),
            seg.count, _ptr(seg.starts), _ptr(seg.rows), _ptr(seg.slots), _ptr(seg.ranks), _ptr(seg.scalings),
        )
        if status:
            raise MemoryError("lora_expand: the native kernel could not allocate its buffers")
    return base


# Fields per part of the native apply's part table (see lora.c, APPLY_PART_FIELDS), and its limit.
_APPLY_PART_FIELDS = 7
_APPLY_MAX_PARTS = 8


def lora_apply(x: torch.Tensor, lora_a: torch.Tensor, parts: list, meta: LoraMeta) -> bool:
    """`kernels.lora_apply` as one native call; False (nothing done) where the kernel does not apply."""
    plan = meta.cpu_plan
    live = [part for part in parts if part is not None]
    if (
        plan is None or not live or len(parts) > _APPLY_MAX_PARTS
        or not _lora_native_ok(x, lora_a) or lora_a.stride(-1) != 1
        or any(b.dtype != lora_a.dtype or not _lora_native_ok(out, b) for b, out in live)
    ):
        return False
    n = len(parts)
    stacked = meta.scaled_ranks(n) if n > 1 else meta
    reference.check_apply(x, lora_a, parts, meta)
    y = None  # the shrink's result: the native kernel's own buffer unless matmuls share it
    if plan.native_direct:  # the longest single-slot runs: MKL matmuls on views, as the twins do
        y = torch.empty(meta.num_tokens, lora_a.shape[1], dtype=_F32)  # only the rows of the plan are read
        reference.shrink_direct_runs(x, lora_a, stacked.cpu_plan.native_direct, y)
        per_part = y.view(y.shape[0], -1, n)
        for i, part in enumerate(parts):
            if part is not None:
                reference.expand_direct_runs(per_part[:, :, i], part[0], plan.native_direct, part[1])
    if plan.native_segments.count:  # outputs at absolute addresses: out_base 0
        table = _part_table([None if part is None else (part[0], _ptr(part[1]), part[1].stride(0)) for part in parts])
        _run_apply(_lora_kernel("apply", lora_a), x, _a_args(lora_a), y, lora_a.shape[1], n, table, 0,
                   plan.native_segments)
    return True


def _part_table(parts: list) -> ctypes.Array:
    """The native apply's part table from (B, output byte offset from out_base, output row
    stride) per part, or None for a skipped one (a ctypes array: a third of the cost of a tensor,
    on every projection of every step)."""
    return (ctypes.c_int64 * (_APPLY_PART_FIELDS * len(parts)))(*[
        field for part in parts
        for field in ((0,) * _APPLY_PART_FIELDS if part is None
                      else (_ptr(part[0]), *part[0].stride(), part[0].shape[1], part[1], part[2]))
    ])


def _a_args(lora_a: torch.Tensor) -> tuple[int, int, int]:
    return _ptr(lora_a), lora_a.stride(0), lora_a.stride(1)


def _run_apply(kernel, x: torch.Tensor, a_args: tuple, y: torch.Tensor | None, y_stride: int, n: int, table,
               out_base: int, seg) -> None:
    """One native apply; y None: the kernel keeps the shrink's result in a buffer of its own."""
    status = kernel(x.data_ptr(), x.stride(0), x.shape[1], *a_args, None if y is None else y.data_ptr(), y_stride,
                    n, table, out_base, *seg.native_args)
    if status:
        raise MemoryError("lora_apply: the native kernel could not allocate its work lists")


class NativeGroup:
    """`kernels.LoraGroup` on CPU: its weights checked and its part table laid out once (column
    offsets into an output of fixed width), so each use is a few comparisons and one native call.
    In a decode step the Python around the 120 calls otherwise cost as much as their weight reads."""

    def __init__(self, lora_a: torch.Tensor, parts: list, out_width: int) -> None:
        self.kernel = _lora_kernel("apply", lora_a)
        self.num_slots, self.rows, self.in_dim = lora_a.shape
        self.parts, self.out_width = len(parts), out_width
        self.a_args = _a_args(lora_a)
        # Outputs as column offsets from the output passed to run(), whose row stride is out_width.
        self.table = _part_table([None if part is None else (part[0], part[1].start * _F32_BYTES, out_width)
                                  for part in parts])

    @staticmethod
    def supports(lora_a: torch.Tensor, parts: list, out_width: int) -> bool:
        live = [part for part in parts if part is not None]
        return (
            bool(live) and len(parts) <= _APPLY_MAX_PARTS and lora_a.dtype in _WEIGHT_KERNELS
            and lora_a.device.type == "cpu" and lora_a.stride(-1) == 1
            and all(b.dtype == lora_a.dtype and b.device.type == "cpu" and 0 <= columns.start
                    and columns.stop == columns.start + b.shape[1] <= out_width and columns.step in (None, 1)
                    for b, columns in live)
        )

    def run(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta) -> bool:
        """Add the group's LoRA term into out; False (nothing done) where it takes the general path:
        the longest prefill runs (MKL matmuls), or inputs it was not laid out for (the general path checks those)."""
        plan, tokens = meta.cpu_plan, meta.num_tokens
        if (
            plan is None or plan.native_direct or meta.num_slots != self.num_slots or meta.max_rank * self.parts > self.rows
            or x.dtype != _F32 or x.shape != (tokens, self.in_dim) or x.stride(1) != 1
            or out.dtype != _F32 or out.shape != (tokens, self.out_width) or out.stride() != (self.out_width, 1)
        ):
            return False
        if plan.native_segments.count:  # y: the kernel's own buffer
            _run_apply(self.kernel, x, self.a_args, None, self.rows, self.parts, self.table, out.data_ptr(),
                       plan.native_segments)
        return True


@functools.cache
def _attention_limits() -> tuple[int, int, int]:
    """The native decode kernel's largest GQA group, head_dim and block_size (fixed-size buffers)."""
    limit = native.library().lorafleet_attention_limits
    return limit(0), limit(1), limit(2)


def _attention_native_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor) -> bool:
    _, n_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    max_group, max_head_dim, max_block_size = _attention_limits()
    return (
        q.dtype == k_cache.dtype == v_cache.dtype == _F32
        and q.stride(2) == 1 and q.stride(1) == head_dim
        and is_head_major(k_cache) and is_head_major(v_cache) and k_cache.stride() == v_cache.stride()
        and k_cache.stride(1) == head_dim
        and block_tables.dtype == seq_lens.dtype == torch.int32
        and block_tables.stride(-1) == 1 and seq_lens.is_contiguous()
        and n_heads % kv_heads == 0
        and n_heads // kv_heads <= max_group
        and head_dim <= max_head_dim
        and block_size <= max_block_size
    )


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over the paged cache, as `reference.paged_attention`."""
    if not _attention_native_ok(q, k_cache, v_cache, block_tables, seq_lens):
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    num_tokens, n_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype)  # contiguous: the kernel writes head h at h * head_dim
    if num_tokens == 0:
        return out
    _, block_size, kv_heads, _ = k_cache.shape
    plan = reference.plan_for(block_tables, seq_lens, query_start_loc, block_size, kv_heads, True)
    if plan.decode_seqs.numel():
        status = native.library().lorafleet_paged_decode_attention_f32(
            _ptr(q), q.stride(0), _ptr(out), out.stride(0), _ptr(k_cache), _ptr(v_cache),
            k_cache.stride(0), k_cache.stride(2), block_size, head_dim, n_heads, kv_heads,
            _ptr(block_tables), block_tables.stride(0), _ptr(seq_lens),
            _ptr(plan.decode_seqs), _ptr(plan.decode_q_rows), plan.decode_seqs.numel(), scale,
        )
        if status:
            raise ValueError("paged_attention: shapes past the native kernel's limits")
    reference.prefill_attention(q, k_cache, v_cache, plan, scale, out)
    return out
