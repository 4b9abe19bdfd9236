"""Backends: a device probe, the capabilities it reports, and the op implementations it registers.

`get_backend(name)` returns the backend object; nothing here touches a device or imports a device library
at import time (torch-npu in particular: installed without CANN it breaks `import torch`). Probing happens
in `Backend.probe()`, called once by `Runtime.load`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from .base import Backend, BackendUnavailable, DeviceInfo

# Backends registered at run time (`use_backend`): an out-of-tree backend, or a test's CPU twin of a device.
_REGISTERED: dict[str, Callable[[], Backend]] = {}


@contextmanager
def use_backend(name: str, factory: Callable[[], Backend]) -> Iterator[None]:
    """Within the block, `get_backend(name)` (hence `Runtime.load` of a profile with that backend) returns
    `factory()`: the registration hook for a backend that is not built in, or a twin standing in for a device."""
    before = _REGISTERED.get(name)
    _REGISTERED[name] = factory
    try:
        yield
    finally:
        if before is None:
            _REGISTERED.pop(name, None)
        else:
            _REGISTERED[name] = before


def get_backend(name: str) -> Backend:
    if name in _REGISTERED:
        return _REGISTERED[name]()
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


__all__ = ["Backend", "BackendUnavailable", "DeviceInfo", "get_backend", "use_backend"]
