"""The CPU backend's fused decode step (issue 19): `decode_block` as one native call per block and step.

backends/native/decode_step.cpp (built at first use like stored_gemm.cpp, see backends/cpu_native.py; it includes
that file's GEMV kernels) runs a block's whole one-token step: mHC pre + norm, the attention sub-block (q / kv
projections, norms, RoPE, ring write, the compressors' in-place pending rows, indexer top-k, attention over
window + selected / HCA entries with the sink, wo_a / wo_b), mHC post, mHC pre + norm, routing + routed and
shared experts, mHC post. The unfused step is ~250-700 ATen ops per block; this is one ctypes call, which
also embeds the tokens and builds each sequence's per-layer record from the state's own arrays and advances
its counters (backends/cpu_decode_seqs.py), so a step's Python side is one int per sequence.
Transformer.forward takes `decode_step` (`decode_block.whole_step`) where it can: every block of a one-token
step and then the head (hc_head, final norm, head linear) in one call, with no Python between blocks (issue
16: the per-block wrapper, the per-op head and the per-layer records were most of a batched step's host
time). Its oracle is the reference `decode_block` (the per-op path): tests/test_decode_fused.py checks each
kernel and 200 whole steps against it.

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
from .cpu_decode_seqs import StepBatch, run_checked, table
from .cpu_decode_abi import AttnP, Comp, EmbedP, HcP, HeadP, LayerP, Lin, MoeP, bind

SOURCE = Path(__file__).parent / "native" / "decode_step.cpp"
LIB = "libdsv4rt_decode.so"
_state: dict = {}


def _load():
    """Compile (once, cached by cpu_native.build_library: a hash of the sources, the compiler and the flags)
    and load the library. Its own loops are compiled for this CPU (-march=native) where the compiler can;
    the included stored-format kernels pick their instruction set at run time either way."""
    lib, why = cpu_native.build_library(SOURCE, LIB, flag_sets=(["-O3", "-march=native"], *cpu_native._FLAGS))
    if lib is None:
        return None, why
    try:
        return bind(lib), ""
    except RuntimeError as e:                       # a library of another ABI (cannot happen: keyed by source)
        return None, str(e)


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
                          f"exactly to bf16 output panels up to {WIDEN_BUDGET >> 20} MiB; chunks of a few tokens per "
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
# Only a model whose widened weights (every layer's FP8 / FP4 linears, all experts) fit the budget as a whole is
# widened, each of them: a larger one streams its weights from memory each step, where widening the first 64 MiB
# only doubles (FP8) or quadruples (FP4) the bytes read -- measured on v4-width-16e: 35.2 -> 32.3 ms per token
# without the partial widening. The rule is the model's own (no count shared across the models of a process):
# a model's kernels, hence its bits, do not depend on what was loaded before it. The widened weights are stored
# in output panels (`_panels`, decode_panels.h: no lane reduction, one load for two inputs of 16 outputs):
# measured on the tiny default (2 threads), a one-token step 0.207 -> 0.190 ms, a 16-row step 0.637 -> 0.598 ms
# against the same bf16 weights in row tiles. Stored bf16 weights stay in place (row tiles): no second copy.
WIDEN_BUDGET = 64 << 20


def _widened_bytes(block) -> int:
    """bf16 bytes of this block's FP8 / FP4 linears (attention, the indexer and compressors, every routed
    expert and the shared ones), were they widened."""
    a, m = block.attn, block.ffn
    ws = [getattr(a, n).weight for n in ("wq_a", "wq_b", "wkv", "wo_b")] + [a.wo_a]
    for c in (a.compressor, a.indexer.compressor if a.indexer is not None else None):
        if c is not None:
            ws += [c.wkv, c.wgate]
    if a.indexer is not None:
        ws += [a.indexer.wq_b.weight, a.indexer.weights_proj.weight]
    for e in m.experts or ():
        ws += [l.weight for l in e]
    ws += [l.weight for l in (m.shared or ())]
    return sum(2 * w.shape[0] * w.shape[1] for w in ws if isinstance(w, (Fp8Stored, Fp4Stored)))


def _widen(w, keep: _Keep) -> Lin | None:
    n, k = w.shape
    if not getattr(keep, "widen", False):
        return None
    exact = w.dequantize()
    b = exact.to(torch.bfloat16)
    if not torch.equal(b.float(), exact):                  # not representable (cannot happen for finite codes)
        return None
    return _panels(b, keep)


def _panels(b: torch.Tensor, keep: _Keep) -> Lin:
    """A bf16 weight [N, K] packed in output panels (backends/native/decode_panels.h): panel p, input pair i,
    lane j holds W[16p + j, 2i] and W[16p + j, 2i + 1] side by side (a 32-bit word), zero past N or K."""
    n, k = b.shape
    np_, k2 = -(-n // 16), -(-k // 2)
    pad = torch.zeros(np_ * 16, k2 * 2, dtype=torch.bfloat16)
    pad[:n, :k] = b
    packed = pad.view(np_, 16, k2, 2).permute(0, 2, 1, 3).contiguous()     # [panel, pair, lane, half]
    keep.append(packed)
    return Lin(4, packed.data_ptr(), k2 * 16, None, 0, n, k)


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
        keep.widen = _widened_bytes(block) * block.attn.cfg.num_layers <= WIDEN_BUDGET
        self.keep = keep
        self.ha, self.hf = _hc(block.hc_attn, block.attn_norm, block.attn.cfg, keep), \
            _hc(block.hc_ffn, block.ffn_norm, block.attn.cfg, keep)
        self.A, self.M = attn_params(block.attn, keep), moe_params(block.ffn, keep)
        self.refs = tuple(ctypes.byref(s) for s in (self.ha, self.A, self.hf, self.M))
        self.one = (LayerP * 1)(LayerP(*(ctypes.pointer(s) for s in (self.ha, self.A, self.hf, self.M))))
        self.layer, cfg = block.layer, block.attn.cfg
        self.W, self.ratio, self.csa = cfg.window, block.attn.ratio, block.attn.indexer is not None


def _fusable(block) -> bool:
    par = block.attn.par
    return par.tp == 1 and getattr(block.ffn, "local", None) is not None and \
        len(block.ffn.local) == block.attn.cfg.n_routed_experts


def plan_for(block):
    """The block's fused plan (built once), or False where the per-op path runs (TP / EP ranks)."""
    plan = block.__dict__.get("_fused_plan")
    if plan is None:
        block._fused_plan = plan = Plan(block) if _fusable(block) else False
    return plan


