"""Ascend op adapters: each reference op mapped onto one torch-npu fused op, one small function per call.

Every adapter takes the op namespace explicitly (`npu`: the real `torch_npu` module on an NPU machine, or a
CPU semantic twin in tests) and states the layout and dtype it converts to. They are registered for backend
`ascend`; `get_torch_npu()` imports torch-npu lazily, only when an Ascend dispatch table is built.

Status: adapters exist for RMS norm, interleaved RoPE, clipped SwiGLU, the MoE gate (sqrt-softplus / hash),
the lightning-indexer top-k, sparse attention with sinks, the routed experts as grouped matmuls, and the W8A8
linear (dynamic per-token quant + quant matmul, ND or FRACTAL_NZ weight). They are proven against CPU twins of
the documented semantics (tests/twins) and their calls bound against the torch-npu 2.14.0 wheel's schemas and
meta functions (tests/test_ascend_wheel_schema.py), not run on an NPU. Each is chosen only where the chip and the
profile both have its capability (interleaved RoPE and clipped SwiGLU: A2/A3 only, per the docs) and the
profile declares the kernel limits it reads (`KERNEL_LIMITS`); the gate, indexer and sparse-attention
adapters, whose semantics torch-npu does not document, additionally pass a one-time self-test on the device
against the reference op first (backends/ascend_selftest.py), and the dispatch row records the outcome. The W8A8 linear is registered as `linear` for
`Int8Channel` weights (runtime.weights.device packs them at load, [K, N] ND; the FRACTAL_NZ cast needs the
device and is not applied at load yet). The grouped-matmul experts want [E, K, N] stacks
(`prepare_expert_weights`) and are not registered: on an NPU the experts run one by one through the linear.
Every op without an adapter runs as plain torch on the NPU (`ascend.torch`, backends/torch_generic.py).
"""

from __future__ import annotations

import torch

from runtime.weights.device_storage import Int8Channel
from runtime.dispatch import impl
from runtime.errors import V4Error

from . import ascend_selftest

from .torch_generic import register_generic, storage_group_linear, storage_linear


class KernelLimitError(V4Error):
    """A call exceeds a kernel limit the profile declares (one line: the limit and how to avoid the kernel)."""


def _over(op: str, what: str, value: int, limit_name: str, limit: int, table_op: str):
    raise KernelLimitError(f"{op}: {what} {value} is over the kernel limit {limit_name}={limit} of this profile; "
                           f"set `prefer: {{{table_op}: [ascend.torch]}}` in the profile to run plain torch instead")


def _shape(op: str, what: str, got, want: str, table_op: str):
    raise KernelLimitError(f"{op} takes {what} {want}, this model has {got}; set `prefer: {{{table_op}: "
                           "[ascend.torch]}` in the profile to run plain torch for this op")


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
    # contiguous: the rope dims are often a slice of a wider head, and a strided view must not reach the kernel
    x4 = x.reshape(1, shape[0], -1, shape[-1]).float().contiguous()          # [1, T, H, D]
    r1 = cos.reshape(shape[0], -1).repeat_interleave(2, dim=-1).reshape(1, shape[0], 1, shape[-1]).float()
    r2 = sin.reshape(shape[0], -1).repeat_interleave(2, dim=-1).reshape(1, shape[0], 1, shape[-1]).float()
    r2 = -r2 if inverse else r2
    y = npu.npu_rotary_mul(x4, r1.contiguous(), r2.contiguous(), rotary_mode="interleave")
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
    Per-output-channel symmetric INT8, the same codes as runtime.weight_transforms' W8A8 emulation."""
    packed = Int8Channel.from_float(w)
    return packed.codes_kn, packed.scale


QUANT_MATMUL_MAX_N = 65535     # npu_quant_matmul: "last dims <= 65535" (the profiles' quant_matmul_max_n)


