"""The fused decode kernels for speculative decoding (issue 18): chunks of S tokens per sequence in one call.

- `decode_rows` (`decode_block.whole_rows`, Transformer.forward's route for a chunk of 1 < S <= `max_rows`
  tokens per sequence, e.g. a verify step [decided, draft]): every block and the head as one dsv4d_step_rows
  call. The kernel builds each row's records from the sequences' state arrays (as dsv4d_run: the layer
  counters after the rows before it, decode_seqs.h `seq_record`) and runs a sequence's rows in position order,
  so row i is exactly the one-token step at its position, bit for bit (the kernels are batch-invariant): a
  verify step can keep the decided token's row instead of feeding it again.
- `mtp_step` (`decode_block.mtp_step`, Transformer.forward_mtp's route): the MTP block's input projections,
  its block and its head as one dsv4d_mtp_step call (the draft), 1 <= S <= `max_rows` positions per sequence;
  with `last` (the draft needs only the last position's logits) a window-only block's earlier rows only write
  their ring rows (the same kernels, so the same bits).
- `SpecGreedy` (`decode_block.spec_greedy_steps`, runtime.speculative's greedy loop): the draft and the verify
  of one iteration as one dsv4d_spec_step call (the MTP argmax feeds the verify natively), the argmaxes with it.
- mark / settle (runtime.model.state): for a marked sequence `_capture` saves, before the call, what the rows
  overwrite in place -- the ring rows of the chunk's positions, and a compressor's live pending rows when a
  row closes its window (the kernel then shifts or restarts them); `restore` puts back exactly the rejected
  rows' part, the counters by the position rule. S <= every compressor ratio (`max_rows`): a chunk closes
  at most one window per compressor, so one snapshot taken before the call covers any kept prefix.
Both refuse (None: nothing changed, the per-op path runs) where the fused one-token step would: a TP / EP
block, a vocab-parallel head (the per-op head then runs after the rows), tap recording.
"""

from __future__ import annotations

import array
import ctypes

import torch

from runtime.model.state import _pending_start
from runtime.taps import recording

from . import cpu_decode as cd
from .cpu_decode_abi import HeadP, LayerP, MtpP
from .cpu_decode_seqs import make_room, run_checked, table

_memmove = ctypes.memmove
F32 = 4


def max_rows(plans) -> int:
    """The most tokens per sequence a chunk may have: <= the window and every compressor's ratio (the
    indexer's is 4), so that rows keep exactly what `restore` can undo."""
    lim = [p.W for p in plans] + [p.ratio for p in plans if p.ratio] + [4 for p in plans if p.csa]
    return min(lim)


class _Scratch:
    """A float32 [rows, width] buffer for a state object's undo copies and its address (host work between
    native calls is costly: no torch call to reach it). A copied state (deepcopy) starts without one."""

    __slots__ = ("t", "rows", "addr")

    def __init__(self, rows: int, width: int):
        self.t = torch.empty(rows, width)
        self.rows, self.addr = rows, self.t.data_ptr()

    def __deepcopy__(self, memo):
        return None


def _scratch(obj, name: str, rows: int, width: int) -> int:
    """The address of a float32 [>= rows, width] buffer kept on `obj` for its undo copies (allocated once)."""
    t = obj.__dict__.get(name)
    if t is None or t.rows < rows:
        t = _Scratch(max(rows, 8), width)
        obj.__dict__[name] = t           # not a buffer of the state's layout (LayerState.__setattr__'s stamp)
    return t.addr


def _width(obj, name: str, t) -> int:
    """Row width of buffer `t` of `obj`, remembered (a buffer regrows in rows only)."""
    w = obj.__dict__.get(name)
    if w is None:
        w = obj.__dict__[name] = t.shape[1]
    return w


