"""TWINS of devices, registered as backends: a CUDA GPU and an Ascend NPU that compute on the CPU.

THESE ARE TWINS, NOT DEVICES. `CpuHostedCuda` is the CUDA backend whose probe reports an sm_90 GPU while tensors
stay on the CPU, its torch calls going through tests/twins/torch_cuda_twin.py (which asserts CUDA's input
constraints); `CpuHostedAscend` is the Ascend backend probing as an Atlas family, its adapters calling the CPU
semantic twin of torch-npu (tests/twins/torch_npu_twin.py). They prove layouts, parameters and the device path
of `Runtime.load`, never device kernels' numerics or speed.

They enter the product through its registration hooks, not by patching it: `backends.use_backend(name, factory)`
for `Runtime.load`, and `backends.check.add_target` for the op check (`add_check_targets`, also
`python -m backends.check --load tests.twins.backends`). What a twin must swap inside a backend module (the
three torch calls of backends/cuda_ops.py, the torch-npu namespace of backends/ascend_ops.py) it swaps for the
duration of a `with` block (`cuda_calls`, `npu_namespace`) and puts back.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from backends import ascend_ops, cuda_ops, use_backend
from backends.ascend import AscendBackend
from backends.base import DeviceInfo
from backends.cuda import CudaBackend

from . import torch_cuda_twin, torch_npu_twin


class CpuHostedCuda(CudaBackend):
    """TWIN of a CUDA device: CudaBackend whose probe reports an sm_`sm` GPU while computing on the CPU."""

    def __init__(self, sm: int = 90):
        self.sm = sm

    def probe(self) -> DeviceInfo:
        return DeviceInfo("cuda", "cpu", f"CPU-hosted twin of an sm_{self.sm} GPU", {"sm": self.sm})


class CpuHostedAscend(AscendBackend):
    """TWIN of an NPU: the Ascend backend probing as `family` (SoC id `soc`) while computing on the CPU."""

    def __init__(self, family: str = "ascend-a2", soc: int = 223):
        self.family, self.soc = family, soc

    def probe(self) -> DeviceInfo:
        return DeviceInfo("ascend", "cpu", f"CPU-hosted twin of an {self.family} NPU",
                          {"soc": self.soc, "family": self.family})


@contextlib.contextmanager
def _swapped(module, **names) -> Iterator[None]:
    before = {n: getattr(module, n) for n in names}
    for n, v in names.items():
        setattr(module, n, v)
    try:
        yield
    finally:
        for n, v in before.items():
            setattr(module, n, v)


def cuda_calls() -> contextlib.AbstractContextManager:
    """The CUDA backend's torch calls through the twin asserting CUDA's constraints (as they are on a GPU).

    Always swapped, GPU present or not: the tests using it compute on CPU tensors (CpuHostedCuda), where only
    the twin checks CUDA's constraints. On CUDA tensors the twin's assertions still hold (they are CUDA's) and it
    computes with the same torch call, so a GPU test run inside the block loses nothing."""
    return _swapped(cuda_ops, scaled_mm=torch_cuda_twin.scaled_mm, grouped_mm=torch_cuda_twin.grouped_mm,
                    sdpa=torch_cuda_twin.sdpa)


def npu_namespace(npu=torch_npu_twin) -> contextlib.AbstractContextManager:
    """The Ascend adapters' torch-npu namespace: the CPU twin (or a variant of it)."""
    return _swapped(ascend_ops, get_torch_npu=lambda: npu)


@contextlib.contextmanager
def hosted_cuda(sm: int = 90) -> Iterator[None]:
    """`Runtime.load` of a cuda profile runs on the CUDA twin (sm_`sm`), its calls through the call twins."""
    with use_backend("cuda", lambda: CpuHostedCuda(sm)), cuda_calls():
        yield


@contextlib.contextmanager
def hosted_ascend(family: str = "ascend-a2", soc: int = 223, npu=torch_npu_twin) -> Iterator[None]:
    """`Runtime.load` of an ascend profile runs on the NPU twin of `family`, adapters on the torch-npu twin."""
    with use_backend("ascend", lambda: CpuHostedAscend(family, soc)), npu_namespace(npu):
        yield


@contextlib.contextmanager
def _ascend_check_setup() -> Iterator[None]:
    """The torch-npu twin, and a private self-test cache (the twin's outcomes are not an NPU's)."""
    before = os.environ.get("DSV4RT_HOME")
    with tempfile.TemporaryDirectory() as home, npu_namespace():
        os.environ["DSV4RT_HOME"] = home
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("DSV4RT_HOME", None)
            else:
                os.environ["DSV4RT_HOME"] = before


def _twin_target(name: str, backend, profile: str, setup):
    from backends.check import Target

    info = backend.probe()
    return Target(name, info.backend, info.device, backend.capabilities(info), profile, twin=True, setup=setup)


def add_check_targets() -> None:
    """Register the twins with the op check (backends/check.py) as targets `cuda-twin` and `ascend-twin`."""
    from backends.check import add_target

    add_target("cuda-twin", lambda: _twin_target("cuda-twin", CpuHostedCuda(90), "nvidia-h100", cuda_calls))
    add_target("ascend-twin", lambda: _twin_target("ascend-twin", CpuHostedAscend("ascend-a3", 250), "ascend-910c",
                                                   _ascend_check_setup))
