"""The edge variant for Ascend ATC / the CANN graph engine: static shapes, standard ONNX ops only, low opset.

`export_edge(checkpoint, out, batch, seq, capacity, opset)` writes `prefill_edge.onnx` (ids [batch, seq]) and
`decode_edge.onnx` (batch sequences, compressed caches sized for `capacity` tokens), float32, with the custom
nodes' function bodies inlined (no custom domain left), converted down to `opset` (ATC takes ai.onnx 11-15; the
onnx version converter reaches 15 from what the exporter writes, not 13: it has no Pow adapter below 15), and
`cann_coverage.json`: per graph, which nodes the ONNX Runtime CANN EP's graph mode takes (its op list and rules,
onnxruntime `core/providers/cann/cann_graph.cc` `SupportONNXModel`) and which fall back to the CPU.
fp16 (default; the 310P has no bf16): the graph is traced with fp16 weights, activations and state (RoPE angles
in fp32, then cast), so every tensor in it is fp16 but the int64 ids / positions / indices.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .format import ExportError, index_tap_names, state_names, state_shapes
from .trace import checkpoint_values, save_graph, trace_graph

# ONNX Runtime's CANN EP graph mode: default-domain nodes of these types, opset >= 8, not all-constant inputs.
CANN_GRAPH_OPS = frozenset("""Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BitShift Cast Ceil Celu Clip Compress Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
Det Div Dropout Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual Hardmax HardSigmoid HardSwish Identity InstanceNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization LpPool LRN LSTM MatMul Max MaxPool MaxRoiPool MaxUnpool
Mean MeanVarianceNormalization Min Mod Mul Multinomial Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow PRelu
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax SoftmaxCrossEntropyLoss
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh TfIdfVectorizer ThresholdedRelu Tile TopK Transpose
Unsqueeze Where Xor""".split())
EXPORT_OPSET = 18                     # below 23: no RMSNormalization (no down-converter); bodies valid from 16


def _lower(model, opset: int):
    """Inline the custom nodes' bodies, drop the custom domain, convert the default domain down to `opset`."""
    import onnx
    import onnx.inliner
    import onnx.version_converter

    model = onnx.inliner.inline_local_functions(model)
    keep = [o for o in model.opset_import if o.domain == ""]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    del model.functions[:]
    for node in model.graph.node:        # ReduceX-18's default attribute survives conversion and breaks 17
        if node.op_type.startswith("Reduce"):
            attrs = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(attrs)
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as e:                # the converter raises bare C++ assertion errors
        raise ExportError(f"cannot convert the graph to opset {opset} ({str(e).splitlines()[-1][:120]}); "
                          "choose --opset 15 or higher") from None


def cann_coverage(model) -> dict:
    """Which nodes the CANN EP's graph mode would take (a static check, no NPU involved)."""
    inits = {i.name for i in model.graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain == "")
    taken, left = Counter(), Counter()
    for n in model.graph.node:
        ok = n.domain == "" and opset >= 8 and n.op_type in CANN_GRAPH_OPS and not all(i in inits for i in n.input)
        (taken if ok else left)[n.op_type] += 1
    return {"nodes": sum(taken.values()) + sum(left.values()), "cann": sum(taken.values()),
            "cpu": sum(left.values()), "cpu_ops": dict(sorted(left.items())), "cann_ops": dict(sorted(taken.items()))}


def export_edge(checkpoint, out, batch: int = 1, seq: int = 128, capacity: int = 1024, opset: int = 15,
                progress: bool = True, dtype: str = "float16") -> Path:
    from .edge_graphs import Decode, Prefill

    if not 11 <= opset <= EXPORT_OPSET:
        raise ExportError(f"--opset {opset}: the edge variant targets opsets 11-{EXPORT_OPSET} (ATC takes 11-15)")
    if dtype not in ("float16", "float32"):
        raise ExportError(f"edge dtype {dtype!r}: choose float16 (310P, ATC) or float32")
    if batch < 1 or seq < 2 or capacity < seq + 1:
        raise ExportError("edge shapes need --batch >= 1, --seq >= 2 and --capacity > --seq")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    _, cfg, values = checkpoint_values(checkpoint, "cpu")
    names = state_names(cfg)
    low = torch.float16 if dtype == "float16" else torch.float32
    # the whole graph computes in `dtype`: weights, activations and state (RoPE angles in float32, then cast)
    tensors = {n: t.to(low) if t.is_floating_point() else t for n, t in values.items()}
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(2, min(cfg.vocab_size, 258), (batch, seq))
    prefill = trace_graph(Prefill(cfg, tensors).eval(), (ids,), None, ["ids"],
                      ["logits", *names, *index_tap_names(cfg)], EXPORT_OPSET)
    shapes = state_shapes(cfg, batch, capacity)
    decode = trace_graph(Decode(cfg, tensors).eval(), (ids[:, :1], torch.full((batch,), seq),
                                                    *[torch.zeros(shapes[n], dtype=low) for n in names]),
                     None, ["ids", "pos", *names], ["logits", *[f"{n}.out" for n in names]], EXPORT_OPSET)
    report = {"opset": opset, "dtype": dtype, "batch": batch, "seq": seq, "capacity": capacity, "graphs": {}}
    for name, model in (("prefill_edge", prefill), ("decode_edge", decode)):
        low = _lower(model, opset)
        save_graph(low, out, name)
        report["graphs"][name] = cann_coverage(low)
        if progress:
            c = report["graphs"][name]
            print(f"{name}.onnx: opset {opset}, {c['nodes']} nodes, CANN graph mode would take {c['cann']}, "
                  f"CPU {c['cpu']} ({', '.join(c['cpu_ops'])})")
    (out / "cann_coverage.json").write_text(json.dumps(report, indent=1))
    return out
