"""Numerics modes of the reference: where precision is dropped, as ops.

`exact`: plain float32 everywhere; the ground truth. Every op here is the identity (the indexer's Hadamard
rotation is orthonormal and applied to both queries and keys, so it cannot change scores in exact
arithmetic and is skipped).

`official`: an emulation of DeepSeek's own inference numerics (spec §3.2) on float32 tensors:
bf16 activations, FP8 e4m3 per-128 activation quantisation before FP8/FP4 linears, an FP8 round trip
(block 64, ue8m0) of the non-RoPE KV dims, and Hadamard + FP4 (block 32) on the indexer's queries and keys.
"""

from __future__ import annotations

import torch

from .. import formats

NUMERICS = ("exact", "official")


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def quant_act_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-128-column FP8 quantise-dequantise of a linear's input."""
    return formats.fp8_roundtrip(x, 128)


def kv_fp8_qat(x: torch.Tensor) -> torch.Tensor:
    """FP8 round trip of the non-RoPE KV dims, block 64, stored back in bf16."""
    return round_bf16(formats.fp8_roundtrip(x, 64))


def indexer_fp4_qat(x: torch.Tensor) -> torch.Tensor:
    """Hadamard rotation then FP4 (block 32) round trip of indexer queries / keys."""
    return round_bf16(formats.fp4_roundtrip(formats.hadamard(x), 32))


MODES = {
    "exact": dict(round_act=identity, quant_act=identity, kv_qat=identity, indexer_qat=identity),
    "official": dict(round_act=round_bf16, quant_act=quant_act_fp8, kv_qat=kv_fp8_qat,
                     indexer_qat=indexer_fp4_qat),
}
