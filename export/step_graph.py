"""The `Step` graph: S tokens per sequence, each sequence continuing from its own position, the state before the
chunk in, the logits and the state after it out. One graph serves a prefill from position 0 (an empty state),
a prefill in fixed chunks (cost per token and workspace bounded by the chunk, not by the prompt), ragged
continued chunks, and (S = 1) the decode step: as fast as a graph specialised to S = 1 (measured), and one
export instead of two.

Inputs: ids [B, S], start [B] (tokens each sequence has consumed), then per layer the state of export/graph.py,
with one difference (export/format.py names and sizes them): the compressed caches `comp` / `ikeys` are fed with only their live rows, at least
`fed_rows(start, S, m)` of them (closed entries, then room for the entries this chunk writes); rows past a
sequence's position are never read (a ragged batch pads them with anything).
Outputs: logits [B, S, V]; per layer the rings (`win`, `ckv` / `csc`, `ikv` / `isc`) after the chunk, and for
the compressed caches only this chunk's entries `comp.new` / `ikeys.new` [B, windows(S, m), c]: entry k is
entry start // m + k (an unfinished window's entry is finite garbage that no query sees; it is overwritten
when its window closes), which the runner writes into its arrays in place, so no step copies a cache out;
then each CSA layer's indexer top-k [B, S, min(topk, rows fed)] (for parity).
"""

from __future__ import annotations

import torch

from .format import INDEXER_RATIO, output_names, state_names, windows
from .graph import NEG_INF, V4Graph


def _batch_rows(x, idx):
    """x [B, N, X] rows named per sequence by idx [B, ...] (-1 padding reads row 0) -> [B, ..., X], as one
    Gather over the flattened batch."""
    B, N = x.shape[:2]
    offset = (torch.arange(B, device=x.device) * N).view(B, *(1,) * (idx.dim() - 1))
    return x.flatten(0, 1)[idx.clamp(min=0) + offset]


def _ring(old, new, start, R: int):
    """Ring [B, R, X] (position p in slot p % R) after appending rows new [B, S, X] at positions start + s."""
    S = new.shape[1]
    last = (start + S - 1)[:, None]                                                  # [B, 1]
    j = torch.arange(R, device=new.device)[None, :]
    q = last - torch.remainder(last - j, R)                                          # newest position in slot j
    src = torch.where(q >= start[:, None], R + q - start[:, None], j)               # a chunk row, or kept
    return torch.gather(torch.cat((old, new), dim=1), 1, src[..., None].expand(-1, -1, new.shape[-1]))


