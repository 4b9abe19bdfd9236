"""The storage layouts of weights on a GPU / NPU: what `runtime.weights.device` streams the checkpoint into when
the model runs on a device.

The emulation path (`runtime.weight_transforms`) keeps the float32 *values* a weight format represents; these
layouts keep the format's *storage* on the device, so memory use and GEMM kernels are the deployment's:

- `Fp8Block`: e4m3 codes [out, in] with one float32 power-of-two scale per 128x128 block (`fp8_block`, as
  shipped). FP8 values times powers of two are exact, so re-deriving codes from the checkpoint's decoded values
  gives back the shipped numbers exactly (a block whose largest code had rounded down to 224 gets half the
  scale and doubled codes: the same values).
- `Int8Channel`: int8 codes stored transposed, [in, out] = the [K, N] layout of `npu_quant_matmul`'s x2, with
  one float32 scale per output channel (`w8a8_int8`, the profile's `int8_linears`).
- plain tensors in the storage dtype (bf16 / fp16) for the other linears, the embedding, the head and the
  expert weights (FP4 experts decode exactly into bf16: no FP4 GEMM is used in this build); float32 for norms,
  sinks, mHC, `ape`, the MoE gate and its bias (fp32 in every deployment), and for the compressors'
  `wkv` / `wgate` and the output head, which DeepSeek's reference computes in fp32 (their values are bf16 on
  disk; fp32 storage keeps the logits and the pooling inputs unrounded, as the reference and the emulation).
  `wo_a` is kept in the storage dtype, as DeepSeek's reference converts it FP8 -> bf16.
- a layer's routed experts, when plain tensors, are stored as one [E, out, in] tensor per projection and the
  per-expert names are views into it, so a grouped GEMM takes them without a copy (`expert_stack`).

`dequantize(w)` gives float32 [out, in] for every kind, equal to what the emulation computes with: the
reference ops accept every weight (as oracle and as recorded fallback), and tests compare storage to values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import number_formats
from ..ops.linear import dequantize  # noqa: F401  (the float32 values of any weight kind)
from ..weight_transforms import quantize_int8_per_channel
from .cpu_storage import _CodesAt

BLOCK = 128
_STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}
_COMPUTE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Fp8Block(_CodesAt):
    codes: torch.Tensor      # [out, in] float8_e4m3fn
    scale: torch.Tensor      # [ceil(out/128), ceil(in/128)] float32 powers of two
    col_scales: torch.Tensor = field(init=False, repr=False)   # [ceil(in/128), out]: derived once, read per GEMM

    def __post_init__(self):
        cols = self.scale.t().repeat_interleave(BLOCK, 1)[:, : self.codes.shape[0]].contiguous()
        object.__setattr__(self, "col_scales", cols)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Fp8Block":
        codes, s = number_formats.quant_fp8_block(w.float(), BLOCK)
        return cls(codes, number_formats.decode_e8m0(s))

    def to(self, device) -> "Fp8Block":
        return Fp8Block(self.codes.to(device), self.scale.to(device))

    def column_scale(self, kb: int) -> torch.Tensor:
        """The scales of K-block `kb` expanded per output channel: [out] float32."""
        return self.col_scales[kb]

    def dequantize(self) -> torch.Tensor:
        out, inp = self.codes.shape
        s = self.scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:out, :inp]
        return self.codes.float() * s

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


@dataclass(frozen=True)
class Int8Channel:
    codes_kn: torch.Tensor   # [in, out] int8, contiguous (npu_quant_matmul's x2 [K, N])
    scale: torch.Tensor      # [out] float32

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Channel":
        codes, scale = quantize_int8_per_channel(w.float())
        return cls(codes.t().contiguous(), scale)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.codes_kn.shape[1], self.codes_kn.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.codes_kn.device

    def to(self, device) -> "Int8Channel":
        return Int8Channel(self.codes_kn.to(device), self.scale.to(device))

    def dequantize(self) -> torch.Tensor:
        return self.codes_kn.t().float() * self.scale[:, None]

    def nbytes(self) -> int:
        return self.codes_kn.numel() + self.scale.numel() * 4


def nbytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes()


def expert_stack(ws: Sequence) -> torch.Tensor | None:
    """The [E, out, in] tensor the experts' weights `ws` are consecutive views of, or None (then a backend
    runs the experts one by one)."""
    base = ws[0]._base if isinstance(ws[0], torch.Tensor) else None
    if base is None or base.dim() != 3 or base.shape[0] != len(ws):
        return None
    step = base.stride(0) * base.element_size()
    ok = all(isinstance(w, torch.Tensor) and w._base is base and
             w.data_ptr() == base.data_ptr() + e * step for e, w in enumerate(ws))
    return base if ok else None


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])\.weight$")
