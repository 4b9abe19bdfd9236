"""ONNX export of the V4 graph (prefill and decode, custom sparse-attention ops) — not built yet.

The model is written against `runtime.ops`, so export will translate each op to a custom-domain ONNX node
with a body in standard ops; see ../shared/spec/onnx-export.md for the recipe this will follow.
"""
