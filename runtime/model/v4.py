"""The DeepSeek-V4 model in one file, leaves to root (spec §5-§13; the state it keeps is in state.py).

    weights by name (Params) -> activation rounding (project / norm / act) -> Rope -> Compressor -> Indexer
    -> Attention -> MoE -> HyperConnection -> Block -> Head -> MTPBlock -> Transformer

Shapes: B sequences of a batch, S tokens of the chunk each (S = 1 in decode), T = B*S tokens flattened,
d = hidden_size, hc = hc_mult residual streams, H query heads and D = head_dim (K = V: one shared head of D),
W = the sliding window, m = a compressor's ratio, E routed experts, k = experts_per_token, V the vocabulary.
Token-wise work (projections, norms, RoPE, routing) runs on all T tokens of a chunk at once; what depends on a
sequence's history (compressors, the indexer, which KV rows a query reads) runs per sequence against its
state, so prefill, chunked prefill and one-token decode are one code path.

The model never calls torch for V4 math directly: `ops` is the dispatch table (runtime.ops.OpTable) and every
op goes through it, so one graph runs the float32 reference, a backend's fast kernels and every numerics mode.

Activation rounding. The numerics keep each activation the model holds between ops at the profile's activation
dtype (`ops.round_act`: identity in float32). The ops compute float32 inside; the model rounds what it keeps,
through three helpers and nowhere else:
- `project(ops, x, lin)`: a linear layer (its input quantised when the weight format asks, output rounded);
- `norm(ops, x, w, eps)`: an RMS norm;
- `act(ops, y)`: any other op output or sum kept: RoPE's rotated dims, a compressor's pooled entry, the
  attention output, the grouped wo_a output, the experts' SwiGLU and sum, hc_pre's input, hc_post's streams,
  hc_head's collapse and the MTP block's input.
Float32 on purpose (as DeepSeek's code): the compressor's projections and pooling, routing, hc_* mixing and
the logits.

Parallelism is explicit: `par` (runtime.parallel.comm.Parallel, default SINGLE = one device, every collective
the identity) is handed to the modules that split work: attention (TP over query heads, `tp_sum` after wo_b),
the indexer (its heads), the MoE (EP over whole experts, `ep_sum` of partial sums), the head and embedding
(vocab-parallel). Where we depart from transformers or DeepSeek's code: DEPARTURES.md next to this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..ops.linear import project
from ..ops.norm_rope import rope_cos_sin, rope_frequencies
from ..parallel.comm import SINGLE, Parallel
from ..taps import tap
from .state import ModelState, LayerState, Pending, Rows, SequenceState, arm


# ---------------------------------------------------------------- weights by official checkpoint name
@dataclass(frozen=True)
class Linear:
    weight: object           # [out, in]: float32 (reference), or a device storage (runtime.weights.device_storage)
    quantized: bool          # its input is quantised under the numerics (FP8 / FP4 / INT8 weights)


class Params:
    """The weights under a name prefix. `Runtime.load` hands the model a mapping of official tensor names (spec
    §4, without `.scale` entries) to weights (float32 for the CPU reference and emulation; the profile's storage
    on a device, runtime.weights) and the set of linears whose input the numerics quantise."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], quantized: frozenset[str] = frozenset(), prefix: str = ""):
        self._t, self._q, self._prefix = tensors, quantized, prefix

    def sub(self, prefix: str) -> "Params":
        return Params(self._t, self._q, f"{self._prefix}{prefix}.")

    def __call__(self, name: str) -> torch.Tensor:
        return self._t[self._prefix + name]

    def linear(self, name: str) -> Linear:
        full = f"{self._prefix}{name}.weight"
        return Linear(self._t[full], full in self._q)


