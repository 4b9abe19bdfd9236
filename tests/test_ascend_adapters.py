"""Our Ascend adapters against a CPU semantic twin of torch-npu (tests/twins/torch_npu_twin.py).

The twin implements the documented semantics with the real signatures; these tests prove the adapters pass
the right layout, dtype and parameters (interleaved RoPE pairing, clipped-SwiGLU constants) by comparing with
our float32 reference ops. Nothing here ran on an NPU.
"""

import pytest
import torch

from backends import ascend_ops
from runtime.ops import moe, norm_rope
from tests.twins import torch_npu_twin as twin

G = torch.Generator().manual_seed(0)


def test_rms_norm_adapter():
    x, w = torch.randn(5, 3, 64, generator=G), torch.randn(64, generator=G)
    assert torch.allclose(ascend_ops.rms_norm(twin, x, w, 1e-6), norm_rope.rms_norm(x, w, 1e-6), atol=1e-6)
    assert torch.allclose(ascend_ops.rms_norm(twin, x, None, 1e-6), norm_rope.rms_norm(x, None, 1e-6), atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_interleaved_rope_adapter(inverse):
    T, H, D = 7, 4, 16
    x = torch.randn(T, H, D, generator=G)
    freqs = norm_rope.rope_frequencies(D, 160000.0, None)
    cos, sin = norm_rope.rope_cos_sin(freqs, torch.arange(T) * 13)
    ref = norm_rope.apply_rope(x, cos[:, None], sin[:, None], inverse=inverse)
    got = ascend_ops.apply_rope(twin, x, cos[:, None], sin[:, None], inverse=inverse)
    assert torch.allclose(got, ref, atol=1e-6)
    # the 'half' (Llama rotate-half) pairing is a different rotation: the pitfall the adapter avoids
    x4 = x.reshape(1, T, H, D)
    r1 = cos.repeat_interleave(2, -1).reshape(1, T, 1, D)
    r2 = sin.repeat_interleave(2, -1).reshape(1, T, 1, D)
    half = twin.npu_rotary_mul(x4, r1, r2, rotary_mode="half").reshape(T, H, D)
    assert not torch.allclose(half, norm_rope.apply_rope(x, cos[:, None], sin[:, None]), atol=1e-3)


def test_rope_adapter_on_a_single_vector_per_token():
    x = torch.randn(9, 16, generator=G)                     # compressed entries: [T, rope_dim], no head dim
    cos, sin = norm_rope.rope_cos_sin(norm_rope.rope_frequencies(16, 10000.0, None), torch.arange(9) * 4)
    assert torch.allclose(ascend_ops.apply_rope(twin, x, cos, sin), norm_rope.apply_rope(x, cos, sin), atol=1e-6)


def test_clipped_swiglu_adapter_uses_v4_constants():
    g, u = torch.randn(6, 32, generator=G) * 8, torch.randn(6, 32, generator=G) * 8
    ref = moe.clamped_swiglu(g, u, 10.0)
    assert torch.allclose(ascend_ops.clamped_swiglu(twin, g, u, 10.0), ref, atol=1e-5)
    # the op's defaults (GPT-OSS: alpha 1.702, bias 1, limit 7, interleaved) give a different function
    wrong = twin.npu_clipped_swiglu(torch.cat((g, u), -1))
    assert not torch.allclose(wrong, ref, atol=1e-2)


def test_w8a8_linear_adapter_matches_the_emulated_numerics():
    from runtime.ops.numerics import int8_roundtrip
    from runtime.weight_formats import dequantize_int8_per_channel, quantize_int8_per_channel

    w = torch.randn(48, 256, generator=G) / 16
    x = torch.randn(3, 5, 256, generator=G).bfloat16().float()            # a bf16 activation
    w_kn, scale = ascend_ops.prepare_w8a8(w)
    assert w_kn.shape == (256, 48) and w_kn.is_contiguous() and w_kn.dtype == torch.int8
    got = ascend_ops.linear_w8a8(twin, x, w_kn, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 48)
    # what the ascend-910b emulation computes for the same linear (weights and activations round-tripped)
    ref = int8_roundtrip(x) @ dequantize_int8_per_channel(*quantize_int8_per_channel(w)).T
    assert torch.allclose(got.float(), ref, rtol=2 ** -7, atol=1e-3)
    # passing the weight as [out, in] (not transposed to [K, N]) is caught by the twin
    with pytest.raises(AssertionError, match=r"\[.., M, K\] @ \[.., K, N\]"):
        ascend_ops.linear_w8a8(twin, x, w_kn.t().contiguous(), scale)


def test_twin_rejects_wrong_layouts():
    x = torch.randn(2, 3, 4, 8)
    with pytest.raises(AssertionError, match="4-D"):
        twin.npu_rotary_mul(x[0], x[0], x[0], rotary_mode="interleave")
    with pytest.raises(AssertionError, match="gamma must have the input's dtype"):
        twin.npu_rms_norm(x, torch.ones(8, dtype=torch.float16))


def test_adapters_are_registered_for_ascend_only():
    from runtime.dispatch import implementations

    for op, (impl_id, _) in ascend_ops.ADAPTERS.items():
        impl = implementations(op)[impl_id]
        assert impl.backend == "ascend"
