"""A CPU semantic twin of part of `torch_npu` (torch-npu 2.14 signatures), for testing our Ascend adapters.

THIS IS A TWIN, NOT TORCH-NPU: each function has the real op's signature (names, defaults, return tuple) and
implements its *documented* semantics in float32, and it enforces the documented input constraints (rank,
layout broadcast rules, dtype agreement) so an adapter that passes the wrong layout, dtype or parameters
fails here. It says nothing about NPU kernel numerics or speed. Sources: the torch-npu API pages for
npu_rms_norm, npu_rotary_mul (rotary_mode 'half' | 'interleave'), aclnnClippedSwiglu, npu_dynamic_quant,
npu_quant_matmul, npu_format_cast / get_npu_format, npu_grouped_matmul, and npu_moe_gating_top_k with the
cann-recipes custom-op doc and golden for norm_type 2 and hash routing (spec ascend.md §2.3-2.6). The
attention ops (npu_lightning_indexer, npu_sparse_flash_attention) live in torch_npu_twin_attention.py and are
re-exported here, so this module is the whole op namespace an adapter receives.
"""

from __future__ import annotations

import types

import torch

__version__ = "2.14.0+cpu-twin"     # what the self-test cache keys on, with the device name below
npu = types.SimpleNamespace(get_device_name=lambda device=None: "CPU twin of torch-npu (not an NPU)")

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
    assert input.is_contiguous() and r1.is_contiguous() and r2.is_contiguous(), "npu_rotary_mul: contiguous inputs"
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
    assert get_npu_format(x1) == ACL_FORMAT_ND and get_npu_format(x2) in (ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ), \
        "npu_quant_matmul: x1 ND, x2 ND or FRACTAL_NZ"
    assert 2 <= x1.dim() <= 6 and x2.dim() >= 2 and x1.shape[-1] == x2.shape[-2], "npu_quant_matmul: [.., M, K] @ [.., K, N]"
    n = x2.shape[-1]
    assert x1.shape[-1] <= 65535 and n <= 65535, "npu_quant_matmul: the last dims of x1 and x2 are at most 65535"
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


# ---- formats: a twin tensor carries its NPU format as an attribute (storage on CPU is always plain ND) ----
ACL_FORMAT_NCHW, ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ = 0, 2, 29


def npu_format_cast(self: torch.Tensor, acl_format: int) -> torch.Tensor:
    """Same values, tagged with the target format (29 = FRACTAL_NZ); `get_npu_format` reads the tag."""
    assert acl_format in (ACL_FORMAT_NCHW, ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ), "npu_format_cast: 0, 2 or 29"
    assert acl_format != ACL_FORMAT_FRACTAL_NZ or self.dim() >= 2, "npu_format_cast: NZ needs a matrix"
    out = self.clone()
    out._twin_npu_format = acl_format
    return out


def get_npu_format(self: torch.Tensor) -> int:
    return getattr(self, "_twin_npu_format", ACL_FORMAT_ND)


