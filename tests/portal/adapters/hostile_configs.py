"""Hostile adapter configs: pattern keys the uploader wrote, which must never run unbounded anywhere."""

from __future__ import annotations

from tests.engine.test_lora_patterns import SLOW_KEY
from tests.portal.adapters.bad_uploads import BadUpload, config_with

CASES: list[BadUpload] = [
    BadUpload("rank-pattern-catastrophic-key", config_with(rank_pattern={SLOW_KEY: 2}), "takes too long to match"),
    BadUpload(
        "alpha-pattern-catastrophic-key",
        config_with(alpha_pattern={"((?:.|\\w)*)\\1\\1\\1\\1(?=!)": 2.0}),
        "alpha_pattern key '((?:.|\\\\w)*)",
    ),
    BadUpload(
        "rank-pattern-key-matching-nothing",
        config_with(rank_pattern={"layers.7.mlp.gate_proj": 2}),
        "rank_pattern key 'layers.7.mlp.gate_proj' matches none of the adapter's modules",
    ),
    BadUpload("rank-pattern-bad-regex", config_with(rank_pattern={"q_proj[": 2}), "is not a valid regular expression"),
    BadUpload(
        "rank-pattern-too-many-keys",
        config_with(rank_pattern={f"layers.{i}.self_attn.q_proj": 4 for i in range(5000)}),
        "rank_pattern has 5000 keys; at most 4096",
    ),
    BadUpload("rank-pattern-long-key", config_with(rank_pattern={"q" * 600: 4}), "characters; at most 512 are accepted"),
]
