"""Taps: named intermediate tensors the model exposes for parity checks (runtime.parity).

Model code calls `tap(name, tensor)` at fixed points with stable names (`L{i}.attn.q`, `L{i}.indexer.topk`,
`final.logits`, ...). With no recorder active that is one falsy check and nothing else: the model computes
exactly the same numbers whether taps are on or off. Inside `with TapRecorder() as rec:` every call copies the
tensor to the CPU (float32, or int64 for index taps), in call order; a name tapped several times in one
forward (per sequence of a batch) is concatenated. Each tap comes back as rows of its last dim ([tokens x
heads x streams, features] for activations, [queries, k] for index sets), so taps from prompts of different
lengths concatenate too (index sets with fewer entries, where few were visible, are padded with -1).
`FirstNonFinite` is a recorder that only notes the first tap holding a NaN or Inf.
"""

from __future__ import annotations

import math
import re

import torch

# Where each kind of tap sits inside a layer, in execution order: `model_order` sorts tap names by layer, then by
# this rank, so the order does not depend on which prompt reached a tap first (short prompts close no CSA/HCA
# window, so their compressed-entry taps appear only with a later prompt).
KINDS = ("attn.q", "attn.kv", "csa.compressed", "hca.compressed", "indexer.keys", "indexer.topk", "attn.out",
         "hc.attn_post", "moe.route", "moe.out", "hc.post")


def model_order(name: str) -> tuple:
    m = re.match(r"L(\d+)\.(.+)$", name)
    if not m:
        return (math.inf, 0, name)                     # final.logits and other model-level taps: last
    kind = m[2]
    return (int(m[1]), KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


_ACTIVE: list["TapRecorder"] = []


def recording() -> bool:
    """Whether a recorder is active (lets a caller skip preparing a tap's tensor)."""
    return bool(_ACTIVE)


def tap(name: str, t: torch.Tensor) -> None:
    if _ACTIVE:
        _ACTIVE[-1].record(name, t)


class TapRecorder:
    def __init__(self, only: "set[str] | None" = None):
        self.only = only
        self.parts: dict[str, list[torch.Tensor]] = {}

    def record(self, name: str, t: torch.Tensor) -> None:
        if self.only is None or name in self.only:
            t = t.detach()
            t = t.to(torch.int64) if not t.is_floating_point() else t.float()
            self.parts.setdefault(name, []).append(t.cpu().clone())

    @property
    def names(self) -> list[str]:
        """Tap names in model order (leaves to root)."""
        return sorted(self.parts, key=model_order)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, ps in self.parts.items():
            rows = [p.reshape(math.prod(p.shape[:-1]), p.shape[-1]) for p in ps]   # k = 0 rows are fine too
            width = max(r.shape[1] for r in rows)
            if not rows[0].is_floating_point():       # index sets of different k (few entries visible): pad -1
                rows = [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=-1) for r in rows]
            out[n] = torch.cat(rows)
        return out

    def __enter__(self) -> "TapRecorder":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)


class FirstNonFinite(TapRecorder):
    """Keeps only the name of the first tap (in call order) holding a NaN or Inf; copies nothing. Used on the
    error path of Runtime.forward / generate to say where non-finite values first appeared."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None

    def record(self, name: str, t: torch.Tensor) -> None:
        if self.first is None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            self.first = name
