"""The CPU backend: the float32 ops, with fast layouts of the costliest ones (`cpu_ops`, each checked against
its reference), linears computing on the checkpoint's own storage (`cpu_stored`, native kernels from
`cpu_native`), and, with a profile, the numerics emulation (reference ops only). Weights are kept in the
checkpoint's formats, streamed from the memory-mapped shards (`load_weights`)."""

from __future__ import annotations

import platform

import torch

from . import cpu_decode, cpu_decode_greedy, cpu_decode_rows, cpu_ops  # noqa: F401  (register the fast CPU implementations)
from .base import Backend, DeviceInfo


class CpuBackend(Backend):
    name = "cpu"
    weight_formats = frozenset({"fp8_block", "float32", "bf16", "fp16", "w8a8_int8"})
    default_profile = "cpu"
    computes_every_format = True       # every format's values exactly: what emulation is

    def process_group_backend(self) -> str:
        return "gloo"

    def probe(self) -> DeviceInfo:
        return DeviceInfo("cpu", "cpu", platform.processor() or platform.machine(),
                          {"threads": torch.get_num_threads()})

    def capabilities(self, info: DeviceInfo) -> frozenset[str]:
        # bf16 / fp16 are emulated exactly (round-to-dtype), so every float format is available.
        # `native_kernels`: the stored-format GEMV library built (backends/cpu_native.py); without it the
        # dispatch table shows the torch tile path for linears, and a line on stderr says why.
        from .cpu_native import kernels

        return frozenset({"fp32", "bf16", "fp16"} | ({"native_kernels"} if kernels() is not None else set()))

    def load_weights(self, reader, weight_format: str, compute_dtype: str, device, int8_linears):
        """The checkpoint's own formats, zero-copy views of the memory map (runtime.weights.cpu)."""
        from runtime.weights.cpu import cpu_weights

        return cpu_weights(reader, weight_format, int8_linears)
