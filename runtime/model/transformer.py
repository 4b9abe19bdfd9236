"""The DeepSeek-V4 model, root of the graph: embedding -> blocks -> hc_head -> norm -> head (spec §5, §13).

Every block is [hc_pre -> attn_norm -> attention -> hc_post] then [hc_pre -> ffn_norm -> MoE -> hc_post] on
a residual of `hc_mult` parallel streams. The MTP block (next-token-plus-one draft head) is loaded and
runnable; it shares the embedding and the output head.
"""

from __future__ import annotations

import torch

from .attention import Attention
from .moe import MoE
from .params import Params, project
from ..taps import tap
from .state import DecodeState, SequenceState


class HyperConnection:
    """hc_pre / hc_post parameters of one sub-block (`hc_attn_*` or `hc_ffn_*`)."""

    def __init__(self, p: Params, name: str, cfg, ops):
        self.fn, self.base, self.scale = p(f"hc_{name}_fn"), p(f"hc_{name}_base"), p(f"hc_{name}_scale")
        self.cfg, self.ops = cfg, ops

    def pre(self, X: torch.Tensor):
        """X [B, S, hc, d] -> x [B, S, d], post, comb."""
        c = self.cfg
        x, post, comb = self.ops.hc_pre(X.flatten(0, 1), self.fn, self.base, self.scale, c.hc_eps,
                                        c.norm_eps, c.hc_sinkhorn_iters)
        return self.ops.round_act(x).view(X.shape[0], X.shape[1], -1), post, comb

    def post(self, y: torch.Tensor, res: torch.Tensor, post, comb) -> torch.Tensor:
        X = self.ops.hc_post(y.flatten(0, 1), res.flatten(0, 1), post, comb)
        return self.ops.round_act(X).view_as(res)


class Block:
    def __init__(self, p: Params, cfg, layer: int, ops):
        self.layer, self.ops, self.eps = layer, ops, cfg.norm_eps
        self.attn_norm, self.ffn_norm = p("attn_norm.weight"), p("ffn_norm.weight")
        self.hc_attn, self.hc_ffn = HyperConnection(p, "attn", cfg, ops), HyperConnection(p, "ffn", cfg, ops)
        self.attn, self.ffn = Attention(p.sub("attn"), cfg, layer, ops), MoE(p.sub("ffn"), cfg, layer, ops)

    def __call__(self, X, ids, positions, starts, states):
        """X [B, S, hc, d], ids / positions [B, S], starts[b] = positions[b, 0] -> [B, S, hc, d]. A one-token
        step goes through the table's `decode_block` (its reference is `forward_ops`; a backend may fuse it)."""
        if X.shape[1] == 1:
            return self.ops.decode_block(self, X, ids, positions, starts, states)
        return self.forward_ops(X, ids, positions, starts, states)

    def forward_ops(self, X, ids, positions, starts, states):
        """The per-op path: hc_pre, attention, hc_post, hc_pre, MoE, hc_post, each through the table."""
        norm = lambda x, w: self.ops.round_act(self.ops.rms_norm(x, w, self.eps))  # noqa: E731
        layer_states = [s.layers[self.layer] for s in states]
        x, post, comb = self.hc_attn.pre(X)
        X = self.hc_attn.post(self.attn(norm(x, self.attn_norm), positions, starts, layer_states), X, post, comb)
        tap(f"L{self.layer}.hc.attn_post", X)
        x, post, comb = self.hc_ffn.pre(X)
        X = self.hc_ffn.post(self.ffn(norm(x, self.ffn_norm), ids), X, post, comb)
        tap(f"L{self.layer}.hc.post", X)
        return X


class Head:
    """hc_head collapse -> final RMSNorm -> vocabulary projection, all float32."""

    def __init__(self, p: Params, head_w: torch.Tensor, cfg, ops, norm_name: str = "norm.weight"):
        self.fn, self.base, self.scale = p("hc_head_fn"), p("hc_head_base"), p("hc_head_scale")
        self.norm, self.head_w, self.cfg, self.ops = p(norm_name), head_w, cfg, ops
        self.par = p.parallel                                 # vocab-parallel: this rank's rows of the head

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        c, ops = self.cfg, self.ops
        y = ops.hc_head(X.flatten(0, 1), self.fn, self.base, self.scale, c.hc_eps, c.norm_eps)
        y = ops.round_act(ops.rms_norm(ops.round_act(y), self.norm, c.norm_eps))
        logits = self.par.gather_vocab(ops.linear(y, self.head_w), c.vocab_size)
        return logits.view(X.shape[0], X.shape[1], -1)


