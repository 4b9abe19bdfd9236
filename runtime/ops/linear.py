"""Reference ops: linear layers (float32), whatever the weight's storage.

A weight is a float tensor of any dtype or a typed device weight (`runtime.weights.device_storage`: FP8 blocks, INT8
channels); the reference computes with its exact float32 values, so it is the oracle of every backend's GEMMs
and a correct (if slow) recorded fallback on any device. `project` is a linear layer under the table's
numerics: the model and the expert ops call it.
"""

from __future__ import annotations

import torch



def dequantize(w) -> torch.Tensor:
    """Float32 values of any weight kind: a plain tensor of any float dtype, or a typed device weight
    (`runtime.weights.device_storage`) through its `dequantize()`."""
    return w.float() if isinstance(w, torch.Tensor) else w.dequantize()


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """y = x @ w.T with w [out, in]."""
    return x @ dequantize(w).T


def group_linear(x: torch.Tensor, w) -> torch.Tensor:
    """Grouped projection: x [T, G, k], w [G*o, k] (group g owns rows g*o..(g+1)*o) -> [T, G, o]."""
    wg = dequantize(w).view(x.shape[1], -1, x.shape[2])                  # [G, o, k]
    return torch.einsum("tgk,gok->tgo", x, wg)


def project(ops, x: torch.Tensor, lin) -> torch.Tensor:
    """A linear layer `lin` (weight + whether its input is quantised) under the table's numerics: input
    quantisation where the weight format asks for it, output rounded to the activation dtype."""
    if lin.quantized:
        x = ops.quant_act(x)
    return ops.round_act(ops.linear(x, lin.weight))
