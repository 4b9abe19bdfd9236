"""Backends: one registry of backend names, each backend a small object behind `backends.base.Backend`.

`get_backend(name)` imports the backend's module on first use and returns its object; `names()` is the one list
of backend names (the CLI's `--backend` choices, the profile schema's `backend:` values). Nothing here touches a
device or imports a device library at import time (torch-npu in particular: installed without CANN it breaks
`import torch`); probing happens in `Backend.probe()`, called once by `Runtime.load`.

A backend outside this package (a plugin, a test's twin) joins with `register("name", "module:Class")` or
`register("name", factory)`.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Callable, Iterator

from .base import Backend, BackendUnavailable, DeviceInfo

# name -> "module:Class" (imported lazily) or a factory returning the backend object
_REGISTRY: dict[str, "str | Callable[[], Backend]"] = {
    "cpu": "backends.cpu:CpuBackend",
    "cuda": "backends.cuda:CudaBackend",
    "ascend": "backends.ascend:AscendBackend",
    "onnx": "backends.onnx:OnnxBackend",
}


def names() -> tuple[str, ...]:
    """Every registered backend name, in registration order."""
    return tuple(_REGISTRY)


def register(name: str, entry: "str | Callable[[], Backend]") -> None:
    """Add (or replace) the backend `name`: a "module:Class" path imported on first use, or a factory."""
    _REGISTRY[name] = entry


_MISSING = object()


@contextmanager
def use_backend(name: str, entry: "str | Callable[[], Backend]") -> Iterator[None]:
    """Within the block, `get_backend(name)` (hence `Runtime.load` of a profile with that backend) uses
    `entry`: a scoped `register`, for a backend that is not built in or a twin standing in for a device."""
    before = _REGISTRY.get(name, _MISSING)
    _REGISTRY[name] = entry
    try:
        yield
    finally:
        if before is _MISSING:
            _REGISTRY.pop(name, None)
        else:
            _REGISTRY[name] = before


def get_backend(name: str) -> Backend:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise BackendUnavailable(f"unknown backend {name!r}; available: {', '.join(_REGISTRY)}")
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = getattr(importlib.import_module(module), cls)
    return entry()


__all__ = ["Backend", "BackendUnavailable", "DeviceInfo", "get_backend", "names", "register", "use_backend"]
