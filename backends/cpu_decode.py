"""The CPU backend's fused decode step (issue 19): `decode_block` as one native call per block and step.

backends/native/decode_step.cpp (built at first use like stored_gemm.cpp, see backends/cpu_native.py; it includes
that file's GEMV kernels) runs a block's whole one-token step: mHC pre + norm, the attention sub-block (q / kv
projections, norms, RoPE, ring write, the compressors' in-place pending rows, indexer top-k, attention over
window + selected / HCA entries with the sink, wo_a / wo_b), mHC post, mHC pre + norm, routing + routed and
shared experts, mHC post. The unfused step is ~250-700 ATen ops per block; this is one ctypes call plus a
few host-side counter updates. Transformer.forward takes `decode_step` (`decode_block.whole_step`) where it
can: every block of a one-token step and then the head (hc_head, final norm, head linear) in one call, with
no Python between blocks (issue 16: the per-block wrapper and the per-op head were a third of a batched step). Its oracle is the reference `decode_block` (the per-op path): tests/
test_decode_fused.py checks each kernel and 200 whole steps against it.

Registered as `decode_block` implementation `cpu.native_fused`; its prepare hook refuses (the row says why,
the per-op reference then runs) when the library does not build or the numerics are not `exact` (the kernels
compute float32 with no rounding points). At run time the per-op path is taken, by design, for a block of a
TP / EP rank (the kernels hold no collectives) and while a tap recorder is active (parity taps live in the
per-op code). Chunks of a few tokens per sequence (a speculative verify step) and the MTP block's draft run
through the same kernels in one call each: backends/cpu_decode_rows.py.
"""

from __future__ import annotations

import array
import ctypes
from pathlib import Path

import torch

from runtime.dispatch import impl
from runtime.ops import mhc as ref_mhc
from runtime.taps import recording
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored

from . import cpu_native
from .cpu_decode_abi import AttnP, Comp, HcP, HeadP, LayerP, Lin, MoeP, SeqP, bind

SOURCE = Path(__file__).parent / "native" / "decode_step.cpp"
LIB = "libdsv4rt_decode.so"
_state: dict = {}


def _load():
    """Compile (once, cached by cpu_native.build_library: a hash of the sources, the compiler and the flags)
    and load the library. Its own loops are compiled for this CPU (-march=native) where the compiler can;
    the included stored-format kernels pick their instruction set at run time either way."""
    lib, why = cpu_native.build_library(SOURCE, LIB, flag_sets=(["-O3", "-march=native"], *cpu_native._FLAGS))
    return (bind(lib), "") if lib is not None else (None, why)


def library():
    """The loaded decode library, or None (`_state['why']` says why)."""
    if "lib" not in _state:
        _state["lib"], _state["why"] = _load()
    return _state["lib"]


def _prepare(ctx):
    from runtime.ops.numerics import MODES

    if ctx.numerics != MODES["exact"]:
        return None, f"fused float32 kernels; numerics {ctx.numerics.name} rounds inside the step"
    if library() is None:
        return None, f"decode library unavailable ({_state['why']})"
    return decode_block, ("backends/native/decode_step.cpp, one call per step for every block and the head "
                          "(one per block where the head is vocab-parallel; FP8 / FP4 linears widened "
                          f"exactly to bf16 up to {WIDEN_BUDGET >> 20} MiB; chunks of a few tokens per "
                          "sequence and the MTP draft too, backends/cpu_decode_rows.py); per-op path for TP/EP "
                          "ranks and tap recording")


# ------------------------------------------------------------------ weights -> descriptors (once per block)
class _Keep(list):
    """Tensors a descriptor points into (kept alive with the plan)."""

    def f32(self, t: torch.Tensor) -> int:
        t = t.detach().float().contiguous()
        self.append(t)
        return t.data_ptr()


# FP8 / FP4 weights are widened once to bf16 while the widened bytes stay under this budget: every e4m3 / e2m1
# code times its power-of-two scale is exactly a bf16 value (checked per weight), and a bf16 row is decoded by a
# shift, several times faster than the FP8 bit decoding. That pays while the weights sit in cache (a small
# model's decode is compute-bound); past the budget (real widths: bandwidth-bound) the stored bytes are read.
# Only a model whose widened active weights (every layer's FP8 / FP4 linears a token reads) fit the budget as
# a whole is widened: a larger one streams its weights from memory each step, where widening the first 64 MiB
# only doubles (FP8) or quadruples (FP4) the bytes read -- measured on v4-width-16e: 35.2 -> 32.3 ms per token
# without the partial widening.
WIDEN_BUDGET = 64 << 20
_widened = [0]


