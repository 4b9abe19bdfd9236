"""Parameter access for the model: weights by official checkpoint name.

`Runtime.load` hands the model a mapping of official tensor names (spec §4, without `.scale` entries) to
weights (float32 values for the CPU reference and emulation; the profile's storage formats on a device, see
`runtime.weights.device_layout`), and the set of linears whose input the numerics quantise (FP8 / INT8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..ops.linear import project  # noqa: F401  (re-exported for the model modules)


def _single():
    from ..parallel.comm import SINGLE

    return SINGLE


@dataclass(frozen=True)
class Linear:
    weight: object           # [out, in]: float32 (reference), or a device storage (runtime.weights.device_layout)
    quantized: bool          # its input is quantised under the numerics (FP8 / FP4 / INT8 weights)


class Params:
    def __init__(self, tensors: Mapping[str, torch.Tensor], quantized: frozenset[str] = frozenset(),
                 prefix: str = "", parallel=None):
        self._t, self._q, self._prefix = tensors, quantized, prefix
        # This rank's layout and collectives (runtime.parallel); SINGLE = one device, every hook the identity.
        self.parallel = parallel if parallel is not None else _single()

    def sub(self, prefix: str) -> "Params":
        return Params(self._t, self._q, f"{self._prefix}{prefix}.", self.parallel)

    def __call__(self, name: str) -> torch.Tensor:
        return self._t[self._prefix + name]

    def linear(self, name: str) -> Linear:
        full = f"{self._prefix}{name}.weight"
        return Linear(self._t[full], full in self._q)
