"""Reference ops: RMS norm and interleaved rotary embeddings (float32).

RoPE in V4 rotates *interleaved* pairs (x[2k], x[2k+1]) of the trailing `rope_dim` dims of a head (GPT-J
style, not Llama's rotate-half; spec §7.2). Compressed layers use base `compress_rope_theta` with YaRN frequency
interpolation and no mscale; window-only layers use `rope_theta` without YaRN.
"""

from __future__ import annotations

import math

import torch

from ..config import Yarn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; `weight=None` is the weightless form."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def rms_norm_rounded(x: torch.Tensor, eps: float, rnd) -> torch.Tensor:
    """The weightless RMS norm with every intermediate rounded by `rnd`, as DeepSeek's per-head query norm
    `q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)` runs on a bf16 tensor (spec §18.19): each
    torch op computes in float32 and stores bf16, so the squares, their mean (a float32 sum over the head,
    divided, then rounded), the sum with eps, the rsqrt and the product are each rounded."""
    ms = rnd(rnd(x * x).mean(-1, keepdim=True))
    return rnd(x * rnd(torch.rsqrt(rnd(ms + eps))))


def rope_frequencies(rope_dim: int, base: float, yarn: Yarn | None) -> torch.Tensor:
    """Angular frequency per rotated pair, [rope_dim/2] float32.

    YaRN (V4 form, spec §7.2): pairs below `low` keep their frequency, pairs above `high` are divided by
    `factor`, a linear ramp blends between; always applied when configured. No attention-scale change.
    """
    freqs = 1.0 / base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)  # host (Rope moves it)
    if yarn is None:
        return freqs

    def correction_dim(n_rot: float) -> float:
        return rope_dim * math.log(yarn.original_max_position / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # host
    smooth = 1 - ramp
    return freqs / yarn.factor * (1 - smooth) + freqs * smooth


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [len(positions), rope_dim/2] for integer positions."""
    ang = torch.outer(positions.to(torch.float32), freqs)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., rope_dim]; cos/sin broadcast to [..., rope_dim/2].

    `inverse=True` applies the conjugate rotation (used on the attention output, spec §7.5).
    """
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
