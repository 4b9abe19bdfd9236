"""Reference op: gated softmax pooling of the KV compressor (spec §8).

Each compressed entry pools the slots of its window(s) per channel: softmax over slots of the gate scores
(which already include the learned position bias `ape`), then the score-weighted sum of the slot values.
"""

from __future__ import annotations

import torch


def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """kv, score [W, slots, c] -> [W, c]; score -inf marks an empty slot (CSA's missing window -1)."""
    return (torch.softmax(score, dim=1) * kv).sum(dim=1)
