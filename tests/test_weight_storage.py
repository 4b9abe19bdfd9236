"""export/weight_storage.py on hand-built graphs (no export): `--weights fp8` stores every quantised weight the
step graph holds as codes, and refuses to leave one float32. Failed before: a quantised weight the pass did not
find in the graph (folded, scaled or rounded by the exporter) stayed float32 and the export "succeeded"."""

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.weight_storage import StorageError, store_quantized
from runtime import number_formats
from runtime.errors import V4Error

G = torch.Generator().manual_seed(0)


def _fp8_valued(out: int, inp: int) -> torch.Tensor:
    return number_formats.dequant_fp8_block(*number_formats.quant_fp8_block(torch.randn(out, inp, generator=G)))


def _graph(*weights: torch.Tensor) -> onnx.ModelProto:
    """x @ W0 @ W1 ... with each W an initializer ([in, out]: the exporter's pre-transposed layout)."""
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.numpy(), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights[0].shape[0]])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g)


def test_every_quantised_weight_is_stored_as_codes():
    a, b = _fp8_valued(128, 256), _fp8_valued(256, 128)
    tensors = {"layers.0.attn.wq_a.weight": a, "layers.0.attn.wq_b.weight": b, "mtp.0.attn.wq_a.weight": a + 1}
    m = _graph(a.t().contiguous(), b.t().contiguous())
    stats = store_quantized(m, tensors, set(tensors), "fp4")         # the MTP weight is not in a step graph: fine
    assert stats["fp8"] == 2
    assert not [i for i in m.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
                and i.dims[0] * i.dims[1] > 1024]                       # only the small scale tensors stay float32


def test_a_quantised_weight_left_float32_is_refused():
    a, b = _fp8_valued(128, 256), _fp8_valued(256, 128)
    tensors = {"layers.0.attn.wq_a.weight": a, "layers.0.attn.wq_b.weight": b}
    m = _graph(a.t().contiguous(), 2 * b.t().contiguous() + 0.5)       # the exporter folded a scale into wq_b
    with pytest.raises(StorageError, match=r"1 quantised weight\(s\) would stay float32 in the graph "
                                           r"\(layers\.0\.attn\.wq_b\.weight\)") as e:
        store_quantized(m, tensors, set(tensors), "fp4")
    assert isinstance(e.value, V4Error) and "\n" not in str(e.value)      # the CLI prints it as one line, exit 2