# ---------------------------------------------------------------- activation rounding (with ops.linear.project)
def norm(ops, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS norm over the last dim, kept at the activation dtype."""
    return ops.round_act(ops.rms_norm(x, w, eps))


def act(ops, y: torch.Tensor) -> torch.Tensor:
    """An op output or a sum the model keeps, at the activation dtype."""
    return ops.round_act(y)


# ---------------------------------------------------------------- attention (spec §7-§10)
class Rope:
    """The layer's RoPE: compressed layers use compress_rope_theta + YaRN, window-only layers rope_theta."""

    def __init__(self, cfg, layer: int, ops, device="cpu"):
        ratio = cfg.ratio(layer)
        base, yarn = (cfg.compress_rope_theta, cfg.yarn) if ratio else (cfg.rope_theta, None)
        self.freqs = rope_frequencies(cfg.rope_dim, base, yarn).to(device)      # [rope_dim / 2]
        self.dim, self.ops = cfg.rope_dim, ops
        self._memo = (None, {})            # (positions tensor, its cos/sin): q, kv, output share one

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the trailing rope dims of x [T, ..., D] at positions [T] (interleaved pairs, spec §7.2)."""
        if self._memo[0] is not positions:
            self._memo = (positions, {2: rope_cos_sin(self.freqs, positions)})
        shaped = self._memo[1]               # cos / sin [T, (1,)*, dim/2] per rank of x (views of one pair)
        if x.dim() not in shaped:
            cos, sin = shaped[2]
            extra = (1,) * (x.dim() - 2)
            shaped[x.dim()] = (cos.view(cos.shape[0], *extra, -1), sin.view(sin.shape[0], *extra, -1))
        cos, sin = shaped[x.dim()]
        rot = self.ops.apply_rope(x[..., -self.dim:], cos, sin, inverse=inverse)
        return torch.cat((x[..., :-self.dim], act(self.ops, rot)), dim=-1)


class Compressor:
    """Gated softmax pooling of `ratio` tokens into one entry (CSA: overlapping 2x ratio slots, spec §8)."""

    def __init__(self, p: Params, cfg, ratio: int, overlap: bool, rope: Rope, ops, finish, name: str = "compressor"):
        self.wkv, self.wgate = p("wkv.weight"), p("wgate.weight")   # [coff*c, d] (coff = 2 when overlapping)
        self.ape, self.norm = p("ape"), p("norm.weight")             # [ratio, coff*c], [c]
        self.m, self.overlap, self.c = ratio, overlap, self.norm.shape[0]
        self.rope, self.ops, self.eps, self.finish, self.name = rope, ops, cfg.norm_eps, finish, name

    def inputs(self, x: torch.Tensor, positions: torch.Tensor):
        """x [T, d] -> per-token values and gate scores (ape added), float32: [T, coff*c] each."""
        kv = self.ops.linear(x, self.wkv)
        score = self.ops.linear(x, self.wgate) + self.ape[positions % self.m]
        return kv, score

    def advance(self, buf: Pending, out: Rows, kv: torch.Tensor, score: torch.Tensor, p0: int) -> None:
        """Add tokens [p0, p0+S) of one sequence, emit every window they complete into `out` ([c] rows)."""
        m, c, ops = self.m, self.c, self.ops
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
            pooled = norm(ops, act(ops, ops.compress_pool(wkv, wsc)), self.norm, self.eps)   # [nw, c]
            pooled = self.rope(pooled, torch.arange(first, stop, device=kv.device) * m)  # RoPE at window start
            tap(self.name, pooled)        # the entries this chunk closed, before the cache's storage quantisation
            out.append(self.finish(pooled))
        keep = stop * m - (m if self.overlap and stop > 0 else 0)
        if buf.retain is not None:                # a speculative step may be rolled back (state.settle)
            keep = min(keep, buf.retain)
        buf.kv, buf.score, buf.start = all_kv[keep - start:].clone(), all_sc[keep - start:].clone(), keep


class Indexer:
    """Lightning indexer: scores compressed entries per query, keeps the top `index_topk` (spec §9)."""

    def __init__(self, p: Params, cfg, rope: Rope, ops, name: str, par: Parallel = SINGLE):
        self.wq_b, self.weights_proj = p.linear("wq_b"), p.linear("weights_proj")
        # h: this rank's heads (TP splits them; tp_ops sums the partial scores); the scale uses the model's count.
        self.h, self.d, self.topk, self.ops, self.rope = (cfg.index_n_heads // par.tp, cfg.index_head_dim,
                                                          cfg.index_topk, ops, rope)
        self.scale = self.d ** -0.5 * cfg.index_n_heads ** -0.5
        self.compressor = Compressor(p.sub("compressor"), cfg, 4, True, rope, ops, ops.indexer_qat,
                                     f"{name}.indexer.keys")

    def queries(self, qr: torch.Tensor, x: torch.Tensor, positions: torch.Tensor):
        """qr [T, q_lora], x [T, d] -> queries [T, h, d_idx] (stored form), head weights [T, h]."""
        q = project(self.ops, qr, self.wq_b).unflatten(-1, (self.h, self.d))
        q = self.ops.indexer_qat(self.rope(q, positions))
        w = project(self.ops, x, self.weights_proj) * self.scale
        return q, w


class Attention:
    """Sliding window + (CSA | HCA | nothing) over one shared K=V head, per-head sinks (spec §7)."""

    def __init__(self, p: Params, cfg, layer: int, ops, par: Parallel = SINGLE):
        self.cfg, self.ops, self.ratio, self.name = cfg, ops, cfg.ratio(layer), f"L{layer}"
        self.par = par                         # TP: this rank's query heads and output groups (spec §15)
        self.H, self.D, self.nope, self.G = cfg.num_heads // par.tp, cfg.head_dim, cfg.nope_dim, cfg.o_groups // par.tp
        self.wq_a, self.wq_b, self.wkv = p.linear("wq_a"), p.linear("wq_b"), p.linear("wkv")
        self.q_norm, self.kv_norm, self.sink = p("q_norm.weight"), p("kv_norm.weight"), p("attn_sink")   # sink [H]
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
                self.indexer = Indexer(p.sub("indexer"), cfg, self.rope, ops, self.name, par)

    def _kv_qat(self, kv: torch.Tensor) -> torch.Tensor:
        """The cache's stored form of the non-RoPE dims (identity in exact numerics; FP8 under official)."""
        return torch.cat((self.ops.kv_qat(kv[..., :self.nope]), kv[..., self.nope:]), dim=-1)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, starts: list[int],
                 states: list[LayerState]) -> torch.Tensor:
        """x [B, S, d] (after attn_norm), positions [B, S] (row b = starts[b] + 0..S-1) -> [B, S, d]."""
        ops, eps = self.ops, self.cfg.norm_eps
        B, S, _ = x.shape
        xt, pos = x.reshape(B * S, -1), positions.reshape(-1)                                      # [T, d], [T]
        qr = norm(ops, project(ops, xt, self.wq_a), self.q_norm, eps)                              # [T, q_lora]
        q = project(ops, qr, self.wq_b).unflatten(-1, (self.H, self.D))                            # [T, H, D]
        q = self.rope(ops.head_norm(ops, q, eps), pos)                                    # per-head, no weight
        kv = norm(ops, project(ops, xt, self.wkv), self.kv_norm, eps)                              # [T, D]
        kv = self._kv_qat(self.rope(kv, pos))
        tap(f"{self.name}.attn.q", q)
        tap(f"{self.name}.attn.kv", kv)
        if self.compressor is not None:
            ckv, csc = self.compressor.inputs(xt, pos)
        if self.indexer is not None:
            iq, iw = self.indexer.queries(qr, xt, pos)
            ikv, isc = self.indexer.compressor.inputs(xt, pos)

        o = torch.empty_like(q)                                                                    # [T, H, D]
        for b in range(B):
            tok, st, p0 = slice(b * S, (b + 1) * S), states[b], starts[b]
            if S == 1:                    # decode: the new row goes into its ring slot first, read in place
                st.window[p0 % self.cfg.window] = kv[tok]
            if self.compressor is not None:
                self.compressor.advance(st.comp_buf, st.kv, ckv[tok], csc[tok], p0)
            # pool = the layer's cache buffer [ring | compressed entries] (+ the chunk's own rows in prefill)
            pool = st.kv.view() if S == 1 else torch.cat((st.kv.view(), kv[tok]))                 # [N, D]
            idx = [self._window_idx(p0, S, st.kv.n)]                                               # [S, W]
            if self.compressor is not None:
                visible = (pos[tok] + 1) // self.ratio                      # entries whose window closed
                n_vis = (p0 + S) // self.ratio                              # = visible[-1], without a sync
                if self.indexer is not None:
                    self.indexer.compressor.advance(st.index_buf, st.index_keys, ikv[tok], isc[tok], p0)
                    k = min(self.indexer.topk, n_vis)
                    sel = ops.indexer_topk(iq[tok], iw[tok], st.index_keys.view(), visible, k,
                                           rnd=ops.inner_round)                             # [S, k]
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
        o = self.rope(act(ops, o), pos, inverse=True)                          # undo RoPE at the query position
        z = act(ops, ops.group_linear(o.reshape(B * S, self.G, -1), self.wo_a))                   # [T, G, o_lora]
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


