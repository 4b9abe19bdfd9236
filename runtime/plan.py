"""`python -m runtime.plan`: a memory plan from first principles (issue 6, first part: the arithmetic).

    python -m runtime.plan --model flash --profile nvidia-h200 --context 1048576 [--batch 1] [--devices 8]

- weights: every tensor of the official inventory in the profile's weight format (FP8 linears + ue8m0 128x128
  scales, FP4 experts + per-32 scales as shipped; bf16 / fp16 / float32; W8A8 int8 + one fp32 scale per output
  channel for the profile's `int8_linears`, bf16 for the rest);
- per sequence, growing with the context: compressed KV entries (CSA 1 per 4 tokens, HCA 1 per 128) and CSA
  indexer keys, in the profile's KV / indexer dtypes (fp8_e4m3 = DeepSeek's / vLLM's 584-byte entry: 448 FP8
  non-RoPE dims + 64 bf16 RoPE dims + one ue8m0 scale per 64 + 1 pad; int8 / FP8 indexer key = 128 + a 4-byte
  scale; FP4 key = 64 + one scale byte per 32);
- per sequence, fixed: the 128-token window of every layer (KV dtype) and the compressors' fp32 state
  (values + gate scores of the last 2 x ratio tokens for CSA, ratio tokens for HCA; spec §11).
Also: the same context's cache in a V3.2-style layout (DeepSeek-V3.2-Exp: 61 layers of MLA latents + indexer
keys, no compression), for the model card's "V4-Pro needs ~10% of V3.2's KV cache at 1M tokens".
- activations / workspace: the live tensors of one forward chunk (`activation_bytes`: the residual streams,
  the attention and MoE intermediates and the largest attention / indexer score block), for a prefill chunk of
  `--chunk` tokens (default 4096) at the given context; the device budget keeps 10% headroom besides.
`MemoryPlan` is the same arithmetic for a loaded runtime: it is printed at load and refuses (one line, before
any allocation) a batch or context whose state would not fit the profile's memory next to the weights.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint.inventory import FP4_BLOCK, FP8_BLOCK, expected_tensors
from .cli import ArgumentParser
from .config import ModelConfig
from .errors import InputError
from .profile import load_profile

HEADROOM = 0.9
_FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_entry_bytes(dtype: str, dim: int, rope: int) -> float:
    """Bytes of one KV row (window row or compressed entry) of `dim` dims, the last `rope` of them RoPE."""
    if dtype == "fp8_e4m3":
        nope = dim - rope
        return nope + 2 * rope + math.ceil(nope / 64) + 1
    return _FLOAT_BYTES[dtype] * dim


def index_entry_bytes(dtype: str, dim: int) -> float:
    if dtype in ("int8", "fp8_e4m3"):
        return dim + 4
    if dtype == "fp4_e2m1":
        return dim / 2 + dim / 32
    return _FLOAT_BYTES[dtype] * dim


def tensor_bytes(name: str, shape: tuple[int, ...], kind: str, profile, decoded: bool = False) -> int:
    """Bytes one tensor (logical shape, checkpoint kind) takes in the storage the profile's backend keeps.

    A device keeps the profile's weight format. The CPU backend keeps the checkpoint's own formats whatever the
    format's values (runtime.weights.cpu): FP8 codes + ue8m0 block scales, FP4 pairs + per-32 scales, bf16 as
    stored; float32 copies of 1-D weights and the MoE gate; W8A8 int8 + a float32 scale per channel for the
    profile's `int8_linears`; fp16 storage (2 bytes, an upper bound: kept as stored where exact). `decoded`: a
    tensor-parallel slice that cuts FP8 blocks, kept as float32 values on the CPU."""
    fmt, n = profile.weight_format, math.prod(shape)
    if kind == "i64":
        return 8 * n
    if kind == "f32":
        return 4 * n
    int8 = fmt == "w8a8_int8" and len(shape) == 2 and any(f in name for f in profile.int8_linears) \
        and not name.endswith(("embed.weight", "head.weight"))
    if int8:
        return n + 4 * shape[0]
    if profile.backend == "cpu":
        if len(shape) == 1 or name.endswith(".gate.weight") or decoded:
            return 4 * n
        if fmt == "fp16" and kind != "f32":
            return 2 * n
        if kind == "fp8":
            return n + math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK)
        if kind == "fp4":
            return n // 2 + n // FP4_BLOCK
        return 2 * n
    if fmt == "fp8_block" and kind == "fp8":
        return n + math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK)
    if fmt == "fp8_block" and kind == "fp4":
        return n // 2 + n // FP4_BLOCK
    if fmt == "float32":
        return 4 * n
    return 2 * n


def weight_bytes(cfg: ModelConfig, profile, active: bool = False) -> int:
    """Bytes of every weight in the storage the profile's backend keeps (`tensor_bytes`); `active=True`: the
    bytes one decoded token reads at batch 1 (k of the E routed experts per layer, one embedding row, no MTP
    block)."""
    total = 0
    for name, (shape, kind) in expected_tensors(cfg, cfg.expert_dtype or "fp4").items():
        b = tensor_bytes(name, shape, kind, profile)
        if active:
            if name.startswith("mtp."):
                continue
            if name == "embed.weight":
                b //= shape[0]
            elif ".experts." in name:
                b = b * cfg.experts_per_token / cfg.n_routed_experts
        total += b
    return int(total)


# DeepSeek-V3.2-Exp's cache for comparison (its config.json): 61 layers, each caching per token one MLA latent of
# kv_lora_rank 512 + RoPE 64 and one lightning-indexer key of 128 dims; no window, no compression.
V32 = {"layers": 61, "latent": 512, "rope": 64, "index_dim": 128}


def v32_per_token(profile) -> float:
    """Bytes per token of a V3.2-style cache in the same KV / indexer dtypes as `profile`."""
    row = kv_entry_bytes(profile.kv_dtype, V32["latent"] + V32["rope"], V32["rope"])
    return V32["layers"] * (row + index_entry_bytes(profile.indexer_dtype, V32["index_dim"]))


@dataclass(frozen=True)
class StatePlan:
    per_token: float          # bytes per sequence per token of context
    fixed: int                # bytes per sequence, whatever the context
    window: int
    compressor_state: int


def state_plan(cfg: ModelConfig, profile, include_mtp: bool = False, layout: str | None = None) -> StatePlan:
    """Per-sequence state; `layout` = one float dtype for every row (what a runtime build actually stores,
    e.g. "float32" for the torch runtime) instead of the profile's KV / indexer dtypes."""
    D, rope, W = cfg.head_dim, cfg.rope_dim, cfg.window
    row = kv_entry_bytes(layout or profile.kv_dtype, D, rope)
    key = index_entry_bytes(layout or profile.indexer_dtype, cfg.index_head_dim)
    per_token, window, comp = 0.0, 0, 0
    for layer in range(cfg.num_layers + (cfg.num_mtp if include_mtp else 0)):
        m = cfg.ratio(layer)
        window += int(W * row)
        if m:
            csa = cfg.is_csa(layer)
            per_token += row / m + (key / 4 if csa else 0)
            coff = 2 if csa else 1
            comp += 2 * coff * m * coff * D * 4                               # values + scores, fp32
            if csa:
                comp += 2 * 2 * 4 * 2 * cfg.index_head_dim * 4                # the indexer's own (ratio 4)
    return StatePlan(per_token, window + comp, window, comp)


