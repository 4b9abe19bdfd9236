"""Multi-device and multi-node execution on torch.distributed: tensor parallel over query heads, expert
parallel over routed experts, vocab-parallel embedding / head (spec §15).

    torchrun --nproc-per-node 4 -m runtime.run --profile cpu --tp 2 --ep 2 --prompt "Hello"

    # the API, inside a torchrun-launched process (or after torch.distributed.init_process_group):
    rt = Runtime.load("cpu", parallel={"tp": 2, "ep": 2})

Modules: `layout` (the mesh, what divides a model, who owns what), `shard` (each rank reads its slices of the
official shards), `comm` (process group from the profile, the collectives the model calls; identity on one
device), `tp_ops` (the indexer's partial-score top-k), and runtime.plan.layouts (TP x EP x nodes proposals and the
per-rank memory figure).
"""

from __future__ import annotations

from pathlib import Path

from .comm import SINGLE, CollectiveError, Parallel, join
from .layout import Layout, LayoutError, parse_layout

__all__ = ["SINGLE", "CollectiveError", "Layout", "LayoutError", "Parallel", "parse_layout", "setup"]


def setup(parallel, profile, checkpoint: Path, backend):
    """Validate `parallel` against the checkpoint's config.json (before any weight is read), join the process
    group of `backend` (backends.base.Backend) and return (Parallel context, this rank's ShardedReader)."""
    from ..config import ModelConfig
    from .shard import ShardedReader

    import os

    import torch.distributed as dist

    layout = parse_layout(parallel)
    cfg = ModelConfig.from_file(Path(checkpoint) / "config.json")
    launched = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 0)) or None
    layout.check(cfg, launched)                          # refused here: nothing loaded, no process group joined
    par = join(profile, layout, cfg, backend)
    par.reader = ShardedReader(Path(checkpoint), cfg, layout, par.rank)     # kept: its bytes_read is reported
    return par, par.reader
