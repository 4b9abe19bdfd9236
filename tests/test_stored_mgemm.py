"""The native small-M GEMM (backends/native/stored_mgemm.h: x rows MAX_M < M <= MGEMM_MAX_M, a prefill's routed
experts and short chunks) against the float32 reference `x @ dequantize(w).T`, on every instruction-set path
this CPU runs (forced per call; `mgemm_path` names the kernel each runs): FP8 128x128-block-scaled with K not
a multiple of 128 (and more than one 512-wide K block) and N odd (a last 96-row panel cut short), FP4 with
K not a multiple of the K block, bf16 and W8A8 int8, at M = 17 / 48 / 130 (one, three and nine 16-row
vectors over one to three packed chunks); every e4m3 / e2m1 code decoded to exactly the reference's value;
the routed-experts op on FP4 storage with uneven prefill-sized token counts per expert (including experts
with none) through `linear`, each active expert's three linears on the small-M GEMM. Tolerances: ~3x the
largest error measured (relative to max(1, |y|); summation order is the only difference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backends import cpu_native, cpu_stored
from runtime import number_formats
from runtime.ops import moe, reference_ops
from runtime.weight_transforms import quantize_int8_per_channel
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored, Int8Rows
from tests.test_stored_kernels import _fp4, _fp8


def _runnable():
    lib = cpu_native.kernels()
    assert lib is not None, cpu_native.unavailable_reason()
    return [n for n, c in cpu_native.ISAS.items() if lib.dsv4_isa_supported(c)]


ISAS = _runnable()
MS = [17, 48, 130]


def _err(got, x, w_f32):
    want = x @ w_f32.T
    assert got.shape == want.shape
    return ((got - want).abs().max() / max(1.0, want.abs().max())).item()


def test_paths_are_named():
    """The AVX-512 levels run the AVX-512 kernel, every other path the portable one."""
    for isa in ISAS:
        assert cpu_stored.mgemm_path(isa) == ("avx512" if isa.startswith("avx512") else "portable")


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("isa", ISAS)
def test_fp8_block(M, isa, rng):
    w, x = _fp8(rng, 197, 1300), torch.randn(M, 1300, generator=rng)
    assert _err(cpu_stored.native_mgemm(x, w, isa), x, w.dequantize()) <= 2.5e-6     # measured <= 7.5e-7


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("isa", ISAS)
def test_fp4(M, isa, rng):
    w, x = _fp4(rng, 131, 1056), torch.randn(M, 1056, generator=rng)
    assert _err(cpu_stored.native_mgemm(x, w, isa), x, w.dequantize()) <= 3e-6       # measured <= 9.3e-7


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("isa", ISAS)
def test_bf16_and_int8(M, isa, rng):
    x = torch.randn(M, 200, generator=rng)
    wb = (torch.randn(131, 200, generator=rng) * 0.05).bfloat16()
    assert _err(cpu_stored.native_mgemm(x, wb, isa), x, wb.float()) <= 1e-6          # measured <= 2.2e-7
    w8 = Int8Rows(*quantize_int8_per_channel(torch.randn(131, 200, generator=rng) * 0.05))
    assert _err(cpu_stored.native_mgemm(x, w8, isa), x, w8.dequantize()) <= 1e-6     # measured <= 3.5e-7


def _count_mgemm(monkeypatch, tile_floats):
    """Rows of each small-M GEMM call from now on, with `TILE_FLOATS` set to `tile_floats`."""
    calls = []
    real = cpu_stored._mgemm
    monkeypatch.setattr(cpu_stored, "_mgemm", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    monkeypatch.setattr(cpu_stored, "TILE_FLOATS", tile_floats)
    return calls


def test_linear_routes_by_rows_and_size(rng, monkeypatch):
    """`linear` on stored weights takes the small-M GEMM for MAX_M < M <= MGEMM_MAX_M on a weight of at least
    one tile, and only there (a smaller weight, or more rows: the tiles)."""
    calls = _count_mgemm(monkeypatch, 64 * 256)
    w, small = _fp8(rng, 64, 256), _fp8(rng, 63, 256)
    for M in (16, 17, cpu_stored.MGEMM_MAX_M, cpu_stored.MGEMM_MAX_M + 1):
        x = torch.randn(M, 256, generator=rng)
        assert _err(cpu_stored.linear_native(x, w), x, w.dequantize()) <= 3e-6
        assert _err(cpu_stored.linear_native(x, small), x, small.dequantize()) <= 3e-6
    assert calls == [17, cpu_stored.MGEMM_MAX_M]


@pytest.mark.parametrize("isa", ISAS)
def test_every_code_decodes_exactly(isa):
    """Row n holds code n at two columns (a K-block's first and the K tail), x row m picks one column: each
    output equals the code's value x scale bit for bit, NaN codes included, for several block scales."""
    codes = torch.zeros(256, 600, dtype=torch.uint8)
    codes[:, 37] = torch.arange(256, dtype=torch.uint8)
    codes[:, 599] = torch.arange(256, dtype=torch.uint8)
    scale = torch.tensor([[120, 127, 126, 125, 130], [127, 133, 121, 119, 140]], dtype=torch.uint8)
    w = Fp8Stored(codes.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    want = number_formats.dequant_fp8_block(w.codes, w.scale)
    x = torch.zeros(20, 600)
    x[3, 37] = x[17, 599] = 1.0
    got = cpu_stored.native_mgemm(x, w, isa)
    for m, col in ((3, 37), (17, 599)):
        assert torch.equal(got[m].isnan(), want[:, col].isnan())
        assert torch.equal(got[m].nan_to_num(0), want[:, col].nan_to_num(0))
    packed = torch.zeros(256, 288, dtype=torch.uint8)
    packed[:, 5] = packed[:, 287] = torch.arange(256, dtype=torch.uint8)   # columns 10 / 11 and 574 / 575
    s4 = torch.full((256, 18), 127, dtype=torch.uint8)
    s4[::3] = 125
    w4 = Fp4Stored(packed.view(torch.int8), s4.view(torch.float8_e8m0fnu))
    want = w4.dequantize()
    x = torch.zeros(33, 576)
    cols = {0: 10, 5: 11, 20: 574, 32: 575}
    for m, col in cols.items():
        x[m, col] = 1.0
    got = cpu_stored.native_mgemm(x, w4, isa)
    for m, col in cols.items():
        assert torch.equal(got[m], want[:, col])


def test_fp4_experts_uneven_prefill_tokens(rng, monkeypatch):
    """Routed experts on FP4 storage at prefill sizes (200 tokens, top-3 of 6 experts skewed so experts see
    from none to ~150 tokens, most above MAX_M) against the reference op on the float32 values."""
    from runtime.model.v4 import Linear

    E, d, inter, T = 6, 640, 96, 200
    experts = [tuple(Linear(_fp4(rng, *shape), False) for shape in ((inter, d), (d, inter), (inter, d)))
               for _ in range(E)]
    values = [tuple(Linear(lin.weight.dequantize(), False) for lin in e) for e in experts]
    fast = dataclasses.replace(reference_ops("exact"), linear=cpu_stored.linear_native)
    x = torch.randn(T, d, generator=rng)
    p = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.0])                      # expert 5 never picked
    idx = torch.stack([torch.multinomial(p, 3, generator=rng) for _ in range(T)])
    w = torch.rand(T, 3, generator=rng)
    counts = torch.bincount(idx.flatten(), minlength=E)
    assert counts[5] == 0 and (counts[:5] > cpu_stored.MAX_M).all()
    rows = _count_mgemm(monkeypatch, 96 * 640)                                # every expert linear >= a tile
    got = cpu_stored.routed_experts_native(x, idx, w, experts, 10.0, fast)
    assert sorted(rows) == sorted(3 * counts[:5].tolist())                  # w1, w3, w2 of every active expert
    want = moe.routed_experts(x, idx, w, values, 10.0, reference_ops("exact"))
    assert (got - want).abs().max() <= 2e-6 * max(1.0, want.abs().max())       # measured 6.3e-7
