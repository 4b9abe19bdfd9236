"""CPU twins of the torch CUDA calls the CUDA backend makes, asserting CUDA's documented input constraints.

THIS IS A TWIN, NOT A GPU. torch implements `_scaled_mm` (row-wise scales), `grouped_mm` and SDPA on the CPU
too, but the CPU accepts layouts and dtypes the CUDA kernels reject. Each twin here asserts the CUDA-side
constraints (from torch's CUDA implementation and its tests: aten/src/ATen/native/cuda/ScaledBlas.cpp,
GroupedMMUtils.h, test/test_scaled_matmul_cuda.py, the grouped_mm docstring) and then computes with torch's
CPU implementation, so a backend call that would fail on a GPU fails here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends.cuda_graphs import capturing


def scaled_mm(mat1, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
    """`torch._scaled_mm` as this backend uses it: FP8 x FP8 with row-wise scales."""
    assert mat1.dtype == torch.float8_e4m3fn and mat2.dtype == torch.float8_e4m3fn, "_scaled_mm: e4m3 operands"
    assert mat1.dim() == 2 and mat2.dim() == 2 and mat1.shape[1] == mat2.shape[0], "_scaled_mm: [M, K] @ [K, N]"
    assert mat1.stride(1) == 1, "_scaled_mm: mat1 must be row-major"
    assert mat2.stride(0) == 1, "_scaled_mm: mat2 must be column-major (a transposed row-major [N, K])"
    M, K = mat1.shape
    N = mat2.shape[1]
    assert K % 16 == 0 and N % 16 == 0, "_scaled_mm: K and N must be multiples of 16"
    assert scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32, "_scaled_mm: float32 scales"
    assert scale_a.shape == (M, 1) and scale_b.shape == (1, N), "_scaled_mm: row-wise scales are [M, 1] and [1, N]"
    assert scale_a.is_contiguous() and scale_b.is_contiguous(), "_scaled_mm: contiguous scales"
    # below sm_90 / cuBLAS 12.9 row-wise scaling runs in CUTLASS, which writes bf16 (or fp16) only
    assert out_dtype in (torch.bfloat16, torch.float16), "_scaled_mm: row-wise scaling outputs bf16 / fp16"
    return torch._scaled_mm(mat1, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def grouped_mm(mat_a, mat_b, *, offs=None, bias=None, out_dtype=None):
    """`torch.nn.functional.grouped_mm` as a MoE forward: 2-D A split by `offs`, 3-D B [G, K, N]."""
    assert mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16, "grouped_mm: bf16 operands on CUDA"
    assert mat_a.dim() == 2 and mat_b.dim() == 3 and mat_a.shape[1] == mat_b.shape[1], "grouped_mm: [T, K], [G, K, N]"
    assert mat_a.stride(1) == 1, "grouped_mm: A row-major"
    assert mat_b.stride(1) == 1, "grouped_mm: B column-major per group (a transposed [G, N, K])"
    assert mat_a.shape[1] % 8 == 0 and mat_b.shape[2] % 8 == 0, "grouped_mm: K and N 16-byte aligned"
    assert offs is not None and offs.dtype == torch.int32 and offs.dim() == 1, "grouped_mm: offs int32 [G]"
    assert offs.shape[0] == mat_b.shape[0], "grouped_mm: one offset (group end) per group"
    # the offsets' values are read on the host: not while a step is checked for CUDA-graph capture, where
    # that read is itself refused (a GPU's kernel never reads them on the host either)
    if not capturing():
        assert bool((offs[1:] >= offs[:-1]).all()) and int(offs[-1]) <= mat_a.shape[0], "grouped_mm: offs cumulative"
    return F.grouped_mm(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    assert query.dtype == key.dtype == value.dtype, "sdpa: q, k, v share a dtype"
    assert attn_mask is None or attn_mask.dtype in (torch.bool, query.dtype), "sdpa: mask bool or q's dtype"
    assert dropout_p == 0.0 and not is_causal, "sdpa: inference call"
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
