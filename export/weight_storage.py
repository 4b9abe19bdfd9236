"""Weight storage in the exported graphs: FP8 linears and FP4 experts as shipped, dequantised in the graph.

The exporter writes float32 initializers (often pre-transposed: it folds `W.T` into the constant). This pass
finds each initializer holding a quantised checkpoint weight (by content, W or W.T) and replaces it by a
blocked `DequantizeLinear` (opset 21+) of low-precision codes, so the file carries the shipped precision:
- FP8 e4m3 linears: FLOAT8E4M3FN codes with one float32 scale per 128 x 128 block, stored expanded along the
  non-blocked axis (ONNX blocks along one axis only), `block_size=128` along the input dim;
- FP4 e2m1 routed experts: ORT has no FP4 / E8M0 kernels, so they are repacked losslessly to INT8 (an e2m1
  value times 2 is an integer in [-12, 12]) with half the power-of-two scale per 32 inputs, `block_size=32`.
Both are exact: the dequantised values equal the float32 ones bit for bit (checked per tensor here). ORT's
DQ -> MatMul fusion would quantise activations to int8; backends/onnx_runner.py sets
`session.qdq_matmulnbits_accuracy_level=0`, which keeps it exact.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from runtime import number_formats
from runtime.errors import V4Error


class StorageError(V4Error, ValueError):
    """A weight is not exactly representable in the requested storage, or a quantised weight would stay
    float32 in the graph (one line: `python -m export.onnx` prints it and exits 2)."""


def in_step_graph(name: str) -> bool:
    """Whether the exported step graph holds this checkpoint weight: every main-model weight; not the MTP
    block's (`mtp.*`: the step graph has no MTP block, export/step_graph.py Step)."""
    return not name.startswith("mtp.")


def _key(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest() + str(a.shape)


def _fp8(w: torch.Tensor):
    """float32 [out, in] -> (e4m3 codes [out, in] as uint8, float32 scales [out, ceil(in/128)])."""
    codes, s = number_formats.quant_fp8_block(w, 128)
    scale = number_formats.decode_e8m0(s).repeat_interleave(128, 0)[: w.shape[0]]
    return codes.view(torch.uint8), scale, 128


def _int8_from_fp4(w: torch.Tensor):
    """float32 [out, in] FP4-valued -> (int8 codes [out, in], float32 scales [out, in/32]): codes = 2 * e2m1."""
    blocks = w.view(w.shape[0], -1, 32)
    scale = number_formats.pow2_scale(blocks.abs().amax(-1).clamp(min=number_formats.FP4_MAX * 2.0 ** -126), number_formats.FP4_MAX) / 2
    codes = torch.round(blocks / scale[..., None])
    return codes.view_as(w).to(torch.int8), scale, 32


def _dq_nodes(name: str, codes: torch.Tensor, scale: torch.Tensor, block: int, transposed: bool, fp8: bool):
    """Initializers + DequantizeLinear producing `name` ([in, out] when `transposed`, else [out, in])."""
    if transposed:
        codes, scale = codes.t().contiguous(), scale.t().contiguous()
    data_type = onnx.TensorProto.FLOAT8E4M3FN if fp8 else onnx.TensorProto.INT8
    q = helper.make_tensor(f"{name}.q", data_type, list(codes.shape), codes.numpy().tobytes(), raw=True)
    s = numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.scale")
    node = helper.make_node("DequantizeLinear", [q.name, s.name], [name], name=f"dq.{name}",
                            axis=0 if transposed else 1, block_size=block)
    return [q, s], node


def store_quantized(model: onnx.ModelProto, tensors: dict[str, torch.Tensor], quantized, expert_format: str,
                    expected=in_step_graph) -> dict:
    """Replace the float32 initializers of the checkpoint's FP8 / FP4 weights by DequantizeLinear of their codes.
    Every quantised weight for which `expected(name)` holds must be found in the graph (as W or W.T): one that
    is not (the exporter folded it into another constant, rounded or scaled it) would stay float32 silently,
    so it is an error naming it.
    -> counts {"fp8": n, "int8_from_fp4": n, "bytes_before": b, "bytes_after": b}."""
    wanted, twins = {}, {}
    for name in quantized:
        w = tensors[name].float()
        wanted.setdefault(_key(w.numpy()), (name, False))
        wanted.setdefault(_key(w.t().contiguous().numpy()), (name, True))
        twins.setdefault(_key(w.numpy()), []).append(name)      # equal weights: one initializer stores them all
    inits, nodes, stats = [], [], {"fp8": 0, "int8_from_fp4": 0, "bytes_before": 0, "bytes_after": 0}
    stored: set[str] = set()
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init) if init.data_type == onnx.TensorProto.FLOAT else None
        hit = wanted.get(_key(arr)) if arr is not None and arr.ndim == 2 else None
        if hit is None:
            inits.append(init)
            continue
        src, transposed = hit
        w = tensors[src].float()
        stored.update(twins[_key(w.numpy())])
        fp4 = ".experts." in src and expert_format == "fp4"
        codes, scale, block = _int8_from_fp4(w) if fp4 else _fp8(w)
        values = codes.float() if fp4 else codes.view(torch.float8_e4m3fn).float()
        if not torch.equal(values * scale.repeat_interleave(block, 1)[:, : w.shape[1]], w):
            raise StorageError(f"{src} is not exactly representable as {'FP4' if fp4 else 'FP8'} blocks")
        new, node = _dq_nodes(init.name, codes, scale, block, transposed, fp8=not fp4)
        inits += new
        nodes.append(node)
        stats["int8_from_fp4" if fp4 else "fp8"] += 1
        stats["bytes_before"] += arr.nbytes
        stats["bytes_after"] += codes.numel() + scale.numel() * 4
    missing = sorted(n for n in quantized if expected(n) and n not in stored)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise StorageError(f"{len(missing)} quantised weight(s) would stay float32 in the graph ({shown}): no "
                           "initializer holds their values; export with --weights float32, or report this as an "
                           "exporter bug")
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    graph_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + graph_nodes)             # DQ first: their outputs feed the rest
    return stats