# ---------------------------------------------------------------- mixture of experts (spec §12)
class MoE:
    """Hash or learned routing over E routed experts (clamped SwiGLU) plus the shared expert."""

    def __init__(self, p: Params, cfg, layer: int, ops, par: Parallel = SINGLE):
        self.cfg, self.ops, self.name = cfg, ops, f"L{layer}"
        self.gate_w = p("gate.weight")                                          # [E, d]
        self.hash = cfg.is_hash_layer(layer)
        self.tid2eid = p("gate.tid2eid") if self.hash else None                # [V, k] int64
        self.bias = None if self.hash else p("gate.bias")                       # [E]
        self.par = par                         # EP: this rank's whole experts, `local` ids (all on one device)
        self.local = par.layout.experts(par.rank, cfg.n_routed_experts)
        self.experts = [tuple(p.linear(f"experts.{e}.{w}") for w in ("w1", "w2", "w3")) for e in self.local]
        self.shared = tuple(p.linear(f"shared_experts.{w}") for w in ("w1", "w2", "w3")) \
            if cfg.n_shared_experts else None

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] (after ffn_norm), ids [B, S] token ids (hash routing needs them) -> [B, S, d]."""
        ops, cfg = self.ops, self.cfg
        xt = x.reshape(-1, x.shape[-1])                                                            # [T, d]
        hashed = self.tid2eid[ids.reshape(-1)] if self.hash else None
        idx, w = ops.moe_gate(xt, self.gate_w, self.bias, hashed, cfg.experts_per_token, cfg.route_scale)  # [T, k]
        tap(f"{self.name}.moe.route", idx)
        y = self._routed(xt, idx, w)
        if self.shared is not None:
            w1, w2, w3 = self.shared
            h = act(ops, ops.clamped_swiglu(project(ops, xt, w1), project(ops, xt, w3), cfg.swiglu_limit))
            y = y + project(ops, h, w2)
        y = act(ops, y).view_as(x)
        tap(f"{self.name}.moe.out", y)
        return y

    def _routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum for tokens x [T, d] with routing idx / w [T, k] -> [T, d].

        Expert parallel: each rank runs its own experts for every (token, slot) routed to one of them, then the
        partial sums are all-reduced over the EP group. All-reduce rather than all-to-all dispatch because this
        runtime serves small batches: after attention every rank already holds every token (replicated
        activations), so dispatch would only move the same rows again, and two all-to-alls cost more latency
        than one all-reduce of [T, d] at decode sizes; all-to-all pays off at large batch, where it avoids
        computing-nothing ranks and the [T, d] reduce."""
        ops, limit, local = self.ops, self.cfg.swiglu_limit, self.local
        if self.par.ep == 1:
            return ops.routed_experts(x, idx, w, self.experts, limit, ops)
        lidx = idx - local.start                                      # this rank's experts: 0..len(local)-1
        tok, slot = ((lidx >= 0) & (lidx < len(local))).nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if tok.numel():
            # one routing slot per row (k = 1): rows of the same token are summed back below
            y = ops.routed_experts(x[tok], lidx[tok, slot][:, None], w[tok, slot][:, None], self.experts, limit, ops)
            out.index_add_(0, tok, y)
        return self.par.ep_sum(out)


