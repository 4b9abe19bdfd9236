"""The Ascend backend (torch-npu on device `npu`): device probe and capabilities by SoC family.

The capabilities here are the chip's facts; runtime.dispatch intersects them with what the profile declares,
so a fused adapter is chosen only where both allow it, and a row that falls back to plain torch names the
adapter it passed over and why (`--show-dispatch`).

torch-npu is imported lazily, here only: installed without CANN it makes even `import torch` fail, so it is an
optional extra (`pip install '.[ascend]'`) and never part of the default or CI install. The op adapters are in
ascend_ops.py (tested against CPU twins of torch-npu; never run on an NPU); `--emulate` runs an Ascend profile's
numerics on the CPU reference.
"""

from __future__ import annotations

from . import ascend_ops  # noqa: F401  (registers the adapters; does not import torch-npu)
from .base import Backend, BackendUnavailable, DeviceInfo

INSTALL_HINT = ("pip install '.[ascend]' (torch-npu matching your torch) on a machine with CANN >= 9.1.0, "
                "then `source /usr/local/Ascend/cann/set_env.sh`; or add --emulate to run this profile's "
                "numerics on the CPU")

# SoC ids reported by torch_npu.npu.get_soc_version() (vllm-ascend's table, spec ascend.md §1.2).
SOC_FAMILIES = [(range(220, 226), "ascend-a2"), (range(250, 256), "ascend-a3"), (range(200, 206), "ascend-310p"),
                (range(260, 261), "ascend-950")]


_A2_A3 = frozenset({"fp32", "fp16", "bf16", "int8_w8a8", "graph_capture", "fused_sparse_attention", "fused_indexer",
                    "fused_moe_gating", "fused_rope_interleave", "fused_clipped_swiglu"})
# Interleaved npu_rotary_mul and npu_clipped_swiglu are documented for Atlas A2/A3 only (not 310P, not 950);
# 310P has no bf16 and none of the DeepSeek fused ops; the compressor kernel is A3/950 (not A2); mHC is 950.
FAMILY_CAPABILITIES = {
    "ascend-a2": _A2_A3,
    "ascend-a3": _A2_A3 | {"fused_compressor"},
    "ascend-950": frozenset({"fp32", "fp16", "bf16", "int8_w8a8", "graph_capture", "fp8_gemm", "mxfp4",
                             "fused_sparse_attention", "fused_indexer", "fused_moe_gating", "fused_compressor",
                             "fused_mhc"}),
    "ascend-310p": frozenset({"fp32", "fp16"}),
}


class AscendBackend(Backend):
    name = "ascend"
    # No FP8 GEMM adapter yet (Ascend 950): fp8_block profiles are refused at load instead of running slowly.
    weight_formats = frozenset({"w8a8_int8", "bf16", "fp16", "float32"})
    default_profile = "ascend-910b"

    def process_group_backend(self) -> str:
        import torch_npu  # noqa: F401  (registers the hccl backend)

        return "hccl"

    def rank_device(self, local_rank: int):
        """This rank's own NPU (LOCAL_RANK)."""
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)

        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)

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
        """What the chip family can run (spec ascend.md §2-3, the torch-npu 2.14 docs' product lists); dispatch
        intersects this with what the profile declares, so a fused adapter runs only where both allow it."""
        return FAMILY_CAPABILITIES.get(info.details["family"], frozenset({"fp32", "fp16"}))

    def load_weights(self, reader, weight_format: str, compute_dtype: str, device, int8_linears):
        """Packed per tensor on the host, then copied to the device (runtime.weights.device)."""
        from runtime.weights.device import device_weights

        return device_weights(reader, weight_format, compute_dtype, device, int8_linears)
