"""The native chunked mHC pre (backends/cpu_prefill.py) against the float32 reference `runtime.ops.mhc.hc_pre`,
at decode and prefill chunk sizes (a chunk is split over the threads), and its place in the cpu dispatch table."""

from __future__ import annotations

import pytest
import torch

from backends import cpu_decode, cpu_prefill
from runtime.api import Runtime
from runtime.ops import mhc

TOL = 5e-6          # measured 1.7e-6 (x, T = 2048, d = 256); float32 in a different summation order


def _inputs(T: int, hc: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, hc, d, generator=g)
    fn = torch.randn((2 + hc) * hc, hc * d, generator=g) * 0.05
    base = torch.randn((2 + hc) * hc, generator=g) * 0.5
    scale = torch.rand(3, generator=g) + 0.5
    return X, fn, base, scale


@pytest.mark.parametrize("T", [1, 3, 9, 130, 2048])
def test_native_chunk_matches_reference(T):
    assert cpu_decode.library() is not None, cpu_decode._state.get("why")
    args = (*_inputs(T, 4, 256, seed=T), 1e-6, 1e-6, 20)
    ref = mhc.hc_pre(*args)
    got = cpu_prefill.hc_pre(*args)
    for name, a, b in zip(("x", "post", "comb"), ref, got):
        assert a.shape == b.shape, name
        err = float((a - b).abs().max())
        assert err <= TOL, f"{name}: {err:.2e}"


def test_thread_split_equals_one_call():
    """Each token's result is computed alone, so splitting the chunk over threads changes nothing, bit for bit."""
    args = (*_inputs(512, 4, 64, seed=7), 1e-6, 1e-6, 20)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_prefill.hc_pre(*args)
        torch.set_num_threads(2)
        two = cpu_prefill.hc_pre(*args)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_dispatch_prefers_native_chunk():
    rt = Runtime.load("cpu")
    row = next(r for r in rt.dispatch.rows if r.op == "hc_pre")
    assert row.impl == "cpu.native_chunk", row
