"""CUDA op implementations (torch on an NVIDIA GPU), registered for backend `cuda`.

- `linear`: FP8 block-scaled weights (`Fp8Block`) through `torch._scaled_mm`; bf16 / fp16 weights as tensor-core
  GEMMs in their storage dtype (`storage_linear`).
- `group_linear`: the grouped wo_a projection in the storage dtype.
- `sparse_attention`: gathered sparse attention with sinks through `scaled_dot_product_attention` (no dense
  masks: each query attends to its own gathered rows).
- `routed_experts`: one grouped GEMM per projection over tokens sorted by expert (`torch.nn.functional.grouped_mm`)
  on the [E, out, in] expert stacks `runtime.weights.device_storage` lays out. Chosen only where those stacks are bf16 /
  fp16 (checked at resolve time from the load's weight format): elsewhere (`--numerics exact`, a float32
  profile) the row is `cuda.torch` and says why, and a call without such stacks is an error, never a quiet
  expert-by-expert loop.
The other ops run as device-generic torch (`cuda.torch`, backends/torch_generic.py).

Every function takes what its reference op takes and returns float32, so the model code is the same on every
backend, and the reference op is its oracle. tests/test_cuda_backend.py runs them on CPU tensors, where torch
implements the same calls (`_scaled_mm` with row-wise scales, `grouped_mm`, bf16 GEMMs, SDPA), each wrapped in a
twin that asserts CUDA's documented input constraints: that proves our layouts, scales and grouping, not the
GPU kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime import number_formats
from runtime.weights.device_storage import BLOCK, Fp8Block, expert_stack
from runtime.dispatch import DispatchError, impl

from .torch_generic import LOW_PRECISION, register_generic, storage_group_linear, storage_linear

QUERY_BLOCK = 256
# The torch calls this backend makes, by name, so tests can check each call against a twin that asserts
# CUDA's documented input constraints (tests/twins/torch_cuda_twin.py): the CPU accepts layouts CUDA rejects.
scaled_mm, grouped_mm, sdpa = torch._scaled_mm, F.grouped_mm, F.scaled_dot_product_attention


def fp8_linear(x: torch.Tensor, w: Fp8Block) -> torch.Tensor:
    """x [..., K] float32 @ FP8 w [N, K].T with DeepSeek's block scaling -> [..., N] float32.

    The activation is quantised per token and 128-column block with a power-of-two scale (exactly `act_quant`,
    so inputs already through the `fp8_block128` numerics are unchanged); the weight carries one scale per
    128x128 block. Row-wise `_scaled_mm` scales are a per-row scale of A ([M, 1]) times a per-column scale of B
    ([1, N]), which is exact for one 128-wide K block: so one `_scaled_mm` per K block, A row-major, B the
    column-major view of the weight codes, bf16 partial products (row-wise scaling produces bf16 on CUDA)
    summed in float32.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    a = x.reshape(-1, K).float()
    N = w.codes.shape[0]
    out = torch.zeros(a.shape[0], N, device=a.device)
    for kb, s in enumerate(range(0, K, BLOCK)):
        blk = a[:, s:s + BLOCK]
        sa = number_formats.pow2_scale(blk.abs().amax(-1, keepdim=True).clamp(min=1e-4), number_formats.FP8_MAX)   # [M, 1]
        qa = (blk / sa).clamp(-number_formats.FP8_MAX, number_formats.FP8_MAX).to(torch.float8_e4m3fn)
        out += scaled_mm(qa, w.codes[:, s:s + BLOCK].t(), scale_a=sa,
                                scale_b=w.column_scale(kb)[None, :].contiguous(), out_dtype=torch.bfloat16).float()
    return out.view(*lead, N)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    return fp8_linear(x, w) if isinstance(w, Fp8Block) else storage_linear(x, w)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float, rnd=None) -> torch.Tensor:
    """The reference op's contract (q [T, H, D], kv [N, D] shared K = V, idx [T, K] with -1 padding, sink [H])
    in bf16 through SDPA: each query is a batch of one over its gathered rows plus one zero-valued key whose
    additive bias is the head's sink logit (q . 0 + sink = sink), so it adds exp(sink) to the denominator and
    nothing to the output — exactly the sink. Softmax accumulates in float32 inside the kernel.
    `rnd` (official numerics) is not applied here: the bf16 kernel rounds its probabilities itself, in its
    own blocking, not in `attention.kernel_probs`' 64-slot order; held to the emulation's tolerance."""
    T, H, D = q.shape
    out = torch.empty_like(q)
    for s in range(0, T, QUERY_BLOCK):
        ib = idx[s:s + QUERY_BLOCK]
        t = ib.shape[0]
        # gather first, then append the sink's zero key: only the selected rows are copied, never the cache
        keys = torch.cat((kv[ib.clamp(min=0)], kv.new_zeros(t, 1, D)), dim=1).to(torch.bfloat16)[:, None]
        pad = torch.cat((ib < 0, ib.new_zeros(t, 1, dtype=torch.bool)), dim=1)              # [t, K+1]
        bias = torch.zeros(t, H, 1, pad.shape[1], device=q.device).masked_fill(pad[:, None, None, :],
                                                                               float("-inf"))
        bias[..., -1] = sink.float().view(1, H, 1)
        o = sdpa(q[s:s + QUERY_BLOCK, :, None, :].to(torch.bfloat16),
                                           keys.expand(-1, H, -1, -1), keys.expand(-1, H, -1, -1),
                                           attn_mask=bias.to(torch.bfloat16), scale=scale)
        out[s:s + QUERY_BLOCK] = o[:, :, 0].float()
    return out


