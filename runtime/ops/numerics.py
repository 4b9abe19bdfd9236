"""Numerics: where a deployment drops precision, expressed as four ops of the table.

- `round_act`: the activation dtype (float32 = identity, bfloat16, float16 with saturation);
- `quant_act`: quantise-dequantise a quantised linear's input (none; FP8 e4m3 per-token per-128 block with
  power-of-two scales as DeepSeek's kernels; INT8 per-token dynamic as W8A8 deployments);
- `kv_qat`: the KV cache's non-RoPE dims (float dtypes round; `fp8_e4m3` = official FP8 round trip, block 64);
- `indexer_qat`: the indexer's queries and keys (float dtypes round; `fp4_e2m1` = Hadamard + FP4 block 32 as
  DeepSeek's code; `int8` = Hadamard + per-vector INT8 as Ascend's A8 indexer cache).

`exact` (all identity) is the ground truth. The indexer's Hadamard rotation is orthonormal and applied to both
queries and keys, so it cannot change exact scores and is skipped when nothing is quantised.
`official` = bf16 activations + FP8 linear inputs + FP8 KV + FP4 indexer: DeepSeek's own inference numerics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats

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
    return formats.fp8_roundtrip(x, 128)


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 over the last dim with one float scale per vector: round(x / (amax/127))."""
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / s).clamp(-127, 127) * s


def kv_fp8_qat(x: torch.Tensor) -> torch.Tensor:
    """FP8 round trip of the non-RoPE KV dims, block 64, stored back in bf16."""
    return round_bf16(formats.fp8_roundtrip(x, 64))


def indexer_fp4_qat(x: torch.Tensor) -> torch.Tensor:
    """Hadamard rotation then FP4 (block 32) round trip of indexer queries / keys."""
    return round_bf16(formats.fp4_roundtrip(formats.hadamard(x), 32))


def indexer_int8_qat(x: torch.Tensor) -> torch.Tensor:
    return round_bf16(int8_roundtrip(formats.hadamard(x)))


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

    def ops(self) -> dict:
        act = {"none": identity, "fp8_block128": quant_act_fp8, "int8_per_token": int8_roundtrip}[self.act_quant]
        kv = kv_fp8_qat if self.kv == "fp8_e4m3" else rounder(self.kv)
        idx = {"fp4_e2m1": indexer_fp4_qat, "int8": indexer_int8_qat}.get(self.indexer) or rounder(self.indexer)
        return dict(round_act=rounder(self.compute), quant_act=act, kv_qat=kv, indexer_qat=idx)


OFFICIAL = NumericsSpec("bfloat16", "fp8_block128", "fp8_e4m3", "fp4_e2m1")
MODES = {"exact": NumericsSpec(), "official": OFFICIAL}
NUMERICS = tuple(MODES)
