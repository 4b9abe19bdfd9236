"""The custom-domain ONNX nodes for V4's sparse kernels (export/custom_ops.py): exported from torch custom ops,
run by stock ONNX Runtime through their function bodies, equal to our float32 reference ops; and a runtime
that has a kernel for a node uses the kernel instead of the body."""

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_extensions as ext
import pytest
import torch

import export.custom_ops as co

G = torch.Generator().manual_seed(0)


class Core(torch.nn.Module):
    """The two kernels as one CSA layer uses them: select entries, then attend to the gathered rows."""

    def forward(self, q, kv, idx, sink, iq, iw, keys, visible):
        sel = torch.ops.dsv4.indexer_topk(iq, iw, keys, visible, 16)
        return torch.ops.dsv4.sparse_attention(q, kv, idx, sink, 0.125), sel


def _args(T, N, K, Nc, B=2, H=8, D=64, h=4, d=32):
    idx = torch.randint(0, N, (B, T, K), generator=G)
    idx[torch.rand(B, T, K, generator=G) < 0.3] = -1                  # padding anywhere in a row
    return (torch.randn(B, T, H, D, generator=G), torch.randn(B, N, D, generator=G), idx,
            torch.randn(H, generator=G), torch.randn(B, T, h, d, generator=G), torch.randn(B, T, h, generator=G),
            torch.randn(B, Nc, d, generator=G), torch.randint(0, Nc + 1, (B, T), generator=G))


@pytest.fixture(scope="module")
def exported():
    B, T, N, K, Nc = (torch.export.Dim(n) for n in ("B", "T", "N", "K", "Nc"))
    dyn = {"q": {0: B, 1: T}, "kv": {0: B, 1: N}, "idx": {0: B, 1: T, 2: K}, "sink": None, "iq": {0: B, 1: T},
           "iw": {0: B, 1: T}, "keys": {0: B, 1: Nc}, "visible": {0: B, 1: T}}
    prog = torch.onnx.export(Core(), _args(37, 90, 20, 23), dynamo=True, opset_version=co.OPSET, dynamic_shapes=dyn,
                             custom_translation_table=co.translation_table(), verbose=False)
    return co.attach_functions(prog.model_proto)


def _run(model, args, so=None):
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: a.numpy() for i, a in zip(s.get_inputs(), args)})


def test_graph_has_custom_nodes_with_bodies_and_passes_the_checker(exported):
    assert [(n.domain, n.op_type) for n in exported.graph.node] == [(co.DOMAIN, "IndexerTopK"),
                                                                     (co.DOMAIN, "SparseAttention")]
    # every body, and the helper IndexerTopK's body calls on each eighth of its queries
    assert {f.name for f in exported.functions} == {"IndexerTopK", "IndexerTopKRows", "SparseAttention"}
    assert {(o.domain, o.version) for o in exported.opset_import} == {("", 23), (co.DOMAIN, 1)}
    onnx.checker.check_model(exported, full_check=True)


# T = 37, 3, 6: IndexerTopK's eighths of the queries uneven, the last ones empty; T = 1: seven empty ones
@pytest.mark.parametrize("B,T,N,K,Nc", [(2, 37, 90, 20, 23), (1, 1, 5, 3, 1), (3, 130, 300, 40, 70),
                                        (2, 4, 9, 2, 40), (2, 3, 9, 2, 12), (1, 6, 9, 2, 30)])
def test_stock_ort_runs_the_bodies_like_the_reference(exported, B, T, N, K, Nc):
    args = _args(T, N, K, Nc, B)
    out, sel = _run(exported, args)
    ref_out, ref_sel = Core()(*args)
    assert np.abs(out - ref_out.numpy()).max() <= 1e-5 * max(1.0, float(ref_out.abs().max()))
    assert sel.shape == (B, T, min(16, Nc)) and np.array_equal(sel, ref_sel.numpy())   # identical top-k sets


def test_a_registered_kernel_replaces_the_body(exported):
    calls = []

    @ext.onnx_op(op_type="SparseAttention",
                 inputs=[ext.PyCustomOpDef.dt_float] * 2 + [ext.PyCustomOpDef.dt_int64, ext.PyCustomOpDef.dt_float],
                 outputs=[ext.PyCustomOpDef.dt_float], attrs={"scale": ext.PyCustomOpDef.dt_float})
    def _kernel(q, kv, idx, sink, scale):
        calls.append(q.shape)
        assert q.ndim == 4 and idx.dtype == np.int64
        return -torch.ops.dsv4.sparse_attention(*map(torch.from_numpy, (q, kv, idx, sink)), scale).numpy()

    # PyOps live in the domain ai.onnx.contrib: move the node and its body there (nothing else changes)
    m = onnx.ModelProto()
    m.CopyFrom(exported)
    for n in m.graph.node:
        if n.op_type == "SparseAttention":
            n.domain = "ai.onnx.contrib"
    for f in m.functions:
        if f.name == "SparseAttention":
            f.domain = "ai.onnx.contrib"
    m.opset_import.append(onnx.helper.make_opsetid("ai.onnx.contrib", 1))
    args = _args(37, 90, 20, 23)
    ref = Core()(*args)[0].numpy()
    body, _ = _run(m, args)                                        # no kernel library: the body runs
    assert np.abs(body - ref).max() < 1e-5 and not calls
    so = ort.SessionOptions()
    so.register_custom_ops_library(ext.get_library_path())
    kern, _ = _run(m, args, so)                                    # the kernel (marked by its sign) runs instead
    assert len(calls) == 1 and np.abs(kern + ref).max() < 1e-5


def test_the_reference_page_is_generated_from_the_contract():
    from pathlib import Path

    from export.op_docs import render

    page = render()
    assert (Path(co.__file__).with_name("CUSTOM_OPS.md")).read_text() == page   # regenerate: python -m export.op_docs
    for name, spec in co.SPEC.items():
        assert f"## {name}" in page and all(f"`{n}`" in page for n, *_ in spec["inputs"] + spec["outputs"])
