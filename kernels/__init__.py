"""Batched multi-LoRA and paged-attention kernels behind one backend chosen once.

    backend = kernels.backend("auto", device, dtype=..., lora_dtype=..., attention=(heads, kv_heads, head_dim, block))
    meta = backend.lora_meta(token_slots, pool_ranks, pool_scalings)   # once per step
    group = backend.lora_group(lora_a, parts, out_width)               # once per pool layer and group
    group.apply(x, out, meta)                                          # every projection of the step
    backend.paged_attention(...); backend.store_kv(...)

- ``reference.py``: the specification every fast path is tested against (a segment loop, a
  gathered attention).
- ``cpu/``: the CPU fast paths: the native C kernels (``native``, sources in ``c/``, built by
  ``build``) over the step's plan (``lora_plan``), and the torch attention (``attention``, by
  ``attention_plan``).
- ``triton/``: the Triton kernels for CUDA.
- ``backends.py``: the three backends and the choice among them.

Triton is imported only when the Triton backend is built, so the others work wherever torch does.
"""

from kernels.backends import KINDS, Backend, LoraGroup, backend, triton_available
from kernels.meta import LoraMeta

__all__ = ["KINDS", "Backend", "LoraGroup", "LoraMeta", "backend", "triton_available"]
