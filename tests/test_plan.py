"""The memory planner's arithmetic against hand-computed cases (spec §11) and the real V4-Flash / V4-Pro configs."""

import subprocess
import sys

import pytest

from runtime.config import ModelConfig
from runtime.plan import index_entry_bytes, kv_entry_bytes, plan, state_plan, weight_bytes
from runtime.profile import load_profile

FLASH, PRO = ModelConfig.preset("flash"), ModelConfig.preset("pro")


def test_entry_layouts():
    assert kv_entry_bytes("bfloat16", 512, 64) == 1024
    assert kv_entry_bytes("fp8_e4m3", 512, 64) == 584            # 448 fp8 + 128 bf16 RoPE + 7 scales + 1 pad
    assert index_entry_bytes("int8", 128) == 132 and index_entry_bytes("fp4_e2m1", 128) == 68


def test_bytes_per_token_match_the_hand_computed_tables():
    # bf16 reference layout: CSA 512*2/4 + 128*2/4 = 320 B, HCA 512*2/128 = 8 B per token
    bf16 = load_profile("nvidia-a100")                          # bf16 KV and indexer
    assert state_plan(FLASH, bf16).per_token == 21 * 320 + 20 * 8 == 6880
    assert state_plan(PRO, bf16).per_token == 30 * 320 + 31 * 8 == 9848
    # FP8 KV (584-byte entries) + an INT8 / FP8 indexer key (132 B): ~3850 / ~5511 B per token
    fp8 = load_profile("nvidia-h100").__class__(**{**load_profile("nvidia-h100").__dict__, "indexer_dtype": "int8"})
    assert state_plan(FLASH, fp8).per_token == pytest.approx(21 * (584 / 4 + 132 / 4) + 20 * 584 / 128)
    assert round(state_plan(PRO, fp8).per_token) == 5511


def test_fixed_state_matches_the_hand_computed_figures():
    st = state_plan(FLASH, load_profile("nvidia-a100"))
    assert st.window == 43 * 128 * 1024                        # 128 bf16 rows of 512 per layer = 5.4 MiB
    assert st.compressor_state == 21 * (64 + 16) * 1024 + 20 * 512 * 1024   # 11.6 MiB


def test_weights_in_each_format():
    h100, a100 = load_profile("nvidia-h100"), load_profile("nvidia-a100")
    fp8, bf16 = weight_bytes(FLASH, h100), weight_bytes(FLASH, a100)
    assert 140e9 < fp8 < 170e9                                  # 284B params, experts FP4, the rest mostly FP8
    assert 2 * 284e9 * 0.95 < bf16 < 2 * 284e9 * 1.05
    assert weight_bytes(FLASH, load_profile("ascend-910b")) < bf16 * 0.6   # W8A8: int8 experts


def test_plan_fits_and_limits():
    p = plan(FLASH, load_profile("nvidia-h200"), context=1 << 20, batch=1, devices=2)
    assert p["fits"] and p["devices_needed"] == 2 and p["max_context"] == FLASH.max_position   # capped at 1M
    p = plan(FLASH, load_profile("nvidia-h200"), context=1 << 20, batch=1, devices=1)
    assert not p["fits"] and p["max_context"] == 0               # the weights alone exceed one H200
    with pytest.raises(Exception, match="exceeds the model's"):
        plan(FLASH, load_profile("nvidia-h200"), context=1 << 21)


def test_cli():
    r = subprocess.run([sys.executable, "-m", "runtime.plan", "--model", "pro", "--profile", "ascend-910c",
                        "--context", "1048576", "--devices", "16"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "state per sequence" in r.stdout and "needs" in r.stdout
    r = subprocess.run([sys.executable, "-m", "runtime.plan", "--model", "flash", "--profile", "h900",
                        "--context", "10"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown profile" in r.stderr


def test_v4_pro_needs_about_a_tenth_of_a_v32_style_cache_at_1m_tokens():
    # bf16: V3.2-style 61 x (576 x 2 + 128 x 2) = 85888 B/token vs V4-Pro's 9848 + fixed state
    p = plan(PRO, load_profile("nvidia-a100"), context=1 << 20)
    assert p["v32_style_state"] == 61 * (576 * 2 + 128 * 2) * (1 << 20)
    assert 0.10 < p["vs_v32"] < 0.13                            # the model card: "10%"
    fp8 = plan(PRO, load_profile("nvidia-h100"), context=1 << 20)   # FP8 KV both sides, FP4 indexer keys
    assert 0.08 < fp8["vs_v32"] < 0.13