class Step(V4Graph):
    sparse_moe = True

    def forward(self, ids: torch.Tensor, start: torch.Tensor, *state_in: torch.Tensor):
        cfg = self.cfg
        S = ids.shape[1]
        pos = start[:, None] + torch.arange(S, device=ids.device)[None, :]          # [B, S]
        state = dict(zip(state_names(cfg), state_in))
        out: dict[str, torch.Tensor] = {}
        X = self._embed(ids)
        for i in range(cfg.num_layers):
            X = self._block(i, X, ids, lambda x, i=i: self._attention(i, x, start, pos, state, out))
        return (self._head(X), *[out[n] for n in output_names(cfg)])

    def _entries(self, P: str, x, start, pos, m: int, overlap: bool, c: int, freqs, state, rings, out):
        """This chunk's entries [B, nw, c] of windows start // m + k, and the compressor rings after it.
        Each window's rows are gathered from [ring, chunk, pad]: positions before the chunk come from the ring
        (it holds the last R), positions before 0 are empty (value 0, score -inf: the reference's first
        overlap half), positions after the chunk are finite padding (value 0, score 0)."""
        B, S = x.shape[:2]
        R, ov = (2 if overlap else 1) * m, (1 if overlap else 0)
        kv, sc = self._proj(P, x, pos, m)                                             # [B, S, X]
        ring_kv, ring_sc = state[rings[0]], state[rings[1]]
        out[f"{rings[0]}.out"], out[f"{rings[1]}.out"] = _ring(ring_kv, kv, start, R), _ring(ring_sc, sc, start, R)
        nw = windows(S, m)
        w0 = (start // m)[:, None]                                                    # [B, 1]
        p = (w0 - ov) * m + torch.arange((nw + ov) * m, device=x.device)[None, :]     # [B, U] positions
        st = start[:, None]
        src = torch.where(p >= st + S, R + S,
                          torch.where(p >= st, R + p - st, torch.where(p >= 0, torch.remainder(p, R), R + S + 1)))
        zero = kv.new_zeros(B, 1, kv.shape[-1])
        kv_src = torch.cat((ring_kv, kv, zero, zero), dim=1)
        sc_src = torch.cat((ring_sc, sc, zero, torch.full_like(zero, NEG_INF)), dim=1)
        g = src[..., None].expand(-1, -1, kv.shape[-1])
        shape = (B, nw + ov, m, kv.shape[-1])
        kv_w, sc_w = torch.gather(kv_src, 1, g).view(shape), torch.gather(sc_src, 1, g).view(shape)
        rows = w0 + torch.arange(nw, device=x.device)[None, :]                        # [B, nw] cache rows
        entries = self._compress_entries(kv_w, sc_w, overlap, c, rows * m, freqs, f"{P}.norm.weight")
        return entries, rows

    def _attention(self, i: int, x, start, pos, state, out):
        cfg, L = self.cfg, f"layers.{i}"
        m, W = cfg.ratio(i), cfg.window
        B, S = x.shape[:2]
        freqs = getattr(self, f"freqs{i}")
        q, qr, kv = self._qkv(L, x, pos, freqs)
        old = state[f"L{i}.win"]
        out[f"L{i}.win.out"] = _ring(old, kv, start, W)
        # window rows: the ring before the chunk (slots 0..W-1), then the chunk's own rows (W + s)
        t = pos[..., None] - W + 1 + torch.arange(W, device=x.device)                # [B, S, W] positions
        st = start[:, None, None]
        idx = torch.where(t >= st, W + t - st, torch.where(t >= 0, torch.remainder(t, W), -1))
        pool = torch.cat((old, kv), dim=1)
        if m:
            csa = cfg.is_csa(i)
            entries, rows = self._entries(f"{L}.attn.compressor", x, start, pos, m, csa, cfg.head_dim, freqs, state,
                                          (f"L{i}.ckv", f"L{i}.csc"), out)
            out[f"L{i}.comp.new"] = entries
            visible = (pos + 1) // m                                                  # [B, S]
            comp = state[f"L{i}.comp"]
            if csa:
                iq, iw = self._indexer_q(L, qr, x, pos, freqs)
                ie, irows = self._entries(f"{L}.attn.indexer.compressor", x, start, pos, INDEXER_RATIO, True,
                                          cfg.index_head_dim, freqs, state, (f"L{i}.ikv", f"L{i}.isc"), out)
                out[f"L{i}.ikeys.new"] = ie
                keys = state[f"L{i}.ikeys"]
                keys = keys.scatter(1, irows[..., None].expand(-1, -1, keys.shape[-1]), ie)
                sel = torch.ops.dsv4.indexer_topk(iq, iw, keys, visible, cfg.index_topk)
                out[f"L{i}.indexer.topk"] = sel
                # pool = [ring, chunk, this chunk's entries, the selected cache rows]: a selected entry comes from
                # this chunk's entries if the chunk wrote its row, else from the cache, which is never copied
                K, nw = sel.shape[-1], rows.shape[1]
                picked = _batch_rows(comp, sel.flatten(1))                            # [B, S*K, D]
                pool = torch.cat((pool, entries, picked), dim=1)
                slot = W + S + nw + torch.arange(S * K, device=x.device).view(1, S, K)
                w0 = rows[:, :1, None]
                idx = torch.cat((idx, torch.where(sel < 0, -1, torch.where(sel >= w0, W + S + sel - w0, slot))), dim=-1)
            else:
                cache = comp.scatter(1, rows[..., None].expand(-1, -1, comp.shape[-1]), entries)
                return self._attend(L, x, q, None, None, pos, freqs, self._hca(L, q, pool, idx, cache, visible))
        return self._attend(L, x, q, pool, idx, pos, freqs)

    def _hca(self, L: str, q, win, idx, cache, visible):
        """SparseAttention's softmax for an HCA layer, which attends to every visible entry: the window rows
        gathered per query (idx [B, S, W] into win), the entries with one dense MatMul over the whole cache under
        a visibility mask; a per-query gather of ~all entries costs ~3x more at 16K tokens."""
        B, S, H, D = q.shape
        W, N = idx.shape[-1], cache.shape[1]
        scale, sink = self.cfg.head_dim ** -0.5, self.w(f"{L}.attn.attn_sink")
        rows = _batch_rows(win, idx)                                                  # [B, S, W, D]
        s_win = torch.matmul(q, rows.transpose(-1, -2)) * scale + torch.where(idx < 0, NEG_INF, 0.0)[:, :, None]
        s_ent = torch.matmul(q.reshape(B, S * H, D), cache.transpose(1, 2)).view(B, S, H, N) * scale
        seen = torch.arange(N, device=q.device) < visible[..., None]                  # [B, S, N]
        s_ent = s_ent + torch.where(seen, 0.0, NEG_INF)[:, :, None]
        p = torch.softmax(torch.cat((s_win, s_ent, sink.view(1, 1, H, 1).expand(B, S, H, 1)), dim=-1), dim=-1)
        o = torch.matmul(p[..., :W], rows)                                            # [B, S, H, D]
        return o + torch.matmul(p[..., W:W + N].reshape(B, S * H, N), cache).view(B, S, H, D)
