"""V4 mixture of experts: hash or learned routing, clamped-SwiGLU routed and shared experts (spec §12)."""

from __future__ import annotations

import torch

from ..taps import tap
from .params import Params, project


class MoE:
    def __init__(self, p: Params, cfg, layer: int, ops):
        self.cfg, self.ops, self.name = cfg, ops, f"L{layer}"
        self.gate_w = p("gate.weight")                                          # [E, d]
        self.hash = cfg.is_hash_layer(layer)
        self.tid2eid = p("gate.tid2eid") if self.hash else None                # [vocab, k] int64
        self.bias = None if self.hash else p("gate.bias")                       # [E]
        self.par = p.parallel                  # EP: this rank's whole experts, `local` ids (all on one device)
        self.local = self.par.layout.experts(self.par.rank, cfg.n_routed_experts)
        self.experts = [tuple(p.linear(f"experts.{e}.{w}") for w in ("w1", "w2", "w3")) for e in self.local]
        self.shared = tuple(p.linear(f"shared_experts.{w}") for w in ("w1", "w2", "w3")) \
            if cfg.n_shared_experts else None

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] (after ffn_norm), ids [B, S] token ids (hash routing needs them) -> [B, S, d]."""
        ops, cfg = self.ops, self.cfg
        xt = x.reshape(-1, x.shape[-1])
        hashed = self.tid2eid[ids.reshape(-1)] if self.hash else None
        idx, w = ops.moe_gate(xt, self.gate_w, self.bias, hashed, cfg.experts_per_token, cfg.route_scale)
        tap(f"{self.name}.moe.route", idx)
        y = self.par.routed_experts(ops, xt, idx, w, self.experts, cfg.swiglu_limit, self.local)
        if self.shared is not None:
            w1, w2, w3 = self.shared
            h = ops.round_act(ops.clamped_swiglu(project(ops, xt, w1), project(ops, xt, w3), cfg.swiglu_limit))
            y = y + project(ops, h, w2)
        y = ops.round_act(y).view_as(x)
        tap(f"{self.name}.moe.out", y)
        return y
