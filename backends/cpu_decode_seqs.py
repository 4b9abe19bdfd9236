"""The fused decode step's view of the sequences (backends/cpu_decode.py, decode_step.cpp `dsv4d_run`).

A step hands the kernels, per sequence, its position and the address of its SeqCtr array: one SeqCtr per layer,
the addresses of that layer's Rows / Pending `_c` arrays (runtime/model/state.py: counters, buffer addresses,
capacity). The native side builds each layer's record (SeqP) from them and advances the counters itself
(decode_step.cpp `seq_record`: the one place a sequence's record is computed, by Compressor.advance's rule), so
a step's Python work is one int per sequence. Where a buffer has no room for the step's rows the native call
changes nothing and says so; `make_room` reserves exactly as the kernels' check asks and the call is retried.
`StepBatch`: the same table and buffers kept across the steps of an unchanged batch (the serving engine's).
"""

from __future__ import annotations

import array

from runtime.model.state import layout_stamp
from runtime.taps import recording

from .cpu_decode_abi import CTR_BYTES


class _Ctr:
    """A sequence's SeqCtr array, built at its first fused step; stale once `layout_stamp()` moves (a
    LayerState's buffer objects replaced) or the sequence's LayerStates are new (`reset`). A copied state
    (deepcopy) starts without one: its buffers are its own."""

    __slots__ = ("stamp", "layers", "arr", "addr")

    def __init__(self, seq):
        self.stamp, self.layers = layout_stamp(), seq.layers
        addrs = []
        for st in seq.layers:
            addrs += [o._c.buffer_info()[0] if o is not None else 0
                      for o in (st.kv, st.comp_buf, st.index_keys, st.index_buf)]
        self.arr = array.array("q", addrs)
        self.addr = self.arr.buffer_info()[0]

    def __deepcopy__(self, memo):
        return None


def seq_ctr(seq) -> int:
    """The address of `seq`'s SeqCtr array (layer l's at + l * CTR_BYTES)."""
    c = seq.__dict__.get("_fused_ctr")
    if c is None or c.stamp != layout_stamp() or c.layers is not seq.layers:
        c = seq._fused_ctr = _Ctr(seq)
    return c.addr


def table(states: list, starts: list[int], layer: int = 0) -> array.array:
    """The kernels' `seqs` argument: each sequence's position, then each one's SeqCtr address (from `layer`)."""
    off = layer * CTR_BYTES
    return array.array("q", starts + [seq_ctr(s) + off for s in states])


def make_room(plans: list, states: list, starts: list[int], S: int = 1) -> None:
    """Room for S more rows per sequence where the kernels found none (status 1): they write new entries,
    indexer keys and pending rows in place (the conditions of decode_seqs.h `seq_status` / decode_spec.h
    `chunk_status`)."""
    for p in plans:
        if not p.ratio:
            continue
        for s, p0 in zip(states, starts):
            st = s.layers[p.layer]
            bufs = ((st.kv, st.comp_buf),) + (((st.index_keys, st.index_buf),) if p.csa else ())
            for rows, pend in bufs:
                if rows.n + S > rows._c[2]:
                    rows.reserve(S)
                if p0 + S - pend.start > pend._c[5]:
                    pend.reserve(p0 + S - pend.start)


def run_checked(call, plans: list, states: list, starts: list[int], seqs: array.array, S: int = 1) -> bool:
    """`call(address of seqs)` (a native step's call: status), after making room for S rows per sequence if it
    asks -> False, with nothing changed, where a sequence is in a per-op speculative verify step (`mark`-ed
    pending rows, status 2) or a token id is outside the embedding (3): the per-op path runs then (and reports
    a bad id)."""
    status = call(seqs.buffer_info()[0])
    if status == 1:
        make_room(plans, states, starts, S)
        status = call(seqs.buffer_info()[0])
        if status == 1:
            raise RuntimeError("fused decode: no room for the step's rows after reserving (a bug)")
    return status == 0


class StepBatch:
    """The same one-token steps of the same sequences, step after step (the serving engine's running batch):
    what `decode_step` builds per call (the `seqs` table's SeqCtr addresses, the ids, logits and greedy-token
    buffers, the native call's fixed arguments) built once and reused while the batch and the state layout
    stay the same. Measured at 16 sequences: decode_step's Python side, a dozen microseconds with caches cold
    after the native step, and seq_ctr's per-sequence lookups were a third of the engine's host time per step.
    `run` returns the logits [B, V] (carrying `argmax_rows`), valid until its next call, or None where the
    general path must run (nothing changed then): a speculative verify's held pending rows, a token id outside
    the embedding, tap recording."""

    def __init__(self, call, plans: list, states: list, vocab: int, results: int | None = None):
        import torch

        self.call, self.plans, self.states = call, plans, list(states)
        self.stamp, B = layout_stamp(), len(states)
        self.ctrs = [seq_ctr(s) for s in self.states]
        self.tab = array.array("q", [0] * B + self.ctrs)
        self.ids = array.array("q", bytes(8 * B))
        self.logits = torch.empty(B, vocab)
        # each row's greedy token (and what else the call reports after them: `results` slots in all)
        self.logits.argmax_rows = self.top = array.array("q", bytes(8 * (B if results is None else results)))
        # the native call's addresses (the buffers above never move)
        self.args = (self.ids.buffer_info()[0], self.tab.buffer_info()[0], self.logits.data_ptr(),
                     self.top.buffer_info()[0])            # (ids, seqs, logits, top): `call`'s arguments

    def fits(self, states: list) -> bool:
        """Whether this batch is `states` (the same objects in the same order) with the layout it was built on."""
        return states == self.states and layout_stamp() == self.stamp

    def run(self, states: list, tokens: list[int]):
        # run_checked's rule, inlined for the common status 0: each Python call here costs several times its
        # warm cost right after the previous step's native call (a lambda and a call: ~2 us at 1 sequence)
        if recording():
            return None
        starts = [s.pos for s in states]
        self.tab[:len(starts)] = array.array("q", starts)
        self.ids[:] = array.array("q", tokens)
        status = self.call(*self.args)
        if status == 1:
            make_room(self.plans, states, starts)
            status = self.call(*self.args)
            if status == 1:
                raise RuntimeError("fused decode: no room for the step's rows after reserving (a bug)")
        if status != 0:
            return None
        for s in states:
            s.pos += 1
        return self.logits
