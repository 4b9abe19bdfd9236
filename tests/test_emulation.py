"""Weight-format transforms (pure functions) and emulated deployments of the tiny model vs float32.

Tolerances are the documented ones (README "Emulated numerics"), set a little above what was measured on
the tiny default (2 x 300 tokens): they catch a broken transform, not rounding noise.
"""

import pytest
import torch

from runtime.api import Runtime
from runtime.checkpoint import load_checkpoint
from runtime.weight_formats import dequantize_int8_per_channel, quantize_int8_per_channel, transform_weights


def test_int8_per_channel_quantisation():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7)[:, None]
    codes, scale = quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    for r in range(6):                                         # independent per-row computation
        s = float(w[r].abs().max()) / 127
        assert abs(float(scale[r]) - s) <= 1e-6 * s
        assert torch.equal(codes[r], torch.round(w[r] / scale[r]).to(torch.int8))
    err = (dequantize_int8_per_channel(codes, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)


def test_transforms_touch_only_what_the_format_says(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt, progress=False)
    t = ck.tensors
    w8, q8 = transform_weights(t, ck.quantized, "w8a8_int8")
    assert "layers.1.attn.wq_b.weight" in q8 and "layers.1.ffn.experts.3.w2.weight" in q8
    assert "layers.1.attn.indexer.wq_b.weight" in q8 and "layers.1.ffn.shared_experts.w1.weight" in q8
    assert "layers.1.attn.wq_a.weight" not in q8 and "layers.1.attn.compressor.wkv.weight" not in q8
    assert torch.equal(w8["layers.1.attn.wq_a.weight"], t["layers.1.attn.wq_a.weight"].bfloat16().float())
    wq = t["layers.1.attn.wq_b.weight"]
    assert torch.equal(w8["layers.1.attn.wq_b.weight"], dequantize_int8_per_channel(*quantize_int8_per_channel(wq)))
    for name in ("layers.1.hc_attn_fn", "layers.1.attn.attn_sink", "layers.2.ffn.gate.bias",
                 "layers.0.ffn.gate.tid2eid"):
        assert w8[name] is t[name]                              # fp32 / int64 parameters are never touched
    f16, q = transform_weights(t, ck.quantized, "fp16")
    assert not q and torch.equal(f16["embed.weight"], t["embed.weight"].half().float())
    same, q = transform_weights(t, ck.quantized, "fp8_block")
    assert q == ck.quantized and same["layers.1.attn.wq_b.weight"] is wq
    with pytest.raises(ValueError, match="unknown weight format"):
        transform_weights(t, ck.quantized, "int3")


# profile -> (max mean KL in nats, min top-1 agreement); measured: bf16 0.003/0.98, 910B 0.010/0.93,
# 310P 0.0005/0.999, H100 (= DeepSeek's own numerics) 0.021/0.89.
TOLERANCES = {"cpu-bf16": (0.01, 0.95), "ascend-910b": (0.03, 0.88), "ascend-310p": (0.003, 0.98),
              "nvidia-h100": (0.06, 0.82)}


@pytest.mark.parametrize("profile", list(TOLERANCES))
def test_emulated_profiles_stay_within_documented_tolerance(profile, tiny_ckpt, tiny_rt):
    rt = Runtime.load(profile, checkpoint=tiny_ckpt, emulate=True, progress=False)
    assert rt.dispatch.emulated and rt.profile.name == profile
    ids = torch.randint(2, 258, (2, 300), generator=torch.Generator().manual_seed(0))
    a, b = tiny_rt.forward(ids), rt.forward(ids)
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    pa, pb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (pa.exp() * (pa - pb)).sum(-1).mean().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    max_kl, min_agree = TOLERANCES[profile]
    assert kl <= max_kl and agree >= min_agree, (profile, kl, agree)
