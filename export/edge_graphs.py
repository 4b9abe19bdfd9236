"""The edge variant's two static graphs (export/edge.py): `Prefill` (ids [B, S] from position 0 -> logits and the
decode state) and `Decode` (one token per sequence at its own position, the whole state in and out). State
layout: export/format.py (names, shapes) and export/graph.py (what each tensor holds)."""

from __future__ import annotations

import torch

from .format import INDEXER_RATIO, index_tap_names, state_names
from .graph import NEG_INF, V4Graph, _ring_rows

class Prefill(V4Graph):
    def forward(self, ids: torch.Tensor):
        cfg = self.cfg
        B, S = ids.shape
        pos = torch.arange(S, device=ids.device)[None, :]                              # [1, S]
        state: dict[str, torch.Tensor] = {}
        X = self._embed(ids)
        for i in range(cfg.num_layers):
            X = self._block(i, X, ids, lambda x, i=i: self._attention(i, x, pos, S, state))
        return (self._head(X), *[state[n] for n in state_names(cfg)], *[state[n] for n in index_tap_names(cfg)])

    def _entries(self, P: str, x, pos, S, m: int, overlap: bool, c: int, freqs, state, ring: tuple[str, str]):
        """Entries of every window the chunk touches ([B, ceil(S / m), c]; a last, unfinished window's entry is
        finite garbage that no query sees and the decode step overwrites when it closes) and the compressor ring.
        Padding to whole windows keeps the graph free of shape guards on S."""
        B = x.shape[0]
        kv, sc = self._proj(P, x, pos[0], m)                                           # [B, S, coff*c]
        nw = (S + m - 1) // m
        X, pad = kv.shape[-1], nw * m - S
        zeros = kv.new_zeros(B, pad, X)                  # Concat, not Pad: ONNX's version converter has no
        kv_w = torch.cat((kv, zeros), dim=1).reshape(B, nw, m, X)      # Pad-18 -> 17 path (edge opsets)
        sc_w = torch.cat((sc, zeros), dim=1).reshape(B, nw, m, X)
        if overlap:                                                                    # window -1: empty slots
            kv_w = torch.cat((torch.zeros_like(kv_w[:, :1]), kv_w), dim=1)
            sc_w = torch.cat((torch.full_like(sc_w[:, :1], NEG_INF), sc_w), dim=1)
        start = (torch.arange(nw, device=x.device) * m)[None, :]
        R = (2 if overlap else 1) * m
        state[ring[0]], state[ring[1]] = _ring_rows(kv, S, R, 0.0), _ring_rows(sc, S, R, NEG_INF)
        return self._compress_entries(kv_w, sc_w, overlap, c, start, freqs, f"{P}.norm.weight")

    def _attention(self, i: int, x, pos, S, state):
        cfg, L = self.cfg, f"layers.{i}"
        B, m, W = x.shape[0], cfg.ratio(i), cfg.window
        freqs = getattr(self, f"freqs{i}")
        q, qr, kv = self._qkv(L, x, pos, freqs)
        state[f"L{i}.win"] = _ring_rows(kv, S, W, 0.0)
        t = pos[0][:, None] - W + 1 + torch.arange(W, device=x.device)[None, :]         # [S, W] window positions
        idx = torch.where(t >= 0, t, -1).expand(B, -1, -1)
        pool = kv
        if m:
            csa = cfg.is_csa(i)
            comp = self._entries(f"{L}.attn.compressor", x, pos, S, m, csa, cfg.head_dim, freqs, state,
                                 (f"L{i}.ckv", f"L{i}.csc"))
            state[f"L{i}.comp"] = comp
            visible = ((pos[0] + 1) // m)[None, :].expand(B, -1)                      # [B, S]
            if csa:
                iq, iw = self._indexer_q(L, qr, x, pos, freqs)
                ikeys = self._entries(f"{L}.attn.indexer.compressor", x, pos, S, INDEXER_RATIO, True,
                                      cfg.index_head_dim, freqs, state, (f"L{i}.ikv", f"L{i}.isc"))
                state[f"L{i}.ikeys"] = ikeys
                sel = torch.ops.dsv4.indexer_topk(iq, iw, ikeys, visible, cfg.index_topk)
                state[f"L{i}.indexer.topk"] = sel
            else:
                n = torch.arange(comp.shape[1], device=x.device)
                sel = torch.where(n[None, None, :] < visible[..., None], n, -1)      # [B, S, nw]
            pool = torch.cat((kv, comp), dim=1)
            idx = torch.cat((idx, torch.where(sel >= 0, sel + S, -1)), dim=-1)
        return self._attend(L, x, q, pool, idx, pos, freqs)


class Decode(V4Graph):
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, *state_in: torch.Tensor):
        """ids [B, 1] at positions pos [B] (tokens already consumed) + the state -> logits [B, 1, V] + state."""
        cfg = self.cfg
        state = dict(zip(state_names(cfg), state_in))
        X = self._embed(ids)
        for i in range(cfg.num_layers):
            X = self._block(i, X, ids, lambda x, i=i: self._attention(i, x, pos, state))
        return (self._head(X), *[state[n] for n in state_names(cfg)])

    def _entry(self, P: str, x, pos, m: int, overlap: bool, c: int, freqs, state, ring: tuple[str, str]):
        """Write the token's projections into the ring; the entry of its window [B, 1, c] (complete or not)."""
        R = (2 if overlap else 1) * m
        kv1, sc1 = self._proj(P, x, pos[:, None], m)                                   # [B, 1, X]
        hot = (torch.arange(R, device=x.device)[None, :] == (pos % R)[:, None])[..., None]
        kv, sc = torch.where(hot, kv1, state[ring[0]]), torch.where(hot, sc1, state[ring[1]])
        state[ring[0]], state[ring[1]] = kv, sc
        w = pos // m
        offs = torch.arange(m, device=x.device)[None, :]

        def window(k):                                                                 # rows of window w + k
            p = (w[:, None] + k) * m + offs                                            # [B, m]
            slot = torch.remainder(p, R)[..., None].expand(-1, -1, kv.shape[-1])
            return (torch.gather(kv, 1, slot),
                    torch.where((p >= 0)[..., None], torch.gather(sc, 1, slot), NEG_INF))
        if overlap:
            (kp, sp), (kc, scur) = window(-1), window(0)
            kv_w, sc_w = torch.stack((kp, kc), dim=1), torch.stack((sp, scur), dim=1)  # [B, 2, m, X]
        else:
            kc, scur = window(0)
            kv_w, sc_w = kc[:, None], scur[:, None]
        return self._compress_entries(kv_w, sc_w, overlap, c, (w * m)[:, None], freqs, f"{P}.norm.weight")

    @staticmethod
    def _keep(cache, entry, pos, m: int):
        """cache [B, N, c] with row pos // m set to `entry` where the token closed its window."""
        rows = torch.arange(cache.shape[1], device=cache.device)[None, :]
        hit = (rows == (pos // m)[:, None]) & ((pos + 1) % m == 0)[:, None]
        return torch.where(hit[..., None], entry, cache)

    def _attention(self, i: int, x, pos, state):
        cfg, L = self.cfg, f"layers.{i}"
        m, W = cfg.ratio(i), cfg.window
        freqs = getattr(self, f"freqs{i}")
        p = pos[:, None]                                                               # [B, 1]
        q, qr, kv = self._qkv(L, x, p, freqs)
        j = torch.arange(W, device=x.device)[None, :]
        win = torch.where((j == (pos % W)[:, None])[..., None], kv, state[f"L{i}.win"])
        state[f"L{i}.win"] = win
        held = p - torch.remainder(p - j, W)                                           # position in slot j
        idx = torch.where(held >= 0, j, -1)[:, None, :]                                # [B, 1, W]
        pool = win
        if m:
            csa = cfg.is_csa(i)
            entry = self._entry(f"{L}.attn.compressor", x, pos, m, csa, cfg.head_dim, freqs, state,
                                (f"L{i}.ckv", f"L{i}.csc"))
            comp = self._keep(state[f"L{i}.comp"], entry, pos, m)
            state[f"L{i}.comp"] = comp
            visible = ((pos + 1) // m)[:, None]                                        # [B, 1]
            if csa:
                iq, iw = self._indexer_q(L, qr, x, p, freqs)
                ie = self._entry(f"{L}.attn.indexer.compressor", x, pos, INDEXER_RATIO, True, cfg.index_head_dim,
                                 freqs, state, (f"L{i}.ikv", f"L{i}.isc"))
                ikeys = self._keep(state[f"L{i}.ikeys"], ie, pos, INDEXER_RATIO)
                state[f"L{i}.ikeys"] = ikeys
                sel = torch.ops.dsv4.indexer_topk(iq, iw, ikeys, visible, cfg.index_topk)
            else:
                n = torch.arange(comp.shape[1], device=x.device)
                sel = torch.where(n[None, None, :] < visible[..., None], n, -1)       # [B, 1, N]
            pool = torch.cat((win, comp), dim=1)
            idx = torch.cat((idx, torch.where(sel >= 0, sel + W, -1)), dim=-1)
        return self._attend(L, x, q, pool, idx, p, freqs)
