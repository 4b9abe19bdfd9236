"""`numerics="official"` at DeepSeek's bf16 rounding points, one test per op.

Each oracle below is written here, independently of runtime/ops, step by step as DeepSeek's
`inference/model.py` / `kernel.py` compute it: on real torch bf16 tensors where the official code holds bf16
tensors (each torch op computes in float32 and stores bf16), and as the `sparse_attn` kernel's loop over
64-slot blocks. Inputs are chosen so float32 accumulation is exact (small integers times powers of two):
then the summation order cannot matter and the emulation must agree bit for bit. Each test also shows the
point matters (the float32-inside form differs), so it fails on the code without the rounding point.
"""

import torch

from backends import cpu_ops
from runtime import number_formats
from runtime.api import Runtime
from runtime.checkpoint import load_checkpoint
from runtime.ops import attention, numerics, reference_ops
from runtime.ops.norm_rope import rms_norm
from runtime.taps import TapRecorder

BF16 = torch.bfloat16


def _gen(seed: int = 14) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bf16_grid(g, *shape, lo=-16, hi=16, step=0.125):
    """bf16 tensor of multiples of `step` in [lo, hi): exact in bf16, and float32 sums of their products stay
    exact for the sizes used here."""
    n = int((hi - lo) / step)
    return (torch.randint(0, n, shape, generator=g).float() * step + lo).to(BF16)


# ---------------------------------------------------------------- 1. per-head query RMS norm
def official_head_norm(q: torch.Tensor, eps: float) -> torch.Tensor:
    """`q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)` on a bf16 tensor, one op per line.
    The rsqrt is computed in float32 and stored bf16 as CUDA's kernel does: torch's CPU bf16 rsqrt on a few
    elements (its scalar path) rounds the sqrt to bf16 before the reciprocal, one ulp off at times."""
    sq = q.square()                                  # bf16
    ms = sq.mean(-1, keepdim=True)                   # bf16 (float32 accumulation inside)
    v = ms + eps                                     # bf16
    r = torch.rsqrt(v.float()).to(BF16)              # bf16
    return q * r                                     # bf16


def test_head_norm_is_bf16_step_by_step():
    q = (torch.randn(6, 4, 64, generator=_gen()) * 3).to(BF16)
    eps = 1e-6
    want = official_head_norm(q, eps).float()
    off, exact = reference_ops("official"), reference_ops("exact")
    assert torch.equal(off.head_norm(off, q.float(), eps), want)
    # float32 inside, rounded once (what `exact`'s head_norm does, and `official` did before) is not it
    once = rms_norm(q.float(), None, eps).to(BF16).float()
    assert (once != want).sum().item() > 0.05 * want.numel()
    assert torch.equal(exact.head_norm(exact, q.float(), eps), rms_norm(q.float(), None, eps))


# ---------------------------------------------------------------- 2. attention probabilities
def official_sparse_attn(q, kv, sink, idx, scale, block=64):
    """DeepSeek's `sparse_attn_kernel` for one query row set, as a Python loop over its 64-slot blocks:
    q [t, H, D] bf16, kv [N, D] bf16, sink [H] float32, idx [t, K] (-1 = padding; block 0 holds a valid slot
    as the official index lists do, whose padding comes last)."""
    t, H, D = q.shape
    out = torch.empty(t, H, D)
    for i in range(t):
        acc_o = torch.zeros(H, D)
        sum_exp = torch.zeros(H)
        m = torch.full((H,), float("-inf"))
        K = idx.shape[1]
        for b in range(0, K, block):
            ids = idx[i, b:b + block]
            kv_blk = torch.where((ids >= 0)[:, None], kv[ids.clamp(min=0)], torch.zeros((), dtype=BF16))
            acc_s = torch.where((ids >= 0)[None, :], 0.0, float("-inf")) + q[i].float() @ kv_blk.float().T
            acc_s = acc_s * scale
            m_prev, m = m, torch.maximum(m, acc_s.amax(-1))
            s_scale = torch.exp(m_prev - m)
            acc_s = torch.exp(acc_s - m[:, None])
            sum_exp = sum_exp * s_scale + acc_s.sum(-1)
            p_bf16 = acc_s.to(BF16)                                  # acc_s_cast
            acc_o = acc_o * s_scale[:, None] + p_bf16.float() @ kv_blk.float()
        sum_exp = sum_exp + torch.exp(sink - m)
        out[i] = acc_o / sum_exp[:, None]
    return out


