"""Reference ops: gathered sparse attention with sinks, and the lightning indexer's top-k (float32).

Both work per sequence on explicit index lists, never on dense [S, S] or [S, S/ratio] masks: a query attends
to exactly the KV rows its index list names (window rows plus selected compressed rows), so cost grows with
the number of selected rows, not with the context. Queries are processed in blocks to bound memory.

Both take `rnd`: None (float32 inside the op; every mode but `official`), or the rounding of the points where
DeepSeek's code rounds inside the op (`official`: bf16, see runtime/ops/numerics.py). `kernel_probs` and
`index_scores` are those points, shared by every implementation that honours them.
"""

from __future__ import annotations

import torch

QUERY_BLOCK = 256
KERNEL_BLOCK = 64     # index slots per step of the online softmax in DeepSeek's `sparse_attn` kernel


def kernel_probs(scores: torch.Tensor, sink: torch.Tensor, rnd) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities DeepSeek's `sparse_attn` multiplies V with, and its denominator.

    scores [t, H, K] float32 (scaled q.k, -inf = padding), sink [H]. The kernel walks the K slots in blocks of
    64 with a running max m_b (the max over blocks 0..b): it stores e = exp(s - m_b) in float32, adds e to the
    float32 running sum, casts e to bf16 (`rnd`) for the P.V GEMM and rescales both accumulators by
    exp(m_prev - m_b) per step; after the last block it adds exp(sink - m) to the sum and divides the float32
    output by it. So p_j = rnd(exp(s_j - m_b(j))) * exp(m_b(j) - m) and
    denom = sum_j exp(s_j - m_b(j)) * exp(m_b(j) - m) + exp(sink - m), m the row's max.
    The blocks are taken over the valid slots first, in their order, padding last: DeepSeek's index lists
    put a window's padding after its valid rows (`get_window_topk_idxs`), ours before them, and where a list
    holds only window rows, or no padding (every query from position W-1 on), this is the official block
    layout exactly. (A compressed layer's query before position W-1 keeps its window padding before the
    compressed rows in the official list: there the blocks can still differ.) A block before any valid
    slot adds nothing. Returns p [t, H, K] in idx's slot order and denom [t, H, 1]; o = (p @ V) / denom.
    """
    order = torch.sort(torch.isneginf(scores).all(1).to(torch.int8), dim=-1, stable=True).indices   # [t, K]
    p, denom = _kernel_blocks(scores.gather(-1, order[:, None, :].expand_as(scores)), sink, rnd)
    return torch.empty_like(p).scatter_(-1, order[:, None, :].expand_as(p), p), denom


def _kernel_blocks(scores: torch.Tensor, sink: torch.Tensor, rnd) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel_probs` on slots already in the kernel's order."""
    t, H, K = scores.shape
    nb = -(-K // KERNEL_BLOCK)
    padded = torch.nn.functional.pad(scores, (0, nb * KERNEL_BLOCK - K), value=float("-inf"))
    run = torch.cummax(padded.view(t, H, nb, KERNEL_BLOCK).amax(-1), dim=-1).values        # [t, H, nb]
    m = run[..., -1:]
    m_b = run.repeat_interleave(KERNEL_BLOCK, dim=-1)[..., :K]                            # per slot
    live = m_b > float("-inf")
    e = torch.where(live, torch.exp(scores - m_b), 0.0)
    rescale = torch.where(live, torch.exp(m_b - m), 0.0)
    denom = (e * rescale).sum(-1, keepdim=True) + torch.exp(sink.view(1, -1, 1) - m)
    return rnd(e) * rescale, denom


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float, rnd=None) -> torch.Tensor:
    """Attention of each query over its own gathered KV rows, with a per-head sink in the denominator.

    q [T, H, D]; kv [N, D] (K = V, one shared head); idx [T, K] int64 rows of kv, -1 = padding;
    sink [H]. Returns o [T, H, D]:  p_j = exp(s_j) / (sum_j exp(s_j) + exp(sink_h)),  o = sum_j p_j kv_j.
    `rnd` given: the probabilities are rounded where DeepSeek's kernel rounds them (`kernel_probs`), which
    depends on the order of the slots in idx (blocks of 64).
    """
    out = torch.empty_like(q)
    for s in range(0, q.shape[0], QUERY_BLOCK):
        qb, ib = q[s:s + QUERY_BLOCK], idx[s:s + QUERY_BLOCK]
        rows = kv[ib.clamp(min=0)]                                   # [t, K, D]
        scores = torch.einsum("thd,tkd->thk", qb, rows) * scale      # [t, H, K]
        scores = scores.masked_fill((ib < 0)[:, None, :], float("-inf"))
        if rnd is not None:
            p, denom = kernel_probs(scores, sink, rnd)
            out[s:s + QUERY_BLOCK] = torch.einsum("thk,tkd->thd", p, rows) / denom
            continue
        sinks = sink.view(1, -1, 1).expand(scores.shape[0], -1, 1)
        lse = torch.logsumexp(torch.cat((scores, sinks), dim=-1), dim=-1, keepdim=True)
        p = torch.exp(scores - lse)                                  # the sink's share is dropped
        out[s:s + QUERY_BLOCK] = torch.einsum("thk,tkd->thd", p, rows)
    return out


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, rnd=None) -> torch.Tensor:
    """score[t, n] = sum_h weights[t, h] * relu(q[t, h] . keys[n]) for q [t, h, d], keys [n, d] -> [t, n].

    `rnd` given, as DeepSeek's indexer computes it on bf16 tensors: the einsum's output is rounded, the weights
    are rounded, each relu(q.k) * w product is rounded and so is the sum over heads (float32 inside each op).
    """
    score = torch.einsum("thd,nd->thn", q, keys).relu_()
    if rnd is None:
        return torch.einsum("thn,th->tn", score, weights)
    score = rnd(rnd(score) * rnd(weights)[:, :, None])
    return rnd(score.sum(1))


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                 k: int, rnd=None) -> torch.Tensor:
    """Lightning-indexer selection of compressed entries for each query.

    q [T, h, d] indexer queries; weights [T, h] per-head weights (scaling already applied); keys [N, d]
    indexer-compressed keys; visible [T] = how many leading entries each query may see (causality).
    score[t, s] = sum_h weights[t, h] * relu(q[t, h] . keys[s])  (`index_scores`; `rnd`: DeepSeek's bf16 points).
    Returns [T, k] int64 entry ids, best first, ties broken lower-index-first, -1 where fewer are visible.
    """
    T, N = q.shape[0], keys.shape[0]
    out = torch.full((T, k), -1, dtype=torch.int64, device=q.device)
    if N == 0 or k == 0:
        return out
    for s in range(0, T, QUERY_BLOCK):
        qb, wb, vb = q[s:s + QUERY_BLOCK], weights[s:s + QUERY_BLOCK], visible[s:s + QUERY_BLOCK]
        order = select_topk(index_scores(qb, keys, wb, rnd), vb, k)
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
