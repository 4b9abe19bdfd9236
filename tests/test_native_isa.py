"""The native stored-format kernels (backends/native) on every instruction-set path this CPU runs (forced per
call through `cpu_stored.native_gemv(..., isa=...)`; the product knob is DSV4_NATIVE_ISA), against the
float32 reference `x @ dequantize(w).T`: every e4m3 / e2m1 code decoded to exactly the reference's value,
FP8 with K not a multiple of 128 and N odd at M = 1 / 4 / 16, FP4, bf16 and W8A8 int8; the grouped
routed-experts op (one native call for every active expert's w1 + w3, one for their w2) with uneven token
counts per expert including experts with none, under `exact` and `official` numerics. The NEON path is
compiled only on aarch64 and is not run here (this test machine is x86-64)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from backends import cpu_native, cpu_stored
from runtime import number_formats
from runtime.model.v4 import Linear
from runtime.ops import moe, reference_ops
from runtime.weight_transforms import quantize_int8_per_channel
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored, Int8Rows


def _runnable():
    lib = cpu_native.kernels()
    assert lib is not None, cpu_native.unavailable_reason()
    return [n for n, c in cpu_native.ISAS.items() if lib.dsv4_isa_supported(c)]


ISAS = _runnable()


def test_this_cpu_runs_the_simd_paths():
    """The test machine (x86-64 with AVX-512) runs scalar, AVX2 and AVX-512, and picks the best by default:
    AVX-512 VBMI where the CPU has it, else AVX-512."""
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        flags = open("/proc/cpuinfo").read().split()
        assert "avx2" in ISAS and "scalar" in ISAS
        if "avx512bw" in flags and "avx512vl" in flags:
            assert "avx512" in ISAS
            assert ("avx512vbmi" in ISAS) == ("avx512vbmi" in flags)
            assert cpu_native.isa() == ("avx512vbmi" if "avx512vbmi" in flags else "avx512")


@pytest.mark.parametrize("isa", ISAS)
def test_fp8_every_code_decodes_exactly(isa):
    """Row n holds code n at column 37 (a vector lane) and column 130 (the K tail), zeros elsewhere; x picks
    one column: y equals code's value x scale bit for bit, NaN codes included, for several block scales."""
    codes = torch.zeros(256, 131, dtype=torch.uint8)
    codes[:, 37] = torch.arange(256, dtype=torch.uint8)
    codes[:, 130] = torch.arange(256, dtype=torch.uint8)
    scale = torch.tensor([[120, 127], [127, 133]], dtype=torch.uint8)        # 2^-7, 1, 2^6 over the blocks
    w = Fp8Stored(codes.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    want = number_formats.dequant_fp8_block(w.codes, w.scale)
    for col in (37, 130):
        x = torch.zeros(1, 131)
        x[0, col] = 1.0
        got = cpu_stored.native_gemv(x, w, isa)[0]
        ref = want[:, col]
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got.nan_to_num(0), ref.nan_to_num(0))


@pytest.mark.parametrize("isa", ISAS)
def test_fp4_every_code_decodes_exactly(isa):
    packed = torch.zeros(256, 32, dtype=torch.uint8)
    packed[:, 5] = torch.arange(256, dtype=torch.uint8)                   # columns 10 (low) and 11 (high)
    scale = torch.full((256, 2), 127, dtype=torch.uint8)
    scale[::3] = 125
    w = Fp4Stored(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu))
    want = w.dequantize()
    for col in (10, 11):
        x = torch.zeros(1, 64)
        x[0, col] = 1.0
        assert torch.equal(cpu_stored.native_gemv(x, w, isa)[0], want[:, col])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,K", [("fp8", 200), ("fp8", 4096 + 64 + 5), ("fp4", 480), ("fp4", 512)])