def _snapshot(buf, p0: int, S: int, m: int) -> tuple | None:
    """A compressor's live pending rows, copied, when one of positions p0 .. p0+S-1 closes its window:
    (buffer, closing row, rows, values copy, scores copy (addresses)); else None."""
    r = (-(p0 + 1)) % m
    if r >= S:
        return None
    c = buf._c                          # [n, start, retain, values address, scores address, capacity]
    n0, w = c[0], _width(buf, "_undo_w", buf._kv)
    skv, ssc = _scratch(buf, "_undo_kv", n0, w), _scratch(buf, "_undo_score", n0, w)
    _memmove(skv, c[3], n0 * w * F32)
    _memmove(ssc, c[4], n0 * w * F32)
    return buf, r, n0 * w * F32, skv, ssc


def _capture(plans, states: list, starts: list[int], S: int, marks: list) -> None:
    """Each marked sequence's undo record for `restore`, taken before the chunk's call changes anything."""
    for s, p0, m in zip(states, starts, marks):
        if m is None:
            continue
        m.undo, m.restore = [], restore
        for p in plans:
            st, ratio, W = s.layers[p.layer], p.ratio, p.W
            kvp, D = st.kv._c[1], _width(st, "_undo_D", st.kv._buf)      # Rows._c: [n, address, capacity]
            rp, s0 = _scratch(st, "_undo_ring", S, D), p0 % W
            if s0 + S <= W:                     # the chunk's slots in one run (no wrap)
                _memmove(rp, kvp + s0 * D * F32, S * D * F32)
            else:
                for i in range(S):
                    _memmove(rp + i * D * F32, kvp + ((p0 + i) % W) * D * F32, D * F32)
            snaps = [sn for sn in (_snapshot(st.comp_buf, p0, S, ratio) if ratio else None,
                                   _snapshot(st.index_buf, p0, S, 4) if p.csa else None) if sn is not None]
            m.undo.append((st, ratio, D, rp, snaps))


def _run(call, plans, states: list, starts: list[int], S: int, marks: list, seqs: array.array) -> bool:
    """`run_checked` of a chunk entry point after the marked sequences' capture -> whether it ran (False,
    nothing changed and no undo record: held pending rows, the per-op path runs)."""
    _capture(plans, states, starts, S, marks)
    ok = run_checked(call, plans, states, starts, seqs, S)
    if not ok:
        for m in marks:
            if m is not None:
                m.undo = m.restore = None
    return ok


def _chunk_rows(sp) -> int:
    """`max_rows` of the model's step plan (computed once)."""
    rows = sp.__dict__.get("rows")
    if rows is None:
        sp.rows = rows = max_rows(sp.plans)
    return rows


def restore(seq, m, keep: int) -> None:
    """`settle`'s undo for a fused chunk: the state after the first `keep` rows (see the module doc). The
    counters are those of a sequence at that position (the rule runtime.model.state.settle also uses). All
    rows kept: nothing to undo (the kernels advanced the counters by that rule)."""
    if keep == m.S:
        return
    end = m.pos + keep
    for st, ratio, D, rp, snaps in m.undo:
        kvp, W = st.kv._c[1], st.W
        for i in range(keep, m.S):
            _memmove(kvp + ((m.pos + i) % W) * D * F32, rp + i * D * F32, D * F32)
        if ratio:
            cb = st.comp_buf
            st.kv.n, cb.start = W + end // ratio, _pending_start(end, ratio, st.index_buf is not None)
            cb.n = end - cb.start
        if st.index_buf is not None:
            ib = st.index_buf
            st.index_keys.n, ib.start = end // 4, _pending_start(end, 4, True)
            ib.n = end - ib.start
        for pb, r, nb, skv, ssc in snaps:
            if r >= keep:           # the window closed at a dropped row: its rows before the chunk come back
                _memmove(pb._c[3], skv, nb)
                _memmove(pb._c[4], ssc, nb)


