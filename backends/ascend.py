"""The Ascend backend (torch-npu on device `npu`): device probe and capabilities by SoC family.

torch-npu is imported lazily, here only: installed without CANN it makes even `import torch` fail, so it is an
optional extra (`pip install '.[ascend]'`) and never part of the default or CI install. The op adapters are in
ascend_ops.py (tested against CPU twins of torch-npu; never run on an NPU); `--emulate` runs an Ascend profile's
numerics on the CPU reference.
"""

from __future__ import annotations

from . import ascend_ops  # noqa: F401  (registers the adapters; does not import torch-npu)
from .base import BackendUnavailable, DeviceInfo

INSTALL_HINT = ("pip install '.[ascend]' (torch-npu matching your torch) on a machine with CANN >= 9.1.0, "
                "then `source /usr/local/Ascend/cann/set_env.sh`; or add --emulate to run this profile's "
                "numerics on the CPU")

# SoC ids reported by torch_npu.npu.get_soc_version() (vllm-ascend's table, spec ascend.md §1.2).
SOC_FAMILIES = [(range(220, 226), "ascend-a2"), (range(250, 256), "ascend-a3"), (range(200, 206), "ascend-310p"),
                (range(260, 261), "ascend-950")]


class AscendBackend:
    name = "ascend"
    # No FP8 GEMM adapter yet (Ascend 950): fp8_block profiles are refused at load instead of running slowly.
    weight_formats = frozenset({"w8a8_int8", "bf16", "fp16", "float32"})

    def probe(self) -> DeviceInfo:
        try:
            import torch_npu  # noqa: F401  (registers the npu device)
        except ModuleNotFoundError:
            raise BackendUnavailable(f"backend 'ascend' unavailable: torch-npu is not installed; {INSTALL_HINT}") from None
        except (ImportError, RuntimeError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BackendUnavailable(f"backend 'ascend' unavailable: torch-npu cannot load CANN ({first}); "
                                     f"{INSTALL_HINT}") from None
        import torch

        if not torch.npu.is_available():
            raise BackendUnavailable("backend 'ascend' unavailable: torch-npu loaded but no NPU device is visible "
                                     "(check npu-smi info and ASCEND_RT_VISIBLE_DEVICES)")
        soc = int(torch_npu.npu.get_soc_version())
        family = next((f for r, f in SOC_FAMILIES if soc in r), f"ascend-soc{soc}")
        return DeviceInfo("ascend", "npu:0", torch.npu.get_device_name(0), {"soc": soc, "family": family})

    def capabilities(self, info: DeviceInfo) -> frozenset[str]:
        family = info.details["family"]
        caps = {"fp32", "fp16"}
        if family != "ascend-310p":
            caps |= {"bf16", "int8_w8a8", "graph_capture"}
        if family == "ascend-950":
            caps |= {"fp8_gemm", "mxfp4"}
        return frozenset(caps)

    def load_weights(self, reader, weight_format: str, compute_dtype: str, device, int8_linears):
        """Packed per tensor on the host, then copied to the device (runtime.weights.device)."""
        from runtime.weights.device import device_weights

        return device_weights(reader, weight_format, compute_dtype, device, int8_linears)
