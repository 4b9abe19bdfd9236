"""The CUDA backend's static decode step (issue 19 item 3): one token per row for a fixed bucket of rows, every
buffer preallocated, ids and positions as device tensors: no host sync and no shape that depends on data, so
backends/cuda_graphs.py can capture it in a CUDA graph once per bucket and replay it every step.

`StaticState(cfg, rows, capacity, device)` holds, per main-model layer and row (slot), what the per-sequence
state of runtime/model/state.py holds, in fixed shapes; everything else follows from the row's position p:
- `kv` [rows, W + E + 1, D]: the ring of W raw KV rows (token p in slot p % W), the E = capacity // ratio
  compressed entries (entry w at row W + w, the layout attention reads in place), and one scratch row that
  takes the write of a step that closes no window (every step writes; no branch on data);
- `pk` / `ps` [rows, R, width]: the compressor's per-token values / scores as a ring over positions (token p in
  slot p % R, R = 2 * ratio for the overlapping CSA compressor, ratio for HCA): a closing window pools the
  slots of its own tokens, gathered by index;
- `ik` [rows, E4 + 1, index_dim], `ipk` / `ips` [rows, 8, 2 * index_dim]: the indexer's keys and its
  compressor's ring (CSA layers).
`attach(slot, seq)` copies a `SequenceState` (e.g. after its eager prefill) into a slot, `detach(slot, seq)`
writes the slot back into it at its new position.

`step(model, ops, state, ids, pos, routed)` is the block's per-op step (Block.forward_ops with S = 1) over the
table's ops: the same projections, norms, RoPE, compressor pooling and attention as the eager path, batched
over the rows with index tensors instead of per-sequence Python loops. Where the eager path is not capturable
it differs, and the graph runner's description says so: the indexer's scores are one batched einsum over each
row's own keys (`runtime.ops.attention.index_scores`' math and `select_topk`, fixed k, -1 padding), and the
routed experts are `routed` (cuda.grouped_mm, whose counts are an index_add_, or `dense_routed_experts`).
"""

from __future__ import annotations

import torch

from runtime.ops.attention import select_topk
from runtime.ops.linear import project
from runtime.ops.norm_rope import rope_cos_sin

INDEX_RATIO = 4      # the lightning indexer's own compressor (runtime/model/attention.py: Indexer)


class _Ring:
    """A compressor's pending rows as a ring over positions: values and scores [rows, R, width]."""

    def __init__(self, rows: int, ratio: int, overlap: bool, width: int, device):
        self.m, self.overlap, self.R = ratio, overlap, (2 if overlap else 1) * ratio
        self.kv = torch.zeros(rows, self.R, width, device=device)
        self.score = torch.zeros(rows, self.R, width, device=device)

    def pending_start(self, end: int) -> int:
        """First position the per-sequence `Pending` holds once `end` tokens are in (Compressor.advance)."""
        closed = end // self.m
        return closed * self.m - (self.m if self.overlap and closed > 0 else 0)


class LayerSlots:
    def __init__(self, cfg, layer: int, rows: int, capacity: int, device):
        ratio, csa, W = cfg.ratio(layer), cfg.is_csa(layer), cfg.window
        self.W, self.ratio = W, ratio
        self.E = capacity // ratio if ratio else 0
        self.kv = torch.zeros(rows, W + self.E + 1, cfg.head_dim, device=device)
        self.comp = _Ring(rows, ratio, csa, (2 if csa else 1) * cfg.head_dim, device) if ratio else None
        self.E4 = capacity // INDEX_RATIO if csa else 0
        self.ik = torch.zeros(rows, self.E4 + 1, cfg.index_head_dim, device=device) if csa else None
        self.icomp = _Ring(rows, INDEX_RATIO, True, 2 * cfg.index_head_dim, device) if csa else None


