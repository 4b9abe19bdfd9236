"""ONNX export of the V4 graph (issue 5, in progress).

Built: `custom_ops.py` — V4's sparse kernels as torch custom ops (`dsv4::sparse_attention`,
`dsv4::indexer_topk`, eager = our reference ops) that export to `com.deepseek.v4::SparseAttention` /
`::IndexerTopK` nodes carrying model-local function bodies in standard ONNX ops (opset 23): stock ONNX Runtime
runs them (equal to the reference, identical top-k sets), and a runtime with a registered kernel for a node
uses the kernel instead (tests/test_onnx_custom_ops.py).

Not built yet: the prefill / decode graphs of the whole model. The model code keeps per-sequence state in
Python objects and positions as Python ints (right for ragged batches on the CPU reference, but a traced graph
would specialise on them); a decode graph needs the position as a tensor and fixed-capacity state buffers
(window ring, compressed entries, compressor buffers) with visibility by mask. See ../shared/spec/onnx-export.md
for the recipe.
"""
