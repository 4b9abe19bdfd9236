"""Test helper: an independent bf16 forward of a V4 checkpoint following the dtype flow of DeepSeek's
`inference/model.py` and `kernel.py` (written here from reading them, not copied): one sequence, prefill at
position 0, as the official code runs it, on torch bf16 tensors wherever the official code holds bf16.

It is the oracle of `numerics="official"` block by block (tests/test_official_numerics.py). Shared with the
runtime on purpose, because they are the official kernels' semantics and tested on their own: the mHC ops
(float32 in both; runtime.ops.mhc) and the FP8 / FP4 / Hadamard round trips (runtime.number_formats). Everything
else — linears, norms, RoPE, the compressors, the indexer, the `sparse_attn` kernel loop, the MoE — is
written out here. Float32 accumulations that the official GEMMs do in bf16 tensor cores are float32 matmuls.
The indexer's top-k takes ties lower index first (the runtime's documented rule; `torch.topk` leaves it open).
"""
import math

import torch
import torch.nn.functional as F

from runtime import number_formats
from runtime.ops import mhc

BF = torch.bfloat16


def mm(a, b):
    """a @ b.T, float32."""
    return a @ b.T


def lin_q(x, w):      # act_quant (fp8, block 128, ue8m0) + fp8/fp4 gemm -> bf16
    return mm(number_formats.fp8_roundtrip(x.float(), 128), w).to(BF)


def lin_bf16(x, w):   # bf16 F.linear: float32 accumulation, bf16 out
    return mm(x.float(), w.to(BF).float()).to(BF)


def rmsnorm(x, w, eps):
    dt = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return (w.float() * x).to(dt)


