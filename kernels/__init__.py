"""Batched multi-LoRA and paged-attention kernels, dispatched by device.

`impl="auto"` runs Triton on CUDA tensors and the torch twins (`kernels.reference`)
otherwise; `"triton"` / `"torch"` force one path. Triton is imported only when the Triton
path is taken, so the torch path works wherever torch does.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

from kernels import reference
from kernels.meta import LoraMeta

__all__ = [
    "LoraMeta",
    "lora_expand",
    "lora_shrink",
    "paged_attention",
    "store_kv",
    "triton_available",
]

Impl = Literal["auto", "triton", "torch"]


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


def _use_triton(impl: str, tensor: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was requested but triton cannot be imported; use impl='torch'")
        return True
    if impl == "auto":
        return tensor.is_cuda and triton_available()
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta, impl: Impl = "auto") -> torch.Tensor:
    """x [T, in], lora_a [S, R, in] -> y float32 [T, R]; y[t, :rank] = x[t] A[slot]ᵀ, rest 0."""
    if not _use_triton(impl, x):
        return reference.lora_shrink(x, lora_a, meta)
    from kernels import lora

    reference._check_lora_shapes(x, lora_a, meta, "lora_shrink")
    return lora.lora_shrink(x, lora_a, meta)


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoraMeta,
    base: torch.Tensor,
    impl: Impl = "auto",
) -> torch.Tensor:
    """base [T, out] += scaling[slot] · y[:, :rank] B[slot][:, :rank]ᵀ in place; returns base."""
    if not _use_triton(impl, base):
        return reference.lora_expand(y, lora_b, meta, base)
    from kernels import lora

    reference._check_lora_shapes(y, lora_b, meta, "lora_expand")
    if base.shape != (meta.num_tokens, lora_b.shape[1]):
        raise ValueError(
            f"lora_expand: base is {tuple(base.shape)}, expected [{meta.num_tokens}, {lora_b.shape[1]}]"
        )
    return lora.lora_expand(y, lora_b, meta, base)


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
    if not _use_triton(impl, q):
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
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
    if not _use_triton(impl, k):
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    from kernels import attention

    attention.store_kv(k, v, k_cache, v_cache, slot_mapping)
