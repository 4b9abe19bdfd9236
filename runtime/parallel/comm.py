"""The process group and the handful of collectives the model calls (identity on one device).

`join(profile, layout, cfg, backend)` initialises torch.distributed from the launcher's environment (`torchrun`
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT) with the backend's process group
(`Backend.process_group_backend()`: gloo on CPU, nccl on CUDA, hccl on Ascend), on the backend's device per rank
(`Backend.rank_device`) and with the profile's `collective_timeout_s`, builds the TP and EP sub-groups and returns
a `Parallel`, which the model's modules take as `par` (runtime.model.v4).
`SINGLE` is the one-device context: every hook returns its input, so the single-device model is unchanged.

Where the collectives are (spec §15):
- `tp_sum` after `wo_b` (row-parallel output projection) and on the indexer's partial head scores;
- `ep_sum` after the routed experts (partial sums of each rank's experts; the routing to them is the MoE's);
- `embed` / `gather_vocab`: vocab-parallel embedding (sum of one non-zero row) and head (all-gather);
- `broadcast_tokens`: rank 0's sampled tokens, so every rank feeds the same ids.
A collective that fails in the process group (a torch.distributed `DistError`, or an error while waiting on the
collective's Work: a peer died and gloo reports a closed connection, or a peer hangs and the wait times out)
raises `CollectiveError`, one line naming the rank, the collective and the fix. An error while issuing a
collective (a wrong shape or dtype) is a bug here, not a lost peer, and propagates unchanged.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

import torch

from ..errors import V4Error
from .layout import Layout, LayoutError

DEFAULT_TIMEOUT_S = 300.0


class CollectiveError(V4Error):
    """A collective failed or timed out: another rank died, hung or was never started."""

    exit_status = 1
    leave_at_once = True       # a normal interpreter exit could wait on the broken process group


class _PeerLost(Exception):
    """Internal: an error raised while waiting on a collective's Work (its cause is the backend's error)."""


class Parallel:
    """One rank's view of the layout and its collectives; the model's modules take it as `par` (runtime.model.v4)."""

    def __init__(self, layout: Layout = Layout(), rank: int = 0, device="cpu", groups=None, timeout_s: float = 0.0):
        self.layout, self.rank, self.device = layout, rank, device
        self.tp, self.ep, self.world = layout.tp, layout.ep, layout.world
        # distributed: joined a process group (even of one rank: the NCCL / HCCL path at world size 1 then still
        # runs the embedding, head and token collectives); SINGLE and a plain one-device run have none.
        self.distributed = groups is not None
        self.tp_group, self.ep_group = groups or (None, None)
        self.timeout_s = timeout_s
        self.owns_group = False              # set by join when it initialised the default process group

    def describe(self) -> str:
        if not self.distributed:
            return "layout: single device"
        ep_rank, tp_rank = self.layout.coords(self.rank)
        return (f"layout: {self.layout} | rank {self.rank} = (ep {ep_rank}, tp {tp_rank}) | device {self.device} | "
                f"collective timeout {self.timeout_s:g} s")

    def close(self) -> None:
        """End of a run: wait for every rank (bounded by the timeout), then free the groups this context made
        (and the default group if `join` initialised it). Exiting with live gloo groups can abort the process
        in their destructors ("terminate called without an active exception")."""
        if not self.distributed:
            return
        import torch.distributed as dist

        self._call("final barrier", lambda: dist.barrier(async_op=True))
        for g in {self.tp_group, self.ep_group} - {None}:
            dist.destroy_process_group(g)
        if self.owns_group:
            dist.destroy_process_group()
        self.distributed = False

    # ---- collectives (identity on one device) ----
    def _call(self, what: str, issue):
        """Run one collective: `issue()` starts it (async_op=True) and returns its Work. A torch.distributed
        error, or any error while waiting on the Work, is the process group's (a peer died, or hung past the
        timeout: gloo raises a plain RuntimeError from `wait`) and becomes a CollectiveError. Anything else
        raised while issuing (a wrong shape or dtype) is a bug here and propagates unchanged."""
        import torch.distributed as dist

        try:
            work = issue()
            try:
                return work.wait()
            except RuntimeError as e:
                raise _PeerLost(e) from e
        except (dist.DistError, _PeerLost) as e:
            cause = e.__cause__ if isinstance(e, _PeerLost) else e
            first = (str(cause).strip().splitlines() or ["no detail"])[0]
            first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]          # drop gloo's source-file prefix
            raise CollectiveError(f"rank {self.rank}: collective {what} failed after a peer rank stopped or hung "
                                  f"({first}); check the other ranks' output, then relaunch") from None

    def _all_reduce(self, x: torch.Tensor, group, what: str) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        self._call(what, lambda: dist.all_reduce(x, group=group, async_op=True))
        return x

    def tp_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(x, self.tp_group, "tp all_reduce") if self.tp > 1 else x

    def ep_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(x, self.ep_group, "ep all_reduce") if self.ep > 1 else x

    def embed(self, weight: torch.Tensor, n_vocab: int):
        """The embedding lookup for this rank's rows of the table (the whole table on one device)."""
        return weight if not self.distributed else VocabEmbedding(self, weight, *self.layout.vocab(self.rank, n_vocab))

    def gather_vocab(self, logits: torch.Tensor, n_vocab: int) -> torch.Tensor:
        """[..., V_local] -> [..., V]: every rank's block of the vocabulary, in rank order."""
        if not self.distributed:
            return logits
        import torch.distributed as dist

        chunk = -(-n_vocab // self.world)
        local = logits.contiguous()
        if local.shape[-1] < chunk:                         # the last block may be short: pad for all_gather
            local = torch.nn.functional.pad(local, (0, chunk - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(self.world)]
        self._call("vocab all_gather", lambda: dist.all_gather(parts, local, async_op=True))
        return torch.cat(parts, dim=-1)[..., :n_vocab]

    def broadcast_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's sampled token ids on every rank (so sampling with any seed cannot make ranks diverge)."""
        if not self.distributed:
            return tokens
        import torch.distributed as dist

        t = tokens.to(device=self.device, dtype=torch.int64).contiguous()
        self._call("token broadcast", lambda: dist.broadcast(t, src=0, async_op=True))
        return t.to(tokens.device)


class VocabEmbedding:
    """Vocab-parallel embedding: this rank's rows [lo, hi); other ids give zero rows, summed over all ranks."""

    def __init__(self, par: Parallel, weight: torch.Tensor, lo: int, hi: int):
        self.par, self.weight, self.lo, self.hi = par, weight, lo, hi
        self.device = weight.device

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.lo) & (ids < self.hi)
        rows = self.weight[(ids - self.lo).clamp(0, self.hi - self.lo - 1)].float()
        rows = torch.where(mine[..., None], rows, torch.zeros((), device=rows.device))
        return self.par._all_reduce(rows, None, "embedding all_reduce")   # exact: one non-zero term per row


SINGLE = Parallel()


def join(profile, layout: Layout, cfg, device_backend) -> Parallel:
    """Join (or reuse) the default process group for `layout`, build its TP / EP groups, return the context.
    `device_backend`: the backends.base.Backend the ranks compute on (its process group and device per rank)."""
    import torch.distributed as dist

    backend = device_backend.process_group_backend()
    if backend is None:
        raise LayoutError(f"profile {profile.name} runs on {device_backend.name}, which has no torch.distributed "
                          "backend; choose a profile of a backend that has one for a multi-device run")
    timeout = getattr(profile, "collective_timeout_s", DEFAULT_TIMEOUT_S)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            if layout.world == 1:                        # no launcher and one rank: a plain one-device run
                return Parallel(layout, 0, device_backend.rank_device(0))
            raise LayoutError(f"layout {layout} needs {layout.world} processes; launch with "
                              f"torchrun --nproc-per-node {layout.world} -m runtime.run ... (or call "
                              "torch.distributed.init_process_group first)")
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except (dist.DistError, ValueError) as e:    # a rank never came (DistStoreError), a bad MASTER_PORT
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or ["no detail"])[0])[:160]
            raise CollectiveError(f"rank {os.environ.get('RANK')}: could not join the {backend} process group of "
                                  f"{os.environ.get('WORLD_SIZE')} ranks within {timeout:g} s ({first}); launch "
                                  "every rank with the same MASTER_ADDR / MASTER_PORT (torchrun does)") from None
        owns = True
    else:
        owns = False
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        layout.check(cfg, world)
    except LayoutError:
        if owns:
            dist.destroy_process_group()
        raise
    device = device_backend.rank_device(int(os.environ.get("LOCAL_RANK", rank)))
    # new_group is collective: every rank creates every group, in the same order.
    tp_group = ep_group = None
    if layout.tp > 1:
        for ranks in layout.tp_groups():
            g = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
            tp_group = g if rank in ranks else tp_group
    if layout.ep > 1:
        for ranks in layout.ep_groups():
            g = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
            ep_group = g if rank in ranks else ep_group
    par = Parallel(layout, rank, device, (tp_group, ep_group), timeout)
    par.owns_group = owns
    return par
