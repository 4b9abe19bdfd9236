"""The tensor inventory of an official DeepSeek-V4 checkpoint, derived from its config (spec §4).

`expected_tensors(cfg, expert_format)` lists every weight the official HF safetensors layout holds for that
config: name -> (shape, storage kind). `.scale` companions of quantised weights are listed by the loader
and the writer from the kind, not here.

Storage kinds: "fp8" (float8_e4m3fn + 128x128 ue8m0 `.scale`), "fp4" (int8 packing two e2m1 codes + per-32
ue8m0 `.scale`), "bf16", "f32", "i64".
"""

from __future__ import annotations

from ..config import ModelConfig

FP8_BLOCK = 128
FP4_BLOCK = 32


def scale_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape of the `.scale` tensor that goes with a weight of this kind, or None."""
    if kind == "fp8":
        return (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
    if kind == "fp4":
        return (shape[0], shape[1] // FP4_BLOCK)
    return None


def stored_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape on disk: FP4 packs two values per byte along the input dim."""
    return (shape[0], shape[1] // 2) if kind == "fp4" else shape


def _layer(cfg: ModelConfig, layer: int, lin: str, expert: str) -> dict[str, tuple[tuple[int, ...], str]]:
    d, H, D, hc = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.hc_mult
    G, I, E = cfg.o_groups, cfg.moe_inter_dim, cfg.n_routed_experts
    t = {
        "attn_norm.weight": ((d,), "bf16"),
        "ffn_norm.weight": ((d,), "bf16"),
        "attn.wq_a.weight": ((cfg.q_lora_rank, d), lin),
        "attn.q_norm.weight": ((cfg.q_lora_rank,), "bf16"),
        "attn.wq_b.weight": ((H * D, cfg.q_lora_rank), lin),
        "attn.wkv.weight": ((D, d), lin),
        "attn.kv_norm.weight": ((D,), "bf16"),
        "attn.wo_a.weight": ((G * cfg.o_lora_rank, H * D // G), lin),
        "attn.wo_b.weight": ((d, G * cfg.o_lora_rank), lin),
        "attn.attn_sink": ((H,), "f32"),
        "ffn.gate.weight": ((E, d), "bf16"),
    }
    ratio = cfg.ratio(layer)
    if ratio:
        coff = 2 if cfg.is_csa(layer) else 1
        t.update({
            "attn.compressor.wkv.weight": ((coff * D, d), "bf16"),
            "attn.compressor.wgate.weight": ((coff * D, d), "bf16"),
            "attn.compressor.ape": ((ratio, coff * D), "f32"),
            "attn.compressor.norm.weight": ((D,), "bf16"),
        })
    if cfg.is_csa(layer):
        ih, idim = cfg.index_n_heads, cfg.index_head_dim
        t.update({
            "attn.indexer.wq_b.weight": ((ih * idim, cfg.q_lora_rank), lin),
            "attn.indexer.weights_proj.weight": ((ih, d), "bf16"),
            "attn.indexer.compressor.wkv.weight": ((2 * idim, d), "bf16"),
            "attn.indexer.compressor.wgate.weight": ((2 * idim, d), "bf16"),
            "attn.indexer.compressor.ape": ((4, 2 * idim), "f32"),
            "attn.indexer.compressor.norm.weight": ((idim,), "bf16"),
        })
    if cfg.is_hash_layer(layer):
        t["ffn.gate.tid2eid"] = ((cfg.vocab_size, cfg.experts_per_token), "i64")
    else:
        t["ffn.gate.bias"] = ((E,), "f32")
    for e in range(E):
        t[f"ffn.experts.{e}.w1.weight"] = ((I, d), expert)
        t[f"ffn.experts.{e}.w3.weight"] = ((I, d), expert)
        t[f"ffn.experts.{e}.w2.weight"] = ((d, I), expert)
    if cfg.n_shared_experts:
        t["ffn.shared_experts.w1.weight"] = ((I, d), lin)
        t["ffn.shared_experts.w3.weight"] = ((I, d), lin)
        t["ffn.shared_experts.w2.weight"] = ((d, I), lin)
    mixes = (2 + hc) * hc
    for sub in ("attn", "ffn"):
        t[f"hc_{sub}_fn"] = ((mixes, hc * d), "f32")
        t[f"hc_{sub}_base"] = ((mixes,), "f32")
        t[f"hc_{sub}_scale"] = ((3,), "f32")
    return t


def _head(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    d, hc = cfg.hidden_size, cfg.hc_mult
    return {"norm.weight": ((d,), "bf16"), "hc_head_fn": ((hc, hc * d), "f32"),
            "hc_head_base": ((hc,), "f32"), "hc_head_scale": ((1,), "f32")}


def expected_tensors(cfg: ModelConfig, expert_format: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (logical shape, storage kind) for every tensor of the checkpoint (no `.scale` entries)."""
    lin = "fp8" if cfg.fp8_linears else "bf16"
    d, V = cfg.hidden_size, cfg.vocab_size
    t = {"embed.weight": ((V, d), "bf16"), "head.weight": ((V, d), "bf16"), **_head(cfg)}
    for i in range(cfg.num_layers):
        t.update({f"layers.{i}.{k}": v for k, v in _layer(cfg, i, lin, expert_format).items()})
    for j in range(cfg.num_mtp):
        mtp = {**_layer(cfg, cfg.num_layers + j, lin, expert_format), **_head(cfg),
               "e_proj.weight": ((d, d), lin), "h_proj.weight": ((d, d), lin),
               "enorm.weight": ((d,), "bf16"), "hnorm.weight": ((d,), "bf16")}
        t.update({f"mtp.{j}.{k}": v for k, v in mtp.items()})
    return t
