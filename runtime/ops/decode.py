"""Reference op: one block's decode step (issue 19), the per-op path the model has always run.

`decode_block(block, X, ids, positions, starts, states)` is what `Block` calls for a one-token step (S = 1):
the reference runs the block's own per-op code (`Block.forward_ops`: every table op in turn, so under any
numerics and on any backend it is exactly the unfused model); a backend may register a fused implementation of
the whole step (backends/cpu_decode.py: one native call per block), with this as its oracle.
"""

from __future__ import annotations

import torch


def decode_block(block, X: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, starts: list[int],
                 states: list) -> torch.Tensor:
    """X [B, 1, hc, d] -> [B, 1, hc, d] for sequences at positions `starts` (ragged), updating their states."""
    return block.forward_ops(X, ids, positions, starts, states)
