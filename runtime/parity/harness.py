"""Running one side of a parity comparison: taps on the prefill, teacher-forced and free-running decode.

For each prompt a side
1. prefills it with a `TapRecorder` on (the taps of every layer, `final.logits` included);
2. decodes `decode_steps` tokens one at a time, feeding the *reference's* greedy tokens (teacher forcing), so
   both sides see the same context at every step and their next-token distributions compare step by step
   across window and compression boundaries;
3. decodes greedily on its own (free running), for the first step where the tokens diverge.
The reference's own greedy tokens are its teacher-forced tokens, so it runs steps 1-2 once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..taps import TapRecorder


@dataclass
class SideRun:
    label: str
    taps: dict[str, torch.Tensor]                     # name -> rows, every prompt's prefill concatenated
    tap_order: list[str]                              # the order the model reached them
    step_logits: list[torch.Tensor]                   # per prompt: [decode_steps, vocab] teacher-forced
    greedy: list[list[int]]                           # per prompt: free-running greedy tokens
    seconds: float
    extra: dict = field(default_factory=dict)


def _decode(rt, prompt: list[int], steps: int, feed: list[int] | None, recorder: TapRecorder | None):
    """Prefill `prompt` (taps on if a recorder is given), then `steps` one-token steps feeding `feed` (teacher
    forcing) or the argmax (greedy). -> (logits [steps, V] predicting each fed token, tokens)."""
    state = rt.new_state(1)
    if recorder is not None:
        with recorder:
            last = rt.forward([prompt], state=state)[0, -1]
    else:
        last = rt.forward([prompt], state=state)[0, -1]
    logits, tokens = [], []
    for i in range(steps):
        logits.append(last)
        tok = feed[i] if feed is not None else int(last.argmax())
        tokens.append(tok)
        if i + 1 < steps:
            last = rt.forward([[tok]], state=state)[0, -1]
    return torch.stack(logits) if logits else torch.empty(0), tokens


def run_side(rt, label: str, prompts: list[list[int]], steps: int, feed: list[list[int]] | None,
             progress=None) -> SideRun:
    """feed=None: the reference (greedy = teacher tokens). Otherwise teacher-forced on `feed`, plus a
    free-running greedy pass."""
    t0 = time.perf_counter()
    recorder = TapRecorder()
    step_logits, greedy = [], []
    for i, p in enumerate(prompts):
        lg, toks = _decode(rt, p, steps, None if feed is None else feed[i], recorder)
        step_logits.append(lg)
        greedy.append(toks if feed is None else _decode(rt, p, steps, None, None)[1])
        if progress is not None:
            progress.update(1)
    return SideRun(label, recorder.tensors(), recorder.names, step_logits, greedy, time.perf_counter() - t0)
