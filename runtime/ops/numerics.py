"""Numerics: where a deployment drops precision, expressed as six ops of the table.

- `round_act`: the activation dtype (float32 = identity, bfloat16, float16 with saturation);
- `quant_act`: quantise-dequantise a quantised linear's input (none; FP8 e4m3 per-token per-128 block with
  power-of-two scales as DeepSeek's kernels; INT8 per-token dynamic as W8A8 deployments);
- `kv_qat`: the KV cache's non-RoPE dims (float dtypes round; `fp8_e4m3` = official FP8 round trip, block 64);
- `indexer_qat`: the indexer's queries and keys (float dtypes round; `fp4_e2m1` = Hadamard + FP4 block 32 as
  DeepSeek's code; `int8` = Hadamard + per-vector INT8 as Ascend's A8 indexer cache);
- `head_norm(ops, q, eps)`: the weightless per-head query RMS norm (the table's `rms_norm`, rounded once);
- `inner_round`: the rounding the model passes to `sparse_attention` and `indexer_topk` (`rnd=`) for the
  points *inside* those ops where DeepSeek's code rounds; None = float32 inside the op.

`exact` (all identity) is the ground truth. The indexer's Hadamard rotation is orthonormal and applied to both
queries and keys, so it cannot change exact scores and is skipped when nothing is quantised.
`official` = bf16 activations + FP8 linear inputs + FP8 KV + FP4 indexer: DeepSeek's own inference numerics,
and only there (`NumericsSpec.points == "deepseek"`) the bf16 rounding points of DeepSeek's `inference/model.py`
and `kernel.py` that sit inside an op (spec §3.2, §18.19), each checked against the official code:
- the per-head q norm `q *= rsqrt(q.square().mean(-1) + eps)` runs on a bf16 tensor: the squares, the mean, the
  sum with eps, the rsqrt and the product are each rounded to bf16 (`norm_rope.rms_norm_rounded`);
- `sparse_attn` casts the un-normalised probabilities exp(s - running max) to bf16 before P.V; the
  denominator sums the float32 exponentials and the division is float32 (`attention.kernel_probs`);
- the indexer's Hadamard output is bf16 (`rotate_activation` returns its input dtype) before the FP4 round
  trip, for queries and keys (`indexer_fp4_qat` rounds there in every mode that uses it);
- the indexer scores: the q.k einsum outputs bf16, the head weights are bf16 (`weights_proj(x) * scale` on a
  bf16 tensor), each relu(q.k) * w product is bf16 and the sum over heads is bf16 (`attention.index_scores`).
  bf16 scores tie often at the k-th place; the selection keeps our lower-index-first rule (the official
  `torch.topk` leaves the order of ties unspecified), so a tie there may pick a different entry than CUDA does.
Other specs (bf16 profiles included) round once at each op's output, as a device computing the op in float32
and storing bf16 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import number_formats
from .norm_rope import rms_norm_rounded

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACT_QUANT = ("none", "fp8_block128", "int8_per_token")
KV_DTYPES = ("float32", "bfloat16", "float16", "fp8_e4m3")
INDEXER_DTYPES = ("float32", "bfloat16", "float16", "fp4_e2m1", "int8")


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def rounder(dtype: str):
    """x -> x rounded to `dtype` and back to float32 (float16 saturates at +-65504 like a cast on device)."""
    if dtype == "float32":
        return identity
    if dtype == "float16":
        return lambda x: x.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)
    return lambda x: x.to(FLOAT_DTYPES[dtype]).to(torch.float32)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def quant_act_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-128-column FP8 quantise-dequantise of a linear's input (DeepSeek `act_quant`)."""
    return number_formats.fp8_roundtrip(x, 128)


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 over the last dim with one float scale per vector: round(x / (amax/127))."""
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / s).clamp(-127, 127) * s


def kv_fp8_qat(x: torch.Tensor) -> torch.Tensor:
    """FP8 round trip of the non-RoPE KV dims, block 64, stored back in bf16."""
    return round_bf16(number_formats.fp8_roundtrip(x, 64))


def indexer_fp4_qat(x: torch.Tensor) -> torch.Tensor:
    """Hadamard rotation, its bf16 output (DeepSeek's `rotate_activation` returns bf16), then the FP4 (block
    32) round trip of indexer queries / keys, stored bf16. The bf16 step moves values by 2^-9 relative and can
    move a block's power-of-two scale when its max sits next to a power of two."""
    return round_bf16(number_formats.fp4_roundtrip(round_bf16(number_formats.hadamard(x)), 32))


def indexer_int8_qat(x: torch.Tensor) -> torch.Tensor:
    return round_bf16(int8_roundtrip(number_formats.hadamard(x)))


def head_norm_once(ops, q: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head q norm: the table's `rms_norm` (float32 inside), its output rounded to the activation dtype."""
    return ops.round_act(ops.rms_norm(q, None, eps))


def head_norm_bf16(ops, q: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head q norm as DeepSeek's code evaluates it on a bf16 tensor (every intermediate rounded). Computed
    from float32 and returned in q's dtype: a device's bf16 q must not mix bf16 and float32 intermediates."""
    return rms_norm_rounded(q.float(), eps, round_bf16).to(q.dtype)


@dataclass(frozen=True)
class NumericsSpec:
    compute: str = "float32"
    act_quant: str = "none"
    kv: str = "float32"
    indexer: str = "float32"

    @property
    def name(self) -> str:
        if self == NumericsSpec():
            return "exact"
        if self == OFFICIAL:
            return "official"
        return f"{self.compute}/act:{self.act_quant}/kv:{self.kv}/indexer:{self.indexer}"

    @property
    def points(self) -> str:
        """Where bf16 rounding happens: "deepseek" (official only: also at the official code's points inside
        the q norm, the attention and the indexer scores) or "op-outputs" (at each op's output)."""
        return "deepseek" if self == OFFICIAL else "op-outputs"

    def ops(self) -> dict:
        act = {"none": identity, "fp8_block128": quant_act_fp8, "int8_per_token": int8_roundtrip}[self.act_quant]
        kv = kv_fp8_qat if self.kv == "fp8_e4m3" else rounder(self.kv)
        idx = {"fp4_e2m1": indexer_fp4_qat, "int8": indexer_int8_qat}.get(self.indexer) or rounder(self.indexer)
        deepseek = self.points == "deepseek"
        return dict(round_act=rounder(self.compute), quant_act=act, kv_qat=kv, indexer_qat=idx,
                    head_norm=head_norm_bf16 if deepseek else head_norm_once,
                    inner_round=round_bf16 if deepseek else None)


OFFICIAL = NumericsSpec("bfloat16", "fp8_block128", "fp8_e4m3", "fp4_e2m1")
MODES = {"exact": NumericsSpec(), "official": OFFICIAL}
NUMERICS = tuple(MODES)
