"""Weight-format transforms: what a hardware profile's weight format does to the shipped weights.

Each transform is a pure function of float32 weights (the exact dequantisation of the checkpoint) and
returns float32 values that equal what the target format represents, so its numerics are reproducible on
any CPU:

- `fp8_block`: as shipped (FP8 e4m3 linears with 128x128 ue8m0 scales, FP4 experts): values unchanged.
- `float32`:   exact dequantisation, no activation quantisation (the reference).
- `bf16` / `fp16`: dequantise FP8 / FP4 and round to bf16 / fp16 (chips without FP8 GEMMs, 310P).
- `w8a8_int8`: re-quantise to INT8 with one symmetric scale per output channel (activations per token at run
  time), the way V4 runs on Ascend A2/A3 (spec ascend.md §3.2). Which linears are re-quantised is the
  profile's `int8_linears` list; the rest stay bf16 (cann-recipes keeps compressors, wo_a and the head bf16).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from .ops.numerics import rounder

WEIGHT_FORMATS = ("fp8_block", "float32", "bf16", "fp16", "w8a8_int8")

# Weights stored bf16 on disk that DeepSeek's reference computes with in fp32 (spec §3.2: the MoE gate, the
# compressors' projections, the output head): every weight format keeps their on-disk values.
FP32_COMPUTE = (".gate.weight", "head.weight", ".compressor.wkv.weight", ".compressor.wgate.weight")

# Linear families (matched on official names) that W8A8 deployments quantise, per cann-recipes' V4 scheme.
W8A8_DEFAULT = ("attn.wq_b", "attn.wo_b", "indexer.wq_b", "ffn.experts", "ffn.shared_experts")


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float32 -> (int8 codes [out, in], float32 scale [out]) with w ~= codes * scale[:, None]."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8_per_channel(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * scale[:, None]


def _is_linear(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dim() == 2 and not name.endswith(("embed.weight", "head.weight"))


def transform_weights(tensors: dict[str, torch.Tensor], quantized: Iterable[str], weight_format: str,
                      int8_linears: Iterable[str] = W8A8_DEFAULT):
    """Apply a weight format. -> (new tensors, names whose linear input is quantised at run time).

    `quantized` is the set of names stored as FP8/FP4 in the checkpoint. Norms, sinks, mHC and gate
    parameters (fp32 in every deployment) are never touched; the routing table (int64) neither.
    """
    quantized = frozenset(quantized)
    if weight_format == "fp8_block":
        return dict(tensors), quantized
    if weight_format == "float32":
        return dict(tensors), frozenset()
    if weight_format in ("bf16", "fp16"):
        r = rounder("bfloat16" if weight_format == "bf16" else "float16")
        out = {n: r(t) if t.is_floating_point() and (n in quantized or _bf16_on_disk(n, t)) else t
               for n, t in tensors.items()}
        return out, frozenset()
    if weight_format == "w8a8_int8":
        pat = re.compile("|".join(re.escape(p) + r"\b" for p in int8_linears))
        out, q8 = {}, set()
        bf16 = rounder("bfloat16")
        for n, t in tensors.items():
            if _is_linear(n, t) and pat.search(n):
                out[n] = dequantize_int8_per_channel(*quantize_int8_per_channel(t))
                q8.add(n)
            elif t.is_floating_point() and (n in quantized or _bf16_on_disk(n, t)):
                out[n] = bf16(t)
            else:
                out[n] = t
        return out, frozenset(q8)
    raise ValueError(f"unknown weight format {weight_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")


def _bf16_on_disk(name: str, t: torch.Tensor) -> bool:
    """Tensors the official checkpoint stores in bf16 (spec §3.1) that a low-precision deployment computes
    with in its dtype: embeddings, norms, indexer weights_proj, .... fp32 ones (sinks, ape, hc_*, gate bias)
    stay fp32, and so do FP32_COMPUTE weights, which DeepSeek's reference computes with in fp32."""
    return (name.endswith((".weight",)) and not name.startswith("hc_") and ".hc_" not in name
            and not name.endswith(FP32_COMPUTE))