def routed_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts, limit: float,
                   ops) -> torch.Tensor:
    """The reference's contract with one grouped GEMM per projection: token copies sorted by expert, group
    offsets from the per-expert counts, the [E, out, in] stacks as the grouped B operand (column-major view).
    Experts that are not bf16 / fp16 stacks are refused (dispatch only picks this where the load makes them)."""
    stacks = [expert_stack([e[j].weight for e in experts]) for j in range(3)]
    if any(s is None or s.dtype not in LOW_PRECISION for s in stacks):
        kinds = sorted({"not one stack" if s is None else str(s.dtype).replace("torch.", "") for s in stacks})
        raise DispatchError(f"cuda.grouped_mm needs the experts as bf16 / fp16 [E, out, in] stacks, got "
                            f"{', '.join(kinds)}; load through Runtime.load (it stacks them), or prefer cuda.torch")
    w1, w2, w3 = stacks
    q_in, q_mid = experts[0][0].quantized, experts[0][1].quantized
    flat_e = idx.flatten()
    order = torch.argsort(flat_e, stable=True)
    tok = torch.div(order, idx.shape[1], rounding_mode="floor")                           # token of each copy
    # per-expert counts by index_add_, not bincount: bincount sizes its output from the data (a host sync on
    # CUDA), which a CUDA graph cannot hold (backends/cuda_graphs.py)
    counts = torch.zeros(w1.shape[0], dtype=torch.int64, device=x.device).index_add_(0, flat_e,
                                                                                   torch.ones_like(flat_e))
    offs = torch.cumsum(counts, 0).to(torch.int32)                                          # group ends
    xs = x[tok]
    if q_in:
        xs = ops.quant_act(xs)
    xs = xs.to(w1.dtype)
    g = ops.round_act(grouped_mm(xs, w1.transpose(1, 2), offs=offs).float())
    u = ops.round_act(grouped_mm(xs, w3.transpose(1, 2), offs=offs).float())
    h = ops.round_act(ops.clamped_swiglu(g, u, limit) * weights.flatten()[order, None])
    if q_mid:
        h = ops.quant_act(h)
    y = ops.round_act(grouped_mm(h.to(w2.dtype), w2.transpose(1, 2), offs=offs).float())
    return torch.zeros_like(x).index_add_(0, tok, y)


def linear_blockwise(x: torch.Tensor, w) -> torch.Tensor:
    """FP8 blocks through ONE blockwise-scaled cuBLAS GEMM (backends/cuda_fp8_blockwise.py); others as `linear`."""
    if isinstance(w, Fp8Block):
        from .cuda_fp8_blockwise import blockwise_linear

        return blockwise_linear(x, w)
    return storage_linear(x, w)


def linear_triton(x: torch.Tensor, w) -> torch.Tensor:
    """FP8 blocks through ONE Triton kernel, act_quant fused (backends/cuda_fp8_triton.py); others as `linear`."""
    if isinstance(w, Fp8Block):
        from .cuda_fp8_triton import fp8_block_linear

        return fp8_block_linear(x, w)
    return storage_linear(x, w)


_STORE = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}
_COMPUTE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expert_storage_dtype(weight_format: str, compute_dtype: str) -> torch.dtype:
    """The dtype the device weight path (runtime.weights.device) stores routed experts in for this load."""
    return _STORE.get(weight_format, _COMPUTE[compute_dtype])


def _grouped_mm_prepare(ctx):
    store = expert_storage_dtype(ctx.weight_format, ctx.numerics.compute)
    if store not in LOW_PRECISION:
        return None, (f"needs bf16 / fp16 expert stacks; weight format {ctx.weight_format} with compute "
                      f"{ctx.numerics.compute} stores the experts as {str(store).replace('torch.', '')}")
    return routed_experts, f"grouped GEMM over {str(store).replace('torch.', '')} expert stacks"


# One `impl` call per implementation, in preference order per op. The FP8 linear is one GEMM per call wherever
# the device allows; the dispatch row names the one that runs: cuBLAS blockwise scaling (sm_90, cuBLASLt >= 12.9),
# the Triton kernel (sm_89+ with triton installed), and only without either the loop of one row-wise
# `_scaled_mm` per K block (`linear`). Every op without its own entry runs as plain torch (`cuda.torch`, last).
impl("linear", "cuda.scaled_mm_blockwise_fp8+bf16_gemm", "cuda", linear_blockwise, requires=("scaled_mm_blockwise",))
impl("linear", "cuda.triton_fp8_block+bf16_gemm", "cuda", linear_triton, requires=("triton",))
impl("linear", "cuda.scaled_mm_fp8+bf16_gemm", "cuda", linear)
impl("group_linear", "cuda.bf16_einsum", "cuda", storage_group_linear)
impl("sparse_attention", "cuda.sdpa_gathered", "cuda", sparse_attention)
impl("routed_experts", "cuda.grouped_mm", "cuda", routed_experts, prepare=_grouped_mm_prepare)
register_generic("cuda")
