"""A block-scaled FP8 linear as ONE cuBLAS GEMM: `torch.nn.functional.scaled_mm` with DeepSeek's recipe.

torch (2.9+, built with cuBLASLt >= 12.9) scales an FP8 GEMM blockwise on sm_90 only — activations 1 x 128
(`ScalingType.BlockWise1x128`), weights 128 x 128 (`BlockWise128x128`): exactly V4's FP8 linears. The layouts
it demands (aten/src/ATen/native/cuda/ScaledBlas.cpp, `_scaled_block1x128_block128x128`):
- A [M, K] e4m3 row-major, B [K, N] e4m3 column-major (the transposed view of the [N, K] weight codes);
- scale_a float32 [M, ceil(K/128)] with strides (1, M) (column-major);
- scale_b float32 [round_up(ceil(K/128), 4), ceil(N/128)] with strides (1, round_up(ceil(K/128), 4)): the weight's
  [N/128, K/128] block grid, its K side padded to a multiple of 4, viewed transposed.
The activation quantisation (per token and 128 columns, power-of-two scales: DeepSeek's `act_quant`) runs
before the GEMM in torch; the GEMM writes bf16 (the official `fp8_gemm` output dtype), returned as float32.

tests/test_cuda_fp8_kernel.py runs this on CPU tensors through a twin of `scaled_mm` that asserts those
constraints and computes the blockwise product (tests/twins/torch_cuda_blockwise_twin.py): that proves the
layouts and scales, not cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime import number_formats

BLOCK = 128
# The torch call, by name, so a test can route it through a twin asserting CUDA's constraints.
scaled_mm = getattr(F, "scaled_mm", None)


def supported(sm: int) -> bool:
    """This torch build has the blockwise recipes and the device is Hopper with cuBLASLt >= 12.9."""
    cuda = torch.version.cuda or "0.0"
    major, minor = (int(p) for p in cuda.split(".")[:2])
    return (sm // 10 == 9 and scaled_mm is not None and hasattr(F, "ScalingType")
            and hasattr(F.ScalingType, "BlockWise128x128") and (major, minor) >= (12, 9))


def quant_act_blocks(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] -> (e4m3 codes [M, K], float32 scales [M, ceil(K/128)]): `act_quant` per 128 columns."""
    M, K = a.shape
    pad = -K % BLOCK
    ap = F.pad(a, (0, pad)) if pad else a
    b = ap.view(M, -1, BLOCK)
    s = number_formats.pow2_scale(b.abs().amax(-1).clamp(min=1e-4), number_formats.FP8_MAX)            # [M, KB]
    q = (b / s[..., None]).clamp(-number_formats.FP8_MAX, number_formats.FP8_MAX).view(M, -1)[:, :K]
    return q.to(torch.float8_e4m3fn).contiguous(), s


def weight_scale_operand(scale: torch.Tensor) -> torch.Tensor:
    """The weight's [N/128, K/128] float32 block scales as cuBLAS's B scale: [round_up(K/128, 4), N/128],
    strides (1, round_up(K/128, 4)). Derived per call here (a few KiB); a packer could keep it."""
    nb, kb = scale.shape
    padded = scale.new_zeros(nb, -(-kb // 4) * 4)
    padded[:, :kb] = scale
    return padded.t()


def blockwise_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., K] float32 @ Fp8Block w [N, K]^T -> [..., N] float32, one blockwise-scaled GEMM."""
    lead, K = x.shape[:-1], x.shape[-1]
    q, s = quant_act_blocks(x.reshape(-1, K).float())
    # column-major [M, K/128] with strides exactly (1, M): `.t().contiguous().t()` keeps (K/128, 1) when M == 1
    sa = torch.empty_strided(s.shape, (1, s.shape[0]), dtype=torch.float32, device=s.device).copy_(s)
    y = scaled_mm(q, w.codes.t(), sa, F.ScalingType.BlockWise1x128,
                  weight_scale_operand(w.scale.float()), F.ScalingType.BlockWise128x128,
                  output_dtype=torch.bfloat16)
    return y.float().view(*lead, w.codes.shape[0])
