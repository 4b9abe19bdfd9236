"""The CUDA backend: device probe and capabilities by compute capability; its ops are in cuda_ops.py.

The probe runs at `Runtime.load`, never at import. Capabilities beyond the compute capability: `triton` (the
package is installed and the device is a GPU: compiled Triton kernels take CUDA tensors only) and `scaled_mm_blockwise` (torch's blockwise-scaled FP8 GEMM: sm_90 with cuBLASLt >= 12.9), which select the
FP8 linear (backends/cuda_ops.py). A profile's `graph_mode: cudagraph` makes generate's decode steps replay CUDA
graphs of a static step (`decode_runner`, backends/cuda_graphs.py). `--emulate` runs a CUDA profile's numerics on the CPU
reference instead of a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from . import cuda_ops  # noqa: F401  (registers the CUDA implementations; touches no device)
from .base import Backend, BackendUnavailable, DeviceInfo


class CudaBackend(Backend):
    name = "cuda"
    # INT8 channels (w8a8_int8) have no CUDA GEMM here: a profile asking for them is refused at load.
    weight_formats = frozenset({"fp8_block", "bf16", "fp16", "float32"})
    default_profile = "nvidia-h100"

    def process_group_backend(self) -> str:
        return "nccl"

    def rank_device(self, local_rank: int):
        """This rank's own GPU (LOCAL_RANK)."""
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)

    def probe(self) -> DeviceInfo:
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                "backend 'cuda' unavailable: torch.cuda.is_available() is False (no NVIDIA GPU, or a CPU-only "
                "torch build); install a CUDA build of torch on a GPU machine, or add --emulate to run this "
                "profile's numerics on the CPU")
        major, minor = torch.cuda.get_device_capability(0)
        return DeviceInfo("cuda", "cuda:0", torch.cuda.get_device_name(0), {"sm": major * 10 + minor})

    def capabilities(self, info: DeviceInfo) -> frozenset[str]:
        sm = info.details["sm"]
        caps = {"fp32", "fp16", "graph_capture"}
        if sm >= 80:
            caps.add("bf16")
        if sm >= 89:                       # Ada and Hopper have FP8 tensor cores; Ampere does not
            caps.add("fp8_gemm")
            # Triton emits e4m3 dots from sm_89 on, and its compiled kernels take CUDA tensors only.
            if importlib.util.find_spec("triton") is not None and info.device.startswith("cuda"):
                caps.add("triton")
            from .cuda_fp8_blockwise import supported

            if supported(sm) and info.device.startswith("cuda"):
                caps.add("scaled_mm_blockwise")
        return frozenset(caps)

    def load_weights(self, reader, weight_format: str, compute_dtype: str, device, int8_linears):
        """Packed per tensor on the host, then copied to the device (runtime.weights.device)."""
        from runtime.weights.device import device_weights

        return device_weights(reader, weight_format, compute_dtype, device, int8_linears)

    def decode_runner(self, model, profile, table):
        """CUDA graphs of the static decode step where the profile asks for them (`graph_mode: cudagraph`)."""
        if profile.graph_mode != "cudagraph":
            return None
        from .cuda_graphs import GraphDecodeRunner

        return GraphDecodeRunner(model, table, cuda=model.device.type == "cuda")
