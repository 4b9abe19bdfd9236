"""Config parsing from official config.json dicts: real Flash/Pro schedules, defaults and clear errors."""

import json

import pytest

from runtime.config import ModelConfig
from runtime.errors import ConfigError
from runtime.presets import preset


def test_flash_layer_schedule():
    c = ModelConfig.preset("flash")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.index_topk, c.route_scale) == (4096, 43, 64, 512, 1.5)
    assert [i for i in range(43) if c.layer_kind(i) == "swa"] == [0, 1]
    assert [i for i in range(43) if c.is_csa(i)] == list(range(2, 43, 2))
    assert [i for i in range(43) if c.layer_kind(i) == "hca128"] == list(range(3, 42, 2))
    assert c.ratio(43) == 0 and c.num_mtp == 1                  # the MTP block's own entry
    assert [i for i in range(43) if c.is_hash_layer(i)] == [0, 1, 2]
    assert c.yarn.factor == 16 and c.yarn.original_max_position == 65536 and c.compress_rope_theta == 160000


def test_pro_layer_schedule():
    c = ModelConfig.preset("pro")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.o_groups, c.index_topk) == (7168, 61, 128, 16, 1024)
    assert [i for i in range(61) if c.layer_kind(i) == "swa"] == []
    assert len([i for i in range(61) if c.is_csa(i)]) == 30
    assert len([i for i in range(61) if c.layer_kind(i) == "hca128"]) == 31


def test_tiny_has_every_layer_type():
    c = ModelConfig.preset("tiny")
    kinds = {c.layer_kind(i) for i in range(c.num_layers)}
    assert {"swa", "csa", "hca128", "hca16"} <= kinds
    assert any(c.is_hash_layer(i) for i in range(c.num_layers))
    assert not all(c.is_hash_layer(i) for i in range(c.num_layers))


def test_missing_keys_are_listed_together():
    raw = preset("tiny")
    del raw["hidden_size"], raw["index_topk"]
    with pytest.raises(ConfigError, match="missing required key.*hidden_size, index_topk"):
        ModelConfig.from_hf(raw)


def test_extra_ratio_entries_and_unknown_keys():
    raw = preset("flash")
    raw["compress_ratios"] = raw["compress_ratios"] + [0, 0]      # -0731 ships extra entries
    raw["dspark_num_layers"] = 2
    c = ModelConfig.from_hf(raw)
    assert len(c.compress_ratios) == 44 and c.ignored_keys == ("dspark_num_layers",)


def test_initial_flash_config_without_expert_dtype():
    raw = preset("flash")
    del raw["expert_dtype"]
    assert ModelConfig.from_hf(raw).expert_dtype is None        # detected from the checkpoint


