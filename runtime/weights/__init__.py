"""The streaming weight path (issue 15): checkpoint tensors, one at a time, into a backend's own storage.

    reader = CheckpointReader(path)                         # or a rank's ShardedReader
    weights = backend.load_weights(reader, weight_format, compute_dtype, device, int8_linears)

`reader.tensors()` yields each tensor as stored (`runtime.checkpoint.Stored`: memory-mapped views of the
shards); the backend turns it into its storage before it reads the next one (`runtime.weights.cpu` for the
CPU: the checkpoint's own formats, zero-copy; `runtime.weights.device` for a GPU / NPU: packed per tensor
and copied to the device). So the float32 form of the model never exists, and the peak host memory of a
load is what the backend keeps on the host plus one tensor's transient. `Weights` is the result: the name ->
storage map the model reads, the set of linears whose input the numerics quantise, and the byte counts the
memory plan prints (held, of which mapped from the checkpoint files, and the stored bytes read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cpu_storage import Fp4Stored, Fp8Stored, Int8Rows, held_bytes, tensors_of

__all__ = ["Weights", "Fp8Stored", "Fp4Stored", "Int8Rows", "held_bytes"]


@dataclass
class Weights:
    tensors: dict[str, object]          # official name -> storage (a tensor or a runtime.weights.cpu_storage kind)
    quantized: frozenset[str]           # linears whose input the numerics quantise (FP8 / INT8 activations)
    stored_bytes: int                   # checkpoint bytes read for these weights (weights and scales)
    mapped: frozenset[str] = field(default_factory=frozenset)   # kept as views of the memory-mapped shards

    def held_bytes(self) -> int:
        """Bytes of the distinct storages these weights consist of (device stacks counted once)."""
        seen: dict[int, int] = {}
        for w in self.tensors.values():
            for t in tensors_of(w):
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def mapped_bytes(self) -> int:
        """Of the held bytes, those that are pages of the checkpoint files (the OS pages them in and out)."""
        return sum(held_bytes(self.tensors[n]) for n in self.mapped)

    def values(self) -> dict[str, torch.Tensor]:
        """float32 values of every weight (int64 routing tables), decoded here: for exporters and reference
        models that need a float32 state dict. The runtime's own ops never call this."""
        from ..ops.linear import dequantize

        return {n: (w if isinstance(w, torch.Tensor) and not w.is_floating_point() else dequantize(w).cpu())
                for n, w in self.tensors.items()}

