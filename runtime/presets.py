"""Model presets, written as the HF root `config.json` they stand for.

`flash` and `pro` carry the real DeepSeek-V4 dimensions (spec §2.1) so the planner and the tests can reason
about real models without weights. `tiny` is the embedded default of the demo and the tests: small enough to
run a 4K prefill in seconds on two cores, yet it keeps every layer type (sliding-window-only, CSA ratio 4 with
its indexer, HCA ratio 128 and a small HCA ratio 16), hash-routed and learned MoE layers, and an MTP block.
"""

import copy

_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}

_COMMON = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "o_lora_rank": 1024,
    "vocab_size": 129280,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_hash_layers": 3,
    "swiglu_limit": 10.0,
    "hidden_act": "silu",
    "sliding_window": 128,
    "compress_rope_theta": 160000,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "index_n_heads": 64,
    "index_head_dim": 128,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 1048576,
    "quantization_config": _QUANT,
    "expert_dtype": "fp4",
    "torch_dtype": "bfloat16",
}

FLASH = {
    **_COMMON,
    "hidden_size": 4096,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "n_routed_experts": 256,
    "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "index_topk": 512,
}

PRO = {
    **_COMMON,
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "o_groups": 16,
    "n_routed_experts": 384,
    "moe_intermediate_size": 3072,
    "routed_scaling_factor": 2.5,
    "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
    "index_topk": 1024,
}

# Byte-level vocabulary for the tiny default: 0 = BOS, 1 = EOS, 2..257 = bytes, the rest unused.
TINY = {
    **_COMMON,
    "hidden_size": 256,
    "num_hidden_layers": 5,
    "num_attention_heads": 8,
    "head_dim": 64,
    "qk_rope_head_dim": 16,
    "q_lora_rank": 128,
    "o_groups": 2,
    "o_lora_rank": 64,
    "vocab_size": 320,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "routed_scaling_factor": 1.5,
    "num_hash_layers": 2,
    "compress_ratios": [0, 4, 128, 4, 16, 0],
    "index_n_heads": 16,
    "index_head_dim": 32,
    "index_topk": 16,
}

# The shape of the trained embedded default (runtime/default_model, `python -m runtime.train --preset
# tiny-lm`): the tiny preset cut to three layers that still hold every layer kind (window-only + hash-routed
# MoE, CSA ratio 4 with its indexer, HCA ratio 128, learned-routed MoE, mHC, MTP), so it trains in an hour
# on two shared cores. vocab_size is the trained tokenizer's.
TINY_LM = {**TINY, "num_hidden_layers": 3, "compress_ratios": [0, 4, 128, 0], "num_hash_layers": 1}

PRESETS = {"flash": FLASH, "pro": PRO, "tiny": TINY, "tiny-lm": TINY_LM}


def preset(name: str) -> dict:
    """A deep copy of the named preset's config.json dict."""
    from .errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
