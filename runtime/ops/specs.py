"""Every op of the V4 graph, declared once: name, float32 reference (its oracle), shape contract, ONNX form.

`SPECS` is the one list of ops. The op table the model calls (`runtime.ops.OpTable`), the reference table, the
rows of a dispatch table (runtime.dispatch), the ONNX backend's op list (backends/onnx.py) and the cross-backend
op check (backends/check.py) are all derived from it, so adding an op is one entry here plus its reference.

Two kinds of op:
- table ops (`reference` set): a backend may register faster implementations of them
  (`runtime.dispatch.impl`); dispatch picks one per op at load, the reference is every one's oracle;
- numerics ops (`numerics` set): where a deployment drops precision (runtime/ops/numerics.py); their form
  comes from the profile's numerics (the named `NumericsSpec` field), never from a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import attention, compress, decode, mhc, moe, norm_rope
from .linear import group_linear, linear


@dataclass(frozen=True)
class OpSpec:
    name: str
    reference: Callable | None      # the plain float32 implementation; None for a numerics op
    contract: str                   # the shapes in and out (every implementation keeps them; float32 out)
    onnx: str | None = None         # the custom node it exports to ("domain::Name"); None: standard ONNX ops
    numerics: str | None = None     # numerics ops: the NumericsSpec field that selects the form

    @property
    def is_numerics(self) -> bool:
        return self.numerics is not None


SPECS: tuple[OpSpec, ...] = (
    OpSpec("linear", linear, "x [..., in] float32, w [out, in] (any storage) -> [..., out]"),
    OpSpec("group_linear", group_linear, "x [T, G, k], w [G*o, k] (group g owns rows g*o..) -> [T, G, o]"),
    OpSpec("rms_norm", norm_rope.rms_norm, "x [..., d], weight [d] or None, eps -> [..., d]"),
    OpSpec("apply_rope", norm_rope.apply_rope,
           "x [..., r] (interleaved pairs), cos/sin broadcast to [..., r/2], inverse -> [..., r]"),
    OpSpec("sparse_attention", attention.sparse_attention,
           "q [T, H, D], kv [N, D] (K = V), idx [T, K] int64 (-1 = padding), sink [H], scale, rnd -> [T, H, D]",
           onnx="com.deepseek.v4::SparseAttention"),
    OpSpec("indexer_topk", attention.indexer_topk,
           "q [T, h, d], weights [T, h], keys [N, d], visible [T], k, rnd -> [T, k] int64 best first, -1 padding",
           onnx="com.deepseek.v4::IndexerTopK"),
    OpSpec("compress_pool", compress.compress_pool, "kv, score [W, slots, c] (score -inf = empty) -> [W, c]"),
    OpSpec("moe_gate", moe.moe_gate,
           "x [T, d], gate_w [E, d], bias [E] or None, hash_experts [T, k] or None, k, route_scale "
           "-> (idx [T, k] int64, weights [T, k])"),
    OpSpec("routed_experts", moe.routed_experts,
           "x [T, d], idx / weights [T, k], experts [(w1, w2, w3) Linears], limit, ops -> [T, d]"),
    OpSpec("clamped_swiglu", moe.clamped_swiglu, "g, u [..., I], limit -> [..., I]"),
    OpSpec("hc_pre", mhc.hc_pre,
           "X [T, hc, d], fn [(2+hc)*hc, hc*d], base, scale [3], hc_eps, norm_eps, iters "
           "-> (x [T, d], post [T, hc], comb [T, hc, hc])"),
    OpSpec("hc_post", mhc.hc_post, "x [T, d], res [T, hc, d], post [T, hc], comb [T, hc, hc] -> [T, hc, d]"),
    OpSpec("hc_head", mhc.hc_head, "X [T, hc, d], fn [hc, hc*d], base [hc], scale [1], hc_eps, norm_eps -> [T, d]"),
    OpSpec("decode_block", decode.decode_block,
           "(block, X [B, 1, hc, d], ids, positions, starts, states) -> [B, 1, hc, d]: one block's S = 1 step"),
    OpSpec("round_act", None, "x -> x rounded to the activation dtype", numerics="compute"),
    OpSpec("quant_act", None, "x [..., in] -> quantise-dequantised linear input", numerics="act_quant"),
    OpSpec("kv_qat", None, "kv [..., nope] -> the KV cache's stored values", numerics="kv"),
    OpSpec("indexer_qat", None, "q or keys [..., d] -> the indexer's stored values", numerics="indexer"),
    OpSpec("head_norm", None, "(ops, q [..., D], eps) -> per-head weightless RMS norm", numerics="points"),
    OpSpec("inner_round", None, "the rounding passed as `rnd=` inside sparse_attention / indexer_topk, or None",
           numerics="points"),
)

BY_NAME = {s.name: s for s in SPECS}
TABLE_OPS: tuple[str, ...] = tuple(s.name for s in SPECS if not s.is_numerics)
NUMERICS_OPS: dict[str, str] = {s.name: s.numerics for s in SPECS if s.is_numerics}
