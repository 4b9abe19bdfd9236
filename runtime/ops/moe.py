"""Reference ops: mixture-of-experts routing and clamped-SwiGLU experts, float32 (spec §12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import project


def moe_gate(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None, hash_experts: torch.Tensor | None,
             k: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick k experts per token and their combine weights.

    x [T, d]; gate_w [E, d]. Affinity s = sqrt(softplus(x @ gate_w.T)). Hash layers take the experts from the
    token-id table (`hash_experts` [T, k]); learned layers take top-k of s + bias (bias for selection only).
    Weights are the chosen affinities, renormalised to sum 1, times route_scale. -> (idx [T, k], w [T, k])
    """
    s = torch.sqrt(F.softplus(x @ gate_w.T))
    if hash_experts is not None:
        idx = hash_experts
    else:
        # Stable descending sort: equal scores pick the lower expert id, deterministically.
        idx = torch.sort(s + bias, dim=-1, descending=True, stable=True).indices[:, :k]
    w = s.gather(-1, idx)
    return idx, w / w.sum(-1, keepdim=True) * route_scale


def clamped_swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(g, limit)) * clamp(u, -limit, limit)."""
    return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)


def routed_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts, limit: float,
                   ops) -> torch.Tensor:
    """sum_k w_k * expert_{idx_k}(x), with the routing weight applied before w2 (as the official code).

    x [T, d]; idx, weights [T, k]; `experts` is a sequence of (w1, w2, w3) `Linear`s. The experts' linears
    and activation rounding are the table's (`ops`), so the same grouping runs under every numerics mode and
    on every backend. Tokens are grouped per expert. -> [T, d]
    """
    out = torch.zeros_like(x)
    flat_e, flat_w = idx.flatten(), weights.flatten()
    tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(idx.shape[1])
    for e in torch.unique(flat_e).tolist():
        sel = flat_e == e
        t = tok[sel]
        w1, w2, w3 = experts[e]
        h = ops.round_act(ops.clamped_swiglu(project(ops, x[t], w1), project(ops, x[t], w3), limit)
                          * flat_w[sel, None])
        out.index_add_(0, t, project(ops, h, w2))
    return out
