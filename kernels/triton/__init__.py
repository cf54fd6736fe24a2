"""The Triton backend's kernels (CUDA; on CPU under ``TRITON_INTERPRET=1``): multi-LoRA shrink and
expand over `LoraMeta`'s tiles (``lora``), paged attention and the KV store (``attention``).

Importing this package imports Triton, and Triton reads ``TRITON_INTERPRET`` when a kernel is
defined: set it before the first import.
"""