# ---------------------------------------------------------------- hyper-connections, blocks, head (spec §6, §13)
class HyperConnection:
    """hc_pre / hc_post parameters of one sub-block (`hc_attn_*` or `hc_ffn_*`), spec §6."""

    def __init__(self, p: Params, name: str, cfg, ops):
        # fn [(2+hc)*hc, hc*d], base [(2+hc)*hc], scale [3]
        self.fn, self.base, self.scale = p(f"hc_{name}_fn"), p(f"hc_{name}_base"), p(f"hc_{name}_scale")
        self.cfg, self.ops = cfg, ops

    def pre(self, X: torch.Tensor):
        """X [B, S, hc, d] -> the sub-block's input x [B, S, d], post [T, hc], comb [T, hc, hc] (float32)."""
        c = self.cfg
        x, post, comb = self.ops.hc_pre(X.flatten(0, 1), self.fn, self.base, self.scale, c.hc_eps,
                                        c.norm_eps, c.hc_sinkhorn_iters)
        return act(self.ops, x).view(X.shape[0], X.shape[1], -1), post, comb

    def post(self, y: torch.Tensor, res: torch.Tensor, post, comb) -> torch.Tensor:
        """Sub-block output y [B, S, d] into the streams res [B, S, hc, d] -> [B, S, hc, d]."""
        X = self.ops.hc_post(y.flatten(0, 1), res.flatten(0, 1), post, comb)
        return act(self.ops, X).view_as(res)