def activation_bytes(cfg: ModelConfig, profile, tokens: int, context: int) -> int:
    """Live activations of one forward chunk of `tokens` tokens (summed over the batch) at `context`: the
    hc residual streams (in, out, a mix) and one sub-block's intermediates (q, kv, attention output, the
    routed + shared experts' hidden states, the logits of the last position), plus the largest score block
    (the reference's 256-query blocks: attention over window + selected rows, the indexer over every
    compressed key) in float32."""
    act = _FLOAT_BYTES.get(profile.compute_dtype, 4)
    d, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    per_token = act * (3 * cfg.hc_mult * d + 2 * H * D + 2 * cfg.q_lora_rank + cfg.o_groups * cfg.o_lora_rank
                       + 3 * (cfg.experts_per_token + cfg.n_shared_experts) * cfg.moe_inter_dim)
    hca = [cfg.ratio(i) for i in range(cfg.num_layers) if cfg.ratio(i) > 4]
    rows = cfg.window + max([cfg.index_topk] + [context // m for m in hca])
    block = min(tokens, 256)
    scores = 4 * block * max(H * rows, cfg.index_n_heads * context // 4)
    return int(per_token * tokens + scores + 4 * cfg.vocab_size)


def plan(cfg: ModelConfig, profile, context: int, batch: int = 1, devices: int = 1, chunk: int = 4096) -> dict:
    if context < 1 or batch < 1 or devices < 1 or chunk < 1:
        raise InputError("context, batch, devices and chunk must be positive integers")
    if context > cfg.max_position:
        raise InputError(f"context {context} exceeds the model's {cfg.max_position} positions")
    w = weight_bytes(cfg, profile)
    st = state_plan(cfg, profile)
    per_seq = st.fixed + st.per_token * context
    act = activation_bytes(cfg, profile, min(chunk, context), context)
    total = w + batch * per_seq + act
    budget = devices * profile.memory_gib.value * 2 ** 30 * HEADROOM
    spare = budget - w
    v32 = v32_per_token(profile) * context
    spare -= act
    if spare <= batch * st.fixed:
        max_context = 0
    elif st.per_token == 0:          # every layer window-only: the state stops growing past the window
        max_context = cfg.max_position
    else:
        max_context = min(cfg.max_position, int((spare / batch - st.fixed) // st.per_token))
    return {"weights": w, "activations": act, "active_weights": weight_bytes(cfg, profile, active=True),
            "state_per_sequence": per_seq, "v32_style_state": v32, "vs_v32": per_seq / v32, "state_per_token": st.per_token, "state_fixed": st.fixed,
            "total": total, "budget": budget, "fits": total <= budget,
            "devices_needed": math.ceil(total / (profile.memory_gib.value * 2 ** 30 * HEADROOM)),
            "max_context": max_context,
            "max_batch": int(spare // per_seq) if spare > 0 else 0}


def gib(b: float, digits: int = 2) -> str:
    return f"{b / 2 ** 30:,.{digits}f} GiB"


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m runtime.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flash", help="flash, pro, tiny, or a config.json path")
    ap.add_argument("--profile", default="nvidia-h200")
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens) the activations are sized for")
    ap.add_argument("--layouts", action="store_true",
                    help="propose TP x EP x nodes layouts that fit, with per-rank memory (runtime.parallel)")
    ap.add_argument("--per-node", type=int, default=8, help="devices per node, for --layouts")
    args = ap.parse_args(argv)
    from .cli import run_cli

    return run_cli(lambda: _report(args))


def _report(args) -> int:
    cfg = ModelConfig.preset(args.model) if args.model in ("flash", "pro", "tiny") else \
        ModelConfig.from_file(Path(args.model))
    prof = load_profile(args.profile)
    p = plan(cfg, prof, args.context, args.batch, args.devices, args.chunk)
    if args.layouts:
        from .parallel.plan_layouts import format_layouts

        print(format_layouts(args.model, cfg, prof, args.context, args.batch, args.per_node))
        return 0
    print(f"{args.model} on {args.devices} x {prof.name} ({prof.memory_gib.value:g} GiB each, 10% headroom), "
          f"context {args.context:,}, batch {args.batch}")
    print(f"  weights ({prof.weight_format})        {gib(p['weights'])}")
    print(f"  state per sequence           {gib(p['state_per_sequence'])}  "
          f"({p['state_per_token']:,.1f} B/token + {p['state_fixed'] / 2 ** 20:,.1f} MiB fixed)")
    print(f"  a V3.2-style cache (MLA 512+64 + indexer key per token and layer, same dtypes): "
          f"{gib(p['v32_style_state'])}; V4 needs {100 * p['vs_v32']:.1f}% of it")
    print(f"  total                        {gib(p['total'])} of {gib(p['budget'])}: "
          f"{'fits' if p['fits'] else 'does NOT fit'}; needs {p['devices_needed']} device(s)")
    print(f"  max context at batch {args.batch}: {p['max_context']:,}; max batch at this context: {p['max_batch']:,}")
    print(f"  activations / workspace ({min(args.chunk, args.context):,}-token prefill chunk): "
          f"{gib(p['activations'])} (included in the total)")
    print(f"  weights read per decoded token (batch 1): {gib(p['active_weights'])} -> at the profile's "
          f"{prof.bandwidth_gbps.value:g} GB/s, >= {p['active_weights'] / prof.bandwidth_gbps.value / 1e6:.1f} ms "
          "per step (bandwidth bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