def _active_widened_bytes(block) -> int:
    """bf16 bytes of the FP8 / FP4 linears one token of this block reads (attention, the indexer and
    compressors, top-k routed experts and the shared ones), were they widened."""
    a, m = block.attn, block.ffn
    ws = [getattr(a, n).weight for n in ("wq_a", "wq_b", "wkv", "wo_b")] + [a.wo_a]
    for c in (a.compressor, a.indexer.compressor if a.indexer is not None else None):
        if c is not None:
            ws += [c.wkv, c.wgate]
    if a.indexer is not None:
        ws += [a.indexer.wq_b.weight, a.indexer.weights_proj.weight]
    if m.experts:
        ws += [l.weight for l in m.experts[0]] * a.cfg.experts_per_token
    ws += [l.weight for l in (m.shared or ())]
    return sum(2 * w.shape[0] * w.shape[1] for w in ws if isinstance(w, (Fp8Stored, Fp4Stored)))


def _widen(w, keep: _Keep) -> Lin | None:
    n, k = w.shape
    if not getattr(keep, "widen", True) or _widened[0] + 2 * n * k > WIDEN_BUDGET:
        return None
    exact = w.dequantize()
    b = exact.to(torch.bfloat16)
    if not torch.equal(b.float(), exact):                  # not representable (cannot happen for finite codes)
        return None
    _widened[0] += 2 * n * k
    keep.append(b)
    return Lin(1, b.data_ptr(), b.stride(0), None, 0, n, k)


def lin_desc(w, keep: _Keep) -> Lin:
    if isinstance(w, (Fp8Stored, Fp4Stored)):
        widened = _widen(w, keep)
        if widened is not None:
            return widened
    if isinstance(w, Fp8Stored):
        keep += [w.codes, w.scale]
        return Lin(2, w.codes.data_ptr(), w.codes.stride(0), w.scale.data_ptr(), w.scale.stride(0), *w.shape)
    if isinstance(w, Fp4Stored):
        keep += [w.packed, w.scale]
        return Lin(3, w.packed.data_ptr(), w.packed.stride(0), w.scale.data_ptr(), w.scale.stride(0), *w.shape)
    if isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.stride(-1) == 1:
        keep.append(w)
        return Lin(1, w.data_ptr(), w.stride(0), None, 0, *w.shape)
    if isinstance(w, torch.Tensor):
        ptr = keep.f32(w)
        return Lin(0, ptr, w.shape[1], None, 0, *w.shape)
    raise TypeError(f"fused decode: no kernel for weight storage {type(w).__name__}")


def _hc(h, norm, cfg, keep) -> HcP:
    return HcP(keep.f32(h.fn), keep.f32(h.base), keep.f32(h.scale), keep.f32(norm), cfg.hc_mult, cfg.hidden_size,
               cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)


def _comp(c, keep) -> Comp:
    return Comp(lin_desc(c.wkv, keep), lin_desc(c.wgate, keep), keep.f32(c.ape), keep.f32(c.norm), c.m,
                int(c.overlap), c.c)


def attn_params(a, keep: _Keep) -> AttnP:
    cfg = a.cfg
    P = AttnP()
    for name in ("wq_a", "wq_b", "wkv", "wo_b"):
        setattr(P, name, lin_desc(getattr(a, name).weight, keep))
    P.wo_a = lin_desc(a.wo_a, keep)
    P.q_norm, P.kv_norm, P.sink = keep.f32(a.q_norm), keep.f32(a.kv_norm), keep.f32(a.sink)
    P.freqs = keep.f32(a.rope.freqs)
    P.d, P.H, P.D, P.rope_half = cfg.hidden_size, a.H, a.D, a.rope.dim // 2
    P.q_lora, P.G, P.o_lora, P.W, P.ratio = a.q_norm.shape[0], a.G, a.wo_a.shape[0] // a.G, cfg.window, a.ratio
    P.eps = cfg.norm_eps
    if a.compressor is not None:
        P.comp = _comp(a.compressor, keep)
    if a.indexer is not None:
        ix = a.indexer
        P.csa, P.ih, P.idim, P.topk, P.iscale = 1, ix.h, ix.d, ix.topk, ix.scale
        P.iwq_b, P.iw_proj = lin_desc(ix.wq_b.weight, keep), lin_desc(ix.weights_proj.weight, keep)
        P.icomp = _comp(ix.compressor, keep)
    return P