class Block:
    """[hc_pre -> attn_norm -> attention -> hc_post] then [hc_pre -> ffn_norm -> MoE -> hc_post]."""

    def __init__(self, p: Params, cfg, layer: int, ops, par: Parallel = SINGLE):
        self.layer, self.ops, self.eps = layer, ops, cfg.norm_eps
        self.attn_norm, self.ffn_norm = p("attn_norm.weight"), p("ffn_norm.weight")
        self.hc_attn, self.hc_ffn = HyperConnection(p, "attn", cfg, ops), HyperConnection(p, "ffn", cfg, ops)
        self.attn = Attention(p.sub("attn"), cfg, layer, ops, par)
        self.ffn = MoE(p.sub("ffn"), cfg, layer, ops, par)

    def __call__(self, X, ids, positions, starts, states):
        """X [B, S, hc, d], ids / positions [B, S], starts[b] = positions[b, 0] -> [B, S, hc, d]. A one-token
        step goes through the table's `decode_block` (its reference is `forward_ops`; a backend may fuse it)."""
        if X.shape[1] == 1:
            return self.ops.decode_block(self, X, ids, positions, starts, states)
        return self.forward_ops(X, ids, positions, starts, states)

    def forward_ops(self, X, ids, positions, starts, states):
        """The per-op path: hc_pre, attention, hc_post, hc_pre, MoE, hc_post, each through the table."""
        ops, layer_states = self.ops, [s.layers[self.layer] for s in states]
        x, post, comb = self.hc_attn.pre(X)
        y = self.attn(norm(ops, x, self.attn_norm, self.eps), positions, starts, layer_states)
        X = self.hc_attn.post(y, X, post, comb)
        tap(f"L{self.layer}.hc.attn_post", X)
        x, post, comb = self.hc_ffn.pre(X)
        X = self.hc_ffn.post(self.ffn(norm(ops, x, self.ffn_norm, self.eps), ids), X, post, comb)
        tap(f"L{self.layer}.hc.post", X)
        return X


