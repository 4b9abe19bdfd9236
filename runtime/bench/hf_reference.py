"""transformers' `DeepseekV4ForCausalLM` on one of our checkpoints: its config and its parameter names.

Used by the independent parity test (tests/test_hf_parity.py) and by the benchmark's side-by-side mode
(`python -m runtime.bench --compare transformers`). transformers is an optional, test-only dependency: this
module imports it only inside `load_hf_model`. transformers holds one HCA ratio per model (its
`compress_rates` is per layer type), so a checkpoint with two HCA ratios is refused with one line.
"""

from __future__ import annotations

import torch

from ..errors import InputError

_KIND = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def hf_config(raw: dict):
    """transformers' config for our HF root config dict `raw`."""
    from transformers import DeepseekV4Config

    n, ratios = raw["num_hidden_layers"], raw["compress_ratios"][: raw["num_hidden_layers"]]
    hca = sorted({r for r in ratios if r not in (0, 4)})
    if len(hca) > 1:
        raise InputError(f"transformers holds one HCA compression ratio per model, this config has {hca}; "
                         "compare on a checkpoint with one (python -m runtime.bench --compare uses such a one)")
    prf = raw["qk_rope_head_dim"] / raw["head_dim"]
    ys = raw["rope_scaling"]
    return DeepseekV4Config(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_hidden_layers=n,
        num_attention_heads=raw["num_attention_heads"], head_dim=raw["head_dim"], q_lora_rank=raw["q_lora_rank"],
        o_groups=raw["o_groups"], o_lora_rank=raw["o_lora_rank"], n_routed_experts=raw["n_routed_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"], moe_intermediate_size=raw["moe_intermediate_size"],
        routed_scaling_factor=raw["routed_scaling_factor"], swiglu_limit=raw["swiglu_limit"],
        sliding_window=raw["sliding_window"], index_n_heads=raw["index_n_heads"],
        index_head_dim=raw["index_head_dim"], index_topk=raw["index_topk"], hc_mult=raw["hc_mult"],
        hc_sinkhorn_iters=raw["hc_sinkhorn_iters"], hc_eps=raw["hc_eps"], rms_norm_eps=raw["rms_norm_eps"],
        max_position_embeddings=raw["max_position_embeddings"], partial_rotary_factor=prf,
        layer_types=[_KIND.get(r, "heavily_compressed_attention") for r in ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128},
        mlp_layer_types=["hash_moe" if i < raw["num_hash_layers"] else "moe" for i in range(n)],
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": float(raw["rope_theta"]), "partial_rotary_factor": prf},
            "compress": {"rope_type": "yarn", "rope_theta": float(raw["compress_rope_theta"]),
                         "factor": float(ys["factor"]),
                         "original_max_position_embeddings": ys["original_max_position_embeddings"],
                         "beta_fast": float(ys["beta_fast"]), "beta_slow": float(ys["beta_slow"]),
                         "attention_factor": 1.0, "partial_rotary_factor": prf},
        },
    )


def hf_state_dict(t: dict, n_layers: int, n_experts: int) -> dict:
    """Official checkpoint names (dequantised) -> transformers' parameter names."""
    sd = {"model.embed_tokens.weight": t["embed.weight"], "lm_head.weight": t["head.weight"],
          "model.norm.weight": t["norm.weight"], "model.hc_head.hc_fn": t["hc_head_fn"],
          "model.hc_head.hc_base": t["hc_head_base"], "model.hc_head.hc_scale": t["hc_head_scale"]}
    for i in range(n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        ren = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.q_norm.weight": "self_attn.q_a_norm.weight",
               "attn.wq_b.weight": "self_attn.q_b_proj.weight", "attn.wkv.weight": "self_attn.kv_proj.weight",
               "attn.kv_norm.weight": "self_attn.kv_norm.weight", "attn.wo_a.weight": "self_attn.o_a_proj.weight",
               "attn.wo_b.weight": "self_attn.o_b_proj.weight", "attn.attn_sink": "self_attn.sinks",
               "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
               "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
               "attn.compressor.ape": "self_attn.compressor.position_bias",
               "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
               "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
               "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
               "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
               "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
               "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
               "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
               "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
               "ffn.gate.tid2eid": "mlp.gate.tid2eid",
               "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
               "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
               "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight"}
        for sub in ("attn", "ffn"):
            for p in ("fn", "base", "scale"):
                ren[f"hc_{sub}_{p}"] = f"{sub}_hc.{p}"
        for k, v in ren.items():
            if o + k in t:
                sd[h + v] = t[o + k]
        e = range(n_experts)
        # HF packs [gate (w1); up (w3)] per expert and chunks them in that order.
        sd[h + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((t[f"{o}ffn.experts.{j}.w1.weight"], t[f"{o}ffn.experts.{j}.w3.weight"])) for j in e])
        sd[h + "mlp.experts.down_proj"] = torch.stack([t[f"{o}ffn.experts.{j}.w2.weight"] for j in e])
    return sd




def load_hf_model(raw: dict, tensors: dict, num_layers: int, n_experts: int):
    """A float32 `DeepseekV4ForCausalLM` holding our checkpoint's dequantised tensors (strict name match)."""
    from transformers import DeepseekV4ForCausalLM

    hf = DeepseekV4ForCausalLM(hf_config(raw)).float().eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(tensors, num_layers, n_experts), strict=False)
    if missing or unexpected:
        raise InputError(f"transformers' model does not match the checkpoint: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return hf