def moe_params(m, keep: _Keep):
    cfg = m.cfg
    experts = (Lin * (3 * len(m.experts)))(*[lin_desc(l.weight, keep) for e in m.experts for l in e])
    shared = (Lin * 3)(*[lin_desc(l.weight, keep) for l in m.shared]) if m.shared is not None else None
    keep += [experts, shared]
    tid = None
    if m.hash:
        t = m.tid2eid.to(torch.int64).contiguous()
        keep.append(t)
        tid = t.data_ptr()
    P = MoeP(keep.f32(m.gate_w), None if m.hash else keep.f32(m.bias), tid,
             ctypes.cast(experts, ctypes.c_void_p), ctypes.cast(shared, ctypes.c_void_p) if shared else None,
             cfg.hidden_size, len(m.experts), cfg.experts_per_token, m.experts[0][0].weight.shape[0],
             m.shared[0].weight.shape[0] if m.shared is not None else 0, cfg.route_scale, cfg.swiglu_limit)
    return P


class Plan:
    """One block's descriptors (built at its first fused step; weights never move)."""

    def __init__(self, block):
        keep = _Keep()
        keep.widen = _active_widened_bytes(block) * block.attn.cfg.num_layers <= WIDEN_BUDGET
        self.keep = keep
        self.ha, self.hf = _hc(block.hc_attn, block.attn_norm, block.attn.cfg, keep), \
            _hc(block.hc_ffn, block.ffn_norm, block.attn.cfg, keep)
        self.A, self.M = attn_params(block.attn, keep), moe_params(block.ffn, keep)
        self.refs = tuple(ctypes.byref(s) for s in (self.ha, self.A, self.hf, self.M))
        self.layer, cfg = block.layer, block.attn.cfg
        self.W, self.ratio, self.csa = cfg.window, block.attn.ratio, block.attn.indexer is not None


def _fusable(block) -> bool:
    par = block.attn.par
    return par.tp == 1 and getattr(block.ffn, "local", None) is not None and \
        len(block.ffn.local) == block.attn.cfg.n_routed_experts


def _advance(buf, p0: int, m: int, overlap: bool) -> bool:
    """Mirror of the kernel's pending-row rule for token p0: True when a window closed."""
    end = p0 + 1
    if end % m:
        buf.n += 1
        return False
    stop = end // m
    keep = stop * m - (m if overlap and stop > 0 else 0)
    buf.n, buf.start = end - keep, keep
    return True


def _refuses(plan: Plan, sts: list) -> bool:
    """True when a sequence's pending rows are held for the per-op path's rollback (`state.arm`: the per-op
    path then runs)."""
    return bool(plan.ratio) and any(st.comp_buf.retain is not None for st in sts)


def _seq_vals(plan: Plan, sts: list, starts: list[int]) -> list[int]:
    """The kernels' view of each sequence's layer state (SeqP fields, flat), then the counters advanced past
    this step's rows (the kernel's own rule: `_advance`; the kernel reads only the records, so the counters
    may move first). Room for the rows is reserved first."""
    ratio, csa, W = plan.ratio, plan.csa, plan.W
    vals: list[int] = []
    for st, p0 in zip(sts, starts):
        kv = st.kv
        pend = (0, 0, 0)
        if ratio:
            if kv.n >= kv._buf.shape[0]:
                kv.reserve(1)
            cb = st.comp_buf
            if p0 + 1 - cb.start > cb._kv.shape[0]:
                cb.reserve(p0 + 1 - cb.start)
            pend = (cb._kv.data_ptr(), cb._score.data_ptr(), cb.start)
        idx = (0, 0, 0, 0, 0)
        if csa:
            ik, ib = st.index_keys, st.index_buf
            if ik.n >= ik._buf.shape[0]:
                ik.reserve(1)
            if p0 + 1 - ib.start > ib._kv.shape[0]:
                ib.reserve(p0 + 1 - ib.start)
            idx = (ik._buf.data_ptr(), ik.n, ib._kv.data_ptr(), ib._score.data_ptr(), ib.start)
            if _advance(ib, p0, 4, True):
                ik.n += 1
        vals += (p0, kv._buf.data_ptr(), kv.n - W, *pend, *idx)
        if ratio and _advance(cb, p0, ratio, csa):
            kv.n += 1
    return vals