def decode_rows(model, X, ids, starts, states):
    """A chunk of S tokens per sequence through every block and the head in one call: X [B, S, hc, d] (None:
    Transformer.streams of ids) -> (final streams [B, S, hc, d], logits [B, S, V] or None where the head is
    vocab-parallel), or None (nothing changed) where the per-op path runs (see the module doc; S > max_rows
    too)."""
    sp = cd.step_plan(model)
    if sp is False or recording():
        return None
    B, S = ids.shape
    marks = [s.marked for s in states]
    if S > _chunk_rows(sp) or any(m is not None and m.rings is not None for m in marks):
        return None
    X = model.streams(ids) if X is None else X
    X = X.reshape(B * S, *X.shape[2:]).contiguous()
    out = torch.empty_like(X)
    logits = X.new_empty(B, S, sp.vocab) if sp.head is not None else None
    idv = cd._ids64(ids)
    tab = table(states, starts)
    call = lambda t: cd._state["lib"].dsv4d_step_rows(  # noqa: E731
        len(sp.plans), sp.layers, B, S, X.data_ptr(), idv.data_ptr(), t, out.data_ptr(),
        sp.head_ref, logits.data_ptr() if logits is not None else None, torch.get_num_threads())
    if not _run(call, sp.plans, states, starts, S, marks, tab):
        return None
    return out.view(B, S, *X.shape[1:]), logits


class MtpPlan:
    """MTP block i's descriptors: its input projections, its block's (cpu_decode.Plan), its head's."""

    def __init__(self, model, i: int):
        mtp, cfg = model.mtp[i], model.cfg
        keep = cd._Keep()
        self.keep, self.plan = keep, cd.plan_for(mtp.block)
        p = self.plan
        keep.widen = p.keep.widen              # widened / packed exactly as the model's blocks (cpu_decode.Plan)
        self.layers = (LayerP * 1)(LayerP(*(ctypes.pointer(s) for s in (p.ha, p.A, p.hf, p.M))))
        emb = model.embed
        if emb.dtype not in (torch.float32, torch.bfloat16) or not emb.is_contiguous():
            emb = emb.float().contiguous()
        keep.append(emb)
        self.M = MtpP(emb.data_ptr(), int(emb.dtype == torch.bfloat16), keep.f32(mtp.enorm), keep.f32(mtp.hnorm),
                      cd.lin_desc(mtp.e_proj.weight, keep), cd.lin_desc(mtp.h_proj.weight, keep), cfg.hc_mult,
                      cfg.hidden_size, cfg.norm_eps)
        h = mtp.head
        self.head = HeadP(keep.f32(h.fn), keep.f32(h.base), keep.f32(h.scale), keep.f32(h.norm), cfg.hc_mult,
                          cfg.hidden_size, cfg.hc_eps, cfg.norm_eps, cd.lin_desc(h.head_w, keep))
        self.vocab, self.layer, self.rows = h.head_w.shape[0], p.layer, max_rows([p])
        self.M_ref, self.head_ref = ctypes.byref(self.M), ctypes.byref(self.head)


def _mtp_plan(model, i: int):
    plans = model.__dict__.setdefault("_fused_mtp", {})
    mp = plans.get(i)
    if mp is None:
        mtp = model.mtp[i]
        ok = cd.plan_for(mtp.block) is not False and not mtp.head.par.distributed and \
            isinstance(model.embed, torch.Tensor)
        plans[i] = mp = MtpPlan(model, i) if ok else False
    return mp


