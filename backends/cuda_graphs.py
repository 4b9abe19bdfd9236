"""CUDA graphs for the decode step (issue 19 item 3): the static step of backends/cuda_static_step.py captured
once per batch-size bucket and replayed for every generated token.

A profile with `graph_mode: cudagraph` makes `CudaBackend.decode_runner` return a `GraphDecodeRunner`; generate
opens a `session` over its sequences after their prefill: each group of up to 32 rows is attached to the slots
of the smallest bucket (1, 2, 4, 8, 16, 32) that holds it, the rows past it padding (position 0, token 0, their
own slots: every op of the step is row-wise, so they cannot change a real row). A step copies the ids and
positions into the graph's static input tensors and replays. Graphs are cached per (bucket, capacity, group of
32 rows); the capacity (tokens per slot: prompt + new tokens) is rounded up to a power of two so later calls
reuse them.

Capturability is checked, not hoped for: the first run of each graph's step is under `no_host_sync()`, which
refuses every call that reads a device value on the host (`.item()`, `bool()` / `int()` of a tensor, `.tolist()`,
`.cpu()`) or makes a shape from data (nonzero, bincount, unique, masked_select, repeat_interleave by tensor,
boolean indexing) or builds a tensor from host data. On the CPU-hosted twin (tests/twins) that run is the
proof, and the twin's later steps run the checked step eagerly (there is no graph on a CPU); on a GPU the step
is then captured (`torch.cuda.CUDAGraph`) and replayed. A refusal is never silent: generate prints one line
(`decode: CUDA graph capture refused (...)`) and runs the eager per-op step, and `describe()` (in
`Runtime.placement()`) says which decode runs and what each op of the graph step runs.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.errors import V4Error

from . import cuda_ops, cuda_static_step

BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_CAPACITY = 256
# aten ops that read a device value on the host or whose output shape depends on data.
_SYNC_ATEN = ("_local_scalar_dense", "nonzero", "nonzero_static_", "bincount", "unique", "_unique", "_unique2",
              "unique_dim", "unique_consecutive", "masked_select", "repeat_interleave", "lift_fresh", "equal",
              "is_nonzero", "allclose", "_assert_async")
_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")
_ACTIVE = [0]


class CaptureRefused(V4Error):
    """The decode step cannot be captured: a host sync or a data-dependent shape (the one line says where)."""


def capturing() -> bool:
    """True while a step is being checked or captured (twins skip their host-side value assertions)."""
    return _ACTIVE[0] > 0 or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


_ROOT = str(Path(__file__).resolve().parent.parent) + "/"


def _where() -> str:
    """The innermost frame of this project's code on the stack (what made the refused call)."""
    for f in reversed(traceback.extract_stack()[:-1]):
        if f.filename.startswith(_ROOT) and not f.filename.endswith("cuda_graphs.py"):
            return f"{f.filename[len(_ROOT):]}:{f.lineno} {f.name}"
    return "?"


class _RefuseFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
            raise CaptureRefused(f"Tensor.{name} reads a device value on the host at {_where()}")
        if (name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1
                and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                        for i in (args[1] if isinstance(args[1], (tuple, list)) else (args[1],)))):
            raise CaptureRefused(f"boolean-mask indexing (a data-dependent shape) at {_where()}")
        return func(*args, **(kwargs or {}))