def test_every_position_decodes_exactly(isa, fmt, K, rng):
    """One-hot rows of x (16 per call) read the weight back column by column: every code at every position of
    a row -- 128-groups, 64-code chunks, the K tails, 16 scales per load and fewer -- equals the reference's
    dequantised value bit for bit (one nonzero product per output). Scales 0 (2^-127: subnormal values) and
    250 (values up to 6 * 2^123) included; NaN codes are in the tests above."""
    N = 131
    if fmt == "fp8":
        codes = torch.randint(0, 256, (N, K), generator=rng, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x11
        scale = torch.randint(110, 145, (2, -(-K // 128)), generator=rng, dtype=torch.uint8)
        w = Fp8Stored(codes.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    else:
        packed = torch.randint(0, 256, (N, K // 2), generator=rng, dtype=torch.uint8)
        scale = torch.randint(110, 145, (N, K // 32), generator=rng, dtype=torch.uint8)
        scale[0], scale[1, ::2] = 0, 250
        w = Fp4Stored(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu))
    want = w.dequantize()
    eye = torch.eye(K)
    got = torch.cat([cpu_stored.native_gemv(eye[k:k + 16], w, isa) for k in range(0, K, 16)])
    assert torch.equal(got, want.T)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,N,K", [(1, 131, 200), (4, 131, 200), (16, 77, 384), (3, 5, 4096), (5, 33, 480)])
def test_formats_against_the_reference(isa, M, N, K, rng):
    x = torch.randn(M, K, generator=rng)
    w8 = Fp8Stored(*number_formats.quant_fp8_block(torch.randn(N, K, generator=rng) * 0.05))
    wb = (torch.randn(N, K, generator=rng) * 0.05).bfloat16()
    wi = Int8Rows(*quantize_int8_per_channel(torch.randn(N, K, generator=rng) * 0.05))
    k4 = K - K % 32
    w4 = Fp4Stored(*number_formats.quant_fp4(torch.randn(N, k4, generator=rng) * 0.05))
    tol = 2e-6 * (K / 200) ** 0.5                                      # measured <= 5.7e-6 at K = 4096
    for w, xx, ref in ((w8, x, w8.dequantize()), (wb, x, wb.float()), (wi, x, wi.dequantize()),
                       (w4, x[:, :k4], w4.dequantize())):
        got = cpu_stored.native_gemv(xx, w, isa)
        assert got.shape == (M, N)
        assert (got - xx @ ref.T).abs().max() <= 3 * tol, type(w).__name__


def test_isa_knob_refuses_what_this_cpu_cannot_run(monkeypatch):
    """DSV4_NATIVE_ISA names a path; an unknown or unrunnable one is refused with a reason (the caller then
    prints one line and the table shows the torch tiles)."""
    lib = cpu_native.kernels()
    monkeypatch.setenv(cpu_native.ISA_ENV, "avx2")
    assert cpu_native._choose_isa(lib) == (cpu_native.ISAS["avx2"], "")
    monkeypatch.setenv(cpu_native.ISA_ENV, "sse9")
    code, why = cpu_native._choose_isa(lib)
    assert code is None and "sse9" in why and "avx512" in why
    missing = [n for n in cpu_native.ISAS if n not in ISAS]
    if missing:
        monkeypatch.setenv(cpu_native.ISA_ENV, missing[0])
        code, why = cpu_native._choose_isa(lib)
        assert code is None and "not supported" in why


@pytest.mark.parametrize("name", ["avx2", "scalar"])
def test_isa_knob_reaches_the_fused_decode_calls(name):
    """DSV4_NATIVE_ISA also picks what the library runs for calls naming no path (isa = -1: the fused decode
    step's), read in a fresh process; without it, the best."""
    code = "from backends import cpu_native as c; l = c.kernels(); print(l.dsv4_process_isa(), l.dsv4_best_isa())"
    for env, want in (({cpu_native.ISA_ENV: f" {name.upper()} "}, cpu_native.ISAS[name]), ({}, None)):
        e = {k: v for k, v in os.environ.items() if k != cpu_native.ISA_ENV} | env
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, check=True)
        got, best = map(int, out.stdout.split())
        assert got == (best if want is None else want)


def _experts(rng, E, d, inter, fmt):
    make = (lambda n, k: Fp4Stored(*number_formats.quant_fp4(torch.randn(n, k, generator=rng) * 0.05))) if fmt == "fp4" \
        else (lambda n, k: Fp8Stored(*number_formats.quant_fp8_block(torch.randn(n, k, generator=rng) * 0.05)))
    q = fmt == "fp4"
    return [tuple(Linear(make(*s), q) for s in ((inter, d), (d, inter), (inter, d))) for _ in range(E)]


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("numerics", ["exact", "official"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d,inter", [(64, 96), (256, 160)])
def test_grouped_experts_uneven_tokens(fmt, numerics, isa, d, inter, rng, monkeypatch):
    """Routed experts through the grouped native op: T = 1 (a decode step), 7 tokens with one expert taking
    all of them, others one or two, some none; T = 20 (> MAX_M: the small-batch op). Against the reference op
    on the float32 values under the same numerics, on every instruction set (as DSV4_NATIVE_ISA picks it at
    load); d = 256 / inter = 160 reach the VBMI FP4 kernel's 128-groups and its 32-block tail."""
    monkeypatch.setitem(cpu_native._state, "isa", cpu_native.isa_code(isa))
    E = 8
    experts = _experts(rng, E, d, inter, fmt)
    values = [tuple(Linear(l.weight.dequantize(), l.quantized) for l in e) for e in experts]
    ref = reference_ops(numerics)
    fast = dataclasses.replace(ref, linear=cpu_stored.linear_native)
    for T in (1, 7, 20):
        x = torch.randn(T, d, generator=rng)
        idx = torch.stack([torch.zeros(T, dtype=torch.int64), torch.arange(T) % 3 + 1], dim=1)   # 4..7: none
        if T > 1:
            idx[0, 1] = 5
        w = torch.rand(T, 2, generator=rng)
        want = moe.routed_experts(x, idx, w, values, 10.0, ref)
        got = cpu_stored.routed_experts_native(x, idx, w, experts, 10.0, fast)
        if numerics == "exact":
            assert (got - want).abs().max() <= 4e-6                          # measured 1.2e-6
        else:   # bf16 roundings: summation order can move a value across one rounding boundary; at d = 256
            # an FP8 activation code flipping so moved an output by 9.8e-4 on every ISA, scalar included
            atol = 1e-5 if d == 64 else 2 ** -9 * float(want.abs().max())
            assert torch.allclose(got, want, rtol=2 ** -6, atol=atol)


def test_grouped_experts_is_the_cpu_choice(tiny_rt):
    """With the native library built, the CPU dispatch table runs the grouped op."""
    rows = {r.op: r.impl for r in tiny_rt.dispatch.rows}
    assert rows["routed_experts"] == "cpu.stored_grouped"
    assert rows["linear"] == "cpu.stored_native"


def test_grouped_experts_with_an_expert_repeated_per_token(rng):
    """A hash routing table may name one expert several times for a token (a zero-valued table names expert
    0 six times: the sparse Flash dry run's first layers): 9 tokens x 2 slots on expert 0 = 18 rows, more
    than one native job takes. The op then groups on the small-batch path, still equal to the reference."""
    E, d, inter = 4, 64, 96
    experts = _experts(rng, E, d, inter, "fp4")
    values = [tuple(Linear(l.weight.dequantize(), l.quantized) for l in e) for e in experts]
    ref = reference_ops("exact")
    fast = dataclasses.replace(ref, linear=cpu_stored.linear_native)
    x = torch.randn(9, d, generator=rng)
    idx = torch.zeros(9, 2, dtype=torch.int64)
    w = torch.rand(9, 2, generator=rng)
    want = moe.routed_experts(x, idx, w, values, 10.0, ref)
    got = cpu_stored.routed_experts_native(x, idx, w, experts, 10.0, fast)
    assert (got - want).abs().max() <= 4e-6


_DEQUANT_CHECK = """
import torch
from backends import cpu_native, cpu_stored
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored
g = torch.Generator().manual_seed(3)
lib = cpu_native.kernels()
for K in (200, 4096 + 64 + 5):
    codes = torch.randint(0, 256, (131, K), generator=g, dtype=torch.uint8)
    codes[:, :256 if K > 256 else K] = torch.arange(256, dtype=torch.uint8)[:min(K, 256)]   # every code, NaNs too
    scale = torch.randint(110, 145, (2, -(-K // 128)), generator=g, dtype=torch.uint8)
    scale[0, 0] = 0
    w = Fp8Stored(codes.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    want, got = w.dequantize(), cpu_stored._dequant_rows(w, 0, 131, lib)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0)), K
    part = cpu_stored._dequant_rows(w, 7, 130, lib)                     # a row range not starting at 0
    assert torch.equal(part.nan_to_num(0), want[7:130].nan_to_num(0)), K
for K in (480, 512):
    packed = torch.randint(0, 256, (131, K // 2), generator=g, dtype=torch.uint8)
    packed[:, :256 if K // 2 >= 256 else K // 2] = torch.arange(256, dtype=torch.uint8)[:min(K // 2, 256)]
    scale = torch.randint(110, 145, (131, K // 32), generator=g, dtype=torch.uint8)
    scale[0], scale[1, ::2] = 0, 250
    w = Fp4Stored(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu))
    assert torch.equal(cpu_stored._dequant_rows(w, 0, 131, lib), w.dequantize()), K
    assert torch.equal(cpu_stored._dequant_rows(w, 5, 99, lib), w.dequantize()[5:99]), K
print(lib.dsv4_process_isa())
"""


@pytest.mark.parametrize("isa", ISAS)
def test_tile_dequantisation_is_the_reference_bit_for_bit(isa):
    """The large-M path's tile dequantisation (dsv4_fp8_dequant / dsv4_fp4_dequant, vectorised on the AVX-512
    levels) gives the reference's dequantised values bit for bit -- every code, the K tails, subnormal and
    large scales, row ranges -- on each instruction set, as DSV4_NATIVE_ISA picks it (a fresh process)."""
    e = {k: v for k, v in os.environ.items() if k != cpu_native.ISA_ENV} | {cpu_native.ISA_ENV: isa}
    out = subprocess.run([sys.executable, "-c", _DEQUANT_CHECK], capture_output=True, text=True, env=e)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == cpu_native.ISAS[isa]