class Head:
    """hc_head collapse -> final RMSNorm -> vocabulary projection (float32 logits)."""

    def __init__(self, p: Params, head_w: torch.Tensor, cfg, ops, par: Parallel = SINGLE):
        # fn [hc, hc*d], base [hc], scale [1]; head_w [V, d] (this rank's rows when vocab-parallel)
        self.fn, self.base, self.scale = p("hc_head_fn"), p("hc_head_base"), p("hc_head_scale")
        self.norm, self.head_w, self.cfg, self.ops, self.par = p("norm.weight"), head_w, cfg, ops, par

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        """X [B, S, hc, d] -> logits [B, S, V]."""
        c, ops = self.cfg, self.ops
        y = act(ops, ops.hc_head(X.flatten(0, 1), self.fn, self.base, self.scale, c.hc_eps, c.norm_eps))  # [T, d]
        logits = self.par.gather_vocab(ops.linear(norm(ops, y, self.norm, c.norm_eps), self.head_w), c.vocab_size)
        return logits.view(X.shape[0], X.shape[1], -1)


class MTPBlock:
    """Multi-token-prediction block `mtp.{i}`: predicts the token after next from the main model's final
    residual streams and the embedding of the next token (V3 convention; spec §13)."""

    def __init__(self, p: Params, cfg, layer: int, embed, head_w: torch.Tensor, ops, par: Parallel = SINGLE):
        self.ops, self.eps, self.embed = ops, cfg.norm_eps, embed
        self.enorm, self.hnorm = p("enorm.weight"), p("hnorm.weight")
        self.e_proj, self.h_proj = p.linear("e_proj"), p.linear("h_proj")             # [d, d] each
        self.block = Block(p, cfg, layer, ops, par)
        self.head = Head(p, head_w, cfg, ops, par)

    def __call__(self, X: torch.Tensor, next_ids: torch.Tensor, positions, starts, states) -> torch.Tensor:
        """X [B, S, hc, d] final streams, next_ids [B, S] -> logits [B, S, V] of the token after next_ids."""
        ops = self.ops
        e = norm(ops, self.embed[next_ids].float(), self.enorm, self.eps)                         # [B, S, d]
        h = norm(ops, X, self.hnorm, self.eps)                                                    # [B, S, hc, d]
        x = act(ops, project(ops, e, self.e_proj)[:, :, None, :] + project(ops, h, self.h_proj))
        return self.head(self.block(x, next_ids, positions, starts, states))


