"""CPU semantic twin of torch-npu 2.14's DeepSeek sparse-attention ops (re-exported by torch_npu_twin).

THIS IS A TWIN, NOT TORCH-NPU: `npu_lightning_indexer` and `npu_sparse_flash_attention` with the real
signatures (spec ascend.md §2.5), the documented semantics computed in float32, and the documented input
constraints asserted (dtypes, contiguity, layouts, int32 lengths / indices / block tables, prefix-sum
`actual_seq_lengths_query` for TND, the kernels' fixed shapes, and sparse indices with valid entries first and
-1 padding last), so an adapter that marshals its arguments wrongly fails here. Sources: the LightningIndexer
and SparseFlashAttention READMEs (ops-transformer / cann-recipes docs), MindSpore's mirrors of the same ops,
and the op-plugin / cann-recipes golden tests. Assumptions the docs leave open are marked "assumed".
Nothing here says what the NPU kernels compute.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)
_SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


def _spans(layout: str, q: torch.Tensor, actual_q):
    """(start, length) of each batch's query rows in q flattened to [rows, N, D]."""
    if layout == "TND":
        assert actual_q is not None and actual_q.dtype == torch.int32 and actual_q.dim() == 1, \
            "TND query needs actual_seq_lengths_query int32 [B] (prefix sums)"
        ends = actual_q.tolist()
        assert all(b >= a for a, b in zip([0] + ends, ends)) and ends[-1] <= q.shape[0], \
            "actual_seq_lengths_query (TND) must be non-decreasing prefix sums within T"
        return [(a, b - a) for a, b in zip([0] + ends, ends)]
    B, S = q.shape[0], q.shape[1]
    lens = [S] * B if actual_q is None else actual_q.tolist()
    assert actual_q is None or (actual_q.dtype == torch.int32 and len(lens) == B and all(0 <= n <= S for n in lens)), \
        "actual_seq_lengths_query (BSND): int32 [B], each <= S"
    return [(b * S, n) for b, n in enumerate(lens)]


