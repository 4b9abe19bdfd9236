"""Fast CPU implementations of the ops where the reference's plain form costs the most (issue 6).

Each is registered for the `cpu` backend and has the float32 reference (`runtime.ops`) as its oracle
(tests/test_cpu_fast_ops.py). What they change is *how* the same math is laid out, never the math:
- `sparse_attention`: a query block whose index lists overlap heavily (window rows shared by neighbouring
  queries, HCA entries shared by all) attends over the *union* of its rows with a mask, through torch's
  fused CPU flash-attention kernel, instead of materialising a [t, K, D] gather; blocks with little overlap
  keep the reference's gather. The sink enters exactly through the kernel's log-sum-exp. A decode step's
  one query attends its K rows with the padding masked (no host sync). Precondition (true in the model): a
  query's valid indices are distinct. Under `official` numerics (`rnd` given) the fused kernel cannot round
  its probabilities at DeepSeek's point: a decode step applies `kernel_probs` to its K rows, a prefill chunk
  runs the reference's gather with `rnd`.
- `indexer_topk`: the same scores as the reference (same expressions, in query blocks whose scores stay
  under 16 MB instead of 256-query ones), then `topk` instead of a full sort;
  rows where equal finite scores could reorder the result are re-done with the reference's stable sort, so
  the selection and its order are the reference's exactly. The scores are `index_scores` (with `rnd`
  under `official`: bf16 scores, where ties are common and those rows take the sort).
- `hc_pre`: for the few tokens of a decode step, the gates, the row softmax and the 20 Sinkhorn rounds on
  each 4x4 mixing matrix run on Python floats (double precision) from one host read, instead of ~150 tiny
  tensor ops; larger chunks use the reference after mixes whose RMS comes from a batched dot product
  instead of a [T, hc*d] tensor of squares. `hc_post`: one bmm and an in-place multiply-add. A prefill
  chunk's large temporaries are fresh pages from the OS every time (glibc maps blocks over 32 MB anew), and
  on this VM faulting them in cost more than the arithmetic on them.
- `linear` / `group_linear` on the checkpoint's storage (FP8 blocks, FP4 experts, bf16, W8A8 int8; one
  F.linear for float32 weights): backends/cpu_stored.py. `apply_rope` (complex rotation built once per
  cos/sin): a decode step of the tiny model is ~1,800 small torch calls, so calls per op are what costs there.
- `routed_experts`: for a decode step's few tokens, groups read once on the host instead of per-expert
  masks; larger chunks use the reference's grouping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from runtime.dispatch import impl
from runtime.ops import attention as ref_attention
from runtime.ops import mhc as ref_mhc

from . import cpu_prefill  # noqa: F401  (registers its hc_pre first, whichever module is imported first: preferred)
from . import cpu_stored

QUERY_BLOCK = 256
UNION_FACTOR = 4          # dense-over-union when the union has at most 4x a query's row count
SMALL_T = 8               # hc_pre: tokens up to which the scalar Sinkhorn is cheaper
SCORE_BLOCK_FLOATS = 1 << 22   # indexer scores per query block (16 MB): below glibc's mmap threshold (32 MB max)


def _flash(q: torch.Tensor, rows: torch.Tensor, mask, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """q [t, H, D] over K = V = rows [U, D] (mask [t, U] additive or None) with the sink in the denominator.

    torch's fused CPU flash kernel returns the softmax's log-sum-exp `lse` besides o; adding the sink term
    e^sink to the denominator scales o by Z / (Z + e^sink) = sigmoid(lse - sink), exactly.
    """
    t, H, D = q.shape
    kv = rows[None, None].expand(1, H, -1, -1)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(0, 1)[None], kv, kv, 0.0, False, attn_mask=mask, scale=scale)[:2]
    return (o[0] * torch.sigmoid(lse[0] - sink[:, None])[..., None]).transpose(0, 1)       # [t, H, D]


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float, rnd=None) -> torch.Tensor:
    """Same contract as `runtime.ops.attention.sparse_attention`: q [T, H, D], kv [N, D], idx [T, K]."""
    T = q.shape[0]
    if T == 1:                          # a decode step: its K rows, padding masked; no host sync, ~9 calls
        i = idx[0]
        rows = kv[i.clamp(min=0)]                                                       # [K, D]
        s = torch.mm(q[0], rows.T).mul_(scale).masked_fill_(i < 0, float("-inf"))     # [H, K]
        if rnd is not None:                                  # official: DeepSeek's kernel's bf16 probabilities
            p, denom = ref_attention.kernel_probs(s[None], sink, rnd)
            return torch.mm(p[0], rows).div_(denom[0])[None]
        p = torch.cat((s, sink[:, None]), dim=1).softmax(-1)                           # sink: the last column
        return torch.mm(p[:, :-1], rows)[None]
    if rnd is not None:                 # official prefill: the reference's gather, probabilities rounded
        return ref_attention.sparse_attention(q, kv, idx, sink, scale, rnd=rnd)
    out = torch.empty_like(q)
    N = kv.shape[0]
    mark = torch.zeros(N + 1, dtype=torch.bool, device=q.device)   # slot N absorbs the -1 padding
    for s in range(0, T, QUERY_BLOCK):
        qb, ib = q[s:s + QUERY_BLOCK], idx[s:s + QUERY_BLOCK]
        t, K = ib.shape
        safe = torch.where(ib >= 0, ib, N)
        mark.zero_()
        mark[safe.flatten()] = True
        rows = mark[:N].nonzero().squeeze(1)                                     # the union, ascending
        if rows.numel() > UNION_FACTOR * K:                                      # little overlap: gather
            out[s:s + QUERY_BLOCK] = ref_attention.sparse_attention(qb, kv, ib, sink, scale)
            continue
        where = torch.full((N + 1,), rows.numel(), dtype=torch.int64, device=q.device)
        where[rows] = torch.arange(rows.numel(), device=q.device)
        allowed = torch.zeros(t, rows.numel() + 1, dtype=torch.bool, device=q.device)
        allowed.scatter_(1, where[safe], True)                                   # [t, U + 1]; last = padding
        mask = torch.zeros(t, rows.numel(), device=q.device).masked_fill_(~allowed[:, :-1], float("-inf"))
        o = _flash(qb, kv[rows], mask[None, None], sink, scale)
        # a query with no rows at all: the reference gives 0 (every p_j = 0); the kernel's NaN must not leak
        out[s:s + QUERY_BLOCK] = torch.where(allowed[:, :-1].any(-1)[:, None, None], o, 0.0)
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                 k: int, rnd=None) -> torch.Tensor:
    """Same contract and result as `runtime.ops.attention.indexer_topk`."""
    T, N = q.shape[0], keys.shape[0]
    out = torch.full((T, k), -1, dtype=torch.int64, device=q.device)
    if N == 0 or k == 0:
        return out
    arange = torch.arange(N, device=q.device)
    kk = min(k, N)
    # Query blocks small enough that the [t, h, n] scores stay within SCORE_BLOCK_FLOATS: at 64K tokens a
    # 256-query block would be 256 MB, which glibc maps fresh (zeroed pages, faulted in) on every block.
    n_max = max(int(visible.max()), 1) if T > 1 else 1          # (a decode step's one query: no extra read)
    block = max(1, min(QUERY_BLOCK, SCORE_BLOCK_FLOATS // (q.shape[1] * n_max)))
    for s in range(0, T, block):
        qb, wb, vb = q[s:s + block], weights[s:s + block], visible[s:s + block]
        n = max(int(vb.max()), 1)           # causality: this block sees no key past its last visible one
        score = ref_attention.index_scores(qb, keys[:n], wb, rnd)
        score = score.masked_fill(arange[None, :n] >= vb[:, None], float("-inf"))
        if n <= kk:                         # pad to the full key count: the reference's ranking of -inf rows
            score = torch.cat((score, score.new_full((score.shape[0], N - n), float("-inf"))), dim=1)
        vals, order = score.topk(min(kk + 1, score.shape[1]), dim=-1)
        # Equal finite neighbours among the top kk+1 could be ordered differently from the stable sort's
        # lower-index-first rule: redo exactly those rows with the reference's sort.
        tie = ((vals[:, 1:] == vals[:, :-1]) & torch.isfinite(vals[:, 1:])).any(-1)
        order = order[:, :kk]
        if bool(tie.any()):
            rows = tie.nonzero().squeeze(1)
            order[rows] = torch.sort(score[rows], dim=-1, descending=True, stable=True).indices[:, :kk]
        ok = torch.arange(kk, device=q.device)[None, :] < vb[:, None].clamp(max=kk)
        out[s:s + block, :kk] = torch.where(ok, order, torch.full_like(order, -1))
    return out


def _sinkhorn_scalar(comb: list, hc: int, eps: float, iters: int) -> list:
    """The reference's Sinkhorn on one [hc][hc] matrix of Python floats, in place: columns, then
    (iters - 1) rounds of rows and columns, each divided by (its sum + eps)."""
    if hc == 4:                                    # every V4 config: unrolled, ~5x faster in CPython
        return _sinkhorn4(comb, eps, iters)

    def columns():
        for j in range(hc):
            s = eps
            for i in range(hc):
                s += comb[i][j]
            for i in range(hc):
                comb[i][j] /= s
    columns()
    for _ in range(iters - 1):
        for r in comb:
            s = eps + sum(r)
            for j in range(hc):
                r[j] /= s
        columns()
    return comb


def _sinkhorn4(m: list, eps: float, iters: int) -> list:
    (a0, a1, a2, a3), (b0, b1, b2, b3), (c0, c1, c2, c3), (d0, d1, d2, d3) = m
    for it in range(iters):
        if it:                                     # rows (not before the first column pass)
            s = a0 + a1 + a2 + a3 + eps; a0 /= s; a1 /= s; a2 /= s; a3 /= s  # noqa: E702
            s = b0 + b1 + b2 + b3 + eps; b0 /= s; b1 /= s; b2 /= s; b3 /= s  # noqa: E702
            s = c0 + c1 + c2 + c3 + eps; c0 /= s; c1 /= s; c2 /= s; c3 /= s  # noqa: E702
            s = d0 + d1 + d2 + d3 + eps; d0 /= s; d1 /= s; d2 /= s; d3 /= s  # noqa: E702
        s = a0 + b0 + c0 + d0 + eps; a0 /= s; b0 /= s; c0 /= s; d0 /= s      # noqa: E702
        s = a1 + b1 + c1 + d1 + eps; a1 /= s; b1 /= s; c1 /= s; d1 /= s      # noqa: E702
        s = a2 + b2 + c2 + d2 + eps; a2 /= s; b2 /= s; c2 /= s; d2 /= s      # noqa: E702
        s = a3 + b3 + c3 + d3 + eps; a3 /= s; b3 /= s; c3 /= s; d3 /= s      # noqa: E702
    return [[a0, a1, a2, a3], [b0, b1, b2, b3], [c0, c1, c2, c3], [d0, d1, d2, d3]]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
           norm_eps: float, sinkhorn_iters: int):
    """Same contract as `runtime.ops.mhc.hc_pre`. For a decode step's few tokens the per-token gates, the
    row softmax and the Sinkhorn rounds run on Python floats (double precision) from one host read of the
    mixes: ~13 torch calls instead of ~35 (+120 for a tensor Sinkhorn). The mixes are the reference's
    (rms-normalised input @ fn.T, the same product with the scale applied before it)."""
    T, hc, d = X.shape
    if T > SMALL_T:               # the reference after the mixes, which skip its [T, hc*d] squares
        xf = X.flatten(-2)
        sq = torch.bmm(xf.unsqueeze(1), xf.unsqueeze(2)).view(T, 1)                   # sum of squares, [T, 1]
        mix = F.linear(xf, fn) * torch.rsqrt(sq / (hc * d) + norm_eps)
        return ref_mhc.hc_pre_from_mix(X, mix, base, scale, hc_eps, sinkhorn_iters)
    mix = F.linear(F.rms_norm(X.reshape(T, hc * d), (hc * d,), None, norm_eps), fn)     # [T, (2+hc)*hc]
    sc, bs = scale.tolist(), base.tolist()
    group = [0] * hc + [1] * hc + [2] * (hc * hc)                    # which scale each mix takes
    out = []
    for m in mix.tolist():
        z = [v * sc[g] + b for v, g, b in zip(m, group, bs)]
        gates = [_sigmoid(v) for v in z[:2 * hc]]
        comb = []
        for i in range(hc):                                          # row softmax, then + eps
            r = z[2 * hc + i * hc: 2 * hc + (i + 1) * hc]
            top = max(r)
            e = [math.exp(v - top) for v in r]
            s = sum(e)
            comb.append([v / s + hc_eps for v in e])
        comb = _sinkhorn_scalar(comb, hc, hc_eps, sinkhorn_iters)
        out.append([g + hc_eps for g in gates[:hc]] + [2 * g for g in gates[hc:]] + [v for r in comb for v in r])
    packed = torch.tensor(out, dtype=X.dtype, device=X.device)                           # [T, (2+hc)*hc]
    pre, post, comb = packed[:, :hc], packed[:, hc:2 * hc], packed[:, 2 * hc:].view(T, hc, hc)
    x = torch.bmm(pre.unsqueeze(1), X).squeeze(1)                      # [T, d]: one bmm, not an einsum
    return x, post, comb


def hc_post(x: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Same contract as `runtime.ops.mhc.hc_post`: post[j] * x + sum_i comb[i, j] * res[i], as one bmm and an
    in-place multiply-add: a prefill chunk's [T, hc, d] output is its only allocation (a large one is fresh
    pages from the OS each time, and faulting them in cost more than the arithmetic)."""
    return torch.bmm(comb.transpose(1, 2), res).addcmul_(post.unsqueeze(-1), x.unsqueeze(1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Same contract as `runtime.ops.norm_rope.rms_norm`, through torch's fused kernel."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Same contract as `runtime.ops.norm_rope.apply_rope`: interleaved pairs as complex numbers times
    (cos + i sin), conjugated for the inverse. The complex factor is built once per (cos, sin, inverse): the
    model reuses one cos/sin per positions tensor for every projection of a decode step."""
    key = (id(cos), id(sin), inverse)
    hit = _ROTATIONS.get(key)
    if hit is None or hit[0] is not cos or hit[1] is not sin:   # kept tensors: their ids cannot be reused
        hit = (cos, sin, torch.complex(cos, -sin if inverse else sin))
        if cos.shape[0] <= SMALL_T:                             # decode-sized only: a few KB each
            if len(_ROTATIONS) > 64:
                _ROTATIONS.clear()
            _ROTATIONS[key] = hit
    pairs = x.float().unflatten(-1, (-1, 2))
    try:                                      # a view when the pairs are laid out as complex numbers
        z = torch.view_as_complex(pairs)
    except RuntimeError:
        z = torch.view_as_complex(pairs.contiguous())
    return torch.view_as_real(z * hit[2]).flatten(-2)


_ROTATIONS: dict[tuple, tuple] = {}


# One `impl` call per implementation, in preference order per op. Linears on the checkpoint's storage
# (backends/cpu_stored.py): the native kernels where they built (capability `native_kernels`), else torch
# tiles -- the dispatch table shows which.
impl("linear", "cpu.stored_native", "cpu", cpu_stored.linear_native, requires=("native_kernels",),
     prepare=cpu_stored.prepare_native(cpu_stored.linear_native))
impl("linear", "cpu.stored_torch_tiles", "cpu", cpu_stored.linear_torch_tiles)
impl("group_linear", "cpu.stored_native", "cpu", cpu_stored.group_linear_native, requires=("native_kernels",),
     prepare=cpu_stored.prepare_native(cpu_stored.group_linear_native))
impl("group_linear", "cpu.stored_torch_tiles", "cpu", cpu_stored.group_linear_torch_tiles)
impl("sparse_attention", "cpu.union_flash", "cpu", sparse_attention)
impl("indexer_topk", "cpu.topk_exact_ties", "cpu", indexer_topk)
impl("hc_pre", "cpu.scalar_sinkhorn", "cpu", hc_pre)
impl("hc_post", "cpu.bmm_addcmul", "cpu", hc_post)
impl("rms_norm", "cpu.fused", "cpu", rms_norm)
impl("apply_rope", "cpu.complex", "cpu", apply_rope)
# the grouped native FP4 / FP8 expert kernel first where it built (capability `native_kernels`)
impl("routed_experts", "cpu.stored_grouped", "cpu", cpu_stored.routed_experts_native, requires=("native_kernels",))
impl("routed_experts", "cpu.small_batch", "cpu", cpu_stored.routed_experts_small_batch)
