"""The CPU backend's fast ops (backends/cpu_ops.py) against their float32 references, and the whole model on
the `cpu` profile (fast ops) against the model on the reference table.

Every fast op also runs in the cross-backend op check (tests/test_op_check.py) on the shared shape cases; what
stays here is what those cases do not reach: the union-vs-gather paths of sparse attention at 300 queries
(two query blocks) against a float64 evaluation, the indexer's score-block bound and tie handling, the
unrolled Sinkhorn, the decode-step paths on strided inputs, and the model end to end."""

import pytest
import torch

from backends import cpu_ops
from runtime.model.state import ModelState
from runtime.model.v4 import Transformer
from runtime.ops import attention, mhc, reference_ops

G = torch.Generator().manual_seed(7)


def randn(*s):
    return torch.randn(*s, generator=G)


def _attention_case(kind, T, N, K, H=4, D=16):
    q, kv, sink = randn(T, H, D), randn(N, D), randn(H)
    if kind == "window":                               # neighbours share rows: the union path
        idx = torch.arange(T)[:, None] + torch.arange(K)[None, :]
    elif kind == "all":                                # HCA: every query sees the same entries
        idx = torch.arange(K).expand(T, K).clone()
    else:                                              # scattered picks: the gather path
        idx = torch.stack([torch.randperm(N, generator=G)[:K] for _ in range(T)])
    idx[0, : K // 2] = -1                              # padding
    if T > 2:
        idx[2] = -1                                    # a query that sees nothing (reference: zeros)
    return q, kv, idx, sink


@pytest.mark.parametrize("kind,T,N,K", [("window", 300, 400, 32), ("all", 300, 120, 100),
                                        ("scattered", 300, 5000, 24), ("scattered", 1, 50, 24),
                                        ("all", 1, 80, 80)])
def test_sparse_attention_fast_matches_reference(kind, T, N, K):
    q, kv, idx, sink = _attention_case(kind, T, N, K)
    want64 = attention.sparse_attention(q.double(), kv.double(), idx, sink.double(), 0.25)
    got, ref = cpu_ops.sparse_attention(q, kv, idx, sink, 0.25), attention.sparse_attention(q, kv, idx, sink, 0.25)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= 2e-6
    # no less accurate than the reference against a float64 evaluation of the same formula
    assert (got.double() - want64).abs().max() <= 2 * (ref.double() - want64).abs().max() + 1e-7


def test_indexer_topk_fast_bounds_its_score_blocks(monkeypatch):
    """Long contexts split the queries into blocks of at most SCORE_BLOCK_FLOATS scores (here 4 queries of
    4 heads x 300 keys): the selection is still the reference's, and no [t, h, n] score exceeds the bound."""
    q, w, keys = randn(37, 4, 8), randn(37, 4), randn(300, 8)
    visible = torch.randint(1, 301, (37,), generator=G)
    visible[5] = 300
    monkeypatch.setattr(cpu_ops, "SCORE_BLOCK_FLOATS", 4 * 4 * 300)
    seen = []
    real = torch.einsum

    def spy(eq, *ops):
        out = real(eq, *ops)
        seen.append(out.numel() if eq == "thd,nd->thn" else 0)
        return out
    monkeypatch.setattr(torch, "einsum", spy)
    got = cpu_ops.indexer_topk(q, w, keys, visible, 16)
    monkeypatch.undo()
    assert torch.equal(got, attention.indexer_topk(q, w, keys, visible, 16))
    assert len([n for n in seen if n]) == 10 and max(seen) <= 4 * 4 * 300      # ceil(37 / 4) blocks


def test_indexer_topk_fast_keeps_lower_index_first_on_ties():
    # integer-valued keys make many exactly equal scores; the result must still be the stable sort's
    q = torch.randint(-2, 3, (20, 2, 4), generator=G).float()
    keys = torch.randint(-1, 2, (60, 4), generator=G).float()
    w, visible = torch.ones(20, 2), torch.full((20,), 60)
    want = attention.indexer_topk(q, w, keys, visible, 8)
    assert torch.equal(cpu_ops.indexer_topk(q, w, keys, visible, 8), want)


@pytest.mark.parametrize("T", [1, 3, 20])
def test_hc_pre_fast_matches_reference(T):
    X, fn, base, scale = randn(T, 4, 32), randn(24, 128) * 0.1, randn(24), randn(3).abs()
    for got, want in zip(cpu_ops.hc_pre(X, fn, base, scale, 1e-6, 1e-6, 20),
                         mhc.hc_pre(X, fn, base, scale, 1e-6, 1e-6, 20)):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_model_on_fast_ops_matches_reference_table(tiny_rt, rng):
    """The `cpu` profile resolves the fast ops; prefill + decode logits stay within 1e-4 of the reference."""
    assert {r.impl for r in tiny_rt.dispatch.rows} >= {"cpu.union_flash", "cpu.topk_exact_ties",
                                                       "cpu.native_chunk", "cpu.stored_grouped"}
    m = tiny_rt.model
    tensors, quantized = tiny_rt.weights.tensors, tiny_rt.weights.quantized
    ref = Transformer(m.cfg, tensors, quantized, reference_ops("exact"))
    ids = torch.randint(2, 300, (2, 330), generator=rng)
    fast_state, ref_state = ModelState(m.cfg, 2), ModelState(m.cfg, 2)
    got, want = m.forward(ids, fast_state.seqs), ref.forward(ids, ref_state.seqs)
    assert (got - want).abs().max() <= 1e-4
    for step in range(6):
        nxt = want[:, -1].argmax(-1, keepdim=True)
        got, want = m.forward(nxt, fast_state.seqs), ref.forward(nxt, ref_state.seqs)
        assert (got - want).abs().max() <= 1e-4


def test_small_fast_ops_match_reference():
    from runtime.ops import norm_rope
    x, res, post, comb = randn(5, 32), randn(5, 4, 32), randn(5, 4), randn(5, 4, 4)
    assert torch.allclose(cpu_ops.hc_post(x, res, post, comb), mhc.hc_post(x, res, post, comb), atol=1e-6)
    y, w = randn(3, 7, 48) * 3, randn(48)
    for wt in (w, None):
        assert torch.allclose(cpu_ops.rms_norm(y, wt, 1e-6), norm_rope.rms_norm(y, wt, 1e-6), atol=1e-6, rtol=1e-5)
    r = randn(6, 3, 16)
    cos, sin = norm_rope.rope_cos_sin(norm_rope.rope_frequencies(16, 10000.0, None), torch.arange(6) * 37)
    cos, sin = cos[:, None], sin[:, None]
    for inv in (False, True):
        assert torch.allclose(cpu_ops.apply_rope(r, cos, sin, inv), norm_rope.apply_rope(r, cos, sin, inv), atol=1e-6)


def test_unrolled_sinkhorn_equals_the_generic_loop():
    m = (torch.softmax(randn(4, 4), -1) + 1e-6).tolist()
    generic = [row[:] for row in m]
    want = torch.tensor(m)
    want = want / (want.sum(-2, keepdim=True) + 1e-6)
    for _ in range(19):
        want = want / (want.sum(-1, keepdim=True) + 1e-6)
        want = want / (want.sum(-2, keepdim=True) + 1e-6)
    assert torch.allclose(torch.tensor(cpu_ops._sinkhorn4(generic, 1e-6, 20)), want, atol=1e-6)


def test_decode_step_paths_match_reference():
    """The one-token paths a decode step takes: F.linear for float32 weights (the reference's dequantisation
    for other storages), the masked one-query attention (also with every index padding: zeros, like the
    reference), and RoPE on a strided slice with its rotation cache hit twice and in both directions."""
    from runtime.ops import norm_rope
    from runtime.ops.linear import linear as ref_linear       # (runtime.ops.linear the module is shadowed)
    from backends import cpu_stored
    x, w = randn(3, 48), randn(20, 48)
    assert torch.allclose(cpu_stored.linear_native(x, w), ref_linear(x, w), atol=1e-5)
    wb = w.to(torch.bfloat16)               # bf16 storage: the native GEMV (summation order only differs)
    assert torch.allclose(cpu_stored.linear_native(x, wb), ref_linear(x, wb), atol=1e-5)
    q, kv, sink = randn(1, 4, 16), randn(30, 16), randn(4)
    for idx in (torch.tensor([[3, -1, 7, 29, -1, 0]]), torch.full((1, 5), -1)):
        got, want = cpu_ops.sparse_attention(q, kv, idx, sink, 0.25), attention.sparse_attention(q, kv, idx, sink, 0.25)
        assert torch.allclose(got, want, atol=1e-6)
    heads = randn(6, 3, 40)[..., -16:]                                # strided, like Rope's slice of a head
    cos, sin = norm_rope.rope_cos_sin(norm_rope.rope_frequencies(16, 10000.0, None), torch.arange(6) * 11)
    cos, sin = cos[:, None], sin[:, None]
    for inv in (False, True, False, True):
        assert torch.allclose(cpu_ops.apply_rope(heads, cos, sin, inv), norm_rope.apply_rope(heads, cos, sin, inv),
                              atol=1e-6)