def _attention_case(t=3, H=4, D=32, N=300, K=200):
    G = _gen()
    q = _bf16_grid(G, t, H, D, lo=-1, hi=1, step=1 / 64)
    kv = _bf16_grid(G, N, D, lo=-1, hi=1, step=1 / 64)
    kv[:, 0] = (torch.arange(N) / 16).to(BF16)          # later rows score higher: the running max moves
    q[..., 0] = 4.0
    idx = torch.stack([torch.randperm(N, generator=G)[:K] for _ in range(t)])
    idx = idx.sort(-1).values                           # ascending rows: each block raises the max
    idx[:, 170:] = -1                                   # DeepSeek's lists: valid slots first, padding last
    sink = torch.randn(H, generator=G)
    return q, kv, sink, idx


def _pads_first(idx):
    """Our window lists put the padding before the valid rows (the same slots, rotated)."""
    return torch.stack([torch.cat((r[r < 0], r[r >= 0])) for r in idx])


def test_attention_probabilities_rounded_where_the_kernel_rounds():
    q, kv, sink, idx = _attention_case()
    scale = 32 ** -0.5
    want = official_sparse_attn(q, kv, sink, idx, scale)             # the official slot layout
    args = (q.float(), kv.float(), _pads_first(idx), sink, scale)   # ours: the blocks follow the valid slots
    got = attention.sparse_attention(*args, rnd=numerics.round_bf16)
    # the kernel rescales its accumulators step by step, we by one exp(m_b - m): float32 apart only
    # (measured 1.1e-7 of the largest output)
    assert (got - want).abs().max().item() <= 4e-7 * want.abs().max().item()
    exact = attention.sparse_attention(*args)
    assert (exact - want).abs().max().item() > 50 * (got - want).abs().max().item()   # the point matters
    # every CPU implementation that claims official numerics: decode step (T = 1) and prefill chunk
    for i in range(q.shape[0]):
        one = cpu_ops.sparse_attention(q[i:i + 1].float(), kv.float(), args[2][i:i + 1], sink, scale,
                                       rnd=numerics.round_bf16)
        assert (one - want[i:i + 1]).abs().max().item() <= 4e-7 * want.abs().max().item()
    assert torch.equal(cpu_ops.sparse_attention(*args, rnd=numerics.round_bf16), got)


def test_attention_denominator_stays_float32():
    """One block, one head: o = sum_j bf16(e_j) v_j / (sum_j e_j + e^sink) with the float32 e_j in the sum."""
    s = torch.tensor([[0.0, -0.3, -1.7, -2.2]])                     # scores; max 0, so e_j = exp(s_j)
    e = torch.exp(s)
    p, denom = attention.kernel_probs(s[None], torch.tensor([0.5]), numerics.round_bf16)
    assert torch.equal(p[0], e.to(BF16).float())
    assert torch.allclose(denom[0], e.sum(-1, keepdim=True) + torch.exp(torch.tensor(0.5)), rtol=0, atol=1e-7)
    # a rounded denominator (the sum of the bf16 probabilities) would be a different number
    assert abs(denom.item() - (e.to(BF16).float().sum() + torch.exp(torch.tensor(0.5))).item()) > 1e-4


