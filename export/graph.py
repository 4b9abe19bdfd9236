"""The V4 graph's pieces in the form ONNX needs, shared by the step graph (chunk.py) and the edge variant's
prefill / decode graphs (steps.py): the whole state is explicit tensors (the positions too), with visibility by
mask instead of Python control flow.

It computes what runtime.model computes (the same op functions: rms_norm, RoPE, hc_head, compress_pool, clamped
SwiGLU; graph-friendly equivalents of moe_gate, hc_pre and hc_post; the sparse kernels as the custom ops of
custom_ops.py), with the state
laid out for a graph (per layer, B sequences):
- `win` [B, W, D]: ring of raw KV rows, token p in slot p % W;
- `comp` [B, N, D] and (CSA) `ikeys` [B, N, di]: compressed entries, entry w in row w; N is what the runner
  feeds (the step graph: the live rows; the edge decode graph: a fixed capacity); rows past what the position
  allows are never visible;
- `ckv` / `csc` [B, R, coff*c] and (CSA) `ikv` / `isc` [B, 8, 2*di]: the compressor's per-token projections and
  gate scores (ape added) of the last R positions, token p in slot p % R (R = 2 x ratio for CSA's overlapping
  windows, ratio for HCA). Entry w closes when the token at position w*m + m-1 arrives; the decode step always
  computes the candidate entry and keeps it only then.
The tests compare ONNX Runtime running these graphs with the CPU reference model (tests/test_onnx_export.py).
"""

from __future__ import annotations

import torch

from runtime.ops import compress, mhc, moe, norm_rope

from . import custom_ops  # noqa: F401  (registers torch.ops.dsv4.*)

NEG_INF = float("-inf")


def _rope(freqs: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, dim: int, inverse: bool = False):
    """Rotate the trailing `dim` dims of x [B, S, (heads,) D] at integer positions pos [1|B, S]."""
    ang = pos.to(torch.float32)[..., None] * freqs                                   # [..., dim/2], float32
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rot = norm_rope.apply_rope(x[..., -dim:], cos, sin, inverse=inverse)
    return torch.cat((x[..., :-dim], rot), dim=-1)


def _ring_rows(rows: torch.Tensor, S, R: int, fill: float):
    """rows [B, S, X] of positions 0..S-1 -> ring [B, R, X] of the last R positions (slot p % R), `fill` where
    no position maps to a slot yet."""
    j = torch.arange(R, device=rows.device)
    p = (S - 1) - torch.remainder((S - 1) - j, R)                                      # newest position in slot j
    ring = rows[:, p.clamp(min=0)]
    return torch.where((p >= 0)[None, :, None], ring, torch.full_like(ring, fill))


def _gate(x, gate_w, bias, hashed, k: int, route_scale: float):
    """runtime.ops.moe.moe_gate with the learned top-k as TopK (ONNX has no stable sort; its TopK breaks ties
    to the lower index, which is what the reference's stable sort does)."""
    s = torch.sqrt(torch.nn.functional.softplus(x @ gate_w.T))
    idx = hashed if hashed is not None else torch.topk(s + bias, k, dim=-1).indices
    w = s.gather(-1, idx)
    return idx, w / w.sum(-1, keepdim=True) * route_scale