def freqs_cis(rd, S, orig, base, factor, bf, bs):
    def cdim(n):
        return rd * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(base))
    freqs = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    if orig > 0:
        low, high = max(math.floor(cdim(bf)), 0), min(math.ceil(cdim(bs)), rd - 1)
        if low == high:
            high += 0.001
        smooth = 1 - ((torch.arange(rd // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    ang = torch.outer(torch.arange(S, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(ang), ang)


def rope(x, f, inverse=False):     # x bf16 [S, ..., rd]; f [S, rd/2]; in fp32, stored back in x's dtype
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    f = f.conj() if inverse else f
    f = f.view(f.shape[0], *([1] * (z.dim() - 2)), f.shape[-1])
    return torch.view_as_real(z * f).flatten(-2).to(x.dtype)


def set_rope(x, f, rd, inverse=False):
    x = x.clone()
    x[..., -rd:] = rope(x[..., -rd:], f, inverse)
    return x


def hadamard_bf16(x):
    return number_formats.hadamard(x.float()).to(BF)


def fp4_inplace(x):
    return number_formats.fp4_roundtrip(x.float(), 32).to(BF)


def fp8_inplace(x, rd):
    x = x.clone()
    x[..., :-rd] = number_formats.fp8_roundtrip(x[..., :-rd].float(), 64).to(BF)
    return x


def topk_lower_first(score, k):
    return torch.sort(score.float(), dim=-1, descending=True, stable=True).indices[..., :k]


class DeepSeekBf16:
    """forward(ids [S]) -> (X after each block [S, hc, d] float32, logits [S, vocab] float32)."""

    def __init__(self, ck):
        self.t, self.cfg, self.eps = ck.tensors, ck.config, ck.config.norm_eps

    def w(self, n):
        return self.t[n]

    def compressor(self, p, x, ratio, d, rd, f, rotate):
        S = x.shape[0]
        overlap = ratio == 4
        x32 = x.float()
        kv, score = mm(x32, self.w(p + "wkv.weight")), mm(x32, self.w(p + "wgate.weight"))
        cutoff = S - S % ratio
        if cutoff == 0:
            return None
        kv = kv[:cutoff].unflatten(0, (-1, ratio))
        score = score[:cutoff].unflatten(0, (-1, ratio)) + self.w(p + "ape")
        if overlap:
            def ot(t, value):
                n = t.new_full((t.shape[0], 2 * ratio, d), value)
                n[:, ratio:] = t[:, :, d:]
                n[1:, :ratio] = t[:-1, :, :d]
                return n
            kv, score = ot(kv, 0.0), ot(score, float("-inf"))
        kv = (kv * score.softmax(dim=1)).sum(dim=1)
        kv = rmsnorm(kv.to(BF), self.w(p + "norm.weight"), self.eps)
        kv = set_rope(kv, f[:cutoff:ratio], rd)
        if rotate:
            return fp4_inplace(hadamard_bf16(kv))
        return fp8_inplace(kv, rd)

    def indexer(self, p, x, qr, f, offset):
        c = self.cfg
        S, nh, hd, rd = x.shape[0], c.index_n_heads, c.index_head_dim, c.rope_dim
        q = lin_q(qr, self.w(p + "wq_b.weight")).unflatten(-1, (nh, hd))
        q = fp4_inplace(hadamard_bf16(set_rope(q, f, rd)))
        keys = self.compressor(p + "compressor.", x, 4, hd, rd, f, True)
        weights = (lin_bf16(x, self.w(p + "weights_proj.weight")) * (hd ** -0.5 * nh ** -0.5)).to(BF)
        score = torch.einsum("shd,td->sht", q.float(), keys.float()).to(BF)       # bf16 einsum
        score = (score.relu() * weights.unsqueeze(-1)).float().sum(1).to(BF)   # bf16 products, bf16 sum
        n = S // 4
        mask = torch.arange(n).repeat(S, 1) >= torch.arange(1, S + 1).unsqueeze(1) // 4
        score = score.float().masked_fill(mask, float("-inf"))
        idx = topk_lower_first(score, min(c.index_topk, n))
        bad = idx >= torch.arange(1, S + 1).unsqueeze(1) // 4
        return torch.where(bad, -1, idx + offset)

    def sparse_attn(self, q, kv, sink, idx, scale, block=64):
        S, H, D = q.shape
        K = idx.shape[1]
        acc_o = torch.zeros(S, H, D)
        sum_exp = torch.zeros(S, H)
        m = torch.full((S, H), float("-inf"))
        kvf = kv.float()
        for b in range(0, K, block):
            ids = idx[:, b:b + block]
            valid = ids >= 0
            rows = torch.where(valid[..., None], kvf[ids.clamp(min=0)], 0.0)          # [S, blk, D]
            s = torch.einsum("shd,skd->shk", q.float(), rows) * scale
            s = s.masked_fill(~valid[:, None, :], float("-inf"))
            m_prev, m = m, torch.maximum(m, s.amax(-1))
            sc = torch.exp(m_prev - m)
            e = torch.exp(s - m[..., None])
            sum_exp = sum_exp * sc + e.sum(-1)
            acc_o = acc_o * sc[..., None] + torch.einsum("shk,skd->shd", e.to(BF).float(), rows)
        sum_exp = sum_exp + torch.exp(sink[None] - m)
        return (acc_o / sum_exp[..., None]).to(BF)

    def attention(self, L, x):
        c = self.cfg
        p = f"layers.{L}.attn."
        S, H, D, rd, W = x.shape[0], c.num_heads, c.head_dim, c.rope_dim, c.window
        ratio = c.ratio(L)
        if ratio:
            f = freqs_cis(rd, S, c.yarn.original_max_position, c.compress_rope_theta, c.yarn.factor,
                          c.yarn.beta_fast, c.yarn.beta_slow)
        else:
            f = freqs_cis(rd, S, 0, c.rope_theta, 1, 32, 1)
        qr = rmsnorm(lin_q(x, self.w(p + "wq_a.weight")), self.w(p + "q_norm.weight"), self.eps)
        q = lin_q(qr, self.w(p + "wq_b.weight")).unflatten(-1, (H, D))
        v = q.square().mean(-1, keepdim=True) + self.eps                 # bf16 squares, mean, sum
        q = q * torch.rsqrt(v.float()).to(BF)                             # rsqrt in fp32 -> bf16 (as on CUDA)
        q = set_rope(q, f, rd)
        kv = rmsnorm(lin_q(x, self.w(p + "wkv.weight")), self.w(p + "kv_norm.weight"), self.eps)
        kv = fp8_inplace(set_rope(kv, f, rd), rd)
        base = torch.arange(S).unsqueeze(1)
        widx = (base - W + 1).clamp(0) + torch.arange(min(S, W))
        widx = torch.where(widx > base, -1, widx)
        idx = widx
        if ratio:
            if c.is_csa(L):
                cidx = self.indexer(p + "indexer.", x, qr, f, S)
            else:
                n = S // ratio
                mat = torch.arange(n).repeat(S, 1)
                cidx = torch.where(mat >= torch.arange(1, S + 1).unsqueeze(1) // ratio, -1, mat + S)
            idx = torch.cat((widx, cidx), dim=1)
            comp = self.compressor(p + "compressor.", x, ratio, D, rd, f, False)
            if comp is not None:
                kv = torch.cat((kv, comp))
        o = self.sparse_attn(q, kv, self.w(p + "attn_sink"), idx, D ** -0.5)
        o = set_rope(o, f, rd, inverse=True)
        G = c.o_groups
        o = o.view(S, G, -1)
        wo_a = self.w(p + "wo_a.weight").to(BF).view(G, -1, o.shape[-1])
        o = torch.einsum("sgd,grd->sgr", o.float(), wo_a.float()).to(BF)
        return lin_q(o.flatten(1), self.w(p + "wo_b.weight"))

    def moe(self, L, x, ids):
        c = self.cfg
        p = f"layers.{L}.ffn."
        scores = mm(x.float(), self.w(p + "gate.weight").float())
        scores = F.softplus(scores).sqrt()
        orig = scores
        if (p + "gate.tid2eid") in self.t:
            indices = self.t[p + "gate.tid2eid"][ids]
        else:
            indices = (scores + self.w(p + "gate.bias")).topk(c.experts_per_token, dim=-1)[1]
        weights = orig.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * c.route_scale
        y = torch.zeros(x.shape[0], x.shape[1])
        lim = c.swiglu_limit

        def expert(pre, xx, wt):
            g = lin_q(xx, self.w(pre + "w1.weight")).float()
            u = lin_q(xx, self.w(pre + "w3.weight")).float()
            if lim > 0:
                u, g = u.clamp(-lim, lim), g.clamp(max=lim)
            h = F.silu(g) * u
            if wt is not None:
                h = wt * h
            return lin_q(h.to(BF), self.w(pre + "w2.weight"))

        for e in range(c.n_routed_experts):
            tok, top = torch.where(indices == e)
            if tok.numel():
                y[tok] += expert(f"{p}experts.{e}.", x[tok], weights[tok, top, None]).float()
        y += expert(p + "shared_experts.", x, None).float()
        return y.to(BF)

    def block(self, L, X, ids):
        c = self.cfg
        p = f"layers.{L}."
        x, post, comb = mhc.hc_pre(X.float(), self.w(p + "hc_attn_fn"), self.w(p + "hc_attn_base"),
                                   self.w(p + "hc_attn_scale"), c.hc_eps, c.norm_eps, c.hc_sinkhorn_iters)
        x = rmsnorm(x.to(BF), self.w(p + "attn_norm.weight"), self.eps)
        y = self.attention(L, x)
        X = mhc.hc_post(y.float(), X.float(), post, comb).to(BF)
        x, post, comb = mhc.hc_pre(X.float(), self.w(p + "hc_ffn_fn"), self.w(p + "hc_ffn_base"),
                                   self.w(p + "hc_ffn_scale"), c.hc_eps, c.norm_eps, c.hc_sinkhorn_iters)
        x = rmsnorm(x.to(BF), self.w(p + "ffn_norm.weight"), self.eps)
        y = self.moe(L, x, ids)
        return mhc.hc_post(y.float(), X.float(), post, comb).to(BF)

    def forward(self, ids):
        c = self.cfg
        X = self.w("embed.weight").to(BF)[ids].unsqueeze(1).repeat(1, c.hc_mult, 1)
        outs = []
        for L in range(c.num_layers):
            X = self.block(L, X, ids)
            outs.append(X.float())
        y = mhc.hc_head(X.float(), self.w("hc_head_fn"), self.w("hc_head_base"), self.w("hc_head_scale"),
                        c.hc_eps, c.norm_eps).to(BF)
        y = rmsnorm(y, self.w("norm.weight"), self.eps)
        logits = mm(y.float(), self.w("head.weight").float())
        return outs, logits
