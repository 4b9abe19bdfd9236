"""Shape-true dry-run checkpoints: the official inventory and shard layout as sparse files (data = holes).

`python -m runtime.checkpoint make --preset flash --sparse --out DIR` (or `pro`, or `tiny`) writes what
DeepSeek ships — `config.json`, `model.safetensors.index.json` and `model-0000k-of-0000n.safetensors` shards
with every tensor's official name, stored shape and dtype (spec §3.1, §4) — but each shard holds only its real
safetensors header; the data region is a hole made by extending the file (`truncate`), so a 148.7 GiB
V4-Flash folder takes a few MiB on disk. Read back, every data byte is zero: FP8 / FP4 codes 0.0, ue8m0
scale bytes 2^-127, bf16 / fp32 zeros, `tid2eid` routing every token to expert 0 — finite values, meaningless
outputs. The point is a real-scale load: shapes, memory and time, not numbers.

The shard layout is the official one (recorded from the shipped V4-Flash / V4-Pro folders): shard 1 holds
`embed.weight`, shards 2 .. L+1 one transformer layer each, shard L+2 the output head (`head.weight`,
`norm.weight`, `hc_head_*`), then one shard per MTP block. Inside a shard the tensors are laid out as the
`safetensors` library lays them out (by dtype, widest first, then by name; header JSON compact, padded with
spaces to 8 bytes, no `__metadata__`), which reproduces the official shard files' byte sizes exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from .inventory import expected_tensors, scale_shape, stored_shape

# safetensors dtype name and element size of each storage kind's weight; ue8m0 scales are F8_E8M0.
DTYPE = {"fp8": "F8_E4M3", "fp4": "I8", "bf16": "BF16", "f32": "F32", "i64": "I64"}
SCALE_DTYPE = "F8_E8M0"
ITEMSIZE = {"I64": 8, "F32": 4, "BF16": 2, "F8_E8M0": 1, "F8_E4M3": 1, "I8": 1}
# The order the safetensors serializer places tensors in: its Dtype enum descending (alignment first), then name.
_SERIALIZE_RANK = {"I64": 0, "F32": 1, "BF16": 2, "F8_E8M0": 3, "F8_E4M3": 4, "I8": 5}
GENERATOR = "dsv4rt runtime.checkpoint.sparse (dry run: headers real, data holes)"


def stored_inventory(cfg: ModelConfig, expert_format: str = "fp4") -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, stored shape) of every tensor in the checkpoint, `.scale` companions included."""
    out = {}
    for name, (shape, kind) in expected_tensors(cfg, expert_format).items():
        out[name] = (DTYPE[kind], stored_shape(kind, shape))
        ss = scale_shape(kind, shape)
        if ss is not None:
            out[name.removesuffix(".weight") + ".scale"] = (SCALE_DTYPE, ss)
    return out


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


def shard_groups(cfg: ModelConfig, inventory: dict) -> list[list[str]]:
    """The tensor names of each shard, in the official grouping (embed | one layer per shard | head | MTP)."""
    head = {"head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}
    groups: list[list[str]] = [["embed.weight"]] + [[] for _ in range(cfg.num_layers)] + [sorted(head)] + \
        [[] for _ in range(cfg.num_mtp)]
    for name in inventory:
        if name in head or name == "embed.weight":
            continue
        top, idx = name.split(".")[:2]
        if top == "layers":
            groups[1 + int(idx)].append(name)
        elif top == "mtp":
            groups[2 + cfg.num_layers + int(idx)].append(name)
        else:
            raise CheckpointError(f"tensor {name} has no shard in the official layout")
    return [g for g in groups if g]


def header(entries: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """(the safetensors header block — 8-byte length + JSON padded to 8 bytes —, data bytes that follow)."""
    meta, off = {}, 0
    for name in sorted(entries, key=lambda n: (_SERIALIZE_RANK[entries[n][0]], n)):
        dtype, shape = entries[name]
        end = off + nbytes(dtype, shape)
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, end]}
        off = end
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, off


def write_sparse_checkpoint(out: str | Path, hf_config: dict, progress: bool = False) -> Path:
    """Write the official inventory of `hf_config` as sparse shards into `out`. Returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf(hf_config, source="preset config")
    inv = stored_inventory(cfg, cfg.expert_dtype or "fp4")
    groups = shard_groups(cfg, inv)
    n, weight_map, total = len(groups), {}, 0
    for k, names in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        head, data = header({name: inv[name] for name in names})
        with open(out / fname, "wb") as f:
            f.write(head)
            f.truncate(len(head) + data)          # the data region: a hole, no blocks allocated
        weight_map.update({name: fname for name in names})
        total += data
        if progress:
            print(f"wrote {fname} ({len(names)} tensors, {data / 2 ** 30:.2f} GiB as a hole)")
    index = {"metadata": {"total_size": total, "generator": GENERATOR}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out


def check_extents(path: Path, files: list[str]) -> int:
    """Every shard is exactly header + the data its header describes (a truncated or padded shard is named).
    Returns the stored data bytes of all shards."""
    total = 0
    for fname in files:
        p = path / fname
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"shard {p} is truncated (no safetensors header); re-download or regenerate it")
            n = struct.unpack("<Q", raw)[0]
            try:
                meta = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"shard {p} has a corrupt header; re-download or regenerate it") from None
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        size = os.path.getsize(p)
        if size != 8 + n + end:
            raise CheckpointError(f"shard {p} is {size:,} bytes but its header describes {8 + n + end:,}; "
                                  "it is truncated or corrupt: re-download or regenerate it")
        total += end
    return total


def disk_usage(path: Path) -> int:
    """Bytes the folder's files really occupy on disk (allocated blocks, as `du` counts them)."""
    return sum(p.stat().st_blocks * 512 for p in Path(path).iterdir() if p.is_file())
