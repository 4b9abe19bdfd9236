"""Parameter access for the model: float32 tensors by official checkpoint name.

The loader hands the model a mapping of official tensor names (spec §4, without `.scale` entries) to
float32 tensors, and the set of names that were stored quantised (FP8 / FP4) on disk; the latter decides
where the `official` numerics mode quantises a linear's input activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor     # [out, in] float32
    quantized: bool          # stored as FP8 / FP4 in the checkpoint


class Params:
    def __init__(self, tensors: Mapping[str, torch.Tensor], quantized: frozenset[str] = frozenset(),
                 prefix: str = ""):
        self._t, self._q, self._prefix = tensors, quantized, prefix

    def sub(self, prefix: str) -> "Params":
        return Params(self._t, self._q, f"{self._prefix}{prefix}.")

    def __call__(self, name: str) -> torch.Tensor:
        return self._t[self._prefix + name]

    def linear(self, name: str) -> Linear:
        full = f"{self._prefix}{name}.weight"
        return Linear(self._t[full], full in self._q)


def project(ops, x: torch.Tensor, lin: Linear) -> torch.Tensor:
    """A linear layer under the table's numerics: FP8 input quantisation for quantised weights, output
    rounded to the activation dtype."""
    if lin.quantized:
        x = ops.quant_act(x)
    return ops.round_act(ops.linear(x, lin.weight))