def _hc_pre(X, fn, base, scale, hc_eps: float, norm_eps: float, iters: int):
    """runtime.ops.mhc.hc_pre computed with the tokens innermost: the mixes as [rows(fn), T] and comb returned as
    [hc, hc, T]. ONNX Runtime reduces and broadcasts over a trailing axis of hc = 4 about 8x slower than over T,
    and its transpose optimizer would move a Transpose of comb back in front of the Sinkhorn rounds, so the
    layout comes from the MatMul itself."""
    hc = X.shape[-2]
    xf = X.flatten(-2)                                                                # [T, hc*d]
    r = torch.rsqrt((xf * xf).mean(-1) + norm_eps)                                    # [T]
    mix = torch.matmul(fn, xf.transpose(0, 1)) * r                                    # [(2+hc)*hc, T]
    pre = torch.sigmoid(mix[:hc] * scale[0] + base[:hc, None]) + hc_eps              # [hc, T]
    post = 2 * torch.sigmoid(mix[hc:2 * hc] * scale[1] + base[hc:2 * hc, None])
    c = (mix[2 * hc:] * scale[2] + base[2 * hc:, None]).view(hc, hc, -1)             # [i, j, T]
    c = torch.softmax(c, dim=1) + hc_eps
    c = c / (c.sum(0, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        c = c / (c.sum(1, keepdim=True) + hc_eps)
        c = c / (c.sum(0, keepdim=True) + hc_eps)
    x = torch.matmul(pre.transpose(0, 1)[:, None, :], X).squeeze(1)                 # MatMul, not Einsum
    return x, post.transpose(0, 1), c


def _hc_post(x, res, post, c):
    """runtime.ops.mhc.hc_post with comb as [hc, hc, T]: X_new[j] = post[j] x + sum_i comb[i, j] res[i]."""
    return post[..., None] * x[:, None, :] + torch.matmul(c.permute(2, 1, 0), res)


class Weights(torch.nn.Module):
    """Float32 checkpoint tensors as buffers (they become the graph's initializers)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name.replace(".", "__"), t.contiguous())

    def __call__(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))


class V4Graph(torch.nn.Module):
    # Routed experts over their own tokens only. The static edge graphs stay dense: ScatterND's add reduction
    # needs opset 16, and a static graph gains nothing from data-dependent sizes.
    sparse_moe = False

    def __init__(self, cfg, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg, self.w = cfg, Weights(tensors)
        for layer in range(cfg.num_layers):
            ratio = cfg.ratio(layer)
            base, yarn = (cfg.compress_rope_theta, cfg.yarn) if ratio else (cfg.rope_theta, None)
            self.register_buffer(f"freqs{layer}", norm_rope.rope_frequencies(cfg.rope_dim, base, yarn))

    # ------------------------------------------------------------------ pieces shared by every graph
    def _lin(self, x, name):
        return x @ self.w(name).T

    def _compress_entries(self, kv_w, sc_w, overlap: bool, c: int, start, freqs, norm: str):
        """Windowed rows kv_w / sc_w [B, nw (+1: the window before the first, if overlap), m, coff*c] -> entries
        [B, nw, c]: pooled, normalised, rotated at each window's first position `start` ([1|B, nw])."""
        if overlap:                                   # entry w = [window w-1, first half | window w, second half]
            kv_w = torch.cat((kv_w[:, :-1, :, :c], kv_w[:, 1:, :, c:]), dim=2)
            sc_w = torch.cat((sc_w[:, :-1, :, :c], sc_w[:, 1:, :, c:]), dim=2)
        B, nw = kv_w.shape[0], kv_w.shape[1]
        slots = kv_w.shape[2]
        pooled = compress.compress_pool(kv_w.reshape(B * nw, slots, c), sc_w.reshape(B * nw, slots, c)).view(B, nw, c)
        pooled = norm_rope.rms_norm(pooled, self.w(norm), self.cfg.norm_eps)
        return _rope(freqs, pooled, start, self.cfg.rope_dim)

    def _attend(self, L: str, x, q, pool, idx, pos, freqs, o=None):
        """SparseAttention of q over the pool rows idx names (or a given attention output o), then the output
        projection."""
        cfg = self.cfg
        B, S = x.shape[:2]
        if o is None:
            o = torch.ops.dsv4.sparse_attention(q, pool, idx, self.w(f"{L}.attn.attn_sink"), cfg.head_dim ** -0.5)
        o = _rope(freqs, o, pos, cfg.rope_dim, inverse=True)                          # [B, S, H, D]
        wo_a = self.w(f"{L}.attn.wo_a.weight").view(cfg.o_groups, -1, o.shape[-1] * cfg.num_heads // cfg.o_groups)
        # the grouped projection as one batched MatMul over groups (ONNX Runtime's Einsum is slower)
        z = torch.matmul(o.reshape(B * S, cfg.o_groups, -1).transpose(0, 1), wo_a.transpose(1, 2))   # [g, BS, o]
        return self._lin(z.transpose(0, 1).reshape(B, S, -1), f"{L}.attn.wo_b.weight")

    def _qkv(self, L: str, x, pos, freqs):
        cfg, eps = self.cfg, self.cfg.norm_eps
        B, S = x.shape[:2]
        qr = norm_rope.rms_norm(self._lin(x, f"{L}.attn.wq_a.weight"), self.w(f"{L}.attn.q_norm.weight"), eps)
        q = self._lin(qr, f"{L}.attn.wq_b.weight").view(B, S, cfg.num_heads, cfg.head_dim)
        q = _rope(freqs, norm_rope.rms_norm(q, None, eps), pos, cfg.rope_dim)
        kv = norm_rope.rms_norm(self._lin(x, f"{L}.attn.wkv.weight"), self.w(f"{L}.attn.kv_norm.weight"), eps)
        return q, qr, _rope(freqs, kv, pos, cfg.rope_dim)

    def _indexer_q(self, L: str, qr, x, pos, freqs):
        cfg = self.cfg
        B, S = x.shape[:2]
        iq = self._lin(qr, f"{L}.attn.indexer.wq_b.weight").view(B, S, cfg.index_n_heads, cfg.index_head_dim)
        iq = _rope(freqs, iq, pos, cfg.rope_dim)
        iw = self._lin(x, f"{L}.attn.indexer.weights_proj.weight") * (cfg.index_head_dim ** -0.5 *
                                                                       cfg.index_n_heads ** -0.5)
        return iq, iw

    def _proj(self, P: str, x, pos, m: int):
        """Compressor projections of tokens x at positions pos: values and gate scores with ape."""
        return self._lin(x, f"{P}.wkv.weight"), self._lin(x, f"{P}.wgate.weight") + self.w(f"{P}.ape")[pos % m]

    def _ffn(self, layer: int, x, ids):
        cfg = self.cfg
        L = f"layers.{layer}.ffn"
        xt = x.reshape(-1, x.shape[-1])
        hashed = self.w(f"{L}.gate.tid2eid")[ids.reshape(-1)] if cfg.is_hash_layer(layer) else None
        bias = None if hashed is not None else self.w(f"{L}.gate.bias")
        idx, wts = _gate(xt, self.w(f"{L}.gate.weight"), bias, hashed, cfg.experts_per_token, cfg.route_scale)
        y = torch.zeros_like(xt)
        for e in range(cfg.n_routed_experts):
            E, hit = f"{L}.experts.{e}", idx == e
            if self.sparse_moe:        # only the tokens routed to e (NonZero, gather, ScatterND-add back)
                tok = torch.nonzero(hit.any(-1)).squeeze(-1)
                we, xe = (wts * hit).sum(-1)[tok][:, None], xt[tok]
            else:                      # dense over experts: a token's weight is 0 where not routed
                we, xe = (wts * hit).sum(-1, keepdim=True), xt
            h = moe.clamped_swiglu(self._lin(xe, f"{E}.w1.weight"), self._lin(xe, f"{E}.w3.weight"), cfg.swiglu_limit)
            ye = self._lin(h * we, f"{E}.w2.weight")
            y = y.index_add(0, tok, ye) if self.sparse_moe else y + ye
        if cfg.n_shared_experts:
            E = f"{L}.shared_experts"
            h = moe.clamped_swiglu(self._lin(xt, f"{E}.w1.weight"), self._lin(xt, f"{E}.w3.weight"), cfg.swiglu_limit)
            y = y + self._lin(h, f"{E}.w2.weight")
        return y.view(x.shape)

    def _block(self, layer: int, X, ids, attn):
        """X [B, S, hc, d] -> [B, S, hc, d]; `attn(x_normed)` runs the layer's attention."""
        cfg, eps, L = self.cfg, self.cfg.norm_eps, f"layers.{layer}"
        B, S = X.shape[:2]

        def hc(name, X, f):
            x, post, comb = _hc_pre(X.flatten(0, 1), self.w(f"{L}.hc_{name}_fn"), self.w(f"{L}.hc_{name}_base"),
                                    self.w(f"{L}.hc_{name}_scale"), cfg.hc_eps, eps, cfg.hc_sinkhorn_iters)
            y = f(norm_rope.rms_norm(x.view(B, S, -1), self.w(f"{L}.{name}_norm.weight"), eps))
            return _hc_post(y.flatten(0, 1), X.flatten(0, 1), post, comb).view_as(X)

        X = hc("attn", X, attn)
        return hc("ffn", X, lambda x: self._ffn(layer, x, ids))

    def _embed(self, ids):
        return self.w("embed.weight")[ids][:, :, None, :].expand(-1, -1, self.cfg.hc_mult, -1)

    def _head(self, X):
        cfg = self.cfg
        y = mhc.hc_head(X.flatten(0, 1), self.w("hc_head_fn"), self.w("hc_head_base"), self.w("hc_head_scale"),
                        cfg.hc_eps, cfg.norm_eps)
        y = norm_rope.rms_norm(y, self.w("norm.weight"), cfg.norm_eps)
        return self._lin(y, "head.weight").view(X.shape[0], X.shape[1], -1)
