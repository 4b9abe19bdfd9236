"""The small set of ops the V4 graph is written against, and the table that binds them.

The model never calls torch kernels for its V4-specific math directly: it calls `ops.<name>(...)` on an
`OpTable`, whose fields are the ops declared once in `specs.SPECS`. The reference table binds every op to its
plain float32 implementation in this package (each is also the test oracle of any faster implementation);
backends build other tables. The numerics ops
(`round_act`, `quant_act`, `kv_qat`, `indexer_qat`, `head_norm`, `inner_round`) say where a mode drops
precision. `inner_round` is not an op but the `rnd=` argument the model passes to `sparse_attention` and
`indexer_topk`: None, or under `official` the bf16 rounding at DeepSeek's points inside them; every
implementation of those two ops takes it.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Callable

from ..errors import ConfigError
from . import numerics
from .specs import SPECS, OpSpec

# The table the model calls: one Callable field per op of `SPECS` (in its order; `inner_round` may be None),
# then the numerics mode's name.
OpTable = make_dataclass(
    "OpTable", [(s.name, "Callable | None" if s.name == "inner_round" else Callable) for s in SPECS]
    + [("numerics", str, field(default="exact"))], frozen=True)
OpTable.__module__ = __name__
OpTable.__doc__ = "The ops the model calls, one per entry of runtime.ops.specs.SPECS, bound to implementations."


def reference_ops(numerics_mode: "str | numerics.NumericsSpec" = "exact") -> OpTable:
    """The float32 reference table under a numerics mode ("exact", "official" or a NumericsSpec)."""
    if isinstance(numerics_mode, str):
        if numerics_mode not in numerics.MODES:
            raise ConfigError(f"unknown numerics mode {numerics_mode!r}; choose one of: {', '.join(numerics.NUMERICS)}")
        numerics_mode = numerics.MODES[numerics_mode]
    return OpTable(numerics=numerics_mode.name, **{s.name: s.reference for s in SPECS if not s.is_numerics},
                   **numerics_mode.ops())


__all__ = ["OpSpec", "OpTable", "SPECS", "reference_ops"]
