"""Sampling on the device for a mixed batch: each row carries its own settings.

Order, as transformers' logits processors apply them: repetition penalty (prompt + output tokens),
presence/frequency penalties (output tokens), then for sampled rows temperature -> top-k -> top-p -> min-p,
then a draw. Greedy rows (temperature 0) take the argmax of the penalised logits. Rows with a grammar (structured
output) arrive already masked to -inf outside it (runtime/structured_output.py), so every step here keeps to it.

The draw is ``argmax(p / E)`` with E ~ Exp(1) (the exponential-race form of categorical sampling, as gpt-fast
uses), where E comes from a counter-based hash of (request seed, output index, token id). So a request's
tokens depend on its seed alone, never on what else is in the batch, and nothing here needs a host sync or a
torch.Generator, which keeps the step capturable in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    """Per-row settings, (B,) each, on the logits' device."""
    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor  # int64, vocab size when off
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    seeds: torch.Tensor  # int64 in [0, 2^32)
    steps: torch.Tensor  # int64, index of the token being drawn within the request's output
    seen_mask: torch.Tensor | None = None  # (B, V) bool: token in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None = None  # (B, V) float32: occurrences in the output so far
    all_greedy: bool = False  # known on the host when the batch is built; skips the sampling path
    history_rows: torch.Tensor | None = None  # rows of runtime/token_history.py behind the two tables above


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply); products stay below 2^59 in int64, so no overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) float32 Exp(1) draws, a pure function of (seed, step, token id)."""
    key = _mix32((seeds & MASK32) ^ _mix32((steps * 0x9E3779B1) & MASK32))  # (B,)
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = _mix32((key[:, None] + tok[None, :] * 0x85EBCA6B) & MASK32)
    return bits_to_exponential(x)


# Largest float32 below 1. (k + 0.5) / 2^24 for the top 24-bit k rounds to exactly 1.0 in float32 (k + 0.5 needs
# 25 bits), and -log(1) = -0.0 made a filtered token's 0 / -0.0 = NaN win the argmax (issue 8: ~1% of draws
# over a 152k vocabulary came from outside top-k/top-p). Clamping keeps every other draw bit-identical.
_U_MAX = 1.0 - 2.0 ** -24


def bits_to_exponential(x: torch.Tensor) -> torch.Tensor:
    """32-bit hash values (int64 holding [0, 2^32)) -> float32 Exp(1) draws in [6e-8, 17.4]: never 0, never inf,
    so p / E is finite for every p in [0, 1] and exactly 0 for a filtered token."""
    u = ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in [2^-25, 1]
    return -torch.log(u.clamp_(max=_U_MAX))


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    if t.seen_mask is not None:
        p = t.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(t.seen_mask, penalised, logits)
    if t.output_counts is not None:
        logits = logits - t.frequency_penalty[:, None] * t.output_counts \
            - t.presence_penalty[:, None] * (t.output_counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits with -inf where top-k, top-p or min-p removes a token."""
    temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    logits = logits / temp[:, None]
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending, as transformers' top-p does
    # top-k: drop everything below the k-th largest value (ties with it stay, as in transformers)
    k = t.top_k.clamp(1, V)
    kth = sorted_logits.gather(-1, (V - k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # top-p: drop the low tail whose cumulative probability is <= 1 - top_p; the top token always stays
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= (1 - t.top_p)[:, None]
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # min-p: drop tokens whose probability is below min_p x the top probability
    probs = sorted_logits.softmax(-1)
    drop = probs < (t.min_p[:, None] * probs[:, -1:])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits: (B, V) float32 raw model output -> (B,) int64 token ids."""
    logits = apply_penalties(logits, t)
    greedy = logits.argmax(-1)
    if t.all_greedy:
        return greedy
    probs = filter_logits(logits, t).softmax(-1)
    drawn = (probs / exponential_noise(t.seeds, t.steps, logits.shape[-1])).argmax(-1)
    return torch.where(t.temperature == 0, greedy, drawn)


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int):
    """Per row: the chosen token's log-prob and the k best (ids, values). logprobs: (N, V)."""
    chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    if k > 0:
        vals, ids = logprobs.topk(k, dim=-1)
    else:
        vals = ids = None
    return chosen_lp, ids, vals
