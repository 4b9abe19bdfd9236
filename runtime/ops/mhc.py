"""Reference ops: manifold-constrained hyper-connections (mHC), float32 (spec §6).

The residual stream of every token is `hc` parallel copies X [hc, d]. Each sub-block reads a weighted mix of
the copies (`hc_pre`) and writes its output back with a doubly-stochastic mixing matrix (`hc_post`); the model
ends with `hc_head`, a sigmoid-weighted collapse to one stream.
"""

from __future__ import annotations

import torch


def _mix(X: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(flatten(X) @ fn.T) * rsqrt(mean(flatten(X)^2) + eps): X [T, hc, d] -> [T, rows(fn)]."""
    xf = X.flatten(-2)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)
    return (xf @ fn.T) * r


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
           norm_eps: float, sinkhorn_iters: int):
    """X [T, hc, d] -> (x [T, d], post [T, hc], comb [T, hc, hc]).

    The (2+hc)*hc mixes are ordered [pre(hc), post(hc), comb(hc*hc row-major)].
    pre = sigmoid(.)+eps; post = 2*sigmoid(.) (no eps); comb = row softmax + eps, then Sinkhorn starting
    with a column normalisation and ending on one (iters-1 further row/column rounds).
    """
    return hc_pre_from_mix(X, _mix(X, fn, norm_eps), base, scale, hc_eps, sinkhorn_iters)


def hc_pre_from_mix(X: torch.Tensor, mix: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
                    sinkhorn_iters: int):
    """hc_pre after its mixes: X [T, hc, d], mix [T, (2+hc)*hc] -> (x, post, comb)."""
    hc = X.shape[-2]
    pre = torch.sigmoid(mix[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(mix[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (mix[:, 2 * hc:] * scale[2] + base[2 * hc:]).view(-1, hc, hc)
    comb = torch.softmax(comb, dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    x = torch.einsum("th,thd->td", pre, X)
    return x, post, comb


def hc_post(x: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X_new[j] = post[j] * x + sum_i comb[i, j] * res[i]  (note: comb transposed).  -> [T, hc, d]"""
    return post[..., None] * x[:, None, :] + torch.einsum("tij,tid->tjd", comb, res)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """Collapse X [T, hc, d] -> [T, d] with weights sigmoid(mix * scale + base) + eps."""
    w = torch.sigmoid(_mix(X, fn, norm_eps) * scale[0] + base) + hc_eps
    return torch.einsum("th,thd->td", w, X)
