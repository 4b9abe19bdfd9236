"""Plain greedy decoding's one-token steps on the fused kernels (`decode_block.greedy_steps`, runtime/api.py
`Runtime._decode_greedy`).

The same native step as Transformer.forward's fused route (decode_step.cpp `dsv4d_run`: every block and the
head, the step embedding its ids, each row's argmax), through decode_spec.h `dsv4d_run_greedy`, which also
finds the first row with a NaN / Inf logit while the logits are in cache. What this module saves is the host
work around the call, not the arithmetic: right after a native step the caches hold its weights, not torch's
dispatch code, so every torch or numpy call then costs several times its warm cost (measured 4-7 us each at
1 thread: forward's `ids.to`, the logits' `torch.empty`, a `.numpy()`, a sum). Here the ids, the tokens and
the logits live in buffers made once for the set of sequences (cpu_decode_seqs.StepBatch, as the serving
engine's); a step is the positions, the call and the positions' advance.
"""

from __future__ import annotations

import torch

from . import cpu_decode as cd
from .cpu_decode_seqs import StepBatch


class GreedySteps:
    """One-token greedy steps of a fixed list of sequences (build a new one when the list changes): the serving
    engine's steady batch (`StepBatch`: its state table, ids and logits buffers kept across steps, rebuilt when
    the state layout changes) on `dsv4d_run_greedy`, whose results are each row's token, then the first
    non-finite row."""

    def __init__(self, sp, states: list):
        self.sp, self.states = sp, states
        self.batch = self._batch()

    def _batch(self) -> StepBatch:
        sp, n, lib = self.sp, len(self.states), cd._state["lib"]
        L, layers, head, embed = len(sp.plans), sp.layers, sp.head_ref, sp.embed
        call = lambda ids, seqs, logits, res: lib.dsv4d_run_greedy(  # noqa: E731
            L, layers, n, ids, seqs, head, logits, torch.get_num_threads(), embed, res)
        return StepBatch(call, sp.plans, self.states, sp.vocab, results=n + 1)

    @property
    def logits(self) -> torch.Tensor:
        """[n, V] of the last step (overwritten by the next)."""
        return self.batch.logits

    def step(self, toks: list[int]):
        """Feed token toks[j] to sequence j -> (each row's greedy token [n] (torch.argmax's first-maximum
        rule), the first row whose logits (`self.logits`) hold a NaN / Inf or -1), or None (nothing changed)
        where the per-op path must run (Transformer.forward then: tap recording, a sequence marked by a per-op
        speculative verify)."""
        if not self.batch.fits(self.states):  # a state's buffer objects replaced: their SeqCtr addresses anew
            self.batch = self._batch()
        if self.batch.run(self.states, toks) is None:
            return None
        res, n = self.batch.top.tolist(), len(toks)
        return res[:n], res[n]


def greedy_steps(model, states: list) -> GreedySteps | None:
    """The lean steps for `states`, or None where the model's fused step cannot run them (a TP / EP block, a
    vocab-parallel head, an embedding that is not a plain CPU table): Transformer.forward's path then."""
    sp = cd.step_plan(model)
    if sp is False or sp.head is None or sp.embed is None:
        return None
    return GreedySteps(sp, states)


cd.decode_block.greedy_steps = greedy_steps     # runtime/api.py's greedy decode loop
