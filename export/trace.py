"""From a checkpoint to a saved ONNX graph, the steps both exporters share (export/onnx.py: the step graph;
export/edge.py: the edge pair): the checkpoint's float32 values from the weight entry (`checkpoint_values`: the
CPU backend's `load_weights`, as `Runtime.load` would stream them, without building a runtime), tracing a torch
graph module into an ONNX model with the V4 custom nodes (dynamo export, the custom translation table, the nodes'
function bodies attached), and saving it checked, with its weights as external data next to it."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .format import OPSET, ExportError

EXPORTABLE_WEIGHT_FORMATS = ("float32",)


def checkpoint_values(checkpoint, profile="cpu"):
    """(Profile, ModelConfig, name -> float32 tensor) of `checkpoint` under `profile`'s weight format: the graph's
    own copy of the weights, streamed by the CPU backend's weight entry (the exported graph computes in
    float32, so only float32 profiles are exported)."""
    from backends import get_backend
    from runtime.checkpoint import CheckpointReader
    from runtime.profile import load_profile

    prof = load_profile(profile)
    if prof.weight_format not in EXPORTABLE_WEIGHT_FORMATS:
        raise ExportError(f"profile {prof.name} stores weights as {prof.weight_format}; this build exports "
                          f"{', '.join(EXPORTABLE_WEIGHT_FORMATS)} weights only (use --profile cpu)")
    reader = CheckpointReader(checkpoint, progress=False)
    weights = get_backend("cpu").load_weights(reader, prof.weight_format, "float32", "cpu", prof.int8_linears)
    return prof, reader.cfg, weights.values()


def trace_graph(module, args, dynamic_shapes, input_names, output_names, opset: int = OPSET):
    import torch.fx.experimental._config as fx_config

    from . import custom_ops

    # Size-oblivious reasoning keeps the graphs generic in B, S and the capacities (no 0/1 specialisation).
    with fx_config.patch(backed_size_oblivious=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                 custom_translation_table=custom_ops.translation_table(), verbose=False,
                                 input_names=input_names, output_names=output_names)
    return custom_ops.attach_functions(prog.model_proto)


def save_graph(model, out: Path, name: str) -> None:
    import onnx

    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(out / f"{name}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.weights", size_threshold=1024)
