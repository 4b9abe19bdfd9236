"""The memory planner's arithmetic against hand-computed cases (spec §11) and the real V4-Flash / V4-Pro configs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.checkpoint.inventory import expected_tensors
from runtime.checkpoint.loader import CheckpointReader
from runtime.config import ModelConfig
from runtime.plan import index_entry_bytes, kv_entry_bytes, plan, state_plan, weight_bytes
from runtime.plan.sizes import tensor_bytes
from runtime.profile import load_profile
from runtime.weights.device import device_weights
from runtime.weights.device_storage import nbytes

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
    assert 2 * 284e9 * 0.95 < bf16 < 2 * 284e9 * 1.05
    # A device holds the FP4 experts as bf16 stacks (no FP4 GEMM on a device in this build: what
    # runtime.weights.device stores, checked tensor by tensor below), so FP8 saves only the attention's share:
    # 579.2 GB against 583.7 in bf16 (2026-12-03), where the checkpoint itself is 148.7 GiB
    assert bf16 * 0.97 < fp8 < bf16
    assert weight_bytes(FLASH, load_profile("ascend-910b")) < bf16 * 0.6   # W8A8: int8 experts


def test_plan_fits_and_limits():
    p = plan(FLASH, load_profile("nvidia-h200"), context=1 << 20, batch=1, devices=5)
    assert p["fits"] and p["devices_needed"] == 5 and p["max_context"] == FLASH.max_position   # capped at 1M
    p = plan(FLASH, load_profile("nvidia-h200"), context=1 << 20, batch=1, devices=4)
    assert not p["fits"] and p["max_context"] == 0               # the weights alone exceed four H200s
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


def test_active_weights_and_activations_by_hand():
    tiny, cpu = ModelConfig.preset("tiny"), load_profile("cpu")
    d, inter = tiny.hidden_size, tiny.moe_inter_dim
    full, active = weight_bytes(tiny, cpu), weight_bytes(tiny, cpu, active=True)
    # The CPU keeps the checkpoint's formats (FP4 experts: half a byte + one scale byte per 32; FP8: a byte +
    # one per 128x128 block; bf16 2 bytes, float32 copies of 1-D weights and the gate).
    # active = everything but the MTP block, the unused routed experts and all but one embedding row
    def stored(name, shape, kind):
        n = math.prod(shape)
        if kind == "fp4":
            return n // 2 + n // 32
        if kind == "fp8":
            return n + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
        if kind == "bf16":
            return 4 * n if len(shape) == 1 or name.endswith(".gate.weight") else 2 * n
        return {"f32": 4, "i64": 8}[kind] * n
    inv = expected_tensors(tiny, "fp4")
    assert full == sum(stored(n, s, k) for n, (s, k) in inv.items())
    experts = tiny.num_layers * tiny.n_routed_experts * 3 * (d * inter // 2 + d * inter // 32)
    mtp = sum(stored(n, s, k) for n, (s, k) in inv.items() if n.startswith("mtp."))
    embed = tiny.vocab_size * d * 2
    assert active == int(full - mtp - experts * (1 - tiny.experts_per_token / tiny.n_routed_experts) - embed + d * 2)
    from runtime.plan import activation_bytes
    # one token: 3 hc streams + q/o/kv/expert intermediates, the head's logits, a 1-query score block
    one = activation_bytes(tiny, cpu, 1, 0)
    assert one == 4 * (3 * 4 * d + 2 * 8 * 64 + 2 * 128 + 2 * 64 + 3 * 3 * inter) + 4 * 8 * (128 + 16) + 4 * 320


def test_measured_state_bytes_per_token_equal_the_plan(tiny_rt, rng):
    """The runtime's per-sequence state grows by exactly the planner's bytes per token (float32 rows: the
    torch runtime's storage), and its fixed part stays within the planned fixed state."""
    st = tiny_rt.new_state(1)
    tiny_rt.forward(torch.randint(2, 300, (1, 1024), generator=rng), state=st)
    a = st.nbytes()
    tiny_rt.forward(torch.randint(2, 300, (1, 1024), generator=rng), state=st)
    slope = (st.nbytes() - a) / 1024
    plan_tok = tiny_rt.memory.state.per_token
    assert abs(slope - plan_tok) <= 0.01 * plan_tok, (slope, plan_tok)
    assert 0 < st.nbytes() - plan_tok * 2048 <= tiny_rt.memory.state.fixed


def test_runtime_refuses_a_context_that_does_not_fit(tiny_ckpt, tmp_path):
    import dataclasses

    from runtime.api import Runtime
    from runtime.errors import InputError
    from runtime.profile import Measure

    prof = load_profile("cpu")
    small = dataclasses.replace(prof, memory_gib=Measure(0.2, "test", "high"))   # 184 MiB budget
    rt = Runtime.load(small, checkpoint=tiny_ckpt, progress=False)
    limit = rt.memory.max_context(1)
    # weights ~29 MiB, a 4096-token chunk's activations ~90 MiB, the indexer's score block (16 heads x
    # context/4 keys x 256 queries, float32) and the state (210 B/token) share the rest
    assert 5_000 < limit < 100_000
    with pytest.raises(InputError, match=f"longest context that fits at batch 1 is {limit:,}"):
        rt.generate([5] * 10, max_new_tokens=limit)
    with pytest.raises(InputError, match="lower the batch"):
        rt.new_state(batch_size=10_000)
    rt.generate([5] * 10, max_new_tokens=2)          # within budget: runs
    yaml_path = tmp_path / "small.yaml"
    yaml_path.write_text((Path(__file__).parent.parent / "hardware_profiles" / "cpu.yaml").read_text()
                         .replace("value: 24,", "value: 0.2,"))
    r = subprocess.run([sys.executable, "-m", "runtime.run", "--profile", str(yaml_path), "--checkpoint",
                        str(tiny_ckpt), "--max-new-tokens", str(limit), "--no-eos-stop"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "longest context that fits" in r.stderr
    assert r.stderr.strip().count("\n") <= 2 and "Traceback" not in r.stderr    # describe + plan lines, error


def test_state_reserved_for_a_known_context_never_regrows(tiny_rt, rng):
    """new_state(context=N) allocates every cache for N tokens up front (the plan's rows, no doubling)."""
    st = tiny_rt.new_state(1, context=1024)
    layers = st.seqs[0].layers
    bufs = [(lay.kv._buf, lay.index_keys._buf if lay.index_keys is not None else None) for lay in layers]
    cfg = tiny_rt.config
    for i, lay in enumerate(layers[:cfg.num_layers]):
        m = cfg.ratio(i)
        assert lay.kv._buf.shape[0] == cfg.window + (1024 // m if m else 0)
    tiny_rt.forward(torch.randint(2, 300, (1, 1000), generator=rng), state=st)
    tiny_rt.forward(torch.randint(2, 300, (1, 24), generator=rng), state=st)
    assert all(lay.kv._buf is kv and (lay.index_keys is None or lay.index_keys._buf is ik)
               for lay, (kv, ik) in zip(layers, bufs))


def test_macs_per_token_against_the_shipped_checkpoint_and_by_hand():
    """runtime.plan.sizes.macs_per_token (the serve bench's roofline) against an independent count: the shipped
    default's own tensor headers (FP4 experts stored two codes per byte), and the attention rows by hand."""
    import glob

    from safetensors import safe_open

    from runtime import default_model
    from runtime.plan.sizes import macs_per_token

    cfg = ModelConfig.from_file(default_model.FOLDER / "config.json")
    lin = 0
    for f in glob.glob(str(default_model.FOLDER / "*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                sl = s.get_slice(k)
                shape = sl.get_shape()
                if k.startswith("mtp.") or k == "embed.weight" or len(shape) != 2 \
                        or not k.endswith(("weight", "_fn")):          # not scales, ape, tid2eid
                    continue
                n = shape[0] * shape[1] * (2 if sl.get_dtype() == "I8" else 1)       # FP4 pairs
                lin += n * 2 // 8 if ".experts." in k else n                          # top-2 of 8 experts
    got = macs_per_token(cfg, 100)
    assert got["linears"] == lin == 1_882_112
    # position 100: every layer sees 101 window rows; the CSA layer (ratio 4) its top-16 of 25 entries, the
    # HCA layer (ratio 128) none yet; 8 heads x 64 dims, scores and weighted sums
    assert got["attention"] == 2 * 8 * 64 * (101 + 101 + 16 + 101)
    assert got["indexer"] == 16 * 32 * 25                      # 16 indexer heads x 32 dims x 25 keys
    assert macs_per_token(cfg, 300)["attention"] == 2 * 8 * 64 * (128 + 128 + 16 + 128 + 2)


@pytest.mark.parametrize("profile", ["nvidia-h100", "nvidia-a100", "ascend-910b", "ascend-310p"])
def test_device_bytes_are_what_the_device_path_stores(profile, tiny_ckpt):
    """The planner's bytes per tensor for a device profile equal what runtime.weights.device keeps for it (run
    here on the CPU device: the same packing), tensor by tensor: the FP4 experts as bf16 / fp16 stacks, the
    FP32_COMPUTE weights in float32, FP8 codes with float32 block scales."""
    prof = load_profile(profile)
    cfg = ModelConfig.from_hf(json.loads((tiny_ckpt / "config.json").read_text()), source="tiny")
    held = device_weights(CheckpointReader(tiny_ckpt, progress=False), prof.weight_format, prof.compute_dtype,
                          "cpu", prof.int8_linears).tensors
    inventory = expected_tensors(cfg, cfg.expert_dtype or "fp4")
    assert set(held) == set(inventory)
    wrong = {n: (nbytes(held[n]), tensor_bytes(n, shape, kind, prof)) for n, (shape, kind) in inventory.items()
             if nbytes(held[n]) != tensor_bytes(n, shape, kind, prof)}
    assert not wrong, wrong
