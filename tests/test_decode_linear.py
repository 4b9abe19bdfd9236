"""The fused decode step's linears (backends/native/decode_linear.h) through `dsv4d_linear`: a row's bits do
not depend on how many rows it is batched with (B = 1 .. 32: different tile shapes, widened-weight reuse, the
thread split), for float32 and bf16 weights, with and without a K % 16 tail; and the values match a float64
product. No timing is asserted."""

from __future__ import annotations

import ctypes

import pytest
import torch

from backends import cpu_decode
from backends.cpu_decode_abi import Lin
from runtime import number_formats
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored

# float32 accumulation against float64, relative to sum |x| |w| of the row: measured 2026-12-02 at most 9e-8
# (the shapes below); the bound leaves ~3x
TOL = 3e-7


@pytest.fixture(scope="module")
def lib():
    lib = cpu_decode.library()
    if lib is None:
        pytest.skip(f"no native decode library: {cpu_decode._state.get('why')}")
    lib.dsv4d_linear.argtypes = [ctypes.POINTER(Lin), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int]
    lib.dsv4d_linear.restype = None
    return lib


def _run(lib, w, x, nt, packed=False):
    keep = cpu_decode._Keep()
    if packed:                                  # output panels (decode_panels.h), as a small model's plan packs
        lin = cpu_decode._panels(w, keep)
    else:
        kind = 1 if w.dtype == torch.bfloat16 else 0
        lin = Lin(kind, w.data_ptr(), w.stride(0), None, 0, w.shape[0], w.shape[1])
    y = torch.empty(x.shape[0], w.shape[0])
    lib.dsv4d_linear(ctypes.byref(lin), x.shape[0], x.data_ptr(), y.data_ptr(), nt)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "panels"])
@pytest.mark.parametrize("N,K", [(128, 256), (37, 200), (24, 1024), (5, 7), (300, 129)])
def test_a_row_is_the_same_bits_at_any_batch(lib, dtype, N, K):
    g = torch.Generator().manual_seed(N * 1000 + K)
    packed = dtype == "panels"
    w = torch.randn(N, K, generator=g).to(torch.bfloat16 if packed else dtype).contiguous()
    x = torch.randn(32, K, generator=g)
    alone = torch.cat([_run(lib, w, x[b:b + 1], 1, packed) for b in range(32)])
    exact = (x.double() @ w.double().T)
    scale = (x.double().abs() @ w.double().abs().T)
    assert ((alone.double() - exact).abs() / scale).max().item() < TOL
    for nt in (1, 2):
        for B in range(1, 33):
            y = _run(lib, w, x[:B], nt, packed)
            assert torch.equal(y.view(torch.int32), alone[:B].view(torch.int32)), (B, nt)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("N,K", [(131, 256), (40, 1024)])
def test_stored_weights_a_row_is_the_same_bits_at_any_batch(lib, fmt, N, K):
    """A large model's linears from their stored FP8 / FP4 bytes (not widened): up to 16 x rows share each
    decoded weight row, every row's value as alone, at B = 1..32 and 1 / 2 threads; values within float32
    accumulation of the float64 product of the stored values."""
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) * 0.05
    stored = Fp8Stored(*number_formats.quant_fp8_block(w)) if fmt == "fp8" else Fp4Stored(*number_formats.quant_fp4(w))
    keep = cpu_decode._Keep()                       # no `widen`: a model past the budget keeps the stored bytes
    lin = cpu_decode.lin_desc(stored, keep)
    assert lin.kind == (2 if fmt == "fp8" else 3)
    x = torch.randn(32, K, generator=g)

    def run(xx, nt):
        y = torch.empty(xx.shape[0], N)
        lib.dsv4d_linear(ctypes.byref(lin), xx.shape[0], xx.data_ptr(), y.data_ptr(), nt)
        return y

    alone = torch.cat([run(x[b:b + 1], 1) for b in range(32)])
    ref = stored.dequantize().double()
    err = ((alone.double() - x.double() @ ref.T).abs() / (x.double().abs() @ ref.abs().T)).max().item()
    assert err < TOL
    for nt in (1, 2):
        for B in range(1, 33):
            assert torch.equal(run(x[:B], nt).view(torch.int32), alone[:B].view(torch.int32)), (B, nt)
