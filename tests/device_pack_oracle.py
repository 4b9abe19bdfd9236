"""The former whole-model device packing (float32 checkpoint values -> device storage in one pass), kept as the
tests' oracle of the streaming path `runtime.weights.device.device_weights`: the same layouts
(runtime.weights.device_storage) from the decoded values, which must match the stream bit for bit. Not a test
module."""

from __future__ import annotations

import re
from typing import Iterable

import torch

from runtime.weight_transforms import W8A8_DEFAULT, _bf16_on_disk, _is_linear
from runtime.weights.device_storage import _COMPUTE, _EXPERT, _STORAGE, Fp8Block, Int8Channel


def pack_weights(tensors: dict[str, torch.Tensor], quantized: Iterable[str], weight_format: str,
                 compute_dtype: str, device, int8_linears: Iterable[str] = W8A8_DEFAULT):
    """Float32 checkpoint values -> (name -> weight in the format's device storage, names whose linear input
    the numerics quantise). The second result is the same set `transform_weights` returns."""
    quantized = frozenset(quantized)
    store = _STORAGE.get(weight_format, _COMPUTE[compute_dtype])
    int8 = re.compile("|".join(re.escape(p) + r"\b" for p in int8_linears)) if weight_format == "w8a8_int8" else None
    out, act_q, experts = {}, set(), {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            out[name] = t.to(device)                                   # tid2eid routing table
        elif int8 is not None and _is_linear(name, t) and int8.search(name):
            out[name] = Int8Channel.from_float(t).to(device)
            act_q.add(name)                                            # W8A8: int8 activations here
        elif (weight_format == "fp8_block" and name in quantized and t.dim() == 2 and ".experts." not in name
              and not name.endswith("attn.wo_a.weight")):
            out[name] = Fp8Block.from_float(t).to(device)
        elif (name in quantized or _bf16_on_disk(name, t)) and t.dim() >= 2:     # FP32_COMPUTE: not bf16-on-disk
            m = _EXPERT.match(name)
            if m:                                                      # stacked below
                experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
            else:
                out[name] = t.to(device=device, dtype=store)
        else:
            out[name] = t.to(device=device, dtype=torch.float32)
    for (prefix, w), per in experts.items():
        ids = sorted(per)                         # all E experts, or an expert-parallel rank's block of them
        stack = torch.stack([per[e] for e in ids]).to(device=device, dtype=store)   # [E, out, in]
        for i, e in enumerate(ids):
            out[f"{prefix}.{e}.{w}.weight"] = stack[i]
    # fp8_block quantises the input of every linear stored FP8/FP4 on disk (as DeepSeek's kernels do)
    return out, (quantized if weight_format == "fp8_block" else frozenset(act_q))