# ---------------------------------------------------------------- 3. Hadamard output rounded before FP4
def official_fp4_act_quant(x: torch.Tensor) -> torch.Tensor:
    """`fp4_act_quant(x, 32, inplace=True)` on a bf16 tensor: per 32 values amax (floored at 6 * 2^-126),
    scale 2^ceil(log2(amax * (1/6))) from the float's bits, x / s clamped to +-6, cast to e2m1 (nearest, ties
    to the even code), times s, stored bf16."""
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    b = x.float().unflatten(-1, (-1, 32))
    amax = b.abs().amax(-1, keepdim=True).clamp(min=6 * 2.0 ** -126)
    mant, expo = torch.frexp(amax * (1.0 / 6.0))                # v = mant * 2^expo, mant in [0.5, 1)
    s = torch.exp2((expo - (mant == 0.5).int()).float())        # ceil(log2 v)
    y = (b / s).clamp(-6, 6)
    out = torch.empty_like(y)
    for i, v in enumerate(y.flatten().tolist()):
        a = abs(v)
        best = min(range(8), key=lambda j: (abs(grid[j] - a), j % 2))      # nearest; tie -> even code
        out.view(-1)[i] = grid[best] * (1 if v >= 0 else -1)
    return (out * s).flatten(-2).to(BF16)


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    return H


def test_indexer_hadamard_output_is_bf16_before_fp4():
    H = sylvester(64)                            # 64 dims: the scale 64^-0.5 = 1/8 keeps the rotation exact
    x = _bf16_grid(_gen(), 5, 64, lo=-4, hi=4, step=0.125)
    # a crafted row whose rotated block max sits just above 6 * 2^1: bf16 rounds 12 + 2^-6 to 12 exactly,
    # which halves that block's power-of-two scale (float32 keeps 12.0156 and the larger scale)
    h = torch.arange(64) / 16 - 2
    h[0], h[1:32] = 12 + 2 ** -6, h[1:32] / 2
    crafted = (h @ H / 8.0)                                      # H is symmetric and H @ H = 64 I
    xs = torch.cat((x.float(), crafted[None]))
    rotated = (xs @ H / 8.0).to(BF16)                            # rotate_activation's bf16 output
    want = official_fp4_act_quant(rotated).float()
    got = numerics.indexer_fp4_qat(xs)
    assert torch.equal(got, want)
    old = number_formats.fp4_roundtrip(number_formats.hadamard(xs), 32).to(BF16).float()     # float32 into the FP4 step
    assert not torch.equal(old[-1], want[-1])


# ---------------------------------------------------------------- 4. indexer scores and the top-k tie rule
def official_index_score(q, keys, w_proj, n_heads, head_dim):
    """`weights = weights_proj(x) * (head_dim^-0.5 * n_heads^-0.5)`; `einsum("shd,td->sht", q, kv)`;
    `(score.relu_() * weights.unsqueeze(-1)).sum(dim=1)`: all bf16 tensors."""
    weights = w_proj * (head_dim ** -0.5 * n_heads ** -0.5)            # bf16
    score = torch.einsum("shd,td->sht", q, keys)                      # bf16 out, float32 accumulation
    return (score.relu_() * weights.unsqueeze(-1)).sum(dim=1)         # bf16 products, bf16 head sum


def test_indexer_scores_are_bf16_at_each_step():
    T, h, d, N = 5, 6, 32, 40                    # weight scale 32^-0.5 * 6^-0.5: not a power of two
    G = _gen()
    q, keys = _bf16_grid(G, T, h, d, lo=-4, hi=4, step=0.25), _bf16_grid(G, N, d, lo=-4, hi=4, step=0.25)
    w_proj = _bf16_grid(G, T, h, lo=-2, hi=2, step=1 / 32)
    want = official_index_score(q, keys, w_proj, h, d).float()
    w = w_proj.float() * (d ** -0.5 * h ** -0.5)                      # as the model hands the weights over
    got = attention.index_scores(q.float(), keys.float(), w, numerics.round_bf16)
    assert torch.equal(got, want)
    assert not torch.equal(attention.index_scores(q.float(), keys.float(), w), want)     # the points matter
    visible = torch.tensor([0, 3, 17, 40, 40])
    ref = attention.indexer_topk(q.float(), w, keys.float(), visible, 12, rnd=numerics.round_bf16)
    expect = []                                      # best first, equal scores lower index first, -1 padding
    for t, n_vis in enumerate(visible.tolist()):
        ranked = sorted(range(n_vis), key=lambda n: (-want[t, n].item(), n))[:12]
        expect.append(ranked + [-1] * (12 - len(ranked)))
    assert ref.tolist() == expect
    assert sum(len(set(want[t, :40].tolist())) < 40 for t in range(T)) > 0     # bf16 ties do occur here
    assert torch.equal(cpu_ops.indexer_topk(q.float(), w, keys.float(), visible, 12, rnd=numerics.round_bf16), ref)


