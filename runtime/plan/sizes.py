"""The planner's byte arithmetic, once: bytes per tensor in the storage a profile's backend keeps, summed for the
weights (`weight_bytes`, whole model or one rank's share), the per-sequence state (`state_plan`) and one forward
chunk's activations (`activation_bytes`). The deployment plan (runtime.plan.deployment), the loaded runtime's
memory plan (runtime.plan.memory) and the multi-device layouts (runtime.plan.layouts) all count with these.
What each figure covers is said in `python -m runtime.plan --help` (runtime/plan/__main__.py).
"""


from __future__ import annotations

import math
from dataclasses import dataclass

from ..checkpoint.inventory import FP4_BLOCK, FP8_BLOCK, expected_tensors
from ..config import ModelConfig

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

    A device keeps the profile's weight format (`_device_bytes`). The CPU backend keeps the checkpoint's own formats whatever the
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
    return _device_bytes(name, shape, kind, profile, n)


def _device_bytes(name: str, shape: tuple[int, ...], kind: str, profile, n: int) -> int:
    """What runtime.weights.device.device_weights keeps for one tensor on a GPU / NPU (its rules, in its order):
    FP8 linears (not the experts, not `wo_a`) as e4m3 codes with float32 block scales under `fp8_block`; every
    other quantised or bf16-on-disk matrix in the storage dtype (the compute dtype unless the format names one) --
    the FP4 routed experts included: no FP4 GEMM runs on a device in this build, so they are held as bf16 stacks,
    4x their stored bytes; the rest (vectors, FP32_COMPUTE weights: the head, the gate, the compressors'
    projections) in float32."""
    from ..weight_transforms import _bf16_on_disk

    fmt = profile.weight_format
    if fmt == "fp8_block" and kind == "fp8" and len(shape) == 2 and ".experts." not in name \
            and not name.endswith("attn.wo_a.weight"):
        return n + 4 * math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK)
    if len(shape) >= 2 and (kind in ("fp8", "fp4") or (kind == "bf16" and _bf16_on_disk(name, None))):
        store = {"bf16": 2, "fp16": 2, "float32": 4}.get(fmt, _FLOAT_BYTES[profile.compute_dtype])
        return store * n
    return 4 * n


def weight_bytes(cfg: ModelConfig, profile, active: bool = False, layout=None, rank: int = 0) -> int:
    """Bytes of every weight in the storage the profile's backend keeps (`tensor_bytes`, summed); `active=True`:
    the bytes one decoded token reads at batch 1 (k of the E routed experts per layer, one embedding row, no MTP
    block). `layout` (runtime.parallel.Layout): only what rank `rank` owns, at its sliced shapes
    (`runtime.parallel.shard.owned_slice`, the loader's own rule)."""
    from ..parallel.shard import owned_slice

    total = 0
    for name, (shape, kind) in expected_tensors(cfg, cfg.expert_dtype or "fp4").items():
        decoded = False
        if layout is not None:
            sl = owned_slice(name, shape, layout, rank, cfg.n_routed_experts)
            if sl is False:
                continue
            if sl is not None:          # a slice that cuts FP8 blocks is kept as float32 values on the CPU
                decoded = kind == "fp8" and bool(sl.lo % FP8_BLOCK or (sl.hi % FP8_BLOCK and sl.hi != shape[sl.dim]))
                shape = tuple(sl.hi - sl.lo if d == sl.dim else s for d, s in enumerate(shape))
        b = tensor_bytes(name, shape, kind, profile, decoded)
        if active:
            if name.startswith("mtp."):
                continue
            if name == "embed.weight":
                b //= shape[0]
            elif ".experts." in name:
                b = b * cfg.experts_per_token / cfg.n_routed_experts
        total += b
    return int(total)


def macs_per_token(cfg: ModelConfig, pos: int) -> dict[str, int]:
    """Multiply-adds one decoded token at position `pos` costs, by part (no MTP block): `linears` (every 2-D
    weight it reads at its logical shape: k of the E routed experts, the mHC / head mixes, the head; not the
    embedding, whose row is a copy), `attention` (scores and weighted sums of every head over the window rows
    and the compressed entries it attends: the CSA layers' top-k, the HCA layers' all) and `indexer` (the CSA
    layers' lightning-indexer scores over every compressed key). Softmax, norms, RoPE and Sinkhorn are not
    multiply-adds and are left out: the figure is a floor on the arithmetic, for a roofline."""
    lin = 0
    for name, (shape, kind) in expected_tensors(cfg, cfg.expert_dtype or "fp4").items():
        if name.startswith("mtp.") or len(shape) != 2 or kind == "i64" or name == "embed.weight" \
                or not name.endswith(("weight", "_fn")):
            continue
        n = shape[0] * shape[1]
        lin += n * cfg.experts_per_token // cfg.n_routed_experts if ".experts." in name else n
    att = idx = 0
    for layer in range(cfg.num_layers):
        rows, r = min(pos + 1, cfg.window), cfg.ratio(layer)
        if r:
            rows += min(cfg.index_topk, (pos + 1) // r) if cfg.is_csa(layer) else (pos + 1) // r
        att += 2 * cfg.num_heads * cfg.head_dim * rows
        if r and cfg.is_csa(layer):
            idx += cfg.index_n_heads * cfg.index_head_dim * ((pos + 1) // r)
    return {"linears": lin, "attention": att, "indexer": idx, "total": lin + att + idx}


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


def gib(b: float, digits: int = 2) -> str:
    return f"{b / 2 ** 30:,.{digits}f} GiB"