# ---- MoE ----
def npu_moe_gating_top_k(x: torch.Tensor, k: int, *, bias=None, input_ids=None, tid2eid=None, k_group: int = 1,
                         group_count: int = 1, group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0,
                         out_flag: bool = False, routed_scaling_factor: float = 1.0, eps: float = 1e-20):
    """norm = softmax | sigmoid | sqrt(softplus) (norm_type 0 | 1 | 2); experts = tid2eid[input_ids] (hash) or
    top-k of norm + bias within the k_group best of group_count groups (stable: lower id first on ties);
    y = norm at those experts, / (sum + eps) unless softmax, * routed_scaling_factor.
    -> (y in x's dtype [T, k], expert_idx int32 [T, k], norm_out float32 [T, E]: the docs give norm_out x's
    shape whatever out_flag says, as the meta function does)."""
    assert x.dim() == 2 and x.dtype in _FLOATS, "npu_moe_gating_top_k: 2-D fp16/bf16/fp32 x"
    T, E = x.shape
    assert E <= 2048 and E % group_count == 0, "npu_moe_gating_top_k: E <= 2048, divisible by group_count"
    assert 1 <= k <= E // group_count * k_group, "npu_moe_gating_top_k: 1 <= k <= E / group_count * k_group"
    assert renorm == 0, "npu_moe_gating_top_k: renorm only 0 (norm, then top-k)"
    assert norm_type in (0, 1, 2) and group_select_mode in (0, 1)
    assert (input_ids is None) == (tid2eid is None), "npu_moe_gating_top_k: hash needs both input_ids and tid2eid"
    if bias is not None:
        assert bias.shape == (E,) and bias.dtype == x.dtype, "npu_moe_gating_top_k: bias [E] in x's dtype"
    xf = x.float()
    norm = (xf.softmax(-1) if norm_type == 0 else torch.sigmoid(xf) if norm_type == 1
            else torch.sqrt(torch.nn.functional.softplus(xf)))
    if input_ids is not None:
        # the docs allow int32 or int64 for both (cann-recipes' custom op wanted int64 ids, int32 table)
        assert input_ids.dtype in (torch.int32, torch.int64) and input_ids.shape == (T,), \
            "npu_moe_gating_top_k: input_ids int32/int64 [T]"
        assert tid2eid.dtype in (torch.int32, torch.int64) and tid2eid.dim() == 2 and tid2eid.shape[1] == k, \
            "npu_moe_gating_top_k: tid2eid int32/int64 [n, k]"
        assert bool(((input_ids >= 0) & (input_ids < tid2eid.shape[0])).all()), "npu_moe_gating_top_k: input_ids range"
        idx = tid2eid[input_ids].long()
        assert bool(((idx >= 0) & (idx < E)).all()), "npu_moe_gating_top_k: tid2eid entries in [0, E)"
    else:
        sel = norm + (bias.float() if bias is not None else 0.0)
        if group_count > 1:
            g = sel.view(T, group_count, -1)
            gs = g.amax(-1) if group_select_mode == 0 else g.topk(2, dim=-1).values.sum(-1)
            keep = torch.sort(gs, dim=-1, descending=True, stable=True).indices[:, :k_group]
            mask = torch.ones(T, group_count, dtype=torch.bool).scatter_(1, keep, False)
            sel = g.masked_fill(mask[..., None], float("-inf")).view(T, E)
        idx = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    y = norm.gather(1, idx)
    if norm_type != 0:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), norm


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """The float (non-quantised) M-split case only: one x [M, K], weight = one [E, K, N] tensor or E [K, N]
    tensors, group_type 0, group_list int64 [E] as a cumulative sum (type 0) or counts (type 1); rows of
    group e are x[start_e:end_e] @ weight[e]. split_item 2/3: one output [M, N]. The docs: the groups cover x
    exactly (the last cumsum, or the sum of the counts, equals M), and a counts list is not of length 1."""
    assert isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), "npu_grouped_matmul: tensor lists"
    assert all(v is None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                                   activation_input)) and act_type == 0, "twin: float grouped matmul only"
    assert len(x) == 1 and x[0].dim() == 2 and group_type == 0, "twin: one x [M, K] split on M (group_type 0)"
    assert split_item in (2, 3), "twin: split_item 2/3 (one output tensor)"
    xs = x[0]
    ws = list(weight[0]) if len(weight) == 1 and weight[0].dim() == 3 else list(weight)
    assert xs.dtype in _FLOATS and all(w.dtype == xs.dtype and w.dim() == 2 for w in ws), \
        "npu_grouped_matmul: x and weight share one float dtype; weight [E, K, N] or E x [K, N]"
    assert all(w.shape[0] == xs.shape[1] for w in ws), "npu_grouped_matmul: x [M, K] @ weight [K, N]"
    assert group_list is not None and group_list.dtype == torch.int64 and group_list.shape == (len(ws),), \
        "npu_grouped_matmul: group_list int64 [E]"
    assert group_list_type in (0, 1), "npu_grouped_matmul: group_list_type 0 (cumsum) or 1 (counts)"
    gl = group_list.tolist()
    ends = gl if group_list_type == 0 else torch.tensor(gl).cumsum(0).tolist()
    assert all(b >= a for a, b in zip([0] + ends, ends)), \
        "npu_grouped_matmul: group_list must be a non-decreasing cumsum (type 0) / non-negative counts (type 1)"
    assert ends and ends[-1] == xs.shape[0], "npu_grouped_matmul: group_list must sum to x's rows M"
    assert group_list_type == 0 or len(gl) != 1, "npu_grouped_matmul: a counts group_list is not of length 1"
    out = torch.zeros(xs.shape[0], ws[0].shape[1], dtype=torch.float32)
    for w, a, b in zip(ws, [0] + ends, ends):
        out[a:b] = xs[a:b].float() @ w.float()
    return [out.to(output_dtype or xs.dtype)]


from .torch_npu_twin_attention import npu_lightning_indexer, npu_sparse_flash_attention  # noqa: E402,F401
