"""A block-scaled FP8 linear as ONE Triton kernel: y = act_quant(x) @ dequant(W_fp8, 128x128 scales)^T.

The kernel fuses DeepSeek's activation quantisation (per token and 128-column block, power-of-two ue8m0 scale
`2^ceil(log2(max(amax, 1e-4) / 448))`, e4m3 codes — the official `act_quant`, as `backends.cuda_ops.fp8_linear`
applies it) with the FP8 x FP8 GEMM. Each program owns a BLOCK_M x BLOCK_N output tile and walks K in 128-wide
blocks, one weight scale block per step: quantise the x tile, `tl.dot` the e4m3 tiles (fp32 accumulator on the
tensor cores), then add the partial into a float32 accumulator scaled by act scale x weight scale — DeepSeek's
promotion every 128 K, so the tensor cores' reduced FP8 accumulation precision never spans more than one block.
Output float32. One launch per linear, where the per-K-block `torch._scaled_mm` loop launched K/128 GEMMs
(V4-Flash: ~14,000 GEMMs per token).

Exactness: the scale exponent is read from amax's bits (amax = (1+f) 2^e: ceil(log2(amax/448)) = e - 8 + [f > 0.75],
which equals the official bit-twiddled `fast_log2_ceil` of the rounded quotient), x times the inverse power of
two is exact, and the rounding to the e4m3 grid (ties to even, subnormals included) is done in integer
arithmetic, so the codes equal the reference's on every platform; the e4m3 cast then only re-types exact values.
(Triton's interpreter also rounds float -> fp8 wrongly when the mantissa carries into the exponent, e.g. 31.6 -> 16;
the integer rounding sidesteps that, which is what lets the tests run this kernel on CPU tensors.)

The kernel runs on CUDA tensors (sm_89+: Triton emits e4m3 only there) and, under Triton's interpreter
(`TRITON_INTERPRET=1`), on CPU tensors: that is how tests/test_cuda_fp8_kernel.py checks it against the
float32 reference without a GPU. backends/cuda_ops.py imports this module (and so `triton`) on first use only.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BLOCK_K = 128                   # = the weight's scale block: one weight scale per (N block, K block)


def interpreting() -> bool:
    """Triton's interpreter is on (`TRITON_INTERPRET=1`): kernels run on CPU tensors, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _fp8_block_linear(x_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, KB, stride_xm, stride_wn, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * 128 + rk
        k_ok = k < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)   # ceil(log2(amax/448))
        s_act = ((e + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
        y = x * inv[:, None]                                   # exact: |y| <= 448
        # Round |y| to the e4m3 grid, ties to even: keep 3 mantissa bits (more dropped below 2^-6, where e4m3
        # is subnormal with quantum 2^-9), in integers.
        yb = y.to(tl.int32, bitcast=True)
        ex = (yb >> 23) & 0xFF
        man = (yb & 0x7FFFFF) | 0x800000
        drop = tl.minimum(tl.where(ex >= 121, 20, 141 - ex), 30)
        r = (man + ((1 << (drop - 1)) - 1) + ((man >> drop) & 1)) >> drop
        quantum = ((tl.maximum(ex - 127, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        mag = tl.minimum(r.to(tl.float32) * quantum, 448.0)
        q = tl.where(yb < 0, -mag, mag)
        a = q.to(tl.float8e4nv)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        s_w = tl.load(ws_ptr + (rn // 128) * KB + kb, mask=n_ok, other=0.0)
        part = tl.dot(a, tl.trans(w), out_dtype=tl.float32)
        acc += part * s_act[:, None] * s_w[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel; built per mode because Triton picks interpreter or compiler when it wraps a function."""
    return triton.jit(_fp8_block_linear)


def _tiles(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): decode-sized M keeps 16-row tiles and narrower N tiles (more programs
    streaming the weight); prefill uses 128 x 128. Not tuned on a GPU yet."""
    if M <= 16:
        return 16, 64, 4
    if M <= 64:
        return 64, 128, 4
    return 128, 128, 8


def fp8_block_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., K] (float32 / bf16) @ Fp8Block w [N, K]^T with DeepSeek's activation quantisation -> [..., N] f32."""
    lead, K = x.shape[:-1], x.shape[-1]
    a = x.reshape(-1, K)
    if a.stride(-1) != 1:
        a = a.contiguous()
    codes = w.codes if w.codes.stride(-1) == 1 else w.codes.contiguous()
    scale = w.scale.float().contiguous()                    # [N/128, K/128] powers of two (e8m0 decodes exactly)
    N = codes.shape[0]
    M = a.shape[0]
    y = torch.empty(M, N, dtype=torch.float32, device=a.device)
    if M == 0:
        return y.view(*lead, N)
    bm, bn, warps = _tiles(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _kernel(interpreting())[grid](a, codes, scale, y, M, N, K, triton.cdiv(K, BLOCK_K), a.stride(0), codes.stride(0),
                                  y.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y.view(*lead, N)
