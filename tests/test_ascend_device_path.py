"""The whole model through the Ascend dispatch table, on a CPU-hosted twin of an NPU.

`CpuHostedAscend` (tests/twins/backends.py) is the Ascend backend with its probe answering "an Atlas A2 / 310P" while tensors stay on the
CPU, and the torch-npu namespace the adapters call is the CPU semantic twin (tests/twins/torch_npu_twin.py):
THIS IS A TWIN, NOT AN NPU. It proves that the device path (INT8-channel weights packed at load, the W8A8
linear, the fused-op adapters the chip's capabilities allow, plain torch for the rest) computes the profile's
numerics end to end; it says nothing about NPU kernels.
"""

import pytest
import torch
import yaml

from backends import ascend_ops
from runtime.api import Runtime
from runtime.weights.device_storage import Int8Channel
from runtime.profile import PROFILE_DIR, parse_profile
from tests.twins.backends import hosted_ascend

# KL to float32 / top-1 bounds of the device path on the twin, about 3x the measured KL and top-1 disagreement
# (random tiny model, 2 x 300 random ids; 2026-12-03: ascend-910b KL 0.0064, top-1 0.940 (its emulation 0.0068,
# 0.938); ascend-310p KL 2.3e-6, top-1 0.998, one flip in 600 (the same as its emulation)); and at most 1.5x the
# emulation's own KL (below).
TOLERANCE = {"ascend-910b": ("ascend-a2", 223, 0.019, 0.88), "ascend-310p": ("ascend-310p", 202, 7e-6, 0.995)}


def _kl_top1(a, b):
    pa, pb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return (pa.exp() * (pa - pb)).sum(-1).mean().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def _tiny_shaped(profile: str):
    """The shipped profile with plain torch preferred for the two attention kernels, whose fixed shapes (64 x 128
    indexer heads, head dim 512) the tiny model does not have (that refusal is tested below)."""
    raw = yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text())
    raw["prefer"] = {"sparse_attention": ["ascend.torch"], "indexer_topk": ["ascend.torch"]}
    return parse_profile(raw, f"{profile}+tiny.yaml")


@pytest.mark.parametrize("profile", list(TOLERANCE))
def test_model_through_the_ascend_table_on_a_twin(profile, tiny_ckpt, tiny_rt, monkeypatch, tmp_path):
    family, soc, max_kl, min_agree = TOLERANCE[profile]

    monkeypatch.setenv("DSV4RT_HOME", str(tmp_path))              # a fresh self-test cache
    with hosted_ascend(family, soc):
        _check_the_ascend_table(profile, tiny_ckpt, tiny_rt, max_kl, min_agree)


def _check_the_ascend_table(profile, tiny_ckpt, tiny_rt, max_kl, min_agree):
    if profile == "ascend-910b":     # the shipped profile picks the attention kernels: the tiny shapes are refused
        rt = Runtime.load(profile, checkpoint=tiny_ckpt, progress=False)
        with pytest.raises(ascend_ops.KernelLimitError, match="npu_sparse_flash_attention takes head dim 512"):
            rt.forward([[1, 2, 3]])
    rt = Runtime.load(_tiny_shaped(profile), checkpoint=tiny_ckpt, progress=False)
    impl = {r.op: r.impl for r in rt.dispatch.rows}
    assert impl["linear"] == "ascend.npu_quant_matmul+bf16_gemm" and impl["rms_norm"] == "ascend.npu_rms_norm"
    assert impl["hc_pre"] == "ascend.torch" and impl["sparse_attention"] == "ascend.torch"
    a2 = profile == "ascend-910b"    # interleaved RoPE, clipped SwiGLU and the gate kernel: A2/A3 only
    assert (impl["apply_rope"] == "ascend.npu_rotary_mul") == a2
    assert (impl["clamped_swiglu"] == "ascend.npu_clipped_swiglu") == a2
    assert (impl["moe_gate"] == "ascend.npu_moe_gating_top_k") == a2
    wq_b = rt.model.blocks[1].attn.wq_b.weight
    assert isinstance(wq_b, Int8Channel) if profile == "ascend-910b" else wq_b.dtype == torch.float16
    emu = Runtime.load(profile, checkpoint=tiny_ckpt, emulate=True, progress=False)
    ids = torch.randint(2, 258, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = tiny_rt.forward(ids)
    kl, agree = _kl_top1(ref, rt.forward(ids))
    kl_emu, _ = _kl_top1(ref, emu.forward(ids))
    assert kl <= max_kl and agree >= min_agree and kl <= 1.5 * kl_emu, (kl, agree, kl_emu)
