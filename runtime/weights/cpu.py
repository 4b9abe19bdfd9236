"""CPU storage from the checkpoint stream: the checkpoint's own formats, zero-copy, whatever the weight format.

Per tensor (`Stored`, one at a time), what the profile's weight format does to its values decides its storage:
- values unchanged (`float32` / `fp8_block`: exact; and `bf16` / `fp16` / the W8A8 profile's bf16 linears when
  rounding to that dtype leaves every value as it is, which is the case for FP8 / FP4 / bf16 checkpoint values
  in bf16): the stored form, as views of the memory map -- FP8 codes + ue8m0 block scales (`Fp8Stored`), FP4
  pairs + per-32 scales (`Fp4Stored`), bf16 tensors;
- values rounded (fp16 where a value is not representable): that dtype's own storage, from one tensor's
  float32 transient;
- W8A8's `int8_linears`: int8 codes + one float32 scale per output channel (`Int8Rows`), re-quantised from the
  tensor's exact values (the same codes `runtime.weight_transforms.quantize_int8_per_channel` gives);
- small float32 copies where the model computes with a float32 tensor: 1-D bf16 weights (norms) and the MoE
  gate's [E, d] weight (DeepSeek's reference computes the gate in fp32).
float32 / int64 tensors are the map's views. Which linears quantise their input at run time is what
`runtime.weight_transforms.transform_weights` says (its values are the oracle of this storage in the tests).
"""

from __future__ import annotations

import re

import torch

from ..checkpoint.loader import Stored
from ..ops.numerics import rounder
from ..weight_transforms import W8A8_DEFAULT, _bf16_on_disk, quantize_int8_per_channel
from . import Weights
from .cpu_storage import Fp4Stored, Fp8Stored, Int8Rows

_ROUND = {"bf16": "bfloat16", "fp16": "float16"}
_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _linear_name(name: str, shape) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and not name.endswith(("embed.weight", "head.weight"))


def _as_stored(item: Stored):
    if item.kind == "fp8":
        return Fp8Stored(item.data, item.scale)
    if item.kind == "fp4":
        return Fp4Stored(item.data, item.scale)
    return item.data


def cpu_storage(item: Stored, weight_format: str, int8) -> tuple[object, bool, bool]:
    """-> (storage, whether its input is quantised at run time, whether it is a view of the map)."""
    name, data = item.name, item.data
    shape = tuple(data.shape) if item.kind != "fp4" or item.decoded else (data.shape[0], data.shape[1] * 2)
    if item.kind == "i64" or (item.kind == "f32" and not item.decoded):
        return data, False, not item.decoded
    floating = item.quantized or item.kind == "bf16"
    if int8 is not None and floating and _linear_name(name, shape) and int8.search(name):
        codes, scale = quantize_int8_per_channel(item.values())
        return Int8Rows(codes, scale), True, False
    rounds = weight_format in ("bf16", "fp16", "w8a8_int8") and floating and \
        (item.quantized or _bf16_on_disk(name, data))
    small = len(shape) == 1 or name.endswith(".gate.weight")
    act_q = weight_format == "fp8_block" and item.quantized
    if rounds:
        fmt = "bf16" if weight_format == "w8a8_int8" else weight_format
        v = item.values()
        r = rounder(_ROUND[fmt])(v)
        if not torch.equal(r, v):                      # rounding changes values: that dtype's own storage
            return (r if small else r.to(_DTYPE[fmt])), False, False
    if small:
        return item.values().float().clone(), act_q, False
    if item.decoded:
        return item.data, act_q, False
    return _as_stored(item), act_q, True


def cpu_weights(reader, weight_format: str, int8_linears=W8A8_DEFAULT) -> Weights:
    """Stream `reader`'s tensors into CPU storage (see the module docstring)."""
    int8 = re.compile("|".join(re.escape(p) + r"\b" for p in int8_linears)) if weight_format == "w8a8_int8" else None
    tensors, act_q, mapped = {}, set(), set()
    for item in reader.tensors():
        w, q, m = cpu_storage(item, weight_format, int8)
        tensors[item.name] = w
        if q:
            act_q.add(item.name)
        if m:
            mapped.add(item.name)
    return Weights(tensors, frozenset(act_q), reader.stored_bytes(), frozenset(mapped))
