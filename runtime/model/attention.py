"""V4 hybrid attention: sliding window + (CSA | HCA | nothing), one shared K=V head (spec §7-§10).

Token-wise work (projections, norms, RoPE) runs on all B*S tokens of a chunk at once; the parts that depend
on a sequence's history (compressor, indexer, gathering KV rows) run per sequence against its state, so
prefill, chunked prefill and one-token decode are the same code path.
"""

from __future__ import annotations

import torch

from ..ops.norm_rope import rope_cos_sin, rope_frequencies
from ..taps import tap
from .params import Params, project
from .state import LayerState, Pending, Rows


class Rope:
    """The layer's RoPE: compressed layers use compress_rope_theta + YaRN, window-only layers rope_theta."""

    def __init__(self, cfg, layer: int, ops, device="cpu"):
        ratio = cfg.ratio(layer)
        base, yarn = (cfg.compress_rope_theta, cfg.yarn) if ratio else (cfg.rope_theta, None)
        self.freqs = rope_frequencies(cfg.rope_dim, base, yarn).to(device)
        self.dim, self.ops = cfg.rope_dim, ops
        self._memo = (None, {})            # (positions tensor, its cos/sin): q, kv, output share one

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the trailing rope dims of x [T, ..., D] at positions [T]."""
        if self._memo[0] is not positions:
            self._memo = (positions, {2: rope_cos_sin(self.freqs, positions)})
        shaped = self._memo[1]               # cos / sin [T, (1,)*, dim/2] per rank of x (views of one pair)
        if x.dim() not in shaped:
            cos, sin = shaped[2]
            extra = (1,) * (x.dim() - 2)
            shaped[x.dim()] = (cos.view(cos.shape[0], *extra, -1), sin.view(sin.shape[0], *extra, -1))
        cos, sin = shaped[x.dim()]
        rot = self.ops.apply_rope(x[..., -self.dim:], cos, sin, inverse=inverse)
        return torch.cat((x[..., :-self.dim], self.ops.round_act(rot)), dim=-1)


class Compressor:
    """Gated softmax pooling of `ratio` tokens into one entry (CSA: overlapping 2x ratio slots)."""

    def __init__(self, p: Params, cfg, ratio: int, overlap: bool, rope: Rope, ops, finish, name: str = "compressor"):
        self.wkv, self.wgate = p("wkv.weight"), p("wgate.weight")   # [coff*c, d]
        self.ape, self.norm = p("ape"), p("norm.weight")             # [ratio, coff*c], [c]
        self.m, self.overlap, self.c = ratio, overlap, self.norm.shape[0]
        self.rope, self.ops, self.eps, self.finish, self.name = rope, ops, cfg.norm_eps, finish, name

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """Per-token values and gate scores (ape added), float32: [T, coff*c] each."""
        kv = self.ops.linear(x, self.wkv)
        score = self.ops.linear(x, self.wgate) + self.ape[positions % self.m]
        return kv, score

    def advance(self, buf: Pending, out: Rows, kv: torch.Tensor, score: torch.Tensor, p0: int) -> None:
        """Add tokens [p0, p0+S) of one sequence, emit every window they complete into `out`."""
        m, c = self.m, self.c
        all_kv, all_sc = torch.cat((buf.kv, kv)), torch.cat((buf.score, score))
        start, end = buf.start, p0 + kv.shape[0]
        first, stop = p0 // m, end // m            # windows [first, stop) close in this chunk
        if stop > first:
            lo = (first - 1) * m if self.overlap else first * m
            if lo < start:                        # CSA window -1 does not exist: empty slots
                pad = start - lo
                all_kv = torch.cat((all_kv.new_zeros(pad, all_kv.shape[1]), all_kv))
                all_sc = torch.cat((all_sc.new_full((pad, all_sc.shape[1]), float("-inf")), all_sc))
                start = lo
            seg = slice(lo - start, stop * m - start)
            wkv, wsc = all_kv[seg].unflatten(0, (-1, m)), all_sc[seg].unflatten(0, (-1, m))
            if self.overlap:                      # entry w = [window w-1 first half | window w second half]
                wkv = torch.cat((wkv[:-1, :, :c], wkv[1:, :, c:]), dim=1)    # [nw, 2m, c]
                wsc = torch.cat((wsc[:-1, :, :c], wsc[1:, :, c:]), dim=1)
            pooled = self.ops.round_act(self.ops.compress_pool(wkv, wsc))  # [nw, c]
            pooled = self.ops.round_act(self.ops.rms_norm(pooled, self.norm, self.eps))
            pooled = self.rope(pooled, torch.arange(first, stop, device=kv.device) * m)  # RoPE at window start
            tap(self.name, pooled)        # the entries this chunk closed, before the cache's storage quantisation
            out.append(self.finish(pooled))
        keep = stop * m - (m if self.overlap and stop > 0 else 0)
        if buf.retain is not None:                # a speculative step may be rolled back (state.settle)
            keep = min(keep, buf.retain)
        buf.kv, buf.score, buf.start = all_kv[keep - start:].clone(), all_sc[keep - start:].clone(), keep


class Indexer:
    """Lightning indexer: scores compressed entries per query, keeps the top `index_topk` (spec §9)."""

    def __init__(self, p: Params, cfg, rope: Rope, ops, name: str):
        self.wq_b, self.weights_proj = p.linear("wq_b"), p.linear("weights_proj")
        # h: this rank's heads (TP splits them); the weight scale uses the model's head count.
        self.h, self.d, self.topk, self.ops, self.rope = (cfg.index_n_heads // p.parallel.tp, cfg.index_head_dim,
                                                          cfg.index_topk, ops, rope)
        self.scale = self.d ** -0.5 * cfg.index_n_heads ** -0.5
        self.compressor = Compressor(p.sub("compressor"), cfg, 4, True, rope, ops, ops.indexer_qat,
                                     f"{name}.indexer.keys")

    def queries(self, qr: torch.Tensor, x: torch.Tensor, positions: torch.Tensor):
        q = project(self.ops, qr, self.wq_b).unflatten(-1, (self.h, self.d))      # [T, h, d]
        q = self.ops.indexer_qat(self.rope(q, positions))
        w = project(self.ops, x, self.weights_proj) * self.scale                            # [T, h]
        return q, w


class Attention:
    def __init__(self, p: Params, cfg, layer: int, ops):
        self.cfg, self.ops, self.ratio, self.name = cfg, ops, cfg.ratio(layer), f"L{layer}"
        self.par = p.parallel                  # TP: this rank's query heads and output groups (spec §15)
        self.H, self.D, self.nope, self.G = cfg.num_heads // self.par.tp, cfg.head_dim, cfg.nope_dim, cfg.o_groups // self.par.tp
        self.wq_a, self.wq_b, self.wkv = p.linear("wq_a"), p.linear("wq_b"), p.linear("wkv")
        self.q_norm, self.kv_norm, self.sink = p("q_norm.weight"), p("kv_norm.weight"), p("attn_sink")
        self.rope = Rope(cfg, layer, ops, self.sink.device)
        # wo_a [G*o_lora, H/G*D]: group g maps heads g*H/G..(g+1)*H/G-1 to its o_lora slice (bf16, not FP8,
        # in DeepSeek's reference: it is never an FP8 GEMM, so its input is not quantised).
        self.wo_a = p.linear("wo_a").weight
        self.wo_b = p.linear("wo_b")
        self.compressor = self.indexer = None
        if self.ratio:
            csa = cfg.is_csa(layer)
            self.compressor = Compressor(p.sub("compressor"), cfg, self.ratio, csa, self.rope, ops, self._kv_qat,
                                         f"{self.name}.{'csa' if csa else 'hca'}.compressed")
            if csa:
                self.indexer = Indexer(p.sub("indexer"), cfg, self.rope, ops, self.name)

    def _kv_qat(self, kv: torch.Tensor) -> torch.Tensor:
        """FP8 simulation of the non-RoPE dims (identity in exact numerics)."""
        return torch.cat((self.ops.kv_qat(kv[..., :self.nope]), kv[..., self.nope:]), dim=-1)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, starts: list[int],
                 states: list[LayerState]) -> torch.Tensor:
        """x [B, S, d] (after attn_norm), positions [B, S] (row b = starts[b] + 0..S-1) -> [B, S, d]."""
        ops, eps = self.ops, self.cfg.norm_eps
        B, S, _ = x.shape
        xt, pos = x.reshape(B * S, -1), positions.reshape(-1)
        qr = ops.round_act(ops.rms_norm(project(ops, xt, self.wq_a), self.q_norm, eps))        # [T, q_lora]
        q = project(ops, qr, self.wq_b).unflatten(-1, (self.H, self.D))                          # [T, H, D]
        q = self.rope(ops.head_norm(ops, q, eps), pos)                                  # per-head, no weight
        kv = ops.round_act(ops.rms_norm(project(ops, xt, self.wkv), self.kv_norm, eps))        # [T, D]
        kv = self._kv_qat(self.rope(kv, pos))
        tap(f"{self.name}.attn.q", q)
        tap(f"{self.name}.attn.kv", kv)
        if self.compressor is not None:
            ckv, csc = self.compressor.project(xt, pos)
        if self.indexer is not None:
            iq, iw = self.indexer.queries(qr, xt, pos)
            ikv, isc = self.indexer.compressor.project(xt, pos)

        o = torch.empty_like(q)
        for b in range(B):
            tok, st, p0 = slice(b * S, (b + 1) * S), states[b], starts[b]
            if S == 1:                    # decode: the new row goes into its ring slot first, read in place
                st.window[p0 % self.cfg.window] = kv[tok]
            if self.compressor is not None:
                self.compressor.advance(st.comp_buf, st.kv, ckv[tok], csc[tok], p0)
            # pool = the layer's cache buffer [ring | compressed entries] (+ the chunk's own rows in prefill)
            pool = st.kv.view() if S == 1 else torch.cat((st.kv.view(), kv[tok]))
            idx = [self._window_idx(p0, S, st.kv.n)]
            if self.compressor is not None:
                visible = (pos[tok] + 1) // self.ratio                      # entries whose window closed
                n_vis = (p0 + S) // self.ratio                              # = visible[-1], without a sync
                if self.indexer is not None:
                    self.indexer.compressor.advance(st.index_buf, st.index_keys, ikv[tok], isc[tok], p0)
                    k = min(self.indexer.topk, n_vis)
                    sel = ops.indexer_topk(iq[tok], iw[tok], st.index_keys.view(), visible, k,
                                           rnd=ops.inner_round)
                    tap(f"{self.name}.indexer.topk", sel)
                else:                                                       # HCA: every closed entry
                    sel = torch.arange(n_vis, device=x.device).expand(S, -1)
                    sel = torch.where(sel < visible[:, None], sel, -1)
                idx.append(torch.where(sel >= 0, sel + self.cfg.window, -1))   # entry w is row W + w
            o[tok] = ops.sparse_attention(q[tok], pool, torch.cat(idx, dim=1), self.sink, self.D ** -0.5,
                                          rnd=ops.inner_round)
            if S > 1:                                                       # update the ring after prefill
                keep = min(S, self.cfg.window)
                ring = torch.arange(p0 + S - keep, p0 + S, device=x.device) % self.cfg.window
                st.window[ring] = kv[tok][S - keep:]
        o = ops.round_act(o)
        o = self.rope(o, pos, inverse=True)                                    # undo RoPE at the query position
        z = ops.round_act(ops.group_linear(o.reshape(B * S, self.G, -1), self.wo_a))          # [T, G, o_lora]
        out = self.par.tp_sum(project(ops, z.flatten(1), self.wo_b)).view(B, S, -1)   # row-parallel wo_b
        tap(f"{self.name}.attn.out", out)
        return out

    def _window_idx(self, p0: int, S: int, n_cached: int) -> torch.Tensor:
        """[S, W] rows of the pool each query's window reads: query p0+i sees tokens max(0, p0+i-W+1)..p0+i.

        A token already in the ring (before p0, or every token in a one-token decode step, whose row was
        written first) is read at its slot (token % W); in prefill a token of the chunk is read from the
        chunk's rows appended after the `n_cached` cache rows.
        """
        W, dev = self.cfg.window, self.sink.device
        tokens = torch.arange(p0 - W + 1, p0 + S, device=dev).unfold(0, W, 1)     # [S, W] absolute
        in_ring = tokens < (p0 + 1 if S == 1 else p0)
        rows = torch.where(in_ring, tokens % W, n_cached + tokens - p0)
        return torch.where(tokens >= 0, rows, -1)
