"""Memory planning: the byte arithmetic once (`sizes`: per-tensor bytes summed for weights, state and
activations), and on top of it a deployment's plan (`deployment.plan`, printed by `python -m runtime.plan`),
the loaded runtime's memory plan (`memory.MemoryPlan`, printed at load and enforced before allocation; the
prefill chunk `PREFILL_CHUNK`) and the multi-device layouts (`layouts`: TP x EP x nodes proposals, per-rank
figures).
"""

from .deployment import plan
from .memory import PREFILL_CHUNK, MemoryPlan
from .sizes import (HEADROOM, activation_bytes, gib, index_entry_bytes, kv_entry_bytes, state_plan, tensor_bytes,
                    weight_bytes)

__all__ = ["HEADROOM", "PREFILL_CHUNK", "MemoryPlan", "activation_bytes", "gib", "index_entry_bytes",
           "kv_entry_bytes", "plan", "state_plan", "tensor_bytes", "weight_bytes"]
