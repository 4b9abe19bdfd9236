"""V4's sparse kernels as custom ops on both sides of the export: torch custom ops (eager = our reference ops)
and `com.deepseek.v4` ONNX nodes that carry a model-local function body written in standard ONNX ops.

- `com.deepseek.v4::SparseAttention(q [B,T,H,D], kv [B,N,D], idx [B,T,K] int64, sink [H]; scale) -> [B,T,H,D]`:
  each query attends to the kv rows of its own sequence that its index list names (-1 = padding, anywhere in
  the row), K = V (one shared head), with a per-head sink logit in the softmax denominator (spec §10).
- `com.deepseek.v4::IndexerTopK(q [B,T,h,d], w [B,T,h], keys [B,N,d], visible [B,T] int64; topk)
  -> [B,T,min(topk,N)]`: score[t,n] = sum_h w[t,h] relu(q[t,h] . keys[n]) over the first visible[t] entries;
  best first, ties to the lower index (ONNX TopK's rule, and our reference's stable sort), -1 where fewer are
  visible (spec §9).

Stock ONNX Runtime runs the function bodies; a runtime or edge compiler with a fused kernel registered for the
node uses that instead (tested with an onnxruntime-extensions kernel). The bodies are written at the model's
opset (23): the checker rejects a function whose default-domain opset differs from the model's.
Import this module only when exporting: it needs onnx and onnxscript (`pip install '.[onnx]'`).
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset23 as op

from runtime.ops import attention

DOMAIN, OPSET = "com.deepseek.v4", 23
MIN_BODY_OPSET = 16          # the oldest opset whose versions of the bodies' ops (Where-16, GreaterOrEqual-16) fit
V4 = onnxscript.values.Opset(DOMAIN, 1)


# ----------------------------------------------------------------------------- torch side: eager = reference
@torch.library.custom_op("dsv4::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    return torch.stack([attention.sparse_attention(q[b], kv[b], idx[b], sink, scale) for b in range(q.shape[0])])


@sparse_attention.register_fake
def _(q, kv, idx, sink, scale):
    return torch.empty_like(q)


@torch.library.custom_op("dsv4::indexer_topk", mutates_args=())
def indexer_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
                 topk: int) -> torch.Tensor:
    k = min(topk, keys.shape[1])
    return torch.stack([attention.indexer_topk(q[b], w[b], keys[b], visible[b], k) for b in range(q.shape[0])])


@indexer_topk.register_fake
def _(q, w, keys, visible, topk):
    return q.new_empty((q.shape[0], q.shape[1], torch.sym_min(topk, keys.shape[1])), dtype=torch.int64)


# ----------------------------------------------------------------------------- ONNX side: function bodies
@onnxscript.script(V4, default_opset=op)
def SparseAttention(q: FLOAT, kv: FLOAT, idx: INT64, sink: FLOAT, scale: float) -> FLOAT:
    zero = op.Constant(value_int=0)
    B, N, D = op.Shape(kv, start=0, end=1), op.Shape(kv, start=1, end=2), op.Shape(kv, start=2, end=3)
    base = op.Mul(op.Range(op.Constant(value_int=0), op.Squeeze(B, [0]), op.Constant(value_int=1)),
                  op.Squeeze(N, [0]))                                                 # row offset of each sequence
    flat = op.Add(op.Max(idx, zero), op.Unsqueeze(base, [1, 2]))                      # [B, T, K] into [B*N]
    rows = op.Gather(op.Reshape(kv, op.Concat(op.Constant(value_ints=[-1]), D, axis=0)), flat, axis=0)
    s = op.MatMul(q, op.Transpose(rows, perm=[0, 1, 3, 2]))                           # [B, T, H, K]
    s = op.Mul(s, op.CastLike(op.Constant(value_float=scale), s))      # CastLike: float32 or float16 graphs
    # padding as an additive -inf bias built at [B, T, 1, K]: a Where broadcast over the heads is ~2.5x slower
    pad = op.Unsqueeze(op.Less(idx, zero), [2])                                       # [B, T, 1, K]
    s = op.Add(s, op.Where(pad, op.CastLike(op.Constant(value_float=float("-inf")), s),
                           op.CastLike(op.Constant(value_float=0.0), s)))
    sinks = op.Expand(op.Reshape(sink, op.Constant(value_ints=[1, 1, -1, 1])),
                      op.Concat(op.Shape(s, start=0, end=3), op.Constant(value_ints=[1]), axis=0))  # [B,T,H,1]
    p = op.Softmax(op.Concat(s, sinks, axis=-1), axis=-1)                             # sink in the denominator
    K = op.Shape(idx, start=2, end=3)
    p = op.Slice(p, op.Constant(value_ints=[0]), K, op.Constant(value_ints=[-1]))     # drop the sink's share
    return op.MatMul(p, rows)                                                         # [B, T, H, D]


@onnxscript.script(V4, default_opset=op)
def IndexerTopKRows(q: FLOAT, w: FLOAT, kt: FLOAT, visible: INT64, lo: INT64, hi: INT64, topk: int) -> INT64:
    """IndexerTopK for queries [lo, hi) of the T axis (kt = keys as [B, 1, d, N]; an empty range is fine)."""
    ax = op.Constant(value_ints=[1])
    q, w, visible = op.Slice(q, lo, hi, ax), op.Slice(w, lo, hi, ax), op.Slice(visible, lo, hi, ax)
    s = op.Relu(op.MatMul(q, kt))                                                     # [B, t, h, N]
    s = op.Squeeze(op.MatMul(op.Unsqueeze(w, [2]), s), [2])                           # [B, t, 1, h] @ -> [B, t, N]
    N = op.Shape(kt, start=3, end=4)
    n = op.Range(op.Constant(value_int=0), op.Squeeze(N, [0]), op.Constant(value_int=1))
    hidden = op.GreaterOrEqual(n, op.Unsqueeze(visible, [2]))                         # [B, t, N]
    s = op.Where(hidden, op.CastLike(op.Constant(value_float=float("-inf")), s), s)
    k = op.Min(op.Reshape(op.Constant(value_int=topk), op.Constant(value_ints=[1])), N)
    vals, ids = op.TopK(s, k, axis=-1)
    # IsInf takes float16 only from opset 20: test a float32 copy so the body also runs in low-opset fp16 graphs
    return op.Where(op.IsInf(op.Cast(vals, to=1), detect_positive=0), op.Constant(value_int=-1), ids)


@onnxscript.script(V4, default_opset=op)
def IndexerTopK(q: FLOAT, w: FLOAT, keys: FLOAT, visible: INT64, topk: int) -> INT64:
    # The queries in 8 slices: a 256-token chunk's [T, h, N] scores at once are 256 MB at 64K tokens (tiny model),
    # which ONNX Runtime scores 2x slower than in eighths (93 vs 46 ms; quarters: 60); an empty slice (decode
    # has 7) costs its ~30 nodes' overhead, ~0.01 ms.
    kt = op.Unsqueeze(op.Transpose(keys, perm=[0, 2, 1]), [1])                        # [B, 1, d, N]
    step = op.Div(op.Add(op.Shape(q, start=1, end=2), op.Constant(value_ints=[7])), op.Constant(value_ints=[8]))
    b1 = step
    b2 = op.Add(b1, step)
    b3 = op.Add(b2, step)
    b4 = op.Add(b3, step)
    b5 = op.Add(b4, step)
    b6 = op.Add(b5, step)
    b7 = op.Add(b6, step)
    b8 = op.Add(b7, step)
    return op.Concat(IndexerTopKRows(q, w, kt, visible, op.Constant(value_ints=[0]), b1, topk=topk),
                     IndexerTopKRows(q, w, kt, visible, b1, b2, topk=topk),
                     IndexerTopKRows(q, w, kt, visible, b2, b3, topk=topk),
                     IndexerTopKRows(q, w, kt, visible, b3, b4, topk=topk),
                     IndexerTopKRows(q, w, kt, visible, b4, b5, topk=topk),
                     IndexerTopKRows(q, w, kt, visible, b5, b6, topk=topk),
                     IndexerTopKRows(q, w, kt, visible, b6, b7, topk=topk),
                     IndexerTopKRows(q, w, kt, visible, b7, b8, topk=topk), axis=1)


FUNCTIONS = (SparseAttention, IndexerTopKRows, IndexerTopK)       # helpers before their callers


# The contract of each custom node: the one source for the schemas registered at export time and for the
# generated reference page (export/CUSTOM_OPS.md, `python -m export.op_docs`).
SPEC = {
    "SparseAttention": {
        "inputs": [("q", "float", "[B, T, H, D]", "queries (RoPE applied)"),
                   ("kv", "float", "[B, N, D]", "each sequence's KV rows; K = V (one shared head)"),
                   ("idx", "int64", "[B, T, K]", "rows of kv each query attends to; -1 = padding, anywhere"),
                   ("sink", "float", "[H]", "per-head sink logit")],
        "outputs": [("out", "float", "[B, T, H, D]", "attention output")],
        "attributes": [("scale", "float", "softmax scale (D^-0.5)")],
        "semantics": "s_j = scale * q . kv[idx_j] for valid j; p_j = exp(s_j) / (sum_j exp(s_j) + exp(sink_h)); "
                     "out = sum_j p_j kv[idx_j]. The sink takes part in the denominator only. Padding entries "
                     "contribute nothing; their position in the row does not matter.",
    },
    "IndexerTopK": {
        "inputs": [("q", "float", "[B, T, h, d]", "lightning-indexer queries"),
                   ("w", "float", "[B, T, h]", "per-head weights (scaling applied)"),
                   ("keys", "float", "[B, N, d]", "indexer-compressed keys of each sequence"),
                   ("visible", "int64", "[B, T]", "how many leading entries each query may see")],
        "outputs": [("ids", "int64", "[B, T, min(topk, N)]", "selected entries, best first, -1 where none")],
        "attributes": [("topk", "int", "how many entries to keep")],
        "semantics": "score[t, n] = sum_h w[t, h] * relu(q[t, h] . keys[n]) for n < visible[t]; the top "
                     "min(topk, N) by score, ties to the lower index (ONNX TopK's rule); -1 for slots beyond "
                     "the visible entries.",
    },
}
_ONNX_TYPES = {"float": "T", "int64": "tensor(int64)"}
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]


def _rank(shape: str) -> int:
    """Top-level dimensions of a shape string such as "[B, T, min(topk, N)]" (3)."""
    depth, n = 0, 1
    for ch in shape.strip("[]"):
        depth += (ch == "(") - (ch == ")")
        n += ch == "," and depth == 0
    return n


def _register_schemas() -> None:
    """onnxscript emits a custom node only for an op with a registered schema; the inference functions
    give the exporter output types and ranks (registration is per process and only needed to export)."""
    FP, Attr = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    kinds = {"float": onnx.defs.OpSchema.AttrType.FLOAT, "int": onnx.defs.OpSchema.AttrType.INT}
    for name, spec in SPEC.items():
        if onnx.defs.has(name, DOMAIN):
            continue
        schema = onnx.defs.OpSchema(name, DOMAIN, 1,
                                    inputs=[FP(n, _ONNX_TYPES[t]) for n, t, _, _ in spec["inputs"]],
                                    outputs=[FP(n, _ONNX_TYPES[t]) for n, t, _, _ in spec["outputs"]],
                                    type_constraints=[("T", _FLOAT_TYPES, "float32 or float16 graphs")],
                                    attributes=[Attr(n, kinds[t]) for n, t, _ in spec["attributes"]])
        _, out_type, shape, _ = spec["outputs"][0]
        rank = _rank(shape)

        def infer(ctx, out_type=out_type, rank=rank):
            t = onnx.TypeProto()
            t.tensor_type.elem_type = (ctx.get_input_type(0).tensor_type.elem_type if out_type == "float"
                                       else onnx.TensorProto.INT64)
            for _ in range(rank):                                  # ranks known, sizes left to the graph
                t.tensor_type.shape.dim.add()
            ctx.set_output_type(0, t)

        schema.set_type_and_shape_inference_function(infer)
        onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: our torch custom ops -> bare com.deepseek.v4 nodes."""
    _register_schemas()

    def sparse_attention_onnx(q, kv, idx, sink, scale: float):
        return V4.SparseAttention(q, kv, idx, sink, scale=scale)

    def indexer_topk_onnx(q, w, keys, visible, topk: int):
        return V4.IndexerTopK(q, w, keys, visible, topk=topk)

    return {torch.ops.dsv4.sparse_attention.default: sparse_attention_onnx,
            torch.ops.dsv4.indexer_topk.default: indexer_topk_onnx}


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the model-local function bodies of every com.deepseek.v4 node the model uses (after export: the
    exporter would inline functions it was given)."""
    protos = {f.name: f.to_function_proto() for f in FUNCTIONS}
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    for name in used & protos.keys():          # and the functions those bodies call (IndexerTopK -> ...Rows)
        used |= {n.op_type for n in protos[name].node if n.domain == DOMAIN}
    have = {f.name for f in model.functions}
    base = next(o.version for o in model.opset_import if o.domain == "")
    if base < MIN_BODY_OPSET:
        raise ValueError(f"the function bodies need default-domain opset >= {MIN_BODY_OPSET}, the model has {base}")
    for f in FUNCTIONS:
        if f.name in used and f.name not in have:
            proto = protos[f.name]
            for o in proto.opset_import:          # the body's ops mean the same from MIN_BODY_OPSET to OPSET
                if o.domain == "":
                    o.version = base
            model.functions.append(proto)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model