def _ids64(ids: torch.Tensor) -> torch.Tensor:
    """The step's token ids as the kernels read them: contiguous int64 ([B, 1] is already one row)."""
    if ids.dtype == torch.int64 and ids.is_contiguous():
        return ids
    return ids.reshape(-1).to(torch.int64).contiguous()


def decode_block(block, X, ids, positions, starts, states):
    """Same contract as `runtime.ops.decode.decode_block`."""
    plan = plan_for(block)
    if plan is False or recording():
        return block.forward_ops(X, ids, positions, starts, states)
    X = X.contiguous()
    B = X.shape[0]
    out = torch.empty_like(X)
    idv = _ids64(ids)
    run = lambda seqs: _state["lib"].dsv4d_run(1, plan.one, B, X.data_ptr(), idv.data_ptr(), seqs,  # noqa: E731
                                               out.data_ptr(), None, None, torch.get_num_threads(), None, None)
    if not run_checked(run, [plan], states, starts, table(states, starts, block.layer)):
        return block.forward_ops(X, ids, positions, starts, states)
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
            keep.widen = all(p.keep.widen for p in plans)      # the model's own rule (Plan)
            self.keep = keep
            self.head = HeadP(keep.f32(h.fn), keep.f32(h.base), keep.f32(h.scale), keep.f32(h.norm), cfg.hc_mult,
                              cfg.hidden_size, cfg.hc_eps, cfg.norm_eps, lin_desc(h.head_w, keep))
            self.vocab = h.head_w.shape[0]
        self.head_ref = ctypes.byref(self.head) if self.head is not None else None
        # the step embeds its tokens itself (one row copy per token, no torch ops) from a plain table
        e = model.embed
        self.embed = None
        if isinstance(e, torch.Tensor) and e.device.type == "cpu" and e.dim() == 2 and e.is_contiguous() and \
                e.dtype in (torch.float32, torch.bfloat16):
            self.embed_w, self.embed_p = e, EmbedP(e.data_ptr(), int(e.dtype == torch.bfloat16), e.shape[0],
                                                   cfg.hc_mult, e.shape[1])
            self.embed = ctypes.byref(self.embed_p)


