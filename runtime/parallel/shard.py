"""Sharded loading: each rank reads only the tensors and slices its layout gives it, straight from the
official safetensors shards.

The inventory check is the single-device loader's (`runtime.checkpoint.loader`), run on the shard headers
only. Then, per tensor, `owned_slice` says whether this rank holds it and which rows / columns: unowned routed
experts are never opened, sliced tensors are read with `safe_open(...).get_slice(name)[lo:hi]`, so no rank
materialises a full sharded tensor. `ShardedReader` has the single-device reader's interface (`tensors()`
yields one `Stored` at a time, for a backend's `load_weights`): a whole tensor or a slice on 128-block
boundaries stays as stored (FP8 codes with the scale rows / columns of its blocks); an FP8 slice that cuts
blocks (its scales are per 128x128 block) is read out to the block boundaries that cover it, decoded, then
cropped, so it arrives as float32 values equal to the full tensor's decode restricted to the slice.
`bytes_read` counts the bytes every read touched (weights and scales), for the tests and the logs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import number_formats
from ..checkpoint.inventory import FP8_BLOCK
from ..checkpoint.loader import LoadedCheckpoint, Stored, _open, _read, entry_bytes, inventory, with_scale
from ..config import ModelConfig
from ..errors import CheckpointError
from .layout import Layout

# Tensors split over the TP group: name pattern -> the dimension split (spec §15).
_TP_SPLIT = (
    (re.compile(r"(^|\.)attn\.wq_b\.weight$"), 0),                 # query heads (rows)
    (re.compile(r"(^|\.)attn\.wo_a\.weight$"), 0),                 # output groups (rows)
    (re.compile(r"(^|\.)attn\.wo_b\.weight$"), 1),                 # row-parallel: the groups' input columns
    (re.compile(r"(^|\.)attn\.attn_sink$"), 0),                    # one sink per query head
    (re.compile(r"(^|\.)attn\.indexer\.wq_b\.weight$"), 0),        # indexer heads
    (re.compile(r"(^|\.)attn\.indexer\.weights_proj\.weight$"), 0),
)
_EXPERT = re.compile(r"(^|\.)ffn\.experts\.(\d+)\.")
_VOCAB = ("embed.weight", "head.weight")


@dataclass(frozen=True)
class Slice:
    dim: int
    lo: int
    hi: int


def owned_slice(name: str, shape: tuple[int, ...], layout: Layout, rank: int, n_experts: int) -> "Slice | None | bool":
    """What rank `rank` holds of tensor `name` (logical shape): False = nothing, None = all of it,
    or a Slice along one dimension."""
    m = _EXPERT.search(name)
    if m:
        return None if int(m[2]) in layout.experts(rank, n_experts) else False
    if name in _VOCAB:
        lo, hi = layout.vocab(rank, shape[0])
        return Slice(0, lo, hi) if layout.world > 1 else None
    if layout.tp > 1:
        for pat, dim in _TP_SPLIT:
            if pat.search(name):
                per = shape[dim] // layout.tp
                t = layout.coords(rank)[1]
                return Slice(dim, t * per, (t + 1) * per)
    return None


class ShardedReader:
    """Reads one rank's share of a checkpoint folder."""

    def __init__(self, path: Path, cfg: ModelConfig, layout: Layout, rank: int):
        self.path, self.cfg, self.layout, self.rank = path, cfg, layout, rank
        self.progress, self._inv = None, None
        self.bytes_read = 0
        self.reads: dict[str, int] = {}          # stored name (weights and .scale) -> bytes read of it

    def _read(self, handle, name: str, dim: int, lo: int, hi: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [lo, hi) of a stored tensor, through a safetensors slice."""
        view = handle.get_slice(name)
        t = view[lo:hi] if dim == 0 else view[:, lo:hi]
        self._count(name, t.numel() * t.element_size())
        return t

    def _count(self, name: str, n: int) -> None:
        self.reads[name] = self.reads.get(name, 0) + n
        self.bytes_read += n

    def read(self, handles, found, name: str, kind: str, sl: Slice | None) -> Stored:
        if sl is None:                      # the whole tensor: exactly the single-device read
            for n in with_scale(name, kind):
                self._count(n, entry_bytes(found[n]))
            return _read(handles, found, name, kind)
        h = handles[found[name][2]]
        if kind == "fp8":
            s_name = name.removesuffix(".weight") + ".scale"
            b_lo, b_hi = sl.lo // FP8_BLOCK, -(-sl.hi // FP8_BLOCK)
            size = found[name][1][sl.dim]
            w = self._read(h, name, sl.dim, b_lo * FP8_BLOCK, min(size, b_hi * FP8_BLOCK))
            s = self._read(handles[found[s_name][2]], s_name, sl.dim, b_lo, b_hi)
            if sl.lo % FP8_BLOCK == 0 and (sl.hi % FP8_BLOCK == 0 or sl.hi == size):    # whole blocks: as stored
                return Stored(name, kind, w.contiguous().clone(), s.contiguous().clone())
            full = number_formats.dequant_fp8_block(w, s)          # blocks cut: the slice's float32 values
            return Stored(name, kind, full.narrow(sl.dim, sl.lo - b_lo * FP8_BLOCK, sl.hi - sl.lo).clone(),
                          decoded=True)
        if kind == "fp4":
            raise CheckpointError(f"{name}: FP4 tensors are routed experts, which are never sliced")
        # own memory (a row slice of the map would keep the whole tensor's storage referenced)
        return Stored(name, kind, self._read(h, name, sl.dim, sl.lo, sl.hi).contiguous().clone())

    def decode(self, handles, found, name: str, kind: str, sl: Slice | None) -> torch.Tensor:
        return self.read(handles, found, name, kind, sl).values()

    def owned(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (logical shape of the whole tensor, kind) of the tensors this rank holds."""
        files, found, expert_format, expected = self._inventory()
        return {n: v for n, v in expected.items()
                if owned_slice(n, v[0], self.layout, self.rank, self.cfg.n_routed_experts) is not False}

    def stored_bytes(self) -> int:
        """Bytes on disk of this rank's share (its slices' bytes, approximately for sliced FP8 scales)."""
        files, found, _, expected = self._inventory()
        total = 0
        for name, (shape, kind) in expected.items():
            sl = owned_slice(name, shape, self.layout, self.rank, self.cfg.n_routed_experts)
            if sl is False:
                continue
            frac = 1.0 if sl is None else (sl.hi - sl.lo) / shape[sl.dim]
            total += int(frac * sum(entry_bytes(found[n]) for n in with_scale(name, kind)))
        return total

    def _inventory(self):
        if self._inv is None:
            self._inv = inventory(self.path, self.cfg)
        return self._inv

    @property
    def expert_format(self) -> str:
        return self._inventory()[2]

    def tensors(self):
        """Yield this rank's tensors (whole or sliced) one at a time as `Stored`."""
        path, cfg = self.path, self.cfg
        files, found, expert_format, expected = self._inventory()
        handles = {fname: _open(path / fname) for fname in files}     # memory maps, not reads
        show = sys.stderr.isatty() if self.progress is None else self.progress
        from tqdm import tqdm

        bar = tqdm(total=len(expected), desc=f"rank {self.rank} loading {path.name}", unit="tensor",
                   disable=not show, file=sys.stderr)
        for name, (shape, kind) in expected.items():
            sl = owned_slice(name, shape, self.layout, self.rank, cfg.n_routed_experts)
            bar.update(1)
            if sl is False:
                continue
            try:
                item = self.read(handles, found, name, kind, sl)
            except (SafetensorError, RuntimeError) as e:
                raise CheckpointError(f"shard {found[name][2]}: tensor {name} cannot be read ({e}); "
                                      "the shard is truncated or corrupt") from None
            yield item
        bar.close()

    def load(self, progress: bool | None = None) -> LoadedCheckpoint:
        """This rank's share decoded to float32 (the tests' reference; the runtime streams `tensors()`)."""
        if progress is not None:
            self.progress = progress
        tensors = {item.name: item.values() for item in self.tensors()}
        expected = self._inventory()[3]
        quantized = frozenset(n for n, (_, kind) in expected.items() if kind in ("fp8", "fp4") and n in tensors)
        return LoadedCheckpoint(self.cfg, tensors, quantized, self.expert_format, self.path)
