"""The CPU backend: the float32 ops, with fast layouts of the costliest ones (`cpu_ops`, each checked against
its reference), and, with a profile, the numerics emulation (reference ops only)."""

from __future__ import annotations

import platform

import torch

from . import cpu_ops  # noqa: F401  (registers the fast CPU implementations)
from .base import DeviceInfo


class CpuBackend:
    name = "cpu"
    weight_formats = frozenset({"fp8_block", "float32", "bf16", "fp16", "w8a8_int8"})

    def probe(self) -> DeviceInfo:
        return DeviceInfo("cpu", "cpu", platform.processor() or platform.machine(),
                          {"threads": torch.get_num_threads()})

    def capabilities(self, info: DeviceInfo) -> frozenset[str]:
        # bf16 / fp16 are emulated exactly (round-to-dtype), so every float format is available.
        return frozenset({"fp32", "bf16", "fp16"})
