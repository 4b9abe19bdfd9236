"""Device storage from the checkpoint stream: each tensor packed on the host and copied to the GPU / NPU
before the next one is read (issue 15), into the layouts `runtime.weights.device_storage` describes.

- FP8 linears in `fp8_block` stay as stored: the e4m3 codes are copied as they are (no FP8 -> float32 -> FP8
  round trip), the ue8m0 block scales decoded to float32 powers of two (`Fp8Block`);
- W8A8's `int8_linears` are re-quantised per tensor from its exact values (`Int8Channel`, [K, N]);
- the other quantised / bf16-on-disk weights go to the storage dtype (bf16 / fp16), routed experts into one
  preallocated [E, out, in] stack per layer and projection (`expert_stack`), written expert by expert;
- float32 for the rest (norms, sinks, mHC, `ape`, the gate, FP32_COMPUTE weights), int64 for the routing table.
The values equal `tests/device_pack_oracle.pack_weights` of the float32 checkpoint (the former whole-model
path, kept as the tests' oracle) bit for bit; each tensor's host transient is freed before the next.
"""

from __future__ import annotations

import re

import torch

from .. import number_formats
from .device_storage import _COMPUTE, _EXPERT, _STORAGE, Fp8Block, Int8Channel
from ..weight_transforms import W8A8_DEFAULT, _bf16_on_disk
from . import Weights


def device_weights(reader, weight_format: str, compute_dtype: str, device,
                   int8_linears=W8A8_DEFAULT) -> Weights:
    store = _STORAGE.get(weight_format, _COMPUTE[compute_dtype])
    int8 = re.compile("|".join(re.escape(p) + r"\b" for p in int8_linears)) if weight_format == "w8a8_int8" else None
    owned = reader.owned()
    groups: dict[tuple[str, str], list[int]] = {}             # (experts prefix, w1/w2/w3) -> expert ids held
    for name in owned:
        m = _EXPERT.match(name)
        if m:
            groups.setdefault((m[1], m[3]), []).append(int(m[2]))
    stacks: dict[tuple[str, str], torch.Tensor] = {}
    out, act_q = {}, set()
    for item in reader.tensors():
        name, kind = item.name, item.kind
        shape = owned[name][0] if not item.decoded else tuple(item.data.shape)
        linear = name.endswith(".weight") and len(shape) == 2 and not name.endswith(("embed.weight", "head.weight"))
        if kind == "i64":
            out[name] = item.data.to(device)                                     # tid2eid routing table
        elif int8 is not None and linear and int8.search(name) and (item.quantized or kind == "bf16"):
            out[name] = Int8Channel.from_float(item.values()).to(device)
            act_q.add(name)
        elif (weight_format == "fp8_block" and kind == "fp8" and len(shape) == 2 and ".experts." not in name
              and not name.endswith("attn.wo_a.weight")):
            if item.decoded:                   # a TP slice that cut blocks: re-blocked from its values
                out[name] = Fp8Block.from_float(item.data).to(device)
            else:                              # as stored: the codes' bytes are the checkpoint's
                out[name] = Fp8Block(item.data.to(device), number_formats.decode_e8m0(item.scale).to(device))
        elif (item.quantized or (kind == "bf16" and _bf16_on_disk(name, item.data))) and len(shape) >= 2:
            m = _EXPERT.match(name)
            if m:
                key = (m[1], m[3])
                ids = sorted(groups[key])
                if key not in stacks:
                    stacks[key] = torch.empty((len(ids), *shape), dtype=store, device=device)
                i = ids.index(int(m[2]))
                stacks[key][i].copy_(item.values().to(store))          # one expert's transient at a time
                out[name] = stacks[key][i]
            else:
                out[name] = item.values().to(device=device, dtype=store)
        else:
            out[name] = item.values().to(device=device, dtype=torch.float32)
    # fp8_block quantises the input of every linear stored FP8/FP4 on disk (as DeepSeek's kernels do)
    if weight_format == "fp8_block":
        act_q = {n for n, (_, kind) in owned.items() if kind in ("fp8", "fp4")}
    return Weights(out, frozenset(act_q), reader.stored_bytes())
