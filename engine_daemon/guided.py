"""Constrained decoding: each guided sequence's grammar state, and the step's token masks.

A request with ``SamplingParams.guided_json`` gets a matcher (llguidance) compiled from its schema
when it is added (``grammars.json_schema_grammar``). Each step, the matchers of the sampled rows
fill one packed bitmask [rows, V/32] on the host, which goes to the device in one copy and is
unpacked there into the sampler's ``allowed`` mask; the sampled token then advances its matcher.
Rows without a grammar allow every token, so guided and free requests share a batch. The
matcher's work per step is bounded by llguidance's lexer fuel (``LIMITS``), so no schema a tenant
writes can stall the step loop.
"""

from __future__ import annotations

from typing import Any

import llguidance
import torch

from engine_daemon.grammars import GrammarError, json_schema_grammar
from engine_daemon.tokenizer import Tokenizer

# Per-step and per-request bounds on a grammar's work (llguidance's defaults are ~10x these).
LIMITS = llguidance.LLParserLimits(step_lexer_fuel=200_000, initial_lexer_fuel=1_000_000, max_grammar_size=200_000)
_BITS = torch.arange(32, dtype=torch.int32)


class GuidedTokenizer:
    """The model's vocabulary as llguidance reads it, built once per engine."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        eos = tokenizer.eos_token_ids[-1] if tokenizer.eos_token_ids else None
        # n_vocab = the logits' width, which may pad the tokenizer's vocabulary.
        self.ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size

    def matcher(self, schema: dict[str, Any]) -> llguidance.LLMatcher:
        """A fresh matcher for a schema; GrammarError names what cannot be enforced."""
        matcher = llguidance.LLMatcher(self.ll, json_schema_grammar(schema), limits=LIMITS, log_level=0)
        if matcher.is_error():
            raise GrammarError(" ".join(matcher.get_error().split()))
        return matcher


def allowed_tokens(matchers: list[llguidance.LLMatcher | None], vocab_size: int,
                   device: torch.device) -> torch.Tensor | None:
    """bool [rows, vocab_size]: what each row's grammar admits next (all for rows without one);
    None when no row has a grammar."""
    guided = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not guided:
        return None
    words = (vocab_size + 31) // 32
    packed = torch.full((len(matchers), words), -1, dtype=torch.int32)  # all bits set: every token
    row_bytes = words * packed.element_size()
    for row in guided:  # (llguidance.torch does the same, but importing it costs seconds of torch.compile)
        matchers[row].unsafe_compute_mask_ptr(packed[row].data_ptr(), row_bytes)
    packed = packed.to(device, non_blocking=True)
    bits = (packed[:, :, None] >> _BITS.to(device)) & 1
    return bits.reshape(len(matchers), words * 32)[:, :vocab_size].bool()


def advance(matcher: llguidance.LLMatcher, token: int) -> str | None:
    """Feed the sampled token to its matcher; an error message if the grammar could not take it."""
    if not matcher.consume_token(token) or matcher.is_error():
        return " ".join(matcher.get_error().split()) or f"the grammar refused token {token}"
    return None


__all__ = ["GrammarError", "GuidedTokenizer", "LIMITS", "advance", "allowed_tokens"]
