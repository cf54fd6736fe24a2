"""Batched multi-LoRA and paged-attention kernels, dispatched by device.

`impl="auto"` runs Triton on CUDA tensors; on CPU tensors it runs the native kernels
(`kernels.cpu`, C compiled on first use) where a C compiler is at hand, else the torch twins
(`kernels.reference`). `"triton"`, `"native"` and `"torch"` force one path. Triton is
imported only when the Triton path is taken, so the torch path works wherever torch does.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

from kernels import native, reference
from kernels.meta import LoraMeta

__all__ = [
    "LoraGroup",
    "LoraMeta",
    "lora_apply",
    "lora_expand",
    "lora_shrink",
    "native_available",
    "paged_attention",
    "store_kv",
    "triton_available",
]

Impl = Literal["auto", "triton", "native", "torch"]


@functools.cache
def triton_available() -> bool:
    """Whether the Triton path can run at all (package importable)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must not take the torch path down with it
        return False
    return True


def native_available() -> bool:
    """Whether the native CPU kernels are enabled and built (compiling them on first call)."""
    return native.available()


def _backend(impl: str, tensor: torch.Tensor) -> str:
    """Which implementation serves a call on `tensor`: "triton", "native" or "torch"."""
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was requested but triton cannot be imported; use impl='torch'")
        return "triton"
    if impl == "native":
        if tensor.is_cuda:
            raise ValueError("impl='native' runs on CPU tensors only")
        native.library()  # raises NativeUnavailable with the compiler's message
        return "native"
    if impl == "auto":
        if tensor.is_cuda:
            return "triton" if triton_available() else "torch"
        return "native" if native.available() else "torch"
    raise ValueError(f"impl must be 'auto', 'triton', 'native' or 'torch', got {impl!r}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta, impl: Impl = "auto") -> torch.Tensor:
    """x [T, in], lora_a [S, R, in] -> y float32 [T, R]; y[t, :rank] = x[t] A[slot]ᵀ, rest 0."""
    backend = _backend(impl, x)
    if backend == "torch":
        return reference.lora_shrink(x, lora_a, meta)
    if backend == "native":
        from kernels import cpu

        return cpu.lora_shrink(x, lora_a, meta)
    from kernels import lora

    reference.check_shrink(x, lora_a, meta)
    return lora.lora_shrink(x, lora_a, meta)


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraMeta,
    base: torch.Tensor,
    impl: Impl = "auto",
) -> torch.Tensor:
    """base [T, out] += scaling[slot] · y[:, :rank] B[slot][:, :rank]ᵀ in place; returns base."""
    backend = _backend(impl, base)
    if backend == "torch":
        return reference.lora_expand(y, lora_b, meta, base)
    if backend == "native":
        from kernels import cpu

        return cpu.lora_expand(y, lora_b, meta, base)
    from kernels import lora

    reference.check_expand(y, lora_b, meta, base)
    return lora.lora_expand(y, lora_b, meta, base)


LoraPart = tuple[torch.Tensor, torch.Tensor] | None


def lora_apply(x: torch.Tensor, lora_a: torch.Tensor, parts: list[LoraPart], meta: LoraMeta, impl: Impl = "auto") -> None:
    """The whole LoRA term of one projection group, in place: out_i += scaling · (x A_iᵀ) B_iᵀ.

    lora_a [S, R·n, in] stacks the A of the group's n parts interleaved (a slot's row j·n + i is
    part i's rank row j; n = 1 is a plain A); parts[i] is (lora_b [S, out_i, R], out_i [T, out_i])
    or None for a part no adapter of this step adapts (its output is left alone). On CPU it is
    one native call (shrink and every expand in one parallel region); elsewhere a shrink and an
    expand per part, with the same result."""
    backend = _backend(impl, x)
    if backend == "native":
        from kernels import cpu

        if cpu.lora_apply(x, lora_a, parts, meta):
            return
    reference.check_apply(x, lora_a, parts, meta)
    n = len(parts)
    y = lora_shrink(x, lora_a, meta.scaled_ranks(n) if n > 1 else meta, impl=backend)
    per_part = y.view(y.shape[0], -1, n)
    for i, part in enumerate(parts):
        if part is not None:
            lora_b, out = part
            lora_expand(per_part[:, :, i], lora_b, meta, out, impl=backend)


class LoraGroup:
    """`lora_apply` for a projection group whose weights and output layout stay put (a slot pool's
    layer): parts[i] is (lora_b, the columns of the output it adds into) or None, and every use
    passes the group's whole output [T, out_width]. On CPU the weights are checked and laid out
    once, so a decode step's use is one native call with little Python around it; anything else
    takes `lora_apply` on views, with its checks."""

    def __init__(self, lora_a: torch.Tensor, parts: list[tuple[torch.Tensor, slice] | None], out_width: int,
                 impl: Impl = "auto") -> None:
        self.lora_a, self.parts, self.impl = lora_a, parts, impl
        self._native = None
        if not lora_a.is_cuda and impl in ("auto", "native"):
            from kernels import cpu

            if _backend(impl, lora_a) == "native" and cpu.NativeGroup.supports(lora_a, parts, out_width):
                self._native = cpu.NativeGroup(lora_a, parts, out_width)

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta) -> None:
        if self._native is not None and self._native.run(x, out, meta):
            return
        views = [None if part is None else (part[0], out[:, part[1]]) for part in self.parts]
        lora_apply(x, self.lora_a, views, meta, self.impl)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the paged K/V cache -> [T, H, D] in q's dtype."""
    backend = _backend(impl, q)
    if backend == "torch":
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    if backend == "native":
        from kernels import cpu

        return cpu.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    from kernels import attention

    return attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    impl: Impl = "auto",
) -> None:
    """Write k, v [T, n_kv_heads, head_dim] into the paged cache at slot_mapping (in place)."""
    if _backend(impl, k) != "triton":  # one index_copy_ per tensor: nothing for a native kernel to win
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    from kernels import attention

    attention.store_kv(k, v, k_cache, v_cache, slot_mapping)
