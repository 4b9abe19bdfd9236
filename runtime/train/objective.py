"""The training objective on the runtime's own V4 graph (`runtime.model.Transformer`, reference ops).

The model code is plain PyTorch on float32 weights, so building it on tensors that require grad makes the
whole graph trainable by autograd: the same code that serves the checkpoint is the one that learned it.
Three terms:
- next-token cross-entropy of the main model;
- the MTP block's cross-entropy on the token after next (V3 alignment, as `Transformer.forward_mtp`: the block
  at position t reads the final streams at t and the embedding of token t+1);
- the lightning indexer's KL divergence to the main attention's distribution over compressed entries
  (per query: softmax of q_h . k_s / sqrt(D) over the visible entries, averaged over heads, detached), since
  its top-k selection is not differentiable. The indexer's inputs are taken from the op table (`indexer_topk`
  and the `sparse_attention` call that follows it in every CSA layer), so the model code is not touched.
QAT: `fake_quant` gives each weight its shipped format's value (FP8 128x128 blocks, FP4 per-32 blocks,
bf16) in the forward with a straight-through gradient to the float32 master.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .. import number_formats
from ..checkpoint.inventory import expected_tensors
from ..model.v4 import Transformer
from ..ops import reference_ops


def storage_kinds(cfg) -> dict[str, str]:
    return {n: kind for n, (_, kind) in expected_tensors(cfg, "fp4").items()}


def fake_quant(value: torch.Tensor, kind: str) -> torch.Tensor:
    """value rounded to its storage kind, straight-through (identity gradient)."""
    with torch.no_grad():
        if kind == "fp8":
            q = number_formats.dequant_fp8_block(*number_formats.quant_fp8_block(value))
        elif kind == "fp4":
            q = number_formats.dequant_fp4(*number_formats.quant_fp4(value))
        elif kind == "bf16":
            q = value.to(torch.bfloat16).float()
        else:
            return value
    return value + (q - value).detach()


class _IndexerLog:
    def __init__(self):
        self.pending = None
        self.pairs: list = []


def dense_sparse_attention(q, kv, idx, sink, scale, rnd=None):
    """`ops.sparse_attention` computed densely, for training: scores against every pool row [T, H, N] with
    the rows not in `idx` masked out. The same function of (q, kv, idx, sink) as the reference (one mm
    instead of a gather and per-query bmm, whose backward is a slow scatter on the CPU); idx rows are
    distinct per query (window slots and selected entries), so a mask equals the gather. Exact numerics only."""
    if rnd is not None:
        raise ValueError("dense_sparse_attention runs the exact numerics only")
    T, N = idx.shape[0], kv.shape[0]
    keep = torch.zeros(T, N + 1, dtype=torch.bool, device=idx.device)
    keep.scatter_(1, torch.where(idx >= 0, idx, N), True)
    scores = torch.einsum("thd,nd->thn", q, kv) * scale
    scores = scores.masked_fill(~keep[:, None, :N], float("-inf"))
    sinks = sink.view(1, -1, 1).expand(T, -1, 1)
    lse = torch.logsumexp(torch.cat((scores, sinks), dim=-1), dim=-1, keepdim=True)
    return torch.einsum("thn,nd->thd", torch.exp(scores - lse), kv)


def _recording_ops(base, log: _IndexerLog):
    def indexer_topk(q, weights, keys, visible, k, rnd=None):
        log.pending = (q, weights, keys, visible)
        return base.indexer_topk(q.detach(), weights.detach(), keys.detach(), visible, k, rnd=rnd)

    def sparse_attention(q, kv, idx, sink, scale, rnd=None):
        if log.pending is not None:                      # the CSA layer's main attention for the same queries
            log.pairs.append((log.pending, q, kv, scale))
            log.pending = None
        return dense_sparse_attention(q, kv, idx, sink, scale, rnd=rnd)

    return dataclasses.replace(base, indexer_topk=indexer_topk, sparse_attention=sparse_attention)


def indexer_kl(pairs, window: int) -> torch.Tensor:
    """Mean over queries (with >= 1 visible entry) of KL(main attention over entries || indexer softmax)."""
    total, count = None, 0
    for (iq, iw, keys, visible), q, pool, scale in pairs:
        N = keys.shape[0]
        ok = visible > 0
        if N == 0 or not bool(ok.any()):
            continue
        mask = torch.arange(N)[None, :] >= visible[:, None]                      # [T, N]
        with torch.no_grad():
            s = torch.einsum("thd,nd->thn", q, pool[window:window + N]) * scale
            target = torch.softmax(s.masked_fill(mask[:, None], float("-inf")), -1).mean(1)   # [T, N]
        score = torch.einsum("thn,th->tn", torch.einsum("thd,nd->thn", iq, keys).relu(), iw)
        logq = torch.log_softmax(score.masked_fill(mask, float("-inf")), -1)
        kl = (target * (torch.log(target.clamp(min=1e-30)) - logq)).masked_fill(mask, 0).sum(-1)
        part = kl[ok].sum()
        total = part if total is None else total + part
        count += int(ok.sum())
    return total / count if count else torch.zeros(())


@dataclasses.dataclass
class Losses:
    lm: torch.Tensor
    mtp: torch.Tensor
    indexer: torch.Tensor
    correct: int = 0
    mtp_correct: int = 0
    tokens: int = 0


def compute_losses(cfg, params: dict, quantized: frozenset, batch: torch.Tensor, qat: bool = False,
                   kinds: dict | None = None) -> Losses:
    """batch [B, S + 2] token ids -> the three losses (and top-1 counts) of one forward."""
    log = _IndexerLog()
    if qat:
        kinds = kinds or storage_kinds(cfg)
        params = {n: fake_quant(t, kinds.get(n, "f32")) if t.is_floating_point() else t for n, t in params.items()}
    model = Transformer(cfg, params, quantized, _recording_ops(reference_ops("exact"), log))
    S = batch.shape[1] - 2
    ids = batch[:, :S]
    state = model.new_state(batch.shape[0])
    logits, X = model.forward(ids, state.seqs, return_hidden=True)
    mtp_logits = model.forward_mtp(X, batch[:, 1:S + 1], state.seqs)
    V = cfg.vocab_size
    lm = F.cross_entropy(logits.reshape(-1, V), batch[:, 1:S + 1].reshape(-1))
    mtp = F.cross_entropy(mtp_logits.reshape(-1, V), batch[:, 2:].reshape(-1))
    with torch.no_grad():
        correct = int((logits.argmax(-1) == batch[:, 1:S + 1]).sum())
        mtp_correct = int((mtp_logits.argmax(-1) == batch[:, 2:]).sum())
    return Losses(lm, mtp, indexer_kl(log.pairs, cfg.window), correct, mtp_correct, ids.numel())
