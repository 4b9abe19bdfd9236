"""Our Ascend adapters against a CPU semantic twin of torch-npu (tests/twins/torch_npu_twin.py).

The twin implements the documented semantics with the real signatures; these tests prove the adapters pass
the right layout, dtype and parameters (interleaved RoPE pairing, clipped-SwiGLU constants, sqrt-softplus
gating and hash tables, indexer batching by visible count, valid-first sparse indices, grouped-matmul weight
layout and group_list convention, NZ weights) by comparing with our float32 reference ops, and that a
plausible wrong choice fails in the twin or gives a different answer. Nothing here ran on an NPU.
"""

import types

import pytest
import torch

from backends import ascend_ops
from runtime.model.v4 import Linear
from runtime.ops import attention, moe, norm_rope, reference_ops
from tests.twins import torch_npu_twin as twin

G = torch.Generator().manual_seed(0)


def test_rms_norm_adapter():
    x, w = torch.randn(5, 3, 64, generator=G), torch.randn(64, generator=G)
    assert torch.allclose(ascend_ops.rms_norm(twin, x, w, 1e-6), norm_rope.rms_norm(x, w, 1e-6), atol=1e-6)
    assert torch.allclose(ascend_ops.rms_norm(twin, x, None, 1e-6), norm_rope.rms_norm(x, None, 1e-6), atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_interleaved_rope_adapter(inverse):
    T, H, D = 7, 4, 16
    x = torch.randn(T, H, D, generator=G)
    freqs = norm_rope.rope_frequencies(D, 160000.0, None)
    cos, sin = norm_rope.rope_cos_sin(freqs, torch.arange(T) * 13)
    ref = norm_rope.apply_rope(x, cos[:, None], sin[:, None], inverse=inverse)
    got = ascend_ops.apply_rope(twin, x, cos[:, None], sin[:, None], inverse=inverse)
    assert torch.allclose(got, ref, atol=1e-6)
    # the 'half' (Llama rotate-half) pairing is a different rotation: the pitfall the adapter avoids
    x4 = x.reshape(1, T, H, D)
    r1 = cos.repeat_interleave(2, -1).reshape(1, T, 1, D)
    r2 = sin.repeat_interleave(2, -1).reshape(1, T, 1, D)
    half = twin.npu_rotary_mul(x4, r1, r2, rotary_mode="half").reshape(T, H, D)
    assert not torch.allclose(half, norm_rope.apply_rope(x, cos[:, None], sin[:, None]), atol=1e-3)


def test_rope_adapter_on_a_single_vector_per_token():
    x = torch.randn(9, 16, generator=G)                     # compressed entries: [T, rope_dim], no head dim
    cos, sin = norm_rope.rope_cos_sin(norm_rope.rope_frequencies(16, 10000.0, None), torch.arange(9) * 4)
    assert torch.allclose(ascend_ops.apply_rope(twin, x, cos, sin), norm_rope.apply_rope(x, cos, sin), atol=1e-6)


def test_clipped_swiglu_adapter_uses_v4_constants():
    g, u = torch.randn(6, 32, generator=G) * 8, torch.randn(6, 32, generator=G) * 8
    ref = moe.clamped_swiglu(g, u, 10.0)
    assert torch.allclose(ascend_ops.clamped_swiglu(twin, g, u, 10.0), ref, atol=1e-5)
    # the op's defaults (GPT-OSS: alpha 1.702, bias 1, limit 7, interleaved) give a different function
    wrong = twin.npu_clipped_swiglu(torch.cat((g, u), -1))
    assert not torch.allclose(wrong, ref, atol=1e-2)


def test_w8a8_linear_adapter_matches_the_emulated_numerics():
    from runtime.ops.numerics import int8_roundtrip
    from runtime.weight_transforms import dequantize_int8_per_channel, quantize_int8_per_channel

    w = torch.randn(48, 256, generator=G) / 16
    x = torch.randn(3, 5, 256, generator=G).bfloat16().float()            # a bf16 activation
    w_kn, scale = ascend_ops.prepare_w8a8(w)
    assert w_kn.shape == (256, 48) and w_kn.is_contiguous() and w_kn.dtype == torch.int8
    got = ascend_ops.linear_w8a8(twin, x, w_kn, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 48)
    # what the ascend-910b emulation computes for the same linear (weights and activations round-tripped)
    ref = int8_roundtrip(x) @ dequantize_int8_per_channel(*quantize_int8_per_channel(w)).T
    assert torch.allclose(got.float(), ref, rtol=2 ** -7, atol=1e-3)
    # passing the weight as [out, in] (not transposed to [K, N]) is caught by the twin
    with pytest.raises(AssertionError, match=r"\[.., M, K\] @ \[.., K, N\]"):
        ascend_ops.linear_w8a8(twin, x, w_kn.t().contiguous(), scale)


def test_twin_rejects_wrong_layouts():
    x = torch.randn(2, 3, 4, 8)
    with pytest.raises(AssertionError, match="4-D"):
        twin.npu_rotary_mul(x[0], x[0], x[0], rotary_mode="interleave")
    with pytest.raises(AssertionError, match="gamma must have the input's dtype"):
        twin.npu_rms_norm(x, torch.ones(8, dtype=torch.float16))


def test_adapters_are_registered_for_ascend_only():
    from runtime.dispatch import implementations

    adapters = {"linear": ("ascend.npu_quant_matmul+bf16_gemm", ()), "rms_norm": ("ascend.npu_rms_norm", ()),
                "apply_rope": ("ascend.npu_rotary_mul", ("fused_rope_interleave",)),
                "clamped_swiglu": ("ascend.npu_clipped_swiglu", ("fused_clipped_swiglu",)),
                "moe_gate": ("ascend.npu_moe_gating_top_k", ("fused_moe_gating",)),
                "indexer_topk": ("ascend.npu_lightning_indexer", ("fused_indexer",)),
                "sparse_attention": ("ascend.npu_sparse_flash_attention", ("fused_sparse_attention",))}
    for op, (impl_id, requires) in adapters.items():
        impl = implementations(op)[impl_id]
        assert impl.backend == "ascend" and impl.requires == frozenset(requires) and impl.prepare is not None
        # preference: the adapter first, plain torch on the NPU last
        ids = [i for i, m in implementations(op).items() if m.backend == "ascend"]
        assert ids[0] == impl_id and ids[-1] == "ascend.torch", ids
    assert implementations("moe_gate")["ascend.npu_moe_gating_top_k"].requires == {"fused_moe_gating"}
    assert implementations("indexer_topk")["ascend.npu_lightning_indexer"].requires == {"fused_indexer"}
    assert implementations("sparse_attention")["ascend.npu_sparse_flash_attention"].requires == \
        {"fused_sparse_attention"}
    # interleaved RoPE and clipped SwiGLU are A2/A3-only kernels: they need their own capabilities
    assert implementations("apply_rope")["ascend.npu_rotary_mul"].requires == {"fused_rope_interleave"}
    assert implementations("clamped_swiglu")["ascend.npu_clipped_swiglu"].requires == {"fused_clipped_swiglu"}
    # the W8A8 linear is the ascend linear; the experts run one by one through it (no grouped registration)
    assert "ascend.npu_quant_matmul+bf16_gemm" in implementations("linear")
    assert [i for i in implementations("routed_experts") if i.startswith("ascend.")] == ["ascend.torch"]


def _patched(**overrides):
    """The twin namespace with one op's keyword arguments overridden: a plausible wrong adapter choice."""
    ns = types.SimpleNamespace(**{n: getattr(twin, n) for n in dir(twin) if n.startswith(("npu_", "get_npu"))})
    for name, kw in overrides.items():
        op = getattr(twin, name)
        setattr(ns, name, lambda *a, _op=op, _kw=kw, **k: _op(*a, **{**k, **_kw}))
    return ns


# ---- MoE gate: npu_moe_gating_top_k ----
def _gate_inputs(T=9, d=32, E=64):
    return (torch.randn(T, d, generator=G), torch.randn(E, d, generator=G) / 4, torch.randn(E, generator=G) / 4)


def test_moe_gate_adapter_topk_matches_reference():
    x, gw, bias = _gate_inputs()
    ref_i, ref_w = moe.moe_gate(x, gw, bias, None, 6, 2.5)
    idx, w = ascend_ops.moe_gate(twin, x, gw, bias, None, 6, 2.5)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == w.shape == (9, 6)
    assert torch.equal(idx, ref_i) and torch.allclose(w, ref_w, atol=1e-5)
    # the bias steers selection only: it changes the experts here, and the weights stay unbiased scores
    assert not torch.equal(moe.moe_gate(x, gw, torch.zeros_like(bias), None, 6, 2.5)[0], ref_i)
    # norm_type 1 (sigmoid, the op's documented default family) is a different gate
    idx1, w1 = ascend_ops.moe_gate(_patched(npu_moe_gating_top_k={"norm_type": 1}), x, gw, bias, None, 6, 2.5)
    assert not torch.allclose(w1, ref_w, atol=1e-3)


def test_moe_gate_adapter_hash_matches_reference():
    x, gw, _ = _gate_inputs()
    table = torch.randint(0, 64, (100, 6), generator=G)                      # tid2eid of the checkpoint
    hashed = table[torch.randint(0, 100, (9,), generator=G)]                 # what the model passes: [T, k]
    ref_i, ref_w = moe.moe_gate(x, gw, None, hashed, 6, 1.5)
    idx, w = ascend_ops.moe_gate(twin, x, gw, None, hashed, 6, 1.5)
    assert torch.equal(idx, ref_i) and torch.allclose(w, ref_w, atol=1e-5)
    wrong = _patched(npu_moe_gating_top_k={"norm_type": 0})                  # softmax scores: different weights
    assert not torch.allclose(ascend_ops.moe_gate(wrong, x, gw, None, hashed, 6, 1.5)[1], ref_w, atol=1e-3)
    # the twin holds the documented hash contract: int32/int64 ids and table, both or neither
    logits = x @ gw.T
    with pytest.raises(AssertionError, match="tid2eid int32/int64"):
        twin.npu_moe_gating_top_k(logits, 6, input_ids=torch.arange(9), tid2eid=hashed.float(), norm_type=2)
    with pytest.raises(AssertionError, match="both input_ids and tid2eid"):
        twin.npu_moe_gating_top_k(logits, 6, tid2eid=hashed.int(), norm_type=2)
    with pytest.raises(AssertionError, match="renorm only 0"):
        twin.npu_moe_gating_top_k(logits, 6, bias=torch.zeros(64), renorm=1, norm_type=2)


# ---- lightning indexer: npu_lightning_indexer ----
def _bf16(*shape, scale=1.0):
    return (torch.randn(*shape, generator=G) * scale).bfloat16().float()


def test_indexer_adapter_matches_reference():
    T, N, k = 12, 300, 16                                   # 300 keys: three 128-row pages, the last partial
    q, w, keys = _bf16(T, 64, 128), _bf16(T, 64, scale=0.1), _bf16(N, 128)
    visible = torch.tensor([0, 3, 3, 40, 299, 300, 300, 7, 128, 129, 16, 17])   # repeats share a batch
    ref = attention.indexer_topk(q, w, keys, visible, k)
    got = ascend_ops.indexer_topk(twin, q, w, keys, visible, k)
    assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert (got[0] == -1).all() and (got[1, 3:] == -1).all() and (got[1, :3] >= 0).all()
    # right-down causal (sparse_mode 3, the op's default) is not our "first visible[t] keys" rule
    wrong = ascend_ops.indexer_topk(_patched(npu_lightning_indexer={"sparse_mode": 3}), q, w, keys, visible, k)
    assert not torch.equal(wrong, ref)


def test_indexer_twin_rejects_wrong_marshalling():
    q, w, keys = _bf16(4, 64, 128).bfloat16(), _bf16(4, 64).bfloat16(), _bf16(128, 128).bfloat16()
    kw = dict(block_table=torch.zeros(2, 1, dtype=torch.int32), layout_query="TND", layout_key="PA_BSND",
              sparse_count=8, sparse_mode=0, actual_seq_lengths_key=torch.tensor([5, 9], dtype=torch.int32))
    paged = keys.view(1, 128, 1, 128)
    twin.npu_lightning_indexer(q, paged, w, actual_seq_lengths_query=torch.tensor([3, 4], dtype=torch.int32), **kw)
    with pytest.raises(AssertionError, match="prefix sums"):      # per-batch counts instead of prefix sums
        twin.npu_lightning_indexer(q, paged, w, actual_seq_lengths_query=torch.tensor([3, 1], dtype=torch.int32), **kw)
    with pytest.raises(AssertionError, match="one dtype, bf16 or fp16"):      # float32 query
        twin.npu_lightning_indexer(q.float(), paged, w, actual_seq_lengths_query=torch.tensor([3, 4], dtype=torch.int32),
                                   **kw)


# ---- sparse attention: npu_sparse_flash_attention ----
def _sfa_inputs(T=6, H=4, N=40, K=12):
    q, kv = _bf16(T, H, 512, scale=0.5), _bf16(N, 512)
    idx = torch.randint(0, N, (T, K), generator=G)
    idx[torch.rand(T, K, generator=G) < 0.35] = -1                          # padding interleaved anywhere
    idx[0, 0], idx[1] = -1, -1                                              # a leading -1 and an empty row
    return q, kv, idx, torch.randn(H, generator=G)


def test_sparse_attention_adapter_matches_reference():
    q, kv, idx, sink = _sfa_inputs()
    assert ((idx[:, :-1] < 0) & (idx[:, 1:] >= 0)).any()                    # -1 before a valid entry somewhere
    ref = attention.sparse_attention(q, kv, idx, sink, 512 ** -0.5)
    got = ascend_ops.sparse_attention(twin, q, kv, idx, sink, 512 ** -0.5)
    assert got.dtype == q.dtype and got.shape == q.shape
    # inputs are bf16-exact; the kernel's bf16 output rounds |o| < 2 to 2^-8 relative: 1e-2 covers it
    assert torch.allclose(got, ref, atol=1e-2, rtol=2 ** -7) and (got[1] == 0).all()
    # sparse_mode 3 (the op's default) adds a right-down causal cut our index lists do not want
    wrong = ascend_ops.sparse_attention(_patched(npu_sparse_flash_attention={"sparse_mode": 3}), q, kv, idx, sink,
                                        512 ** -0.5)
    assert not torch.allclose(wrong, ref, atol=5e-2)


def test_sparse_attention_twin_requires_compacted_padding():
    q, kv, idx, sink = _sfa_inputs()
    T, H, _ = q.shape
    args = dict(actual_seq_lengths_query=torch.tensor([T], dtype=torch.int32),
                actual_seq_lengths_kv=torch.tensor([kv.shape[0]], dtype=torch.int32),
                query_rope=torch.zeros(T, H, 64, dtype=torch.bfloat16),
                key_rope=torch.zeros(kv.shape[0], 1, 64, dtype=torch.bfloat16),
                layout_query="TND", layout_kv="TND", sparse_mode=0, attention_mode=2, sinks=sink)
    k16 = kv.bfloat16().reshape(-1, 1, 512)
    with pytest.raises(AssertionError, match="valid entries first and padding"):     # idx passed as is
        twin.npu_sparse_flash_attention(q.bfloat16(), k16, k16, idx.int().reshape(T, 1, -1), 512 ** -0.5, **args)
    with pytest.raises(AssertionError, match="int32"):                                # int64 indices
        twin.npu_sparse_flash_attention(q.bfloat16(), k16, k16, idx.reshape(T, 1, -1), 512 ** -0.5, **args)


# ---- routed experts: npu_grouped_matmul ----
def _experts(E=5, d=24, inter=16):
    return [(torch.randn(inter, d, generator=G) / 4, torch.randn(d, inter, generator=G) / 4,
             torch.randn(inter, d, generator=G) / 4) for _ in range(E)]


def test_expert_ffn_adapter_matches_reference():
    experts = _experts()
    x = torch.randn(7, 24, generator=G) * 3
    idx = torch.tensor([[0, 3], [3, 4], [0, 3], [4, 0], [3, 0], [3, 4], [0, 3]])   # expert 1, 2 idle; counts 5,0,0,6,3
    w = torch.rand(7, 2, generator=G)
    # the reference under exact numerics: linear = x @ w.T, activation rounding = identity
    lins = [tuple(Linear(t, False) for t in e) for e in experts]
    ref = moe.routed_experts(x, idx, w, lins, 10.0, reference_ops("exact"))
    w13, w2 = ascend_ops.prepare_expert_weights(experts, torch.float32)
    assert torch.equal(ascend_ops.prepare_expert_weights(lins, torch.float32)[0], w13)
    assert w13.shape == (5, 24, 32) and w2.shape == (5, 16, 24) and w13.is_contiguous()
    assert torch.allclose(ascend_ops.expert_ffn(twin, x, idx, w, w13, w2, 10.0), ref, atol=1e-5)
    w13b, w2b = ascend_ops.prepare_expert_weights(experts)                          # bf16, the NPU dtype
    assert torch.allclose(ascend_ops.expert_ffn(twin, x, idx, w, w13b, w2b, 10.0), ref, atol=5e-2, rtol=2e-2)
    # counts read as a cumulative sum (group_list_type 0) are rejected: 5, 0, 0, 6, 3 is not non-decreasing
    with pytest.raises(AssertionError, match="sum to x's rows"):               # the docs: groups cover x exactly
        twin.npu_grouped_matmul([x[:13]], [w13], group_list=torch.tensor([5, 0, 0, 6, 3]), group_list_type=1,
                                split_item=2, group_type=0)
    with pytest.raises(AssertionError, match="non-decreasing cumsum"):
        ascend_ops.expert_ffn(_patched(npu_grouped_matmul={"group_list_type": 0}), x, idx, w, w13, w2, 10.0)
    # per-expert [out, in] weights stacked untransposed do not chain: [M, d] @ [E, inter, 2*d]
    untransposed = torch.stack([torch.cat((a, c)) for a, _, c in experts])          # [E, 2*inter, d]
    with pytest.raises(AssertionError, match=r"x \[M, K\] @ weight \[K, N\]"):
        ascend_ops.expert_ffn(twin, x, idx, w, untransposed, w2, 10.0)


# ---- W8A8 weight in FRACTAL_NZ ----
def test_w8a8_nz_weight():
    w = torch.randn(48, 256, generator=G) / 16
    x = torch.randn(5, 256, generator=G).bfloat16().float()
    w_nz, scale = ascend_ops.prepare_w8a8_nz(twin, w)
    w_nd, _ = ascend_ops.prepare_w8a8(w)
    assert twin.get_npu_format(w_nz) == 29 and twin.get_npu_format(w_nd) == 2 and w_nz.shape == (256, 48)
    assert torch.equal(ascend_ops.linear_w8a8(twin, x, w_nz, scale), ascend_ops.linear_w8a8(twin, x, w_nd, scale))
    with pytest.raises(AssertionError, match="x1 ND"):                              # the activation stays ND
        twin.npu_quant_matmul(twin.npu_format_cast(w_nd.t().contiguous(), 29), w_nz, scale)


# ---- fixes from the torch-npu docs ----
def test_w8a8_linear_splits_n_over_the_kernel_limit():
    """npu_quant_matmul takes N <= 65535; V4-Pro's attn.wq_b has N = 65536: the adapter splits the columns."""
    from runtime.ops.numerics import int8_roundtrip
    from runtime.weight_transforms import dequantize_int8_per_channel, quantize_int8_per_channel

    N, K = 65536, 32
    w = torch.randn(N, K, generator=G) / 8
    x = torch.randn(3, K, generator=G).bfloat16().float()
    w_kn, scale = ascend_ops.prepare_w8a8(w)
    with pytest.raises(AssertionError, match="at most 65535"):                       # the twin holds the limit
        twin.npu_quant_matmul(torch.zeros(3, K, dtype=torch.int8), w_kn, scale.float())
    got = ascend_ops.linear_w8a8(twin, x, w_kn, scale)                               # 2 x 32768 columns
    ref = int8_roundtrip(x) @ dequantize_int8_per_channel(*quantize_int8_per_channel(w)).T
    assert got.shape == (3, N) and torch.allclose(got.float(), ref, rtol=2 ** -7, atol=1e-3)
    # the unsplit product (the twin's formula over all N columns at once) gives the same bf16 numbers
    xq, xs = twin.npu_dynamic_quant(x.bfloat16())
    whole = ((xq.long() @ w_kn.long()).double() * scale.double() * xs.double()[:, None]).bfloat16()
    assert torch.equal(got, whole)
    # a smaller profile limit splits into more slices and still agrees
    assert torch.equal(ascend_ops.linear_w8a8(twin, x, w_kn, scale, max_n=10000), whole)


def test_indexer_adapter_forces_indices_past_visible_to_minus_one():
    """A kernel whose padding names a key the row cannot see (here: a twin that pads with the row's last key
    instead of -1) is corrected: every index at or past the row's visible count becomes -1."""
    T, N, k = 6, 200, 16
    q, w, keys = _bf16(T, 64, 128), _bf16(T, 64, scale=0.1), _bf16(N, 128)
    visible = torch.tensor([3, 5, 16, 40, 199, 200])
    ref = attention.indexer_topk(q, w, keys, visible, k)

    def padding_past_visible(*a, **kw):
        idx, val = twin.npu_lightning_indexer(*a, **kw)
        return torch.where(idx < 0, torch.full_like(idx, N - 1), idx), val

    ns = types.SimpleNamespace(npu_lightning_indexer=padding_past_visible)
    got = ascend_ops.indexer_topk(ns, q, w, keys, visible, k)
    assert torch.equal(got, ref) and (got[0, 3:] == -1).all()


def test_rope_adapter_passes_contiguous_inputs():
    T, H, D = 5, 3, 32
    wide = torch.randn(T, H, 96, generator=G)
    x = wide[..., -D:]                                          # the rope dims: a strided slice of the head
    assert not x.is_contiguous()
    cos, sin = norm_rope.rope_cos_sin(norm_rope.rope_frequencies(D, 10000.0, None), torch.arange(T))
    assert torch.allclose(ascend_ops.apply_rope(twin, x, cos[:, None], sin[:, None]),
                          norm_rope.apply_rope(x, cos[:, None], sin[:, None]), atol=1e-6)
    with pytest.raises(AssertionError, match="contiguous"):    # the twin refuses a strided view
        twin.npu_rotary_mul(wide[None, ..., -D:], torch.ones(1, T, 1, D), torch.ones(1, T, 1, D), "interleave")


def test_adapters_refuse_shapes_and_limits_the_kernels_do_not_take():
    from backends.ascend_ops import KernelLimitError

    q, kv, idx, sink = _sfa_inputs()
    with pytest.raises(KernelLimitError, match=r"head dim 512 .* this model has head dim 64.*prefer"):
        ascend_ops.sparse_attention(twin, q[..., :64].contiguous(), kv[:, :64], idx, sink, 0.125)
    with pytest.raises(KernelLimitError, match="indexer_max_sparse_count=512"):
        ascend_ops.indexer_topk(twin, _bf16(2, 64, 128), _bf16(2, 64), _bf16(30, 128), torch.tensor([3, 4]), 1024,
                                max_k=512)
    with pytest.raises(KernelLimitError, match="gating_max_experts=32"):
        ascend_ops.moe_gate(twin, *_gate_inputs()[:3], None, 6, 1.0, max_experts=32)
