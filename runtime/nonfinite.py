"""Non-finite logits are an error, not garbage tokens: where they appeared (which step, which layer tap).

`Runtime.forward` and `Runtime.generate` check their logits (one `isfinite` pass over what they return anyway).
Only when that fails is the failing forward re-run on a fresh sequence with a `FirstNonFinite` tap recorder,
which names the first tap (`L{i}.attn.q`, ..., `final.logits`) holding a NaN or Inf: a corrupt or NaN-weight
checkpoint, or an overflow in a narrow dtype. The normal path pays for the check only.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import V4Error
from .plan.memory import PREFILL_CHUNK
from .taps import FirstNonFinite


class NonFiniteError(V4Error):
    """The model produced NaN or Inf logits."""


def finite(logits: torch.Tensor) -> bool:
    return bool(torch.isfinite(logits).all())


def _replay(model, prefill: torch.Tensor, decode: list[int], rec: FirstNonFinite, chunked: bool) -> None:
    """Feed `prefill` ([B, S]; in PREFILL_CHUNK pieces when `chunked`, as generate does), then `decode` one token at a
    time, on fresh sequences; `rec` is active during the prefill when there is no decode, else during the last
    decode step only (the earlier ones were finite)."""
    seqs = model.new_state(prefill.shape[0]).seqs
    step = PREFILL_CHUNK if chunked else prefill.shape[1]
    off = contextlib.nullcontext()
    with torch.inference_mode():
        for i in range(0, prefill.shape[1], step):
            with off if decode else rec:
                model.forward(prefill[:, i:i + step], seqs)
        for j, tok in enumerate(decode):
            with rec if j == len(decode) - 1 else off:
                model.forward(torch.tensor([[tok]]), seqs)


def raise_non_finite(model, where: str, prefill: torch.Tensor, decode: "list[int]" = (), chunked: bool = True,
                     note: str = "") -> None:
    """Locate the first non-finite tap by replaying the failing forward, then raise NonFiniteError."""
    rec = FirstNonFinite()
    try:
        _replay(model, prefill, list(decode), rec, chunked)
        tap = f"first non-finite tap {rec.first}" if rec.first else \
            "no tap held a non-finite value when re-run (this model exposes no taps, or it needs the earlier state)"
    except Exception as e:                        # the diagnosis must not hide the error it diagnoses
        tap = f"the tap could not be located ({type(e).__name__})"
    raise NonFiniteError(f"non-finite logits (NaN or Inf) at {where}: {tap}{note}; the checkpoint holds non-finite "
                         "weights or this profile's numerics overflow: check its weights, or compare with "
                         "--profile cpu (float32)")
