"""Checkpoint generator: writes a small random V4 model in exactly the official HF layout.

`python -m runtime.checkpoint make --preset tiny --out DIR [--seed 0]` writes `config.json`,
`model.safetensors.index.json` and several `model-0000k-of-0000n.safetensors` shards with the official tensor
names, FP8 e4m3 linears with 128x128 ue8m0 scales, FP4 routed experts packed two per int8 byte with per-32
ue8m0 scales, bf16 / fp32 / int64 tensors, all deterministic from the seed. It is the embedded default of
the demo and the tests: no weights are ever downloaded.

The random weights are scaled so that activations stay O(1) through the residual streams and the logits are
neither flat nor saturated (next-token entropy well inside (0, log V)), so a test can tell a bug from noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import number_formats
from ..config import ModelConfig
from ..errors import CheckpointError
from ..presets import preset
from .inventory import expected_tensors

CHECKPOINT_FORMAT_VERSION = 1


def _init(name: str, shape: tuple[int, ...], cfg: ModelConfig, g: torch.Generator) -> torch.Tensor:
    """A well-scaled random float32 value for the tensor `name` (official naming)."""
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
    if name.endswith("tid2eid"):
        V, k = shape
        return torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:k] for _ in range(V)])
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * randn(*shape)
    if leaf in ("embed",):
        return randn(*shape)
    if leaf == "head":
        return randn(*shape) * (2.0 / math.sqrt(shape[1]))     # logits std ~2 after the final norm
    if leaf == "attn_sink":
        return randn(*shape)
    if leaf == "ape":
        return 0.5 * randn(*shape)
    if leaf == "bias":
        return 0.1 * randn(*shape)
    if "_fn" in leaf:                                           # mHC mixes ~N(0, 1)
        return randn(*shape) / math.sqrt(shape[1])
    if "_base" in leaf:
        return 0.5 * randn(*shape)
    if "_scale" in leaf:
        return 0.5 + torch.rand(*shape, generator=g)
    if leaf in ("wo_b", "w2"):                                  # residual writers: a little smaller
        return randn(*shape) * (0.5 / math.sqrt(shape[1]))
    return randn(*shape) / math.sqrt(shape[1])                  # other linears: unit-variance outputs


def _encode(value: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored tensor, stored scale or None, the float32 value the stored form decodes to)."""
    if kind == "fp8":
        w, s = number_formats.quant_fp8_block(value)
        return w, s, number_formats.dequant_fp8_block(w, s)
    if kind == "fp4":
        w, s = number_formats.quant_fp4(value)
        return w, s, number_formats.dequant_fp4(w, s)
    if kind == "bf16":
        w = value.to(torch.bfloat16)
        return w, None, w.float()
    if kind == "f32":
        return value.float(), None, value.float()
    return value.to(torch.int64), None, value.to(torch.int64)


def make_weights(cfg: ModelConfig, seed: int = 0, expert_format: str = "fp4"):
    """Generate the checkpoint tensors. -> (stored {name: tensor}, decoded {name: float32/int64 value},
    masters {name: the float32 value before quantisation})."""
    g = torch.Generator().manual_seed(seed)
    stored, decoded, masters = {}, {}, {}
    for name, (shape, kind) in expected_tensors(cfg, expert_format).items():
        master = _init(name, shape, cfg, g)
        w, s, dec = _encode(master, kind)
        stored[name] = w.contiguous()
        if s is not None:
            stored[name.removesuffix(".weight") + ".scale"] = s.contiguous()
        decoded[name], masters[name] = dec, master
    return stored, decoded, masters


def write_checkpoint(out: str | Path, hf_config: dict, seed: int = 0, shards: int = 3,
                     progress: bool = False) -> Path:
    """Write a complete checkpoint folder for `hf_config` (a config.json dict). Returns the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder; name a folder for the checkpoint")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--out {out}: the folder cannot be created ({e.strerror or e}); name another") from None
    cfg = ModelConfig.from_hf(hf_config, source="generator config")
    expert_format = cfg.expert_dtype or "fp4"
    stored, _, _ = make_weights(cfg, seed, expert_format)
    names = list(stored)
    total = sum(t.numel() * t.element_size() for t in stored.values())
    per_shard, weight_map, files = math.ceil(total / shards), {}, []
    current, size = {}, 0
    for i, name in enumerate(names):
        current[name] = stored[name]
        size += stored[name].numel() * stored[name].element_size()
        # Close a shard only after a weight's `.scale` companion, never between them.
        last = i == len(names) - 1
        if last or (size >= per_shard and not names[i + 1].endswith(".scale")):
            files.append(current)
            current, size = {}, 0
    n = len(files)
    for k, part in enumerate(files, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in part})
        if progress:
            print(f"wrote {fname} ({len(part)} tensors)")
    index = {"metadata": {"total_size": total, "generator": "dsv4rt runtime.checkpoint.make",
                          "seed": seed, "format_version": CHECKPOINT_FORMAT_VERSION},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out


def make_preset(out: str | Path, name: str = "tiny", seed: int = 0, progress: bool = False) -> Path:
    return write_checkpoint(out, preset(name), seed=seed, progress=progress)
