"""Independent parity: our float32 reference vs Hugging Face transformers' `DeepseekV4ForCausalLM`.

Both models get the same dequantised weights (our loader decodes the generated FP8 / FP4 checkpoint; the
float32 values are mapped onto HF's module names) and must give the same logits, max |dlogit| <= 1e-4.

Like with like — where transformers departs from DeepSeek's official inference code (spec §16, §18), we
follow the official code and the comparison is arranged so the difference cannot hide a bug:
- transformers runs full precision: no FP8 round trip of the KV, no FP8 activation quantisation, no
  Hadamard + FP4 simulation in the indexer. We compare with our `exact` numerics mode, which is the same
  float32 math (the Hadamard rotation is orthonormal on both q and k, so exact scores are unchanged).
- transformers' indexer takes `torch.topk`, which breaks exact score ties arbitrarily; ours breaks them
  lower-index-first. ReLU makes ties likely when few heads see a positive dot product, so the configs use
  16 indexer heads with real-valued weights: tied scores then have probability ~0.
- transformers applies the routing weight after the expert's down projection, the official code before it;
  the two are equal in exact arithmetic (a linear map commutes with the scalar), so only rounding differs.
- transformers maps only ratios 0/4/128 from `compress_ratios`; the small-HCA config passes HF's
  `layer_types` + `compress_rates` explicitly (one HCA ratio per model, as HF allows).
- transformers has no MTP block (it drops `mtp.*`), so the MTP weights are not compared here.
- transformers' YaRN frequencies come from its own rope utilities; the test asserts they equal ours.
"""

from __future__ import annotations

import pytest
import torch

from runtime.checkpoint import load_checkpoint, write_checkpoint
from runtime.model.state import DecodeState
from runtime.model.transformer import Transformer
from runtime.ops import reference_ops
from runtime.ops.norm_rope import rope_frequencies
from runtime.presets import preset

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

TOL = 1e-4

# (compress_ratios incl. the MTP entry, num_hash_layers, sequence length)
CONFIGS = {
    "swa-csa-hca128": ([0, 4, 128, 4, 0], 2, 640),     # > 600 tokens: 5 windows, 5 HCA entries, 160 CSA
    "csa-hca16-swa": ([4, 16, 0, 16, 0], 1, 300),      # smaller HCA ratio, CSA first, learned routing
}
_KIND = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def _ours_config(ratios, n_hash) -> dict:
    raw = preset("tiny")
    raw.update(num_hidden_layers=len(ratios) - 1, compress_ratios=ratios, num_hash_layers=n_hash)
    return raw


def _hf_config(raw: dict) -> DeepseekV4Config:
    n, ratios = raw["num_hidden_layers"], raw["compress_ratios"][: raw["num_hidden_layers"]]
    hca = sorted({r for r in ratios if r not in (0, 4)})
    assert len(hca) <= 1, "transformers supports one HCA ratio per model"
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


def _hf_state_dict(t: dict, n_layers: int, n_experts: int) -> dict:
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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ratios, n_hash, seq = CONFIGS[name]
    raw = _ours_config(ratios, n_hash)
    ck = load_checkpoint(write_checkpoint(tmp_path / name, raw, seed=11), progress=False)
    ours = Transformer(ck.config, ck.tensors, ck.quantized, reference_ops("exact"))

    hf = DeepseekV4ForCausalLM(_hf_config(raw)).float().eval()
    sd = _hf_state_dict(ck.tensors, ck.config.num_layers, ck.config.n_routed_experts)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    hf_freqs = hf.model.rotary_emb.compress_inv_freq
    assert torch.allclose(hf_freqs, rope_frequencies(ck.config.rope_dim, ck.config.compress_rope_theta, ck.config.yarn),
                          rtol=1e-6)

    ids = torch.randint(2, raw["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = hf(input_ids=ids, use_cache=False).logits.float()
        got = ours.forward(ids, DecodeState(ck.config, 2).seqs)
    # the comparison is only meaningful if the indexer really selects: more entries than index_topk
    assert seq // 4 > 4 * ck.config.index_topk
    err = (got - ref).abs().max().item()
    print(f"{name}: max |dlogit| = {err:.3g}, logit std {ref.std():.3g}")
    assert err <= TOL, f"max |dlogit| = {err:.3g} (logit std {ref.std():.3g})"
