"""ONNX export of the V4 graph and its edge variant.

- custom_ops.py: V4's sparse kernels as torch custom ops that export to `com.deepseek.v4` nodes carrying
  model-local function bodies in standard ONNX ops (one SPEC for schemas and the reference page CUSTOM_OPS.md).
- format.py: the exported format both the exporter and the runner read: versions, state names and shapes,
  the manifest export.json, the external-data check.
- graph.py: the pieces of the model in the form a graph needs (visibility by mask instead of control flow);
  step_graph.py: the `step` graph ONNX Runtime runs (ids from any start position + the state in, logits + state
  out: prefill chunks and decode steps alike); edge_graphs.py: the edge variant's static prefill / decode graphs.
- trace.py: the checkpoint's float32 values from the weight entry, tracing to ONNX, saving with external data.
- onnx.py: `python -m export.onnx` (dynamic-shape graphs for ONNX Runtime, opset 23, float32 or FP8/FP4 storage
  through weight_storage.py); edge.py: `--target ascend-edge` (static, inlined, fp16, opset 15, CANN coverage).
- op_docs.py: the generated reference page of the custom nodes.
backends/onnx_runner.py runs the exported step graph behind the model interface (profiles onnx-cpu / -cuda / -cann).
See ../shared/spec/onnx-export.md for the recipe this follows.
"""