class Transformer:
    """embedding -> blocks -> head, plus the MTP blocks; shares embed and head with them (spec §5)."""

    def __init__(self, cfg, tensors, quantized, ops, par: Parallel | None = None):
        p, par = Params(tensors, frozenset(quantized)), SINGLE if par is None else par     # None: one device
        self.cfg, self.ops, self.par = cfg, ops, par
        self.embed = par.embed(p("embed.weight"), cfg.vocab_size)              # [V, d] lookup (vocab-parallel)
        self.device = self.embed.device                  # every weight and state tensor lives here
        self.blocks = [Block(p.sub(f"layers.{i}"), cfg, i, ops, par) for i in range(cfg.num_layers)]
        self.head = Head(p, p("head.weight"), cfg, ops, par)
        self.mtp = [MTPBlock(p.sub(f"mtp.{i}"), cfg, cfg.num_layers + i, self.embed, p("head.weight"), ops, par)
                    for i in range(cfg.num_mtp)]

    @property
    def parallel(self) -> Parallel:
        """This rank's parallel context (the Runtime reads it: token broadcast, describe, close)."""
        return self.par

    def forward(self, ids: torch.Tensor, seqs: list[SequenceState], return_hidden: bool = False,
                last: bool = False):
        """ids [B, S] continuing each of the B sequences `seqs` (each at its own position) -> logits
        [B, S, V] float32 (`last`: [B, V], the last position's) (and the final residual streams
        [B, S, hc, d] if asked, for the MTP block)."""
        B, S = ids.shape
        ids, starts = ids.to(self.device), [s.pos for s in seqs]
        # a one-token step (or a short chunk per sequence, `whole_rows`: a speculative verify step) whose
        # `decode_block` can run every block (and the head) in one call does (the same implementation, without
        # Python between blocks; handed no streams, it embeds the tokens itself; a one-token step also shapes
        # the logits as asked: no torch call after the native step); None where the per-block path runs
        if S == 1:
            whole = getattr(self.ops.decode_block, "whole_step", None)
            fused = whole(self, None, ids, starts, seqs, hidden=return_hidden, last=last) if whole else None
        else:
            whole = getattr(self.ops.decode_block, "whole_rows", None)
            fused = whole(self, None, ids, starts, seqs) if whole is not None else None
            if fused is not None and last and fused[1] is not None:
                fused = (fused[0], fused[1][:, -1])
        if fused is None:
            for s in seqs:
                if getattr(s, "marked", None) is not None:      # a speculative step: the per-op path's undo
                    arm(s)
            X = self.streams(ids)
            positions = self._positions(starts, S)                                          # [B, S]
            for block in self.blocks:
                X = block(X, ids, positions, starts, seqs)
        for s in seqs:
            s.pos += S
        if fused is not None and fused[1] is not None:
            X, logits = fused
            tap("final.logits", logits)
        else:
            X = X if fused is None else fused[0]
            logits = self.head(X)
            tap("final.logits", logits)
            logits = logits[:, -1] if last else logits
        return (logits, X) if return_hidden else logits

    def streams(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> the residual streams the blocks start from [B, S, hc, d]: each token's embedding in
        every stream (float32)."""
        B, S = ids.shape
        # index_select on a whole table: the same rows as `embed[ids]`, whose index kernel enters an OpenMP
        # region even for a decode step's few rows (its spinning workers then take a core from the fused step)
        e = self.embed.index_select(0, ids.reshape(-1)).view(B, S, -1) if isinstance(self.embed, torch.Tensor) \
            else self.embed[ids]
        return e.float()[:, :, None, :].expand(-1, -1, self.cfg.hc_mult, -1).contiguous()

    def new_state(self, batch_size: int, context: int = 0) -> ModelState:
        """Fresh state for `batch_size` sequences, with room for `context` tokens reserved up front."""
        return ModelState(self.cfg, batch_size, self.device, context)

    def _positions(self, starts: list[int], S: int) -> torch.Tensor:
        """[B, S] int64 positions starts[b] + 0..S-1, on the model's device."""
        return torch.tensor(starts, device=self.device)[:, None] + torch.arange(S, device=self.device)[None, :]

    def forward_mtp(self, X: torch.Tensor, next_ids: torch.Tensor, seqs: list[SequenceState], i: int = 0,
                    last: bool = False):
        """MTP block i on final residual streams X [B, S, hc, d] of positions p..p+S-1 and the ids of the
        tokens that follow them [B, S] -> logits [B, S, V] for the token after those ([B, 1, V]: the last
        position's, with `last`). Its own window state lives in each sequence's layer slot num_layers + i;
        positions are the streams' positions."""
        starts, next_ids = [s.mtp_pos for s in seqs], next_ids.to(self.device)
        # the backend's one-call MTP step where its `decode_block` has one (None: the per-op block runs)
        step = getattr(self.ops.decode_block, "mtp_step", None)
        logits = step(self, i, X, next_ids, starts, seqs, last) if step is not None else None
        if logits is None:
            logits = self.mtp[i](X, next_ids, self._positions(starts, next_ids.shape[1]), starts, seqs)
            logits = logits[:, -1:] if last else logits
        for s in seqs:
            s.mtp_pos += next_ids.shape[1]
        return logits
