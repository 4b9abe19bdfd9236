"""Loading an official DeepSeek-V4 checkpoint folder into float32 tensors for the reference backend.

Reads `config.json`, `model.safetensors.index.json` (or a single `model.safetensors`) and the shards they
name, memory-mapped and shard by shard (safetensors `safe_open`; no pickle anywhere). Before decoding
anything it checks the whole inventory against the config and reports every missing, unexpected, mis-shaped
or mis-typed tensor together in one error. Then it decodes FP8 block-scaled linears and FP4 experts to
float32 (spec §3.1), with a progress bar on long loads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import formats
from ..config import ModelConfig
from ..errors import CheckpointError
from ..yaml_io import read_json
from .inventory import expected_tensors, scale_shape, stored_shape

# safetensors dtype string for each storage kind's weight and scale.
_WEIGHT_DTYPE = {"fp8": "F8_E4M3", "fp4": "I8", "bf16": "BF16", "f32": "F32", "i64": "I64"}
_SCALE_DTYPE = "F8_E8M0"
# Expert storage detected from the dtype of an expert weight when config.json has no `expert_dtype`.
_EXPERT_KIND = {"I8": "fp4", "F8_E4M3": "fp8", "BF16": "bf16"}
_MAX_LISTED = 6


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]       # official name -> float32 (int64 for tid2eid)
    quantized: frozenset[str]              # names stored as FP8 / FP4
    expert_format: str
    path: Path


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _shard_name_ok(fname) -> bool:
    """A shard file name inside the checkpoint folder: a plain name, no path, no NUL."""
    return isinstance(fname, str) and fname not in ("", ".", "..") and not any(c in fname for c in "/\\\0")


def _weight_map(path: Path) -> dict[str, str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        raw = read_json(index, CheckpointError, "checkpoint index")
        wm = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a non-empty 'weight_map' object "
                                  "mapping tensor names to shard files)")
        for name, fname in wm.items():
            if not _shard_name_ok(fname):
                what = f"shard path {fname!r} leaves the checkpoint folder; refusing it" if isinstance(fname, str) \
                    else f"tensor {name!r} maps to {type(fname).__name__} {str(fname)[:40]!r}, not a shard file name"
                raise CheckpointError(f"{index}: {what}")
        return wm
    single = path / "model.safetensors"
    if single.is_file():
        return {name: single.name for name in _open(single).keys()}
    raise CheckpointError(f"{path}: no model.safetensors.index.json or model.safetensors; "
                          "is this a checkpoint folder? (make one: python -m runtime.checkpoint make --out DIR)")


def _open(shard: Path):
    if not shard.is_file():
        raise CheckpointError(f"shard {shard.name} named by the index is missing from {shard.parent}")
    try:
        return safe_open(str(shard), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"shard {shard} is truncated or corrupt ({e}); re-download or regenerate it") from None


def _headers(path: Path, files: list[str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, shape, shard) read from the shard headers only (no tensor data)."""
    found = {}
    for fname in files:
        f = _open(path / fname)
        for name in f.keys():
            sl = f.get_slice(name)
            found[name] = (sl.get_dtype(), tuple(sl.get_shape()), fname)
    return found


def _check(cfg: ModelConfig, found, expert_format: str, weight_map: dict[str, str], path: Path) -> dict:
    expected = expected_tensors(cfg, expert_format)
    want: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (shape, kind) in expected.items():
        want[name] = (_WEIGHT_DTYPE[kind], stored_shape(kind, shape))
        ss = scale_shape(kind, shape)
        if ss is not None:
            want[name.removesuffix(".weight") + ".scale"] = (_SCALE_DTYPE, ss)
    missing = [n for n in want if n not in found]
    unexpected = [n for n in found if n not in want]
    misplaced = [n for n, f in weight_map.items() if n in found and found[n][2] != f]
    wrong = [f"{n} {list(found[n][1])}/{found[n][0]} (expected {list(want[n][1])}/{want[n][0]})"
             for n in want if n in found and (found[n][1], found[n][0]) != (want[n][1], want[n][0])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shape/dtype: {_listing(wrong)}")
    if misplaced:
        problems.append(f"{len(misplaced)} not in the shard the index names: {_listing(misplaced)}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: " + "; ".join(problems))
    return expected


def _decode(handles, found, name: str, kind: str) -> torch.Tensor:
    w = handles[found[name][2]].get_tensor(name)
    if kind in ("fp8", "fp4"):
        sname = name.removesuffix(".weight") + ".scale"          # may live in another shard
        s = handles[found[sname][2]].get_tensor(sname)
        return formats.dequant_fp8_block(w, s) if kind == "fp8" else formats.dequant_fp4(w, s)
    return w if kind == "i64" else w.to(torch.float32)


def inventory(path: Path, cfg: ModelConfig):
    """Read a checkpoint folder's index and shard headers, detect the experts' format and check every expected
    tensor is there with its shape and dtype -> (shard files, headers, expert format, expected tensors)."""
    weight_map = _weight_map(path)
    files = sorted(set(weight_map.values()))
    found = _headers(path, files)
    expert_format = cfg.expert_dtype
    if expert_format is None:
        probe = found.get("layers.0.ffn.experts.0.w1.weight")
        expert_format = _EXPERT_KIND.get(probe[0], "fp4") if probe else "fp4"
    return files, found, expert_format, _check(cfg, found, expert_format, weight_map, path)


def load_checkpoint(path: str | Path, progress: bool | None = None) -> LoadedCheckpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist "
                              "(make one: python -m runtime.checkpoint make --preset tiny --out DIR)")
    cfg = ModelConfig.from_file(path / "config.json")
    files, found, expert_format, expected = inventory(path, cfg)

    show = sys.stderr.isatty() if progress is None else progress
    tensors: dict[str, torch.Tensor] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(expected), desc=f"loading {path.name}", unit="tensor", disable=not show, file=sys.stderr)
    handles = {fname: _open(path / fname) for fname in files}     # memory maps, not reads
    for fname in files:
        for name in handles[fname].keys():
            if name in expected:
                try:
                    tensors[name] = _decode(handles, found, name, expected[name][1])
                except (SafetensorError, RuntimeError) as e:
                    raise CheckpointError(f"shard {fname}: tensor {name} cannot be read ({e}); "
                                          "the shard is truncated or corrupt") from None
                bar.update(1)
    bar.close()
    quantized = frozenset(n for n, (_, kind) in expected.items() if kind in ("fp8", "fp4"))
    return LoadedCheckpoint(cfg, tensors, quantized, expert_format, path)
