"""Ascend op adapters: each reference op mapped onto one torch-npu fused op, one small function per call.

Every adapter takes the op namespace explicitly (`npu`: the real `torch_npu` module on an NPU machine, or a
CPU semantic twin in tests) and states the layout and dtype it converts to. They are registered for backend
`ascend`; `get_torch_npu()` imports torch-npu lazily, only when an Ascend dispatch table is built.

Status: adapters exist for the ops whose torch-npu semantics are documented precisely (RMS norm, interleaved
RoPE, clipped SwiGLU, and the W8A8 linear = dynamic per-token quant + quant matmul). They are proven against
CPU twins of the documented semantics, not on an NPU. The W8A8 linear needs int8 weights prepared at load
(`prepare_w8a8`), so it is not in the dispatch registry until the model carries per-format weights.
"""

from __future__ import annotations

import torch

from runtime.dispatch import register


def get_torch_npu():
    import torch_npu  # noqa: F401  (lazy: never at import of this package)

    return torch_npu


def rms_norm(npu, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`npu_rms_norm(input, gamma, epsilon) -> (y, rstd)`; gamma must share x's dtype, so the weightless
    per-head q norm passes a ones gamma. Layout: any 2-8-D tensor, normalised over the last dim."""
    gamma = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    y, _rstd = npu.npu_rms_norm(x, gamma, epsilon=eps)
    return y


def apply_rope(npu, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`npu_rotary_mul(input, r1, r2, rotary_mode="interleave")` computes r1*x + r2*rotate(x) with
    rotate(x)[2i] = -x[2i+1], rotate(x)[2i+1] = x[2i]. V4 rotates interleaved pairs, so r1/r2 are the pair
    cos/sin repeated per element (repeat_interleave(2)), and the inverse rotation negates sin.
    The op wants 4-D BSND tensors and float32 here (V4 rotates in fp32): x [..., D] is viewed as
    [1, T, H, D] with cos/sin broadcast as [1, T, 1, D]."""
    shape = x.shape
    x4 = x.reshape(1, shape[0], -1, shape[-1]).float()                       # [1, T, H, D]
    r1 = cos.reshape(shape[0], -1).repeat_interleave(2, dim=-1).reshape(1, shape[0], 1, shape[-1]).float()
    r2 = sin.reshape(shape[0], -1).repeat_interleave(2, dim=-1).reshape(1, shape[0], 1, shape[-1]).float()
    y = npu.npu_rotary_mul(x4, r1, -r2 if inverse else r2, rotary_mode="interleave")
    return y.reshape(shape).to(x.dtype)


def clamped_swiglu(npu, g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """`npu_clipped_swiglu(x, dim=-1, alpha, limit, bias, interleaved)` on x = [gate | up] (halves, not
    even/odd): y = min(A, limit) * sigmoid(alpha * min(A, limit)) * (clamp(B, -limit, limit) + bias).
    V4's silu(min(g, 10)) * clamp(u, -10, 10) is alpha=1, bias=0, limit=10, interleaved=False
    (the op's defaults, 1.702 / 1.0 / 7.0 / True, are GPT-OSS's and would be silently wrong)."""
    return npu.npu_clipped_swiglu(torch.cat((g, u), dim=-1), dim=-1, alpha=1.0, limit=float(limit), bias=0.0,
                                  interleaved=False)


def prepare_w8a8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [out, in] float -> (int8 [in, out] contiguous = the op's x2 [K, N], float32 scale [out]).
    Per-output-channel symmetric INT8, the same codes as runtime.weight_formats' W8A8 emulation."""
    from runtime.weight_formats import quantize_int8_per_channel

    codes, scale = quantize_int8_per_channel(w.float())
    return codes.t().contiguous(), scale


def linear_w8a8(npu, x: torch.Tensor, w_kn: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 linear: `npu_dynamic_quant` (per-token symmetric INT8 of a bf16 activation, scale = rowmax/127)
    then `npu_quant_matmul(x1 int8 [M, K], x2 int8 [K, N], scale fp32 [N], pertoken_scale fp32 [M],
    output_dtype=bf16)` = (x1 @ x2) * scale[n] * pertoken_scale[m]. Activations go in as bf16 (the op
    takes fp16 / bf16 only); the result comes back as bf16."""
    lead = x.shape[:-1]
    xq, xs = npu.npu_dynamic_quant(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
    y = npu.npu_quant_matmul(xq, w_kn, scale.float(), pertoken_scale=xs.float(), output_dtype=torch.bfloat16)
    return y.reshape(*lead, -1)


ADAPTERS = {"rms_norm": ("ascend.npu_rms_norm", rms_norm),
            "apply_rope": ("ascend.npu_rotary_mul", apply_rope),
            "clamped_swiglu": ("ascend.npu_clipped_swiglu", clamped_swiglu)}


def _bind(adapter):
    return lambda *args, **kw: adapter(get_torch_npu(), *args, **kw)


for _op, (_id, _fn) in ADAPTERS.items():
    register(_op, _id, "ascend")(_bind(_fn))
