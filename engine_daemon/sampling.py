"""The batched sampler: penalties and logit bias, greedy, temperature, top-k, top-p, per-request seeds.

``SamplingParams`` lives in the torch-free protocol module, shared with the portal; it is named here
too because the sampler is where the engine reads it.
"""

from __future__ import annotations

import torch

from engine_daemon.protocol import SamplingParams

__all__ = ["Sampler", "SamplingParams", "make_generator"]


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (token ids int64 [B], log-probabilities of those tokens under the model, float32 [B]).

        Penalties and logit bias choose the token; the log-probability stays the model's own."""
        adjusted = adjust_logits(logits, params, outputs) if any(p.adjusts_logits for p in params) else logits
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
        return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

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
