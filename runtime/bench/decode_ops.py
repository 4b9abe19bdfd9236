"""Where a decode step's dispatches and time go: ATen ops per step by op class and layer type.

    python -m runtime.bench.decode_ops [--checkpoint DIR] [--context 1024] [--steps 8] [--threads 2]

Every call of the dispatch table's ops (`rt.dispatch.ops`) is wrapped: the ATen ops torch runs below Python
are attributed to the innermost table op running (`linear` inside `routed_experts` counts as `linear`), or to
`glue` (the model's own indexing, cat, where, arange... between ops), per layer type (window-only, CSA, HCA)
and per step; time per class is measured the same way (perf_counter around each op, exclusive of the ops it
calls). The fused decode step (`decode_block`, backends/native/decode_step.cpp) shows as its own class; run it
with `--unfused` to see the per-op path it replaces (the same profile with `decode_block` forced to the
reference). On a contended machine read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COUNTED = ("aten", "time")


class _Counter(TorchDispatchMode):
    def __init__(self, where):
        super().__init__()
        self.where, self.counts = where, defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.where()] += 1
        return func(*args, **(kwargs or {}))


def profile_decode(rt, context: int = 1024, steps: int = 8, seed: int = 0) -> dict:
    """Prefill `context` random tokens, then `steps` decode steps with every table op wrapped.
    -> {"steps", "aten_per_step", "by_class": {(layer kind, op): [aten ops, seconds]}} (totals over steps)."""
    model, cfg = rt.model, rt.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, min(cfg.vocab_size, 258), (1, context + 2 * steps + 4), generator=g)
    stack = [("other", "glue")]
    acc: dict = defaultdict(lambda: [0, 0.0])
    times = [time.perf_counter()]

    def where():
        return stack[-1]

    def enter(key):
        now = time.perf_counter()
        acc[stack[-1]][1] += now - times[-1]
        stack.append(key)
        times.append(now)

    def leave():
        now = time.perf_counter()
        acc[stack.pop()][1] += now - times.pop()
        times[-1] = now

    kinds = {i: cfg.layer_kind(i) for i in range(cfg.num_layers)}
    table = model.ops
    wrapped = {}
    for f in dataclasses.fields(table):
        fn = getattr(table, f.name)
        if not callable(fn) or f.name == "numerics":
            continue

        def wrap(*a, _fn=fn, _name=f.name, **k):
            enter((stack[-1][0], _name))
            try:
                return _fn(*a, **k)
            finally:
                leave()
        wrapped[f.name] = wrap
    blocks = model.blocks
    originals = [b.__class__.__call__ for b in blocks[:1]]
    block_call = originals[0]

    def block_wrap(self, *a, **k):
        enter((kinds[self.layer], "glue"))
        try:
            return block_call(self, *a, **k)
        finally:
            leave()

    state = rt.new_state(1, context=context + 2 * steps + 8)
    with torch.inference_mode():
        model.forward(ids[:, :context], state.seqs)
        model.forward(ids[:, context:context + 1], state.seqs)      # warm: first-call work
        new_ops = dataclasses.replace(table, **wrapped)
        _swap_ops(model, new_ops)
        type(blocks[0]).__call__ = block_wrap
        counter = _Counter(lambda: stack[-1])
        try:
            times[-1] = time.perf_counter()                  # pass 1: times (no dispatch hook: its cost)
            for i in range(steps):
                model.forward(ids[:, context + 1 + i:context + 2 + i], state.seqs)
            acc[stack[-1]][1] += time.perf_counter() - times[-1]
            with counter:                                    # pass 2: ATen ops, the same steps' shapes
                for i in range(steps, 2 * steps):
                    model.forward(ids[:, context + 1 + i:context + 2 + i], state.seqs)
        finally:
            type(blocks[0]).__call__ = block_call
            _swap_ops(model, table)
    for key, n in counter.counts.items():
        acc[key][0] += n
    total = sum(v[0] for v in acc.values())
    return {"steps": steps, "aten_per_step": total / steps, "by_class": dict(acc)}


def _swap_ops(model, ops) -> None:
    """Point every module of the model at table `ops` (they keep a reference to the table they were built with)."""
    seen = set()

    def visit(obj):
        if id(obj) in seen or obj is None:
            return
        seen.add(id(obj))
        if hasattr(obj, "ops") and not isinstance(obj, type):
            try:
                obj.ops = ops
            except AttributeError:
                pass
        for v in list(getattr(obj, "__dict__", {}).values()):
            if isinstance(v, (list, tuple)):
                for x in v:
                    if hasattr(x, "__dict__"):
                        visit(x)
            elif hasattr(v, "__dict__") and type(v).__module__.startswith("runtime.model"):
                visit(v)
    visit(model)


def format_profile(res: dict, title: str) -> str:
    steps, by = res["steps"], res["by_class"]
    tot_n = sum(v[0] for v in by.values()) or 1
    tot_t = sum(v[1] for v in by.values()) or 1e-12
    lines = [f"{title}: {res['aten_per_step']:.0f} ATen ops per decode step",
             f"  {'layer kind':<12} {'op class':<18} {'ops/step':>9} {'ops %':>6} {'time %':>7}"]
    for (kind, op), (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {kind:<12} {op:<18} {n / steps:9.1f} {100 * n / tot_n:6.1f} {100 * t / tot_t:7.1f}")
    per_kind = defaultdict(lambda: [0, 0.0])
    for (kind, _), (n, t) in by.items():
        per_kind[kind][0] += n
        per_kind[kind][1] += t
    lines.append("  by layer kind: " + ", ".join(f"{k} {v[0] / steps:.0f} ops ({100 * v[1] / tot_t:.0f}% time)"
                                                  for k, v in sorted(per_kind.items())))
    return "\n".join(lines)


def unfused(rt):
    """The same runtime with its blocks' `decode_block` set to the reference (the per-op path): what the
    fused step replaces, for op counts and A/B timing."""
    import dataclasses

    from ..ops import decode

    ops = dataclasses.replace(rt.model.ops, decode_block=decode.decode_block)
    _swap_ops(rt.model, ops)                      # the model and every module keep the table they use
    return rt


def main(argv=None) -> int:
    from ..api import Runtime
    from ..cli import run_cli

    def go():
        ap = argparse.ArgumentParser(prog="python -m runtime.bench.decode_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--checkpoint", default=None)
        ap.add_argument("--profile", default="cpu")
        ap.add_argument("--context", type=int, default=1024)
        ap.add_argument("--steps", type=int, default=8)
        ap.add_argument("--threads", type=int, default=None)
        ap.add_argument("--unfused", action="store_true", help="the per-op path (decode_block = reference)")
        a = ap.parse_args(argv)
        if a.threads:
            torch.set_num_threads(a.threads)
        kw = {"checkpoint": a.checkpoint} if a.checkpoint else {}
        rt = Runtime.load(a.profile, progress=False, **kw)
        if a.unfused:
            rt = unfused(rt)
        print(format_profile(profile_decode(rt, a.context, a.steps), f"{a.profile} @ {a.context}"))
        return 0
    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
