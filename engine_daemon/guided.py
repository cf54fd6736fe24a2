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

from functools import cache
from typing import Any

import llguidance
import torch

from engine_daemon.grammars import GrammarError, guarded, json_schema_grammar, one_line
from engine_daemon.tokenizer import Tokenizer

# Per-step and per-request bounds on a grammar's work (llguidance's defaults are ~10x these).
LIMITS = llguidance.LLParserLimits(step_lexer_fuel=200_000, initial_lexer_fuel=1_000_000, max_grammar_size=200_000)


class GuidedTokenizer:
    """The model's vocabulary as llguidance reads it, built once per engine."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        eos = tokenizer.eos_token_ids[-1] if tokenizer.eos_token_ids else None
        # n_vocab = the logits' width, which may pad the tokenizer's vocabulary.
        self.ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)

    def matcher(self, schema: dict[str, Any]) -> llguidance.LLMatcher:
        """A fresh matcher for a schema; GrammarError names what cannot be enforced."""
        matcher = guarded(llguidance.LLMatcher, self.ll, json_schema_grammar(schema), limits=LIMITS, log_level=0)
        if matcher.is_error():
            raise GrammarError(one_line(matcher.get_error()))
        return matcher


def allowed_tokens(matchers: list[llguidance.LLMatcher | None], vocab_size: int,
                   device: torch.device) -> tuple[torch.Tensor | None, dict[int, str]]:
    """(bool [rows, vocab_size]: what each row's grammar admits next, every token for rows without
    one, None when no row has a grammar; the rows whose grammar failed, with why: they must end)."""
    guided = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not guided:
        return None, {}
    words = (vocab_size + 31) // 32
    packed = torch.full((len(matchers), words), -1, dtype=torch.int32)  # all bits set: every token
    row_bytes = words * packed.element_size()
    failed = {}
    for row in guided:  # (llguidance.torch does the same, but importing it costs seconds of torch.compile)
        try:
            guarded(matchers[row].unsafe_compute_mask_ptr, packed[row].data_ptr(), row_bytes)
        except GrammarError as exc:
            failed[row] = str(exc)
        if matchers[row].is_error():  # out of lexer fuel, say: the mask is not to be trusted
            failed.setdefault(row, one_line(matchers[row].get_error()))
    packed = packed.to(device, non_blocking=True)
    bits = (packed[:, :, None] >> _bit_positions(device)) & 1
    return bits.reshape(len(matchers), words * 32)[:, :vocab_size].bool(), failed


def advance(matcher: llguidance.LLMatcher, token: int) -> str | None:
    """Feed the sampled token to its matcher; an error message if the grammar could not take it."""
    try:
        taken = guarded(matcher.consume_token, token)
    except GrammarError as exc:
        return str(exc)
    if not taken or matcher.is_error():
        return one_line(matcher.get_error()) or f"the grammar refused token {token}"
    return None


@cache
def _bit_positions(device: torch.device) -> torch.Tensor:
    """0..31 on the device, made once: a step's unpacking then copies only the packed mask."""
    return torch.arange(32, dtype=torch.int32, device=device)


__all__ = ["GrammarError", "GuidedTokenizer", "LIMITS", "advance", "allowed_tokens"]