def _kv(layout: str, key: torch.Tensor, b: int, actual_kv, block_table) -> torch.Tensor:
    """Batch b's key rows, [S2, N2, D]."""
    if layout == "PA_BSND":
        assert block_table is not None and block_table.dtype == torch.int32 and block_table.dim() == 2, \
            "PA_BSND needs block_table int32 [B, max_blocks]"
        assert actual_kv is not None and actual_kv.dtype == torch.int32, "PA_BSND needs actual lengths int32 [B]"
        bs = key.shape[1]
        assert bs % 16 == 0 and bs <= 1024, "block_size: a multiple of 16, at most 1024"
        n = int(actual_kv[b])
        nblk = -(-n // bs)
        assert block_table.shape[1] >= nblk, "block_table narrower than the longest sequence"
        return key[block_table[b, :nblk].long()].reshape(-1, *key.shape[2:])[:n]
    if layout == "TND":   # assumed: prefix sums, like the query (identical to lengths for one batch)
        ends = actual_kv.tolist() if actual_kv is not None else [key.shape[0]]
        return key[([0] + ends)[b]:ends[b]]
    n = key.shape[1] if actual_kv is None else int(actual_kv[b])
    return key[b, :n]


def _check_layouts(layout_q, layout_k):
    assert layout_q in ("BSND", "TND"), "layout_query: BSND or TND"
    assert layout_k in ("BSND", "TND", "PA_BSND"), "layout_key/kv: BSND, TND or PA_BSND"
    assert layout_k == "PA_BSND" or layout_k == layout_q, "without PageAttention the kv layout must equal layout_query"


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=2 ** 63 - 1, next_tokens=2 ** 63 - 1, return_value=False):
    """score[s1, s2] = sum_h weights[s1, h] * relu(query[s1, h] . key[s2]); per query the sparse_count best key
    positions (in its batch), best first, -1 after the valid ones. sparse_mode 3 masks key j > S2 - S1 + i
    (right-down causal). Ties: the kernel's order is not documented; the twin takes the lower index.
    -> (indices int32 [T, N2, sparse_count] (TND) / [B, S1, N2, sparse_count], values (empty unless asked))."""
    assert query.dtype in _HALF and key.dtype == query.dtype and weights.dtype == query.dtype, \
        "npu_lightning_indexer: query, key, weights one dtype, bf16 or fp16"
    assert query.is_contiguous() and key.is_contiguous() and weights.is_contiguous(), \
        "npu_lightning_indexer: contiguous inputs"
    _check_layouts(layout_query, layout_key)
    N1, D = query.shape[-2:]
    assert N1 == 64 and D == 128 and key.shape[-2] == 1 and key.shape[-1] == D, \
        "npu_lightning_indexer: query heads 64, key heads 1, head dim 128"
    assert weights.shape == query.shape[:-1], "npu_lightning_indexer: weights [B, S1, N1] / [T, N1]"
    assert sparse_count in _SPARSE_COUNTS and sparse_mode in (0, 3), "npu_lightning_indexer: sparse_count / sparse_mode"
    q = query.reshape(-1, N1, D).float()
    w = weights.reshape(-1, N1).float()
    idx = torch.full((q.shape[0], 1, sparse_count), -1, dtype=torch.int32)
    val = torch.full((q.shape[0], 1, sparse_count), float("-inf"))
    for b, (start, n) in enumerate(_spans(layout_query, query, actual_seq_lengths_query)):
        kb = _kv(layout_key, key, b, actual_seq_lengths_key, block_table)[:, 0].float()   # [S2, D]
        s2 = kb.shape[0]
        score = torch.einsum("shd,kd->shk", q[start:start + n], kb).relu()
        score = torch.einsum("shk,sh->sk", score, w[start:start + n])
        if sparse_mode == 3:
            cut = torch.arange(s2)[None, :] > (s2 - n + torch.arange(n))[:, None]
            score = score.masked_fill(cut, float("-inf"))
        srt = torch.sort(score, dim=-1, descending=True, stable=True)
        m = min(sparse_count, s2)
        ok = srt.values[:, :m] > float("-inf")
        idx[start:start + n, 0, :m] = torch.where(ok, srt.indices[:, :m], -1).to(torch.int32)
        val[start:start + n, 0, :m] = srt.values[:, :m]
    shape = (*query.shape[:-2], 1, sparse_count)
    return idx.reshape(shape), (val.reshape(shape).to(query.dtype) if return_value else
                                torch.empty(0, dtype=query.dtype))       # the meta function's empty values


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=2 ** 63 - 1, next_tokens=2 ** 63 - 1, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    """out = softmax(scale * ([q, q_rope] . [k, k_rope]) over the selected rows) @ v, per query; index i of a
    row selects key positions [i * sparse_block_size, (i + 1) * sparse_block_size) of its batch; entries stop
    at the first -1 (the golden's `break`), which is why padding must come last. sparse_mode 3 also masks
    positions > S2 - S1 + i. sinks (assumed: float32 [N1], absent from the 2.14 doc; the V4 / GPT-OSS
    semantics) add exp(sink_h) to the denominator only. value None = shared KV (value = key).
    -> (out in query's dtype, softmax_max, softmax_sum float32 if return_softmax_lse else empty): shaped as the
    meta function says, [KV_N, T, N1 / KV_N] (TND) or [B, KV_N, S1, N1 / KV_N] (BSND), KV_N = 1."""
    value = key if value is None else value
    assert query.dtype in _HALF and key.dtype == query.dtype and value.dtype == query.dtype, \
        "npu_sparse_flash_attention: query, key, value one dtype, bf16 or fp16"
    assert query.is_contiguous() and sparse_indices.is_contiguous(), "npu_sparse_flash_attention: contiguous inputs"
    _check_layouts(layout_query, layout_kv)
    N1, D = query.shape[-2:]
    assert N1 in (1, 2, 4, 8, 16, 32, 64, 128) and key.shape[-2] == 1 and value.shape[-2] == 1, \
        "npu_sparse_flash_attention: query heads 1..128 (powers of 2), KV heads 1"
    assert D == 512 and key.shape[-1] == 512 and value.shape[-1] == 512, "npu_sparse_flash_attention: D 512"
    assert attention_mode == 2 and query_rope is not None and key_rope is not None, \
        "npu_sparse_flash_attention: only attention_mode 2 (MLA absorb), which needs query_rope and key_rope"
    assert query_rope.shape == (*query.shape[:-1], 64) and key_rope.shape == (*key.shape[:-1], 64) \
        and query_rope.dtype == key_rope.dtype == query.dtype, "npu_sparse_flash_attention: rope parts [.., 64]"
    assert sparse_indices.dtype == torch.int32 and sparse_indices.shape[:-1] == (*query.shape[:-2], 1), \
        "npu_sparse_flash_attention: sparse_indices int32 [T, 1, K] / [B, S1, 1, K]"
    assert sparse_block_size >= 1 and sparse_mode in (0, 3), "npu_sparse_flash_attention: sparse_block_size / mode"
    if sinks is not None:
        assert sinks.dtype == torch.float32 and sinks.shape == (N1,), "npu_sparse_flash_attention: sinks float32 [N1]"
    si = sparse_indices.reshape(-1, sparse_indices.shape[-1]).long()
    pad = si < 0
    assert bool((si >= -1).all()), "npu_sparse_flash_attention: invalid entries are -1"
    assert bool((pad[:, 1:] >= pad[:, :-1]).all()), \
        "npu_sparse_flash_attention: sparse_indices must hold valid entries first and padding (-1) last"
    q = torch.cat((query, query_rope), -1).reshape(-1, N1, D + 64).float()
    kfull = torch.cat((key, key_rope), -1)
    out = torch.zeros(q.shape[0], N1, D)
    smax, ssum = torch.zeros(q.shape[0], N1), torch.zeros(q.shape[0], N1)
    for b, (start, n) in enumerate(_spans(layout_query, query, actual_seq_lengths_query)):
        kb = _kv(layout_kv, kfull, b, actual_seq_lengths_kv, block_table)[:, 0].float()
        vb = _kv(layout_kv, value, b, actual_seq_lengths_kv, block_table)[:, 0].float()
        s2 = kb.shape[0]
        rows_b = si[start:start + n]
        pos = (rows_b.clamp(min=0)[..., None] * sparse_block_size + torch.arange(sparse_block_size)).flatten(1)
        live = (~pad[start:start + n]).repeat_interleave(sparse_block_size, 1) & (pos < s2)
        assert bool((rows_b[~pad[start:start + n]] * sparse_block_size < s2).all()), \
            "npu_sparse_flash_attention: a sparse index points past actual_seq_lengths_kv"
        if sparse_mode == 3:
            live &= pos <= (s2 - n + torch.arange(n))[:, None]
        pos = pos.clamp(max=max(s2 - 1, 0))
        s = torch.einsum("thd,tkd->thk", q[start:start + n], kb[pos]) * scale_value
        s = s.masked_fill(~live[:, None, :], float("-inf"))
        full = s if sinks is None else torch.cat((s, sinks.view(1, -1, 1).expand(n, -1, 1)), -1)
        m = full.amax(-1, keepdim=True).clamp(min=-1e30)
        e = torch.exp(full - m)
        tot = e.sum(-1, keepdim=True)
        p = e[..., :s.shape[-1]] / tot.clamp(min=1e-30)
        out[start:start + n] = torch.einsum("thk,tkd->thd", p, vb[pos])
        smax[start:start + n], ssum[start:start + n] = m[..., 0], tot[..., 0]
    out = out.reshape(*query.shape[:-1], D).to(query.dtype)
    if not return_softmax_lse:
        smax, ssum = torch.empty(0), torch.empty(0)
    elif layout_query == "TND":
        smax, ssum = smax[None], ssum[None]                                    # [1, T, N1]
    else:
        B, S1 = query.shape[:2]
        smax, ssum = smax.view(B, 1, S1, N1), ssum.view(B, 1, S1, N1)
    return out, smax, ssum
