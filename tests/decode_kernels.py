"""The fused decode step's kernels one at a time (tests/test_decode_fused.py checks each against the reference
op): thin ctypes calls into backends/native/decode_step.cpp's per-kernel entry points, kept with the tests (the
product calls only the whole step)."""

from __future__ import annotations

import ctypes

import torch

from backends.cpu_decode import library, plan_for
from backends.cpu_decode_abi import HcP, SeqP
from backends.cpu_decode_seqs import run_checked, table


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
    B = x.shape[0]
    seqs = (SeqP * B)()
    lib = library()
    if not run_checked(lambda t: lib.dsv4d_records(ctypes.byref(plan.A), B, t, seqs), [plan], states, starts,
                       table(states, starts, block.layer)):
        raise ValueError("fused attention: a sequence is in a speculative verify step")
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.dsv4d_attn(ctypes.byref(plan.A), B, x.data_ptr(), seqs, out.data_ptr(), 1)
    return out


def moe(block, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    plan = plan_for(block)
    x, idv = x.contiguous(), ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty_like(x)
    library().dsv4d_moe(ctypes.byref(plan.M), x.shape[0], x.data_ptr(), idv.data_ptr(), out.data_ptr(), 1)
    return out