@pytest.mark.parametrize("key,value,msg", [
    ("num_attention_heads", 7, "not divisible by o_groups"),
    ("compress_ratios", [0, 4], "compress_ratios has 2 entries"),
    ("qk_rope_head_dim", 7, "must be even"),
    ("scoring_func", "sigmoid", "sqrtsoftplus"),
    ("hidden_size", "big", "wrong type"),
    ("num_experts_per_tok", 99, "exceeds n_routed_experts"),
    ("rope_scaling", {"type": "linear", "factor": 2}, "not supported"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("index_head_dim", 48, "power of two"),
])
def test_bad_values(key, value, msg):
    raw = preset("tiny")
    raw[key] = value
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("key,value,msg", [
    # wrong types: each names the key and what it must be (these raised ValueError / TypeError / AttributeError)
    ("num_hidden_layers", "abc", r"key 'num_hidden_layers' has the wrong type: must be an integer, got 'abc'"),
    ("num_hidden_layers", True, r"key 'num_hidden_layers' has the wrong type: must be an integer"),
    ("num_hidden_layers", 5.5, r"key 'num_hidden_layers' has the wrong type"),
    ("compress_ratios", 5, r"key 'compress_ratios' has the wrong type: must be a list, got 5"),
    ("compress_ratios", [0, 4, "x", 4, 16, 0], r"key 'compress_ratios\[2\]' must be an integer, got 'x'"),
    ("rope_scaling", "yarn", r"key 'rope_scaling' has the wrong type: must be an object"),
    ("rope_scaling", {"type": "yarn", "factor": "big", "original_max_position_embeddings": 4},
     r"key 'rope_scaling.factor' has the wrong type"),
    ("quantization_config", [1], r"key 'quantization_config' has the wrong type"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": 5}, r"weight_block_size' is 5"),
    ("expert_dtype", 4, r"key 'expert_dtype' is 4; allowed: null, \"fp4\", \"fp8\", \"bf16\""),
    ("rms_norm_eps", float("nan"), r"key 'rms_norm_eps' must be a positive finite number, got nan"),
    ("routed_scaling_factor", -1, r"must be a positive finite number"),
    ("num_nextn_predict_layers", -1, r"key 'num_nextn_predict_layers' must be between 0 and 5"),
    ("num_hash_layers", 9, r"key 'num_hash_layers' must be between 0 and 5"),
    ("eos_token_id", [1, 2], r"key 'eos_token_id' has the wrong type: must be an integer"),
    ("eos_token_id", 320, r"eos_token_id 320 is outside the vocabulary of 320 tokens"),
    ("sliding_window", 0, r"key 'sliding_window' must be positive, got 0"),
])
def test_wrong_types_and_ranges_name_the_key(key, value, msg):
    raw = preset("tiny")
    raw[key] = value
    with pytest.raises(ConfigError, match=msg) as e:
        ModelConfig.from_hf(raw, source="cfg.json")
    assert str(e.value).startswith("cfg.json: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,supported", [
    ("norm_topk_prob", False, "true"), ("hidden_act", "gelu", '"silu"'), ("topk_method", "greedy", '"noaux_tc"'),
    ("attention_bias", True, "false"), ("n_group", 8, "1"), ("topk_group", 4, "1"),
    ("first_k_dense_replace", 3, "0"), ("moe_layer_freq", 2, "1"), ("num_key_value_heads", 8, "1"),
    ("norm_topk_prob", 1, "true"),               # 1 is not JSON true
])
def test_values_the_graph_does_not_compute_are_refused(key, value, supported):
    """These were accepted silently (the graph ran its one implementation regardless of the value)."""
    raw = preset("tiny")
    raw[key] = value
    with pytest.raises(ConfigError, match=f"key '{key}' is .* which this runtime does not compute; "
                                          f"it supports only {supported}"):
        ModelConfig.from_hf(raw)
    raw[key] = {"norm_topk_prob": True, "hidden_act": "silu", "topk_method": "noaux_tc", "attention_bias": False,
                "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "moe_layer_freq": 1,
                "num_key_value_heads": 1}[key]
    assert ModelConfig.from_hf(raw) == ModelConfig.preset("tiny")          # the supported value is accepted


@pytest.mark.parametrize("sub,value,msg", [
    ("rope_scaling", {"mscale_all_dim": 1.0}, r"key 'rope_scaling.mscale_all_dim' is not computed"),
    ("quantization_config", {"activation_scheme": "static"}, r"quantization_config.activation_scheme' is 'static'"),
    ("quantization_config", {"scale_fmt": "fp32"}, r"quantization_config.scale_fmt' is 'fp32'"),
    ("quantization_config", {"quant_method": "awq"}, r"quantization_config.quant_method' is 'awq'"),
])
def test_nested_values_not_computed_are_refused(sub, value, msg):
    raw = preset("tiny")
    raw[sub] = {**raw[sub], **value}
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_hf(raw)


def test_config_file_errors(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match="config file .*config.json does not exist"):
        ModelConfig.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(path)
    path.write_bytes(json.dumps(preset("tiny")).encode("utf-16"))
    with pytest.raises(ConfigError, match=r"config.json: not UTF-8 text \(byte 0xff at offset 0\)"):
        ModelConfig.from_file(path)
    path.write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelConfig.from_file(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match="config.json is a folder, not a file"):
        ModelConfig.from_file(path)
    path.rmdir()
    path.write_text(json.dumps(preset("tiny")))
    assert ModelConfig.from_file(path) == ModelConfig.preset("tiny")
