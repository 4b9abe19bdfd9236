"""Reading an official DeepSeek-V4 checkpoint folder: its inventory, then its tensors one at a time as stored.

Reads `config.json`, `model.safetensors.index.json` (or a single `model.safetensors`) and the shards they
name, memory-mapped (safetensors `safe_open`; no pickle anywhere). Before reading any tensor it checks the
whole inventory against the config and reports every missing, unexpected, mis-shaped or mis-typed tensor
together in one error. `CheckpointReader.tensors()` then yields each tensor as a `Stored`: the checkpoint's
bytes (FP8 e4m3 + ue8m0 block scales, FP4 e2m1 pairs + per-32 scales, bf16, fp32, int64; spec §3.1) as
zero-copy views of the memory map, one at a time -- the backends turn each into their own storage
(`runtime.weights`), so no float32 copy of the model is ever made. `load_checkpoint` decodes every tensor to
float32 (FP8 / FP4 exactly, spec §3.1): the values the tests' references and transformers need.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import number_formats
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


def checkpoint_folder(path: str | Path) -> Path:
    """`path` as a Path if it is a folder; else the one-line error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        return path
    what = "is a file, not a folder" if path.exists() else "does not exist"
    raise CheckpointError(f"checkpoint folder {path} {what} (make one: python -m runtime.checkpoint make --preset "
                          "tiny --out DIR)")


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
    f32_scales = [n for n in want if n.endswith(".scale") and n in found and found[n][0] == "F32"]
    if f32_scales:
        # DeepSeek's Base checkpoints ("FP8 Mixed": FP8 block experts, float32 FP8 scales; spec 3.1) are official
        # ones this build cannot hold yet: every kernel and decoder here reads ue8m0 scale bytes. Say so, not
        # "wrong shape/dtype" for every scale.
        raise CheckpointError(f"{path}: {len(f32_scales)} FP8 scale tensor(s) are float32 (e.g. {f32_scales[0]}): "
                              "a DeepSeek Base checkpoint (FP8 Mixed), which this build does not load yet (its "
                              "kernels take ue8m0 scales); use the instruct release (FP4 experts, ue8m0 scales)")
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


@dataclass
class Stored:
    """One checkpoint tensor as stored: `data` in its stored dtype (a view of the memory map) and, for FP8 / FP4,
    its ue8m0 `scale`. A tensor-parallel slice that cuts FP8 blocks cannot keep its block scales: it arrives
    `decoded` (float32 values of the slice; runtime.parallel.shard)."""
    name: str
    kind: str                          # fp8 / fp4 / bf16 / f32 / i64 (runtime.checkpoint.inventory)
    data: torch.Tensor
    scale: torch.Tensor | None = None
    decoded: bool = False

    @property
    def quantized(self) -> bool:
        return self.kind in ("fp8", "fp4")

    def values(self) -> torch.Tensor:
        """float32 values (int64 for the routing table): the exact decode of the stored form."""
        if self.decoded:
            return self.data
        if self.kind == "fp8":
            return number_formats.dequant_fp8_block(self.data, self.scale)
        if self.kind == "fp4":
            return number_formats.dequant_fp4(self.data, self.scale)
        return self.data if self.kind == "i64" else self.data.to(torch.float32)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale) if t is not None)


def _read(handles, found, name: str, kind: str) -> Stored:
    w = handles[found[name][2]].get_tensor(name)                 # a view of the memory map, not a read
    s = None
    if kind in ("fp8", "fp4"):
        sname = name.removesuffix(".weight") + ".scale"          # may live in another shard
        s = handles[found[sname][2]].get_tensor(sname)
    return Stored(name, kind, w, s)


def _decode(handles, found, name: str, kind: str) -> torch.Tensor:
    return _read(handles, found, name, kind).values()


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


class CheckpointReader:
    """A checked checkpoint folder whose tensors are read one at a time, as stored (`tensors()`)."""

    def __init__(self, path: str | Path, progress: bool | None = None):
        path = checkpoint_folder(path)
        self.path, self.progress = path, progress
        self.cfg = ModelConfig.from_file(path / "config.json")
        self.files, self.found, self.expert_format, self.expected = inventory(path, self.cfg)

    def owned(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (logical shape, kind) of every tensor `tensors()` yields (all of them on one device)."""
        return self.expected

    def stored_bytes(self) -> int:
        """Bytes on disk of the tensors `tensors()` yields (weights and their scales)."""
        return sum(entry_bytes(self.found[n]) for name, (_, kind) in self.expected.items()
                   for n in with_scale(name, kind))

    def tensors(self):
        """Yield a `Stored` per expected tensor, shard by shard (memory-mapped views; nothing is copied)."""
        show = sys.stderr.isatty() if self.progress is None else self.progress
        from tqdm import tqdm

        bar = tqdm(total=len(self.expected), desc=f"loading {self.path.name}", unit="tensor", disable=not show,
                   file=sys.stderr)
        handles = {fname: _open(self.path / fname) for fname in self.files}     # memory maps, not reads
        for fname in self.files:
            for name in handles[fname].keys():
                if name in self.expected:
                    try:
                        item = _read(handles, self.found, name, self.expected[name][1])
                    except (SafetensorError, RuntimeError) as e:
                        raise CheckpointError(f"shard {fname}: tensor {name} cannot be read ({e}); "
                                              "the shard is truncated or corrupt") from None
                    yield item
                    bar.update(1)
        bar.close()


def with_scale(name: str, kind: str) -> list[str]:
    """A stored tensor's names: the weight, and its `.scale` companion for FP8 / FP4."""
    return [name] + ([name.removesuffix(".weight") + ".scale"] if kind in ("fp8", "fp4") else [])


_ITEM = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4}


def entry_bytes(entry) -> int:
    """Stored bytes of a header entry (dtype, shape, shard)."""
    dtype, shape, _ = entry
    return math.prod(shape) * _ITEM.get(dtype, 4)


def load_checkpoint(path: str | Path, progress: bool | None = None) -> LoadedCheckpoint:
    """Every tensor decoded to float32 (int64 for tid2eid): the references' and transformers' input. The
    runtime itself never calls this (it streams `CheckpointReader.tensors()` into a backend's storage)."""
    reader = CheckpointReader(path, progress)
    tensors: dict[str, torch.Tensor] = {}
    for item in reader.tensors():
        tensors[item.name] = item.values()
    quantized = frozenset(n for n, (_, kind) in reader.expected.items() if kind in ("fp8", "fp4"))
    return LoadedCheckpoint(reader.cfg, tensors, quantized, reader.expert_format, reader.path)
