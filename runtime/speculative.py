"""Speculative decoding with the MTP block: `Runtime.generate(..., speculative="mtp")`.

Each step, for every active sequence: the MTP block drafts the token after the one already chosen (`tok`,
decided but not yet fed), the main model verifies `[tok, draft]` in one forward, and the standard rule
decides:
- greedy: the draft is kept iff it is the main model's argmax, so the tokens are plain greedy decoding's;
- sampling: the draft d ~ q is kept with probability min(1, p(d)/q(d)); on rejection the token is drawn from
  norm(max(0, p - q)), so every emitted token has the target's distribution p exactly (Leviathan et al.,
  Chen et al. 2023). p and q are the same temperature / top-p transform of the target's and the draft's logits.
A kept draft also yields the main model's next token for free (from the verify's last position). On a
rejection the draft's position is undone exactly (`runtime.model.state.mark` / `settle`: ring slots,
compressed entries and indexer keys closed in it, the compressors' pending rows), so the state always equals,
bit for bit, that of a run that never saw a rejected token:
- where the verify forward ran its rows as one-token steps (the CPU's fused kernels: `Mark.exact_rows`,
  backends/cpu_decode_rows.py), the decided token's row is the plain step's, bit for bit, and is kept
  (settle(1));
- otherwise (the per-op path: a GEMM's bits depend on its batch, the MoE groups the draft with the decided
  token) the whole step is undone (settle(0)) and the decided token is fed alone, as plain decoding does
  (one re-feed forward for the rejected rows).
Sequences accept independently in a batch (one verify forward for all). Greedy decoding with the MTP block
takes each iteration's draft and verify in one backend call where the table has one (`decode_block.
spec_greedy_steps`: the CPU's fused kernels; the same arithmetic as the two calls), else the two forwards.

MTP alignment (V3 convention, as `Transformer.forward_mtp`): the MTP block at position t reads the main
model's final streams at t and the embedding of token t+1, and predicts token t+2. Its own (window-only)
state only ever sees committed positions, so it never needs a rollback.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .model.state import mark, settle
from .plan.memory import PREFILL_CHUNK
from .sampling import Generation, SamplingParams, probabilities

# A draft function: the token histories of some sequences (prompt + emitted tokens, the last one decided but
# not yet fed) -> draft logits [n, V] for the token after it. None = the model's MTP block.
DraftFn = Callable[[list[list[int]]], torch.Tensor]


def accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, gen: torch.Generator | None):
    """The speculative-sampling rule on rows of distributions p (target), q (draft) [B, V] and drafts [B]
    drawn from q -> (kept [B] bool, token [B]): the draft where kept, else a draw from norm(max(0, p - q))."""
    pd, qd = p.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
    u = torch.rand(draft.shape[0], generator=gen, dtype=p.dtype)
    kept = u * qd < pd                       # u < p/q: probability min(1, p(d)/q(d)); q(d) > 0 as d ~ q
    resid = (p - q).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    # A rejection implies p(d) < q(d), hence residual mass > 0; rows with none are kept ones (p = q there).
    resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), p)
    fresh = torch.multinomial(resid, 1, generator=gen)[:, 0]
    return kept, torch.where(kept, draft, fresh)


def _choose(logits: torch.Tensor, params: SamplingParams, gen) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=gen)[:, 0]


def _dist(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    p = probabilities(logits, params)
    return p / p.sum(-1, keepdim=True)


def _prefill(model, row: list[int], seq, chunk: int = PREFILL_CHUNK):
    """Prefill the main model and the MTP block on one prompt (chunks of `chunk` tokens) -> last logits [1, V]
    and the final streams of the last position [1, 1, hc, d] (not yet read by the MTP block)."""
    carry = None
    for i in range(0, len(row), chunk):
        logits, X = model.forward(torch.tensor([row[i:i + chunk]]), [seq], return_hidden=True)
        Xs = X if carry is None else torch.cat((carry, X), dim=1)          # positions mtp_pos .. pos-1
        nxt = row[seq.mtp_pos + 1:seq.pos]                                  # token after each but the last
        if nxt:
            model.forward_mtp(Xs[:, :-1], torch.tensor([nxt]), [seq], last=True)     # for its state
        carry = X[:, -1:]
    return logits[:, -1].float().cpu(), carry


def generate(rt, rows: list[list[int]], params: SamplingParams, gen, on_token=None, draft: DraftFn | None = None):
    """Speculative generation for token-id prompts `rows` -> runtime.sampling.Generation (see module doc).
    `decode_tokens` counts the tokens fed through verify steps; `rt.last_acceptance` holds (kept, drafted)."""
    model, eos, limit = rt.model, rt.config.eos_token_id, params.max_new_tokens
    state = rt.new_state(len(rows), context=max(map(len, rows)) + limit + 2)
    out: list[list[int]] = [[] for _ in rows]
    hist = [list(r) for r in rows]
    kept_n = drafted = steps = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        pre = [_prefill(model, r, state.seqs[b], rt.prefill_chunk) for b, r in enumerate(rows)]
        t1 = time.perf_counter()
        # Per sequence: hidden streams of positions [mtp_pos, pos) awaiting the MTP block (the first
        # len(nexts[b]) positions of hid[b]), and the token after each of them (the last one = the decided,
        # unfed token `tok`).
        hid = {b: x for b, (_, x) in enumerate(pre)}
        first = _choose(torch.cat([lg for lg, _ in pre]), params, gen) if limit else []
        active = []
        for b in range(len(rows)):
            if not limit:
                break
            tok = int(first[b])
            if _emit(out, hist, b, tok, on_token, eos, params):
                active.append(b)
        nexts = {b: [hist[b][-1]] for b in active}
        # greedy: the backend's one-call iterations (`decode_block.spec_greedy_steps`, built for the active
        # rows; None: the two forwards), where every row catches the MTP block up by as many positions
        make = getattr(model.ops.decode_block, "spec_greedy_steps", None) \
            if params.temperature == 0 and draft is None else None
        fast = fast_rows = None
        while active:
            seqs = [state.seqs[b] for b in active]
            marks = [mark(s, 2) for s in seqs]
            toks = [hist[b][-1] for b in active]
            res = None
            if make is not None and len({len(nexts[b]) for b in active}) == 1:
                if fast_rows != active:
                    fast, fast_rows = make(model, seqs), active
                if fast is not None:
                    H = hid[active[0]] if len(active) == 1 else torch.cat([hid[b] for b in active])
                    res = fast.step(H, [nexts[b] for b in active], toks)
            if res is not None:
                r, X, _ = res                             # (draft, target, bonus) per row
                d, fix, bonus = r[0::3], r[1::3], r[2::3]
                kept = [a == f for a, f in zip(d, fix)]
            else:
                q_logits = _draft_logits(model, active, seqs, hid, nexts, hist, draft)         # [n, V]
                dt = _choose(q_logits, params, gen)
                d = dt.tolist()
                ids = torch.tensor([[t, dj] for t, dj in zip(toks, d)])
                logits, X = model.forward(ids, seqs, return_hidden=True)
                logits = logits.float().cpu()
                if params.temperature == 0:
                    fix = logits[:, 0].argmax(-1).tolist()
                    kept = [f == dj for f, dj in zip(fix, d)]
                else:
                    kt, ft = accept(_dist(logits[:, 0], params), _dist(q_logits, params), dt, gen)
                    kept, fix = kt.tolist(), ft.tolist()
                bonus = _choose(logits[:, 1], params, gen).tolist()
            steps += 2 * len(active)
            still, redo = [], []
            for j, b in enumerate(active):
                drafted += 1
                if kept[j]:
                    kept_n += 1
                    settle(seqs[j], marks[j], 2)
                    hid[b], nexts[b] = X if len(active) == 1 else X[j:j + 1], [d[j], bonus[j]]
                    go = _emit(out, hist, b, d[j], on_token, eos, params) and \
                        _emit(out, hist, b, bonus[j], on_token, eos, params)
                elif marks[j].exact_rows:                   # row 0 = the plain step of the decided token
                    settle(seqs[j], marks[j], 1)
                    # one row: the whole buffer (its first row is read, by nexts' length), no torch call
                    hid[b], nexts[b] = X if len(active) == 1 and res is not None else X[j:j + 1, 0:1], [fix[j]]
                    go = _emit(out, hist, b, fix[j], on_token, eos, params)
                else:
                    settle(seqs[j], marks[j], 0)            # exactly the state before the verify step
                    nexts[b] = [fix[j]]
                    go = _emit(out, hist, b, fix[j], on_token, eos, params)
                    if go:
                        redo.append(j)
                if go:
                    still.append(b)
            if redo:
                # The decided token alone, as plain decoding feeds it: the state then holds nothing that was
                # computed next to the rejected draft, bit for bit; its streams feed the MTP block.
                _, Xr = model.forward(torch.tensor([[toks[j]] for j in redo]), [seqs[j] for j in redo],
                                      return_hidden=True)
                steps += len(redo)
                for k, j in enumerate(redo):
                    hid[active[j]] = Xr[k:k + 1]
            active = still
        t2 = time.perf_counter()
    rt.last_acceptance = (kept_n, drafted)
    texts = [rt.tokenizer.decode(o) for o in out]
    return Generation(out, texts, sum(map(len, rows)), t1 - t0, t2 - t1, steps)


def _emit(out, hist, b: int, tok: int, on_token, eos: int, params: SamplingParams) -> bool:
    """Record one new token of row b -> whether the row goes on."""
    out[b].append(tok)
    hist[b].append(tok)
    if on_token:
        on_token(b, tok)
    return not (params.stop_at_eos and tok == eos) and len(out[b]) < params.max_new_tokens


def _draft_logits(model, active, seqs, hid, nexts, hist, draft) -> torch.Tensor:
    """Draft logits [n, V] for the token after each active row's decided token."""
    if draft is not None:
        return draft([hist[b] for b in active]).float().cpu()
    out = [None] * len(active)
    by_len: dict[int, list[int]] = {}
    for j, b in enumerate(active):                   # the MTP block catches up 1 or 2 positions per row
        by_len.setdefault(len(nexts[b]), []).append(j)
    for js in by_len.values():
        ids = torch.tensor([nexts[active[j]] for j in js])
        k = ids.shape[1]                             # a row's hid may hold more positions: its first k
        X = hid[active[js[0]]][:, :k] if len(js) == 1 else torch.cat([hid[active[j]][:, :k] for j in js])
        lg = model.forward_mtp(X, ids, [seqs[j] for j in js], last=True)[:, -1].float().cpu()
        for k, j in enumerate(js):
            out[j] = lg[k]
    return torch.stack(out)
