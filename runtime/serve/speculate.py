"""`--speculative mtp`: MTP speculative decoding inside the continuous-batching step (issue 18 item 4).

With the flag, every decoding sequence takes each step as runtime.speculative does for `generate`, batched:
1. the MTP block drafts the token after the sequence's decided one (one `forward_mtp` per catch-up length,
   1 or 2 positions, over all sequences that have it);
2. one verify forward of [decided, draft] for every sequence (ragged positions, S = 2);
3. per sequence: greedy keeps the draft iff it is the target's argmax; sampling keeps it with probability
   min(1, p/q) and otherwise draws from norm(max(0, p - q)) (runtime.speculative.accept), with the
   sequence's own generator, temperature and top-p. A kept draft also yields the bonus token from the
   verify's second position; a rejection is undone exactly (`mark` / `settle`), so the state never holds a
   trace of a rejected draft: where the verify ran as one-token steps (the CPU's fused kernels,
   `Mark.exact_rows`) the decided token's row is kept (it is the plain step, bit for bit); otherwise the
   decided token is fed again alone (one forward for all rejected sequences), because the per-op path's
   logits of a verified position differ from one-token decode's in the last bits (measured ~2e-6: the
   per-sequence attention ops see two query rows; a near-tie could flip an argmax). Greedy outputs equal
   non-speculative greedy, token for token.
Logprobs come from the target's logits at each emitted position. Metrics count drafted and accepted tokens.

Restrictions (each refused with one line, never a silent fallback): one device (not under --tp/--ep); the
prefix cache is off (it does not hold the MTP block's window state yet: the CLI turns it off and says so);
requests with structured output (response_format / tool_choice) are refused with a 400, because their
grammar would have to accept the draft before masking the bonus position.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..model.state import mark, settle
from ..sampling import SamplingParams, probabilities
from ..speculative import accept


def check(rt, method: str, cache, executor) -> None:
    """Refuse a speculative engine this build cannot run, with the reason and the fix."""
    if method != "mtp":
        raise InputError(f"unknown speculative method {method!r}; the one supported is 'mtp'")
    if not rt.config.num_mtp:
        raise InputError("--speculative mtp needs a checkpoint with an MTP block (this one has none); drop it")
    if executor is not None or (rt.parallel is not None and rt.parallel.distributed):
        raise InputError("--speculative mtp runs on one device; drop it or --tp/--ep")
    if cache is not None:
        raise InputError("--speculative mtp runs without the prefix cache (it does not hold the MTP block's "
                         "state yet); pass --cache-mb 0")


def prefill_mtp(model, seq, chunk: torch.Tensor) -> torch.Tensor:
    """One prefill chunk of the main model, then the MTP block over every position whose next token is known
    (its last position waits in seq.hid for the first decided token) -> the chunk's logits."""
    st = seq.state
    logits, X = model.forward(chunk, [st], return_hidden=True)
    Xs = X if seq.hid is None else torch.cat((seq.hid, X), dim=1)          # positions mtp_pos .. pos-1
    nxt = seq.prompt[st.mtp_pos + 1:st.pos]
    if nxt:
        model.forward_mtp(Xs[:, :-1], torch.tensor([nxt]), [st], last=True)        # for its state
    seq.hid = X[:, -1:]
    return logits


def _params(seq) -> SamplingParams:
    return SamplingParams(seq.params.temperature, seq.params.top_p, None, seq.params.max_tokens)


def _dist(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    p = probabilities(logits, sp)
    return p / p.sum(-1, keepdim=True)


def _draft_logits(eng, seqs) -> torch.Tensor:
    if eng.draft is not None:                       # a draft function (runtime.speculative.DraftFn)
        return eng.draft([s.prompt + s.out for s in seqs]).float().cpu()
    out: list = [None] * len(seqs)
    by_len: dict[int, list[int]] = {}
    for j, s in enumerate(seqs):                    # the MTP block catches up 1 or 2 positions per sequence
        by_len.setdefault(len(s.nexts), []).append(j)
    for js in by_len.values():
        X = seqs[js[0]].hid if len(js) == 1 else torch.cat([seqs[j].hid for j in js])
        ids = torch.tensor([seqs[j].nexts for j in js])
        lg = eng.model.forward_mtp(X, ids, [seqs[j].state for j in js], last=True)[:, -1].float().cpu()
        for k, j in enumerate(js):
            out[j] = lg[k]
    return torch.stack(out)


def decode_step(eng, seqs) -> None:
    """One speculative step for decoding sequences `seqs` (see the module doc)."""
    q = _draft_logits(eng, seqs)                                                   # [n, V]
    drafts, live = [], []
    for j, s in enumerate(seqs):
        try:
            sp = _params(s)
            d = q[j].argmax() if sp.temperature == 0 else torch.multinomial(probabilities(q[j:j + 1], sp), 1,
                                                                             generator=s.gen)[0, 0]
        except Exception as e:              # this sequence's own sampling failed: it alone ends (engine.fail)
            eng.fail(s, e)
            continue
        drafts.append(int(d))
        live.append(j)
    if len(live) < len(seqs):
        seqs, q = [seqs[j] for j in live], q[live]
        if not seqs:
            return
    ids = torch.tensor([[s.out[-1], d] for s, d in zip(seqs, drafts)])
    marks = [mark(s.state, 2) for s in seqs]
    logits, X = eng.model.forward(ids, [s.state for s in seqs], return_hidden=True)
    logits = logits.float().cpu()
    redo = []
    for j, (s, d) in enumerate(zip(seqs, drafts)):
        try:
            if _settle_one(eng, s, j, d, q, logits, X, marks[j]):
                redo.append(j)
        except Exception as e:              # its own acceptance / output failed: it alone ends
            eng.fail(s, e)
    if redo:
        # The decided token alone, as plain decoding feeds it; its streams feed the MTP block next step.
        rs = [seqs[j] for j in redo]
        _, Xr = eng.model.forward(ids[redo, :1], [s.state for s in rs], return_hidden=True)
        for k, s in enumerate(rs):
            s.hid = Xr[k:k + 1]


def _settle_one(eng, s, j: int, d: int, q, logits, X, mk) -> bool:
    """Row j's outcome: accept or reject draft d, roll the state to match, emit -> True if the decided token
    must be fed again alone (rejected, where the verify rows were not exact one-token steps)."""
    sp, m = _params(s), eng.metrics
    if sp.temperature == 0:
        fix = int(logits[j, 0].argmax())
        kept = fix == d
    else:
        k, f = accept(_dist(logits[j:j + 1, 0], sp), _dist(q[j:j + 1], sp), torch.tensor([d]), s.gen)
        kept, fix = bool(k[0]), int(f[0])
    m.spec_drafted.inc()
    if kept:
        m.spec_accepted.inc()
        settle(s.state, mk, 2)
        s.hid = X[j:j + 1, 0:2]
        eng._take(s, d, logits[j, 0])
        if s.status != "done":
            bonus = eng._pick(s, logits[j, 1])
            s.nexts = [d, bonus]
            eng._take(s, bonus, logits[j, 1])
        return False
    if mk.exact_rows:                       # row 0 = the plain step of the decided token
        settle(s.state, mk, 1)
        s.hid, s.nexts = X[j:j + 1, 0:1], [fix]
        eng._take(s, fix, logits[j, 0])
        return False
    settle(s.state, mk, 0)                  # exactly the state before the verify step
    s.nexts = [fix]
    eng._take(s, fix, logits[j, 0])
    return s.status != "done"
