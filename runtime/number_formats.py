"""Number formats of the official checkpoints, decoded and encoded bit by bit.

- FP8 e4m3 (`float8_e4m3fn`): sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, 0x7F/0xFF = NaN,
  largest finite 448. Linears carry one ue8m0 scale per 128x128 block (`.scale`, shape [ceil(out/128),
  ceil(in/128)]).
- UE8M0 (`float8_e8m0fnu`): a bare exponent, value 2^(byte-127); 0xFF = NaN.
- FP4 e2m1: sign bit 3, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6. Routed experts store two codes per int8 byte,
  low nibble = even element, with one ue8m0 scale per 32 elements along the input dim.

Decoding uses lookup tables built from the bit layout here, not torch's float8 casts, so the test oracle is
independent of the library under test. Encoding (used by the checkpoint generator and the numerics
emulation) rounds to nearest, ties to even.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _e4m3_table() -> torch.Tensor:
    vals = []
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            vals.append(float("nan"))
        elif exp == 0:
            vals.append(sign * (man / 8.0) * 2.0 ** -6)           # subnormal
        else:
            vals.append(sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7))
    return torch.tensor(vals, dtype=torch.float32)


def _e8m0_table() -> torch.Tensor:
    t = torch.tensor([2.0 ** (b - 127) for b in range(256)], dtype=torch.float64)
    t[255] = float("nan")
    return t.to(torch.float32)  # 2^-127 is a float32 subnormal: exact


def _e2m1_table() -> torch.Tensor:
    return torch.tensor(list(FP4_GRID) + [-v for v in FP4_GRID], dtype=torch.float32)


E4M3_TABLE = _e4m3_table()
E8M0_TABLE = _e8m0_table()
E2M1_TABLE = _e2m1_table()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a 1-byte tensor as int64 indices (works for fp8, e8m0, int8, uint8)."""
    if t.element_size() != 1:
        raise TypeError(f"expected a 1-byte dtype, got {t.dtype}")
    return t.view(torch.uint8).to(torch.int64)


def decode_e4m3(codes: torch.Tensor) -> torch.Tensor:
    return E4M3_TABLE[_bytes(codes)]


def decode_e8m0(codes: torch.Tensor) -> torch.Tensor:
    return E8M0_TABLE[_bytes(codes)]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] packed int8 -> [..., n] float32 e2m1 values (low nibble first)."""
    b = _bytes(packed)
    lo, hi = E2M1_TABLE[b & 0xF], E2M1_TABLE[b >> 4]
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    s = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[: shape[0], : shape[1]]


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 e4m3 weight [out, in] with ue8m0 block scales [ceil(out/b), ceil(in/b)] -> float32."""
    w = decode_e4m3(weight)
    return w * _expand_blocks(decode_e8m0(scale), tuple(w.shape), (block, block))


def dequant_fp4(weight: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Packed FP4 weight [out, in/2] with ue8m0 scales [out, in/block] -> float32 [out, in]."""
    w = unpack_fp4(weight)
    return w * _expand_blocks(decode_e8m0(scale), tuple(w.shape), (1, block))


# ----------------------------------------------------------------------------------------------- encoding

def pow2_scale(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """Power-of-two (ue8m0) scale 2^ceil(log2(amax / fmt_max)), so that amax / scale <= fmt_max."""
    return torch.exp2(torch.ceil(torch.log2(amax / fmt_max)))


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already within +-448) to the nearest e4m3 value, ties to even."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _e2m1_grid(device) -> torch.Tensor:
    """FP4_GRID computed on `device` from an arange (no host data: a CUDA graph can hold it): codes 0-3 step
    0.5, 4-5 step 1 from 2, 6-7 step 2 from 4."""
    c = torch.arange(8, dtype=torch.float32, device=device)
    return torch.where(c < 4, c * 0.5, torch.where(c < 6, c - 2, c * 2 - 8))


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest e2m1 value (saturating at +-6), ties to the even code."""
    grid = _e2m1_grid(x.device)
    a = x.abs().clamp(max=FP4_MAX)
    lo = (torch.bucketize(a, grid, right=True) - 1).clamp(0, 6)
    hi = lo + 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return torch.where(take_hi, grid[hi], grid[lo]) * torch.sign(x)


def encode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float scales -> ue8m0 bytes (as float8_e8m0fnu)."""
    e = torch.log2(scale).round().to(torch.int64) + 127
    if (e < 0).any() or (e > 254).any():
        raise ValueError("scale outside the ue8m0 range 2^-127..2^127")
    return e.to(torch.uint8).view(torch.float8_e8m0fnu)


def quant_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [out, in] -> (e4m3 codes [out, in], ue8m0 scales [ceil(out/b), ceil(in/b)])."""
    out_f, in_f = w.shape
    po, pi = -out_f % block, -in_f % block
    wp = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    blocks = wp.view(wp.shape[0] // block, block, wp.shape[1] // block, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    s = pow2_scale(amax, FP8_MAX)
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(wp)[:out_f, :in_f]
    return q.contiguous().to(torch.float8_e4m3fn), encode_e8m0(s)


def quant_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [out, in] -> (packed int8 [out, in/2], ue8m0 scales [out, in/block])."""
    out_f, in_f = w.shape
    if in_f % block:
        raise ValueError(f"FP4 input dim {in_f} must be a multiple of {block}")
    blocks = w.float().view(out_f, in_f // block, block)
    s = pow2_scale(blocks.abs().amax(-1).clamp(min=1e-4), FP4_MAX)
    v = round_e2m1(blocks / s[..., None]).view(out_f, in_f)
    # value -> 4-bit code: index in the grid, sign in bit 3 (negative zero is never produced).
    grid = torch.tensor(FP4_GRID, dtype=torch.float32)
    code = torch.bucketize(v.abs(), grid) | ((v < 0).to(torch.int64) << 3)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.to(torch.uint8).view(torch.int8), encode_e8m0(s)


# ------------------------------------------------------------------------- activation-side simulations

def fp8_roundtrip(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantise-dequantise the last dim in blocks of `block` to e4m3 with power-of-two scales.

    This is the official `act_quant` numerics (scale 2^ceil(log2(max(amax, 1e-4)/448))); a trailing partial
    block gets its own scale.
    """
    n = x.shape[-1]
    pad = -n % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    b = xp.unflatten(-1, (xp.shape[-1] // block, block))
    s = pow2_scale(b.abs().amax(-1, keepdim=True).clamp(min=1e-4), FP8_MAX)
    y = (round_e4m3(b / s) * s).flatten(-2)
    return y[..., :n] if pad else y


def fp4_roundtrip(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantise-dequantise the last dim in blocks of `block` to e2m1 with power-of-two scales.

    The official `fp4_act_quant` floors the block max at 6 * 2^-126 (FP8 uses 1e-4) so a zero block stays 0."""
    b = x.unflatten(-1, (x.shape[-1] // block, block))
    s = pow2_scale(b.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126), FP4_MAX)
    return (round_e2m1(b / s) * s).flatten(-2)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dim (Sylvester order, scaled by n^-1/2)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    y, h = x.clone(), 1
    while h < n:
        y = y.unflatten(-1, (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return y * n ** -0.5
