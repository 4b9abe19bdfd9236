"""FP8 e4m3 / UE8M0 / FP4 e2m1 decoding against hand-made codes and against the generator's own weights."""

import math

import pytest
import torch

from runtime import number_formats
from runtime.checkpoint import make_weights
from runtime.checkpoint.inventory import expected_tensors
from runtime.config import ModelConfig


def codes(*bs):
    return torch.tensor(bs, dtype=torch.uint8)


def test_e4m3_hand_codes():
    v = number_formats.decode_e4m3(codes(0x00, 0x80, 0x38, 0xB8, 0x7E, 0xFE, 0x01, 0x08, 0x07, 0x7F, 0xFF, 0x40))
    assert v[0].item() == 0.0 and math.copysign(1, v[0].item()) == 1
    assert v[1].item() == 0.0 and math.copysign(1, v[1].item()) == -1          # negative zero
    assert v[2].item() == 1.0 and v[3].item() == -1.0
    assert v[4].item() == 448.0 and v[5].item() == -448.0                     # max finite code
    assert v[6].item() == 2.0 ** -9                                           # smallest subnormal
    assert v[7].item() == 2.0 ** -6                                           # smallest normal
    assert v[8].item() == 7 / 8 * 2.0 ** -6                                   # largest subnormal
    assert math.isnan(v[9].item()) and math.isnan(v[10].item())               # the only NaNs
    assert v[11].item() == 2.0


def test_e4m3_table_matches_torch_float8():
    ours = number_formats.decode_e4m3(torch.arange(256, dtype=torch.uint8))
    theirs = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    ok = ~ours.isnan()
    assert torch.equal(ours[ok], theirs[ok])


def test_e8m0_extremes():
    v = number_formats.decode_e8m0(codes(0, 1, 126, 127, 128, 254, 255))
    assert v[0].item() == 2.0 ** -127 and v[1].item() == 2.0 ** -126
    assert v[2].item() == 0.5 and v[3].item() == 1.0 and v[4].item() == 2.0
    assert v[5].item() == 2.0 ** 127
    assert math.isnan(v[6].item())


def test_fp4_unpack_low_nibble_first():
    # 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1.
    # 0x8F: low nibble F = -6 (max code, negative), high nibble 8 = negative zero.
    # 0x7E: low nibble E = -4, high 7 = +6.
    v = number_formats.unpack_fp4(torch.tensor([[0x21, 0x8F - 256, 0x7E]], dtype=torch.int8))
    assert v.tolist() == [[0.5, 1.0, -6.0, -0.0, -4.0, 6.0]]
    assert math.copysign(1, v[0, 3].item()) == -1


def test_block_dequant_partial_blocks():
    # 130 x 260 weight: 2 x 3 scale blocks, the last ones partial.
    w = torch.full((130, 260), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)    # all 1.0
    s = torch.tensor([[127, 128, 129], [126, 127, 130]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    d = number_formats.dequant_fp8_block(w, s)
    assert d[0, 0] == 1 and d[0, 128] == 2 and d[0, 259] == 4
    assert d[129, 0] == 0.5 and d[129, 127] == 0.5 and d[129, 256] == 8
    p = torch.tensor([[0x21] * 16], dtype=torch.int8)                                  # 32 values
    s4 = torch.tensor([[130]], dtype=torch.uint8).view(torch.float8_e8m0fnu)           # x8
    assert number_formats.dequant_fp4(p, s4)[0, :2].tolist() == [4.0, 8.0]


def test_round_e2m1_ties_to_even_code():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -5.1])
    assert number_formats.round_e2m1(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -6.0]


def test_quant_roundtrip_exact_on_representable_values(rng):
    """Values already on the grid come back unchanged (compared with the input, not with another round trip)."""
    w = number_formats.decode_e4m3(torch.randint(0, 0x7E, (256, 384), dtype=torch.uint8, generator=rng))
    assert torch.equal(number_formats.dequant_fp8_block(*number_formats.quant_fp8_block(w)), w)
    fp4_grid = torch.tensor(number_formats.FP4_GRID)
    v = fp4_grid[torch.randint(0, len(fp4_grid), (64, 128), generator=rng)] * torch.where(
        torch.rand(64, 128, generator=rng) < 0.5, -1.0, 1.0)
    v[:, ::32] = 6.0                                 # each 32-block reaches the grid's max: scale 2^0
    assert torch.equal(number_formats.dequant_fp4(*number_formats.quant_fp4(v)), v)