class StaticState:
    """Preallocated decode state of `rows` slots of up to `capacity` tokens each (see the module docstring)."""

    def __init__(self, cfg, rows: int, capacity: int, device):
        self.cfg, self.rows, self.capacity = cfg, rows, capacity
        self.layers = [LayerSlots(cfg, i, rows, capacity, device) for i in range(cfg.num_layers)]

    def attach(self, slot: int, seq) -> None:
        """Copy sequence `seq`'s main-model layer state into slot `slot` (its MTP layers are not stepped)."""
        if seq.pos >= self.capacity:
            raise ValueError(f"a sequence at position {seq.pos} does not fit a {self.capacity}-token graph state")
        for L, st in zip(self.layers, seq.layers):
            L.kv[slot, :L.W] = st.window
            if L.comp is not None:
                n = st.kv.n - L.W
                if n != seq.pos // L.ratio or st.comp_buf.retain is not None:
                    raise ValueError(f"attach: layer state holds {n} entries at position {seq.pos} (ratio "
                                     f"{L.ratio}) or is marked for a speculative step")
                L.kv[slot, L.W:L.W + n] = st.kv.view()[L.W:]
                _ring_in(L.comp, slot, st.comp_buf)
            if L.ik is not None:
                L.ik[slot, :st.index_keys.n] = st.index_keys.view()
                _ring_in(L.icomp, slot, st.index_buf)

    def detach(self, slot: int, seq, pos: int) -> None:
        """Write slot `slot` back into `seq`, which has now consumed `pos` tokens."""
        for L, st in zip(self.layers, seq.layers):
            st.window[:] = L.kv[slot, :L.W]
            if L.comp is not None:
                _rows_out(st.kv, L.kv[slot, :L.W + pos // L.ratio])
                _ring_out(L.comp, slot, st.comp_buf, pos)
            if L.ik is not None:
                _rows_out(st.index_keys, L.ik[slot, :pos // INDEX_RATIO])
                _ring_out(L.icomp, slot, st.index_buf, pos)
        seq.pos = pos


def _ring_in(ring: _Ring, slot: int, buf) -> None:
    slots = torch.arange(buf.start, buf.start + buf.n, device=ring.kv.device) % ring.R
    ring.kv[slot, slots], ring.score[slot, slots] = buf.kv, buf.score


def _ring_out(ring: _Ring, slot: int, buf, pos: int) -> None:
    start = ring.pending_start(pos)
    slots = torch.arange(start, pos, device=ring.kv.device) % ring.R
    buf.kv, buf.score, buf.start = ring.kv[slot, slots], ring.score[slot, slots], start


def _rows_out(rows, values: torch.Tensor) -> None:
    rows.reserve(values.shape[0] - rows.n)
    rows.head(values.shape[0])[:] = values
    rows.n = values.shape[0]


# ------------------------------------------------------------------ the step
def _rope(ops, dim: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """Rope.__call__ without its memo (a memo keyed on a static tensor would go stale between replays)."""
    rot = ops.apply_rope(x[..., -dim:], cos, sin, inverse=inverse)
    return torch.cat((x[..., :-dim], ops.round_act(rot)), dim=-1)


def _compress(c, ops, ring: _Ring, out: torch.Tensor, base: int, kv, score, pos, rows) -> None:
    """Compressor.advance for one token per row: write the token into its ring slot; pool the window it closes
    (every row computes; rows whose token closes none write the scratch row `out[:, -1]`)."""
    m, R, ch = c.m, ring.R, c.c
    ring.kv[rows, pos % R], ring.score[rows, pos % R] = kv, score
    w = (pos + 1) // m - 1                                                   # the window token pos would close
    tokens = ((w - 1) * m if ring.overlap else w * m)[:, None] + torch.arange(R, device=pos.device)
    valid = (tokens >= 0)[..., None]                                         # CSA window -1: empty slots
    gkv = torch.where(valid, ring.kv[rows[:, None], tokens % R], 0.0)
    gsc = torch.where(valid, ring.score[rows[:, None], tokens % R], float("-inf"))
    if ring.overlap:                                   # entry w = [window w-1 first half | window w second half]
        gkv = torch.cat((gkv[:, :m, :ch], gkv[:, m:, ch:]), dim=1)
        gsc = torch.cat((gsc[:, :m, :ch], gsc[:, m:, ch:]), dim=1)
    pooled = ops.round_act(ops.compress_pool(gkv, gsc))
    pooled = ops.round_act(ops.rms_norm(pooled, c.norm, c.eps))
    cos, sin = rope_cos_sin(c.rope.freqs, w * m)                             # RoPE at the window's start
    closes = (pos + 1) % m == 0
    pooled = torch.where(closes[:, None], c.finish(_rope(ops, c.rope.dim, pooled, cos, sin)), 0.0)
    out[rows, base + torch.where(closes, w, out.shape[1] - 1 - base)] = pooled


def _index_select(ix, ops, qr, x, cos, sin, keys, visible, rows_k: int) -> torch.Tensor:
    """The indexer's top-k for each row over its own keys [rows, N, d]: index_scores' math batched (fixed k)."""
    q = project(ops, qr, ix.wq_b).unflatten(-1, (ix.h, ix.d))
    q = ops.indexer_qat(_rope(ops, ix.rope.dim, q, cos[:, None], sin[:, None]))
    w = project(ops, x, ix.weights_proj) * ix.scale
    score = torch.einsum("bhd,bnd->bhn", q, keys).relu_()
    rnd = ops.inner_round
    if rnd is None:
        s = torch.einsum("bhn,bh->bn", score, w)
    else:
        s = rnd(rnd(rnd(score) * rnd(w)[:, :, None]).sum(1))
    return select_topk(s, visible, min(ix.topk, rows_k))


def attention(a, ops, L: LayerSlots, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention.__call__ for one token per row (x [B, d] after attn_norm, pos [B]) -> [B, d]."""
    eps, B, W, rows = a.cfg.norm_eps, x.shape[0], L.W, torch.arange(x.shape[0], device=x.device)
    cos, sin = rope_cos_sin(a.rope.freqs, pos)
    qr = ops.round_act(ops.rms_norm(project(ops, x, a.wq_a), a.q_norm, eps))
    q = project(ops, qr, a.wq_b).unflatten(-1, (a.H, a.D))
    q = _rope(ops, a.rope.dim, ops.head_norm(ops, q, eps), cos[:, None], sin[:, None])
    kv = ops.round_act(ops.rms_norm(project(ops, x, a.wkv), a.kv_norm, eps))
    L.kv[rows, pos % W] = a._kv_qat(_rope(ops, a.rope.dim, kv, cos, sin))  # the ring slot first, read in place
    tokens = pos[:, None] - W + 1 + torch.arange(W, device=x.device)
    idx = [torch.where(tokens >= 0, tokens % W, -1)]
    if a.compressor is not None:
        ckv, csc = a.compressor.inputs(x, pos)
        _compress(a.compressor, ops, L.comp, L.kv, W, ckv, csc, pos, rows)
        visible = (pos + 1) // a.ratio                                       # entries whose window closed
        if a.indexer is not None:
            ikv, isc = a.indexer.compressor.inputs(x, pos)
            _compress(a.indexer.compressor, ops, L.icomp, L.ik, 0, ikv, isc, pos, rows)
            sel = _index_select(a.indexer, ops, qr, x, cos, sin, L.ik[:, :L.E4], visible, L.E4)
        else:                                                                # HCA: every closed entry
            sel = torch.arange(L.E, device=x.device).expand(B, -1)
            sel = torch.where(sel < visible[:, None], sel, -1)
        idx.append(torch.where(sel >= 0, sel + W, -1))
    idx = torch.cat(idx, dim=1)
    n = L.kv.shape[1]                                  # each row's pool is its own slice of the flat buffer
    flat = torch.where(idx >= 0, idx + rows[:, None] * n, -1)
    o = ops.sparse_attention(q, L.kv.view(B * n, -1), flat, a.sink, a.D ** -0.5, rnd=ops.inner_round)
    o = _rope(ops, a.rope.dim, ops.round_act(o), cos[:, None], sin[:, None], inverse=True)
    z = ops.round_act(ops.group_linear(o.reshape(B, a.G, -1), a.wo_a))
    return project(ops, z.flatten(1), a.wo_b)


def dense_routed_experts(x, idx, weights, experts, limit: float, ops) -> torch.Tensor:
    """The routed experts with no data-dependent shape: every expert over every row, its routing weight zero
    where the row did not pick it (an unpicked row's product is exactly 0). E/k times the work of the
    grouped path: the graph's choice only where the experts are not bf16 / fp16 stacks."""
    out = torch.zeros_like(x)
    for e, (w1, w2, w3) in enumerate(experts):
        we = (weights * (idx == e)).sum(-1, keepdim=True)
        h = ops.round_act(ops.clamped_swiglu(project(ops, x, w1), project(ops, x, w3), limit) * we)
        out += project(ops, h, w2)
    return out


def moe(f, ops, x: torch.Tensor, ids: torch.Tensor, routed) -> torch.Tensor:
    """MoE.__call__ for one token per row (x [B, d] after ffn_norm) with the routed experts `routed`."""
    cfg = f.cfg
    hashed = f.tid2eid[ids] if f.hash else None
    idx, w = ops.moe_gate(x, f.gate_w, f.bias, hashed, cfg.experts_per_token, cfg.route_scale)
    y = routed(x, idx, w, f.experts, cfg.swiglu_limit, ops)
    if f.shared is not None:
        w1, w2, w3 = f.shared
        h = ops.round_act(ops.clamped_swiglu(project(ops, x, w1), project(ops, x, w3), cfg.swiglu_limit))
        y = y + project(ops, h, w2)
    return ops.round_act(y)


def step(model, ops, state: StaticState, ids: torch.Tensor, pos: torch.Tensor, routed) -> torch.Tensor:
    """ids / pos [B] (row b: its token and position) -> logits [B, V]; writes every row's state at pos."""
    cfg = model.cfg
    X = model.embed[ids].float()[:, None, None, :].expand(-1, 1, cfg.hc_mult, -1).contiguous()   # [B, 1, hc, d]
    for block, L in zip(model.blocks, state.layers):
        norm = lambda v, wt: ops.round_act(ops.rms_norm(v, wt, block.eps))  # noqa: E731
        x, post, comb = block.hc_attn.pre(X)
        X = block.hc_attn.post(attention(block.attn, ops, L, norm(x[:, 0], block.attn_norm), pos)[:, None],
                               X, post, comb)
        x, post, comb = block.hc_ffn.pre(X)
        X = block.hc_ffn.post(moe(block.ffn, ops, norm(x[:, 0], block.ffn_norm), ids, routed)[:, None], X, post, comb)
    return model.head(X)[:, 0]
