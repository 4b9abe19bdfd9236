"""Reference ops: gathered sparse attention with sinks, and the lightning indexer's top-k (float32).

Both work per sequence on explicit index lists, never on dense [S, S] or [S, S/ratio] masks: a query attends
to exactly the KV rows its index list names (window rows plus selected compressed rows), so cost grows with
the number of selected rows, not with the context. Queries are processed in blocks to bound memory.
"""

from __future__ import annotations

import torch

QUERY_BLOCK = 256


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of each query over its own gathered KV rows, with a per-head sink in the denominator.

    q [T, H, D]; kv [N, D] (K = V, one shared head); idx [T, K] int64 rows of kv, -1 = padding;
    sink [H]. Returns o [T, H, D]:  p_j = exp(s_j) / (sum_j exp(s_j) + exp(sink_h)),  o = sum_j p_j kv_j.
    """
    out = torch.empty_like(q)
    for s in range(0, q.shape[0], QUERY_BLOCK):
        qb, ib = q[s:s + QUERY_BLOCK], idx[s:s + QUERY_BLOCK]
        rows = kv[ib.clamp(min=0)]                                   # [t, K, D]
        scores = torch.einsum("thd,tkd->thk", qb, rows) * scale      # [t, H, K]
        scores = scores.masked_fill((ib < 0)[:, None, :], float("-inf"))
        sinks = sink.view(1, -1, 1).expand(scores.shape[0], -1, 1)
        lse = torch.logsumexp(torch.cat((scores, sinks), dim=-1), dim=-1, keepdim=True)
        p = torch.exp(scores - lse)                                  # the sink's share is dropped
        out[s:s + QUERY_BLOCK] = torch.einsum("thk,tkd->thd", p, rows)
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                 k: int) -> torch.Tensor:
    """Lightning-indexer selection of compressed entries for each query.

    q [T, h, d] indexer queries; weights [T, h] per-head weights (scaling already applied); keys [N, d]
    indexer-compressed keys; visible [T] = how many leading entries each query may see (causality).
    score[t, s] = sum_h weights[t, h] * relu(q[t, h] . keys[s]).
    Returns [T, k] int64 entry ids, best first, ties broken lower-index-first, -1 where fewer are visible.
    """
    T, N = q.shape[0], keys.shape[0]
    out = torch.full((T, k), -1, dtype=torch.int64, device=q.device)
    if N == 0 or k == 0:
        return out
    for s in range(0, T, QUERY_BLOCK):
        qb, wb, vb = q[s:s + QUERY_BLOCK], weights[s:s + QUERY_BLOCK], visible[s:s + QUERY_BLOCK]
        score = torch.einsum("thd,nd->thn", qb, keys).relu_()
        score = torch.einsum("thn,th->tn", score, wb)
        order = select_topk(score, vb, k)
        out[s:s + QUERY_BLOCK, :order.shape[1]] = order
    return out


def select_topk(score: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The indexer's selection from full scores [t, N]: entries at or past `visible[t]` are masked; the best
    min(k, N) ids, best first; -1 where fewer are visible."""
    arange = torch.arange(score.shape[1], device=score.device)
    score = score.masked_fill(arange[None, :] >= visible[:, None], float("-inf"))
    # A stable descending sort keeps equal scores in index order: deterministic, lower index first.
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    kk = order.shape[1]
    ok = torch.arange(kk, device=score.device)[None, :] < visible[:, None].clamp(max=kk)
    return torch.where(ok, order, torch.full_like(order, -1))
