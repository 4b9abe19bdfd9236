"""Ops whose tensor-parallel form needs a collective inside the op, and their place in the dispatch table.

Only one: the lightning indexer's top-k. With its heads split over the TP group, each rank can score the
compressed entries with its own heads only; the score is a sum over heads, so the partial scores are summed
over the TP group *before* the top-k (spec §15), and every rank then selects the same entries. The scoring
formula and the tie rule are the reference op's (`runtime.ops.attention.indexer_topk`), which stays the
single-device oracle; under TP a backend's fused indexer is replaced by this op (recorded in the table).
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops.attention import QUERY_BLOCK, index_scores, select_topk


def tp_indexer_topk(par):
    """indexer_topk(q [T, h_local, d], weights [T, h_local], keys [N, d], visible [T], k) -> [T, k], with the
    head sum completed over the TP group of `par`."""

    def indexer_topk(q, weights, keys, visible, k, rnd=None):
        T, N = q.shape[0], keys.shape[0]
        out = torch.full((T, k), -1, dtype=torch.int64, device=q.device)
        if N == 0 or k == 0:                          # same on every rank: no collective is skipped unevenly
            return out
        for s in range(0, T, QUERY_BLOCK):
            qb, wb, vb = q[s:s + QUERY_BLOCK].float(), weights[s:s + QUERY_BLOCK].float(), visible[s:s + QUERY_BLOCK]
            part = index_scores(qb, keys.float(), wb, rnd)
            full = par.tp_sum(part)                                            # partial head sums -> full score
            order = select_topk(full if rnd is None else rnd(full), vb, k)   # official: a bf16 all-reduce
            out[s:s + QUERY_BLOCK, :order.shape[1]] = order
        return out

    return indexer_topk


def parallel_dispatch(table, par):
    """The dispatch table for this rank: under TP, indexer_topk becomes the partial-score op (recorded)."""
    if par.tp == 1:
        return table
    from ..dispatch import Resolution

    rows = tuple(Resolution(r.op, "parallel:tp_partial_scores", r.where,
                            f"TP {par.tp}: head-partial scores all-reduced before top-k (was {r.impl})")
                 if r.op == "indexer_topk" else r for r in table.rows)
    ops = dataclasses.replace(table.ops, indexer_topk=tp_indexer_topk(par))
    return dataclasses.replace(table, rows=rows, ops=ops)
