"""Each reference op against a naive, loop-by-loop transcription of the spec's formula."""

import math

import torch

from runtime.config import ModelConfig, Yarn
from runtime.model.v4 import Compressor, Params, Rope
from runtime.model.state import Pending, Rows
from runtime.ops import attention, mhc, moe, norm_rope, reference_ops

G = torch.Generator().manual_seed(0)


def randn(*s):
    return torch.randn(*s, generator=G)


def test_sparse_attention_matches_per_query_loop():
    T, H, D, N, K = 5, 3, 8, 20, 6
    q, kv, sink = randn(T, H, D), randn(N, D), randn(H)
    idx = torch.randint(0, N, (T, K), generator=G)
    idx[1, 3:] = -1
    idx[4, :5] = -1
    got = attention.sparse_attention(q, kv, idx, sink, 0.3)
    for t in range(T):
        rows = [int(j) for j in idx[t] if j >= 0]
        for h in range(H):
            s = [float(q[t, h] @ kv[j]) * 0.3 for j in rows]
            m = max(s)
            den = sum(math.exp(x - m) for x in s) + math.exp(float(sink[h]) - m)
            o = sum(math.exp(x - m) / den * kv[j] for x, j in zip(s, rows))
            assert torch.allclose(got[t, h], o, atol=1e-6)


def test_indexer_topk_ties_lower_index_first_and_causal():
    T, h, d, N = 4, 2, 4, 10
    keys = torch.zeros(N, d)
    keys[3] = keys[7] = torch.tensor([1.0, 0, 0, 0])       # equal best scores at 3 and 7
    keys[5] = torch.tensor([0.5, 0, 0, 0])
    q = torch.zeros(T, h, d)
    q[:, :, 0] = 1
    w = torch.ones(T, h)
    visible = torch.tensor([10, 6, 2, 0])
    got = attention.indexer_topk(q, w, keys, visible, 4)
    assert got[0].tolist() == [3, 7, 5, 0]                  # then zero-score ties in index order
    assert got[1].tolist() == [3, 5, 0, 1]                  # 7 is not visible yet
    assert got[2].tolist() == [0, 1, -1, -1]
    assert got[3].tolist() == [-1, -1, -1, -1]


def test_indexer_score_formula():
    T, h, d, N = 3, 4, 8, 9
    q, w, keys = randn(T, h, d), randn(T, h), randn(N, d)
    got = attention.indexer_topk(q, w, keys, torch.full((T,), N), N)
    for t in range(T):
        score = [sum(float(w[t, i]) * max(float(q[t, i] @ keys[s]), 0.0) for i in range(h)) for s in range(N)]
        assert got[t].tolist() == sorted(range(N), key=lambda s: (-score[s], s))


def test_interleaved_rope_is_complex_rotation():
    x, pos = randn(6, 16), torch.arange(6) * 37
    freqs = norm_rope.rope_frequencies(16, 10000.0, None)
    cos, sin = norm_rope.rope_cos_sin(freqs, pos)
    got = norm_rope.apply_rope(x, cos, sin)
    z = torch.view_as_complex(x.view(6, 8, 2).contiguous()) * torch.polar(torch.ones(6, 8), torch.outer(pos.float(), freqs))
    assert torch.allclose(got, torch.view_as_real(z).flatten(-2), atol=1e-5)
    assert torch.allclose(norm_rope.apply_rope(got, cos, sin, inverse=True), x, atol=1e-5)


def test_yarn_ramp_for_v4_constants():
    y = Yarn(16, 65536, 32, 1)
    plain = norm_rope.rope_frequencies(64, 160000.0, None)
    got = norm_rope.rope_frequencies(64, 160000.0, y)
    # spec §7.2: low = 15, high = 25 for base 160000, L0 = 65536: pairs < 15 unchanged, >= 25 divided by 16
    assert torch.allclose(got[:16], plain[:16]) and torch.allclose(got[25:], plain[25:] / 16)
    assert torch.all(got[16:25] < plain[16:25]) and torch.all(got[16:25] > plain[16:25] / 16)


