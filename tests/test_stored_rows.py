"""The M = 1 multi-row GEMV kernels (backends/native/stored_rows.h: up to 4 weight rows per pass over x) on
every ISA this CPU runs: values bit for bit the checkpoint's (one-hot x reads every column back), a row's
value independent of which rows share its pass (the fused decode's batch invariance), NaN codes anywhere in
a row give NaN, and results match the float32 reference within the summation-order tolerance."""

import pytest
import torch

from backends import cpu_native, cpu_stored
from runtime import number_formats
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored

pytestmark = pytest.mark.skipif(cpu_native.kernels() is None, reason="native kernels unavailable")

ISAS = [n for n, c in cpu_native.ISAS.items() if cpu_native.kernels() is not None
        and cpu_native.kernels().dsv4_isa_supported(c)]


def _weight(fmt, N, K, rng):
    if fmt == "fp8":
        codes = torch.randint(0, 256, (N, K), generator=rng, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x11
        scale = torch.randint(110, 145, (-(-N // 128), -(-K // 128)), generator=rng, dtype=torch.uint8)
        return Fp8Stored(codes.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    if fmt == "fp4":
        packed = torch.randint(0, 256, (N, K // 2), generator=rng, dtype=torch.uint8)
        scale = torch.randint(110, 145, (N, K // 32), generator=rng, dtype=torch.uint8)
        scale[0], scale[1, ::2] = 0, 250
        return Fp4Stored(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu))
    return (torch.randn(N, K, generator=rng) * 0.05).bfloat16()


def _values(w):
    return w.float() if isinstance(w, torch.Tensor) else w.dequantize()


def _same(a, b):                                       # bit for bit, NaN (an overflowing row) included
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


def _rows(x, w, lo, hi, isa):
    lib = cpu_native.kernels()
    return cpu_stored._gemv(lib, x, w, lo, hi, cpu_native.isa_code(isa))


# K: 128-blocks with a 64 + 32 + scalar tail (fp8 / bf16), 128-groups with 32-block tails (fp4)
CASES = [("fp8", 131), ("fp8", 160), ("fp8", 232), ("fp8", 1024 + 96 + 7), ("bf16", 200), ("bf16", 77),
         ("fp4", 480), ("fp4", 512), ("fp4", 160)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,K", CASES)
def test_one_row_of_x_reads_every_value_back(isa, fmt, K, rng):
    N = 13                                             # three passes of 4 rows and a single one
    w = _weight(fmt, N, K, rng)
    want = _values(w)
    for k in range(K):
        x = torch.zeros(1, K)
        x[0, k] = 1.0
        assert torch.equal(cpu_stored.native_gemv(x, w, isa)[0], want[:, k]), k


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,K", CASES)
def test_a_rows_value_does_not_depend_on_its_pass(isa, fmt, K, rng):
    N = 23
    w = _weight(fmt, N, K, rng)
    x = torch.randn(1, K, generator=rng)
    whole = _rows(x, w, 0, N, isa)
    alone = torch.cat([_rows(x, w, n, n + 1, isa) for n in range(N)], dim=1)
    shifted = torch.cat([_rows(x, w, 0, 3, isa), _rows(x, w, 3, N, isa)], dim=1)
    assert _same(whole, alone) and _same(whole, shifted)
    v = _values(w).double()
    ref, mag = v @ x[0].double(), v.abs() @ x[0].abs().double()
    fin = mag < 1e37                                   # rows of the 2^123 scales may overflow float32
    assert ((whole[0].double() - ref).abs()[fin] <= 1e-6 * mag[fin] + 1e-30).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K", [131, 160, 1024 + 96 + 7])
def test_fp8_nan_code_anywhere_in_a_row_gives_nan(isa, K, rng):
    w = _weight("fp8", 9, K, rng)
    codes = w.codes.view(torch.uint8).clone()
    cols = [0, 63, 64, 127, K - 1, 140 if K > 140 else 100, K - 8]
    for r, c in enumerate(cols):
        codes[r, c] = 0x7F if r % 2 else 0xFF
    w = Fp8Stored(codes.view(torch.float8_e4m3fn), w.scale)
    x = torch.randn(1, K, generator=rng)
    x[0, cols] = 0.0                                   # NaN * 0 is NaN: the whole row's sum is NaN
    got = cpu_stored.native_gemv(x, w, isa)[0]
    assert got[:len(cols)].isnan().all()
    assert not got[len(cols):].isnan().any()
    v = number_formats.dequant_fp8_block(w.codes, w.scale)[len(cols):].double()
    want, mag = v @ x[0].double(), v.abs() @ x[0].abs().double()
    assert ((got[len(cols):].double() - want).abs() <= 1e-6 * mag).all()
