"""CPU linears on the checkpoint's own storage (backends/cpu_stored.py, native kernels in backends/native)
against the float32 reference `x @ dequantize(w).T`, per format and shape: FP8 128x128-block-scaled with K not
a multiple of 128 and N odd, at M = 1 (decode), a few rows, and M = 4096 (the GEMM tile path); FP4 experts
through the routed-experts op with uneven token counts per expert; bf16; W8A8 int8; the grouped wo_a
projection on an FP8 row range; and `official` numerics (bf16 activations, FP8 activation quantisation) on
the same storage. Tolerances: ~3x the largest error measured (summation order is the only difference)."""

from __future__ import annotations

import pytest
import torch

from backends import cpu_native, cpu_stored
from runtime import number_formats
from runtime.ops import moe, reference_ops
from runtime.ops.linear import group_linear, linear, project
from runtime.weight_transforms import quantize_int8_per_channel
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored, Int8Rows
from tests.test_numerics_and_mtp import act_quant_oracle

IMPLS = [cpu_stored.linear_native, cpu_stored.linear_torch_tiles]


def _fp8(g, N, K):
    codes, scale = number_formats.quant_fp8_block(torch.randn(N, K, generator=g) * 0.05)
    return Fp8Stored(codes, scale)


def _fp4(g, N, K):
    codes, scale = number_formats.quant_fp4(torch.randn(N, K, generator=g) * 0.05)
    return Fp4Stored(codes, scale)


def test_native_kernels_built():
    """This machine has a compiler: the native library must build (else the table shows the torch tiles)."""
    assert cpu_native.kernels() is not None, cpu_native.unavailable_reason()


@pytest.mark.parametrize("M,N,K", [(1, 131, 200), (4, 131, 200), (16, 77, 384), (17, 131, 200), (4096, 33, 72)])
@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_fp8_block_linear(M, N, K, impl, rng):
    w, x = _fp8(rng, N, K), torch.randn(M, K, generator=rng)
    want = x @ w.dequantize().T
    got = impl(x, w)
    assert got.shape == (M, N)
    assert (got - want).abs().max() <= 5e-6 * max(1.0, want.abs().max())      # measured <= 1.5e-6


@pytest.mark.parametrize("M,N,K", [(1, 131, 256), (5, 77, 64), (300, 20, 96)])
@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_fp4_linear(M, N, K, impl, rng):
    w, x = _fp4(rng, N, K), torch.randn(M, K, generator=rng)
    assert (impl(x, w) - x @ w.dequantize().T).abs().max() <= 4e-6                # measured 1.2e-6


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_bf16_and_int8_linear(impl, rng):
    x = torch.randn(3, 200, generator=rng)
    wb = (torch.randn(131, 200, generator=rng) * 0.05).bfloat16()
    assert (impl(x, wb) - x @ wb.float().T).abs().max() <= 3e-6
    w8 = Int8Rows(*quantize_int8_per_channel(torch.randn(131, 200, generator=rng) * 0.05))
    assert (impl(x, w8) - x @ w8.dequantize().T).abs().max() <= 3e-6
    assert torch.equal(impl(x, wb[:, :].float()), torch.nn.functional.linear(x, wb.float()))   # float32: F.linear


@pytest.mark.parametrize("impl", [cpu_stored.group_linear_native, cpu_stored.group_linear_torch_tiles],
                         ids=lambda f: f.__name__)
def test_group_linear_on_fp8_row_ranges(impl, rng):
    """wo_a's groups are row ranges of one FP8 weight; 64-row groups cut the 128-row scale blocks."""
    w, x = _fp8(rng, 128, 256), torch.randn(5, 2, 256, generator=rng)
    assert (impl(x, w) - group_linear(x, w)).abs().max() <= 3e-6


def test_fp4_experts_uneven_tokens(rng):
    """Routed experts on FP4 storage (decode-sized and prefill-sized groups; one expert gets 7 tokens,
    others 1, some none) against the reference op on the float32 values."""
    from runtime.model.v4 import Linear

    E, d, inter = 6, 64, 96
    experts = [tuple(Linear(_fp4(rng, *shape), False) for shape in ((inter, d), (d, inter), (inter, d)))
               for _ in range(E)]
    values = [tuple(Linear(l.weight.dequantize(), False) for l in e) for e in experts]
    fast = reference_ops("exact")
    import dataclasses
    fast = dataclasses.replace(fast, linear=cpu_stored.linear_native)
    ref = reference_ops("exact")
    for T in (7, 40):
        x = torch.randn(T, d, generator=rng)
        idx = torch.stack([torch.zeros(T, dtype=torch.int64), torch.arange(T) % 3 + 1], dim=1)   # 0 every token
        idx[0, 1] = 5
        w = torch.rand(T, 2, generator=rng)
        want = moe.routed_experts(x, idx, w, values, 10.0, ref)
        for op in (cpu_stored.routed_experts_small_batch, cpu_stored.routed_experts_native, moe.routed_experts):
            got = op(x, idx, w, experts, 10.0, fast)
            assert (got - want).abs().max() <= 4e-6


def test_official_numerics_on_stored_weights(rng):
    """`official` (FP8 activation quantisation, bf16 outputs) computes on the same FP8 storage: the projection
    equals the reference on the float32 values up to one bf16 rounding of the output (summation order can
    move a value across a rounding boundary)."""
    import dataclasses

    from runtime.model.v4 import Linear

    ref = reference_ops("official")
    fast = dataclasses.replace(ref, linear=cpu_stored.linear_native)
    w = _fp8(rng, 131, 200)
    x = torch.randn(4, 200, generator=rng)
    got = project(fast, x, Linear(w, True))
    want = project(ref, x, Linear(w.dequantize(), True))
    assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-6)
    assert (got == want).float().mean() > 0.95
    # the activations both see: act_quant from its definition (bit-level e4m3 table, not the code under test)
    assert torch.equal(ref.quant_act(x), act_quant_oracle(x))


def test_reference_linear_is_the_oracle_for_storage(rng):
    """The reference op dequantises any storage to exactly the checkpoint's values (decoded independently)."""
    w = _fp8(rng, 131, 200)
    x = torch.randn(2, 200, generator=rng)
    assert torch.equal(linear(x, w), x @ number_formats.dequant_fp8_block(w.codes, w.scale).T)
    assert torch.equal(w.dequantize_rows(64, 131), w.dequantize()[64:131])


def test_storage_dequantize_equals_the_bit_level_decoders(rng):
    """`dequantize()` (torch float8 casts, the reference ops' input) equals runtime.number_formats' independent
    table decoders bit for bit, over every e4m3 / e2m1 code and a range of ue8m0 scales, NaN codes included."""
    for N, K in ((256, 384), (131, 200)):
        codes = torch.randint(0, 256, (N, K), dtype=torch.uint8, generator=rng).view(torch.float8_e4m3fn)
        scale = torch.randint(0, 255, (-(-N // 128), -(-K // 128)), dtype=torch.uint8, generator=rng)
        got = Fp8Stored(codes, scale.view(torch.float8_e8m0fnu)).dequantize()
        want = number_formats.dequant_fp8_block(codes, scale.view(torch.float8_e8m0fnu))
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0))
        packed = torch.randint(-128, 128, (N, 64), dtype=torch.int8, generator=rng)
        s4 = torch.randint(0, 255, (N, 4), dtype=torch.uint8, generator=rng).view(torch.float8_e8m0fnu)
        assert torch.equal(Fp4Stored(packed, s4).dequantize(), number_formats.dequant_fp4(packed, s4))
