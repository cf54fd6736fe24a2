"""The batched sampler: penalties and logit bias, grammar masks, greedy, temperature, top-k, top-p,
per-request seeds, and the log-probabilities requests ask for (one top-k for the whole step).

``SamplingParams`` lives in the torch-free protocol module, shared with the portal; it is named here
too because the sampler is where the engine reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_daemon.protocol import SamplingParams

__all__ = ["Sampled", "Sampler", "SamplingParams", "make_generator"]


@dataclass
class Sampled:
    """One step's draws: a token per row, its log-probability under the model, and, when some row
    asked for them, the `width` most likely tokens of every row with their log-probabilities."""

    tokens: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor  # float32 [B]
    top_tokens: torch.Tensor | None = None  # int64 [B, width]
    top_logprobs: torch.Tensor | None = None  # float32 [B, width]


class Sampler:
    """Samples one token per row of logits; rows with a seed draw from their own generator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.seed()

    def sample(
        self,
        logits: torch.Tensor,  # float32 [B, V]
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        outputs: list[list[int]] | None = None,  # each row's tokens generated so far (for the penalties)
        allowed: torch.Tensor | None = None,  # bool [B, V]: the tokens a row's grammar admits (guided.py)
    ) -> Sampled:
        """Penalties, logit bias and grammar masks choose the token; the log-probabilities reported
        are the model's own (log_softmax of its logits), as OpenAI's and vLLM's are."""
        adjusted = adjust_logits(logits, params, outputs) if any(p.adjusts_logits for p in params) else logits
        if allowed is not None:
            adjusted = adjusted.masked_fill(~allowed, float("-inf"))
        greedy_tokens = adjusted.argmax(dim=-1)
        if all(p.greedy for p in params):
            tokens = greedy_tokens
        else:
            probs = self._filtered_probs(adjusted, params)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one draw per row, no sync.
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            for row, gen in enumerate(generators):
                if gen is not None:  # a seeded request draws from its own stream, whatever shares its batch
                    noise[row].exponential_(generator=gen)
            sampled = (probs / noise).argmax(dim=-1)
            is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
            tokens = torch.where(is_greedy, greedy_tokens, sampled)
        # log p(token) = logit - logsumexp: one reduction, not a full [B, V] log_softmax written out.
        normalizer = torch.logsumexp(logits, dim=-1)
        sampled = Sampled(tokens, logits.gather(1, tokens[:, None]).squeeze(1) - normalizer)
        width = max(p.top_logprobs for p in params)
        if width:  # one top-k for every row of the step, at the widest any row asked for
            values, sampled.top_tokens = logits.topk(width, dim=-1)
            sampled.top_logprobs = values - normalizer[:, None]
        return sampled

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        scaled = logits / temperature[:, None]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        if bool((top_k < logits.shape[-1]).any()) or bool((top_p < 1).any()):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            ranks = torch.arange(logits.shape[-1], device=device)[None, :]
            drop = ranks >= top_k[:, None]
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop |= mass_before >= top_p[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
        return scaled.softmax(dim=-1)


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]] | None) -> torch.Tensor:
    """OpenAI's penalties and logit bias for the whole batch at once, on the logits' device:
    logit[t] - count[t] * frequency - (count[t] > 0) * presence + bias[t], counts over each row's
    generated tokens. Returns a new tensor; rows that ask for neither are unchanged."""
    batch, vocab = logits.shape
    device = logits.device
    adjusted = logits.clone()
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
    presence = torch.tensor([p.presence_penalty for p in params], device=device)
    if outputs is not None and any(p.frequency_penalty or p.presence_penalty for p in params):  # (no device sync)
        longest = max((len(o) for o in outputs), default=0)
        if longest:
            # Rows padded with a spare column `vocab`, which the counts then drop.
            padded = torch.full((batch, longest), vocab, dtype=torch.int64)
            for row, tokens in enumerate(outputs):
                padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            padded = padded.to(device)
            counts = torch.zeros(batch, vocab + 1, device=device).scatter_add_(
                1, padded, torch.ones(padded.shape, device=device))[:, :vocab]
            adjusted -= counts * frequency[:, None] + (counts > 0).float() * presence[:, None]
    rows = [row for row, p in enumerate(params) for _ in p.logit_bias]
    if rows:
        tokens = [token for p in params for token in p.logit_bias]
        biases = [bias for p in params for bias in p.logit_bias.values()]
        adjusted.index_put_((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                            torch.tensor(biases, dtype=adjusted.dtype, device=device), accumulate=True)
    return adjusted


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