def step_plan(model):
    """The model's StepPlan, or False where a block runs the per-op path (TP / EP ranks)."""
    sp = model.__dict__.get("_fused_step")
    if sp is None:
        plans = [plan_for(b) for b in model.blocks]
        model._fused_step = sp = False if any(p is False for p in plans) else StepPlan(model, plans)
    return sp


def decode_step(model, X, ids, starts, states, hidden: bool = True, last: bool = False):
    """Every block of a one-token step, then the head, in one native call: X [B, 1, hc, d] (None: the step
    embeds `ids` itself, as Transformer.streams) -> (final streams [B, 1, hc, d] (None if not `hidden` and
    the head ran), logits [B, 1, V] ([B, V] if `last`) or None where the head is vocab-parallel), or None
    (nothing changed) where the per-block path runs (TP / EP ranks, a per-op speculative verify's held
    pending rows, tap recording, a token id outside the embedding). The logits tensor carries `argmax_rows`: each row's greedy token (the
    first maximum, as torch.argmax), found by the native call. Each block is exactly `decode_block`'s kernel;
    the head is hc_head's kernel, the final norm and the head linear (the fused step's tiles, batch-invariant
    like every stage)."""
    sp = step_plan(model)
    if sp is False or recording():
        return None
    if X is None and sp.embed is None:
        X = model.streams(ids)
    B = ids.shape[0]
    xp = None
    if X is not None:
        X = X.contiguous()
        xp = X.data_ptr()
    out = torch.empty(B, 1, model.cfg.hc_mult, model.cfg.hidden_size) if hidden or sp.head is None else None
    logits = top = None
    if sp.head is not None:
        logits = torch.empty(B, sp.vocab) if last else torch.empty(B, 1, sp.vocab)
        logits.argmax_rows = top = array.array("q", bytes(8 * B))
    idv = _ids64(ids)
    head, embed = sp.head_ref, sp.embed
    run = lambda seqs: _state["lib"].dsv4d_run(len(sp.plans), sp.layers, B, xp, idv.data_ptr(),  # noqa: E731
                                               seqs, out.data_ptr() if out is not None else None, head,
                                               logits.data_ptr() if logits is not None else None,
                                               torch.get_num_threads(), embed,
                                               top.buffer_info()[0] if top is not None else None)
    if not run_checked(run, sp.plans, states, starts, table(states, starts)):
        return None
    return out, logits


decode_block.whole_step = decode_step       # Transformer.forward's one-call step where the table runs this


def step_batch(model, states):
    """A StepBatch (cpu_decode_seqs.py) of `states` for one-token greedy-or-sampled steps of `model` with its
    logits [B, V], or None where `decode_step` would not run the whole step with the head and the embedding in
    one call."""
    sp = step_plan(model)
    lib = library()
    if sp is False or sp.head is None or sp.embed is None or lib is None:
        return None
    L, layers, head, embed, B = len(sp.plans), sp.layers, sp.head_ref, sp.embed, len(states)
    call = lambda ids, seqs, logits, top: lib.dsv4d_run(L, layers, B, None, ids, seqs, None, head,  # noqa: E731
                                                        logits, torch.get_num_threads(), embed, top)
    return StepBatch(call, sp.plans, states, sp.vocab)


decode_block.step_batch = step_batch        # the serving engine's steady batch (runtime/serve/executor.py)


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

# Speculative decoding's chunks (a verify step's few tokens per sequence) and the MTP block's draft run through
# the same kernels in one call each: backends/cpu_decode_rows.py, which reads this module's plans and sets
# decode_block.whole_rows / .mtp_step (imported beside this module by backends/cpu.py)