def linear_w8a8(npu, x: torch.Tensor, w_kn: torch.Tensor, scale: torch.Tensor,
                max_n: int = QUANT_MATMUL_MAX_N) -> torch.Tensor:
    """W8A8 linear: `npu_dynamic_quant` (per-token symmetric INT8 of a bf16 activation, scale = rowmax/127)
    then `npu_quant_matmul(x1 int8 [M, K], x2 int8 [K, N], scale fp32 [N], pertoken_scale fp32 [M],
    output_dtype=bf16)` = (x1 @ x2) * scale[n] * pertoken_scale[m]. Activations go in as bf16 (the op
    takes fp16 / bf16 only); the result comes back as bf16. N over the kernel's limit (V4-Pro's attn.wq_b has
    N = 65536 > 65535) is split into equal column slices of at most `max_n`, each with its slice of the
    scale: every output column is the same sum over K, so the split changes no value."""
    lead, N = x.shape[:-1], w_kn.shape[-1]
    xq, xs = npu.npu_dynamic_quant(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
    parts = -(-N // max_n)
    step = -(-N // parts)
    ys = [npu.npu_quant_matmul(xq, w_kn[:, s:s + step].contiguous(), scale[s:s + step].float().contiguous(),
                               pertoken_scale=xs.float(), output_dtype=torch.bfloat16) for s in range(0, N, step)]
    y = ys[0] if parts == 1 else torch.cat(ys, dim=-1)
    return y.reshape(*lead, -1)


def prepare_w8a8_nz(npu, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_w8a8`, then `npu_format_cast(w_kn, 29)`: the int8 [K, N] weight in FRACTAL_NZ (29 =
    ACL_FORMAT_FRACTAL_NZ), the layout npu_quant_matmul recommends for x2 on A2/A3 (cast non-transposed).
    Use the result with `linear_w8a8` unchanged; the scale stays a float32 [N] ND tensor."""
    w_kn, scale = prepare_w8a8(w)
    return npu.npu_format_cast(w_kn, 29), scale


def moe_gate(npu, x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None,
             hash_experts: torch.Tensor | None, k: int, route_scale: float,
             max_experts: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """`npu_moe_gating_top_k(logits, k, bias=, input_ids=, tid2eid=, renorm=0, norm_type=2, ...)
    -> (y, expert_idx int32, norm_out)` on logits = x @ gate_w.T, a float32 [T, E] ND tensor (bias float32 [E]:
    the op wants bias in x's dtype). norm_type=2 is sqrt(softplus(x)) (V4's score; 0 = softmax and 1 = sigmoid
    would be silently wrong); renorm must be 0 (norm, then top-k). The bias only steers the selection; y is the
    chosen unbiased scores. Hash layers: our reference gets the experts already gathered per token
    (`hash_experts` [T, k]), so the adapter passes input_ids = arange(T) (int64 [T]) and tid2eid =
    hash_experts as int32 [T, k]: a per-call table whose row t is token t's experts.
    Weights: the op divides y by (sum + eps) for norm_type != 0 and multiplies by routed_scaling_factor
    (cann-recipes golden); we pass factor 1.0 and renormalise / scale in Python, which is a no-op if the op
    normalised and correct if a build's hash path does not (vllm-ascend normalises in Python there).
    -> (idx int64 [T, k], weights float32 [T, k])."""
    if gate_w.shape[0] > max_experts:
        _over("npu_moe_gating_top_k", "expert count", gate_w.shape[0], "gating_max_experts", max_experts, "moe_gate")
    logits = (x.float() @ gate_w.float().T).contiguous()
    if hash_experts is not None:
        ids = torch.arange(logits.shape[0], dtype=torch.int64, device=logits.device)
        y, expert_idx, _ = npu.npu_moe_gating_top_k(logits, k, input_ids=ids,
                                                    tid2eid=hash_experts.to(torch.int32).contiguous(), renorm=0,
                                                    norm_type=2, routed_scaling_factor=1.0, eps=1e-20)
    else:
        y, expert_idx, _ = npu.npu_moe_gating_top_k(logits, k, bias=bias.float().contiguous(), renorm=0, norm_type=2,
                                                    routed_scaling_factor=1.0, eps=1e-20)
    w = y.float()
    return expert_idx.long(), w / w.sum(-1, keepdim=True) * route_scale


LI_BLOCK = 128   # paged-key block size for the indexer (a multiple of 16, at most 1024)


LI_SPARSE_COUNTS = {3072, 4096, 5120, 6144, 7168, 8192}   # besides 1..2048 (the docs' sparse_count values)


def indexer_topk(npu, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                 k: int, max_k: int = 2048, rnd=None) -> torch.Tensor:
    """`npu_lightning_indexer(query, key, weights, ..., layout_query="TND", layout_key="PA_BSND",
    sparse_count=k, sparse_mode=0) -> (indices int32 [T, 1, k], values)`; score = sum_h w_h relu(q_h . key).
    Our causality is "query t sees the first visible[t] keys", not right-down causal, so queries are sorted by
    their visible count and each distinct count is one batch: query TND bf16 [T', 64, 128] with prefix-sum
    actual_seq_lengths_query (int32), weights bf16 [T', 64], actual_seq_lengths_key = the counts (int32), no
    mask (sparse_mode 0). The keys are one paged cache, bf16 [blocks, 128, 1, 128], shared by every batch
    through an int32 block_table whose rows are all arange(blocks): no key is copied per batch.
    The op writes -1 after the valid entries (fewer visible than k); queries with nothing visible are never
    sent, and any index at or past a row's visible count is forced to -1 (a kernel's padding must never name a
    key the row cannot see). -> int64 [T, k], best first, -1 padding (ties: the kernel's order; the reference takes the lower
    index). The kernel takes 64 query heads of dim 128 and sparse_count <= 2048 (V4's indexer shape).
    `rnd` (official numerics' bf16 points, `attention.index_scores`) is not applied: the kernel scores bf16
    inputs in its own precision."""
    if k > max_k or not (1 <= k <= 2048 or k in LI_SPARSE_COUNTS):
        _over("npu_lightning_indexer", "sparse_count", k, "indexer_max_sparse_count", max_k, "indexer_topk")
    if tuple(q.shape[1:]) != (64, 128):
        _shape("npu_lightning_indexer", "query heads x head dim", "x".join(map(str, q.shape[1:])), "64x128",
               "indexer_topk")
    T, N = q.shape[0], keys.shape[0]
    out = torch.full((T, k), -1, dtype=torch.int64, device=q.device)
    vis = visible.to(torch.int64).clamp(max=N)
    rows = torch.nonzero(vis > 0).flatten()
    if N == 0 or k == 0 or rows.numel() == 0:
        return out
    rows = rows[torch.sort(vis[rows], stable=True).indices]
    counts_key, n_query = torch.unique_consecutive(vis[rows], return_counts=True)
    blocks = -(-N // LI_BLOCK)
    paged = torch.zeros(blocks * LI_BLOCK, keys.shape[-1], dtype=torch.bfloat16, device=keys.device)
    paged[:N] = keys
    table = torch.arange(blocks, dtype=torch.int32, device=keys.device).expand(counts_key.numel(), -1).contiguous()
    idx, _ = npu.npu_lightning_indexer(
        q[rows].to(torch.bfloat16).contiguous(), paged.view(blocks, LI_BLOCK, 1, -1),
        weights[rows].to(torch.bfloat16).contiguous(),
        actual_seq_lengths_query=n_query.cumsum(0).to(torch.int32), actual_seq_lengths_key=counts_key.to(torch.int32),
        block_table=table, layout_query="TND", layout_key="PA_BSND", sparse_count=k, sparse_mode=0)
    got = idx[:, 0, :].long()
    out[rows] = got.masked_fill(got >= vis[rows, None], -1)
    return out


SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)


def sparse_attention(npu, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float, rnd=None) -> torch.Tensor:
    """`npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, ..., layout_query="TND",
    layout_kv="TND", sparse_mode=0, attention_mode=2, sinks=) -> (out, softmax_max, softmax_sum)`.
    query bf16 [T, H, 512]; key = value = kv bf16 [N, 1, 512] (V4 shares K and V in one KV head); the MLA rope
    parts are zeros (query_rope [T, H, 64], key_rope [N, 1, 64]: V4's rope dims are inside the 512, and the
    kernel's D is fixed at 512 + 64). One batch: actual_seq_lengths_query = [T], actual_seq_lengths_kv = [N]
    (int32; prefix sum and length agree for one batch). sparse_indices int32 [T, 1, K] with VALID ENTRIES
    FIRST, PADDING (-1) LAST, as the op requires: our idx may hold -1 anywhere, so each row is compacted by a
    stable sort (order of valid entries kept; it does not matter to the softmax). sparse_mode 0: the index
    lists are the whole mask (mode 3 would add a right-down causal cut). sinks float32 [H]: exp(sink_h) joins
    the denominator only. -> q.dtype [T, H, 512] (the kernel's output is bf16). `rnd` (official numerics'
    bf16 probabilities, `attention.kernel_probs`) is not applied: the kernel rounds in its own order."""
    T, H, D = q.shape
    if D != 512 or H not in SFA_HEADS:
        _shape("npu_sparse_flash_attention", "head dim 512 and query heads in", f"head dim {D}, {H} heads",
               "1, 2, 4, ..., 128", "sparse_attention")
    N = kv.shape[0]
    order = torch.sort((idx < 0).to(torch.int32), dim=-1, stable=True).indices
    compact = idx.gather(-1, order).to(torch.int32).reshape(T, 1, -1).contiguous()
    kv16 = kv.to(torch.bfloat16).reshape(N, 1, D).contiguous()
    out, _, _ = npu.npu_sparse_flash_attention(
        q.to(torch.bfloat16).contiguous(), kv16, kv16, compact, float(scale),
        actual_seq_lengths_query=torch.tensor([T], dtype=torch.int32, device=q.device),
        actual_seq_lengths_kv=torch.tensor([N], dtype=torch.int32, device=q.device),
        query_rope=torch.zeros(T, H, 64, dtype=torch.bfloat16, device=q.device),
        key_rope=torch.zeros(N, 1, 64, dtype=torch.bfloat16, device=q.device),
        sparse_block_size=1, layout_query="TND", layout_kv="TND", sparse_mode=0, attention_mode=2,
        sinks=sink.float().contiguous())
    return out.to(q.dtype)


def prepare_expert_weights(experts, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert (w1, w2, w3) float [out, in] (tensors, or linears with a float `.weight`) -> the grouped-matmul
    weights, [E, K, N] (x @ w per group): w13 [E, d, 2I] = [w1 | w3] transposed (gate columns first, then up:
    the halves `clamped_swiglu` splits) and w2 [E, I, d] = w2 transposed, both contiguous in `dtype` (bf16 /
    fp16 on the NPU; fp32 is accepted)."""
    def f(w):
        return getattr(w, "weight", w).float()

    w13 = torch.stack([torch.cat((f(w1), f(w3)), dim=0).t() for w1, _w2, w3 in experts]).to(dtype).contiguous()
    w2 = torch.stack([f(w2).t() for _w1, w2, _w3 in experts]).to(dtype).contiguous()
    return w13, w2


def expert_ffn(npu, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts as two `npu_grouped_matmul([x], [w], group_list=, group_list_type=1, split_item=2,
    group_type=0)` calls (one x tensor split on M by the per-expert row counts, one [E, K, N] weight, one
    output tensor). The T*k (token, expert) rows are sorted by expert (stable); group_list = int64 counts
    [E] (type 1; type 0 would mean a cumulative sum). Between the two: clipped SwiGLU on [gate | up] via the
    `clamped_swiglu` adapter, then the routing weight (before w2, as the official code). Rows go in as w13's
    dtype and are summed back per token in float32 (index_add). -> float32 [T, d]."""
    E = w13.shape[0]
    flat_e = idx.flatten()
    order = torch.sort(flat_e, stable=True).indices
    tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[1])[order]
    counts = torch.bincount(flat_e, minlength=E).to(torch.int64)
    h = npu.npu_grouped_matmul([x[tok].to(w13.dtype).contiguous()], [w13], group_list=counts, group_list_type=1,
                               split_item=2, group_type=0)[0]
    inter = h.shape[-1] // 2
    a = clamped_swiglu(npu, h[:, :inter], h[:, inter:], limit).float() * weights.flatten()[order, None].float()
    y = npu.npu_grouped_matmul([a.to(w2.dtype).contiguous()], [w2], group_list=counts, group_list_type=1,
                               split_item=2, group_type=0)[0]
    return torch.zeros(x.shape[0], y.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, tok, y.float())


def linear(npu, x: torch.Tensor, w, max_n: int = QUANT_MATMUL_MAX_N) -> torch.Tensor:
    """The table's linear on an NPU: INT8-channel weights (`w8a8_int8`, stored [K, N] by
    runtime.weights.device_storage) through `linear_w8a8`; bf16 / fp16 weights as a torch GEMM in their dtype on the
    NPU's cube units. Returns float32 like the reference."""
    if isinstance(w, Int8Channel):
        return linear_w8a8(npu, x, w.codes_kn, w.scale, max_n).float()
    return storage_linear(x, w)


# kernel limit (a profile's kernel_limits key) -> the adapter argument it sets
KERNEL_LIMITS = {"quant_matmul_max_n": "max_n", "gating_max_experts": "max_experts",
                 "indexer_max_sparse_count": "max_k"}


def _call(adapter, kw):
    return lambda *args, **kwargs: adapter(get_torch_npu(), *args, **kw, **kwargs)


def _prepare(op: str, impl_id: str, adapter, limits: tuple[str, ...]):
    """At resolve time: bind the profile's kernel limits, and self-test the adapters of undocumented semantics."""
    def prepare(ctx):
        missing = [n for n in limits if n not in ctx.kernel_limits]
        if missing:
            return None, f"needs kernel_limits {', '.join(missing)} declared in profile {ctx.profile.name}"
        kw = {KERNEL_LIMITS[n]: int(ctx.kernel_limits[n]) for n in limits}
        notes = [", ".join(f"{n}={ctx.kernel_limits[n]}" for n in limits)] if limits else []
        if op in ascend_selftest.SELF_TESTS:
            npu = get_torch_npu()
            ok, detail = ascend_selftest.run_cached(op, impl_id, npu, lambda *a: adapter(npu, *a, **kw), ctx.device)
            if not ok:
                return None, detail
            notes.append(detail)
        return _call(adapter, kw), "; ".join(notes)
    return prepare


def _adapter(op: str, impl_id: str, adapter, requires=(), limits=()):
    """`impl` for an adapter: torch-npu bound lazily, the profile's kernel limits (and self-test) at resolve."""
    impl(op, impl_id, "ascend", _call(adapter, {}), requires=requires, prepare=_prepare(op, impl_id, adapter, limits))


# One registration per implementation, in preference order per op: the adapter, with the chip capabilities it
# needs and the profile kernel limits it reads; then plain torch on the NPU for every op (`ascend.torch`, last).
_adapter("linear", "ascend.npu_quant_matmul+bf16_gemm", linear, limits=("quant_matmul_max_n",))
_adapter("rms_norm", "ascend.npu_rms_norm", rms_norm)
_adapter("apply_rope", "ascend.npu_rotary_mul", apply_rope, requires=("fused_rope_interleave",))
_adapter("clamped_swiglu", "ascend.npu_clipped_swiglu", clamped_swiglu, requires=("fused_clipped_swiglu",))
_adapter("moe_gate", "ascend.npu_moe_gating_top_k", moe_gate, requires=("fused_moe_gating",),
         limits=("gating_max_experts",))
_adapter("indexer_topk", "ascend.npu_lightning_indexer", indexer_topk, requires=("fused_indexer",),
         limits=("indexer_max_sparse_count",))
_adapter("sparse_attention", "ascend.npu_sparse_flash_attention", sparse_attention,
         requires=("fused_sparse_attention",))
impl("group_linear", "ascend.bf16_einsum", "ascend", storage_group_linear)
register_generic("ascend")
