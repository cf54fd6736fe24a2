"""Content hashes of KV blocks, for the prefix cache (``kv_cache.BlockManager``).

Block i's hash chains block i - 1's hash with block i's token ids, so equal hashes mean equal
prefixes, not just equal blocks. The chain starts from a salt of the tenant and the adapter's
identity: a block computed under one adapter is never reused for another (or for the base
model), and no block is ever shared between tenants, since a cache hit is fast enough to be
timed and would tell one tenant what another's prompts contain. SHA-256 keeps a collision, which
would hand a sequence another's K/V, out of reach.
"""

from __future__ import annotations

import hashlib
from array import array

from engine_daemon.sequence import Sequence


def cache_salt(tenant: str, adapter_identity: str) -> bytes:
    """The root of a sequence's hash chain: who asks, under which adapter weights ('' = base model)."""
    return hashlib.sha256(f"lorafleet-prefix\0{tenant}\0{adapter_identity}".encode()).digest()


def block_hashes(seq: Sequence, block_size: int, count: int) -> list[bytes]:
    """The hashes of the sequence's first `count` full blocks, extending the ones it already has."""
    hashes = seq.block_hashes
    while len(hashes) < count:
        i = len(hashes)
        parent = hashes[-1] if hashes else seq.cache_salt
        tokens = array("q", seq.tokens(i * block_size, (i + 1) * block_size))
        hashes.append(hashlib.sha256(parent + tokens.tobytes()).digest())
    return hashes[:count]
