"""Plain torch on any device: the always-available device path of the CUDA and Ascend backends.

The reference ops are device-generic torch code (every tensor they create lands on their inputs' device), so a
device backend runs them as they are on its own device. `register_generic(backend)` registers each (`runtime.dispatch.impl`) under the
id `<backend>.torch`, *after* the backend's own implementations, so dispatch prefers those and records
`<backend>.torch` where a chip has nothing better. These are runs on the device, not fallbacks to the CPU.

`storage_linear` is the one GEMM helper both device backends share: a linear whose weight is stored in a
low-precision float dtype runs in that dtype (tensor cores / cube units, float32 accumulation) and returns
float32; anything else goes to the reference.
"""

from __future__ import annotations

import torch

from runtime.dispatch import impl
from runtime.ops.specs import SPECS
from runtime.ops.linear import group_linear as ref_group_linear
from runtime.ops.linear import linear as ref_linear

LOW_PRECISION = (torch.bfloat16, torch.float16)


def storage_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., in] float32 @ w [out, in].T in w's storage dtype when that is bf16 / fp16 -> float32."""
    if isinstance(w, torch.Tensor) and w.dtype in LOW_PRECISION:
        return (x.to(w.dtype) @ w.T).float()
    return ref_linear(x, w)


def storage_group_linear(x: torch.Tensor, w) -> torch.Tensor:
    """The grouped wo_a projection (x [T, G, k], w [G*o, k]) in w's storage dtype -> [T, G, o] float32."""
    if isinstance(w, torch.Tensor) and w.dtype in LOW_PRECISION:
        wg = w.view(x.shape[1], -1, x.shape[2])                                   # [G, o, k]
        return torch.einsum("tgk,gok->tgo", x.to(w.dtype), wg).float()
    return ref_group_linear(x, w)


def register_generic(backend: str) -> None:
    """Every table op's reference as `<backend>.torch` (call it after the backend's own `impl` calls)."""
    for spec in SPECS:
        if not spec.is_numerics:
            impl(spec.name, f"{backend}.torch", backend, spec.reference)
