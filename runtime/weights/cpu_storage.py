"""CPU weight storage in the checkpoint's own formats (issue 15): what the CPU backend keeps and computes on.

- `Fp8Stored`: FP8 e4m3 codes [out, in] with their ue8m0 scales per 128x128 block, exactly the checkpoint's
  bytes (zero-copy views of the memory-mapped shard where the tensor is used whole).
- `Fp4Stored`: FP4 e2m1 routed experts, two codes per byte (low nibble first) [out, in/2], ue8m0 scales per
  32 inputs [out, in/32], as stored.
- `Int8Rows`: the W8A8 emulation's own storage: int8 codes [out, in] and one float32 scale per output channel.
- bf16 / fp16 / float32 weights are plain tensors (bf16 as stored, a mmap view).

Every kind gives its float32 values through `dequantize()` (the reference ops and the emulation compute with
them; decoded with torch's own float8 casts and one broadcast multiply per block, so that a reference linear
costs little more than its matmul -- tests check them bit for bit against `runtime.number_formats`' independent
bit-level decoders over every code) and its held bytes through `nbytes()`. `dequantize_rows(lo, hi)` decodes
one row range only (the torch tile path of backends/cpu_stored.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import number_formats

FP8_BLOCK, FP4_BLOCK = 128, 32


class _CodesAt:
    """`shape` and `device` of a storage whose `codes` tensor has the weight's shape."""

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


@dataclass(frozen=True)
class Fp8Stored(_CodesAt):
    codes: torch.Tensor      # [N, K] float8_e4m3fn (or uint8 bytes)
    scale: torch.Tensor      # [ceil(N/128), ceil(K/128)] float8_e8m0fnu (or uint8 bytes)

    def dequantize(self) -> torch.Tensor:
        return _fp8_values(self.codes, self.scale)

    def dequantize_rows(self, lo: int, hi: int) -> torch.Tensor:
        """float32 rows [lo, hi) (the reference's values), decoding only those rows' codes."""
        b0 = lo // FP8_BLOCK
        w = number_formats.decode_e4m3(self.codes[lo:hi])
        s = number_formats.decode_e8m0(self.scale[b0:-(-hi // FP8_BLOCK)])
        s = s.repeat_interleave(FP8_BLOCK, 0)[lo - b0 * FP8_BLOCK:hi - b0 * FP8_BLOCK]
        return w * s.repeat_interleave(FP8_BLOCK, 1)[:, :w.shape[1]]

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel()


@dataclass(frozen=True)
class Fp4Stored:
    packed: torch.Tensor     # [N, K/2] int8, two e2m1 codes per byte (low nibble = even element)
    scale: torch.Tensor      # [N, K/32] float8_e8m0fnu

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], self.packed.shape[1] * 2))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self) -> torch.Tensor:
        N, H = self.packed.shape
        b = self.packed.view(torch.uint8).to(torch.int32)
        v = torch.stack((number_formats.E2M1_TABLE[b & 15], number_formats.E2M1_TABLE[b >> 4]), dim=-1)     # [N, H, 2]
        s = self.scale.view(torch.float8_e8m0fnu).float()                                     # [N, K/32]
        return (v.view(N, s.shape[1], FP4_BLOCK) * s[..., None]).view(N, 2 * H)

    def dequantize_rows(self, lo: int, hi: int) -> torch.Tensor:
        return number_formats.dequant_fp4(self.packed[lo:hi], self.scale[lo:hi], FP4_BLOCK)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel()


@dataclass(frozen=True)
class Int8Rows(_CodesAt):
    codes: torch.Tensor      # [N, K] int8
    scale: torch.Tensor      # [N] float32

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    def dequantize_rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.codes[lo:hi].float() * self.scale[lo:hi, None]

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


STORED = (Fp8Stored, Fp4Stored, Int8Rows)


def _fp8_values(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes [N, K] x ue8m0 block scales -> float32 (code value x 2^(s-127), exact)."""
    N, K = codes.shape
    w = codes.view(torch.float8_e4m3fn).float()
    s = scale.view(torch.float8_e8m0fnu).float()                    # [ceil(N/128), ceil(K/128)]
    if N % FP8_BLOCK == 0 and K % FP8_BLOCK == 0:
        return (w.view(N // FP8_BLOCK, FP8_BLOCK, K // FP8_BLOCK, FP8_BLOCK) * s[:, None, :, None]).view(N, K)
    return w * s.repeat_interleave(FP8_BLOCK, 0)[:N].repeat_interleave(FP8_BLOCK, 1)[:, :K]


def tensors_of(w) -> list[torch.Tensor]:
    """The tensors a weight's storage consists of."""
    if isinstance(w, torch.Tensor):
        return [w]
    return [v for v in vars(w).values() if isinstance(v, torch.Tensor)]


def held_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(w))
