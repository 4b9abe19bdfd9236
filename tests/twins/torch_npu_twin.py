"""A CPU semantic twin of part of `torch_npu` (torch-npu 2.14 signatures), for testing our Ascend adapters.

THIS IS A TWIN, NOT TORCH-NPU: each function has the real op's signature (names, defaults, return tuple) and
implements its *documented* semantics in float32, and it enforces the documented input constraints (rank,
layout broadcast rules, dtype agreement) so an adapter that passes the wrong layout, dtype or parameters
fails here. It says nothing about NPU kernel numerics or speed. Sources: the torch-npu API pages for
npu_rms_norm, npu_rotary_mul (rotary_mode 'half' | 'interleave'), aclnnClippedSwiglu, npu_dynamic_quant and
npu_quant_matmul (spec ascend.md §2).
"""

from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def npu_rms_norm(input: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    assert input.dtype in _FLOATS and 2 <= input.dim() <= 8, "npu_rms_norm: 2-8-D fp16/bf16/fp32 input"
    assert gamma.dtype == input.dtype, "npu_rms_norm: gamma must have the input's dtype"
    assert gamma.shape == input.shape[-gamma.dim():], "npu_rms_norm: gamma matches the trailing dims"
    x = input.float()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(input.dtype), rstd


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                   rotate=None):
    assert rotary_mode in ("half", "interleave"), "npu_rotary_mul: rotary_mode is 'half' or 'interleave'"
    assert input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "npu_rotary_mul: 4-D input, r1, r2"
    assert input.dtype in _FLOATS and r1.dtype == r2.dtype == input.dtype, "npu_rotary_mul: one float dtype"
    D = input.shape[-1]
    assert D % 2 == 0 and D < 896, "npu_rotary_mul: D even and < 896"
    assert r1.shape == r2.shape and r1.shape[-1] == D, "npu_rotary_mul: r1/r2 [.., D] like input"
    # BSND input: r1/r2 broadcast as 1S1D, BS1D or BSND (the documented cases)
    B, S, N, _ = input.shape
    assert r1.shape[1] == S and r1.shape[0] in (1, B) and r1.shape[2] in (1, N), "npu_rotary_mul: r1/r2 layout"
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    else:
        x1, x2 = x[..., ::2], x[..., 1::2]
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (r1.float() * x + r2.float() * rot).to(input.dtype)


def npu_clipped_swiglu(x: torch.Tensor, *, group_index=None, dim: int = -1, alpha: float = 1.702,
                       limit: float = 7.0, bias: float = 1.0, interleaved: bool = True):
    assert x.dtype in _FLOATS and x.shape[dim] % 2 == 0, "npu_clipped_swiglu: even split dim"
    xf = x.float().movedim(dim, -1)
    if interleaved:
        a, b = xf[..., ::2], xf[..., 1::2]
    else:
        a, b = xf.chunk(2, dim=-1)
    a = a.clamp(max=limit)
    b = b.clamp(-limit, limit)
    return (a * torch.sigmoid(alpha * a) * (b + bias)).movedim(-1, dim).to(x.dtype)


def npu_dynamic_quant(input: torch.Tensor, *, smooth_scales=None, group_index=None, dst_type=None):
    """Per-token symmetric INT8: scale = max|x| over the last dim / 127, y = round(x / scale)."""
    assert input.dtype in (torch.float16, torch.bfloat16) and input.dim() > 1, "npu_dynamic_quant: fp16/bf16, dim > 1"
    assert smooth_scales is None and group_index is None and dst_type in (None, torch.int8)
    x = input.float()
    scale = x.abs().amax(-1) / 127.0
    y = torch.round(x / scale.clamp(min=1e-12)[..., None]).clamp(-127, 127).to(torch.int8)
    return y, scale


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset=None, pertoken_scale=None,
                     bias=None, output_dtype=None):
    """(x1 @ x2) accumulated exactly in int32, times scale[n] (per channel) and pertoken_scale[m]."""
    assert x1.dtype == torch.int8 and x2.dtype == torch.int8, "npu_quant_matmul: int8 x1 and x2"
    assert 2 <= x1.dim() <= 6 and x2.dim() >= 2 and x1.shape[-1] == x2.shape[-2], "npu_quant_matmul: [.., M, K] @ [.., K, N]"
    n = x2.shape[-1]
    assert scale.dim() == 1 and scale.shape[0] in (1, n) and scale.dtype in (torch.float32, torch.bfloat16), \
        "npu_quant_matmul: scale (1,) or (n,) float32 / bfloat16"
    assert output_dtype in (None, torch.int8, torch.float16, torch.bfloat16)
    acc = (x1.to(torch.int64) @ x2.to(torch.int64)).to(torch.float64)          # exact integer accumulation
    y = acc * scale.double()
    if pertoken_scale is not None:
        assert pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == x1.shape[:-1], \
            "npu_quant_matmul: pertoken_scale (m,) float32"
        y = y * pertoken_scale.double()[..., None]
    if output_dtype in (None, torch.int8):
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    return y.to(output_dtype)
