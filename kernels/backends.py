"""The three kernel backends, one of which an engine chooses once, when it is built.

- ``triton``: the Triton kernels (``kernels.triton``) on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
- ``native``: the C kernels (``kernels.cpu.native``) on CPU, float32 activations.
- ``torch``: plain torch anywhere: LoRA by ``kernels.reference``'s segment loop, attention by
  length buckets and fused SDPA (``kernels.cpu.attention``).

Every backend has the same methods and `kernels.reference`'s results. A *group* is one
projection group of a layer: the projections that read one input (q, k, v; gate, up; or one
alone), whose LoRA terms are one shrink of their stacked A and one expand per part.
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import torch

from kernels import reference
from kernels.cpu import attention, build
from kernels.cpu.lora_plan import build_native_plan
from kernels.meta import LoraMeta

# parts[i] of a group: (B [S, out_i, R], the columns of the group's output it adds into) or None.
GroupParts = list[tuple[torch.Tensor, slice] | None]


class LoraGroup(Protocol):
    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta) -> None:
        """out [T, out_width] += the group's LoRA term of x [T, in], for each token's adapter."""


class Backend:
    name: str
    device: torch.device
    _planner = None  # the backend's plan of a step (kernels.cpu.lora_plan), when it has one

    def lora_meta(self, token_slots: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor) -> LoraMeta:
        """A step's token → slot map, with this backend's plan of it."""
        return LoraMeta.build(token_slots, ranks, scalings, planner=self._planner)

    def lora_shrink(self, x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
        """`reference.lora_shrink`."""
        reference.check_shrink(x, lora_a, meta)
        return self._shrink(x, lora_a, meta)

    def lora_expand(self, y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
        """`reference.lora_expand`."""
        reference.check_expand(y, lora_b, meta, base)
        return self._expand(y, lora_b, meta, base)

    def lora_apply(self, x: torch.Tensor, lora_a: torch.Tensor, parts: list, meta: LoraMeta) -> None:
        """`reference.lora_apply`: the stacked shrink, then one expand per adapted part (all of it
        checked before any output changes)."""
        reference.check_apply(x, lora_a, parts, meta)
        n = len(parts)
        y = self._shrink(x, lora_a, meta.scaled_ranks(n))
        per_part = y.view(y.shape[0], y.shape[1] // n, n)  # not -1: a batch may have no tokens
        for i, part in enumerate(parts):
            if part is not None:
                self._expand(per_part[:, :, i], part[0], meta, part[1])

    # The backend's kernels, their inputs already checked.
    def _shrink(self, x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
        raise NotImplementedError

    def _expand(self, y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, base: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lora_group(self, lora_a: torch.Tensor, parts: GroupParts, out_width: int) -> LoraGroup:
        """The object that applies one projection group of an adapter pool's layer (its weights stay put)."""
        return SplitGroup(self, lora_a, parts)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float) -> torch.Tensor:
        raise NotImplementedError

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        attention.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def __repr__(self) -> str:
        return f"<kernels backend {self.name} on {self.device}>"


class SplitGroup:
    """A group run as the backend's shrink, then an expand per part, on views of the output."""

    def __init__(self, backend: Backend, lora_a: torch.Tensor, parts: GroupParts) -> None:
        self.backend, self.lora_a, self.parts = backend, lora_a, parts

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta) -> None:
        views = [None if part is None else (part[0], out[:, part[1]]) for part in self.parts]
        self.backend.lora_apply(x, self.lora_a, views, meta)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, device: torch.device) -> None:
        if device.type == "cpu" and not _interpreting():
            raise ValueError("kernels='triton' on CPU runs only under TRITON_INTERPRET=1 (the interpreter, "
                             "for tests); use kernels='native' or 'torch'")
        if not triton_available():
            raise ValueError("kernels='triton' was asked for but triton cannot be imported; use kernels='torch'")
        from kernels.triton import attention, lora

        self.device, self._lora, self._attention = device, lora, attention
        self._shrink, self._expand = lora.lora_shrink, lora.lora_expand

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
        return self._attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        self._attention.store_kv(k, v, k_cache, v_cache, slot_mapping)


class NativeBackend(Backend):
    name = "native"

    def __init__(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"kernels='native' runs on CPU only, not {device}; use kernels='triton' or 'torch'")
        try:
            build.library()
        except build.NativeUnavailable as error:
            raise ValueError(f"kernels='native': {error}; use kernels='torch'") from None
        from kernels.cpu import native

        self.device, self._native = device, native
        self._planner = build_native_plan
        self._shrink, self._expand = native.lora_shrink, native.lora_expand

    def lora_apply(self, x, lora_a, parts, meta):
        self._native.lora_apply(x, lora_a, parts, meta)

    def lora_group(self, lora_a, parts, out_width):
        return self._native.NativeGroup(lora_a, parts, out_width)

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
        return self._native.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._shrink, self._expand = reference.lora_shrink, reference.lora_expand

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
        return attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


KINDS = ("auto", "triton", "native", "torch")
_BACKENDS = {"triton": TritonBackend, "native": NativeBackend, "torch": TorchBackend}


def backend(kind: str = "auto", device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32,
            lora_dtype: torch.dtype | None = None, attention: tuple[int, int, int, int] | None = None) -> Backend:
    """The backend that serves `kind` on `device`, decided here once; raises naming the reason
    where that kind cannot serve. "auto" is Triton on CUDA, native on CPU where a C compiler is at
    hand and the model suits it (`dtype` and `lora_dtype` of the activations and adapter weights,
    `attention` = (heads, kv heads, head_dim, block size)), else torch."""
    device = torch.device(device)
    if kind not in KINDS:
        raise ValueError(f"kernels must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "auto":
        kind = _auto(device, dtype, lora_dtype or dtype, attention)
    elif kind == "native":
        reason = _native_unsuited(dtype, lora_dtype or dtype, attention)
        if reason:
            raise ValueError(f"kernels='native': {reason}; use kernels='torch'")
    return _cached(kind, device)


@functools.cache
def _cached(kind: str, device: torch.device) -> Backend:
    return _BACKENDS[kind](device)


def _auto(device: torch.device, dtype: torch.dtype, lora_dtype: torch.dtype,
          attention: tuple[int, int, int, int] | None) -> str:
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if device.type != "cpu" or _native_unsuited(dtype, lora_dtype, attention) or not build.available():
        return "torch"
    return "native"


def _native_unsuited(dtype: torch.dtype, lora_dtype: torch.dtype, attention: tuple[int, int, int, int] | None) -> str | None:
    from kernels.cpu import native

    reason = native.lora_unsupported(dtype, lora_dtype)
    if reason is None and attention is not None and build.available():
        reason = native.attention_unsupported(dtype, *attention)
    return reason


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """Whether the Triton package imports at all."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must not take the other backends down with it
        return False
    return True
