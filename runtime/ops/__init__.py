"""The small set of ops the V4 graph is written against, and the table that binds them.

The model never calls torch kernels for its V4-specific math directly: it calls `ops.<name>(...)` on an
`OpTable`. The reference table binds every op to its plain float32 implementation in this package (each is
also the test oracle of any faster implementation); backends build other tables. The numerics ops
(`round_act`, `quant_act`, `kv_qat`, `indexer_qat`, `head_norm`, `inner_round`) say where a mode drops
precision. `inner_round` is not an op but the `rnd=` argument the model passes to `sparse_attention` and
`indexer_topk`: None, or under `official` the bf16 rounding at DeepSeek's points inside them; every
implementation of those two ops takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError
from . import attention, compress, decode, mhc, moe, norm_rope, numerics
from .linear import group_linear, linear


@dataclass(frozen=True)
class OpTable:
    linear: Callable
    group_linear: Callable
    rms_norm: Callable
    apply_rope: Callable
    sparse_attention: Callable
    indexer_topk: Callable
    compress_pool: Callable
    moe_gate: Callable
    routed_experts: Callable
    clamped_swiglu: Callable
    hc_pre: Callable
    hc_post: Callable
    hc_head: Callable
    decode_block: Callable          # one block's S = 1 step (runtime/ops/decode.py)
    round_act: Callable
    quant_act: Callable
    kv_qat: Callable
    indexer_qat: Callable
    head_norm: Callable
    inner_round: Callable | None
    numerics: str = "exact"


def reference_ops(numerics_mode: "str | numerics.NumericsSpec" = "exact") -> OpTable:
    """The float32 reference table under a numerics mode ("exact", "official" or a NumericsSpec)."""
    if isinstance(numerics_mode, str):
        if numerics_mode not in numerics.MODES:
            raise ConfigError(f"unknown numerics mode {numerics_mode!r}; choose one of: {', '.join(numerics.NUMERICS)}")
        numerics_mode = numerics.MODES[numerics_mode]
    return OpTable(
        linear=linear, group_linear=group_linear, rms_norm=norm_rope.rms_norm, apply_rope=norm_rope.apply_rope,
        sparse_attention=attention.sparse_attention, indexer_topk=attention.indexer_topk,
        compress_pool=compress.compress_pool, moe_gate=moe.moe_gate, routed_experts=moe.routed_experts,
        clamped_swiglu=moe.clamped_swiglu, hc_pre=mhc.hc_pre, hc_post=mhc.hc_post, hc_head=mhc.hc_head,
        decode_block=decode.decode_block,
        numerics=numerics_mode.name, **numerics_mode.ops(),
    )