def mtp_step(model, i: int, X, next_ids, starts, states, last: bool = False):
    """MTP block i on final streams X [B, S, hc, d] and the next ids [B, S] in one call -> logits [B, S, V]
    ([B, 1, V] of each last position with `last`), or None (nothing changed) where the per-op block runs.
    Its layer state advances as the block's would."""
    mp = _mtp_plan(model, i)
    B, S = next_ids.shape
    if mp is False or recording() or S > mp.rows:
        return None
    idv = cd._ids64(next_ids)
    X = X.reshape(B * S, *X.shape[2:]).contiguous()
    n = B if last else B * S
    out, logits = X.new_empty(n, *X.shape[1:]), X.new_empty(B, n // B, mp.vocab)
    tab = table(states, starts, mp.layer)
    call = lambda t: cd._state["lib"].dsv4d_mtp_step(  # noqa: E731
        ctypes.byref(mp.M), mp.layers, ctypes.byref(mp.head), B, S, X.data_ptr(), idv.data_ptr(),
        t, out.data_ptr(), logits.data_ptr(), int(last), torch.get_num_threads())
    if not _run(call, [mp.plan], states, starts, S, [None] * B, tab):
        return None
    return logits


class SpecGreedy:
    """Greedy speculative iterations of a fixed list of sequences (runtime.speculative's loop; build a new one
    when the list changes), each one dsv4d_spec_step call: MTP block 0 catches up the k positions of streams
    H [n, k, hc, d] with the tokens after them, nexts [n][k] (the last = the decided, unfed token toks[b]), and
    drafts its argmax d; the main model verifies [tok, d]. The outputs live in buffers made once (host work
    between native calls costs several times its warm cost: the caches then hold the step's weights), the
    final streams in two alternating ones: a step's streams stay valid through the next step, which reads
    them as its H (one sequence's H may be a whole buffer of the step before: its first k rows are read)."""

    def __init__(self, model, mp, sp, states: list):
        n, cfg = len(states), model.cfg
        self.mp, self.sp, self.states = mp, sp, states
        self.X = [torch.empty(n, 2, cfg.hc_mult, cfg.hidden_size) for _ in range(2)]
        self.xp = [x.data_ptr() for x in self.X]
        self.logits = torch.empty(n, 2, sp.vocab)
        self.lp, self.i = self.logits.data_ptr(), 0

    def step(self, H, nexts: list[list[int]], toks: list[int]):
        """-> (flat [n * 3] of (draft, argmax of the verify's row 0, of its row 1) per sequence, final streams
        [n, 2, hc, d], logits [n, 2, V] (both overwritten two steps later)), or None (nothing changed) where
        the per-op path must run. Marked sequences get their undo records (`_capture`)."""
        mp, sp, states = self.mp, self.sp, self.states
        n, k = len(nexts), len(nexts[0])
        if k > mp.rows or recording():
            return None
        marks = [s.marked for s in states]
        for m in marks:
            if m is not None and m.rings is not None:
                return None
        if n == 1 and (H is self.X[0] or H is self.X[1]):
            hp = self.xp[H is self.X[1]]        # its first k rows: positions mtp_pos .. mtp_pos + k - 1
        else:
            H = H.reshape(n * k, *H.shape[2:]).contiguous()
            hp = H.data_ptr()
        mstarts, starts = [s.mtp_pos for s in states], [s.pos for s in states]
        mtab, tab = table(states, mstarts, mp.layer), table(states, starts)
        io = array.array("q", [t for nx in nexts for t in nx] + toks + [0] * (3 * n))   # ids in, results out
        at, j, lib, nt = io.buffer_info()[0], self.i, cd._state["lib"], torch.get_num_threads()
        call = lambda t: lib.dsv4d_spec_step(  # noqa: E731
            mp.M_ref, mp.layers, mp.head_ref, n, k, hp, at, mtab.buffer_info()[0],
            len(sp.plans), sp.layers, sp.head_ref, at + 8 * n * k, t, self.xp[j], self.lp, at + 8 * (n * k + n), nt)
        make_room([mp.plan], states, mstarts, k)        # the MTP part's rows first (its status 1 is not retried)
        if not _run(call, sp.plans, states, starts, 2, marks, tab):
            return None
        self.i = 1 - j
        for s in states:
            s.pos += 2
            s.mtp_pos += k
        return io[n * k + n:].tolist(), self.X[j], self.logits


def spec_greedy_steps(model, states: list) -> SpecGreedy | None:
    """The one-call greedy iterations for `states`, or None where either part takes the per-op path (a TP /
    EP block, a vocab-parallel head, chunks of one row)."""
    mp, sp = _mtp_plan(model, 0), cd.step_plan(model)
    if mp is False or sp is False or sp.head is None or _chunk_rows(sp) < 2:
        return None
    return SpecGreedy(model, mp, sp, states)


cd.decode_block.whole_rows = decode_rows    # Transformer.forward's route for a chunk of a few tokens per sequence
cd.decode_block.mtp_step = mtp_step         # Transformer.forward_mtp's
cd.decode_block.spec_greedy_steps = spec_greedy_steps   # runtime.speculative's greedy loop