def test_quant_roundtrip_error_within_half_a_step(rng):
    """Random values: |dequant(quant(x)) - x| is at most half the grid step at x. FP8 e4m3 (3 mantissa bits):
    2^-4 |x| for normal values, 2^-10 s for subnormals (s = the 128 x 128 block's power-of-two scale). FP4 e2m1
    (grid 0, .5, 1, 1.5, 2, 3, 4, 6): half the gap around x, at most 1 s (between 4 and 6), per 32 inputs."""
    x = torch.randn(256, 384, generator=rng) * torch.logspace(-3, 2, 384)          # blocks of very different size
    d = number_formats.dequant_fp8_block(*number_formats.quant_fp8_block(x))
    s = torch.exp2(torch.ceil(torch.log2(x.view(2, 128, 3, 128).abs().amax((1, 3)) / 448)))
    s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)
    err = (d - x).abs()
    assert torch.all(err <= x.abs() * 2 ** -4 + s * 2 ** -10) and err.max() > 0
    y = torch.randn(64, 128, generator=rng)
    d4 = number_formats.dequant_fp4(*number_formats.quant_fp4(y))
    s4 = torch.exp2(torch.ceil(torch.log2(y.view(64, 4, 32).abs().amax(-1) / 6))).repeat_interleave(32, 1)
    a = (y / s4).abs()
    half_gap = torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0)) * s4
    assert torch.all((d4 - y).abs() <= half_gap * (1 + 1e-6)) and (d4 - y).abs().max() > 0
    assert torch.equal(number_formats.dequant_fp4(*number_formats.quant_fp4(d4)), d4)          # grid values are fixed points


def test_generator_weights_decode_to_their_masters():
    cfg = ModelConfig.preset("tiny")
    stored, decoded, masters = make_weights(cfg, seed=3)
    kinds = {n: k for n, (_, k) in expected_tensors(cfg, "fp4").items()}
    seen = set()
    for name, kind in kinds.items():
        m, d = masters[name], decoded[name]
        if kind == "fp8":
            dec = number_formats.dequant_fp8_block(stored[name], stored[name[:-7] + ".scale"])
            # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values of each 128x128 block
            blk_max = m.abs().amax()
            assert torch.all((dec - m).abs() <= m.abs() * 2 ** -4 + blk_max * 2 ** -9), name
        elif kind == "fp4":
            dec = number_formats.dequant_fp4(stored[name], stored[name[:-7] + ".scale"])
            amax = m.view(m.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            scale = torch.exp2(torch.ceil(torch.log2(amax / 6)))
            # grid gaps are at most 2 units of the block scale, so the rounding error is at most one
            assert torch.all((dec - m).view(m.shape[0], -1, 32).abs() <= scale), name
        elif kind == "bf16":
            dec = stored[name].float()
            assert torch.allclose(dec, m, rtol=2 ** -8, atol=0), name
        else:
            dec = stored[name]
        assert torch.equal(dec, d), name
        seen.add(kind)
    assert seen == {"fp8", "fp4", "bf16", "f32", "i64"}


def test_hadamard_is_orthonormal_sylvester():
    n = 32
    H = torch.tensor([[1.0]])
    while H.shape[0] < n:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    x = torch.randn(5, n)
    assert torch.allclose(number_formats.hadamard(x), x @ H.T / math.sqrt(n), atol=1e-6)
    assert torch.allclose(number_formats.hadamard(number_formats.hadamard(x)), x, atol=1e-6)


@pytest.mark.parametrize("block", [64, 128])
def test_fp8_roundtrip_power_of_two_scales(block):
    x = torch.randn(4, 448) * 3
    y = number_formats.fp8_roundtrip(x, block)
    # every value is an e4m3 value times the block's power-of-two scale 2^ceil(log2(amax/448))
    for j in range(0, 448, block):
        b, yb = x[:, j:j + block], y[:, j:j + block]
        s = torch.exp2(torch.ceil(torch.log2(b.abs().amax(-1, keepdim=True) / 448)))
        assert torch.equal(number_formats.round_e4m3(yb / s) * s, yb)
        assert torch.all((yb - b).abs() <= b.abs() * 2 ** -4 + s * 2 ** -9)
