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


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny")))
    assert ModelConfig.from_file(tmp_path / "config.json") == ModelConfig.preset("tiny")
