"""Plain greedy decoding's one-token steps on the fused kernels (`decode_block.greedy_steps`, runtime/api.py
`Runtime._decode_greedy`).

The same native step as Transformer.forward's fused route (decode_step.cpp `dsv4d_run`: every block and the
head, the step embedding its ids, each row's argmax), through decode_spec.h `dsv4d_run_greedy`, which also
finds the first row with a NaN / Inf logit while the logits are in cache. What this module saves is the host
work around the call, not the arithmetic: right after a native step the caches hold its weights, not torch's
dispatch code, so every torch or numpy call then costs several times its warm cost (measured 4-7 us each at
1 thread: forward's `ids.to`, the logits' `torch.empty`, a `.numpy()`, a sum). Here the ids, the tokens and
the logits live in buffers made once for the set of sequences; a step is the state table, the call and the
positions.
"""

from __future__ import annotations

import array

import torch

from runtime.model.state import layout_stamp
from runtime.taps import recording

from . import cpu_decode as cd
from .cpu_decode_seqs import run_checked, table


class GreedySteps:
    """One-token greedy steps of a fixed list of sequences (build a new one when the list changes)."""

    def __init__(self, sp, states: list):
        self.sp, self.states, n = sp, states, len(states)
        self.res = array.array("q", bytes(8 * (n + 1)))      # each row's token, then the first non-finite row
        self.logits = torch.empty(n, sp.vocab)                # [n, V] of the last step (overwritten by the next)
        self.ids = array.array("q", bytes(8 * n))
        self.tab, self.stamp = table(states, [s.pos for s in states]), layout_stamp()
        self.rp, self.lp, self.ip = self.res.buffer_info()[0], self.logits.data_ptr(), self.ids.buffer_info()[0]

    def step(self, toks: list[int]):
        """Feed token toks[j] to sequence j -> (each row's greedy token [n] (torch.argmax's first-maximum
        rule), the first row whose logits (`self.logits`) hold a NaN / Inf or -1), or None (nothing changed)
        where the per-op path must run (Transformer.forward then: tap recording, a sequence marked by a per-op
        speculative verify)."""
        if recording():
            return None
        sp, states, n, lib = self.sp, self.states, len(toks), cd._state["lib"]
        starts = [s.pos for s in states]
        if self.stamp != layout_stamp():      # a state's buffer objects replaced: their SeqCtr addresses anew
            self.tab, self.stamp = table(states, starts), layout_stamp()
        tab = self.tab                        # the positions, then the SeqCtr addresses (kept across steps)
        tab[:n] = array.array("q", starts)
        self.ids[:] = array.array("q", toks)
        ip, nt = self.ip, torch.get_num_threads()
        call = lambda t: lib.dsv4d_run_greedy(len(sp.plans), sp.layers, n, ip, t, sp.head_ref,  # noqa: E731
                                              self.lp, nt, sp.embed, self.rp)
        if not run_checked(call, sp.plans, states, starts, tab):
            return None
        for s in states:
            s.pos += 1
        res = self.res.tolist()
        return res[:n], res[n]


def greedy_steps(model, states: list) -> GreedySteps | None:
    """The lean steps for `states`, or None where the model's fused step cannot run them (a TP / EP block, a
    vocab-parallel head, an embedding that is not a plain CPU table): Transformer.forward's path then."""
    sp = cd.step_plan(model)
    if sp is False or sp.head is None or sp.embed is None:
        return None
    return GreedySteps(sp, states)


cd.decode_block.greedy_steps = greedy_steps     # runtime/api.py's greedy decode loop