def test_indexer_bf16_tie_at_the_kth_place_takes_the_lower_index():
    """Entries 0 and 1 score 256.25 and 256.75 in float32 and both 256 in bf16 (ulp 2 there): at the k-th
    place bf16 ties, and the lower index wins; float32 would take entry 1."""
    q = torch.tensor([[[1.0, 1.0]]])                                  # one query, one head
    keys = torch.tensor([[256.0, 0.25], [256.0, 0.75], [300.0, 0.0], [10.0, 0.0]])
    w = torch.ones(1, 1)
    visible = torch.tensor([4])
    for impl in (attention.indexer_topk, cpu_ops.indexer_topk):
        assert impl(q, w, keys, visible, 2, rnd=numerics.round_bf16).tolist() == [[2, 0]]
        assert impl(q, w, keys, visible, 2).tolist() == [[2, 1]]


# ---------------------------------------------------------------- the tables
def test_only_official_has_the_inner_rounding_points():
    off, exact, bf16 = reference_ops("official"), reference_ops("exact"), reference_ops(numerics.NumericsSpec("bfloat16"))
    assert off.inner_round is numerics.round_bf16 and off.head_norm is numerics.head_norm_bf16
    for t in (exact, bf16):
        assert t.inner_round is None and t.head_norm is numerics.head_norm_once
    assert numerics.OFFICIAL.points == "deepseek" and numerics.NumericsSpec().points == "op-outputs"


# ---------------------------------------------------------------- the whole model, block by block
def test_official_emulation_equals_deepseeks_bf16_forward_block_by_block(tiny_ckpt, tiny_rt):
    """Against an independent bf16 forward in DeepSeek's dtype flow (tests/deepseek_bf16_reference.py): the
    emulation is bit for bit the same wherever the kernel's slot blocks agree — the whole of block 0 (a window
    layer) and, in block 1 (CSA), every query from position W-1 on. Before these rounding points block 0 was
    1.5e-2 (rel RMS) away, no closer than `exact` at the logits."""
    from tests.deepseek_bf16_reference import DeepSeekBf16

    S, W = 160, 128
    ids = torch.randint(2, 258, (S,), generator=_gen(0))
    with torch.inference_mode():
        ref_X, ref_logits = DeepSeekBf16(load_checkpoint(tiny_ckpt, progress=False)).forward(ids)
    off = Runtime.load("nvidia-h100", checkpoint=tiny_ckpt, emulate=True, progress=False)
    with TapRecorder(only={"L0.hc.post", "L1.hc.post"}) as rec:
        logits = off.forward(ids[None])[0]
    taps = rec.tensors()
    X0, X1 = (taps[f"L{i}.hc.post"].view(S, -1, ref_X[0].shape[-1]) for i in (0, 1))
    assert torch.equal(X0, ref_X[0])
    assert torch.equal(X1[W - 1:], ref_X[1][W - 1:]) and not torch.equal(X1, ref_X[1])

    def kl(a, b):
        pa, pb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        return (pa.exp() * (pa - pb)).sum(-1).mean().item()
    k_off, k_exact = kl(ref_logits, logits), kl(ref_logits, tiny_rt.forward(ids[None])[0])
    print(f"KL to DeepSeek's bf16 forward: official {k_off:.2e}, exact {k_exact:.2e}")
    assert k_off < k_exact / 2, (k_off, k_exact)