class _RefuseAten(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        base = func.overloadpacket.__name__
        # repeat_interleave by an int (or with output_size given) has a static shape; by a tensor it has not
        static = base == "repeat_interleave" and (not isinstance(args[1] if len(args) > 1 else args[0], torch.Tensor)
                                                  or (kwargs or {}).get("output_size") is not None)
        if base in _SYNC_ATEN and not static:
            raise CaptureRefused(f"aten.{base} (a host sync or data-dependent shape) at {_where()}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Refuse (CaptureRefused, one line naming the call and where) anything a CUDA graph cannot hold."""
    _ACTIVE[0] += 1
    try:
        with _RefuseFunctions(), _RefuseAten():
            yield
    finally:
        _ACTIVE[0] -= 1


def bucket_for(n: int) -> int:
    return next(b for b in BUCKETS if b >= n)


def capacity_for(tokens: int) -> int:
    return max(MIN_CAPACITY, 1 << max(tokens - 1, 0).bit_length())


class _Graph:
    """One bucket's static state, input / output tensors and (on a GPU) its captured graph."""

    def __init__(self, runner, rows: int, capacity: int):
        dev = runner.model.device
        self.runner, self.rows, self.capacity = runner, rows, capacity
        self.state = cuda_static_step.StaticState(runner.model.cfg, rows, capacity, dev)
        self.ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.graph = None
        with no_host_sync():                              # the proof of capturability (twin and GPU alike)
            self.out = self._step()
        if runner.cuda:
            self._capture()

    def _step(self) -> torch.Tensor:
        r = self.runner
        return cuda_static_step.step(r.model, r.ops, self.state, self.ids, self.pos, r.routed)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                     # warm-up off the capture stream (cuBLAS workspaces)
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=self.runner.pool):
                self.out = self._step()
        except RuntimeError as e:
            raise CaptureRefused(f"torch.cuda.graph: {str(e).splitlines()[0]}") from None

    def run(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._step()                               # the twin: the checked step, run eagerly


class GraphDecodeRunner:
    """generate's decode steps through captured static steps (see the module docstring)."""

    def __init__(self, model, table, cuda: bool):
        self.model, self.ops, self.cuda, self.refused = model, table.ops, cuda, None
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        rows = {r.op: r for r in table.rows}
        par = getattr(model, "parallel", None)
        if par is not None and (par.tp > 1 or par.ep > 1 or par.distributed):
            self.refused = f"a TP / EP rank (tp {par.tp}, ep {par.ep}): the static step holds no collectives"
        if "graph_capture" not in table.capabilities:
            self.refused = (f"capability graph_capture is not in probe ∩ profile {table.profile} "
                            f"({', '.join(sorted(table.capabilities))})")
        experts = rows["routed_experts"].impl
        if experts == "cuda.grouped_mm":
            self.routed, self.routed_note = cuda_ops.routed_experts, "cuda.grouped_mm (counts by index_add_)"
        else:
            self.routed = cuda_static_step.dense_routed_experts
            self.routed_note = (f"static.dense_experts: every expert over every row, masked (the table's {experts} "
                                "groups tokens by data-dependent shapes)")
        self.rows = rows

    def describe(self) -> list[str]:
        where = "CUDA graphs" if self.cuda else "the checked static step run eagerly (CPU-hosted twin: no graph)"
        if self.refused:
            return [f"decode: eager per-op step (CUDA graph capture refused: {self.refused})"]
        lines = [f"decode: {where}, buckets {', '.join(map(str, BUCKETS))} rows, static state of "
                 f">= {MIN_CAPACITY} tokens per row (backends/cuda_static_step.py); for Runtime.generate's "
                 "one-token steps (speculative verify steps and the serve engine run the eager per-op step)"]
        for op in ("linear", "group_linear", "rms_norm", "apply_rope", "hc_pre", "hc_post", "hc_head",
                   "compress_pool", "sparse_attention", "moe_gate", "clamped_swiglu"):
            lines.append(f"  graph step {op}: {self.rows[op].impl}")
        lines.append("  graph step indexer_topk: static.batched_index_scores (index_scores' math over each row's "
                     "own keys, fixed k, -1 padding)")
        lines.append(f"  graph step routed_experts: {self.routed_note}")
        return lines

    def graph(self, rows: int, capacity: int, group: int = 0) -> _Graph:
        """The graph of bucket `rows` at `capacity` for the session's `group`-th group of rows (each group has
        its own slots)."""
        key = (rows, capacity, group)
        if key not in self._graphs:
            self._graphs[key] = _Graph(self, rows, capacity)
        return self._graphs[key]

    def session(self, seqs: list, tokens: int):
        """A decode session over `seqs` (prefilled), each growing to at most `tokens` tokens; None (after one
        line on stderr saying why) where capture is refused: generate then runs the eager per-op step."""
        if self.refused is None:
            try:
                with torch.inference_mode():
                    return Session(self, seqs, capacity_for(tokens))
            except CaptureRefused as e:
                self.refused = str(e)
        print(f"decode: CUDA graph capture refused ({self.refused}); running the eager per-op step",
              file=sys.stderr)
        return None


class Session:
    """Sequences attached to bucket slots; `step` feeds one token per active row and returns their logits."""

    def __init__(self, runner: GraphDecodeRunner, seqs: list, capacity: int):
        self.seqs, self.capacity = seqs, capacity
        self.pos = [s.pos for s in seqs]
        self.groups = []                               # (graph, first row, rows)
        for lo in range(0, len(seqs), BUCKETS[-1]):
            n = min(BUCKETS[-1], len(seqs) - lo)
            g = runner.graph(bucket_for(n), capacity, len(self.groups))
            for j in range(n):
                g.state.attach(j, seqs[lo + j])
            self.groups.append((g, lo, n))
        self.attached = set(range(len(seqs)))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, active: list[int]) -> torch.Tensor:
        """tokens [len(active)] for rows `active` (indices into the session's sequences) -> logits [len, V]."""
        for b in sorted(self.attached - set(active)):   # a finished row leaves: its state goes back now
            self._detach(b)
        feed = dict(zip(active, tokens.reshape(-1).tolist()))
        if any(self.pos[b] >= self.capacity for b in active):
            raise V4Error(f"decode session of {self.capacity} tokens per row is full")
        out = {}
        for g, lo, n in self.groups:
            ids = torch.zeros(g.rows, dtype=torch.int64)  # host
            pos = torch.zeros(g.rows, dtype=torch.int64)  # host
            for j in range(n):
                ids[j], pos[j] = feed.get(lo + j, 0), self.pos[lo + j]
            logits = g.run(ids, pos)
            for j in range(n):
                if lo + j in feed:
                    out[lo + j] = logits[j]
        for b in active:
            self.pos[b] += 1
        return torch.stack([out[b] for b in active]).float().cpu()

    def _detach(self, b: int) -> None:
        for g, lo, n in self.groups:
            if lo <= b < lo + n:
                g.state.detach(b - lo, self.seqs[b], self.pos[b])
        self.attached.discard(b)

    @torch.inference_mode()
    def close(self) -> None:
        """Every row's state back into its sequence (at the position it has reached)."""
        for b in sorted(self.attached):
            self._detach(b)


def bench(argv=None) -> None:
    """`python -m backends.cuda_graphs [--profile P] [--checkpoint DIR] [--batch 1,8,32] [--tokens N]`: decode
    ms per step and per token, eager per-op step vs CUDA graphs, on this GPU (greedy, EOS off, 32-token
    prompts; a first call per batch captures / warms up and is not timed)."""
    import argparse
    import dataclasses

    from runtime.api import Runtime
    from runtime.profile import load_profile

    ap = argparse.ArgumentParser(prog="python -m backends.cuda_graphs")
    ap.add_argument("--profile", default="nvidia-h100")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args(argv)
    prof = load_profile(a.profile)
    runs = {mode: Runtime.load(dataclasses.replace(prof, graph_mode=mode), checkpoint=a.checkpoint, progress=False)
            for mode in ("eager", "cudagraph")}
    print("\n".join(runs["cudagraph"].placement()))
    for b in (int(v) for v in a.batch.split(",")):
        prompts = [[2 + (7 * i + j) % 200 for j in range(32)] for i in range(b)]
        row = []
        for mode, rt in runs.items():
            rt.generate(prompts, max_new_tokens=8, stop_at_eos=False)                     # capture / warm-up
            g = rt.generate(prompts, max_new_tokens=a.tokens, stop_at_eos=False)
            step_ms = 1e3 * g.decode_seconds / (a.tokens - 1)
            row.append(f"{mode} {step_ms:.2f} ms/step {step_ms / b:.3f} ms/token")
        print(f"batch {b}: " + " | ".join(row))


if __name__ == "__main__":
    bench()
