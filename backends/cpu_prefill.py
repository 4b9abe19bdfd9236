"""Native mHC for chunks of any length on the CPU backend (issue 19: prefill stays ahead of llama.cpp).

The reference `hc_pre` is a handful of [T, hc, hc] tensor ops per Sinkhorn round (20 rounds): on a 2,048-token
prefill chunk of the tiny model ~9 ms per call on a quiet machine (~20% of the prefill; this form ~6 ms, so the
whole prefill gained ~2%), and several times that on a loaded one, where each small reduction waits on the
scheduler (~30 ms per call, ~27% of the prefill, measured at a load average of ~6).
backends/native/decode_step.cpp already holds the per-token form the fused decode step uses (mixes from the
rms-normalised input, gates, row softmax, the Sinkhorn rounds and the pre-weighted collapse, float32 in the
reference's order of operations); this module runs it over a chunk's tokens, split across the torch thread count
(ctypes releases the GIL during the call, so the pieces run in parallel). Oracle: `runtime.ops.mhc.hc_pre`
(tests/test_cpu_prefill.py, decode and prefill shapes).

Registered as `hc_pre` implementation `cpu.native_chunk`, preferred over `cpu.scalar_sinkhorn`; its prepare hook
refuses (and the table row then names `cpu.scalar_sinkhorn`) when the decode library did not build or the
numerics are not `exact`.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import torch

from runtime.dispatch import impl

from . import cpu_decode
from .cpu_decode_abi import HcP

MIN_SPLIT = 64          # tokens per thread below which one call is cheaper than handing work to a pool
_pool: dict = {}


def _executor(n: int) -> ThreadPoolExecutor:
    if _pool.get("n") != n:
        _pool["n"], _pool["ex"] = n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="dsv4rt-hc")
    return _pool["ex"]


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
           norm_eps: float, sinkhorn_iters: int):
    """Same contract as `runtime.ops.mhc.hc_pre`: X [T, hc, d] -> (x [T, d], post [T, hc], comb [T, hc, hc])."""
    if X.dtype != torch.float32:
        raise TypeError(f"cpu.native_chunk hc_pre computes float32 inputs, got {X.dtype}")
    T, hc, d = X.shape
    X = X.contiguous()
    keep = [t.float().contiguous() for t in (fn, base, scale)]              # alive for the calls below
    P = HcP(*[t.data_ptr() for t in keep], None, hc, d, sinkhorn_iters, hc_eps, norm_eps)
    x, post, comb = X.new_empty(T, d), X.new_empty(T, hc), X.new_empty(T, hc, hc)
    lib = cpu_decode.library()

    def run(t0: int, t1: int) -> None:
        lib.dsv4d_hc_pre(ctypes.byref(P), t1 - t0, X[t0].data_ptr(), x[t0].data_ptr(), post[t0].data_ptr(),
                         comb[t0].data_ptr())

    n = min(torch.get_num_threads(), max(1, T // MIN_SPLIT))
    if n == 1:
        run(0, T)
    else:
        cuts = [T * i // n for i in range(n + 1)]
        list(_executor(n).map(run, cuts[:-1], cuts[1:]))
    return x, post, comb


def _prepare(ctx):
    from runtime.ops.numerics import MODES

    if ctx.numerics != MODES["exact"]:
        return None, f"float32 kernel; numerics {ctx.numerics.name} may round the streams"
    if cpu_decode.library() is None:
        return None, f"decode library unavailable ({cpu_decode._state['why']})"
    return hc_pre, "backends/native/decode_step.cpp per token, tokens split over the threads"


impl("hc_pre", "cpu.native_chunk", "cpu", hc_pre, prepare=_prepare)