def _records(vals: list[int]):
    """(SeqP pointer, the array behind it, for the caller to keep alive during the call). One flat int64
    array: a decode step builds B records per block, and per-field ctypes assignments would cost more than
    the block's kernels; array.array is ~5x faster to build than a ctypes array."""
    arr = array.array("q", vals)
    return ctypes.cast(arr.buffer_info()[0], ctypes.POINTER(SeqP)), arr


def seq_params(plan: Plan, sts: list, starts: list[int]):
    """One block's records (`_seq_vals`, `_records`), or None, with nothing changed, when `_refuses`."""
    return None if _refuses(plan, sts) else _records(_seq_vals(plan, sts, starts))


def plan_for(block):
    """The block's fused plan (built once), or False where the per-op path runs (TP / EP ranks)."""
    plan = block.__dict__.get("_fused_plan")
    if plan is None:
        block._fused_plan = plan = Plan(block) if _fusable(block) else False
    return plan


def _ids64(ids: torch.Tensor) -> torch.Tensor:
    """The step's token ids as the kernels read them: one contiguous int64 row."""
    idv = ids.reshape(-1)
    return idv if idv.dtype == torch.int64 and idv.is_contiguous() else idv.to(torch.int64).contiguous()


def decode_block(block, X, ids, positions, starts, states):
    """Same contract as `runtime.ops.decode.decode_block`."""
    plan = plan_for(block)
    layer = block.layer
    sts = [s.layers[layer] for s in states]
    params = None if plan is False or recording() else seq_params(plan, sts, starts)
    if params is None:
        return block.forward_ops(X, ids, positions, starts, states)
    X = X.contiguous()
    out = torch.empty_like(X)
    ha, A, hf, M = plan.refs
    idv = _ids64(ids)
    _state["lib"].dsv4d_block(ha, A, hf, M, X.shape[0], X.data_ptr(), idv.data_ptr(), params[0], out.data_ptr(),
                              torch.get_num_threads())
    return out


# ------------------------------------------------------------------ a whole step in one call
class StepPlan:
    """The model's per-layer descriptors as one array (and the head's), built at its first fused step."""

    def __init__(self, model, plans: list[Plan]):
        self.plans = plans
        self.layers = (LayerP * len(plans))(*[LayerP(*(ctypes.pointer(s) for s in (p.ha, p.A, p.hf, p.M)))
                                              for p in plans])
        self.head = None
        h, cfg = model.head, model.cfg
        if not h.par.distributed:             # a vocab-parallel head gathers across ranks: per-op head then
            keep = _Keep()
            self.keep = keep
            self.head = HeadP(keep.f32(h.fn), keep.f32(h.base), keep.f32(h.scale), keep.f32(h.norm), cfg.hc_mult,
                              cfg.hidden_size, cfg.hc_eps, cfg.norm_eps, lin_desc(h.head_w, keep))
            self.vocab = h.head_w.shape[0]


def step_plan(model):
    """The model's StepPlan, or False where a block runs the per-op path (TP / EP ranks)."""
    sp = model.__dict__.get("_fused_step")
    if sp is None:
        plans = [plan_for(b) for b in model.blocks]
        model._fused_step = sp = False if any(p is False for p in plans) else StepPlan(model, plans)
    return sp


def decode_step(model, X, ids, starts, states):
    """Every block of a one-token step, then the head, in one native call: X [B, 1, hc, d] -> (final streams
    [B, 1, hc, d], logits [B, 1, V] or None where the head is vocab-parallel), or None (nothing changed) where
    the per-block path runs (TP / EP ranks, a speculative verify step, tap recording). Each block is exactly
    `decode_block`'s kernel; the head is hc_head's kernel, the final norm and the head linear (the fused
    step's tiles, batch-invariant like every stage)."""
    sp = step_plan(model)
    if sp is False or recording():
        return None
    layer_sts = [[s.layers[p.layer] for s in states] for p in sp.plans]
    if any(_refuses(p, sts) for p, sts in zip(sp.plans, layer_sts)):
        return None
    vals: list[int] = []
    for p, sts in zip(sp.plans, layer_sts):
        vals += _seq_vals(p, sts, starts)
    seqs, _arr = _records(vals)
    X = X.contiguous()
    B = X.shape[0]
    out = torch.empty_like(X)
    logits = X.new_empty(B, 1, sp.vocab) if sp.head is not None else None
    idv = _ids64(ids)
    _state["lib"].dsv4d_step(len(sp.plans), sp.layers, B, X.data_ptr(), idv.data_ptr(), seqs, out.data_ptr(),
                             ctypes.byref(sp.head) if sp.head is not None else None,
                             logits.data_ptr() if logits is not None else None, torch.get_num_threads())
    return out, logits


