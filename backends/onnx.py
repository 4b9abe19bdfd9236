"""The ONNX backend: the exported step graph (export/onnx.py) run by ONNX Runtime (backends/onnx_runner.py).

Probing imports onnxruntime (an optional extra: `pip install '.[onnx]'`) at load, never at import. The model
runs inside the graphs, so the dispatch table names the graph node each op became: the V4 kernels are
`com.deepseek.v4` custom nodes (run through their function bodies by stock ONNX Runtime, or by a kernel a
runtime registers), the rest standard ONNX ops. Graphs are exported on first use into the cache folder, keyed by
the checkpoint's fingerprint, or read from a folder `python -m export.onnx` wrote.
"""

from __future__ import annotations

from pathlib import Path

from runtime.dispatch import impl
from runtime.ops.specs import SPECS

from .base import Backend, BackendUnavailable, DeviceInfo


def _in_graph(*args, **kw):
    raise RuntimeError("this op runs inside the ONNX graph, not from Python")


# Every table op runs inside the graph: its row names the node the op's spec says it exports to.
for _spec in SPECS:
    if not _spec.is_numerics:
        impl(_spec.name, f"onnx:{_spec.onnx or 'standard ops'}", "onnx", _in_graph)


# The profile's device family picks the execution providers; the CPU provider stays last, for the nodes the
# accelerator's provider does not take (their placement is reported, see OnnxModel.placement()).
PROVIDERS = {"onnxruntime-cpu": ["CPUExecutionProvider"],
             "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "onnxruntime-cann": ["CANNExecutionProvider", "CPUExecutionProvider"]}
INSTALL = {"CUDAExecutionProvider": "pip install onnxruntime-gpu on a machine with CUDA",
           "CANNExecutionProvider": "pip install onnxruntime-cann (numpy<2) on a machine with CANN"}


class OnnxBackend(Backend):
    name = "onnx"
    weight_formats = frozenset({"float32"})
    default_profile = "onnx-cpu"
    prefill_chunk = 256     # tokens per step-graph call (measured 256 best of 128-2048 on the tiny model, one thread)
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

    def build_model(self, checkpoint: Path, profile, progress: bool, threads: int, chunk: int):
        """The ORT model for `checkpoint`: an export folder as is, or a checkpoint exported once into the cache."""
        import onnxruntime

        from .onnx_runner import OnnxModel

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

        return OnnxModel(folder, ModelConfig.from_file(folder / "config.json"), self.providers, threads, chunk)

    def placement(self, model) -> list[str]:
        """Where ONNX Runtime put each graph's nodes (one profiled run): the CPU provider's share is the fallback."""
        return [f"{graph} graph nodes by provider: " + ", ".join(f"{p} {n}" for p, n in counts.items())
                for graph, counts in model.placement().items()]


def _cached_export(checkpoint: Path, progress: bool) -> Path:
    from export.format import FORMAT_VERSION, GRAPH_REVISION
    from export.onnx import export_model
    from runtime.cache import build_once, cache_dir
    from runtime.checkpoint.fingerprint import checkpoint_fingerprint

    key = f"{checkpoint_fingerprint(checkpoint)[:16]}-v{FORMAT_VERSION}.{GRAPH_REVISION}"
    return build_once(cache_dir() / "onnx" / key, "export.json",
                      lambda tmp: export_model(checkpoint, "cpu", tmp, progress=progress))
