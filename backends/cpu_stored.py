"""CPU linears on the checkpoint's own storage (issue 15): FP8 block-scaled, FP4 experts, bf16, W8A8 int8.

Two implementations of the `linear` and `group_linear` ops, both with the float32 reference
(`runtime.ops.linear`: x @ dequantize(w).T) as oracle:
- `cpu.stored_native`: the native kernels (backends/native/stored_gemm.cpp). Up to `MAX_M` rows of x (a decode
  step, a routed expert's few tokens): one pass over the stored weight, each row's values decoded in
  registers and used for every x row. More rows (prefill): the weight is dequantised `TILE_FLOATS` at a time
  (a few MB, in cache) by the native decoder and multiplied with torch's GEMM into the transposed output.
- `cpu.stored_torch_tiles` (no compiler on this machine): the same tiles dequantised with torch ops, for every M.
Either way, no whole dequantised weight exists per call, and the values are the reference's float32 values
(code x power-of-two scale is exact), accumulated in float32: only the summation order differs.
float32 weights go straight to one `F.linear`; fp16 and other plain dtypes through tiles of `.float()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.weights.storage import Fp4Stored, Fp8Stored, Int8Rows

from .cpu_native import kernels

MAX_M = 16                        # x rows up to which the GEMV kernels run (the library's own limit)
TILE_FLOATS = 1 << 20             # dequantised weight per GEMM tile: 4 MB of float32


def _tile_rows(K: int) -> int:
    return max(16, TILE_FLOATS // max(K, 1))


def _dequant_rows(w, lo: int, hi: int, lib) -> torch.Tensor:
    """float32 rows [lo, hi) of weight `w` (the reference's values)."""
    if lib is not None and isinstance(w, (Fp8Stored, Fp4Stored)):
        K = w.shape[1]
        out = torch.empty(hi - lo, K)
        fn = lib.dsv4_fp8_dequant if isinstance(w, Fp8Stored) else lib.dsv4_fp4_dequant
        codes = w.codes if isinstance(w, Fp8Stored) else w.packed
        fn(codes.data_ptr(), codes.stride(0), w.scale.data_ptr(), w.scale.stride(0), K,
           out.data_ptr(), lo, hi, torch.get_num_threads())
        return out
    if isinstance(w, torch.Tensor):
        return w[lo:hi].float()
    return w.dequantize_rows(lo, hi)


def _gemv(lib, x: torch.Tensor, w, lo: int, hi: int) -> torch.Tensor | None:
    """x [M <= MAX_M, K] contiguous float32 -> [M, hi - lo] through the native kernel, or None (no kernel)."""
    M, K = x.shape
    y = torch.empty(M, hi - lo)
    nt = torch.get_num_threads()
    if isinstance(w, Fp8Stored):
        lib.dsv4_fp8_gemv(x.data_ptr(), M, K, K, w.codes.data_ptr(), w.codes.stride(0), w.scale.data_ptr(),
                          w.scale.stride(0), y.data_ptr(), hi - lo, lo, hi, nt)
    elif isinstance(w, Fp4Stored):
        lib.dsv4_fp4_gemv(x.data_ptr(), M, K, K, w.packed.data_ptr(), w.packed.stride(0), w.scale.data_ptr(),
                          w.scale.stride(0), y.data_ptr(), hi - lo, lo, hi, nt)
    elif isinstance(w, Int8Rows):
        lib.dsv4_int8_gemv(x.data_ptr(), M, K, K, w.codes.data_ptr(), w.codes.stride(0), w.scale.data_ptr(),
                           y.data_ptr(), hi - lo, lo, hi, nt)
    elif isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.stride(1) == 1:
        lib.dsv4_bf16_gemv(x.data_ptr(), M, K, K, w.data_ptr(), w.stride(0), y.data_ptr(), hi - lo,
                           lo, hi, nt)
    else:
        return None
    return y


def _rows_linear(x: torch.Tensor, w, lo: int, hi: int, native: bool) -> torch.Tensor:
    """x [M, K] float32 @ rows [lo, hi) of w, transposed -> [M, hi - lo]."""
    lib = kernels() if native else None
    x = x.contiguous()
    if lib is not None and x.shape[0] <= MAX_M:
        y = _gemv(lib, x, w, lo, hi)
        if y is not None:
            return y
    yt = torch.empty(hi - lo, x.shape[0])                     # y.T: each tile's rows are contiguous
    step = _tile_rows(x.shape[1])
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        torch.mm(_dequant_rows(w, a, b, lib), x.T, out=yt[a - lo:b - lo])
    return yt.T


def _linear(x: torch.Tensor, w, native: bool) -> torch.Tensor:
    if isinstance(w, torch.Tensor) and w.dtype == x.dtype:
        return F.linear(x, w)
    lead = x.shape[:-1]
    y = _rows_linear(x.reshape(-1, x.shape[-1]).float(), w, 0, w.shape[0], native)
    return y.reshape(*lead, w.shape[0])


def _group_linear(x: torch.Tensor, w, native: bool) -> torch.Tensor:
    """x [T, G, k], w [G*o, k] (group g owns rows g*o..(g+1)*o) -> [T, G, o]: per group, its row range."""
    T, G, k = x.shape
    if isinstance(w, torch.Tensor) and w.dtype == x.dtype:
        return torch.einsum("tgk,gok->tgo", x, w.view(G, -1, k))
    o = w.shape[0] // G
    return torch.stack([_rows_linear(x[:, g].float(), w, g * o, (g + 1) * o, native) for g in range(G)], dim=1)


def linear_native(x, w):
    """Same contract as `runtime.ops.linear.linear`, on stored formats through the native kernels."""
    return _linear(x, w, True)


def linear_torch_tiles(x, w):
    """Same contract as `runtime.ops.linear.linear`, stored formats dequantised per tile with torch ops."""
    return _linear(x, w, False)


def group_linear_native(x, w):
    """Same contract as `runtime.ops.linear.group_linear`, through the native kernels."""
    return _group_linear(x, w, True)


def group_linear_torch_tiles(x, w):
    """Same contract as `runtime.ops.linear.group_linear`, torch tiles."""
    return _group_linear(x, w, False)