decode_block.whole_step = decode_step       # Transformer.forward's one-call step where the table runs this


# ------------------------------------------------------------------ the kernels one by one (tests, profiling)
def hc_pre(hc: HcP, X: torch.Tensor):
    """X [T, hc, d] -> (x [T, d] after the sub-block's norm, post [T, hc], comb [T, hc, hc])."""
    T, h, d = X.shape
    X = X.contiguous()
    x, post, comb = X.new_empty(T, d), X.new_empty(T, h), X.new_empty(T, h, h)
    library().dsv4d_hc_pre(ctypes.byref(hc), T, X.data_ptr(), x.data_ptr(), post.data_ptr(), comb.data_ptr())
    return x, post, comb


def hc_post(y, res, post, comb) -> torch.Tensor:
    T, h, d = res.shape
    args = [t.contiguous() for t in (y, res, post, comb)]
    out = torch.empty_like(args[1])
    library().dsv4d_hc_post(T, h, d, *[t.data_ptr() for t in args], out.data_ptr())
    return out


def attention(block, x: torch.Tensor, starts: list[int], states: list) -> torch.Tensor:
    """x [B, d] (after attn_norm), one token per sequence -> [B, d]; updates the sequences' layer states."""
    plan = plan_for(block)
    sts = [s.layers[block.layer] for s in states]
    seqs, _keep = seq_params(plan, sts, starts)
    x = x.contiguous()
    out = torch.empty_like(x)
    library().dsv4d_attn(ctypes.byref(plan.A), x.shape[0], x.data_ptr(), seqs, out.data_ptr(), 1)
    return out


def moe(block, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    plan = plan_for(block)
    x, idv = x.contiguous(), ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty_like(x)
    library().dsv4d_moe(ctypes.byref(plan.M), x.shape[0], x.data_ptr(), idv.data_ptr(), out.data_ptr(), 1)
    return out


impl("decode_block", "cpu.native_fused", "cpu", decode_block, prepare=_prepare)
# Where the fused step refuses (numerics that round inside the step, no compiler), dispatch runs the reference
# -- the block's per-op step over the table's own fast ops -- and its row names the refusal.

SMALL_T = 64         # hc_head: tokens up to which the native collapse runs (a decode step of up to 64 rows), else the reference


def hc_head(X, fn, base, scale, hc_eps: float, norm_eps: float):
    """Same contract as `runtime.ops.mhc.hc_head`; a decode step's few tokens in one native call (the
    reference's ~14 torch calls otherwise), larger chunks through the reference."""
    T, h, d = X.shape
    if T > SMALL_T or X.dtype != torch.float32:
        return ref_mhc.hc_head(X, fn, base, scale, hc_eps, norm_eps)
    X = X.contiguous()
    args = [t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in (fn, base, scale)]
    out = X.new_empty(T, d)
    _state["lib"].dsv4d_hc_head(T, h, d, X.data_ptr(), *[t.data_ptr() for t in args], hc_eps, norm_eps,
                                out.data_ptr())
    return out


def _prepare_head(ctx):
    if library() is None:
        return None, f"decode library unavailable ({_state['why']})"
    return hc_head, f"backends/native/decode_step.cpp up to {SMALL_T} tokens, else the reference"


impl("hc_head", "cpu.native_small", "cpu", hc_head, prepare=_prepare_head)


# Speculative decoding's chunks (a verify step's few tokens per sequence) and the MTP block's draft, through the
# same kernels in one call each: backends/cpu_decode_rows.py
# (it reads this module's plans and sets decode_block.whole_rows / .mtp_step)
from . import cpu_decode_rows  # noqa: E402,F401
