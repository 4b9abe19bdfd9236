"""Parity metrics, by kind of tensor: floats, index sets, and end-to-end next-token distributions.

Float taps (reference a, candidate b, any shape, compared elementwise in float64):
- `max_abs`, `max_rel` (|b-a| / |a| over elements with |a| >= 1% of rms(a), so near-zeros do not dominate),
  `cosine`, `nmse` = sum((b-a)^2) / sum(a^2) and `rel_rms` = sqrt(nmse) (the figure verdicts use);
- `ratio_1e-3` / `ratio_5e-3`: the fraction of elements within a relative error of 1/1000 and 5/1000 (msprobe's
  one- and five-thousandth error ratios);
- `nan` / `inf`: non-finite values in the candidate where the reference is finite;
- `histogram`: counts of log10|b-a| in unit bins from 1e-12 to 1e2 (exact zeros counted apart).
Index taps (rows of ids, -1 = none): per-row sets -> mean Jaccard, mean overlap (|a & b| / |a|), the fraction of
rows whose sets are equal.
End to end (teacher-forced next-token logits per step): mean / max KL(ref || cand), top-1 agreement, whether
the candidate's top-1 is in the reference's top-5, the log-probability gap of the reference's token; and, from
free-running greedy decoding, the first step where the tokens diverge.
"""

from __future__ import annotations

import math

import torch

HIST_EDGES = list(range(-12, 3))       # log10 |diff| bin edges: [1e-12, 1e-11), ..., [1e1, 1e2]


def amax(t: torch.Tensor) -> float:
    """Largest element as a float; 0 for an empty tensor."""
    return float(t.max()) if t.numel() else 0.0


def float_metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.shape != b.shape:
        return {"error": f"shape {list(b.shape)} differs from the reference's {list(a.shape)}"}
    a64, b64 = a.double().flatten(), b.double().flatten()
    nonfinite_ref = ~torch.isfinite(a64)
    nan = bool((torch.isnan(b64) & ~nonfinite_ref).any())
    inf = bool((torch.isinf(b64) & ~nonfinite_ref).any())
    ok = torch.isfinite(a64) & torch.isfinite(b64)
    a64, b64 = a64[ok], b64[ok]
    d = (b64 - a64).abs()
    ref_sq = float((a64 * a64).sum())
    nmse = float((d * d).sum()) / ref_sq if ref_sq > 0 else (0.0 if amax(d) == 0 else math.inf)
    rms = math.sqrt(ref_sq / max(a64.numel(), 1))
    big = a64.abs() >= 0.01 * rms
    rel = d / a64.abs().clamp(min=1e-30)
    denom = float(a64.norm() * b64.norm())
    cosine = float((a64 * b64).sum()) / denom if denom > 0 else (1.0 if amax(d) == 0 else 0.0)
    n = max(a64.numel(), 1)
    within = lambda r: float(((d <= r * a64.abs()) | (d == 0)).sum()) / n  # noqa: E731
    return {"max_abs": amax(d), "max_rel": amax(rel[big]), "cosine": cosine,
            "nmse": nmse, "rel_rms": math.sqrt(nmse), "ratio_1e-3": within(1e-3), "ratio_5e-3": within(5e-3),
            "nan": nan, "inf": inf, "elements": int(a.numel()), "histogram": histogram(d)}


def histogram(d: torch.Tensor) -> dict:
    """Counts of |diff| per decade; `zero` counts exact matches."""
    nz = d[d > 0]
    lg = torch.log10(nz).clamp(HIST_EDGES[0], HIST_EDGES[-1] - 1e-9) if nz.numel() else nz
    counts = torch.histc(lg, bins=len(HIST_EDGES) - 1, min=HIST_EDGES[0], max=HIST_EDGES[-1]) if nz.numel() \
        else torch.zeros(len(HIST_EDGES) - 1)
    return {"log10_edges": HIST_EDGES, "counts": [int(c) for c in counts], "zero": int((d == 0).sum())}


def index_metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.shape != b.shape:
        return {"error": f"shape {list(b.shape)} differs from the reference's {list(a.shape)}"}
    jac, over, equal = [], [], 0
    for ra, rb in zip(a.tolist(), b.tolist()):
        sa, sb = {i for i in ra if i >= 0}, {i for i in rb if i >= 0}
        union = sa | sb
        jac.append(len(sa & sb) / len(union) if union else 1.0)
        over.append(len(sa & sb) / len(sa) if sa else 1.0)
        equal += sa == sb
    rows = max(len(jac), 1)
    return {"jaccard": sum(jac) / rows, "overlap": sum(over) / rows, "equal_sets": equal / rows,
            "rows": len(jac), "min_jaccard": min(jac, default=1.0)}


def e2e_metrics(ref_logits: list[torch.Tensor], cand_logits: list[torch.Tensor], ref_tokens: list[list[int]],
                cand_tokens: list[list[int]]) -> dict:
    """Per prompt: [N, V] teacher-forced logits on the reference's greedy tokens, and both sides' free-running
    greedy tokens."""
    kls, top1, in_top5, gaps, diverge = [], [], [], [], []
    for ra, cb, rt, ct in zip(ref_logits, cand_logits, ref_tokens, cand_tokens):
        pa, pb = torch.log_softmax(ra.double(), -1), torch.log_softmax(cb.double(), -1)
        kls += (pa.exp() * (pa - pb)).sum(-1).tolist()
        top1 += (ra.argmax(-1) == cb.argmax(-1)).tolist()
        top5 = ra.topk(min(5, ra.shape[-1]), dim=-1).indices
        in_top5 += (top5 == cb.argmax(-1)[:, None]).any(-1).tolist()
        tok = torch.tensor(rt[: ra.shape[0]])
        gaps += (pa.gather(-1, tok[:, None]) - pb.gather(-1, tok[:, None])).abs().flatten().tolist()
        first = next((i for i, (x, y) in enumerate(zip(rt, ct)) if x != y), None)
        diverge.append(first if first is not None or len(rt) == len(ct) else min(len(rt), len(ct)))
    n = max(len(kls), 1)
    return {"steps": len(kls), "kl_mean": sum(kls) / n, "kl_max": max(kls, default=0.0), "kl_per_step": kls,
            "top1_agreement": sum(top1) / n, "top1_in_ref_top5": sum(in_top5) / n,
            "logprob_gap_mean": sum(gaps) / n, "logprob_gap_max": max(gaps, default=0.0),
            "greedy_first_divergence": diverge}
