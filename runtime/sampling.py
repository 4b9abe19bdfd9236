"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling from a seeded generator; and `Generation`,
what `Runtime.generate` (and speculative generation) returns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 32
    stop_at_eos: bool = True

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise InputError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")


def _scaled(logits: torch.Tensor, t: float) -> torch.Tensor:
    """logits / T, finite for every finite T > 0. A tiny T (1e-38, 1e-300) overflows logits / T to inf (float32
    even rounds T itself to 0), and softmax then gives NaN, which multinomial refuses: such rows take
    (logits - row max) / max(T, float32's smallest normal) instead, the same distribution in the limit (the
    row's maximum keeps all the mass, ties share it) with no overflow. Rows whose logits / T is finite keep
    exactly those values, so sampling at ordinary temperatures is bit for bit what it was; `where` rather than
    a branch, so that logits on an accelerator need no host sync."""
    scaled = logits / t
    ok = torch.isfinite(scaled.amax(-1, keepdim=True))
    safe = (logits - logits.amax(-1, keepdim=True)) / max(t, torch.finfo(logits.dtype).tiny)
    return torch.where(ok, scaled, safe)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from at temperature > 0: softmax(logits / T), cut to the top-p nucleus
    (not renormalised: multinomial does that). logits [B, V] -> [B, V]."""
    probs = torch.softmax(_scaled(logits, params.temperature), dim=-1)
    if params.top_p < 1:
        sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = (sp.cumsum(-1) - sp) >= params.top_p
        sp = sp.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    tokens: list[list[int]]         # generated ids per prompt (EOS included when it stopped there)
    texts: list[str]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int              # tokens fed through one-token decode steps (all rows)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")
