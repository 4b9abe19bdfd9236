"""The ONNX backend: the exported step graph (export/onnx.py) run by ONNX Runtime.

Probing imports onnxruntime (an optional extra: `pip install '.[onnx]'`) at load, never at import. The model
runs inside the graphs, so the dispatch table names the graph node each op became: the V4 kernels are
`com.deepseek.v4` custom nodes (run through their function bodies by stock ONNX Runtime, or by a kernel a
runtime registers), the rest standard ONNX ops. Graphs are exported on first use into the cache folder, keyed by
the checkpoint's fingerprint, or read from a folder `python -m export.onnx` wrote.
"""

from __future__ import annotations

from pathlib import Path

from runtime.dispatch import register

from .base import BackendUnavailable, DeviceInfo

NODES = {"sparse_attention": "onnx:com.deepseek.v4::SparseAttention", "indexer_topk": "onnx:com.deepseek.v4::IndexerTopK"}
OPS = ("linear", "group_linear", "rms_norm", "apply_rope", "sparse_attention", "indexer_topk", "compress_pool",
       "moe_gate", "routed_experts", "clamped_swiglu", "hc_pre", "hc_post", "hc_head",
       "decode_block")


def _in_graph(*args, **kw):
    raise RuntimeError("this op runs inside the ONNX graph, not from Python")


for _op in OPS:
    register(_op, NODES.get(_op, "onnx:standard ops"), "onnx")(_in_graph)


# The profile's device family picks the execution providers; the CPU provider stays last, for the nodes the
# accelerator's provider does not take (their placement is reported, see OnnxModel.placement()).
PROVIDERS = {"onnxruntime-cpu": ["CPUExecutionProvider"],
             "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "onnxruntime-cann": ["CANNExecutionProvider", "CPUExecutionProvider"]}
INSTALL = {"CUDAExecutionProvider": "pip install onnxruntime-gpu on a machine with CUDA",
           "CANNExecutionProvider": "pip install onnxruntime-cann (numpy<2) on a machine with CANN"}


class OnnxBackend:
    name = "onnx"
    weight_formats = frozenset({"float32"})
    providers = ["CPUExecutionProvider"]

    def probe(self) -> DeviceInfo:
        try:
            import onnxruntime
        except ModuleNotFoundError:
            raise BackendUnavailable("backend 'onnx' unavailable: onnxruntime is not installed; "
                                     "pip install '.[onnx]'") from None
        return DeviceInfo("onnx", "cpu", f"ONNX Runtime {onnxruntime.__version__} ({', '.join(self.providers)})",
                          {"providers": list(self.providers)})

    def capabilities(self, info: DeviceInfo) -> frozenset[str]:
        return frozenset({"fp32"})

    def build_model(self, checkpoint: Path, profile, progress: bool, threads: int):
        """The ORT model for `checkpoint`: an export folder as is, or a checkpoint exported once into the cache."""
        import onnxruntime

        from runtime.onnx_model import OnnxModel

        if profile.device_family not in PROVIDERS:
            raise BackendUnavailable(f"profile {profile.name}: device_family {profile.device_family!r} names no ONNX "
                                     f"Runtime provider; use one of {', '.join(PROVIDERS)}")
        self.providers = PROVIDERS[profile.device_family]
        missing = [p for p in self.providers if p not in onnxruntime.get_available_providers()]
        if missing:
            raise BackendUnavailable(f"this ONNX Runtime build has no {missing[0]} (it has "
                                     f"{', '.join(onnxruntime.get_available_providers())}); {INSTALL[missing[0]]}")

        # an export folder (its manifest is checked by OnnxModel), or a checkpoint exported once into the cache
        folder = checkpoint if (checkpoint / "export.json").exists() else _cached_export(checkpoint, progress)
        from runtime.config import ModelConfig

        return OnnxModel(folder, ModelConfig.from_file(folder / "config.json"), self.providers, threads)


def _cached_export(checkpoint: Path, progress: bool) -> Path:
    from export.onnx import FORMAT_VERSION, GRAPH_REVISION, export_model
    from runtime.api import build_once, cache_dir
    from runtime.parity.report import checkpoint_fingerprint

    key = f"{checkpoint_fingerprint(checkpoint)[:16]}-v{FORMAT_VERSION}.{GRAPH_REVISION}"
    return build_once(cache_dir() / "onnx" / key, "export.json",
                      lambda tmp: export_model(checkpoint, "cpu", tmp, progress=progress))
