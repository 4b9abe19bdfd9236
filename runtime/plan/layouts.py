"""Parallel layouts in the memory planner: which TP x EP x nodes fit a profile, and what one rank holds.

    python -m runtime.plan --model flash --profile ascend-910b --context 131072 --layouts [--per-node 8]

Per rank (rank 0, which holds the largest vocabulary block):
- weights: every tensor of the official inventory this rank owns (`runtime.parallel.shard.owned_slice`, the
  loader's own rule), at its sliced shape, in the profile's weight format (the arithmetic of
  `runtime.plan.sizes.weight_bytes` over the owned slices);
- state: one KV head is never split, so every rank keeps the whole decode state of every sequence:
  `runtime.plan.sizes.state_plan` with the MTP block's layer (the runtime allocates it) x batch;
- workspace: one prefill chunk's activations (`runtime.plan.sizes.activation_bytes`), counted in the fit only.
Proposals keep TP inside a node (its all-reduce runs twice per layer); EP may span nodes.

`measured_rank_bytes(rt, state)` is the figure this plan is tested against: the bytes of the distinct tensor
storages a loaded rank holds for its weights (the model's weight map) and for a decode state, as allocated.
"""

from __future__ import annotations

import math

import torch

from ..parallel.layout import Layout, valid_ep, valid_tp
from .memory import PREFILL_CHUNK
from .sizes import HEADROOM, activation_bytes, state_plan, weight_bytes


def rank_weight_bytes(cfg, profile, layout: Layout, rank: int = 0) -> int:
    """What rank `rank` holds of the weights: `runtime.plan.sizes.weight_bytes` over its owned slices."""
    return weight_bytes(cfg, profile, layout=layout, rank=rank)


def rank_plan(cfg, profile, layout: Layout, context: int, batch: int = 1, rank: int = 0,
              chunk: int = PREFILL_CHUNK) -> dict:
    """Rank `rank`'s weights and state (`total`, what tests compare with a loaded rank) and, for the fit, the
    workspace of one prefill chunk (`runtime.plan.sizes.activation_bytes` of the whole model: an upper bound, TP
    would shrink its per-head parts)."""
    w = rank_weight_bytes(cfg, profile, layout, rank)
    st = state_plan(cfg, profile, include_mtp=True)
    state = batch * (st.fixed + st.per_token * context)
    act = activation_bytes(cfg, profile, min(chunk, context) * batch, context)
    budget = profile.memory_gib.value * 2 ** 30 * HEADROOM
    return {"layout": layout, "weights": w, "state": state, "total": w + state, "activations": act,
            "budget": budget, "fits": w + state + act <= budget}


def propose(cfg, profile, context: int, batch: int = 1, per_node: int = 8, max_ranks: int = 1024,
            limit: int = 6) -> list[dict]:
    """Fitting layouts, fewest ranks first (then the smaller per-rank total), TP within a node."""
    found = []
    for tp in valid_tp(cfg):
        for ep in valid_ep(cfg):
            lay = Layout(tp, ep)
            if tp > per_node or lay.world > max_ranks:
                continue
            p = rank_plan(cfg, profile, lay, context, batch)
            if p["fits"]:
                p["nodes"] = math.ceil(lay.world / per_node)
                found.append(p)
    found.sort(key=lambda p: (p["layout"].world, p["total"]))
    return found[:limit]


def format_layouts(name: str, cfg, profile, context: int, batch: int = 1, per_node: int = 8) -> str:
    gib = lambda b: f"{b / 2 ** 30:,.1f}"                                    # noqa: E731
    rows = propose(cfg, profile, context, batch, per_node)
    head = (f"layouts for {name} on {profile.name} ({profile.memory_gib.value:g} GiB per device, 10% headroom, "
            f"{per_node} per node), context {context:,}, batch {batch}; per-rank GiB (rank 0):")
    if not rows:
        return head + "\n  no layout fits; use a larger profile or a shorter context"
    lines = [head, "  TP  EP  ranks  nodes  weights  state  workspace  total  of budget"]
    for p in rows:
        lay = p["layout"]
        lines.append(f"  {lay.tp:>2}  {lay.ep:>2}  {lay.world:>5}  {p['nodes']:>5}  {gib(p['weights']):>7}  "
                     f"{gib(p['state']):>5}  {gib(p['activations']):>9}  {gib(p['total'] + p['activations']):>5}  "
                     f"{gib(p['budget'])}")
    lines.append("  launch: torchrun --nnodes NODES --nproc-per-node RANKS/NODES -m runtime.run --tp TP --ep EP ...")
    return "\n".join(lines)


def _storages(obj, seen: dict, visited: set) -> None:
    """Distinct tensor storages reachable from obj (tensors, containers, plain objects' attributes)."""
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen, visited)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen, visited)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            _storages(v, seen, visited)


def measured_rank_bytes(rt, state) -> tuple[int, int]:
    """(weight bytes, state bytes) this rank holds: distinct storages of its weight map and of `state`."""
    w, s = {}, {}
    _storages(rt.weights.tensors, w, set())
    _storages(state, s, set())
    return sum(w.values()), sum(s.values())