class MTPBlock:
    """Multi-token-prediction block `mtp.{i}`: predicts the token after next from the main model's final
    residual streams and the embedding of the next token (V3 convention; spec §13)."""

    def __init__(self, p: Params, cfg, layer: int, embed: torch.Tensor, head_w: torch.Tensor, ops):
        self.ops, self.eps, self.embed = ops, cfg.norm_eps, embed
        self.enorm, self.hnorm = p("enorm.weight"), p("hnorm.weight")
        self.e_proj, self.h_proj = p.linear("e_proj"), p.linear("h_proj")
        self.block = Block(p, cfg, layer, ops)
        self.head = Head(p, head_w, cfg, ops)

    def __call__(self, X: torch.Tensor, next_ids: torch.Tensor, positions, starts, states) -> torch.Tensor:
        ops = self.ops
        e = ops.round_act(ops.rms_norm(self.embed[next_ids].float(), self.enorm, self.eps))   # [B, S, d]
        h = ops.round_act(ops.rms_norm(X, self.hnorm, self.eps))                          # [B, S, hc, d]
        x = project(ops, e, self.e_proj)[:, :, None, :] + project(ops, h, self.h_proj)
        return self.head(self.block(ops.round_act(x), next_ids, positions, starts, states))


class Transformer:
    def __init__(self, cfg, tensors, quantized, ops, parallel=None):
        p = Params(tensors, frozenset(quantized), parallel=parallel)
        self.cfg, self.ops, self.parallel = cfg, ops, p.parallel
        self.embed = p.parallel.embed(p("embed.weight"), cfg.vocab_size)                  # [V, d] lookup
        self.device = self.embed.device                  # every weight and state tensor lives here
        self.blocks = [Block(p.sub(f"layers.{i}"), cfg, i, ops) for i in range(cfg.num_layers)]
        self.head = Head(p, p("head.weight"), cfg, ops)
        self.mtp = [MTPBlock(p.sub(f"mtp.{i}"), cfg, cfg.num_layers + i, self.embed, p("head.weight"), ops)
                    for i in range(cfg.num_mtp)]

    def forward(self, ids: torch.Tensor, seqs: list[SequenceState], return_hidden: bool = False):
        """ids [B, S] continuing each of the B sequences `seqs` (each at its own position) -> logits
        [B, S, V] float32 (and the final residual streams [B, S, hc, d] if asked, for the MTP block)."""
        B, S = ids.shape
        ids, starts = ids.to(self.device), [s.pos for s in seqs]
        positions = self._positions(starts, S)                                              # [B, S]
        X = self.embed[ids].float()[:, :, None, :].expand(-1, -1, self.cfg.hc_mult, -1).contiguous()
        for block in self.blocks:
            X = block(X, ids, positions, starts, seqs)
        for s in seqs:
            s.pos += S
        logits = self.head(X)
        tap("final.logits", logits)
        return (logits, X) if return_hidden else logits

    def new_state(self, batch_size: int, context: int = 0) -> DecodeState:
        """Fresh state for `batch_size` sequences, with room for `context` tokens reserved up front."""
        return DecodeState(self.cfg, batch_size, self.device, context)

    def _positions(self, starts: list[int], S: int) -> torch.Tensor:
        """[B, S] int64 positions starts[b] + 0..S-1, on the model's device."""
        return torch.tensor(starts, device=self.device)[:, None] + torch.arange(S, device=self.device)[None, :]

    def forward_mtp(self, X: torch.Tensor, next_ids: torch.Tensor, seqs: list[SequenceState], i: int = 0):
        """MTP block i on final residual streams X [B, S, hc, d] of positions p..p+S-1 and the ids of the
        tokens that follow them [B, S] -> logits [B, S, V] for the token after those. Its own window state
        lives in each sequence's layer slot num_layers + i; positions are the streams' positions."""
        starts, next_ids = [s.mtp_pos for s in seqs], next_ids.to(self.device)
        logits = self.mtp[i](X, next_ids, self._positions(starts, next_ids.shape[1]), starts, seqs)
        for s in seqs:
            s.mtp_pos += next_ids.shape[1]
        return logits
