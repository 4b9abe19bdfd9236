"""CPU twin of `torch.nn.functional.scaled_mm` with DeepSeek's blockwise recipe (1x128 activations, 128x128
weights), asserting CUDA's documented input constraints.

THIS IS A TWIN, NOT A GPU. torch's CPU build has no blockwise scaled GEMM ("Invalid scaling configuration"), so
the twin asserts what aten/src/ATen/native/cuda/ScaledBlas.cpp checks for `_scaled_block1x128_block128x128`
(sm_90 + cuBLASLt >= 12.9 there) and computes the blockwise-scaled product in float32, written as bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_mm(mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, swizzle_a=None, swizzle_b=None,
              bias=None, output_dtype=torch.bfloat16, contraction_dim=(), use_fast_accum=False):
    assert scale_recipe_a == F.ScalingType.BlockWise1x128, "scaled_mm: A scaled 1x128"
    assert scale_recipe_b == F.ScalingType.BlockWise128x128, "scaled_mm: B scaled 128x128"
    assert mat_a.dtype == torch.float8_e4m3fn and mat_b.dtype == torch.float8_e4m3fn, "scaled_mm: e4m3 operands"
    assert mat_a.dim() == 2 and mat_b.dim() == 2 and mat_a.shape[1] == mat_b.shape[0], "scaled_mm: [M, K] @ [K, N]"
    assert mat_a.stride(1) == 1, "scaled_mm: mat_a must be row-major"
    assert mat_b.stride(0) == 1, "scaled_mm: mat_b must be column-major (a transposed row-major [N, K])"
    M, K = mat_a.shape
    N = mat_b.shape[1]
    assert K % 16 == 0 and N % 16 == 0, "scaled_mm: K and N must be multiples of 16"
    kb, nb = -(-K // 128), -(-N // 128)
    kb4 = -(-kb // 4) * 4
    assert scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32, "scaled_mm: float32 block scales"
    assert tuple(scale_a.shape) == (M, kb), f"scaled_mm: scale_a must be [{M}, {kb}]"
    assert scale_a.stride(0) == 1 and (scale_a.stride(1) == M or kb == 1), "scaled_mm: scale_a strides (1, M)"
    assert tuple(scale_b.shape) == (kb4, nb), f"scaled_mm: scale_b must be [{kb4}, {nb}] (K blocks padded to 4)"
    assert scale_b.stride(0) == 1 and (scale_b.stride(1) == kb4 or nb == 1), "scaled_mm: scale_b strides (1, kb4)"
    assert bias is None and output_dtype == torch.bfloat16, "scaled_mm: this backend asks for bf16, no bias"
    sa = scale_a.repeat_interleave(128, 1)[:, :K]
    sb = scale_b[:kb].repeat_interleave(128, 0)[:K].repeat_interleave(128, 1)[:, :N]
    return ((mat_a.float() * sa) @ (mat_b.float() * sb)).to(output_dtype)
