"""Backends: a device probe, the capabilities it reports, and the op implementations it registers.

`get_backend(name)` returns the backend object; nothing here touches a device or imports a device library
at import time (torch-npu in particular: installed without CANN it breaks `import torch`). Probing happens
in `Backend.probe()`, called once by `Runtime.load`.
"""

from __future__ import annotations

from .base import Backend, BackendUnavailable, DeviceInfo


def get_backend(name: str) -> Backend:
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend()
    if name == "cuda":
        from .cuda import CudaBackend

        return CudaBackend()
    if name == "ascend":
        from .ascend import AscendBackend

        return AscendBackend()
    if name == "onnx":
        from .onnx import OnnxBackend

        return OnnxBackend()
    raise BackendUnavailable(f"unknown backend {name!r}; available: cpu, cuda, ascend, onnx")


__all__ = ["Backend", "BackendUnavailable", "DeviceInfo", "get_backend"]
