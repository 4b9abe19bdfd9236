"""Benchmark checkpoints, generated once into the cache folder (official layout, random weights).

- `tiny`: the random tiny preset (5 layers: window-only, CSA, HCA-128, CSA, HCA-16; `random_checkpoint`), not
  the shipped trained default (runtime/default_model, 3 layers).
- `tiny-hf`: the same dimensions with one HCA ratio (128 twice) so transformers can hold it (its
  `compress_rates` is per layer type); the `--compare transformers` default.
- `tiny-r128`: the tiny preset with ratio 16 -> 128 and indexer head dim 32 -> 128, what llama.cpp's deepseek4
  loads (ratios 0 / 4 / 128, indexer head dim a multiple of 64): the `--compare llama.cpp` default.
- `bw-200mb`: d=2048, 2 layers (CSA, HCA-128), 8 experts of 2048, vocab 8192: ~0.45 GB of float32 weights
  read per decoded token, for the bandwidth scenario.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..cache import build_once, cache_dir
from ..checkpoint.builtin import random_checkpoint
from ..checkpoint.make import CHECKPOINT_FORMAT_VERSION, write_checkpoint
from ..errors import InputError
from ..presets import preset


def _variant(name: str) -> dict:
    raw = preset("tiny")
    if name == "tiny-hf":
        raw.update(compress_ratios=[0, 4, 128, 4, 128, 0])
    elif name == "tiny-r128":
        raw.update(compress_ratios=[0, 4, 128, 4, 128, 0], index_head_dim=128)
    elif name == "bw-200mb":
        raw.update(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, head_dim=128, qk_rope_head_dim=64,
                   q_lora_rank=1024, o_groups=4, o_lora_rank=512, n_routed_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=2048, vocab_size=8192, num_hash_layers=1, compress_ratios=[4, 128, 0],
                   index_n_heads=16, index_head_dim=128)
    else:
        raise InputError(f"unknown bench model {name!r}; choose tiny, tiny-hf, tiny-r128, bw-200mb, or pass --checkpoint DIR")
    return raw


def bench_checkpoint(name: str) -> Path:
    if name == "tiny":
        return random_checkpoint()
    raw = _variant(name)
    key = hashlib.sha256(json.dumps([raw, CHECKPOINT_FORMAT_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    return build_once(cache_dir() / f"bench-{name}-{key}", "model.safetensors.index.json",
                      lambda tmp: write_checkpoint(tmp, raw, seed=0))