def test_hc_pre_post_match_loops():
    T, hc, d, iters, eps = 2, 4, 6, 20, 1e-6
    X, fn, base, scale = randn(T, hc, d), randn(24, hc * d) * 0.2, randn(24), torch.tensor([0.7, 1.1, 0.9])
    x, post, comb = mhc.hc_pre(X, fn, base, scale, eps, 1e-6, iters)
    for t in range(T):
        xf = X[t].flatten()
        mix = (fn @ xf) / math.sqrt(float((xf ** 2).mean()) + 1e-6)
        pre = [1 / (1 + math.exp(-(float(mix[i]) * 0.7 + float(base[i])))) + eps for i in range(4)]
        pst = [2 / (1 + math.exp(-(float(mix[4 + i]) * 1.1 + float(base[4 + i])))) for i in range(4)]
        C = [[float(mix[8 + 4 * j + k]) * 0.9 + float(base[8 + 4 * j + k]) for k in range(4)] for j in range(4)]
        C = [[math.exp(v - max(r)) / sum(math.exp(u - max(r)) for u in r) + eps for v in r] for r in C]
        col = lambda M: [[M[j][k] / (sum(M[i][k] for i in range(4)) + eps) for k in range(4)] for j in range(4)]  # noqa
        row = lambda M: [[M[j][k] / (sum(M[j]) + eps) for k in range(4)] for j in range(4)]  # noqa
        C = col(C)
        for _ in range(iters - 1):
            C = col(row(C))
        assert torch.allclose(comb[t], torch.tensor(C), atol=1e-6)
        assert torch.allclose(post[t], torch.tensor(pst), atol=1e-6)
        assert torch.allclose(x[t], sum(pre[i] * X[t, i] for i in range(4)), atol=1e-5)
    y = randn(T, d)
    new = mhc.hc_post(y, X, post, comb)
    for t in range(T):
        for j in range(4):
            ref = post[t, j] * y[t] + sum(comb[t, i, j] * X[t, i] for i in range(4))   # comb transposed
            assert torch.allclose(new[t, j], ref, atol=1e-5)


def test_moe_gate_hash_and_learned():
    x, gw, bias = randn(3, 8), randn(5, 8), randn(5)
    s = torch.sqrt(torch.nn.functional.softplus(x @ gw.T))
    idx, w = moe.moe_gate(x, gw, bias, None, 2, 1.5)
    for t in range(3):
        order = sorted(range(5), key=lambda e: (-(float(s[t, e] + bias[e])), e))[:2]
        assert idx[t].tolist() == order
        assert torch.allclose(w[t], s[t, order] / s[t, order].sum() * 1.5)
    hashed = torch.tensor([[4, 0], [1, 2], [3, 3]])
    idx, w = moe.moe_gate(x, gw, None, hashed, 2, 2.5)
    assert torch.equal(idx, hashed)
    assert torch.allclose(w[0], s[0, [4, 0]] / s[0, [4, 0]].sum() * 2.5)


def test_clamped_swiglu():
    g, u = torch.tensor([20.0, -3.0, 5.0]), torch.tensor([-30.0, 2.0, 11.0])
    got = moe.clamped_swiglu(g, u, 10.0)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    assert torch.allclose(got, torch.tensor([silu(10) * -10, silu(-3) * 2, silu(5) * 10]))


def _naive_entries(x, wkv, wgate, ape, norm, m, overlap, rope, eps):
    """Spec §8 formula, one window and one channel-vector at a time."""
    c = norm.shape[0]
    C, Z = x @ wkv.T, x @ wgate.T
    out = []
    for w in range(x.shape[0] // m):
        slots_kv, slots_sc = [], []
        if overlap and w > 0:
            for j in range((w - 1) * m, w * m):
                slots_kv.append(C[j, :c]); slots_sc.append(Z[j, :c] + ape[j % m, :c])
        for j in range(w * m, (w + 1) * m):
            lo = c if overlap else 0
            slots_kv.append(C[j, lo:lo + c]); slots_sc.append(Z[j, lo:lo + c] + ape[j % m, lo:lo + c])
        p = torch.softmax(torch.stack(slots_sc), dim=0)
        e = (p * torch.stack(slots_kv)).sum(0)
        e = e / torch.sqrt((e ** 2).mean() + eps) * norm
        out.append(rope(e[None], torch.tensor([w * m]))[0])
    return torch.stack(out)


def test_compressor_matches_naive_pooling_in_any_chunking():
    cfg = ModelConfig.preset("tiny")
    ops = reference_ops()
    d, c = 16, 64
    for m, overlap in ((4, True), (16, False)):
        coff = 2 if overlap else 1
        t = {"wkv.weight": randn(coff * c, d), "wgate.weight": randn(coff * c, d), "ape": randn(m, coff * c),
             "norm.weight": 1 + 0.1 * randn(c)}
        rope = Rope(cfg, 1, ops)
        comp = Compressor(Params(t), cfg, m, overlap, rope, ops, lambda e: e)
        x = randn(70, d)
        ref = _naive_entries(x, t["wkv.weight"], t["wgate.weight"], t["ape"], t["norm.weight"], m, overlap, rope,
                             cfg.norm_eps)
        for chunks in ((70,), (1,) * 70, (3, 9, 1, 30, 27)):
            buf, rows, p0 = Pending(coff * c), Rows(c), 0
            for n in chunks:
                kv, sc = comp.inputs(x[p0:p0 + n], torch.arange(p0, p0 + n))
                comp.advance(buf, rows, kv, sc, p0)
                p0 += n
            assert rows.n == 70 // m
            assert torch.allclose(rows.view(), ref, atol=1e-5), (m, chunks)
